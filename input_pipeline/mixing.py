"""Batch-level dataset mixing: which dataset feeds step k.

The paper samples ONE dataset per iteration and draws the whole batch from it. The
dataset of step k is a pure function of (seed, k): every host computes the same index
without communication, and a resumed run (step restored) continues the same sequence.
The alternative 'quota' mode fills every batch with fixed per-dataset quotas
(`quotas`), each dataset's pipeline being batched at its quota.
"""

from typing import Mapping, Sequence

import numpy as np

MODES = ("per_step", "quota")


def _probabilities(weights: Sequence[float]) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  if w.ndim != 1 or w.size == 0 or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f"sampling weights must be >= 0 with a positive sum, got {weights}")
  return w / w.sum()


def dataset_for_step(seed: int, step: int, weights: Sequence[float]) -> int:
  """Index of the dataset of `step`, drawn from `weights` by a (seed, step) counter RNG.

  numpy's SeedSequence hashes the (seed, step) entropy, so draws of different steps
  are independent and identical on every host and platform.
  """
  p = _probabilities(weights)
  u = np.random.default_rng(np.random.SeedSequence([int(seed), int(step)])).random()
  return int(min(np.searchsorted(np.cumsum(p), u, side="right"), p.size - 1))


def quotas(weights: Sequence[float], batch_size: int) -> list[int]:
  """Per-dataset example counts summing to `batch_size` (largest remainder rounding)."""
  exact = _probabilities(weights) * batch_size
  out = np.floor(exact).astype(int)
  order = np.argsort(-(exact - out), kind="stable")
  out[order[: batch_size - out.sum()]] += 1
  return out.tolist()


class MixedIterator:
  """Mixes per-dataset batch iterators (pipeline.Iterator) into one stream.

  per_step: step k yields the next batch of dataset `dataset_for_step(seed, k, w)`
    (batch sizes and image settings may differ between datasets).
  quota: every step concatenates one batch of each dataset, each iterator batched at
    its `quotas(weights, batch_size)` size; all datasets must share image_size and
    max_segments.
  """

  def __init__(
    self, iterators: Sequence, weights: Sequence[float], *, seed: int = 0, mode: str = "per_step"
  ):
    if mode not in MODES:
      raise ValueError(f"mixing mode {mode!r}; allowed: {', '.join(MODES)}")
    if len(iterators) != len(weights):
      raise ValueError(f"{len(iterators)} iterators but {len(weights)} weights")
    _probabilities(weights)
    self.iterators = list(iterators)
    self.weights = list(weights)
    self.seed = seed
    self.mode = mode
    self.step = 0

  def __iter__(self):
    return self

  def next_dataset(self) -> int:
    """Dataset index of the coming step (per_step mode)."""
    return dataset_for_step(self.seed, self.step, self.weights)

  def __next__(self) -> Mapping[str, np.ndarray]:
    if self.mode == "per_step":
      batch = next(self.iterators[self.next_dataset()])
    else:
      parts = [next(it) for it, w in zip(self.iterators, self.weights) if w > 0]
      batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {
      "step": np.asarray(self.step, np.int64),
      "datasets": {str(i): it.get_state() for i, it in enumerate(self.iterators)},
    }

  def set_state(self, state) -> None:
    self.step = int(state["step"])
    for i, it in enumerate(self.iterators):
      it.set_state(state["datasets"][str(i)])
