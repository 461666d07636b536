"""Pixel decoders: backbone features -> multi-scale memory + per-pixel mask features.

Two choices, picked by `config.pixel_decoder.name`:

* `msdeform` (Mask2Former's `MSDeformAttnPixelDecoder`): a 6-layer multi-scale
  deformable-attention encoder over strides 8/16/32, then FPN-style lateral fusion
  down to stride 4 and a 1x1 mask-feature projection. The deformable sampling is
  written in pure JAX (bilinear sampling with gathers, or matmuls on small levels, zero padding,
  `align_corners=False`, exactly like `grid_sample` inside `MSDeformAttn`'s
  PyTorch reference), so it runs on any backend and shards like any other op.
* `fpn`: a light top-down FPN (Mask2Former's `BasePixelDecoder`) for CPU runs.

Both return `(memory, mask_features)`:
  memory         list of 3 [B, h_i, w_i, dim], strides 32, 16, 8 in that order
                 (the order the transformer decoder cycles over).
  mask_features  [B, H/4, W/4, dim].
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dataseg.model import layers

Dtype = Any
_zeros = nn.initializers.zeros


# ---------------------------------------------------------------------------
# Multi-scale deformable attention.
# ---------------------------------------------------------------------------


# Levels of at most this many pixels whose dense [B, M, Lq, h*w] interpolation matrix has
# at most DENSE_MAX_ELEMENTS entries are sampled by a matmul (see ms_deform_attn_core).
DENSE_MAX_PIXELS = 256
DENSE_MAX_ELEMENTS = 2**25


def _bilinear_corners(loc, attn, h, w):
  """Corner pixels and weights of bilinear sampling on one h x w level.

  loc [..., P, 2] (x, y) in [0, 1] (pixel centres at (i + 0.5) / size); attn [..., P].
  Returns int32 in-level pixel indices y * w + x (clipped into the level) and float32
  weights attn * bilinear weight, zero for corners outside the level (zero padding),
  both [..., P * 4] (corner-minor).
  """
  x = loc[..., 0] * w - 0.5
  y = loc[..., 1] * h - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  idxs, wgts = [], []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      xi, yi = x0 + dx, y0 + dy
      inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
      idxs.append((jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32))
      wgts.append(jnp.where(inside, wx * wy, 0.0) * attn)
  shape = idxs[0].shape[:-1] + (-1,)
  return jnp.stack(idxs, -1).reshape(shape), jnp.stack(wgts, -1).reshape(shape)


def ms_deform_attn_core(
  value: jnp.ndarray,
  spatial_shapes: Sequence[tuple[int, int]],
  sampling_locations: jnp.ndarray,
  attention_weights: jnp.ndarray,
  dense_max_pixels: int = DENSE_MAX_PIXELS,
  dense_max_elements: int = DENSE_MAX_ELEMENTS,
) -> jnp.ndarray:
  """Pure-JAX `ms_deform_attn_core_pytorch`.

  Args:
    value: [B, S, M, D] values of all levels, flattened row-major per level and
      concatenated (S = sum h_l * w_l); M heads of width D.
    spatial_shapes: static ((h_0, w_0), ...) for the L levels.
    sampling_locations: [B, Lq, M, L, P, 2] (x, y) normalised to [0, 1] per level;
      pixel centres sit at (i + 0.5) / size (align_corners=False).
    attention_weights: [B, Lq, M, L, P], normalised over (L, P).
    dense_max_pixels, dense_max_elements: which levels are sampled by a matmul (below).
  Returns:
    [B, Lq, M * D]. Samples outside the map read zeros (zero padding).

  Two ways to the same sums, per level:
  * small levels (h * w <= dense_max_pixels and B * M * Lq * h * w <= dense_max_elements):
    the level's interpolation weights are scattered (scalar scatter-add: Lq * P * 4 per
    head) into a dense [B, M, Lq, h*w] matrix A and the samples are A @ values, a batched
    matmul; its gradients are two matmuls and a scalar gather. On XLA:CPU that is ~0.6x
    the time of gathering 32-wide value rows for those levels, whose gradient is an
    outer product the size of the gathered rows plus a scatter-add of them
    (bench/deform_attn.py). At 1024x1024 inputs no level qualifies.
  * the other levels: one row gather of the [B * S * M, D] values (no transposition: XLA
    fused one into the gather and ran it per element) for all their corners at once,
    then a batched contraction with the weights, not sum(g * wgt): XLA:CPU fused the
    gather into that reduction in forward-only programs (inference) and ran it ~8x slower.
  Sums are float32 (value is upcast).
  """
  b, s, m, d = value.shape
  lq = sampling_locations.shape[1]
  loc = sampling_locations.astype(jnp.float32)  # [B, Lq, M, L, P, 2]
  attn = attention_weights.astype(jnp.float32)  # [B, Lq, M, L, P]
  out = jnp.zeros((b, lq, m, d), jnp.float32)
  dense_out = None  # [B, M, Lq, D]
  gather_idx, gather_wgt = [], []
  start = 0
  for level, (h, w) in enumerate(spatial_shapes):
    hw = h * w
    idx, wgt = _bilinear_corners(loc[:, :, :, level], attn[:, :, :, level], h, w)  # [B, Lq, M, K]
    if hw <= dense_max_pixels and b * m * lq * hw <= dense_max_elements:
      bi = jnp.arange(b, dtype=jnp.int32).reshape(b, 1, 1, 1)
      qi = jnp.arange(lq, dtype=jnp.int32).reshape(1, lq, 1, 1)
      mi = jnp.arange(m, dtype=jnp.int32).reshape(1, 1, m, 1)
      flat = (((bi * m + mi) * lq + qi) * hw + idx).reshape(-1)
      a = jnp.zeros((b * m * lq * hw,), jnp.float32).at[flat].add(wgt.reshape(-1))
      v = value[:, start : start + hw].astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, M, hw, D]
      o = jnp.einsum(
        "bmqs,bmsd->bmqd",
        a.reshape(b, m, lq, hw),
        v,
        precision=jax.lax.Precision.HIGHEST,
      )
      dense_out = o if dense_out is None else dense_out + o
    else:
      gather_idx.append(idx + start)
      gather_wgt.append(wgt)
    start += hw
  if dense_out is not None:
    out = out + dense_out.transpose(0, 2, 1, 3)
  if gather_idx:
    idx = jnp.concatenate(gather_idx, -1)  # [B, Lq, M, K]
    wgt = jnp.concatenate(gather_wgt, -1)
    k = idx.shape[-1]
    # Row (b * S + s) * M + m of the [B * S * M, D] values: one plain row gather.
    b_off = (jnp.arange(b, dtype=jnp.int32) * (s * m)).reshape(b, 1, 1, 1)
    m_off = jnp.arange(m, dtype=jnp.int32).reshape(1, 1, m, 1)
    rows = (idx * m + b_off + m_off).reshape(-1)
    g = jnp.take(value.reshape(b * s * m, d), rows, axis=0, mode="clip").reshape(b, lq, m, k, d)
    out = out + jnp.einsum(
      "blmk,blmkd->blmd", wgt, g.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
  return out.reshape(b, lq, m * d).astype(value.dtype)


def _sampling_offset_bias(heads: int, levels: int, points: int):
  """Deformable DETR's init: head h looks along direction 2*pi*h/heads, point k
  at distance k+1 (in pixels of each level)."""

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(heads, dtype=np.float32) * (2.0 * math.pi / heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, levels, points, 1))
    grid = grid * np.arange(1, points + 1, dtype=np.float32)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention (Zhu et al. 2021), Mask2Former settings."""

  dim: int = 256
  heads: int = 8
  levels: int = 3
  points: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, reference_points, value_in, spatial_shapes):
    """query [B, Lq, C]; reference_points [B, Lq, L, 2] (x, y) in [0, 1];
    value_in [B, S, C]; spatial_shapes static ((h, w), ...) -> [B, Lq, C]."""
    b, lq, _ = query.shape
    m, nl, p = self.heads, self.levels, self.points
    value = layers.dense(self.dim, ("embed", "heads"), dtype=self.dtype, name="value_proj")(
      value_in
    )
    value = value.reshape(b, value.shape[1], m, self.dim // m)
    n_off = m * nl * p * 2
    offsets = nn.Dense(
      n_off,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(_zeros, ("embed", "kv")),
      bias_init=nn.with_logical_partitioning(_sampling_offset_bias(m, nl, p), ("kv",)),
      name="sampling_offsets",
    )(query)
    offsets = offsets.astype(jnp.float32).reshape(b, lq, m, nl, p, 2)
    logits = layers.dense(
      m * nl * p, ("embed", "kv"), dtype=self.dtype, kernel_init=_zeros, name="attention_weights"
    )(query)
    weights = jax.nn.softmax(logits.astype(jnp.float32).reshape(b, lq, m, nl * p), -1)
    weights = weights.reshape(b, lq, m, nl, p)
    normalizer = jnp.asarray([(w, h) for h, w in spatial_shapes], jnp.float32)
    loc = (
      reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    )
    out = ms_deform_attn_core(value, spatial_shapes, loc, weights)
    return layers.dense(self.dim, ("heads", "embed"), dtype=self.dtype, name="output_proj")(out)


class MSDeformEncoderLayer(nn.Module):
  """Post-norm encoder layer: deformable self-attention + FFN."""

  dim: int = 256
  heads: int = 8
  levels: int = 3
  points: int = 4
  ffn: int = 1024
  spatial_shapes: tuple[tuple[int, int], ...] = ()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, src, pos, reference_points):
    attn = MSDeformAttn(
      self.dim, self.heads, self.levels, self.points, self.dtype, name="self_attn"
    )(src + pos, reference_points, src, self.spatial_shapes)
    src = layers.layer_norm(dtype=self.dtype, name="norm1")(src + attn)
    y = layers.dense(self.ffn, ("embed", "mlp"), dtype=self.dtype, name="linear1")(src)
    y = layers.dense(self.dim, ("mlp", "embed"), dtype=self.dtype, name="linear2")(nn.relu(y))
    return layers.layer_norm(dtype=self.dtype, name="norm2")(src + y)


