"""TFDS datasets -> decoded examples: coco/2017_panoptic, coco/2017, objects365.

The decode functions are pure TF on one TFDS feature dict and return
`(decoded, ok)`; `ok` is False for bad input found only after decoding (a panoptic PNG
id missing from `panoptic_objects`, a label value that is no class), which `read`
filters out and counts (input_pipeline/bad_input.py).

Feature layouts (tensorflow_datasets/object_detection/coco.py):
  coco/2017_panoptic: image [h, w, 3], image/id, panoptic_image [h, w, 3] (RGB ids),
    panoptic_objects {id, bbox (normalised ymin, xmin, ymax, xmax), label (133, in
    panoptic category-file order), is_crowd, area}.
  coco/2017 and objects365 (objects365_builder.py): image, image/id, objects {id, bbox,
    label, is_crowd, area}. TFDS coco/2017 has NO instance masks: it is read as boxes
    ('boxes' task / box evaluation); instance masks need the raw JSON (coco.py).
  scene_parse150 is refused: TFDS builds it from ChallengeData2017's
    `annotations_instance` archive, whose PNGs hold R = class among the 100 *instance*
    classes (instanceInfo100, not objectInfo150), G = instance id, and no stuff at all;
    no per-pixel 150-class label can be recovered from it. ADE20k-150 semantic is read
    from the raw ADEChallengeData2016 folder (registry entry `ade20k`, semantic_png.py),
    ADE20k panoptic from Mask2Former's conversion (`ade20k_panoptic`, coco.py).

TFDS class labels are mapped into the vocabulary by name (`label_map`), so label order
differences between TFDS and dataseg/vocab cannot silently mislabel.
"""

import importlib
import logging
from typing import Any, Mapping

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import readers
from input_pipeline.bad_input import BadInputCounter

_DEFAULT_VOCAB = {
  "coco/2017_panoptic": "coco_panoptic",
  "coco/2017": "coco_panoptic",
  "objects365": "objects365",
}
SCENE_PARSE150_REFUSED = (
  "TFDS scene_parse150 is not ADE20k-150 semantic data: TFDS builds it from "
  "ChallengeData2017 annotations_instance (channel R = one of 100 instance classes of "
  "instanceInfo100, G = instance id, stuff unlabelled). Use the raw "
  "ADEChallengeData2016 folder: dataset 'ade20k' (semantic) or 'ade20k_panoptic' "
  "(README, 'Preparing the paper's datasets')"
)


def _objects(features, key, label_map, is_thing):
  image = features["image"]
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  obj = features[key]
  labels = tf.gather(tf.constant(label_map, tf.int32), tf.cast(obj["label"], tf.int32))
  box = tf.reshape(tf.cast(obj["bbox"], tf.float32), [-1, 4])
  table = dict(
    seg_class=labels,
    seg_box=box * tf.concat([hw, hw], 0),
    seg_is_thing=tf.gather(tf.constant(np.asarray(is_thing, bool)), labels),
    seg_is_crowd=tf.cast(obj["is_crowd"], tf.bool),
    image_id=tf.cast(features["image/id"], tf.int64),
    image=tf.cast(image, tf.uint8),
  )
  return table


def decode_coco_panoptic(features, *, label_map, is_thing):
  """coco/2017_panoptic features -> (decoded, ok)."""
  out = _objects(features, "panoptic_objects", label_map, is_thing)
  rgb = tf.cast(features["panoptic_image"], tf.int32)
  ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
  seg_ids = tf.cast(features["panoptic_objects"]["id"], tf.int32)
  # A sentinel id -1 keeps the search valid on images with no segment.
  keys = tf.concat([[-1], seg_ids], 0)
  order = tf.argsort(keys, stable=True)
  sorted_ids = tf.gather(keys, order)
  flat = tf.reshape(ids, [-1])
  pos = tf.minimum(tf.searchsorted(sorted_ids, flat), tf.size(keys) - 1)
  found = tf.gather(sorted_ids, pos) == flat
  seg_map = tf.where(found, tf.gather(order, pos) - 1, -1)
  out["segment_map"] = tf.reshape(seg_map, tf.shape(ids))
  ok = ~tf.reduce_any(~found & (flat != 0))
  return out, ok


def decode_detection(features, *, label_map, is_thing):
  """coco/2017 / objects365 features -> (decoded, ok); boxes only (map all -1).

  Zero-area boxes are kept here and dropped by preprocessing (the Objects365 builder
  already drops and counts them when it builds the dataset).
  """
  out = _objects(features, "objects", label_map, is_thing)
  out["segment_map"] = -tf.ones(tf.shape(features["image"])[:2], tf.int32)
  return out, tf.constant(True)


def label_map_by_name(tfds_names, vocab):
  """TFDS ClassLabel names -> contiguous vocabulary ids (raises on a name not found)."""
  index = {n.lower(): i for i, n in enumerate(vocab.raw_names)}
  missing = [n for n in tfds_names if n.lower() not in index]
  if missing:
    raise ValueError(f"TFDS labels {missing[:5]} are not in vocabulary {vocab.name!r}")
  return np.array([index[n.lower()] for n in tfds_names], np.int32)


def read(spec: Mapping[str, Any], *, shard_index=0, shard_count=1, counter=None):
  """TFDS spec -> (tf.data.Dataset of this host's decoded examples, Vocabulary).

  Each host reads `tfds.even_splits(split, shard_count)[shard_index]`.
  """
  name = spec["tfds_name"]
  base = name.split(":")[0]
  if base == "scene_parse150":
    raise ValueError(SCENE_PARSE150_REFUSED)
  counter = counter or BadInputCounter(spec.get("on_bad_input", "skip"), name)
  vocab = readers.vocab_from(dict(spec, vocab=spec.get("vocab") or _DEFAULT_VOCAB.get(base)))
  if base.startswith("objects365"):
    importlib.import_module("input_pipeline.readers.objects365_builder")  # Registers it.
  builder = tfds.builder(name, data_dir=spec.get("data_dir"))
  split = tfds.even_splits(spec.get("split", "train"), n=shard_count)[shard_index]
  ds = builder.as_dataset(split=split, shuffle_files=False)
  features = builder.info.features
  if base == "coco/2017_panoptic":
    fn = lambda f: decode_coco_panoptic(
      f,
      label_map=label_map_by_name(features["panoptic_objects"]["label"].names, vocab),
      is_thing=vocab.is_thing,
    )
  elif "objects" in features:
    label_map = label_map_by_name(features["objects"]["label"].names, vocab)
    fn = lambda f: decode_detection(f, label_map=label_map, is_thing=vocab.is_thing)
  else:
    raise ValueError(
      f"no decoder for TFDS dataset {name!r}; supported: {', '.join(_DEFAULT_VOCAB)}"
    )
  logging.info("TFDS %s split %s -> vocabulary %s", name, split, vocab.name)
  return filter_bad(ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE), counter, name), vocab


def filter_bad(ds, counter, name):
  """Drops `(decoded, ok=False)` elements, reporting each to `counter`."""

  def keep(example, ok):
    def report(ok_, image_id):
      if not ok_:
        counter.report(
          "unannotated_segment" if "panoptic" in name else "unknown_category",
          image_id=int(image_id),
          file=name,
          field="annotation",
          reason="decoded labels do not match the annotation table",
        )
      return ok_

    return tf.ensure_shape(tf.numpy_function(report, [ok, example["image_id"]], tf.bool), [])

  return ds.filter(keep).map(readers._first)  # pylint: disable=protected-access
