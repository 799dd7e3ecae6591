"""The bad-input catalogue (issue 19): every kind of user mistake through the command line, as users
run it. Each case asserts the documented exit code (README.md, eojax/errors.py), that the one line
`eojax: error: ...` names the culprit (file, key, value, step), that config and data errors stop
before training compiles anything (no `[train] step` line, no checkpoint folder), and that an earlier
run's checkpoint files are byte-identical afterwards (an autouse fixture hashes them around each case).
Cases that need a run folder use a copy of the module's trained run, or the run itself when they
only read it."""
import hashlib
import json
import os
import re
import socket
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import rasterio

from eojax import errors, train
from eojax.data import synthetic
from helpers import REPO, cli, saved_tree, xla_flags

pytestmark = pytest.mark.slow

MAE = "mae:runlocal"
SHORT = ("--config.total_steps=4", "--config.checkpoint_every=2", "--config.eval_every=0",
         "--config.log_every=2")
TRAIN_MARKER = "[train] step"  # logged after the first compiled step


# --- shared inputs -----------------------------------------------------------------------------------

def _write(path, array, profile):
    profile = dict(profile, count=array.shape[0], dtype=array.dtype.name)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array)
    return str(path)


@pytest.fixture(scope="module")
def rasters(tmp_path_factory):
    """Small GeoTIFFs, each in its own folder (statistics are cached beside the data)."""
    root = tmp_path_factory.mktemp("rasters")
    folder = lambda name: (root / name).mkdir() or root / name  # noqa: E731
    good = synthetic.write_scene(str(folder("good") / "scene.tif"), seed=0, height=64, width=64,
                                 nodata_border=False)
    with rasterio.open(good) as src:
        dn, profile = src.read(), src.profile
    profile.pop("nodata", None)
    as_float = dn.astype(np.float32)
    out = {"good": good}

    inf = as_float.copy()
    inf[0, 10:20, 10:20] = np.inf
    out["inf"] = _write(folder("inf") / "inf.tif", inf, profile)

    fmax = as_float.copy()
    fmax[1, :8, :8] = np.finfo(np.float32).max
    out["fmax"] = _write(folder("fmax") / "fmax.tif", fmax, profile)

    nan_band = as_float.copy()
    nan_band[2] = np.nan
    out["nan_band"] = _write(folder("nan_band") / "nan_band.tif", nan_band, profile)

    out["all_nodata"] = _write(folder("all_nodata") / "all_nodata.tif", np.zeros_like(dn),
                               dict(profile, nodata=0))

    junk = folder("junk") / "junk.tif"
    junk.write_bytes(np.random.default_rng(0).bytes(8192))
    out["junk"] = str(junk)

    tiled = _write(folder("truncated") / "truncated.tif",
                   np.random.default_rng(1).integers(1, 5000, (4, 256, 256)).astype(np.uint16),
                   dict(profile, width=256, height=256, tiled=True, blockxsize=32, blockysize=32))
    size = os.path.getsize(tiled)
    with open(tiled, "r+b") as f:
        f.truncate(size // 3)
    out["truncated"] = tiled

    # Two survey grids in different CRSs that share no ground: nothing to stack them onto.
    grid = np.random.default_rng(2).normal(size=(1, 64, 64)).astype(np.float32)
    utm = dict(driver="GTiff", width=64, height=64, crs="EPSG:32633",
               transform=rasterio.transform.from_origin(500000.0, 5200000.0, 100.0, 100.0))
    laea = dict(utm, crs="EPSG:3035", transform=rasterio.transform.from_origin(2000000.0, 1500000.0, 200.0, 200.0))
    out["grid_utm"] = _write(folder("grids") / "gravity_utm.tif", grid, utm)
    out["grid_laea"] = _write(root / "grids" / "magnetics_laea.tif", grid, laea)
    return out


def _hashes(folder):
    digests = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step MAE run with checkpoints at steps 2 and 4: the earlier run no case may damage."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    cli("train", MAE, workdir, *SHORT)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    return workdir


@pytest.fixture(autouse=True)
def earlier_run_untouched(trained):
    before = _hashes(trained / "checkpoints")
    yield
    assert _hashes(trained / "checkpoints") == before, "an earlier run's checkpoint files changed"


@pytest.fixture
def run_copy(trained, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy)
    return copy


# --- helpers ------------------------------------------------------------------------------------------

def eojax(*args):
    """`python -m eojax.main ARGS` without helpers.cli's implicit --config (for `eojax verify`)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    env.pop("EOJAX_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "eojax.main", *map(str, args)], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def assert_error(proc, code, *culprits):
    """Exit `code`; stderr ends with one line `eojax: error: ...` naming each culprit; no traceback."""
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.splitlines()[-1]
    assert line.startswith("eojax: error: "), proc.stderr[-3000:]
    for culprit in culprits:
        assert str(culprit) in line, (culprit, line)
    print(f"exit {proc.returncode}: {line}")  # the catalogue's messages, shown by `pytest -rP`
    return line


def assert_before_compile(proc, workdir):
    """Nothing trained (no step logged) and nothing saved (no checkpoint folder)."""
    assert TRAIN_MARKER not in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def assert_nothing_saved(proc, workdir):
    """No step trained, no step folder written (an empty checkpoints/ may exist: the checkpointer
    is made before the restore that failed)."""
    assert TRAIN_MARKER not in proc.stderr, proc.stderr[-3000:]
    folder = os.path.join(workdir, "checkpoints")
    assert not os.path.exists(folder) or not os.listdir(folder), os.listdir(folder)


def usage_error(tmp_path, *extra, culprits, config=MAE, command="train", early=True):
    """`early`: caught by config_lib.validate before the workdir is made; the task's and the
    optimizer's own checks run after it (leaving an empty folder), still before compiling."""
    workdir = tmp_path / "run"
    proc = cli(command, config, workdir, *extra, check=False)
    line = assert_error(proc, errors.USAGE, *culprits)
    assert_before_compile(proc, workdir)
    if early:
        assert not workdir.exists()
    return line


def data_error(tmp_path, *extra, culprits, config=MAE):
    workdir = tmp_path / "run"
    proc = cli("train", config, workdir, *SHORT, *extra, check=False)
    line = assert_error(proc, errors.DATA, *culprits)
    assert_before_compile(proc, workdir)
    return line


def paths(*files):
    return "--config.input.paths=(" + "".join(f"'{f}'," for f in files) + ")"


def corrupt(path):
    """Random bytes over the middle of `path` (same size)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 4)
        f.write(np.random.default_rng(3).bytes(max(1, size // 2)))


def biggest_data_file(step_dir):
    files = [os.path.join(b, n) for b, _, ns in os.walk(os.path.join(step_dir, "state")) for n in ns]
    return max(files, key=os.path.getsize)


# --- config and command line: exit 2, before the workdir exists ----------------------------------------

def test_unknown_key_with_suggestion(tmp_path):
    line = usage_error(tmp_path, "--config.optim.lrr=1e-3", culprits=("optim.lrr", "--config.optim.lr=1e-3"))
    assert "did you mean" in line


def test_malformed_value(tmp_path):
    usage_error(tmp_path, "--config.total_steps=ten", culprits=("total_steps", "ten"))


@pytest.mark.parametrize("value", ["-4", "0"])
def test_batch_size_not_positive(tmp_path, value):
    usage_error(tmp_path, f"--config.batch_size={value}", culprits=(f"batch_size={value}",))


def test_zero_total_steps(tmp_path):
    usage_error(tmp_path, "--config.total_steps=0", culprits=("total_steps=0",))


def test_batch_size_not_divisible_by_the_devices(tmp_path):  # 2 devices
    usage_error(tmp_path, "--config.batch_size=15", culprits=("batch_size", "15"), early=False)


def test_negative_checkpoint_every(tmp_path):
    usage_error(tmp_path, "--config.checkpoint_every=-1", culprits=("checkpoint_every=-1",))


def test_unknown_flag(tmp_path):
    usage_error(tmp_path, "--wrkdir=/tmp/x", culprits=("wrkdir",))


def test_zero_keep_checkpoints(tmp_path):
    usage_error(tmp_path, "--config.keep_checkpoints=0", culprits=("keep_checkpoints=0",))


def test_mesh_needs_more_devices(tmp_path):  # 2 devices
    usage_error(tmp_path, "--config.mesh=(('data',3),)", culprits=("config.mesh", "3 devices"), early=False)


def test_zero_window(tmp_path):
    usage_error(tmp_path, "--config.input.window=0", culprits=("window",), early=False)


def test_config_error_on_an_existing_run_keeps_all_its_files(run_copy):
    before = _hashes(run_copy)
    proc = cli("train", MAE, run_copy, "--config.total_steps=8", "--config.mesh=(('data',3),)", check=False)
    assert_error(proc, errors.USAGE, "config.mesh")
    assert _hashes(run_copy) == before


def test_unknown_task(tmp_path):
    usage_error(tmp_path, "--config.task=nope", culprits=("nope",), early=False)


def test_missing_config_file(tmp_path):
    usage_error(tmp_path, culprits=("nope.py",), config="nope:runlocal")


def test_unknown_command(tmp_path):
    usage_error(tmp_path, culprits=("trian", "train"), command="trian")


def test_unknown_optimizer(tmp_path):
    usage_error(tmp_path, "--config.optim.name=adamz", culprits=("adamz",), early=False)


def test_sophia_g_on_mae(tmp_path):
    workdir = tmp_path / "run"
    proc = cli("train", MAE, workdir, "--config.optim.name=sophia_g", check=False)
    assert_error(proc, errors.USAGE, "sophia_g")
    assert_before_compile(proc, workdir)


def test_bad_kernels_value(tmp_path):
    workdir = tmp_path / "run"
    proc = cli("train", MAE, workdir, "--config.kernels=turbo", check=False)
    assert_error(proc, errors.USAGE, "kernels", "turbo")
    assert_before_compile(proc, workdir)


def test_bad_scales_for_satmae(tmp_path):
    workdir = tmp_path / "run"
    proc = cli("train", "satmae:runlocal", workdir, "--config.input.scales=(1,3)", check=False)
    assert_error(proc, errors.USAGE, "scales")
    assert_before_compile(proc, workdir)


def test_infer_family_mismatch(trained):
    proc = cli("infer", MAE, trained, "diffusion", check=False)  # the family word goes after the flags
    assert_error(proc, errors.USAGE, "diffusion", "mae")


def test_infer_for_a_family_without_infer(trained):
    proc = cli("infer", MAE, trained, check=False)
    assert_error(proc, errors.USAGE, "infer", "mae")


# --- workdir: exit 5 -----------------------------------------------------------------------------------

def test_workdir_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")
    assert_error(cli("train", MAE, path, check=False), errors.WORKDIR, path, "not a directory")
    assert path.read_text() == "keep me"


def test_eval_on_a_missing_workdir(tmp_path):
    assert_error(cli("eval", MAE, tmp_path / "nope", check=False), errors.WORKDIR, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_second_trainer_on_a_locked_workdir(run_copy):
    before = _hashes(run_copy)
    with train.WorkdirLock(str(run_copy)):
        proc = cli("train", MAE, run_copy, *SHORT, "--config.total_steps=6", check=False)
        assert_error(proc, errors.WORKDIR, run_copy, f"pid {os.getpid()}")
    assert TRAIN_MARKER not in proc.stderr
    assert _hashes(run_copy) == before


def test_stale_lock_of_a_dead_process_is_taken_over(run_copy):
    """Not an error: a lock whose process is gone (same host) is taken over with a warning naming it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    (run_copy / "eojax.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                    "start": None, "since": "2020-01-01 00:00:00"}))
    proc = cli("train", MAE, run_copy, *SHORT, "--config.total_steps=6", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [line for line in proc.stderr.splitlines() if "taking over" in line]
    assert len(warning) == 1 and str(gone.pid) in warning[0], proc.stderr[-3000:]
    assert "[train] step 6" in proc.stderr and not (run_copy / "eojax.lock").exists()  # released at the end


# --- data: exit 3, before compiling --------------------------------------------------------------------

def test_missing_raster(tmp_path):
    data_error(tmp_path, paths(tmp_path / "nope.tif"), culprits=(tmp_path / "nope.tif",))


def test_corrupt_raster(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["junk"]), culprits=(rasters["junk"],))


def test_truncated_raster(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["truncated"]), culprits=(rasters["truncated"],))


def test_unknown_band_name(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["good"]), "--config.input.bands=('B2','B99')",
               culprits=("B99", rasters["good"]))


