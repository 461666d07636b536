"""A workdir on a non-local filesystem: everything dataseg writes goes through tf.io.gfile.

A `gs://` workdir used to get config, metrics, eval results and the data positions written
with `open` / `np.savez` into a local folder named `gs:`. These tests use tf.io.gfile's
in-memory `ram://` filesystem as the remote one (no network): a run writes there, and any
plain-`open` write would show up as a local folder `ram:` in the working directory.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import tensorflow as tf
import trainer_driver

from dataseg import text as text_lib
from dataseg import visualize

SIGTERM_AT = 3


def test_train_sigterm_resume_on_ram_workdir(tiny_env, reference_run, tmp_path):
  """Train, SIGTERM, resume (one process: ram:// lives as long as it), compare bitwise.

  orbax's tensorstore has no ram:// driver, so only its step folders are mapped to a local
  folder (DRIVER_RAM_ORBAX); config.json, metrics.jsonl, TensorBoard events and the data
  positions are written by dataseg itself and must land on ram://.
  """
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  copy, orbax = tmp_path / "copy", tmp_path / "orbax"
  driver = pathlib.Path(trainer_driver.__file__).resolve()
  proc = subprocess.run(
    [sys.executable, str(driver), f"--config={tiny_env.config_arg()}", "--workdir=ram://run"],
    cwd=str(cwd),
    env=tiny_env.env(
      DRIVER_RUNS=2,
      DRIVER_SIGTERM_AT_STEP=SIGTERM_AT,
      DRIVER_RAM_ORBAX=orbax,
      DRIVER_RAM_COPY=f"ram://run,{copy}",
    ),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=900,
    check=False,
  )
  log = proc.stdout
  assert proc.returncode == 0, log[-5000:]
  stop = SIGTERM_AT + 1  # one process: it stops after the step it was signalled in.
  assert f"SIGTERM: saved checkpoint at step {stop}; exiting" in log, log[-5000:]
  assert f"Resuming from checkpoint ram://run/checkpoints/{stop}" in log, log[-5000:]

  assert not list(cwd.iterdir()), list(cwd.rglob("*"))  # no local "ram:" folder.
  assert (copy / "config.json").is_file()
  assert list(copy.glob("events.out.tfevents.*"))
  for step in (stop, 8):
    assert (copy / "checkpoints" / "data_state" / f"{step}.process0.npz").is_file()
  # The resumed run read its data position from ram://: same batches as the reference.
  key = f"train/{trainer_driver.DATASET}/loss"
  got, want = {}, {}
  for path, out in ((copy / "metrics.jsonl", got), (reference_run.workdir / "metrics.jsonl", want)):
    for line in path.read_text().splitlines():
      record = json.loads(line)
      if key in record:
        out.setdefault(record["step"], []).append(record[key])
  assert sorted(got) == list(range(1, 9))
  for step, values in got.items():
    assert all(v == want[step][0] for v in values), (step, values, want[step])
  a = trainer_driver.load_checkpoint(orbax / "run", 8)
  b = trainer_driver.load_checkpoint(reference_run.workdir, 8)
  assert a.keys() == b.keys()
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_text_embedding_cache_on_ram(monkeypatch, tmp_path):
  """The class-name embeddings cache reads and writes through gfile (a gs:// cache_dir)."""
  monkeypatch.chdir(tmp_path)
  calls = []

  def encode(sentences):
    calls.append(len(sentences))
    x = np.random.default_rng(len(sentences)).normal(size=(len(sentences), 8))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

  monkeypatch.setattr(text_lib, "load_encoder", lambda name: encode)
  names = ["circle", "sky"]
  first = text_lib.class_embeddings(names, encoder="fake", cache_dir="ram://cache")
  again = text_lib.class_embeddings(names, encoder="fake", cache_dir="ram://cache")
  assert len(calls) == 1  # the second call is a cache hit.
  np.testing.assert_array_equal(first, again)
  assert tf.io.gfile.exists(text_lib.cache_path(names, "fake", cache_dir="ram://cache"))
  assert not os.listdir(tmp_path)


def test_save_png_on_ram(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
  visualize.save_png("ram://overlays/eval_8/shapes/1.png", image)
  with tf.io.gfile.GFile("ram://overlays/eval_8/shapes/1.png", "rb") as f:
    blob = f.read()
  import io  # pylint: disable=g-import-not-at-top

  from PIL import Image  # pylint: disable=g-import-not-at-top

  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(blob))), image)
  assert not os.listdir(tmp_path)
