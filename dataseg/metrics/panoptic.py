"""Panoptic quality (PQ, SQ, RQ), exactly as panopticapi's `pq_compute` defines it.

The reference (panopticapi, and cityscapesscripts' copy of it) loops in Python over the
(gt, pred) pairs of `np.unique(gt_id * 2**24 + pred_id)`. Here one `np.bincount` over
`(gt + 1) * (m + 1) + (pred + 1)` gives the whole [n+1, m+1] intersection table of an image
(row / column 0 = void), and matching, FN and FP filtering are array operations on it.

Definition kept from the reference, per image and per category:
  * a (gt, pred) pair with the same category, gt not crowd, matches when
    IoU = |g & p| / (|g| + |p| - |g & p| - |p & void|) > 0.5 (void pixels of the prediction
    do not enter the union); matched pairs add 1 to TP and their IoU to the IoU sum;
  * unmatched non-crowd gt segments are FN (also when they cover no pixel);
  * an unmatched prediction is FP unless (|p & void| + |p & crowd_c|) / |p| > 0.5, where
    crowd_c is the crowd gt segment of the prediction's category -- the *last* one in the
    segment table when an image has several (the reference keeps one per category in a dict);
  * predicted segments that cover no pixel do not exist (the reference rejects them);
  * PQ_c = IoU_c / (TP_c + FP_c/2 + FN_c/2), SQ_c = IoU_c / TP_c (0 if TP_c = 0),
    RQ_c = TP_c / (TP_c + FP_c/2 + FN_c/2); PQ / SQ / RQ average over the categories with
    TP + FP + FN > 0, for all, thing and stuff categories.

Metrics are fractions in [0, 1] (the reference's scale); NaN when no category of a group
occurs (where the reference divides by zero).
"""

from typing import Mapping, Sequence

import numpy as np

from dataseg.metrics import evaluators


def _check_tables(gt_class, gt_is_crowd, pred_class, num_classes):
  gt_class = np.asarray(gt_class, np.int64).reshape(-1)
  pred_class = np.asarray(pred_class, np.int64).reshape(-1)
  gt_is_crowd = np.asarray(gt_is_crowd, bool).reshape(-1)
  if gt_is_crowd.size != gt_class.size:
    raise ValueError("gt_is_crowd and gt_class differ in length")
  for name, cls in (("gt", gt_class), ("prediction", pred_class)):
    if cls.size and (cls.min() < 0 or cls.max() >= num_classes):
      raise ValueError(f"{name} segment classes outside [0, {num_classes})")
  return gt_class, gt_is_crowd, pred_class


def pq_image_stats(
  gt_map: np.ndarray,
  gt_class: np.ndarray,
  gt_is_crowd: np.ndarray,
  pred_map: np.ndarray,
  pred_class: np.ndarray,
  num_classes: int,
):
  """Per-category PQ statistics of one image.

  Args:
    gt_map: int [h, w], index into the gt segment table, -1 = void.
    gt_class: int [n], category (0..K-1) of each gt segment.
    gt_is_crowd: bool [n].
    pred_map: int [h, w], index into the predicted segment table, -1 = void (no prediction).
    pred_class: int [m], category of each predicted segment.
    num_classes: K.

  Returns:
    (iou_sum float64 [K], tp int64 [K], fp int64 [K], fn int64 [K]).
  """
  gt_class, gt_is_crowd, pred_class = _check_tables(gt_class, gt_is_crowd, pred_class, num_classes)
  n, m = gt_class.size, pred_class.size
  gt_map, pred_map = np.asarray(gt_map), np.asarray(pred_map)
  if gt_map.shape != pred_map.shape:
    raise ValueError(f"gt map {gt_map.shape} and prediction map {pred_map.shape} differ")
  for name, ids, rows in (("gt", gt_map, n), ("prediction", pred_map, m)):
    if ids.size and (ids.min() < -1 or ids.max() >= rows):
      raise ValueError(f"{name} segment map holds ids outside [-1, {rows})")

  # [n+1, m+1] pixel counts of every (gt, pred) pair; row / column 0 is void.
  pair = gt_map.astype(np.intp)  # (gt + 1) * (m + 1) + (pred + 1), in place
  pair *= m + 1
  pair += pred_map
  pair += m + 2
  counts = np.bincount(pair.ravel(), minlength=(n + 1) * (m + 1)).reshape(n + 1, m + 1)
  return stats_from_counts(counts, gt_class, gt_is_crowd, pred_class, num_classes)


