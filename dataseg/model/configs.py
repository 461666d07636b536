"""Model configurations by name: `model_config('r50')`.

Defaults follow Mask2Former's official configs [ours, METHOD.md section 2]:
256-wide pixel decoder (6 deformable-attention layers, FFN 1024) and transformer
decoder (100 queries, 9 layers, 8 heads, FFN 2048). `text_dim` is the width of the
frozen text embeddings (CLIP ViT-B: 512, CLIP-L/14: 768, MiniLM: 384); override it
with `config.classifier.text_dim = 384`.

`dtype` and `remat` are set once at the top level; the backbone sub-config refers
to them (FieldReference), so `config.dtype = 'bfloat16'` changes the whole model.

  name       backbone                         pixel decoder     decoder
  r18/50/101 ResNet, frozen BN                msdeform 6x256    100 q, 9 layers
  vitdet_b   ViT-B/16, window 14, global      msdeform 6x256    100 q, 9 layers
             blocks 2,5,8,11, pyramid 256
  vitdet_l   ViT-L/16, window 14, global      msdeform 6x256    200 q, 9 layers
             blocks 5,11,17,23, pyramid 256
  tiny       ResNet-18 at width 32            fpn 64            16 q, 3 layers
"""

import dataclasses

import ml_collections

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0-255 scale.
IMAGENET_STD = (58.395, 57.12, 57.375)


def _base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dtype = "float32"  # Compute dtype: 'float32' | 'bfloat16'. Params stay fp32.
  c.remat = False  # nn.remat on backbone / pixel-decoder / decoder layers.
  c.pixel_mean = IMAGENET_MEAN
  c.pixel_std = IMAGENET_STD
  c.pixel_decoder = ml_collections.ConfigDict(
    dict(name="msdeform", dim=256, layers=6, heads=8, points=4, ffn=1024)
  )
  # mask_pool [ours]: the classifier also sees the mask features pooled under the
  # proposal's (dilated) mask (transformer_decoder.PredictionHead). Off in Mask2Former's.
  # mask_shape [ours]: g > 0 gives the classifier each proposal's own mask resampled on a
  # g x g lattice over its box (its outline at a fixed scale), as a 2-layer MLP feature.
  c.decoder = ml_collections.ConfigDict(
    dict(
      num_queries=100,
      layers=9,
      heads=8,
      ffn=2048,
      dim=256,
      dropout=0.0,
      pre_norm=False,
      mask_pool=False,
      mask_shape=0,
    )
  )
  c.classifier = ml_collections.ConfigDict(
    dict(text_dim=512, logit_scale_init=1 / 0.07, logit_scale_max=100.0)
  )
  # [ours] Auxiliary per-pixel text classifier on the mask features (outputs
  # 'pixel_logits'; trained by loss.pixel_class_weight, as MaX-DeepLab's and
  # kMaX-DeepLab's auxiliary semantic head). Off in Mask2Former's configs.
  c.pixel_head = False
  return c


def _resnet(c, depth: int, width: int = 64, norm: str = "frozen_bn"):
  c.backbone = ml_collections.ConfigDict(
    dict(
      name="resnet",
      depth=depth,
      norm=norm,
      width=width,
      pretrained="",
      dtype=c.get_ref("dtype"),
      remat=c.get_ref("remat"),
    )
  )
  return c


def _vitdet(c, width, depth, heads, global_blocks):
  # ViTDet (Li et al. 2022): MAE-pretrained plain ViT at 224 px (14x14 position
  # table), 14x14 window attention, 4 evenly spaced global blocks, simple pyramid.
  c.backbone = ml_collections.ConfigDict(
    dict(
      name="vitdet",
      patch=16,
      width=width,
      depth=depth,
      heads=heads,
      mlp=4 * width,
      window=14,
      global_blocks=global_blocks,
      pretrain_grid=14,
      out_dim=256,
      pretrained="",
      dtype=c.get_ref("dtype"),
      remat=c.get_ref("remat"),
    )
  )
  return c


def _vitdet_b(c):
  return _vitdet(c, 768, 12, 12, (2, 5, 8, 11))


def _vitdet_l(c):
  _vitdet(c, 1024, 24, 16, (5, 11, 17, 23))
  # [ours, METHOD.md section 2] Mask2Former's 200 queries for large backbones.
  c.decoder.num_queries = 200
  return c


def _tiny(c):
  # Width 32, not 16: GroupNorm(32) needs >= 32 channels, and a from-scratch
  # CPU run trains far better with GN than with identity "frozen" BN.
  _resnet(c, depth=18, width=32, norm="gn")
  c.pixel_decoder = ml_collections.ConfigDict(
    dict(name="fpn", dim=64, layers=0, heads=4, points=4, ffn=128)
  )
  c.decoder.update(num_queries=16, layers=3, heads=4, ffn=128, dim=64)
  return c


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Where a model's pretrained backbone comes from and the file it is converted to.

  `file` is what `config.model.backbone.pretrained` names in the paper configs;
  `source` / `url` / `original` feed the conversion command that the start-up error
  prints (dataseg/model/weights.py) when the file is missing.
  """

  file: str
  source: str  # --from of `python -m dataseg.model.weights`.
  original: str  # the published file's name.
  url: str
  what: str


# [ours] Mask2Former's R50 starts from torchvision's ImageNet-1k ResNet-50 (detectron2's
# R-50.pkl is a conversion of it); ViTDet starts from MAE's ImageNet-1k ViT-B/L.
PRETRAINED = {
  "r50": Pretrained(
    "weights/resnet50_imagenet_torchvision.safetensors",
    "torchvision",
    "resnet50-0676ba61.pth",
    "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "torchvision ImageNet-1k ResNet-50 (IMAGENET1K_V1)",
  ),
  "vitdet_b": Pretrained(
    "weights/vit_base_mae.safetensors",
    "mae",
    "mae_pretrain_vit_base.pth",
    "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth",
    "MAE ImageNet-1k ViT-B/16 (ViTDet's initialisation)",
  ),
  "vitdet_l": Pretrained(
    "weights/vit_large_mae.safetensors",
    "mae",
    "mae_pretrain_vit_large.pth",
    "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth",
    "MAE ImageNet-1k ViT-L/16 (ViTDet's initialisation)",
  ),
}


_BUILDERS = {
  "r18": lambda c: _resnet(c, 18),
  "r50": lambda c: _resnet(c, 50),
  "r101": lambda c: _resnet(c, 101),
  "vitdet_b": _vitdet_b,
  "vitdet_l": _vitdet_l,
  "tiny": _tiny,
}
NAMES = tuple(_BUILDERS)


def model_config(name: str) -> ml_collections.ConfigDict:
  """Returns the model ConfigDict called `name` (one of NAMES)."""
  if name not in _BUILDERS:
    raise ValueError(f"Unknown model {name!r}; allowed: {', '.join(NAMES)}.")
  return _BUILDERS[name](_base())
