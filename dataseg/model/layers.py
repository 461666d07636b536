"""Layer helpers shared by the model: every parameter float32 and named with logical axes.

Backbone, pixel decoder, transformer decoder and classifier build their dense, conv and
norm layers here, so sharding rules (`dataseg_model.LOGICAL_AXES`) see one set of names.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
XAVIER = nn.initializers.xavier_uniform()
# torchvision initialises convs with kaiming_normal(mode='fan_out', relu).
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def dense(
  features: int,
  axes: tuple[str, str],
  *,
  dtype: Dtype = jnp.float32,
  kernel_init=XAVIER,
  bias_init=_zeros,
  use_bias: bool = True,
  name: str | None = None,
) -> nn.Dense:
  """nn.Dense with fp32 params, `dtype` compute and logical axis names."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
    bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)),
    name=name,
  )


_NHWC = ("NHWC", "HWIO", "NHWC")
# Larger kernels than 1x1 whose output has fewer rows (B * Ho * Wo) keep XLA's kernel
# gradient: it was faster there (bench/conv_grad.py: 3x3 on 16x16 / 8x8 outputs, batch 2).
TAPS_MIN_ROWS = 1024


def _lax_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def conv_kernel_grad_by_taps(x, g, kernel_size, strides, padding):
  """The gradient of an NHWC/HWIO conv's kernel as one matmul per kernel tap.

  x [B, H, W, I] input, g [B, Ho, Wo, O] output cotangent, padding ((lo, hi), (lo, hi)).
  Returns [kh, kw, I, O] (float32 accumulation, cast to x's dtype): tap (i, j) is
  sum_{b, y, x} g[b, y, x, :]^T xpad[b, i + sy * y, j + sx * x, :], a [O, B*Ho*Wo] x
  [B*Ho*Wo, I] matmul.
  """
  (kh, kw), (sy, sx) = kernel_size, strides
  ho, wo = g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  taps = []
  for i in range(kh):
    for j in range(kw):
      xs = xp[:, i : i + sy * (ho - 1) + 1 : sy, j : j + sx * (wo - 1) + 1 : sx]
      taps.append(jnp.einsum("bhwo,bhwi->oi", g, xs, preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, g.shape[-1], x.shape[-1]).transpose(0, 1, 3, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_matmul_kernel_grad(x, w, strides, padding):
  return _lax_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
  return _lax_conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, res, g):
  x, w = res
  _, x_vjp = jax.vjp(lambda x: _lax_conv(x, w, strides, padding), x)
  (gx,) = x_vjp(g)
  xla_gw = lambda x, g: jax.vjp(lambda w: _lax_conv(x, w, strides, padding), w)[1](g)[0]
  rows = g.shape[0] * g.shape[1] * g.shape[2]
  if w.shape[:2] != (1, 1) and rows < TAPS_MIN_ROWS:
    return gx, xla_gw(x, g)
  gw = jax.lax.platform_dependent(
    x,
    g,
    cpu=lambda x, g: conv_kernel_grad_by_taps(x, g, w.shape[:2], strides, padding),
    default=xla_gw,
  )
  return gx, gw.astype(w.dtype)


_conv_matmul_kernel_grad.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
):
  """`lax.conv_general_dilated` for nn.Conv whose kernel gradient on CPU is matmuls.

  XLA:CPU computes an NHWC conv's kernel gradient 2-7x slower than the same sums as
  one [O, B*Ho*Wo] x [B*Ho*Wo, I] matmul per kernel tap (bench/conv_grad.py: 9 GFLOP/s
  against 63 for a 1x1 conv 256->256 at 64x64, 22 against 57 for a 3x3). The forward
  and the input gradient stay XLA's convolutions; other backends keep XLA's kernel
  gradient too (`lax.platform_dependent`). Plain NHWC/HWIO convs with explicit or
  string padding only (as `conv` below makes them); anything else, and convs on fewer
  than 16 input channels (the stem: XLA's is faster there), go to lax unchanged.
  """
  plain = (
    lhs.ndim == 4
    and feature_group_count == 1
    and precision is None
    and all(d == 1 for d in (lhs_dilation or (1, 1)))
    and all(d == 1 for d in (rhs_dilation or (1, 1)))
    and lhs.shape[-1] >= 16
    and lhs.shape[-1] == rhs.shape[2]
    and (
      dimension_numbers is None
      or jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC) == dimension_numbers
    )
  )
  if not plain:
    return jax.lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
    )
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  return _conv_matmul_kernel_grad(lhs, rhs, tuple(window_strides), padding)


def conv(
  features: int,
  kernel: int,
  strides: int = 1,
  *,
  dtype: Dtype = jnp.float32,
  use_bias: bool = True,
  padding: Any = "SAME",
  kernel_init=XAVIER,
  name: str | None = None,
) -> nn.Conv:
  """NHWC conv (default 'SAME' padding), annotated [conv_h, conv_w, conv_in, conv_out];
  its kernel gradient on CPU by matmuls (`conv_general_dilated`)."""
  return nn.Conv(
    features,
    (kernel, kernel),
    (strides, strides),
    padding=padding,
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=nn.with_logical_partitioning(kernel_init, CONV_AXES),
    bias_init=nn.with_logical_partitioning(_zeros, ("conv_out",)),
    conv_general_dilated=conv_general_dilated,
    name=name,
  )


def layer_norm(
  *, dtype: Dtype = jnp.float32, eps: float = 1e-5, name: str | None = None
) -> nn.LayerNorm:
  return nn.LayerNorm(
    epsilon=eps,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=nn.with_logical_partitioning(_ones, ("norm",)),
    bias_init=nn.with_logical_partitioning(_zeros, ("norm",)),
    name=name,
  )


def group_norm(
  groups: int = 32, *, dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.GroupNorm:
  """GroupNorm: batch-independent, so it behaves the same under any sharding."""
  return nn.GroupNorm(
    num_groups=groups,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
    scale_init=nn.with_logical_partitioning(_ones, ("norm",)),
    bias_init=nn.with_logical_partitioning(_zeros, ("norm",)),
    name=name,
  )


def position_embedding_sine(
  height: int, width: int, dim: int, temperature: float = 10000.0
) -> jnp.ndarray:
  """Mask2Former's `PositionEmbeddingSine(dim // 2, normalize=True)` -> [H, W, dim].

  Computed from static shapes (no padding mask, as in Mask2Former), so it is a
  constant under jit. Channel order: [pos_y (dim/2), pos_x (dim/2)].
  """
  npf = dim // 2
  eps, scale = 1e-6, 2 * math.pi
  y = np.arange(1, height + 1, dtype=np.float32) / (height + eps) * scale
  x = np.arange(1, width + 1, dtype=np.float32) / (width + eps) * scale
  dim_t = temperature ** (2 * (np.arange(npf) // 2) / npf)

  def enc(v):  # [n] -> [n, npf], interleaved sin/cos as in the torch code.
    p = v[:, None] / dim_t
    return np.stack([np.sin(p[:, 0::2]), np.cos(p[:, 1::2])], -1).reshape(len(v), npf)

  py = np.broadcast_to(enc(y)[:, None, :], (height, width, npf))
  px = np.broadcast_to(enc(x)[None, :, :], (height, width, npf))
  return jnp.asarray(np.concatenate([py, px], -1))


def resize_bilinear(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """[B, h, w, C] -> [B, height, width, C]; torch `interpolate(bilinear,
  align_corners=False)` (half-pixel centres, no antialiasing)."""
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, height, width, c), "linear", antialias=False)
