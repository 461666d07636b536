"""The README's demo command end to end, shortened: `CONFIG_ARGS=smoke bash launch/demo.sh`.

One run (test_predictor.smoke_workdir, shared with the Predictor tests) sets up, trains the
joint model a few steps on the three training datasets, evaluates every dataset in every
task it supports, writes overlays and the table; these tests check what it left behind,
then predict with the checkpoint, then run the command again (it must reuse the run).
Its wall time is printed (README: "a shortened demo ... in under 3 minutes").
"""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_predictor import ROOT  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_predictor import smoke_workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

DATASETS = ("shapes_panoptic", "shapes_semantic", "shapes_boxes", "shapes_transfer")
# Every dataset in every task it supports (configs/demo.py eval_datasets).
EXPECTED = {
  "shapes_panoptic": ("panoptic/PQ", "semantic/mIoU", "instance/AP"),
  "shapes_semantic": ("semantic/mIoU", "panoptic/PQ"),
  "shapes_boxes": ("instance/AP", "box/AP"),
  "shapes_transfer": ("panoptic/PQ", "semantic/mIoU"),
}


def _demo_outputs():
  workdir = smoke_workdir()
  stdout = (workdir.parent / "demo_stdout.txt").read_text()
  seconds = float((workdir.parent / "demo_seconds.txt").read_text())
  return workdir, stdout, seconds


def test_shortened_demo_trains_evaluates_and_writes_everything():
  workdir, stdout, seconds = _demo_outputs()
  print(f"shortened demo (launch/demo.sh, CONFIG_ARGS=smoke): {seconds:.0f} s wall")
  config = json.loads((workdir / "config.json").read_text())
  steps = config["total_steps"]
  assert sorted(config["datasets"]) == sorted(DATASETS[:3])
  # Progress with ETA, then one table with a row per dataset.
  assert f"[step      {steps}/{steps}]" in stdout and "ETA" in stdout
  header = next(l for l in stdout.splitlines() if l.startswith("dataset "))
  for metric in ("panoptic/PQ", "semantic/mIoU", "instance/AP", "box/AP"):
    assert metric in header
  rows = {
    l.split()[0]: l.split()[1:]
    for l in stdout.splitlines()
    if l.split() and l.split()[0] in DATASETS
  }
  assert sorted(rows) == sorted(DATASETS)
  assert "[demo] done in" in stdout
  # Every dataset scored in every task it supports; finite numbers.
  results = json.loads((workdir / f"eval_{steps}.json").read_text())
  for name, metrics in EXPECTED.items():
    for metric in metrics:
      value = results[f"{name}/{metric}"]
      assert np.isfinite(value) and -1 <= value <= 1, (name, metric, value)
  # Orbax checkpoints (final step included), TensorBoard events, overlay PNGs.
  assert str(steps) in os.listdir(workdir / "checkpoints")
  assert list(workdir.glob("events.out.tfevents.*"))
  for name in DATASETS:
    pngs = list((workdir / f"eval_{steps}" / name).glob("*.png"))
    assert pngs, name
    with Image.open(pngs[0]) as im:
      assert im.size[0] > 0 and im.mode in ("RGB", "RGBA")


def test_shortened_demo_checkpoint_predicts():
  from dataseg.predictor import Predictor

  workdir, _, _ = _demo_outputs()
  p = Predictor.from_workdir(workdir)
  image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
  pan = p.predict(image, task="panoptic")
  assert pan["segment_map"].shape == (70, 90)
  assert pan["segment_map"].max() < len(pan["segments"])
  sem = p.predict(image, task="semantic", class_names=["ball", "meadow", "sky"])
  assert sem["class_map"].shape == (70, 90) and set(np.unique(sem["class_map"])) <= {0, 1, 2}
  inst = p.predict(image, task="instance")
  assert inst["masks"].shape[1:] == (70, 90)
  assert np.all(np.diff(inst["scores"]) <= 0)


def test_demo_again_reuses_the_finished_run():
  workdir, _, _ = _demo_outputs()
  steps = json.loads((workdir / "config.json").read_text())["total_steps"]
  before = sorted(os.listdir(workdir / "checkpoints"))
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), WORKDIR=str(workdir), CONFIG_ARGS="smoke"
  )
  proc = subprocess.run(
    ["bash", "launch/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"Training already finished at step {steps}" in proc.stdout
  assert "[step " not in proc.stdout  # no training step ran.
  assert "shapes_transfer" in proc.stdout  # the table again.
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_class_accuracy_tool_counts_every_segment():
  """launch/class_accuracy.py: one row per non-crowd ground-truth segment."""
  from dataseg.predictor import Predictor
  from dataseg.train import data as data_lib
  from input_pipeline import pipeline

  workdir, _, _ = _demo_outputs()
  n = 3
  proc = subprocess.run(
    [
      sys.executable,
      "launch/class_accuracy.py",
      f"--workdir={workdir}",
      "--dataset=shapes_panoptic",
      f"--num_examples={n}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  p = Predictor.from_workdir(workdir)
  entry = p.config.eval_datasets["shapes_panoptic"]
  vocab = p.run.vocabs["eval:shapes_panoptic"]
  reader = data_lib.reader_for(
    entry, os.path.join(workdir, "data"), entry.eval_split, vocab.is_thing
  )
  counts = np.zeros(len(vocab.names), np.int64)
  for ex in pipeline.host_dataset(reader, 0, 1).take(n).as_numpy_iterator():
    for s, (c, crowd) in enumerate(zip(ex["seg_class"], ex["seg_is_crowd"])):
      if not crowd and (ex["segment_map"] == s).any():
        counts[c] += 1
  lines = proc.stdout.splitlines()
  start = lines.index("confusion (rows: true, columns: predicted)") + 2
  table = lines[start : start + len(vocab.names)]
  rows = {l.split()[0]: [int(v) for v in l.split()[1:]] for l in table}
  assert [sum(rows[name]) for name in vocab.names] == counts.tolist()
  things = sum(c for c, t in zip(counts, vocab.is_thing) if t)
  assert f"thing: {things} segments" in proc.stdout
