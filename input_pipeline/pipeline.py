"""One dataset's batched pipeline: reader -> shard -> shuffle -> preprocess -> batch.

Each dataset of a mixture has its own pipeline (mixing.py picks one per step). A host
reads only its shard (reader-level sharding of the file / record list or TFDS split;
`tf.data.Dataset.shard` as the fallback for a ready-made dataset) and yields its
*host-local* part of the global batch as numpy dicts of the schema (dataseg/schema.py);
`make_global_batch` assembles the host parts into global `jax.Array`s.

Determinism and exact resume: shuffling uses a fixed seed, maps are deterministic and
the augmentation seed of an example is `fold_in((seed, position in the stream),
process_index)`, so a run is a pure function of (data, seed, host). The iterator's
position is the tf.data iterator state (shuffle buffer and all), serialised by
`get_state()` into numpy arrays that go into the trainer's orbax checkpoint;
`set_state()` on a freshly built iterator continues exactly where the saved one was.
The state holds the shuffle buffer's decoded examples, so keep `shuffle_buffer` modest
(a few hundred images is ~100-300 MB).
"""

import functools
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from input_pipeline import preprocess
from input_pipeline import readers

# A reader: spec dict (readers.build_reader), callable(shard_index, shard_count) ->
# tf.data.Dataset of decoded examples, a tf.data.Dataset (sharded with .shard), or
# (tfds builder, split, decode_fn) with decode_fn(features) -> decoded example.
Reader = Union[Mapping[str, Any], Callable[[int, int], tf.data.Dataset], tf.data.Dataset, tuple]

_PAD_VALUES = {"segment_map": -1, "seg_class": -1}
STATS_KEYS = ("segments_overflow",)


def host_dataset(
  reader: Reader, process_index: int, process_count: int, on_bad_input: str = "skip"
):
  """This host's shard of the decoded examples (disjoint shards covering the split)."""
  if isinstance(reader, Mapping):
    ds, _ = readers.build_reader(
      reader, shard_index=process_index, shard_count=process_count, on_bad_input=on_bad_input
    )
    return ds
  if isinstance(reader, tf.data.Dataset):
    return reader.shard(process_count, process_index)
  if isinstance(reader, tuple):
    builder, split, decode_fn = reader
    split = tfds.even_splits(split, n=process_count)[process_index]
    ds = builder.as_dataset(split=split, shuffle_files=False)
    return ds.map(decode_fn, num_parallel_calls=tf.data.AUTOTUNE)
  return reader(process_index, process_count)


def _options(threads: Optional[int]):
  options = tf.data.Options()
  options.deterministic = True
  # Readers call numpy functions (bad-input counting, logging): no state to save.
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  if threads:
    options.threading.private_threadpool_size = threads
  return options


def _pad_batch(batch, batch_size):
  """Pads a partial eval batch with example_valid=False rows (schema pad values)."""
  n = tf.shape(batch["image"])[0]
  out = {}
  for k, v in batch.items():
    pad = [[0, batch_size - n]] + [[0, 0]] * (len(v.shape) - 1)
    out[k] = tf.pad(v, pad, constant_values=tf.cast(_PAD_VALUES.get(k, 0), v.dtype))
    out[k] = tf.ensure_shape(out[k], [batch_size] + v.shape[1:].as_list())
  return out


