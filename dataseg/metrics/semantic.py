"""Semantic segmentation metrics from one confusion matrix (detectron2's SemSegEvaluator).

Definitions follow detectron2 (evaluation/sem_seg_evaluation.py), with fractions instead
of percentages:
  IoU_c = TP_c / (GT_c + P_c - TP_c),  ACC_c = TP_c / GT_c,
  mIoU / mACC = mean over the classes with at least one gt pixel (a class that is only
  predicted is left out of the mean, though its false positives still lower the IoU of
  the classes it covers); fwIoU weights IoU_c by GT_c; pACC = sum TP / sum GT.
Gt pixels outside [0, K) (-1, 255, ...) are ignored. Predicted pixels outside [0, K)
("no prediction") on valid gt count as misses of the gt class -- detectron2 never has
them (argmax covers every pixel) and would drop them from GT_c instead.
Per-class IoU / ACC of classes without gt pixels are NaN.
"""

from typing import Any, Mapping

import numpy as np

from dataseg.metrics import evaluators


def semantic_from_segments(segment_map: np.ndarray, seg_class: np.ndarray) -> np.ndarray:
  """Schema (segment_map [h, w], seg_class [n]) -> class map int32 [h, w], -1 = void.

  Crowd segments keep their class: a crowd region is still that class semantically.
  """
  seg_class = np.asarray(seg_class, np.int32).reshape(-1)
  lut = np.concatenate([[-1], seg_class]).astype(np.int32)
  return lut[np.asarray(segment_map) + 1]


def _class_map(x: Any) -> np.ndarray:
  if isinstance(x, Mapping):
    if "semantic" in x:
      return np.asarray(x["semantic"])
    return semantic_from_segments(x["segment_map"], x["seg_class"])
  return np.asarray(x)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """int64 [K+1, K+1] counts indexed [gt, pred]; index K = ignored gt / no prediction."""
  k = num_classes
  gt = np.asarray(gt).ravel()
  pred = np.asarray(pred).ravel()
  if gt.shape != pred.shape:
    raise ValueError(f"gt and prediction sizes differ: {gt.size} vs {pred.size}")
  gt = np.where((gt >= 0) & (gt < k), gt, k).astype(np.int64)
  pred = np.where((pred >= 0) & (pred < k), pred, k).astype(np.int64)
  return np.bincount(gt * (k + 1) + pred, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)


def metrics_from_confusion(conf: np.ndarray, class_names=None) -> dict[str, float]:
  """mIoU, fwIoU, mACC, pACC and per-class IoU / ACC ("IoU/<name>")."""
  k = conf.shape[0] - 1
  valid_gt = conf[:k, :]  # rows of real gt classes, all prediction columns
  tp = np.diag(conf)[:k].astype(np.float64)
  pos_gt = valid_gt.sum(1).astype(np.float64)
  pos_pred = conf[:k, :k].sum(0).astype(np.float64)
  present = pos_gt > 0
  union = pos_gt + pos_pred - tp
  acc = np.full(k, np.nan)
  iou = np.full(k, np.nan)
  acc[present] = tp[present] / pos_gt[present]
  iou[present] = tp[present] / union[present]
  total = pos_gt.sum()
  out = {
    "mIoU": float(iou[present].mean()) if present.any() else float("nan"),
    "fwIoU": float((iou[present] * pos_gt[present] / total).sum()) if total else float("nan"),
    "mACC": float(acc[present].mean()) if present.any() else float("nan"),
    "pACC": float(tp.sum() / total) if total else float("nan"),
  }
  names = class_names if class_names is not None else [str(c) for c in range(k)]
  for c, name in enumerate(names):
    out[f"IoU/{name}"] = float(iou[c])
    out[f"ACC/{name}"] = float(acc[c])
  return out


@evaluators.register("semantic")
class SemanticEvaluator(evaluators.Evaluator):
  """Accumulates the confusion matrix; state is that one int64 [K+1, K+1] array.

  `add(image_id, prediction, ground_truth)`: each a class map int [h, w] (gt: < 0 or >= K
  ignored, e.g. -1 or 255), or a dict with 'semantic' [h, w], or a schema-style dict
  with 'segment_map' + 'seg_class'. Only valid examples may be added (see evaluators.py).
  """

  def __init__(self, *, class_names, is_thing=None):
    super().__init__(class_names=class_names, is_thing=is_thing)
    self._conf = np.zeros((self.num_classes + 1,) * 2, np.int64)

  def add(self, image_id, prediction, ground_truth):
    del image_id
    self._conf += confusion_matrix(
      _class_map(ground_truth), _class_map(prediction), self.num_classes
    )

  def state(self):
    return {"confusion": self._conf.copy()}

  def accumulate_state(self, state):
    self._conf += state["confusion"]

  def result(self):
    return metrics_from_confusion(self._conf, self.class_names)
