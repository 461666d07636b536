"""Layer helpers shared by the model: every parameter float32 and named with logical axes.

Backbone, pixel decoder, transformer decoder and classifier build their dense, conv and
norm layers here, so sharding rules (`dataseg_model.LOGICAL_AXES`) see one set of names.
"""

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
  """NHWC conv (default 'SAME' padding), annotated [conv_h, conv_w, conv_in, conv_out]."""
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
