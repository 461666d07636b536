r"""Convolution kernel gradient on CPU: XLA's against layers.py's one matmul per tap.

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 1 python bench/conv_grad.py

For the R50 / pixel-decoder conv shapes of a 256x256 batch of 2: GFLOP/s of the forward,
the input gradient and the kernel gradient (`jax.vjp` of `lax.conv_general_dilated`),
and of `layers.conv_kernel_grad_by_taps`; process CPU time, median of 5 after a warm-up.
"""

import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataseg.model import layers  # pylint: disable=wrong-import-position

# (batch, height, width, in, out, kernel, stride)
CASES = [
  (2, 64, 64, 256, 256, 3, 1),  # pixel decoder's stride-4 output conv
  (2, 64, 64, 256, 256, 1, 1),  # its lateral / mask_features 1x1
  (2, 64, 64, 64, 64, 3, 1),  # layer1 conv2
  (2, 64, 64, 256, 64, 1, 1),  # layer1 conv1
  (2, 64, 64, 128, 128, 3, 2),  # layer2_0 conv2 (strided)
  (2, 16, 16, 256, 256, 3, 1),  # layer3 conv2
  (2, 8, 8, 512, 512, 3, 1),  # layer4 conv2
  (2, 256, 256, 3, 64, 7, 2),  # stem (XLA's gradient is kept there: < 16 channels)
]


def timeit(f, *args, n=5):
  f = jax.jit(f)
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(n):
    t = time.process_time()
    jax.block_until_ready(f(*args))
    ts.append(time.process_time() - t)
  return float(np.median(ts))


def main():
  rng = np.random.default_rng(0)
  for b, h, w, ci, co, k, s in CASES:
    x = jax.numpy.asarray(rng.normal(size=(b, h, w, ci)).astype(np.float32))
    kern = jax.numpy.asarray(rng.normal(size=(k, k, ci, co)).astype(np.float32))
    pad = [(k // 2, k // 2)] * 2
    conv = lambda x, kern: layers._lax_conv(x, kern, (s, s), pad)  # pylint: disable=protected-access
    g = jax.numpy.ones(conv(x, kern).shape, np.float32)
    gflop = 2 * b * (h // s) * (w // s) * ci * co * k * k / 1e9
    t_fwd = timeit(conv, x, kern)
    t_gx = timeit(lambda x, kern: jax.vjp(lambda x: conv(x, kern), x)[1](g)[0], x, kern)
    t_gw = timeit(lambda x, kern: jax.vjp(lambda kern: conv(x, kern), kern)[1](g)[0], x, kern)
    t_taps = timeit(lambda x, g: layers.conv_kernel_grad_by_taps(x, g, (k, k), (s, s), pad), x, g)
    print(
      f"{b}x{h}x{w}x{ci} -> {co}, {k}x{k} stride {s} ({gflop:.2f} GFLOP): XLA forward "
      f"{gflop / t_fwd:.1f}, input grad {gflop / t_gx:.1f}, kernel grad {gflop / t_gw:.1f} "
      f"GFLOP/s; kernel grad by taps {gflop / t_taps:.1f} GFLOP/s",
      flush=True,
    )


if __name__ == "__main__":
  main()
