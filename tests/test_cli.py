"""The command line: help, `eojax config`, one-line user errors with documented exit codes (before
anything runs), tracebacks only under --verbose, quiet logs, a progress bar whose ETA skips compilation."""
import errno
import io
import logging
import os
import re
import subprocess
import sys
import time
import types

import ml_collections
import numpy as np
import pytest
from tqdm import tqdm

from eojax import checkpoint as ckpt_lib
from eojax import config_lib, errors, main, metric_writer, parallel
from eojax.data import raster
from helpers import REPO, cli, config_path, load_config, xla_flags

MAE = f"--config={config_path('mae')}:runlocal"


def eojax(*args, env_extra=None):
    """`python -m eojax.main ARGS` (no implicit flags, unlike helpers.cli)."""
    env = {k: v for k, v in os.environ.items() if k != "EOJAX_VERBOSE"}
    env.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "eojax.main", *map(str, args)], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=600)


def assert_user_error(proc, code, *names):
    """Exit `code`, and stderr is one line `eojax: error: ...` naming each of `names`."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("eojax: error: "), proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# --- help -----------------------------------------------------------------------------------------

def test_help_lists_every_command_on_one_line_and_the_exit_codes():
    proc = eojax("--help")
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^  (\w+) +\S.*$", proc.stdout.split("commands:")[1].split("\n\n")[0], re.M)
    assert listed == list(main.COMMANDS) == ["train", "eval", "stats", "export", "infer", "config", "knn", "verify",
                                            "downstream", "data", "zoo"]
    codes = re.findall(r"^  (\d+) +\S", proc.stdout.split("exit codes:")[1], re.M)
    assert [int(c) for c in codes] == [0, 1, 2, 3, 4, 5, 6, 75, 130]
    assert proc.stderr == ""


def test_command_help_shows_that_commands_flags():
    train_help, infer_help = eojax("train", "--help"), eojax("infer", "-h")
    assert train_help.returncode == infer_help.returncode == 0
    for flag in ("--config=FILE[:ARG]", "--workdir=DIR", "--config.KEY=VALUE", "--verbose"):
        assert flag in train_help.stdout
    assert "--prompt" not in train_help.stdout and "--prompt=TEXT" in infer_help.stdout
    assert train_help.stdout.startswith("usage: eojax train ")
    # with --config, the config's keys too
    keyed = eojax("train", "--help", MAE)
    assert keyed.returncode == 0 and re.search(r"^optim\.lr +float +0\.002$", keyed.stdout, re.M), keyed.stdout


# --- eojax config ----------------------------------------------------------------------------------

def _leaves(config, prefix=""):
    """Independent flattening: {dotted key: value} through ConfigDict.items()."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_config_prints_every_key_with_its_type_and_value():
    proc = eojax("config", MAE, "--config.optim.lr=0.5", "--config.input.nodata=-9999")
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        key, kind, value = re.match(r"(\S+) +(\S+(?: or None)?) +(.*)$", line).groups()
        rows[key] = (kind, value)
    expected = _leaves(load_config("mae", **{"optim.lr": 0.5, "input.nodata": -9999.0, "progress_bar": True}))
    assert set(rows) == set(expected)
    for key, value in expected.items():
        kind = rows[key][0]
        assert rows[key][1] == repr(value), key
        assert kind == type(value).__name__ or (value is None and kind.endswith("or None")), key
    assert rows["optim.lr"] == ("float", "0.5") and rows["input.nodata"] == ("float", "-9999.0")
    assert rows["input.reference"] == ("str or None", "None")


# --- user errors: one line, documented code, before anything runs ---------------------------------

def test_unknown_key_is_one_line_with_the_suggestion(tmp_path):
    proc = eojax("train", MAE, f"--workdir={tmp_path / 'run'}", "--config.optim.lrr=1e-3")
    line = assert_user_error(proc, errors.USAGE)
    assert line == ("eojax: error: unknown config key 'optim.lrr' in --config.optim.lrr=1e-3: "
                    "did you mean --config.optim.lr=1e-3?")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,culprit", [
    ("--config.batch_size=-4", "config.batch_size=-4"),
    ("--config.log_every=0", "config.log_every=0"),
])
def test_invalid_trainer_value_stops_before_anything_runs(tmp_path, override, culprit):
    start = time.perf_counter()
    proc = eojax("train", MAE, f"--workdir={tmp_path / 'run'}", override)
    assert_user_error(proc, errors.USAGE, culprit)
    assert not (tmp_path / "run").exists()  # validated before the workdir, the data or jax's compiler
    assert time.perf_counter() - start < 60


