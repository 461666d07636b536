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
from input_pipeline.readers import tfds_readers

H, W = 24, 32
CATEGORIES = [
  {"id": 1, "name": "person", "isthing": 1},
  {"id": 3, "name": "car", "isthing": 1},
  {"id": 100, "name": "sky", "isthing": 0},
]


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
    Image.fromarray(_ids_to_rgb(ids)).save(os.path.join(root, "panoptic", f"{image_id:012d}.png"))
    seg_map = -np.ones([H, W], np.int32)
    for k, s in enumerate(seg_ids):
      seg_map[ids == s] = k
    segs = []
    for k in range(3):
      ys, xs = np.nonzero(seg_map == k)
      bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
      segs.append(
        dict(
          id=int(seg_ids[k]),
          category_id=cats[k],
          iscrowd=crowd[k],
          bbox=bbox,
          area=int((seg_map == k).sum()),
        )
      )
    images.append(dict(id=image_id, file_name=fname, height=H, width=W))
    anns.append(dict(image_id=image_id, file_name=f"{image_id:012d}.png", segments_info=segs))
    expected[image_id] = dict(
      image=np.asarray(Image.open(os.path.join(root, "images", fname)).convert("RGB")),
      segment_map=seg_map,
      seg_class=np.array([2, 0, 1]),
      seg_is_thing=np.array([0, 1, 1], bool),
      seg_is_crowd=np.array(crowd, bool),
      seg_box=np.array(
        [
          [s["bbox"][1], s["bbox"][0], s["bbox"][1] + s["bbox"][3], s["bbox"][0] + s["bbox"][2]]
          for s in segs
        ],
        np.float32,
      ),
    )
  path = os.path.join(root, "panoptic.json")
  with open(path, "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=CATEGORIES), f)
  spec = dict(
    format="coco_panoptic",
    json=path,
    image_dir=os.path.join(root, "images"),
    mask_dir=os.path.join(root, "panoptic"),
  )
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
    entries = [
      (1, poly, 0, [2, 2, 12, 10]),
      (3, rle, 0, [10, 8, 16, 12]),
      (1, crowd_rle, 1, [0, 18, 6, 6]),
    ]
    seg_map = -np.ones([H, W], np.int32)
    for k, (cat, seg, iscrowd, bbox) in enumerate(entries):
      anns.append(
        dict(
          id=ann_id,
          image_id=image_id,
          category_id=cat,
          segmentation=seg,
          iscrowd=iscrowd,
          bbox=bbox,
          area=1.0,
        )
      )
      ann_id += 1
      if isinstance(seg, list):
        m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, H, W)))
      else:
        m = {0: None, 1: blob, 2: crowd}[k]
      seg_map[m.astype(bool)] = k
    images.append(dict(id=image_id, file_name=fname, height=H, width=W))
    expected[image_id] = dict(
      image=image,
      segment_map=-np.ones([H, W], np.int32) if boxes_only else seg_map,
      seg_class=np.array([0, 1, 0]),
      seg_is_thing=np.ones(3, bool),
      seg_is_crowd=np.array([0, 0, 1], bool),
      seg_box=np.array([[2, 2, 12, 14], [8, 10, 20, 26], [18, 0, 24, 6]], np.float32),
    )
  path = os.path.join(root, "instances.json")
  with open(path, "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=CATEGORIES), f)
  spec = dict(
    format="coco_detection" if boxes_only else "coco_instance",
    json=path,
    image_dir=os.path.join(root, "images"),
  )
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
    values[:10] = 3  # sky (objectInfo150 id 3)
    values[10:, :16] = 13 + i  # person (13) / earth (14) / ...
    values[14:, 20:] = 150  # flag
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
    os.rename(
      os.path.join(root, "images", im["file_name"]), os.path.join(city, name + "_leftImg8bit.png")
    )
    im.update(id=name, file_name=name + "_leftImg8bit.png")
    ann["image_id"] = name
    for s in ann["segments_info"]:
      s["category_id"] = {100: 23, 1: 24, 3: 26}[s["category_id"]]  # sky/person/car
  with open(spec["json"], "w") as f:
    json.dump(data, f)
  ds, vocab = readers.build_reader(
    dict(spec, image_dir=os.path.join(root, "leftImg8bit", "val"), vocab="cityscapes")
  )
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
    class_map = np.where(
      ex["segment_map"] >= 0, ex["seg_class"][np.maximum(ex["segment_map"], 0)], -1
    )
    np.testing.assert_array_equal(class_map, np.where(values > 0, values.astype(int) - 1, -1))
    np.testing.assert_array_equal(ex["seg_is_thing"], vocab.is_thing[classes])
    for k in range(len(classes)):
      ys, xs = np.nonzero(ex["segment_map"] == k)
      np.testing.assert_array_equal(
        ex["seg_box"][k], [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]
      )


def test_pascal_context59_mat_and_palette_png(tmp_path):
  root = str(tmp_path)
  vocab = vocab_lib.load("pascal_context59")
  img_dir, ann_dir = os.path.join(root, "JPEGImages"), os.path.join(root, "trainval")
  os.makedirs(img_dir)
  os.makedirs(ann_dir)
  rng = np.random.default_rng(3)
  in_vocab = [int(i) for i in vocab.original_ids[:2]]
  labels = np.full([H, W], 0, np.uint16)  # 0: unlabelled
  labels[:12] = in_vocab[0]
  labels[12:, :8] = in_vocab[1]
  labels[12:, 8:16] = 400  # one of the 400 other classes: void
  Image.fromarray(_rgb(rng)).save(os.path.join(img_dir, "2008_000002.jpg"))
  scipy.io.savemat(os.path.join(ann_dir, "2008_000002.mat"), {"LabelMap": labels})
  # A second example as a palette PNG (values are palette indices).
  Image.fromarray(_rgb(rng)).save(os.path.join(img_dir, "2008_000003.jpg"))
  p = Image.fromarray(np.where(labels == 400, 0, labels).astype(np.uint8), mode="P")
  p.putpalette(list(rng.integers(0, 256, 768)))
  p.save(os.path.join(ann_dir, "2008_000003.png"))
  ds, _ = readers.build_reader(
    dict(
      format="semantic_png",
      image_dir=img_dir,
      mask_dir=ann_dir,
      vocab="pascal_context59",
      unlisted="void",
    )
  )
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
  shards = [
    set(_collect(readers.build_reader(spec, shard_index=i, shard_count=2)[0])) for i in range(2)
  ]
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
      "bbox": tf.constant([[0.25, 0.0, 0.5, 10 / 32], [0.0, 0.0, 0.25, 1.0]], tf.float32),
      "label": tf.constant([0, 132], tf.int64),
      "is_crowd": tf.constant([True, False]),
      "area": tf.constant([60, 192], tf.int64),
    },
  }
  label_map = tfds_readers.label_map_by_name(tfds_names, vocab)
  out, ok = tfds_readers.decode_coco_panoptic(
    features, label_map=label_map, is_thing=vocab.is_thing
  )
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
  _, ok = tfds_readers.decode_coco_panoptic(features, label_map=label_map, is_thing=vocab.is_thing)
  assert not ok.numpy()


