"""Parameter init from a small dummy image (trainer.INIT_IMAGE_SIZE) gives the full-size
model's parameters: same tree, shapes and dtypes, and the same values."""

import jax
import numpy as np
import pytest

from configs import common
from configs import demo
from dataseg.model import configs as model_configs
from dataseg.model import dataseg_model
from dataseg.train import trainer


def _abstract(config, vocab=7):
  model = dataseg_model.build_model(config.model)
  rng = jax.random.key_data(jax.random.PRNGKey(0))
  return jax.eval_shape(lambda r: trainer._init_variables(model, config, 1, vocab, r), rng)  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["r50", "vitdet_b"])
def test_param_shapes_do_not_depend_on_image_size(name):
  config = common.base_config()
  config.model = model_configs.model_config(name)
  config.image_size = 1024
  full = _abstract(config)
  config.image_size = trainer.INIT_IMAGE_SIZE
  small = _abstract(config)
  assert jax.tree.structure(full) == jax.tree.structure(small)
  same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), full, small)
  assert all(jax.tree.leaves(same))


def test_init_values_do_not_depend_on_image_size(monkeypatch):
  """Values depend on the rng and the shapes only: init from a 64x64 image (the default)
  and from the config's 128x128 (as before INIT_IMAGE_SIZE). Two separately compiled
  programs: the initialisers' float arithmetic may differ in the last bit, hence rtol/atol
  1e-6."""
  out = []
  for init_size in (trainer.INIT_IMAGE_SIZE, 128):
    monkeypatch.setattr(trainer, "INIT_IMAGE_SIZE", init_size)
    config = demo.get_config("smoke")
    config.image_size = 128
    s = trainer.setup(config, 1, 7)
    rng = jax.random.key_data(jax.random.PRNGKey(config.seed))
    out.append(jax.device_get(jax.jit(s.init_fn)(rng)["params"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), *out)