def make_dataset(
  reader: Reader,
  *,
  batch_size: int,
  image_size: int,
  max_segments: int,
  task_id: int,
  dataset_id: int = 0,
  training: bool = True,
  seed: int = 0,
  process_index: Optional[int] = None,
  process_count: Optional[int] = None,
  shuffle_buffer: int = 256,
  preprocess_kwargs: Optional[Mapping[str, Any]] = None,
  on_bad_input: str = "skip",
  threads: Optional[int] = None,
  num_eval_batches: Optional[int] = None,
  prefetch: int = 2,
):
  """Batched tf.data pipeline of this host (`batch_size` is host-local).

  Training: infinite, shuffled, LSJ-augmented, full batches. Evaluation: one pass in
  reader order, the last batch padded with `example_valid=False` rows; with
  `num_eval_batches` every host yields exactly that many batches (all-padding batches
  at the end) so that hosts with shorter shards stay in step.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  ds = host_dataset(reader, process_index, process_count, on_bad_input)
  kwargs = dict(
    image_size=image_size,
    max_segments=max_segments,
    task_id=task_id,
    dataset_id=dataset_id,
    return_stats=True,
    **(preprocess_kwargs or {}),
  )
  if training:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()

    def train_map(position, example):
      example_seed = tf.random.experimental.stateless_fold_in(
        tf.stack([tf.constant(seed, tf.int64), position]), process_index
      )
      return preprocess.train_preprocess(example, seed=example_seed, **kwargs)

    ds = ds.enumerate().map(train_map, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    ds = ds.map(
      functools.partial(preprocess.eval_preprocess, **kwargs), num_parallel_calls=tf.data.AUTOTUNE
    )
    ds = ds.batch(batch_size).map(functools.partial(_pad_batch, batch_size=batch_size))
    if num_eval_batches is not None:
      empty = ds.element_spec
      filler = tf.data.Dataset.from_tensors(
        {
          k: tf.fill([batch_size] + s.shape[1:].as_list(), tf.cast(_PAD_VALUES.get(k, 0), s.dtype))
          for k, s in empty.items()
        }
      ).repeat()
      ds = ds.concatenate(filler).take(num_eval_batches)
  return ds.prefetch(prefetch).with_options(_options(threads))


class Iterator:
  """Numpy iterator over a batched pipeline with a checkpointable position.

  Yields dicts of schema fields with a leading host-local batch dim. Preprocessing
  statistics (`segments_overflow`: segments beyond `max_segments`, dropped) are summed
  into `self.stats` and removed from the batch.
  """

  def __init__(self, ds: tf.data.Dataset):
    self._ds = ds
    self._it = iter(ds)
    self.step = 0
    self.stats = {k: 0 for k in STATS_KEYS}

  def __iter__(self):
    return self

  def __next__(self):
    batch = {k: v.numpy() for k, v in next(self._it).items()}
    for k in STATS_KEYS:
      if k in batch:
        self.stats[k] += int(batch.pop(k).sum())
    self.step += 1
    return batch

  def get_state(self) -> dict:
    """{'step': int64 [], 'tf_data': uint8 [n]}: arrays an orbax checkpoint can hold."""
    variant = self._it._serialize_to_tensors()["_STATE"]  # pylint: disable=protected-access
    raw = tf.io.serialize_tensor(variant).numpy()
    return {"step": np.asarray(self.step, np.int64), "tf_data": np.frombuffer(raw, np.uint8).copy()}

  def set_state(self, state: Mapping[str, np.ndarray]) -> None:
    """Restores a `get_state()` value into this (same-config) pipeline's iterator."""
    variant = tf.io.parse_tensor(np.asarray(state["tf_data"], np.uint8).tobytes(), tf.variant)
    self._it._restore_from_tensors({"_STATE": variant})  # pylint: disable=protected-access
    self.step = int(state["step"])


def make_iterator(reader: Reader, **kwargs) -> Iterator:
  """`Iterator(make_dataset(reader, **kwargs))`."""
  return Iterator(make_dataset(reader, **kwargs))


def make_global_batch(
  local_batch: Mapping[str, np.ndarray],
  mesh: jax.sharding.Mesh,
  data_axes: Union[str, Sequence[str]] = "data",
):
  """Host-local batch -> global jax.Arrays sharded on the batch dim over `data_axes`.

  Every host passes its own `[B_local, ...]` part; the global batch is
  `[B_local * process_count, ...]` (jax.make_array_from_process_local_data).
  """
  axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
  spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0])
  sharding = jax.sharding.NamedSharding(mesh, spec)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), dict(local_batch)
  )