def test_tfds_coco_detection_decode_maps_labels_by_name():
  vocab = vocab_lib.load("coco_panoptic")
  # TFDS coco/2017 has 80 labels; a shuffled name list proves the mapping is by name.
  thing_names = [n for n, t in zip(vocab.raw_names, vocab.is_thing) if t]
  tfds_names = thing_names[::-1]
  features = {
    "image": tf.zeros([H, W, 3], tf.uint8),
    "image/id": tf.constant(5, tf.int64),
    "objects": {
      "id": tf.constant([1, 2], tf.int64),
      "bbox": tf.constant([[0.5, 0.25, 1.0, 0.5], [0, 0, 0.5, 0.5]]),
      "label": tf.constant([0, 79], tf.int64),
      "is_crowd": tf.constant([False, True]),
      "area": tf.constant([1.0, 2.0]),
    },
  }
  out, ok = tfds_readers.decode_detection(
    features, label_map=tfds_readers.label_map_by_name(tfds_names, vocab), is_thing=vocab.is_thing
  )
  out = {k: v.numpy() for k, v in out.items()}
  assert ok.numpy() and np.all(out["segment_map"] == -1)
  assert [vocab.raw_names[c] for c in out["seg_class"]] == [tfds_names[0], tfds_names[79]]
  np.testing.assert_allclose(out["seg_box"], [[12, 8, 24, 16], [0, 0, 12, 16]])


