"""PQ against hand-computed cases and against cityscapesscripts' pq_compute on files."""

import contextlib
import io

import numpy as np
import pytest

from dataseg.metrics import evaluators
from dataseg.metrics import exports
from dataseg.metrics import panoptic

ref = pytest.importorskip("cityscapesscripts.evaluation.evalPanopticSemanticLabeling")

NUM_CLASSES = 6
IS_THING = np.array([True, True, True, False, False, False])
NAMES = [f"c{i}" for i in range(NUM_CLASSES)]


def _pan(segment_map, seg_class, seg_is_crowd=None):
  seg_class = np.asarray(seg_class, np.int32).reshape(-1)
  crowd = (
    np.zeros(seg_class.shape, bool)
    if seg_is_crowd is None
    else np.asarray(seg_is_crowd, bool).reshape(-1)
  )
  return {
    "segment_map": np.asarray(segment_map, np.int32),
    "seg_class": seg_class,
    "seg_is_crowd": crowd,
  }


# --------------------------------------------------------------------------- hand-computed


def test_hand_computed_4x4():
  # gt: segment 0 (class 0) = left two columns (8 px); segment 1 (class 3, stuff) = the
  # right two columns minus the bottom row (6 px); bottom-right 2 px are void.
  gt_map = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, -1, -1]])
  # pred: segment 0 (class 0) covers the first column and three px of the second (7 px):
  # inter 7, union 8 -> IoU 7/8, TP. Segment 1 (class 3) covers the 1 px of gt-0 left
  # over + the gt-1 region's top 4 px; segment 2 (class 3) covers the remaining 2 px of
  # gt-1 + the 2 void px: union excludes void -> 2 / (4 + 6 - 2 - 2) = 1/3, no match;
  # its void share is 2/4, not > 0.5, so it is an FP. Pred 1: inter 4 with gt-1,
  # union 5 + 6 - 4 = 7 -> 4/7 > 0.5, TP.
  pred_map = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 1, 2, 2]])
  ev = evaluators.make_evaluator("panoptic", class_names=NAMES, is_thing=IS_THING)
  ev.add(0, _pan(pred_map, [0, 3, 3]), _pan(gt_map, [0, 3]))
  r = ev.result()
  pq0 = (7 / 8) / 1.0
  pq3 = (4 / 7) / (1 + 0.5 * 1)
  assert r["PQ/c0"] == pytest.approx(pq0, abs=1e-12)
  assert r["PQ/c3"] == pytest.approx(pq3, abs=1e-12)
  assert r["SQ/c3"] == pytest.approx(4 / 7, abs=1e-12)
  assert r["RQ/c3"] == pytest.approx(1 / 1.5, abs=1e-12)
  assert r["PQ"] == pytest.approx((pq0 + pq3) / 2, abs=1e-12)
  assert r["PQ_th"] == pytest.approx(pq0, abs=1e-12)
  assert r["PQ_st"] == pytest.approx(pq3, abs=1e-12)
  assert r["N"] == 2 and r["N_th"] == 1 and r["N_st"] == 1


