"""Packaged vocabularies: counts, thing/stuff splits, ids and the loader's contract."""

import json
import pathlib

import numpy as np
import pytest

from dataseg import vocab

# name: (classes, things), from each dataset's definition.
EXPECTED = {
  "coco_panoptic": (133, 80),
  "ade20k": (150, 100),
  "objects365": (365, 365),
  "cityscapes": (19, 8),
  "pascal_context59": (59, 20),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_counts_and_thing_counts(name):
  v = vocab.load(name)
  n, things = EXPECTED[name]
  assert len(v) == len(v.class_names) == len(v.raw_names) == n
  assert v.is_thing.dtype == np.bool_ and v.is_thing.shape == (n,)
  assert v.num_things == things and v.num_stuff == n - things
  assert v.source  # every list says where it comes from


@pytest.mark.parametrize("name", vocab.available())
def test_ids_names_and_mappings(name):
  v = vocab.load(name)
  ids = v.original_ids.tolist()
  assert len(set(ids)) == len(ids)
  assert all(v.id_to_contiguous[i] == k for k, i in enumerate(ids))
  assert all(v.contiguous_to_id[k] == i for k, i in enumerate(ids))
  assert all(n and n == n.strip() for n in v.class_names)
  assert len(set(v.class_names)) == len(v.class_names), "prompt names collide"


def test_file_format_is_coco_categories():
  for name in EXPECTED:
    path = pathlib.Path(vocab.__file__).parent / f"{name}.json"
    data = json.loads(path.read_text())
    assert set(data) >= {"source", "categories"}
    for c in data["categories"]:
      assert isinstance(c["id"], int) and isinstance(c["name"], str)
      assert c["isthing"] in (0, 1)
      assert isinstance(c.get("synonyms", []), list)


def test_coco_panoptic_ids_and_names():
  v = vocab.load("coco_panoptic")
  ids = v.original_ids
  # COCO things keep their detection ids (1..90, 80 used); stuff ids are 92..200.
  assert ids[v.is_thing].min() == 1 and ids[v.is_thing].max() == 90
  assert ids[~v.is_thing].min() == 92 and ids[~v.is_thing].max() == 200
  assert np.all(np.diff(ids) > 0)
  k = v.id_to_contiguous[199]
  assert v.raw_names[k] == "wall-other-merged" and v.class_names[k] == "wall"
  assert v.class_names[v.id_to_contiguous[187]] == "sky"
  assert not any("-merged" in n or "-other" in n for n in v.class_names)


def test_ade20k_order_and_ids():
  v = vocab.load("ade20k")
  assert v.original_ids.tolist() == list(range(1, 151))
  assert v.class_names[:5] == ("wall", "building", "sky", "floor", "tree")
  assert v.class_names[-1] == "flag"
  assert v.is_thing[12] and not v.is_thing[0]  # person thing, wall stuff


def test_objects365_ids_and_typos():
  v = vocab.load("objects365")
  assert v.original_ids.tolist() == list(range(1, 366))
  assert v.raw_names[0] == "Person" and v.raw_names[-1] == "Table Tennis"
  for typo, fixed in [
    ("Bakset", "basket"),
    ("Mushroon", "mushroom"),
    ("Dinning Table", "dining table"),
  ]:
    assert v.class_names[v.raw_names.index(typo)] == fixed


def test_cityscapes_train_ids():
  v = vocab.load("cityscapes")
  data = json.loads((pathlib.Path(vocab.__file__).parent / "cityscapes.json").read_text())
  assert [c["train_id"] for c in data["categories"]] == list(range(19))
  assert v.original_ids.tolist() == [
    7,
    8,
    11,
    12,
    13,
    17,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    26,
    27,
    28,
    31,
    32,
    33,
  ]
  things = {n for n, t in zip(v.class_names, v.is_thing) if t}
  assert things == {"person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"}


def test_unknown_name_lists_available():
  with pytest.raises(ValueError, match="coco_panoptic") as e:
    vocab.load("coco_panoptik")
  assert "unknown vocabulary" in str(e.value)
  with pytest.raises(ValueError):
    vocab.load("../vocab/coco_panoptic")


def test_from_categories_user_data():
  cats = [
    {"id": 5, "name": "cat"},
    {"id": 2, "name": "sky", "isthing": 0},
    {"id": 9, "name": "wall-x", "prompt_name": "wall", "synonyms": ["w"]},
  ]
  v = vocab.from_categories("mine", cats)
  assert v.class_names == ("cat", "sky", "wall")
  assert v.is_thing.tolist() == [True, False, True]  # COCO detection: things
  assert v.id_to_contiguous == {5: 0, 2: 1, 9: 2}
  assert v.synonyms[2] == ("w",)
  with pytest.raises(ValueError, match="duplicate"):
    vocab.from_categories("bad", cats + [{"id": 5, "name": "dog"}])


def test_padded_vocabulary_and_static_size():
  """Padding keeps names, flags and rows in place, zeros after; V is checked once."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  from dataseg.vocab import padded  # pylint: disable=g-import-not-at-top

  text = np.arange(6, dtype=np.float32).reshape(3, 2)
  p = padded.pad(["a", "b", "c"], [True, False, True], text, 5, index=1)
  assert p.names == ("a", "b", "c") and p.index == 1
  assert p.valid.tolist() == [True, True, True, False, False]
  assert p.is_thing.tolist() == [True, False, True, False, False]
  np.testing.assert_array_equal(p.text, np.concatenate([text, np.zeros((2, 2))]))
  assert set(p.arrays()) == {"text", "valid", "is_thing", "index"}
  with pytest.raises(ValueError, match="do not fit"):
    padded.pad(["a"] * 6, [True] * 6, np.zeros((6, 2)), 5, index=0)
  config = ml_collections.ConfigDict(dict(vocab_size=0))
  assert padded.static_size(config, {"x": 3, "y": 7}) == 7
  config.vocab_size = 10
  assert padded.static_size(config, {"x": 3, "y": 7}) == 10
  config.vocab_size = 5
  with pytest.raises(ValueError, match=r"vocab_size=5 < largest vocabulary \(7 classes of 'y'\)"):
    padded.static_size(config, {"x": 3, "y": 7})
