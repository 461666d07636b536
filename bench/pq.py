r"""Times our PQ against the reference pq_compute on the same COCO panoptic files.

  python bench/pq.py                     # 500 pairs of 512x512, ~20 segments each
  python bench/pq.py --num_images=50 --size=256

The reference is cityscapesscripts' copy of panopticapi's pq_compute
(`pip install cityscapesscripts==2.3.0`), run single-process (`pq_compute_single_core`,
its per-core worker) so both sides use one core. Two figures:
  * files: both read the same PNG + JSON files (PNG decoding, identical libpng work on both
    sides, included);
  * PQ only: both get the same already-decoded RGB arrays (the reference through a stand-in
    for its `Image.open`), so the time is id decoding, matching and counting -- what the
    training-time evaluator does, which never touches PNGs.
The script also checks the metrics agree to 1e-9.
"""

import contextlib
import io
import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from dataseg.metrics import exports  # pylint: disable=g-import-not-at-top,wrong-import-position
from dataseg.metrics import files as metric_files  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_CLASSES = 40
IS_THING = np.arange(NUM_CLASSES) < 25

_NUM_IMAGES = flags.DEFINE_integer("num_images", 500, "gt/prediction pairs")
_SIZE = flags.DEFINE_integer("size", 512, "image side")
_REPEATS = flags.DEFINE_integer("repeats", 2, "timed repeats (best of)")
_WORKDIR = flags.DEFINE_string("workdir", None, "keep the fixture files here")


