r"""Are the masks or the classes wrong? Classification of the best-matching proposals.

  python launch/class_accuracy.py --workdir=workdirs/demo --dataset=shapes_panoptic

For every ground-truth segment (crowd excluded) of the first `--num_examples` examples of
an eval dataset, takes the final-layer proposal whose mask (logit > 0, at the image's size)
overlaps it best (IoU), and reports, separately for things and stuff: the mean best IoU,
the mean probability of the true class, the accuracy of the argmax class (also among the
classes of the same kind only, thing vs thing or stuff vs stuff), and the
confusion matrix (rows: true class; columns: predicted class, last column background).
A low PQ with good IoU and chance-level accuracy says the classifier, not the masks, is
what has not been learned. With an auxiliary pixel head (config.model.pixel_head) it also
reports the pixel head's accuracy at the centre of each stride-4 cell, for thing and stuff
pixels and among the thing classes only: whether the features know the things' shapes.
"""

import os

from absl import app
from absl import flags
import jax
import numpy as np

from dataseg import images as images_lib
from dataseg import predictor as predictor_lib
from dataseg.objective import postprocess
from dataseg.train import data as data_lib
from dataseg.train import trainer
from input_pipeline import pipeline

_WORKDIR = flags.DEFINE_string("workdir", None, "a dataseg.main workdir", required=True)
_DATASET = flags.DEFINE_string("dataset", "shapes_panoptic", "an eval_datasets key")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 40, "examples of the dataset to use")


def best_proposals(p, key, num_examples):
  """Yields (true class, best IoU, class probabilities [V+1]) per ground-truth segment."""
  entry = p.config.eval_datasets[key]
  vocab = p.run.vocabs[f"eval:{key}"]
  arrays = vocab.arrays()
  reader = data_lib.reader_for(
    entry, os.path.join(p.run.workdir, "data"), entry.eval_split, vocab.is_thing
  )
  predict = trainer.make_predict_fn(p.run.setup)
  for ex in pipeline.host_dataset(reader, 0, 1).take(num_examples).as_numpy_iterator():
    image = ex["image"]
    padded, valid = images_lib.eval_preprocess(image, p.config.eval_image_size)
    class_logits, mask_logits = predict(p.run.state, padded[None], arrays)
    logits = np.asarray(postprocess.resize_to_image(mask_logits[0], valid.shape))
    h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
    masks = images_lib.resize_nearest(logits[:, :h, :w], image.shape[:2]) > 0
    probs = np.asarray(postprocess.class_probs(class_logits[0], arrays["valid"]))
    for s, (cls, crowd) in enumerate(zip(ex["seg_class"], ex["seg_is_crowd"])):
      gt = ex["segment_map"] == s
      if crowd or not gt.any():
        continue
      iou = (masks & gt).sum((1, 2)) / np.maximum((masks | gt).sum((1, 2)), 1)
      q = int(np.argmax(iou))
      yield int(cls), float(iou[q]), probs[q]


def pixel_confusion(p, key, num_examples):
  """[V, V] confusion of the pixel head at stride-4 cell centres (crowd / void skipped)."""
  entry = p.config.eval_datasets[key]
  vocab = p.run.vocabs[f"eval:{key}"]
  arrays = vocab.arrays()
  reader = data_lib.reader_for(
    entry, os.path.join(p.run.workdir, "data"), entry.eval_split, vocab.is_thing
  )
  s = p.run.setup
  params = p.run.state.get("ema", p.run.state["params"])

  @jax.jit
  def pixel_logits(images):
    model_params, text = trainer.model_inputs(s.config, params, arrays)
    out = s.model.apply(
      {"params": model_params, **p.run.state["frozen"]}, images, text, arrays["valid"]
    )
    return out["pixel_logits"]

  num = len(vocab.names)
  confusion = np.zeros((num, num), np.int64)
  for ex in pipeline.host_dataset(reader, 0, 1).take(num_examples).as_numpy_iterator():
    padded, valid = images_lib.eval_preprocess(ex["image"], p.config.eval_image_size)
    pred = np.argmax(np.asarray(pixel_logits(padded[None]))[0, ..., :num], -1)
    h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
    ih, iw = ex["image"].shape[:2]
    for i, j in np.ndindex(pred.shape):
      y, x = 4 * i + 2, 4 * j + 2  # cell centre in the padded frame.
      if y >= h or x >= w:
        continue
      seg = ex["segment_map"][y * ih // h, x * iw // w]
      if seg < 0 or ex["seg_is_crowd"][seg]:
        continue
      confusion[ex["seg_class"][seg], pred[i, j]] += 1
  return confusion


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  p = predictor_lib.Predictor.from_workdir(_WORKDIR.value)
  if _DATASET.value not in p.config.eval_datasets:
    raise SystemExit(
      f"--dataset={_DATASET.value!r} is not an eval dataset of "
      f"{_WORKDIR.value}; allowed: {', '.join(p.config.eval_datasets)}"
    )
  vocab = p.run.vocabs[f"eval:{_DATASET.value}"]
  names, num = list(vocab.names), len(vocab.names)
  rows = list(best_proposals(p, _DATASET.value, _NUM_EXAMPLES.value))
  confusion = np.zeros((num, num + 1), np.int64)
  for kind, thing in (("thing", True), ("stuff", False)):
    sel = [(c, iou, pr) for c, iou, pr in rows if bool(vocab.is_thing[c]) == thing]
    if not sel:
      continue
    iou = np.mean([r[1] for r in sel])
    p_true = np.mean([r[2][r[0]] for r in sel])
    acc = np.mean([np.argmax(r[2]) == r[0] for r in sel])
    # Among its own kind only (things vs things): separates "which shape" from "thing or
    # stuff" errors.
    same_kind = np.append(np.asarray(vocab.is_thing, bool) == thing, False)
    acc_kind = np.mean([np.argmax(np.where(same_kind, r[2], -1.0)) == r[0] for r in sel])
    print(
      f"{kind}: {len(sel)} segments, best IoU {iou:.2f}, p(true class) {p_true:.2f}, "
      f"accuracy {acc:.2f} (among {kind} classes only: {acc_kind:.2f})"
    )
  for c, _, pr in rows:
    confusion[c, int(np.argmax(pr))] += 1
  width = max(len(n) for n in names + ["background"]) + 1
  print("confusion (rows: true, columns: predicted)")
  print(" " * width + "".join(f"{n[:8]:>9s}" for n in names + ["backgr."]))
  for c in range(num):
    print(f"{names[c]:<{width}s}" + "".join(f"{v:9d}" for v in confusion[c]))
  if p.config.model.get("pixel_head", False):
    pix = pixel_confusion(p, _DATASET.value, _NUM_EXAMPLES.value)
    thing = np.asarray(vocab.is_thing, bool)
    for kind, sel in (("thing", thing), ("stuff", ~thing)):
      if pix[sel].sum():
        within = pix[sel][:, sel]
        print(
          f"pixel head, {kind} pixels: accuracy {np.trace(pix[sel][:, sel]) / pix[sel].sum():.2f}"
          f" (among {kind} classes only: {np.trace(within) / max(within.sum(), 1):.2f})"
        )


if __name__ == "__main__":
  app.run(main)
