r"""DaTaSeg's joint run with the ViTDet-B backbone (configs/joint_r50.py, backbone=vitdet_b).

  python -m dataseg.main --config=configs/joint_vitdet_b.py \
      --workdir=gs://BUCKET/dataseg/joint_vitdet_b \
      --config.data_dir=gs://BUCKET/tensorflow_datasets
  python -m dataseg.plan --config=configs/joint_vitdet_b.py --mesh=data=64

Same datasets, evaluation, schedule and arguments as configs/joint_r50.py (whose
docstring has the paper's figures); ViT-B/16 with windowed attention (14) and global
blocks 2, 5, 8, 11, simple feature pyramid to 256 channels. Expected: the paper's
ViTDet-B rows (joint vs separate); not verified here. Hardware: as joint_r50 (64 chips,
batch 64); `:fsdp,remat` when memory is short.
Pretrained backbone: weights/vit_base_mae.safetensors
(MAE's ImageNet ViT-B/16; `:scratch` for none); a missing file stops the run
at start-up with the one-off conversion command (README, "Pretrained backbones and
ViTDet-L").
"""

from configs import joint_r50


def get_config(arg=None):
  return joint_r50.get_config(arg, default_backbone="vitdet_b")
