"""Inference-time post-processing of the proposals, per task, at fixed shapes (jit-able).

Design note. [paper]: each task has its own post-processing of the shared proposals.
[ours] (METHOD.md section 2): Mask2Former's three post-processing steps, rewritten without
data-dependent shapes:
  * semantic: argmax_c sum_i p_i(c) sigmoid(m_i) over the valid vocabulary (the background
    column is dropped after the softmax), for any class, thing or stuff.
  * panoptic: keep non-background proposals with max class prob > score_threshold; pixels
    go to argmax_i p_i sigmoid(m_i) over kept proposals; a pixel is painted only where the
    winner's own mask >= mask_threshold; a segment is dropped when (pixels it wins) /
    (its own mask area) < overlap_threshold; stuff proposals of one class share one
    segment. The segment table has one slot per proposal: slot i is the segment led by
    proposal i (for merged stuff, the lowest-index proposal of the class).
  * instance: top-k (proposal, class) pairs over thing classes of the valid vocabulary;
    mask = logit > 0; score = class prob x mean mask prob inside the mask.
Thresholds come from config.loss_config().post.
"""

import jax
import jax.numpy as jnp

NEG = -1e9


def class_probs(class_logits: jax.Array, vocab_valid: jax.Array) -> jax.Array:
  """[..., V+1] softmax over valid vocabulary + background (padded entries -> 0)."""
  keep = jnp.concatenate([jnp.asarray(vocab_valid, bool), jnp.ones((1,), bool)])
  return jax.nn.softmax(jnp.where(keep, class_logits, NEG), axis=-1)


def semantic_inference(class_logits, mask_logits, vocab_valid):
  """[Q, V+1], [Q, h, w], [V] -> [h, w] int32 class map (argmax of merged class maps)."""
  probs = class_probs(class_logits, vocab_valid)[:, :-1]
  sem = jnp.einsum("qc,qhw->chw", probs, jax.nn.sigmoid(mask_logits))
  sem = jnp.where(jnp.asarray(vocab_valid, bool)[:, None, None], sem, -1.0)
  return jnp.argmax(sem, axis=0).astype(jnp.int32)


def panoptic_inference(
  class_logits,
  mask_logits,
  vocab_valid,
  is_thing_vocab,
  score_threshold=0.8,
  overlap_threshold=0.8,
  mask_threshold=0.5,
):
  """Mask2Former's panoptic_inference at fixed shapes.

  Args:
    class_logits: [Q, V+1]. mask_logits: [Q, h, w]. vocab_valid, is_thing_vocab: [V].
    score_threshold, overlap_threshold, mask_threshold: see module docstring.

  Returns:
    segment_map [h, w] int32 (slot index, -1 void), seg_class [Q] int32 (-1 unused),
    seg_is_thing [Q] bool, seg_score [Q] float32, seg_valid [Q] bool.
  """
  q = class_logits.shape[0]
  probs = class_probs(class_logits, vocab_valid)
  background = probs.shape[-1] - 1
  scores = jnp.max(probs, -1)
  labels = jnp.argmax(probs, -1).astype(jnp.int32)
  keep = (labels != background) & (scores > score_threshold)
  masks = jax.nn.sigmoid(mask_logits)
  prob_masks = jnp.where(keep[:, None, None], scores[:, None, None] * masks, -1.0)
  ids = jnp.argmax(prob_masks, axis=0)  # [h, w]
  any_keep = jnp.any(keep)
  won = (ids[None] == jnp.arange(q)[:, None, None]) & any_keep  # [Q, h, w]
  own = masks >= mask_threshold
  mask_area = jnp.sum(won, (1, 2))
  orig_area = jnp.sum(own, (1, 2))
  painted = jnp.sum(won & own, (1, 2))
  ok = (
    keep
    & (mask_area > 0)
    & (orig_area > 0)
    & (painted > 0)
    & (mask_area >= overlap_threshold * orig_area)
  )
  safe_labels = jnp.minimum(labels, background - 1)
  thing = jnp.take(jnp.asarray(is_thing_vocab, bool), safe_labels)
  stuff_ok = ok & ~thing
  same = stuff_ok[:, None] & stuff_ok[None, :] & (labels[:, None] == labels[None, :])  # [Q, Q]
  first = jnp.argmax(same, axis=1)  # lowest same-class stuff
  leader = jnp.where(stuff_ok, first, jnp.arange(q)).astype(jnp.int32)
  pix_ok = jnp.take(ok, ids) & jnp.take_along_axis(own, ids[None], 0)[0] & any_keep
  segment_map = jnp.where(pix_ok, jnp.take(leader, ids), -1).astype(jnp.int32)
  seg_valid = ok & (leader == jnp.arange(q))
  seg_class = jnp.where(seg_valid, labels, -1).astype(jnp.int32)
  return (
    segment_map,
    seg_class,
    seg_valid & thing,
    jnp.where(seg_valid, scores, 0.0).astype(jnp.float32),
    seg_valid,
  )


