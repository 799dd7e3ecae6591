"""Segmentation decoders: training steps/s on ViT-B features, and the K-probe sweep vs K runs.

  .venv/bin/python bench/seg_decoders.py [--batch 8] [--steps 5] [--warmup 2] [--k 8]
                                          [--part decoders|sweep|both]

Part 1 (decoders): each decoder trains on frozen ViT-B/16 features of 224-px images (four (B, 14, 14,
768) maps, as the encoder's layers 3/5/7/11 give them), through SegmentationModel.decode (logits
upsampled to 224) with cross-entropy and eojax.optim's AdamW; the encoder is not run (cached features).

Part 2 (sweep): the one trainer with configs/seg.py (encoder=mae base = ViT-B/16 at 224, frozen,
linear probes) on synthetic burn-scar chips: one step of sweep=K (encoder once, K probes under vmap)
vs one step of a single probe; K sequential runs cost K single steps. Also the same on cached
features alone (K probes vmapped vs K single-probe steps). One CPU device; median step of --steps.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from _common import load_config, time_steps  # noqa: E402
from eojax import optim, train  # noqa: E402
from eojax.seg import data as segdata  # noqa: E402
from eojax.seg import decoders as seg  # noqa: E402

DECODER_ARGS = {"linear": {}, "fcn": dict(channels=256), "upernet": dict(channels=512),
                "segformer": dict(channels=256), "muster": dict(channels=256, heads=8, window=7)}


def _median_step(fn, state, warmup, steps):
    for _ in range(warmup):
        state = jax.block_until_ready(fn(state))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state = jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decoder_step(decoder, k: int, batch: int):
    """A jitted AdamW step of k vmapped copies of `decoder` on fixed ViT-B features -> (step, state).
    Features and labels are arguments (not constants XLA would try to fold)."""
    rng = np.random.default_rng(0)
    feats = [jnp.asarray(rng.normal(size=(batch, 14, 14, 768)), jnp.float32) for _ in range(4)]
    labels = jnp.asarray(rng.integers(0, 2, size=(batch, 224, 224)))
    model = seg.SegmentationModel(encoder=None, decoder=decoder)
    params = jax.vmap(lambda r: decoder.init(r, feats)["params"])(jax.random.split(jax.random.key(0), k))
    oc = optim.default_config()
    oc.update(name="adamw", lr=1e-4, weight_decay=0.05)
    tx = optim.build(oc, 1000).tx
    opt = jax.vmap(tx.init)(params)

    def loss(p, r, f, y):
        logits = model.apply({"params": {"decoder": p}}, f, (224, 224), True, method="decode", rngs={"dropout": r})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(state, f, y):
        p, o, i = state
        rngs = jax.random.split(jax.random.fold_in(jax.random.key(1), i), k)
        grads = jax.vmap(jax.grad(loss), in_axes=(0, 0, None, None))(p, rngs, f, y)
        upd, o = jax.vmap(tx.update)(grads, o, p)
        return optax.apply_updates(p, upd), o, i + 1

    return (lambda state: step(state, feats, labels)), (params, opt, jnp.int32(0))


def part_decoders(args):
    rows = []
    for name, kw in DECODER_ARGS.items():
        step, state = decoder_step(seg.build_decoder(name, 2, **kw), 1, args.batch)
        t = _median_step(step, state, args.warmup, args.steps)
        rows.append((name, t))
        print(f"  {name}: {t * 1e3:.0f} ms/step", file=sys.stderr, flush=True)
    print(f"\n| decoder (ViT-B/16 features, 224 px, batch {args.batch}) | step ms | steps/s |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.0f} | {1 / t:.2f} |")


def _trainer_step_time(config, args):
    run = train.setup(config, devices=jax.devices()[:1])
    state = run.init_state()
    pool = [run.next_batch() for _ in range(2)]
    _, _, times = time_steps(run, state, pool, args.steps, args.warmup)
    return statistics.median(times)


def part_sweep(args):
    root = segdata.synthetic_burnscars(os.path.join(tempfile.gettempdir(), "eojax_bench_burnscars"),
                                       size=256, n_train=10, n_test=2)

    def config(sweep):
        c = load_config("seg", "encoder=mae,decoder=linear,mode=frozen" + (f",sweep={sweep}" if sweep else ""))
        c.update(batch_size=args.batch, mesh=(("data", 1), ("fsdp", 1), ("model", 1)), progress_bar=False)
        c.input.update(root=root, synthetic_size=256)
        c.model.encoder_args = dict(patch_size=16)
        return c

    single = _trainer_step_time(config(0), args)
    swept = _trainer_step_time(config(args.k), args)
    lin = seg.build_decoder("linear", 2)
    one, s1 = decoder_step(lin, 1, args.batch)
    many, sk = decoder_step(lin, args.k, args.batch)
    cached_one = _median_step(one, s1, args.warmup, args.steps)
    cached_k = _median_step(many, sk, args.warmup, args.steps)
    print(f"\n| K={args.k} linear probes, batch {args.batch} | K sequential runs (s/step) | sweep (s/step) | speed-up |")
    print("|---|---|---|---|")
    print(f"| trainer, frozen ViT-B/16 encoder at 224 | {args.k * single:.3f} | {swept:.3f} | "
          f"{args.k * single / swept:.1f}x |")
    print(f"| cached features only | {args.k * cached_one:.4f} | {cached_k:.4f} | {args.k * cached_one / cached_k:.1f}x |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--part", default="both", choices=("decoders", "sweep", "both"))
    args = ap.parse_args()
    print(f"devices: {jax.devices()}", file=sys.stderr)
    if args.part in ("decoders", "both"):
        part_decoders(args)
    if args.part in ("sweep", "both"):
        part_sweep(args)


if __name__ == "__main__":
    main()
