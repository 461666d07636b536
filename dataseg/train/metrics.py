"""Metric writing: TensorBoard through clu, a JSONL file, and progress lines with ETA.

Only process 0 writes (clu's `just_logging` elsewhere); every record also goes to
`<workdir>/metrics.jsonl`, one JSON object per line, so a notebook can read a run
without TensorBoard. The JSONL file is written with `tf.io.gfile`, so it lands on GCS with a
`gs://` workdir.
"""

import json
import os
import time

from clu import metric_writers
import jax
import numpy as np
import tensorflow as tf


class Writer:
  def __init__(self, workdir, total_steps):
    self.is_lead = jax.process_index() == 0
    # clu's create_default_writer, minus its etils.epath conversion of the folder (which
    # knows only some URI schemes): tf.summary writes to anything tf.io.gfile can.
    writers = [metric_writers.LoggingWriter()]
    if self.is_lead:
      writers.append(metric_writers.SummaryWriter(workdir))
    self._tb = metric_writers.MultiWriter(writers)
    self._jsonl = (
      tf.io.gfile.GFile(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_lead else None
    )
    self.total_steps = total_steps
    self._t0 = None
    self._s0 = None

  def scalars(self, step, values):
    values = {k: float(np.asarray(v)) for k, v in values.items()}
    self._tb.write_scalars(step, values)
    if self._jsonl:
      self._jsonl.write(json.dumps(dict(step=int(step), **values)) + "\n")
      self._jsonl.flush()

  def images(self, step, images):
    self._tb.write_images(step, images)

  def progress(self, step, extra=""):
    """One line: step, rate, ETA (from the steps done in this process)."""
    now = time.time()
    if self._t0 is None:
      self._t0, self._s0 = now, step
      rate = 0.0
    else:
      rate = (step - self._s0) / max(now - self._t0, 1e-9)
    left = self.total_steps - step
    eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate > 0 else "--:--:--"
    if self.is_lead:
      print(
        f"[step {step:>6d}/{self.total_steps}] {rate:6.2f} steps/s  ETA {eta}  {extra}", flush=True
      )
    return rate

  def flush(self):
    self._tb.flush()

  def close(self):
    self._tb.close()
    if self._jsonl:
      self._jsonl.close()


def device_memory_gib():
  """Bytes in use on device 0 where the backend reports it (GPU/TPU), else None."""
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "bytes_in_use" not in stats:
    return None
  return stats["bytes_in_use"] / 2**30
