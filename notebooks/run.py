r"""Runs notebooks/demo.ipynb in a Jupyter kernel and writes it back with its outputs.

  python notebooks/run.py --workdir=workdirs/demo        # what the committed outputs show

The kernel is ipykernel's `python3` from this Python's own environment (the .venv's, with
dataseg importable), started in notebooks/ as Jupyter starts it; the notebook reads
DATASEG_WORKDIR / DATASEG_NOTEBOOK_MAX_EVAL / DATASEG_NOTEBOOK_OUT, which the flags set.
tests/test_notebook.py runs it the same way (`execute`).
"""

import os
import pathlib
import re
import sys
from typing import Mapping

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "demo.ipynb"
KERNEL = "python3"
# C++ log lines of TensorFlow / XLA start-up (glog format), not the notebook's own output.
_NATIVE_LOG = re.compile(
  r"^([IWEF]\d{4} \d\d:\d\d:\d\d|WARNING: All log messages before "
  r"absl::InitializeLog\(\))"
)


def execute(
  path=NOTEBOOK, env: Mapping[str, str] | None = None, extra_source: str = "", timeout: int = 900
):
  """Runs every cell of the notebook at `path` in a fresh kernel; returns the notebook.

  `env` is added to the kernel's environment. `extra_source`, if given, runs as one more
  cell after the notebook's own (its outputs are the returned notebook's last cell).
  """
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top

  nb = nbformat.read(str(path), as_version=4)
  if extra_source:
    nb.cells.append(nbformat.v4.new_code_cell(extra_source))
  # This environment's kernel spec first (jupyter_client resolves its "python" to
  # sys.executable), whatever kernels a user directory holds.
  jupyter_path = os.path.join(sys.prefix, "share", "jupyter")
  kernel_env = dict(os.environ, **(env or {}))
  kernel_env["JUPYTER_PATH"] = os.pathsep.join(
    p for p in (jupyter_path, os.environ.get("JUPYTER_PATH")) if p
  )
  kernel_env["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), kernel_env.get("PYTHONPATH")) if p
  )
  old = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = kernel_env["JUPYTER_PATH"]  # read by the kernel spec lookup.
  try:
    client = nbclient.NotebookClient(
      nb,
      timeout=timeout,
      kernel_name=KERNEL,
      record_timing=False,
      resources={"metadata": {"path": str(pathlib.Path(path).resolve().parent)}},
    )
    client.execute(env=kernel_env)
  finally:
    if old is None:
      os.environ.pop("JUPYTER_PATH", None)
    else:
      os.environ["JUPYTER_PATH"] = old
  return nb


def without_native_logs(nb):
  """The notebook with stderr outputs that hold only C++ start-up log lines removed (and no
  run timestamps, so a regenerated file differs only where the outputs do)."""
  for cell in nb.cells:
    cell.metadata.pop("execution", None)
    if cell.cell_type == "code":
      cell.outputs = [
        o
        for o in cell.outputs
        if not (
          o.output_type == "stream"
          and o.name == "stderr"
          and all(_NATIVE_LOG.match(line) for line in o.text.splitlines() if line.strip())
        )
      ]
  return nb


def main(argv=None):
  sys.path.insert(0, str(ROOT))
  from dataseg import cli  # pylint: disable=g-import-not-at-top

  fv = cli.new_flags()
  flags.DEFINE_string(
    "workdir", str(ROOT / "workdirs" / "demo"), "a dataseg.main workdir", flag_values=fv
  )
  flags.DEFINE_integer(
    "max_eval", 32, "eval examples per dataset (0 = whole split)", flag_values=fv
  )
  flags.DEFINE_string(
    "out_dir", None, "where the overlay PNGs go (default: <workdir>/notebook)", flag_values=fv
  )
  flags.DEFINE_string("output", str(NOTEBOOK), "the executed notebook", flag_values=fv)
  args = cli.parse(fv, argv, prog="python notebooks/run.py", doc=__doc__)
  import nbformat  # pylint: disable=g-import-not-at-top

  env = dict(
    DATASEG_WORKDIR=os.path.abspath(args.workdir), DATASEG_NOTEBOOK_MAX_EVAL=str(args.max_eval)
  )
  if args.out_dir:
    env["DATASEG_NOTEBOOK_OUT"] = os.path.abspath(args.out_dir)
  nb = execute(NOTEBOOK, env)
  nbformat.write(without_native_logs(nb), args.output)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
