"""Notebook inference: a trained workdir -> panoptic / semantic / instance results.

  p = Predictor.from_workdir("workdirs/demo")
  result = p.predict(image, task="panoptic")                    # the run's own vocabulary
  result = p.predict("photo.png", task="semantic",
                     class_names=["sky", "grass", "dog"])       # any names: open vocabulary
  p.save_overlay(result, "overlay.png")

Any machine loads any checkpoint: the parameters are restored onto one local device
(a CPU laptop included) with replicated shardings, whatever mesh the run trained on
(orbax re-shards). Only the parameters are read (EMA ones when the run kept them, as
the trainer's evaluation does), never the optimizer state.

The image path is the training-time evaluation's, step for step: the eval resize
(input_pipeline/preprocess.py: longer side -> `eval_image_size`, pad bottom/right), the
model's final-layer proposals, the mask logits resized to the padded image, the task's
post-processing (dataseg/objective/postprocess.py) with the run's thresholds, then crop to
the valid region. At the eval resolution the outputs therefore equal what
`dataseg/train/evaluation.py` scores; by default they are then resized back (nearest) to
the image's original size.

A vocabulary is a [V, D] matrix of class-name text embeddings (dataseg/text.py, with the
run's encoder and templates), padded to the run's static size V (or the next multiple of
64 above it for longer lists), so a program compiles once per (task, padded size) and a
new list of names needs no new parameters.
"""

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dataseg import text as text_lib
from dataseg import visualize
from dataseg.objective import postprocess
from dataseg.train import data as data_lib
from dataseg.train import sharding as sharding_lib
from dataseg.train import trainer

TASKS = ("panoptic", "semantic", "instance")
_PAD_MULTIPLE = 64
_OVERLAY_MIN_SCORE = 0.3   # instance overlays: masks below this score are not drawn.
_OVERLAY_MAX_INSTANCES = 20


def load_config(workdir: str | os.PathLike[str]) -> ml_collections.ConfigDict:
  """The run's config (`<workdir>/config.json`, written by the trainer at step 0)."""
  path = pathlib.Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: is {workdir} a dataseg.main workdir?")
  with path.open() as f:
    return ml_collections.ConfigDict(json.load(f))


def single_device_mesh(device=None) -> jax.sharding.Mesh:
  """A (1, 1, 1) mesh over one local device: every parameter replicated on it."""
  device = device or jax.local_devices()[0]
  return jax.make_mesh((1,) * len(sharding_lib.MESH_AXES), sharding_lib.MESH_AXES,
                       devices=[device],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sharding_lib.MESH_AXES))


def data_parallel_mesh() -> jax.sharding.Mesh:
  """All devices on the `data` axis (parameters replicated): evaluation on any machine."""
  return sharding_lib.make_mesh(dict(data=-1, fsdp=1, model=1))


def checkpoint_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  if not directory.is_dir():
    return []
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False)) as manager:
    return sorted(manager.all_steps())


def restore_inference_state(workdir, s: trainer.Setup, step: int | None = None):
  """(step, {'params', 'frozen'}) of a checkpoint, EMA parameters preferred.

  Reads only step, params, frozen and ema (partial restore): the optimizer state, often
  twice the parameters, never leaves the disk.
  """
  directory = pathlib.Path(workdir).resolve() / "checkpoints"
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {directory}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"no checkpoint for step {step} under {directory}; "
                     f"available: {', '.join(map(str, steps))}")
  wanted = {k: v for k, v in s.abstract_state.items()
            if k in ("step", "params", "frozen", "ema")}
  restore_args = ocp.checkpoint_utils.construct_restore_args(wanted)
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=True)))["state"]
  params = restored.get("ema", restored["params"])
  return step, dict(params=params, frozen=restored["frozen"])


@dataclasses.dataclass
class Run:
  """A workdir's config, model set-up, vocabularies and restored parameters."""
  workdir: str
  config: ml_collections.ConfigDict
  setup: trainer.Setup
  state: dict
  step: int
  vocabs: dict  # {train key | 'eval:<key>': trainer.Vocab}
  vocab_size: int


