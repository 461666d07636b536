r"""Objects365 from boxes alone: weakly-supervised instance segmentation.

  python -m dataseg.main --config=configs/objects365_r50.py --workdir=gs://BUCKET/dataseg/o365_r50 \
      --config.data_dir=gs://BUCKET/tensorflow_datasets
  python -m dataseg.main --config=configs/objects365_r50.py:backbone=vitdet_b --workdir=...

Objects365 v2 detection (365 classes, boxes only [paper]) in the `boxes` task: BoxInst's
projection loss is both the matching cost and the mask loss [paper]. Evaluated by mask AP
(and box AP) on the paper's 1,000-image Objects365 val subset with 12,836 instance masks
(`o365_instance_seg_val.json`, registry entry `objects365_masks`). Arguments:
configs/paper_common.py. Hardware: 64 chips at batch 64 (or fewer, same batch).

Expected: the paper's boxes-only Objects365 mask AP rows (R50 / ViTDet-B); not verified
here. The claim to check with configs/joint_r50.py: joint training with COCO's masks
raises Objects365 mask AP (weak transfer across datasets).
[ours]: 92k steps at batch 64 (the COCO schedule; the paper's is unknown).
Pretrained backbone: weights/resnet50_imagenet_torchvision.safetensors
(torchvision's ImageNet ResNet-50; `:scratch` for none); a missing file stops the run
at start-up with the one-off conversion command (README, "Pretrained backbones and
ViTDet-L").
"""

from configs import paper_common


def get_config(arg=None):
  c = paper_common.paper_config(arg, {"objects365": 1.0}, ("objects365_masks",), 92_000)
  c.best_metric = "objects365_masks/instance/AP"
  return c
