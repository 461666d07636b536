"""Readers: raw dataset files or TFDS datasets -> tf.data of decoded examples.

Every reader yields the "decoded example" of dataseg/schema.py with contiguous class ids
of a `dataseg.vocab.Vocabulary`. A reader is chosen by config alone through a spec dict:

  {'format': 'coco_panoptic', 'json': ..., 'image_dir': ..., 'mask_dir': ...}
  {'format': 'coco_instance', 'json': ..., 'image_dir': ...}     # polygons / RLE
  {'format': 'coco_detection', 'json': ..., 'image_dir': ...}    # boxes only
  {'format': 'semantic_png', 'image_dir': ..., 'mask_dir': ..., 'vocab': 'ade20k'}
  {'format': 'tfds', 'tfds_name': 'coco/2017_panoptic', 'split': 'train'}
  {'format': 'objects365_tfds', 'split': 'train'}                 # builder in this repo

Optional keys: 'vocab' (a packaged vocabulary name: annotation category ids are mapped
into it by original id; default for JSON formats: the file's own `categories`),
'data_dir' (TFDS), 'keep_empty' (keep images without segments: evaluation sets),
and format-specific keys documented in each reader.

`build_reader(spec, shard_index=, shard_count=, on_bad_input=)` returns the dataset of
this host's shard and the vocabulary. Sharding happens on the file / record list (JSON,
PNG folders) or on the TFDS split (`tfds.even_splits`), so each host reads only its part.
"""

import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
import tensorflow as tf

from dataseg import vocab as vocab_lib
from input_pipeline import bad_input

FORMATS = (
  "coco_panoptic",
  "coco_instance",
  "coco_detection",
  "semantic_png",
  "tfds",
  "objects365_tfds",
)

# Element spec of a decoded example (see dataseg/schema.py).
DECODED_SIGNATURE = {
  "image": tf.TensorSpec([None, None, 3], tf.uint8),
  "segment_map": tf.TensorSpec([None, None], tf.int32),
  "seg_class": tf.TensorSpec([None], tf.int32),
  "seg_box": tf.TensorSpec([None, 4], tf.float32),
  "seg_is_thing": tf.TensorSpec([None], tf.bool),
  "seg_is_crowd": tf.TensorSpec([None], tf.bool),
  "image_id": tf.TensorSpec([], tf.int64),
}
_ORDER = tuple(DECODED_SIGNATURE)


def load_rgb(path: str) -> np.ndarray:
  """Decodes an image file to uint8 `[h, w, 3]` RGB.

  Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted to
  RGB (the "fixed" bad-input cases). Truncated or undecodable files raise OSError
  (PIL's `LOAD_TRUNCATED_IMAGES` stays False so truncation is not papered over).
  """
  with Image.open(path) as im:
    im.load()
    if im.mode != "RGB":
      im = im.convert("RGB")
    return np.asarray(im, np.uint8)


def load_label_png(path: str) -> np.ndarray:
  """Decodes a label PNG to its raw values: `[h, w]` for L / P / I modes, else `[h, w, C]`.

  Palette PNGs give palette indices (the labels), never palette colours.
  """
  with Image.open(path) as im:
    im.load()
    return np.asarray(im)


def load_or_report(
  load_fn, path, counter, image_id, field, errors=(OSError, ValueError, SyntaxError)
):
  """`load_fn(path)`, or None after reporting an undecodable file to `counter`."""
  try:
    return load_fn(path)
  except errors as e:
    counter.report(
      "corrupt_image", image_id=image_id, file=path, field=field, reason=f"cannot decode: {e}"
    )
    return None


def empty_decoded(image_id: int = 0):
  return dict(
    image=np.zeros([1, 1, 3], np.uint8),
    segment_map=-np.ones([1, 1], np.int32),
    seg_class=np.zeros([0], np.int32),
    seg_box=np.zeros([0, 4], np.float32),
    seg_is_thing=np.zeros([0], bool),
    seg_is_crowd=np.zeros([0], bool),
    image_id=np.int64(image_id),
  )


def vocab_from(
  spec: Mapping[str, Any],
  categories: Optional[Sequence[Mapping]] = None,
  default_name: str = "user",
):
  """The spec's packaged vocabulary, else one built from a COCO `categories` list."""
  name = spec.get("vocab")
  if name:
    return vocab_lib.load(name)
  if categories is None:
    raise ValueError(f"reader spec {dict(spec)} needs a 'vocab' name")
  return vocab_lib.from_categories(spec.get("name", default_name), categories)


