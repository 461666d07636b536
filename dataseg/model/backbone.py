"""Backbones: ResNet (v1.5) and a plain ViT with ViTDet's simple feature pyramid.

Each maps normalised images [B, H, W, 3] (H, W multiples of 32) to {'stride4', 'stride8',
'stride16', 'stride32'} feature maps, all the pixel decoder needs; compute in `dtype`,
parameters float32, every one named with logical axes (LOGICAL_AXES; shared layers from
layers.py). Normalisation never uses batch statistics, so sharding and per-device batches
of 1-2 images change nothing: `norm='frozen_bn'` keeps BatchNorm's pretrained statistics in
the FROZEN_COLLECTION ('frozen') collection, out of reach of an optimizer over 'params'
(pass it back to `apply`); `norm='gn'` is a trainable GroupNorm(32). Parameter names
mirror torchvision's ResNet and timm's ViT, so weights.py's name tables read against them.
"""

import dataclasses
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dataseg.model import layers

FROZEN_COLLECTION = "frozen"
CONV_AXES = layers.CONV_AXES
LOGICAL_AXES = (
  "conv_h",
  "conv_w",
  "conv_in",
  "conv_out",
  "embed",
  "mlp",
  "heads_kv",
  "norm",
  "pos_h",
  "pos_w",
)


