"""Exported files re-read and re-scored give the same numbers; the file CLI agrees."""

import json

import numpy as np
import pytest

from dataseg import evaluate
from dataseg.metrics import coco_eval
from dataseg.metrics import evaluators
from dataseg.metrics import exports

NAMES = ["person", "car", "road", "sky"]
IS_THING = np.array([True, True, False, False])
CAT_IDS = [1, 3, 100, 118]


def _scene(rng, h=30, w=40):
  seg_map = np.full((h, w), -1, np.int32)
  n = int(rng.integers(2, 7))
  cls = rng.integers(0, 4, n).astype(np.int32)
  for k in range(n):
    y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
    seg_map[y0 : y0 + rng.integers(3, 15), x0 : x0 + rng.integers(3, 15)] = k
  crowd = (rng.random(n) < 0.2) & IS_THING[cls]
  return {"segment_map": seg_map, "seg_class": cls, "seg_is_crowd": crowd}


def _prediction(rng, gt):
  pm = np.roll(gt["segment_map"], tuple(rng.integers(-2, 3, 2)), (0, 1))
  cls = np.where(
    rng.random(gt["seg_class"].size) < 0.8,
    gt["seg_class"],
    rng.integers(0, 4, gt["seg_class"].size),
  ).astype(np.int32)
  return {"segment_map": pm, "seg_class": cls}


@pytest.fixture(scope="module")
def scenes():
  rng = np.random.default_rng(3)
  gts = [_scene(rng) for _ in range(6)]
  return gts, [_prediction(rng, g) for g in gts]


def test_id_rgb_round_trip():
  ids = np.array([[0, 1, 255], [256, 65536 + 7, 2**24 - 1]])
  np.testing.assert_array_equal(exports.rgb2id(exports.id2rgb(ids)), ids)


def test_panoptic_round_trip(tmp_path, scenes):
  gts, preds = scenes
  cats = exports.make_categories(NAMES, IS_THING, CAT_IDS)
  ev = evaluators.make_evaluator("panoptic", class_names=NAMES, is_thing=IS_THING)
  for i, (g, p) in enumerate(zip(gts, preds)):
    ev.add(i, p, g)
  recs = lambda xs: [dict(x, image_id=i) for i, x in enumerate(xs)]
  exports.write_coco_panoptic(
    str(tmp_path / "gt.json"), str(tmp_path / "gt"), recs(gts), cats, is_gt=True
  )
  exports.write_coco_panoptic(
    str(tmp_path / "p.json"), str(tmp_path / "p"), recs(preds), cats, is_gt=False
  )
  categories, pairs = exports.iter_coco_panoptic_pairs(
    str(tmp_path / "gt.json"), str(tmp_path / "gt"), str(tmp_path / "p.json"), str(tmp_path / "p")
  )
  assert [c["id"] for c in categories] == CAT_IDS
  for (image_id, p, g), g0 in zip(pairs, gts):
    # Ground truth keeps every row (ids k + 1), so the map reads back unchanged.
    np.testing.assert_array_equal(g["segment_map"], g0["segment_map"])
    np.testing.assert_array_equal(g["seg_class"], g0["seg_class"])
    np.testing.assert_array_equal(g["seg_is_crowd"], g0["seg_is_crowd"])
    # Predictions drop empty segments: same partition and classes per pixel.
    p0 = preds[image_id]
    np.testing.assert_array_equal(p["segment_map"] >= 0, p0["segment_map"] >= 0)
    on = p0["segment_map"] >= 0
    np.testing.assert_array_equal(
      p["seg_class"][p["segment_map"][on]], p0["seg_class"][p0["segment_map"][on]]
    )
  metrics = evaluate.main(
    [
      "--task=panoptic",
      f"--gt_json={tmp_path / 'gt.json'}",
      f"--gt_dir={tmp_path / 'gt'}",
      f"--pred_json={tmp_path / 'p.json'}",
      f"--pred_dir={tmp_path / 'p'}",
    ]
  )
  assert metrics == ev.result()


