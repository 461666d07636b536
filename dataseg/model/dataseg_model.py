"""DaTaSeg: the universal model (METHOD.md sections 1-2).

images -> backbone (strides 4..32) -> pixel decoder (multi-scale memory + mask
features) -> masked-attention transformer decoder -> N mask proposals, each scored
against the text embeddings of the batch's dataset vocabulary (+ background).
Every parameter is shared across datasets and tasks; the text embeddings are an
input, so one set of weights serves any vocabulary. No loss and no dataset logic
live here.

Mixed precision: compute in `config.dtype`, parameters float32, outputs float32.
`config.remat` wraps the repeated layers in `nn.remat`.

Logical axis names used on parameters (the trainer maps them to mesh axes):
  embed     model width of pixel / transformer decoder (256)
  mlp       FFN and mask-embed hidden width
  heads     fused attention projections (heads x head_dim)
  kv        deformable-attention sampling offsets / weights outputs
  conv_h, conv_w, conv_in, conv_out   conv kernels (NHWC / HWIO)
  norm      LayerNorm / GroupNorm / frozen-BN scale and bias
  queries   learnable query index
  levels    multi-scale level index (level embeddings)
  text      text-embedding width (classifier projection, background)
Backbone names (backbone.LOGICAL_AXES): the conv names and embed/mlp/norm above,
plus heads_kv (ViT fused qkv), pos_h, pos_w (ViT position table).
Scalar parameters (the logit scale) have no axis. Frozen-BN statistics live in
the backbone's 'frozen' collection, not in 'params'.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from dataseg.model import backbone as backbone_lib
from dataseg.model import classifier as classifier_lib
from dataseg.model import pixel_decoder as pixel_decoder_lib
from dataseg.model import transformer_decoder as decoder_lib

LOGICAL_AXES: tuple[str, ...] = tuple(
  dict.fromkeys(
    (
      "embed",
      "mlp",
      "heads",
      "kv",
      "conv_h",
      "conv_w",
      "conv_in",
      "conv_out",
      "norm",
      "queries",
      "levels",
      "text",
    )
    + tuple(backbone_lib.LOGICAL_AXES)
  )
)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(config) -> Any:
  return _DTYPES[config.dtype]


class DaTaSeg(nn.Module):
  """The universal segmentation model. `config`: `configs.model_config(...)`."""

  config: ml_collections.ConfigDict

  def setup(self):
    cfg = self.config
    dtype = compute_dtype(cfg)
    self.backbone = backbone_lib.build_backbone(cfg.backbone)
    self.pixel_decoder = pixel_decoder_lib.build_pixel_decoder(cfg.pixel_decoder, dtype, cfg.remat)
    self.decoder = decoder_lib.build_decoder(cfg, dtype)
    if cfg.get("pixel_head", False):
      self.pixel_classifier = classifier_lib.TextClassifier(
        cfg.classifier.text_dim,
        cfg.classifier.logit_scale_init,
        cfg.classifier.logit_scale_max,
        dtype,
      )

  def __call__(
    self, images, text_embeddings, vocab_valid, *, train: bool = False
  ) -> dict[str, jnp.ndarray]:
    """Mask proposals and their class logits for every decoder layer.

    Args:
      images: uint8 or float [B, H, W, 3], RGB in 0..255; H, W multiples of 32.
      text_embeddings: float [V, D] (the batch's dataset vocabulary, padded to a
        static V) or [B, V, D].
      vocab_valid: bool [V] or [B, V]; False on padded vocabulary entries.
      train: enables dropout (needs a 'dropout' rng when decoder.dropout > 0)
        and is passed to the backbone.
    Returns:
      class_logits: float32 [L, B, Q, V + 1]; index V = background; padded
        entries hold -1e9. L = decoder layers + 1 (initial queries first,
        final layer last).
      mask_logits: float32 [L, B, Q, H/4, W/4].
      pixel_logits: float32 [B, H/4, W/4, V + 1], only with `config.pixel_head`:
        each pixel of the mask features scored against the same text embeddings
        (the auxiliary semantic head; a loss term, not used by inference).
    """
    cfg = self.config
    _, h, w, _ = images.shape
    if h % 32 or w % 32:
      raise ValueError(f"image size {(h, w)} must be a multiple of 32.")
    mean = jnp.asarray(cfg.pixel_mean, jnp.float32)
    std = jnp.asarray(cfg.pixel_std, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std
    features = self.backbone(x, train=train)
    memory, mask_features = self.pixel_decoder(features, train=train)
    class_logits, mask_logits = self.decoder(
      memory, mask_features, text_embeddings, vocab_valid, train=train
    )
    out = {
      "class_logits": class_logits.astype(jnp.float32),
      "mask_logits": mask_logits.astype(jnp.float32),
    }
    if cfg.get("pixel_head", False):
      b, h4, w4, c = mask_features.shape
      pixels = self.pixel_classifier(
        mask_features.reshape(b, h4 * w4, c), text_embeddings, vocab_valid
      )
      out["pixel_logits"] = pixels.reshape(b, h4, w4, -1).astype(jnp.float32)
    return out


def build_model(config: ml_collections.ConfigDict) -> DaTaSeg:
  return DaTaSeg(config)