def test_validate_ranges():
    good = load_config("mae")
    config_lib.validate(good)
    cases = {"total_steps": 0, "batch_size": 0, "log_every": -1, "keep_checkpoints": 0, "eval_every": -1,
             "checkpoint_every": -5, "eval_steps": -1, "mesh": (("data", 0),)}
    for key, value in cases.items():
        bad = load_config("mae", **{key: value})
        with pytest.raises(errors.ConfigError, match=rf"config\.{key}="):
            config_lib.validate(bad)
    for key in ("eval_every", "checkpoint_every", "eval_steps"):  # 0 = off / at the end / all
        config_lib.validate(load_config("mae", **{key: 0}))
    config_lib.validate(load_config("mae", mesh=(("data", -1), ("model", 2))))
    with pytest.raises(errors.ConfigError, match="best_mode"):
        config_lib.validate(load_config("mae", best_metric="loss", best_mode="maximum"))


def test_usage_errors(tmp_path):
    assert_user_error(eojax("trian", MAE), errors.USAGE, "'trian'", "did you mean 'train'")
    assert_user_error(eojax("train", MAE), errors.USAGE, "--workdir")
    assert_user_error(eojax("train", f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path}"),
                      errors.USAGE, "nope.py")
    assert_user_error(eojax("train", f"--config={config_path('mae')}:bogus", f"--workdir={tmp_path}"),
                      errors.USAGE, "bogus")
    assert_user_error(eojax("train", MAE, f"--workdir={tmp_path}", "--config.total_steps=ten"),
                      errors.USAGE, "total_steps", "ten")


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("keep me")
    assert_user_error(eojax("train", MAE, f"--workdir={path}"), errors.WORKDIR, str(path), "not a directory")
    assert path.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through 0o500")
def test_read_only_workdir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert_user_error(eojax("train", MAE, f"--workdir={ro}"), errors.WORKDIR, str(ro), "not writable")
        assert_user_error(eojax("train", MAE, f"--workdir={ro / 'run'}"), errors.WORKDIR,
                          str(ro / "run"), "cannot create")
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="Linux sysfs: not writable even by root")
def test_unwritable_workdir_even_for_root():
    assert_user_error(eojax("train", MAE, "--workdir=/sys/kernel"), errors.WORKDIR, "/sys/kernel", "not writable")


def test_check_workdir_creates_a_missing_one(tmp_path):
    config_lib.check_workdir(str(tmp_path / "a" / "b"), create=True)
    assert (tmp_path / "a" / "b").is_dir() and os.listdir(tmp_path / "a" / "b") == []  # the probe is gone
    with pytest.raises(errors.WorkdirError, match="does not exist"):
        config_lib.check_workdir(str(tmp_path / "c"), create=False)
    if os.path.isdir("/sys/kernel"):  # reading a run (eval, verify) needs no write access
        config_lib.check_workdir("/sys/kernel", create=False)


def test_disk_check(tmp_path, monkeypatch, caplog):
    free = 100 << 20
    monkeypatch.setattr(config_lib.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free))
    config_lib.disk_check(str(tmp_path), 10 << 20, keep=3)  # 40 MiB fit
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        config_lib.disk_check(str(tmp_path), 30 << 20, keep=3)  # one fits, four may not
    assert "keep_checkpoints=3" in caplog.text
    with pytest.raises(errors.WorkdirError, match=r"100\.0 MiB free.*200\.0 MiB"):
        config_lib.disk_check(str(tmp_path), 200 << 20, keep=3)
    # checkpoints already there count against what keep needs: 3 x 30 MiB held, 1 more needed
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)
    (tmp_path / "checkpoints" / "1" / "data").write_bytes(b"\0" * (90 << 20))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config_lib.disk_check(str(tmp_path), 30 << 20, keep=3)
    assert not caplog.records


