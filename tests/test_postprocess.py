"""Post-processing with hand-built proposals whose answer is known, and numpy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dataseg.objective import config as config_lib
from dataseg.objective import postprocess as pp

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
V = 4
IS_THING = np.array([True, True, False, False])  # 0, 1 things; 2, 3 stuff
BIG = 12.0


def proposal(cls, prob, region, hw=(8, 8)):
  """Class logits giving `prob` to `cls` (rest spread), mask logits +BIG in region."""
  logits = np.full(V + 1, 0.0)
  # p(cls) = e^a / (e^a + V) with the other V entries at 0.
  logits[cls] = np.log(prob * V / (1 - prob))
  mask = np.full(hw, -BIG)
  mask[region] = BIG
  return logits, mask


def stack(props):
  cl, ml = zip(*props)
  return jnp.asarray(np.stack(cl), jnp.float32), jnp.asarray(np.stack(ml), jnp.float32)


def panoptic(cl, ml, vocab_valid=np.ones(V, bool)):
  c = config_lib.loss_config().post
  fn = functools.partial(
    pp.panoptic_inference,
    score_threshold=c.score_threshold,
    overlap_threshold=c.overlap_threshold,
    mask_threshold=c.mask_threshold,
  )
  return jax.jit(fn, compiler_options=FAST)(cl, ml, jnp.asarray(vocab_valid), jnp.asarray(IS_THING))


def test_panoptic_overlapping_things_stuff_merge_low_score():
  cl, ml = stack(
    [
      proposal(0, 0.95, np.s_[0:5, 0:5]),  # thing A
      proposal(1, 0.97, np.s_[3:8, 3:8]),  # thing B, wins the overlap (higher score)
      proposal(2, 0.90, np.s_[0:3, 5:8]),  # stuff class 2, part 1
      proposal(2, 0.92, np.s_[6:8, 0:3]),  # stuff class 2, part 2 -> same segment
      proposal(3, 0.50, np.s_[:, :]),  # low score: must vanish
    ]
  )
  seg, cls, thing, score, valid = map(np.asarray, panoptic(cl, ml))
  want = np.full((8, 8), -1)
  want[0:5, 0:5] = 0
  want[3:8, 3:8] = 1
  want[0:3, 5:8] = 2
  want[6:8, 0:3] = 2  # merged into the segment led by proposal 2
  np.testing.assert_array_equal(seg, want)
  assert np.sum(seg == -1) == 3  # row 5, cols 0..2: only the vanished proposal covers it
  np.testing.assert_array_equal(valid, [True, True, True, False, False])
  np.testing.assert_array_equal(cls, [0, 1, 2, -1, -1])
  np.testing.assert_array_equal(thing, [True, True, False, False, False])
  np.testing.assert_allclose(score[:3], [0.95, 0.97, 0.90], atol=1e-4)
  assert 3 not in cls and 4 not in seg


def test_panoptic_drops_segment_below_overlap_threshold():
  cl, ml = stack(
    [
      proposal(0, 0.99, np.s_[:, 0:4]),
      proposal(1, 0.90, np.s_[:, :]),  # keeps 32 of its 64 pixels: 0.5 < 0.8
    ]
  )
  seg, cls, _, _, valid = map(np.asarray, panoptic(cl, ml))
  want = np.full((8, 8), -1)
  want[:, 0:4] = 0
  np.testing.assert_array_equal(seg, want)
  np.testing.assert_array_equal(valid, [True, False])
  # Without anything kept, everything is void.
  cl, ml = stack([proposal(0, 0.5, np.s_[:, :]), proposal(1, 0.6, np.s_[:, :])])
  seg, _, _, _, valid = map(np.asarray, panoptic(cl, ml))
  assert np.all(seg == -1) and not valid.any()


def np_semantic(cl, ml, vocab_valid):
  logits = np.where(np.append(vocab_valid, True), cl, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  sem = np.einsum("qc,qhw->chw", p[:, :-1], 1 / (1 + np.exp(-ml)))
  sem[~vocab_valid] = -1
  return sem.argmax(0)


def test_semantic_labels_thing_classes_and_skips_padding():
  # A semantic-only dataset still has a thing class (0): semantic inference labels it.
  cl, ml = stack(
    [
      proposal(0, 0.9, np.s_[0:4, :]),
      proposal(2, 0.9, np.s_[4:8, :]),
      proposal(3, 0.3, np.s_[:, :]),  # low score still takes part in the sum
    ]
  )
  cl = cl.at[:, 1].set(30.0)  # padded vocabulary entry: never predicted
  vocab_valid = np.array([True, False, True, True])
  out = np.asarray(
    jax.jit(pp.semantic_inference, compiler_options=FAST)(cl, ml, jnp.asarray(vocab_valid))
  )
  want = np.zeros((8, 8), int)
  want[4:] = 2
  np.testing.assert_array_equal(out, want)
  r = np.random.RandomState(0)
  cl, ml = r.randn(6, V + 1) * 2, r.randn(6, 5, 7) * 3
  np.testing.assert_array_equal(
    pp.semantic_inference(jnp.asarray(cl), jnp.asarray(ml), jnp.asarray(vocab_valid)),
    np_semantic(cl, ml, vocab_valid),
  )


def test_instance_inference_matches_mask2former_formula():
  r = np.random.RandomState(1)
  q = 5
  cl, ml = r.randn(q, V + 1) * 2, r.randn(q, 6, 6) * 3
  vocab_valid = np.array([True, False, True, True])
  masks, classes, scores = map(
    np.asarray,
    jax.jit(functools.partial(pp.instance_inference, top_k=4), compiler_options=FAST)(
      jnp.asarray(cl), jnp.asarray(ml), jnp.asarray(vocab_valid), jnp.asarray(IS_THING)
    ),
  )
  logits = np.where(np.append(vocab_valid, True), cl, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  pairs = [
    (p[i, c], i, c) for i in range(q) for c in range(V) if vocab_valid[c] and IS_THING[c]
  ]  # only class 0 qualifies here
  pairs.sort(reverse=True)
  assert list(classes) == [0] * 4
  for k, (prob, i, c) in enumerate(pairs[:4]):
    m = ml[i] > 0
    mean = (1 / (1 + np.exp(-ml[i])) * m).sum() / (m.sum() + 1e-6)
    np.testing.assert_array_equal(masks[k], m)
    np.testing.assert_allclose(scores[k], prob * mean, rtol=1e-5)
  # Fewer thing pairs than k: the rest is marked invalid.
  masks, classes, scores = map(
    np.asarray,
    pp.instance_inference(
      jnp.asarray(cl), jnp.asarray(ml), jnp.asarray(vocab_valid), jnp.asarray(IS_THING), top_k=8
    ),
  )
  assert list(classes[5:]) == [-1] * 3 and np.all(scores[5:] == 0) and not masks[5:].any()


def test_resize_to_image_and_crop():
  r = np.random.RandomState(2)
  ml = jnp.asarray(r.randn(3, 4, 4), jnp.float32)
  full = pp.resize_to_image(ml, (16, 16))
  np.testing.assert_allclose(full, jax.image.resize(ml, (3, 16, 16), "linear"), atol=1e-5)
  valid = np.zeros((16, 16), bool)
  valid[:8, :12] = True
  extent = pp.valid_extent(jnp.asarray(valid))
  np.testing.assert_array_equal(extent, [8, 12])
  # Cropping the valid 8x12 region and resizing it to its own size = crop of the full.
  crop = jax.jit(
    functools.partial(pp.resize_to_image, image_hw=(16, 16), out_hw=(8, 12)), compiler_options=FAST
  )(ml, valid_hw=extent)
  np.testing.assert_allclose(crop, np.asarray(full)[:, :8, :12], atol=1e-5)


def np_mask2former_panoptic(cl, ml, score_threshold, overlap_threshold, mask_threshold=0.5):
  """Mask2Former's panoptic_inference (data-dependent loop, as in its repository), numpy.

  Returns (segment ids [h, w], 0 = void, 1.. in order of creation; {id: class}).
  """
  p = np.exp(cl - cl.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  scores, labels = p.max(-1), p.argmax(-1)
  keep = (labels != V) & (scores > score_threshold)
  masks = 1 / (1 + np.exp(-ml[keep]))
  cur_scores, cur_classes = scores[keep], labels[keep]
  seg = np.zeros(ml.shape[1:], int)
  classes, stuff_memory, current = {}, {}, 0
  if not keep.any():
    return seg, classes
  ids = (cur_scores[:, None, None] * masks).argmax(0)
  for k, c in enumerate(cur_classes):
    mask_area = (ids == k).sum()
    original_area = (masks[k] >= mask_threshold).sum()
    mask = (ids == k) & (masks[k] >= mask_threshold)
    if mask_area > 0 and original_area > 0 and mask.sum() > 0:
      if mask_area / original_area < overlap_threshold:
        continue
      if not IS_THING[c]:
        if c in stuff_memory:
          seg[mask] = stuff_memory[c]
          continue
        stuff_memory[c] = current + 1
      current += 1
      seg[mask] = current
      classes[current] = int(c)
  return seg, classes


def assert_same_panoptic(out, ref):
  """Ours (slot map, -1 void) and the reference (ids, 0 void): same partition and classes."""
  seg, cls = np.asarray(out[0]), np.asarray(out[1])
  ref_seg, ref_classes = ref
  np.testing.assert_array_equal(seg == -1, ref_seg == 0)
  pairs = {(int(a), int(b)) for a, b in zip(seg[seg >= 0], ref_seg[ref_seg > 0])}
  assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}), pairs
  for slot, rid in pairs:
    assert cls[slot] == ref_classes[rid]
  assert sorted(ref_classes) == sorted(rid for _, rid in pairs)  # no empty segment


def things_over_stuff(thing_probs, stuff_prob=0.9, stuff_logit_on_things=2.0):
  """Two small things (2x2, 2x3) on one stuff region covering the whole 8x8 image.

  The stuff proposal's mask is confident everywhere but less so on the things (logit
  `stuff_logit_on_things`), as a trained stuff mask is; the things' masks are sure.
  """
  props = [
    proposal(0, thing_probs[0], np.s_[1:3, 1:3]),
    proposal(1, thing_probs[1], np.s_[5:7, 4:7]),
    proposal(2, stuff_prob, np.s_[:, :]),
  ]
  cl, ml = stack(props)
  ml = np.asarray(ml).copy()
  ml[2, 1:3, 1:3] = ml[2, 5:7, 4:7] = stuff_logit_on_things
  return cl, jnp.asarray(ml)


def test_panoptic_keeps_confident_small_things_over_stuff():
  """The overlap filter, the stuff-vs-thing pixel competition and the score threshold
  keep confident things that cover a small part of a confident stuff region."""
  for threshold in (0.5, config_lib.loss_config().post.score_threshold):  # demo, default
    cl, ml = things_over_stuff((0.85, 0.95))
    out = jax.jit(
      functools.partial(
        pp.panoptic_inference, score_threshold=threshold, overlap_threshold=0.8, mask_threshold=0.5
      ),
      compiler_options=FAST,
    )(cl, ml, jnp.ones(V, bool), jnp.asarray(IS_THING))
    seg, cls, thing, score, valid = map(np.asarray, out)
    want = np.full((8, 8), 2)
    want[1:3, 1:3] = 0
    want[5:7, 4:7] = 1
    np.testing.assert_array_equal(seg, want)
    np.testing.assert_array_equal(cls, [0, 1, 2])
    np.testing.assert_array_equal(thing, [True, True, False])
    np.testing.assert_allclose(score, [0.85, 0.95, 0.9], atol=1e-4)
    # Stuff keeps 54 of its 64 pixels (0.84 >= 0.8): it is not dropped either.
    assert_same_panoptic(
      out, np_mask2former_panoptic(np.asarray(cl), np.asarray(ml), threshold, 0.8)
    )


def test_panoptic_drops_low_confidence_thing():
  """A thing below the score threshold vanishes; its pixels go to the stuff under it."""
  cl, ml = things_over_stuff((0.85, 0.4))
  out = jax.jit(
    functools.partial(
      pp.panoptic_inference, score_threshold=0.5, overlap_threshold=0.8, mask_threshold=0.5
    ),
    compiler_options=FAST,
  )(cl, ml, jnp.ones(V, bool), jnp.asarray(IS_THING))
  seg, cls, thing, _, valid = map(np.asarray, out)
  want = np.full((8, 8), 2)
  want[1:3, 1:3] = 0
  np.testing.assert_array_equal(seg, want)
  np.testing.assert_array_equal(valid, [True, False, True])
  np.testing.assert_array_equal(cls, [0, -1, 2])
  assert_same_panoptic(out, np_mask2former_panoptic(np.asarray(cl), np.asarray(ml), 0.5, 0.8))


def test_panoptic_matches_mask2former_loop_on_random_proposals():
  """Random proposals against the loop reference. Cases with a near tie (< 1e-3) in the
  pixel argmax, at the mask or score threshold are skipped, and the overlap threshold is
  0.79, which no area ratio k/n (n <= 36 pixels) is within 1e-4 of, so float32 here vs
  float64 there cannot change a decision."""
  r = np.random.RandomState(4)
  checked = 0
  for _ in range(20):
    q = 6
    cl = r.randn(q, V + 1) * 3
    cl[:, V] -= 2.0  # fewer background proposals: more segments to compare
    ml = r.randn(q, 6, 6) * 4
    p = np.exp(cl - cl.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    prob_masks = np.sort(p.max(-1)[:, None, None] / (1 + np.exp(-ml)), axis=0)
    if (
      np.any(prob_masks[-1] - prob_masks[-2] < 1e-3)
      or np.any(np.abs(1 / (1 + np.exp(-ml)) - 0.5) < 1e-3)
      or np.any(np.abs(p.max(-1) - 0.5) < 1e-3)
    ):
      continue
    out = pp.panoptic_inference(
      jnp.asarray(cl, jnp.float32),
      jnp.asarray(ml, jnp.float32),
      jnp.ones(V, bool),
      jnp.asarray(IS_THING),
      0.5,
      0.79,
      0.5,
    )
    assert_same_panoptic(out, np_mask2former_panoptic(cl, ml, 0.5, 0.79))
    checked += 1
  assert checked >= 10
