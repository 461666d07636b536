r"""Self time of a jax.profiler CPU trace by the source line that made each XLA op.

  PYTHONPATH=. python bench/train_step.py --side ours --sizes 256 --batch 2 --steps 1 \
      --profile /tmp/prof          # writes the trace and /tmp/prof/step.hlo.txt
  python bench/profile_summary.py /tmp/prof --steps 2 --top 30 [--by file]

Reads the trace's events (`*.trace.json.gz`, all threads), computes each event's self time
(its duration minus its children's), keeps XLA ops (fusions, gathers, ...), and maps each op
to the innermost stack frame of the compiled HLO (`step.hlo.txt`: op metadata
`stack_frame_id`, or the first one inside a fusion's computation) outside site-packages.
Prints each line's (or file's) share of the ops' self time and seconds per step (divided by
`--steps`, the number of profiled steps: bench/train_step.py traces 2); `--by op` lists single
ops with their source line and HLO result shape. Ops without a
frame (e.g. oneDNN/YNNPACK convolution-gradient fusions) are '?'. Shares, not absolute
times, are what to read on a loaded machine. No jax import: plain Python.
"""

import collections
import glob
import gzip
import json
import os
import re

from absl import app
from absl import flags

_HLO = flags.DEFINE_string("hlo", "", "HLO text (default DIR/step.hlo.txt)")
_STEPS = flags.DEFINE_integer("steps", 2, "profiled steps in the trace")
_TOP = flags.DEFINE_integer("top", 30, "lines to print")
_BY = flags.DEFINE_enum(
  "by", "line", ["line", "file", "op"], "aggregate by source line or file; 'op': each op alone"
)


def frames(lines):
  """HLO text sections -> {frame id: 'file:line function'} (innermost frame only)."""
  section, files, funcs, locs, stack = None, {}, {}, {}, {}
  for line in lines:
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      section = line
      continue
    if not line.strip():
      section = None
      continue
    if section is None or line.startswith((" ", "%", "HloModule", "ENTRY")):
      continue
    key, rest = line.split(" ", 1)
    if section in ("FileNames", "FunctionNames"):
      (files if section == "FileNames" else funcs)[int(key)] = rest.strip('"')
    else:
      (locs if section == "FileLocations" else stack)[int(key)] = dict(
        re.findall(r"(\w+)=(\d+)", rest)
      )
  out = {}
  for fid, frame in stack.items():
    loc = locs.get(int(frame["file_location_id"]))
    if loc:
      out[fid] = (
        files[int(loc["file_name_id"])],
        f"{os.path.basename(files[int(loc['file_name_id'])])}:{loc['line']} "
        f"{funcs[int(loc['function_name_id'])]}",
      )
  return out


def op_frames(lines):
  """{op name: frame id}: the op's own stack_frame_id, else its fused computation's."""
  comp_frame, current = {}, None
  for line in lines:
    m = re.match(r"%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      current = m.group(1)
      continue
    if current and line.startswith(" ") and current not in comp_frame:
      f = re.search(r"stack_frame_id=(\d+)", line)
      if f:
        comp_frame[current] = int(f.group(1))
  ops = {}
  for line in lines:
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*calls=%([\w.\-]+)", line)
    if m and m.group(2) in comp_frame:
      ops[m.group(1)] = comp_frame[m.group(2)]
  for line in lines:
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*stack_frame_id=(\d+)", line)
    if m:
      ops[m.group(1)] = int(m.group(2))
  return ops


def self_times(trace_path):
  events = [e for e in json.load(gzip.open(trace_path))["traceEvents"] if e.get("ph") == "X"]
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[e["tid"]].append(e)
  total = collections.Counter()
  for evs in by_thread.values():
    evs.sort(key=lambda e: (e["ts"], -e["dur"]))
    stack = []
    for e in evs:
      while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
        stack.pop()
      if stack:
        stack[-1]["_children"] = stack[-1].get("_children", 0) + e["dur"]
      stack.append(e)
    for e in evs:
      total[e["name"]] += e["dur"] - e.get("_children", 0)
  return total


NOT_OPS = (
  "ThunkExecutor",
  "$",
  "Pjit",
  "Common",
  "Allocate",
  "Parse",
  "Handle",
  "Wait",
  "Python",
  "Thread",
  "Slinky",
  "DevicePut",
)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("expected one argument: the profile DIR")
  trace_dir = argv[1]
  lines = open(_HLO.value or os.path.join(trace_dir, "step.hlo.txt")).read().splitlines()
  names, ops = frames(lines), op_frames(lines)
  shapes = {}  # op name -> 'shape = kind(' of its HLO instruction (for --by op).
  for line in lines:
    m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.{0,120}?\w+\()", line)
    if m:
      shapes.setdefault(m.group(1), m.group(2))
  trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  times = {k: v for k, v in self_times(trace).items() if not k.startswith(NOT_OPS)}
  total = sum(times.values())
  agg, top_ops = collections.Counter(), collections.defaultdict(collections.Counter)
  for op, t in times.items():
    path, name = names.get(ops.get(op), ("?", "?"))
    key = {"file": os.path.basename(path), "op": op}.get(_BY.value, name)
    agg[key] += t
    top_ops[key][op] += t
  print(f"# {trace}: XLA ops' self time {total / 1e6 / _STEPS.value:.2f} s per step (all threads)")
  for key, t in agg.most_common(_TOP.value):
    ex = ", ".join(op for op, _ in top_ops[key].most_common(2))
    if _BY.value == "op":  # the op's source line and its HLO result shape instead.
      ex = f"{names.get(ops.get(key), ('?', '?'))[1]}  {shapes.get(key, '')}"
    print(f"{100 * t / total:5.1f}%  {t / 1e6 / _STEPS.value:7.3f} s/step  {key}   [{ex}]")


if __name__ == "__main__":
  app.run(main)
