"""MERGE: how the proposals of one image meet the targets of its task in training.

Design note. [paper]: one representation (Q mask proposals, each with a class
distribution) for every task; tasks differ by a MERGE operation; box-only data is matched
with BoxInst's projection term. [ours] (METHOD.md section 2):
  * instance: no merge; Hungarian one-to-one matching of proposals to (non-crowd)
    segments with Mask2Former's costs.
  * boxes: as instance, the mask costs replaced by the projection cost; boxes of zero
    area are dropped (and counted) before matching.
  * semantic ('soft_merge', default): every class present is one target; all proposals
    are merged per class, M_c(x) = sum_i p_i(c) sigmoid(m_i(x)), and M_c is supervised
    against the class's mask (losses.py). The class target of proposal i is given by
    `soft_class_targets` below. Alternative ('hungarian_merged'): the per-class targets
    are matched one-to-one with the proposals (MaskFormer's semantic training).
  * panoptic: stuff classes as semantic, thing segments matched one-to-one; a proposal
    matched to a thing takes its class, the others follow the stuff rule.
  * class target and weight of a merge-assigned proposal (`merge_class_weighting`,
    `merge_class_weights` below). 'top' (default): of the proposals that soft_merge
    assigns to one merged class, only the top contributor (largest C_it) keeps the
    class; the others get background (weight 0.1), so each stuff class has one class
    target per image, as a thing does. Why: with the earlier rule ('full') every
    unmatched proposal lying mostly inside some stuff class took it at full weight, so on
    a COCO-like image ~14 of 16 proposals carried stuff targets against one per thing,
    and thing classification collapsed to the stuff classes (issue 14). The merged mask
    loss still trains p_i(c) of every proposal through M_c. Alternatives one switch
    away: 'no_object' (merge-assigned proposals keep the class at Mask2Former's
    no-object weight, background_weight), 'split' (the n proposals of one merged target
    share one unit of weight, 1/n each), 'full'; or semantic_merge='hungarian_merged'
    (tied with 'top' in the ablation: README, "The embedded demo").
Thing/stuff comes from the dataset's metadata (`is_thing_vocab[seg_class]`). Crowd segments
are never targets.

Targets stay compact: segment slot s of the image's table is a target; for merged
(per-class) targets slot s is the first eligible segment of its class and stands for the
union of that class's eligible segments. Masks are read at sampled points from
`segment_map` (points.nearest_lookup), never stacked at full resolution.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dataseg.objective import costs
from dataseg.objective import matching
from dataseg.objective import points as points_lib

TASKS = ("panoptic", "semantic", "instance", "boxes")
NEG = -1e9  # finite 'minus infinity' for padded vocabulary logits.


class Targets(NamedTuple):
  """Per-image target slots, all [S]."""

  cls: jax.Array  # int32 class id (clipped to >= 0).
  one_to_one: jax.Array  # bool: matched one-to-one (instance / thing / box / per-class).
  merged: jax.Array  # bool: supervised through the merged map M_cls (soft_merge).
  union: jax.Array  # bool: the target mask is the union of its class's segments.
  dropped: jax.Array  # bool: zero-area box dropped before the loss.


class Assignment(NamedTuple):
  """Result of MERGE for one image and one decoder layer."""

  matched: jax.Array  # [Q] int32 slot matched one-to-one, or -1.
  query_class: jax.Array  # [Q] int32 class target of each proposal; V = background.
  # [Q] float multiplier of each proposal's class-loss weight (1 unless merge-assigned;
  # the background weight is applied on top by losses.class_loss).
  class_weight: jax.Array


def _first_of_class(cls: jax.Array, eligible: jax.Array) -> jax.Array:
  """[S] bool: eligible and no earlier eligible slot has the same class."""
  s = cls.shape[0]
  same = (cls[:, None] == cls[None, :]) & eligible[None, :]
  earlier = jnp.arange(s)[None, :] < jnp.arange(s)[:, None]
  return eligible & ~jnp.any(same & earlier, axis=1)


def box_area_positive(seg_box: jax.Array) -> jax.Array:
  """[S] bool: the (y0, x0, y1, x1) box has positive height and width."""
  return (seg_box[:, 2] > seg_box[:, 0]) & (seg_box[:, 3] > seg_box[:, 1])


def build_targets(
  img: dict,
  task: str,
  is_thing_vocab: jax.Array,
  semantic_merge: str = "soft_merge",
  drop_zero_area_boxes: bool = True,
) -> Targets:
  """Target slots of one image for `task` (see module docstring)."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}")
  if semantic_merge not in ("soft_merge", "hungarian_merged"):
    raise ValueError(f"unknown semantic_merge {semantic_merge!r}")
  seg_class = img["seg_class"]
  eligible = img["seg_valid"] & ~img["seg_is_crowd"] & (seg_class >= 0)
  cls = jnp.maximum(seg_class, 0).astype(jnp.int32)
  thing = jnp.take(is_thing_vocab, cls)
  false = jnp.zeros_like(eligible)
  dropped = false
  if task == "instance":
    o2o, per_class = eligible, false
  elif task == "boxes":
    if drop_zero_area_boxes:
      dropped = eligible & ~box_area_positive(img["seg_box"])
    o2o, per_class = eligible & ~dropped, false
  elif task == "semantic":
    o2o, per_class = false, _first_of_class(cls, eligible)
  else:  # panoptic
    o2o, per_class = eligible & thing, _first_of_class(cls, eligible & ~thing)
  if semantic_merge == "hungarian_merged":
    return Targets(cls, o2o | per_class, false, per_class, dropped)
  return Targets(cls, o2o, per_class, per_class, dropped)


