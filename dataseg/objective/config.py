"""Defaults of the DaTaSeg objective (losses, matching, merge, post-processing).

Design note. [paper]: tasks differ only by MERGE and post-processing; box-only data uses
BoxInst's projection term both as matching cost and as loss. [ours] (METHOD.md section 2):
every number below. Loss and cost weights, point counts and importance sampling follow
Mask2Former's official configs; box terms follow BoxInst (projection dice, pairwise colour
affinity with threshold 0.3, 3x3 neighbourhood with dilation 2, linear warm-up); the
soft per-class merge of semantic/stuff targets follows METHOD.md with the alternative
(`semantic_merge='hungarian_merged'`, MaskFormer-style one-to-one matching of proposals to
per-class targets) one switch away.
"""

import ml_collections


def loss_config() -> ml_collections.ConfigDict:
  """Objective config; every threshold of training and post-processing lives here."""
  c = ml_collections.ConfigDict()
  # Loss weights (also the matching cost weights, as in Mask2Former).
  c.class_weight = 2.0
  c.mask_bce_weight = 5.0
  c.dice_weight = 5.0
  c.background_weight = 0.1
  # 'weighted_mean': Mask2Former's CE, sum_q w_q ce_q / sum_q w_q over the global batch.
  # 'num_targets': sum_q w_q ce_q / global number of target segments.
  c.class_normalization = "weighted_mean"
  # [ours] Auxiliary per-pixel class loss (MaX-DeepLab / kMaX-DeepLab's semantic head):
  # softmax CE of the model's 'pixel_logits' (model.pixel_head) against the class of each
  # stride-4 cell's centre pixel, mean over labelled cells (void, crowd and padding
  # ignored; box-only data has none): dense supervision of the mask features with every
  # labelled pixel's class. 0 = off (Mask2Former, and every config here: in the demo's
  # budget it did not teach the things' shapes; README "The embedded demo", "Things").
  c.pixel_class_weight = 0.0
  # 'segment': each labelled segment's cells share one unit of weight (things count as
  # much as stuff regions); 'pixel': every labelled cell counts 1 (stuff dominates).
  c.pixel_class_balance = "segment"
  # Point sampling (Mask2Former / PointRend).
  c.num_points = 112 * 112
  c.oversample = 3.0
  c.importance_ratio = 0.75
  # Choice of the importance_ratio * num_points most uncertain of the candidates
  # (points.SELECT): 'exact' = detectron2's top-k set; 'sampled' (default, [ours]) = the
  # candidates at or above the matching quantile of the first 4096 of them (a uniform
  # subsample: ~97% of the chosen points are in the exact top-k, the rest just below its
  # threshold; tests/test_points.py). 'sampled' costs one counting pass over the
  # candidates instead of 32 (bench/points.py). Both are identical when there are at
  # most 4096 candidates.
  c.point_selection = "sampled"
  # Mask losses run on the supervised targets only, compacted into this many static rows
  # per image (losses.supervised_rows); 0 = max_segments rows (never drops a target).
  # Targets beyond the cap get no mask loss (class loss unchanged) and are counted in
  # the metric 'dropped_mask_targets'.
  c.max_mask_targets = 0
  # Hungarian matcher implementation: 'jax' (exact, in-graph) or 'scipy' (host callback).
  c.matcher = "jax"
  # Semantic targets (semantic task, stuff of panoptic task):
  #   'soft_merge': M_c = sum_i p_i(c) sigmoid(m_i) supervised against the class mask.
  #   'hungarian_merged': one-to-one matching of proposals to per-class targets.
  c.semantic_merge = "soft_merge"
  # Class target of a proposal under soft_merge (see merge.soft_class_targets).
  c.merge_fg_fraction = 0.5  # share of its soft mask inside the chosen class region.
  c.merge_min_points = 1.0  # soft mask mass (in sampled points) below which -> background.
  # Class-loss weight of the proposals soft_merge assigns to a merged (stuff) class
  # (merge.merge_class_weights), [ours] (issue 14: at full weight they outnumbered the
  # things ~14:1 and thing classes collapsed to stuff; ablation in README "The embedded
  # demo"):
  #   'top': only the top contributor of each merged class keeps it; the rest background.
  #   'no_object': background_weight each (Mask2Former's no-object weight, 0.1).
  #   'split': the n proposals of one merged target get 1/n each (each target counts once).
  #   'full': 1 each (the earlier rule).
  c.merge_class_weighting = "top"
  c.merged_prob_eps = 1e-4  # BCE on merged probabilities clipped to [eps, 1 - eps].
  # Ignore regions of the mask losses.
  c.ignore_void_in_merged = True  # void pixels: ignored by merged (per-class) masks.
  c.ignore_void_in_instances = False  # void pixels are negatives of instance masks.
  c.ignore_padding = True  # padding pixels (valid == False): ignored everywhere.
  # Box supervision (BoxInst).
  c.box = ml_collections.ConfigDict()
  c.box.projection_weight = 5.0
  c.box.pairwise_weight = 1.0  # 0 = off.
  c.box.pairwise_warmup_steps = 10_000
  c.box.pairwise_color_threshold = 0.3
  c.box.pairwise_size = 3
  c.box.pairwise_dilation = 2
  c.box.drop_zero_area_boxes = True
  c.deep_supervision = True
  # Post-processing (Mask2Former's defaults).
  c.post = ml_collections.ConfigDict()
  c.post.score_threshold = 0.8
  c.post.overlap_threshold = 0.8
  c.post.mask_threshold = 0.5
  c.post.top_k = 100
  return c
