"""Notebook inference: a trained workdir -> panoptic / semantic / instance results.

  p = Predictor.from_workdir("workdirs/demo")
  result = p.predict(image, task="panoptic")                    # the run's own vocabulary
  result = p.predict("photo.png", task="semantic",
                     class_names=["sky", "grass", "dog"])       # any names: open vocabulary
  p.save_overlay(result, "overlay.png")

Any machine loads any checkpoint (parameters only, EMA when kept, replicated on one local
device). Images take the evaluation's path (dataseg/images.py, then dataseg/inference.py's
program), so `predict_batch` on an eval batch's images runs what training-time evaluation
runs; results are resized back to each image's size. Any list of names is a vocabulary
(dataseg/vocab/padded.py).
"""

import dataclasses
import os
from typing import Any, Sequence

import ml_collections
import numpy as np

from dataseg import config_lib
from dataseg import images as images_lib
from dataseg import inference
from dataseg import visualize
from dataseg.train import checkpoint as checkpoint_lib
from dataseg.train import compile_cache
from dataseg.train import sharding as sharding_lib
from dataseg.train import trainer
from dataseg.vocab import padded as padded_vocab

TASKS = inference.TASKS


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

  `config` defaults to the run's own; `mesh` to `sharding.single_device_mesh()`. Turns on
  jax's persistent compilation cache (`config.compilation_cache_dir`) as `dataseg.main`
  does, so a second session loads the inference programs instead of compiling them.
  """
  workdir = os.fspath(workdir)
  config = config if config is not None else config_lib.load_workdir_config(workdir)
  compile_cache.enable(config.get("compilation_cache_dir", compile_cache.DEFAULT_DIR))
  vocabs = padded_vocab.build_vocabularies(config, workdir)
  size = padded_vocab.vocab_size(config, vocabs)
  mesh = mesh or sharding_lib.single_device_mesh()
  s = trainer.setup(config, len(config.datasets), size, mesh=mesh)
  step, state = checkpoint_lib.restore_inference_state(
    os.path.join(workdir, "checkpoints"), s.abstract_state, step
  )
  return Run(workdir, config, s, state, step, vocabs, size)


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
    return cls(
      load_run(workdir, config=config, step=step, mesh=sharding_lib.single_device_mesh(device))
    )

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
    return padded_vocab.from_names(
      self.config, self.run.vocabs, self.run.vocab_size, class_names, is_thing, self.run.workdir
    )

  # ------------------------------------------------------------------ inference.
  def predict(
    self,
    image,
    task: str = "panoptic",
    class_names: Sequence[str] | None = None,
    is_thing: Sequence[bool] | None = None,
    original_size: bool = True,
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

  def predict_batch(
    self,
    images,
    task: str = "panoptic",
    class_names: Sequence[str] | None = None,
    is_thing: Sequence[bool] | None = None,
    original_size: bool = True,
  ) -> list[dict[str, Any]]:
    """`predict` for several images in one call of the inference program.

    The images (any sizes) are each resized and padded as the eval pipeline does and
    stacked into one batch: with the eval batch's images, this runs the very program
    training-time evaluation runs (dataseg/inference.py), on the same inputs.
    """
    if task not in TASKS:
      raise ValueError(f"task {task!r} is unknown; allowed: {', '.join(TASKS)}")
    images = [images_lib.read_image(image) for image in images]
    vocab = self.vocabulary(class_names, is_thing, task)
    padded, valid = zip(
      *(images_lib.eval_preprocess(image, self.config.eval_image_size) for image in images)
    )
    out = inference.predict(
      self.run.setup,
      self.run.state,
      np.stack(padded),
      np.stack(valid),
      vocab.arrays(),
      inference.config_thresholds(self.config),
      top_k=self.config.loss.post.top_k,
    )
    results = []
    for i, image in enumerate(images):
      h, w = inference.valid_size(valid[i])
      result = inference.example_result(out, i, task, vocab.names, vocab.is_thing, (h, w))
      result["image"] = padded[i][:h, :w]
      if original_size:
        size = image.shape[:2]
        for key in ("segment_map", "class_map", "masks"):
          if key in result:
            result[key] = images_lib.resize_nearest(result[key], size)
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
