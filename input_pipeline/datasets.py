"""Registry of the datasets a config may name, with their tasks, vocabularies and files.

A config's dataset entry (configs/common.py: `dataset(...)`) names a key of `DATASETS`;
everything dataset-specific (where the files are, which reader, which class list, which
tasks it can train and be evaluated in) lives here, never in the model or the objective.

Where the files are: each reader entry is the dataset's layout as its own preparation
tools leave it (README, "Preparing the paper's datasets"), below `<data_dir>/<root>`
(`config.data_dir`; TFDS datasets: the TFDS data dir). Path fields may hold `{split}` /
`{split_dir}` placeholders, filled from `splits` for the config split ('train',
'validation'). `reader_spec` resolves an entry into the reader spec dict of
input_pipeline/readers; a config's `reader` fields override the defaults (its paths are
used as given; `root` moves every default path). Every default layout is built in
miniature and read back by tests/test_readers.py (`test_registry_*`).
"""

import os

# Reader-spec fields that name files or folders.
PATH_FIELDS = ("json", "image_dir", "mask_dir", "file_list")

_TRAIN_VAL = {"train": dict(split="train"), "validation": dict(split="val")}
_ADE_SPLITS = {
  "train": dict(split="train", split_dir="training"),
  "validation": dict(split="val", split_dir="validation"),
}

DATASETS = {
  # The embedded synthetic suite (input_pipeline/synthetic.py), generated on first use.
  "shapes_panoptic": dict(
    source="synthetic", vocab="shapes_panoptic", tasks=("panoptic", "semantic", "instance")
  ),
  "shapes_semantic": dict(
    source="synthetic", vocab="shapes_semantic", tasks=("semantic", "panoptic")
  ),  # panoptic: weak transfer.
  "shapes_boxes": dict(
    source="synthetic", vocab="shapes_boxes", tasks=("boxes", "instance")
  ),  # val has masks for instance eval.
  "shapes_transfer": dict(
    source="synthetic", vocab="shapes_transfer", tasks=("panoptic", "semantic", "instance")
  ),
  # The paper's datasets and transfer sets (prepared by the user: see README).
  # COCO panoptic 2017: `tfds build coco/2017_panoptic` (133 classes, crowd segments).
  "coco_panoptic": dict(
    source="reader",
    vocab="coco_panoptic",
    reader=dict(format="tfds", tfds_name="coco/2017_panoptic"),
    tasks=("panoptic", "semantic", "instance"),
  ),
  # COCO instances 2017 from the raw JSON (TFDS coco/2017 has boxes, no masks):
  # coco/annotations/instances_{train,val}2017.json + coco/{train,val}2017/.
  "coco_instance": dict(
    source="reader",
    vocab="coco_panoptic",
    splits=_TRAIN_VAL,
    reader=dict(
      format="coco_instance",
      root="coco",
      json="annotations/instances_{split}2017.json",
      image_dir="{split}2017",
      check_categories=True,
    ),
    tasks=("instance", "boxes"),
  ),
  # ADE20k-150 semantic: the raw ADEChallengeData2016 folder (0 void, 1..150). TFDS
  # scene_parse150 is not a way to it: it holds ChallengeData2017's instance
  # annotations (100 thing classes, no stuff), see readers/tfds_readers.py.
  "ade20k": dict(
    source="reader",
    vocab="ade20k",
    splits=_ADE_SPLITS,
    reader=dict(
      format="semantic_png",
      root="ADEChallengeData2016",
      image_dir="images/{split_dir}",
      mask_dir="annotations/{split_dir}",
    ),
    tasks=("semantic", "panoptic"),
  ),
  # ADE20k panoptic (150 classes, 100 things) as Mask2Former's
  # datasets/prepare_ade20k_pan_seg.py writes it into ADEChallengeData2016: COCO
  # panoptic JSON with category ids 0..149 (objectInfo150 index - 1) and PNGs.
  "ade20k_panoptic": dict(
    source="reader",
    vocab="ade20k",
    splits=_ADE_SPLITS,
    reader=dict(
      format="coco_panoptic",
      root="ADEChallengeData2016",
      json="ade20k_panoptic_{split}.json",
      mask_dir="ade20k_panoptic_{split}",
      image_dir="images/{split_dir}",
      category_id_offset=1,
      check_categories=True,
    ),
    tasks=("panoptic", "semantic", "instance"),
  ),
  # Objects365 v2 boxes: TFDS dataset built once by readers/objects365_builder.py.
  "objects365": dict(
    source="reader",
    vocab="objects365",
    reader=dict(format="objects365_tfds", tfds_name="objects365"),
    tasks=("boxes", "instance"),
  ),
  "objects365_masks": dict(
    source="reader",
    vocab="objects365",
    splits={"validation": dict(split="val")},
    reader=dict(
      format="coco_instance",
      root="objects365",
      json="o365_instance_seg_val.json",
      image_dir="val",
      keep_empty=True,
    ),
    tasks=("instance",),
  ),
  # Cityscapes panoptic as cityscapesScripts' createPanopticImgs writes it (labelId
  # categories, string image ids, images in city sub-folders found by image id: its
  # JSON file_name '<id>_gtFine_leftImg8bit.png' is no file).
  "cityscapes": dict(
    source="reader",
    vocab="cityscapes",
    splits=_TRAIN_VAL,
    reader=dict(
      format="coco_panoptic",
      root="cityscapes",
      json="gtFine/cityscapes_panoptic_{split}.json",
      mask_dir="gtFine/cityscapes_panoptic_{split}",
      image_dir="leftImg8bit/{split}",
      image_id_suffix="_leftImg8bit.png",
      check_categories=True,
    ),
    tasks=("panoptic", "semantic"),
  ),
  # Pascal Context-59: VOC2010 images, the official trainval/*.mat label maps (459-class
  # ids, key LabelMap), VOC2010's Main train / val lists (4,998 / 5,105 images).
  "pascal_context": dict(
    source="reader",
    vocab="pascal_context59",
    splits=_TRAIN_VAL,
    reader=dict(
      format="semantic_png",
      root="VOCdevkit/VOC2010",
      image_dir="JPEGImages",
      mask_dir="trainval",
      file_list="ImageSets/Main/{split}.txt",
      unlisted="void",
    ),
    tasks=("semantic",),
  ),
  # A user's own data: everything from the config's `reader` and `vocab` fields.
  "custom": dict(
    source="reader", vocab="", reader={}, tasks=("panoptic", "semantic", "instance", "boxes")
  ),
}

