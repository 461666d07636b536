"""Start-up checks of a config: fail early, naming the key and the allowed values."""

from dataseg import schema
from input_pipeline import datasets as datasets_lib

_EVALUATORS = ("panoptic", "semantic", "instance", "box")


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
        raise ValueError(f"config.{prefix}.task = {entry.task!r}: dataset {entry.name!r} "
                         f"supports tasks {', '.join(info['tasks'])}")
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