def test_tfds_scene_parse150_is_instance_data_and_refused(tmp_path, monkeypatch):
  """TFDS scene_parse150 built from ChallengeData2017's layout (mocked download) stores the
  `annotations_instance` PNG as is: channel 0 is the instanceInfo100 class (person = 4;
  objectInfo150 says 13), G the instance id, stuff pixels 0. No 150-class map: refused."""
  rng = np.random.default_rng(5)
  images, annotations = tmp_path / "dl" / "images", tmp_path / "dl" / "annotations"
  for folder in ("training", "validation"):
    (images / "images" / folder).mkdir(parents=True)
    (annotations / "annotations_instance" / folder).mkdir(parents=True)
    Image.fromarray(_rgb(rng)).save(images / "images" / folder / "ADE_x_00000001.jpg")
    instance = np.zeros([H, W, 3], np.uint8)  # wall (stuff) everywhere else: 0.
    instance[4:12, 2:10] = (4, 1, 0)  # person, instance 1
    instance[14:22, 12:20] = (4, 2, 0)  # person, instance 2
    Image.fromarray(instance).save(
      annotations / "annotations_instance" / folder / "ADE_x_00000001.png"
    )
  _tfds_mock_download(
    monkeypatch, {"images.tar": str(images), "annotations_instance.tar": str(annotations)}
  )
  builder = tfds.builder("scene_parse150", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  (ex,) = builder.as_dataset(split="train").as_numpy_iterator()
  np.testing.assert_array_equal(ex["annotation"], instance)
  with pytest.raises(ValueError, match="annotations_instance.*ADEChallengeData2016"):
    readers.build_reader(
      dict(format="tfds", tfds_name="scene_parse150", data_dir=str(tmp_path / "tfds"))
    )


# Every registry entry's default layout (input_pipeline/datasets.py), built in miniature
# below one data_dir as the dataset's own tools leave it, read through
# `datasets.reader_spec` exactly as a config entry is. The expectations are the
# fixture's own segments: class *names* written into the files (checked against the
# vocabulary entry of the original id), thing flags from the dataset's definition,
# crowd, void pixels, tight boxes.

# Mask2Former datasets/ade20k_instance_catid_mapping.txt, column SceneParse150: the 100
# objectInfo150 ids that are things in ADE20k panoptic.
ADE_THING_IDS = frozenset(
  (
    8,
    9,
    11,
    13,
    15,
    16,
    19,
    20,
    21,
    23,
    24,
    25,
    28,
    31,
    32,
    33,
    34,
    36,
    37,
    38,
    39,
    40,
    42,
    43,
    44,
    45,
    46,
    48,
    50,
    51,
    54,
    56,
    57,
    58,
    59,
    63,
    65,
    66,
    67,
    68,
    70,
    71,
    72,
    73,
    74,
    75,
    76,
    77,
    79,
    81,
    82,
    83,
    84,
    86,
    87,
    88,
    89,
    90,
    91,
    93,
    94,
    96,
    98,
    99,
    103,
    104,
    105,
    108,
    109,
    111,
    112,
    113,
    116,
    117,
    119,
    120,
    121,
    122,
    124,
    125,
    126,
    127,
    128,
    130,
    131,
    133,
    134,
    135,
    136,
    137,
    138,
    139,
    140,
    143,
    144,
    145,
    147,
    148,
    149,
    150,
  )
)
# objectInfo150 ids and names (sceneparsing objectInfo150.csv).
ADE_NAMES = {1: "wall", 3: "sky", 13: "person", 14: "earth, ground", 21: "car", 150: "flag"}
COCO_SPLIT = {"train": "train2017", "validation": "val2017"}
ADE_SPLIT = {"train": ("train", "training"), "validation": ("val", "validation")}


def _save_image(image, path):
  """Writes `image` (JPEG / PNG by extension); returns what PIL decodes from the file."""
  if not os.path.exists(path):  # ADE semantic and panoptic share the image folder.
    Image.fromarray(image).save(path, quality=95)
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def _seg(mask, name, thing, crowd=False):
  ys, xs = np.nonzero(mask)
  return dict(
    mask=mask,
    name=name,
    thing=bool(thing),
    crowd=bool(crowd),
    box=(ys.min(), xs.min(), ys.max() + 1, xs.max() + 1),
  )


def _rect(y0, y1, x0, x1, h=H, w=W):
  m = np.zeros([h, w], bool)
  m[y0:y1, x0:x1] = True
  return m


def _coco_bbox(mask):
  ys, xs = np.nonzero(mask)
  return [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]


def _panoptic_scene(i):
  """A stuff region, two thing instances of one class, a crowd region, void elsewhere."""
  return [
    ("stuff", _rect(0, 8, 0, W)),
    ("thing_a", _rect(10, 20, 2, 10 + i)),
    ("thing_b", _rect(10, 22, 14, 20)),
    ("crowd", _rect(12, 22, 24, 30)),
  ]


def _write_panoptic(json_path, png_dir, images, categories, scenes):
  """COCO panoptic JSON + RGB-id PNGs; scenes[k] = [(segment id, category id, mask, crowd)]."""
  os.makedirs(png_dir, exist_ok=True)
  anns = []
  for im, segs in zip(images, scenes):
    ids = np.zeros([im["height"], im["width"]], np.int64)
    info = []
    for seg_id, cat, mask, crowd in segs:
      ids[mask] = seg_id
      info.append(
        dict(
          id=int(seg_id),
          category_id=int(cat),
          iscrowd=int(crowd),
          bbox=_coco_bbox(mask),
          area=int(mask.sum()),
        )
      )
    png = os.path.splitext(os.path.basename(im["file_name"]))[0] + ".png"
    Image.fromarray(_ids_to_rgb(ids)).save(os.path.join(png_dir, png))
    anns.append(dict(image_id=im["id"], file_name=png, segments_info=info))
  with open(json_path, "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=categories), f)


def _tfds_mock_download(monkeypatch, paths):
  """TFDS DownloadManager.download_and_extract -> the given extracted folders (no network)."""

  def fake(self, url_or_urls):  # pylint: disable=unused-argument
    return {k: paths[os.path.basename(u)] for k, u in url_or_urls.items()}

  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", fake)


def write_registry_coco_panoptic(data_dir, monkeypatch, n=2, seed=10):
  """TFDS coco/2017_panoptic built from the real archives' layout (mocked download)."""
  rng = np.random.default_rng(seed)
  vocab = vocab_lib.load("coco_panoptic")
  categories = [
    dict(id=int(i), name=n_, isthing=int(t), supercategory="x")
    for i, n_, t in zip(vocab.original_ids, vocab.raw_names, vocab.is_thing)
  ]
  dl = os.path.join(data_dir, "_coco_archives")
  ann_dir = os.path.join(dl, "panoptic_annotations_trainval2017")
  os.makedirs(os.path.join(ann_dir, "annotations"), exist_ok=True)
  paths = {"panoptic_annotations_trainval2017.zip": ann_dir}
  expected = {}
  for split, folder in COCO_SPLIT.items():
    img_root = os.path.join(dl, folder)
    os.makedirs(os.path.join(img_root, folder))
    paths[folder + ".zip"] = img_root
    images, scenes = [], []
    for i in range(n):
      image_id = 1000 * (split == "validation") + 139 + i
      fname = f"{image_id:012d}.jpg"
      image = _rgb(rng)
      image = _save_image(image, os.path.join(img_root, folder, fname))
      images.append(dict(id=image_id, file_name=fname, height=H, width=W))
      # sky-other-merged (187, stuff), two persons (1), crowd of cars (3).
      cats = {
        "stuff": (187, "sky-other-merged", 0),
        "thing_a": (1, "person", 1),
        "thing_b": (1, "person", 1),
        "crowd": (3, "car", 1),
      }
      scene = _panoptic_scene(i)
      scenes.append(
        [
          (5 + 256 * k + 65536 * (k % 2), cats[kind][0], m, kind == "crowd")
          for k, (kind, m) in enumerate(scene)
        ]
      )
      expected[split, image_id] = dict(
        image=image,
        segs=[_seg(m, cats[kind][1], cats[kind][2], kind == "crowd") for kind, m in scene],
      )
    png_dir = os.path.join(dl, "_png", f"panoptic_{folder}")
    _write_panoptic(
      os.path.join(ann_dir, "annotations", f"panoptic_{folder}.json"),
      png_dir,
      images,
      categories,
      scenes,
    )
    # The PNGs travel as a nested zip inside the annotations archive, as in the real one.
    import zipfile  # pylint: disable=g-import-not-at-top

    with zipfile.ZipFile(os.path.join(ann_dir, "annotations", f"panoptic_{folder}.zip"), "w") as z:
      for f in sorted(os.listdir(png_dir)):
        z.write(os.path.join(png_dir, f), f"panoptic_{folder}/{f}")
  _tfds_mock_download(monkeypatch, paths)
  tfds.builder("coco/2017_panoptic", data_dir=data_dir).download_and_prepare(
    download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  return expected


def write_registry_coco_instance(data_dir, n=2, seed=11):
  """coco/annotations/instances_{train,val}2017.json (polygon, RLE, crowd) + images."""
  expected = {}
  vocab = vocab_lib.load("coco_panoptic")
  categories = [
    dict(id=int(i), name=n_, supercategory="x")
    for i, n_, t in zip(vocab.original_ids, vocab.raw_names, vocab.is_thing)
    if t
  ]
  for split, folder in COCO_SPLIT.items():
    root = os.path.join(data_dir, "coco")
    spec, exp = write_coco_instance(os.path.join(root, "_tmp"), n=n, seed=seed)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.replace(os.path.join(root, "_tmp", "images"), os.path.join(root, folder))
    with open(spec["json"]) as f:
      data = json.load(f)
    data["categories"] = categories  # fixture ids 1 = person, 3 = car, as in COCO.
    with open(os.path.join(root, "annotations", f"instances_{folder}.json"), "w") as f:
      json.dump(data, f)
    for image_id, want in exp.items():
      names = {0: "person", 1: "car"}
      expected[split, image_id] = dict(
        image=want["image"],
        order=True,
        segs=[
          dict(
            mask=want["segment_map"] == k,
            name=names[int(c)],
            thing=True,
            crowd=bool(cr),
            box=tuple(b),
          )
          for k, (c, cr, b) in enumerate(
            zip(want["seg_class"], want["seg_is_crowd"], want["seg_box"])
          )
        ],
      )
  return expected


def write_registry_ade20k(data_dir, n=2, seed=12):
  """ADEChallengeData2016/images/{training,validation}/*.jpg + annotations/*/*.png."""
  expected = {}
  for split, (short, folder) in ADE_SPLIT.items():
    rng = np.random.default_rng(seed)
    root = os.path.join(data_dir, "ADEChallengeData2016")
    img_dir = os.path.join(root, "images", folder)
    ann_dir = os.path.join(root, "annotations", folder)
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)
    for i in range(n):
      stem = f"ADE_{short}_{i + 1:08d}"
      image = _rgb(rng)
      image = _save_image(image, os.path.join(img_dir, stem + ".jpg"))
      values = np.zeros([H, W], np.uint8)  # 0: void
      values[:10] = 3  # sky
      values[10:, :16] = 13 + i  # person / earth, ground
      values[14:, 20:] = 150  # flag
      Image.fromarray(values).save(os.path.join(ann_dir, stem + ".png"))
      expected[split, i + 1] = dict(
        image=image,
        segs=[
          _seg(values == v, ADE_NAMES[v], v in ADE_THING_IDS)
          for v in sorted(set(np.unique(values)) - {0})
        ],
      )
  return expected


def write_registry_ade20k_panoptic(data_dir, n=2, seed=13, mask2former_categories=True):
  """Mask2Former's prepare_ade20k_pan_seg.py output: ade20k_panoptic_{train,val}.json
  (categories 0..149, string image ids) + ade20k_panoptic_{train,val}/*.png."""
  vocab = vocab_lib.load("ade20k")
  # Mask2Former writes every class with id = objectInfo150 index - 1 and its isthing.
  categories = [
    dict(
      id=int(i) - 1,
      name=n_ + (" " if n_ == "window" else ""),
      isthing=int(int(i) in ADE_THING_IDS),
      color=[0, 0, 0],
    )
    for i, n_ in zip(vocab.original_ids, vocab.raw_names)
  ]
  expected = {}
  for split, (short, folder) in ADE_SPLIT.items():
    rng = np.random.default_rng(seed)
    root = os.path.join(data_dir, "ADEChallengeData2016")
    img_dir = os.path.join(root, "images", folder)
    os.makedirs(img_dir, exist_ok=True)
    images, scenes = [], []
    for i in range(n):
      stem = f"ADE_{short}_{i + 1:08d}"
      image = _rgb(rng)
      image = _save_image(image, os.path.join(img_dir, stem + ".jpg"))
      images.append(dict(id=stem, file_name=stem + ".jpg", height=H, width=W))
      # wall (1, stuff), two persons (13), a car (21); no crowd in ADE panoptic.
      objs = {"stuff": 1, "thing_a": 13, "thing_b": 13, "crowd": 21}
      scene = _panoptic_scene(i)
      scenes.append(
        [
          (objs[kind] + 256 * (k + 1), objs[kind] - 1, m, False)
          for k, (kind, m) in enumerate(scene)
        ]
      )
      expected[split, i] = dict(
        image=image,
        segs=[_seg(m, ADE_NAMES[objs[kind]], objs[kind] in ADE_THING_IDS) for kind, m in scene],
      )
    _write_panoptic(
      os.path.join(root, f"ade20k_panoptic_{short}.json"),
      os.path.join(root, f"ade20k_panoptic_{short}"),
      images,
      categories if mask2former_categories else [],
      scenes,
    )
  return expected


def write_registry_objects365(data_dir, n=3, seed=14):
  """Objects365 v2 raw files -> this repo's TFDS builder -> data_dir/objects365."""
  from input_pipeline.readers import objects365_builder  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  raw = os.path.join(data_dir, "_objects365_raw")
  vocab = vocab_lib.load("objects365")
  cats = [dict(id=int(i), name=n_) for i, n_ in zip(vocab.original_ids, vocab.raw_names)]
  expected = {}
  for split, (folder, json_name) in objects365_builder.SPLITS.items():
    sub = "images/v1/patch0" if folder == "val" else "patch0"
    os.makedirs(os.path.join(raw, folder, sub))
    images, anns = [], []
    for i in range(n):
      image_id = 10 + i + 100 * (folder == "val")
      name = f"objects365_v1_{image_id:08d}.jpg"
      image = _rgb(rng)
      image = _save_image(image, os.path.join(raw, folder, sub, name))
      images.append(dict(id=image_id, file_name=f"images/v1/patch0/{name}", height=H, width=W))
      # Category 1 = Person, 3 = Chair; COCO boxes [x, y, w, h].
      boxes = [(1, [4, 2, 8, 10], 0), (3, [20, 6, 10, 14], 1)]
      for k, (cat, box, crowd) in enumerate(boxes):
        anns.append(
          dict(
            id=10 * image_id + k,
            image_id=image_id,
            category_id=cat,
            bbox=box,
            iscrowd=crowd,
            area=float(box[2] * box[3]),
          )
        )
      expected[split, image_id] = dict(
        image=image,
        boxes_only=True,
        segs=[
          dict(
            name={1: "Person", 3: "Chair"}[c],
            thing=True,
            crowd=bool(cr),
            box=(b[1], b[0], b[1] + b[3], b[0] + b[2]),
          )
          for c, b, cr in boxes
        ],
      )
    with open(os.path.join(raw, folder, json_name), "w") as f:
      json.dump(dict(images=images, annotations=anns, categories=cats), f)
  objects365_builder.Objects365(data_dir=data_dir).download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=raw)
  )
  return expected


