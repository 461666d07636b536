"""The embedded synthetic suite: four small TFDS datasets that mirror DaTaSeg's setting.

Real TFDS builders (not in-memory arrays) so that the same reader / preprocessing code that
serves COCO serves them too. Each dataset's classes, names and thing/stuff flags come from
`dataseg/vocab/<name>.json`; its `visual` field says what the generator draws for a class,
which is how two datasets can share a visual concept under different names (circle / disc /
ball). Everything is a pure function of (dataset, split, index, seed): building twice gives
identical examples.

  shapes_panoptic  like COCO panoptic: things over stuff, panoptic masks, crowd groups, void
                   borders between stuff regions; the largest.
  shapes_semantic  like ADE20k: semantic masks only, small, synonyms of shapes_panoptic's
                   classes plus classes of its own.
  shapes_boxes     like Objects365: boxes only in train (more thing classes, some never seen
                   with masks); its validation split carries instance masks for evaluating
                   weak supervision, like the paper's Objects365 mask benchmark.
  shapes_transfer  like Cityscapes / Pascal Context: validation only, unseen class names, for
                   direct open-vocabulary transfer.

Images are 96-144 px per side with colour/texture noise; thing colours are random, so a
thing's class is its shape, and stuff is told apart by colour and texture.
"""

import hashlib
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

_VOCAB_DIR = os.path.join(os.path.dirname(__file__), "..", "dataseg", "vocab")

SEED = 0
SUITE = ("shapes_panoptic", "shapes_semantic", "shapes_boxes", "shapes_transfer")

# name -> (label kind of the train split, split sizes, things per image).
_SETTINGS = {
  "shapes_panoptic": dict(
    labels="panoptic", splits={"train": 600, "validation": 100}, things=(1, 5), crowd_prob=0.15
  ),
  "shapes_semantic": dict(
    labels="semantic", splits={"train": 150, "validation": 100}, things=(1, 4), crowd_prob=0.0
  ),
  "shapes_boxes": dict(
    labels="boxes", splits={"train": 600, "validation": 100}, things=(1, 5), crowd_prob=0.0
  ),
  "shapes_transfer": dict(
    labels="panoptic", splits={"validation": 100}, things=(1, 4), crowd_prob=0.0
  ),
}
_UNLABELLED_STUFF = ("sky", "grass", "water", "sand")  # drawn behind box-only data.
_MIN_AREA = 12  # visible pixels; smaller (occluded) things are dropped, not labelled.


def _categories(name):
  with open(os.path.join(_VOCAB_DIR, f"{name}.json")) as f:
    return json.load(f)["categories"]


def _rng(name, split, index, seed):
  key = f"{name}/{split}/{index}/{seed}".encode()
  return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


