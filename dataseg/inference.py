"""The one inference program: images -> post-processed panoptic, semantic, instance outputs.

Training-time evaluation (dataseg/train/eval_loop.py), the notebook Predictor
(dataseg/predictor.py), `python -m dataseg.evaluate` and launch/class_accuracy.py all run
`predict`, and turn one example of its output into a result with `example_result` and into
a picture with `overlay`. So the paths agree by construction: for the same batch of images
they execute the same compiled program.

One program per (run set-up, top_k), compiled once per input shape: the model's final-layer
proposals, the mask logits resized to the padded image, then all three tasks'
post-processing (dataseg/objective/postprocess.py). Computing every task in one program
costs little next to the model and the resize, which they share, and keeps the program
independent of which task a caller wants (a program with fewer outputs could fuse, and so
round, differently). The panoptic thresholds are arguments, so changing them needs no
recompilation.

Shapes: images [B, S, S, 3] float32 (the eval pipeline's, input_pipeline/preprocess.py),
valid [B, S, S] bool, vocabulary arrays padded to the run's static size V.
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dataseg import visualize
from dataseg.objective import postprocess
from dataseg.train import trainer

TASKS = ("panoptic", "semantic", "instance")
THRESHOLDS = ("score_threshold", "overlap_threshold", "mask_threshold")
OVERLAY_MIN_SCORE = 0.3  # instance overlays: masks below this score are not drawn.
OVERLAY_MAX_INSTANCES = 20


def config_thresholds(config) -> dict[str, np.float32]:
  """The run's panoptic post-processing thresholds (`config.loss.post`), as arguments."""
  return {k: np.float32(config.loss.post[k]) for k in THRESHOLDS}


def _one_image(class_logits, mask_logits, valid, vocab, thresholds, top_k):
  """[Q, V+1], [Q, h, w], [S, S] -> every task's outputs for one image."""
  logits = postprocess.resize_to_image(mask_logits, valid.shape)
  semantic = postprocess.semantic_inference(class_logits, logits, vocab["valid"])
  seg_map, cls, thing, score, seg_valid = postprocess.panoptic_inference(
    class_logits, logits, vocab["valid"], vocab["is_thing"], **thresholds
  )
  masks, classes, scores = postprocess.instance_inference(
    class_logits, logits, vocab["valid"], vocab["is_thing"], top_k=top_k
  )
  return dict(
    semantic=semantic,
    panoptic=dict(
      segment_map=seg_map,
      seg_class=jnp.where(seg_valid, cls, -1),
      seg_is_thing=thing,
      seg_score=score,
    ),
    instance=dict(masks=masks, classes=classes, scores=scores),
  )


@functools.lru_cache(maxsize=None)
def program(s: trainer.Setup, top_k: int):
  """jit((state, images, valid, vocab, thresholds) -> {task: batched outputs}).

  Outputs ([B, ...] each): 'semantic' int32 [B, S, S] class map; 'panoptic' dict of
  segment_map int32 [B, S, S] (slot index, -1 void), seg_class [B, Q] (-1: unused slot),
  seg_is_thing, seg_score; 'instance' dict of masks bool [B, K, S, S], classes [B, K]
  (-1: none), scores [B, K] with K = top_k.
  """
  forward = trainer.make_predict_fn(s)
  post = jax.vmap(functools.partial(_one_image, top_k=top_k), in_axes=(0, 0, 0, None, None))

  @jax.jit
  def run(state, images, valid, vocab, thresholds):
    class_logits, mask_logits = forward(state, images, vocab)
    return post(class_logits, mask_logits, valid, vocab, thresholds)

  return run


def predict(
  s: trainer.Setup,
  state,
  images,
  valid,
  vocab: Mapping[str, Any],
  thresholds: Mapping[str, Any] | None = None,
  top_k: int | None = None,
):
  """Runs `program` on a batch; numpy outputs on the host (see `program`).

  `thresholds` and `top_k` default to the set-up config's (`config.loss.post`).
  """
  post = s.config.loss.post
  thresholds = (
    config_thresholds(s.config)
    if thresholds is None
    else {k: np.float32(thresholds[k]) for k in THRESHOLDS}
  )
  run = program(s, int(post.top_k if top_k is None else top_k))
  return jax.device_get(run(state, images, valid, vocab, thresholds))


