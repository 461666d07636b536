"""layers.conv's CPU kernel gradient (one matmul per kernel tap) against XLA's own
convolution gradient, and the module's variables unchanged.

Tolerances: both sides are float32 sums of the same products in different orders
(a 3x3 kernel gradient sums B*Ho*Wo = 2*32*32 products per entry), so rtol/atol 1e-4
relative to the gradient's scale is rounding, not a formula difference (a wrong tap,
stride or padding changes entries by O(1))."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dataseg.model import layers

# (input channels, output channels, kernel, stride, padding as layers.conv / backbone pass it);
# inputs 2 x 32 x 32: the stride-1 3x3 has 2048 output rows (>= TAPS_MIN_ROWS: by taps), the
# stride-2 one 512 (XLA's kernel gradient).
CASES = [
  (16, 24, 1, 1, "SAME"),
  (16, 24, 1, 2, [(0, 0), (0, 0)]),  # ResNet's strided 1x1 downsample
  (16, 8, 3, 1, "SAME"),
  (16, 8, 3, 2, [(1, 1), (1, 1)]),  # ResNet v1.5's strided 3x3
  (3, 8, 7, 2, [(3, 3), (3, 3)]),  # the stem: < 16 input channels, XLA's gradient
]


def _lax_conv(x, w, strides, padding):
  return jax.lax.conv_general_dilated(
    x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_value_and_gradients_match_xla(case):
  cin, cout, k, s, padding = case
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 32, 32, cin)), jnp.float32)
  mod = layers.conv(cout, k, s, padding=padding, use_bias=True)
  params = nn.unbox(mod.init(jax.random.PRNGKey(0), x))
  kernel = params["params"]["kernel"]
  assert kernel.shape == (k, k, cin, cout) and params["params"]["bias"].shape == (cout,)
  y = mod.apply(params, x)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)

  def ours(x, kernel):
    return jnp.vdot(
      mod.apply({"params": {"kernel": kernel, "bias": params["params"]["bias"]}}, x), g
    )

  pads = padding
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads((32, 32), (k, k), (s, s), padding)

  def reference(x, kernel):
    return jnp.vdot(_lax_conv(x, kernel, (s, s), pads) + params["params"]["bias"], g)

  got = jax.jit(jax.grad(ours, (0, 1)))(x, kernel)
  want = jax.jit(jax.grad(reference, (0, 1)))(x, kernel)
  np.testing.assert_allclose(
    y, _lax_conv(x, kernel, (s, s), pads) + params["params"]["bias"], rtol=1e-5, atol=1e-5
  )
  for a, b in zip(got, want):
    scale = float(jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale)


def test_kernel_grad_by_taps_matches_numpy():
  """The per-tap formula itself against a loop in numpy (float64)."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 6, 5)).astype(np.float32)
  k, s, pad = 3, 2, ((1, 1), (1, 1))
  ho, wo = 4, 3
  g = rng.normal(size=(2, ho, wo, 4)).astype(np.float32)
  got = layers.conv_kernel_grad_by_taps(jnp.asarray(x), jnp.asarray(g), (k, k), (s, s), pad)
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((k, k, 5, 4))
  for i in range(k):
    for j in range(k):
      for yy in range(ho):
        for xx in range(wo):
          want[i, j] += np.einsum("bi,bo->io", xp[:, i + s * yy, j + s * xx], g[:, yy, xx])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_param_tree_is_nn_conv():
  """Same variable names and shapes as a plain nn.Conv (checkpoints, weights.py)."""
  x = jnp.zeros((1, 8, 8, 16))
  ours = layers.conv(32, 3, name="c").init(jax.random.PRNGKey(0), x)
  plain = nn.Conv(32, (3, 3)).init(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, nn.unbox(ours)) == jax.tree.map(jnp.shape, plain)
