"""The auxiliary per-pixel class loss (loss.pixel_class_weight, model.pixel_head)."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_costs_losses import HM  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_costs_losses import IS_THING  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_costs_losses import WM  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_costs_losses import V  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_costs_losses import edge_case_batch  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_costs_losses import fast_jit  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_costs_losses import make_image  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_costs_losses import random_outputs  # pylint: disable=g-import-not-at-top,wrong-import-position
from test_costs_losses import small_config  # pylint: disable=g-import-not-at-top,wrong-import-position

from dataseg.model import configs as model_configs
from dataseg.model import dataseg_model
from dataseg.objective import losses


def np_pixel_ce(logits, img, vocab_valid, balance="segment"):
  """Reference: CE at the centre pixel (4i + 2, 4j + 2) of each stride-4 cell.

  Returns (weighted CE sum, sum of weights): per-cell weight 1 ('pixel'), or
  1 / (the segment's labelled cells) ('segment').
  """
  keep_v = np.append(vocab_valid, True)
  cells = {}  # segment -> list of CE
  for i in range(logits.shape[0]):
    for j in range(logits.shape[1]):
      y, x = 4 * i + 2, 4 * j + 2
      s = img["segment_map"][y, x]
      if s < 0 or not img["valid"][y, x] or img["seg_is_crowd"][s]:
        continue
      c = img["seg_class"][s]
      if c < 0:
        continue
      z = np.where(keep_v, logits[i, j], -np.inf).astype(np.float64)
      logp = z - np.log(np.sum(np.exp(z - z.max()))) - z.max()
      cells.setdefault(int(s), []).append(-logp[c])
  if balance == "pixel":
    return sum(sum(v) for v in cells.values()), sum(len(v) for v in cells.values())
  return sum(np.mean(v) for v in cells.values()), len(cells)


@pytest.mark.parametrize("balance", ["segment", "pixel"])
@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_class_sums_match_numpy(seed, balance):
  img = make_image(seed)
  r = np.random.RandomState(10 + seed)
  logits = r.randn(HM, WM, V + 1).astype(np.float32) * 3
  vocab_valid = np.array([True, True, True, True, False])
  cfg = small_config(pixel_class_balance=balance)
  ce, n = losses.pixel_class_sums(
    jnp.asarray(logits), {k: jnp.asarray(v) for k, v in img.items()}, jnp.asarray(vocab_valid), cfg
  )
  ref_ce, ref_n = np_pixel_ce(logits, img, vocab_valid, balance)
  assert ref_n > 1
  # float32 log-softmax and 1/n weights against float64.
  np.testing.assert_allclose(float(n), ref_n, rtol=1e-6)
  np.testing.assert_allclose(float(ce), ref_ce, rtol=1e-5)


def test_compute_loss_adds_the_pixel_term_and_skips_box_data():
  batch = edge_case_batch()
  r = np.random.RandomState(3)
  outputs = dict(random_outputs(), pixel_logits=jnp.asarray(r.randn(4, HM, WM, V + 1), jnp.float32))
  vocab_valid = np.ones(V, bool)

  def run(task, weight):
    cfg = small_config(pixel_class_weight=weight)
    fn = fast_jit(
      lambda o, b: losses.compute_loss(
        o,
        b,
        task=task,
        vocab_valid=vocab_valid,
        is_thing_vocab=IS_THING,
        config=cfg,
        rng=jax.random.PRNGKey(0),
      )
    )
    return fn(outputs, batch)

  total0, m0 = run("panoptic", 0.0)
  total1, m1 = run("panoptic", 2.0)
  assert "loss_pixel_class" not in m0
  ce = n = 0.0
  for b in range(4):
    img = {k: v[b] for k, v in batch.items()}
    c, k = np_pixel_ce(np.asarray(outputs["pixel_logits"][b]), img, vocab_valid)
    ce, n = ce + c, n + k
  assert n > 0
  np.testing.assert_allclose(float(m1["loss_pixel_class"]), ce / n, rtol=1e-5)
  # Same program structure otherwise: the other terms are the same computation.
  np.testing.assert_allclose(float(total1) - float(total0), 2.0 * ce / n, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="pixel_class_balance"):
    losses.pixel_class_sums(
      outputs["pixel_logits"][0],
      {k: v[0] for k, v in batch.items()},
      vocab_valid,
      small_config(pixel_class_balance="area"),
    )
  _, mb = run("boxes", 2.0)  # box-only data has no pixel labels: no term.
  assert "loss_pixel_class" not in mb


def test_model_pixel_head_outputs():
  cfg = model_configs.model_config("tiny")
  cfg.classifier.text_dim = 8
  cfg.pixel_head = True
  model = dataseg_model.build_model(cfg)
  images = jnp.zeros((1, 32, 32, 3), jnp.uint8) + jnp.arange(32, dtype=jnp.uint8)[:, None, None]
  text = jax.random.normal(jax.random.PRNGKey(1), (V, 8))
  valid = jnp.array([True] * (V - 1) + [False])
  variables = fast_jit(model.init)(jax.random.PRNGKey(0), images, text, valid)
  out = fast_jit(model.apply)(variables, images, text, valid)
  assert out["pixel_logits"].shape == (1, 8, 8, V + 1)
  assert np.all(np.asarray(out["pixel_logits"])[..., V - 1] == -1e9)  # padded entry.
  assert "pixel_classifier" in variables["params"]
  cfg.pixel_head = False
  plain = dataseg_model.build_model(cfg)
  plain_vars = jax.eval_shape(plain.init, jax.random.PRNGKey(0), images, text, valid)
  assert "pixel_logits" not in jax.eval_shape(plain.apply, plain_vars, images, text, valid)
  assert "pixel_classifier" not in plain_vars["params"]
