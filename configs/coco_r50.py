r"""COCO panoptic segmentation alone: the separately trained baseline of the joint run.

  python -m dataseg.main --config=configs/coco_r50.py --workdir=gs://BUCKET/dataseg/coco_r50 \
      --config.data_dir=gs://BUCKET/tensorflow_datasets
  python -m dataseg.main --config=configs/coco_r50.py:backbone=vitdet_b --workdir=...

COCO panoptic (80 thing + 53 stuff classes, 118,287 train / 5,000 val [paper]) through the
TFDS `coco/2017_panoptic` reader, panoptic task (things matched one-to-one, stuff merged
per class), evaluated by PQ, and by mIoU and mask AP from the same proposals.
Arguments: configs/paper_common.py. Hardware: 64 chips at batch 64 (or fewer, same batch).

Expected: the paper's single-dataset COCO rows (R50 / ViTDet-B); not verified here. For
scale: Mask2Former R50 reports 51.9 PQ on COCO panoptic with 50 epochs (Mask2Former paper,
not DaTaSeg; its classifier is learned, not text).
[ours]: 92k steps at batch 64 (= Mask2Former's 368,750 iterations at batch 16, 50 epochs).
Pretrained backbone: weights/resnet50_imagenet_torchvision.safetensors
(torchvision's ImageNet ResNet-50; `:scratch` for none); a missing file stops the run
at start-up with the one-off conversion command (README, "Pretrained backbones and
ViTDet-L").
"""

from configs import paper_common


def get_config(arg=None):
  c = paper_common.paper_config(arg, {"coco_panoptic": 1.0}, ("coco_panoptic",), 92_000)
  c.best_metric = "coco_panoptic/panoptic/PQ"
  return c
