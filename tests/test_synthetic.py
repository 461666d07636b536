"""The embedded synthetic suite: TFDS builds, schema, determinism, dataset semantics."""

import numpy as np
import pytest

from dataseg import schema
from dataseg import vocab as vocab_lib
from input_pipeline import pipeline
from input_pipeline import synthetic

TRAIN_VOCABS = ("shapes_panoptic", "shapes_semantic", "shapes_boxes")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic"))


def _first(builder, split, name, n=3):
  is_thing = vocab_lib.load(name).is_thing
  ds = builder.as_dataset(split=split, shuffle_files=False).take(n)
  return [ex for ex in ds.map(lambda e: synthetic.decode(e, is_thing)).as_numpy_iterator()]


@pytest.mark.parametrize("name", synthetic.SUITE)
def test_builds_and_decodes_to_the_generator_output(name, data_dir):
  builder = synthetic.builder(name, data_dir)
  splits = synthetic._SETTINGS[name]["splits"]  # pylint: disable=protected-access
  assert {s: builder.info.splits[s].num_examples for s in splits} == splits
  split = "validation"
  for ex in _first(builder, split, name):
    ref = synthetic.generate_example(name, split, int(ex["image_id"]))
    np.testing.assert_array_equal(ex["segment_map"], ref["segment_map"])
    np.testing.assert_array_equal(ex["seg_class"], ref["seg_class"])
    np.testing.assert_allclose(ex["seg_box"], ref["seg_box"], atol=1e-3)
    # JPEG keeps the low frequencies: 8x8 block means agree, pixel noise need not.
    h, w = (d // 8 * 8 for d in ref["image"].shape[:2])
    blocks = lambda im: im[:h, :w].astype(float).reshape(h // 8, 8, w // 8, 8, 3).mean((1, 3))
    assert np.abs(blocks(ex["image"]) - blocks(ref["image"])).mean() < 3
    is_thing = vocab_lib.load(name).is_thing
    np.testing.assert_array_equal(ex["seg_is_thing"], is_thing[ex["seg_class"]])


@pytest.mark.parametrize("name", synthetic.SUITE)
def test_pipeline_output_matches_the_schema(name, data_dir):
  builder = synthetic.builder(name, data_dir)
  is_thing = vocab_lib.load(name).is_thing
  task = {"shapes_semantic": "semantic", "shapes_boxes": "boxes"}.get(name, "panoptic")
  reader = (builder, "validation", lambda e: synthetic.decode(e, is_thing))
  for training in (True, False):
    ds = pipeline.make_dataset(
      reader,
      batch_size=2,
      image_size=96,
      max_segments=16,
      task_id=schema.task_id(task),
      training=training,
      process_index=0,
      process_count=1,
      shuffle_buffer=8,
    )
    batch = next(ds.as_numpy_iterator())
    batch.pop("segments_overflow", None)
    schema.check_example(batch, 96, 96, 16, batch_dims=(2,))


def test_generation_is_deterministic_and_seeded():
  a = synthetic.generate_example("shapes_panoptic", "train", 7)
  b = synthetic.generate_example("shapes_panoptic", "train", 7)
  c = synthetic.generate_example("shapes_panoptic", "train", 7, seed=1)
  for key in ("image", "segment_map", "seg_class", "seg_box"):
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["image"], c["image"]) or a["image"].shape != c["image"].shape


def test_two_builds_are_identical(tmp_path):
  first = synthetic.builder("shapes_transfer", str(tmp_path / "a"))
  second = synthetic.builder("shapes_transfer", str(tmp_path / "b"))
  for x, y in zip(
    _first(first, "validation", "shapes_transfer", 20),
    _first(second, "validation", "shapes_transfer", 20),
  ):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_dataset_semantics():
  # Panoptic: things and stuff, some crowd groups, void borders.
  crowd = stuff = void = 0
  for i in range(40):
    ex = synthetic.generate_example("shapes_panoptic", "train", i)
    is_thing = vocab_lib.load("shapes_panoptic").is_thing[ex["seg_class"]]
    crowd += ex["seg_is_crowd"].sum()
    stuff += (~is_thing).sum()
    void += (ex["segment_map"] == -1).sum()
    assert not ex["seg_is_crowd"][~is_thing].any(), "stuff is never crowd"
    for s, box in enumerate(ex["seg_box"]):  # boxes are the tight boxes of the masks.
      ys, xs = np.nonzero(ex["segment_map"] == s)
      np.testing.assert_array_equal(box, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
  assert crowd > 0 and stuff > 0 and void > 0
  # Semantic: one segment per class present.
  for i in range(20):
    ex = synthetic.generate_example("shapes_semantic", "train", i)
    assert len(set(ex["seg_class"].tolist())) == len(ex["seg_class"])
  # Boxes: no masks in train, masks in validation.
  train = synthetic.generate_example("shapes_boxes", "train", 0)
  val = synthetic.generate_example("shapes_boxes", "validation", 0)
  assert (train["segment_map"] == -1).all() and len(train["seg_class"]) > 0
  assert (val["segment_map"] >= 0).any()


def test_vocabularies_mirror_the_papers_setting():
  names = {n: set(vocab_lib.load(n).class_names) for n in synthetic.SUITE}
  visual = {
    n: {c["name"]: c["visual"] for c in synthetic._categories(n)}  # pylint: disable=protected-access
    for n in synthetic.SUITE
  }
  # The semantic set shares visual concepts with the panoptic set under other names.
  synonyms = [
    c
    for c, v in visual["shapes_semantic"].items()
    if v in visual["shapes_panoptic"].values() and c not in names["shapes_panoptic"]
  ]
  assert len(synonyms) >= 3
  # The box set has thing classes never seen with masks.
  masked = set(visual["shapes_panoptic"].values()) | set(visual["shapes_semantic"].values())
  assert set(visual["shapes_boxes"].values()) - masked
  # Transfer names are unseen in every training vocabulary.
  seen = set().union(*(names[n] for n in TRAIN_VOCABS))
  assert not names["shapes_transfer"] & seen
  # Sizes: panoptic is the largest training set, semantic the smallest.
  sizes = {n: synthetic._SETTINGS[n]["splits"].get("train", 0) for n in TRAIN_VOCABS}  # pylint: disable=protected-access
  assert sizes["shapes_panoptic"] >= sizes["shapes_boxes"] > sizes["shapes_semantic"]


def test_unknown_synthetic_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="allowed: shapes_panoptic"):
    synthetic.builder("shapes_nope", str(tmp_path))
