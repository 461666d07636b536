"""Predictions and ground truth in the standard file formats, and readers for them.

Formats (the ones other systems and the official scorers use):
  * COCO panoptic: one RGB PNG per image, segment id = R + 256 G + 256^2 B (0 = void), plus
    a JSON {'annotations': [{'image_id', 'file_name', 'segments_info': [{'id',
    'category_id', 'iscrowd', 'area', 'bbox'}]}], 'categories': [...]}.
  * COCO results: a JSON list of {'image_id', 'category_id', 'score', 'segmentation'
    (RLE, counts as str), 'bbox' [x, y, w, h]}.
  * Semantic: one single-channel PNG of class ids per image (uint8, 255 = ignore; 16-bit
    when there are more than 255 classes).

In memory everything is the evaluators' format: segment maps with -1 for void and
contiguous class ids 0..K-1; `category_ids[c]` maps class c to the dataset's id in files.
"""

import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

# ----------------------------------------------------------------------------- categories


def make_categories(
  class_names: Sequence[str],
  is_thing: Sequence[bool] | None = None,
  category_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
  """COCO-style category list; ids default to 1..K (0 is void in panoptic PNGs)."""
  ids = range(1, len(class_names) + 1) if category_ids is None else category_ids
  things = [True] * len(class_names) if is_thing is None else is_thing
  return [
    {"id": int(i), "name": n, "isthing": int(bool(t))} for i, n, t in zip(ids, class_names, things)
  ]


def category_index(categories: Sequence[Mapping[str, Any]]) -> dict[int, int]:
  """Dataset category id -> contiguous class id (position in the category list)."""
  return {int(c["id"]): i for i, c in enumerate(categories)}


# ----------------------------------------------------------------------------- panoptic


def id2rgb(ids: np.ndarray) -> np.ndarray:
  """int [h, w] segment ids (< 2^24) -> uint8 [h, w, 3]."""
  ids = np.asarray(ids, np.uint32)
  return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], -1).astype(np.uint8)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
  """uint8 [h, w, 3] -> int32 [h, w] segment ids."""
  rgb = np.asarray(rgb)
  return (
    rgb[..., 0].astype(np.int32)
    | (rgb[..., 1].astype(np.int32) << 8)
    | (rgb[..., 2].astype(np.int32) << 16)
  )