def test_crowd_and_void_filtering_by_hand():
  # gt: crowd of class 1 over the top half, void bottom half. Pred 0 (class 1, the 2x2
  # top-centre block) lies fully in its class's crowd -> ignored. Pred 1 (class 2, the
  # left column) is half crowd of another class (does not count) + half void -> 2/4, not
  # > 0.5 -> FP. Pred 2 (class 0) covers 3 void px + 1 crowd px of class 1 -> 3/4 -> ignored.
  gt_map = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [-1, -1, -1, -1], [-1, -1, -1, -1]])
  pred_map = np.array([[1, 0, 0, 2], [1, 0, 0, -1], [1, -1, -1, 2], [1, -1, 2, 2]])
  ev = panoptic.PanopticEvaluator(class_names=NAMES, is_thing=IS_THING)
  ev.add(0, _pan(pred_map, [1, 2, 0]), _pan(gt_map, [1], [True]))
  s = ev.state()
  np.testing.assert_array_equal(s["fp"], [0, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(s["tp"], 0)
  np.testing.assert_array_equal(s["fn"], 0)


def test_padding_rows_dropped_and_merge():
  gt = _pan([[0, 0], [1, -1]], [0, 3, -1, -1])  # schema padding rows (class -1)
  pred = _pan([[0, 0], [1, 1]], [0, 3, -1])
  a = panoptic.PanopticEvaluator(class_names=NAMES, is_thing=IS_THING)
  b = panoptic.PanopticEvaluator(class_names=NAMES, is_thing=IS_THING)
  whole = panoptic.PanopticEvaluator(class_names=NAMES, is_thing=IS_THING)
  a.add(0, pred, gt)
  b.add(1, _pan([[0, 0], [0, 0]], [1]), gt)
  for x in (pred, _pan([[0, 0], [0, 0]], [1])):
    whole.add(0, x, gt)
  merged = panoptic.PanopticEvaluator.from_states(
    [a.state(), b.state()], class_names=NAMES, is_thing=IS_THING
  )
  assert merged.result() == whole.result()
  assert a.state()["tp"][0] == 1 and a.state()["tp"][3] == 1  # IoU(3) = 1/1 (void excluded)


# --------------------------------------------------------------------------- fixtures


def _random_pair(rng, h, w, kind):
  """A (gt, pred) record pair with crowd, void, stuff, unmatched and empty cases."""
  gt_map = np.full((h, w), -1, np.int32)
  n = int(rng.integers(3, 12))
  gt_class = rng.integers(0, NUM_CLASSES, n)
  for k in range(n):
    y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
    hh = rng.integers(2, h // (1 if gt_class[k] >= 3 else 2) + 2)
    ww = rng.integers(2, w // (1 if gt_class[k] >= 3 else 2) + 2)
    gt_map[y0 : y0 + hh, x0 : x0 + ww] = k
  crowd = (rng.random(n) < 0.2) & IS_THING[gt_class]
  if rng.random() < 0.5:  # two crowd regions of one class: the "last crowd" rule
    gt_class = np.append(gt_class, gt_class[0])
    crowd = np.append(crowd, True)
    crowd[0] = True
    gt_map[: h // 4, : w // 4] = n
    n += 1
  y0, x0 = rng.integers(0, h - 4, 2)
  gt_map[y0 : y0 + 4, x0 : x0 + rng.integers(2, 8)] = -1  # void patch

  # Prediction: a jittered copy with relabels, splits, drops and extra segments.
  shift = rng.integers(-2, 3, 2)
  base = np.roll(gt_map, tuple(shift), (0, 1))
  pred_map = np.full((h, w), -1, np.int32)
  pred_class = []
  for k in range(n):
    mask = base == k
    if not mask.any() or rng.random() < 0.1:
      continue
    c = gt_class[k] if rng.random() > 0.15 else rng.integers(0, NUM_CLASSES)
    if rng.random() < 0.2:  # split into two segments
      cols = np.nonzero(mask.any(0))[0]
      cut = cols[len(cols) // 2]
      left = mask.copy()
      left[:, cut:] = False
      pred_map[left] = len(pred_class)
      pred_class.append(c)
      mask &= ~left
    pred_map[mask] = len(pred_class)
    pred_class.append(c)
  for _ in range(int(rng.integers(0, 4))):  # unmatched / into void or crowd
    y0, x0 = rng.integers(0, h - 3, 2)
    pred_map[y0 : y0 + rng.integers(2, 10), x0 : x0 + rng.integers(2, 10)] = len(pred_class)
    pred_class.append(rng.integers(0, NUM_CLASSES) if rng.random() < 0.5 else gt_class[-1])
  if kind == "empty_gt":
    gt_map[:] = -1
    n, gt_class, crowd = 0, gt_class[:0], crowd[:0]
  elif kind == "empty_pred":
    pred_map[:] = -1
  elif kind == "empty_both":
    gt_map[:] = -1
    pred_map[:] = -1
    n, gt_class, crowd = 0, gt_class[:0], crowd[:0]
  # Renumber predictions densely over the segments that kept pixels.
  pred_class = np.asarray(pred_class, np.int32).reshape(-1)
  return _pan(gt_map, gt_class, crowd), _pan(pred_map, pred_class)


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory):
  rng = np.random.default_rng(0)
  kinds = ["normal"] * 26 + ["empty_gt", "empty_pred", "empty_both"]
  gts, preds = [], []
  for i, kind in enumerate(kinds):
    g, p = _random_pair(rng, 40 + (i % 3) * 8, 48, kind)
    gts.append(dict(g, image_id=100 + i))
    preds.append(dict(p, image_id=100 + i))
  cats = exports.make_categories(NAMES, IS_THING, category_ids=[1, 2, 7, 8, 20, 21])
  d = tmp_path_factory.mktemp("pan")
  exports.write_coco_panoptic(str(d / "gt.json"), str(d / "gt"), gts, cats, is_gt=True)
  exports.write_coco_panoptic(str(d / "pred.json"), str(d / "pred"), preds, cats, is_gt=False)
  return d, gts, preds, cats


def _reference(d):
  """cityscapesscripts' pq_compute (single core) on the written files."""
  import json  # pylint: disable=g-import-not-at-top

  gt = json.load(open(d / "gt.json"))
  pred = json.load(open(d / "pred.json"))
  categories = {c["id"]: c for c in gt["categories"]}
  pred_by_id = {a["image_id"]: a for a in pred["annotations"]}
  pairs = [(g, pred_by_id[g["image_id"]]) for g in gt["annotations"]]
  with contextlib.redirect_stdout(io.StringIO()):
    stat = ref.pq_compute_single_core(0, pairs, str(d / "gt"), str(d / "pred"), categories)
  return stat, ref.average_pq(stat, categories), categories


def _check_against_reference(result, state, stat, ref_result, cats):
  for i, c in enumerate(cats):
    s = stat.pq_per_cat[c["id"]]
    assert (state["tp"][i], state["fp"][i], state["fn"][i]) == (s.tp, s.fp, s.fn), c
    assert abs(state["iou"][i] - s.iou) < 1e-9
    for m in ("pq", "sq", "rq"):
      assert abs(result[f"{m.upper()}/{c['name']}"] - ref_result["per_class"][c["id"]][m]) < 1e-9
  for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
    for m in ("pq", "sq", "rq"):
      assert abs(result[m.upper() + suffix] - ref_result[group][m]) < 1e-9, (group, m)
    assert result["N" + suffix] == ref_result[group]["n"]


def test_fixtures_exercise_every_case(fixture_files):
  _, gts, preds, _ = fixture_files
  assert any(g["seg_is_crowd"].sum() >= 2 for g in gts)
  assert any((g["segment_map"] == -1).all() for g in gts)
  assert any((p["segment_map"] == -1).all() for p in preds)
  assert any((g["segment_map"] == -1).any() and (g["segment_map"] >= 0).any() for g in gts)


def test_in_memory_equals_reference(fixture_files):
  d, gts, preds, cats = fixture_files
  stat, ref_result, _ = _reference(d)
  ev = evaluators.make_evaluator("panoptic", class_names=NAMES, is_thing=IS_THING)
  for g, p in zip(gts, preds):
    ev.add(g["image_id"], p, g)
  assert sum(stat.pq_per_cat[c["id"]].fp for c in cats) > 0
  assert sum(stat.pq_per_cat[c["id"]].fn for c in cats) > 0
  _check_against_reference(ev.result(), ev.state(), stat, ref_result, cats)


def test_files_equal_reference(fixture_files):
  d, _, _, cats = fixture_files
  stat, ref_result, _ = _reference(d)
  categories, pairs = exports.iter_coco_panoptic_pairs(
    str(d / "gt.json"), str(d / "gt"), str(d / "pred.json"), str(d / "pred")
  )
  ev = panoptic.PanopticEvaluator(
    class_names=[c["name"] for c in categories], is_thing=[c["isthing"] for c in categories]
  )
  for image_id, p, g in pairs:
    ev.add(image_id, p, g)
  _check_against_reference(ev.result(), ev.state(), stat, ref_result, cats)


def _random_ids(rng, n):
  return rng.choice(np.arange(1, 2**24), n, replace=False)


@pytest.mark.parametrize("num_segments", [0, 5, 40, 600])
def test_id_map_fast_path_equals_row_maps(num_segments):
  # COCO-style random 24-bit ids; 600 segments takes the no-hash fallback.
  rng = np.random.default_rng(num_segments)
  h, w = 60, 70
  results = []
  for _ in range(3):
    n, m = num_segments, num_segments + 2
    gt_rows = rng.integers(-1, n, (h, w)) if n else np.full((h, w), -1)
    pred_rows = np.where(rng.random((h, w)) < 0.7, gt_rows, rng.integers(-1, m, (h, w)))
    gt_cls, pred_cls = rng.integers(0, NUM_CLASSES, n), rng.integers(0, NUM_CLASSES, m)
    crowd = rng.random(n) < 0.2
    gt_ids, pred_ids = _random_ids(rng, n), _random_ids(rng, m)
    to_ids = lambda rows, ids: np.concatenate([[0], ids])[rows + 1].astype(np.uint32)
    fast = panoptic.pq_image_stats_from_ids(
      to_ids(gt_rows, gt_ids),
      gt_ids,
      gt_cls,
      crowd,
      to_ids(pred_rows, pred_ids),
      pred_ids,
      pred_cls,
      NUM_CLASSES,
    )
    slow = panoptic.pq_image_stats(gt_rows, gt_cls, crowd, pred_rows, pred_cls, NUM_CLASSES)
    for a, b in zip(fast, slow):
      np.testing.assert_array_equal(a, b)
    results.append(slow)
  if num_segments >= 5:
    assert sum(r[1].sum() for r in results) > 0  # some true positives


def test_unlisted_png_ids_are_rejected():
  rng = np.random.default_rng(0)
  ids = _random_ids(rng, 6)
  gt = np.repeat(np.concatenate([[0], ids]), 10)[None].astype(np.uint32)
  for bad in (ids[0] + 1, 2**24 - 1):
    pred = gt.copy()
    pred[0, 3] = bad
    with pytest.raises(ValueError, match="missing from the JSON"):
      panoptic.pq_image_stats_from_ids(
        gt, ids, np.zeros(6, int), np.zeros(6, bool), pred, ids, np.zeros(6, int), NUM_CLASSES
      )
  with pytest.raises(ValueError, match="not in the JSON"):
    exports.panoptic_from_ids(pred, [{"id": int(i), "category_id": 1} for i in ids], {1: 0})