def write_registry_objects365_masks(data_dir, seed=15):
  """objects365/o365_instance_seg_val.json (polygons) + objects365/val/images/v1/patchN."""
  rng = np.random.default_rng(seed)
  root = os.path.join(data_dir, "objects365")
  patch = os.path.join(root, "val", "images", "v2", "patch16")
  os.makedirs(patch, exist_ok=True)
  vocab = vocab_lib.load("objects365")
  cats = [dict(id=int(i), name=n_) for i, n_ in zip(vocab.original_ids, vocab.raw_names)]
  image = _rgb(rng)
  name = "objects365_v2_00900001.jpg"
  image = _save_image(image, os.path.join(patch, name))
  a, b = _rect(2, 12, 2, 14), _rect(14, 22, 16, 30)
  anns = [
    dict(
      id=1,
      image_id=900001,
      category_id=1,
      iscrowd=0,
      bbox=_coco_bbox(a),
      area=float(a.sum()),
      segmentation=[[2, 2, 14, 2, 14, 12, 2, 12]],
    ),
    dict(
      id=2,
      image_id=900001,
      category_id=3,
      iscrowd=0,
      bbox=_coco_bbox(b),
      area=float(b.sum()),
      segmentation=[[16, 14, 30, 14, 30, 22, 16, 22]],
    ),
  ]
  with open(os.path.join(root, "o365_instance_seg_val.json"), "w") as f:
    json.dump(
      dict(
        images=[dict(id=900001, file_name=f"images/v2/patch16/{name}", height=H, width=W)],
        annotations=anns,
        categories=cats,
      ),
      f,
    )
  return {
    ("validation", 900001): dict(
      image=image, segs=[_seg(a, "Person", True), _seg(b, "Chair", True)]
    )
  }