def test_inf_pixels(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["inf"]), culprits=(rasters["inf"], "inf"))
    assert os.listdir(os.path.dirname(rasters["inf"])) == ["inf.tif"]  # no statistics cached


def test_stats_refuses_inf_pixels(rasters):
    proc = cli("stats", MAE, "", paths(rasters["inf"]), check=False)
    assert_error(proc, errors.DATA, rasters["inf"], "inf")
    assert "nan" not in proc.stdout


def test_float32_max_pixels(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["fmax"]), culprits=(rasters["fmax"],))


def test_all_nodata(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["all_nodata"]), culprits=(rasters["all_nodata"],))


def test_nan_band(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["nan_band"]), culprits=(rasters["nan_band"], "3"))


def test_pixels_outside_the_valid_range(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["good"]), "--config.input.valid_range=(0,100)",
               culprits=(rasters["good"],))


def test_window_larger_than_every_scene(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["good"]), "--config.input.window=128",
               culprits=(rasters["good"], "128"))


def test_stacked_grids_that_do_not_overlap(tmp_path, rasters):
    data_error(tmp_path, paths(rasters["grid_utm"], rasters["grid_laea"]), config="gridmae:runlocal",
               culprits=(os.path.basename(rasters["grid_laea"]),))


def test_good_scene_trains(tmp_path, rasters):
    """The control: the same inputs, unbroken, train (so the cases above fail for their one defect)."""
    proc = cli("train", MAE, tmp_path / "run", *SHORT, "--config.total_steps=2", paths(rasters["good"]),
               check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


# --- checkpoints: exit 4 -------------------------------------------------------------------------------

def test_checkpoint_of_a_different_model(run_copy):
    proc = cli("train", MAE, run_copy, *SHORT, "--config.total_steps=6", "--config.model.width=32", check=False)
    assert_error(proc, errors.CHECKPOINT, run_copy / "checkpoints" / "4", "shape")
    assert TRAIN_MARKER not in proc.stderr


def test_eval_with_a_different_model(trained):
    proc = cli("eval", MAE, trained, "--config.model.width=32", check=False)
    assert_error(proc, errors.CHECKPOINT, trained / "checkpoints" / "4", "shape")


def test_init_from_a_missing_path(tmp_path):
    missing = tmp_path / "no_such_run"
    workdir = tmp_path / "run"
    proc = cli("train", MAE, workdir, *SHORT, f"--config.init_from={missing}", check=False)
    assert_error(proc, errors.CHECKPOINT, missing)
    assert_nothing_saved(proc, workdir)
    assert not (workdir / "checkpoints").exists()  # refused before set-up


def test_init_from_a_checkpoint_of_another_model(tmp_path, trained):
    workdir = tmp_path / "run"
    proc = cli("train", MAE, workdir, *SHORT, f"--config.init_from={trained}", "--config.model.width=32",
               check=False)
    assert_error(proc, errors.CHECKPOINT, trained, "shape")
    assert_nothing_saved(proc, workdir)


def test_eval_on_an_empty_workdir(tmp_path):
    assert_error(cli("eval", MAE, tmp_path, check=False), errors.CHECKPOINT, tmp_path)


def test_export_on_an_empty_workdir(tmp_path):
    assert_error(cli("export", MAE, tmp_path, check=False), errors.CHECKPOINT, tmp_path)
    assert os.listdir(tmp_path) == []


def test_verify_an_empty_workdir(tmp_path):
    assert_error(eojax("verify", f"--workdir={tmp_path}"), errors.CHECKPOINT, tmp_path)


def test_verify_an_intact_run(trained):
    proc = eojax("verify", f"--workdir={trained}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_verify_names_a_corrupted_newest_checkpoint(run_copy):
    step4 = run_copy / "checkpoints" / "4"
    damaged = biggest_data_file(step4)
    corrupt(damaged)
    proc = eojax("verify", f"--workdir={run_copy}")
    assert proc.returncode == errors.CHECKPOINT, proc.stdout + proc.stderr[-3000:]
    corrupt_lines = [line for line in proc.stdout.splitlines() if " corrupt " in line]
    assert len(corrupt_lines) == 1 and "checkpoints/4" in corrupt_lines[0], proc.stdout
    assert os.path.relpath(damaged, step4) in corrupt_lines[0]  # names the file
    assert any("checkpoints/2" in line and "intact" in line for line in proc.stdout.splitlines()), proc.stdout


def test_training_falls_back_past_a_corrupted_newest_checkpoint(run_copy):
    step4 = run_copy / "checkpoints" / "4"
    corrupt(biggest_data_file(step4))
    step2 = _hashes(run_copy / "checkpoints" / "2")
    proc = cli("train", MAE, run_copy, *SHORT, "--config.total_steps=6", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(warnings) == 1 and str(step4) in warnings[0], proc.stderr[-3000:]
    assert "[train] step 4" in proc.stderr and "[train] step 6" in proc.stderr  # resumed from step 2
    assert _hashes(run_copy / "checkpoints" / "2") == step2


def test_every_checkpoint_corrupted(run_copy):
    for step in ("2", "4"):
        corrupt(biggest_data_file(run_copy / "checkpoints" / step))
    before = _hashes(run_copy / "checkpoints")
    proc = cli("train", MAE, run_copy, *SHORT, "--config.total_steps=6", check=False)
    line = assert_error(proc, errors.CHECKPOINT, run_copy / "checkpoints", "corrupt")
    assert "step 4" in line and "step 2" in line and "nothing was deleted" in line, line  # every step, why
    assert TRAIN_MARKER not in proc.stderr
    assert _hashes(run_copy / "checkpoints") == before  # nothing deleted or rewritten


# --- divergence: exit 6 --------------------------------------------------------------------------------

def test_non_finite_loss_names_a_saved_step(run_copy):
    """Resumed from step 4 with lr 1e30, saving every step: the run stops on the first non-finite
    loss and names the newest saved step, which is on disk, finalised and finite."""
    proc = cli("train", MAE, run_copy, *SHORT, "--config.total_steps=8", "--config.checkpoint_every=1",
               "--config.optim.lr=1e30", "--config.optim.warmup_steps=0", check=False)
    line = assert_error(proc, errors.DIVERGED, "non-finite", run_copy / "checkpoints")
    named = re.search(r"checkpoint, step (\d+),", line)
    assert named, line
    step = int(named.group(1))
    assert step >= 4 and (run_copy / "checkpoints" / str(step) / "commit_success.txt").exists(), line
    assert not [n for n in os.listdir(run_copy / "checkpoints") if "tmp" in n]  # no write left half done
    arrays = [np.asarray(x) for x in jax.tree.leaves(saved_tree(run_copy, step))]
    assert all(np.isfinite(x).all() for x in arrays if x.dtype.kind == "f"), f"step {step} holds non-finite values"
    assert "Exception in thread" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert "sys.meta_path is None" not in proc.stderr
