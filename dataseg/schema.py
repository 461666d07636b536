"""The one padded example schema shared by every dataset and task.

Every reader (synthetic TFDS suite, COCO, ADE20k, Objects365, user data) ends in this
schema, so the model, the objective and the evaluators never see dataset-specific
structure. Shapes are static: images are padded to `image_size`, segment tables to
`max_segments`. Targets stay compact: one segment-id map per image plus a per-segment
table, never a stack of full-resolution binary masks (per-segment masks are formed on
device where a loss needs them).

Batched example (leading batch dim B omitted below):

  image          uint8   [H, W, 3]   RGB, zero in padding.
  valid          bool    [H, W]      True on real pixels (False on padding).
  segment_map    int32   [H, W]      index into the segment table, or -1 (void / no mask).
                                     Crowd segments appear here too; they are ignore regions.
                                     Box-only data: all -1.
  seg_class      int32   [S]         contiguous class id in the dataset's vocabulary, -1 on padding.
  seg_box        float32 [S, 4]      (y0, x0, y1, x1) in pixels of `image`, clipped to it.
  seg_is_thing   bool    [S]
  seg_is_crowd   bool    [S]         crowd: never a target, ignored by losses and PQ.
  seg_valid      bool    [S]         padding mask of the segment table.
  task           int32   []          index into TASKS.
  dataset_id     int32   []          index into the config's dataset list.
  image_id       int64   []          original id, for evaluation exports.
  orig_size      int32   [2]         (height, width) of the image before resize/pad.
  example_valid  bool    []          False on examples that only pad the last eval batch.

Reader output ("decoded example", unpadded, before preprocessing; every reader yields this,
as a dict of tensors inside tf.data):

  image          uint8   [h, w, 3]
  segment_map    int32   [h, w]      -1 = void / unlabelled; k = row k of the segment table.
                                     Box-only data: all -1.
  seg_class      int32   [n]         contiguous class id (0..V-1) in the dataset's vocabulary.
  seg_box        float32 [n, 4]      (y0, x0, y1, x1) in pixels of `image`.
  seg_is_thing   bool    [n]
  seg_is_crowd   bool    [n]
  image_id       int64   []

Dataset vocabularies (class names, is-thing flags, original ids) live in dataseg/vocab as
COCO-panoptic-style category JSON files.

`segment_map` is the one mask source: for instance data with overlapping masks the
later segment wins where they overlap (evaluation of overlapping instances reads the
original annotations instead).
"""

from typing import Mapping

import numpy as np

TASKS = ("panoptic", "semantic", "instance", "boxes")
"""`boxes`: instance task with box-only supervision (BoxInst projection loss)."""

FIELDS = {
  # name: (dtype, shape with symbolic H, W, S)
  "image": (np.uint8, ("H", "W", 3)),
  "valid": (np.bool_, ("H", "W")),
  "segment_map": (np.int32, ("H", "W")),
  "seg_class": (np.int32, ("S",)),
  "seg_box": (np.float32, ("S", 4)),
  "seg_is_thing": (np.bool_, ("S",)),
  "seg_is_crowd": (np.bool_, ("S",)),
  "seg_valid": (np.bool_, ("S",)),
  "task": (np.int32, ()),
  "dataset_id": (np.int32, ()),
  "image_id": (np.int64, ()),
  "orig_size": (np.int32, (2,)),
  "example_valid": (np.bool_, ()),
}


def field_shapes(height: int, width: int, max_segments: int):
  """Concrete (dtype, shape) per field for one unbatched example."""
  dims = {"H": height, "W": width, "S": max_segments}
  return {
    name: (dtype, tuple(dims.get(d, d) for d in shape)) for name, (dtype, shape) in FIELDS.items()
  }


def task_id(task: str) -> int:
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; allowed: {', '.join(TASKS)}")
  return TASKS.index(task)


def check_example(
  example: Mapping[str, np.ndarray],
  height: int,
  width: int,
  max_segments: int,
  batch_dims: tuple = (),
):
  """Raises ValueError naming the field when `example` does not match the schema."""
  expected = field_shapes(height, width, max_segments)
  missing = set(expected) - set(example)
  extra = set(example) - set(expected)
  if missing or extra:
    raise ValueError(
      f"schema mismatch: missing fields {sorted(missing)}, unexpected fields {sorted(extra)}"
    )
  for name, (dtype, shape) in expected.items():
    value = np.asarray(example[name])
    want = tuple(batch_dims) + shape
    if value.shape != want:
      raise ValueError(f"field {name!r}: shape {value.shape}, expected {want}")
    if value.dtype != np.dtype(dtype):
      raise ValueError(f"field {name!r}: dtype {value.dtype}, expected {np.dtype(dtype)}")
  seg_map = np.asarray(example["segment_map"])
  if seg_map.min(initial=0) < -1 or seg_map.max(initial=-1) >= max_segments:
    raise ValueError("field 'segment_map': ids outside [-1, max_segments)")
  valid = np.asarray(example["seg_valid"])
  cls = np.asarray(example["seg_class"])
  if np.any(cls[valid] < 0) or np.any(cls[~valid] != -1):
    raise ValueError("field 'seg_class': must be >= 0 on valid segments and -1 on padding")
