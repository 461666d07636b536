r"""Scores a checkpoint on datasets, including ones it never saw (direct transfer).

  # the run's own eval_datasets (config.json of the workdir), latest checkpoint:
  python -m dataseg.evaluate --workdir=workdirs/demo
  # direct transfer: a dataset absent from training, scored with its class names only:
  python -m dataseg.evaluate --workdir=workdirs/demo --dataset=shapes_transfer
  # the same images under other names (one per class, in the dataset's class order),
  # or another packaged vocabulary of the same classes:
  python -m dataseg.evaluate --workdir=W --dataset=shapes_transfer --task=semantic \
      --class_names=orb,slab,cone,sea,field,dunes,street
  # prediction files of any other system (COCO panoptic PNG+JSON, COCO results JSON,
  # semantic PNGs), scored by dataseg/metrics/files.py:
  python -m dataseg.evaluate --task=panoptic --gt_json=G.json --gt_dir=G \
      --pred_json=P.json --pred_dir=P

The checkpoint is restored onto whatever devices exist (parameters replicated, all
devices on the batch axis), whatever mesh it was trained on; EMA parameters are used
when the run kept them. Scoring is the trainer's own (dataseg/train/eval_loop.py:
`evaluate_all`), so numbers equal those of `python -m dataseg.main --mode=eval`.
Prints the metrics table; `--output_json` writes every metric.
"""

import copy
import dataclasses
import json
import os
from typing import Any, Sequence

from absl import flags
from ml_collections import config_flags
import numpy as np

from dataseg import cli
from dataseg import config_lib


def _entry(config, dataset, task, evaluators):
  """The eval entry for `dataset`: the run's own if it has one, else a new one."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from input_pipeline import datasets as datasets_lib  # pylint: disable=g-import-not-at-top

  for entry in config.eval_datasets.values():
    if entry.name == dataset and (task is None or entry.task == task):
      entry = copy.deepcopy(entry)
      if evaluators:
        entry.evaluators = list(evaluators)
      return entry
  info = datasets_lib.lookup(dataset)
  if task is None:
    task = next((t for t in info["tasks"] if t != "boxes"), info["tasks"][0])
  return common.dataset(dataset, task, evaluators=evaluators or ())


def eval_config(
  config,
  *,
  dataset=None,
  task=None,
  split=None,
  vocab=None,
  evaluators=None,
  max_eval_examples=None,
  eval_batch_size=None,
):
  """A copy of the run's config whose eval_datasets is what to score."""
  config = copy.deepcopy(config)
  with config.unlocked():
    if dataset:
      entry = _entry(config, dataset, task, evaluators)
      config.eval_datasets = type(config.eval_datasets)()
      config.eval_datasets[dataset] = entry
    elif task or evaluators:
      raise ValueError("--task / --evaluators need --dataset")
    for entry in config.eval_datasets.values():
      if split:
        entry.eval_split = split
      if vocab:
        entry.vocab = vocab
    if max_eval_examples is not None:
      config.max_eval_examples = max_eval_examples
    if eval_batch_size:
      config.eval_batch_size = eval_batch_size
  return config


def _check_learned(run_config, config):
  """A learned classifier's table is [datasets, V, D]: keep the training V."""
  from dataseg.vocab import padded as padded_vocab  # pylint: disable=g-import-not-at-top

  if config.classifier == "learned":
    size = padded_vocab.config_vocab_size(run_config)
    with config.unlocked():
      config.vocab_size = size


