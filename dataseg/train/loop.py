"""The training loop and evaluation driver behind `python -m dataseg.main`.

One dataset per step (the paper), drawn by `input_pipeline.mixing` from (seed, step) so
that every host picks the same one with no communication; one compiled program per task.
Checkpoints (orbax) every `checkpoint_every` steps and on SIGTERM; metrics to TensorBoard
and `metrics.jsonl`; evaluation every `eval_every` steps and at the end, written to
`<workdir>/eval_<step>.json`.

Every file of the workdir goes through `tf.io.gfile`, so `--workdir=gs://bucket/run` keeps
config, metrics, eval results and data positions on GCS (a plain `open` would create a local
folder named `gs:`). A SIGTERM on any process stops every process at the same step (see
`PreemptionSync`): the hosts of a pod or a Slurm job are not signalled at the same instant.
"""

import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from dataseg import config_lib
from dataseg.train import checkpoint as checkpoint_lib
from dataseg.train import data as data_lib
from dataseg.train import eval_loop
from dataseg.train import metrics as metrics_lib
from dataseg.train import trainer
from dataseg.vocab import padded as padded_vocab
from input_pipeline import synthetic


class NonFiniteLossError(RuntimeError):
  pass


def _data_dir(config, workdir):
  return config.data_dir or os.path.join(workdir, "data")


def _prepare_synthetic(config, data_dir):
  """Generates the config's synthetic datasets once for all processes (see synthetic.py)."""
  names = [
    e.name
    for group in ("datasets", "eval_datasets")
    for e in config[group].values()
    if data_lib.datasets_lib.lookup(e.name)["source"] == "synthetic"
  ]
  synthetic.prepare_shared(sorted(set(names)), data_dir)


class PreemptionSync:
  """Agrees across processes on the step after which everybody saves and exits.

  Each process only knows whether *it* got SIGTERM. Saving when it sees its own signal
  hangs a multi-host job: the signalled host waits in orbax's save barrier while the
  others wait in the next step's collectives. So every step each process contributes its
  flag to a max-reduction over all devices (a scalar collective, issued in the same order
  on every process), and the result of step k is read after step k+1 was dispatched: the
  host never waits for the device more than it already does for the one-step-late NaN check,
  and every process reads the same value, hence stops at the same step. One process needs
  no collective: its own flag decides at once.
  """

  def __init__(self):
    self.signalled = False
    self._multi = jax.process_count() > 1
    self._pending = None
    if self._multi:
      # Each process's devices contiguous, in the same order on every process.
      devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
      mesh = jax.sharding.Mesh(np.asarray(devices), ("p",))
      self._in = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("p"))
      self._reduce = jax.jit(
        jnp.max, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      )

  def handler(self, signum, frame):
    del signum, frame
    self.signalled = True

  def should_stop(self):
    """Called once per step by every process; True on all of them at the same step."""
    if not self._multi:
      return self.signalled
    local = np.full((jax.local_device_count(),), int(self.signalled), np.int32)
    with jax.transfer_guard("allow"):
      flags = jax.make_array_from_process_local_data(self._in, local, (jax.device_count(),))
      previous, self._pending = self._pending, self._reduce(flags)
      return previous is not None and bool(jax.device_get(previous))


def _restore_or_init(config, s, ckpt, data):
  restored = ckpt.restore_latest(s.abstract_state, data_like=data.state())
  if restored is not None:
    step, state, data_state = restored
    print(f"Resuming from checkpoint {ckpt.directory}/{step}", flush=True)
    return state, data_state
  state = trainer.init_state(s)
  if config.init_from:
    state = _load_init_from(config, s, state)
  return state, None


def _load_init_from(config, s, state):
  """Parameters only from another run (fine-tuning / transfer), with a key report."""
  step, flat_saved, report = checkpoint_lib.restore_params(config.init_from, state["params"])
  print(
    f"init_from {config.init_from} (step {step}): {len(report['missing'])} missing keys "
    f"(kept fresh), {len(report['unexpected'])} unexpected keys (ignored)",
    flush=True,
  )
  for key in report["missing"][:20]:
    print(f"  missing: {key}")
  for key in report["unexpected"][:20]:
    print(f"  unexpected: {key}")

  def take(path, fresh):
    key = jax.tree_util.keystr(path)
    if key in flat_saved and key not in report["missing"]:
      return jax.device_put(np.asarray(flat_saved[key]), fresh.sharding)
    return fresh

  state["params"] = jax.tree_util.tree_map_with_path(take, state["params"])
  return state


