"""The notebooks of examples/ run top to bottom (nbclient, a fresh Python kernel).

examples/new_cell.ipynb defines a new cell, shows its derivation, generates and
checks it, trains it and plots the curve; a cell that raises fails this test, and
the outputs a reader relies on (the derivation as math, the curve) must be there.
"""

import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples")


def test_new_cell_notebook_runs(tmp_path):
    nb = nbformat.read(os.path.join(EXAMPLES, "new_cell.ipynb"), as_version=4)
    # timeout per cell: bounds a hang only (compiling the new kernels takes ~30 s)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    kinds = {kind for o in outputs for kind in o.get("data", {})}
    assert {"text/markdown", "image/png"} <= kinds
    markdown = next(o["data"]["text/markdown"] for o in outputs
                    if "text/markdown" in o.get("data", {}))
    assert "Backpropagation through time: `peephole_mgu`" in markdown
    text = "".join(o.get("text", "") for o in outputs)
    assert "δ^h_t = " in text and "pass" in text and "fail" not in text