def evaluate(
  workdir,
  *,
  config=None,
  step=None,
  dataset=None,
  task=None,
  split=None,
  vocab=None,
  class_names=None,
  evaluators=None,
  max_eval_examples=None,
  eval_batch_size=None,
  out_dir=None,
  mesh=None,
  run=None,
) -> tuple[int, dict[str, Any]]:
  """(step, {'<dataset>/<evaluator>/<metric>': value}) of a workdir's checkpoint.

  Args:
    workdir: a `dataseg.main` workdir (config.json + checkpoints/).
    config: the config to use instead of the run's config.json.
    step: checkpoint step (default: latest).
    dataset: score this registry dataset only (its entry in the run's eval_datasets if
      any, else a new one: direct transfer when the run never trained on it).
    task, split, evaluators: of that entry (defaults: the run's, or the dataset's first
      task with its default evaluators, the 'validation' split).
    vocab: a packaged vocabulary name replacing the dataset's (same classes, in order).
    class_names: names replacing the dataset's class names one for one (open vocabulary).
    max_eval_examples, eval_batch_size: overrides (0 examples = whole split).
    out_dir: where overlay PNGs go (none when None).
    mesh: default: every device on the batch axis.
    run: an already restored `predictor.Run` of this workdir (e.g. a Predictor's
      `.run`) to score instead of restoring the checkpoint again (`step` and `mesh`
      are then the run's).
  """
  # Heavy imports here: `--help` and the file-scoring path stay light.
  from dataseg import predictor  # pylint: disable=g-import-not-at-top
  from dataseg.train import eval_loop  # pylint: disable=g-import-not-at-top
  from dataseg.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from dataseg.vocab import padded as padded_vocab  # pylint: disable=g-import-not-at-top

  workdir = os.fspath(workdir)
  if config is None:
    config = run.config if run is not None else config_lib.load_workdir_config(workdir)
  run_config = config
  config = eval_config(
    run_config,
    dataset=dataset,
    task=task,
    split=split,
    vocab=vocab,
    evaluators=evaluators,
    max_eval_examples=max_eval_examples,
    eval_batch_size=eval_batch_size,
  )
  _check_learned(run_config, config)
  if run is None:
    run = predictor.load_run(
      workdir, config=config, step=step, mesh=mesh or sharding_lib.data_parallel_mesh()
    )
  else:  # the restored parameters do not depend on the padded vocabulary size.
    vocabs = padded_vocab.build_vocabularies(config, workdir)
    run = dataclasses.replace(
      run, config=config, vocabs=vocabs, vocab_size=padded_vocab.vocab_size(config, vocabs)
    )
  if class_names is not None:
    _rename_classes(run, class_names)
  data_dir = config.data_dir or os.path.join(workdir, "data")
  results = eval_loop.evaluate_all(
    config, run.setup, run.state, data_dir, run.vocabs, out_dir=out_dir
  )
  return run.step, results


def _rename_classes(run, class_names):
  """Open vocabulary on a dataset: its classes scored under `class_names` (same order)."""
  from dataseg.vocab import padded as padded_vocab  # pylint: disable=g-import-not-at-top

  keys = [k for k in run.vocabs if k.startswith("eval:")]
  if len(keys) != 1:
    raise ValueError("--class_names needs exactly one eval dataset (use --dataset)")
  old = run.vocabs[keys[0]]
  if len(class_names) != len(old.names):
    raise ValueError(
      f"--class_names has {len(class_names)} names; the dataset has "
      f"{len(old.names)} classes ({', '.join(old.names)})"
    )
  new = padded_vocab.from_names(
    run.config, run.vocabs, run.vocab_size, class_names, old.is_thing[: len(old.names)], run.workdir
  )
  if len(new.valid) != len(old.valid):  # keep the run's padded size (one program).
    raise ValueError("--class_names: padded vocabulary size changed")
  run.vocabs[keys[0]] = dataclasses.replace(old, names=new.names, text=new.text)


def _print_results(step, results, config_datasets):
  from dataseg.train import eval_loop  # pylint: disable=g-import-not-at-top

  print(f"checkpoint step {step}")
  print(eval_loop.format_table(results))
  rows = sorted({k.split("/")[0] for k in results})
  for r in rows:
    summary = {
      k[len(r) + 1 :]: v
      for k, v in results.items()
      if k.startswith(r + "/") and k.count("/") == 2 and np.isscalar(v)
    }
    print(
      f"\n{r}"
      + ("  (direct transfer: never trained on)" if r not in config_datasets else "")
      + "  [fractions of 1]"
    )
    for k, v in summary.items():
      print(f"  {k:28s}{v:10.4f}")


_FLAGS = cli.new_flags()
_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "config file[:args] instead of <workdir>/config.json",
  lock_config=True,
  flag_values=_FLAGS,
)
flags.DEFINE_string("workdir", None, "a dataseg.main workdir", flag_values=_FLAGS)
flags.DEFINE_integer("step", None, "checkpoint step (default: latest)", flag_values=_FLAGS)
flags.DEFINE_string(
  "dataset", None, "a registry dataset (default: the run's eval_datasets)", flag_values=_FLAGS
)
flags.DEFINE_string(
  "task",
  None,
  "checkpoint: panoptic|semantic|instance|boxes; files: panoptic|semantic|instance|box",
  flag_values=_FLAGS,
)
flags.DEFINE_string(
  "split", None, "split to score (default: the entry's eval_split)", flag_values=_FLAGS
)
flags.DEFINE_list("evaluators", None, "comma-separated, e.g. panoptic,semantic", flag_values=_FLAGS)
flags.DEFINE_string("vocab", None, "a packaged vocabulary (dataseg/vocab)", flag_values=_FLAGS)
flags.DEFINE_string(
  "class_names",
  None,
  "comma-separated names, one per class of the dataset, in order",
  flag_values=_FLAGS,
)
flags.mark_flags_as_mutual_exclusive(["vocab", "class_names"], flag_values=_FLAGS)
flags.DEFINE_integer("max_eval_examples", None, "0 = whole split", flag_values=_FLAGS)
flags.DEFINE_integer("eval_batch_size", None, "eval batch size", flag_values=_FLAGS)
flags.DEFINE_string("overlays_dir", None, "write a few overlay PNGs there", flag_values=_FLAGS)
flags.DEFINE_string("output_json", None, "write every metric there", flag_values=_FLAGS)
# Scoring prediction files (dataseg/metrics/files.py): --pred_json / --pred_dir select it.
flags.DEFINE_string("gt_json", None, "files: ground-truth JSON", flag_values=_FLAGS)
flags.DEFINE_string("gt_dir", None, "files: ground-truth PNG folder", flag_values=_FLAGS)
flags.DEFINE_string("pred_json", None, "files: prediction JSON", flag_values=_FLAGS)
flags.DEFINE_string("pred_dir", None, "files: prediction PNG folder", flag_values=_FLAGS)
flags.DEFINE_string(
  "categories_json", None, "files, semantic: class names, in class-id order", flag_values=_FLAGS
)
flags.DEFINE_integer(
  "num_classes", None, "files, semantic: instead of --categories_json", flag_values=_FLAGS
)
flags.DEFINE_bool(
  "reduce_zero_label",
  False,
  "files, semantic: gt stores 0 = unlabelled, 1..K = classes (ADE20k)",
  flag_values=_FLAGS,
)
flags.DEFINE_integer("ignore_value", 255, "files, semantic: gt ignore value", flag_values=_FLAGS)

