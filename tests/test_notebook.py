"""Every notebook in colab/ is stored with the outputs of a complete run (scripts/run_notebooks.py), and
runs top to bottom again in a kernel of this venv, training something real."""
import glob
import json
import os
import sys

import numpy as np
import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import run_notebooks  # noqa: E402  (scripts/ is not a package)


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
    """The fine-tuned encoder beats the majority class on the real land-use chips' test split (the
    packaged eo-learn patch)."""
    from eojax import sample_data
    from eojax.classify import data as cdata
    from eojax.classify import datasets

    _, chips, splits = cdata.csv_chips(cdata.eolearn_lulc_csv(sample_data.path("eolearn_lulc")),
                                       datasets.LULC_CLASSES)
    labels = [c.labels[0] for c, s in zip(chips, splits) if s == "test"]
    majority = np.bincount(labels).max() / len(labels)
    top1 = json.load(open(workdir / "results.json"))["test"]["top1"]
    assert top1 > majority, f"classification: fine-tuned test top-1 {top1} <= majority class {majority}"
    assert "fine-tune" in printed


def _check_seg(workdir, printed):
    """On the test locations of the packaged land-use patch, the best of the six runs and the median run
    beat the majority class's mIoU ("forest" everywhere: its share of the pixels / 3 classes)."""
    import rasterio
    from eojax import sample_data

    with rasterio.open(os.path.join(sample_data.path("eolearn_lulc"), "classes_test.tif")) as src:
        mask = src.read(1)
    labelled = mask[mask != 255]
    baseline = np.bincount(labelled).max() / labelled.size / 3
    mious = sorted(json.load(open(p))["test"]["miou"] for p in glob.glob(str(workdir / "seg_*" / "results.json")))
    assert len(mious) == 6, mious
    assert mious[-1] > baseline and np.median(mious) > baseline, f"seg: test mIoU {mious} vs majority {baseline:.3f}"


def _check_vsat(workdir, printed):
    """On the held-out clear pixels of the real target date, the model's mean L1 is below every reference's."""
    metrics = json.load(open(workdir / "eval" / "metrics.json"))["metrics"]
    model = metrics["model"]["l1_mean"]
    references = {k: v["l1_mean"] for k, v in metrics.items() if k not in ("model", "summary")}
    assert len(references) == 4 and model < min(references.values()), (model, references)


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
    "seg": dict(pngs=("mae_reconstruction_step*.png", "*_overlay.png"), falling=("loss",), check=_check_seg),
    "vsat": dict(pngs=("infer/infill_*.png", "eval/holdout_*.png"), falling=("loss",), check=_check_vsat),
    "classification": dict(pngs=("eval/confusion_test.png",), falling=("loss",), check=_check_classification),
    # The geographic heads beat the training-mean baseline on great-circle error (results.json).
    "geo": dict(pngs=("geo_map_step*.png",), falling=("loss",),
                check=lambda workdir, printed: None if (
                    (ev := json.load(open(workdir / "results.json"))["eval"])["km_median"] < ev["baseline_km_median"]
                ) else pytest.fail(f"geo: median error {ev['km_median']} km is not below the baseline's")),
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.splitext(os.path.basename(p))[0])
def test_stored_notebook_holds_a_complete_run(path):
    """What a reader sees without running anything: every code cell ran, in order, without an error, and
    the pictures are there (scripts/run_notebooks.py saves them so)."""
    problems = run_notebooks.stored_problems(nbformat.read(path, as_version=4))
    assert not problems, f"{os.path.relpath(path, REPO)}: {problems}; rerun scripts/run_notebooks.py"


def test_stored_problems_are_found():
    """The check above fails a notebook saved without outputs, out of order, or with an error."""
    cell = lambda n, outputs=(): nbformat.v4.new_code_cell("x = 1", execution_count=n, outputs=list(outputs))  # noqa: E731
    png = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="})
    ok = nbformat.v4.new_notebook(cells=[cell(1), cell(2, [png])])
    assert run_notebooks.stored_problems(ok) == []
    assert run_notebooks.stored_problems(nbformat.v4.new_notebook(cells=[cell(None), cell(None)]))
    assert run_notebooks.stored_problems(nbformat.v4.new_notebook(cells=[cell(2), cell(1, [png])]))
    error = nbformat.v4.new_output("error", ename="ValueError", evalue="x", traceback=[])
    assert run_notebooks.stored_problems(nbformat.v4.new_notebook(cells=[cell(1, [error]), cell(2, [png])]))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.splitext(os.path.basename(p))[0])
def test_notebook(path, tmp_path, monkeypatch):
    name = os.path.splitext(os.path.basename(path))[0]
    expected = EXPECTED.get(name)
    assert expected is not None, f"colab/{name}.ipynb has no entry in EXPECTED: say what its run must produce"
    workdir = tmp_path / "run"
    kernel = run_notebooks.kernelspec(str(tmp_path / "jupyter"), {run_notebooks.workdir_variable(name): str(workdir)})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.delenv("EOJAX_TEST_DATA", raising=False)  # the notebooks run on what eojax itself brings

    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"  # what Colab and a plain Jupyter expect
    # The stored outputs are dropped first: only what this run prints and shows is checked below.
    run_notebooks.execute(nb, kernel)  # raises CellExecutionError naming the cell if any cell fails

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
