"""What the train-step benches share: loading a config file, fresh single-device child processes,
timing pre-fetched steps and printing a table. Not a benchmark itself."""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "BENCH_RESULT "  # a child prints its result on one line starting with this
READY = "BENCH_READY"  # a long-lived child (interleaved cycles) prints this once it is warmed up


def read_reply(stdout):
    """The next protocol line of a long-lived child: READY, or a MARK result decoded; None if the
    child died."""
    for line in stdout:
        line = line.rstrip("\n")
        if line == READY:
            return READY
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return None


def load_config(name: str, arg: str | None = None):
    """configs/<name>.py's get_config(arg), loaded by path as `eojax train --config=...` does."""
    spec = importlib.util.spec_from_file_location(f"{name}_config", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def summary(times: list[float], batch: int) -> dict:
    """Median step (robust against other processes sharing the cores), fastest step, images/s."""
    med = statistics.median(times)
    return {"step_s": med, "min_step_s": min(times), "images_per_s": batch / med, "n": len(times)}


def timed_calls(fn, n: int, warmup: int) -> list[float]:
    """`warmup` untimed calls of fn, then the seconds of each of `n` timed calls (fn blocks itself)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def time_steps(run, state, pool: list, steps: int, warmup: int):
    """`warmup` untimed then `steps` timed trainer steps cycling over `pool` (batches already on the
    device, so only the jitted step is timed; its cost does not depend on the pixel values).
    Each step is blocked on its result. Returns (state, last metrics, per-step seconds)."""
    import jax

    for i in range(warmup):
        state, metrics = run.train_step(state, pool[i % len(pool)])
        jax.block_until_ready((state, metrics))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, metrics = run.train_step(state, pool[i % len(pool)])
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    return state, metrics, times


def single_device_env(extra_xla_flags: str = "") -> dict:
    """This environment for a child that gets one CPU device, as a user's single-host run does: an
    inherited simulated-device count is dropped."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + extra_xla_flags.split())
    return env


def run_child(script: str, child_args: list[str], env: dict, label: str) -> dict | str:
    """`script --child ...` in a fresh process (no thread pools, allocator or jit cache shared with
    another measurement); returns its MARK result, or a reason it has none with its output's tail."""
    proc = subprocess.run([sys.executable, os.path.abspath(script), *child_args], capture_output=True,
                          text=True, cwd=REPO, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
    return f"{label} run failed (rc {proc.returncode}):\n    " + "\n    ".join(tail)


def print_table(head: tuple, rows: list[tuple]) -> None:
    """Columns padded to their widest cell; the first and last (names, config) left-aligned."""
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    last = len(head) - 1
    fmt = " | ".join(f"{{:<{w}}}" if i in (0, last) else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*head))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(fmt.format(*r))