def stats_from_counts(
  counts: np.ndarray,
  gt_class: np.ndarray,
  gt_is_crowd: np.ndarray,
  pred_class: np.ndarray,
  num_classes: int,
):
  """pq_image_stats from the [n+1, m+1] pair-count table (row / column 0 = void)."""
  k = num_classes
  m = pred_class.size
  gt_area = counts[1:].sum(1)
  pred_area = counts[:, 1:].sum(0)
  inter = counts[1:, 1:]
  pred_void = counts[0, 1:]

  eligible = (gt_class[:, None] == pred_class[None, :]) & ~gt_is_crowd[:, None] & (inter > 0)
  union = pred_area[None, :] + gt_area[:, None] - inter - pred_void[None, :]
  iou = np.where(eligible, inter / np.maximum(union, 1), 0.0)
  matched = eligible & (iou > 0.5)  # IoU > 0.5 makes matches unique in both directions.
  gi, pj = np.nonzero(matched)
  tp = np.bincount(gt_class[gi], minlength=k)
  iou_sum = np.bincount(gt_class[gi], weights=iou[gi, pj], minlength=k).astype(np.float64)

  gt_unmatched = ~matched.any(1) & ~gt_is_crowd
  fn = np.bincount(gt_class[gt_unmatched], minlength=k)

  # Last crowd segment of each category (the reference's dict keeps the last one).
  crowd_row = np.full(k, -1, np.int64)
  crowd_idx = np.nonzero(gt_is_crowd)[0]
  if crowd_idx.size:
    rev = crowd_idx[::-1]
    cats, first = np.unique(gt_class[rev], return_index=True)
    crowd_row[cats] = rev[first]
  cr = crowd_row[pred_class]
  crowd_inter = np.where(cr >= 0, counts[cr + 1, np.arange(m) + 1], 0)
  ignored = (pred_void + crowd_inter) / np.maximum(pred_area, 1) > 0.5
  is_fp = (pred_area > 0) & ~matched.any(0) & ~ignored
  fp = np.bincount(pred_class[is_fp], minlength=k)
  return iou_sum, tp.astype(np.int64), fp.astype(np.int64), fn.astype(np.int64)


def pq_from_stats(
  iou_sum: np.ndarray,
  tp: np.ndarray,
  fp: np.ndarray,
  fn: np.ndarray,
  is_thing: np.ndarray,
  class_names: Sequence[str] | None = None,
) -> dict[str, float]:
  """PQ / SQ / RQ for all, things ("_th"), stuff ("_st") and per class ("PQ/<name>")."""
  iou_sum = np.asarray(iou_sum, np.float64)
  tp, fp, fn = (np.asarray(x, np.float64) for x in (tp, fp, fn))
  is_thing = np.asarray(is_thing, bool)
  denom = tp + 0.5 * fp + 0.5 * fn
  present = (tp + fp + fn) > 0
  safe = np.where(present, denom, 1.0)
  pq = np.where(present, iou_sum / safe, 0.0)
  sq = np.where(tp > 0, iou_sum / np.maximum(tp, 1), 0.0)
  rq = np.where(present, tp / safe, 0.0)
  out = {}
  for suffix, group in (("", np.ones_like(is_thing)), ("_th", is_thing), ("_st", ~is_thing)):
    sel = present & group
    count = int(sel.sum())
    for name, values in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
      out[name + suffix] = float(values[sel].sum() / count) if count else float("nan")
    out["N" + suffix] = float(count)
  if class_names is not None:
    for c, cname in enumerate(class_names):
      out[f"PQ/{cname}"] = float(pq[c])
      out[f"SQ/{cname}"] = float(sq[c])
      out[f"RQ/{cname}"] = float(rq[c])
  return out


