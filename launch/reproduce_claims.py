r"""Runs the demo's comparisons and regenerates the README table of the paper's claims.

  python launch/reproduce_claims.py --steps=600 --root=workdirs/claims [--variants=joint,...]
      [--seeds=0,1]

Each variant of configs/demo.py (joint, panoptic_only, semantic_only, boxes_only,
learned_classifier, no_boxes) trains once per seed in `<root>/<variant>` (seed 0) or
`<root>/<variant>_seed<k>` with `python -m dataseg.main --config.seed=<k>` (resuming or
reusing a finished run), then the table of the headline metrics is printed as markdown and
written to `<root>/claims.md`, with the command, machine and wall time of each run. With
several seeds a cell reads `mean (a / b ...)`: why: at this scale two seeds differ by
several points, so a difference smaller than that spread is a tie, not a win.
Single-dataset runs get the same number of steps on their dataset as the joint run spends
on it (configs/demo.py), so every comparison has the same per-dataset budget. Flags this
tool does not define (e.g. --config.eval_every=100) are passed to every `dataseg.main` run.
"""

import json
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags

VARIANTS = (
  "joint",
  "panoptic_only",
  "semantic_only",
  "boxes_only",
  "learned_classifier",
  "no_boxes",
)
COLUMNS = (
  ("shapes_panoptic/panoptic/PQ", "PQ panoptic"),
  ("shapes_panoptic/panoptic/PQ_th", "PQ_th panoptic"),
  ("shapes_panoptic/panoptic/PQ_st", "PQ_st panoptic"),
  ("shapes_semantic/semantic/mIoU", "mIoU semantic"),
  ("shapes_semantic/panoptic/PQ", "PQ semantic (weak)"),
  ("shapes_semantic/panoptic/PQ_th", "PQ_th semantic (weak)"),
  ("shapes_semantic/panoptic/PQ_st", "PQ_st semantic (weak)"),
  ("shapes_boxes/instance/AP", "mask AP boxes (weak)"),
  ("shapes_boxes/box/AP", "box AP boxes"),
  ("shapes_transfer/panoptic/PQ", "PQ transfer"),
  ("shapes_transfer/semantic/mIoU", "mIoU transfer"),
)


def run(variant, steps, root, extra, table_only=False, seed=0):
  workdir = os.path.join(root, variant if seed == 0 else f"{variant}_seed{seed}")
  cmd = [
    sys.executable,
    "-m",
    "dataseg.main",
    f"--config=configs/demo.py:steps={steps},variant={variant}",
    f"--workdir={workdir}",
    "--verbosity=-1",
    *extra,
  ]
  if seed:
    cmd.append(f"--config.seed={seed}")
  timing = os.path.join(workdir, "wall_time_s.json")
  if not table_only:
    print("$", " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    wall = time.time() - start
    if not os.path.exists(timing) or wall > 60:  # a reused run keeps its first timing.
      with open(timing, "w") as f:
        json.dump({"wall_s": wall}, f)
  with open(timing) as f:
    wall = json.load(f)["wall_s"]
  evals = sorted(
    (int(n[len("eval_") : -len(".json")]), n)
    for n in os.listdir(workdir)
    if n.startswith("eval_") and n.endswith(".json") and n[len("eval_") : -len(".json")].isdigit()
  )
  with open(os.path.join(workdir, evals[-1][1])) as f:
    return json.load(f), wall, " ".join(cmd[1:])


def cell(values):
  """'12.3' for one run; 'mean (a / b)' for several; '-' where a run has no value."""
  if any(v is None or v != v or v < 0 for v in values):
    return "-"
  text = [f"{100 * v:.1f}" for v in values]
  if len(values) == 1:
    return text[0]
  return f"{100 * sum(values) / len(values):.1f} ({' / '.join(text)})"


def table(rows, steps):
  """rows: {variant: [(results, wall_s, command) per seed]} -> markdown."""
  head = "| variant | " + " | ".join(c for _, c in COLUMNS) + " | wall time |"
  lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
  for variant, runs in rows.items():
    cells = [cell([results.get(key) for results, _, _ in runs]) for key, _ in COLUMNS]
    walls = " / ".join(f"{wall / 60:.1f}" for _, wall, _ in runs)
    lines.append(f"| {variant} | " + " | ".join(cells) + f" | {walls} min |")
  lines.append("")
  lines.append(
    f"Joint budget: {steps} steps of batch 8 at 128x128; machine: "
    f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}. "
    "Commands:"
  )
  for variant, runs in rows.items():
    for _, _, cmd in runs:
      lines.append(f"- {variant}: `python {cmd}`")
  return "\n".join(lines)


_STEPS = flags.DEFINE_integer("steps", 600, "training steps of the joint run")
_ROOT = flags.DEFINE_string("root", "workdirs/claims", "where the runs and claims.md go")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "variants of configs/demo.py")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "config seeds, one run per variant and seed")
_TABLE_ONLY = flags.DEFINE_bool(
  "table_only", False, "only rebuild the table from the runs' newest eval_<step>.json"
)


def main(argv):
  extra = argv[1:]  # flags this tool does not define go to every `dataseg.main` run.
  rows = {}
  seeds = [int(k) for k in _SEEDS.value]
  for variant in _VARIANTS.value:
    rows[variant] = [
      run(variant, _STEPS.value, _ROOT.value, extra, _TABLE_ONLY.value, seed) for seed in seeds
    ]
  text = table(rows, _STEPS.value)
  with open(os.path.join(_ROOT.value, "claims.md"), "w") as f:
    f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: flags.FLAGS(argv, known_only=True))