def _conv(
  features,
  kernel,
  strides=1,
  *,
  name,
  dtype,
  use_bias=False,
  padding=None,
  kernel_init=layers.KAIMING_FAN_OUT,
):
  """torchvision-style conv: symmetric explicit padding k//2 (not 'SAME'), no bias."""
  if padding is None:
    padding = [(kernel // 2, kernel // 2)] * 2
  return layers.conv(
    features,
    kernel,
    strides,
    dtype=dtype,
    use_bias=use_bias,
    padding=padding,
    kernel_init=kernel_init,
    name=name,
  )


class FrozenBatchNorm(nn.Module):
  """BatchNorm in inference mode with statistics that are never updated.

  `y = (x - mean) / sqrt(var + eps) * scale + bias`, folded into one affine map.
  All four vectors are in the FROZEN_COLLECTION collection (not 'params').
  """

  eps: float = 1e-5  # torchvision's BatchNorm2d default.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]

    def stat(name, fill):
      init = nn.with_logical_partitioning(
        lambda shape: jnp.full(shape, fill, jnp.float32), ("norm",)
      )
      return self.variable(FROZEN_COLLECTION, name, init, (c,)).value

    scale, bias = stat("scale", 1.0), stat("bias", 0.0)
    mean, var = stat("mean", 0.0), stat("var", 1.0)
    mult = scale * jax.lax.rsqrt(var + self.eps)
    shift = bias - mean * mult
    return x.astype(self.dtype) * mult.astype(self.dtype) + shift.astype(self.dtype)


def _norm(kind, name, dtype):
  if kind == "frozen_bn":
    return FrozenBatchNorm(dtype=dtype, name=name)
  if kind == "gn":
    return layers.group_norm(32, dtype=dtype, name=name)
  raise ValueError(f"norm must be 'frozen_bn' or 'gn', got {kind!r}")


class BasicBlock(nn.Module):
  """ResNet-18/34 block: two 3x3 convs."""

  features: int
  strides: int = 1
  norm: str = "frozen_bn"
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: _conv(*a, dtype=self.dtype, **k)
    norm = lambda name: _norm(self.norm, name, self.dtype)
    y = nn.relu(norm("bn1")(conv(self.features, 3, self.strides, name="conv1")(x)))
    y = norm("bn2")(conv(self.features, 3, name="conv2")(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      x = norm("downsample_bn")(conv(self.features, 1, self.strides, name="downsample_conv")(x))
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv (torchvision)."""

  features: int
  strides: int = 1
  norm: str = "frozen_bn"
  dtype: Any = jnp.float32
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x):
    conv = lambda *a, **k: _conv(*a, dtype=self.dtype, **k)
    norm = lambda name: _norm(self.norm, name, self.dtype)
    out = self.features * self.expansion
    y = nn.relu(norm("bn1")(conv(self.features, 1, name="conv1")(x)))
    y = nn.relu(norm("bn2")(conv(self.features, 3, self.strides, name="conv2")(y)))
    y = norm("bn3")(conv(out, 1, name="conv3")(y))
    if self.strides != 1 or x.shape[-1] != out:
      x = norm("downsample_bn")(conv(out, 1, self.strides, name="downsample_conv")(x))
    return nn.relu(y + x)


RESNET_LAYERS = {
  18: (BasicBlock, (2, 2, 2, 2)),
  34: (BasicBlock, (3, 4, 6, 3)),
  50: (Bottleneck, (3, 4, 6, 3)),
  101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
  """torchvision ResNet without its classifier; outputs layer1..layer4.

  Variable names: `conv1`, `bn1` (stem), then `layer{s}_{b}/{conv1,bn1,...,
  downsample_conv,downsample_bn}` for torchvision's `layer{s}.{b}.*`.
  Channels of stride4..32: width * (1, 2, 4, 8) * expansion (64..512 for R18,
  256..2048 for R50).
  """

  depth: int = 50
  norm: str = "frozen_bn"
  dtype: Any = jnp.float32
  width: int = 64
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # Neither norm behaves differently in training.
    if self.depth not in RESNET_LAYERS:
      raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}")
    block_cls, layers = RESNET_LAYERS[self.depth]
    if self.remat:
      block_cls = nn.remat(block_cls)
    x = _conv(self.width, 7, 2, name="conv1", dtype=self.dtype)(images.astype(self.dtype))
    x = nn.relu(_norm(self.norm, "bn1", self.dtype)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    self.sow("intermediates", "stem", x)  # Kept only if that collection is mutable.
    out = {}
    for s, n in enumerate(layers):
      for b in range(n):
        x = block_cls(
          self.width * 2**s,
          2 if (s > 0 and b == 0) else 1,
          self.norm,
          self.dtype,
          name=f"layer{s + 1}_{b}",
        )(x)
      out[f"stride{4 * 2**s}"] = x
    return out


def torch_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] matrix of torch's `interpolate(mode='bicubic',
  align_corners=False)` along one axis (no antialiasing).

  ViTDet resizes its position table this way; `jax.image.resize` uses another
  cubic kernel (a=-0.5) and costs seconds of compile for its gradient, whereas
  this is a constant matrix.
  """
  a = -0.75  # torch's cubic convolution coefficient.

  def cubic(t):
    t = np.abs(t)
    return np.where(
      t <= 1,
      ((a + 2) * t - (a + 3)) * t * t + 1,
      np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0),
    )

  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  base = np.floor(src).astype(int)
  m = np.zeros((n_out, n_in))
  for k in range(-1, 3):
    idx = np.clip(base + k, 0, n_in - 1)  # torch clamps border reads.
    np.add.at(m, (np.arange(n_out), idx), cubic(src - (base + k)))
  return m.astype(np.float32)


def window_partition(x, window):
  """[B, H, W, C] -> [B * nH * nW, window**2, C], zero-padding H, W up.

  As ViTDet, padded tokens are zeros (after the norm) and are not masked out.
  """
  b, h, w, c = x.shape
  ph, pw = -h % window, -w % window
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  nh, nw = (h + ph) // window, (w + pw) // window
  x = x.reshape(b, nh, window, nw, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b * nh * nw, window * window, c)


def window_unpartition(x, window, hw, batch):
  """Inverse of `window_partition`: [B * nH * nW, window**2, C] -> [B, H, W, C]."""
  h, w = hw
  nh, nw = -(-h // window), -(-w // window)
  x = x.reshape(batch, nh, nw, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, nh * window, nw * window, -1)[:, :h, :w]


class ViTBlock(nn.Module):
  """Pre-norm transformer block; `window > 0`: attention inside windows only.

  Names follow timm: norm1, qkv, proj, norm2, fc1, fc2. The qkv kernel's output
  axis is ordered (q|k|v, head, head_dim), as timm's `qkv.weight` rows.
  """

  width: int
  heads: int
  mlp: int
  window: int = 0
  dtype: Any = jnp.float32
  ln_eps: float = 1e-6
  gelu_approximate: bool = False

  @nn.compact
  def __call__(self, x):  # [B, gh, gw, C]
    b, gh, gw, c = x.shape
    dense = lambda n, names, name: layers.dense(n, names, dtype=self.dtype, name=name)
    y = layers.layer_norm(dtype=self.dtype, eps=self.ln_eps, name="norm1")(x)
    if self.window:
      y = window_partition(y, self.window)
    else:
      y = y.reshape(b, gh * gw, c)
    n, t, _ = y.shape
    qkv = dense(3 * c, ("embed", "heads_kv"), "qkv")(y)
    qkv = qkv.reshape(n, t, 3, self.heads, c // self.heads)
    y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    y = dense(c, ("heads_kv", "embed"), "proj")(y.reshape(n, t, c))
    if self.window:
      y = window_unpartition(y, self.window, (gh, gw), b)
    x = x + y.reshape(b, gh, gw, c)
    y = layers.layer_norm(dtype=self.dtype, eps=self.ln_eps, name="norm2")(x)
    y = dense(self.mlp, ("embed", "mlp"), "fc1")(y)
    y = nn.gelu(y, approximate=self.gelu_approximate)
    return x + dense(c, ("mlp", "embed"), "fc2")(y)


class _PyramidLevel(nn.Module):
  """One output of ViTDet's simple feature pyramid (detectron2 SimpleFeaturePyramid)."""

  scale: float
  width: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # [B, gh, gw, width] at stride `patch`
    deconv = lambda n, name: nn.ConvTranspose(
      n,
      (2, 2),
      (2, 2),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=jnp.float32,
      name=name,
      kernel_init=nn.with_logical_partitioning(layers.KAIMING_FAN_OUT, CONV_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
    )
    if self.scale == 4:
      x = deconv(self.width // 2, "deconv1")(x)
      x = layers.layer_norm(dtype=self.dtype, eps=1e-6, name="deconv_norm")(x)
      x = nn.gelu(x, approximate=False)
      x = deconv(self.width // 4, "deconv2")(x)
    elif self.scale == 2:
      x = deconv(self.width // 2, "deconv1")(x)
    elif self.scale == 0.5:
      x = nn.max_pool(x, (2, 2), (2, 2))
    elif self.scale != 1:
      raise ValueError(f"unsupported pyramid scale {self.scale}")
    x = _conv(self.out_dim, 1, name="lateral", dtype=self.dtype)(x)
    x = layers.layer_norm(dtype=self.dtype, eps=1e-6, name="lateral_norm")(x)
    x = _conv(self.out_dim, 3, name="output", dtype=self.dtype)(x)
    return layers.layer_norm(dtype=self.dtype, eps=1e-6, name="output_norm")(x)


class ViTDet(nn.Module):
  """Plain ViT (windowed attention + a few global blocks) and a simple pyramid.

  The position table `pos_embed` [pretrain_grid, pretrain_grid, width] is the
  pre-training one (MAE/timm's without the cls entry) and is resized to the
  input's patch grid exactly as ViTDet does (torch bicubic, see
  `torch_bicubic_matrix`).
  No relative position bias (ViTDet's optional rel-pos is left out). The ViT
  has no final norm: the pyramid reads the last block directly, as in ViTDet.

  Names: patch_embed, pos_embed, blocks_{i}/(timm names), simfp_{4,8,16,32}/...
  The pyramid (`simfp_*`) has no pre-trained counterpart.
  """

  patch: int = 16
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp: int = 3072
  window: int = 14
  global_blocks: Sequence[int] = (2, 5, 8, 11)
  pretrain_grid: int = 14
  out_dim: int = 256
  ln_eps: float = 1e-6
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # No dropout / drop-path.
    if self.patch != 16:
      raise ValueError("ViTDet's pyramid (x4, x2, x1, x0.5) assumes patch=16.")
    x = _conv(
      self.width,
      self.patch,
      self.patch,
      name="patch_embed",
      dtype=self.dtype,
      use_bias=True,
      padding="VALID",
      kernel_init=layers.XAVIER,
    )(images.astype(self.dtype))
    _, gh, gw, _ = x.shape
    g = self.pretrain_grid
    pos = self.param(
      "pos_embed",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos_h", "pos_w", "embed")),
      (g, g, self.width),
      jnp.float32,
    )
    if (gh, gw) != (g, g):
      pos = jnp.einsum(
        "hi,wj,ijc->hwc", torch_bicubic_matrix(g, gh), torch_bicubic_matrix(g, gw), pos
      )
    x = x + pos.astype(self.dtype)
    block_cls = nn.remat(ViTBlock) if self.remat else ViTBlock
    for i in range(self.depth):
      window = 0 if i in tuple(self.global_blocks) else self.window
      x = block_cls(
        self.width,
        self.heads,
        self.mlp,
        window,
        self.dtype,
        self.ln_eps,
        self.gelu_approximate,
        name=f"blocks_{i}",
      )(x)
    return {
      f"stride{int(self.patch / s)}": _PyramidLevel(
        s, self.width, self.out_dim, self.dtype, name=f"simfp_{int(self.patch / s)}"
      )(x)
      for s in (4, 2, 1, 0.5)
    }


BACKBONES = {"resnet": ResNet, "vitdet": ViTDet}


def build_backbone(config: ml_collections.ConfigDict) -> nn.Module:
  """Backbone from `config.name` in BACKBONES; other keys are module fields.

  `config.dtype` may be a string ('bfloat16'); unknown keys raise, so a typo in
  a config cannot be silently ignored. `config.pretrained` (a weights file) is
  not a module field: dataseg/model/weights.py reads it.
  """
  if config.name not in BACKBONES:
    raise ValueError(f"Unknown backbone {config.name!r}; allowed: {sorted(BACKBONES)}")
  cls = BACKBONES[config.name]
  allowed = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  kwargs = dict(config.to_dict() if hasattr(config, "to_dict") else config)
  kwargs.pop("name")
  # Not a module field: the weights file that weights.load_pretrained merges into
  # the fresh state (the module itself does not depend on where weights come from).
  kwargs.pop("pretrained", None)
  unknown = set(kwargs) - allowed
  if unknown:
    raise ValueError(f"Unknown {config.name} fields {sorted(unknown)}; allowed: {sorted(allowed)}")
  if "dtype" in kwargs:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  if "global_blocks" in kwargs:
    kwargs["global_blocks"] = tuple(kwargs["global_blocks"])
  return cls(**kwargs)