def write_registry_cityscapes(data_dir, seed=16):
  """gtFine/val/<city>/*_instanceIds.png -> cityscapesScripts createPanopticImgs -> JSON."""
  convert = pytest.importorskip("cityscapesscripts.preparation.createPanopticImgs")
  rng = np.random.default_rng(seed)
  root = os.path.join(data_dir, "cityscapes")
  expected = {}
  stems = ["frankfurt_000000_000294", "lindau_000001_000019"]
  for position, stem in enumerate(sorted(stems)):
    city = stem.split("_")[0]
    gt, img = (os.path.join(root, d, "val", city) for d in ("gtFine", "leftImg8bit"))
    os.makedirs(gt, exist_ok=True)
    os.makedirs(img, exist_ok=True)
    image = _rgb(rng)
    Image.fromarray(image).save(os.path.join(img, stem + "_leftImg8bit.png"))
    # labelIds: 7 road, 23 sky, 1 ego vehicle (ignored in eval: void); instances
    # labelId * 1000 + k: 24 person; a car region without instance id (26): crowd.
    ids = np.full([H, W], 7, np.uint16)
    ids[:6] = 23
    ids[20:] = 1
    ids[8:18, 2:10] = 24000
    ids[8:18, 12:18] = 24001 + position
    ids[8:16, 22:30] = 26
    Image.fromarray(ids).save(os.path.join(gt, stem + "_gtFine_instanceIds.png"))
    expected["validation", position] = dict(
      image=image,
      segs=[
        _seg(ids == 7, "road", False),
        _seg(ids == 23, "sky", False),
        _seg(ids == 24000, "person", True),
        _seg(ids == 24001 + position, "person", True),
        _seg(ids == 26, "car", True, crowd=True),
      ],
    )
  convert.convert2panoptic(
    os.path.join(root, "gtFine"), os.path.join(root, "gtFine"), setNames=["val"]
  )
  return expected


