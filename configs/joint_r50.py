r"""DaTaSeg's joint run: ADE20k semantic + COCO panoptic + Objects365 boxes, one model.

The paper's main setting [paper]: all parameters shared, one dataset per step, frozen
CLIP text embeddings of each dataset's class names as the classifier; Objects365 trains
from boxes only (BoxInst projection loss). Evaluated on every training set in the tasks
it supports (Objects365 instance *masks* from boxes on the 1,000-image mask subset; ADE20k
semantic mIoU and, trained on semantic labels only, ADE20k panoptic PQ on Mask2Former's
panoptic conversion) and, by direct transfer (class names only, never trained on), on
Cityscapes panoptic and Pascal Context-59 semantic. Dataset files: the registry's default
layouts below --config.data_dir (input_pipeline/datasets.py; README, "Preparing the
paper's datasets").

Command (TPU pod: launch/tpu_pod.sh; GPUs under Slurm: launch/slurm.sh):

  python -m dataseg.main --config=configs/joint_r50.py --workdir=gs://BUCKET/dataseg/joint_r50 \
      --config.data_dir=gs://BUCKET/tensorflow_datasets
  python -m dataseg.main --config=configs/joint_r50.py:backbone=vitdet_b --workdir=...
  python -m dataseg.plan --config=configs/joint_r50.py --mesh=data=64   # size it first

Arguments: configs/paper_common.py (backbone=r50|vitdet_b|vitdet_l, steps, batch, res,
text, fsdp, fp32, remat, scratch). Hardware: a 64-chip data-parallel mesh (global batch 64,
one 1024x1024 image
per chip), e.g. TPU v4-128 (64 chips) or 64 GPUs; fewer chips work with the same batch
(it must divide by the number of chips), FSDP (`:fsdp`) when parameters + optimizer state
do not fit. The plan tool's figures for this config are in the README.

Expected figures:
  * [paper] the jointly trained ViTDet-L model (configs/joint_vitdet_l.py): 54.0 mIoU
    ADE20k semantic, 53.5 PQ COCO panoptic.
  * R50 and ViTDet-B: the paper's main results table (joint vs separately trained rows,
    ADE mIoU, COCO PQ, Objects365 mask AP, transfer PQ/mIoU); not verified here. The
    paper's claims to check against configs/ade20k_r50.py, coco_r50.py and
    objects365_r50.py at the same backbone: joint training helps every dataset, ADE20k
    (the smallest) most.
[ours] choices (paper's values unknown): sampling weights below, 150k steps at batch 64,
Mask2Former's optimiser and schedule (configs/paper_common.py).
Pretrained backbone: weights/resnet50_imagenet_torchvision.safetensors
(torchvision's ImageNet ResNet-50; `:scratch` for none); a missing file stops the run
at start-up with the one-off conversion command (README, "Pretrained backbones and
ViTDet-L").
"""

from configs import paper_common

# [ours] per-step sampling weights (the paper's ratios are unknown; METHOD.md section 2).
WEIGHTS = {"coco_panoptic": 0.4, "ade20k": 0.25, "objects365": 0.35}
STEPS = 150_000


def get_config(arg=None, default_backbone="r50"):
  c = paper_common.paper_config(arg, WEIGHTS, tuple(paper_common.EVAL), STEPS, default_backbone)
  c.best_metric = "ade20k/semantic/mIoU"
  return c