def box_xywh_to_yxyx(bbox, height, width):
  """COCO `[x, y, w, h]` -> clipped `(y0, x0, y1, x1)`, plus whether it is usable.

  Unusable: zero / negative size, or no overlap with the image (bad_box).
  """
  x, y, w, h = (float(v) for v in bbox)
  y0, x0 = max(y, 0.0), max(x, 0.0)
  y1, x1 = min(y + h, float(height)), min(x + w, float(width))
  usable = w > 0 and h > 0 and y1 > y0 and x1 > x0
  return (y0, x0, y1, x1), usable


def records_dataset(
  records: Sequence[Any],
  load_fn: Callable[[Any], Optional[dict]],
  counter: bad_input.BadInputCounter,
  *,
  shard_index: int = 0,
  shard_count: int = 1,
  num_parallel_calls=tf.data.AUTOTUNE,
):
  """tf.data of decoded examples from a per-image record list and a numpy loader.

  `records` are sorted deterministically by the caller; this host reads
  `records[shard_index::shard_count]` (disjoint shards covering the list).
  `load_fn(record)` returns a decoded dict of numpy arrays, or None for a skipped
  example (it reports the reason to `counter` itself). After each full pass the counter
  logs its per-pass summary.
  """
  shard = list(records[shard_index::shard_count])

  def load(i):
    example = load_fn(shard[int(i)])
    ok = example is not None
    if not ok:
      example = empty_decoded()
    return tuple(
      np.asarray(example[k], DECODED_SIGNATURE[k].dtype.as_numpy_dtype) for k in _ORDER
    ) + (np.bool_(ok),)

  def tf_load(i):
    out = tf.numpy_function(
      load, [i], [DECODED_SIGNATURE[k].dtype for k in _ORDER] + [tf.bool], stateful=False
    )
    example = {k: tf.ensure_shape(v, DECODED_SIGNATURE[k].shape) for k, v in zip(_ORDER, out[:-1])}
    return example, tf.ensure_shape(out[-1], [])

  def end_of_pass(_):
    def log():
      counter.end_epoch()
      return np.bool_(False)

    return tf.ensure_shape(tf.numpy_function(log, [], tf.bool), [])

  ds = tf.data.Dataset.range(len(shard)).map(
    tf_load, num_parallel_calls=num_parallel_calls, deterministic=True
  )
  ds = ds.filter(_second).map(_first)
  # A one-element tail that only logs the pass summary, after every example is done.
  tail = (
    tf.data.Dataset.range(1)
    .filter(end_of_pass)
    .map(
      lambda _: {
        k: tf.zeros([d if d is not None else 0 for d in s.shape], s.dtype)
        for k, s in DECODED_SIGNATURE.items()
      }
    )
  )
  return ds.concatenate(tail)


def _first(a, _):
  return a


def _second(_, b):
  return b


def build_reader(
  spec: Mapping[str, Any],
  *,
  shard_index: int = 0,
  shard_count: int = 1,
  on_bad_input: str = "skip",
  counter=None,
):
  """Reader spec dict -> (tf.data.Dataset of decoded examples, Vocabulary)."""
  fmt = spec.get("format")
  if fmt not in FORMATS:
    raise ValueError(f"unknown reader format {fmt!r}; allowed: {', '.join(FORMATS)}")
  counter = counter or bad_input.BadInputCounter(on_bad_input, spec.get("name", fmt))
  kwargs = dict(shard_index=shard_index, shard_count=shard_count, counter=counter)
  if fmt in ("coco_panoptic", "coco_instance", "coco_detection"):
    from input_pipeline.readers import coco  # pylint: disable=g-import-not-at-top

    return coco.read(spec, **kwargs)
  if fmt == "semantic_png":
    from input_pipeline.readers import semantic_png  # pylint: disable=g-import-not-at-top

    return semantic_png.read(spec, **kwargs)
  from input_pipeline.readers import tfds_readers  # pylint: disable=g-import-not-at-top

  if fmt == "objects365_tfds":
    spec = dict(spec, tfds_name=spec.get("tfds_name", "objects365"))
  logging.info("reader %s: %s", fmt, dict(spec))
  return tfds_readers.read(spec, **kwargs)
