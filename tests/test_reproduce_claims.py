"""launch/reproduce_claims.py: the README's claims table from the runs' eval files."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "launch"))
import reproduce_claims as rc  # noqa: E402


def test_cell_formats_one_seed_several_seeds_and_missing_values():
  assert rc.cell([0.1234]) == "12.3"
  assert rc.cell([0.5, 0.3]) == "40.0 (50.0 / 30.0)"
  assert rc.cell([0.5, None]) == "-"  # a run without the metric.
  assert rc.cell([float("nan")]) == "-"
  assert rc.cell([-1.0]) == "-"  # evaluators write -1 where a metric is undefined.


def _fake_run(root, variant, seed, step_values, wall):
  workdir = root / (variant if seed == 0 else f"{variant}_seed{seed}")
  workdir.mkdir(parents=True)
  for step, values in step_values.items():
    (workdir / f"eval_{step}.json").write_text(json.dumps(values))
  (workdir / "eval_600_old.json").write_text("{}")  # not eval_<step>.json: ignored.
  (workdir / "wall_time_s.json").write_text(json.dumps({"wall_s": wall}))


def test_table_only_reads_the_newest_eval_of_each_seed(tmp_path):
  key = "shapes_panoptic/panoptic/PQ_th"
  _fake_run(tmp_path, "joint", 0, {300: {key: 0.9}, 600: {key: 0.3}}, 120.0)
  _fake_run(tmp_path, "joint", 1, {600: {key: 0.2}}, 180.0)
  runs = [rc.run("joint", 600, str(tmp_path), ["--x=1"], table_only=True, seed=s) for s in (0, 1)]
  assert [r[0][key] for r in runs] == pytest.approx([0.3, 0.2])  # step 600, not 300.
  assert "--config.seed=1" in runs[1][2] and "--config.seed" not in runs[0][2]
  text = rc.table({"joint": runs}, 600)
  row = next(line for line in text.splitlines() if line.startswith("| joint |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  columns = [name for _, name in rc.COLUMNS]
  assert cells[1 + columns.index("PQ_th panoptic")] == "25.0 (30.0 / 20.0)"
  assert cells[1 + columns.index("PQ_st panoptic")] == "-"  # in no eval file.
  assert cells[-1] == "2.0 / 3.0 min"
  assert len(cells) == len(columns) + 2
