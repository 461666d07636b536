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

The image path is the training-time evaluation's: the eval resize
(input_pipeline/preprocess.py: longer side -> `eval_image_size`, pad bottom/right), then
the one inference program (dataseg/inference.py, which `dataseg/train/eval_loop.py` runs
too) with the run's thresholds, then crop to the valid region. `predict_batch` with the
eval batch's images therefore runs the same program on the same inputs as the evaluation;
by default results are then resized back (nearest) to the image's original size.

A vocabulary is a [V, D] matrix of class-name text embeddings padded to the run's static
size V (dataseg/vocab/padded.py), so a program compiles once per (task, padded size) and
a new list of names needs no new parameters.
"""

import dataclasses
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from dataseg import config_lib
from dataseg import inference
from dataseg import visualize
from dataseg.train import checkpoint as checkpoint_lib
from dataseg.train import sharding as sharding_lib
from dataseg.train import trainer
from dataseg.vocab import padded as padded_vocab

TASKS = inference.TASKS


def single_device_mesh(device=None) -> jax.sharding.Mesh:
  """A (1, 1, 1) mesh over one local device: every parameter replicated on it."""
  device = device or jax.local_devices()[0]
  return jax.make_mesh((1,) * len(sharding_lib.MESH_AXES), sharding_lib.MESH_AXES,
                       devices=[device],
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sharding_lib.MESH_AXES))


def data_parallel_mesh() -> jax.sharding.Mesh:
  """All devices on the `data` axis (parameters replicated): evaluation on any machine."""
  return sharding_lib.make_mesh(dict(data=-1, fsdp=1, model=1))


@dataclasses.dataclass
class Run:
  """A workdir's config, model set-up, vocabularies and restored parameters."""
  workdir: str
  config: ml_collections.ConfigDict
  setup: trainer.Setup
  state: dict
  step: int
  vocabs: dict  # {train key | 'eval:<key>': padded_vocab.PaddedVocab}
  vocab_size: int


def load_run(workdir, *, config=None, step=None, mesh=None) -> Run:
  """Restores a workdir's checkpoint (default: latest) for inference on `mesh`.

  `config` defaults to the run's own; `mesh` to `single_device_mesh()`.
  """
  workdir = os.fspath(workdir)
  config = config if config is not None else config_lib.load_workdir_config(workdir)
  vocabs = padded_vocab.build_vocabularies(config, workdir)
  size = padded_vocab.vocab_size(config, vocabs)
  s = trainer.setup(config, len(config.datasets), size, mesh=mesh or single_device_mesh())
  step, state = checkpoint_lib.restore_inference_state(
      os.path.join(workdir, "checkpoints"), s.abstract_state, step)
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
  def default_vocab(self) -> padded_vocab.PaddedVocab:
    return self.run.vocabs[self.default_vocab_key("panoptic")]

  @classmethod
  def from_workdir(cls, workdir, step: int | None = None, *, config=None, device=None):
    """Latest (or `step`'s) checkpoint of `workdir` on one local device."""
    return cls(load_run(workdir, config=config, step=step, mesh=single_device_mesh(device)))

  @property
  def step(self) -> int:
    return self.run.step

  # ---------------------------------------------------------------- vocabularies.
  def vocabulary(self, class_names=None, is_thing=None, task=None) -> padded_vocab.PaddedVocab:
    """A padded vocabulary for `class_names` (None: `default_vocab_key(task)`'s).

    `is_thing` defaults to the flag of the same name in the run's vocabularies, else
    True (a thing: one segment per proposal).
    """
    if class_names is None:
      vocab = self.run.vocabs[self.default_vocab_key(task)]
      if is_thing is None:
        return vocab
      class_names = list(vocab.names)
    return padded_vocab.from_names(self.config, self.run.vocabs, self.run.vocab_size,
                                   class_names, is_thing, self.run.workdir)

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
    return self.predict_batch([image], task, class_names, is_thing, original_size)[0]

  def predict_batch(self, images, task: str = "panoptic",
                    class_names: Sequence[str] | None = None,
                    is_thing: Sequence[bool] | None = None, original_size: bool = True
                    ) -> list[dict[str, Any]]:
    """`predict` for several images in one call of the inference program.

    The images (any sizes) are each resized and padded as the eval pipeline does and
    stacked into one batch: with the eval batch's images, this runs the very program
    training-time evaluation runs (dataseg/inference.py), on the same inputs.
    """
    if task not in TASKS:
      raise ValueError(f"task {task!r} is unknown; allowed: {', '.join(TASKS)}")
    images = [_read_image(image) for image in images]
    vocab = self.vocabulary(class_names, is_thing, task)
    padded, valid = zip(*(eval_preprocess(image, self.config.eval_image_size)
                          for image in images))
    out = inference.predict(self.run.setup, self.run.state, np.stack(padded),
                            np.stack(valid), vocab.arrays(),
                            inference.config_thresholds(self.config),
                            top_k=self.config.loss.post.top_k)
    results = []
    for i, image in enumerate(images):
      h, w = inference.valid_size(valid[i])
      result = inference.example_result(out, i, task, vocab.names, vocab.is_thing, (h, w))
      result["image"] = padded[i][:h, :w]
      if original_size:
        size = image.shape[:2]
        for key in ("segment_map", "class_map", "masks"):
          if key in result:
            result[key] = resize_nearest(result[key], size)
        result["image"] = image
      results.append(result)
    return results

  # -------------------------------------------------------------- visualisation.
  @staticmethod
  def overlay(result, min_score: float = inference.OVERLAY_MIN_SCORE) -> np.ndarray:
    """uint8 [H, W + legend, 3]: the result's classes over its image, with a legend."""
    return inference.overlay(result, min_score=min_score)

  def save_overlay(self, result, path, **kwargs) -> str:
    """Writes `overlay(result)` as a PNG; returns the path."""
    visualize.save_png(path, self.overlay(result, **kwargs))
    return os.fspath(path)
