"""Configs: a run's saved config, and start-up checks that fail early naming the key.

`load_workdir_config` reads the config a run saved (`<workdir>/config.json`); config files
(configs/*.py) are loaded by absl's `config_flags`, as `dataseg.main` does.

`validate` checks the config alone; `check_inputs` checks that what it names exists here
(prepared datasets, raw files, a text encoder or cached embeddings) before anything heavy
runs, so a run on a machine without data or network stops in seconds saying what is
missing and how to get it, instead of retrying downloads for minutes.
"""

import json
import os

import ml_collections

from dataseg import schema
from input_pipeline import datasets as datasets_lib

_EVALUATORS = ("panoptic", "semantic", "instance", "box")
_PREPARE = "README, 'Preparing the paper's datasets'"


def load_workdir_config(workdir) -> ml_collections.ConfigDict:
  """The run's config (`<workdir>/config.json`, written by the trainer at step 0).

  Read through tf.io.gfile, so a gs:// workdir works as a local one.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  path = os.path.join(os.fspath(workdir), "config.json")
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a dataseg.main workdir?")
  with tf.io.gfile.GFile(path) as f:
    return ml_collections.ConfigDict(json.load(f))


class StartupError(ValueError):
  """Something the config needs is missing; the message has one line per problem."""


def validate(config):
  """Raises ValueError on an unknown dataset, task, evaluator or choice."""

  def choice(key, value, allowed):
    if value not in allowed:
      raise ValueError(f"config.{key} = {value!r} is not allowed; allowed: {', '.join(allowed)}")

  if not len(config.datasets) and not len(config.eval_datasets):
    raise ValueError("config.datasets and config.eval_datasets are both empty")
  for group in ("datasets", "eval_datasets"):
    for key, entry in config[group].items():
      prefix = f"{group}.{key}"
      info = datasets_lib.lookup(entry.name) if entry.name in datasets_lib.DATASETS else None
      if info is None:
        choice(f"{prefix}.name", entry.name, sorted(datasets_lib.DATASETS))
      choice(f"{prefix}.task", entry.task, schema.TASKS)
      if entry.task not in info["tasks"]:
        raise ValueError(
          f"config.{prefix}.task = {entry.task!r}: dataset {entry.name!r} "
          f"supports tasks {', '.join(info['tasks'])}"
        )
      for ev in entry.evaluators:
        choice(f"{prefix}.evaluators", ev, _EVALUATORS)
      if entry.name == "custom" and (not entry.reader or not entry.vocab):
        raise ValueError(f"config.{prefix}: a 'custom' dataset needs `reader` and `vocab`")
      if group == "datasets" and entry.weight <= 0:
        raise ValueError(f"config.{prefix}.weight must be > 0, got {entry.weight}")
  choice("mixing", config.mixing, ("per_step", "quota"))
  choice("on_bad_input", config.on_bad_input, ("skip", "fail"))
  choice("classifier", config.classifier, ("text", "learned"))
  choice("optimizer.schedule", config.optimizer.schedule, ("poly", "step", "cosine", "constant"))
  choice("model.dtype", config.model.dtype, ("float32", "bfloat16"))
  for axis in ("data", "fsdp", "model"):
    if config.mesh[axis] == 0 or config.mesh[axis] < -1:
      raise ValueError(f"config.mesh.{axis} must be a positive size or -1, got {config.mesh[axis]}")
  if config.image_size % 32 or config.eval_image_size % 32:
    raise ValueError("config.image_size / eval_image_size must be multiples of 32")


def _dataset_problems(key, entry, data_dir):
  """Problems of one dataset entry's files (no reading beyond existence checks)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  info = datasets_lib.lookup(entry.name)
  if info["source"] == "synthetic":
    return []  # generated on first use.
  split = entry.split if key.startswith("datasets.") else entry.eval_split
  spec = datasets_lib.reader_spec(entry.name, split, data_dir, entry.reader.to_dict())
  fmt = spec.get("format")
  if fmt == "tfds":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    where = spec.get("data_dir") or data_dir
    name = spec["tfds_name"]
    try:
      prepared = tfds.builder(name, data_dir=where).is_prepared()
    except Exception:  # pylint: disable=broad-except
      prepared = False
    if not prepared:
      return [
        f"dataset {key} ({entry.name}): TFDS {name} is not prepared under {where}; "
        f"build it with `tfds build {name} --data_dir=DIR` and pass "
        f"--config.data_dir=DIR ({_PREPARE})"
      ]
    return []
  if fmt == "objects365_tfds":
    where = spec.get("data_dir") or data_dir
    if not tf.io.gfile.exists(os.path.join(where, spec.get("tfds_name", "objects365"))):
      return [
        f"dataset {key} ({entry.name}): the Objects365 TFDS dataset is not built under "
        f"{where}; build it with input_pipeline/readers/objects365_builder.py and pass "
        f"--config.data_dir=DIR ({_PREPARE})"
      ]
    return []
  problems = []
  for field in ("json", "image_dir", "mask_dir", "file_list"):
    path = spec.get(field)
    if field in spec and not path:
      problems.append(
        f"dataset {key} ({entry.name}): reader field {field!r} is not set; "
        f"set --config.<datasets|eval_datasets>.{key}.reader.{field} "
        f"({_PREPARE})"
      )
    elif path and not tf.io.gfile.exists(path):
      problems.append(f"dataset {key} ({entry.name}): {field} {path} does not exist ({_PREPARE})")
  return problems


def check_inputs(config, workdir, data_dir):
  """Raises StartupError listing every missing dataset, text encoder and weights file.

  Cheap: existence checks and a 3 s reachability probe of the model hub, no downloads.
  """
  from dataseg import text as text_lib  # pylint: disable=g-import-not-at-top
  from dataseg import vocab as vocab_lib  # pylint: disable=g-import-not-at-top

  problems = []
  for group in ("datasets", "eval_datasets"):
    for key, entry in config[group].items():
      for problem in _dataset_problems(f"{group}.{key}", entry, data_dir):
        if problem.split(": ", 1)[1] not in [p.split(": ", 1)[1] for p in problems]:
          problems.append(problem)  # a dataset trained and evaluated: said once.
  if config.classifier == "text":
    templates = (
      config.text.templates.split("|")
      if config.text.templates != "default"
      else text_lib.DEFAULT_TEMPLATES
    )
    cache = config.text.cache_dir or os.path.join(workdir, "text_cache")
    missing = []
    for group in ("datasets", "eval_datasets"):
      for entry in config[group].values():
        if entry.text_embeddings:
          continue
        vocab = entry.vocab or datasets_lib.lookup(entry.name)["vocab"]
        names = vocab_lib.load(vocab).class_names
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        path = text_lib.cache_path(names, config.text.encoder, templates, cache)
        if not tf.io.gfile.exists(path) and vocab not in missing:
          missing.append(vocab)
    if missing:
      problem = text_lib.encoder_problem(config.text.encoder, ",".join(missing), cache)
      if problem:
        problems.append(
          f"class-name embeddings of {', '.join(missing)} are not cached in {cache} and {problem}"
        )
  from dataseg.model import weights as weights_lib  # pylint: disable=g-import-not-at-top

  problem = weights_lib.pretrained_problem(config)
  if problem:
    problems.append(problem)
  if problems:
    raise StartupError("\n".join(problems))
