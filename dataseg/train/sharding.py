"""Device mesh and parameter shardings from config (MaxText's habit: sharding is config).

The mesh has three named axes, `data`, `fsdp` and `model` (-1 = all remaining devices).
Parameters carry logical axis names (dataseg/model/dataseg_model.py: LOGICAL_AXES); the
config's `sharding_rules` map logical names to mesh axes, so switching from pure data
parallelism to FSDP is a config edit: `("embed", "fsdp")`. Batches are split over
(`data`, `fsdp`).
"""

import math
import re

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices):
  """Resolves -1 in {data, fsdp, model} against `num_devices`."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
      f"devices, {num_devices} available"
    )
  return tuple(sizes)


def make_mesh(mesh_config, devices=None):
  devices = devices if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  )


def single_device_mesh(device=None) -> jax.sharding.Mesh:
  """A (1, 1, 1) mesh over one local device: every parameter replicated on it."""
  device = device or jax.local_devices()[0]
  return jax.make_mesh(
    (1,) * len(MESH_AXES),
    MESH_AXES,
    devices=[device],
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
  )


def data_parallel_mesh() -> jax.sharding.Mesh:
  """All devices on the `data` axis (parameters replicated): evaluation on any machine."""
  return make_mesh(dict(data=-1, fsdp=1, model=1))


def logical_rules(config_rules):
  """Config rules ('' = replicated) -> flax logical axis rules."""
  return tuple(
    (name, (axis or None) if not isinstance(axis, (tuple, list)) else tuple(axis))
    for name, axis in config_rules
  )


def param_shardings(boxed_abstract, mesh, config_rules):
  """NamedShardings for a (boxed, abstract) variable tree, from its logical axis names."""
  specs = nn.get_partition_spec(boxed_abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules(config_rules))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P(BATCH_AXES))


def like_params(tree, param_paths_to_sharding, mesh):
  """Shardings for a tree (optimizer state) whose leaves mirror parameters by path suffix.

  Adam's moments have the parameters' paths as suffixes of their own; every other leaf
  (counts, scalars) is replicated.
  """

  def pick(path, leaf):
    keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    for n in range(len(keys)):
      sharding = param_paths_to_sharding.get(keys[n:])
      if sharding is not None and len(sharding.spec) <= np.ndim(leaf):
        return sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def path_table(tree):
  """{path tuple of str: leaf} of a tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf for path, leaf in flat
  }


def _tasks_on_this_node(env):
  """Tasks of this job step on this node, from Slurm's compressed list "8(x2),4"."""
  if env.get("SLURM_NTASKS_PER_NODE"):
    return int(env["SLURM_NTASKS_PER_NODE"])
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if not spec:
    return None
  counts = []
  for part in spec.split(","):
    m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if not m:
      return None
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  node = int(env.get("SLURM_NODEID", "0"))
  return counts[node] if node < len(counts) else None


def slurm_local_device_ids(env):
  """The local GPU indices this Slurm task should drive, for jax.distributed.initialize.

  jax's Slurm detection assumes one task per GPU and restricts every process to the GPU
  numbered SLURM_LOCALID, so the launch script's one task per node would train on one GPU
  of eight. Returns [] (no restriction: every GPU the process sees) when the task is alone
  on its node or Slurm already bound GPUs to tasks (fewer visible than on the node); the
  task's equal share of the node's GPUs when several unbound tasks share a node; None
  (jax's default) when the allocation does not say; JAX_LOCAL_DEVICE_IDS wins if set.
  """
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    return None
  tasks = _tasks_on_this_node(env)
  if tasks == 1:
    return []
  visible = env.get("CUDA_VISIBLE_DEVICES")
  n_visible = len([d for d in visible.split(",") if d.strip()]) if visible else None
  on_node = env.get("SLURM_GPUS_ON_NODE")
  on_node = int(on_node) if on_node and on_node.isdigit() else None
  if n_visible is not None and on_node is not None and n_visible < on_node:
    return []  # --gpus-per-task / --gpu-bind: the task sees only its own GPUs.
  n = n_visible if n_visible is not None else on_node
  if tasks and n and n % tasks == 0:
    local = int(env.get("SLURM_LOCALID", "0"))
    share = n // tasks
    return list(range(local * share, (local + 1) * share))
  return None
