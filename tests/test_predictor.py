"""The notebook Predictor and `python -m dataseg.evaluate` on a real (smoke) checkpoint.

The checkpoint comes from the README's demo command shortened to a few steps,
`WORKDIR=... CONFIG_ARGS=smoke bash launch/demo.sh`, built once and cached under /tmp keyed
on the training code (`smoke_workdir`; set DATASEG_TEST_SMOKE_WORKDIR to reuse an existing
workdir); tests/test_demo.py checks that run's own output. References: the trainer's own
evaluation on the same eval batches (the same program, dataseg/inference.py),
tf.image.resize for the resize back, PIL
for the written PNG, numpy for the file-scoring path.
"""

import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_NOT_TRAINING = {
  "dataseg/predictor.py",
  "dataseg/evaluate.py",
  "dataseg/images.py",
  "dataseg/metrics/files.py",
  "dataseg/plan.py",
  "dataseg/model/summary.py",
}


def _code_key():
  """Hash of the code a smoke run depends on (so a stale cache is never reused)."""
  h = hashlib.sha256()
  for folder in ("dataseg", "configs", "input_pipeline"):
    for path in sorted((ROOT / folder).rglob("*")):
      rel = path.relative_to(ROOT).as_posix()
      if path.suffix in (".py", ".json") and rel not in _NOT_TRAINING:
        h.update(rel.encode() + b"\0" + path.read_bytes())
  return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)  # one workdir per pytest session, even if code changes.
