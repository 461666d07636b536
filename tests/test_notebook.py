"""Executes notebooks/demo.ipynb against a smoke-trained workdir.

A minimal executor (no Jupyter kernel needed): the code cells run in order in one
namespace, in-process, with `display` collecting what the notebook shows, from the
notebooks/ folder as Jupyter would. The workdir is test_predictor's cached smoke run.
"""

import json
import pathlib
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_predictor import smoke_workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "demo.ipynb"


def run_notebook(path, namespace):
  """Runs the code cells of an .ipynb in order; returns the namespace."""
  nb = json.loads(pathlib.Path(path).read_text())
  assert nb["nbformat"] == 4
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
      continue
    source = "".join(cell["source"])
    exec(compile(source, f"{path.name}[cell {i}]", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def test_demo_notebook_runs(tmp_path, monkeypatch):
  workdir = smoke_workdir()
  out = tmp_path / "overlays"
  monkeypatch.setenv("DATASEG_WORKDIR", str(workdir))
  monkeypatch.setenv("DATASEG_NOTEBOOK_OUT", str(out))
  monkeypatch.setenv("DATASEG_NOTEBOOK_MAX_EVAL", "2")
  monkeypatch.chdir(ROOT / "notebooks")
  shown = []
  ns = run_notebook(NOTEBOOK, {"__name__": "__main__", "display": shown.append})

  # It showed and saved one overlay per prediction, each a PNG equal to what it showed.
  pictures = [np.asarray(x) for x in shown if isinstance(x, Image.Image)]
  names = ["panoptic", "semantic", "instance", "open_vocab_transfer_names",
           "open_vocab_our_names"]
  assert len(pictures) == len(names)
  for name, picture in zip(names, pictures):
    with Image.open(out / f"{name}.png") as im:
      np.testing.assert_array_equal(np.asarray(im), picture)
  # Predictions are at each image's own resolution.
  assert ns["panoptic"]["segment_map"].shape == ns["panoptic"]["image"].shape[:2]
  assert ns["semantic"]["class_map"].shape == ns["semantic"]["image"].shape[:2]
  # It evaluated a seen dataset and, by direct transfer, an unseen one.
  assert ns["seen"]["shapes_panoptic/panoptic/PQ"] >= 0
  assert "shapes_transfer/panoptic/PQ" in ns["transfer"]
  trained = {e.name for e in ns["predictor"].config.datasets.values()}
  assert "shapes_transfer" not in trained
  # Open vocabulary: each result speaks its own list of names.
  for title, (class_names, _) in ns["open_vocab"].items():
    result = ns["open_results"][title]
    assert result["class_names"] == class_names
    assert all(s["name"] == class_names[s["class"]] for s in result["segments"])