@pytest.mark.parametrize("task", ["instance", "box"])
def test_coco_results_round_trip(tmp_path, scenes, task):
  gts, preds = scenes
  rng = np.random.default_rng(4)
  ev = evaluators.make_evaluator(task, class_names=NAMES, is_thing=IS_THING, category_ids=CAT_IDS)
  entries, gt_anns = [], []
  instance_preds = []
  for i, (g, p) in enumerate(zip(gts, preds)):
    keep = [
      k
      for k in range(p["seg_class"].size)
      if IS_THING[p["seg_class"][k]] and (p["segment_map"] == k).any()
    ]
    pred = {
      "masks": np.stack([p["segment_map"] == k for k in keep]).reshape(
        (-1,) + p["segment_map"].shape
      ),
      "classes": p["seg_class"][keep],
      "scores": rng.random(len(keep)),
    }
    instance_preds.append(pred)
    ev.add(i, pred, g)
    entries += exports.instance_results(i, pred, ev.categories)
  # The evaluator's state (numeric arrays) rebuilt into COCO dicts.
  state = coco_eval.CocoEvaluator.from_states([ev.state()], **ev._init_kwargs)  # pylint: disable=protected-access
  exports.write_json(str(tmp_path / "res.json"), entries)
  gt_anns = [dict(a, id=j + 1) for j, a in enumerate(state._gts)]  # pylint: disable=protected-access
  exports.write_json(
    str(tmp_path / "gt.json"),
    {
      "images": state._images,
      "annotations": gt_anns,  # pylint: disable=protected-access
      "categories": [c for c in ev.categories if c["isthing"]],
    },
  )
  # Re-read predictions decode to the same masks, classes, scores.
  by_image = exports.read_coco_results(str(tmp_path / "res.json"))
  cat_index = exports.category_index(ev.categories)
  for i, pred in enumerate(instance_preds):
    back = exports.results_to_prediction(by_image.get(i, []), 30, 40, cat_index)
    np.testing.assert_array_equal(back["classes"], pred["classes"])
    np.testing.assert_allclose(back["scores"], pred["scores"])
    if len(pred["classes"]):
      np.testing.assert_array_equal(back["masks"], pred["masks"])
  metrics = evaluate.main(
    [f"--task={task}", f"--gt_json={tmp_path / 'gt.json'}", f"--pred_json={tmp_path / 'res.json'}"]
  )
  want = ev.result()
  for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
    assert metrics[key] == pytest.approx(want[key], abs=1e-12)
  assert 0 < want["AP"] <= 1


def test_semantic_round_trip(tmp_path, scenes):
  gts, preds = scenes
  lut = lambda d: np.concatenate([[-1], d["seg_class"]])[d["segment_map"] + 1]
  ev = evaluators.make_evaluator("semantic", class_names=NAMES)
  for i, (g, p) in enumerate(zip(gts, preds)):
    ev.add(i, lut(p), lut(g))
    exports.write_semantic_png(str(tmp_path / "gt" / f"{i}.png"), lut(g), len(NAMES))
    exports.write_semantic_png(str(tmp_path / "p" / f"{i}.png"), lut(p), len(NAMES))
    np.testing.assert_array_equal(
      exports.read_semantic_png(str(tmp_path / "gt" / f"{i}.png"), len(NAMES)), lut(g)
    )
  (tmp_path / "cats.json").write_text(json.dumps({"categories": [{"name": n} for n in NAMES]}))
  metrics = evaluate.main(
    [
      "--task=semantic",
      f"--gt_dir={tmp_path / 'gt'}",
      f"--pred_dir={tmp_path / 'p'}",
      f"--categories_json={tmp_path / 'cats.json'}",
    ]
  )
  want = ev.result()
  assert metrics.keys() == want.keys()
  for k in want:
    assert metrics[k] == pytest.approx(want[k], nan_ok=True)


def test_semantic_png_16bit_and_zero_label(tmp_path):
  sem = np.array([[0, 299], [-1, 5]])
  exports.write_semantic_png(str(tmp_path / "a.png"), sem, 300)
  np.testing.assert_array_equal(
    exports.read_semantic_png(str(tmp_path / "a.png"), 300, ignore_value=65535), sem
  )
  exports.write_semantic_png(str(tmp_path / "b.png"), np.array([[0, 1], [150, 3]]), 151)
  np.testing.assert_array_equal(
    exports.read_semantic_png(str(tmp_path / "b.png"), 150, reduce_zero_label=True),
    [[-1, 0], [149, 2]],
  )
