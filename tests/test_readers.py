"""Every reader on small fixtures in the real on-disk formats, written here.

The fixture writers are shared with test_bad_input.py and test_pipeline.py.
"""

import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
import pytest
import scipy.io
import tensorflow as tf
import tensorflow_datasets as tfds

from dataseg import vocab as vocab_lib
from input_pipeline import readers
from input_pipeline.readers import coco
from input_pipeline.readers import tfds_readers

H, W = 24, 32
CATEGORIES = [{"id": 1, "name": "person", "isthing": 1},
              {"id": 3, "name": "car", "isthing": 1},
              {"id": 100, "name": "sky", "isthing": 0}]


def _rgb(rng, h=H, w=W):
  return rng.integers(0, 256, [h, w, 3], dtype=np.uint8)


def _ids_to_rgb(ids):
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def write_coco_panoptic(root, n=3, seed=0, image_ext=".jpg"):
  """COCO panoptic layout: images/, panoptic/*.png (RGB ids), panoptic.json.

  Returns (spec, expected) with expected decoded examples (numpy) by image id.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  os.makedirs(os.path.join(root, "panoptic"), exist_ok=True)
  images, anns, expected = [], [], {}
  for i in range(n):
    image_id = 100 + i
    fname = f"{image_id:012d}{image_ext}"
    Image.fromarray(_rgb(rng)).save(os.path.join(root, "images", fname))
    # Segment ids use all three RGB channels; the sky segment is listed first.
    seg_ids = np.array([70000 + i, 5 + 256 * i, 3 * 65536 + 7], np.int64)
    cats = [100, 1, 3]
    crowd = [0, 0, 1]
    ids = np.zeros([H, W], np.int64)
    ids[:8] = seg_ids[0]
    ids[10:20, 2:12] = seg_ids[1]
    ids[12:22, 16:30] = seg_ids[2]
    Image.fromarray(_ids_to_rgb(ids)).save(os.path.join(root, "panoptic",
                                                        f"{image_id:012d}.png"))
    seg_map = -np.ones([H, W], np.int32)
    for k, s in enumerate(seg_ids):
      seg_map[ids == s] = k
    segs = []
    for k in range(3):
      ys, xs = np.nonzero(seg_map == k)
      bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
      segs.append(dict(id=int(seg_ids[k]), category_id=cats[k], iscrowd=crowd[k],
                       bbox=bbox, area=int((seg_map == k).sum())))
    images.append(dict(id=image_id, file_name=fname, height=H, width=W))
    anns.append(dict(image_id=image_id, file_name=f"{image_id:012d}.png",
                     segments_info=segs))
    expected[image_id] = dict(
        image=np.asarray(Image.open(os.path.join(root, "images", fname)).convert("RGB")),
        segment_map=seg_map, seg_class=np.array([2, 0, 1]),
        seg_is_thing=np.array([0, 1, 1], bool), seg_is_crowd=np.array(crowd, bool),
        seg_box=np.array([[s["bbox"][1], s["bbox"][0], s["bbox"][1] + s["bbox"][3],
                           s["bbox"][0] + s["bbox"][2]] for s in segs], np.float32))
  path = os.path.join(root, "panoptic.json")
  with open(path, "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=CATEGORIES), f)
  spec = dict(format="coco_panoptic", json=path, image_dir=os.path.join(root, "images"),
              mask_dir=os.path.join(root, "panoptic"))
  return spec, expected


def write_coco_instance(root, n=2, seed=1, boxes_only=False):
  """COCO instance JSON with polygon, compressed-RLE and crowd (list-RLE) annotations."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  images, anns, expected = [], [], {}
  ann_id = 1
  for i in range(n):
    image_id = 7 + i
    fname = f"img{i}.png"
    image = _rgb(rng)
    Image.fromarray(image).save(os.path.join(root, "images", fname))
    poly = [[2.0, 2.0, 14.0, 2.0, 14.0, 12.0, 2.0, 12.0]]
    blob = np.zeros([H, W], np.uint8)
    blob[8:20, 10:26] = 1  # overlaps the polygon: the later annotation wins.
    rle = mask_utils.encode(np.asfortranarray(blob))
    rle["counts"] = rle["counts"].decode()
    crowd = np.zeros([H, W], np.uint8)
    crowd[18:24, 0:6] = 1
    crowd_rle = _uncompressed_rle(crowd)
    entries = [(1, poly, 0, [2, 2, 12, 10]), (3, rle, 0, [10, 8, 16, 12]),
               (1, crowd_rle, 1, [0, 18, 6, 6])]
    seg_map = -np.ones([H, W], np.int32)
    for k, (cat, seg, iscrowd, bbox) in enumerate(entries):
      anns.append(dict(id=ann_id, image_id=image_id, category_id=cat,
                       segmentation=seg, iscrowd=iscrowd, bbox=bbox, area=1.0))
      ann_id += 1
      if isinstance(seg, list):
        m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, H, W)))
      else:
        m = {0: None, 1: blob, 2: crowd}[k]
      seg_map[m.astype(bool)] = k
    images.append(dict(id=image_id, file_name=fname, height=H, width=W))
    expected[image_id] = dict(
        image=image, segment_map=-np.ones([H, W], np.int32) if boxes_only else seg_map,
        seg_class=np.array([0, 1, 0]), seg_is_thing=np.ones(3, bool),
        seg_is_crowd=np.array([0, 0, 1], bool),
        seg_box=np.array([[2, 2, 12, 14], [8, 10, 20, 26], [18, 0, 24, 6]], np.float32))
  path = os.path.join(root, "instances.json")
  with open(path, "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=CATEGORIES), f)
  spec = dict(format="coco_detection" if boxes_only else "coco_instance", json=path,
              image_dir=os.path.join(root, "images"))
  return spec, expected


def _uncompressed_rle(mask):
  flat = mask.flatten(order="F")
  counts, current, run = [], 0, 0
  for v in flat:
    if v != current:
      counts.append(run)
      current, run = v, 0
    run += 1
  counts.append(run)
  return {"counts": counts, "size": list(mask.shape)}


def write_ade(root, n=3, seed=2, mode="L"):
  """ADEChallengeData2016 layout: images/training/*.jpg, annotations/training/*.png."""
  rng = np.random.default_rng(seed)
  img_dir = os.path.join(root, "images", "training")
  ann_dir = os.path.join(root, "annotations", "training")
  os.makedirs(img_dir, exist_ok=True)
  os.makedirs(ann_dir, exist_ok=True)
  expected = {}
  for i in range(n):
    stem = f"ADE_train_{i + 1:08d}"
    Image.fromarray(_rgb(rng)).save(os.path.join(img_dir, stem + ".jpg"))
    values = np.zeros([H, W], np.uint8)  # 0 = void
    values[:10] = 3                      # sky (objectInfo150 id 3)
    values[10:, :16] = 13 + i            # person (13) / earth (14) / ...
    values[14:, 20:] = 150               # flag
    Image.fromarray(values, mode=mode).save(os.path.join(ann_dir, stem + ".png"))
    expected[i + 1] = values
  spec = dict(format="semantic_png", image_dir=img_dir, mask_dir=ann_dir, vocab="ade20k")
  return spec, expected


def _collect(ds):
  return {int(ex["image_id"]): ex for ex in ds.as_numpy_iterator()}


def _assert_decoded(got, want, check_image=True):
  assert got["image"].dtype == np.uint8 and got["image"].shape[-1] == 3
  if check_image:
    np.testing.assert_array_equal(got["image"], want["image"])
  np.testing.assert_array_equal(got["segment_map"], want["segment_map"])
  np.testing.assert_array_equal(got["seg_class"], want["seg_class"])
  np.testing.assert_array_equal(got["seg_is_thing"], want["seg_is_thing"])
  np.testing.assert_array_equal(got["seg_is_crowd"], want["seg_is_crowd"])
  np.testing.assert_allclose(got["seg_box"], want["seg_box"])


def test_coco_panoptic(tmp_path):
  spec, expected = write_coco_panoptic(str(tmp_path))
  ds, vocab = readers.build_reader(spec)
  assert vocab.class_names == ("person", "car", "sky")
  got = _collect(ds)
  assert sorted(got) == sorted(expected)
  for image_id, want in expected.items():
    _assert_decoded(got[image_id], want)


def test_coco_panoptic_into_packaged_vocab(tmp_path):
  spec, expected = write_coco_panoptic(str(tmp_path), n=1)
  ds, vocab = readers.build_reader(dict(spec, vocab="coco_panoptic"))
  got = _collect(ds)[100]
  # COCO ids 100 (sky), 1 (person), 3 (car) -> the packaged contiguous ids.
  want = [vocab.id_to_contiguous[i] for i in (100, 1, 3)]
  np.testing.assert_array_equal(got["seg_class"], want)
  np.testing.assert_array_equal(got["seg_is_thing"], vocab.is_thing[want])


def test_coco_instance_later_wins(tmp_path):
  spec, expected = write_coco_instance(str(tmp_path))
  ds, _ = readers.build_reader(spec)
  got = _collect(ds)
  assert sorted(got) == [7, 8]
  for image_id, want in expected.items():
    _assert_decoded(got[image_id], want)
  # Overlap of polygon (rows 2:12, cols 2:14) and blob (rows 8:20, cols 10:26).
  assert got[7]["segment_map"][9, 11] == 1


def test_coco_detection(tmp_path):
  spec, expected = write_coco_instance(str(tmp_path), boxes_only=True)
  ds, _ = readers.build_reader(spec)
  got = _collect(ds)
  for image_id, want in expected.items():
    _assert_decoded(got[image_id], want)


def test_cityscapes_panoptic_string_ids_and_city_folders(tmp_path):
  root = str(tmp_path)
  spec, expected = write_coco_panoptic(root, n=2, image_ext=".png")
  # Cityscapes: string image ids, images in city sub-folders, labelId categories.
  with open(spec["json"]) as f:
    data = json.load(f)
  city = os.path.join(root, "leftImg8bit", "val", "frankfurt")
  os.makedirs(city)
  for im, ann in zip(data["images"], data["annotations"]):
    name = f"frankfurt_{im['id']:06d}_000019"
    os.rename(os.path.join(root, "images", im["file_name"]),
              os.path.join(city, name + "_leftImg8bit.png"))
    im.update(id=name, file_name=name + "_leftImg8bit.png")
    ann["image_id"] = name
    for s in ann["segments_info"]:
      s["category_id"] = {100: 23, 1: 24, 3: 26}[s["category_id"]]  # sky/person/car
  with open(spec["json"], "w") as f:
    json.dump(data, f)
  ds, vocab = readers.build_reader(dict(spec, image_dir=os.path.join(root, "leftImg8bit",
                                                                     "val"),
                                        vocab="cityscapes"))
  got = _collect(ds)
  assert sorted(got) == [0, 1]  # positions in the sorted image list
  names = [vocab.raw_names[c] for c in got[0]["seg_class"]]
  assert names == ["sky", "person", "car"]
  np.testing.assert_array_equal(got[1]["segment_map"], expected[101]["segment_map"])


def test_ade_raw_folder(tmp_path):
  spec, expected = write_ade(str(tmp_path))
  ds, vocab = readers.build_reader(spec)
  assert len(vocab) == 150
  got = _collect(ds)
  assert sorted(got) == [1, 2, 3]
  for image_id, values in expected.items():
    ex = got[image_id]
    classes = np.unique(values[values > 0]) - 1  # ids 1..150 -> 0..149
    np.testing.assert_array_equal(ex["seg_class"], classes)
    class_map = np.where(ex["segment_map"] >= 0,
                         ex["seg_class"][np.maximum(ex["segment_map"], 0)], -1)
    np.testing.assert_array_equal(class_map, np.where(values > 0, values.astype(int) - 1,
                                                      -1))
    np.testing.assert_array_equal(ex["seg_is_thing"], vocab.is_thing[classes])
    for k in range(len(classes)):
      ys, xs = np.nonzero(ex["segment_map"] == k)
      np.testing.assert_array_equal(ex["seg_box"][k], [ys.min(), xs.min(), ys.max() + 1,
                                                       xs.max() + 1])


def test_pascal_context59_mat_and_palette_png(tmp_path):
  root = str(tmp_path)
  vocab = vocab_lib.load("pascal_context59")
  img_dir, ann_dir = os.path.join(root, "JPEGImages"), os.path.join(root, "trainval")
  os.makedirs(img_dir)
  os.makedirs(ann_dir)
  rng = np.random.default_rng(3)
  in_vocab = [int(i) for i in vocab.original_ids[:2]]
  labels = np.full([H, W], 0, np.uint16)         # 0: unlabelled
  labels[:12] = in_vocab[0]
  labels[12:, :8] = in_vocab[1]
  labels[12:, 8:16] = 400                        # one of the 400 other classes: void
  Image.fromarray(_rgb(rng)).save(os.path.join(img_dir, "2008_000002.jpg"))
  scipy.io.savemat(os.path.join(ann_dir, "2008_000002.mat"), {"LabelMap": labels})
  # A second example as a palette PNG (values are palette indices).
  Image.fromarray(_rgb(rng)).save(os.path.join(img_dir, "2008_000003.jpg"))
  p = Image.fromarray(np.where(labels == 400, 0, labels).astype(np.uint8), mode="P")
  p.putpalette(list(rng.integers(0, 256, 768)))
  p.save(os.path.join(ann_dir, "2008_000003.png"))
  ds, _ = readers.build_reader(dict(format="semantic_png", image_dir=img_dir,
                                    mask_dir=ann_dir, vocab="pascal_context59",
                                    unlisted="void"))
  got = _collect(ds)
  assert sorted(got) == [2, 3]
  for ex in got.values():
    np.testing.assert_array_equal(ex["seg_class"], [0, 1])
    want = np.where(labels == in_vocab[0], 0, np.where(labels == in_vocab[1], 1, -1))
    np.testing.assert_array_equal(ex["segment_map"], want)


def test_unknown_format_names_allowed():
  with pytest.raises(ValueError, match="allowed: coco_panoptic, coco_instance"):
    readers.build_reader({"format": "voc_xml"})


def test_sharded_records_disjoint(tmp_path):
  spec, expected = write_coco_panoptic(str(tmp_path), n=5)
  shards = [set(_collect(readers.build_reader(spec, shard_index=i, shard_count=2)[0]))
            for i in range(2)]
  assert not shards[0] & shards[1] and shards[0] | shards[1] == set(expected)


# TFDS feature decoding on hand-built feature dicts shaped like the TFDS features.


def test_tfds_coco_panoptic_decode():
  vocab = vocab_lib.load("coco_panoptic")
  tfds_names = list(vocab.raw_names)
  ids = np.zeros([H, W], np.int64)
  ids[:6] = 1 + 256 * 2 + 65536 * 3
  ids[6:12, :10] = 42
  features = {
      "image": tf.constant(_rgb(np.random.default_rng(0))),
      "image/id": tf.constant(139, tf.int64),
      "panoptic_image": tf.constant(_ids_to_rgb(ids)),
      "panoptic_objects": {
          "id": tf.constant([42, 1 + 256 * 2 + 65536 * 3], tf.int64),
          "bbox": tf.constant([[0.25, 0.0, 0.5, 10 / 32], [0.0, 0.0, 0.25, 1.0]],
                              tf.float32),
          "label": tf.constant([0, 132], tf.int64),
          "is_crowd": tf.constant([True, False]),
          "area": tf.constant([60, 192], tf.int64)},
  }
  label_map = tfds_readers.label_map_by_name(tfds_names, vocab)
  out, ok = tfds_readers.decode_coco_panoptic(features, label_map=label_map,
                                              is_thing=vocab.is_thing)
  out = {k: v.numpy() for k, v in out.items()}
  assert ok.numpy()
  want = -np.ones([H, W], np.int32)
  want[:6] = 1
  want[6:12, :10] = 0
  np.testing.assert_array_equal(out["segment_map"], want)
  np.testing.assert_array_equal(out["seg_class"], [0, 132])
  np.testing.assert_array_equal(out["seg_is_thing"], vocab.is_thing[[0, 132]])
  np.testing.assert_array_equal(out["seg_is_crowd"], [True, False])
  np.testing.assert_allclose(out["seg_box"], [[6, 0, 12, 10], [0, 0, 6, 32]])
  # An id in the PNG without an entry: flagged not ok (bad input).
  ids[20:, 20:] = 99
  features["panoptic_image"] = tf.constant(_ids_to_rgb(ids))
  _, ok = tfds_readers.decode_coco_panoptic(features, label_map=label_map,
                                            is_thing=vocab.is_thing)
  assert not ok.numpy()


def test_tfds_coco_detection_decode_maps_labels_by_name():
  vocab = vocab_lib.load("coco_panoptic")
  # TFDS coco/2017 has 80 labels; a shuffled name list proves the mapping is by name.
  thing_names = [n for n, t in zip(vocab.raw_names, vocab.is_thing) if t]
  tfds_names = thing_names[::-1]
  features = {
      "image": tf.zeros([H, W, 3], tf.uint8), "image/id": tf.constant(5, tf.int64),
      "objects": {"id": tf.constant([1, 2], tf.int64),
                  "bbox": tf.constant([[0.5, 0.25, 1.0, 0.5], [0, 0, 0.5, 0.5]]),
                  "label": tf.constant([0, 79], tf.int64),
                  "is_crowd": tf.constant([False, True]),
                  "area": tf.constant([1.0, 2.0])}}
  out, ok = tfds_readers.decode_detection(
      features, label_map=tfds_readers.label_map_by_name(tfds_names, vocab),
      is_thing=vocab.is_thing)
  out = {k: v.numpy() for k, v in out.items()}
  assert ok.numpy() and np.all(out["segment_map"] == -1)
  assert [vocab.raw_names[c] for c in out["seg_class"]] == [tfds_names[0], tfds_names[79]]
  np.testing.assert_allclose(out["seg_box"], [[12, 8, 24, 16], [0, 0, 12, 16]])


def test_tfds_scene_parse150_decode():
  vocab = vocab_lib.load("ade20k")
  values = np.zeros([H, W], np.uint8)
  values[:5] = 150
  values[5:, 3:9] = 1
  features = {"image": tf.zeros([H, W, 3], tf.uint8),
              "annotation": tf.constant(np.stack([values] * 3, -1))}
  lookup = tfds_readers.ade_value_lookup(vocab)
  out, ok = tfds_readers.decode_scene_parse150(features, value_lookup=lookup,
                                               is_thing=vocab.is_thing)
  out = {k: v.numpy() for k, v in out.items()}
  assert ok.numpy()
  np.testing.assert_array_equal(out["seg_class"], [0, 149])
  want = np.where(values == 1, 0, np.where(values == 150, 1, -1))
  np.testing.assert_array_equal(out["segment_map"], want)
  np.testing.assert_allclose(out["seg_box"], [[5, 3, 24, 9], [0, 0, 5, 32]])
  values[0, 0] = 151  # beyond the 150 classes
  features["annotation"] = tf.constant(np.stack([values] * 3, -1))
  _, ok = tfds_readers.decode_scene_parse150(features, value_lookup=lookup,
                                             is_thing=vocab.is_thing)
  assert not ok.numpy()


def test_objects365_builder(tmp_path):
  """Raw Objects365 layout -> TFDS dataset via the builder -> decoded boxes."""
  from input_pipeline.readers import objects365_builder  # pylint: disable=g-import-not-at-top
  raw = tmp_path / "raw"
  patch = raw / "val" / "images" / "v1" / "patch0"
  patch.mkdir(parents=True)
  rng = np.random.default_rng(4)
  images, anns = [], []
  for i in range(3):
    name = f"objects365_v1_{i:08d}.jpg"
    Image.fromarray(_rgb(rng)).save(patch / name)
    images.append(dict(id=10 + i, file_name=f"images/v1/patch0/{name}", height=H,
                       width=W))
    anns.append(dict(id=i, image_id=10 + i, category_id=1 + i, bbox=[4, 2, 8, 10],
                     iscrowd=0, area=80.0))
  vocab = vocab_lib.load("objects365")
  cats = [dict(id=int(i), name=n) for i, n in zip(vocab.original_ids, vocab.raw_names)]
  with open(raw / "val" / "zhiyuan_objv2_val.json", "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=cats), f)
  data_dir = str(tmp_path / "tfds")
  builder = objects365_builder.Objects365(data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(raw)))
  ds, v = readers.build_reader(dict(format="objects365_tfds", split="validation",
                                    data_dir=data_dir))
  assert v.name == "objects365"
  got = _collect(ds)
  assert sorted(got) == [10, 11, 12]
  for i, image_id in enumerate(sorted(got)):
    np.testing.assert_array_equal(got[image_id]["seg_class"], [i])
    np.testing.assert_allclose(got[image_id]["seg_box"], [[2, 4, 12, 12]], atol=1e-4)
    assert np.all(got[image_id]["segment_map"] == -1)
