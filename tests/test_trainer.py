"""The train step: meshes of simulated devices, restore onto another mesh, EMA, NaN guard.

The mesh comparison runs tests/mesh_check.py in a subprocess with 8 simulated CPU
devices (the device count is fixed when jax initialises; this process keeps 1). The
EMA / non-finite guard unit tests drive `trainer.make_train_step` with a quadratic loss
in place of the model's (same step function, tiny compile); the end-to-end NaN test runs
`dataseg.main` with NaN class embeddings injected at one step.
"""

import dataclasses
import subprocess
import sys

import conftest
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import trainer_driver

from dataseg.train import optimizer as optimizer_lib
from dataseg.train import sharding as sharding_lib
from dataseg.train import trainer

# Tolerances of the mesh comparison (float32; the meshes differ only in how the batch
# and the parameters are split, i.e. in the order of reductions). The learning rate is 0
# at step 0 (warm-up), so steps 0 and 1 start from the same parameters: their losses (O(10))
# agree to SAME_PARAMS_LOSS_RTOL (measured <= 4e-7). Their gradient norms check the backward
# pass (Adam's scale invariance would hide a wrongly scaled gradient); at initialisation the
# norm is ~4e4 for a loss of ~11, an ill-conditioned sum that amplifies rounding: measured
# 2.3e-4 and 6e-6 relative, so GRAD_NORM_RTOL is 2e-3 (a missing cross-device sum would be
# off by a factor). Step 2 starts from parameters that differ: Adam's first updates are close
# to lr * sign(gradient), so an element whose gradient is tiny or ~0 (e.g. attention key
# biases, to which softmax is invariant) moves by up to ~lr in a direction set by rounding
# noise, in either run. Hence step 2's loss agrees to LOSS_RTOL (measured 2-3e-5), and after
# the 3 steps (lr 0, 1.5e-4, 3e-4) every parameter to PARAM_ATOL_ALL (measured 4.8e-4) and
# 99% of them to PARAM_ATOL_BULK = lr / 3 (measured 99.92%).
SAME_PARAMS_LOSS_RTOL = 1e-5
GRAD_NORM_RTOL = 2e-3
LOSS_RTOL = 2e-4
PARAM_ATOL_ALL = 2e-3
PARAM_ATOL_BULK = 1e-4


@pytest.fixture(scope="module")
def mesh_results(tiny_env, tmp_path_factory):
  work = tmp_path_factory.mktemp("mesh")
  out = work / "out.npz"
  proc = subprocess.run(
    [
      sys.executable,
      str(conftest.TESTS / "mesh_check.py"),
      str(tiny_env.data_dir),
      str(tiny_env.emb),
      str(work),
      str(out),
    ],
    cwd=str(conftest.ROOT),
    env=tiny_env.env(devices=8),
    capture_output=True,
    text=True,
    timeout=900,
    check=False,
  )
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
  with np.load(out) as f:
    return dict(f)


@pytest.mark.parametrize("mesh", ["4x2"])
def test_train_step_on_meshes_matches_one_device(mesh_results, mesh):
  r = mesh_results
  assert r[f"{mesh}/fsdp_sharded"] > 10  # fsdp > 1: parameters really are split.
  assert np.all(np.isfinite(r["1/loss"]))
  np.testing.assert_allclose(r[f"{mesh}/loss"][:2], r["1/loss"][:2], rtol=SAME_PARAMS_LOSS_RTOL)
  np.testing.assert_allclose(r[f"{mesh}/grad_norm"][:2], r["1/grad_norm"][:2], rtol=GRAD_NORM_RTOL)
  np.testing.assert_allclose(r[f"{mesh}/loss"], r["1/loss"], rtol=LOSS_RTOL)
  keys = [k[len("1/params/") :] for k in r if k.startswith("1/params/")]
  assert len(keys) > 50
  diffs = []
  for key in keys:
    want = r[f"1/params/{key}"]
    np.testing.assert_allclose(
      r[f"{mesh}/params/{key}"], want, rtol=0, atol=PARAM_ATOL_ALL, err_msg=key
    )
    diffs.append(np.abs(r[f"{mesh}/params/{key}"] - want).ravel())
  diffs = np.concatenate(diffs)
  assert np.mean(diffs <= PARAM_ATOL_BULK) >= 0.99


def test_restore_onto_another_mesh(mesh_results):
  r = mesh_results
  assert int(r["restore/step"]) == 3
  assert bool(r["restore/shardings_match"])  # restored straight into the 2x4 shardings.
  assert int(r["restore/num_leaves"]) > 100  # params, Adam moments, step, rng.
  assert float(r["restore/max_abs_diff"]) == 0.0


def test_nan_guard_stops_with_message_and_saves_last_good(tiny_env, reference_run, tmp_path):
  workdir = tmp_path / "run"
  proc = tiny_env.driver(workdir, extra_env=dict(DRIVER_NAN_AT_STEP=4))
  log = proc.stdout
  assert proc.returncode != 0
  assert "NonFiniteLossError" in log, log[-5000:]
  assert (
    f"non-finite loss at step 4 on dataset '{trainer_driver.DATASET}' "
    f"(task semantic); non-finite terms:"
  ) in log
  terms = log.split("non-finite terms:")[1].split(".")[0]
  # NaN class embeddings poison the class logits (and, through matching and the soft
  # merge, the mask terms): the class term and the total must be named.
  assert "loss_class" in terms and "total_loss" in terms and "grad_norm" in terms
  assert f"Last good parameters saved to {workdir}/checkpoints/5." in log
  # Steps 0..3 were good; the guard kept their result: the reference's step-4 state.
  got = trainer_driver.load_checkpoint(workdir, 5)
  want = trainer_driver.load_checkpoint(reference_run.workdir, 4)
  for key in want:
    if key.startswith(("['params']", "['opt_state']")):
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert int(got["['step']"]) == 5  # past the bad batch: a resume skips it.


