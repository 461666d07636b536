r"""The importance sampling alone: 'exact' top-k against 'sampled' threshold selection.

  PYTHONPATH=. python bench/points.py --rows 100 --size 256
  PYTHONPATH=. python bench/points.py --point_sample      # flat-index vs 3-d gather sampling

`points.importance_points` as the objective calls it (112x112 points, 3x oversampled
candidates, 75% most uncertain kept) on `--rows` random [size/4, size/4] logit maps (the
train step at 256x256, batch 2, 10 supervised layers, 50 mask rows per image runs 1000
rows), each selection jitted and timed in the same process (median of `--steps`), wall
clock and process CPU seconds (all threads; steadier on a shared machine). The first
selection is the reference of the ratio.

`--point_sample`: `points.point_sample` (flat indices into zero-bordered maps) against the
previous 3-d-index gather (`gather_point_sample` below, the reference), forward on the
candidates (3 x 112 x 112 per row) and gradient on the loss points (112 x 112 per row).
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from dataseg.objective import points  # pylint: disable=wrong-import-position

_ROWS = flags.DEFINE_integer("rows", 100, "random logit maps")
_SIZE = flags.DEFINE_integer("size", 256, "image side (maps are size/4)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps (median)")
_SELECTIONS = flags.DEFINE_list(
  "selections", "exact,sampled", "point_selection values; the first is the reference"
)
_POINT_SAMPLE = flags.DEFINE_bool(
  "point_sample", False, "time point_sample (flat) against the 3-d gather instead"
)


def gather_point_sample(maps, coords):
  """The previous points.point_sample: one (map, y, x) gather per corner, masks outside."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if coords.ndim == 3:
    return jax.vmap(lambda m, c: gather_point_sample(m[None], c)[0])(maps, coords)
  _, h, w = maps.shape
  py = coords[:, 0] * h - 0.5
  px = coords[:, 1] * w - 0.5
  y0 = jnp.floor(py)
  x0 = jnp.floor(px)
  wy1 = py - y0
  wx1 = px - x0
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)
  out = 0.0
  for dy, wy in ((0, 1.0 - wy1), (1, wy1)):
    for dx, wx in ((0, 1.0 - wx1), (1, wx1)):
      yi, xi = y0 + dy, x0 + dx
      inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
      v = maps[:, jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
      out = out + v * jnp.where(inside, wy * wx, 0.0)[None]
  return out


def _time(fn, *args, steps=5):
  jax.block_until_ready(fn(*args))
  wall, cpu = [], []
  for _ in range(steps):
    w, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(*args))
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
  return float(np.median(wall)), float(np.median(cpu))


def bench_point_sample(maps, steps):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  rows = maps.shape[0]
  r = np.random.default_rng(1)
  cand = jax.device_put(r.uniform(0, 1, (rows, 3 * 112 * 112, 2)).astype(np.float32))
  loss_pts = cand[:, : 112 * 112]
  base = None
  for name, fn in (
    ("gather (previous)", gather_point_sample),
    ("flat (points.point_sample)", points.point_sample),
  ):
    fwd = jax.jit(lambda m, c, f=fn: -jnp.abs(f(m, c)))
    grad = jax.jit(jax.grad(lambda m, c, f=fn: jnp.sum(jnp.sin(f(m, c)))))
    f_w, f_c = _time(fwd, maps, cand, steps=steps)
    g_w, g_c = _time(grad, maps, loss_pts, steps=steps)
    base = base or (f_c, g_c)
    print(
      f"point_sample {name}: forward on candidates {f_w:.3f} s wall {f_c:.3f} s CPU; "
      f"gradient on loss points {g_w:.3f} s wall {g_c:.3f} s CPU; CPU vs previous: "
      f"forward {f_c / base[0]:.2f}, gradient {g_c / base[1]:.2f}",
      flush=True,
    )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  hw = _SIZE.value // 4
  maps = jax.device_put(
    np.random.default_rng(0).normal(size=(_ROWS.value, hw, hw)).astype(np.float32)
  )
  rng = jax.random.PRNGKey(0)
  print(
    f"# importance_points: {_ROWS.value} rows of {hw}x{hw}, 112x112 points, jax "
    f"{jax.__version__} on {jax.default_backend()} ({os.cpu_count()} cores), load "
    f"average {os.getloadavg()[0]:.1f}",
    flush=True,
  )
  if _POINT_SAMPLE.value:
    bench_point_sample(maps, _STEPS.value)
    return
  base = None
  for selection in _SELECTIONS.value:
    fn = jax.jit(lambda r, m, s=selection: points.importance_points(r, m, 112 * 112, selection=s))
    jax.block_until_ready(fn(rng, maps))
    wall, cpu = [], []
    for _ in range(_STEPS.value):
      w, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(rng, maps))
      wall.append(time.perf_counter() - w)
      cpu.append(time.process_time() - c)
    w, c = float(np.median(wall)), float(np.median(cpu))
    base = base or (w, c)
    print(
      f"selection={selection}: {w:.3f} s wall, {c:.3f} s CPU; vs {_SELECTIONS.value[0]}: "
      f"{w / base[0]:.2f} wall, {c / base[1]:.2f} CPU",
      flush=True,
    )


if __name__ == "__main__":
  app.run(main)
