"""Masked-attention transformer decoder (Mask2Former's MultiScaleMaskedTransformerDecoder).

N learnable queries (content `query_feat` + positional `query_pos`) go through
`layers` blocks of masked cross-attention -> self-attention -> FFN, cycling over the
pixel decoder's memory at strides 32, 16, 8. Each query's cross-attention only
sees the pixels inside the mask it predicted at the previous step
(sigmoid(mask) >= 0.5 after bilinear resize to the scale's resolution); a query whose
mask is empty attends everywhere. A shared prediction head (LayerNorm -> text
classifier, 3-layer mask-embed MLP . mask features) runs on the initial queries and
after every layer, giving L = layers + 1 predictions for deep supervision.

Shapes: memory list of 3 [B, h_i, w_i, C]; mask_features [B, H4, W4, C];
outputs class_logits [L, B, Q, V + 1], mask_logits [L, B, Q, H4, W4] (float32).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dataseg.model import classifier as classifier_lib
from dataseg.model import layers

Dtype = Any


def attention_mask_from_logits(mask_logits: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """Where each query may attend at the next layer's scale.

  Args:
    mask_logits: [B, Q, H4, W4] predicted mask logits.
    size: (h, w) of the memory the next layer attends to.
  Returns:
    bool [B, Q, h * w], True = attend: sigmoid(bilinear_resize(logits)) >= 0.5,
    i.e. resized logits >= 0. Rows with no True (empty mask) become all True.
    Gradients are stopped (Mask2Former detaches the attention mask).
  """
  b, q = mask_logits.shape[:2]
  m = jnp.moveaxis(jax.lax.stop_gradient(mask_logits), 1, -1)  # [B, H4, W4, Q]
  m = layers.resize_bilinear(m.astype(jnp.float32), *size)
  attend = jnp.moveaxis(m, -1, 1).reshape(b, q, size[0] * size[1]) >= 0
  empty = ~jnp.any(attend, axis=-1, keepdims=True)
  return attend | empty


def masked_attention(
  q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, attend: jnp.ndarray | None
) -> jnp.ndarray:
  """q [B, T, N, D], k/v [B, S, N, D], attend bool [B, T, S] or None -> [B, T, N, D].

  Rows of `attend` must each have at least one True (see
  `attention_mask_from_logits`); otherwise softmax would be over nothing.
  """
  mask = None if attend is None else attend[:, None, :, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


class MultiHeadAttention(nn.Module):
  """torch.nn.MultiheadAttention's parameters (q/k/v/out projections, biases)."""

  dim: int
  heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, key, value, attend=None):
    def proj(x, name):
      y = layers.dense(self.dim, ("embed", "heads"), dtype=self.dtype, name=name)(x)
      return y.reshape(y.shape[:-1] + (self.heads, self.dim // self.heads))

    out = masked_attention(
      proj(query, "q_proj"), proj(key, "k_proj"), proj(value, "v_proj"), attend
    )
    out = out.reshape(out.shape[:-2] + (self.dim,))
    return layers.dense(self.dim, ("heads", "embed"), dtype=self.dtype, name="out_proj")(out)


class DecoderLayer(nn.Module):
  """Masked cross-attention -> self-attention -> FFN (post-norm by default)."""

  dim: int = 256
  heads: int = 8
  ffn: int = 2048
  dropout: float = 0.0
  pre_norm: bool = False
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tgt, query_pos, memory, pos, attend):
    """tgt/query_pos [B, Q, C]; memory/pos [B, S, C]; attend [B, Q, S]."""
    drop = nn.Dropout(self.dropout, deterministic=self.deterministic)

    def block(x, fn, norm_name):
      norm = layers.layer_norm(dtype=self.dtype, name=norm_name)
      if self.pre_norm:
        return x + drop(fn(norm(x)))
      return norm(x + drop(fn(x)))

    def cross(x):
      return MultiHeadAttention(self.dim, self.heads, self.dtype, name="cross_attn")(
        x + query_pos, memory + pos, memory, attend
      )

    def self_attn(x):
      q = x + query_pos
      return MultiHeadAttention(self.dim, self.heads, self.dtype, name="self_attn")(q, q, x)

    def ffn(x):
      y = layers.dense(self.ffn, ("embed", "mlp"), dtype=self.dtype, name="linear1")(x)
      y = drop(nn.relu(y))
      return layers.dense(self.dim, ("mlp", "embed"), dtype=self.dtype, name="linear2")(y)

    tgt = block(tgt, cross, "cross_norm")
    tgt = block(tgt, self_attn, "self_norm")
    return block(tgt, ffn, "ffn_norm")


def mask_box_crops(mask_logits: jnp.ndarray, grid: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Each proposal's mask logits resampled on a `grid` x `grid` lattice over its own box.

  Args:
    mask_logits: [B, Q, H, W] (gradients are stopped).
    grid: lattice side g.
  Returns:
    (crops [B, Q, g, g] float32: bilinear samples of the logits at the centres of a g x g
    split of the box, so the crop is the mask's outline at a fixed scale and position;
    boxes [B, Q, 4] float32 (y0, x0, y1, x1) / (H, W, H, W)). The box is the extent of the
    cells with logit > 0, or the whole map for an empty mask. Interpolation is two
    matmuls with hat-function weights (no gathers).
  """
  m = jax.lax.stop_gradient(mask_logits).astype(jnp.float32)
  h, w = m.shape[-2:]
  inside = m > 0

  def extent(profile, n):  # bool [B, Q, n] -> first and one-past-last True (or 0, n).
    found = jnp.any(profile, -1)
    first = jnp.argmax(profile, -1)
    last = n - jnp.argmax(profile[..., ::-1], -1)
    return jnp.where(found, first, 0).astype(jnp.float32), jnp.where(found, last, n).astype(
      jnp.float32
    )

  def weights(lo, hi, n):  # [B, Q, g, n] hat weights of the g sample centres.
    centres = lo[..., None] + (jnp.arange(grid) + 0.5) * ((hi - lo) / grid)[..., None] - 0.5
    centres = jnp.clip(centres, 0.0, n - 1.0)
    return jnp.maximum(0.0, 1.0 - jnp.abs(centres[..., None] - jnp.arange(n)))

  y0, y1 = extent(jnp.any(inside, -1), h)
  x0, x1 = extent(jnp.any(inside, -2), w)
  crops = jnp.einsum("bqgh,bqhw,bqkw->bqgk", weights(y0, y1, h), m, weights(x0, x1, w))
  boxes = jnp.stack([y0 / h, x0 / w, y1 / h, x1 / w], -1)
  return crops, boxes


class PredictionHead(nn.Module):
  """Shared by all layers: LayerNorm -> (text-classifier logits, mask logits).

  `mask_pool` [ours] (as FC-CLIP's mask pooling): the classifier also sees the mean of the
  mask features under the proposal's own mask (sigmoid, gradient stopped, dilated by a 3x3
  max-pool so the outline is inside), projected and added to the normalised query. What a
  shape is lies on its outline; masked cross-attention pools the inside of the mask only.

  `mask_shape` = g > 0 [ours]: the classifier also sees the proposal's own mask as a shape,
  its logits resampled on a g x g lattice over the mask's box (`mask_box_crops`: the same
  outline at any size and position) plus the box's size and aspect, through a 2-layer MLP
  added to the normalised query. Gradients are stopped at the mask, so the class loss does
  not reshape masks. A class told by its outline (a thing's silhouette) is then a function of
  a mask the queries already predict, not something every query must re-learn from pixels.
  """

  dim: int
  text_dim: int
  logit_scale_init: float
  logit_scale_max: float
  dtype: Dtype = jnp.float32
  mask_pool: bool = False
  mask_shape: int = 0

  @nn.compact
  def __call__(self, queries, mask_features, text_embeddings, vocab_valid):
    x = layers.layer_norm(dtype=self.dtype, name="decoder_norm")(queries)
    e = x
    for i in range(3):
      e = layers.dense(self.dim, ("embed", "mlp"), dtype=self.dtype, name=f"mask_embed_{i}")(e)
      if i < 2:
        e = nn.relu(e)
    features = mask_features.astype(self.dtype)
    mask_logits = jnp.einsum("bqc,bhwc->bqhw", e, features)
    c = x
    if self.mask_pool:
      m = jax.nn.sigmoid(jax.lax.stop_gradient(mask_logits).astype(jnp.float32))
      m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 1, 1), "SAME")
      pooled = jnp.einsum("bqhw,bhwc->bqc", m.astype(self.dtype), features)
      pooled = pooled / jnp.maximum(jnp.sum(m, (-2, -1)), 1e-6)[..., None].astype(self.dtype)
      c = x + layers.dense(self.dim, ("mlp", "embed"), dtype=self.dtype, name="mask_pool")(
        layers.layer_norm(dtype=self.dtype, name="mask_pool_norm")(pooled)
      )
    if self.mask_shape:
      crops, boxes = mask_box_crops(mask_logits, self.mask_shape)
      size = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 1e-3)  # (h, w) / map size.
      shape = jnp.concatenate(
        [
          jax.nn.sigmoid(crops).reshape(crops.shape[:2] + (-1,)),
          jnp.log(size),
          jnp.log(size[..., :1] / size[..., 1:]),
        ],
        -1,
      ).astype(self.dtype)
      shape = nn.relu(
        layers.dense(self.dim, ("mlp", "embed"), dtype=self.dtype, name="mask_shape_0")(shape)
      )
      c = c + layers.dense(self.dim, ("mlp", "embed"), dtype=self.dtype, name="mask_shape_1")(shape)
    class_logits = classifier_lib.TextClassifier(
      self.text_dim, self.logit_scale_init, self.logit_scale_max, self.dtype, name="classifier"
    )(c, text_embeddings, vocab_valid)
    return class_logits, mask_logits.astype(jnp.float32)


class MaskedTransformerDecoder(nn.Module):
  """See module docstring. `config`-free fields so it can be tested alone."""

  num_queries: int = 100
  layers: int = 9
  heads: int = 8
  ffn: int = 2048
  dim: int = 256
  dropout: float = 0.0
  pre_norm: bool = False
  text_dim: int = 512
  logit_scale_init: float = 1 / 0.07
  logit_scale_max: float = 100.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  mask_pool: bool = False
  mask_shape: int = 0

  @nn.compact
  def __call__(
    self,
    memory: Sequence[jnp.ndarray],
    mask_features,
    text_embeddings,
    vocab_valid,
    train: bool = False,
  ):
    nl = len(memory)
    b = mask_features.shape[0]
    level_embed = self.param(
      "level_embed",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ("levels", "embed")),
      (nl, self.dim),
    )
    srcs, poss, sizes = [], [], []
    for i, x in enumerate(memory):
      _, h, w, c = x.shape
      x = x.astype(self.dtype)
      if c != self.dim:
        x = layers.conv(self.dim, 1, dtype=self.dtype, name=f"input_proj_{i}")(x)
      sizes.append((h, w))
      srcs.append(x.reshape(b, h * w, self.dim) + level_embed[i].astype(self.dtype))
      pos = layers.position_embedding_sine(h, w, self.dim).reshape(1, h * w, -1)
      poss.append(pos.astype(self.dtype))
    emb_init = nn.initializers.normal(1.0)
    query_feat = self.param(
      "query_feat",
      nn.with_logical_partitioning(emb_init, ("queries", "embed")),
      (self.num_queries, self.dim),
    )
    query_pos = self.param(
      "query_pos",
      nn.with_logical_partitioning(emb_init, ("queries", "embed")),
      (self.num_queries, self.dim),
    )
    tgt = jnp.broadcast_to(query_feat.astype(self.dtype)[None], (b, self.num_queries, self.dim))
    qpos = jnp.broadcast_to(query_pos.astype(self.dtype)[None], tgt.shape)

    head = PredictionHead(
      self.dim,
      self.text_dim,
      self.logit_scale_init,
      self.logit_scale_max,
      self.dtype,
      self.mask_pool,
      self.mask_shape,
      name="head",
    )
    cls, msk = head(tgt, mask_features, text_embeddings, vocab_valid)
    all_cls, all_msk = [cls], [msk]
    layer_cls = nn.remat(DecoderLayer) if self.remat else DecoderLayer
    for i in range(self.layers):
      lvl = i % nl
      attend = attention_mask_from_logits(msk, sizes[lvl])
      tgt = layer_cls(
        self.dim,
        self.heads,
        self.ffn,
        self.dropout,
        self.pre_norm,
        not train,
        self.dtype,
        name=f"layer_{i}",
      )(tgt, qpos, srcs[lvl], poss[lvl], attend)
      cls, msk = head(tgt, mask_features, text_embeddings, vocab_valid)
      all_cls.append(cls)
      all_msk.append(msk)
    return jnp.stack(all_cls), jnp.stack(all_msk)


def build_decoder(model_config, dtype=jnp.float32) -> MaskedTransformerDecoder:
  """The decoder of `model_config` (configs.model_config: its decoder and classifier)."""
  d, c = model_config.decoder, model_config.classifier
  return MaskedTransformerDecoder(
    num_queries=d.num_queries,
    layers=d.layers,
    heads=d.heads,
    ffn=d.ffn,
    dim=d.dim,
    dropout=d.dropout,
    pre_norm=d.pre_norm,
    text_dim=c.text_dim,
    logit_scale_init=c.logit_scale_init,
    logit_scale_max=c.logit_scale_max,
    dtype=dtype,
    remat=model_config.remat,
    mask_pool=d.get("mask_pool", False),
    mask_shape=d.get("mask_shape", 0),
  )
