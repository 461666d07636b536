"""Costs, point sampling and losses of the objective against numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataseg.objective import config as config_lib
from dataseg.objective import costs
from dataseg.objective import losses
from dataseg.objective import merge
from dataseg.objective import points

V, Q, S, H, W = 5, 6, 5, 16, 16
HM, WM = H // 4, W // 4
IS_THING = np.array([True, True, False, False, True])
# Test-only: cheap XLA CPU compilation (same numerics, compiles ~3x faster).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn, **kw):
  return jax.jit(fn, compiler_options=FAST, **kw)


def small_config(**kw):
  c = config_lib.loss_config()
  c.num_points = 32
  c.matcher = "scipy"
  c.box.pairwise_warmup_steps = 0
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- numpy references


def np_point_sample(maps, coords):
  """grid_sample(align_corners=False, padding zeros) with (y, x) normalised points."""
  n, h, w = maps.shape
  coords = np.broadcast_to(coords, (n,) + coords.shape[-2:])
  out = np.zeros(coords.shape[:2])
  for i in range(n):
    for p, (y, x) in enumerate(coords[i]):
      py, px = y * h - 0.5, x * w - 0.5
      y0, x0 = int(np.floor(py)), int(np.floor(px))
      for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
          if 0 <= yy < h and 0 <= xx < w:
            out[i, p] += (1 - abs(py - yy)) * (1 - abs(px - xx)) * maps[i, yy, xx]
  return out


def np_lookup(grid, coords):
  h, w = grid.shape[:2]
  yi = np.clip(np.floor(coords[..., 0] * h).astype(int), 0, h - 1)
  xi = np.clip(np.floor(coords[..., 1] * w).astype(int), 0, w - 1)
  return grid[yi, xi]


def np_bce(logit, t):
  return np.log1p(np.exp(-np.abs(logit))) + np.maximum(logit, 0) - logit * t


def np_dice(p, t, w):
  return 1 - (2 * np.sum(w * p * t) + 1) / (np.sum(w * p) + np.sum(w * t) + 1)


def np_lab(rgb):
  rgb = np.asarray(rgb, np.float64)
  lin = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  m = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
  )
  xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
  f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
  return np.stack(
    [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
  )


def make_image(seed=0, boxes=True):
  """One random image in the schema (unbatched)."""
  r = np.random.RandomState(seed)
  seg = r.randint(-1, 4, size=(H, W)).astype(np.int32)
  valid = np.ones((H, W), bool)
  valid[:, 12:] = False
  seg[~valid] = -1
  cls = np.array([0, 2, 2, 4, -1], np.int32)
  crowd = np.array([False, False, False, True, False])
  box = np.array(
    [[0, 0, 8, 6], [2, 3, 12, 16], [4, 4, 5, 9], [1, 1, 3, 3], [0, 0, 0, 0]], np.float32
  )
  return dict(
    image=r.randint(0, 256, size=(H, W, 3)).astype(np.uint8),
    valid=valid,
    segment_map=seg,
    seg_class=cls,
    seg_box=box,
    seg_is_thing=IS_THING[np.maximum(cls, 0)] & (cls >= 0),
    seg_is_crowd=crowd,
    seg_valid=cls >= 0,
  )


def np_point_labels(img, coords, ignore_void_merged=True):
  seg = np_lookup(img["segment_map"], coords)
  known = seg >= 0
  cls = np.where(known, img["seg_class"][np.maximum(seg, 0)], -1)
  crowd = known & img["seg_is_crowd"][np.maximum(seg, 0)]
  keep = ~crowd & np_lookup(img["valid"], coords)
  return seg, cls, keep.astype(float), (keep & (known | ~ignore_void_merged)).astype(float)


# ---------------------------------------------------------------- points


def test_point_sample_matches_grid_sample_reference():
  r = np.random.RandomState(0)
  maps = r.randn(3, 5, 7).astype(np.float32)
  coords = r.uniform(-0.05, 1.05, size=(11, 2)).astype(np.float32)
  coords[:4] = [[0, 0], [1, 1], [0, 1], [0.5, 0.5]]
  np.testing.assert_allclose(
    points.point_sample(jnp.asarray(maps), jnp.asarray(coords)),
    np_point_sample(maps, coords),
    atol=1e-5,
  )
  per_map = r.uniform(0, 1, size=(3, 9, 2)).astype(np.float32)
  np.testing.assert_allclose(
    points.point_sample(jnp.asarray(maps), jnp.asarray(per_map)),
    np_point_sample(maps, per_map),
    atol=1e-5,
  )


def test_nearest_lookup_and_uncertain_points():
  r = np.random.RandomState(1)
  grid = r.randint(-1, 5, size=(9, 6))
  coords = r.uniform(0, 1, size=(4, 13, 2)).astype(np.float32)
  coords[0, 0] = [1.0, 1.0]
  np.testing.assert_array_equal(
    points.nearest_lookup(jnp.asarray(grid), coords), np_lookup(grid, coords)
  )
  # Logits are 0 (most uncertain) on rows 2..5 of an 8-row map and 20 elsewhere: the
  # 75% uncertain points must come from that band (bilinear reach: half a row).
  maps = np.full((2, 8, 8), 20.0, np.float32)
  maps[:, 2:6] = 0.0
  pts = fast_jit(
    functools.partial(
      points.importance_points, num_points=40, oversample=3.0, importance_ratio=0.75
    )
  )(jax.random.PRNGKey(0), jnp.asarray(maps))
  assert pts.shape == (2, 40, 2)
  y = np.asarray(pts[:, :30, 0]) * 8
  assert np.all((y > 1.5) & (y < 6.5))
  chosen = np_point_sample(maps, np.asarray(pts[:, :30]))
  assert np.all(np.abs(chosen) < 10.0)
  assert np.all((np.asarray(pts) >= 0) & (np.asarray(pts) <= 1))


# ---------------------------------------------------------------- costs


def test_top_k_indices_match_numpy():
  """The counting top-k selects lax.top_k's set (ties: lowest index), in index order."""
  r = np.random.RandomState(11)
  x = r.randn(4, 300).astype(np.float32)
  x[0, :50] = 0.25  # ties across the threshold
  x[1] = -np.abs(x[1])  # uncertainty-like, all <= 0
  x[2, ::7] = x[2, 3]  # repeated values
  for k in (1, 37, 150, 299):
    got = np.asarray(fast_jit(functools.partial(points.top_k_indices, k=k))(jnp.asarray(x)))
    for row in range(x.shape[0]):
      np.testing.assert_array_equal(got[row], np.sort(np.argsort(-x[row], kind="stable")[:k]))