def _reference_points(spatial_shapes) -> jnp.ndarray:
  """Pixel centres of every level, normalised: [S, 2] (x, y).

  Images are padded to the static shape and treated as fully valid (no
  valid_ratios), as Mask2Former does with its all-false padding mask.
  """
  refs = []
  for h, w in spatial_shapes:
    y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    refs.append(np.stack([x.reshape(-1), y.reshape(-1)], -1))
  return jnp.asarray(np.concatenate(refs, 0), jnp.float32)


class _FPNFuse(nn.Module):
  """Top-down fusion to the finer levels: lateral 1x1+GN, add upsampled, 3x3+GN+ReLU."""

  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, coarse, lateral_in):
    lat = layers.conv(self.dim, 1, dtype=self.dtype, use_bias=False, name="lateral")(lateral_in)
    lat = layers.group_norm(dtype=self.dtype, name="lateral_norm")(lat)
    y = lat + layers.resize_bilinear(coarse, lat.shape[1], lat.shape[2]).astype(lat.dtype)
    y = layers.conv(self.dim, 3, dtype=self.dtype, use_bias=False, name="output")(y)
    return nn.relu(layers.group_norm(dtype=self.dtype, name="output_norm")(y))


class MSDeformPixelDecoder(nn.Module):
  """Mask2Former's MSDeformAttnPixelDecoder (encoder over strides 8/16/32)."""

  dim: int = 256
  layers: int = 6
  heads: int = 8
  points: int = 4
  ffn: int = 1024
  dtype: Dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, features: dict[str, jnp.ndarray], train: bool = False):
    del train  # No dropout (Mask2Former uses 0.0 in the pixel decoder).
    names = ("stride32", "stride16", "stride8")  # coarse -> fine.
    nl = len(names)
    level_embed = self.param(
      "level_embed",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ("levels", "embed")),
      (nl, self.dim),
    )
    srcs, poss, shapes = [], [], []
    for i, n in enumerate(names):
      x = layers.conv(self.dim, 1, dtype=self.dtype, name=f"input_proj_{i}")(
        features[n].astype(self.dtype)
      )
      x = layers.group_norm(dtype=self.dtype, name=f"input_norm_{i}")(x)
      b, h, w, c = x.shape
      shapes.append((h, w))
      pos = layers.position_embedding_sine(h, w, self.dim) + level_embed[i]
      srcs.append(x.reshape(b, h * w, c))
      poss.append(jnp.broadcast_to(pos.reshape(1, h * w, c), (b, h * w, c)))
    src = jnp.concatenate(srcs, 1)
    pos = jnp.concatenate(poss, 1).astype(self.dtype)
    shapes = tuple(shapes)
    ref = jnp.broadcast_to(
      _reference_points(shapes)[None, :, None, :], (src.shape[0], src.shape[1], nl, 2)
    )
    layer_cls = MSDeformEncoderLayer
    if self.remat:
      layer_cls = nn.remat(layer_cls)
    for i in range(self.layers):
      src = layer_cls(
        self.dim, self.heads, nl, self.points, self.ffn, shapes, self.dtype, name=f"encoder_{i}"
      )(src, pos, ref)
    memory, start = [], 0
    for h, w in shapes:
      memory.append(src[:, start : start + h * w].reshape(-1, h, w, self.dim))
      start += h * w
    y = _FPNFuse(self.dim, self.dtype, name="fpn_stride4")(
      memory[-1], features["stride4"].astype(self.dtype)
    )
    mask_features = layers.conv(self.dim, 1, dtype=self.dtype, name="mask_features")(y)
    return memory, mask_features


