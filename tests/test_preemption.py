"""Preemption and collisions: SIGTERM / SIGINT save the step reached and exit 75, the same command
resumes bit-identically (one process and two on localhost); a second trainer on a workdir is refused."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from eojax import train
from helpers import REPO, cli, config_path, saved_tree, xla_flags

# Steps take ~10 ms here: the signal must land while many remain, or a fast machine finishes the run
# between the test seeing step `at` and the signal arriving (CI once saved step 12 of 12).
STEPS = 60
ARGS = [f"--config.total_steps={STEPS}", "--config.checkpoint_every=100", "--config.log_every=1",
        "--config.eval_every=0", "--config.eval_steps=1", "--config.progress_bar=False"]


def _logged_steps(workdir) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    for line in open(path).read().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if row.get("split") == "train":
            steps.append(row["step"])
    return steps


def _wait_for_step(procs, workdir, step: int) -> None:
    """Returns once the run in `workdir` has logged `step` (its processes still running)."""
    deadline = time.time() + 600
    while not any(s >= step for s in _logged_steps(workdir)):
        assert all(p.poll() is None for p in procs), "the run ended too early"
        assert time.time() < deadline
        time.sleep(0.01)


def _assert_same_params(a_dir, b_dir, step):
    a, b = saved_tree(a_dir, step), saved_tree(b_dir, step)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _train_process(workdir, devices=2, env_extra=None, args=ARGS):
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu", **(env_extra or {}))
    cmd = [sys.executable, "-m", "eojax.main", "train", f"--config={config_path('mae')}:runlocal",
           f"--workdir={workdir}", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_reached_and_resumes_bit_identically(tmp_path, sig):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    cli("train", "mae:runlocal", straight, *ARGS)
    at = random.Random(sig).randint(2, 10)
    proc = _train_process(stopped)
    _wait_for_step([proc], stopped, at)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == train.PREEMPTED_EXIT_CODE, err[-3000:]
    [saved] = os.listdir(stopped / "checkpoints")  # checkpoint_every=100: only the preemption saved
    assert at <= int(saved) < STEPS and "preempted" in err
    assert not os.path.exists(stopped / "eojax.lock")
    cli("train", "mae:runlocal", stopped, *ARGS)  # the same command resumes
    _assert_same_params(straight, stopped, STEPS)


# Two processes step at ~70 ms and are signalled at step 3: 24 steps leave a wide margin, for less time.
TWO_STEPS = 24
TWO_ARGS = [a.replace(f"total_steps={STEPS}", f"total_steps={TWO_STEPS}") for a in ARGS]


def _two_processes(workdir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [_train_process(workdir, devices=2, env_extra={
        "EOJAX_COORDINATOR": f"127.0.0.1:{port}", "EOJAX_NUM_PROCESSES": "2", "EOJAX_PROCESS_ID": str(i)},
        args=TWO_ARGS) for i in range(2)]


def _finish(procs, code=0) -> None:
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [code] * len(procs), "".join(e[-2000:] for e in errs)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """JAX's preemption service spreads the notice: both processes save the same step, exit 75, and
    the restart ends where an uninterrupted two-process run does."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _finish(_two_processes(straight))
    procs = _two_processes(stopped)
    _wait_for_step(procs, stopped, 3)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
    _finish(procs, train.PREEMPTED_EXIT_CODE)
    [saved] = os.listdir(stopped / "checkpoints")
    assert 3 <= int(saved) < TWO_STEPS
    _finish(_two_processes(stopped))
    _assert_same_params(straight, stopped, TWO_STEPS)


def test_a_second_trainer_on_a_workdir_is_refused(tmp_path):
    with train.WorkdirLock(str(tmp_path)) as lock:
        holder = json.load(open(lock.path))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(train.WorkdirLockedError, match=f"pid {os.getpid()}"):
            with train.WorkdirLock(str(tmp_path)):
                pass
        assert os.path.exists(lock.path)  # the refused one leaves the holder's lock alone
    assert not os.path.exists(lock.path)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "eojax.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "1", "since": "then"}))
    with train.WorkdirLock(str(tmp_path)):
        assert json.load(open(path))["pid"] == os.getpid()
    assert "taking over" in caplog.text
    # A lock held on another host cannot be checked: refused, naming that host.
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    with pytest.raises(train.WorkdirLockedError, match="host elsewhere"):
        with train.WorkdirLock(str(tmp_path)):
            pass


@pytest.mark.slow
def test_two_trainers_on_one_workdir(tmp_path):
    """The CLI: while one run trains, a second on the same workdir exits non-zero naming the holder,
    and the first run's files are untouched by it."""
    first = _train_process(tmp_path, args=[a for a in ARGS if "total_steps" not in a] + ["--config.total_steps=100000"])
    try:
        _wait_for_step([first], tmp_path, 1)
        second = cli("train", "mae:runlocal", tmp_path, *ARGS, check=False)
        assert second.returncode != 0 and "in use by another eojax run" in second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=600)
    assert first.returncode == train.PREEMPTED_EXIT_CODE
