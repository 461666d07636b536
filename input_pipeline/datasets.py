"""Registry of the datasets a config may name, with their tasks and vocabularies.

A config's dataset entry (configs/common.py: `dataset(...)`) names a key of `DATASETS`;
everything dataset-specific (where the files are, which reader, which class list, which
tasks it can train and be evaluated in) lives here, never in the model or the objective.
"""

DATASETS = {
    # The embedded synthetic suite (input_pipeline/synthetic.py), generated on first use.
    "shapes_panoptic": dict(source="synthetic", vocab="shapes_panoptic",
                            tasks=("panoptic", "semantic", "instance")),
    "shapes_semantic": dict(source="synthetic", vocab="shapes_semantic",
                            tasks=("semantic", "panoptic")),  # panoptic: weak transfer.
    "shapes_boxes": dict(source="synthetic", vocab="shapes_boxes",
                         tasks=("boxes", "instance")),  # val has masks for instance eval.
    "shapes_transfer": dict(source="synthetic", vocab="shapes_transfer",
                            tasks=("panoptic", "semantic", "instance")),
    # The paper's datasets and transfer sets (prepared by the user: see README).
    "coco_panoptic": dict(source="reader", vocab="coco_panoptic",
                          reader=dict(format="tfds", tfds_name="coco/2017_panoptic"),
                          tasks=("panoptic", "semantic", "instance")),
    "coco_instance": dict(source="reader", vocab="coco_panoptic",
                          reader=dict(format="tfds", tfds_name="coco/2017"),
                          tasks=("instance", "boxes")),
    "ade20k": dict(source="reader", vocab="ade20k",
                   reader=dict(format="tfds", tfds_name="scene_parse150"),
                   tasks=("semantic", "panoptic")),
    "objects365": dict(source="reader", vocab="objects365",
                       reader=dict(format="objects365_tfds", tfds_name="objects365"),
                       tasks=("boxes", "instance")),
    "objects365_masks": dict(source="reader", vocab="objects365",
                             reader=dict(format="coco_instance",
                                         json="o365_instance_seg_val.json"),
                             tasks=("instance",)),
    "cityscapes": dict(source="reader", vocab="cityscapes",
                       reader=dict(format="coco_panoptic"), tasks=("panoptic", "semantic")),
    "pascal_context": dict(source="reader", vocab="pascal_context59",
                           reader=dict(format="semantic_png"), tasks=("semantic",)),
    # A user's own data: everything from the config's `reader` and `vocab` fields.
    "custom": dict(source="reader", vocab="", reader={},
                   tasks=("panoptic", "semantic", "instance", "boxes")),
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
