"""Every notebook in notebooks/ runs top to bottom on CPU.

The kernel is the `python3` kernelspec; jupyter_client replaces its `python`
command with `sys.executable`, so the kernel is this virtualenv's interpreter
(checked below by a probe cell appended to the in-memory copy). The repository
root is put on PYTHONPATH so `import jaxalign` works without installing it.
"""

import os
import pathlib
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PROBE = "import sys; print(sys.executable)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["MPLBACKEND"] = "Agg"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell and traceback, on failure
    probe_output = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert os.path.realpath(probe_output.strip()) == os.path.realpath(sys.executable)
