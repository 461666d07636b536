"""Instance mask AP and box AP through pycocotools' COCOeval.

The host-local state is the RLE-encoded detections and gt annotations (a few hundred bytes
per instance, packed into numeric arrays), so a multi-host run gathers them
(evaluators.gather) and COCOeval runs once
over the whole split: AP is not a sum over shards.

Ground truth comes either as COCO annotations (exact original instances, overlaps and
crowd flags included: what official numbers use) or as the schema's segment map + table,
converted here: one instance per thing segment, `iscrowd` from seg_is_crowd, and for
box-only data (no pixels in the map) the segment's box.
Mask AP removes 'bbox' from detections before loadRes, as detectron2 does, so that the
small / medium / large split uses mask areas.
"""

import contextlib
import io
from typing import Any, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dataseg.metrics import evaluators
from dataseg.metrics import exports

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_from_dict(dataset: Mapping[str, Any]) -> COCO:
  coco = COCO()
  coco.dataset = dict(dataset)
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def coco_evaluate(
  gt: COCO,
  detections: Sequence[Mapping[str, Any]],
  iou_type: str,
  *,
  cat_ids: Sequence[int] | None = None,
  img_ids: Sequence[int] | None = None,
  class_names: Mapping[int, str] | None = None,
) -> dict[str, float]:
  """COCOeval over `detections` (COCO results entries); AP* as fractions (-1: no gt).

  Also 'AP/<name>' per category (mean precision over IoUs / recalls, NaN without gt),
  read from COCOeval's accumulated precision array like detectron2.
  """
  if iou_type not in ("segm", "bbox"):
    raise ValueError(f"iou_type must be 'segm' or 'bbox', got {iou_type!r}")
  dets = [dict(d) for d in detections]
  if iou_type == "segm":
    for d in dets:
      d.pop("bbox", None)
  with contextlib.redirect_stdout(io.StringIO()):
    if dets:
      dt = gt.loadRes(dets)
    else:
      dt = _coco_from_dict(
        {
          "images": gt.dataset.get("images", []),
          "annotations": [],
          "categories": gt.dataset.get("categories", []),
        }
      )
    ev = COCOeval(gt, dt, iou_type)
    if cat_ids is not None:
      ev.params.catIds = list(cat_ids)
    if img_ids is not None:
      ev.params.imgIds = list(img_ids)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  out = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats[:6])}
  precision = ev.eval["precision"]  # [T, R, K, A, M]
  for k, cat in enumerate(ev.params.catIds):
    p = precision[:, :, k, 0, -1]
    p = p[p > -1]
    name = class_names.get(cat, str(cat)) if class_names else str(cat)
    out[f"AP/{name}"] = float(p.mean()) if p.size else float("nan")
  return out


def segments_to_annotations(
  image_id,
  ground_truth: Mapping[str, np.ndarray],
  categories: Sequence[Mapping[str, Any]],
  is_thing: np.ndarray,
) -> list[dict[str, Any]]:
  """Schema segment map + table -> COCO annotations of the thing segments.

  ground_truth: 'segment_map' [h, w] (-1 void), 'seg_class' [n], 'seg_is_crowd' [n],
  optionally 'seg_box' [n, 4] (y0, x0, y1, x1) for segments without pixels (box-only).
  """
  seg_map = np.asarray(ground_truth["segment_map"])
  cls = np.asarray(ground_truth["seg_class"]).reshape(-1)
  n = cls.size
  crowd = np.asarray(ground_truth.get("seg_is_crowd", np.zeros(n, bool)), bool).reshape(-1)
  boxes = ground_truth.get("seg_box")
  h, w = seg_map.shape
  area = np.bincount(seg_map.ravel() + 1, minlength=n + 1)[1 : n + 1]
  anns = []
  for k in range(n):
    if cls[k] < 0 or not is_thing[cls[k]]:
      continue
    if area[k] > 0:
      rle = exports.encode_masks((seg_map == k)[None])[0]
      bbox = [float(v) for v in mask_utils.toBbox(rle)]
      seg_area = float(area[k])
    elif boxes is not None:
      x, y, bw, bh = exports.yxyx_to_xywh(np.asarray(boxes)[k])[0]
      if bw <= 0 or bh <= 0:
        continue
      bbox = [float(x), float(y), float(bw), float(bh)]
      poly = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
      rle = mask_utils.merge(mask_utils.frPyObjects(poly, h, w))
      rle["counts"] = rle["counts"].decode("ascii")
      seg_area = float(bw * bh)
    else:
      continue
    anns.append(
      {
        "image_id": image_id,
        "category_id": int(categories[int(cls[k])]["id"]),
        "segmentation": rle,
        "area": seg_area,
        "bbox": bbox,
        "iscrowd": int(crowd[k]),
      }
    )
  return anns