def test_costs_match_numpy():
  r = np.random.RandomState(2)
  logits = r.randn(Q, 20).astype(np.float32) * 3
  tgt = (r.rand(S, 20) > 0.5).astype(np.float32)
  w = (r.rand(S, 20) > 0.2).astype(np.float32)
  probs = jax.nn.softmax(jnp.asarray(r.randn(Q, V + 1)), -1)
  tcls = np.array([0, 3, 4, 1, 2])
  np.testing.assert_allclose(costs.class_cost(probs, tcls), -np.asarray(probs)[:, tcls])
  bce = np.zeros((Q, S))
  dice = np.zeros((Q, S))
  for q in range(Q):
    for t in range(S):
      bce[q, t] = np.sum(w[t] * np_bce(logits[q], tgt[t])) / 20
      dice[q, t] = np_dice(sigmoid(logits[q]), tgt[t], w[t])
  np.testing.assert_allclose(costs.sigmoid_bce_cost(logits, tgt, w), bce, rtol=1e-5)
  np.testing.assert_allclose(costs.dice_cost(logits, tgt, w), dice, rtol=1e-5, atol=1e-6)
  # mask_costs: the same costs from two distinct weight rows, and the dice's sums.
  # Tolerance: float32 sums of K products in another order, and the bce as a difference
  # of two sums (costs.mask_costs' docstring); the numpy loops are float64.
  rows = (r.rand(2, 20) > 0.2).astype(np.float32)
  row_of = np.array([0, 1, 1, 0, 1], np.int32)
  got = costs.mask_costs(logits, tgt, rows, row_of)
  w2 = rows[row_of]
  for q in range(Q):
    for t in range(S):
      bce[q, t] = np.sum(w2[t] * np_bce(logits[q], tgt[t])) / 20
      dice[q, t] = np_dice(sigmoid(logits[q]), tgt[t], w2[t])
  np.testing.assert_allclose(got.bce, bce, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.dice, dice, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.inside, sigmoid(logits) @ (w2 * tgt).T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.mass, sigmoid(logits) @ w2.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.bce, costs.sigmoid_bce_cost(logits, tgt, w2), rtol=1e-5, atol=1e-6)
  py, px = r.rand(Q, 7), r.rand(Q, 9)
  by, bx = (r.rand(S, 7) > 0.5) * 1.0, (r.rand(S, 9) > 0.5) * 1.0
  ref = np.zeros((Q, S))
  for q in range(Q):
    for t in range(S):
      for p, b in ((py[q], by[t]), (px[q], bx[t])):
        ref[q, t] += 1 - 2 * np.sum(p * b) / (np.sum(p * p) + np.sum(b * b) + 1e-5)
  np.testing.assert_allclose(costs.projection_cost(py, px, by, bx), ref, rtol=1e-5)
  np.testing.assert_allclose(
    costs.projection_dice(py[:, None], by[None]) + costs.projection_dice(px[:, None], bx[None]),
    ref,
    rtol=1e-5,
  )