def smoke_workdir() -> pathlib.Path:
  """A trained smoke workdir, built once per code version (file lock: parallel-safe).

  Built by `launch/demo.sh` (set-up included); its terminal output and wall time are kept
  beside the workdir as demo_stdout.txt and demo_seconds.txt.
  """
  if os.environ.get("DATASEG_TEST_SMOKE_WORKDIR"):  # reuse a given workdir as is.
    return pathlib.Path(os.environ["DATASEG_TEST_SMOKE_WORKDIR"])
  base = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"dataseg_smoke_{_code_key()}"
  base.mkdir(parents=True, exist_ok=True)
  workdir, done = base / "workdir", base / "DONE"
  with open(base / "lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      if workdir.exists():
        shutil.rmtree(workdir)
      env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(ROOT),
        WORKDIR=str(workdir),
        CONFIG_ARGS="smoke",
      )
      start = time.time()
      proc = subprocess.run(
        ["bash", "launch/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True
      )
      if proc.returncode:
        raise RuntimeError(f"smoke demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
      (base / "demo_seconds.txt").write_text(f"{time.time() - start:.1f}\n")
      (base / "demo_stdout.txt").write_text(proc.stdout)
      done.write_text("ok\n")
      _prune_stale(base)
  os.utime(done)  # last use, for pruning.
  return workdir


def _prune_stale(keep, max_age_s=2 * 3600):
  """Drops smoke workdirs of older code (~200 MB each) unused for `max_age_s`."""
  for other in keep.parent.glob("dataseg_smoke_*"):
    done = other / "DONE"
    if other != keep and done.exists() and time.time() - done.stat().st_mtime > max_age_s:
      shutil.rmtree(other, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir():
  return smoke_workdir()


@pytest.fixture(scope="module")
def predictor(workdir):
  from dataseg.predictor import Predictor

  return Predictor.from_workdir(workdir)


def _eval_examples(p, key, n):
  """(first eval batch, original images in the same order) of eval entry `key`."""
  from dataseg.train import data as data_lib
  from input_pipeline import pipeline

  config = p.config.copy_and_resolve_references()
  with config.unlocked():
    config.eval_batch_size = n
    config.max_eval_examples = n
  entry = config.eval_datasets[key]
  vocab = p.run.vocabs[f"eval:{key}"]
  data_dir = os.path.join(p.run.workdir, "data")
  batch = next(data_lib.eval_batches(config, entry, data_dir, vocab))
  reader = data_lib.reader_for(entry, data_dir, entry.eval_split, vocab.is_thing)
  originals = [ex for ex in pipeline.host_dataset(reader, 0, 1).take(n).as_numpy_iterator()]
  assert [int(e["image_id"]) for e in originals] == list(batch["image_id"][:n])
  return batch, originals, vocab


def _class_per_pixel(seg_map, seg_class):
  seg_class = np.asarray(list(seg_class) + [-1], np.int64)  # a row for void (-1).
  return seg_class[np.where(seg_map >= 0, seg_map, len(seg_class) - 1)]


def _foreground_variant(p):
  """(Predictor, set-up) of the checkpoint with its background embedding negated and
  low post-processing thresholds.

  Six smoke steps teach the model mostly 'background': as saved, its panoptic output
  is all void. Both code paths below get this same variant (the same parameters and
  thresholds), so the comparison gets segments to compare. The Predictor keeps the
  run's set-up (its thresholds are call arguments: its programs are reused); the
  trainer's program reads them from the set-up's config.
  """
  from dataseg.predictor import Predictor

  def negate(path, x):
    return -x if jax.tree_util.keystr(path).endswith("['background']") else x

  state = jax.tree_util.tree_map_with_path(negate, p.run.state)
  config = p.config.copy_and_resolve_references()
  config.loss.post.update(score_threshold=0.0, overlap_threshold=0.0, mask_threshold=0.2)
  setup = dataclasses.replace(p.run.setup, config=config)
  return Predictor(dataclasses.replace(p.run, config=config, state=state)), setup


def _same_partition(a, b):
  """True when two segment-id maps split the pixels identically (ids may differ)."""
  pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
  return len({x for x, _ in pairs}) == len(pairs) == len({y for _, y in pairs})


class _Recorder:
  """Stands in for an evaluator: keeps what training-time evaluation hands it."""

  def __init__(self, name, **unused_kw):
    self.name, self.added = name, []

  def add(self, image_id, prediction, ground_truth):
    del ground_truth
    self.added.append((image_id, prediction))

  def result(self):
    return {}


@pytest.mark.parametrize("variant", ["as_saved", "foreground"])
def test_predictor_runs_the_evaluation_program(predictor, variant, monkeypatch):
  """Same images, same checkpoint: the Predictor returns what the trainer's eval scores.

  Both run dataseg/inference.py's one program; given the eval batch's images, the
  Predictor's own preprocessing and vocabulary must produce the very inputs the eval
  pipeline produces, so the outputs are equal exactly (same program, same inputs).
  """
  from dataseg.metrics import evaluators as evaluators_lib
  from dataseg.train import eval_loop

  setup = predictor.run.setup
  if variant == "foreground":
    predictor, setup = _foreground_variant(predictor)
  n = 4
  batch, originals, vocab = _eval_examples(predictor, "shapes_panoptic", n)
  recorders = {}
  monkeypatch.setattr(
    evaluators_lib, "make_evaluator", lambda name, **kw: recorders.setdefault(name, _Recorder(name))
  )
  monkeypatch.setattr(evaluators_lib, "gather", lambda ev: ev)
  config = setup.config.copy_and_resolve_references()
  with config.unlocked():
    config.eval_batch_size = n
    config.max_eval_examples = n
  entry = config.eval_datasets["shapes_panoptic"]
  # predictor.run.setup: the Predictor's own cached program (thresholds come from `config`).
  eval_loop.evaluate_dataset(
    config,
    predictor.run.setup,
    predictor.run.state,
    entry,
    vocab,
    os.path.join(predictor.run.workdir, "data"),
  )
  assert sorted(recorders) == ["instance", "panoptic", "semantic"]
  images = [ex["image"] for ex in originals]
  kw = dict(
    class_names=list(vocab.names), is_thing=vocab.is_thing[: len(vocab.names)], original_size=False
  )
  ours = {task: predictor.predict_batch(images, task, **kw) for task in recorders}
  segments = 0
  for i in range(n):
    valid = batch["valid"][i]
    h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
    pan = ours["panoptic"][i]
    np.testing.assert_array_equal(pan["image"], batch["image"][i][:h, :w])
    image_id, ref = recorders["panoptic"].added[i]
    assert image_id == int(batch["image_id"][i])
    np.testing.assert_array_equal(
      _class_per_pixel(pan["segment_map"], [s["class"] for s in pan["segments"]]),
      _class_per_pixel(ref["segment_map"], ref["seg_class"]),
    )
    assert _same_partition(pan["segment_map"], ref["segment_map"])
    segments += len(pan["segments"])

    np.testing.assert_array_equal(
      ours["semantic"][i]["class_map"], recorders["semantic"].added[i][1]
    )

    inst, ref = ours["instance"][i], recorders["instance"].added[i][1]
    order = np.argsort(-ref["scores"], kind="stable")  # the same floats: the same order.
    np.testing.assert_array_equal(inst["classes"], ref["classes"][order])
    np.testing.assert_array_equal(inst["scores"], ref["scores"][order])
    np.testing.assert_array_equal(inst["masks"], ref["masks"][order])
    assert inst["names"] == [vocab.names[c] for c in inst["classes"]]
  if variant == "foreground":
    assert segments >= 3  # the comparison was not between two empty outputs.


def test_one_image_agrees_with_its_batch(predictor):
  """One image alone vs in a batch of four: two compiled programs (other shapes), so
  float32 sums may associate differently; pixels on a near-tie or at a threshold may
  flip, so the outputs agree on nearly all pixels, not exactly."""
  batch, originals, vocab = _eval_examples(predictor, "shapes_panoptic", 4)
  images = [ex["image"] for ex in originals]
  kw = dict(
    class_names=list(vocab.names), is_thing=vocab.is_thing[: len(vocab.names)], original_size=False
  )
  together = predictor.predict_batch(images, "semantic", **kw)
  for image, ref in zip(images, together):
    alone = predictor.predict(image, "semantic", **kw)
    agree = np.mean(alone["class_map"] == ref["class_map"])
    assert agree > 0.99, agree


def test_original_size_is_nearest_resize_of_eval_resolution(predictor):
  import tensorflow as tf

  from input_pipeline import synthetic

  image = synthetic.generate_example("shapes_panoptic", "validation", 3)["image"]
  small = predictor.predict(image, "semantic", original_size=False)
  full = predictor.predict(image, "semantic")
  assert full["class_map"].shape == image.shape[:2]
  ref = tf.image.resize(small["class_map"][..., None], image.shape[:2], method="nearest").numpy()[
    ..., 0
  ]
  np.testing.assert_array_equal(full["class_map"], ref)
  np.testing.assert_array_equal(full["image"], image)
  pan = predictor.predict(image, "panoptic")
  assert pan["segment_map"].shape == image.shape[:2]
  assert pan["segment_map"].max() < len(pan["segments"])
  for s in pan["segments"]:
    assert s["area"] == int((pan["segment_map"] == s["id"]).sum()) > 0


def test_open_vocabulary_without_new_parameters(predictor):
  """Any names work; a permuted list permutes the answer; one program per padded size."""
  from dataseg import inference
  from input_pipeline import synthetic

  image = synthetic.generate_example("shapes_transfer", "validation", 0)["image"]
  leaves = [id(x) for x in jax.tree.leaves(predictor.run.state)]
  names = ["ball", "tile", "pyramid", "ocean", "lawn", "sky", "road"]
  perm = np.array([3, 0, 6, 1, 5, 2, 4])
  a = predictor.predict(image, "semantic", class_names=names)
  program = inference.program(predictor.run.setup, predictor.config.loss.post.top_k)
  compiled = program._cache_size()  # pylint: disable=protected-access
  b = predictor.predict(image, "semantic", class_names=[names[k] for k in perm])
  assert program._cache_size() == compiled  # pylint: disable=protected-access
  assert a["class_names"] == names and a["class_map"].max() < len(names)
  # b's class j is a's class perm[j]. The softmax sums over the classes in another order
  # (float32 reassociation), so a pixel on a near-tie may flip: nearly every pixel agrees.
  agree = np.mean(perm[b["class_map"]] == a["class_map"])
  assert agree > 0.999, agree
  # A list longer than the run's static size pads further and still runs.
  many = names + [f"thing number {k}" for k in range(predictor.run.vocab_size)]
  c = predictor.predict(image, "panoptic", class_names=many)
  assert predictor.vocabulary(many).valid.shape[0] % 64 == 0
  assert all(s["name"] == many[s["class"]] for s in c["segments"])
  assert [id(x) for x in jax.tree.leaves(predictor.run.state)] == leaves
  # The default vocabulary is the one the run trained the task on, spelled out or not.
  assert predictor.config.datasets[predictor.default_vocab_key("semantic")].task == "semantic"
  default = list(predictor.run.vocabs[predictor.default_vocab_key("semantic")].names)
  np.testing.assert_array_equal(
    predictor.predict(image, "semantic")["class_map"],
    predictor.predict(image, "semantic", class_names=default)["class_map"],
  )


def test_overlay_png(predictor, tmp_path):
  from input_pipeline import synthetic

  image = synthetic.generate_example("shapes_panoptic", "validation", 1)["image"]
  for task in ("panoptic", "semantic", "instance"):
    result = predictor.predict(image, task)
    picture = predictor.overlay(result, min_score=0.0)
    path = predictor.save_overlay(result, tmp_path / f"{task}.png", min_score=0.0)
    with Image.open(path) as im:
      np.testing.assert_array_equal(np.asarray(im), picture)
    h, w = image.shape[:2]
    assert picture.shape[0] == h and picture.shape[1] >= w
    if task == "semantic":  # every pixel has a class: a legend panel is appended.
      assert picture.shape[1] > w
    if task == "panoptic":  # void pixels show the image unchanged.
      void = result["segment_map"] == -1
      np.testing.assert_array_equal(picture[:, :w][void], image[void])


def test_direct_transfer_command(workdir, predictor, tmp_path):
  """The one command; its numbers equal the in-process evaluation of the same run."""
  from dataseg import evaluate

  out = tmp_path / "transfer.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dataseg.evaluate",
      f"--workdir={workdir}",
      "--dataset=shapes_transfer",
      "--max_eval_examples=2",
      f"--output_json={out}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "direct transfer" in proc.stdout and "shapes_transfer" in proc.stdout
  metrics = json.loads(out.read_text())["metrics"]
  for key in ("shapes_transfer/panoptic/PQ", "shapes_transfer/semantic/mIoU"):
    assert 0.0 <= metrics[key] <= 100.0
  step, same = evaluate.evaluate(
    workdir, dataset="shapes_transfer", max_eval_examples=2, run=predictor.run
  )
  assert step == predictor.step
  same = {k: float(v) for k, v in same.items() if np.isscalar(v)}
  assert same == pytest.approx(metrics, nan_ok=True)
  # Other names for the same classes (open vocabulary): the table speaks them.
  names = ["orb", "slab", "cone", "sea", "field", "dunes", "street"]
  _, renamed = evaluate.evaluate(
    workdir, dataset="shapes_transfer", max_eval_examples=2, run=predictor.run, class_names=names
  )
  assert "shapes_transfer/semantic/IoU/street" in renamed
  assert "shapes_transfer/semantic/IoU/road" not in renamed


def test_prediction_files_are_forwarded(tmp_path):
  """`--pred_*` scores another system's semantic PNGs (numpy mIoU as the reference)."""
  from dataseg import evaluate

  rng = np.random.default_rng(0)
  (tmp_path / "gt").mkdir()
  (tmp_path / "pred").mkdir()
  k, inter, union = 3, np.zeros(3), np.zeros(3)
  for n in range(2):
    gt = rng.integers(0, k, (8, 9)).astype(np.uint8)
    gt[0, :3] = 255
    pred = np.where(rng.random((8, 9)) < 0.7, gt, rng.integers(0, k, (8, 9))).astype(np.uint8)
    pred[gt == 255] = rng.integers(0, k, int((gt == 255).sum()))
    Image.fromarray(gt).save(tmp_path / "gt" / f"{n}.png")
    Image.fromarray(pred).save(tmp_path / "pred" / f"{n}.png")
    ok = gt != 255
    for c in range(k):
      inter[c] += np.sum((gt == c) & (pred == c) & ok)
      union[c] += np.sum(((gt == c) | (pred == c)) & ok)
  metrics = evaluate.main(
    [
      "--task=semantic",
      f"--gt_dir={tmp_path / 'gt'}",
      f"--pred_dir={tmp_path / 'pred'}",
      "--num_classes=3",
    ]
  )
  assert metrics["mIoU"] == pytest.approx(np.mean(inter / union))


def test_load_run_turns_on_the_compilation_cache_first(tmp_path, monkeypatch):
  """As dataseg.main does: the run's compilation_cache_dir (default when a saved config has
  none), before anything is built or compiled."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from dataseg import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from dataseg.train import compile_cache  # pylint: disable=g-import-not-at-top

  class Enabled(Exception):
    pass

  def enable(cache_dir, *args, **kwargs):
    raise Enabled(cache_dir)

  monkeypatch.setattr(compile_cache, "enable", enable)
  for config, want in (
    (dict(compilation_cache_dir=str(tmp_path / "c")), str(tmp_path / "c")),
    (dict(compilation_cache_dir=""), ""),
    ({}, compile_cache.DEFAULT_DIR),
  ):
    with pytest.raises(Enabled) as e:
      predictor_lib.load_run(tmp_path, config=ml_collections.ConfigDict(config))
    assert e.value.args == (want,)