class PointLabels(NamedTuple):
  """What the compact targets say at sampled points (any leading shape [...])."""

  seg: jax.Array  # int32 segment slot, -1 void.
  cls: jax.Array  # int32 class, -1 void.
  instance_weight: jax.Array  # float 0/1: kept by one-to-one (single segment) masks.
  merged_weight: jax.Array  # float 0/1: kept by per-class (union) masks.


def point_labels(img: dict, coords: jax.Array, config) -> PointLabels:
  """Reads segment_map / valid at [..., 2] points (nearest) and forms ignore weights.

  Ignored: crowd pixels (always), padding (config.ignore_padding), void pixels
  (segment_map == -1) for per-class masks (config.ignore_void_in_merged; a void pixel
  has no known class) and for instance masks (config.ignore_void_in_instances, False by
  default because instance data marks everything that is not an instance as void).
  """
  seg = points_lib.nearest_lookup(img["segment_map"], coords).astype(jnp.int32)
  known = seg >= 0
  safe = jnp.maximum(seg, 0)
  cls = jnp.where(known, jnp.take(img["seg_class"], safe), -1)
  crowd = known & jnp.take(img["seg_is_crowd"], safe)
  keep = ~crowd
  if config.ignore_padding:
    keep &= points_lib.nearest_lookup(img["valid"], coords)
  inst = keep & known if config.ignore_void_in_instances else keep
  merged = keep & known if config.ignore_void_in_merged else keep
  return PointLabels(seg, cls, inst.astype(jnp.float32), merged.astype(jnp.float32))


def slot_masks(labels: PointLabels, targets: Targets, slots: jax.Array):
  """Target masks and weights of `slots` at points.

  Args:
    labels: PointLabels with leading shape [..., K] broadcastable against slots[..., None].
    targets: Targets of the image.
    slots: int32 [...] slot index per row (clipped).

  Returns:
    (mask, weight), float [..., K].
  """
  slots = jnp.maximum(slots, 0)
  union = jnp.take(targets.union, slots)[..., None]
  cls = jnp.take(targets.cls, slots)[..., None]
  mask = jnp.where(union, labels.cls == cls, labels.seg == slots[..., None])
  weight = jnp.where(union, labels.merged_weight, labels.instance_weight)
  return mask.astype(jnp.float32), weight


def class_probs(class_logits: jax.Array, vocab_valid: jax.Array) -> jax.Array:
  """Softmax over [valid vocabulary + background]; padded entries get probability 0."""
  return jax.nn.softmax(mask_vocab(class_logits, vocab_valid), axis=-1)


def mask_vocab(class_logits: jax.Array, vocab_valid: jax.Array) -> jax.Array:
  """[..., V+1] logits with padded vocabulary entries set to a large negative value."""
  keep = jnp.concatenate([vocab_valid, jnp.ones((1,), bool)])
  return jnp.where(keep, class_logits, NEG)


def merged_masks(probs: jax.Array, mask_logits: jax.Array, cls: jax.Array) -> jax.Array:
  """M_c = sum_i p_i(c) sigmoid(m_i) for the classes of the slots.

  Args:
    probs: [Q, V+1]. mask_logits: [Q, h, w]. cls: [T] classes.

  Returns:
    [T, h, w] merged (unclipped; may exceed 1) probability maps.
  """
  weights = jnp.take(probs, cls, axis=1)  # [Q, T]
  return jnp.einsum("qt,qhw->thw", weights, jax.nn.sigmoid(mask_logits))


