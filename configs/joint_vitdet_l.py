r"""DaTaSeg's headline model: the joint run with the ViTDet-L backbone.

  python -m dataseg.main --config=configs/joint_vitdet_l.py \
      --workdir=gs://BUCKET/dataseg/joint_vitdet_l \
      --config.data_dir=gs://BUCKET/tensorflow_datasets
  python -m dataseg.plan --config=configs/joint_vitdet_l.py:fsdp,remat --mesh=data=1,fsdp=64

Same datasets, sampling weights, evaluation, schedule and arguments as
configs/joint_r50.py (its docstring has the recipe) with model `vitdet_l`
(dataseg/model/configs.py): ViT-L/16 (width 1024, 24 blocks, 16 heads) with 14x14
window attention and global blocks 5, 11, 17, 23, ViTDet's simple feature pyramid to
256 channels, initialised from MAE's ImageNet-1k ViT-L/16 (weights/vit_large_mae.safetensors,
converted once with `python -m dataseg.model.weights --from mae ...`; the start-up error
prints the command), 200 queries [ours: Mask2Former's choice for large backbones].

Expected [paper]: 54.0 mIoU on ADE20k semantic and 53.5 PQ on COCO panoptic from this one
jointly trained model; not verified here.
Hardware: 64 chips at batch 64 (one 1024x1024 image per chip). Parameters and AdamW
state (331 M parameters, 3.9 GB in float32) would fit replicated, but the activations
of ViT-L at 1024 px dominate: the plan tool estimates 45-49 GiB per chip with
`:fsdp,remat` and 13.2 TFLOP per chip per step (README, "Pretrained backbones and
ViTDet-L"), i.e. 80-96 GB chips, or a smaller `res`.
Differences from ViTDet's ViT-L [ours]: no relative position bias and no drop-path
(backbone.ViTDet's docstring); layer-wise lr decay is not applied (one backbone
multiplier, 0.1).
"""

from configs import joint_r50


def get_config(arg=None):
  return joint_r50.get_config(arg, default_backbone="vitdet_l")
