"""colab/quickstart.ipynb runs top to bottom in a kernel of this venv and trains something real."""
import glob
import json
import os
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colab", "quickstart.ipynb")
KERNEL = "eojax-test-venv"


def _kernelspec(root, workdir) -> None:
    """A kernelspec for *this* interpreter (the venv), found through JUPYTER_PATH: a fresh CI machine
    has no registered kernel, and a user-level 'python3' one could point at another Python."""
    spec_dir = os.path.join(root, "kernels", KERNEL)
    os.makedirs(spec_dir)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "eojax venv (test)",
        "language": "python",
        # Overrides what the kernel inherits from pytest (conftest asks for 8 devices).
        "env": {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
                "EOJAX_QUICKSTART_WORKDIR": str(workdir), "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(spec, f)


def test_quickstart_notebook(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    _kernelspec(str(tmp_path / "jupyter"), workdir)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"  # what Colab and a plain Jupyter expect
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, startup_timeout=120,
                                     resources={"metadata": {"path": REPO}})
    client.execute()  # raises CellExecutionError naming the cell if any cell fails

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(workdir) in printed  # the notebook used the folder this test chose
    assert "[CpuDevice(id=0), CpuDevice(id=1)]" in printed  # and the kernel got the test's environment

    pngs = glob.glob(str(workdir / "mae_reconstruction_step*.png"))
    assert pngs, f"no reconstruction PNG in {workdir}"
    assert any(o.output_type == "display_data" and "image/png" in o.data
               for c in nb.cells if c.cell_type == "code" for o in c.outputs)

    from eojax import metric_writer
    rows = metric_writer.read_metrics(str(workdir))
    assert len(rows) >= 2, rows
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
