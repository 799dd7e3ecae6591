"""Multi-head attention forward + backward alone, at the MAE bench's shapes: eojax's XLA attention
(`eojax.models.layers.dot_product_attention`, jitted with its vjp) against PyTorch's
`scaled_dot_product_attention` and against PyTorch's plain math (q k^T, softmax, p v) with autograd.

  .venv/bin/python bench/attention.py [--rounds 2] [--iters 20]

Why it exists: the MAE step's gap to the PyTorch reference (bench/mae_step.py) sits in its backward,
and a large share of that is the decoder's attention (145 tokens, 6 heads of 32). This bench isolates
that kernel so the gap can be re-measured when jax / XLA:CPU change. Each framework runs in a fresh
single-device child process, in alternating order, `--rounds` times; every timing is the median of
`--iters` calls, each blocked on its result. FLOPs counted: the four matmuls of the forward and
backward products, 12 * B * H * T * S * Dh (softmax and scaling not counted). torch is optional:
without it, its columns say so.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MARK, print_table, run_child, single_device_env, timed_calls  # noqa: E402

# (name, batch, tokens, heads, head_dim): the MAE bench's encoder (kept tokens + cls) and decoder.
SHAPES = (("decoder", 32, 145, 6, 32), ("encoder", 32, 37, 6, 64))


def _flops(b, t, h, d):
    return 12.0 * b * h * t * t * d


def _median_call(fn, iters: int) -> float:
    return statistics.median(timed_calls(fn, iters, warmup=3))


def eojax_side(iters: int) -> dict:
    import jax
    import numpy as np

    from eojax.models import layers

    out = {}
    for name, b, t, h, d in SHAPES:
        rng = np.random.default_rng(0)
        q, k, v, g = (jax.numpy.asarray(rng.standard_normal((b, t, h, d)), jax.numpy.float32) for _ in range(4))
        step = jax.jit(lambda q, k, v: jax.vjp(layers.dot_product_attention, q, k, v)[1](g))
        out[name] = _median_call(lambda: jax.block_until_ready(step(q, k, v)), iters)
    return out


def torch_side(iters: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    out = {}
    for name, b, t, h, d in SHAPES:
        q, k, v = (torch.randn(b, h, t, d, requires_grad=True) for _ in range(3))
        g = torch.randn(b, h, t, d)

        def sdpa():
            torch.nn.functional.scaled_dot_product_attention(q, k, v).backward(g)

        def math():
            p = torch.softmax((q * d ** -0.5) @ k.transpose(-1, -2), dim=-1)
            (p @ v).backward(g)

        out[name] = _median_call(sdpa, iters)
        out[name + " math"] = _median_call(math, iters)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--child", choices=("eojax", "torch"))
    args = parser.parse_args()
    if args.child:
        side = eojax_side if args.child == "eojax" else torch_side
        print(MARK + json.dumps(side(args.iters)), flush=True)
        return

    have_torch = importlib.util.find_spec("torch") is not None
    sides = ["eojax"] + (["torch"] if have_torch else [])
    results = {s: [] for s in sides}
    env = single_device_env()
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            res = run_child(__file__, ["--child", side, "--iters", str(args.iters)], env, side)
            if isinstance(res, str):
                raise SystemExit(res)
            results[side].append(res)

    def best(side, key):  # the best round's median: the least disturbed by other load
        return min(r[key] for r in results[side]) if side in results else None

    rows = []
    for name, b, t, h, d in SHAPES:
        e, ts, tm = best("eojax", name), best("torch", name), best("torch", name + " math")
        ms = lambda s: "torch not installed" if s is None else f"{s * 1e3:.1f}"  # noqa: E731
        rows.append((name, f"{b} x {t} x {h} x {d}", ms(e), f"{_flops(b, t, h, d) / e / 1e9:.0f}", ms(ts), ms(tm),
                     "-" if ts is None else f"{ts / e:.2f}x", f"{args.rounds} rounds x {args.iters} calls"))
    print_table(("attention", "B x T x H x Dh", "eojax ms", "GFLOP/s", "torch sdpa ms", "torch math ms",
                 "eojax speed vs sdpa", "timing"), rows)


if __name__ == "__main__":
    main()
