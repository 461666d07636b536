"""Pixel decoders: deformable-attention core against a loop-based numpy reference,
and output shapes of both decoders."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataseg.model import layers
from dataseg.model import pixel_decoder


def _grid_sample_ref(value, x, y):
  """torch grid_sample(bilinear, zeros, align_corners=False) at one point.

  value [h, w, D]; (x, y) normalised in [0, 1] -> [D].
  """
  h, w, _ = value.shape
  px, py = x * w - 0.5, y * h - 0.5
  x0, y0 = int(np.floor(px)), int(np.floor(py))
  out = np.zeros(value.shape[-1])
  for yi in (y0, y0 + 1):
    for xi in (x0, x0 + 1):
      wgt = (1 - abs(px - xi)) * (1 - abs(py - yi))
      if 0 <= yi < h and 0 <= xi < w:
        out += wgt * value[yi, xi]
  return out


def _ms_deform_ref(value, shapes, loc, attn):
  b, _, m, d = value.shape
  _, lq, _, nl, p, _ = loc.shape
  starts = np.cumsum([0] + [h * w for h, w in shapes])
  out = np.zeros((b, lq, m, d))
  for bi in range(b):
    for q in range(lq):
      for mi in range(m):
        for li, (h, w) in enumerate(shapes):
          v = value[bi, starts[li] : starts[li + 1], mi].reshape(h, w, d)
          for pi in range(p):
            x, y = loc[bi, q, mi, li, pi]
            out[bi, q, mi] += attn[bi, q, mi, li, pi] * _grid_sample_ref(v, x, y)
  return out.reshape(b, lq, m * d)


# (dense_max_pixels, dense_max_elements) of ms_deform_attn_core: every level by the row
# gather, every level by the dense matmul, and a mix (the (1, 3) and (2, 2) levels dense).
PATHS = {"gather": (0, 0), "dense": (10**9, 10**9), "mixed": (4, 10**9)}


def _deform_inputs(seed=0):
  rng = np.random.default_rng(seed)
  shapes = ((3, 5), (2, 2), (1, 3))
  b, lq, m, d, p = 2, 4, 2, 3, 3
  s = sum(h * w for h, w in shapes)
  value = rng.normal(size=(b, s, m, d)).astype(np.float32)
  # Includes points outside [0, 1] to exercise the zero padding.
  loc = rng.uniform(-0.3, 1.3, size=(b, lq, m, len(shapes), p, 2)).astype(np.float32)
  attn = rng.uniform(size=(b, lq, m, len(shapes), p)).astype(np.float32)
  return shapes, value, loc, attn


@pytest.mark.parametrize("path", sorted(PATHS))
def test_ms_deform_attn_core_matches_numpy_reference(path):
  """Float32 sums of <= 36 products of O(1) values against float64: 1e-5 is rounding."""
  shapes, value, loc, attn = _deform_inputs()
  core = lambda v, loc, a: pixel_decoder.ms_deform_attn_core(v, shapes, loc, a, *PATHS[path])
  got = jax.jit(core)(value, loc, attn)
  np.testing.assert_allclose(got, _ms_deform_ref(value, shapes, loc, attn), rtol=1e-5, atol=1e-5)


def _ms_deform_gather_before(value, spatial_shapes, sampling_locations, attention_weights):
  """The formulation before the dense small-level path (commit 793e2b0), inlined: one
  gather of [B*M*S, D] rows for all levels and corners, then an einsum."""
  b, _, m, d = value.shape
  _, lq, _, num_levels, p, _ = sampling_locations.shape
  v = value.transpose(0, 2, 1, 3)
  loc = sampling_locations.astype(jnp.float32).transpose(0, 2, 1, 3, 4, 5)
  attn = attention_weights.astype(jnp.float32).transpose(0, 2, 1, 3, 4)
  hs = np.asarray([h for h, _ in spatial_shapes], np.float32)[:, None]
  ws = np.asarray([w for _, w in spatial_shapes], np.float32)[:, None]
  starts = np.cumsum([0] + [h * w for h, w in spatial_shapes[:-1]]).astype(np.int32)[:, None]
  x = loc[..., 0] * ws - 0.5
  y = loc[..., 1] * hs - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  idxs, wgts = [], []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi <= ws - 1) & (yi >= 0) & (yi <= hs - 1)
      idxs.append(
        starts + (jnp.clip(yi, 0, hs - 1) * ws + jnp.clip(xi, 0, ws - 1)).astype(jnp.int32)
      )
      wgts.append(jnp.where(inside, wx * wy, 0.0) * attn)
  k = num_levels * p * 4
  s = v.shape[2]
  offset = (jnp.arange(b * m, dtype=jnp.int32) * s).reshape(b, m, 1, 1)
  idx = (jnp.stack(idxs, -1).reshape(b, m, lq, k) + offset).reshape(-1)
  wgt = jnp.stack(wgts, -1).reshape(b, m, lq, k)
  g = jnp.take(v.reshape(b * m * s, d), idx, axis=0, mode="clip").reshape(b, m, lq, k, d)
  out = jnp.einsum("bmlk,bmlkd->bmld", wgt, g, precision=jax.lax.Precision.HIGHEST)
  return out.transpose(0, 2, 1, 3).reshape(b, lq, m * d)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_ms_deform_attn_core_gradients_match_the_gather_formulation(path):
  """Gradients w.r.t. values, locations and weights against the previous formulation
  (the same float32 products summed in another order: rtol/atol 1e-5 is rounding; a
  wrong corner, weight or padding changes entries by O(0.1))."""
  shapes, value, loc, attn = _deform_inputs(1)
  cot = np.random.default_rng(2).normal(size=(2, 4, 6)).astype(np.float32)

  def loss(core):
    return jax.jit(jax.grad(lambda v, loc, a: jnp.vdot(core(v, loc, a), cot), (0, 1, 2)))

  ours = loss(lambda v, loc, a: pixel_decoder.ms_deform_attn_core(v, shapes, loc, a, *PATHS[path]))
  before = loss(lambda v, loc, a: _ms_deform_gather_before(v, shapes, loc, a))
  for got, want in zip(ours(value, loc, attn), before(value, loc, attn)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ms_deform_attn_core_reads_pixel_centres_exactly():
  """At a pixel centre the bilinear sample is that pixel (hand-checked case)."""
  value = np.arange(12, dtype=np.float32).reshape(1, 12, 1, 1)  # one 3x4 level
  loc = np.array([(1.5 / 4, 2.5 / 3), (0.5 / 4, 0.5 / 3)], np.float32)
  loc = loc.reshape(1, 2, 1, 1, 1, 2)
  attn = np.ones((1, 2, 1, 1, 1), np.float32)
  got = pixel_decoder.ms_deform_attn_core(value, ((3, 4),), loc, attn)
  np.testing.assert_allclose(np.asarray(got)[0, :, 0], [2 * 4 + 1, 0.0])


def test_position_embedding_sine_formula():
  pos = np.asarray(layers.position_embedding_sine(3, 4, 8))
  assert pos.shape == (3, 4, 8)
  # y half: channel 0 = sin(y_norm), channel 1 = cos(y_norm / 10000**(2*1//2/4)).
  y = 2 / (3 + 1e-6) * 2 * np.pi  # row index 1 -> cumsum 2
  np.testing.assert_allclose(pos[1, 0, 0], np.sin(y), rtol=1e-5)
  np.testing.assert_allclose(pos[1, 0, 3], np.cos(y / 100.0), rtol=1e-5)
  x = 3 / (4 + 1e-6) * 2 * np.pi  # column index 2 -> sin(3*pi/2) = -1
  np.testing.assert_allclose(pos[0, 2, 4], np.sin(x), rtol=1e-5)
  np.testing.assert_allclose(pos[0, 2, 4], -1.0, rtol=1e-5)


def _features(b, h, w, channels):
  rng = np.random.default_rng(1)
  return {
    f"stride{s}": jnp.asarray(rng.normal(size=(b, h // s, w // s, c)), jnp.float32)
    for s, c in zip((4, 8, 16, 32), channels)
  }


@pytest.mark.parametrize("name", ["msdeform", "fpn"])
def test_pixel_decoder_shapes(name):
  import ml_collections  # pylint: disable=g-import-not-at-top

  cfg = ml_collections.ConfigDict(dict(name=name, dim=32, layers=2, heads=2, points=2, ffn=64))
  feats = _features(2, 64, 96, (8, 16, 24, 40))
  dec = pixel_decoder.build_pixel_decoder(cfg, jnp.float32, remat=True)
  # Traced only (the full model's compiled forward/backward in test_model.py
  # runs the msdeform numerics).
  (memory, mask_features), _ = jax.eval_shape(dec.init_with_output, jax.random.key(0), feats)
  assert [x.shape for x in memory] == [(2, 2, 3, 32), (2, 4, 6, 32), (2, 8, 12, 32)]
  assert mask_features.shape == (2, 16, 24, 32)


def test_ms_deform_attn_init_samples_around_reference_point():
  """Deformable DETR's init: zero offset/weight kernels, head h's points along
  direction 2*pi*h/heads at 1..P pixels, uniform attention weights."""
  heads, levels, points, dim = 4, 2, 2, 8
  attn = pixel_decoder.MSDeformAttn(dim, heads, levels, points)
  shapes = ((4, 4), (2, 2))
  q = jnp.ones((1, 3, dim))
  ref = jnp.full((1, 3, levels, 2), 0.5)
  params = jax.tree.map(
    np.asarray,
    nn.meta.unbox(attn.init(jax.random.key(0), q, ref, jnp.ones((1, 20, dim)), shapes)["params"]),
  )
  np.testing.assert_array_equal(params["sampling_offsets"]["kernel"], 0)
  np.testing.assert_array_equal(params["attention_weights"]["kernel"], 0)
  bias = params["sampling_offsets"]["bias"].reshape(heads, levels, points, 2)
  want = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32)  # 0,90,180,270
  for k in range(points):
    np.testing.assert_allclose(bias[:, 0, k], want * (k + 1), atol=1e-6)
    np.testing.assert_allclose(bias[:, 1, k], want * (k + 1), atol=1e-6)