def _stuff_texture(visual, h, w, rng):
  """[h, w, 3] float texture of a stuff class: colour + a pattern unique to the class."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  jitter = rng.uniform(-15, 15)
  if visual == "sky":
    base = np.array([135, 185, 235]) + (yy / h * 30)[..., None] * np.array([-1, -0.5, 0])
  elif visual == "grass":
    base = np.array([60, 150, 50]) + (18 * np.sin(xx * 1.3 + rng.uniform(0, 6)))[..., None]
  elif visual == "water":
    wave = 22 * np.sin(yy * 0.8 + 2 * np.sin(xx * 0.2 + rng.uniform(0, 6)))
    base = np.array([30, 70, 160]) + wave[..., None] * np.array([0.3, 0.6, 1.0])
  elif visual == "sand":
    base = np.array([220, 195, 130]) + rng.normal(0, 22, (h, w))[..., None]
  elif visual == "snow":
    base = np.array([238, 240, 248]) + (rng.random((h, w)) < 0.05)[..., None] * -40.0
  elif visual == "road":
    dash = ((np.abs(yy - h / 2) < 2) & ((xx // 8) % 2 == 0)) * 120.0
    base = np.array([90, 90, 95]) + dash[..., None] + rng.normal(0, 6, (h, w))[..., None]
  else:
    raise ValueError(f"unknown stuff visual {visual!r}")
  return np.broadcast_to(base + jitter, (h, w, 3)).astype(np.float32)


def _thing_mask(visual, h, w, cy, cx, size):
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  dy, dx, r = yy - cy, xx - cx, size / 2
  if visual == "circle":
    return dy**2 + dx**2 <= r**2
  if visual == "square":
    return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
  if visual == "triangle":  # apex up.
    return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
  if visual == "cross":
    arm = r * 0.3
    return ((np.abs(dy) <= arm) & (np.abs(dx) <= r)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
  if visual == "diamond":
    return np.abs(dy) + np.abs(dx) <= r
  if visual == "ring":
    d2 = dy**2 + dx**2
    return (d2 <= r**2) & (d2 >= (r * 0.55) ** 2)
  raise ValueError(f"unknown thing visual {visual!r}")


def _random_colour(rng):
  hue = rng.uniform(0, 1)
  rgb = np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1  # HSV with s=v=1.
  return np.clip(rgb, 0, 1) * rng.uniform(150, 255)


def generate_example(name, split, index, seed=SEED):
  """One example as numpy: image, panoptic-style segment map and segment table.

  Returns dict(image uint8 [h,w,3], segment_map int32 [h,w] (-1 void), seg_class [n],
  seg_is_crowd [n], seg_box float32 [n,4] (y0,x0,y1,x1) pixels, has_masks bool).
  """
  settings = _SETTINGS[name]
  categories = _categories(name)
  rng = _rng(name, split, index, seed)
  h, w = (int(v) for v in rng.integers(96, 145, size=2))
  labels = settings["labels"]
  stuff = [(i, c["visual"]) for i, c in enumerate(categories) if not c["isthing"]]
  things = [(i, c["visual"]) for i, c in enumerate(categories) if c["isthing"]]
  if not stuff:  # box-only data: unlabelled background.
    stuff = [(-1, v) for v in _UNLABELLED_STUFF]

  # Stuff: 2-3 horizontal bands with wavy borders; a 1-px void line on each border.
  k = int(rng.integers(2, 4))
  chosen = [stuff[j] for j in rng.choice(len(stuff), size=min(k, len(stuff)), replace=False)]
  xx = np.arange(w, dtype=np.float32)
  borders = np.sort(rng.uniform(0.15, 0.85, size=len(chosen) - 1)) * h
  band = np.zeros((h, w), np.int32)
  void = np.zeros((h, w), bool)
  yy = np.arange(h, dtype=np.float32)[:, None]
  for b in borders:
    line = b + rng.uniform(2, 8) * np.sin(xx * rng.uniform(0.03, 0.15) + rng.uniform(0, 6))
    band += (yy >= line[None, :]).astype(np.int32)
    void |= np.abs(yy - line[None, :]) < 0.5
  image = np.zeros((h, w, 3), np.float32)
  seg_map = np.full((h, w), -1, np.int32)
  table = []  # (class, is_crowd, mask)
  for j, (cls, visual) in enumerate(chosen):
    region = band == j
    image[region] = _stuff_texture(visual, h, w, rng)[region]
    if cls >= 0:
      table.append([cls, False, region & ~void])

  # Things, painted in order (later ones occlude earlier ones); optional crowd group.
  n_things = int(rng.integers(settings["things"][0], settings["things"][1] + 1))
  instances = []
  for _ in range(n_things):
    cls, visual = things[int(rng.integers(len(things)))]
    size = rng.uniform(14, 38)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    instances.append((cls, False, [_thing_mask(visual, h, w, cy, cx, size)]))
  if rng.random() < settings["crowd_prob"]:
    cls, visual = things[int(rng.integers(len(things)))]
    cy, cx = rng.uniform(15, h - 15), rng.uniform(15, w - 15)
    parts = [
      _thing_mask(
        visual, h, w, cy + rng.uniform(-10, 10), cx + rng.uniform(-10, 10), rng.uniform(6, 10)
      )
      for _ in range(int(rng.integers(4, 7)))
    ]
    instances.append((cls, True, parts))
  for cls, crowd, parts in instances:
    mask = np.zeros((h, w), bool)
    for part in parts:
      image[part] = _random_colour(rng)
      mask |= part
    for entry in table:  # occlusion: earlier segments lose the covered pixels.
      entry[2] = entry[2] & ~mask
    table.append([cls, crowd, mask])
  image += rng.normal(0, 8, image.shape)
  image = np.clip(image, 0, 255).astype(np.uint8)

  table = [e for e in table if e[2].sum() >= _MIN_AREA]
  if labels == "semantic":  # one segment per class present; no instances, no crowd.
    merged = {}
    for cls, _, mask in table:
      merged[cls] = merged.get(cls, np.zeros((h, w), bool)) | mask
    table = [[cls, False, mask] for cls, mask in sorted(merged.items())]
  boxes = []
  for s, (cls, crowd, mask) in enumerate(table):
    seg_map[mask] = s
    ys, xs = np.nonzero(mask)
    boxes.append([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
  has_masks = not (labels == "boxes" and split == "train")
  if not has_masks:
    seg_map[:] = -1
  return dict(
    image=image,
    segment_map=seg_map,
    seg_class=np.array([e[0] for e in table], np.int32),
    seg_is_crowd=np.array([e[1] for e in table], bool),
    seg_box=np.array(boxes, np.float32).reshape(-1, 4),
    has_masks=has_masks,
  )


class _ShapesBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared TFDS builder: features in the COCO-panoptic spirit (id PNG + segment list)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def _info(self):
    names = [c["name"] for c in _categories(self.name)]
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "image/id": np.int64,
          # 0 = void, k = row k-1 of `segments`; all 0 where the split has no masks.
          "panoptic": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "has_masks": np.bool_,
          "segments": tfds.features.Sequence(
            {
              "category": tfds.features.ClassLabel(names=names),
              "is_crowd": np.bool_,
              "bbox": tfds.features.BBoxFeature(),
            }
          ),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: generated from the seed.
    return {
      split: self._generate_examples(split, n)
      for split, n in _SETTINGS[self.name]["splits"].items()
    }

  def _generate_examples(self, split, num):
    for index in range(num):
      ex = generate_example(self.name, split, index)
      h, w = ex["segment_map"].shape
      scale = np.array([h, w, h, w], np.float32)
      yield (
        index,
        {
          "image": ex["image"],
          "image/id": index,
          "panoptic": (ex["segment_map"] + 1).astype(np.uint8)[..., None],
          "has_masks": ex["has_masks"],
          "segments": {
            "category": ex["seg_class"].astype(np.int64),
            "is_crowd": ex["seg_is_crowd"],
            "bbox": [tfds.features.BBox(*np.clip(b / scale, 0, 1)) for b in ex["seg_box"]],
          },
        },
      )


# One registered builder class per dataset; TFDS names them by snake_case class name.
class ShapesPanoptic(_ShapesBuilder):
  """shapes_panoptic: see module docstring."""


class ShapesSemantic(_ShapesBuilder):
  """shapes_semantic: see module docstring."""


class ShapesBoxes(_ShapesBuilder):
  """shapes_boxes: see module docstring."""


class ShapesTransfer(_ShapesBuilder):
  """shapes_transfer: see module docstring."""


BUILDERS = {cls.name: cls for cls in (ShapesPanoptic, ShapesSemantic, ShapesBoxes, ShapesTransfer)}


def builder(name, data_dir):
  """The prepared TFDS builder of `name`, generated into `data_dir` on first use."""
  if name not in BUILDERS:
    raise ValueError(f"unknown synthetic dataset {name!r}; allowed: {', '.join(BUILDERS)}")
  b = BUILDERS[name](data_dir=os.fspath(data_dir))
  if not tf.io.gfile.exists(os.path.join(b.data_dir, "dataset_info.json")):
    b.download_and_prepare()
  return b


def prepare_shared(names, data_dir):
  """Generates the datasets `names` into `data_dir` once, however many processes start.

  N processes (jax.distributed) on one fresh workdir would all run TFDS's
  download_and_prepare into the same folder, and the losers' final rename fails. Process 0
  generates while the others wait at a barrier; then each process opens the builders, which
  finds the data when `data_dir` is shared and generates its own copy when it is not (a
  per-host local folder). Every process must call this, with the same names.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    if jax.process_index() == 0:
      for name in names:
        builder(name, data_dir)
    multihost_utils.sync_global_devices("dataseg.synthetic.prepare_shared")
  for name in names:
    builder(name, data_dir)


def decode(example, is_thing):
  """TFDS example of the suite -> decoded example of dataseg/schema.py (TF ops).

  `is_thing`: [V] bool, the vocabulary's thing flags.
  """
  image = example["image"]
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  seg = example["segments"]
  seg_class = tf.cast(seg["category"], tf.int32)
  return {
    "image": image,
    "segment_map": tf.cast(example["panoptic"][..., 0], tf.int32) - 1,
    "seg_class": seg_class,
    "seg_box": seg["bbox"] * tf.stack([h, w, h, w]),
    "seg_is_thing": tf.gather(tf.constant(is_thing, tf.bool), seg_class),
    "seg_is_crowd": seg["is_crowd"],
    "image_id": example["image/id"],
  }
