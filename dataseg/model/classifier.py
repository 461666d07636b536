"""Text-embedding classifier: the only dataset-specific part of DaTaSeg is its input.

[paper] Every parameter is shared across datasets; a proposal is classified by
comparing its class embedding with the frozen text embeddings of the current
dataset's class names, plus one shared learnable background embedding.
[ours] (METHOD.md section 2) query -> Dense(text_dim) -> L2 norm; logits = cosine
similarity with the L2-normalised text embeddings and the background embedding,
times a learned logit scale (stored as its log, initialised at log(1/0.07), clipped
at log(100) as in CLIP). [ours] (issue 14) `model.decoder.mask_shape` adds, before
this projection, an MLP feature of the proposal's own mask outline
(transformer_decoder.PredictionHead); off in the paper configs, on in the demo, where
things differ only by outline (README "Things").

Vocabularies of different sizes are padded to a static V with a validity mask;
padded entries get a very negative *finite* logit (-1e9) so softmax gives exactly 0
and gradients stay finite. The same weights serve any vocabulary (size and content):
nothing here depends on V.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dataseg.model import layers

PAD_LOGIT = -1e9


def l2_normalize(x: jnp.ndarray, axis: int = -1, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis, keepdims=True), eps))


class TextClassifier(nn.Module):
  """[B, Q, C] queries x [V, D] or [B, V, D] text -> [B, Q, V + 1] logits.

  The last logit (index V) is background. Output is float32: the cosine logits are
  computed in float32 whatever the compute dtype (they are scaled by up to 100).
  """

  text_dim: int = 512
  logit_scale_init: float = 1 / 0.07
  logit_scale_max: float = 100.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, text_embeddings, vocab_valid):
    b = queries.shape[0]
    if text_embeddings.ndim == 2:
      text_embeddings = jnp.broadcast_to(text_embeddings[None], (b,) + text_embeddings.shape)
    if vocab_valid.ndim == 1:
      vocab_valid = jnp.broadcast_to(vocab_valid[None], (b,) + vocab_valid.shape)
    if text_embeddings.shape[-1] != self.text_dim:
      raise ValueError(
        f"text embeddings have width {text_embeddings.shape[-1]},"
        f" the classifier expects text_dim={self.text_dim}."
      )
    emb = layers.dense(self.text_dim, ("embed", "text"), dtype=self.dtype, name="proj")(queries)
    emb = l2_normalize(emb)  # [B, Q, D]
    background = self.param(
      "background",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), ("text",)),
      (self.text_dim,),
    )
    log_scale = self.param(
      "log_logit_scale",
      nn.with_logical_partitioning(nn.initializers.constant(math.log(self.logit_scale_init)), ()),
      (),
    )
    text = l2_normalize(text_embeddings)  # [B, V, D]
    sim = jnp.einsum("bqd,bvd->bqv", emb, text)
    sim_bg = jnp.einsum("bqd,d->bq", emb, l2_normalize(background))
    scale = jnp.exp(jnp.minimum(log_scale, math.log(self.logit_scale_max)))
    logits = scale * jnp.concatenate([sim, sim_bg[..., None]], -1)
    valid = jnp.concatenate([vocab_valid.astype(bool), jnp.ones((b, 1), bool)], -1)  # [B, V + 1]
    return jnp.where(valid[:, None, :], logits, PAD_LOGIT)
