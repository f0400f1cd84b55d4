"""Every notebook in notebooks/ executes top to bottom (small settings, real data)."""

import os
import pathlib

import nbclient
import nbformat
import pytest
import tfds_data
from conftest import TEST_XLA_FLAGS

pytestmark = pytest.mark.slow  # real data

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = [
    "inspect_checkpoint",
    "replay_priors",
    "own_model",
    "nnx_model",
    "mlp_batchnorm",
]
DATA = {name: "cifar10" for name in NAMES} | {"mlp_batchnorm": "tiny_shakespeare"}


def test_every_notebook_is_built_from_a_source():
    built = {p.stem for p in NOTEBOOKS.glob("*.ipynb")}
    sources = {p.stem for p in (NOTEBOOKS / "src").glob("*.py")}
    assert built == sources == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_without_errors(name, monkeypatch):
    data_dir, why = tfds_data.find(DATA[name])
    if data_dir is None:
        pytest.skip(why)
    # The notebooks train for real: their kernels compile optimized code, not at
    # conftest.py's cheaper level for tests that mostly compile (slower here).
    flags = os.environ.get("XLA_FLAGS", "")
    for flag in TEST_XLA_FLAGS.split():
        flags = flags.replace(flag, "")
    monkeypatch.setenv("XLA_FLAGS", " ".join(flags.split()))
    # A copy, run where the original lives (its relative data path resolves the
    # same way); the committed notebook with its outputs is left untouched.
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(
        notebook, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" for o in outputs)