def _bbox_xywh(mask_rows: np.ndarray, mask_cols: np.ndarray) -> list[float]:
  if not mask_rows.any():
    return [0.0, 0.0, 0.0, 0.0]
  y0, y1 = np.nonzero(mask_rows)[0][[0, -1]]
  x0, x1 = np.nonzero(mask_cols)[0][[0, -1]]
  return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def panoptic_annotation(
  image_id: int,
  segment_map: np.ndarray,
  seg_class: np.ndarray,
  seg_is_crowd: np.ndarray | None,
  categories: Sequence[Mapping],
  *,
  keep_empty: bool,
  file_name: str | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
  """COCO panoptic annotation and id map (uint32 [h, w]) of one image.

  Segment k gets id k + 1. `keep_empty`: keep segments that cover no pixel. Ground truth
  keeps them (they are false negatives in pq_compute), predictions must drop them (the
  official scorer rejects JSON segments absent from the PNG). Rows with class -1 (schema
  padding) are always dropped.
  """
  segment_map = np.asarray(segment_map)
  seg_class = np.asarray(seg_class).reshape(-1)
  crowd = (
    np.zeros(seg_class.shape, bool)
    if seg_is_crowd is None
    else np.asarray(seg_is_crowd, bool).reshape(-1)
  )
  n = seg_class.size
  area = np.bincount((segment_map.ravel() + 1), minlength=n + 1)[1 : n + 1]
  ids = np.where(segment_map >= 0, segment_map + 1, 0).astype(np.uint32)
  segments = []
  for k in range(n):
    if seg_class[k] < 0 or (area[k] == 0 and not keep_empty):
      if area[k]:
        ids[segment_map == k] = 0
      continue
    mask = segment_map == k if area[k] else np.zeros((1, 1), bool)
    segments.append(
      {
        "id": k + 1,
        "category_id": int(categories[int(seg_class[k])]["id"]),
        "iscrowd": int(crowd[k]),
        "area": int(area[k]),
        "bbox": _bbox_xywh(mask.any(1), mask.any(0)),
      }
    )
  ann = {
    "image_id": _json_id(image_id),
    "file_name": file_name or f"{image_id}.png",
    "segments_info": segments,
  }
  return ann, ids


def _json_id(image_id):
  return image_id.item() if isinstance(image_id, np.generic) else image_id


def write_coco_panoptic(
  json_path: str,
  png_dir: str,
  records: Sequence[Mapping[str, Any]],
  categories: Sequence[Mapping[str, Any]],
  *,
  is_gt: bool,
  images: Sequence[Mapping[str, Any]] | None = None,
) -> None:
  """Writes records {'image_id', 'segment_map', 'seg_class'[, 'seg_is_crowd']} as COCO panoptic."""
  os.makedirs(png_dir, exist_ok=True)
  annotations = []
  for r in records:
    ann, ids = panoptic_annotation(
      r["image_id"],
      r["segment_map"],
      r["seg_class"],
      r.get("seg_is_crowd"),
      categories,
      keep_empty=is_gt,
      file_name=r.get("file_name"),
    )
    Image.fromarray(id2rgb(ids)).save(os.path.join(png_dir, ann["file_name"]))
    annotations.append(ann)
  if images is None:
    images = [
      {
        "id": _json_id(r["image_id"]),
        "height": int(np.shape(r["segment_map"])[0]),
        "width": int(np.shape(r["segment_map"])[1]),
        "file_name": a["file_name"].rsplit(".", 1)[0] + ".jpg",
      }
      for r, a in zip(records, annotations)
    ]
  with open(json_path, "w") as f:
    json.dump(
      {"images": list(images), "annotations": annotations, "categories": list(categories)}, f
    )


def decode_panoptic_png(path: str) -> np.ndarray:
  """COCO panoptic PNG -> segment ids uint32 [h, w] (R + 256 G + 256^2 B)."""
  with Image.open(path) as im:
    rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
  return rgb_to_id_fast(rgb)


def rgb_to_id_fast(rgb: np.ndarray) -> np.ndarray:
  """uint8 [h, w, 3] -> uint32 [h, w], 20x faster than three shifts and ors.

  Reads each pixel's 3 bytes plus the next byte as one unaligned little-endian uint32
  (stride 3 bytes over a copy with one spare byte at the end) and masks off the 4th byte.
  """
  h, w, _ = rgb.shape
  buf = np.empty(h * w * 3 + 1, np.uint8)
  buf[:-1] = np.asarray(rgb, np.uint8).reshape(-1)
  words = np.ndarray((h, w), "<u4", buffer=buf, strides=(3 * w, 3))
  return words & np.uint32(0xFFFFFF)


class _IdTable:
  """Reusable id -> row table over all 2^24 ids (64 MiB): a gather instead of a sort.

  Only the entries of the current image are set and reset, so a lookup costs O(pixels)
  with no per-image allocation of the table. Not thread-safe (one per thread).
  """

  UNKNOWN = np.int32(-2)

  def __init__(self):
    self._table = None

  def rows(self, ids: np.ndarray, seg_ids: np.ndarray, path: str) -> np.ndarray:
    if seg_ids.size and seg_ids.max() >= 2**24:
      return _rows_by_search(ids, seg_ids, path)
    if self._table is None:
      self._table = np.full(2**24, self.UNKNOWN, np.int32)
      self._table[0] = -1  # void
    t = self._table
    t[seg_ids] = np.arange(seg_ids.size, dtype=np.int32)
    t[0] = -1
    try:
      rows = t[ids]
      if rows.min(initial=0) == self.UNKNOWN:
        bad = np.unique(ids[rows == self.UNKNOWN])[:5]
        raise ValueError(f"{path}: segment ids {bad.tolist()} are in the PNG, not in the JSON")
    finally:
      t[seg_ids] = self.UNKNOWN
      t[0] = -1
    return rows


def _rows_by_search(ids, seg_ids, path):
  order = np.argsort(seg_ids, kind="stable")
  keys = np.concatenate([[0], seg_ids[order]])
  rows = np.concatenate([[-1], order]).astype(np.int32)
  pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
  if not np.array_equal(keys[pos], ids):
    bad = np.unique(ids[keys[pos] != ids])[:5]
    raise ValueError(f"{path}: segment ids {bad.tolist()} are in the PNG, not in the JSON")
  return rows[pos]


_ID_TABLE = _IdTable()


def segments_table(
  segments_info: Sequence[Mapping[str, Any]], cat_index: Mapping[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """segments_info -> (ids int64 [n], contiguous classes int32 [n], is_crowd bool [n])."""
  ids = np.array([int(s["id"]) for s in segments_info], np.int64).reshape(-1)
  classes = np.array([cat_index[int(s["category_id"])] for s in segments_info], np.int32).reshape(
    -1
  )
  crowd = np.array([bool(s.get("iscrowd", 0)) for s in segments_info], bool).reshape(-1)
  return ids, classes, crowd


def panoptic_from_ids(
  ids: np.ndarray,
  segments_info: Sequence[Mapping[str, Any]],
  cat_index: Mapping[int, int],
  path: str = "",
) -> dict[str, np.ndarray]:
  """Segment ids [h, w] (0 = void) + segments_info -> evaluator dict (rows in JSON order)."""
  seg_ids, classes, crowd = segments_table(segments_info, cat_index)
  if seg_ids.size and seg_ids.min() <= 0:
    raise ValueError(f"{path}: segment id 0 is void and cannot be listed")
  return {
    "segment_map": _ID_TABLE.rows(ids, seg_ids, path),
    "seg_class": classes,
    "seg_is_crowd": crowd,
  }


def read_panoptic_png(
  path: str, segments_info: Sequence[Mapping[str, Any]], cat_index: Mapping[int, int]
) -> dict[str, np.ndarray]:
  """One COCO panoptic PNG + its segments_info -> evaluator dict.

  Returns {'segment_map' int32 [h, w] (-1 void), 'seg_class' int32 [n], 'seg_is_crowd' [n]}
  with rows in segments_info order. Raises on PNG ids missing from segments_info.
  """
  return panoptic_from_ids(decode_panoptic_png(path), segments_info, cat_index, path)


def iter_coco_panoptic_pairs(
  gt_json: str, gt_dir: str, pred_json: str, pred_dir: str, *, as_ids: bool = False
) -> tuple[list[dict], Iterator[tuple[Any, Any, Any]]]:
  """(gt categories, iterator of (image_id, prediction, ground_truth)) over gt images.

  Category ids of both files are mapped to positions in the gt's category list. Every gt
  image needs a prediction (as the official scorer requires). Prediction / ground truth
  are evaluator dicts, or with `as_ids` tuples (id map uint32 [h, w], segment ids [n],
  classes [n], is_crowd [n]) for PanopticEvaluator.add_id_maps.
  """
  with open(gt_json) as f:
    gt = json.load(f)
  with open(pred_json) as f:
    pred = json.load(f)
  categories = gt["categories"]
  cat_index = category_index(categories)
  pred_by_id = {a["image_id"]: a for a in pred["annotations"]}

  def read(folder, ann):
    path = os.path.join(folder, ann["file_name"])
    if as_ids:
      return (decode_panoptic_png(path),) + segments_table(ann["segments_info"], cat_index)
    return read_panoptic_png(path, ann["segments_info"], cat_index)

  def pairs():
    for g in gt["annotations"]:
      if g["image_id"] not in pred_by_id:
        raise ValueError(f"no prediction for image {g['image_id']}")
      yield g["image_id"], read(pred_dir, pred_by_id[g["image_id"]]), read(gt_dir, g)

  return categories, pairs()


# ----------------------------------------------------------------------------- COCO results


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
  """bool [N, h, w] -> N RLEs with str counts (JSON-ready)."""
  masks = np.asarray(masks, np.uint8)
  if masks.shape[0] == 0:
    return []
  rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
  for r in rles:
    r["counts"] = r["counts"].decode("ascii")
  return rles


def yxyx_to_xywh(boxes: np.ndarray) -> np.ndarray:
  """float [N, 4] (y0, x0, y1, x1) -> (x, y, w, h)."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], -1)


def instance_results(
  image_id: Any,
  prediction: Mapping[str, np.ndarray],
  categories: Sequence[Mapping[str, Any]],
  *,
  with_masks: bool = True,
  with_boxes: bool = True,
) -> list[dict[str, Any]]:
  """COCO results entries of one image.

  prediction: 'classes' int [N], 'scores' float [N], 'masks' bool [N, h, w] and/or
  'boxes' float [N, 4] (y0, x0, y1, x1). Boxes default to the masks' extents.
  """
  classes = np.asarray(prediction["classes"]).reshape(-1)
  scores = np.asarray(prediction["scores"], np.float64).reshape(-1)
  n = classes.size
  rles = encode_masks(prediction["masks"]) if "masks" in prediction else None
  if "boxes" in prediction:
    boxes = yxyx_to_xywh(prediction["boxes"])
  elif rles is not None:
    boxes = mask_utils.toBbox(rles) if rles else np.zeros((0, 4))
  else:
    raise ValueError("prediction needs 'masks' or 'boxes'")
  out = []
  for i in range(n):
    d = {
      "image_id": _json_id(image_id),
      "category_id": int(categories[int(classes[i])]["id"]),
      "score": float(scores[i]),
    }
    if with_masks and rles is not None:
      d["segmentation"] = rles[i]
    if with_boxes:
      d["bbox"] = [float(v) for v in boxes[i]]
    out.append(d)
  return out


def write_json(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def read_coco_results(path: str) -> dict[Any, list[dict[str, Any]]]:
  """COCO results JSON -> {image_id: [entries]}."""
  with open(path) as f:
    entries = json.load(f)
  by_image: dict[Any, list] = {}
  for e in entries:
    by_image.setdefault(e["image_id"], []).append(e)
  return by_image


def results_to_prediction(
  entries: Sequence[Mapping[str, Any]], height: int, width: int, cat_index: Mapping[int, int]
) -> dict[str, np.ndarray]:
  """COCO results entries of one image -> evaluator prediction dict (inverse of above)."""
  classes = np.array([cat_index[int(e["category_id"])] for e in entries], np.int32)
  out = {
    "classes": classes.reshape(-1),
    "scores": np.array([e["score"] for e in entries], np.float64).reshape(-1),
  }
  if entries and "segmentation" in entries[0]:
    rles = [dict(e["segmentation"]) for e in entries]
    out["masks"] = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)
  elif not entries:
    out["masks"] = np.zeros((0, height, width), bool)
  if entries and "bbox" in entries[0]:
    b = np.array([e["bbox"] for e in entries], np.float64)
    out["boxes"] = np.stack([b[:, 1], b[:, 0], b[:, 1] + b[:, 3], b[:, 0] + b[:, 2]], -1)
  return out


# ----------------------------------------------------------------------------- semantic


def write_semantic_png(
  path: str, semantic: np.ndarray, num_classes: int, ignore_value: int = 255
) -> None:
  """int [h, w] class map (< 0 = ignore) -> PNG (uint8, or 16-bit above 255 classes)."""
  sem = np.asarray(semantic)
  if num_classes > 255:
    ignore_value = 65535
  out = np.where((sem >= 0) & (sem < num_classes), sem, ignore_value)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if num_classes > 255:
    Image.fromarray(out.astype(np.uint16)).save(path)
  else:
    Image.fromarray(out.astype(np.uint8)).save(path)


def read_semantic_png(
  path: str, num_classes: int, *, ignore_value: int | None = None, reduce_zero_label: bool = False
) -> np.ndarray:
  """PNG of class ids -> int32 [h, w], -1 where ignored or out of [0, num_classes).

  `reduce_zero_label`: files that store 0 = unlabelled and 1..K = classes (ADE20k's
  official annotations) are shifted down by one.
  """
  with Image.open(path) as im:
    sem = np.asarray(im).astype(np.int32)
  if sem.ndim == 3:
    sem = sem[..., 0]
  if ignore_value is not None:
    sem = np.where(sem == ignore_value, -1, sem)
  if reduce_zero_label:
    sem = np.where(sem >= 0, sem - 1, -1)
  return np.where((sem >= 0) & (sem < num_classes), sem, -1).astype(np.int32)