def _int_id(image_id) -> int:
  if isinstance(image_id, (bool, str, bytes)) or int(image_id) != image_id:
    raise TypeError(f"COCO evaluators need integer image ids, got {image_id!r}")
  return int(image_id)


def _compressed_rle(segmentation, h, w) -> dict[str, Any]:
  """A COCO segmentation (polygons, uncompressed or compressed RLE) as compressed RLE
  with str counts: what COCOeval converts it to anyway (COCO.annToRLE)."""
  if isinstance(segmentation, list):  # polygons.
    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
  elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE.
    rle = mask_utils.frPyObjects(segmentation, *segmentation["size"])
  else:
    rle = dict(segmentation)
  if isinstance(rle["counts"], bytes):
    rle["counts"] = rle["counts"].decode("ascii")
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]}


# Numeric fields of a COCO annotation / result entry; absent ones are stored as NaN.
_FLOAT_FIELDS = ("score", "area")


def _pack(prefix: str, entries: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """COCO entries -> typed arrays, so a state crosses hosts without pickle.

  `<prefix>/ids` int64 [n, 3] (image_id, category_id, iscrowd), `<prefix>/floats`
  float64 [n, 2] (score, area), `<prefix>/bbox` float64 [n, 4] (NaN: none),
  `<prefix>/rle_size` int64 [n, 2] (-1: no segmentation) and the RLE count strings
  concatenated as bytes in `<prefix>/rle_counts` uint8, split at `<prefix>/rle_end` [n].
  """
  n = len(entries)
  ids = np.zeros((n, 3), np.int64)
  floats = np.full((n, len(_FLOAT_FIELDS)), np.nan)
  bbox = np.full((n, 4), np.nan)
  size = np.full((n, 2), -1, np.int64)
  counts, end = [], np.zeros(n, np.int64)
  total = 0
  for k, e in enumerate(entries):
    ids[k] = (_int_id(e["image_id"]), int(e["category_id"]), int(e.get("iscrowd", 0)))
    for j, field in enumerate(_FLOAT_FIELDS):
      if field in e:
        floats[k, j] = float(e[field])
    if "bbox" in e:
      bbox[k] = e["bbox"]
    if "segmentation" in e:
      rle = e["segmentation"]
      size[k] = rle["size"]
      raw = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
      counts.append(raw)
      total += len(raw)
    end[k] = total
  return {
    f"{prefix}/ids": ids,
    f"{prefix}/floats": floats,
    f"{prefix}/bbox": bbox,
    f"{prefix}/rle_size": size,
    f"{prefix}/rle_end": end,
    f"{prefix}/rle_counts": np.frombuffer(b"".join(counts), np.uint8).copy(),
  }


def _unpack(prefix: str, state: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
  """Inverse of `_pack`."""
  ids, floats = state[f"{prefix}/ids"], state[f"{prefix}/floats"]
  bbox, size, end = state[f"{prefix}/bbox"], state[f"{prefix}/rle_size"], state[f"{prefix}/rle_end"]
  counts = np.asarray(state[f"{prefix}/rle_counts"], np.uint8).tobytes()
  entries, start = [], 0
  for k in range(len(ids)):
    e = {"image_id": int(ids[k, 0]), "category_id": int(ids[k, 1])}
    if prefix == "gt":
      e["iscrowd"] = int(ids[k, 2])
    for j, field in enumerate(_FLOAT_FIELDS):
      if not np.isnan(floats[k, j]):
        e[field] = float(floats[k, j])
    if not np.isnan(bbox[k]).any():
      e["bbox"] = [float(v) for v in bbox[k]]
    if size[k, 0] >= 0:
      e["segmentation"] = {
        "size": [int(v) for v in size[k]],
        "counts": counts[start : int(end[k])].decode("ascii"),
      }
    start = int(end[k])
    entries.append(e)
  return entries


class CocoEvaluator(evaluators.Evaluator):
  """Collects RLE detections + gt annotations; `result()` runs COCOeval once.

  `add(image_id, prediction, ground_truth)`:
    prediction: 'classes' int [N], 'scores' float [N], 'masks' bool [N, h, w] (mask AP)
      and/or 'boxes' float [N, 4] (y0, x0, y1, x1; box AP, default: mask extents).
    ground_truth: {'annotations': [COCO annotation dicts], 'height', 'width'} with
      dataset category ids, or a schema-style dict (see segments_to_annotations).
  Only valid examples may be added (see evaluators.py). `category_ids[c]` is the dataset's
  id of contiguous class c (default c + 1). Only thing classes are evaluated.
  """

  iou_type = "segm"

  def __init__(self, *, class_names, is_thing=None, category_ids=None):
    super().__init__(class_names=class_names, is_thing=is_thing)
    self.categories = exports.make_categories(self.class_names, self.is_thing, category_ids)
    self._init_kwargs["category_ids"] = [c["id"] for c in self.categories]
    self._images: list[dict[str, Any]] = []
    self._gts: list[dict[str, Any]] = []
    self._dets: list[dict[str, Any]] = []

  def add(self, image_id, prediction, ground_truth):
    image_id = exports._json_id(image_id)  # pylint: disable=protected-access
    if "annotations" in ground_truth:
      h, w = int(ground_truth["height"]), int(ground_truth["width"])
      gts = [
        dict(a, image_id=image_id, segmentation=_compressed_rle(a["segmentation"], h, w))
        if "segmentation" in a
        else dict(a, image_id=image_id)
        for a in ground_truth["annotations"]
      ]
    else:
      h, w = np.shape(ground_truth["segment_map"])
      gts = segments_to_annotations(image_id, ground_truth, self.categories, self.is_thing)
    self._images.append({"id": image_id, "height": int(h), "width": int(w)})
    self._gts.extend(gts)
    with_masks = self.iou_type == "segm"
    if with_masks and "masks" not in prediction:
      raise ValueError("mask AP needs prediction['masks'] [N, h, w]")
    self._dets.extend(
      exports.instance_results(
        image_id,
        prediction,
        self.categories,
        with_masks=with_masks,
        with_boxes=self.iou_type == "bbox",
      )
    )

  def state(self):
    """Numeric arrays only (see `_pack`): image table [n, 3] plus gts and detections."""
    images = np.array(
      [[_int_id(im["id"]), im["height"], im["width"]] for im in self._images], np.int64
    ).reshape(-1, 3)
    return {"images": images, **_pack("gt", self._gts), **_pack("det", self._dets)}

  def accumulate_state(self, state):
    self._images.extend(
      {"id": int(i), "height": int(h), "width": int(w)}
      for i, h, w in np.asarray(state["images"]).reshape(-1, 3)
    )
    self._gts.extend(_unpack("gt", state))
    self._dets.extend(_unpack("det", state))

  def result(self):
    gts = [dict(a, id=i + 1) for i, a in enumerate(self._gts)]  # COCO needs ids >= 1
    things = [c for c in self.categories if c["isthing"]]
    gt = _coco_from_dict({"images": self._images, "annotations": gts, "categories": things})
    return coco_evaluate(
      gt,
      self._dets,
      self.iou_type,
      cat_ids=[c["id"] for c in things],
      img_ids=[im["id"] for im in self._images],
      class_names={c["id"]: c["name"] for c in things},
    )


@evaluators.register("instance")
class InstanceEvaluator(CocoEvaluator):
  """Mask AP, AP50, AP75, APs/m/l (COCOeval 'segm')."""

  iou_type = "segm"


@evaluators.register("box")
class BoxEvaluator(CocoEvaluator):
  """Box AP, AP50, AP75, APs/m/l (COCOeval 'bbox')."""

  iou_type = "bbox"