def train_and_evaluate(config, workdir):
  """Trains `config` in `workdir` (resuming if it holds checkpoints), then evaluates."""
  config_lib.validate(config)
  data_dir = _data_dir(config, workdir)
  config_lib.check_inputs(config, workdir, data_dir)
  tf.io.gfile.makedirs(workdir)
  _prepare_synthetic(config, data_dir)
  vocabs = padded_vocab.build_vocabularies(config, workdir)
  train_names = list(config.datasets.keys())
  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=config.keep_checkpoints,
    best_metric=config.best_metric,
  )
  # A finished, evaluated run is reused from its files: no state restore, no pipelines.
  last = (ckpt.all_steps() or [0])[-1]
  finished = os.path.join(workdir, f"eval_{last}.json")
  if last >= config.total_steps and tf.io.gfile.exists(finished):
    print(
      f"Training already finished at step {last}; reusing {finished} "
      f"(delete it to re-evaluate, or raise --config.total_steps to train on)",
      flush=True,
    )
    ckpt.close()
    with tf.io.gfile.GFile(finished) as f:
      results = json.load(f)
    print(eval_loop.format_table(results), flush=True)
    return results
  s = trainer.setup(config, len(train_names), padded_vocab.vocab_size(config, vocabs))
  data = data_lib.TrainData(config, data_dir, vocabs)
  state, data_state = _restore_or_init(config, s, ckpt, data)
  if data_state is not None:
    data.restore(data_state)
  start = int(jax.device_get(state["step"]))
  writer = metrics_lib.Writer(workdir, config.total_steps)
  if start == 0 and jax.process_index() == 0:
    with tf.io.gfile.GFile(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))

  preemption = PreemptionSync()
  previous_handler = signal.signal(signal.SIGTERM, preemption.handler)

  vocab_arrays = {
    name: jax.device_put(vocabs[name].arrays(), trainer.sharding_lib.replicated(s.mesh))
    for name in train_names
  }
  steps = {}
  config_json = json.loads(config.to_json_best_effort())
  pending = None  # (step, dataset, metrics) of the previous step: checked one step late
  window = []  # metrics since the last log line, fetched at log time.
  t_log, images_seen = time.time(), 0
  results = {}

  def save(step, force=False):
    ckpt.save(step, state, data_state=data.state(), config_json=config_json, force=force)

  def check(entry):
    step, name, m = entry
    if not bool(jax.device_get(m["finite"])):
      host = jax.device_get(m)
      bad = sorted(k for k, v in host.items() if np.ndim(v) == 0 and not np.isfinite(v))
      # The state kept the last good parameters (finite guard) but its step counter (and
      # the pipeline) moved past the bad batch: save under the state's own step, which
      # may already be a regular checkpoint (saving `step` again would clash with one).
      good = int(jax.device_get(state["step"]))
      ckpt.wait()
      if good not in ckpt.all_steps():
        save(good, force=True)
      ckpt.wait()
      raise NonFiniteLossError(
        f"non-finite loss at step {step} on dataset {name!r} "
        f"(task {config.datasets[name].task}); non-finite terms: {', '.join(bad)}. "
        f"Last good parameters saved to {ckpt.directory}/{good}."
      )

  try:
    with jax.transfer_guard("disallow" if config.transfer_guard else "allow"):
      for step in range(start, config.total_steps):
        name, local_batch = data.next(step)
        task = config.datasets[name].task
        if task not in steps:
          steps[task] = trainer.make_train_step(s, task)
        with jax.transfer_guard("allow"):  # the one explicit host->device copy per step.
          batch = trainer.global_batch(local_batch, s.mesh)
        state, m = steps[task](state, batch, vocab_arrays[name])
        if pending is not None:
          with jax.transfer_guard("allow"):
            check(pending)
        pending = (step, name, m)
        window.append((name, m))
        images_seen += config.batch_size
        done = step + 1
        if done % config.log_every == 0 or done == config.total_steps:
          with jax.transfer_guard("allow"):
            check(pending)
            _log(writer, done, window, t_log, images_seen)
          window, t_log, images_seen = [], time.time(), 0
        stop = preemption.should_stop()
        if done % config.checkpoint_every == 0 or done == config.total_steps or stop:
          with jax.transfer_guard("allow"):
            save(done)
        if stop:
          ckpt.wait()
          who = "" if preemption.signalled else " (received by another process)"
          print(f"SIGTERM{who}: saved checkpoint at step {done}; exiting", flush=True)
          writer.close()
          raise SystemExit(0)
        if done % config.eval_every == 0 and done != config.total_steps:
          with jax.transfer_guard("allow"):
            results = _evaluate(config, s, state, workdir, data_dir, vocabs, writer, done)
            ckpt.save_best(done, state, results)
    if pending is not None:
      check(pending)
    ckpt.wait()
    step = int(jax.device_get(state["step"]))
    results = _evaluate(config, s, state, workdir, data_dir, vocabs, writer, step)
    ckpt.save_best(step, state, results)
    ckpt.wait()
  finally:
    signal.signal(signal.SIGTERM, previous_handler)
    writer.flush()
  return results


