"""The trainer: sharded state, one jitted train step per task, the loop, evaluation.

big_vision's shape, kept importable and testable: `init_state` creates the state
directly in its shardings (eval_shape, then jit with out_shardings: never materialised
whole on one device); `make_train_step` returns one `jax.jit` program per task with
donated state and explicit in/out shardings, reused by every dataset of that task (the
vocabulary is an argument, padded to one static size); the per-step RNG is folded from
the step. A step whose loss or gradients are not finite leaves the state unchanged and
reports it; the loop stops with the step, the dataset and the offending terms.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dataseg import schema
from dataseg.model import dataseg_model
from dataseg.model import weights as weights_lib
from dataseg.objective import losses as losses_lib
from dataseg.train import optimizer as optimizer_lib
from dataseg.train import sharding as sharding_lib

LEARNED_VOCAB = "learned_vocab"  # params entry of the 'learned' classifier ablation.


def model_inputs(config, params, vocab):
  """Splits the learned vocabulary table (ablation) from the model's parameters."""
  model_params = {k: v for k, v in params.items() if k != LEARNED_VOCAB}
  text = vocab["text"]
  if config.classifier == "learned":
    text = params[LEARNED_VOCAB][vocab["index"]]
  return model_params, text


# Parameters are created from a small dummy image: no parameter's shape depends on the
# input size (ViTDet's position table is its pre-training grid, resized in the forward;
# tests/test_init.py checks r50 and vitdet_b), and the values depend only on the rng
# and the shapes. Why: tracing the forward at the training resolution built numpy
# position tables of the full-size feature maps, and its programs are larger for no gain.
INIT_IMAGE_SIZE = 64


def _init_variables(model, config, num_datasets, vocab_size, rng):
  size = min(config.image_size, INIT_IMAGE_SIZE)
  images = jnp.zeros((1, size, size, 3), jnp.uint8)
  text = jnp.zeros((vocab_size, config.model.classifier.text_dim), jnp.float32)
  valid = jnp.ones((vocab_size,), bool)
  model_rng, vocab_rng = jax.random.split(rng)
  variables = model.init(model_rng, images, text, valid, train=False)
  variables = dict(variables)
  if config.classifier == "learned":
    table = jax.random.normal(vocab_rng, (num_datasets, vocab_size, text.shape[-1]))
    variables["params"] = dict(variables["params"])
    variables["params"][LEARNED_VOCAB] = nn.with_logical_partitioning(
      lambda: table, (None, None, "text")
    )()
  return variables


@dataclasses.dataclass(eq=False)  # hashable by identity: caches key on it.
class Setup:
  """Everything built once per run: model, optimizer, mesh and the state's shardings."""

  config: Any
  model: nn.Module
  tx: optax.GradientTransformation
  lr_fn: Any
  mesh: jax.sharding.Mesh
  state_shardings: Any
  abstract_state: Any
  init_fn: Any


def setup(config, num_datasets, vocab_size, mesh=None):
  model = dataseg_model.build_model(config.model)
  tx, lr_fn = optimizer_lib.make(
    config.optimizer,
    config.total_steps,
    pretrained_backbone=bool(weights_lib.pretrained_path(config)),
  )
  mesh = mesh or sharding_lib.make_mesh(config.mesh)

  def init_fn(rng):
    variables = nn.meta.unbox(_init_variables(model, config, num_datasets, vocab_size, rng))
    params = variables.pop("params")
    state = dict(
      step=jnp.zeros((), jnp.int32),
      params=params,
      frozen=variables,
      opt_state=tx.init(params),
      rng=rng,
    )
    if config.optimizer.ema_decay:
      state["ema"] = params
    return state

  rng = jax.random.key_data(jax.random.PRNGKey(config.seed))
  boxed = jax.eval_shape(lambda r: _init_variables(model, config, num_datasets, vocab_size, r), rng)
  var_shardings = sharding_lib.param_shardings(boxed, mesh, config.sharding_rules)
  abstract = jax.eval_shape(init_fn, rng)
  param_sh = var_shardings["params"]
  table = sharding_lib.path_table(param_sh)
  rep = sharding_lib.replicated(mesh)
  shardings = dict(
    step=rep,
    params=param_sh,
    frozen={k: v for k, v in var_shardings.items() if k != "params"},
    opt_state=sharding_lib.like_params(abstract["opt_state"], table, mesh),
    rng=rep,
  )
  if "ema" in abstract:
    shardings["ema"] = param_sh
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return Setup(config, model, tx, lr_fn, mesh, shardings, abstract, init_fn)


def init_state(s: Setup):
  """The fresh state, created directly in its shardings, with the pretrained backbone
  (config.model.backbone.pretrained) merged in; a missing file stops before compiling."""
  weights_lib.check_pretrained(s.config)
  rng = jax.random.key_data(jax.random.PRNGKey(s.config.seed))
  state = jax.jit(s.init_fn, out_shardings=s.state_shardings)(rng)
  return weights_lib.load_pretrained(s.config, state)


def _loss_fn(s: Setup, task, params, frozen, batch, vocab, rng, step):
  model_params, text = model_inputs(s.config, params, vocab)
  outputs = s.model.apply(
    {"params": model_params, **frozen}, batch["image"], text, vocab["valid"], train=True
  )
  return losses_lib.compute_loss(
    outputs,
    batch,
    task=task,
    vocab_valid=vocab["valid"],
    is_thing_vocab=vocab["is_thing"],
    config=s.config.loss,
    rng=rng,
    step=step,
  )


def make_train_step(s: Setup, task: str):
  """The jitted step for `task`: (state, batch, vocab) -> (state, metrics)."""
  if task not in schema.TASKS:
    raise ValueError(f"unknown task {task!r}; allowed: {', '.join(schema.TASKS)}")
  config = s.config

  def step_fn(state, batch, vocab):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    grad_fn = jax.value_and_grad(functools.partial(_loss_fn, s, task), has_aux=True)
    (loss, metrics), grads = grad_fn(
      state["params"], state["frozen"], batch, vocab, rng, state["step"]
    )
    updates, opt_state = s.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    if "ema" in state:
      decay = config.optimizer.ema_decay
      new["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], params)
    # Non-finite step: keep the last good parameters (the host loop stops on the flag).
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    new["step"] = state["step"] + 1
    metrics = dict(
      metrics, loss=loss, grad_norm=grad_norm, lr=s.lr_fn(state["step"]), finite=finite
    )
    return new, metrics

  batch_sh = sharding_lib.batch_sharding(s.mesh)
  rep = sharding_lib.replicated(s.mesh)
  return jax.jit(
    step_fn,
    donate_argnums=(0,),
    in_shardings=(s.state_shardings, batch_sh, rep),
    out_shardings=(s.state_shardings, rep),
  )


def make_predict_fn(s: Setup):
  """Jitted forward pass for evaluation: final-layer class and mask logits."""

  def predict(state, images, vocab):
    params = state.get("ema", state["params"])
    model_params, text = model_inputs(s.config, params, vocab)
    out = s.model.apply(
      {"params": model_params, **state["frozen"]}, images, text, vocab["valid"], train=False
    )
    return out["class_logits"][-1], out["mask_logits"][-1]

  return jax.jit(predict)


def global_batch(local_batch, mesh):
  """Host-local numpy batch -> global jax.Arrays split over the mesh's batch axes."""
  sharding = sharding_lib.batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }
