"""The DaTaSeg training objective: per-task MERGE, then Mask2Former / BoxInst losses.

Design note. [paper]: one objective over the shared proposal representation; tasks differ
by MERGE (merge.py); box-only data trained with BoxInst's projection loss (also the
matching cost). [ours] (METHOD.md section 2, defaults in config.py):
  * class: softmax CE over [dataset vocabulary + background], background weight 0.1,
    Mask2Former's weighted mean over the global batch (or / number of targets);
    merge-assigned proposals weighted by MERGE (merge.merge_class_weights: by default
    the proposals of one merged target share one unit of weight).
  * one-to-one masks: sigmoid BCE + dice (Mask2Former) on K importance-sampled points of
    each matched proposal.
  * merged masks (soft_merge): M_c = sum_i p_i(c) sigmoid(m_i) is a probability-like map
    that may exceed 1 (several proposals may claim c). BCE on a merged probability means
    BCE(clip(M_c, eps, 1 - eps), y) and dice on clip(M_c, 0, 1); the clip is
    straight-through (forward clipped, backward identity) so a saturated false positive
    still receives a gradient. M_c is formed on the stride-4 grid and sampled bilinearly at
    K importance-sampled points (uncertainty -|M_c - 0.5|), i.e. interpolation happens
    after the sigmoid (Mask2Former interpolates logits; a choice of ours, for memory).
  * boxes: projection dice (BoxInst) of the matched proposal's mask (padding cells
    zeroed) against the box; optional pairwise colour-affinity term (BoxInst: Lab colours
    of the stride-4 image, 3x3 neighbourhood with dilation 2, edges with similarity
    >= 0.3 whose centre lies in the box, linear warm-up), normalised by the global number
    of such edges.
  * ignore regions: crowd pixels always, padding by default, void pixels for per-class
    masks only (merge.point_labels).
  * static rows: the mask terms are computed only for the supervised targets (matched
    one-to-one, or merged), compacted into P = max_mask_targets rows per image (default:
    max_segments); one importance sampling and one point_sample serve both kinds of row.
  * deep supervision: every decoder layer re-matched and supervised with the same
    weights (Mask2Former).
  * normalisation: mask / dice / projection sums are divided by the number of target
    segments (one-to-one targets + merged class targets) over the *global* batch. Inside
    `jax.jit` with the batch sharded over devices and hosts, jnp.sum over the batch axis
    is already the global sum (the compiler inserts the all-reduce), so the default
    (`num_targets_global=None`) is correct under any sharding; pass a number only to
    override it.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dataseg.objective import costs
from dataseg.objective import merge as merge_lib
from dataseg.objective import points as points_lib

TERMS = ("loss_class", "loss_mask_bce", "loss_dice", "loss_projection", "loss_pairwise")


def straight_through_clip(x: jax.Array, lo: float, hi: float) -> jax.Array:
  """Clipped forward value, identity gradient."""
  return x + jax.lax.stop_gradient(jnp.clip(x, lo, hi) - x)


def sigmoid_bce_loss(logits, targets, weights):
  """[N, K] -> [N]: sum_k w bce_with_logits / K (ignored points count as zero)."""
  bce = jax.nn.softplus(logits) - logits * targets
  return jnp.sum(weights * bce, -1) / logits.shape[-1]


def prob_bce_loss(probs, targets, weights, eps):
  """[N, K] -> [N]: BCE of probabilities clipped (straight-through) to [eps, 1 - eps]."""
  p = straight_through_clip(probs, eps, 1.0 - eps)
  bce = -(targets * jnp.log(p) + (1.0 - targets) * jnp.log(1.0 - p))
  return jnp.sum(weights * bce, -1) / probs.shape[-1]


def dice_loss(probs, targets, weights):
  """[N, K] -> [N]: Mask2Former dice 1 - (2 sum p t + 1) / (sum p + sum t + 1), kept points."""
  num = 2.0 * jnp.sum(weights * probs * targets, -1)
  den = jnp.sum(weights * probs, -1) + jnp.sum(weights * targets, -1)
  return 1.0 - (num + 1.0) / (den + 1.0)


def class_loss(class_logits, query_class, vocab_valid, background_weight, query_weight=None):
  """Weighted softmax CE. [Q, V+1], [Q] -> (sum_q w_q ce_q, sum_q w_q).

  w_q = background_weight for background targets, else 1, times `query_weight` [Q]
  (MERGE's weight of merge-assigned proposals, merge.merge_class_weights; None = 1).
  """
  logp = jax.nn.log_softmax(merge_lib.mask_vocab(class_logits, vocab_valid), -1)
  ce = -jnp.take_along_axis(logp, query_class[:, None], axis=-1)[:, 0]
  w = jnp.where(query_class == class_logits.shape[-1] - 1, background_weight, 1.0)
  if query_weight is not None:
    w = w * query_weight
  return jnp.sum(w * ce), jnp.sum(w)


def rgb_to_lab(rgb: jax.Array) -> jax.Array:
  """sRGB in [0, 1] [..., 3] -> CIE Lab (D65), as skimage.color.rgb2lab."""
  lin = jnp.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
  m = jnp.array(
    [
      [0.412453, 0.357580, 0.180423],
      [0.212671, 0.715160, 0.072169],
      [0.019334, 0.119193, 0.950227],
    ],
    jnp.float32,
  )
  xyz = lin @ m.T / jnp.array([0.95047, 1.0, 1.08883], jnp.float32)
  f = jnp.where(xyz > 0.008856, jnp.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
  l = 116.0 * f[..., 1] - 16.0
  a = 500.0 * (f[..., 0] - f[..., 1])
  b = 200.0 * (f[..., 1] - f[..., 2])
  return jnp.stack([l, a, b], -1)


def neighbour_offsets(size: int = 3, dilation: int = 2):
  r = size // 2
  return [
    (dy * dilation, dx * dilation)
    for dy in range(-r, r + 1)
    for dx in range(-r, r + 1)
    if (dy, dx) != (0, 0)
  ]


def shift(x: jax.Array, oy: int, ox: int):
  """y[..., i, j] = x[..., i + oy, j + ox], zero outside; [..., h, w]."""
  h, w = x.shape[-2:]
  pad = [(0, 0)] * (x.ndim - 2) + [(max(-oy, 0), max(oy, 0)), (max(-ox, 0), max(ox, 0))]
  xp = jnp.pad(x, pad)
  y0, x0 = max(oy, 0), max(ox, 0)
  return jax.lax.slice_in_dim(jax.lax.slice_in_dim(xp, y0, y0 + h, axis=-2), x0, x0 + w, axis=-1)


def downsample_image(image: jax.Array, mask_hw: tuple) -> jax.Array:
  """[H, W, 3] uint8 -> [h, w, 3] float in [0, 1], mean over each stride block."""
  hh, ww = image.shape[:2]
  h, w = mask_hw
  x = image.astype(jnp.float32) / 255.0
  if hh % h == 0 and ww % w == 0:
    return x.reshape(h, hh // h, w, ww // w, 3).mean((1, 3))
  return jax.image.resize(x, (h, w, 3), "linear", antialias=True)


def color_similarity(image, cell_valid, size=3, dilation=2):
  """BoxInst: exp(-||lab_i - lab_j|| / 2) to each neighbour, 0 where j is outside/padding.

  Returns [E, h, w], E = size * size - 1 neighbours.
  """
  lab = jnp.moveaxis(rgb_to_lab(downsample_image(image, cell_valid.shape)), -1, 0)
  sims = []
  for oy, ox in neighbour_offsets(size, dilation):
    diff = lab - shift(lab, oy, ox)
    dist = jnp.sqrt(jnp.sum(diff * diff, 0) + 1e-12)
    sims.append(jnp.exp(-0.5 * dist) * shift(cell_valid, oy, ox) * cell_valid)
  return jnp.stack(sims)


def pairwise_log_same(mask_logits, size=3, dilation=2):
  """-log P(same label) for each (pixel, neighbour), [Q, E, h, w] (BoxInst)."""
  out = []
  for oy, ox in neighbour_offsets(size, dilation):
    nb = shift(mask_logits, oy, ox)
    fg = jax.nn.log_sigmoid(mask_logits) + jax.nn.log_sigmoid(nb)
    bg = jax.nn.log_sigmoid(-mask_logits) + jax.nn.log_sigmoid(-nb)
    out.append(-jnp.logaddexp(fg, bg))
  return jnp.stack(out, 1)


class Rows(NamedTuple):
  """The image's supervised target masks, compacted into P static rows (slot order)."""

  slot: jax.Array  # [P] int32 target slot of the row.
  query: jax.Array  # [P] int32 proposal matched to it (one-to-one rows), else 0.
  one_to_one: jax.Array  # [P] bool: the row is a matched proposal's logits.
  valid: jax.Array  # [P] bool: the row is supervised (else padding).
  dropped: jax.Array  # scalar: supervised targets beyond the P rows (not supervised).


def supervised_rows(targets, matched, num_rows: int) -> Rows:
  """Compacts the targets that get a mask loss into `num_rows` rows.

  Why: the mask losses need their maps only for the targets (Mask2Former samples points
  for the matched proposals alone), not for all Q proposals and S padded slots: the
  point sampling of Q + S rows was most of the loss's time. A target is supervised when
  it is matched one-to-one to a proposal, or is a merged (per-class) target. Rows keep
  slot order; targets beyond `num_rows` are dropped and counted.
  """
  s, q = targets.cls.shape[0], matched.shape[0]
  query_of_slot = (
    jnp.full((s,), -1, jnp.int32)
    .at[jnp.where(matched >= 0, matched, s)]
    .set(jnp.arange(q, dtype=jnp.int32), mode="drop")
  )
  one = targets.one_to_one & (query_of_slot >= 0)
  supervised = one | targets.merged
  slot = jnp.argsort(~supervised, stable=True)[:num_rows].astype(jnp.int32)
  valid = jnp.take(supervised, slot)
  return Rows(
    slot,
    jnp.maximum(jnp.take(query_of_slot, slot), 0),
    jnp.take(one, slot),
    valid,
    (jnp.sum(supervised) - jnp.sum(valid)).astype(jnp.float32),
  )


def num_rows(config, num_queries: int, num_slots: int, task: str) -> int:
  """Static P: at most `max_mask_targets` (0: all slots), at most the possible targets."""
  cap = config.max_mask_targets or num_slots
  if task in ("instance", "boxes"):  # one-to-one only: at most one row per proposal.
    cap = min(cap, num_queries)
  return max(1, min(cap, num_slots))


def mask_sums(maps, rows: Rows, img, targets, coords, config, has_merged=True):
  """BCE and dice sums of the supervised rows against their targets.

  Args:
    maps: [P, h, w]: a one-to-one row holds its proposal's mask logits (sigmoid BCE +
      dice, Mask2Former); a merged row the map M_c (merge.merged_masks) of its class,
      a probability (BCE of the straight-through clip to [eps, 1 - eps], dice of the
      clip to [0, 1]; see module docstring).
    rows: supervised_rows. img, targets: the image's.
    coords: [P, K, 2] points of each row (importance-sampled in training).
    config: loss_config().
    has_merged: static; False skips the merged branch (tasks without merged targets).

  Returns:
    (sum of BCE, sum of dice) over the valid rows. Rows after the last valid one are
    not computed (points.point_row_sums: padding rows cost nothing, forward or backward).
  """
  terms = functools.partial(_mask_terms, config=config, has_merged=has_merged)
  num_valid = points_lib.num_needed(rows.valid)
  return points_lib.point_row_sums(
    terms, maps, coords, (rows.slot, rows.one_to_one, rows.valid), (img, targets), num_valid
  )


def _mask_terms(values, coords, row_args, shared, *, config, has_merged):
  """Per-row BCE and dice of sampled values (mask_sums' rows), 0 for rows not valid."""
  slot, one, valid = row_args
  img, targets = shared
  labels = merge_lib.point_labels(img, coords, config)
  tmask, tweight = merge_lib.slot_masks(labels, targets, slot)
  bce = sigmoid_bce_loss(values, tmask, tweight)
  dice = dice_loss(jax.nn.sigmoid(values), tmask, tweight)
  if has_merged:
    bce = jnp.where(one, bce, prob_bce_loss(values, tmask, tweight, config.merged_prob_eps))
    dice = jnp.where(one, dice, dice_loss(straight_through_clip(values, 0.0, 1.0), tmask, tweight))
  valid = valid.astype(jnp.float32)
  return valid * bce, valid * dice


def box_sums(mask_logits, matched, img, config, image_hw):
  """BoxInst sums of matched proposals: projection dice, pairwise loss and edge count."""
  mask_hw = mask_logits.shape[1:]
  cell_valid = merge_lib.mask_grid_valid(img["valid"], mask_hw)
  box_y, box_x = merge_lib.box_projections(img["seg_box"], image_hw, mask_hw)
  slot = jnp.maximum(matched, 0)
  is_matched = (matched >= 0).astype(jnp.float32)
  pred_y, pred_x = merge_lib.predicted_projections(mask_logits, cell_valid)
  proj = costs.projection_dice(pred_y, box_y[slot]) + costs.projection_dice(pred_x, box_x[slot])
  proj = jnp.sum(is_matched * proj)
  pair = pair_w = jnp.zeros((), jnp.float32)
  if config.box.pairwise_weight:
    size, dil = config.box.pairwise_size, config.box.pairwise_dilation
    sim = color_similarity(img["image"], cell_valid, size, dil)  # [E, h, w]
    edge = (sim >= config.box.pairwise_color_threshold).astype(jnp.float32)
    inside = box_y[slot][:, :, None] * box_x[slot][:, None, :]  # [Q, h, w]
    w = edge[None] * (inside * is_matched[:, None, None])[:, None]  # [Q, E, h, w]
    pair = jnp.sum(w * pairwise_log_same(mask_logits, size, dil))
    pair_w = jnp.sum(w)
  return proj, pair, pair_w


def _image_sums(task, class_logits, mask_logits, img, targets, vocab_valid, rng, config, image_hw):
  """Unnormalised loss sums of one image and one decoder layer."""
  rng_match, rng_points = jax.random.split(rng)
  asg = merge_lib.assign(
    task, class_logits, mask_logits, img, targets, vocab_valid, rng_match, config, image_hw
  )
  zero = jnp.zeros((), jnp.float32)
  out = dict(bce=zero, dice=zero, proj=zero, pair=zero, pair_w=zero)
  out["ce"], out["ce_w"] = class_loss(
    class_logits, asg.query_class, vocab_valid, config.background_weight, asg.class_weight
  )
  rows = supervised_rows(
    targets, asg.matched, num_rows(config, mask_logits.shape[0], targets.cls.shape[0], task)
  )
  out["dropped"] = rows.dropped
  maps = jnp.take(mask_logits, rows.query, axis=0)  # [P, h, w]
  if task == "boxes":
    out["proj"], out["pair"], out["pair_w"] = box_sums(
      maps, jnp.where(rows.valid, rows.slot, -1), img, config, image_hw
    )
    return out, asg
  has_merged = task in ("semantic", "panoptic") and config.semantic_merge == "soft_merge"
  uncertainty, flags = points_lib.logit_uncertainty, None
  if has_merged:
    probs = merge_lib.class_probs(class_logits, vocab_valid)
    merged = merge_lib.merged_masks(probs, mask_logits, jnp.take(targets.cls, rows.slot))
    maps = jnp.where(rows.one_to_one[:, None, None], maps, merged)
    uncertainty, flags = points_lib.logit_or_prob_uncertainty, rows.one_to_one
  # The padding rows (not valid, after the valid ones) are not sampled (num_valid).
  coords = points_lib.importance_points(
    rng_points,
    maps,
    num_points=config.num_points,
    oversample=config.oversample,
    importance_ratio=config.importance_ratio,
    uncertainty_fn=uncertainty,
    row_flags=flags,
    selection=config.point_selection,
    num_valid=jnp.sum(rows.valid),
  )  # [P, K, 2]
  out["bce"], out["dice"] = mask_sums(maps, rows, img, targets, coords, config, has_merged)
  return out, asg


def pixel_class_sums(pixel_logits, img, vocab_valid, config):
  """Auxiliary per-pixel CE of one image: (weighted sum of CE, sum of weights).

  pixel_logits [h, w, V+1] (stride 4); the label of a cell is the class of the segment at
  its centre pixel; void (-1), crowd and padding cells are ignored, as are cells of
  segments without a class (box-only data has no segment map: no labelled cell).
  config.pixel_class_balance: 'pixel' weighs every labelled cell 1; 'segment' weighs the
  cells of a segment 1 / (its number of labelled cells), so every segment counts once
  (the sum of weights is the number of segments): a small thing then counts as much as
  a large stuff region, as in the query class loss.
  """
  h, w = pixel_logits.shape[:2]
  yy, xx = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing="ij")
  coords = jnp.stack([yy, xx], -1).reshape(-1, 2)
  labels = merge_lib.point_labels(img, coords, config)
  keep = ((labels.cls >= 0) & (labels.merged_weight > 0)).astype(jnp.float32)
  logits = merge_lib.mask_vocab(pixel_logits.reshape(h * w, -1), vocab_valid)
  logp = jax.nn.log_softmax(logits, -1)
  ce = -jnp.take_along_axis(logp, jnp.maximum(labels.cls, 0)[:, None], axis=-1)[:, 0]
  if config.pixel_class_balance == "segment":
    num_slots = img["seg_class"].shape[0]
    seg = jnp.clip(labels.seg, 0, num_slots - 1)
    count = jax.ops.segment_sum(keep, seg, num_segments=num_slots)
    keep = keep / jnp.maximum(jnp.take(count, seg), 1.0)
  elif config.pixel_class_balance != "pixel":
    raise ValueError(
      f"unknown pixel_class_balance {config.pixel_class_balance!r}; allowed: 'pixel', 'segment'"
    )
  return jnp.sum(keep * ce), jnp.sum(keep)