def load_run(workdir, *, config=None, step=None, mesh=None) -> Run:
  """Restores a workdir's checkpoint (default: latest) for inference on `mesh`.

  `config` defaults to the run's own; `mesh` to `single_device_mesh()`.
  """
  workdir = os.fspath(workdir)
  config = config if config is not None else load_config(workdir)
  vocabs = data_lib.build_vocabularies(config, workdir)
  size = data_lib.vocab_size(config, vocabs)
  s = trainer.setup(config, len(config.datasets), size, mesh=mesh or single_device_mesh())
  step, state = restore_inference_state(workdir, s, step)
  return Run(workdir, config, s, state, step, vocabs, size)


def _nearest_indices(out_size: int, in_size: int) -> np.ndarray:
  """Half-pixel nearest-neighbour source rows (tf.image.resize 'nearest')."""
  src = np.floor((np.arange(out_size) + 0.5) * (in_size / out_size)).astype(np.int64)
  return np.minimum(src, in_size - 1)


def resize_nearest(x: np.ndarray, hw: Sequence[int]) -> np.ndarray:
  """[..., h, w] -> [..., H, W] nearest (label maps, masks)."""
  rows = _nearest_indices(hw[0], x.shape[-2])
  cols = _nearest_indices(hw[1], x.shape[-1])
  return x[..., rows, :][..., cols]


def _read_image(image) -> np.ndarray:
  if isinstance(image, (str, os.PathLike)):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    with Image.open(image) as im:
      image = np.asarray(im.convert("RGB"))
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, -1)
  if image.ndim != 3 or image.shape[-1] not in (3, 4):
    raise ValueError(f"image must be [H, W, 3] (or a path), got shape {image.shape}")
  image = image[..., :3]
  if image.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got {image.dtype}")
  return image