class FPNPixelDecoder(nn.Module):
  """Light top-down FPN (Mask2Former's BasePixelDecoder) for CPU runs."""

  dim: int = 64
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: dict[str, jnp.ndarray], train: bool = False):
    del train
    y = layers.conv(self.dim, 3, dtype=self.dtype, use_bias=False, name="output_32")(
      features["stride32"].astype(self.dtype)
    )
    y = nn.relu(layers.group_norm(dtype=self.dtype, name="output_norm_32")(y))
    memory = [y]
    for s in (16, 8, 4):
      y = _FPNFuse(self.dim, self.dtype, name=f"fpn_stride{s}")(
        y, features[f"stride{s}"].astype(self.dtype)
      )
      if s != 4:
        memory.append(y)
    mask_features = layers.conv(self.dim, 1, dtype=self.dtype, name="mask_features")(y)
    return memory, mask_features


def build_pixel_decoder(
  config, dtype: Dtype, remat: bool = False, name: str | None = None
) -> nn.Module:
  """`config`: the model's `pixel_decoder` sub-config."""
  if config.name == "msdeform":
    return MSDeformPixelDecoder(
      dim=config.dim,
      layers=config.layers,
      heads=config.heads,
      points=config.points,
      ffn=config.ffn,
      dtype=dtype,
      remat=remat,
      name=name,
    )
  if config.name == "fpn":
    return FPNPixelDecoder(dim=config.dim, dtype=dtype, name=name)
  raise ValueError(f"Unknown pixel decoder {config.name!r}; expected 'msdeform' or 'fpn'.")
