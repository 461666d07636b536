"""Mask / box AP: hand-computed cases and equality with COCOeval run directly."""

import contextlib
import io

import jax
import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
import pytest

from dataseg.metrics import coco_eval
from dataseg.metrics import evaluators

NAMES = ["cat", "dog", "sky"]
IS_THING = [True, True, False]


def _box_mask(h, w, y0, x0, y1, x1):
  m = np.zeros((h, w), bool)
  m[y0:y1, x0:x1] = True
  return m


def _gt(seg_map, cls, crowd=None):
  cls = np.asarray(cls, np.int32)
  return {
    "segment_map": np.asarray(seg_map, np.int32),
    "seg_class": cls,
    "seg_is_crowd": np.zeros(cls.shape, bool) if crowd is None else np.asarray(crowd),
  }


@pytest.mark.parametrize("name", ["instance", "box"])
def test_hand_computed_iou_064(name):
  # gt: 10x10 square of class 0; detection: an 8x8 square inside it -> IoU 0.64 (mask and
  # box). It matches at IoU thresholds 0.50, 0.55, 0.60 of the ten -> AP = 3/10.
  seg_map = np.full((32, 32), -1)
  seg_map[5:15, 5:15] = 0
  pred = {
    "masks": _box_mask(32, 32, 6, 6, 14, 14)[None],
    "classes": np.array([0]),
    "scores": np.array([0.9]),
  }
  ev = evaluators.make_evaluator(name, class_names=NAMES, is_thing=IS_THING)
  ev.add(1, pred, _gt(seg_map, [0]))
  r = ev.result()
  assert r["AP"] == pytest.approx(0.3)
  assert r["AP50"] == pytest.approx(1.0)
  assert r["AP75"] == pytest.approx(0.0)
  assert r["APs"] == pytest.approx(0.3)  # area 100 < 32^2
  assert r["APm"] == -1 and r["APl"] == -1  # no gt of those sizes
  assert r["AP/cat"] == pytest.approx(0.3) and np.isnan(r["AP/dog"])
  assert "AP/sky" not in r  # stuff is not evaluated


def test_crowd_regions_ignore_detections():
  # A higher-scored detection lying in a crowd region of its class is ignored, not an FP
  # ranked above the true positive.
  seg_map = np.full((40, 40), -1)
  seg_map[2:12, 2:12] = 0
  seg_map[20:38, 20:38] = 1
  masks = np.stack([_box_mask(40, 40, 2, 2, 12, 12), _box_mask(40, 40, 22, 22, 30, 30)])
  pred = {"masks": masks, "classes": np.array([0, 0]), "scores": np.array([0.5, 0.9])}
  for crowd, want in (([False, True], 1.0), ([False, False], None)):
    ev = evaluators.make_evaluator("instance", class_names=NAMES, is_thing=IS_THING)
    ev.add(1, pred, _gt(seg_map, [0, 0], crowd))
    ap50 = ev.result()["AP50"]
    if want is not None:
      assert ap50 == pytest.approx(want)
    else:
      assert ap50 < 0.9  # the 0.9 detection (IoU 64/324) is an FP ranked first


def _random_scene(rng, h=96, w=128):
  seg_map = np.full((h, w), -1, np.int32)
  n = int(rng.integers(2, 7))
  cls = rng.integers(0, 3, n).astype(np.int32)
  for k in range(n):
    y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
    size = int(rng.choice([6, 20, 110]))
    seg_map[y0 : y0 + size, x0 : x0 + size] = k
  crowd = rng.random(n) < 0.15
  masks, classes = [], []
  for k in range(n):
    m = np.roll(seg_map == k, tuple(rng.integers(-3, 4, 2)), (0, 1))
    if m.any() and rng.random() < 0.85:
      masks.append(m)
      classes.append(cls[k] if rng.random() < 0.8 else rng.integers(0, 2))
  for _ in range(int(rng.integers(0, 3))):
    y0, x0 = rng.integers(0, h - 20, 2)
    masks.append(_box_mask(h, w, y0, x0, y0 + 15, x0 + 17))
    classes.append(rng.integers(0, 2))
  pred = {
    "masks": np.array(masks, bool).reshape(-1, h, w),
    "classes": np.array(classes, np.int32),
    "scores": rng.random(len(classes)),
  }
  return _gt(seg_map, cls, crowd), pred


def _direct_cocoeval(scenes, iou_type, category_ids):
  """COCOeval on dicts built here with pycocotools, independent of coco_eval.py."""
  images, anns, dets = [], [], []
  for image_id, (gt, pred) in enumerate(scenes):
    h, w = gt["segment_map"].shape
    images.append({"id": image_id, "height": h, "width": w})
    for k, c in enumerate(gt["seg_class"]):
      m = gt["segment_map"] == k
      if not IS_THING[c] or not m.any():
        continue
      rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
      anns.append(
        {
          "id": len(anns) + 1,
          "image_id": image_id,
          "category_id": category_ids[c],
          "segmentation": rle,
          "area": float(m.sum()),
          "bbox": list(mask_utils.toBbox(rle)),
          "iscrowd": int(gt["seg_is_crowd"][k]),
        }
      )
    for m, c, s in zip(pred["masks"], pred["classes"], pred["scores"]):
      rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
      d = {"image_id": image_id, "category_id": category_ids[c], "score": float(s)}
      if iou_type == "segm":
        d["segmentation"] = rle
      else:
        d["bbox"] = list(mask_utils.toBbox(rle))
      dets.append(d)
  cats = [{"id": category_ids[i], "name": n} for i, n in enumerate(NAMES) if IS_THING[i]]
  gt_coco = COCO()
  gt_coco.dataset = {"images": images, "annotations": anns, "categories": cats}
  with contextlib.redirect_stdout(io.StringIO()):
    gt_coco.createIndex()
    e = COCOeval(gt_coco, gt_coco.loadRes(dets), iou_type)
    e.evaluate()
    e.accumulate()
    e.summarize()
  return e.stats[:6], (images, anns, cats)


