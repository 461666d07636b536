r"""Trains the tiny config 3 steps on several meshes of simulated CPU devices (a subprocess).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python tests/mesh_check.py DATA_DIR EMB.npy WORK_DIR OUT.npz

The device count must be set before jax initialises, hence a separate process (the
other tests keep 1 device). Every mesh starts from the same initial state (created once
on one device, then placed into each mesh's shardings) and sees the same 3 batches;
with FSDP rules ('embed' and 'conv_out' over `fsdp`) parameters and Adam moments are
really split. Writes, per mesh, the losses and the final parameters; plus a checkpoint
written on the 4x2 mesh and restored onto 2x4 (values and shardings).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
import trainer_driver

from dataseg.train import checkpoint as checkpoint_lib
from dataseg.train import data as data_lib
from dataseg.train import sharding as sharding_lib
from dataseg.train import trainer
from dataseg.vocab import padded as padded_vocab

# One device against a mesh that splits both the batch (data=4) and the parameters and
# Adam moments (fsdp=2): together they exercise every reduction the sharded step adds.
# The 2x4 mesh is only restored onto (other shardings of the same checkpoint).
MESHES = {"1": None, "4x2": (4, 2)}
RESTORE_MESH = (2, 4)
FSDP_RULES = (
  ("embed", "fsdp"),
  ("mlp", ""),
  ("heads", ""),
  ("kv", ""),
  ("conv_out", "fsdp"),
  ("batch", ("data", "fsdp")),
)
NUM_STEPS = 3


def _flat(tree):
  return {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  }


def _sharded_count(shardings):
  """Parameters whose sharding really splits them over `fsdp`."""
  return sum("fsdp" in str(sh.spec) for sh in jax.tree.leaves(shardings))


def main(data_dir, emb, work_dir, out_path):
  assert jax.device_count() == 8, jax.devices()
  config = trainer_driver.tiny_config(data_dir, emb, steps=NUM_STEPS)
  config.sharding_rules = FSDP_RULES
  # Uniformly random mask-loss points: importance sampling keeps the most uncertain points,
  # a selection by float comparison that a 1e-7 reassociation difference can flip (and with
  # it the loss by ~1/num_points of a point's loss), which is not what this test is about.
  # The sharded reductions are; the selection is tested against numpy in its own tests.
  config.loss.importance_ratio = 0.0
  vocabs = padded_vocab.build_vocabularies(config, work_dir)
  v_size = padded_vocab.vocab_size(config, vocabs)
  data = data_lib.TrainData(config, data_dir, vocabs)
  batches = [data.next(i) for i in range(NUM_STEPS)]
  out = {}
  host_state = None
  for key, shape in MESHES.items():
    if shape is None:
      mesh = sharding_lib.make_mesh(dict(data=1, fsdp=1, model=1), jax.devices()[:1])
    else:
      mesh = sharding_lib.make_mesh(dict(data=shape[0], fsdp=shape[1], model=1))
    s = trainer.setup(config, 1, v_size, mesh=mesh)
    if host_state is None:
      host_state = jax.device_get(trainer.init_state(s))
    state = jax.device_put(host_state, s.state_shardings)
    out[f"{key}/fsdp_sharded"] = np.int32(_sharded_count(s.state_shardings["params"]))
    losses, grad_norms = [], []
    for name, batch in batches:
      step = trainer.make_train_step(s, config.datasets[name].task)
      vocab = jax.device_put(vocabs[name].arrays(), sharding_lib.replicated(mesh))
      state, m = step(state, trainer.global_batch(batch, mesh), vocab)
      losses.append(float(m["loss"]))
      grad_norms.append(float(m["grad_norm"]))
    out[f"{key}/loss"] = np.asarray(losses)
    out[f"{key}/grad_norm"] = np.asarray(grad_norms)
    for k, v in _flat(state["params"]).items():
      out[f"{key}/params/{k}"] = v
    if key == "4x2":
      ckpt = checkpoint_lib.Checkpointer(os.path.join(work_dir, "ckpt"), async_save=True)
      ckpt.save(NUM_STEPS, state, data_state=data.state(), config_json={}, force=True)
      ckpt.wait()
      saved = _flat(state)
  # Restore the 4x2 checkpoint onto the 2x4 mesh: values, and the 2x4 shardings.
  s = trainer.setup(
    config,
    1,
    v_size,
    mesh=sharding_lib.make_mesh(dict(data=RESTORE_MESH[0], fsdp=RESTORE_MESH[1], model=1)),
  )
  ckpt = checkpoint_lib.Checkpointer(os.path.join(work_dir, "ckpt"))
  step, restored, _ = ckpt.restore_latest(s.abstract_state)
  out["restore/step"] = np.int32(step)
  same_sharding = jax.tree.map(lambda a, sh: a.sharding == sh, restored, s.state_shardings)
  out["restore/shardings_match"] = np.bool_(all(jax.tree.leaves(same_sharding)))
  out["restore/max_abs_diff"] = np.float32(
    max(
      float(np.max(np.abs(v.astype(np.float64) - saved[k].astype(np.float64)), initial=0))
      for k, v in _flat(restored).items()
    )
  )
  out["restore/num_leaves"] = np.int32(len(saved))
  np.savez(out_path, **out)
  print("mesh_check done", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:5])
