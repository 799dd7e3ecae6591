"""Geographic heads: label-making throughput and training steps/s of configs/geo.py.

  /work/main/.venv/bin/python bench/geo.py [--steps 30] [--label-batches 20]

Rows:
  labels only          WindowLabeler.label on batches of 256 random windows of the runlocal scenes
                       (8 scenes, 7 CRSs): lat/lon + 8x8-grid Koppen-Geiger fractions + date; no pixels
  labelled input       the Grain pipeline as the trainer gets it: window reads + labels, batch 16
  train step cnn/vit   `:runlocal` (32 px windows, batch 16) on one CPU device, median of timed steps
                       after warm-up (labelled batches prefetched to the device; compile excluded)
CPU seconds are printed next to wall time: steadier when other processes share the cores.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

if __name__ == "__main__":  # one CPU device, as a user's single-host run
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags)

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import load_config, print_table, summary, time_steps  # noqa: E402


def _timed(fn, repeats):
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - w0, time.process_time() - c0


def bench_labels(batches: int) -> list[tuple]:
    from eojax import tasks
    config = load_config("geo", "runlocal")
    config.input.baseline_windows = 64
    inp = tasks.make_input(config)
    from eojax.data.windows import RandomWindowSampler
    sampler = RandomWindowSampler(inp.scenes, config.input.window, config.input.min_valid_fraction)
    rng = np.random.default_rng(0)
    n = 256
    picks = [[sampler.sample(rng) for _ in range(n)] for _ in range(batches)]
    arrays = [(np.array([i for i, _ in p]), np.array([w.row_off for _, w in p]), np.array([w.col_off for _, w in p]))
              for p in picks]
    inp.labeler.label(*arrays[0], config.input.window)  # warm-up
    it = iter(range(10**9))
    wall, cpu = _timed(lambda: inp.labeler.label(*arrays[next(it) % batches], config.input.window), batches)
    rows = [("labels only (batch 256)", f"{batches * n / wall:,.0f}", f"{batches * n / cpu:,.0f}", "8 scenes, 8x8 grid")]
    train_it = inp.train(0, 1)
    next(train_it)
    wall, cpu = _timed(lambda: next(train_it), batches * 4)
    b = config.batch_size
    rows.append(("labelled input (reads + labels)", f"{batches * 4 * b / wall:,.0f}", f"{batches * 4 * b / cpu:,.0f}",
                 f"batch {b}, {config.input.window} px, 3 bands"))
    return rows


def bench_steps(backbone: str, steps: int) -> tuple:
    import jax
    from eojax import train
    config = load_config("geo", f"runlocal,backbone={backbone}")
    config.update(mesh=(("data", 1), ("fsdp", 1), ("model", 1)), progress_bar=False)
    config.input.baseline_windows = 64
    run = train.setup(config, devices=jax.devices()[:1])
    state = run.init_state()
    pool = [run.next_batch() for _ in range(4)]
    t0 = time.perf_counter()
    state, metrics = run.train_step(state, pool[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    c0 = time.process_time()
    state, _, times = time_steps(run, state, pool, steps, warmup=2)
    cpu = (time.process_time() - c0) / (steps + 2)
    s = summary(times, config.batch_size)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    return (f"train step {backbone}", f"{1 / s['step_s']:.1f} steps/s ({s['images_per_s']:.0f} win/s)",
            f"{1 / cpu:.1f} steps/s", f"{params / 1e3:.0f}k params, first step (compile) {compile_s:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--label-batches", type=int, default=20)
    args = ap.parse_args()
    rows = bench_labels(args.label_batches)
    for backbone in ("cnn", "vit"):
        rows.append(bench_steps(backbone, args.steps))
    print_table(("what", "windows/s (wall)", "per CPU-second", "config"), rows)
    print(f"\n{os.cpu_count()} cores; wall = elapsed time, CPU = this process's CPU time (steadier under load)")


if __name__ == "__main__":
    main()
