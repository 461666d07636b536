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
  # semantic PNGs): scored by dataseg/metrics/files.py:
  python -m dataseg.evaluate --task=panoptic --gt_json=G.json --gt_dir=G \
      --pred_json=P.json --pred_dir=P

The checkpoint is restored onto whatever devices exist (parameters replicated, all
devices on the batch axis), whatever mesh it was trained on; EMA parameters are used
when the run kept them. Scoring is the trainer's own (dataseg/train/eval_loop.py:
`evaluate_all`), so numbers equal those of `python -m dataseg.main --mode=eval`.
Prints the metrics table; `--output_json` writes every metric.
"""

import argparse
import copy
import dataclasses
import importlib.util
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

_FILE_FLAGS = ("--pred_json", "--pred_dir")


def load_config_file(spec: str):
  """'configs/demo.py:smoke' -> that file's get_config('smoke')."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_dataseg_eval_config", path)
  if module_spec is None:
    raise FileNotFoundError(f"--config: cannot load {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


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


def eval_config(config, *, dataset=None, task=None, split=None, vocab=None,
                evaluators=None, max_eval_examples=None, eval_batch_size=None):
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


def _check_learned(run_config, config, workdir):
  """A learned classifier's table is [datasets, V, D]: keep the training V."""
  from dataseg.train import data as data_lib  # pylint: disable=g-import-not-at-top
  if config.classifier == "learned":
    size = data_lib.vocab_size(run_config, data_lib.build_vocabularies(run_config, workdir))
    with config.unlocked():
      config.vocab_size = size


def evaluate(workdir, *, config=None, step=None, dataset=None, task=None, split=None,
             vocab=None, class_names=None, evaluators=None, max_eval_examples=None,
             eval_batch_size=None, out_dir=None, mesh=None, run=None
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
  from dataseg.train import data as data_lib  # pylint: disable=g-import-not-at-top
  from dataseg.train import eval_loop  # pylint: disable=g-import-not-at-top
  workdir = os.fspath(workdir)
  if config is None:
    config = run.config if run is not None else predictor.load_config(workdir)
  run_config = config
  config = eval_config(run_config, dataset=dataset, task=task, split=split, vocab=vocab,
                       evaluators=evaluators, max_eval_examples=max_eval_examples,
                       eval_batch_size=eval_batch_size)
  _check_learned(run_config, config, workdir)
  if run is None:
    run = predictor.load_run(workdir, config=config, step=step,
                             mesh=mesh or predictor.data_parallel_mesh())
  else:  # the restored parameters do not depend on the padded vocabulary size.
    vocabs = data_lib.build_vocabularies(config, workdir)
    run = dataclasses.replace(run, config=config, vocabs=vocabs,
                              vocab_size=data_lib.vocab_size(config, vocabs))
  if class_names is not None:
    _rename_classes(run, class_names)
  data_dir = config.data_dir or os.path.join(workdir, "data")
  results = eval_loop.evaluate_all(config, run.setup, run.state, data_dir, run.vocabs,
                                    out_dir=out_dir)
  return run.step, results


def _rename_classes(run, class_names):
  """Open vocabulary on a dataset: its classes scored under `class_names` (same order)."""
  from dataseg.predictor import Predictor  # pylint: disable=g-import-not-at-top
  keys = [k for k in run.vocabs if k.startswith("eval:")]
  if len(keys) != 1:
    raise ValueError("--class_names needs exactly one eval dataset (use --dataset)")
  old = run.vocabs[keys[0]]
  if len(class_names) != len(old.names):
    raise ValueError(f"--class_names has {len(class_names)} names; the dataset has "
                     f"{len(old.names)} classes ({', '.join(old.names)})")
  new = Predictor(run).vocabulary(class_names, is_thing=old.is_thing[:len(old.names)])
  if len(new.valid) != len(old.valid):  # keep the run's padded size (one program).
    raise ValueError("--class_names: padded vocabulary size changed")
  run.vocabs[keys[0]] = dataclasses.replace(old, names=new.names, text=new.text)


def _print_results(step, results, config_datasets):
  from dataseg.train import eval_loop  # pylint: disable=g-import-not-at-top
  print(f"checkpoint step {step}")
  print(eval_loop.format_table(results))
  rows = sorted({k.split("/")[0] for k in results})
  for r in rows:
    summary = {k[len(r) + 1:]: v for k, v in results.items()
               if k.startswith(r + "/") and k.count("/") == 2 and np.isscalar(v)}
    print(f"\n{r}" + ("  (direct transfer: never trained on)"
                      if r not in config_datasets else "") + "  [fractions of 1]")
    for k, v in summary.items():
      print(f"  {k:28s}{v:10.4f}")


def main(argv: Sequence[str] | None = None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a.split("=")[0] in _FILE_FLAGS for a in argv):
    from dataseg.metrics import files  # pylint: disable=g-import-not-at-top
    return files.main(argv)
  p = argparse.ArgumentParser(prog="python -m dataseg.evaluate",
                              description=__doc__.split("\n")[0],
                              epilog=__doc__.split("\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--step", type=int, default=None, help="default: latest checkpoint")
  p.add_argument("--config", default=None,
                 help="config file[:args] instead of <workdir>/config.json")
  p.add_argument("--dataset", default=None, help="a registry dataset (default: the run's "
                 "eval_datasets)")
  p.add_argument("--task", default=None, choices=("panoptic", "semantic", "instance", "boxes"))
  p.add_argument("--split", default=None)
  p.add_argument("--evaluators", default=None, help="comma-separated, e.g. panoptic,semantic")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--vocab", default=None, help="a packaged vocabulary (dataseg/vocab)")
  src.add_argument("--class_names", default=None,
                   help="comma-separated names, one per class of the dataset, in order")
  p.add_argument("--max_eval_examples", type=int, default=None)
  p.add_argument("--eval_batch_size", type=int, default=None)
  p.add_argument("--overlays_dir", default=None, help="write a few overlay PNGs there")
  p.add_argument("--output_json", default=None, help="write every metric there")
  args = p.parse_args(argv)

  config = load_config_file(args.config) if args.config else None
  step, results = evaluate(
      args.workdir, config=config, step=args.step, dataset=args.dataset, task=args.task,
      split=args.split, vocab=args.vocab,
      class_names=([n.strip() for n in args.class_names.split(",") if n.strip()]
                   if args.class_names else None),
      evaluators=args.evaluators.split(",") if args.evaluators else None,
      max_eval_examples=args.max_eval_examples, eval_batch_size=args.eval_batch_size,
      out_dir=args.overlays_dir)
  if config is None:
    from dataseg import predictor  # pylint: disable=g-import-not-at-top
    config = predictor.load_config(args.workdir)
  _print_results(step, results, {e.name for e in config.datasets.values()})
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(dict(step=step, metrics={k: float(v) for k, v in results.items()
                                         if np.isscalar(v)}), f, indent=1, sort_keys=True)
  return results


if __name__ == "__main__":
  main()
