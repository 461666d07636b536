r"""ADE20k semantic segmentation alone: the separately trained baseline of the joint run.

  python -m dataseg.main --config=configs/ade20k_r50.py --workdir=gs://BUCKET/dataseg/ade20k_r50 \
      --config.data_dir=gs://BUCKET/tensorflow_datasets
  python -m dataseg.main --config=configs/ade20k_r50.py:backbone=vitdet_b --workdir=...

ADE20k (150 classes, 20,210 train / 2,000 val images [paper]) from the raw
ADEChallengeData2016 folder (registry entry `ade20k`), semantic task (per-class MERGE of the
proposals), evaluated by
mIoU. Arguments: configs/paper_common.py. Hardware: 64 chips at batch 64 (or fewer
chips, same batch).

Expected: the paper's single-dataset ADE20k rows (R50 / ViTDet-B); not verified here.
The paper's claim to check with configs/joint_r50.py: joint training improves ADE20k
mIoU more than any other dataset (the summary quotes +6.1 mIoU; which backbone, not
verified here).
[ours]: 40k steps at batch 64 (= Mask2Former's ADE20k 160k iterations at batch 16 in
images seen), 1024 LSJ as in every paper config (Mask2Former's ADE recipe crops 512).
Pretrained backbone: weights/resnet50_imagenet_torchvision.safetensors
(torchvision's ImageNet ResNet-50; `:scratch` for none); a missing file stops the run
at start-up with the one-off conversion command (README, "Pretrained backbones and
ViTDet-L").
"""

from configs import paper_common


def get_config(arg=None):
  c = paper_common.paper_config(arg, {"ade20k": 1.0}, ("ade20k",), 40_000)
  c.best_metric = "ade20k/semantic/mIoU"
  return c