_PROG = "python -m dataseg.evaluate"
_CHECKPOINT_TASKS = ("panoptic", "semantic", "instance", "boxes")


def _score_files(args) -> dict[str, Any]:
  """Prediction files of any system against ground-truth files (no checkpoint)."""
  from dataseg.metrics import exports  # pylint: disable=g-import-not-at-top
  from dataseg.metrics import files  # pylint: disable=g-import-not-at-top

  if args.task not in files.TASKS:
    cli.usage_error(_PROG, f"scoring files needs --task in {', '.join(files.TASKS)}")

  def need(*names):
    missing = [n for n in names if args[n].value is None]
    if missing:
      cli.usage_error(_PROG, f"--task={args.task} needs " + ", ".join(f"--{n}" for n in missing))

  if args.task == "panoptic":
    need("gt_json", "gt_dir", "pred_json", "pred_dir")
    metrics = files.evaluate_panoptic_files(
      args.gt_json, args.gt_dir, args.pred_json, args.pred_dir
    )
  elif args.task == "semantic":
    need("gt_dir", "pred_dir")
    if args.categories_json:
      names = files.load_class_names(args.categories_json)
    elif args.num_classes:
      names = [str(i) for i in range(args.num_classes)]
    else:
      cli.usage_error(_PROG, "--task=semantic needs --categories_json or --num_classes")
    metrics = files.evaluate_semantic_files(
      args.gt_dir,
      args.pred_dir,
      names,
      gt_ignore_value=args.ignore_value,
      reduce_zero_label=args.reduce_zero_label,
    )
  else:
    need("gt_json", "pred_json")
    metrics = files.evaluate_coco_files(
      args.gt_json, args.pred_json, "segm" if args.task == "instance" else "bbox"
    )
  print(files.format_table(metrics))
  if args.output_json:
    exports.write_json(args.output_json, metrics)
  return metrics


def main(argv: Sequence[str] | None = None):
  """`python -m dataseg.evaluate FLAGS`; `argv` holds the flags (default sys.argv[1:])."""
  args = cli.parse(_FLAGS, argv, prog=_PROG, doc=__doc__)
  if args.pred_json is not None or args.pred_dir is not None:
    if args.workdir is not None:
      cli.usage_error(
        _PROG,
        "--workdir scores a checkpoint, --pred_json/--pred_dir score files: pass one or the other",
      )
    return _score_files(args)
  if args.workdir is None:
    cli.usage_error(_PROG, "--workdir is required (or --pred_json/--pred_dir to score files)")
  if args.task is not None and args.task not in _CHECKPOINT_TASKS:
    cli.usage_error(_PROG, f"--task must be one of {', '.join(_CHECKPOINT_TASKS)}")
  config = _CONFIG.value
  step, results = evaluate(
    args.workdir,
    config=config,
    step=args.step,
    dataset=args.dataset,
    task=args.task,
    split=args.split,
    vocab=args.vocab,
    class_names=(
      [n.strip() for n in args.class_names.split(",") if n.strip()] if args.class_names else None
    ),
    evaluators=args.evaluators or None,
    max_eval_examples=args.max_eval_examples,
    eval_batch_size=args.eval_batch_size,
    out_dir=args.overlays_dir,
  )
  if config is None:
    config = config_lib.load_workdir_config(args.workdir)
  _print_results(step, results, {e.name for e in config.datasets.values()})
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(
        dict(step=step, metrics={k: float(v) for k, v in results.items() if np.isscalar(v)}),
        f,
        indent=1,
        sort_keys=True,
      )
  return results


if __name__ == "__main__":
  main()
