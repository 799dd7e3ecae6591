"""AdamW vs Sophia-G on the Virtual Satellite tabular task, at equal steps and at equal wall time.

  .venv/bin/python bench/vsat_sophia.py [--steps 300] [--batch 32] [--width 64] [--layers 2]
                                        [--png bench/vsat_sophia_loss.png] [--json out.json]

Both optimizers train the same GPT-2 (configs/vsat.py:runlocal sizes unless overridden) on the real
Landsat-8 rows of ../shared/data/gdalcubes_L8NY18 (path/row 013/032, EOJAX_TEST_DATA), through the
trainer's own jitted step, from the same init and the same batches, each in a fresh child process.
Each optimizer keeps its config learning rate and schedule (configs/vsat.py: AdamW 2e-3, Sophia-G
2e-3 with gamma 1.0 and a Hessian refresh every 10 steps) unless --sophia-lr / --sophia-gamma say.
Per step the train loss and the wall time are recorded; the held-out eval loss (the box on the
target date) is measured at the end.

Table: train loss (mean of the last 10% of steps) and eval loss at equal steps; train loss reached
at equal wall time (the shorter of the two runs' total time, a 10%-of-steps window ending there);
median step time; the Sophia-G win rate at the end. The PNG shows both curves against step and time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from _common import MARK, REPO, load_config, print_table, run_child, single_device_env


def _config(args, optimizer: str):
    config = load_config("vsat", f"runlocal,mode=great,optim={optimizer}")
    config.input.update(source="landsat", target_date="2018-08-27", qa_format="landsat_c1")  # real rows
    config.total_steps = args.steps
    config.batch_size = args.batch
    config.mesh = (("data", 1), ("fsdp", 1), ("model", 1))
    config.progress_bar = False
    config.model.update(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 16))
    if optimizer == "sophia_g":
        if args.sophia_gamma:
            config.optim.sophia.gamma = args.sophia_gamma
        if args.sophia_lr:
            config.optim.lr = args.sophia_lr
    return config


def run_one(args, optimizer: str) -> dict:
    import jax

    from eojax import train

    config = _config(args, optimizer)
    run = train.setup(config, devices=jax.devices()[:1])
    state = run.init_state()
    losses, times, start = [], [], None
    for step in range(args.steps):
        state, metrics = run.train_step(state, run.next_batch())
        loss = float(metrics["loss"])  # blocks: the step is done
        if start is None:  # the first step includes compilation: time from its end
            start = time.perf_counter()
            times.append(0.0)
        else:
            times.append(time.perf_counter() - start)
        losses.append(loss)
    eval_loss = train.evaluate(run, train.eval_variables(run, state)).get("loss", float("nan"))
    win = float(metrics.get("sophia_win_rate", float("nan")))
    return {"losses": losses, "times": times, "eval_loss": eval_loss, "win_rate": win,
            "lr": config.optim.lr, "gamma": config.optim.sophia.gamma,
            "step_s": statistics.median(np.diff(times)) if len(times) > 2 else float("nan")}


def _window_mean(losses, end: int, width: int) -> float:
    return float(np.mean(losses[max(0, end - width):end]))


def _plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        loss = np.asarray(r["losses"])
        k = max(1, len(loss) // 30)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        axes[0].plot(np.arange(len(smooth)) + k, smooth, label=name)
        axes[1].plot(np.asarray(r["times"])[k - 1:], smooth, label=name)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall time after the first step (s)")
    for ax in axes:
        ax.set_ylabel("train loss (nats / token, smoothed)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("Virtual Satellite (Landsat-8 013/032 rows): AdamW vs Sophia-G")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sophia-gamma", type=float, default=0.0, help="0 = configs/vsat.py's")
    ap.add_argument("--sophia-lr", type=float, default=0.0, help="0 = configs/vsat.py's")
    ap.add_argument("--png", default=os.path.join(REPO, "bench", "vsat_sophia_loss.png"))
    ap.add_argument("--json", default="")
    ap.add_argument("--child", choices=("adamw", "sophia_g"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(MARK + json.dumps(run_one(args, args.child)))
        return

    child_args = ["--steps", str(args.steps), "--batch", str(args.batch), "--width", str(args.width),
                  "--layers", str(args.layers), "--sophia-gamma", str(args.sophia_gamma),
                  "--sophia-lr", str(args.sophia_lr)]
    results = {}
    for name in ("adamw", "sophia_g"):
        r = run_child(__file__, ["--child", name, *child_args], single_device_env(), name)
        if isinstance(r, str):
            sys.exit(r)
        results[name] = r
    width = max(1, args.steps // 10)
    t_equal = min(r["times"][-1] for r in results.values())
    rows = []
    for name, r in results.items():
        at_t = int(np.searchsorted(r["times"], t_equal, side="right"))
        rows.append((name, args.steps, f"{_window_mean(r['losses'], 3, 3):.3f}",
                     f"{_window_mean(r['losses'], args.steps, width):.3f}", f"{r['eval_loss']:.3f}",
                     f"{t_equal:.1f}", f"{_window_mean(r['losses'], at_t, width):.3f}", f"{r['step_s'] * 1e3:.1f}",
                     "" if np.isnan(r["win_rate"]) else f"{r['win_rate']:.2f}",
                     f"b{args.batch} L{args.layers} d{args.width} lr {r['lr']:g}"
                     + (f" gamma {r['gamma']:g}" if name == "sophia_g" else "")))
    print_table(("optimizer", "steps", "loss@start", "loss@steps", "eval@steps", "equal time s", "loss@time",
                 "step ms", "win rate", "model"), rows)
    _plot(results, args.png)
    print(f"loss curves: {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f)


if __name__ == "__main__":
    main()