def test_mask_costs_of_the_needed_targets_only(monkeypatch):
  """mask_costs(num_valid=n): the columns < n as without it (a while loop over chunks of
  2 target columns here: n = 3 stops after columns 0-3, n = 5 ends with a chunk that
  overlaps the one before); a differently compiled product of the same sums: 1e-6."""
  monkeypatch.setattr(costs, "COLUMN_CHUNK", 2)
  r = np.random.RandomState(3)
  logits = jnp.asarray(r.randn(Q, 20).astype(np.float32) * 3)
  tgt = jnp.asarray((r.rand(S, 20) > 0.5).astype(np.float32))
  rows = jnp.asarray((r.rand(2, 20) > 0.2).astype(np.float32))
  row_of = jnp.array([0, 1, 1, 0, 1], jnp.int32)
  full = costs.mask_costs(logits, tgt, rows, row_of)
  for n in (3, 5):
    part = jax.jit(costs.mask_costs)(logits, tgt, rows, row_of, jnp.int32(n))
    for name in ("bce", "dice", "inside", "mass"):
      got, want = np.asarray(getattr(part, name)), np.asarray(getattr(full, name))
      np.testing.assert_allclose(got[:, :n], want[:, :n], rtol=1e-6, atol=1e-6, err_msg=name)
  part = costs.mask_costs(logits, tgt, rows, row_of, jnp.int32(3))
  np.testing.assert_array_equal(np.asarray(part.inside)[:, 4], 0.0)  # not computed.


# ---------------------------------------------------------------- losses


