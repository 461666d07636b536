"""The JAX matcher against scipy.optimize.linear_sum_assignment."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from dataseg.objective import matching

N = 100
# Jitted once per static shape; other target counts are padded columns.
_solve = jax.jit(matching.match)
_solve_batch = jax.jit(matching.batched_linear_sum_assignment)
B, N_SMALL, M_SMALL = 6, 20, 16  # The one small batched shape.


def _reference(cost, valid):
  """Scipy's optimum over the valid columns: (total cost, number of pairs)."""
  cols = np.flatnonzero(valid)
  rows, picked = scipy.optimize.linear_sum_assignment(cost[:, cols])
  return cost[:, cols][rows, picked].sum(dtype=np.float64), len(rows)


def _check(cost, valid, q2t, rtol=1e-6):
  """Asserts q2t is an optimal partial permutation onto the valid columns."""
  cost = np.asarray(cost, np.float64)
  valid = np.asarray(valid, bool)
  q2t = np.asarray(q2t)
  n, m = cost.shape
  assert q2t.shape == (n,) and q2t.dtype == np.int32
  assert np.all((q2t == matching.UNMATCHED) | ((q2t >= 0) & (q2t < m)))
  used = q2t[q2t >= 0]
  assert len(np.unique(used)) == len(used), "a target matched twice"
  assert np.all(valid[used]), "a padded target was matched"
  want_total, want_pairs = _reference(cost, valid)
  assert len(used) == want_pairs == min(n, valid.sum())
  if valid.sum() <= n:
    assert set(used) == set(np.flatnonzero(valid)), "a valid target unused"
  total = cost[np.flatnonzero(q2t >= 0), used].sum()
  scale = max(1.0, np.abs(cost[:, valid]).max(initial=0.0)) * max(1, len(used))
  np.testing.assert_allclose(total, want_total, rtol=rtol, atol=rtol * scale)


def _costs(kind, rng, shape):
  if kind == "float":
    return rng.random(shape, np.float32)
  if kind == "tied":
    return rng.integers(0, 4, shape).astype(np.float32)
  if kind == "integer":
    return rng.integers(-1000, 1000, shape).astype(np.float32)
  if kind == "large":  # Exact in float32, spread over 1e6.
    return rng.integers(0, 10**6, shape).astype(np.float32) - 5e5
  if kind == "equal":
    return np.full(shape, 0.25, np.float32)
  if kind == "rank1":  # Degenerate: every assignment of k pairs ties.
    return (rng.random(shape[:-1] + (1,)) + rng.random(shape[-1])).astype(np.float32)
  raise ValueError(kind)


KINDS = ("float", "tied", "integer", "large", "equal", "rank1")
NUM_TARGETS = (0, 1, 2, 17, 50, 73, 99, 100)


@pytest.mark.parametrize("kind", KINDS)
def test_100_by_m_matches_scipy(kind):
  rng = np.random.default_rng(KINDS.index(kind))
  for m in NUM_TARGETS:
    cost = _costs(kind, rng, (N, N))
    valid = np.zeros(N, bool)
    # Valid targets first (as the pipeline pads), or scattered.
    valid[:m] = True
    if m % 2:
      valid = rng.permutation(valid)
    _check(cost, valid, _solve(cost, valid))


@pytest.mark.parametrize("m", [0, 1, 37])
def test_static_target_counts(m):
  rng = np.random.default_rng(m)
  cost = _costs("float", rng, (N, m))
  q2t = _solve(cost)
  if m == 0:
    np.testing.assert_array_equal(q2t, np.full(N, -1))
  else:
    _check(cost, np.ones(m, bool), q2t)


@pytest.mark.parametrize("kind", ["float", "tied"])
def test_more_targets_than_queries(kind):
  # Both branches: rows are targets (<= n valid) or queries (> n valid).
  rng = np.random.default_rng(7)
  n, m = 30, 60
  for num_valid in (0, 1, 29, 30, 31, 45, 60):
    cost = _costs(kind, rng, (n, m))
    valid = rng.permutation(np.arange(m) < num_valid)
    _check(cost, valid, _solve(cost, valid))


