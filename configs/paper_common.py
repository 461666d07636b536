"""What the paper-scale configs share (ADE20k-only, COCO-only, Objects365-only, joint).

Every number here is either [paper] (DaTaSeg, NeurIPS 2023) or [ours] (METHOD.md section 2:
Mask2Former's recipe where the paper's text is not available); each [ours] choice is an
argument or one `--config.x=` override away.

Arguments every paper config takes (`configs/joint_r50.py:backbone=vitdet_b,fsdp`):
  backbone=r50|vitdet_b|vitdet_l   model_config name (dataseg/model/configs.py).
  steps=N                 total steps (0 = the file's default schedule).
  batch=N                 global batch size (default 64: one image per chip of a 64-chip mesh).
  res=N                   train / eval resolution (default 1024, LSJ).
  text=clip_l|clip_b      frozen text encoder: CLIP-L/14 (the paper, 768-d) or CLIP-B/32 (512-d).
  fsdp                    shard parameters and optimizer state over the mesh's `fsdp` axis.
  fp32                    compute in float32 (default: bfloat16 compute, float32 parameters).
  remat                   rematerialise backbone / decoder layers (less memory, more FLOPs).
  scratch                 no pretrained backbone: random init, backbone lr x1.0 (an ablation).

Pretrained backbone [ours: Mask2Former's / ViTDet's initialisations; the paper's exact
checkpoints are not stated]: `model.backbone.pretrained` names the converted `.safetensors`
file each backbone expects (dataseg/model/configs.py: PRETRAINED, e.g.
weights/resnet50_imagenet_torchvision.safetensors), relative to the working directory or
any path / gs:// URL via `--config.model.backbone.pretrained=...`. A missing file stops
the run at start-up with the one-off conversion command; the backbone lr multiplier 0.1
applies only while weights are loaded.
"""

from configs import common
from dataseg.model import configs as model_configs

BACKBONES = ("r50", "vitdet_b", "vitdet_l")
# [paper] CLIP text encoder, reported as CLIP-L/14; CLIP-B/32 is the cheaper option.
TEXT_ENCODERS = {
  "clip_l": ("clip:openai/clip-vit-large-patch14", 768),
  "clip_b": ("clip:openai/clip-vit-base-patch32", 512),
}
# Parameters and optimizer state split over `fsdp` along their embedding / output-channel
# axis (every such size in r50 / vitdet_b / vitdet_l is a multiple of 8); the batch over
# (data, fsdp).
FSDP_RULES = (
  ("embed", "fsdp"),
  ("conv_out", "fsdp"),
  ("mlp", "model"),
  ("heads", "model"),
  ("kv", ""),
  ("batch", ("data", "fsdp")),
)

# Evaluation entries (name, task, evaluators): the training sets in every task they support
# and the direct-transfer sets (class names only, never trained on) [paper].
EVAL = {
  "coco_panoptic": ("coco_panoptic", "panoptic", ("panoptic", "semantic", "instance")),
  "ade20k": ("ade20k", "semantic", ("semantic",)),
  # [paper] ADE20k panoptic from semantic-only training (weak transfer): Mask2Former's
  # panoptic conversion of ADEChallengeData2016 (registry entry ade20k_panoptic).
  "ade20k_panoptic": ("ade20k_panoptic", "panoptic", ("panoptic",)),
  "objects365_masks": ("objects365_masks", "instance", ("instance", "box")),  # boxes -> masks.
  "cityscapes": ("cityscapes", "panoptic", ("panoptic", "semantic")),
  "pascal_context": ("pascal_context", "semantic", ("semantic",)),
}
TRAIN_TASKS = {"coco_panoptic": "panoptic", "ade20k": "semantic", "objects365": "boxes"}


def parse(arg, default_backbone="r50"):
  arg = common.parse_arg(
    arg,
    backbone=default_backbone,
    steps=0,
    batch=64,
    res=1024,
    text="clip_l",
    fsdp=False,
    fp32=False,
    remat=False,
    scratch=False,
  )
  if arg.backbone not in BACKBONES:
    raise ValueError(f"backbone={arg.backbone!r} is unknown; allowed: {', '.join(BACKBONES)}")
  if arg.text not in TEXT_ENCODERS:
    raise ValueError(f"text={arg.text!r} is unknown; allowed: {', '.join(TEXT_ENCODERS)}")
  return arg


def paper_config(arg, train, evals, default_steps, default_backbone="r50"):
  """The shared recipe; `train` = {dataset name: sampling weight}, `evals` = EVAL keys."""
  arg = parse(arg, default_backbone)
  c = common.base_config()
  c.image_size = c.eval_image_size = arg.res
  # [ours] large-scale jitter, scale 0.1-2.0, to res x res (Mask2Former's COCO recipe).
  c.augment.scale_min, c.augment.scale_max, c.augment.flip = 0.1, 2.0, True
  c.max_segments = 100
  c.batch_size = arg.batch
  c.eval_batch_size = 8
  c.total_steps = arg.steps or default_steps
  for name, weight in train.items():
    c.datasets[name] = common.dataset(name, TRAIN_TASKS[name], weight=weight)
  for key in evals:
    name, task, evaluators = EVAL[key]
    c.eval_datasets[key] = common.dataset(name, task, evaluators=evaluators)

  c.model = model_configs.model_config(arg.backbone)
  c.model.dtype = "float32" if arg.fp32 else "bfloat16"
  c.model.remat = arg.remat
  c.model.backbone.pretrained = "" if arg.scratch else model_configs.PRETRAINED[arg.backbone].file
  c.text.encoder, c.model.classifier.text_dim = TEXT_ENCODERS[arg.text]
  c.classifier = "text"  # [paper] frozen text embeddings + one learned background.

  # [ours] Mask2Former's optimiser: AdamW 1e-4, wd 0.05, backbone x0.1, clip 0.01, poly 0.9.
  # The x0.1 applies only to a pretrained backbone (optimizer.make; `scratch`: x1.0).
  c.optimizer.lr = 1e-4
  c.optimizer.weight_decay = 0.05
  c.optimizer.backbone_multiplier = 0.1
  c.optimizer.schedule = "poly"
  c.optimizer.poly_power = 0.9
  c.optimizer.clip_norm = 0.01
  c.optimizer.warmup_steps = 0

  c.mesh.data, c.mesh.fsdp, c.mesh.model = -1, 1, 1
  if arg.fsdp:
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.sharding_rules = FSDP_RULES
  c.log_every = 100
  c.checkpoint_every = 2000
  c.eval_every = 10_000
  c.keep_checkpoints = 3
  return c