def test_elementwise_losses_match_numpy():
  r = np.random.RandomState(3)
  logits = r.randn(4, 10).astype(np.float32) * 4
  t = (r.rand(4, 10) > 0.5).astype(np.float32)
  w = (r.rand(4, 10) > 0.3).astype(np.float32)
  np.testing.assert_allclose(
    losses.sigmoid_bce_loss(logits, t, w), np.sum(w * np_bce(logits, t), -1) / 10, rtol=1e-5
  )
  p = sigmoid(logits)
  np.testing.assert_allclose(
    losses.dice_loss(p, t, w), [np_dice(p[i], t[i], w[i]) for i in range(4)], rtol=1e-5
  )
  m = r.uniform(0, 1.6, size=(4, 10)).astype(np.float32)  # merged maps may exceed 1
  mc = np.clip(m, 1e-4, 1 - 1e-4)
  ref = -np.sum(w * (t * np.log(mc) + (1 - t) * np.log(1 - mc)), -1) / 10
  np.testing.assert_allclose(losses.prob_bce_loss(m, t, w, 1e-4), ref, rtol=1e-5)
  # Straight-through clip: a saturated false positive still gets a gradient.
  g = jax.grad(lambda x: losses.prob_bce_loss(x, jnp.zeros((1, 1)), jnp.ones((1, 1)), 1e-4).sum())(
    jnp.full((1, 1), 1.5)
  )
  assert float(g[0, 0]) > 0
  # Class loss: weighted CE, padded vocabulary excluded from the softmax.
  cl = r.randn(Q, V + 1).astype(np.float32)
  vocab_valid = np.array([True, True, True, False, True])
  target = np.array([0, 5, 2, 5, 4, 1])
  masked = np.where(np.append(vocab_valid, True), cl, -np.inf)
  logp = masked - np.log(np.sum(np.exp(masked), -1, keepdims=True))
  ce = -logp[np.arange(Q), target]
  wq = np.where(target == V, 0.1, 1.0)
  s, sw = losses.class_loss(jnp.asarray(cl), jnp.asarray(target), vocab_valid, 0.1)
  np.testing.assert_allclose([s, sw], [np.sum(wq * ce), np.sum(wq)], rtol=1e-5)
  # MERGE's per-proposal weights multiply the background weight.
  qw = np.array([1.0, 0.5, 0.25, 1.0, 1.0 / 3, 1.0], np.float32)
  s, sw = losses.class_loss(jnp.asarray(cl), jnp.asarray(target), vocab_valid, 0.1, jnp.asarray(qw))
  np.testing.assert_allclose([s, sw], [np.sum(qw * wq * ce), np.sum(qw * wq)], rtol=1e-5)