# ---- Step-function unit tests with a quadratic loss (no model, tiny compile). ----


def _fake_setup(monkeypatch, ema_decay):
  opt = ml_collections.ConfigDict(
    dict(
      lr=0.1,
      weight_decay=0.0,
      backbone_multiplier=1.0,
      schedule="constant",
      poly_power=0.9,
      warmup_steps=0,
      step_boundaries=(0.5,),
      step_factor=0.1,
      clip_norm=0.0,
      grad_accum_steps=1,
      ema_decay=ema_decay,
      b1=0.9,
      b2=0.999,
    )
  )
  config = ml_collections.ConfigDict(dict(optimizer=opt, classifier="text"))
  tx, lr_fn = optimizer_lib.make(opt, 10)
  mesh = sharding_lib.make_mesh(dict(data=-1, fsdp=1, model=1), jax.devices()[:1])

  def loss_fn(s, task, params, frozen, batch, vocab, rng, step):
    del s, task, frozen, vocab, rng, step
    pred = batch["x"] @ params["head"]["kernel"]
    loss = jnp.mean((pred - batch["y"]) ** 2) * batch["scale"][0]
    return loss, dict(loss_term=loss)

  monkeypatch.setattr(trainer, "_loss_fn", loss_fn)

  def init_fn(rng):
    params = {"head": {"kernel": jnp.arange(6, dtype=jnp.float32).reshape(3, 2) / 10}}
    state = dict(
      step=jnp.zeros((), jnp.int32), params=params, frozen={}, opt_state=tx.init(params), rng=rng
    )
    if ema_decay:
      state["ema"] = params
    return state

  rng = jax.random.key_data(jax.random.PRNGKey(0))
  abstract = jax.eval_shape(init_fn, rng)
  shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract)
  s = trainer.Setup(config, None, tx, lr_fn, mesh, shardings, abstract, init_fn)
  return s, jax.jit(init_fn, out_shardings=shardings)(rng)


def _batch(seed, scale=1.0):
  r = np.random.default_rng(seed)
  return dict(
    x=r.normal(size=(4, 3)).astype(np.float32),
    y=r.normal(size=(4, 2)).astype(np.float32),
    scale=np.full((4,), scale, np.float32),
  )


def _numpy_adam(p, grads, lr=0.1, b1=0.9, b2=0.999, eps=1e-8):
  m = v = np.zeros_like(p)
  out = []
  for t, g in enumerate(grads, 1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    out.append(p)
  return out


def _grad(p, b):
  # d/dp mean((x p - y)^2) over the [4, 2] outputs.
  return 2 * b["x"].T @ (b["x"] @ p - b["y"]) / b["y"].size


def test_step_ema_and_adam_match_numpy(monkeypatch):
  decay = 0.9
  s, state = _fake_setup(monkeypatch, decay)
  step = trainer.make_train_step(s, "semantic")
  p0 = np.asarray(state["params"]["head"]["kernel"], np.float64)
  batches = [_batch(i) for i in range(3)]
  vocab = {}
  p, grads = p0, []
  for b in batches:
    grads.append(_grad(p, b))
    p = _numpy_adam(p0, grads)[-1]
  ps = _numpy_adam(p0, grads)
  ema = p0
  for p in ps:
    ema = decay * ema + (1 - decay) * p
  for b in batches:
    state, m = step(state, trainer.global_batch(b, s.mesh), vocab)
    assert bool(m["finite"])
  # float32 step vs float64 numpy; steps are ~lr = 0.1, so 1e-5 is a 1e-4 relative error.
  np.testing.assert_allclose(state["params"]["head"]["kernel"], ps[-1], rtol=0, atol=1e-5)
  np.testing.assert_allclose(state["ema"]["head"]["kernel"], ema, rtol=0, atol=1e-5)
  assert int(state["step"]) == 3
  np.testing.assert_allclose(float(m["lr"]), 0.1, rtol=1e-6)


def test_step_non_finite_keeps_state(monkeypatch):
  s, state = _fake_setup(monkeypatch, 0.5)
  step = trainer.make_train_step(s, "semantic")
  state, _ = step(state, trainer.global_batch(_batch(0), s.mesh), {})
  before = jax.device_get(state)
  state, m = step(state, trainer.global_batch(_batch(1, scale=np.nan), s.mesh), {})
  after = jax.device_get(state)
  assert not bool(m["finite"]) and not np.isfinite(float(m["loss_term"]))
  assert int(after["step"]) == 2  # the counter moves on with the data pipeline.
  for key in ("params", "opt_state", "ema", "rng"):
    jax.tree.map(np.testing.assert_array_equal, after[key], before[key])
  state, m = step(state, trainer.global_batch(_batch(2), s.mesh), {})
  assert bool(m["finite"])  # training continues normally from the kept state.
  assert np.all(np.isfinite(jax.device_get(state["params"]["head"]["kernel"])))


def test_setup_rejects_unknown_task(monkeypatch):
  s, _ = _fake_setup(monkeypatch, 0.0)
  with pytest.raises(ValueError, match="unknown task 'depth'"):
    trainer.make_train_step(s, "depth")


def test_fake_setup_is_a_setup():
  # Guards the unit tests above against Setup growing fields they do not fill.
  assert [f.name for f in dataclasses.fields(trainer.Setup)] == [
    "config",
    "model",
    "tx",
    "lr_fn",
    "mesh",
    "state_shardings",
    "abstract_state",
    "init_fn",
  ]
