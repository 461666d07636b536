"""COCO-format readers: panoptic (PNG + JSON), instance (polygon / RLE), detection (boxes).

Used for a user's own data and for the raw-file datasets in COCO format:
  - COCO panoptic / instances / detection 2017 JSONs;
  - Cityscapes panoptic (`gtFine/cityscapes_panoptic_{split}.json` + PNG folder made by
    cityscapesScripts `createPanopticImgs`; images are found in city sub-folders, by
    image id + 'image_id_suffix' '_leftImg8bit.png': the JSON's file_name,
    '<id>_gtFine_leftImg8bit.png', names no file; detectron2 matches by id too);
  - Objects365 v2 raw `zhiyuan_objv2_{split}.json` (boxes) and the instance-mask
    benchmark `o365_instance_seg_val.json` (instance).

Also ADE20k panoptic as Mask2Former's `datasets/prepare_ade20k_pan_seg.py` writes it
(`ADEChallengeData2016/ade20k_panoptic_{train,val}.json` + PNG folders, string image ids,
category ids 0..149 = objectInfo150 index - 1: 'category_id_offset': 1).

Spec keys: 'json', 'image_dir', 'mask_dir' (panoptic PNGs; default: the JSON path
without '.json'), 'vocab' (optional packaged vocabulary; category ids are mapped into it
by original id), 'keep_empty' (keep images without segments; evaluation sets),
'image_id_suffix' (look for `<image id><suffix>` when `file_name` is not
found), 'category_id_offset' (added to every JSON category id before the vocabulary lookup),
'check_categories' (the JSON's `categories` must agree with the vocabulary on the name
and `isthing` of every id they share, else ValueError naming the id: catches a file
whose ids mean other classes, e.g. a wrong offset).

Conventions:
  - panoptic PNG ids are `R + 256 G + 256^2 B`; id 0 is void;
  - instance masks are rasterised with pycocotools in annotation-file order; where
    instances overlap, the later one wins in `segment_map` (dataseg/schema.py);
  - crowd annotations (`iscrowd=1`) are kept as crowd segments (ignore regions);
  - `image_id` is the JSON id, or the image's position in the sorted image list when
    the id is not an integer (Cityscapes uses strings).
Bad input follows input_pipeline/bad_input.py.
"""

import json
import os
from typing import Any, Mapping

import numpy as np
from pycocotools import mask as mask_utils

from input_pipeline import readers
from input_pipeline.bad_input import BadInputCounter


class ImageFinder:
  """Resolves a JSON `file_name` against `image_dir`.

  Tries `image_dir/file_name`, then the last two path components (Objects365's
  `images/v1/patchN/x.jpg` vs on-disk `patchN/x.jpg`), then the base name anywhere
  below `image_dir` (Cityscapes' city sub-folders; indexed once, lazily).
  """

  def __init__(self, image_dir: str):
    self.image_dir = image_dir
    self._index = None

  def __call__(self, file_name: str):
    for candidate in (
      file_name,
      os.path.join(*file_name.split("/")[-2:]),
      os.path.basename(file_name),
    ):
      path = os.path.join(self.image_dir, candidate)
      if os.path.isfile(path):
        return path
    if self._index is None:
      self._index = {}
      for root, _, files in os.walk(self.image_dir):
        for f in files:
          self._index.setdefault(f, os.path.join(root, f))
    return self._index.get(os.path.basename(file_name))


def _int_id(raw, position):
  try:
    return int(raw)
  except (TypeError, ValueError):
    return position


def _category_map(vocab):
  return {int(k): int(v) for k, v in vocab.id_to_contiguous.items()}