def _perfect_hash(seg_ids: np.ndarray, max_bits: int = 11) -> tuple[int, int] | None:
  """(multiplier a, bits b): h(x) = (a * x mod 2^32) >> (32 - b) is injective on seg_ids.

  Searched per image over a few random odd multipliers, from about 2 log2(n) bits (where a
  random hash is injective with fair odds) up to `max_bits`, so the per-pixel work is two
  integer ops and no gather. None when n is too large for a small table.
  """
  x = np.asarray(seg_ids, np.uint64)
  log_n = int(np.ceil(np.log2(max(x.size, 2))))
  rng = np.random.default_rng(x.size)
  for bits in range(max(log_n + 2, 2 * log_n - 3), max_bits + 1):
    for _ in range(32):
      a = int(rng.integers(0, 2**31)) * 2 + 1
      h = ((x * np.uint64(a)) & np.uint64(0xFFFFFFFF)) >> np.uint64(32 - bits)
      if np.unique(h).size == x.size:
        return a, bits
  return None


def _hash_map(ids: np.ndarray, a: int, bits: int) -> np.ndarray:
  h = np.multiply(ids, np.uint32(a), dtype=np.uint32)  # wraps mod 2^32
  h >>= np.uint32(32 - bits)
  return h


def pq_image_stats_from_ids(
  gt_ids: np.ndarray,
  gt_seg_ids: np.ndarray,
  gt_class: np.ndarray,
  gt_is_crowd: np.ndarray,
  pred_ids: np.ndarray,
  pred_seg_ids: np.ndarray,
  pred_class: np.ndarray,
  num_classes: int,
):
  """pq_image_stats straight from COCO panoptic id maps (the file-scoring fast path).

  gt_ids / pred_ids: uint32 [h, w] segment ids, 0 = void (rgb2id of the PNGs);
  *_seg_ids [n] the ids listed in the JSON, in table order. Instead of mapping every pixel
  to its table row (a gather per pixel), each side's ids go through a perfect hash into a
  few bits, one bincount counts the (gt bucket, pred bucket) pairs, and the [n+1, m+1]
  table is read out of that. PNG ids missing from the JSON are rejected: pixels in unlisted
  buckets, or a per-side checksum (sum of ids mod 2^32) that disagrees, raise ValueError.
  """
  gt_class, gt_is_crowd, pred_class = _check_tables(gt_class, gt_is_crowd, pred_class, num_classes)
  gt_ids, pred_ids = np.asarray(gt_ids, np.uint32), np.asarray(pred_ids, np.uint32)
  if gt_ids.shape != pred_ids.shape:
    raise ValueError(f"gt map {gt_ids.shape} and prediction map {pred_ids.shape} differ")
  listed = [
    np.concatenate([[0], np.asarray(ids, np.int64).reshape(-1)])
    for ids in (gt_seg_ids, pred_seg_ids)
  ]
  for name, ids in zip(("gt", "prediction"), listed):
    if np.unique(ids).size != ids.size or ids.max() >= 2**24:
      raise ValueError(f"{name} segment ids must be distinct, non-zero and < 2^24")
  hashes = [_perfect_hash(ids) for ids in listed]
  if None in hashes:  # many segments: the pair table would not be small; map rows instead
    rows = []
    for ids, lst in zip((gt_ids, pred_ids), listed):
      order = np.argsort(lst)
      pos = np.minimum(np.searchsorted(lst[order], ids), lst.size - 1)
      if not np.array_equal(lst[order][pos], ids):
        raise ValueError("segment ids in the PNG are missing from the JSON")
      rows.append(order[pos] - 1)
    return pq_image_stats(rows[0], gt_class, gt_is_crowd, rows[1], pred_class, num_classes)
  (ga, gbits), (pa, pbits) = hashes
  g_listed, p_listed = listed
  g_buckets, p_buckets = (
    (
      ((ids.astype(np.uint64) * np.uint64(a)) & np.uint64(0xFFFFFFFF)) >> np.uint64(32 - bits)
    ).astype(np.intp)
    for ids, (a, bits) in zip(listed, hashes)
  )

  pair = _hash_map(gt_ids, ga, gbits)  # uint32: gbits + pbits <= 22 bits
  pair <<= np.uint32(pbits)
  pair |= _hash_map(pred_ids, pa, pbits)
  table = np.bincount(pair.ravel(), minlength=1 << (gbits + pbits))
  table = table.reshape(1 << gbits, 1 << pbits)
  counts = table[np.ix_(g_buckets, p_buckets)]
  if counts.sum() != gt_ids.size:
    raise ValueError("segment ids in the PNG are missing from the JSON")
  for ids, lst, area in ((gt_ids, g_listed, counts.sum(1)), (pred_ids, p_listed, counts.sum(0))):
    # Checksum mod 2^32: an unlisted id hashed into a listed id's bucket changes it.
    if int(ids.sum(dtype=np.uint32)) != int(np.dot(area, lst)) % 2**32:
      raise ValueError("segment ids in the PNG are missing from the JSON")
  return stats_from_counts(counts, gt_class, gt_is_crowd, pred_class, num_classes)


