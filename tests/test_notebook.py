"""Every notebook in colab/ runs top to bottom in a kernel of this venv and trains something real."""
import glob
import json
import os
import sys

import pytest
from helpers import xla_flags

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
KERNEL = "eojax-test-venv"


def _check_gridmae(workdir, printed):
    """The embedding GeoTIFF is georeferenced on the stacked grid (the gravity grid's UTM 33N) and the
    notebook printed its CRS."""
    import rasterio

    (path,) = glob.glob(str(workdir / "features" / "*_features.tif"))
    with rasterio.open(path) as src:
        assert src.crs.to_string() == "EPSG:32633", src.crs
        assert src.count > 3 and src.height > 1 and src.width > 1, (src.count, src.shape)
    assert "CRS: EPSG:32633" in printed


def _check_classification(workdir, printed):
    """The fine-tuned encoder beats the majority class on the built-in chips' test split."""
    import numpy as np
    from eojax.classify import data as cdata

    _, chips = cdata.folder_chips(cdata.synthetic_chips())
    splits = [cdata.fixed_split(c.key) for c in chips]
    labels = [c.labels[0] for c, s in zip(chips, splits) if s == "test"]
    majority = np.bincount(labels).max() / len(labels)
    top1 = json.load(open(workdir / "results.json"))["test"]["top1"]
    assert top1 > majority, f"classification: fine-tuned test top-1 {top1} <= majority class {majority}"
    assert "fine-tune" in printed


def _check_diffusion(workdir, printed):
    """The SD section's fine-tune kept the VAE and CLIP bit-identical and moved the UNet, and the folder it
    wrote back holds that UNet beside the source folder's VAE and CLIP."""
    import numpy as np
    from safetensors.numpy import load_file

    source, tuned = os.path.join(REPO, "tests", "fixtures", "sd_tiny"), workdir / "sd15_tiny_finetuned"
    for sub, name, same in (("unet", "diffusion_pytorch_model", False), ("vae", "diffusion_pytorch_model", True),
                            ("text_encoder", "model", True)):
        a, b = (load_file(os.path.join(d, sub, name + ".safetensors")) for d in (source, tuned))
        assert a.keys() == b.keys(), sub
        equal = all(np.array_equal(a[k], b[k]) for k in a)
        assert equal == same, f"diffusion: the fine-tuned {sub} {'changed' if same else 'did not change'}"
    assert "written:" in printed and "VAE and CLIP bit-identical to the folder's after fine-tuning: True" in printed


# Per notebook: the pictures the run must write into its workdir, the train metrics that must fall
# (first logged value -> last), and anything more to check with (workdir, printed text).
EXPECTED = {
    "quickstart": dict(pngs=("mae_reconstruction_step*.png",), falling=("loss",)),
    "satmae": dict(pngs=("satmae_reconstruction_step*.png", "satmae_multiscale_step*.png"),
                   falling=("loss", "mse", "l1_2x", "l1_4x")),
    "gridmae": dict(pngs=("satmae_reconstruction_step*.png",), falling=("loss",), check=_check_gridmae),
    "diffusion": dict(pngs=("diffusion_samples_step*.png",), falling=("loss",), check=_check_diffusion),
    "seg": dict(pngs=("mae_reconstruction_step*.png", "*_overlay.png"), falling=("loss",)),
    "vsat": dict(pngs=("infer/infill_*.png", "eval/holdout_*.png"), falling=("loss",)),
    "classification": dict(pngs=("eval/confusion_test.png",), falling=("loss",), check=_check_classification),
    # The geographic heads beat the training-mean baseline on great-circle error (results.json).
    "geo": dict(pngs=("geo_map_step*.png",), falling=("loss",),
                check=lambda workdir, printed: None if (
                    (ev := json.load(open(workdir / "results.json"))["eval"])["km_median"] < ev["baseline_km_median"]
                ) else pytest.fail(f"geo: median error {ev['km_median']} km is not below the baseline's")),
}


def _workdir_variable(name: str) -> str:
    """The variable a notebook reads its workdir from: EOJAX_<NAME>_WORKDIR."""
    return f"EOJAX_{name.upper()}_WORKDIR"


def _kernelspec(root, env: dict) -> None:
    """A kernelspec for *this* interpreter (the venv), found through JUPYTER_PATH: a fresh CI machine
    has no registered kernel, and a user-level 'python3' one could point at another Python."""
    spec_dir = os.path.join(root, "kernels", KERNEL)
    os.makedirs(spec_dir)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "eojax venv (test)",
        "language": "python",
        # Overrides what the kernel inherits from pytest (conftest asks for 8 devices).
        "env": {"XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu",
                "MPLBACKEND": "module://matplotlib_inline.backend_inline", **env},
    }
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(spec, f)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.splitext(os.path.basename(p))[0])
def test_notebook(path, tmp_path, monkeypatch):
    name = os.path.splitext(os.path.basename(path))[0]
    expected = EXPECTED.get(name)
    assert expected is not None, f"colab/{name}.ipynb has no entry in EXPECTED: say what its run must produce"
    workdir = tmp_path / "run"
    _kernelspec(str(tmp_path / "jupyter"), {_workdir_variable(name): str(workdir)})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("EOJAX_TEST_DATA", raising=False)  # the notebooks run on what eojax itself brings

    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"  # what Colab and a plain Jupyter expect
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, startup_timeout=120,
                                     resources={"metadata": {"path": REPO}})
    client.execute()  # raises CellExecutionError naming the cell if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    printed = "".join(o.get("text", "") for o in outputs)
    assert str(workdir) in printed  # the notebook used the folder this test chose
    assert "[CpuDevice(id=0), CpuDevice(id=1)]" in printed  # and the kernel got the test's environment

    for pattern in expected["pngs"]:
        assert glob.glob(str(workdir / pattern)), f"no {pattern} in {workdir}"
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)

    from eojax import metric_writer
    rows = metric_writer.read_metrics(str(workdir))
    assert len(rows) >= 2, rows
    for key in expected["falling"]:
        assert rows[-1][key] < rows[0][key], (key, [r[key] for r in rows])
    if "check" in expected:
        expected["check"](workdir, printed)
