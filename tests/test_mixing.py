"""mixing.py: step -> dataset draws, quotas, MixedIterator and its state."""

import numpy as np
import pytest
from scipy import stats

from input_pipeline import mixing


def test_frequencies_match_weights_chi_square():
  weights = [0.5, 0.3, 0.15, 0.05]
  draws = np.array([mixing.dataset_for_step(17, k, weights) for k in range(10_000)])
  observed = np.bincount(draws, minlength=4)
  expected = np.array(weights) / sum(weights) * len(draws)
  assert stats.chisquare(observed, expected).pvalue > 0.001


def test_unnormalised_weights_and_zero_weight():
  draws = [mixing.dataset_for_step(0, k, [2.0, 0.0, 6.0]) for k in range(4000)]
  counts = np.bincount(draws, minlength=3)
  assert counts[1] == 0
  assert stats.chisquare(counts[[0, 2]], [1000, 3000]).pvalue > 0.001


def test_pure_function_of_seed_and_step():
  w = [1, 1, 1]
  a = [mixing.dataset_for_step(3, k, w) for k in range(200)]
  # Same on a "second host" computing in another order; another seed differs.
  b = [mixing.dataset_for_step(3, k, w) for k in reversed(range(200))][::-1]
  c = [mixing.dataset_for_step(4, k, w) for k in range(200)]
  assert a == b and a != c


def test_bad_weights_raise():
  with pytest.raises(ValueError, match="weights"):
    mixing.dataset_for_step(0, 0, [0, 0])
  with pytest.raises(ValueError, match="allowed: per_step, quota"):
    mixing.MixedIterator([], [], mode="interleave")


def test_quotas():
  assert mixing.quotas([0.5, 0.3, 0.2], 10) == [5, 3, 2]
  q = mixing.quotas([1, 1, 1], 16)
  assert sum(q) == 16 and sorted(q) == [5, 5, 6]
  assert mixing.quotas([3, 0, 1], 8) == [6, 0, 2]


class _Counting:
  """Stand-in per-dataset iterator: yields its id and a running index."""

  def __init__(self, ident, size=2):
    self.ident, self.i, self.size = ident, 0, size

  def __next__(self):
    self.i += 1
    return {
      "dataset_id": np.full([self.size], self.ident, np.int32),
      "index": np.full([self.size], self.i, np.int32),
    }

  def get_state(self):
    return {"i": np.asarray(self.i)}

  def set_state(self, state):
    self.i = int(state["i"])


def test_mixed_iterator_per_step_and_resume():
  weights = [0.6, 0.4]
  it = mixing.MixedIterator([_Counting(0), _Counting(1)], weights, seed=5)
  first = [next(it) for _ in range(30)]
  for k, batch in enumerate(first):
    assert batch["dataset_id"][0] == mixing.dataset_for_step(5, k, weights)
  state = it.get_state()
  ref = [next(it) for _ in range(20)]
  resumed = mixing.MixedIterator([_Counting(0), _Counting(1)], weights, seed=5)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(20)]
  for a, b in zip(ref, got):
    np.testing.assert_array_equal(a["dataset_id"], b["dataset_id"])
    np.testing.assert_array_equal(a["index"], b["index"])


def test_mixed_iterator_quota():
  q = mixing.quotas([0.75, 0.25], 8)
  it = mixing.MixedIterator([_Counting(0, q[0]), _Counting(1, q[1])], [0.75, 0.25], mode="quota")
  batch = next(it)
  np.testing.assert_array_equal(batch["dataset_id"], [0] * 6 + [1] * 2)
