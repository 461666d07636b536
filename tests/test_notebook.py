"""notebooks/demo.ipynb as its users open it: run by a Jupyter kernel against a checkpoint.

notebooks/run.py starts ipykernel's python3 kernel of this environment in notebooks/ and runs
every cell (nbclient). The workdir is test_predictor's cached smoke run. One more cell, run
in the same kernel after the notebook's own, checks what the notebook left in its namespace.
"""

import base64
import importlib.util
import io
import pathlib
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from test_predictor import smoke_workdir  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("notebook_run", ROOT / "notebooks" / "run.py")
notebook_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebook_run)

# Runs in the notebook's kernel after its cells: an AssertionError fails the run.
_CHECKS = """
# Predictions are at each image's own resolution.
assert panoptic["segment_map"].shape == panoptic["image"].shape[:2]
assert semantic["class_map"].shape == semantic["image"].shape[:2]
# It evaluated a seen dataset and, by direct transfer, an unseen one.
assert seen["shapes_panoptic/panoptic/PQ"] >= 0
assert "shapes_transfer/panoptic/PQ" in transfer
assert "shapes_transfer" not in {e.name for e in predictor.config.datasets.values()}
# Open vocabulary: each result speaks its own list of names.
for title, (class_names, _) in open_vocab.items():
  result = open_results[title]
  assert result["class_names"] == class_names
  assert all(s["name"] == class_names[s["class"]] for s in result["segments"])
print("checks passed")
"""


def _pictures(nb):
  """The PNG pictures the notebook displayed, in order."""
  out = []
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      data = output.get("data", {})
      if "image/png" in data:
        with Image.open(io.BytesIO(base64.b64decode(data["image/png"]))) as im:
          out.append(np.asarray(im))
  return out


def test_demo_notebook_runs_in_a_kernel(tmp_path):
  workdir = smoke_workdir()
  out = tmp_path / "overlays"
  nb = notebook_run.execute(
    env=dict(
      DATASEG_WORKDIR=str(workdir), DATASEG_NOTEBOOK_OUT=str(out), DATASEG_NOTEBOOK_MAX_EVAL="2"
    ),
    extra_source=_CHECKS,
  )
  # Every cell ran without an error (nbclient raises on one) and the checks passed.
  assert [o.get("text") for o in nb.cells[-1].outputs] == ["checks passed\n"]
  # It showed and saved one overlay per prediction, each a PNG equal to what it showed.
  pictures = _pictures(nb)
  names = ["panoptic", "semantic", "instance", "open_vocab_transfer_names", "open_vocab_our_names"]
  assert len(pictures) == len(names)
  for name, picture in zip(names, pictures):
    with Image.open(out / f"{name}.png") as im:
      np.testing.assert_array_equal(np.asarray(im), picture)


def test_committed_notebook_holds_its_outputs():
  """The committed notebook shows its pictures and tables without being run."""
  import nbformat  # pylint: disable=g-import-not-at-top

  nb = nbformat.read(str(notebook_run.NOTEBOOK), as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == notebook_run.KERNEL
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code)  # every cell was run, in order
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert not any(o.output_type == "error" for c in code for o in c.outputs)
  assert len(_pictures(nb)) == 5
  text = "".join(o.get("text", "") for c in code for o in c.outputs)
  assert "PQ" in text and "checkpoint step" in text