def test_data_error_exit_code(tmp_path):
    proc = eojax("train", MAE, f"--workdir={tmp_path}", "--config.input.paths=('/nonexistent/x.tif',)")
    lines = proc.stderr.splitlines()
    assert proc.returncode == errors.DATA, proc.stderr[-3000:]
    assert lines[-1] == "eojax: error: raster file not found: /nonexistent/x.tif"
    assert "Traceback" not in proc.stderr and len(lines) <= 2  # at most the mesh's INFO line before it


def test_checkpoint_error_exit_code(tmp_path):
    proc = eojax("eval", MAE, f"--workdir={tmp_path}")
    assert proc.returncode == errors.CHECKPOINT, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[-1] == f"eojax: error: no eojax checkpoint under {tmp_path}"


def test_verify_without_checkpoints(tmp_path):
    assert_user_error(eojax("verify", f"--workdir={tmp_path}"), errors.CHECKPOINT, str(tmp_path))
    assert_user_error(eojax("verify", f"--workdir={tmp_path / 'none'}"), errors.WORKDIR, str(tmp_path / "none"))


def test_verbose_adds_the_traceback(tmp_path):
    for extra, env in ((["--verbose"], None), ([], {"EOJAX_VERBOSE": "1"})):
        proc = eojax("train", MAE, f"--workdir={tmp_path / 'run'}", "--config.batch_size=-4", *extra, env_extra=env)
        assert proc.returncode == errors.USAGE
        assert "Traceback (most recent call last)" in proc.stderr and "config_lib.py" in proc.stderr
        assert proc.stderr.splitlines()[-1] == "eojax: error: config.batch_size=-4 is invalid: must be an integer >= 1"


# --- the classification, in process ---------------------------------------------------------------

def _raised(fn, *args, **kwargs) -> BaseException:
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # noqa: B036
        return e
    raise AssertionError("no exception")


def test_exit_codes_of_eojax_exceptions(tmp_path):
    assert errors.exit_code(_raised(config_lib.parse_arg, "bogus", runlocal=False)) == errors.USAGE
    assert errors.exit_code(_raised(raster.expand_paths, [str(tmp_path / "x.tif")])) == errors.DATA
    assert errors.exit_code(_raised(ckpt_lib.raise_mismatch, ["shape of a: (1,) vs (2,)"], "x")) == errors.CHECKPOINT
    assert errors.exit_code(_raised(ckpt_lib.step_folder, str(tmp_path / "none"))) == errors.CHECKPOINT
    assert errors.exit_code(errors.WorkdirError("w")) == errors.WORKDIR
    assert errors.exit_code(OSError(errno.ENOSPC, "No space left on device", "/w/x")) == errors.WORKDIR
    assert errors.exit_code(KeyboardInterrupt()) == errors.INTERRUPTED
    full = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/w/x\": No space left on device "
                      "[os_error_code='28']")  # TensorStore's way of saying it
    assert errors.exit_code(full) == errors.WORKDIR
    # bugs: an implicit error in eojax code, an error raised in a library, a KeyError of a lookup
    assert errors.exit_code(_raised(parallel.mesh_shape, [("data",)], 1)) == errors.INTERNAL
    assert errors.exit_code(_raised(np.reshape, np.zeros(3), (2,))) == errors.INTERNAL
    assert errors.exit_code(_raised(lambda: {}["k"])) == errors.INTERNAL
    assert errors.exit_code(RuntimeError("x")) == errors.INTERNAL


def test_report_prints_one_line_for_user_errors_and_a_traceback_for_bugs(capsys):
    class Stopped(SystemExit):  # as train.Preempted: a SystemExit carrying its message
        def __init__(self):
            super().__init__(errors.PREEMPTED)
            self.message = "preempted: stopped after step 3"

    assert main._report(Stopped(), verbose=False) == errors.PREEMPTED
    assert capsys.readouterr().err == "eojax: preempted: stopped after step 3\n"
    assert main._report(errors.DataError("bad.tif: +inf in band 2"), verbose=False) == errors.DATA
    assert capsys.readouterr().err == "eojax: error: bad.tif: +inf in band 2\n"
    assert main._report(_raised(lambda: {}["k"]), verbose=False) == errors.INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "eojax: internal error: k" in err