def valid_size(valid: np.ndarray) -> tuple[int, int]:
  """(h, w) of the valid (unpadded) top-left region of a [S, S] valid mask."""
  return int(valid.any(1).sum()), int(valid.any(0).sum())


def example_result(out, i: int, task: str, class_names, is_thing, hw) -> dict[str, Any]:
  """Example `i` of `predict`'s output for `task`, cropped to its valid region `hw`.

  Returns (arrays at the eval resolution):
    panoptic: 'segment_map' int32 [h, w] (index into 'segments', -1 void) and 'segments',
      a list of {id, class, name, score, is_thing, area} for the segments with pixels;
    semantic: 'class_map' int32 [h, w];
    instance: 'masks' bool [N, h, w], 'classes' int32 [N], 'scores' float32 [N], 'names',
      sorted by score (stable: equal scores keep the program's order).
  """
  h, w = hw
  names = list(class_names)
  result = dict(task=task, class_names=names)
  if task == "semantic":
    result["class_map"] = np.asarray(out["semantic"][i][:h, :w], np.int32)
  elif task == "panoptic":
    p = out["panoptic"]
    slot_map = p["segment_map"][i][:h, :w]
    segments, new_map = [], np.full(slot_map.shape, -1, np.int32)
    for slot in np.nonzero(p["seg_class"][i] >= 0)[0]:
      area = int((slot_map == slot).sum())
      if not area:
        continue
      c = int(p["seg_class"][i][slot])
      new_map[slot_map == slot] = len(segments)
      segments.append(
        dict(
          id=len(segments),
          **{"class": c},
          name=names[c],
          score=float(p["seg_score"][i][slot]),
          is_thing=bool(is_thing[c]),
          area=area,
        )
      )
    result.update(segment_map=new_map, segments=segments)
  elif task == "instance":
    r = out["instance"]
    keep = np.nonzero(r["classes"][i] >= 0)[0]
    keep = keep[np.argsort(-r["scores"][i][keep], kind="stable")]
    classes = r["classes"][i][keep].astype(np.int32)
    result.update(
      masks=r["masks"][i][keep][:, :h, :w].astype(bool),
      classes=classes,
      scores=r["scores"][i][keep].astype(np.float32),
      names=[names[c] for c in classes],
    )
  else:
    raise ValueError(f"task {task!r} is unknown; allowed: {', '.join(TASKS)}")
  return result


def overlay(
  result, min_score: float = OVERLAY_MIN_SCORE, max_instances: int = OVERLAY_MAX_INSTANCES
) -> np.ndarray:
  """uint8 [H, W + legend, 3]: a result's classes over its 'image', with a legend.

  Instance results show at most `max_instances` masks scoring at least `min_score`,
  the best on top, each with its box.
  """
  image, names = result["image"], result["class_names"]
  boxes = None
  if result["task"] == "semantic":
    seg_map, seg_class = result["class_map"], np.arange(len(names))
  elif result["task"] == "panoptic":
    seg_map = result["segment_map"]
    seg_class = np.array([s["class"] for s in result["segments"]], np.int64)
  else:
    seg_map = np.full(image.shape[:2], -1, np.int32)
    shown = [k for k in range(len(result["scores"])) if result["scores"][k] >= min_score][
      :max_instances
    ]
    for k in shown[::-1]:  # best on top.
      seg_map[result["masks"][k]] = k
    seg_class = np.where(np.isin(np.arange(len(result["classes"])), shown), result["classes"], -1)
    boxes = np.zeros((len(seg_class), 4), np.float32)
    for k in shown:
      ys, xs = np.nonzero(seg_map == k)
      if len(ys):
        boxes[k] = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
      else:
        seg_class[k] = -1
  return visualize.overlay(image, seg_map, seg_class, names, boxes=boxes)