def instance_inference(class_logits, mask_logits, vocab_valid, is_thing_vocab, top_k=100):
  """Mask2Former's instance_inference restricted to thing classes.

  Args:
    class_logits: [Q, V+1]. mask_logits: [Q, h, w]. vocab_valid, is_thing_vocab: [V].
    top_k: K (static), at most Q * V.

  Returns:
    masks [K, h, w] bool, classes [K] int32 (-1 where fewer than K thing pairs exist),
    scores [K] float32 (0 there).
  """
  q, v1 = class_logits.shape
  v = v1 - 1
  probs = class_probs(class_logits, vocab_valid)[:, :-1]
  allowed = jnp.asarray(vocab_valid, bool) & jnp.asarray(is_thing_vocab, bool)
  flat = jnp.where(allowed[None], probs, -1.0).reshape(-1)
  k = min(top_k, q * v)
  top, idx = jax.lax.top_k(flat, k)
  query, cls = idx // v, idx % v
  valid = top >= 0.0
  logits = mask_logits[query]
  masks = logits > 0.0
  mprob = jax.nn.sigmoid(logits)
  mask_score = jnp.sum(mprob * masks, (1, 2)) / (jnp.sum(masks, (1, 2)) + 1e-6)
  scores = jnp.where(valid, top * mask_score, 0.0).astype(jnp.float32)
  return masks & valid[:, None, None], jnp.where(valid, cls, -1).astype(jnp.int32), scores


def valid_extent(valid: jax.Array) -> jax.Array:
  """[H, W] bool -> [2] int32 (height, width) of the top-left valid region."""
  return jnp.stack([jnp.sum(jnp.any(valid, 1)), jnp.sum(jnp.any(valid, 0))]).astype(jnp.int32)


def resize_to_image(mask_logits, image_hw, valid_hw=None, out_hw=None):
  """Bilinear (align_corners=False) resize of mask logits, cropping away padding.

  The [Q, h, w] logits cover the padded image [H, W] = image_hw. The valid region
  [0, vh) x [0, vw) (image pixels, may be traced) is resampled to the static `out_hw`
  (default image_hw); with valid_hw None it is the whole image. Mask2Former upsamples to
  the padded size, crops, then resizes to the original size; ours does this in one
  bilinear resampling (jax.image.scale_and_translate), which keeps shapes static.

  Returns:
    [Q, *out_hw] float32.
  """
  q, h, w = mask_logits.shape
  out_hw = tuple(out_hw or image_hw)
  if valid_hw is None:
    valid_hw = jnp.asarray(image_hw, jnp.float32)
  stride = jnp.asarray([image_hw[0] / h, image_hw[1] / w], jnp.float32)
  extent = jnp.asarray(valid_hw, jnp.float32) / stride  # valid region, mask cells
  scale = jnp.asarray(out_hw, jnp.float32) / extent
  return jax.image.scale_and_translate(
    mask_logits.astype(jnp.float32),
    (q, *out_hw),
    (1, 2),
    scale,
    jnp.zeros((2,), jnp.float32),
    method="linear",
    antialias=False,
  )
