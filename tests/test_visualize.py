"""Overlay pictures: blend arithmetic, outlines, boxes, legend swatches, PNG round trip."""

import numpy as np
from PIL import Image

from dataseg import visualize

NAMES = ["cat", "dog", "banana split", "sky"]


def _scene():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
  seg = np.full((40, 64), -1, np.int32)
  seg[4:20, 4:30] = 0
  seg[22:38, 30:60] = 1
  seg[0:3, 40:64] = 2
  seg_class = np.array([2, 0, -1])  # segment 2 is a padded/ignored row
  return image, seg, seg_class


def test_palette_is_deterministic_and_distinct():
  p = visualize.palette(365)
  assert p.dtype == np.uint8 and p.shape == (365, 3)
  np.testing.assert_array_equal(p, visualize.palette(365))
  np.testing.assert_array_equal(p[:10], visualize.palette(10))  # prefix-stable
  assert len(np.unique(p, axis=0)) == 365


def test_overlay_blend_outline_and_void():
  image, seg, seg_class = _scene()
  out = visualize.overlay(image, seg, seg_class, NAMES, alpha=0.4, legend=False)
  assert out.shape == image.shape and out.dtype == np.uint8
  colors = visualize.palette(len(NAMES))
  # Interior pixels: round(0.6 * image + 0.4 * colour of the segment's class).
  for s, (ys, xs) in enumerate([(slice(5, 19), slice(5, 29)), (slice(23, 37), slice(31, 59))]):
    want = np.round(
      0.6 * image[ys, xs].astype(np.float64) + 0.4 * colors[seg_class[s]].astype(np.float64)
    )
    np.testing.assert_allclose(out[ys, xs], want, atol=1)
  # Segment border pixels are white, void pixels and ignored segments untouched.
  for y, x in [(4, 10), (19, 10), (10, 4), (10, 29), (22, 45), (37, 59)]:
    np.testing.assert_array_equal(out[y, x], visualize.OUTLINE_COLOR)
  void = seg == -1
  np.testing.assert_array_equal(out[void], image[void])
  np.testing.assert_array_equal(out[0:3, 40:64], image[0:3, 40:64])


def test_outlines_match_neighbour_definition():
  seg = np.random.default_rng(1).integers(-1, 3, (9, 11))
  padded = np.pad(seg, 1, mode="edge")
  want = np.zeros_like(seg, bool)
  for dy, dx in [(-1, 0), (1, 0), (0, -1), (0, 1)]:
    want |= padded[1 + dy : 10 + dy, 1 + dx : 12 + dx] != seg
  np.testing.assert_array_equal(visualize.segment_outlines(seg), want)


def test_legend_lists_present_classes_with_their_colours():
  image, seg, seg_class = _scene()
  out = visualize.overlay(image, seg, seg_class, NAMES)
  assert out.shape[0] == 40 and out.shape[1] > 64 and out.dtype == np.uint8
  panel = out[:, 64:]
  colors = visualize.palette(len(NAMES))
  pad, sw = visualize.LEGEND_PAD, visualize.LEGEND_SWATCH
  present = [0, 2]  # classes of valid segments, sorted by class id
  for row, c in enumerate(present):
    y = pad + row * (sw + pad)
    swatch = panel[y : y + sw, pad : pad + sw].reshape(-1, 3)
    assert (swatch == colors[c]).all()
  # Absent classes (dog, sky) have no swatch anywhere in the panel.
  flat = panel.reshape(-1, 3)
  for c in (1, 3):
    assert not (flat == colors[c]).all(-1).any()
  # Names are drawn: light text pixels to the right of the swatches.
  text_area = panel[pad : pad + sw, 2 * pad + sw :]
  assert (text_area.max(-1) > 150).sum() > 5


def test_boxes_drawn_in_class_colour():
  image = np.zeros((30, 30, 3), np.uint8)
  seg = np.full((30, 30), -1)
  out = visualize.overlay(
    image, seg, np.array([1]), NAMES, boxes=np.array([[5.0, 6.0, 20.0, 25.0]]), legend=False
  )
  c = visualize.palette(len(NAMES))[1]
  for y, x in [(5, 6), (5, 25), (20, 6), (20, 25), (12, 6), (5, 15)]:
    np.testing.assert_array_equal(out[y, x], c)
  np.testing.assert_array_equal(out[12, 15], 0)  # inside the box: not filled


def test_png_round_trip(tmp_path):
  image, seg, seg_class = _scene()
  out = visualize.overlay(image, seg, seg_class, NAMES)
  path = tmp_path / "sub" / "overlay.png"
  visualize.save_png(path, out)
  with Image.open(path) as im:
    assert im.format == "PNG"
    np.testing.assert_array_equal(np.asarray(im), out)
