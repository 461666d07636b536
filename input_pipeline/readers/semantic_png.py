"""Semantic segmentation from a folder of images and a folder of label maps.

Covers
  - ADE20k raw `ADEChallengeData2016`: `images/{training,validation}/*.jpg`,
    `annotations/{training,validation}/*.png`, value 0 = void, 1..150 = objectInfo150
    (spec: {'format': 'semantic_png', 'image_dir': .../images/training,
            'mask_dir': .../annotations/training, 'vocab': 'ade20k'});
  - Pascal Context-59 raw: label maps with the 459-class label ids (the official
    `trainval/*.mat` files, key 'LabelMap', or PNGs made from them), images in
    `VOCdevkit/VOC2010/JPEGImages`; the 400 classes outside the 59 are void
    (spec: {..., 'vocab': 'pascal_context59', 'unlisted': 'void', 'file_list': val.txt});
  - any user folder of label PNGs (L or P mode; palette indices are the labels).

A pixel value v maps to `vocab.id_to_contiguous[v]`; `void_values` (default (0, 255))
are void (-1). Any other value is bad input 'unknown_category', unless
`'unlisted': 'void'` declares unlisted values void on purpose (Pascal Context-59).

Semantic data becomes segments by class: one segment per class present (rows in class
order), its box the tight box of the class's pixels; `is_thing` from the vocabulary,
`is_crowd` False. Masks are matched to images by file stem; `file_list` (optional, one
stem per line) restricts and orders the examples. `image_id` is the stem when numeric,
else the trailing digits of the stem, else the position in the sorted list.
"""

import os
import re
from typing import Any, Mapping

import numpy as np
import scipy.io

from input_pipeline import readers
from input_pipeline.bad_input import BadInputCounter

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_MASK_EXTS = (".png", ".mat")


def classes_to_segments(class_map: np.ndarray, is_thing: np.ndarray):
  """Contiguous class map `[h, w]` (-1 void) -> (segment_map, table fields)."""
  classes = np.unique(class_map[class_map >= 0]).astype(np.int32)
  lookup = -np.ones(len(is_thing) + 1, np.int32)
  lookup[classes] = np.arange(len(classes), dtype=np.int32)
  seg_map = lookup[class_map]  # -1 indexes the trailing -1.
  boxes = np.zeros([len(classes), 4], np.float32)
  for k in range(len(classes)):
    ys, xs = np.nonzero(seg_map == k)
    boxes[k] = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
  return seg_map, dict(
    seg_class=classes,
    seg_box=boxes,
    seg_is_thing=np.asarray(is_thing, bool)[classes],
    seg_is_crowd=np.zeros(len(classes), bool),
  )


def _stem_id(stem, position):
  digits = re.findall(r"\d+", stem)
  return int(digits[-1]) if digits else position


def _list(folder, exts):
  out = {}
  for f in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(f)
    if ext.lower() in exts:
      out.setdefault(stem, os.path.join(folder, f))
  return out


def _records(spec, counter):
  images = _list(spec["image_dir"], _IMAGE_EXTS)
  masks = _list(spec["mask_dir"], _MASK_EXTS)
  if spec.get("file_list"):
    with open(spec["file_list"]) as f:
      stems = [line.strip() for line in f if line.strip()]
  else:
    stems = sorted(set(images) | set(masks))
  records = []
  for position, stem in enumerate(stems):
    image_id = _stem_id(stem, position)
    for kind, table, folder in (("image", images, "image_dir"), ("mask", masks, "mask_dir")):
      if stem not in table:
        counter.report(
          "missing_file",
          image_id=image_id,
          file=stem,
          field=folder,
          reason=f"no {kind} file for {stem!r} in {spec[folder]}",
        )
        break
    else:
      records.append(dict(image_id=image_id, path=images[stem], mask_path=masks[stem]))
  return records


def _load_labels(path):
  if path.endswith(".mat"):
    return np.asarray(scipy.io.loadmat(path)["LabelMap"])
  return readers.load_label_png(path)


def read(spec: Mapping[str, Any], *, shard_index=0, shard_count=1, counter=None):
  """Semantic-PNG spec -> (tf.data.Dataset of decoded examples, Vocabulary)."""
  counter = counter or BadInputCounter(spec.get("on_bad_input", "skip"), "semantic_png")
  vocab = readers.vocab_from(spec)
  void_values = set(int(v) for v in spec.get("void_values", (0, 255)))
  unlisted_void = spec.get("unlisted", "error") == "void"
  keep_empty = bool(spec.get("keep_empty", False))
  max_value = max(max(int(i) for i in vocab.original_ids), max(void_values)) + 1
  value_lookup = -np.ones(max_value, np.int64)  # -1 void, -2 unknown.
  if not unlisted_void:
    value_lookup[:] = -2
    value_lookup[list(void_values)] = -1
  for original, contiguous in vocab.id_to_contiguous.items():
    value_lookup[int(original)] = int(contiguous)

  def load(rec):
    image = readers.load_or_report(readers.load_rgb, rec["path"], counter, rec["image_id"], "image")
    if image is None:
      return None
    values = readers.load_or_report(
      _load_labels,
      rec["mask_path"],
      counter,
      rec["image_id"],
      "label map",
      (OSError, ValueError, SyntaxError, KeyError),
    )
    if values is None:
      return None
    if values.ndim != 2 or values.shape != image.shape[:2]:
      counter.report(
        "corrupt_image",
        image_id=rec["image_id"],
        file=rec["mask_path"],
        field="label map",
        reason=f"shape {values.shape}, expected a "
        f"single-channel map of the image size {image.shape[:2]}",
      )
      return None
    values = values.astype(np.int64)
    beyond = values >= max_value
    class_map = value_lookup[np.where(beyond, 0, values)]
    class_map = np.where(beyond, -1 if unlisted_void else -2, class_map)
    if np.any(class_map == -2):
      bad = np.unique(values[class_map == -2])[:10].tolist()
      counter.report(
        "unknown_category",
        image_id=rec["image_id"],
        file=rec["mask_path"],
        field="label value",
        reason=f"values {bad} are not classes of vocabulary {vocab.name!r}",
      )
      return None
    seg_map, table = classes_to_segments(class_map, vocab.is_thing)
    if not len(table["seg_class"]) and not keep_empty:
      counter.report(
        "no_annotations",
        image_id=rec["image_id"],
        file=rec["mask_path"],
        field="label map",
        reason="every pixel is void",
      )
      return None
    return dict(image=image, segment_map=seg_map, image_id=np.int64(rec["image_id"]), **table)

  records = _records(spec, counter)
  ds = readers.records_dataset(
    records, load, counter, shard_index=shard_index, shard_count=shard_count
  )
  return ds, vocab
