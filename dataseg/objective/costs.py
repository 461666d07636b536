"""Matching costs between proposals and targets of one image.

Design note. [paper]: box-only targets are matched with BoxInst's projection term.
[ours, following Mask2Former's HungarianMatcher]: class cost = -p(target class); mask
costs = sigmoid BCE and dice on K points shared by all proposals and targets of an image.
Ours: per-(target, point) weights, so ignore regions (padding, crowd, and void for merged
per-class targets) leave costs and losses alike; BCE is summed over the kept points and
divided by K (an ignored point contributes zero), dice uses only the kept points.

All functions take one image: proposals [Q, ...], targets [T, ...] -> cost [Q, T].
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dataseg.objective import points as points_lib


def class_cost(probs: jax.Array, target_class: jax.Array) -> jax.Array:
  """-p_q(c_t). probs [Q, V+1] (softmax), target_class [T] (clipped into range) -> [Q, T]."""
  idx = jnp.clip(target_class, 0, probs.shape[-1] - 1)
  return -jnp.take(probs, idx, axis=1)


def sigmoid_bce_cost(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over points of BCE-with-logits of every proposal against every target.

  Args:
    logits: [Q, K] proposal mask logits at the shared points.
    targets: [T, K] binary target masks at the points.
    weights: [T, K] 0/1 point weights of each target (0 = ignored).

  Returns:
    [Q, T] = sum_k w_tk bce(l_qk, t_tk) / K.
  """
  k = logits.shape[-1]
  pos = jax.nn.softplus(-logits)  # bce(l, 1)
  # bce(l, 0) = softplus(l) = softplus(-l) + l: one transcendental pass over [Q, K]
  # instead of two (the matching cost's elementwise work was ~15% of the objective's
  # CPU profile, issue 15); equal up to float rounding (tests/test_costs_losses.py).
  neg = pos + logits
  t = targets.astype(logits.dtype)
  w = weights.astype(logits.dtype)
  return (pos @ (w * t).T + neg @ (w * (1.0 - t)).T) / k