def test_supervised_rows_compacts_targets_in_slot_order():
  targets = merge.Targets(
    cls=jnp.asarray([0, 2, 2, 4, 1, 3]),
    one_to_one=jnp.asarray([True, False, False, True, True, False]),
    merged=jnp.asarray([False, True, False, False, False, True]),
    union=jnp.asarray([False, True, False, False, False, True]),
    dropped=jnp.zeros(6, bool),
  )
  # Proposal 2 -> slot 3, proposal 0 -> slot 0; slot 4 (one-to-one) is unmatched.
  matched = jnp.asarray([0, -1, 3, -1], jnp.int32)
  rows = losses.supervised_rows(targets, matched, 6)
  np.testing.assert_array_equal(rows.valid, [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(rows.slot[:4], [0, 1, 3, 5])
  np.testing.assert_array_equal(rows.query[:4], [0, 0, 2, 0])
  np.testing.assert_array_equal(rows.one_to_one[:4], [1, 0, 1, 0])
  assert float(rows.dropped) == 0
  rows = losses.supervised_rows(targets, matched, 3)
  np.testing.assert_array_equal(rows.slot, [0, 1, 3])
  assert bool(rows.valid.all()) and float(rows.dropped) == 1
  cfg = small_config()
  assert losses.num_rows(cfg, num_queries=4, num_slots=6, task="panoptic") == 6
  assert losses.num_rows(cfg, num_queries=4, num_slots=6, task="instance") == 4
  cfg.max_mask_targets = 2
  assert losses.num_rows(cfg, num_queries=4, num_slots=6, task="panoptic") == 2


def test_mask_sums_match_numpy():
  img = make_image(4)
  cfg = small_config()
  r = np.random.RandomState(5)
  mask_logits = r.randn(Q, HM, WM).astype(np.float32) * 2
  targets = merge.build_targets(jax.tree.map(jnp.asarray, img), "panoptic", jnp.asarray(IS_THING))
  probs = np.asarray(jax.nn.softmax(jnp.asarray(r.randn(Q, V + 1)), -1))
  merged = np.einsum("qt,qhw->thw", probs[:, np.maximum(img["seg_class"], 0)], sigmoid(mask_logits))
  np.testing.assert_allclose(
    merge.merged_masks(
      jnp.asarray(probs), jnp.asarray(mask_logits), jnp.asarray(np.maximum(img["seg_class"], 0))
    ),
    merged,
    rtol=1e-5,
  )
  # Row 0: proposal 1's logits against slot 0 (class 0, a thing). Row 1: the merged map
  # of slot 1, stuff class 2 (union of slots 1 and 2). Row 2: padding.
  rows = losses.Rows(
    slot=jnp.asarray([0, 1, 3]),
    query=jnp.asarray([1, 0, 0]),
    one_to_one=jnp.asarray([True, False, False]),
    valid=jnp.asarray([True, True, False]),
    dropped=jnp.float32(0),
  )
  maps = np.stack([mask_logits[1], merged[1], mask_logits[2]])
  coords = r.uniform(0, 1, size=(3, 24, 2)).astype(np.float32)
  fn = lambda merged: fast_jit(functools.partial(losses.mask_sums, config=cfg, has_merged=merged))
  bce, dice = fn(True)(jnp.asarray(maps), rows, img, targets, jnp.asarray(coords))
  seg, _, w_inst, _ = np_point_labels(img, coords[0])
  lg = np_point_sample(maps[:1], coords[0][None])[0]
  t = (seg == 0).astype(float)
  ref_bce, ref_dice = np.sum(w_inst * np_bce(lg, t)) / 24, np_dice(sigmoid(lg), t, w_inst)
  _, cls, _, w_m = np_point_labels(img, coords[1])
  m = np_point_sample(maps[1:2], coords[1][None])[0]
  t = (cls == 2).astype(float)
  mc = np.clip(m, 1e-4, 1 - 1e-4)
  ref_bce += -np.sum(w_m * (t * np.log(mc) + (1 - t) * np.log(1 - mc))) / 24
  ref_dice += np_dice(np.clip(m, 0, 1), t, w_m)
  np.testing.assert_allclose(bce, ref_bce, rtol=1e-5)
  np.testing.assert_allclose(dice, ref_dice, rtol=1e-5)
  # Without merged rows every valid row is a proposal's logits.
  rows = rows._replace(one_to_one=jnp.ones(3, bool), valid=jnp.asarray([True, False, False]))
  bce, dice = fn(False)(jnp.asarray(maps), rows, img, targets, jnp.asarray(coords))
  seg, _, w_inst, _ = np_point_labels(img, coords[0])
  t = (seg == 0).astype(float)
  np.testing.assert_allclose(bce, np.sum(w_inst * np_bce(lg, t)) / 24, rtol=1e-5)
  np.testing.assert_allclose(dice, np_dice(sigmoid(lg), t, w_inst), rtol=1e-5)


def test_rgb_to_lab_known_values():
  rgb = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.2, 0.5, 0.7]], np.float32)
  lab = np.asarray(losses.rgb_to_lab(jnp.asarray(rgb)))
  np.testing.assert_allclose(lab[0], [100.0, 0.0, 0.0], atol=0.01)
  np.testing.assert_allclose(lab[1], [53.24, 80.09, 67.20], atol=0.05)  # sRGB red
  np.testing.assert_allclose(lab[2], [0.0, 0.0, 0.0], atol=1e-3)
  np.testing.assert_allclose(lab, np_lab(rgb), atol=1e-3)


def test_box_sums_match_numpy():
  img = make_image(6)
  img["image"][:] = 128  # flat colour: every edge passes the similarity threshold
  img["image"][:, :6] = 10
  cfg = small_config()
  r = np.random.RandomState(7)
  mask_logits = r.randn(Q, HM, WM).astype(np.float32) * 2
  matched = np.array([1, -1, 0, -1, -1, 2], np.int32)
  proj, pair, pair_w = fast_jit(functools.partial(losses.box_sums, config=cfg, image_hw=(H, W)))(
    jnp.asarray(mask_logits), jnp.asarray(matched), img
  )
  cell_valid = img["valid"][2::4, 2::4].astype(float)
  pm = sigmoid(mask_logits) * cell_valid
  lab = np_lab(img["image"].astype(float).reshape(HM, 4, WM, 4, 3).mean((1, 3)) / 255)
  ref_proj = ref_pair = ref_w = 0.0
  for q, s in enumerate(matched):
    if s < 0:
      continue
    y0, x0, y1, x1 = img["seg_box"][s]
    by = np.array([(j * 4 < y1) and ((j + 1) * 4 > y0) for j in range(HM)], float)
    bx = np.array([(j * 4 < x1) and ((j + 1) * 4 > x0) for j in range(WM)], float)
    for p, b in ((pm[q].max(1), by), (pm[q].max(0), bx)):
      ref_proj += 1 - 2 * np.sum(p * b) / (np.sum(p * p) + np.sum(b * b) + 1e-5)
    for y in range(HM):
      for x in range(WM):
        if not (by[y] and bx[x]):
          continue
        for dy in (-2, 0, 2):
          for dx in (-2, 0, 2):
            yy, xx = y + dy, x + dx
            if (dy, dx) == (0, 0) or not (0 <= yy < HM and 0 <= xx < WM):
              continue
            sim = np.exp(-0.5 * np.linalg.norm(lab[y, x] - lab[yy, xx]))
            sim *= cell_valid[yy, xx] * cell_valid[y, x]
            if sim < 0.3:
              continue
            a, b = mask_logits[q, y, x], mask_logits[q, yy, xx]
            same = sigmoid(a) * sigmoid(b) + (1 - sigmoid(a)) * (1 - sigmoid(b))
            ref_pair -= np.log(same)
            ref_w += 1
  np.testing.assert_allclose(proj, ref_proj, rtol=1e-5)
  assert ref_w > 0
  np.testing.assert_allclose(pair_w, ref_w)
  np.testing.assert_allclose(pair, ref_pair, rtol=1e-4)