EVALUATORS_BY_TASK = {
  "panoptic": ("panoptic",),
  "semantic": ("semantic",),
  "instance": ("instance",),
  "boxes": ("box",),
}


def lookup(name):
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}")
  return DATASETS[name]


def _join(base, path):
  if not base or os.path.isabs(path) or "://" in path:
    return path
  return os.path.join(base, path)


def reader_spec(name, split, data_dir, overrides=None, vocab=""):
  """The reader spec dict (input_pipeline/readers) of registry entry `name`, `split`.

  Registry path fields are filled for `split` and placed below `<data_dir>/<root>`;
  `overrides` (a config entry's `reader`) replace fields and are used as given.
  """
  info = lookup(name)
  if info["source"] != "reader":
    raise ValueError(f"dataset {name!r} is {info['source']}, it has no reader")
  defaults = dict(info.get("reader", {}))
  overrides = dict(overrides or {})
  splits = info.get("splits")
  if (
    splits is not None
    and split not in splits
    and any(f in defaults and f not in overrides for f in PATH_FIELDS)
  ):
    raise ValueError(
      f"dataset {name!r} has no split {split!r} in its default layout; "
      f"allowed: {', '.join(splits)} (or set its reader paths)"
    )
  fields = (splits or {}).get(split, dict(split=split))
  root = overrides.pop("root", defaults.pop("root", ""))
  base = _join(data_dir, root) if root else ""
  spec = {}
  for key, value in defaults.items():
    if key in PATH_FIELDS and isinstance(value, str):
      value = _join(base, value.format(**fields))
    spec[key] = value
  spec.update(overrides)
  spec.setdefault("split", split)
  spec.setdefault("vocab", vocab or info["vocab"])
  spec.setdefault("name", name)
  if spec.get("format") in ("tfds", "objects365_tfds"):
    spec.setdefault("data_dir", data_dir)
  return spec
