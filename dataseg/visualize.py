"""Overlay pictures of segmentations: coloured segments, outlines, boxes and a legend.

Used by the notebook Predictor and by evaluators that dump examples. Inputs follow the
decoded-example schema (dataseg/schema.py): a segment-id map with -1 for void plus a
per-segment class table. Colours are a function of the class id only, so the same
class has the same colour in every picture and every run.
"""

import colorsys
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

LEGEND_SWATCH = 12  # swatch side, pixels
LEGEND_PAD = 4
OUTLINE_COLOR = (255, 255, 255)


def palette(n: int) -> np.ndarray:
  """Deterministic, well-spread colours, uint8 [n, 3].

  Hues step by the golden angle, so neighbouring class ids get distant hues; saturation
  and value cycle so classes n apart stay distinguishable for large vocabularies.
  """
  k = np.arange(n)
  hues = (k * 0.618033988749895) % 1.0
  sats = 0.65 + 0.3 * ((k // 3) % 2)
  vals = 0.95 - 0.25 * ((k // 2) % 2)
  rgb = [colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hues, sats, vals)]
  return np.round(np.array(rgb, np.float64).reshape(n, 3) * 255).astype(np.uint8)


def segment_outlines(segment_map: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels with a 4-neighbour in another segment (or in void)."""
  edge = np.zeros(segment_map.shape, bool)
  dx = segment_map[:, 1:] != segment_map[:, :-1]
  dy = segment_map[1:, :] != segment_map[:-1, :]
  edge[:, :-1] |= dx
  edge[:, 1:] |= dx
  edge[:-1, :] |= dy
  edge[1:, :] |= dy
  return edge


def colorize(
  segment_map: np.ndarray, seg_class: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel class colour uint8 [H, W, 3] and the coloured-pixel mask bool [H, W].

  Void pixels (-1), padded table rows (class -1) and ids past the table stay uncoloured.
  """
  seg_class = np.asarray(seg_class, np.int64).reshape(-1)
  seg = np.asarray(segment_map, np.int64)
  valid_seg = (seg >= 0) & (seg < len(seg_class))
  cls = np.where(
    valid_seg, seg_class[np.clip(seg, 0, max(len(seg_class) - 1, 0))] if len(seg_class) else -1, -1
  )
  cls = np.where(cls < num_classes, cls, -1)
  colors = palette(max(num_classes, 1))
  return colors[np.clip(cls, 0, None)], cls >= 0


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: fixed-size bitmap font.
    return ImageFont.load_default()


def overlay(
  image: np.ndarray,
  segment_map: np.ndarray,
  seg_class: np.ndarray,
  class_names: Sequence[str],
  alpha: float = 0.5,
  boxes: np.ndarray | None = None,
  outlines: bool = True,
  legend: bool = True,
) -> np.ndarray:
  """Blends class colours over `image` and appends a legend panel on the right.

  Args:
    image: uint8 [H, W, 3].
    segment_map: int [H, W], segment index or -1 (void, left as the image).
    seg_class: int [n], contiguous class id per segment (-1: ignore the segment).
    class_names: [V] names; class k is drawn with `palette(V)[k]`.
    alpha: colour weight; a segment pixel is round((1-alpha)*image + alpha*colour).
    boxes: optional float [n, 4] (y0, x0, y1, x1) per segment, drawn in its colour.
    outlines: draw segment borders in white.
    legend: append a panel listing the classes present (colour swatch + name).

  Returns:
    uint8 [H, W + legend width, 3] (legend width 0 when no class is present).
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be [H, W, 3], got {image.shape}")
  if segment_map.shape != image.shape[:2]:
    raise ValueError(f"segment_map {segment_map.shape} != image {image.shape[:2]}")
  num_classes = len(class_names)
  seg_class = np.asarray(seg_class, np.int64).reshape(-1)
  color, colored = colorize(segment_map, seg_class, num_classes)
  blend = (1.0 - alpha) * image.astype(np.float32) + alpha * color.astype(np.float32)
  out = np.where(colored[..., None], np.round(blend), image).astype(np.uint8)
  if outlines:
    out[segment_outlines(np.asarray(segment_map)) & colored] = OUTLINE_COLOR

  colors = palette(max(num_classes, 1))
  pil = Image.fromarray(out)
  draw = ImageDraw.Draw(pil)
  if boxes is not None:
    for s, box in enumerate(np.asarray(boxes, np.float32).reshape(-1, 4)):
      c = seg_class[s] if s < len(seg_class) else -1
      if 0 <= c < num_classes:
        y0, x0, y1, x1 = (float(v) for v in box)
        draw.rectangle([x0, y0, x1, y1], outline=tuple(int(v) for v in colors[c]))
  out = np.asarray(pil)
  if not legend:
    return out
  present = sorted({int(c) for c in seg_class if 0 <= c < num_classes})
  return np.concatenate(
    [out, legend_panel([class_names[c] for c in present], colors[present], out.shape[0])], 1
  )


def legend_panel(names: Sequence[str], colors: np.ndarray, height: int) -> np.ndarray:
  """uint8 [height, width, 3] dark panel: row i = swatch colors[i] + names[i].

  Rows that do not fit in `height` are dropped (the panel never grows the picture).
  The swatch of row i covers y in [PAD + i*row, PAD + i*row + SWATCH), x in
  [PAD, PAD + SWATCH).
  """
  if not names:
    return np.zeros((height, 0, 3), np.uint8)
  font = _font(LEGEND_SWATCH)
  row = LEGEND_SWATCH + LEGEND_PAD
  text_w = max(int(np.ceil(font.getlength(n))) for n in names)
  width = 3 * LEGEND_PAD + LEGEND_SWATCH + text_w
  panel = Image.new("RGB", (width, height), (32, 32, 32))
  draw = ImageDraw.Draw(panel)
  for i, (name, c) in enumerate(zip(names, colors)):
    y = LEGEND_PAD + i * row
    if y + LEGEND_SWATCH > height:
      break
    draw.rectangle(
      [LEGEND_PAD, y, LEGEND_PAD + LEGEND_SWATCH - 1, y + LEGEND_SWATCH - 1],
      fill=tuple(int(v) for v in c),
    )
    draw.text((2 * LEGEND_PAD + LEGEND_SWATCH, y), name, fill=(240, 240, 240), font=font)
  return np.asarray(panel)


def save_png(path: str | pathlib.Path, array: np.ndarray) -> None:
  """Writes a uint8 [H, W, 3] / [H, W] array as PNG (lossless), creating parents.

  Through tf.io.gfile, so overlays of a gs:// workdir land on GCS (pathlib would make a
  local folder named `gs:`).
  """
  import io  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  path = os.fspath(path)
  tf.io.gfile.makedirs(os.path.dirname(path) or ".")
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
  with tf.io.gfile.GFile(path, "wb") as f:
    f.write(buffer.getvalue())
