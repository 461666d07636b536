"""Checkpoints with orbax: async saves, last k kept, optional best-by-metric, fallbacks.

A checkpoint holds the train state (params, optimizer state, step, RNG, EMA) as one
PyTree and the config as JSON. The data-pipeline position is host-local (each host reads
its own shard), so every process writes its own `data_state/<step>.process<i>.npz` beside
the orbax step folders. Restoring takes an
*abstract* state whose leaves carry the target shardings, so a checkpoint written on one
mesh restores onto another (orbax re-shards). A latest checkpoint that fails to restore
(truncated or corrupt files) is reported by path and the previous one is tried.

The data positions are read and written with `tf.io.gfile` (orbax itself goes through
etils.epath), so a `gs://` workdir keeps them on GCS: a recreated VM resumes the data where
it stopped instead of restarting it from zero.
"""

import io
import logging
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf


def _absolute(directory):
  """orbax needs absolute local paths; remote ones (gs://...) stay as they are."""
  return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
  """Wraps an orbax CheckpointManager over `<workdir>/checkpoints` (and `best/`)."""

  def __init__(self, directory, *, keep=3, best_metric="", async_save=True):
    directory = _absolute(directory)
    self.directory = directory
    self.best_metric = best_metric
    self._manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
      ),
    )
    self._best = None
    if best_metric:
      self._best = ocp.CheckpointManager(
        f"{directory}/best",
        options=ocp.CheckpointManagerOptions(
          max_to_keep=1,
          best_fn=lambda m: m[best_metric],
          best_mode="max",
          enable_async_checkpointing=async_save,
          create=True,
        ),
      )

  def all_steps(self):
    return sorted(self._manager.all_steps())

  def save(self, step, state, *, data_state, config_json, force=False):
    self._save_data_state(step, data_state)
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_json)
    )
    saved = self._manager.save(step, args=args, force=force)
    self._prune_data_states(step)
    return saved

  def _data_path(self, step):
    return os.path.join(self.directory, "data_state", f"{step}.process{jax.process_index()}.npz")

  def _save_data_state(self, step, data_state):
    flat = {
      jax.tree_util.keystr(p): np.asarray(v)
      for p, v in jax.tree_util.tree_flatten_with_path(data_state)[0]
    }
    path = self._data_path(step)
    tf.io.gfile.makedirs(os.path.dirname(path))
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    tmp = path + ".tmp.npz"
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(buffer.getvalue())
    tf.io.gfile.rename(tmp, path, overwrite=True)  # a reader never sees half a file.

  def _load_data_state(self, step, like):
    path = self._data_path(step)
    with tf.io.gfile.GFile(path, "rb") as f:
      blob = f.read()
    with np.load(io.BytesIO(blob)) as f:
      flat = dict(f)
    paths = (
      [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
      if like is not None
      else None
    )
    if paths is None:
      return flat
    return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(like), [flat[p] for p in paths]
    )

  def _prune_data_states(self, just_saved):
    """Drops pipeline positions of checkpoints orbax no longer keeps."""
    folder = os.path.join(self.directory, "data_state")
    keep = set(self._manager.all_steps()) | {just_saved}
    for name in tf.io.gfile.listdir(folder):
      if name.endswith(".npz") and ".tmp" not in name and int(name.split(".")[0]) not in keep:
        try:
          tf.io.gfile.remove(os.path.join(folder, name))
        except tf.errors.NotFoundError:
          pass  # another process sharing the workdir pruned it first.

  def save_best(self, step, state, metrics):
    if self._best is None or self.best_metric not in metrics:
      return
    self._best.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
      metrics={self.best_metric: float(metrics[self.best_metric])},
    )

  def restore_latest(self, abstract_state, data_like=None):
    """(step, state, data_state) of the newest checkpoint that restores, or None.

    `data_like`: a data state of the same structure (a fresh pipeline's), to rebuild
    the saved one; without it the flat dict is returned.
    """
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        data_state = None
        if tf.io.gfile.exists(self._data_path(step)):
          data_state = self._load_data_state(step, data_like)
        return step, restored["state"], data_state
      except Exception as e:  # pylint: disable=broad-except
        logging.error(
          "checkpoint %s/%d failed to restore (%s: %s); trying the previous one",
          self.directory,
          step,
          type(e).__name__,
          e,
        )
        print(
          f"WARNING: checkpoint {self.directory}/{step} failed to restore "
          f"({type(e).__name__}); falling back to the previous one",
          flush=True,
        )
        self._set_aside(step)
    return None

  def _set_aside(self, step):
    """Renames a broken step folder so that orbax neither restores it nor refuses to save
    over its step number again (it skips saves at steps <= its latest)."""
    path = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and tf.io.gfile.isdir(path):
      aside = f"{path}.corrupt-{time.time_ns()}"
      try:
        tf.io.gfile.rename(path, aside)
        print(f"WARNING: moved {path} to {aside}", flush=True)
      except (tf.errors.OpError, OSError) as e:  # GCS renames files, not folders.
        tf.io.gfile.rmtree(path)
        print(f"WARNING: could not move {path} aside ({type(e).__name__}); deleted it", flush=True)
    self._manager.reload()

  def wait(self):
    self._manager.wait_until_finished()
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self):
    self._manager.close()
    if self._best is not None:
      self._best.close()


def restore_inference_state(directory, abstract_state, step: int | None = None):
  """(step, {'params', 'frozen'}) of a checkpoint under `directory`, EMA parameters preferred.

  Reads only step, params, frozen and ema (partial restore): the optimizer state, often
  twice the parameters, never leaves the disk. Used by the Predictor and the evaluate
  command (any machine, any mesh: orbax re-shards into `abstract_state`'s shardings).
  """
  directory = _absolute(os.fspath(directory))
  steps = []
  if tf.io.gfile.isdir(directory):
    with ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False)
    ) as manager:
      steps = sorted(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {directory}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(
      f"no checkpoint for step {step} under {directory}; available: {', '.join(map(str, steps))}"
    )
  wanted = {k: v for k, v in abstract_state.items() if k in ("step", "params", "frozen", "ema")}
  restore_args = ocp.checkpoint_utils.construct_restore_args(wanted)
  with ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(create=False)
  ) as manager:
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True)
      ),
    )["state"]
  params = restored.get("ema", restored["params"])
  return step, dict(params=params, frozen=restored["frozen"])


def restore_params(directory, abstract_params):
  """Parameters only from the latest checkpoint in `directory` (config.init_from).

  Returns (params, report) where report lists missing and unexpected keys; missing
  parameters keep their fresh initialisation.
  """
  manager = ocp.CheckpointManager(_absolute(directory))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.init_from: no checkpoint under {directory}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  saved = restored["state"]["params"]
  flat_saved = {
    jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]
  }
  flat_target = {
    jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  }
  report = dict(
    missing=sorted(
      k for k in flat_target if k not in flat_saved or flat_saved[k].shape != flat_target[k].shape
    ),
    unexpected=sorted(k for k in flat_saved if k not in flat_target),
  )
  return step, flat_saved, report