def test_readme_documents_the_exit_codes():
    with open(os.path.join(REPO, "README.md")) as f:
        documented = [int(c) for c in re.findall(r"^\| (\d+) \| ", f.read(), re.M)]
    assert documented == [code for code, _ in main.EXIT_CODES]


def test_message_is_one_line():
    assert errors.message(KeyError("no such band 'B13'")) == "no such band 'B13'"
    assert errors.message(ValueError("a (2 differences):\n  x\n  y")) == "a (2 differences): x; y"
    many = ValueError("a (20 differences):\n" + "\n".join(f"  d{i}" for i in range(20)))
    assert errors.message(many) == "a (20 differences): " + "; ".join(f"d{i}" for i in range(7)) + "; ... (13 more)"
    assert errors.message(ValueError()) == "ValueError"


# --- progress bar and logs -------------------------------------------------------------------------

def test_progress_eta_excludes_the_first_step():
    """The first step (compilation) takes 1 s, the next ones 10 ms: the bar's rate is that of the
    later steps, where plain tqdm's still averages the first one in."""
    bars = []
    for make in (lambda: metric_writer.Progress(100, 0, file=io.StringIO(), mininterval=0),
                 lambda: tqdm(total=100, file=io.StringIO(), mininterval=0)):
        bar = make()
        time.sleep(1.0)
        bar.update(1)
        for _ in range(3):
            time.sleep(0.01)
            bar.update(1)
        bars.append(bar.format_dict)
        bar.close()
    ours, plain = bars
    assert ours["n"] == plain["n"] == 4
    assert ours["elapsed"] < 0.5 < 1.0 <= plain["elapsed"]
    assert ours["rate"] > 10 > plain["rate"]  # steps of 10 ms (slower on a loaded machine): 100/s vs < 4/s
    assert metric_writer.Progress(10, enabled=False).format_dict == {}


def test_log_lines_print_above_the_progress_bar(capsys):
    bar = metric_writer.Progress(10, 0, mininterval=0)  # on sys.stderr, as in a run
    bar.update(1)
    logger = logging.getLogger("eojax.test_cli")
    logger.propagate = False
    handler = metric_writer.LogHandler()
    logger.addHandler(handler)
    try:
        logger.warning("a message")
    finally:
        logger.removeHandler(handler)
        bar.close()
    err = capsys.readouterr().err
    # the bar is cleared ('\r' + blanks + '\r'), the message printed on a line of its own, the bar redrawn
    before, after = err.split("a message\n")
    frames = before.split("\r")
    assert frames[-1] == "" and frames[-2].strip() == "" and "1/10" in frames[-3], repr(err)
    assert after.startswith("\r") and "1/10" in after, repr(err)


@pytest.mark.slow
def test_a_run_prints_few_lines_and_no_library_info(tmp_path):
    proc = cli("train", "mae:runlocal", tmp_path, "--config.total_steps=2", "--config.checkpoint_every=1",
               "--config.log_every=1", "--config.eval_steps=1", devices=1)
    err = proc.stderr.splitlines()
    assert not [line for line in err if re.search(r"orbax|checkpoint_manager|absl|Unable to initialize backend",
                                                  line, re.I)], proc.stderr
    assert "[train] step 2" in proc.stderr and "Traceback" not in proc.stderr
    assert len(err) <= 6, proc.stderr  # mesh, 2 train lines, eval, test: no library chatter
    assert '"train"' in proc.stdout
    # `eojax verify` on it: intact; then with a data file of step 2 overwritten: exit CHECKPOINT
    proc = eojax("verify", f"--workdir={tmp_path}")
    assert proc.returncode == 0 and re.search(r"^checkpoints/2 +intact", proc.stdout, re.M), proc.stdout
    state = tmp_path / "checkpoints" / "2" / "state"
    biggest = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    biggest.write_bytes(bytes(data))
    proc = eojax("verify", f"--workdir={tmp_path}")
    assert proc.returncode == errors.CHECKPOINT and re.search(r"^checkpoints/2 +corrupt", proc.stdout, re.M), \
        proc.stdout