def _batch_dict(batch):
  keys = ("image", "valid", "segment_map", "seg_class", "seg_box", "seg_is_crowd", "seg_valid")
  return {key: jnp.asarray(batch[key]) for key in keys}


def count_targets(batch, *, task, is_thing_vocab, config):
  """Number of target segments of the (global, under jit) batch and dropped boxes."""
  img = _batch_dict(batch)
  build = functools.partial(
    merge_lib.build_targets,
    task=task,
    is_thing_vocab=jnp.asarray(is_thing_vocab),
    semantic_merge=config.semantic_merge,
    drop_zero_area_boxes=config.box.drop_zero_area_boxes,
  )
  targets = jax.vmap(build)(img)
  num = jnp.sum(targets.one_to_one) + jnp.sum(targets.merged)
  return num.astype(jnp.float32), jnp.sum(targets.dropped).astype(jnp.float32), targets


def compute_loss(
  outputs,
  batch,
  *,
  task: str,
  vocab_valid,
  is_thing_vocab,
  config,
  rng,
  step=0,
  num_targets_global=None,
):
  """Total training loss and metrics for one batch of one task.

  Args:
    outputs: dict with 'class_logits' [L, B, Q, V+1] (index V = background) and
      'mask_logits' [L, B, Q, h, w] (stride 4 of the image).
    batch: schema.py batch: image [B, H, W, 3], valid [B, H, W], segment_map [B, H, W],
      seg_class / seg_box / seg_is_crowd / seg_valid [B, S, ...]; optional
      example_valid [B] (padding examples get no class loss).
    task: static 'panoptic' | 'semantic' | 'instance' | 'boxes'.
    vocab_valid: [V] bool. is_thing_vocab: [V] bool (dataset metadata).
    config: config.loss_config().
    rng: PRNG key (point sampling).
    step: training step (pairwise warm-up); may be traced.
    num_targets_global: optional override of the normaliser (see module docstring).

  Returns:
    (total_loss scalar, metrics dict of scalars): per-term losses summed over the
    supervised layers ('loss_class', ...), the same for the last layer ('last/...'),
    'num_targets', 'dropped_zero_area_boxes', 'dropped_mask_targets' (last layer, over the
    batch: targets beyond config.max_mask_targets, counted in the normaliser).
  """
  class_logits = jnp.asarray(outputs["class_logits"], jnp.float32)
  mask_logits = jnp.asarray(outputs["mask_logits"], jnp.float32)
  num_layers, bsz = class_logits.shape[:2]
  vocab_valid = jnp.asarray(vocab_valid, bool)
  img = _batch_dict(batch)
  image_hw = tuple(img["segment_map"].shape[1:3])
  num_targets, dropped, targets = count_targets(
    batch, task=task, is_thing_vocab=is_thing_vocab, config=config
  )
  if num_targets_global is not None:
    num_targets = jnp.asarray(num_targets_global, jnp.float32)
  norm = jnp.maximum(num_targets, 1.0)
  example_valid = jnp.asarray(batch.get("example_valid", jnp.ones((bsz,), bool)), jnp.float32)
  if config.box.pairwise_warmup_steps > 0:
    warmup = jnp.minimum(jnp.asarray(step, jnp.float32) / config.box.pairwise_warmup_steps, 1.0)
  else:
    warmup = jnp.float32(1.0)
  weights = dict(
    loss_class=config.class_weight,
    loss_mask_bce=config.mask_bce_weight,
    loss_dice=config.dice_weight,
    loss_projection=config.box.projection_weight,
    loss_pairwise=config.box.pairwise_weight * warmup,
  )
  one_image = functools.partial(
    _image_sums, task, vocab_valid=vocab_valid, config=config, image_hw=image_hw
  )
  per_image = jax.vmap(lambda c, m, i, t, r: one_image(c, m, i, t, rng=r))
  if not config.deep_supervision:
    class_logits, mask_logits = class_logits[-1:], mask_logits[-1:]
  layer_ids = jnp.arange(class_logits.shape[0]) + (num_layers - class_logits.shape[0])

  def layer_terms(args):
    # One decoder layer, re-matched; lax.map compiles the layer body once for all L.
    layer_class, layer_mask, layer = args
    rngs = jax.random.split(jax.random.fold_in(rng, layer), bsz)
    sums, _ = per_image(layer_class, layer_mask, img, targets, rngs)
    ce_w = jnp.sum(example_valid * sums["ce_w"])
    ce = jnp.sum(example_valid * sums["ce"])
    if config.class_normalization == "weighted_mean":
      loss_class = ce / jnp.maximum(ce_w, 1e-6)
    elif config.class_normalization == "num_targets":
      loss_class = ce / norm
    else:
      raise ValueError(f"unknown class_normalization {config.class_normalization!r}")
    return dict(
      dropped=jnp.sum(sums["dropped"]),
      loss_class=loss_class,
      loss_mask_bce=jnp.sum(sums["bce"]) / norm,
      loss_dice=jnp.sum(sums["dice"]) / norm,
      loss_projection=jnp.sum(sums["proj"]) / norm,
      loss_pairwise=jnp.sum(sums["pair"]) / jnp.maximum(jnp.sum(sums["pair_w"]), 1.0),
    )

  per_layer = jax.lax.map(layer_terms, (class_logits, mask_logits, layer_ids))
  total = sum(weights[name] * jnp.sum(per_layer[name]) for name in TERMS)
  metrics = {name: jnp.sum(per_layer[name]) for name in TERMS}
  last = {name: per_layer[name][-1] for name in TERMS}
  metrics.update({f"last/{name}": value for name, value in last.items()})
  metrics["num_targets"] = num_targets
  metrics["dropped_zero_area_boxes"] = dropped
  metrics["dropped_mask_targets"] = per_layer["dropped"][-1]
  if config.pixel_class_weight and "pixel_logits" in outputs and task != "boxes":
    ce, n = jax.vmap(functools.partial(pixel_class_sums, vocab_valid=vocab_valid, config=config))(
      jnp.asarray(outputs["pixel_logits"], jnp.float32), img
    )
    pixel = jnp.sum(example_valid * ce) / jnp.maximum(jnp.sum(example_valid * n), 1.0)
    total = total + config.pixel_class_weight * pixel
    metrics["loss_pixel_class"] = pixel
  metrics["total_loss"] = total
  return total, metrics
