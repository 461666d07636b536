r"""Input pipeline throughput: COCO-like panoptic, LSJ to 1024x1024, images/s per CPU core.

Writes synthetic COCO-panoptic files of COCO's size distribution (JPEG images with the
longer side 640 and the shorter side 360-640, ~20 segments each, RGB-id panoptic PNGs,
a panoptic JSON) to a temp dir, then times the training pipeline that reads them:
JPEG + PNG decode, id mapping, large-scale jitter (scale 0.1-2.0, crop/pad to 1024),
flip, segment-table rebuild, batching. Prints images/s, images/s per core and the ratio
to the 20 images/s/core target.

  python bench/input_pipeline.py --images 48 --batches 12 --batch_size 8

"Per core" divides by the cores this process may use (sched_getaffinity), which is
also the size of tf.data's thread pool; on a shared machine the figure is a lower bound.
"""

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image
from PIL import ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataseg import schema  # pylint: disable=g-import-not-at-top,wrong-import-position
from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position

TARGET = 20.0  # images/s/core

_IMAGES = flags.DEFINE_integer("images", 48, "fixture images (also the shuffle buffer)")
_BATCHES = flags.DEFINE_integer("batches", 12, "timed batches")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "images per batch")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 1024, "LSJ output side")
_MAX_SEGMENTS = flags.DEFINE_integer("max_segments", 100, "segment slots per example")
_CORES = flags.DEFINE_integer(
  "cores", len(os.sched_getaffinity(0)), "pipeline threads (default: this process's cores)"
)


def write_fixture(root, n, seed=0):
  """COCO-like panoptic files; returns a coco_panoptic reader spec."""
  rng = np.random.default_rng(seed)
  for d in ("images", "panoptic"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  categories = [dict(id=i + 1, name=f"thing{i}", isthing=1) for i in range(80)] + [
    dict(id=100 + i, name=f"stuff{i}", isthing=0) for i in range(53)
  ]
  images, anns = [], []
  for i in range(n):
    short = int(rng.integers(360, 641))
    h, w = (short, 640) if rng.random() < 0.7 else (640, short)
    image = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    ids = Image.new("RGB", (w, h), (0, 0, 0))
    draw_i, draw_m = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    segs = []
    n_segs = int(rng.integers(15, 26))
    for k in range(n_segs):
      seg_id = 1 + k * 4099
      colour = tuple(int(c) for c in (seg_id % 256, seg_id // 256 % 256, seg_id // 65536))
      y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
      y1, x1 = y0 + rng.integers(10, h // 2), x0 + rng.integers(10, w // 2)
      box = [int(x0), int(y0), int(min(x1, w) - x0), int(min(y1, h) - y0)]
      shape = draw_i.ellipse if k % 2 else draw_i.rectangle
      shape([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
      (draw_m.ellipse if k % 2 else draw_m.rectangle)([x0, y0, x1, y1], fill=colour)
      thing = k >= 4
      cat = int(rng.integers(1, 81)) if thing else int(rng.integers(100, 153))
      segs.append(dict(id=seg_id, category_id=cat, iscrowd=0, bbox=box, area=1))
    # Texture so JPEG decode cost resembles a photo's.
    arr = np.asarray(image).astype(np.int16) + rng.integers(-12, 13, (h, w, 3))
    name = f"{i:012d}"
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(
      os.path.join(root, "images", name + ".jpg"), quality=90
    )
    ids.save(os.path.join(root, "panoptic", name + ".png"))
    images.append(dict(id=i, file_name=name + ".jpg", height=h, width=w))
    anns.append(dict(image_id=i, file_name=name + ".png", segments_info=segs))
  path = os.path.join(root, "panoptic.json")
  with open(path, "w") as f:
    json.dump(dict(images=images, annotations=anns, categories=categories), f)
  return dict(
    format="coco_panoptic",
    json=path,
    image_dir=os.path.join(root, "images"),
    mask_dir=os.path.join(root, "panoptic"),
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with tempfile.TemporaryDirectory() as root:
    spec = write_fixture(root, _IMAGES.value)
    it = pipeline.make_iterator(
      spec,
      batch_size=_BATCH_SIZE.value,
      image_size=_IMAGE_SIZE.value,
      max_segments=_MAX_SEGMENTS.value,
      task_id=schema.task_id("panoptic"),
      training=True,
      seed=0,
      process_index=0,
      process_count=1,
      shuffle_buffer=_IMAGES.value,
      threads=_CORES.value,
    )
    next(it)  # warm-up: tracing, thread pools, first shuffle buffer fill
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(_BATCHES.value):
      next(it)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    del it  # Stop the prefetch threads before the files go away.
  images = _BATCHES.value * _BATCH_SIZE.value
  rate = images / elapsed
  per_core = rate / _CORES.value
  print(
    f"COCO-like panoptic LSJ {_IMAGE_SIZE.value}x{_IMAGE_SIZE.value}: {rate:.1f} images/s "
    f"on {_CORES.value} cores = {per_core:.1f} images/s/core "
    f"({per_core / TARGET:.2f}x the {TARGET:.0f} images/s/core target)"
  )
  # On a shared machine wall time undercounts; CPU time gives images per busy core-second.
  print(
    f"CPU time: {cpu:.1f} core-s for {images} images = {images / cpu:.1f} images per "
    f"core-second ({images / cpu / TARGET:.2f}x target)"
  )


if __name__ == "__main__":
  app.run(main)
