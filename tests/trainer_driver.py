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
  DRIVER_SIGTERM_AT_STEP=k  the process sends itself a real SIGTERM when it fetches step
                            k's batch: a pre-emption notice at a known step, to one
                            process only (set it in that process's environment).
  DRIVER_RUNS=n             runs `dataseg.main` n times in this one process (a SIGTERM
                            exit 0 ends a run): resume without a new process, for an
                            in-memory workdir (ram://) that dies with the process.
  DRIVER_RAM_ORBAX=DIR      orbax's tensorstore cannot write ram:// paths: its folders go
                            to DIR/<path after ram://> instead; everything dataseg writes
                            itself stays on ram://.
  DRIVER_RAM_COPY=SRC,DST   at exit, copies the ram:// tree SRC to the local folder DST
                            (so the test can read what the run wrote there).
  DRIVER_TF_DATA_AUTOTUNE=0 tf.data autotuning off in the input pipelines (same batches:
                            the pipeline is deterministic). Its model thread sleeps up to
                            half the iterator's age (at most 60 s) before it sees the
                            iterator's deletion, and the deletion waits for it: 10-50 s of
                            idle time after a 2-process run's last step.

Every process of a multi-process run writes its programs to the persistent compilation
cache (jax writes from process 0 only, and on CPU the cache key holds the process's own
view of the topology, so process 1 never finds process 0's entries): a later run of the
same job then loads its programs in every process, not only in process 0 while process 1
compiles for ~30 s, during which process 0 waits in its first collective (gloo gives up
after 30 s). Each process loads back exactly what it compiled itself.

As a config, `eval=1` adds an evaluation of DATASET's validation split (4 images).
"""

import os
import signal
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

from configs import common  # pylint: disable=g-import-not-at-top
from configs import demo

DATASET = "shapes_semantic"
TEXT_DIM = 32


def tiny_config(data_dir="", emb="", steps=8, evaluate=False):
  """configs/demo.py:smoke with one dataset and an even smaller model."""
  c = demo.get_config("smoke")
  for name in list(c.datasets.keys()):
    if name != DATASET:
      del c.datasets[name]
  c.datasets[DATASET].text_embeddings = emb
  c.eval_datasets = {}
  if evaluate:
    c.eval_datasets[DATASET] = common.dataset(
      DATASET, "semantic", evaluators=("semantic",), text_embeddings=emb
    )
    c.max_eval_examples = 4
    c.eval_batch_size = 4
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
  # The equivalence tests (meshes, processes, resume) compare two compiled programs within
  # tolerances set for this recipe, not the demo's: lr 3e-4 (Adam moves a ~0-gradient element
  # by up to lr per step in either program), and no mask_shape, whose box extent (logit > 0)
  # is a threshold that float rounding can move by a cell (tests/test_transformer_decoder.py
  # covers it).
  c.optimizer.lr = 3e-4
  c.model.decoder.mask_shape = 0
  c.optimizer.warmup_steps = 2
  c.optimizer.schedule = "poly"
  return c


def get_config(arg=None):
  arg = common.parse_arg(arg, data="", emb="", steps=8, eval=0)
  return tiny_config(arg.data, arg.emb, arg.steps, bool(arg.eval))


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
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    restored = checkpointer.restore(path, target)
  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(restored))[0]
  }


def _install_hooks():
  """Monkeypatches named by DRIVER_* environment variables (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dataseg.train import data as data_lib  # pylint: disable=g-import-not-at-top
  from dataseg.train import trainer  # pylint: disable=g-import-not-at-top
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top

  current = {"step": -1}
  sleep_s = float(os.environ.get("DRIVER_STEP_SLEEP_S", "0"))
  sigterm_at = int(os.environ.get("DRIVER_SIGTERM_AT_STEP", "-1"))
  nan_at = int(os.environ.get("DRIVER_NAN_AT_STEP", "-1"))
  global_data = os.environ.get("DRIVER_GLOBAL_DATA") == "1"

  original_next = data_lib.TrainData.next

  def next_batch(self, step):
    current["step"] = step
    if step == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    if sleep_s:
      time.sleep(sleep_s)
    name, batch = original_next(self, step)
    if global_data:
      n, i = jax.process_count(), jax.process_index()
      rows = len(batch["image"]) // n
      batch = {k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}
    return name, batch

  data_lib.TrainData.next = next_batch

  if global_data:
    original_make_iterator = pipeline.make_iterator

    def make_iterator(reader, *, batch_size, **kwargs):
      return original_make_iterator(
        reader,
        batch_size=batch_size * jax.process_count(),
        process_index=0,
        process_count=1,
        **kwargs,
      )

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

  if os.environ.get("DRIVER_TF_DATA_AUTOTUNE") == "0":
    original_options = pipeline._options  # pylint: disable=protected-access

    def options(threads):
      out = original_options(threads)
      out.autotune.enabled = False
      return out

    pipeline._options = options  # pylint: disable=protected-access

  _every_process_writes_the_compile_cache()

  # What dataseg.main asks of jax.distributed (tests of the Slurm device choice).
  original_initialize = jax.distributed.initialize

  def initialize(*args, **kwargs):
    print(f"[driver] jax.distributed.initialize kwargs: {sorted(kwargs.items())}", flush=True)
    return original_initialize(*args, **kwargs)

  jax.distributed.initialize = initialize

  ram_orbax = os.environ.get("DRIVER_RAM_ORBAX")
  if ram_orbax:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    original_manager = ocp.CheckpointManager

    class Manager(original_manager):
      def __init__(self, directory, *args, **kwargs):
        directory = str(directory)
        if directory.startswith("ram://"):
          directory = os.path.join(ram_orbax, directory[len("ram://") :])
        super().__init__(directory, *args, **kwargs)

    ocp.CheckpointManager = Manager


def _every_process_writes_the_compile_cache():
  """jax's `_cache_write` skips processes other than 0: write their entries too."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  from jax._src import compiler  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  original_write = compiler._cache_write  # pylint: disable=protected-access

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    original_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
    if distributed.global_state.process_id and not host_callbacks:
      compilation_cache.put_executable_and_time(
        cache_key, module_name, executable, backend, int(compile_time_secs)
      )

  compiler._cache_write = cache_write  # pylint: disable=protected-access


def _copy_ram_tree(src, dst):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  for folder, _, files in tf.io.gfile.walk(src):
    target = os.path.join(dst, folder[len(src) :].lstrip("/"))
    os.makedirs(target, exist_ok=True)
    for name in files:
      tf.io.gfile.copy(os.path.join(folder, name), os.path.join(target, name), overwrite=True)


def _run():
  from absl import app  # pylint: disable=g-import-not-at-top

  from dataseg import main as main_lib  # pylint: disable=g-import-not-at-top

  _install_hooks()
  runs = int(os.environ.get("DRIVER_RUNS", "1"))
  if runs == 1:
    app.run(main_lib.main, flags_parser=main_lib._parse_flags)  # pylint: disable=protected-access
    return
  argv = main_lib._parse_flags(sys.argv)  # pylint: disable=protected-access
  for i in range(runs):
    try:
      main_lib.main(argv)
    except SystemExit as e:
      if e.code not in (0, None):
        raise
      print(f"[driver] run {i} exited 0 (SystemExit)", flush=True)
  copy = os.environ.get("DRIVER_RAM_COPY")
  if copy:
    src, dst = copy.split(",")
    _copy_ram_tree(src, dst)


if __name__ == "__main__":
  _run()