def _segments(d: Mapping[str, np.ndarray]):
  """(segment_map, seg_class, seg_is_crowd) of a dict, padding rows (class -1) made void."""
  seg_map = np.asarray(d["segment_map"])
  cls = np.asarray(d["seg_class"]).reshape(-1)
  crowd = np.asarray(d.get("seg_is_crowd", np.zeros(cls.shape, bool)), bool).reshape(-1)
  valid = np.asarray(d.get("seg_valid", cls >= 0), bool).reshape(-1) & (cls >= 0)
  if not valid.all():
    # Padding rows of a schema segment table: drop them and renumber the map.
    new_index = np.cumsum(valid) - 1
    lut = np.concatenate([[-1], np.where(valid, new_index, -1)])
    seg_map = lut[seg_map + 1]
    cls, crowd = cls[valid], crowd[valid]
  return seg_map, cls, crowd


@evaluators.register("panoptic")
class PanopticEvaluator(evaluators.Evaluator):
  """Accumulates per-class TP / FP / FN / IoU sums; `result()` gives PQ, SQ, RQ.

  `add(image_id, prediction, ground_truth)`, both dicts of numpy arrays at the same
  resolution: 'segment_map' int [h, w] (-1 void), 'seg_class' int [n]; the gt also
  'seg_is_crowd' bool [n]. Rows with class -1 (schema padding) or `seg_valid` False are
  dropped. Only valid examples may be added (see evaluators.py).
  """

  def __init__(self, *, class_names, is_thing=None):
    super().__init__(class_names=class_names, is_thing=is_thing)
    k = self.num_classes
    self._iou = np.zeros(k, np.float64)
    self._tp = np.zeros(k, np.int64)
    self._fp = np.zeros(k, np.int64)
    self._fn = np.zeros(k, np.int64)
    self.num_images = 0

  def add(self, image_id, prediction, ground_truth):
    del image_id  # PQ sums over images; ids only matter for exports.
    gt_map, gt_cls, gt_crowd = _segments(ground_truth)
    pred_map, pred_cls, _ = _segments(prediction)
    self._accumulate(pq_image_stats(gt_map, gt_cls, gt_crowd, pred_map, pred_cls, self.num_classes))

  def add_id_maps(self, prediction: tuple, ground_truth: tuple):
    """`add` for COCO panoptic id maps: each side (ids uint32 [h, w] with 0 = void,
    segment ids [n], classes [n], is_crowd [n]) as exports.segments_table gives them;
    the prediction's is_crowd is not used."""
    pred_ids, pred_seg_ids, pred_class = prediction[:3]
    gt_ids, gt_seg_ids, gt_class, gt_is_crowd = ground_truth
    self._accumulate(
      pq_image_stats_from_ids(
        gt_ids,
        gt_seg_ids,
        gt_class,
        gt_is_crowd,
        pred_ids,
        pred_seg_ids,
        pred_class,
        self.num_classes,
      )
    )

  def _accumulate(self, stats):
    iou, tp, fp, fn = stats
    self._iou += iou
    self._tp += tp
    self._fp += fp
    self._fn += fn
    self.num_images += 1

  def state(self):
    return {
      "iou": self._iou.copy(),
      "tp": self._tp.copy(),
      "fp": self._fp.copy(),
      "fn": self._fn.copy(),
      "num_images": np.int64(self.num_images),
    }

  def accumulate_state(self, state):
    self._iou += state["iou"]
    self._tp += state["tp"]
    self._fp += state["fp"]
    self._fn += state["fn"]
    self.num_images += int(state["num_images"])

  def result(self):
    return pq_from_stats(self._iou, self._tp, self._fp, self._fn, self.is_thing, self.class_names)
