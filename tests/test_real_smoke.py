"""The real-data smoke run: configs/real_smoke.py end to end on fixtures of the real formats.

COCO panoptic (TFDS coco/2017_panoptic built from a mocked download), ADE20k (raw
ADEChallengeData2016 folder and Mask2Former's panoptic conversion) and Objects365 (this
repo's TFDS builder) are written in their default layouts below one data dir by the
fixture writers of tests/test_readers.py; `python -m dataseg.main` trains the R50
architecture (shrunk) jointly through the same registry entries as configs/joint_r50.py,
one step on each dataset at least, then evaluates every eval entry.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # pylint: disable=g-import-not-at-top,wrong-import-position
import test_readers as fx  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import real_smoke  # pylint: disable=g-import-not-at-top,wrong-import-position
from dataseg import vocab as vocab_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

WRITERS = ("coco_panoptic", "ade20k", "ade20k_panoptic", "objects365")


def _write_data(root):
  data = root / "data"
  data.mkdir()
  with pytest.MonkeyPatch.context() as mp:
    for name in WRITERS:
      kwargs = dict(monkeypatch=mp) if name == "coco_panoptic" else {}
      fx.REGISTRY_WRITERS[name](str(data), **kwargs)
  emb = root / "emb"
  emb.mkdir()
  rng = np.random.default_rng(0)
  for vocab in set(real_smoke.VOCABS.values()):
    e = rng.normal(size=(len(vocab_lib.load(vocab).class_names), real_smoke.TEXT_DIM))
    np.save(emb / f"{vocab}.npy", (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32))
  return data, emb


def test_real_smoke_uses_the_joint_runs_registry_entries():
  """Same dataset entries, tasks and default layouts (no reader override) as joint_r50."""
  from configs import joint_r50  # pylint: disable=g-import-not-at-top

  joint, smoke = joint_r50.get_config(), real_smoke.get_config("data=/d,emb=/e")
  for group in ("datasets", "eval_datasets"):
    for key, entry in smoke[group].items():
      assert not entry.reader, (group, key)
      if group == "datasets" or key != "objects365":  # joint scores its masks subset.
        assert joint[group][key].name == entry.name and joint[group][key].task == entry.task
  assert set(smoke.datasets) == set(joint.datasets)
  assert smoke.model.backbone.name == joint.model.backbone.name == "resnet"
  assert smoke.model.backbone.depth == joint.model.backbone.depth == 50


def test_real_smoke_trains_every_dataset_and_evaluates(tmp_path):
  data, emb = _write_data(tmp_path)
  steps = 3
  workdir = tmp_path / "run"
  arg = f"data={data},emb={emb},steps={steps}"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "dataseg.main",
      f"--config=configs/real_smoke.py:{arg}",
      f"--workdir={workdir}",
    ],
    cwd=conftest.ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
    env=conftest.subprocess_env(tmp_path / "xla_cache"),
  )
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  # Every training dataset had a step with a finite loss (metrics.jsonl, one line a step).
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = {
    k.split("/")[1]: v
    for line in lines
    for k, v in line.items()
    if k.startswith("train/") and k.endswith("/loss") and k.count("/") == 2
  }
  assert set(losses) == set(real_smoke.TRAIN), (sorted(losses), out[-3000:])
  assert all(math.isfinite(v) for v in losses.values()), losses
  # Every eval entry scored by every evaluator it names: finite headline metrics.
  results = json.loads((workdir / f"eval_{steps}.json").read_text())
  headline = {"panoptic": "PQ", "semantic": "mIoU", "box": "AP", "instance": "AP"}
  for key, (_, _, evaluators) in real_smoke.EVAL.items():
    for ev in evaluators:
      value = results.get(f"{key}/{ev}/{headline[ev]}")
      assert value is not None and math.isfinite(value), (key, ev, sorted(results)[:20])
  # The ground truth reached the evaluators with its thing / stuff classes: PQ counts at
  # least the fixture's classes (COCO: sky stuff, person; the car is crowd only. ADE:
  # wall stuff, person, car), more only for classes the model predicts.
  for key, things, stuff in (("coco_panoptic", 1, 1), ("ade20k_panoptic", 2, 1)):
    assert results[f"{key}/panoptic/N_th"] >= things, results[f"{key}/panoptic/N_th"]
    assert results[f"{key}/panoptic/N_st"] >= stuff, results[f"{key}/panoptic/N_st"]