def eval_preprocess(image: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 [H, W, 3] -> (image [S, S, 3], valid [S, S]) exactly as the eval pipeline does."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from input_pipeline import preprocess  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  # One empty (zero-area) segment: the segment table code needs a row to gather from.
  decoded = dict(image=tf.constant(image), segment_map=-tf.ones((h, w), tf.int32),
                 seg_class=tf.zeros((1,), tf.int32), seg_box=tf.zeros((1, 4), tf.float32),
                 seg_is_thing=tf.zeros((1,), tf.bool), seg_is_crowd=tf.zeros((1,), tf.bool),
                 image_id=tf.constant(0, tf.int64))
  out = preprocess.eval_preprocess(decoded, image_size=image_size, max_segments=1,
                                   task_id=0, dataset_id=0)
  return out["image"].numpy(), out["valid"].numpy()


@functools.lru_cache(maxsize=None)
def _program(s: trainer.Setup, task: str, top_k: int):
  """jit((state, images [1,S,S,3], valid [S,S], vocab, thresholds) -> task outputs).

  Cached per (run set-up, task): compiled once per padded vocabulary size. The panoptic
  thresholds are arguments, so changing them in a notebook needs no recompilation.
  """
  predict = trainer.make_predict_fn(s)

  @jax.jit
  def run(state, images, valid, vocab, thresholds):
    class_logits, mask_logits = predict(state, images, vocab)
    class_logits, mask_logits = class_logits[0], mask_logits[0]  # [Q, V+1], [Q, h, w]
    logits = postprocess.resize_to_image(mask_logits, valid.shape)
    if task == "semantic":
      return dict(class_map=postprocess.semantic_inference(
          class_logits, logits, vocab["valid"]))
    if task == "panoptic":
      seg_map, cls, thing, score, seg_valid = postprocess.panoptic_inference(
          class_logits, logits, vocab["valid"], vocab["is_thing"], **thresholds)
      return dict(segment_map=seg_map, seg_class=jnp.where(seg_valid, cls, -1),
                  seg_is_thing=thing, seg_score=score)
    masks, classes, scores = postprocess.instance_inference(
        class_logits, logits, vocab["valid"], vocab["is_thing"], top_k=top_k)
    return dict(masks=masks, classes=classes, scores=scores)
  return run


class Predictor:
  """Inference with one restored checkpoint for any image, task and vocabulary."""

  def __init__(self, run: Run):
    self.run = run
    self.config = run.config

  def default_vocab_key(self, task: str | None = None) -> str:
    """The training dataset whose vocabulary `class_names=None` means.

    The first (in the config's order) trained on `task` ('boxes' counting as
    'instance'), else the first training dataset.
    """
    keys = list(self.config.datasets.keys())
    for key in keys:
      trained = self.config.datasets[key].task
      if trained == task or (task == "instance" and trained == "boxes"):
        return key
    return keys[0]

  @property
  def default_vocab(self) -> trainer.Vocab:
    return self.run.vocabs[self.default_vocab_key("panoptic")]

  @classmethod
  def from_workdir(cls, workdir, step: int | None = None, *, config=None, device=None):
    """Latest (or `step`'s) checkpoint of `workdir` on one local device."""
    return cls(load_run(workdir, config=config, step=step, mesh=single_device_mesh(device)))

  @property
  def step(self) -> int:
    return self.run.step

  # ---------------------------------------------------------------- vocabularies.
  def _text_embeddings(self, class_names):
    text = self.config.text
    kwargs = {}
    if text.templates != "default":
      kwargs["templates"] = text.templates.split("|")
    cache = text.cache_dir or os.path.join(self.run.workdir, "text_cache")
    return text_lib.class_embeddings(class_names, encoder=text.encoder, cache_dir=cache,
                                     **kwargs)

  def _known_is_thing(self, name):
    for vocab in self.run.vocabs.values():
      if name in vocab.names:
        return bool(vocab.is_thing[vocab.names.index(name)])
    return True

  def vocabulary(self, class_names=None, is_thing=None, task=None) -> trainer.Vocab:
    """A padded vocabulary for `class_names` (None: `default_vocab_key(task)`'s).

    `is_thing` defaults to the flag of the same name in the run's vocabularies, else
    True (a thing: one segment per proposal).
    """
    if class_names is None:
      vocab = self.run.vocabs[self.default_vocab_key(task)]
      if is_thing is None:
        return vocab
      class_names = list(vocab.names)
    class_names = [str(n) for n in class_names]
    n = len(class_names)
    if not n:
      raise ValueError("class_names is empty")
    if is_thing is None:
      is_thing = [self._known_is_thing(c) for c in class_names]
    if len(is_thing) != n:
      raise ValueError(f"is_thing has {len(is_thing)} entries for {n} class names")
    size = self.run.vocab_size
    if n > size:
      size = -(-n // _PAD_MULTIPLE) * _PAD_MULTIPLE
    index = -1
    if self.config.classifier == "learned":
      for key, vocab in self.run.vocabs.items():
        if not key.startswith("eval:") and list(vocab.names) == class_names:
          index = vocab.index
      if index < 0:
        raise ValueError("this run's classifier is 'learned' (per-dataset weights): it only "
                         "predicts the vocabularies of its training datasets")
      text = np.zeros((n, self.config.model.classifier.text_dim), np.float32)
    else:
      text = self._text_embeddings(class_names)
    pad = size - n
    return trainer.Vocab(
        names=tuple(class_names),
        is_thing=np.pad(np.asarray(is_thing, bool), (0, pad)),
        valid=np.arange(size) < n,
        text=np.pad(np.asarray(text, np.float32), ((0, pad), (0, 0))),
        index=max(index, 0))

  # ------------------------------------------------------------------ inference.
  def predict(self, image, task: str = "panoptic", class_names: Sequence[str] | None = None,
              is_thing: Sequence[bool] | None = None, original_size: bool = True
              ) -> dict[str, Any]:
    """Segments one image.

    Args:
      image: uint8 [H, W, 3] array or an image file path.
      task: 'panoptic' | 'semantic' | 'instance'.
      class_names: the vocabulary, any names (None: the vocabulary the run trained
        `task` on, see `default_vocab_key`).
      is_thing: [V] thing flags for `class_names` (see `vocabulary`).
      original_size: results at [H, W] (True) or at the eval resolution, i.e. the
        resized image's valid region, exactly as training-time evaluation scores them.

    Returns:
      dict with 'task', 'image' (uint8, at the result's resolution), 'class_names' and
      panoptic: 'segment_map' int32 [H, W] (index into 'segments', -1 void),
        'segments' list of {id, class, name, score, is_thing, area};
      semantic: 'class_map' int32 [H, W];
      instance: 'masks' bool [N, H, W], 'classes' int32 [N], 'scores' float32 [N],
        'names' [N], sorted by score (N <= config.loss.post.top_k).
    """
    if task not in TASKS:
      raise ValueError(f"task {task!r} is unknown; allowed: {', '.join(TASKS)}")
    image = _read_image(image)
    vocab = self.vocabulary(class_names, is_thing, task)
    names = list(vocab.names)
    padded, valid = eval_preprocess(image, self.config.eval_image_size)
    post = self.config.loss.post
    thresholds = {k: np.float32(post[k]) for k in
                  ("score_threshold", "overlap_threshold", "mask_threshold")}
    out = jax.device_get(_program(self.run.setup, task, post.top_k)(
        self.run.state, padded[None], valid, vocab.arrays(), thresholds))
    h, w = int(valid.any(1).sum()), int(valid.any(0).sum())
    if original_size:
      size = image.shape[:2]
      fit = lambda x: resize_nearest(x[..., :h, :w], size)
      shown = image
    else:
      fit = lambda x: x[..., :h, :w]
      shown = padded[:h, :w]
    result = dict(task=task, image=shown, class_names=names)
    if task == "semantic":
      result["class_map"] = fit(out["class_map"]).astype(np.int32)
    elif task == "panoptic":
      slot_map = fit(out["segment_map"])
      segments, new_map = [], np.full(slot_map.shape, -1, np.int32)
      for slot in np.nonzero(out["seg_class"] >= 0)[0]:
        area = int((slot_map == slot).sum())
        if not area:
          continue
        c = int(out["seg_class"][slot])
        new_map[slot_map == slot] = len(segments)
        segments.append(dict(id=len(segments), **{"class": c}, name=names[c],
                             score=float(out["seg_score"][slot]),
                             is_thing=bool(vocab.is_thing[c]), area=area))
      result.update(segment_map=new_map, segments=segments)
    else:
      keep = np.nonzero(out["classes"] >= 0)[0]
      keep = keep[np.argsort(-out["scores"][keep], kind="stable")]
      classes = out["classes"][keep].astype(np.int32)
      result.update(masks=fit(out["masks"][keep]).astype(bool), classes=classes,
                    scores=out["scores"][keep].astype(np.float32),
                    names=[names[c] for c in classes])
    return result

  # -------------------------------------------------------------- visualisation.
  @staticmethod
  def overlay(result, min_score: float = _OVERLAY_MIN_SCORE) -> np.ndarray:
    """uint8 [H, W + legend, 3]: the result's classes over its image, with a legend."""
    image, names = result["image"], result["class_names"]
    boxes = None
    if result["task"] == "semantic":
      seg_map, seg_class = result["class_map"], np.arange(len(names))
    elif result["task"] == "panoptic":
      seg_map = result["segment_map"]
      seg_class = np.array([s["class"] for s in result["segments"]], np.int64)
    else:
      seg_map = np.full(image.shape[:2], -1, np.int32)
      shown = [k for k in range(len(result["scores"]))
               if result["scores"][k] >= min_score][:_OVERLAY_MAX_INSTANCES]
      for k in shown[::-1]:  # best on top.
        seg_map[result["masks"][k]] = k
      seg_class = np.where(np.isin(np.arange(len(result["classes"])), shown),
                           result["classes"], -1)
      boxes = np.zeros((len(seg_class), 4), np.float32)
      for k in shown:
        ys, xs = np.nonzero(seg_map == k)
        if len(ys):
          boxes[k] = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
        else:
          seg_class[k] = -1
    return visualize.overlay(image, seg_map, seg_class, names, boxes=boxes)

  def save_overlay(self, result, path, **kwargs) -> str:
    """Writes `overlay(result)` as a PNG; returns the path."""
    visualize.save_png(path, self.overlay(result, **kwargs))
    return os.fspath(path)