def synthetic_pair(rng, size, num_segments=20):
  """(gt, prediction) records: rectangles with crowd, void, relabels, misses, extras."""
  h = w = size
  gt = np.full((h, w), -1, np.int32)
  cls = rng.integers(0, NUM_CLASSES, num_segments).astype(np.int32)
  for k in range(num_segments):
    y0, x0 = rng.integers(0, h - 8, 2)
    ext = size // 2 if not IS_THING[cls[k]] else size // 5
    gt[y0 : y0 + rng.integers(8, ext), x0 : x0 + rng.integers(8, ext)] = k
  crowd = (rng.random(num_segments) < 0.1) & IS_THING[cls]
  for _ in range(3):  # void bands
    y0, x0 = rng.integers(0, h - 8, 2)
    gt[y0 : y0 + rng.integers(2, 12), x0 : x0 + rng.integers(8, size // 3)] = -1
  base = np.roll(gt, tuple(rng.integers(-size // 50, size // 50 + 1, 2)), (0, 1))
  lut = np.arange(-1, num_segments)
  lut[1:][rng.random(num_segments) < 0.1] = -1  # missed segments
  pred = lut[base + 1]
  pred_cls = np.where(
    rng.random(num_segments) < 0.85, cls, rng.integers(0, NUM_CLASSES, num_segments)
  ).astype(np.int32)
  extra = []
  for j in range(int(rng.integers(1, 5))):  # unmatched predictions
    y0, x0 = rng.integers(0, h - 8, 2)
    pred[y0 : y0 + rng.integers(8, size // 6), x0 : x0 + rng.integers(8, size // 6)] = (
      num_segments + j
    )
    extra.append(rng.integers(0, NUM_CLASSES))
  pred_cls = np.concatenate([pred_cls, np.asarray(extra, np.int32)])
  return (
    {"segment_map": gt, "seg_class": cls, "seg_is_crowd": crowd},
    {"segment_map": pred.astype(np.int32), "seg_class": pred_cls},
  )


def write_fixtures(root, num_images, size, seed=0):
  rng = np.random.default_rng(seed)
  gts, preds = [], []
  for i in range(num_images):
    g, p = synthetic_pair(rng, size)
    gts.append(dict(g, image_id=i))
    preds.append(dict(p, image_id=i))
  cats = exports.make_categories([f"class{c}" for c in range(NUM_CLASSES)], IS_THING)
  exports.write_coco_panoptic(
    os.path.join(root, "gt.json"), os.path.join(root, "gt"), gts, cats, is_gt=True
  )
  exports.write_coco_panoptic(
    os.path.join(root, "pred.json"), os.path.join(root, "pred"), preds, cats, is_gt=False
  )


def run_reference(root):
  from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as ref  # pylint: disable=g-import-not-at-top

  with open(os.path.join(root, "gt.json")) as f:
    gt = json.load(f)
  with open(os.path.join(root, "pred.json")) as f:
    pred = json.load(f)
  categories = {c["id"]: c for c in gt["categories"]}
  by_id = {a["image_id"]: a for a in pred["annotations"]}
  pairs = [(a, by_id[a["image_id"]]) for a in gt["annotations"]]
  with contextlib.redirect_stdout(io.StringIO()):
    stat = ref.pq_compute_single_core(
      0, pairs, os.path.join(root, "gt"), os.path.join(root, "pred"), categories
    )
  return ref.average_pq(stat, categories)


def run_ours(root):
  return metric_files.evaluate_panoptic_files(
    os.path.join(root, "gt.json"),
    os.path.join(root, "gt"),
    os.path.join(root, "pred.json"),
    os.path.join(root, "pred"),
  )


class _DecodedImages:
  """Stand-in for PIL.Image in the reference module: `open` returns a decoded array."""

  def __init__(self, cache):
    self.cache = cache

  def open(self, path):
    return self.cache[path]


def time_pq_only(root, chunk=50, repeats=2):
  """(reference seconds, our seconds) with PNG decoding done beforehand for both."""
  from cityscapesscripts.evaluation import evalPanopticSemanticLabeling as ref  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from dataseg.metrics import panoptic  # pylint: disable=g-import-not-at-top

  gt = json.load(open(os.path.join(root, "gt.json")))
  pred = json.load(open(os.path.join(root, "pred.json")))
  categories = {c["id"]: c for c in gt["categories"]}
  cat_index = exports.category_index(gt["categories"])
  by_id = {a["image_id"]: a for a in pred["annotations"]}
  pairs = [(a, by_id[a["image_id"]]) for a in gt["annotations"]]
  gt_dir, pred_dir = os.path.join(root, "gt"), os.path.join(root, "pred")
  ev = panoptic.PanopticEvaluator(
    class_names=[c["name"] for c in gt["categories"]],
    is_thing=[c["isthing"] for c in gt["categories"]],
  )
  t_ref = t_ours = 0.0
  stat = ref.PQStat()
  for start in range(0, len(pairs), chunk):
    part = pairs[start : start + chunk]
    cache = {}
    for g, p in part:
      for d, a in ((gt_dir, g), (pred_dir, p)):
        path = os.path.join(d, a["file_name"])
        with Image.open(path) as im:
          cache[path] = np.asarray(im.convert("RGB"))
    pil, ref.Image = ref.Image, _DecodedImages(cache)
    try:

      def reference():
        with contextlib.redirect_stdout(io.StringIO()):
          return ref.pq_compute_single_core(0, part, gt_dir, pred_dir, categories)

      dt, part_stat = best_of(reference, repeats)
    finally:
      ref.Image = pil
    t_ref += dt
    stat += part_stat

    def ours():
      part_ev = ev.empty_like()
      for g, p in part:
        part_ev.add_id_maps(
          (
            exports.rgb_to_id_fast(cache[os.path.join(pred_dir, p["file_name"])]),
            *exports.segments_table(p["segments_info"], cat_index),
          ),
          (
            exports.rgb_to_id_fast(cache[os.path.join(gt_dir, g["file_name"])]),
            *exports.segments_table(g["segments_info"], cat_index),
          ),
        )
      return part_ev

    dt, part_ev = best_of(ours, repeats)
    t_ours += dt
    ev.accumulate(part_ev)
  return t_ref, t_ours, ref.average_pq(stat, categories), ev.result()


def best_of(fn, repeats):
  """(best CPU seconds of this process, last output): CPU time, not wall time, so that
  other jobs on a shared machine slow neither side's figure."""
  times, out = [], None
  for _ in range(repeats):
    t = time.process_time()
    out = fn()
    times.append(time.process_time() - t)
  return min(times), out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with tempfile.TemporaryDirectory() as tmp:
    root = _WORKDIR.value or tmp
    os.makedirs(root, exist_ok=True)
    t = time.perf_counter()
    write_fixtures(root, _NUM_IMAGES.value, _SIZE.value)
    print(
      f"wrote {_NUM_IMAGES.value} gt/prediction pairs of {_SIZE.value}x{_SIZE.value} "
      f"in {time.perf_counter() - t:.1f}s"
    )
    t_ref, ref_res = best_of(lambda: run_reference(root), _REPEATS.value)
    t_ours, ours = best_of(lambda: run_ours(root), _REPEATS.value)
    t_ref_pq, t_ours_pq, ref_res_pq, ours_pq = time_pq_only(root, repeats=_REPEATS.value)
  for a, b in ((ours, ref_res), (ours_pq, ref_res_pq)):
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
      for m in ("pq", "sq", "rq"):
        diff = abs(a[m.upper() + suffix] - b[group][m])
        assert diff < 1e-9, (group, m, diff)
  print(
    f"PQ {100 * ours['PQ']:.3f} (reference {100 * ref_res['All']['pq']:.3f}), "
    "all / things / stuff PQ SQ RQ equal to 1e-9"
  )
  n = _NUM_IMAGES.value
  print(
    f"{'CPU time per image':28s}{'reference':>14s}{'dataseg':>14s}{'speedup':>9s}"
    "   (1 process each)"
  )
  for name, tr, to in (
    ("files (PNG decode included)", t_ref, t_ours),
    ("PQ only (decoded inputs)", t_ref_pq, t_ours_pq),
  ):
    print(f"{name:28s}{1000 * tr / n:11.1f} ms{1000 * to / n:11.1f} ms{tr / to:8.1f}x")


if __name__ == "__main__":
  app.run(main)
