r"""The joint run's data path end to end on tiny fixtures of the real datasets.

`configs/joint_r50.py` in miniature: the same registry entries (coco_panoptic through
TFDS coco/2017_panoptic, ade20k from the raw ADEChallengeData2016 folder, objects365
through this repo's TFDS builder; ADE20k panoptic from Mask2Former's conversion) read
from their default layouts below `data`, the R50 architecture (ResNet-50 depth, frozen
BN; shrunk in width, queries and decoder size for a CPU), a few steps, then evaluation
of COCO panoptic, ADE20k semantic and panoptic, and Objects365 boxes.

  python -m dataseg.main --config=configs/real_smoke.py:data=DIR,emb=EMB --workdir=W

Arguments:
  data=DIR    config.data_dir: the datasets in the registry's default layouts (README,
              "Preparing the paper's datasets"); tests/test_real_smoke.py writes tiny
              ones (tests/test_readers.py REGISTRY_WRITERS).
  emb=DIR     class-name embeddings `DIR/<vocabulary>.npy` ([classes, 32]); '' = the text
              encoder (needs it cached or the network).
  steps=N     training steps (default 3); the seed is the first whose per-step draws
              give every training dataset at least one step.
  res=N       train / eval resolution (default 64).
"""

from configs import common
from configs import paper_common
from dataseg.model import configs as model_configs
from input_pipeline import mixing

# The joint run's datasets and tasks (configs/joint_r50.py WEIGHTS, TRAIN_TASKS).
TRAIN = {"coco_panoptic": 0.4, "ade20k": 0.25, "objects365": 0.35}
EVAL = {
  "coco_panoptic": ("coco_panoptic", "panoptic", ("panoptic",)),
  "ade20k": paper_common.EVAL["ade20k"],
  "ade20k_panoptic": paper_common.EVAL["ade20k_panoptic"],
  "objects365": ("objects365", "boxes", ("box",)),
}
VOCABS = {
  "coco_panoptic": "coco_panoptic",
  "ade20k": "ade20k",
  "ade20k_panoptic": "ade20k",
  "objects365": "objects365",
}
TEXT_DIM = 32


def covering_seed(weights, steps):
  """The first seed whose per-step dataset draws include every dataset."""
  for seed in range(1000):
    if len({mixing.dataset_for_step(seed, k, weights) for k in range(steps)}) == len(weights):
      return seed
  raise ValueError(f"no seed below 1000 gives every dataset a step in {steps} steps")


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", emb="", steps=3, res=64)
  c = common.base_config()
  c.data_dir = arg.data
  c.image_size = c.eval_image_size = arg.res
  c.max_segments = 16
  c.batch_size = 2
  c.eval_batch_size = 2
  c.total_steps = arg.steps
  c.seed = covering_seed(list(TRAIN.values()), arg.steps)
  emb = lambda key: f"{arg.emb}/{VOCABS[key]}.npy" if arg.emb else None
  for name, weight in TRAIN.items():
    c.datasets[name] = common.dataset(
      name, paper_common.TRAIN_TASKS[name], weight=weight, text_embeddings=emb(name)
    )
  for key, (name, task, evaluators) in EVAL.items():
    c.eval_datasets[key] = common.dataset(
      name, task, evaluators=evaluators, text_embeddings=emb(key)
    )
  c.max_eval_examples = 2

  # R50: ResNet depth 50 with frozen BN, at 1/8 width; small multi-scale deformable
  # pixel decoder and transformer decoder.
  c.model = model_configs.model_config("r50")
  c.model.backbone.width = 8
  c.model.pixel_decoder.update(dim=32, layers=1, heads=4, points=2, ffn=64)
  c.model.decoder.update(num_queries=8, layers=1, heads=4, ffn=64, dim=32)
  c.model.classifier.text_dim = TEXT_DIM
  c.classifier = "text"
  c.loss.num_points = 16 * 16
  c.loss.deep_supervision = False  # one decoder layer: a smaller program to compile.
  c.augment.scale_min, c.augment.scale_max = 0.5, 1.5
  c.optimizer.backbone_multiplier = 1.0  # no pretrained backbone.
  c.optimizer.clip_norm = 1.0
  c.log_every = 1
  c.checkpoint_every = arg.steps
  c.eval_every = arg.steps
  c.keep_checkpoints = 1
  c.mesh.data = -1
  return c
