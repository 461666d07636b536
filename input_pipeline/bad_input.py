"""What a reader does with bad input: skip it (counted, ids logged) or stop.

Real datasets contain broken files and annotations that contradict their images. A
reader must never turn those into wrong targets silently, so every case is one of:

  fixed    repaired the same way every time, no policy needed:
             grayscale / RGBA / CMYK / palette images -> converted to RGB (alpha dropped);
             a box partly outside the image -> clipped to the image.
  policy   `on_bad_input='skip'`: the example (or, for boxes, the one annotation) is
           dropped, counted by kind, and its image id logged (first occurrence at WARNING,
           a per-epoch summary at `end_epoch`);
           `on_bad_input='fail'`: `BadInputError` naming the file, the field and the reason.

Kinds under the policy (the unit that `skip` drops is in brackets):
  corrupt_image         truncated / undecodable image or mask PNG          [example]
  missing_file          annotation names an image or mask file not on disk [example]
  unannotated_segment   panoptic PNG id absent from `segments_info`        [example]
  unknown_category      category id absent from the vocabulary; for
                        semantic PNGs, a pixel value that is no class      [example]
  no_annotations        image without any segment (training readers only;
                        evaluation readers keep it with an empty table)    [example]
  bad_box               zero-area box, or a box entirely outside the image [annotation]
"""

import collections
import logging
import threading
from typing import Optional

POLICIES = ("skip", "fail")
KINDS = (
  "corrupt_image",
  "missing_file",
  "unannotated_segment",
  "unknown_category",
  "no_annotations",
  "bad_box",
)

_MAX_LOGGED_IDS = 20


class BadInputError(ValueError):
  """Raised under `on_bad_input='fail'`; the message names file, field and reason."""


class BadInputCounter:
  """Applies the skip|fail policy and keeps per-kind counts (thread-safe).

  Thread safety matters because readers decode inside parallel tf.data maps.
  """

  def __init__(self, on_bad_input: str = "skip", name: str = "dataset"):
    if on_bad_input not in POLICIES:
      raise ValueError(f"on_bad_input={on_bad_input!r}; allowed: {', '.join(POLICIES)}")
    self.policy = on_bad_input
    self.name = name
    self._lock = threading.Lock()
    self.total = collections.Counter()
    self.epoch = collections.Counter()
    self.epoch_ids = collections.defaultdict(list)
    self.epochs_done = 0

  def report(self, kind: str, *, image_id, file: Optional[str], field: str, reason: str) -> None:
    """Records one bad item; raises BadInputError under the 'fail' policy."""
    if kind not in KINDS:
      raise ValueError(f"unknown bad-input kind {kind!r}; allowed: {', '.join(KINDS)}")
    message = f"[{self.name}] {kind}: file {file!r}, field {field!r}, image id {image_id}: {reason}"
    if self.policy == "fail":
      raise BadInputError(message)
    with self._lock:
      first = self.total[kind] == 0
      self.total[kind] += 1
      self.epoch[kind] += 1
      if len(self.epoch_ids[kind]) < _MAX_LOGGED_IDS:
        self.epoch_ids[kind].append(image_id)
    if first:
      logging.warning("%s (skipped; further ones are counted)", message)

  def end_epoch(self) -> dict:
    """Logs and returns this epoch's counts with (up to 20) offending ids per kind."""
    with self._lock:
      summary = {k: (self.epoch[k], list(self.epoch_ids[k])) for k in self.epoch}
      self.epoch = collections.Counter()
      self.epoch_ids = collections.defaultdict(list)
      self.epochs_done += 1
    if summary:
      logging.warning(
        "[%s] bad input in pass %d (skipped): %s",
        self.name,
        self.epochs_done,
        "; ".join(f"{k}: {n} (ids {ids})" for k, (n, ids) in summary.items()),
      )
    return summary