@pytest.mark.parametrize("name,iou_type", [("instance", "segm"), ("box", "bbox")])
def test_equals_cocoeval_direct(name, iou_type):
  rng = np.random.default_rng(1)
  scenes = [_random_scene(rng) for _ in range(8)]
  category_ids = [3, 9, 11]
  want, (_, anns, _) = _direct_cocoeval(scenes, iou_type, category_ids)
  assert 0 < want[0] < 1
  # Schema-style gt, split over two "hosts" and combined through their states.
  hosts = [
    evaluators.make_evaluator(name, class_names=NAMES, is_thing=IS_THING, category_ids=category_ids)
    for _ in range(2)
  ]
  for image_id, (gt, pred) in enumerate(scenes):
    hosts[image_id % 2].add(image_id, pred, gt)
  merged = hosts[0].empty_like().accumulate(hosts[0]).accumulate(hosts[1])
  got = merged.result()
  np.testing.assert_allclose([got[s] for s in coco_eval.STAT_NAMES], want, atol=1e-12)
  # COCO-annotation gt gives the same.
  ev = evaluators.make_evaluator(
    name, class_names=NAMES, is_thing=IS_THING, category_ids=category_ids
  )
  for image_id, (gt, pred) in enumerate(scenes):
    h, w = gt["segment_map"].shape
    ev.add(
      image_id,
      pred,
      {"annotations": [a for a in anns if a["image_id"] == image_id], "height": h, "width": w},
    )
  np.testing.assert_allclose([ev.result()[s] for s in coco_eval.STAT_NAMES], want, atol=1e-12)


def test_box_only_ground_truth():
  # Box-only data: no pixels in the segment map, boxes (y0, x0, y1, x1) in seg_box.
  gt = {
    "segment_map": np.full((50, 60), -1, np.int32),
    "seg_class": np.array([1, 0]),
    "seg_is_crowd": np.zeros(2, bool),
    "seg_box": np.array([[5, 10, 25, 40], [30, 30, 45, 55]], np.float32),
  }
  pred = {
    "boxes": np.array([[5, 10, 25, 40], [30, 30, 45, 55]]),
    "classes": np.array([1, 0]),
    "scores": np.array([0.8, 0.7]),
  }
  ev = evaluators.make_evaluator("box", class_names=NAMES, is_thing=IS_THING)
  ev.add(7, pred, gt)
  assert ev.result()["AP"] == pytest.approx(1.0)


def test_no_detections():
  seg_map = np.full((16, 16), -1)
  seg_map[2:9, 2:9] = 0
  ev = evaluators.make_evaluator("instance", class_names=NAMES, is_thing=IS_THING)
  ev.add(
    0,
    {"masks": np.zeros((0, 16, 16), bool), "classes": np.zeros(0, int), "scores": np.zeros(0)},
    _gt(seg_map, [0]),
  )
  assert ev.result()["AP"] == 0.0


@pytest.mark.parametrize("name", ["instance", "box", "panoptic", "semantic"])
def test_gather_crosses_hosts_as_numeric_arrays(name, monkeypatch):
  """`gather` sends each state array through the all-gather (no pickle): with two hosts
  holding the same data, the gathered metrics are those of the two states merged."""
  from jax.experimental import multihost_utils

  rng = np.random.default_rng(3)
  scenes = [_random_scene(rng) for _ in range(4)]
  ev = evaluators.make_evaluator(name, class_names=NAMES, is_thing=IS_THING)
  for image_id, (gt, pred) in enumerate(scenes):
    if name in ("panoptic", "semantic"):
      seg_map = np.full(gt["segment_map"].shape, -1, np.int32)
      for k in range(len(pred["classes"]))[::-1]:
        seg_map[pred["masks"][k]] = k
      pred = (
        dict(segment_map=seg_map, seg_class=pred["classes"])
        if name == "panoptic"
        else np.where(seg_map >= 0, np.asarray(pred["classes"])[seg_map], -1)
      )
    ev.add(image_id, pred, gt)
  state = ev.state()
  assert all(np.asarray(v).dtype.kind in "biuf" for v in state.values()), state.keys()
  sent = []

  def allgather(x):  # two hosts with the same data.
    sent.append(np.asarray(x))
    return np.stack([x, x])

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  got = evaluators.gather(ev).result()
  want = type(ev).from_states([state, state], **ev._init_kwargs).result()  # pylint: disable=protected-access
  assert len(sent) >= len(state)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