def _log(writer, step, window, t_start, images):
  elapsed = max(time.time() - t_start, 1e-9)
  host = jax.device_get(window)
  scalars = {}
  per_dataset = {}
  for name, m in host:
    per_dataset.setdefault(name, []).append(m)
  for name, ms in per_dataset.items():
    for key in ms[0]:
      if np.ndim(ms[0][key]) == 0 and key != "finite":
        scalars[f"train/{name}/{key}"] = float(np.mean([m[key] for m in ms]))
  last = host[-1][1]
  scalars["train/lr"] = float(last["lr"])
  scalars["train/grad_norm"] = float(np.mean([m["grad_norm"] for _, m in host]))
  scalars["train/step_time_s"] = elapsed / len(host)
  scalars["train/images_per_s"] = images / elapsed
  mem = metrics_lib.device_memory_gib()
  if mem is not None:
    scalars["train/device_memory_gib"] = mem
  writer.scalars(step, scalars)
  losses = "  ".join(
    f"{name}: {np.mean([m['loss'] for m in ms]):.3f}" for name, ms in per_dataset.items()
  )
  writer.progress(step, f"loss {losses}  {scalars['train/images_per_s']:.1f} img/s")


def _evaluate(config, s, state, workdir, data_dir, vocabs, writer, step):
  results = eval_loop.evaluate_all(
    config, s, state, data_dir, vocabs, out_dir=os.path.join(workdir, f"eval_{step}")
  )
  writer.scalars(
    step, {f"eval/{k}": v for k, v in results.items() if np.isscalar(v) and np.isfinite(v)}
  )
  if jax.process_index() == 0:
    with tf.io.gfile.GFile(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
      json.dump(results, f, indent=1, sort_keys=True)
    print(eval_loop.format_table(results), flush=True)
  return results


def evaluate_only(config, workdir):
  """Evaluates the workdir's latest checkpoint (or config.init_from's) on eval_datasets."""
  config_lib.validate(config)
  data_dir = _data_dir(config, workdir)
  config_lib.check_inputs(config, workdir, data_dir)
  _prepare_synthetic(config, data_dir)
  vocabs = padded_vocab.build_vocabularies(config, workdir)
  s = trainer.setup(config, len(config.datasets), padded_vocab.vocab_size(config, vocabs))
  ckpt = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints
  )
  restored = ckpt.restore_latest(s.abstract_state)
  if restored is None:
    if not config.init_from:
      raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints and no init_from")
    state = _load_init_from(config, s, trainer.init_state(s))
    step = 0
  else:
    step, state, _ = restored
  writer = metrics_lib.Writer(workdir, config.total_steps)
  results = _evaluate(config, s, state, workdir, data_dir, vocabs, writer, step)
  writer.close()
  return results
