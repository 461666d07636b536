"""host_memory.retain_freed_memory: freed memory is reused, not page-faulted in again."""

import json
import pathlib
import subprocess
import sys

import pytest

from configs import common
from dataseg.train import host_memory

# A 256 MiB block allocated, touched and freed three times; minor page faults per round.
SCRIPT = r"""
import json, resource, sys
import numpy as np
from dataseg.train import host_memory
applied = host_memory.retain_freed_memory() if sys.argv[1] == "on" else None

def round_faults():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = np.ones(64 << 20, np.float32)
  del block
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(json.dumps(dict(applied=applied, faults=[round_faults() for _ in range(3)])))
"""


def _run(mode):
  out = subprocess.run(
    [sys.executable, "-c", SCRIPT, mode],
    capture_output=True,
    text=True,
    check=True,
    cwd=pathlib.Path(__file__).resolve().parent.parent,  # the repository root: `dataseg`.
  ).stdout
  return json.loads(out.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
  if not sys.platform.startswith("linux"):
    pytest.skip("glibc mallopt only")
  off = _run("off")
  if min(off["faults"]) < 100:  # another allocator (e.g. LD_PRELOAD'ed) already reuses it.
    pytest.skip(f"this process's malloc already keeps freed memory: {off}")
  on = _run("on")
  assert on["applied"] is True, on
  # The first round faults its pages in; later rounds reuse them (glibc defaults: every
  # round faults as much as the first, since a block this size is mmap'd and unmapped).
  assert on["faults"][0] >= 100, on
  assert max(on["faults"][1:]) <= 0.05 * on["faults"][0], (on, off)
  assert min(off["faults"][1:]) >= 0.5 * off["faults"][0], off


def test_retain_setting_and_where_jax_computes(monkeypatch, tmp_path):
  # Off by default (configs/common.py: one malloc arena makes XLA compile ~35% slower).
  # 'cpu' = retained when jax will run on the host CPU, decided before jax starts:
  # JAX_PLATFORMS when set, else whether an accelerator's device file exists.
  assert common.base_config().retain_freed_memory is False
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.computes_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory.computes_on_cpu()
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(host_memory, "ACCELERATOR_FILES", (str(tmp_path / "nvidia0"),))
  assert host_memory.computes_on_cpu()
  (tmp_path / "nvidia0").touch()
  assert not host_memory.computes_on_cpu()
  assert host_memory.apply("cpu") is False  # nothing set on an accelerator host.
  assert host_memory.apply(False) is False
  with pytest.raises(ValueError, match="retain_freed_memory='yes'.*allowed: True, False, 'cpu'"):
    host_memory.apply("yes")
