"""notebooks/quickstart.ipynb runs top to bottom (on the real bundled pair, small settings)."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def test_quickstart_notebook_executes():
    path = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    for method in ("bitdelta", "svd-mixed", "ternary", "lowrank"):
        assert method in outputs
    assert "KL" in outputs or "gain" in outputs
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the plot cell displayed no image"
