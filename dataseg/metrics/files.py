r"""Scores prediction files made by any system, in the standard formats.

  python -m dataseg.evaluate --task=panoptic \
      --gt_json=panoptic_val2017.json --gt_dir=panoptic_val2017 \
      --pred_json=pred.json --pred_dir=pred_pngs
  python -m dataseg.evaluate --task=semantic --gt_dir=ann/validation \
      --pred_dir=pred_pngs --categories_json=ade20k.json [--reduce_zero_label]
  python -m dataseg.evaluate --task=instance --gt_json=instances_val2017.json \
      --pred_json=results.json          # --task=box for box AP

Panoptic: COCO panoptic PNG + JSON on both sides (PQ equal to panopticapi's pq_compute).
Semantic: PNGs of class ids with the same file names in both folders (255 = ignore by
default). Instance / box: COCO results JSON against a COCO instances JSON.
The command line is `python -m dataseg.evaluate` with --pred_json / --pred_dir.
"""

import json
import os
from typing import Sequence

from dataseg.metrics import coco_eval
from dataseg.metrics import exports
from dataseg.metrics import panoptic
from dataseg.metrics import semantic

TASKS = ("panoptic", "semantic", "instance", "box")


def evaluate_panoptic_files(
  gt_json: str, gt_dir: str, pred_json: str, pred_dir: str
) -> dict[str, float]:
  """PQ / SQ / RQ of COCO panoptic prediction files against COCO panoptic gt files."""
  categories, pairs = exports.iter_coco_panoptic_pairs(
    gt_json, gt_dir, pred_json, pred_dir, as_ids=True
  )
  ev = panoptic.PanopticEvaluator(
    class_names=[c["name"] for c in categories],
    is_thing=[bool(c.get("isthing", 1)) for c in categories],
  )
  for _, pred, gt in pairs:
    ev.add_id_maps(pred, gt)
  return ev.result()


def load_class_names(path: str) -> list[str]:
  """Names from a JSON: {'categories': [...]}, a list of category dicts, or of names."""
  with open(path) as f:
    obj = json.load(f)
  if isinstance(obj, dict):
    obj = obj["categories"]
  return [c["name"] if isinstance(c, dict) else str(c) for c in obj]


def evaluate_semantic_files(
  gt_dir: str,
  pred_dir: str,
  class_names: Sequence[str],
  *,
  gt_ignore_value: int = 255,
  reduce_zero_label: bool = False,
  pred_ignore_value: int = 255,
) -> dict[str, float]:
  """mIoU etc. of same-named class-id PNGs in `pred_dir` against those in `gt_dir`."""
  k = len(class_names)
  ev = semantic.SemanticEvaluator(class_names=class_names)
  names = sorted(n for n in os.listdir(gt_dir) if n.lower().endswith(".png"))
  if not names:
    raise ValueError(f"no PNG files in {gt_dir}")
  for name in names:
    pred_path = os.path.join(pred_dir, name)
    if not os.path.exists(pred_path):
      raise ValueError(f"no prediction {pred_path}")
    gt = exports.read_semantic_png(
      os.path.join(gt_dir, name),
      k,
      ignore_value=gt_ignore_value,
      reduce_zero_label=reduce_zero_label,
    )
    pred = exports.read_semantic_png(pred_path, k, ignore_value=pred_ignore_value)
    ev.add(name, pred, gt)
  return ev.result()


def evaluate_coco_files(gt_json: str, pred_json: str, iou_type: str) -> dict[str, float]:
  """COCOeval of a COCO results JSON against a COCO instances JSON (all gt categories)."""
  gt = coco_eval._coco_from_dict(json.load(open(gt_json)))  # pylint: disable=protected-access
  with open(pred_json) as f:
    dets = json.load(f)
  names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
  return coco_eval.coco_evaluate(gt, dets, iou_type, class_names=names)


def format_table(metrics: dict[str, float]) -> str:
  """Summary metrics first, then per-class values, as percentages."""
  summary = {k: v for k, v in metrics.items() if "/" not in k}
  per_class: dict[str, dict[str, float]] = {}
  for key, v in metrics.items():
    if "/" in key:
      metric, name = key.split("/", 1)
      per_class.setdefault(name, {})[metric] = v
  lines = []
  if per_class:
    cols = list(next(iter(per_class.values())))
    lines.append(f"{'class':24s}" + "".join(f"{c:>9s}" for c in cols))
    for name, row in per_class.items():
      lines.append(f"{name[:24]:24s}" + "".join(f"{100 * row[c]:9.2f}" for c in cols))
    lines.append("-" * (24 + 9 * len(cols)))
  for k, v in summary.items():
    scale = 1 if k.startswith("N") else 100
    lines.append(f"{k:24s}{scale * v:9.2f}")
  return "\n".join(lines)