def _records(spec, fmt, counter: BadInputCounter):
  """Parses the JSON into sorted per-image records; index-time bad input checks."""
  with open(spec["json"]) as f:
    data = json.load(f)
  vocab = readers.vocab_from(
    spec, data.get("categories"), default_name=os.path.basename(spec["json"])
  )
  cat_map = _category_map(vocab)
  offset = int(spec.get("category_id_offset", 0))
  if spec.get("check_categories") and spec.get("vocab"):
    check_categories(data.get("categories") or [], vocab, offset, spec["json"])
  finder = ImageFinder(spec["image_dir"])
  mask_dir = spec.get("mask_dir") or os.path.splitext(spec["json"])[0]
  keep_empty = bool(spec.get("keep_empty", False))
  images = sorted(data["images"], key=lambda im: (_int_id(im["id"], -1), str(im["id"])))
  by_image = {}
  for ann in data.get("annotations", []):
    by_image.setdefault(ann["image_id"], []).append(ann)

  records = []
  for position, im in enumerate(images):
    image_id = _int_id(im["id"], position)
    path = finder(im["file_name"])
    if path is None and spec.get("image_id_suffix"):
      path = finder(f"{im['id']}{spec['image_id_suffix']}")
    if path is None:
      counter.report(
        "missing_file",
        image_id=image_id,
        file=im["file_name"],
        field="images.file_name",
        reason=f"image file not found under {spec['image_dir']}",
      )
      continue
    anns = by_image.get(im["id"], [])
    rec = dict(
      image_id=image_id, path=path, height=int(im["height"]), width=int(im["width"]), segments=[]
    )
    if fmt == "coco_panoptic":
      if len(anns) != 1:
        counter.report(
          "missing_file",
          image_id=image_id,
          file=spec["json"],
          field="annotations",
          reason=f"{len(anns)} panoptic annotations for this image (expected 1)",
        )
        continue
      rec["mask_path"] = os.path.join(mask_dir, anns[0]["file_name"])
      if not os.path.isfile(rec["mask_path"]):
        counter.report(
          "missing_file",
          image_id=image_id,
          file=rec["mask_path"],
          field="annotations.file_name",
          reason="panoptic PNG not found",
        )
        continue
      anns = anns[0]["segments_info"]
    bad = False
    for ann in anns:
      if int(ann["category_id"]) + offset not in cat_map:
        counter.report(
          "unknown_category",
          image_id=image_id,
          file=spec["json"],
          field="category_id",
          reason=f"category id {ann['category_id']} "
          f"(+ offset {offset}) is not in vocabulary {vocab.name!r}",
        )
        bad = True
        break
      box, usable = readers.box_xywh_to_yxyx(
        ann.get("bbox", [0, 0, 0, 0]), rec["height"], rec["width"]
      )
      if fmt != "coco_panoptic" and not usable:
        counter.report(
          "bad_box",
          image_id=image_id,
          file=spec["json"],
          field="bbox",
          reason=f"annotation {ann.get('id')}: box {ann.get('bbox')} has "
          "zero area or lies outside the image; annotation dropped",
        )
        continue
      if fmt == "coco_instance" and not ann.get("segmentation"):
        counter.report(
          "bad_box",
          image_id=image_id,
          file=spec["json"],
          field="segmentation",
          reason=f"annotation {ann.get('id')} has no mask in an instance file; annotation dropped",
        )
        continue
      contiguous = cat_map[int(ann["category_id"]) + offset]
      rec["segments"].append(
        dict(
          id=int(ann.get("id", 0)),
          cls=contiguous,
          box=box,
          is_thing=bool(vocab.is_thing[contiguous]),
          is_crowd=bool(ann.get("iscrowd", 0)),
          segmentation=ann.get("segmentation"),
        )
      )
    if bad:
      continue
    if not rec["segments"] and not keep_empty:
      counter.report(
        "no_annotations",
        image_id=image_id,
        file=path,
        field="annotations",
        reason="image has no segments",
      )
      continue
    records.append(rec)
  return records, vocab


def _norm(name):
  return " ".join(str(name).lower().split())


def check_categories(categories, vocab, offset, path):
  """Raises ValueError unless `categories` agree with `vocab` on shared ids."""
  index = {int(i): k for k, i in enumerate(vocab.original_ids)}
  for c in categories:
    k = index.get(int(c["id"]) + offset)
    if k is None:
      continue
    if _norm(c.get("name", "")) != _norm(vocab.raw_names[k]):
      raise ValueError(
        f"{path}: categories: id {c['id']} is {c.get('name')!r}, but id "
        f"{int(c['id']) + offset} of vocabulary {vocab.name!r} is "
        f"{vocab.raw_names[k]!r} (category_id_offset={offset})"
      )
    if "isthing" in c and bool(c["isthing"]) != bool(vocab.is_thing[k]):
      raise ValueError(
        f"{path}: categories: id {c['id']} ({c.get('name')!r}) has "
        f"isthing={c['isthing']}, vocabulary {vocab.name!r} says "
        f"{int(vocab.is_thing[k])}"
      )


