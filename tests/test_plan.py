"""The plan tool: mesh parsing, abstract inputs, and an ahead-of-time compile per mesh.

The compile runs in subprocesses (the simulated device count must be set before jax
starts): the demo config, shrunk (32 px, 1 decoder layer, 64 points, one task) so each
compile takes seconds, on data=2 and on data=1,fsdp=2 with parameters sharded over fsdp.
"""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from configs import joint_r50
from dataseg import plan
from dataseg import schema
from dataseg.vocab import padded as padded_vocab

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHRINK = [
  "--task=semantic",
  "--config.model.decoder.layers=1",
  "--config.loss.num_points=64",
  "--config.image_size=32",
  "--config.eval_image_size=32",
]
FSDP_RULES = (
  '--config.sharding_rules=(("embed","fsdp"),("conv_out","fsdp"),("batch",("data","fsdp")))'
)


def test_parse_mesh():
  assert plan._parse_mesh("data=64,fsdp=1") == {"data": 64, "fsdp": 1, "model": 1}
  assert plan._parse_mesh("fsdp=4,model=2") == {"data": 1, "fsdp": 4, "model": 2}
  for bad, match in [
    ("data=-1", "positive integer"),
    ("pipe=2", "AXIS=SIZE"),
    ("data", "AXIS=SIZE"),
    ("data=0", "positive integer"),
  ]:
    with pytest.raises(ValueError, match=match):
      plan._parse_mesh(bad)


def test_vocab_size_from_the_vocab_lists():
  """The joint run's padded vocabulary is Objects365's 365 names (counted from the JSON)."""
  with open(ROOT / "dataseg" / "vocab" / "objects365.json") as f:
    o365 = len(json.load(f)["categories"])
  assert padded_vocab.config_vocab_size(joint_r50.get_config()) == o365 == 365
  c = demo.get_config("smoke")
  assert padded_vocab.config_vocab_size(c) == max(
    len(json.load(open(ROOT / "dataseg" / "vocab" / f"{e.name}.json"))["categories"])
    for g in ("datasets", "eval_datasets")
    for e in c[g].values()
  )


def test_abstract_inputs_follow_the_schema():
  import jax  # pylint: disable=g-import-not-at-top

  from dataseg.train import sharding  # pylint: disable=g-import-not-at-top

  c = demo.get_config("smoke")
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  batch, vocab = plan.abstract_inputs(c, mesh, 11)
  for name, (dtype, shape) in schema.field_shapes(64, 64, c.max_segments).items():
    assert batch[name].shape == (c.batch_size,) + shape
    assert batch[name].dtype == np.dtype(dtype)
  assert vocab["text"].shape == (11, c.model.classifier.text_dim)
  assert vocab["valid"].shape == vocab["is_thing"].shape == (11,)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((batch, vocab)))


def _input_bytes(report):
  """Per-device bytes of the batch and vocabulary arguments, from the schema."""
  ndev = report["mesh"]["data"] * report["mesh"]["fsdp"]
  b = report["global_batch"] // ndev
  size = report["image_size"]
  batch = sum(
    b * math.prod(shape) * np.dtype(dtype).itemsize
    for dtype, shape in schema.field_shapes(size, size, 16).values()
  )
  v, d = report["vocab_size"], report["text_dim"]
  return batch + v * d * 4 + 2 * v + 4


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  out = tmp_path_factory.mktemp("plan")
  runs = {"data": ["--mesh=data=2"], "fsdp": ["--mesh=data=1,fsdp=2", FSDP_RULES]}
  procs = {}
  for name, extra in runs.items():  # both compiles at once.
    cmd = [
      sys.executable,
      "-m",
      "dataseg.plan",
      "--config=configs/demo.py:smoke",
      f"--json={out / name}.json",
      *SHRINK,
      *extra,
    ]
    procs[name] = subprocess.Popen(
      cmd,
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
  result = {}
  for name, proc in procs.items():
    text, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, text[-3000:]
    result[name] = (json.loads((out / f"{name}.json").read_text()), text)
  return result


def test_plan_reports_positive_figures(reports):
  for name, (report, text) in reports.items():
    assert report["devices"] == 2 and report["platform"] == "cpu"
    assert "semantic" in text and "GFLOP/step" in text  # the printed table.
    e = report["tasks"]["semantic"]
    for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes", "flops", "compile_s"):
      assert e[key] > 0, (name, key)
    # The donated train state is aliased to the output: exactly its per-device bytes.
    assert e["alias_bytes"] == report["state_bytes_per_device"]
    # Arguments = state + this device's batch and vocabulary (jit may drop unused fields).
    assert report["state_bytes_per_device"] <= e["argument_bytes"]
    assert e["argument_bytes"] <= report["state_bytes_per_device"] + _input_bytes(report)
    assert e["output_bytes"] >= report["state_bytes_per_device"]


def test_fsdp_reduces_per_device_arguments(reports):
  dp, _ = reports["data"]
  fsdp, _ = reports["fsdp"]
  assert dp["num_params"] == fsdp["num_params"]
  # Data parallel: every device holds all float32 parameters.
  assert dp["params_bytes_per_device"] == 4 * dp["num_params"]
  # FSDP over 2 devices: most parameters split in half (small ones stay replicated).
  assert 0.5 * dp["params_bytes_per_device"] <= fsdp["params_bytes_per_device"]
  assert fsdp["params_bytes_per_device"] < 0.6 * dp["params_bytes_per_device"]
  assert (
    fsdp["tasks"]["semantic"]["argument_bytes"] < 0.6 * dp["tasks"]["semantic"]["argument_bytes"]
  )


def test_plan_refuses_what_it_cannot_simulate():
  import jax  # pylint: disable=g-import-not-at-top

  c = demo.get_config("smoke")  # global batch 4.
  with pytest.raises(ValueError, match="batch_size=4 is not divisible .* data\\*fsdp=3"):
    plan.plan(c, {"data": 3, "fsdp": 1, "model": 1})
  n = len(jax.devices())  # more than this process has (the tool itself sets XLA_FLAGS).
  with pytest.raises(ValueError, match=f"needs {2 * n} devices, jax sees {n}"):
    plan.plan(c, {"data": 1, "fsdp": 1, "model": 2 * n})
