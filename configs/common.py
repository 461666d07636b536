"""Helpers shared by the config files (big_vision's habits: configs/common.py).

A config file is a runnable document: `get_config(arg)` takes a short comma-separated argument
string (`configs/demo.py:smoke`, `configs/demo.py:res=128,steps=50`) parsed by `parse_arg`, so
one file serves the smoke test and the full run.
"""

import ml_collections

from dataseg.model import configs as model_configs
from dataseg.objective import config as objective_config


def parse_arg(arg, **spec):
  """'smoke,res=128' -> ConfigDict(smoke=True, res=128), typed by `spec`'s defaults.

  A bare word sets a bool to True. Unknown names fail, naming the allowed ones.
  """
  result = ml_collections.ConfigDict(spec)
  for part in filter(None, (arg or "").split(",")):
    name, eq, value = part.partition("=")
    if name not in spec:
      raise ValueError(f"config argument {name!r} is unknown; allowed: {', '.join(sorted(spec))}")
    default = spec[name]
    if not eq:
      value = True
    elif isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes", "y")
    elif default is not None:
      value = type(default)(value)
    result[name] = value
  return result


def dataset(
  name,
  task,
  *,
  weight=1.0,
  split="train",
  eval_split="validation",
  evaluators=(),
  reader=None,
  vocab=None,
  text_embeddings=None,
):
  """One dataset entry of `config.datasets` / `config.eval_datasets`.

  `name` is a key of input_pipeline/datasets.py's registry, or 'custom' with a `reader` spec
  (format, json, image_dir, ...) for a user's own data. `vocab` overrides the registry's class
  list (direct transfer to any names); `text_embeddings` a precomputed .npy of them.
  """
  return ml_collections.ConfigDict(
    dict(
      name=name,
      task=task,
      weight=float(weight),
      split=split,
      eval_split=eval_split,
      evaluators=list(evaluators),
      reader=ml_collections.ConfigDict(reader or {}),
      vocab=vocab or "",
      text_embeddings=text_embeddings or "",
    )
  )


def base_config():
  """Every key a config may set, with defaults; config files change what they need."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data_dir = ""  # '' -> <workdir>/data (the synthetic suite is generated there on first use).
  c.image_size = 1024
  c.eval_image_size = 1024
  c.max_segments = 100
  c.vocab_size = 0  # static padded vocabulary size; 0 -> the largest dataset's.
  c.batch_size = 16  # global, per step.
  c.eval_batch_size = 8
  c.total_steps = 90_000
  c.log_every = 50
  c.eval_every = 5000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.best_metric = ""  # e.g. 'shapes_panoptic/panoptic/PQ'; '' keeps the last k only.
  c.max_eval_examples = 0  # 0 = whole split.
  c.mixing = "per_step"  # 'per_step' (the paper: one dataset per step) | 'quota'.
  c.on_bad_input = "skip"  # 'skip' (count + log) | 'fail'.
  c.augment = ml_collections.ConfigDict(
    dict(scale_min=0.1, scale_max=2.0, flip=True, color_jitter=False)
  )
  c.datasets = ml_collections.ConfigDict()  # name -> dataset(...)
  c.eval_datasets = ml_collections.ConfigDict()
  c.text = ml_collections.ConfigDict(dict(encoder="minilm", templates="default", cache_dir=""))
  c.classifier = "text"  # 'text' (the paper) | 'learned' (per-dataset learned, an ablation).
  c.model = model_configs.model_config("r50")
  c.loss = objective_config.loss_config()
  # Mask losses on at most 50 targets per image (static rows): the objective's time grows
  # with the rows (bench/loss.py); the metric dropped_mask_targets says how often a
  # dataset has more (those get no mask loss; raise this, or 0 = every slot, if often).
  c.loss.max_mask_targets = 50
  # Post-processing thresholds live in c.loss.post (dataseg/objective/config.py).
  c.optimizer = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      weight_decay=0.05,
      backbone_multiplier=0.1,
      schedule="poly",
      poly_power=0.9,
      warmup_steps=0,
      step_boundaries=(0.89, 0.96),
      step_factor=0.1,
      clip_norm=0.01,
      grad_accum_steps=1,
      ema_decay=0.0,
      b1=0.9,
      b2=0.999,
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))
  # logical axis -> mesh axis ('' = replicated). Data-parallel by default; FSDP: embed->fsdp.
  c.sharding_rules = (
    ("embed", ""),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", ""),
    ("conv_out", ""),
    ("batch", ("data", "fsdp")),
  )
  c.init_from = ""  # checkpoint dir: load parameters only (fine-tuning / transfer).
  c.transfer_guard = True  # disallow implicit host<->device copies in the train step.
  # jax's persistent compilation cache (dataseg/train/compile_cache.py): a resume, a restart
  # after pre-emption or a second run loads the programs it compiled before; '' disables.
  # Default ~/.cache/dataseg/jax_compilation_cache (JAX_COMPILATION_CACHE_DIR, if set, wins
  # over this default).
  c.compilation_cache_dir = "~/.cache/dataseg/jax_compilation_cache"
  # glibc malloc keeps freed memory for the next step (one arena, no mmap'd blocks, no
  # trimming; dataseg/train/host_memory.py): True, False, or 'cpu' = when jax computes on
  # the host CPU (no GPU/TPU). XLA:CPU's per-step temporaries are otherwise page-faulted in
  # anew every step (R50 512x512 step on 2 CPU cores: 8.7-9.1 s instead of 10.8-12.3 s).
  # Off by default: with one malloc arena XLA compiles ~35% slower (threads contend for it:
  # 62 s instead of 46 s for bench/train_step.py's 128x128 step), which costs a debug run,
  # the demo and the test suite more than the faults; and the heap never shrinks.
  c.retain_freed_memory = False
  return c