# ---------------------------------------------------------------- compute_loss end to end


def edge_case_batch():
  """B=4: random image, image with no segments, one-pixel masks, border + zero-area boxes."""
  imgs = [make_image(i) for i in range(4)]
  imgs[0]["image"][:] = 100  # flat colour: pairwise edges exist
  none = imgs[1]
  none["segment_map"][:] = -1
  none["seg_class"][:] = -1
  none["seg_valid"][:] = False
  none["seg_is_crowd"][:] = False
  one = imgs[2]
  one["segment_map"][:] = -1
  one["segment_map"][3, 5] = 0
  one["segment_map"][0, 0] = 1
  one["seg_box"][:] = [[3, 5, 4, 6], [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0] * 4]
  border = imgs[3]
  border["seg_box"][:] = [[0, 0, H, 12], [0, 11, 1, 12], [5, 5, 5, 8], [2, 7, 9, 7], [0] * 4]
  return {k: np.stack([im[k] for im in imgs]) for k in imgs[0]}


@functools.lru_cache(maxsize=None)
def jitted_loss(task, semantic_merge="soft_merge", matcher="scipy"):
  cfg = small_config(semantic_merge=semantic_merge, matcher=matcher)
  vocab_valid = np.ones(V, bool)

  def fn(outputs, batch, step):
    return losses.compute_loss(
      outputs,
      batch,
      task=task,
      vocab_valid=vocab_valid,
      is_thing_vocab=IS_THING,
      config=cfg,
      rng=jax.random.PRNGKey(0),
      step=step,
    )

  return fast_jit(jax.value_and_grad(fn, has_aux=True))


