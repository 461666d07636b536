"""Masked attention against numpy references (including the empty-mask fallback)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dataseg.model import transformer_decoder as td


def _resize_bilinear_ref(x, out_h, out_w):
  """torch interpolate(bilinear, align_corners=False) of x [h, w]."""
  h, w = x.shape

  def taps(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0

  y0, y1, fy = taps(h, out_h)
  x0, x1, fx = taps(w, out_w)
  out = np.zeros((out_h, out_w))
  for i in range(out_h):
    for j in range(out_w):
      out[i, j] = (1 - fy[i]) * ((1 - fx[j]) * x[y0[i], x0[j]] + fx[j] * x[y0[i], x1[j]]) + fy[
        i
      ] * ((1 - fx[j]) * x[y1[i], x0[j]] + fx[j] * x[y1[i], x1[j]])
  return out


def _softmax_attention_ref(q, k, v, attend):
  """q [T, D], k/v [S, D], attend bool [T, S] (rows non-empty)."""
  logits = q @ k.T / np.sqrt(q.shape[-1])
  logits = np.where(attend, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v


def test_attention_mask_from_logits_matches_reference_and_falls_back():
  rng = np.random.default_rng(0)
  b, q, h4, w4 = 2, 3, 16, 8
  logits = rng.normal(size=(b, q, h4, w4)).astype(np.float32)
  logits[1, 2] = -1.0 - np.abs(logits[1, 2])  # empty mask: attends everywhere
  for size in ((4, 2), (2, 1), (8, 4)):
    got = np.asarray(td.attention_mask_from_logits(jnp.asarray(logits), size))
    assert got.shape == (b, q, size[0] * size[1])
    for bi in range(b):
      for qi in range(q):
        sig = 1 / (1 + np.exp(-_resize_bilinear_ref(logits[bi, qi], *size)))
        want = (sig >= 0.5).reshape(-1)
        if not want.any():
          want[:] = True
        np.testing.assert_array_equal(got[bi, qi], want)
    assert got[1, 2].all()


def test_masked_attention_matches_numpy_reference():
  rng = np.random.default_rng(1)
  b, t, s, n, d = 2, 4, 6, 2, 3
  q, k, v = (rng.normal(size=(b, x, n, d)).astype(np.float32) for x in (t, s, s))
  mask_logits = rng.normal(size=(b, t, 6, 1)).astype(np.float32)
  mask_logits[0, 1] = -5.0  # empty -> fallback to full attention
  attend = td.attention_mask_from_logits(jnp.asarray(mask_logits), (6, 1))
  got = np.asarray(td.masked_attention(q, k, v, attend))
  attend = np.asarray(attend)
  assert attend[0, 1].all()
  for bi in range(b):
    for hi in range(n):
      want = _softmax_attention_ref(q[bi, :, hi], k[bi, :, hi], v[bi, :, hi], attend[bi])
      np.testing.assert_allclose(got[bi, :, hi], want, rtol=1e-5, atol=1e-5)
  # Masked-out keys really are ignored: changing them changes nothing.
  v2 = v.copy()
  v2[0, ~attend[0, 0]] += 100.0
  got2 = np.asarray(td.masked_attention(q, k, v2, jnp.asarray(attend)))
  np.testing.assert_allclose(got2[0, 0], got[0, 0], rtol=1e-5, atol=1e-5)


def test_multi_head_attention_module_matches_numpy():
  rng = np.random.default_rng(2)
  dim, heads = 8, 2
  x = rng.normal(size=(1, 3, dim)).astype(np.float32)
  mem = rng.normal(size=(1, 5, dim)).astype(np.float32)
  attend = np.array([[[1, 1, 0, 0, 0], [0, 0, 0, 0, 1], [1] * 5]], bool)
  mha = td.MultiHeadAttention(dim, heads)
  params = nn.meta.unbox(jax.jit(mha.init)(jax.random.key(0), x, mem, mem, attend)["params"])
  p = {k: (np.asarray(v["kernel"]), np.asarray(v["bias"])) for k, v in params.items()}
  got = np.asarray(mha.apply({"params": params}, x, mem, mem, attend))

  def proj(a, name):
    w, bias = p[name]
    return a @ w + bias

  qh = proj(x[0], "q_proj").reshape(3, heads, dim // heads)
  kh = proj(mem[0], "k_proj").reshape(5, heads, dim // heads)
  vh = proj(mem[0], "v_proj").reshape(5, heads, dim // heads)
  o = np.concatenate(
    [_softmax_attention_ref(qh[:, h], kh[:, h], vh[:, h], attend[0]) for h in range(heads)], -1
  )
  np.testing.assert_allclose(got[0], proj(o, "out_proj"), rtol=1e-4, atol=1e-5)


def test_decoder_outputs_every_layer_and_first_prediction_ignores_memory():
  rng = np.random.default_rng(3)
  b, dim, q, layers = 1, 32, 5, 2
  memory = [jnp.asarray(rng.normal(size=(b, h, h, dim)), jnp.float32) for h in (2, 4, 8)]
  mask_features = jnp.asarray(rng.normal(size=(b, 16, 16, dim)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(4, 12)), jnp.float32)
  valid = jnp.array([True, True, True, False])
  dec = td.MaskedTransformerDecoder(
    num_queries=q, layers=layers, heads=2, ffn=64, dim=dim, text_dim=12, remat=True
  )
  variables = jax.jit(dec.init)(jax.random.key(0), memory, mask_features, text, valid)
  apply = jax.jit(dec.apply)
  cls, msk = apply(variables, memory, mask_features, text, valid)
  assert cls.shape == (layers + 1, b, q, 5) and cls.dtype == jnp.float32
  assert msk.shape == (layers + 1, b, q, 16, 16)
  np.testing.assert_array_equal(np.asarray(cls)[..., 3], -1e9)
  memory2 = [m + 1.0 for m in memory]
  cls2, msk2 = apply(variables, memory2, mask_features, text, valid)
  np.testing.assert_allclose(cls2[0], cls[0], rtol=1e-6)
  np.testing.assert_allclose(msk2[0], msk[0], rtol=1e-6)
  assert np.abs(np.asarray(msk2[-1] - msk[-1])).max() > 1e-3


def test_mask_pool_weights_are_the_dilated_stopped_mask():
  """With mask_pool, a class logit depends on the mask features only through their mean
  under the proposal's dilated sigmoid mask: its gradient at pixel p is m_dil(p) / sum m_dil
  times one vector (m_dil: 3x3 max-pool of sigmoid(mask logits), numpy reference)."""
  b, q, h, w, c, v, d = 1, 3, 6, 7, 8, 4, 16
  r = np.random.RandomState(0)
  queries = jnp.asarray(r.randn(b, q, c), jnp.float32)
  feats = jnp.asarray(r.randn(b, h, w, c), jnp.float32)
  text = jnp.asarray(r.randn(v, d), jnp.float32)
  valid = jnp.ones((v,), bool)
  head = td.PredictionHead(c, d, 10.0, 100.0, jnp.float32, True)
  params = head.init(jax.random.PRNGKey(0), queries, feats, text, valid)
  _, mask_logits = head.apply(params, queries, feats, text, valid)
  m = 1.0 / (1.0 + np.exp(-np.asarray(mask_logits, np.float64)))
  pad = np.pad(m, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  dil = np.max([pad[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], 0)
  for query in range(q):
    # Only the pooling path: the mask logits (and so the weights) are held fixed.
    def logit(f):
      return head.apply(params, queries, f, text, valid)[0][0, query, 1]

    grad = np.asarray(jax.grad(logit)(feats))[0]  # [h, w, c]
    # Weights stopped: d logit / d f(p) = m_dil(p) / sum m_dil * g for one vector g.
    ratio = grad / dil[0, query][..., None]
    g = ratio.reshape(-1, c)
    np.testing.assert_allclose(g, np.broadcast_to(g[0], g.shape), rtol=2e-3, atol=1e-6)
  plain = td.PredictionHead(c, d, 10.0, 100.0, jnp.float32, False)
  p2 = plain.init(jax.random.PRNGKey(0), queries, feats, text, valid)
  grad = jax.grad(lambda f: plain.apply(p2, queries, f, text, valid)[0].sum())(feats)
  assert float(jnp.max(jnp.abs(grad))) == 0.0  # without it, no path from features to class.


def _box_crop_ref(logits, grid):
  """numpy: bilinear samples of `logits` [h, w] at the centres of a grid x grid split of the
  extent of its cells > 0 (the whole map if none), and that box / (h, w, h, w)."""
  h, w = logits.shape
  ys, xs = np.nonzero(logits > 0)
  y0, y1, x0, x1 = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) if len(ys) else (0, h, 0, w)
  out = np.zeros((grid, grid))
  for i in range(grid):
    cy = np.clip(y0 + (i + 0.5) * (y1 - y0) / grid - 0.5, 0, h - 1)
    for j in range(grid):
      cx = np.clip(x0 + (j + 0.5) * (x1 - x0) / grid - 0.5, 0, w - 1)
      iy, ix = int(np.floor(cy)), int(np.floor(cx))
      fy, fx = cy - iy, cx - ix
      iy1, ix1 = min(iy + 1, h - 1), min(ix + 1, w - 1)
      out[i, j] = (1 - fy) * ((1 - fx) * logits[iy, ix] + fx * logits[iy, ix1]) + fy * (
        (1 - fx) * logits[iy1, ix] + fx * logits[iy1, ix1]
      )
  return out, np.array([y0 / h, x0 / w, y1 / h, x1 / w])


def test_mask_box_crops_match_numpy_reference():
  """Random logits with a positive blob per row, one empty mask; float32 matmuls against a
  float64 loop: rtol/atol 1e-5."""
  r = np.random.RandomState(0)
  b, q, h, w, g = 2, 3, 13, 11, 6
  logits = -np.abs(r.randn(b, q, h, w)).astype(np.float32) - 0.1
  logits[0, 0, 2:9, 3:7] += 3.0
  logits[0, 1, 5:6, 0:11] += 3.0  # a one-row band over the full width.
  logits[1, 0, 10:13, 8:11] += 3.0  # touching the bottom-right corner.
  logits[1, 1] = r.randn(h, w)  # scattered positives.
  # logits[0, 2] and logits[1, 2] stay all negative: empty masks -> the whole map.
  crops, boxes = td.mask_box_crops(jnp.asarray(logits), g)
  for i, j in np.ndindex(b, q):
    ref_crop, ref_box = _box_crop_ref(logits[i, j].astype(np.float64), g)
    np.testing.assert_allclose(np.asarray(crops[i, j]), ref_crop, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(boxes[i, j]), ref_box, rtol=1e-6)


def test_mask_box_crops_see_the_outline_at_any_scale_and_position():
  """The same binary square drawn at two sizes and places gives the same all-inside crop; a
  triangle (apex up) gives an upper row narrower than its lower row."""
  h = w = 32
  m = np.full((1, 3, h, w), -4.0, np.float32)
  m[0, 0, 2:6, 3:7] = 4.0
  m[0, 1, 10:26, 12:28] = 4.0
  yy, xx = np.mgrid[0:h, 0:w]
  m[0, 2] = np.where((yy >= 8) & (yy < 24) & (np.abs(xx - 16) <= (yy - 8) / 2), 4.0, -4.0)
  crops = np.asarray(td.mask_box_crops(jnp.asarray(m), 8)[0])
  assert (crops[0, 0] > 0).all() and (crops[0, 1] > 0).all()
  tri = crops[0, 2] > 0
  assert tri[0].sum() < tri[-1].sum()


def test_mask_shape_feature_uses_the_stopped_mask_only():
  """With mask_shape the class logits change with the mask features (through the mask's
  shape) but have no gradient to them: the class loss cannot reshape the masks."""
  b, q, h, w, c, v, d = 1, 3, 8, 8, 8, 4, 16
  r = np.random.RandomState(1)
  queries = jnp.asarray(r.randn(b, q, c), jnp.float32)
  feats = jnp.asarray(r.randn(b, h, w, c), jnp.float32)
  text = jnp.asarray(r.randn(v, d), jnp.float32)
  valid = jnp.ones((v,), bool)
  head = td.PredictionHead(c, d, 10.0, 100.0, jnp.float32, False, 4)
  params = head.init(jax.random.PRNGKey(0), queries, feats, text, valid)
  assert "mask_shape_0" in params["params"] and "mask_shape_1" in params["params"]
  cls = head.apply(params, queries, feats, text, valid)[0]
  cls2 = head.apply(params, queries, feats * 2.0 + 0.5, text, valid)[0]
  assert float(jnp.max(jnp.abs(cls2 - cls))) > 1e-3
  grad = jax.grad(lambda f: head.apply(params, queries, f, text, valid)[0].sum())(feats)
  assert float(jnp.max(jnp.abs(grad))) == 0.0
