"""Evaluation of a train state on the config's eval datasets (trainer and `--mode=eval`).

On device, the one inference program (dataseg/inference.py, shared with the Predictor):
the model's final-layer proposals, mask logits resized to the padded eval image, then
every task's post-processing (dataseg/objective/postprocess.py). On host: each valid example is
cropped to its valid region and handed to the evaluators (dataseg/metrics). Every host
evaluates its own shard; `evaluators.gather` combines them once; padding examples
(`example_valid` False) never count.

Predictions are scored at the eval resolution (longer side = `eval_image_size`) against
the ground truth resized the same way (nearest), not at the original resolution.
A few overlay PNGs per dataset go to `<out_dir>/<dataset>/`.
"""

import os

import jax
import numpy as np

from dataseg import inference
from dataseg import visualize
from dataseg.metrics import evaluators as evaluators_lib
from dataseg.train import data as data_lib

_NUM_OVERLAYS = 4


def _crop(x, h, w):
  return x[..., :h, :w]


def evaluate_dataset(config, s, state, entry, vocab, data_dir, out_dir=None):
  """{metric: value} of one eval dataset entry."""
  names = tuple(entry.evaluators) or data_lib.default_evaluators(entry.task)
  evs = {
    n: evaluators_lib.make_evaluator(
      n, class_names=list(vocab.names), is_thing=vocab.is_thing[: len(vocab.names)]
    )
    for n in names
  }
  vocab_dev = jax.device_put(vocab.arrays())
  thresholds = inference.config_thresholds(config)
  overlays = 0
  for batch in data_lib.eval_batches(config, entry, data_dir, vocab):
    out = inference.predict(
      s, state, batch["image"], batch["valid"], vocab_dev, thresholds, top_k=config.loss.post.top_k
    )
    for i in np.nonzero(batch["example_valid"])[0]:
      h, w = inference.valid_size(batch["valid"][i])
      gt = dict(
        segment_map=_crop(batch["segment_map"][i], h, w),
        seg_class=batch["seg_class"][i],
        seg_is_crowd=batch["seg_is_crowd"][i],
        seg_valid=batch["seg_valid"][i],
        seg_box=batch["seg_box"][i],
      )
      gt["seg_class"] = np.where(gt["seg_valid"], gt["seg_class"], -1)
      image_id = int(batch["image_id"][i])
      if "semantic" in evs:
        evs["semantic"].add(image_id, _crop(out["semantic"][i], h, w), gt)
      if "panoptic" in evs:
        p = out["panoptic"]
        pred = dict(segment_map=_crop(p["segment_map"][i], h, w), seg_class=p["seg_class"][i])
        evs["panoptic"].add(image_id, pred, gt)
      keep = out["instance"]["classes"][i] >= 0
      inst = dict(
        masks=_crop(out["instance"]["masks"][i][keep], h, w),
        classes=out["instance"]["classes"][i][keep],
        scores=out["instance"]["scores"][i][keep],
      )
      for n in ("instance", "box"):
        if n in evs:
          evs[n].add(image_id, inst, gt)
      if out_dir and overlays < _NUM_OVERLAYS and jax.process_index() == 0:
        task = next(t for t in inference.TASKS if t in evs or (t == "instance" and "box" in evs))
        result = inference.example_result(out, i, task, vocab.names, vocab.is_thing, (h, w))
        result["image"] = batch["image"][i][:h, :w]
        visualize.save_png(
          os.path.join(out_dir, entry.name, f"{image_id}.png"), inference.overlay(result)
        )
        overlays += 1
  results = {}
  for n, ev in evs.items():
    ev = evaluators_lib.gather(ev)
    for key, value in ev.result().items():
      results[f"{n}/{key}"] = value
  return results


def evaluate_all(config, s, state, data_dir, vocabs, out_dir=None):
  """Evaluates every entry of `config.eval_datasets`; keys '<entry>/<evaluator>/<metric>'."""
  results = {}
  for key, entry in config.eval_datasets.items():
    vocab = vocabs[f"eval:{key}"]
    if config.classifier == "learned" and vocab.index < 0:
      print(
        f"[eval] {key}: skipped (a learned classifier has no weights for unseen "
        f"dataset {entry.name!r})",
        flush=True,
      )
      continue
    metrics = evaluate_dataset(config, s, state, entry, vocab, data_dir, out_dir)
    results.update({f"{key}/{k}": v for k, v in metrics.items()})
  return results


HEADLINE = (
  "panoptic/PQ",
  "panoptic/PQ_th",
  "panoptic/PQ_st",
  "semantic/mIoU",
  "instance/AP",
  "instance/AP50",
  "box/AP",
)


def format_table(results):
  """One results table: a row per eval dataset, a column per headline metric, in %."""
  rows = sorted({k.split("/")[0] for k in results})
  cols = [c for c in HEADLINE if any(f"{r}/{c}" in results for r in rows)]
  lines = [f"{'dataset':<20}" + "".join(f"{c:>16}" for c in cols)]
  for r in rows:
    cells = []
    for c in cols:
      v = results.get(f"{r}/{c}")
      ok = v is not None and np.isfinite(v) and v >= 0  # COCOeval's -1: no such objects.
      cells.append(f"{100 * v:>16.1f}" if ok else f"{'-':>16}")
    lines.append(f"{r:<20}" + "".join(cells))
  return "\n".join(lines)