def dice_cost(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Mask2Former's dice cost 1 - (2|p t| + 1) / (|p| + |t| + 1) on the kept points.

  Args: as sigmoid_bce_cost. Returns [Q, T].
  """
  p = jax.nn.sigmoid(logits)
  t = targets.astype(p.dtype)
  w = weights.astype(p.dtype)
  numerator = 2.0 * (p @ (w * t).T)
  denominator = p @ w.T + jnp.sum(w * t, axis=-1)[None, :]
  return 1.0 - (numerator + 1.0) / (denominator + 1.0)


class MaskCosts(NamedTuple):
  """`mask_costs`' results, each [Q, T]."""

  bce: jax.Array  # sigmoid_bce_cost.
  dice: jax.Array  # dice_cost.
  inside: jax.Array  # sum_k w_tk t_tk sigmoid(l_qk): the dice's intersection.
  mass: jax.Array  # sum_k w_tk sigmoid(l_qk): the dice's |p| on the kept points.


# Target columns per while-loop iteration of mask_costs(num_valid=...).
COLUMN_CHUNK = 8


def mask_costs(logits, targets, weight_rows, row_of_target, num_valid=None) -> MaskCosts:
  """sigmoid_bce_cost and dice_cost (and the dice's sums) of every proposal and target.

  Args:
    logits: [Q, K] proposal mask logits at the shared points.
    targets: [T, K] binary target masks at the points.
    weight_rows: [R, K] the distinct 0/1 point-weight rows (R small: the matching's
      targets have two, merge.point_labels' instance and merged weights).
    row_of_target: [T] int32, target t's weights are weight_rows[row_of_target[t]].
    num_valid: optional int scalar (may be traced): only targets [0, num_valid) are
      needed; the [2Q, K] x [K, T] product is then taken COLUMN_CHUNK targets at a time in
      a while loop that stops after the last needed chunk, and the other targets' inside
      and bce are those of an empty target (no gradient: the matching's costs).

  Returns:
    MaskCosts; bce and dice equal the two functions above with weights
    weight_rows[row_of_target] (up to float32 rounding of the sums), for the needed
    targets.

  How: with w the weights, bce(l, t) = softplus(l) - l t gives
  sum_k w bce = softplus(l) @ w.T - l @ (w t).T, and the dice needs sigmoid(l) @ (w t).T
  and sigmoid(l) @ w.T. The products with w have R distinct columns ([Q, K] x [K, R]),
  and the two with w t are one [2Q, K] x [K, T] matmul: half the multiply-adds of the
  four [Q, K] x [K, T] products of the two functions, in one call (on XLA:CPU the four
  were ~10% of the objective's time at 512x512, issue 15; soft_merge's class targets
  reuse inside / mass instead of computing them again). The bce is a difference of two
  sums of up to K terms (|error| ~ 1e-6 per point after the division by K).
  """
  q, k = logits.shape
  p = jax.nn.sigmoid(logits)
  wt = jnp.take(weight_rows, row_of_target, axis=0) * targets.astype(logits.dtype)  # [T, K]
  by_target = _product_of_columns(jnp.concatenate([logits, p]), wt, num_valid)  # [2Q, T]
  by_row = jnp.concatenate([jax.nn.softplus(logits), p]) @ weight_rows.T  # [2Q, R]
  by_row = jnp.take(by_row, row_of_target, axis=1)  # [2Q, T]
  inside, mass = by_target[q:], by_row[q:]
  bce = (by_row[:q] - by_target[:q]) / k
  dice = 1.0 - (2.0 * inside + 1.0) / (mass + jnp.sum(wt, axis=-1)[None, :] + 1.0)
  return MaskCosts(bce, dice, inside, mass)


def _product_of_columns(a, b, num_valid):
  """a @ b.T, [M, K] x [T, K] -> [M, T], columns from the first chunk past num_valid zero.

  Why: the matching's targets are padded to a static T (max_segments, 100) and an image
  has ~20; the product over all of them was the matching cost's largest op (issue 15).
  """
  t = b.shape[0]
  chunk = min(COLUMN_CHUNK, t)
  if num_valid is None or chunk == t:
    return a @ b.T
  count = points_lib.num_chunks(num_valid, t, chunk)

  def body(carry):
    i, out = carry
    col0, _ = points_lib.chunk_start(i, chunk, t)
    block = a @ jax.lax.dynamic_slice_in_dim(b, col0, chunk).T
    return i + 1, jax.lax.dynamic_update_slice_in_dim(out, block, col0, 1)

  out = jnp.zeros((a.shape[0], t), a.dtype)
  return jax.lax.while_loop(lambda c: c[0] < count, body, (jnp.int32(0), out))[1]


def projection_dice(pred: jax.Array, target: jax.Array, eps: float = 1e-5) -> jax.Array:
  """BoxInst's dice_coefficient loss 1 - 2 sum(x y) / (sum x^2 + sum y^2 + eps), last axis."""
  inter = jnp.sum(pred * target, axis=-1)
  union = jnp.sum(pred * pred, axis=-1) + jnp.sum(target * target, axis=-1) + eps
  return 1.0 - 2.0 * inter / union


def projection_cost(
  pred_y: jax.Array, pred_x: jax.Array, box_y: jax.Array, box_x: jax.Array, eps: float = 1e-5
) -> jax.Array:
  """BoxInst projection term for every (proposal, box) pair.

  Args:
    pred_y: [Q, h] max over x of the proposal's mask probability.
    pred_x: [Q, w] max over y.
    box_y: [T, h] the box's projection on y (1 on rows the box covers).
    box_x: [T, w].
    eps: BoxInst's dice epsilon.

  Returns:
    [Q, T] dice(pred_y, box_y) + dice(pred_x, box_x).
  """

  def dice(p, t):
    inter = p @ t.T
    union = jnp.sum(p * p, -1)[:, None] + jnp.sum(t * t, -1)[None, :] + eps
    return 1.0 - 2.0 * inter / union

  return dice(pred_y, box_y) + dice(pred_x, box_x)