def random_outputs(seed=0, layers=2, batch=4):
  r = np.random.RandomState(seed)
  return dict(
    class_logits=jnp.asarray(r.randn(layers, batch, Q, V + 1), jnp.float32),
    mask_logits=jnp.asarray(r.randn(layers, batch, Q, HM, WM) * 3, jnp.float32),
  )


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("task", ["instance", "semantic", "panoptic", "boxes"])
def test_compute_loss_jit_grad_edge_cases(task):
  batch = edge_case_batch()
  outputs = random_outputs()
  (total, metrics), grads = jitted_loss(task)(outputs, batch, 5000)
  assert np.isfinite(float(total)) and all_finite(metrics) and all_finite(grads)
  assert float(total) > 0
  eligible = batch["seg_valid"] & ~batch["seg_is_crowd"]
  if task == "boxes":
    area = (batch["seg_box"][..., 2] > batch["seg_box"][..., 0]) & (
      batch["seg_box"][..., 3] > batch["seg_box"][..., 1]
    )
    assert float(metrics["dropped_zero_area_boxes"]) == np.sum(eligible & ~area) > 0
    assert float(metrics["num_targets"]) == np.sum(eligible & area)
    assert float(metrics["loss_projection"]) > 0
    assert float(metrics["loss_pairwise"]) > 0
  else:
    assert float(metrics["dropped_zero_area_boxes"]) == 0
    assert float(metrics["dropped_mask_targets"]) == 0
    assert float(metrics["loss_mask_bce"]) > 0 and float(metrics["loss_dice"]) > 0
  if task == "instance":
    assert float(metrics["num_targets"]) == np.sum(eligible)
  if task in ("semantic", "panoptic"):
    # Image 0 has merged (stuff / per-class) targets: every proposal contributes
    # p_i(c) sigmoid(m_i) to them, so every proposal's mask logits get a gradient
    # (unmatched ones only through the merged maps), in every layer.
    gm = np.abs(np.asarray(grads["mask_logits"])[:, 0]).reshape(2, Q, -1).sum(-1)
    assert np.all(gm > 0), gm
  for name in losses.TERMS:  # summed over 2 layers >= last layer
    assert float(metrics[name]) >= float(metrics["last/" + name]) - 1e-6
  # All-padding batch through the same compiled function.
  pad = {k: np.zeros_like(v) for k, v in batch.items()}
  pad["segment_map"][:] = -1
  pad["seg_class"][:] = -1
  (total, metrics), grads = jitted_loss(task)(outputs, pad, 0)
  assert all_finite(metrics) and all_finite(grads) and np.isfinite(float(total))
  assert float(metrics["num_targets"]) == 0
  for name in losses.TERMS[1:]:
    assert float(metrics[name]) == 0.0


def test_mask_target_cap_drops_and_counts():
  batch = edge_case_batch()
  outputs = random_outputs()
  cfg = small_config(max_mask_targets=1)

  def fn(o, b):
    return losses.compute_loss(
      o,
      b,
      task="instance",
      vocab_valid=np.ones(V, bool),
      is_thing_vocab=IS_THING,
      config=cfg,
      rng=jax.random.PRNGKey(0),
    )

  (total, metrics), grads = fast_jit(jax.value_and_grad(fn, has_aux=True))(outputs, batch)
  per_image = np.sum(batch["seg_valid"] & ~batch["seg_is_crowd"], 1)
  assert float(metrics["dropped_mask_targets"]) == np.sum(np.maximum(per_image - 1, 0)) > 0
  (_, full), _ = jitted_loss("instance")(outputs, batch, 0)
  assert 0 < float(metrics["loss_dice"]) < float(full["loss_dice"])
  assert all_finite(grads) and np.isfinite(float(total))


def test_normalisation_by_global_number_of_targets():
  """Mask terms are image sums / the number of targets over the whole (global) batch;
  an explicit num_targets_global rescales them and leaves the class term alone."""
  batch = edge_case_batch()
  outputs = random_outputs()
  cfg = small_config()

  def fn(o, b, n):
    return losses.compute_loss(
      o,
      b,
      task="instance",
      vocab_valid=np.ones(V, bool),
      is_thing_vocab=IS_THING,
      config=cfg,
      rng=jax.random.PRNGKey(0),
      num_targets_global=n,
    )

  (_, auto), _ = jitted_loss("instance")(outputs, batch, 0)
  n = float(auto["num_targets"])
  assert n == np.sum(batch["seg_valid"] & ~batch["seg_is_crowd"])
  _, manual = fast_jit(fn)(outputs, batch, 3 * n)
  for name in ("loss_mask_bce", "loss_dice", "last/loss_dice"):
    np.testing.assert_allclose(float(manual[name]) * 3, float(auto[name]), rtol=1e-5)
  np.testing.assert_allclose(float(manual["loss_class"]), float(auto["loss_class"]), rtol=1e-6)


def test_compute_loss_reads_point_selection():
  """config.loss.point_selection is the importance sampling's selection (traced: an
  unknown value fails before anything runs)."""
  cfg = small_config(point_selection="nope")
  with pytest.raises(ValueError, match="selection"):
    jax.eval_shape(
      lambda o: losses.compute_loss(
        o,
        edge_case_batch(),
        task="panoptic",
        vocab_valid=np.ones(V, bool),
        is_thing_vocab=IS_THING,
        config=cfg,
        rng=jax.random.PRNGKey(0),
      ),
      random_outputs(),
    )
