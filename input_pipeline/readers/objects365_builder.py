"""TFDS builder for Objects365 v2 detection from its raw COCO-format files (TFDS has none).

Put the raw files in the manual dir (`<data_dir>/downloads/manual/objects365/` or pass
`--manual_dir`):

  train/zhiyuan_objv2_train.json   train/patch0/*.jpg ... train/patch50/*.jpg
  val/zhiyuan_objv2_val.json       val/images/v1/patch0/*.jpg ... val/images/v2/patch43/

and build once:

  python -c "from input_pipeline.readers import objects365_builder as b; \
    b.Objects365(data_dir='$DATA').download_and_prepare(download_config=\
    __import__('tensorflow_datasets').download.DownloadConfig(manual_dir='$RAW'))"

Features mirror TFDS coco/2017 (`objects`: bbox normalised (ymin, xmin, ymax, xmax),
label = contiguous id of the packaged `objects365` vocabulary, is_crowd, id, area), so
`tfds_readers.decode_detection` reads both. Bad input is handled at build time with the
policy of input_pipeline/bad_input.py (`ON_BAD_INPUT`): unreadable images, missing
files, unknown categories and images without boxes are skipped and counted; zero-area
or out-of-image boxes are dropped; non-RGB images are converted to RGB.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from dataseg import vocab as vocab_lib
from input_pipeline import readers
from input_pipeline.bad_input import BadInputCounter
from input_pipeline.readers import coco

SPLITS = {
  "train": ("train", "zhiyuan_objv2_train.json"),
  "validation": ("val", "zhiyuan_objv2_val.json"),
}


class Objects365(tfds.core.GeneratorBasedBuilder):
  """Objects365 v2: 365 thing classes, boxes only."""

  VERSION = tfds.core.Version("2.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  ON_BAD_INPUT = "skip"
  VOCAB = "objects365"

  def _info(self):
    names = list(vocab_lib.load(self.VOCAB).raw_names)
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(encoding_format="jpeg"),
          "image/filename": tfds.features.Text(),
          "image/id": np.int64,
          "objects": tfds.features.Sequence(
            {
              "id": np.int64,
              "area": np.float32,
              "bbox": tfds.features.BBoxFeature(),
              "label": tfds.features.ClassLabel(names=names),
              "is_crowd": np.bool_,
            }
          ),
        }
      ),
      homepage="https://www.objects365.org/",
    )

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    out = {}
    for split, (folder, json_name) in SPLITS.items():
      path = os.path.join(root, folder, json_name)
      if os.path.isfile(path):
        out[split] = self._generate_examples(path, os.path.join(root, folder))
    if not out:
      raise FileNotFoundError(
        f"no Objects365 JSON under {root}; expected {[os.path.join(*v) for v in SPLITS.values()]}"
      )
    return out

  def _generate_examples(self, json_path, image_dir):
    counter = BadInputCounter(self.ON_BAD_INPUT, "objects365")
    spec = dict(format="coco_detection", json=json_path, image_dir=image_dir, vocab=self.VOCAB)
    records, _ = coco._records(spec, "coco_detection", counter)  # pylint: disable=protected-access
    for rec in records:
      try:
        image = readers.load_rgb(rec["path"])
      except (OSError, ValueError, SyntaxError) as e:
        counter.report(
          "corrupt_image",
          image_id=rec["image_id"],
          file=rec["path"],
          field="image",
          reason=f"cannot decode: {e}",
        )
        continue
      h, w = image.shape[:2]
      is_plain_jpeg = rec["path"].lower().endswith((".jpg", ".jpeg"))
      objects = [
        dict(
          id=s["id"],
          label=s["cls"],
          is_crowd=s["is_crowd"],
          area=np.float32((s["box"][2] - s["box"][0]) * (s["box"][3] - s["box"][1])),
          bbox=tfds.features.BBox(
            ymin=min(s["box"][0] / h, 1.0),
            xmin=min(s["box"][1] / w, 1.0),
            ymax=min(s["box"][2] / h, 1.0),
            xmax=min(s["box"][3] / w, 1.0),
          ),
        )
        for s in rec["segments"]
      ]
      with open(rec["path"], "rb") as f:
        raw_mode_rgb = is_plain_jpeg and _is_rgb_jpeg(f)
      yield (
        rec["image_id"],
        {
          "image": rec["path"] if raw_mode_rgb else image,
          "image/filename": os.path.basename(rec["path"]),
          "image/id": rec["image_id"],
          "objects": objects,
        },
      )
    counter.end_epoch()


def _is_rgb_jpeg(f):
  """True for a 3-channel JPEG, which TFDS stores as is (no re-encoding)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  with Image.open(f) as im:
    return im.format == "JPEG" and im.mode == "RGB"
