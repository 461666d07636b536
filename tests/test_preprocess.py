"""preprocess.py against numpy references on small hand-made examples."""

import numpy as np
import pytest
import tensorflow as tf

from dataseg import schema
from input_pipeline import preprocess

PANOPTIC = schema.task_id("panoptic")
BOXES = schema.task_id("boxes")
# Segment k has class 10 + k and a unique colour, so outputs can be traced back.
COLORS = np.array(
  [[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [30, 200, 200]], np.uint8
)


def _example(h=16, w=16):
  seg = -np.ones([h, w], np.int32)
  seg[0:8, 0:8] = 0  # 64 px
  seg[8:16, 0:4] = 1  # 32 px
  seg[2:6, 10:16] = 2  # 24 px
  seg[10:12, 8:12] = 3  # 8 px
  seg[14:16, 14:16] = 4  # 4 px
  image = np.zeros([h, w, 3], np.uint8)
  image[seg >= 0] = COLORS[seg[seg >= 0]]
  n = 5
  boxes = np.array([_tight(seg == k) for k in range(n)], np.float32)
  return dict(
    image=image,
    segment_map=seg,
    seg_class=np.arange(10, 10 + n, dtype=np.int32),
    seg_box=boxes,
    seg_is_thing=np.array([1, 0, 1, 0, 1], bool),
    seg_is_crowd=np.array([0, 0, 0, 1, 0], bool),
    image_id=np.int64(7),
  )


def _tight(mask):
  ys, xs = np.nonzero(mask)
  return [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]


def _np(out):
  return {k: v.numpy() for k, v in out.items()}


def _train(decoded, seed, **kw):
  args = dict(image_size=32, max_segments=8, task_id=PANOPTIC, dataset_id=3, return_stats=True)
  args.update(kw)
  return _np(
    preprocess.train_preprocess(
      {k: tf.constant(v) for k, v in decoded.items()}, seed=tf.constant(seed), **args
    )
  )


def _check_consistent(out, decoded):
  """Joint geometry: map ids compact, tight boxes, colours of interior pixels."""
  out = dict(out)
  out.pop("segments_overflow")
  schema.check_example(out, 32, 32, 8)
  valid = out["seg_valid"]
  n = valid.sum()
  assert np.all(valid[:n]) and not np.any(valid[n:])
  seg = out["segment_map"]
  assert set(np.unique(seg[seg >= 0])) == set(range(n))
  for k in range(n):
    np.testing.assert_array_equal(out["seg_box"][k], _tight(seg == k))
    original = out["seg_class"][k] - 10
    assert out["seg_is_thing"][k] == decoded["seg_is_thing"][original]
    assert out["seg_is_crowd"][k] == decoded["seg_is_crowd"][original]
    # Interior pixels (5x5 neighbourhood in the segment: bilinear and nearest
    # resampling disagree by up to a pixel at edges) carry the segment's colour.
    inner = seg == k
    for _ in range(2):
      m = inner
      inner = np.zeros_like(m)
      inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    if inner.any():
      np.testing.assert_allclose(
        out["image"][inner], np.broadcast_to(COLORS[original], out["image"][inner].shape), atol=1
      )
  assert np.all(out["image"][~out["valid"]] == 0)
  assert np.all(seg[~out["valid"]] == -1)
  assert out["task"] == PANOPTIC and out["dataset_id"] == 3 and out["image_id"] == 7
  np.testing.assert_array_equal(out["orig_size"], [16, 16])


def test_scale_one_exact_upsample():
  decoded = _example()
  out = _train(decoded, [1, 2], scale_range=(1.0, 1.0), flip=False)
  # 16 -> 32 is an exact 2x nearest upsample; all segments survive, order kept.
  np.testing.assert_array_equal(
    out["segment_map"], np.repeat(np.repeat(decoded["segment_map"], 2, 0), 2, 1)
  )
  np.testing.assert_array_equal(out["seg_class"][:5], decoded["seg_class"])
  np.testing.assert_array_equal(out["seg_class"][5:], -1)
  np.testing.assert_allclose(out["seg_box"][:5], decoded["seg_box"] * 2)
  assert out["valid"].all()
  assert out["segments_overflow"] == 0


@pytest.mark.parametrize("seed", [[0, 0], [0, 1], [5, 9], [3, 4], [11, 2], [7, 7]])
def test_random_jitter_is_joint(seed):
  decoded = _example()
  out = _train(decoded, seed, scale_range=(0.5, 2.0), flip=True)
  _check_consistent(out, decoded)


def test_flip_and_crop_seen_and_deterministic():
  decoded = _example()
  outs = [_train(decoded, [0, s], scale_range=(2.0, 2.0)) for s in range(12)]
  again = _train(decoded, [0, 3], scale_range=(2.0, 2.0))
  np.testing.assert_array_equal(outs[3]["segment_map"], again["segment_map"])
  np.testing.assert_array_equal(outs[3]["image"], again["image"])
  # 16 -> 64 then a 32 crop: different seeds give different crops / flips, and
  # segments outside the crop are dropped (fewer than 5 kept somewhere).
  maps = {o["segment_map"].tobytes() for o in outs}
  assert len(maps) > 6
  assert min(o["seg_valid"].sum() for o in outs) < 5
  for o in outs:
    _check_consistent(o, decoded)
  # Reference for one case: recover crop offset & flip from the exact 4x upsample.
  big = np.repeat(np.repeat(decoded["segment_map"], 4, 0), 4, 1)
  big_image = np.round(tf.image.resize(decoded["image"], [64, 64]).numpy()).astype(np.uint8)
  found = 0
  for o in outs:
    cls_map = np.where(
      o["segment_map"] >= 0, o["seg_class"][np.maximum(o["segment_map"], 0)] - 10, -1
    )
    for oy in range(33):
      for ox in range(33):
        crop = big[oy : oy + 32, ox : ox + 32]
        image = big_image[oy : oy + 32, ox : ox + 32]
        if np.array_equal(crop[:, ::-1], cls_map):
          crop, image = crop[:, ::-1], image[:, ::-1]
        if np.array_equal(crop, cls_map):
          # The image went through the very same crop and flip.
          np.testing.assert_array_equal(o["image"], image)
          found += 1
          break
      else:
        continue
      break
  assert found == len(outs)


def test_overflow_keeps_largest():
  decoded = _example()
  out = _train(decoded, [1, 1], scale_range=(1.0, 1.0), flip=False, max_segments=3)
  # Areas 64, 32, 24, 8, 4 px: keep the 3 largest in original order.
  np.testing.assert_array_equal(out["seg_class"], [10, 11, 12])
  assert out["segments_overflow"] == 2
  seg = out["segment_map"]
  ref = np.repeat(np.repeat(decoded["segment_map"], 2, 0), 2, 1)
  np.testing.assert_array_equal(seg, np.where(ref >= 3, -1, ref))


def test_boxes_task_matches_mask_boxes():
  """Box-only data: transformed boxes equal the boxes of the transformed masks."""
  decoded = _example()
  box_only = dict(decoded, segment_map=-np.ones_like(decoded["segment_map"]))
  for s in range(8):
    kw = dict(scale_range=(2.0, 2.0), flip=True)
    ref = _train(decoded, [2, s], **kw)
    out = _train(box_only, [2, s], task_id=BOXES, **kw)
    assert np.all(out["segment_map"] == -1)
    np.testing.assert_array_equal(out["seg_class"], ref["seg_class"])
    np.testing.assert_allclose(out["seg_box"], ref["seg_box"], atol=1e-4)


def test_boxes_out_of_crop_dropped():
  decoded = _example()
  decoded = dict(
    decoded,
    segment_map=-np.ones([16, 16], np.int32),
    seg_box=np.array(
      [[0, 0, 4, 4], [0, 0, 20, 40], [3, 3, 3, 9], [1, 1, 2, 2], [5, 5, 6, 6]], np.float32
    ),
  )
  out = _train(decoded, [0, 0], task_id=BOXES, scale_range=(1.0, 1.0), flip=False)
  # Scale 2, no crop: the zero-height box is dropped, the large one clipped to 32.
  np.testing.assert_array_equal(out["seg_class"][:4], [10, 11, 13, 14])
  np.testing.assert_allclose(
    out["seg_box"][:4], [[0, 0, 8, 8], [0, 0, 32, 32], [2, 2, 4, 4], [10, 10, 12, 12]]
  )


def test_eval_resize_pad():
  decoded = _example()
  decoded = {k: v for k, v in decoded.items()}
  decoded["image"] = decoded["image"][:, :8]
  decoded["segment_map"] = decoded["segment_map"][:, :8]
  decoded["seg_box"] = np.array(
    [
      _tight(decoded["segment_map"] == k) if np.any(decoded["segment_map"] == k) else [0, 0, 0, 0]
      for k in range(5)
    ],
    np.float32,
  )
  out = _np(
    preprocess.eval_preprocess(
      {k: tf.constant(v) for k, v in decoded.items()},
      image_size=32,
      max_segments=8,
      task_id=PANOPTIC,
      dataset_id=1,
      flip=True,
    )
  )
  schema.check_example(out, 32, 32, 8)
  np.testing.assert_array_equal(out["orig_size"], [16, 8])
  ref = -np.ones([32, 32], np.int32)
  ref[:, :16] = np.repeat(np.repeat(decoded["segment_map"], 2, 0), 2, 1)
  # Segments 2, 3 and 4 lie outside the kept 8 columns: dropped.
  np.testing.assert_array_equal(out["segment_map"], ref)
  np.testing.assert_array_equal(out["seg_class"][:3], [10, 11, -1])
  np.testing.assert_allclose(out["seg_box"][:2], [[0, 0, 16, 16], [16, 0, 32, 8]])
  assert out["valid"][:, :16].all() and not out["valid"][:, 16:].any()
