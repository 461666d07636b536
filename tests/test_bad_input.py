"""Each bad-input case: its documented behaviour under skip and under fail."""

import json
import logging
import os

import numpy as np
from PIL import Image
import pytest

from input_pipeline import bad_input
from input_pipeline import readers

try:
  import test_readers as fx  # pylint: disable=g-import-not-at-top
except ImportError:  # tests/ as a package
  from tests import test_readers as fx  # pylint: disable=g-import-not-at-top


def _read(spec, policy="skip"):
  counter = bad_input.BadInputCounter(policy, "fixture")
  ds, _ = readers.build_reader(spec, counter=counter)
  return {int(ex["image_id"]): ex for ex in ds.as_numpy_iterator()}, counter


def _edit_json(path, fn):
  with open(path) as f:
    data = json.load(f)
  fn(data)
  with open(path, "w") as f:
    json.dump(data, f)


def _expect_fail(spec, *needles):
  """Under 'fail' the error (raised directly or through tf.data) names file and field."""
  with pytest.raises(Exception) as info:
    _read(spec, "fail")
  for needle in needles:
    assert needle in str(info.value)


def test_policy_names_allowed():
  with pytest.raises(ValueError, match="allowed: skip, fail"):
    bad_input.BadInputCounter("ignore")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_image(tmp_path, damage, caplog):
  spec, expected = fx.write_coco_panoptic(str(tmp_path))
  path = os.path.join(spec["image_dir"], "000000000101.jpg")
  raw = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(raw[: len(raw) // 2] if damage == "truncate" else b"not an image" * 20)
  with caplog.at_level(logging.WARNING):
    got, counter = _read(spec)
  assert sorted(got) == [100, 102]
  for image_id in (100, 102):  # The others are intact and correct.
    np.testing.assert_array_equal(got[image_id]["segment_map"], expected[image_id]["segment_map"])
  assert counter.total == {"corrupt_image": 1}
  assert counter.epochs_done == 1  # one full pass -> one per-pass summary logged
  assert "000000000101.jpg" in caplog.text and "ids [101]" in caplog.text
  _expect_fail(spec, "000000000101.jpg", "'image'", "corrupt_image")


def test_missing_image_and_mask_files(tmp_path):
  spec, _ = fx.write_coco_panoptic(str(tmp_path))
  os.remove(os.path.join(spec["image_dir"], "000000000100.jpg"))
  os.remove(os.path.join(spec["mask_dir"], "000000000102.png"))
  got, counter = _read(spec)
  assert sorted(got) == [101]
  assert counter.total == {"missing_file": 2}
  _expect_fail(spec, "000000000100.jpg", "images.file_name")


def test_semantic_missing_mask(tmp_path):
  spec, _ = fx.write_ade(str(tmp_path))
  os.remove(os.path.join(spec["mask_dir"], "ADE_train_00000002.png"))
  got, counter = _read(spec)
  assert sorted(got) == [1, 3] and counter.total == {"missing_file": 1}
  _expect_fail(spec, "ADE_train_00000002", "mask_dir")


def test_png_segment_without_annotation(tmp_path):
  spec, _ = fx.write_coco_panoptic(str(tmp_path))
  path = os.path.join(spec["mask_dir"], "000000000100.png")
  rgb = np.asarray(Image.open(path)).copy()
  rgb[0, 0] = [9, 9, 9]  # id 9 + 9*256 + 9*65536: not in segments_info
  Image.fromarray(rgb).save(path)
  got, counter = _read(spec)
  assert sorted(got) == [101, 102]
  assert counter.total == {"unannotated_segment": 1}
  _expect_fail(spec, "000000000100.png", "segments_info")


def test_unknown_category(tmp_path):
  spec, _ = fx.write_coco_instance(str(tmp_path))
  _edit_json(spec["json"], lambda d: d["annotations"][1].update(category_id=999))
  got, counter = _read(spec)
  assert sorted(got) == [8] and counter.total == {"unknown_category": 1}
  _expect_fail(spec, "instances.json", "category_id", "999")


def test_unknown_semantic_value(tmp_path):
  spec, _ = fx.write_ade(str(tmp_path))
  path = os.path.join(spec["mask_dir"], "ADE_train_00000003.png")
  values = np.asarray(Image.open(path)).copy()
  values[0, 0] = 200  # ADE20k has 150 classes
  Image.fromarray(values).save(path)
  got, counter = _read(spec)
  assert sorted(got) == [1, 2] and counter.total == {"unknown_category": 1}
  _expect_fail(spec, "ADE_train_00000003.png", "label value", "200")


def test_image_without_annotations(tmp_path):
  spec, _ = fx.write_coco_instance(str(tmp_path))
  _edit_json(
    spec["json"],
    lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 7]),
  )
  got, counter = _read(spec)
  assert sorted(got) == [8] and counter.total == {"no_annotations": 1}
  # Evaluation sets keep such images, with an empty segment table.
  got, counter = _read(dict(spec, keep_empty=True))
  assert sorted(got) == [7, 8] and not counter.total
  assert got[7]["seg_class"].shape == (0,) and np.all(got[7]["segment_map"] == -1)
  _expect_fail(spec, "img0.png", "annotations")


def test_zero_area_and_outside_boxes(tmp_path):
  spec, expected = fx.write_coco_instance(str(tmp_path), boxes_only=True)

  def damage(d):
    anns = [a for a in d["annotations"] if a["image_id"] == 7]
    anns[0]["bbox"] = [3, 3, 0, 5]  # zero width: dropped
    anns[1]["bbox"] = [40, 2, 5, 5]  # right of the 32-px image: dropped
    anns[2]["bbox"] = [-4, 20, 10, 10]  # partly outside: clipped

  _edit_json(spec["json"], damage)
  got, counter = _read(spec)
  assert counter.total == {"bad_box": 2}
  np.testing.assert_array_equal(got[7]["seg_class"], [0])
  np.testing.assert_allclose(got[7]["seg_box"], [[20, 0, 24, 6]])
  np.testing.assert_allclose(got[8]["seg_box"], expected[8]["seg_box"])
  _expect_fail(spec, "instances.json", "bbox")


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_image_modes_converted_to_rgb(tmp_path, mode):
  spec, _ = fx.write_coco_instance(str(tmp_path))
  path = os.path.join(spec["image_dir"], "img0.png")
  rng = np.random.default_rng(0)
  if mode == "CMYK":
    path = path[:-4] + ".jpg"
    im = Image.fromarray(rng.integers(0, 256, [fx.H, fx.W, 4], dtype=np.uint8), "CMYK")
    _edit_json(spec["json"], lambda d: d["images"][0].update(file_name="img0.jpg"))
  elif mode == "I;16":
    im = Image.fromarray(rng.integers(0, 255, [fx.H, fx.W], dtype=np.uint16))
  else:
    im = Image.fromarray(rng.integers(0, 256, [fx.H, fx.W, 4], dtype=np.uint8), "RGBA").convert(
      mode
    )
  im.save(path)
  got, counter = _read(spec)
  assert not counter.total
  want = np.asarray(Image.open(path).convert("RGB"))
  assert got[7]["image"].shape == (fx.H, fx.W, 3)
  np.testing.assert_array_equal(got[7]["image"], want)
