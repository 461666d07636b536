"""Semantic metrics on a hand-computed case and against detectron2's formulas."""

import numpy as np
import pytest

from dataseg.metrics import evaluators
from dataseg.metrics import semantic

NAMES = ["a", "b", "c", "d"]


def test_hand_computed_4x4():
  gt = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, -1, -1]])
  pred = np.array([[0, 0, 0, 1], [0, 1, 1, 1], [2, 2, 3, 3], [3, 2, 0, 0]])
  ev = evaluators.make_evaluator("semantic", class_names=NAMES)
  ev.add(0, pred, gt)
  r = ev.result()
  # Class a: TP 3, GT 4, predicted 4 (one from b) -> 3/5; b likewise; c: TP 3, GT 4, P 3
  # -> 3/4; d has no gt pixel: NaN and out of the mean. Ignored pixels never count.
  assert r["IoU/a"] == pytest.approx(3 / 5)
  assert r["IoU/b"] == pytest.approx(3 / 5)
  assert r["IoU/c"] == pytest.approx(3 / 4)
  assert np.isnan(r["IoU/d"])
  assert r["mIoU"] == pytest.approx((0.6 + 0.6 + 0.75) / 3)
  assert r["pACC"] == pytest.approx(9 / 12)
  assert r["mACC"] == pytest.approx(0.75)
  assert r["fwIoU"] == pytest.approx((4 * 0.6 + 4 * 0.6 + 4 * 0.75) / 12)


def test_unpredicted_pixels_are_misses():
  gt = np.array([[0, 0], [1, 1]])
  pred = np.array([[0, -1], [1, 1]])
  ev = semantic.SemanticEvaluator(class_names=NAMES[:2])
  ev.add(0, pred, gt)
  r = ev.result()
  assert r["IoU/a"] == pytest.approx(1 / 2)
  assert r["pACC"] == pytest.approx(3 / 4)


def _detectron2_formulas(gts, preds, k, ignore=255):
  """detectron2 SemSegEvaluator.evaluate, re-implemented: matrix indexed [pred, gt]."""
  conf = np.zeros((k + 1, k + 1), np.int64)
  for gt, pred in zip(gts, preds):
    gt = np.where(gt == ignore, k, gt)
    conf += np.bincount((k + 1) * pred.reshape(-1) + gt.reshape(-1), minlength=conf.size).reshape(
      conf.shape
    )
  tp = conf.diagonal()[:-1].astype(float)
  pos_gt = conf[:-1, :-1].sum(0).astype(float)
  pos_pred = conf[:-1, :-1].sum(1).astype(float)
  acc_valid = pos_gt > 0
  union = pos_gt + pos_pred - tp
  iou_valid = acc_valid & (union > 0)
  iou = np.full(k, np.nan)
  iou[iou_valid] = tp[iou_valid] / union[iou_valid]
  acc = np.full(k, np.nan)
  acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
  return {
    "mIoU": np.sum(iou[iou_valid]) / np.sum(iou_valid),
    "fwIoU": np.sum(iou[iou_valid] * (pos_gt / pos_gt.sum())[iou_valid]),
    "mACC": np.sum(acc[acc_valid]) / np.sum(acc_valid),
    "pACC": tp.sum() / pos_gt.sum(),
    "iou": iou,
  }


def test_matches_detectron2_formulas_and_merge():
  rng = np.random.default_rng(0)
  k = 7
  gts = [rng.integers(0, k - 1, (9, 11)) for _ in range(5)]  # class k-1 never in gt
  for g in gts:
    g[rng.random(g.shape) < 0.2] = 255
  preds = [
    np.where(rng.random(g.shape) < 0.6, np.where(g == 255, 0, g), rng.integers(0, k, g.shape))
    for g in gts
  ]
  names = [str(i) for i in range(k)]
  hosts = [semantic.SemanticEvaluator(class_names=names) for _ in range(2)]
  for i, (g, p) in enumerate(zip(gts, preds)):
    hosts[i % 2].add(i, {"semantic": p}, g)
  ev = semantic.SemanticEvaluator.from_states([h.state() for h in hosts], class_names=names)
  r = ev.result()
  want = _detectron2_formulas(gts, preds, k)
  for key in ("mIoU", "fwIoU", "mACC", "pACC"):
    assert r[key] == pytest.approx(want[key], abs=1e-12)
  np.testing.assert_allclose([r[f"IoU/{n}"] for n in names], want["iou"], atol=1e-12)
  assert np.isnan(r[f"IoU/{k - 1}"])


def test_schema_style_ground_truth():
  seg_map = np.array([[0, 0], [1, -1]])
  gt = {"segment_map": seg_map, "seg_class": np.array([2, 1])}
  np.testing.assert_array_equal(semantic.semantic_from_segments(seg_map, [2, 1]), [[2, 2], [1, -1]])
  ev = semantic.SemanticEvaluator(class_names=NAMES)
  ev.add(0, np.array([[2, 2], [1, 0]]), gt)
  assert ev.result()["mIoU"] == 1.0


def test_gather_single_process_keeps_evaluator():
  ev = semantic.SemanticEvaluator(class_names=NAMES)
  ev.add(0, np.zeros((2, 2), int), np.zeros((2, 2), int))
  gathered = evaluators.gather(ev)
  np.testing.assert_array_equal(gathered.state()["confusion"], ev.state()["confusion"])
  with pytest.raises(ValueError, match="Unknown evaluator"):
    evaluators.make_evaluator("nope", class_names=NAMES)
