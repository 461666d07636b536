"""Evaluators chosen by name, and the one way their results cross hosts.

Protocol (big_vision-like: a config names an evaluator per dataset, the trainer builds it):

  ev = make_evaluator("panoptic", class_names=..., is_thing=...)
  for each *valid* example of this host's shard:
    ev.add(image_id, prediction, ground_truth)   # numpy, unpadded, original resolution
  ev = gather(ev)                               # every host now holds all hosts' data
  metrics = ev.result()                          # flat {name: float}

Padding examples (schema field `example_valid` False) must never reach `add`: the caller
drops them, because an evaluator cannot tell a padded example from an empty image.

Each evaluator keeps its accumulated state small and host-local: `state()` returns a dict
of numeric numpy arrays (PQ: per-class TP/FP/FN/IoU sums; semantic: the confusion matrix;
COCO AP: the host's RLE-encoded detections and annotations packed into arrays, which must
all be seen by one COCOeval run). `from_states(states, **ctor_kwargs)` rebuilds one
evaluator from several, so a multi-host gather is a `process_allgather` per array (see
`gather`).
"""

import importlib
from typing import Any, Callable, Sequence

import numpy as np

_REGISTRY: dict[str, type] = {}
# Modules that register evaluators when imported; imported lazily by `make_evaluator`.
_MODULES = {
  "panoptic": "dataseg.metrics.panoptic",
  "semantic": "dataseg.metrics.semantic",
  "instance": "dataseg.metrics.coco_eval",
  "box": "dataseg.metrics.coco_eval",
}


def register(name: str) -> Callable[[type], type]:
  """Class decorator: makes the evaluator available to `make_evaluator(name)`."""

  def wrap(cls):
    _REGISTRY[name] = cls
    return cls

  return wrap


def make_evaluator(
  name: str, *, class_names: Sequence[str], is_thing: Sequence[bool] | None = None, **kw
):
  """Builds the evaluator registered as `name` ('panoptic', 'semantic', 'instance', 'box')."""
  if name not in _REGISTRY and name in _MODULES:
    importlib.import_module(_MODULES[name])
  if name not in _REGISTRY:
    raise ValueError(f"Unknown evaluator {name!r}; known: {sorted(set(_MODULES) | set(_REGISTRY))}")
  return _REGISTRY[name](class_names=class_names, is_thing=is_thing, **kw)


class Evaluator:
  """Base class: subclasses implement `add`, `state`, `accumulate_state` and `result`."""

  def __init__(self, *, class_names: Sequence[str], is_thing: Sequence[bool] | None = None):
    self.class_names = list(class_names)
    num_classes = len(self.class_names)
    self.is_thing = np.ones(num_classes, bool) if is_thing is None else np.asarray(is_thing, bool)
    if self.is_thing.shape != (num_classes,):
      raise ValueError(f"is_thing has shape {self.is_thing.shape}, expected ({num_classes},)")
    self._init_kwargs = dict(class_names=self.class_names, is_thing=self.is_thing)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def add(self, image_id: int, prediction: Any, ground_truth: Any) -> None:
    raise NotImplementedError

  def state(self) -> dict[str, Any]:
    raise NotImplementedError

  def accumulate_state(self, state: dict[str, Any]) -> None:
    raise NotImplementedError

  def result(self) -> dict[str, float]:
    raise NotImplementedError

  def accumulate(self, other: "Evaluator") -> "Evaluator":
    """Adds `other`'s accumulated data to this evaluator (in place) and returns self."""
    self.accumulate_state(other.state())
    return self

  def empty_like(self) -> "Evaluator":
    """A fresh evaluator with the same configuration."""
    return type(self)(**self._init_kwargs)

  @classmethod
  def from_states(cls, states: Sequence[dict[str, Any]], **ctor_kwargs) -> "Evaluator":
    ev = cls(**ctor_kwargs)
    for s in states:
      ev.accumulate_state(s)
    return ev


def gather(evaluator: Evaluator) -> Evaluator:
  """Returns an evaluator holding the data of every host (itself when single-process).

  Each host's `state()` is a dict of numeric numpy arrays (counts, sums, packed COCO
  entries); each array is all-gathered, padded along its first axis to the longest, and
  cut back to every host's length, so the metrics are computed once over the whole
  split (with COCO AP the detections of all hosts enter a single COCOeval run). No bytes
  that came over the network are unpickled. Every process must call this (a collective).
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() == 1:
    return evaluator
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  state = evaluator.state()
  hosts = [dict() for _ in range(jax.process_count())]
  for key in sorted(state):  # the same order on every host.
    x = np.asarray(state[key])
    if x.dtype.kind not in "biuf":
      raise TypeError(
        f"{type(evaluator).__name__}.state()[{key!r}] has dtype {x.dtype}: "
        "states cross hosts as numeric arrays"
      )
    if x.ndim == 0:
      for host, value in zip(hosts, multihost_utils.process_allgather(x)):
        host[key] = value
      continue
    lengths = np.ravel(multihost_utils.process_allgather(np.array(len(x), np.int64)))
    padded = np.zeros((max(int(lengths.max()), 1),) + x.shape[1:], x.dtype)
    padded[: len(x)] = x
    for host, value, n in zip(hosts, multihost_utils.process_allgather(padded), lengths):
      host[key] = value[: int(n)]
  merged = evaluator.empty_like()
  for host in hosts:
    merged.accumulate_state(host)
  return merged
