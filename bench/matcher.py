"""Times the in-graph JAX matcher against scipy on the host.

  JAX_PLATFORMS=cpu python bench/matcher.py [--batch 8] [--repeats 20]

For each shape (queries x targets) it draws `batch` random cost matrices,
times the jitted, vmapped `batched_linear_sum_assignment` (after warm-up,
median over repeats, results blocked on) and a host loop of
`scipy.optimize.linear_sum_assignment` over the same matrices, checks both give
the same total cost, and prints both times and their ratio.
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dataseg.objective import matching

_BATCH = flags.DEFINE_integer("batch", 8, "cost matrices per call")
_REPEATS = flags.DEFINE_integer("repeats", 20, "timed repeats (median)")
_SHAPES = flags.DEFINE_list("shapes", "100x50,100x100", "queries x targets shapes")
_KIND = flags.DEFINE_enum("kind", "float", ["float", "tied"], "random float or tied integer costs")
_SOLVER = flags.DEFINE_enum(
  "solver", "auto", ["auto", "rows", "steps"], "matching.batched_linear_sum_assignment's solver"
)


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rng = np.random.default_rng(0)
  solve = jax.jit(functools.partial(matching.batched_linear_sum_assignment, solver=_SOLVER.value))
  print(
    f"device: {jax.devices()[0].device_kind}, batch {_BATCH.value}, "
    f"{_KIND.value} costs, solver {_SOLVER.value}, "
    f"median of {_REPEATS.value}"
  )
  for shape in _SHAPES.value:
    n, m = (int(x) for x in shape.split("x"))
    if _KIND.value == "float":
      cost = rng.random((_BATCH.value, n, m)).astype(np.float32)
    else:
      cost = rng.integers(0, 4, (_BATCH.value, n, m)).astype(np.float32)
    valid = np.ones((_BATCH.value, m), bool)
    cost_dev, valid_dev = jnp.asarray(cost), jnp.asarray(valid)
    q2t = np.asarray(solve(cost_dev, valid_dev))  # Compile and warm up.

    def run_jax():
      solve(cost_dev, valid_dev).block_until_ready()

    def run_scipy():
      for b in range(_BATCH.value):
        scipy.optimize.linear_sum_assignment(cost[b])

    run_scipy()
    t_jax = _median_seconds(run_jax, _REPEATS.value)
    t_scipy = _median_seconds(run_scipy, _REPEATS.value)
    for b in range(_BATCH.value):
      rows, cols = scipy.optimize.linear_sum_assignment(cost[b])
      mine = q2t[b] >= 0
      total = cost[b][np.flatnonzero(mine), q2t[b][mine]].sum()
      assert np.isclose(total, cost[b][rows, cols].sum(), rtol=1e-5), b
    print(
      f"{n}x{m}: jax {t_jax * 1e3:8.3f} ms  scipy {t_scipy * 1e3:8.3f} ms"
      f"  jax/scipy {t_jax / t_scipy:6.2f}"
    )


if __name__ == "__main__":
  app.run(main)
