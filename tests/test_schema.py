"""The common example schema: one place, checked."""

import numpy as np
import pytest

from dataseg import schema


def _example(h=8, w=8, s=4):
  ex = {
    name: np.zeros(shape, dtype) for name, (dtype, shape) in schema.field_shapes(h, w, s).items()
  }
  ex["segment_map"][:] = -1
  ex["seg_class"][:] = -1
  return ex


def test_valid_example_passes():
  ex = _example()
  ex["seg_valid"][0] = True
  ex["seg_class"][0] = 3
  ex["segment_map"][:2, :2] = 0
  schema.check_example(ex, 8, 8, 4)


@pytest.mark.parametrize(
  "mutate, message",
  [
    (lambda ex: ex.pop("valid"), "missing fields"),
    (lambda ex: ex.update(extra=np.zeros(1)), "unexpected fields"),
    (lambda ex: ex.update(image=np.zeros((8, 8, 3), np.float32)), "'image': dtype"),
    (lambda ex: ex.update(seg_box=np.zeros((5, 4), np.float32)), "'seg_box': shape"),
    (lambda ex: ex["segment_map"].__setitem__((0, 0), 4), "'segment_map'"),
    (lambda ex: ex["seg_class"].__setitem__(1, 2), "'seg_class'"),
  ],
)
def test_mismatches_name_the_field(mutate, message):
  ex = _example()
  mutate(ex)
  with pytest.raises(ValueError, match=message):
    schema.check_example(ex, 8, 8, 4)


def test_task_ids():
  assert [schema.task_id(t) for t in schema.TASKS] == list(range(4))
  with pytest.raises(ValueError, match="allowed: panoptic, semantic, instance, boxes"):
    schema.task_id("detection")
