r"""The trainer tests' tiny config, and a `dataseg.main` driver with test-only hooks.

As a config file (`--config=tests/trainer_driver.py:data=DIR,emb=FILE,steps=8`):
`get_config` returns `tiny_config`, the demo's smoke setting shrunk further (one
dataset, 4 queries, 1 decoder layer, no deep supervision, 32-wide text embeddings read
from a .npy) so a train step compiles in well under a minute on a loaded 2-core CPU.

As a script (`python tests/trainer_driver.py <dataseg.main flags>`) it runs
`dataseg.main` unchanged, after applying the hooks named by environment variables:

  DRIVER_STEP_SLEEP_S=x     sleep x seconds before each step's batch (lets a test send
                            SIGKILL / SIGTERM while training runs).
  DRIVER_NAN_AT_STEP=k      step k's inputs carry NaN class-name embeddings (the only
                            float input of the step: images are uint8), same program.
  DRIVER_GLOBAL_DATA=1      every process reads the 1-process input pipeline (global
                            batch) and keeps its rows, so N processes see exactly the
                            batches of 1 process (the pipeline's own per-host sharding
                            is tested in tests/test_pipeline.py).
"""

import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import common  # pylint: disable=g-import-not-at-top
from configs import demo

DATASET = "shapes_semantic"
TEXT_DIM = 32


def tiny_config(data_dir="", emb="", steps=8):
  """configs/demo.py:smoke with one dataset and an even smaller model."""
  c = demo.get_config("smoke")
  for name in list(c.datasets.keys()):
    if name != DATASET:
      del c.datasets[name]
  c.datasets[DATASET].text_embeddings = emb
  c.eval_datasets = {}
  c.data_dir = data_dir
  c.image_size = c.eval_image_size = 64
  c.batch_size = 8
  c.max_segments = 8
  c.total_steps = steps
  c.eval_every = steps
  c.checkpoint_every = 2
  c.keep_checkpoints = 10
  c.log_every = 1
  c.model.decoder.num_queries = 4
  c.model.decoder.layers = 1
  c.model.decoder.dim = c.model.decoder.ffn = 32
  c.model.pixel_decoder.dim = 32
  c.model.classifier.text_dim = TEXT_DIM
  c.loss.num_points = 64
  c.loss.deep_supervision = False  # halves the loss graph (compile time).
  c.optimizer.warmup_steps = 2
  c.optimizer.schedule = "poly"
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", emb="", steps=8)
  return tiny_config(arg.data, arg.emb, arg.steps)


def load_checkpoint(workdir, step):
  """The saved state of `<workdir>/checkpoints/<step>` as a flat {keystr: numpy} dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as checkpointer:
    # Restored onto this process's first device, whatever topology wrote it.
    meta = checkpointer.metadata(path).item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          meta)
    restored = checkpointer.restore(path, target)
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(jax.device_get(restored))[0]}


def _install_hooks():
  """Monkeypatches named by DRIVER_* environment variables (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dataseg.train import data as data_lib  # pylint: disable=g-import-not-at-top
  from dataseg.train import trainer  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top

  current = {"step": -1}
  sleep_s = float(os.environ.get("DRIVER_STEP_SLEEP_S", "0"))
  nan_at = int(os.environ.get("DRIVER_NAN_AT_STEP", "-1"))
  global_data = os.environ.get("DRIVER_GLOBAL_DATA") == "1"

  original_next = data_lib.TrainData.next

  def next_batch(self, step):
    current["step"] = step
    if sleep_s:
      time.sleep(sleep_s)
    name, batch = original_next(self, step)
    if global_data:
      n, i = jax.process_count(), jax.process_index()
      rows = len(batch["image"]) // n
      batch = {k: v[i * rows:(i + 1) * rows] for k, v in batch.items()}
    return name, batch
  data_lib.TrainData.next = next_batch

  if global_data:
    original_make_iterator = pipeline.make_iterator

    def make_iterator(reader, *, batch_size, **kwargs):
      return original_make_iterator(reader, batch_size=batch_size * jax.process_count(),
                                    process_index=0, process_count=1, **kwargs)
    pipeline.make_iterator = make_iterator

  if nan_at >= 0:
    original_make_step = trainer.make_train_step

    def make_train_step(s, task):
      step_fn = original_make_step(s, task)

      def poisoned(state, batch, vocab):
        if current["step"] == nan_at:
          with jax.transfer_guard("allow"):
            vocab = dict(vocab, text=vocab["text"] * jnp.float32(jnp.nan))
        return step_fn(state, batch, vocab)
      return poisoned
    trainer.make_train_step = make_train_step


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from dataseg import main as main_lib  # pylint: disable=g-import-not-at-top
  _install_hooks()
  app.run(main_lib.main)
