"""Image I/O of inference: read an image, the eval pipeline's resize + pad, nearest resize.

The Predictor and the diagnostics (launch/class_accuracy.py) prepare images here exactly as
the eval pipeline does (input_pipeline/preprocess.py), so they run the evaluation's inputs.
"""

import os
from typing import Sequence

import numpy as np


def read_image(image) -> np.ndarray:
  """uint8 [H, W, 3] from an array ([H, W], [H, W, 3|4]) or an image file path."""
  if isinstance(image, (str, os.PathLike)):
    from PIL import Image  # pylint: disable=g-import-not-at-top

    with Image.open(image) as im:
      image = np.asarray(im.convert("RGB"))
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, -1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f"image must be [H, W, 3] (or a path), got shape {image.shape}")
  image = image[..., :3]
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got {image.dtype}")
  return image


def eval_preprocess(image: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [H, W, 3] -> (image [S, S, 3], valid [S, S]) exactly as the eval pipeline does."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from input_pipeline import preprocess  # pylint: disable=g-import-not-at-top

  h, w = image.shape[:2]
  # One empty (zero-area) segment: the segment table code needs a row to gather from.
  decoded = dict(
    image=tf.constant(image),
    segment_map=-tf.ones((h, w), tf.int32),
    seg_class=tf.zeros((1,), tf.int32),
    seg_box=tf.zeros((1, 4), tf.float32),
    seg_is_thing=tf.zeros((1,), tf.bool),
    seg_is_crowd=tf.zeros((1,), tf.bool),
    image_id=tf.constant(0, tf.int64),
  )
  out = preprocess.eval_preprocess(
    decoded, image_size=image_size, max_segments=1, task_id=0, dataset_id=0
  )
  return out["image"].numpy(), out["valid"].numpy()


def _nearest_indices(out_size: int, in_size: int) -> np.ndarray:
  """Half-pixel nearest-neighbour source rows (tf.image.resize 'nearest')."""
  src = np.floor((np.arange(out_size) + 0.5) * (in_size / out_size)).astype(np.int64)
  return np.minimum(src, in_size - 1)


def resize_nearest(x: np.ndarray, hw: Sequence[int]) -> np.ndarray:
  """[..., h, w] -> [..., H, W] nearest (label maps, masks)."""
  rows = _nearest_indices(hw[0], x.shape[-2])
  cols = _nearest_indices(hw[1], x.shape[-1])
  return x[..., rows, :][..., cols]