def box_projections(seg_box: jax.Array, image_hw: tuple, mask_hw: tuple):
  """Rows / columns of the mask grid a box covers, [S, h] and [S, w] float.

  A mask cell j (stride s = H / h) is covered when [j s, (j + 1) s) meets [y0, y1) with
  positive length, so every positive-area box covers at least one cell.
  """

  def cover(lo, hi, size, n):
    s = size / n
    j = jnp.arange(n, dtype=jnp.float32)
    return (j[None] * s < hi[:, None]) & ((j[None] + 1.0) * s > lo[:, None])

  box_y = cover(seg_box[:, 0], seg_box[:, 2], image_hw[0], mask_hw[0])
  box_x = cover(seg_box[:, 1], seg_box[:, 3], image_hw[1], mask_hw[1])
  return box_y.astype(jnp.float32), box_x.astype(jnp.float32)


def mask_grid_valid(valid: jax.Array, mask_hw: tuple) -> jax.Array:
  """[h, w] float: valid image pixel at each mask cell centre."""
  h, w = mask_hw
  ys = (jnp.arange(h) + 0.5) / h
  xs = (jnp.arange(w) + 0.5) / w
  coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), -1)
  return points_lib.nearest_lookup(valid, coords).astype(jnp.float32)


def predicted_projections(mask_logits: jax.Array, cell_valid: jax.Array):
  """BoxInst projections of mask probabilities (padding cells zeroed): [Q, h], [Q, w]."""
  p = jax.nn.sigmoid(mask_logits) * cell_valid[None]
  return jnp.max(p, axis=2), jnp.max(p, axis=1)


def soft_class_targets(probs, inside, mass, targets, candidates, fg_fraction, min_points):
  """Class target of each proposal under soft_merge ('contributes most').

  Contribution of proposal i to the merged mask of target t (class c_t), counted where
  it is right: C_it = p_i(c_t) * sum_k w_tk sigma(m_i(x_k)) [x_k in class c_t], over the
  K shared uniform points (no gradient). Proposal i's target is c_{t*}, t* = argmax_t C_it
  over the image's merged targets, provided (a) its soft mask has mass
  sum_k w_t*k sigma(m_i(x_k)) >= min_points, and (b) at least `fg_fraction` of that mass
  lies inside class c_{t*}; otherwise background (V).

  Args:
    probs: [Q, V+1].
    inside: [Q, T] sum_k w_tk t_tk sigma(m_i(x_k)) over the K shared points (t_tk: x_k in
      slot t's mask, w_tk its point weight; costs.mask_costs).
    mass: [Q, T] sum_k w_tk sigma(m_i(x_k)).
    targets: Targets.
    candidates: [Q] bool, proposals that may receive a merged class (not matched).
    fg_fraction, min_points: thresholds (config).

  Returns:
    (cls [Q] int32 class or V (background), slot [Q] int32 merged target slot t* of a
    proposal given a merged class, else -1, contrib [Q] float C_it* (0 where slot < 0)).
  """
  background = probs.shape[-1] - 1
  contrib = jnp.take(probs, targets.cls, axis=1) * inside
  contrib = jnp.where(targets.merged[None], contrib, -1.0)
  best = jnp.argmax(contrib, axis=1)
  take = lambda a: jnp.take_along_axis(a, best[:, None], axis=1)[:, 0]
  ok = (
    candidates
    & jnp.any(targets.merged)
    & (take(mass) >= min_points)
    & (take(inside) >= fg_fraction * take(mass))
  )
  cls = jnp.where(ok, jnp.take(targets.cls, best), background).astype(jnp.int32)
  return (cls, jnp.where(ok, best, -1).astype(jnp.int32), jnp.where(ok, take(contrib), 0.0))


WEIGHTINGS = ("split", "no_object", "top", "full")