def test_non_finite_costs_are_avoided_like_scipy():
  rng = np.random.default_rng(3)
  cost = rng.random((N, N), np.float32)
  forbidden = rng.random((N, N)) < 0.3
  cost_inf = np.where(forbidden, np.inf, cost)  # scipy: inf = forbidden.
  cost_nan = np.where(forbidden, np.nan, cost)
  valid = np.arange(N) < 60
  cols = np.flatnonzero(valid)
  rows, picked = scipy.optimize.linear_sum_assignment(cost_inf[:, cols])
  want = cost_inf[:, cols][rows, picked].sum()
  assert np.isfinite(want)
  for c in (cost_inf, cost_nan):
    q2t = np.asarray(_solve(c, valid))
    assert np.all(valid[q2t[q2t >= 0]]) and (q2t >= 0).sum() == 60
    got = c[np.flatnonzero(q2t >= 0), q2t[q2t >= 0]].sum()
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # A padded column full of inf/NaN must not disturb anything.
  garbage = cost.copy()
  garbage[:, ~valid] = np.nan
  _check(np.where(valid, garbage, 0.0), valid, _solve(garbage, valid))


def test_batched_with_different_valid_counts():
  rng = np.random.default_rng(5)
  b, n, m = B, N_SMALL, M_SMALL
  cost = np.stack(
    [_costs(k, rng, (n, m)) for k in ("float", "tied", "integer", "float", "equal", "tied")]
  )
  valid = np.stack([rng.permutation(np.arange(m) < k) for k in (0, 1, 5, 16, 9, 12)])
  q2t = np.asarray(_solve_batch(cost, valid))
  assert q2t.shape == (b, n)
  for i in range(b):
    _check(cost[i], valid[i], q2t[i])


def test_other_loop_schedule():
  # 'auto' is 'rows' on CPU (every other test); check 'steps' here.
  other = "steps" if jax.default_backend() == "cpu" else "rows"
  rng = np.random.default_rng(13)
  solve = jax.jit(functools.partial(matching.batched_linear_sum_assignment, solver=other))
  for kind in ("float", "tied", "rank1"):
    cost = _costs(kind, rng, (B, N_SMALL, M_SMALL))
    valid = np.stack([rng.permutation(np.arange(M_SMALL) < k) for k in (0, 1, 8, 15, 16, 16)])
    q2t = np.asarray(solve(cost, valid))
    for i in range(B):
      _check(cost[i], valid[i], q2t[i])
  # Wide problems run the cond's other branch (more valid targets than rows).
  cost = _costs("float", rng, (B, M_SMALL // 2, M_SMALL))
  valid = np.stack([rng.permutation(np.arange(M_SMALL) < k) for k in (0, 3, 8, 9, 16, 12)])
  q2t = np.asarray(solve(cost, valid))
  for i in range(B):
    _check(cost[i], valid[i], q2t[i])


def test_scipy_callback_path_gives_same_costs():
  rng = np.random.default_rng(11)
  b, n, m = B, N_SMALL, M_SMALL
  cost = _costs("tied", rng, (b, n, m))
  valid = np.stack([rng.permutation(np.arange(m) < k) for k in (0, 3, 16, 7, 1, 12)])
  by_scipy = jax.jit(functools.partial(matching.match, method="scipy"))
  q2t_scipy = np.asarray(by_scipy(cost, valid))
  q2t_vmapped = np.asarray(
    jax.jit(jax.vmap(functools.partial(matching.match, method="scipy")))(cost, valid)
  )
  np.testing.assert_array_equal(q2t_scipy, q2t_vmapped)
  q2t_jax = np.asarray(_solve_batch(cost, valid))
  for i in range(b):
    _check(cost[i], valid[i], q2t_scipy[i])
    _check(cost[i], valid[i], q2t_jax[i])
  with pytest.raises(ValueError):
    matching.match(cost, valid, method="auction")


def test_hand_computed_case():
  # Greedy would take (0, 0) at cost 1 and be forced into (1, 1) at 10.
  cost = jnp.array([[1.0, 2.0], [2.0, 10.0], [5.0, 5.0]])
  np.testing.assert_array_equal(_solve(cost, jnp.array([True, True])), [1, 0, -1])
  np.testing.assert_array_equal(_solve(cost, jnp.array([False, True])), [1, -1, -1])
