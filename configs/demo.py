r"""The embedded demo: DaTaSeg's joint multi-dataset, multi-task training on the synthetic suite.

Main job of the README (`bash launch/demo.sh`), on one CPU:

  python -m dataseg.main --config=configs/demo.py --workdir=workdirs/demo

trains one tiny model jointly on shapes_panoptic (panoptic), shapes_semantic (semantic) and
shapes_boxes (boxes only) with the offline MiniLM class-name embeddings, then evaluates every
dataset in every task it supports, shapes_transfer by direct transfer (class names only).

Arguments (comma-separated, e.g. `configs/demo.py:smoke` or `configs/demo.py:steps=200,res=96`):
  smoke         a few steps on tiny images: the end-to-end test's setting.
  steps=N       total training steps (joint run; single-dataset runs get their share).
  res=N         training / evaluation resolution (multiple of 32).
  variant=...   the comparisons of README "Reproducing the paper's claims at small scale":
                joint (default) | panoptic_only | semantic_only | boxes_only |
                learned_classifier (per-dataset learned classifiers instead of text) |
                no_boxes (joint without shapes_boxes).
                Single-dataset runs use the same number of steps *on that dataset* as the
                joint run spends on it (same compute budget per dataset).

Expected on 2 CPU cores (see README for the measured table): PQ on shapes_panoptic, mIoU on
shapes_semantic, mask AP on shapes_boxes from boxes alone, and transfer PQ/mIoU well above
chance within the demo's time budget.
"""

from configs import common
from dataseg.model import configs as model_configs

WEIGHTS = {"shapes_panoptic": 0.5, "shapes_semantic": 0.2, "shapes_boxes": 0.3}
TRAIN_TASKS = {
  "shapes_panoptic": "panoptic",
  "shapes_semantic": "semantic",
  "shapes_boxes": "boxes",
}
VARIANTS = (
  "joint",
  "panoptic_only",
  "semantic_only",
  "boxes_only",
  "learned_classifier",
  "no_boxes",
)


def get_config(arg=None):
  arg = common.parse_arg(arg, smoke=False, steps=600, res=128, variant="joint")
  if arg.variant not in VARIANTS:
    raise ValueError(f"variant={arg.variant!r} is unknown; allowed: {', '.join(VARIANTS)}")
  c = common.base_config()
  c.image_size = c.eval_image_size = 64 if arg.smoke else arg.res
  c.max_segments = 16
  c.batch_size = 4 if arg.smoke else 8
  c.eval_batch_size = 4 if arg.smoke else 16
  steps = 6 if arg.smoke else arg.steps

  train = dict(WEIGHTS)
  if arg.variant.endswith("_only"):
    name = "shapes_" + arg.variant[: -len("_only")]
    train = {name: 1.0}
    steps = max(1, int(round(steps * WEIGHTS[name])))
  elif arg.variant == "no_boxes":
    train.pop("shapes_boxes")
    steps = max(1, int(round(steps * (1 - WEIGHTS["shapes_boxes"]))))
  for name, weight in train.items():
    c.datasets[name] = common.dataset(name, TRAIN_TASKS[name], weight=weight)
  c.total_steps = steps

  c.eval_datasets.shapes_panoptic = common.dataset(
    "shapes_panoptic", "panoptic", evaluators=("panoptic", "semantic", "instance")
  )
  c.eval_datasets.shapes_semantic = common.dataset(
    "shapes_semantic", "semantic", evaluators=("semantic", "panoptic")
  )
  c.eval_datasets.shapes_boxes = common.dataset(
    "shapes_boxes", "instance", evaluators=("instance", "box")
  )
  c.eval_datasets.shapes_transfer = common.dataset(
    "shapes_transfer", "panoptic", evaluators=("panoptic", "semantic")
  )
  c.max_eval_examples = 8 if arg.smoke else 0

  c.classifier = "learned" if arg.variant == "learned_classifier" else "text"
  c.model = model_configs.model_config("tiny")
  c.model.classifier.text_dim = 384  # all-MiniLM-L6-v2.
  # [ours] The classifier also sees each proposal's own mask as a 16x16 outline over its box
  # (transformer_decoder.mask_box_crops): the shapes_* things differ only by outline, and
  # without it 600 CPU steps leave them at chance (thing PQ 0; README "Things").
  c.model.decoder.mask_shape = 16
  c.loss.num_points = 16 * 16 if arg.smoke else 32 * 32
  c.augment.scale_min, c.augment.scale_max = 0.5, 1.5
  c.optimizer.lr = 1e-3  # 3e-4 before issue 14: with mask_shape, 1e-3 learns the shapes.
  c.optimizer.backbone_multiplier = 1.0  # trained from scratch: no pretrained backbone.
  c.optimizer.weight_decay = 0.05
  c.optimizer.clip_norm = 1.0
  c.optimizer.warmup_steps = 0 if arg.smoke else 100
  c.log_every = 1 if arg.smoke else 25
  c.checkpoint_every = 3 if arg.smoke else 250
  # A few hundred CPU steps leave the tiny model less confident than a fully trained
  # Mask2Former, whose 0.8 would keep no proposal at all: panoptic keeps scores > 0.4
  # (README "Things": 0.3 / 0.4 / 0.5 compared on the validation split).
  c.loss.post.score_threshold = 0.4
  c.eval_every = steps  # evaluate at the end.
  c.keep_checkpoints = 2
  c.mesh.data = -1
  return c
