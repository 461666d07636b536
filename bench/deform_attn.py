r"""Multi-scale deformable attention's core on CPU: forward and gradient times.

  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 1 \
      python bench/deform_attn.py --sizes 256,512

Pixel-decoder shapes of R50 Mask2Former (batch 2, 8 heads of 32, 3 levels at strides
32/16/8, 4 points) for each image side: process CPU time (median of 3 after a warm-up)
of `pixel_decoder.ms_deform_attn_core` as configured (small levels by the dense matmul),
with every level by the row gather (`dense_max_pixels=0`), and with every level dense
where that fits (`--all_dense`: only for small sides, its matrices grow as side^4).
"""

import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conv_grad import timeit  # pylint: disable=wrong-import-position

from dataseg.model import pixel_decoder  # pylint: disable=wrong-import-position

_SIZES = flags.DEFINE_list("sizes", "256,512", "square image sides")
_ALL_DENSE = flags.DEFINE_bool("all_dense", False, "also time every level dense")


def inputs(size, b=2, m=8, d=32, p=4, seed=0):
  shapes = tuple((size // s, size // s) for s in (32, 16, 8))
  s = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(seed)
  value = jnp.asarray(rng.normal(size=(b, s, m, d)).astype(np.float32))
  loc = jnp.asarray(rng.uniform(-0.1, 1.1, size=(b, s, m, 3, p, 2)).astype(np.float32))
  attn = rng.dirichlet(np.ones(3 * p), size=(b, s, m)).reshape(b, s, m, 3, p)
  cot = jnp.asarray(rng.normal(size=(b, s, m * d)).astype(np.float32))
  return shapes, value, loc, jnp.asarray(attn.astype(np.float32)), cot


def main(argv):
  del argv
  for size in (int(s) for s in _SIZES.value):
    shapes, value, loc, attn, cot = inputs(size)
    variants = {"as configured": {}, "all gather": dict(dense_max_pixels=0)}
    if _ALL_DENSE.value:
      variants["all dense"] = dict(dense_max_pixels=10**9, dense_max_elements=10**12)
    for name, kw in variants.items():
      core = lambda v, loc, a, kw=kw: pixel_decoder.ms_deform_attn_core(v, shapes, loc, a, **kw)
      fwd = jax.jit(core)
      grad = jax.jit(
        jax.grad(lambda v, loc, a, core=core: jnp.vdot(core(v, loc, a), cot), (0, 1, 2))
      )
      t_fwd, t_grad = (timeit(f, value, loc, attn, n=3) for f in (fwd, grad))
      print(
        f"{size}x{size} {shapes}: {name}: forward {1e3 * t_fwd:.1f} ms, "
        f"gradient {1e3 * t_grad:.1f} ms CPU",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
