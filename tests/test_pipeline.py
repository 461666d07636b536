"""pipeline.py: schema batches, per-host disjoint shards, exact resume, global batches."""

import jax
import numpy as np
import tensorflow as tf

from dataseg import schema
from input_pipeline import bad_input
from input_pipeline import pipeline
from input_pipeline import readers

try:
  import test_readers as fx  # pylint: disable=g-import-not-at-top
except ImportError:
  from tests import test_readers as fx  # pylint: disable=g-import-not-at-top

PANOPTIC = schema.task_id("panoptic")


def _decoded(n=10, size=16):
  """In-memory decoded examples with 1..3 segments each and distinct ids."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    seg = -np.ones([size, size], np.int32)
    k = 1 + i % 3
    for j in range(k):
      seg[j * 4 : j * 4 + 4 + i % 5, j : j + 8] = j
    boxes = np.array([[0, 0, 1, 1]] * k, np.float32)
    out.append(
      dict(
        image=rng.integers(0, 256, [size, size, 3], dtype=np.uint8),
        segment_map=seg,
        seg_class=np.arange(k, dtype=np.int32),
        seg_box=boxes,
        seg_is_thing=np.ones(k, bool),
        seg_is_crowd=np.zeros(k, bool),
        image_id=np.int64(1000 + i),
      )
    )
  return out


def _reader(examples):
  """A reader callable(shard_index, shard_count) over in-memory decoded examples."""

  def make(shard_index, shard_count):
    return readers.records_dataset(
      examples,
      lambda e: e,
      bad_input.BadInputCounter(),
      shard_index=shard_index,
      shard_count=shard_count,
    )

  return make


def _kwargs(**kw):
  args = dict(
    batch_size=2,
    image_size=32,
    max_segments=4,
    task_id=PANOPTIC,
    dataset_id=1,
    seed=3,
    process_index=0,
    process_count=1,
    shuffle_buffer=4,
  )
  args.update(kw)
  return args


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_training_batches_follow_schema():
  it = pipeline.make_iterator(_reader(_decoded()), **_kwargs(max_segments=2))
  for _ in range(6):
    batch = next(it)
    schema.check_example(batch, 32, 32, 2, batch_dims=(2,))
    assert np.all(batch["dataset_id"] == 1) and np.all(batch["task"] == PANOPTIC)
  # Examples with 3 segments overflow max_segments=2 (counted, not in the batch).
  assert it.stats["segments_overflow"] > 0


def test_two_hosts_disjoint_and_covering(tmp_path):
  spec, expected = fx.write_coco_panoptic(str(tmp_path), n=5)
  for reader in (
    spec,
    _reader(_decoded(7)),
    tf.data.Dataset.from_tensor_slices({"image_id": np.arange(7, dtype=np.int64)}),
  ):
    if isinstance(reader, tf.data.Dataset):  # fallback: Dataset.shard
      seen = [
        set(
          int(x["image_id"])
          for x in pipeline.host_dataset(reader, i, 2, "skip").as_numpy_iterator()
        )
        for i in range(2)
      ]
      everything = set(range(7))
    else:
      seen = []
      for host in range(2):
        ids = set()
        for batch in pipeline.make_iterator(
          reader, **_kwargs(training=False, process_index=host, process_count=2)
        ):
          ids |= set(batch["image_id"][batch["example_valid"]].tolist())
        seen.append(ids)
      everything = set(expected) if reader is spec else set(range(1000, 1007))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == everything


def test_training_hosts_see_own_shard():
  examples = _decoded(8)
  for host in range(2):
    it = pipeline.make_iterator(_reader(examples), **_kwargs(process_index=host, process_count=2))
    ids = set()
    for _ in range(8):
      ids |= set(next(it)["image_id"].tolist())
    assert ids == {1000 + i for i in range(host, 8, 2)}


def _check_resume(reader, k=5, m=6, **kw):
  it = pipeline.make_iterator(reader, **_kwargs(**kw))
  uninterrupted = [next(it) for _ in range(k + m)]
  it = pipeline.make_iterator(reader, **_kwargs(**kw))
  for _ in range(k):
    next(it)
  state = it.get_state()
  assert int(state["step"]) == k and state["tf_data"].dtype == np.uint8
  restarted = pipeline.make_iterator(reader, **_kwargs(**kw))
  restarted.set_state(state)
  assert restarted.step == k
  for step in range(m):
    _assert_same(next(restarted), uninterrupted[k + step])
  # Shuffling is on: the stream is not in reader order and differs across epochs.
  ids = np.concatenate([b["image_id"] for b in uninterrupted])
  return ids


def test_exact_resume_with_shuffle():
  ids = _check_resume(_reader(_decoded(10)), k=7, m=6)
  assert not np.array_equal(ids[:10], np.sort(ids[:10]))
  assert not np.array_equal(ids[:10], ids[10:20])


def test_exact_resume_file_reader(tmp_path):
  spec, _ = fx.write_coco_panoptic(str(tmp_path), n=4)
  _check_resume(spec, k=3, m=3, preprocess_kwargs=dict(color_jitter=True))


def test_eval_padding_and_fixed_batch_count():
  it = pipeline.make_iterator(_reader(_decoded(5)), **_kwargs(training=False, num_eval_batches=4))
  batches = list(it)
  assert len(batches) == 4
  for b in batches:
    schema.check_example(b, 32, 32, 4, batch_dims=(2,))
  valid = np.concatenate([b["example_valid"] for b in batches])
  np.testing.assert_array_equal(valid, [1, 1, 1, 1, 1, 0, 0, 0])
  ids = np.concatenate([b["image_id"] for b in batches])[:5]
  np.testing.assert_array_equal(ids, np.arange(1000, 1005))  # reader order
  assert np.all(batches[3]["seg_class"] == -1) and np.all(batches[3]["segment_map"] == -1)


def test_make_global_batch():
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  local = {
    "x": np.arange(len(devices) * 2 * 3, dtype=np.float32).reshape(-1, 3),
    "m": np.ones([len(devices) * 2, 4, 4], bool),
  }
  out = pipeline.make_global_batch(local, mesh, "data")
  assert out["x"].shape == local["x"].shape  # one process: global == local
  np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])
  assert out["x"].sharding.spec == jax.sharding.PartitionSpec("data")
