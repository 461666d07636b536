"""MERGE per task (targets, matching, class targets) against numpy + scipy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from dataseg.objective import config as config_lib
from dataseg.objective import merge
from dataseg.objective import points

V, Q, H, W = 5, 7, 16, 16
HM, WM = H // 4, W // 4
K = 48
IS_THING = np.array([True, True, False, False, True])
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def cfg_for(**kw):
  c = config_lib.loss_config()
  c.num_points = K
  c.matcher = "scipy"
  c.merge_min_points = 0.5
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def make_image(seed):
  """Blocky segments: 0 thing cls 0, 1 thing cls 1, 2/3 stuff cls 2, 4 stuff cls 3,
  5 crowd thing cls 0, 6 thing cls 4 with a zero-area box, 7 padding."""
  r = np.random.RandomState(seed)
  seg = np.full((H, W), -1, np.int32)
  seg[:8, :8] = 2
  seg[:8, 8:] = 3
  seg[8:, :] = 4
  seg[2:6, 2:6] = 0
  seg[10:14, 3:7] = 1
  seg[9:11, 10:12] = 5
  seg[12, 12] = 6
  seg[15, :] = -1
  valid = np.ones((H, W), bool)
  valid[:, 14:] = False
  seg[~valid] = -1
  cls = np.array([0, 1, 2, 2, 3, 0, 4, -1], np.int32)
  box = np.array(
    [
      [2, 2, 6, 6],
      [10, 3, 14, 7],
      [0, 0, 8, 8],
      [0, 8, 8, 14],
      [8, 0, 15, 14],
      [9, 10, 11, 12],
      [12, 12, 12, 13],
      [0, 0, 0, 0],
    ],
    np.float32,
  )
  crowd = np.array([0, 0, 0, 0, 0, 1, 0, 0], bool)
  return dict(
    image=r.randint(0, 256, size=(H, W, 3)).astype(np.uint8),
    valid=valid,
    segment_map=seg,
    seg_class=cls,
    seg_box=box,
    seg_is_crowd=crowd,
    seg_valid=cls >= 0,
  )


def np_point_sample(maps, coords):
  n, h, w = maps.shape
  out = np.zeros((n, len(coords)))
  for p, (y, x) in enumerate(coords):
    py, px = y * h - 0.5, x * w - 0.5
    y0, x0 = int(np.floor(py)), int(np.floor(px))
    for yy in (y0, y0 + 1):
      for xx in (x0, x0 + 1):
        if 0 <= yy < h and 0 <= xx < w:
          out[:, p] += (1 - abs(py - yy)) * (1 - abs(px - xx)) * maps[:, yy, xx]
  return out


def np_lookup(grid, coords):
  h, w = grid.shape[:2]
  return grid[
    np.clip((coords[:, 0] * h).astype(int), 0, h - 1),
    np.clip((coords[:, 1] * w).astype(int), 0, w - 1),
  ]


def np_targets(img, task, semantic_merge="soft_merge"):
  """(one_to_one, merged, union) slot flags by explicit loops."""
  n = len(img["seg_class"])
  elig = [img["seg_valid"][s] and not img["seg_is_crowd"][s] for s in range(n)]
  cls = img["seg_class"]
  o2o, per_class, seen = np.zeros(n, bool), np.zeros(n, bool), set()
  for s in range(n):
    if not elig[s]:
      continue
    thing = IS_THING[cls[s]]
    box = img["seg_box"][s]
    if task == "instance" or (task == "panoptic" and thing):
      o2o[s] = True
    elif task == "boxes":
      o2o[s] = box[2] > box[0] and box[3] > box[1]
    elif cls[s] not in seen:
      per_class[s] = True
      seen.add(cls[s])
  if semantic_merge == "hungarian_merged":
    return o2o | per_class, np.zeros(n, bool), per_class
  return o2o, per_class, per_class


def np_probs(cl):
  e = np.exp(cl - cl.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_assign(task, cl, ml, img, coords, cfg):
  """Reference MERGE: cost matrix, scipy matching total, class targets (soft rule)."""
  o2o, merged, union = np_targets(img, task, cfg.semantic_merge)
  probs = np_probs(cl)
  n = len(o2o)
  cost = -cfg.class_weight * probs[:, np.maximum(img["seg_class"], 0)]
  seg = np_lookup(img["segment_map"], coords)
  known = seg >= 0
  pcls = np.where(known, img["seg_class"][np.maximum(seg, 0)], -1)
  crowd = known & img["seg_is_crowd"][np.maximum(seg, 0)]
  keep = ~crowd & np_lookup(img["valid"], coords)
  tm = np.zeros((n, K))
  tw = np.zeros((n, K))
  for s in range(n):
    tm[s] = (pcls == img["seg_class"][s]) if union[s] else (seg == s)
    tw[s] = (keep & known) if union[s] else keep
  lg = np_point_sample(ml, coords)
  sg = sigmoid(lg)
  if task == "boxes":
    cv = img["valid"][2::4, 2::4]
    pm = sigmoid(ml) * cv
    for q in range(Q):
      for s in range(n):
        y0, x0, y1, x1 = img["seg_box"][s]
        by = np.array([j * 4 < y1 and (j + 1) * 4 > y0 for j in range(HM)], float)
        bx = np.array([j * 4 < x1 and (j + 1) * 4 > x0 for j in range(WM)], float)
        for p, b in ((pm[q].max(1), by), (pm[q].max(0), bx)):
          cost[q, s] += cfg.box.projection_weight * (
            1 - 2 * np.sum(p * b) / (np.sum(p * p) + np.sum(b * b) + 1e-5)
          )
  else:
    for q in range(Q):
      for s in range(n):
        bce = np.log1p(np.exp(-np.abs(lg[q]))) + np.maximum(lg[q], 0) - lg[q] * tm[s]
        cost[q, s] += cfg.mask_bce_weight * np.sum(tw[s] * bce) / K
        cost[q, s] += cfg.dice_weight * (
          1
          - (2 * np.sum(tw[s] * sg[q] * tm[s]) + 1)
          / (np.sum(tw[s] * sg[q]) + np.sum(tw[s] * tm[s]) + 1)
        )
  cols = np.flatnonzero(o2o)
  rows, ci = scipy.optimize.linear_sum_assignment(cost[:, cols])
  matched = np.full(Q, -1)
  matched[rows] = cols[ci]
  best_total = cost[rows, cols[ci]].sum()
  qcls = np.full(Q, V)
  qcls[rows] = img["seg_class"][cols[ci]]
  slot, contrib = np.full(Q, -1), np.zeros(Q)
  if merged.any():
    for q in range(Q):
      if matched[q] >= 0:
        continue
      best, best_t = -np.inf, None
      for t in np.flatnonzero(merged):
        inside = np.sum(sg[q] * tw[t] * tm[t])
        c = probs[q, img["seg_class"][t]] * inside
        if c > best:
          best, best_t = c, t
      inside = np.sum(sg[q] * tw[best_t] * tm[best_t])
      mass = np.sum(sg[q] * tw[best_t])
      if mass >= cfg.merge_min_points and inside >= cfg.merge_fg_fraction * mass:
        qcls[q] = img["seg_class"][best_t]
        slot[q], contrib[q] = best_t, best
  qcls, qweight = np_weights(qcls, slot, contrib, cfg.merge_class_weighting, cfg.background_weight)
  return cost, best_total, matched, qcls, qweight


def np_weights(qcls, slot, contrib, mode, no_object_weight):
  """Reference merge_class_weights by loops: (classes, weights) of the proposals."""
  qcls, w = qcls.copy(), np.ones(len(qcls))
  for q in np.flatnonzero(slot >= 0):
    group = [r for r in range(len(slot)) if slot[r] == slot[q]]
    if mode == "split":
      w[q] = 1.0 / len(group)
    elif mode == "no_object":
      w[q] = no_object_weight
    elif mode == "top":
      # Precondition (numpy, float64, same on every machine): the top contribution leads
      # the next by > 1e-3 relative, so float32 rounding in jax cannot reorder them.
      c = np.sort(contrib[group])[::-1]
      assert len(c) == 1 or c[0] - c[1] > 1e-3 * c[0], c
      if q != max(group, key=lambda r: contrib[r]):
        qcls[q] = V
  return qcls, w


CASES = [
  ("instance", "soft_merge", "jax", "split"),
  ("boxes", "soft_merge", "scipy", "split"),
  ("semantic", "soft_merge", "scipy", "split"),
  ("panoptic", "soft_merge", "scipy", "split"),
  ("panoptic", "soft_merge", "scipy", "no_object"),
  ("panoptic", "soft_merge", "scipy", "top"),
  ("semantic", "soft_merge", "scipy", "full"),
  ("semantic", "hungarian_merged", "scipy", "split"),
]


@pytest.mark.parametrize("task,semantic_merge,matcher,weighting", CASES)
def test_merge_matches_numpy(task, semantic_merge, matcher, weighting):
  cfg = cfg_for(semantic_merge=semantic_merge, matcher=matcher, merge_class_weighting=weighting)
  img = make_image(0)
  jimg = jax.tree.map(jnp.asarray, img)
  targets = merge.build_targets(jimg, task, jnp.asarray(IS_THING), semantic_merge)
  ref_o2o, ref_merged, ref_union = np_targets(img, task, semantic_merge)
  np.testing.assert_array_equal(targets.one_to_one, ref_o2o)
  np.testing.assert_array_equal(targets.merged, ref_merged)
  np.testing.assert_array_equal(targets.union, ref_union)
  assert int(jnp.sum(targets.dropped)) == (task == "boxes")  # slot 6, zero height
  r = np.random.RandomState(1)
  for trial in range(2):
    cl = r.randn(Q, V + 1).astype(np.float32) * 2
    ml = r.randn(Q, HM, WM).astype(np.float32) * 3
    key = jax.random.PRNGKey(trial)
    asg = jax.jit(
      functools.partial(
        merge.assign,
        task,
        img=jimg,
        targets=targets,
        vocab_valid=jnp.ones(V, bool),
        config=cfg,
        image_hw=(H, W),
      ),
      compiler_options=FAST,
    )(jnp.asarray(cl), jnp.asarray(ml), rng=key)
    coords = np.asarray(points.uniform_points(key, (K,)))
    cost, best, ref_matched, ref_cls, ref_w = np_assign(task, cl, ml, img, coords, cfg)
    matched = np.asarray(asg.matched)
    assert sorted(matched[matched >= 0]) == sorted(ref_matched[ref_matched >= 0])
    total = sum(cost[q, matched[q]] for q in range(Q) if matched[q] >= 0)
    np.testing.assert_allclose(total, best, rtol=1e-4, atol=1e-4)
    if np.array_equal(matched, ref_matched):  # class targets given the same matching
      np.testing.assert_array_equal(asg.query_class, ref_cls)
      # Weights are 1, 1/n or 0.1: float32 vs float64 rounding only.
      np.testing.assert_allclose(asg.class_weight, ref_w, rtol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(asg.query_class)[matched < 0], V)


def test_soft_merge_assigns_classes_by_contribution():
  """Hand-built: proposal 0 covers the class-2 region, 1 covers class 3, 2 is empty."""
  cfg = cfg_for()
  img = make_image(0)
  jimg = jax.tree.map(jnp.asarray, img)
  targets = merge.build_targets(jimg, "semantic", jnp.asarray(IS_THING))
  ml = np.full((Q, HM, WM), -10.0, np.float32)
  ml[0, :2, :] = 10.0  # image rows 0..7: class 2 (stuff) + things 0
  ml[1, 2:, :] = 10.0  # rows 8..15: mostly class 3
  cl = np.zeros((Q, V + 1), np.float32)
  asg = jax.jit(
    functools.partial(
      merge.assign,
      "semantic",
      img=jimg,
      targets=targets,
      vocab_valid=jnp.ones(V, bool),
      config=cfg,
      image_hw=(H, W),
    ),
    compiler_options=FAST,
  )(jnp.asarray(cl), jnp.asarray(ml), rng=jax.random.PRNGKey(0))
  assert list(np.asarray(asg.matched)) == [-1] * Q
  np.testing.assert_array_equal(asg.query_class, [2, 3] + [V] * (Q - 2))


@pytest.mark.parametrize("weighting", ["split", "no_object", "top", "full"])
def test_merge_class_weights_hand_built(weighting):
  """Proposals 0, 2, 3 claim merged slot 4 (contributions 2, 5, 1), 1 claims slot 6,
  4 is matched one-to-one (-1), 5 background: each mode's classes and weights by hand."""
  cls = jnp.asarray([2, 3, 2, 2, 0, V], jnp.int32)
  slot = jnp.asarray([4, 6, 4, 4, -1, -1], jnp.int32)
  contrib = jnp.asarray([2.0, 3.0, 5.0, 1.0, 0.0, 0.0], jnp.float32)
  out_cls, w = merge.merge_class_weights(cls, slot, contrib, V, weighting, 0.1)
  want_cls, want_w = {
    "split": ([2, 3, 2, 2, 0, V], [1 / 3, 1.0, 1 / 3, 1 / 3, 1.0, 1.0]),
    "no_object": ([2, 3, 2, 2, 0, V], [0.1, 0.1, 0.1, 0.1, 1.0, 1.0]),
    "top": ([V, 3, 2, V, 0, V], [1.0] * 6),
    "full": ([2, 3, 2, 2, 0, V], [1.0] * 6),
  }[weighting]
  np.testing.assert_array_equal(out_cls, want_cls)
  np.testing.assert_allclose(w, want_w, rtol=1e-6)


def test_split_weights_count_each_merged_target_once():
  """Under 'split' the class-loss weight of every merged target sums to 1, as a matched
  thing's does, however many proposals soft_merge assigns to it."""
  r = np.random.RandomState(5)
  for _ in range(3):
    slot = r.randint(-1, 4, size=16)
    cls = np.where(slot >= 0, slot + 1, V)
    _, w = merge.merge_class_weights(
      jnp.asarray(cls, jnp.int32),
      jnp.asarray(slot, jnp.int32),
      jnp.asarray(r.rand(16), jnp.float32),
      V,
      "split",
      0.1,
    )
    w = np.asarray(w)
    for t in np.unique(slot[slot >= 0]):
      np.testing.assert_allclose(w[slot == t].sum(), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(w[slot < 0], 1.0)


def test_unknown_weighting_fails():
  with pytest.raises(ValueError, match="merge_class_weighting"):
    merge.merge_class_weights(
      jnp.zeros(3, jnp.int32), jnp.zeros(3, jnp.int32), jnp.zeros(3), V, "equal", 0.1
    )