def write_registry_pascal_context(data_dir, seed=17):
  """VOCdevkit/VOC2010: JPEGImages, trainval/*.mat (LabelMap, 459-class ids), Main/val.txt."""
  rng = np.random.default_rng(seed)
  root = os.path.join(data_dir, "VOCdevkit", "VOC2010")
  for d in ("JPEGImages", "trainval", "ImageSets/Main"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  expected = {}
  # labels.txt of PASCAL-Context: 2 aeroplane, 9 bag; 0 unlabelled; 400 is outside the 59.
  # Things: the 20 PASCAL VOC classes (aeroplane yes, bag no).
  stems = ["2008_000002", "2008_000003", "2008_000007"]
  for k, stem in enumerate(stems):
    image = _rgb(rng)
    image = _save_image(image, os.path.join(root, "JPEGImages", stem + ".jpg"))
    labels = np.zeros([H, W], np.uint16)
    labels[:12] = 2
    labels[12:, : 8 + k] = 9
    labels[12:, 20:] = 400
    scipy.io.savemat(os.path.join(root, "trainval", stem + ".mat"), {"LabelMap": labels})
    if k < 2:  # the val list holds the first two only.
      expected["validation", int(stem.split("_")[1])] = dict(
        image=image, segs=[_seg(labels == 2, "aeroplane", True), _seg(labels == 9, "bag", False)]
      )
  with open(os.path.join(root, "ImageSets", "Main", "val.txt"), "w") as f:
    f.write("\n".join(stems[:2]) + "\n")
  with open(os.path.join(root, "ImageSets", "Main", "train.txt"), "w") as f:
    f.write(stems[2] + "\n")
  return expected


REGISTRY_WRITERS = {
  "coco_panoptic": write_registry_coco_panoptic,
  "coco_instance": write_registry_coco_instance,
  "ade20k": write_registry_ade20k,
  "ade20k_panoptic": write_registry_ade20k_panoptic,
  "objects365": write_registry_objects365,
  "objects365_masks": write_registry_objects365_masks,
  "cityscapes": write_registry_cityscapes,
  "pascal_context": write_registry_pascal_context,
}


def read_registry(name, split, data_dir):
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top

  ds, vocab = readers.build_reader(datasets.reader_spec(name, split, data_dir), on_bad_input="fail")
  return _collect(ds), vocab


def assert_registry_example(got, want, vocab):
  """The reader's example against the fixture's own segments (order-free for masks)."""
  image = got["image"]
  assert image.dtype == np.uint8 and image.shape == want["image"].shape
  # JPEG decoders (PIL, TF) may differ by rounding: compare as images, not bytes.
  assert np.abs(image.astype(int) - want["image"].astype(int)).mean() < 2.0
  segs = want["segs"]
  assert len(got["seg_class"]) == len(segs)
  seg_map = got["segment_map"]
  if want.get("boxes_only"):
    assert np.all(seg_map == -1)
    rows = range(len(segs))
  else:
    rows = []
    for s in segs:
      k = np.unique(seg_map[s["mask"]])
      assert len(k) == 1 and k[0] >= 0, (s["name"], k)
      np.testing.assert_array_equal(seg_map == k[0], s["mask"])
      rows.append(int(k[0]))
    union = np.any([s["mask"] for s in segs], axis=0)
    assert np.all(seg_map[~union] == -1)  # void stays void.
  for k, s in zip(rows, segs):
    assert vocab.raw_names[got["seg_class"][k]].strip() == s["name"], s["name"]
    assert bool(got["seg_is_thing"][k]) == s["thing"], s["name"]
    assert bool(got["seg_is_crowd"][k]) == s["crowd"], s["name"]
    np.testing.assert_allclose(got["seg_box"][k], s["box"], atol=1e-3)


def test_registry_fixtures_cover_every_file_entry():
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top

  file_entries = {
    n for n, info in datasets.DATASETS.items() if info["source"] == "reader" and info.get("reader")
  }
  assert file_entries == set(REGISTRY_WRITERS)


@pytest.mark.parametrize("name", sorted(REGISTRY_WRITERS))
def test_registry_default_layout(name, tmp_path, monkeypatch):
  data_dir = str(tmp_path / "data")
  os.makedirs(data_dir)
  writer = REGISTRY_WRITERS[name]
  kwargs = dict(monkeypatch=monkeypatch) if name == "coco_panoptic" else {}
  expected = writer(data_dir, **kwargs)
  for split in sorted({s for s, _ in expected}):
    got, vocab = read_registry(name, split, data_dir)
    want = {i: e for (s, i), e in expected.items() if s == split}
    assert sorted(got) == sorted(want), (split, sorted(got))
    for image_id, w in want.items():
      assert_registry_example(got[image_id], w, vocab)


def test_ade20k_panoptic_category_check_names_the_id(tmp_path):
  """A conversion whose ids are not objectInfo150 - 1 is refused, naming the category."""
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path)
  write_registry_ade20k_panoptic(data_dir, n=1)
  spec = datasets.reader_spec("ade20k_panoptic", "validation", data_dir)
  with pytest.raises(
    ValueError,
    match=r"ade20k_panoptic_val\.json: categories: id 0 is "
    r"'wall', but id 2 .* is 'building'",
  ):
    readers.build_reader(dict(spec, category_id_offset=2))


def test_reader_spec_overrides_root_and_splits():
  from input_pipeline import datasets  # pylint: disable=g-import-not-at-top

  spec = datasets.reader_spec("cityscapes", "train", "/data")
  assert spec["json"] == "/data/cityscapes/gtFine/cityscapes_panoptic_train.json"
  assert spec["image_dir"] == "/data/cityscapes/leftImg8bit/train"
  # `root` moves every default path; a field given by the config is used as given.
  spec = datasets.reader_spec(
    "ade20k", "validation", "/data", dict(root="/elsewhere/ADE", mask_dir="labels")
  )
  assert spec["image_dir"] == "/elsewhere/ADE/images/validation"
  assert spec["mask_dir"] == "labels"
  assert spec["vocab"] == "ade20k" and spec["name"] == "ade20k"
  assert datasets.reader_spec("coco_panoptic", "train", "gs://b/tfds")["data_dir"] == (
    "gs://b/tfds"
  )
  with pytest.raises(ValueError, match="no split 'test'.*allowed: train, validation"):
    datasets.reader_spec("ade20k_panoptic", "test", "/data")