def _table(rec):
  segs = rec["segments"]
  return dict(
    seg_class=np.array([s["cls"] for s in segs], np.int32),
    seg_box=np.array([s["box"] for s in segs], np.float32).reshape(-1, 4),
    seg_is_thing=np.array([s["is_thing"] for s in segs], bool),
    seg_is_crowd=np.array([s["is_crowd"] for s in segs], bool),
    image_id=np.int64(rec["image_id"]),
  )


def _load_image(rec, counter):
  image = readers.load_or_report(readers.load_rgb, rec["path"], counter, rec["image_id"], "image")
  if image is None:
    return None
  if image.shape[:2] != (rec["height"], rec["width"]):
    counter.report(
      "corrupt_image",
      image_id=rec["image_id"],
      file=rec["path"],
      field="images.height/width",
      reason=f"decoded size {image.shape[:2]} "
      f"differs from the JSON's {(rec['height'], rec['width'])}",
    )
    return None
  return image


def panoptic_map(rgb: np.ndarray, segment_ids: np.ndarray):
  """RGB-encoded panoptic PNG `[h, w, 3]` -> (row-index map `[h, w]`, unknown ids).

  Row k of the segment table has id `segment_ids[k]`; id 0 is void (-1).
  """
  rgb = rgb.astype(np.int64)
  ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
  order = np.argsort(segment_ids, kind="stable")
  sorted_ids = np.asarray(segment_ids, np.int64)[order]
  pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
  found = (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(ids.shape, bool)
  seg_map = np.where(found, order[pos] if len(order) else 0, -1).astype(np.int32)
  unknown = np.unique(ids[~found & (ids != 0)])
  return seg_map, unknown


def _loader(fmt, counter):
  """Record -> decoded numpy example, or None (reported to `counter`)."""

  def load(rec):
    image = _load_image(rec, counter)
    if image is None:
      return None
    h, w = image.shape[:2]
    example = _table(rec)
    if fmt == "coco_panoptic":
      rgb = readers.load_or_report(
        readers.load_label_png, rec["mask_path"], counter, rec["image_id"], "panoptic PNG"
      )
      if rgb is None:
        return None
      if rgb.ndim != 3 or rgb.shape[:2] != (h, w):
        counter.report(
          "corrupt_image",
          image_id=rec["image_id"],
          file=rec["mask_path"],
          field="panoptic PNG",
          reason=f"shape {rgb.shape}, expected ({h}, {w}, 3)",
        )
        return None
      seg_map, unknown = panoptic_map(
        rgb[..., :3], np.array([s["id"] for s in rec["segments"]], np.int64)
      )
      if unknown.size:
        counter.report(
          "unannotated_segment",
          image_id=rec["image_id"],
          file=rec["mask_path"],
          field="segments_info",
          reason=f"PNG segment ids {unknown[:10].tolist()} have no entry",
        )
        return None
    elif fmt == "coco_instance":
      seg_map = -np.ones([h, w], np.int32)
      for k, s in enumerate(rec["segments"]):
        seg = s["segmentation"]
        if isinstance(seg, list):
          rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
        elif isinstance(seg["counts"], list):
          rle = mask_utils.frPyObjects(seg, h, w)
        else:
          rle = seg
        seg_map[mask_utils.decode(rle).astype(bool)] = k  # Later wins.
    else:
      seg_map = -np.ones([h, w], np.int32)
    example.update(image=image, segment_map=seg_map)
    return example

  return load


def read(spec: Mapping[str, Any], *, shard_index=0, shard_count=1, counter=None):
  """COCO-format spec -> (tf.data.Dataset of decoded examples, Vocabulary)."""
  fmt = spec["format"]
  counter = counter or BadInputCounter(spec.get("on_bad_input", "skip"), fmt)
  records, vocab = _records(spec, fmt, counter)
  ds = readers.records_dataset(
    records, _loader(fmt, counter), counter, shard_index=shard_index, shard_count=shard_count
  )
  return ds, vocab