def merge_class_weights(cls, slot, contrib, background, mode, no_object_weight):
  """Class targets and class-loss weights of merge-assigned proposals (module docstring).

  Args:
    cls: [Q] int32 class from soft_class_targets (V = background).
    slot: [Q] int32 merged target slot of each merge-assigned proposal, -1 otherwise.
    contrib: [Q] float contribution C_it of the proposal to its slot (for 'top').
    background: V, the background class index.
    mode: 'split' | 'no_object' | 'top' | 'full'.
    no_object_weight: the weight of 'no_object' (the config's background_weight).

  Returns:
    (cls [Q] int32, weight [Q] float): weight multiplies the proposal's class CE; it is 1
    for proposals not merge-assigned (background ones keep the background weight of
    losses.class_loss).
  """
  if mode not in WEIGHTINGS:
    raise ValueError(f"unknown merge_class_weighting {mode!r}; allowed: {WEIGHTINGS}")
  assigned = slot >= 0
  same = assigned[:, None] & assigned[None, :] & (slot[:, None] == slot[None, :])  # [Q, Q]
  ones = jnp.ones(cls.shape, jnp.float32)
  if mode == "full":
    return cls, ones
  if mode == "no_object":
    return cls, jnp.where(assigned, no_object_weight, 1.0).astype(jnp.float32)
  if mode == "split":
    count = jnp.sum(same, axis=1).astype(jnp.float32)
    return cls, jnp.where(assigned, 1.0 / jnp.maximum(count, 1.0), 1.0).astype(jnp.float32)
  # 'top': the highest contribution of its slot keeps the class (lowest index on ties).
  q = cls.shape[0]
  idx = jnp.arange(q)
  beats = same & (
    (contrib[None, :] > contrib[:, None])
    | ((contrib[None, :] == contrib[:, None]) & (idx[None, :] < idx[:, None]))
  )
  top = assigned & ~jnp.any(beats, axis=1)
  return jnp.where(assigned & ~top, background, cls).astype(jnp.int32), ones


def assign(
  task: str,
  class_logits: jax.Array,
  mask_logits: jax.Array,
  img: dict,
  targets: Targets,
  vocab_valid: jax.Array,
  rng: jax.Array,
  config,
  image_hw: tuple,
) -> Assignment:
  """MERGE for one image and one layer: matching and class targets of every proposal.

  Args:
    task: static task name.
    class_logits: [Q, V+1]. mask_logits: [Q, h, w].
    img: the image's batch entries (schema fields without the batch dim).
    targets: from build_targets.
    vocab_valid: [V] bool.
    rng: key for the shared cost points.
    config: loss_config().
    image_hw: (H, W) static.

  Returns:
    Assignment.
  """
  class_logits = jax.lax.stop_gradient(class_logits)
  mask_logits = jax.lax.stop_gradient(mask_logits)
  probs = class_probs(class_logits, vocab_valid)
  background = probs.shape[-1] - 1
  num_slots = targets.cls.shape[0]
  cost = config.class_weight * costs.class_cost(probs, targets.cls)
  if task == "boxes":
    mask_hw = mask_logits.shape[1:]
    box_y, box_x = box_projections(img["seg_box"], image_hw, mask_hw)
    pred_y, pred_x = predicted_projections(mask_logits, mask_grid_valid(img["valid"], mask_hw))
    cost += config.box.projection_weight * costs.projection_cost(pred_y, pred_x, box_y, box_x)
  else:
    coords = points_lib.uniform_points(rng, (config.num_points,))
    labels = point_labels(img, coords, config)
    tmask, _ = slot_masks(labels, targets, jnp.arange(num_slots))
    point_logits = points_lib.point_sample(mask_logits, coords)  # [Q, K]
    # Each slot's point weights are one of two rows (slot_masks: merged or instance).
    weight_rows = jnp.stack([labels.instance_weight, labels.merged_weight])
    # The cost columns needed: matched targets and merged ones (soft_class_targets).
    num_needed = points_lib.num_needed(targets.one_to_one | targets.merged)
    mask_costs = costs.mask_costs(
      point_logits, tmask, weight_rows, targets.union.astype(jnp.int32), num_needed
    )
    cost += config.mask_bce_weight * mask_costs.bce
    cost += config.dice_weight * mask_costs.dice
  cost = jnp.where(targets.one_to_one[None], cost, 0.0)
  cost = jnp.nan_to_num(cost, nan=0.0, posinf=1e4, neginf=-1e4)
  matched = matching.match(cost, targets.one_to_one, method=config.matcher)
  matched = jnp.where(jnp.any(targets.one_to_one), matched, -1).astype(jnp.int32)
  is_matched = matched >= 0
  query_class = jnp.where(
    is_matched, jnp.take(targets.cls, jnp.maximum(matched, 0)), background
  ).astype(jnp.int32)
  weight = jnp.ones(query_class.shape, jnp.float32)
  if task in ("semantic", "panoptic") and config.semantic_merge == "soft_merge":
    soft, slot, contrib = soft_class_targets(
      probs,
      mask_costs.inside,
      mask_costs.mass,
      targets,
      ~is_matched,
      config.merge_fg_fraction,
      config.merge_min_points,
    )
    soft, weight = merge_class_weights(
      soft, slot, contrib, background, config.merge_class_weighting, config.background_weight
    )
    query_class = jnp.where(is_matched, query_class, soft)
  return Assignment(matched, query_class, weight)
