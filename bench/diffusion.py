"""Diffusion UNet throughput at runlocal size: eojax (flax) vs diffusers' PyTorch UNet2DConditionModel.

  .venv/bin/python bench/diffusion.py [--batch 16] [--steps 10] [--sampler-steps 10] [--rounds 1]
                                      [--framework both|eojax|torch]

Shape (both sides, from configs/diffusion.py:runlocal): 16x16 x 12-channel input (32x32 RGB through the
space-to-depth autoencoder), block_out_channels (32, 64), attention at the 8x8 level and in the mid block,
1 ResBlock per level (2 on the way up), 4 heads, cross-attention to 12 tokens of width 32, GroupNorm 8
groups, float32. The bench checks that both UNets have the same parameter count.

train images/s: one step = UNet forward + backward + AdamW on a batch (caption embeddings given; the
  small text encoder is left out on both sides).
sampling images/s: DPM-Solver++ 2M, --sampler-steps steps, classifier-free guidance (cond + uncond as one
  2B batch per step); eojax: the jitted lax.scan sampler of eojax.diffusion.samplers, diffusers: its
  DPMSolverMultistepScheduler loop under torch.inference_mode.
Each framework runs in its own fresh child process (torch with OpenMP's default wait policy, as shipped;
run nothing else meanwhile: spinning OpenMP threads suffer badly from competing processes); medians
of per-step (per-batch) times.
diffusers is a bench-only dependency (`pip install diffusers`); without it the torch row says so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from _common import MARK, print_table, run_child, single_device_env, timed_calls

SHAPE = dict(size=16, channels=12, blocks=(32, 64), attention=(False, True), layers=1, heads=4, ctx_len=12,
             ctx_dim=32, groups=8)
CONFIG_TEXT = "16x16x12 UNet(32,64) attn@8x8 ctx 12x32 f32"


def run_eojax(args) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    from eojax.diffusion import samplers, schedules
    from eojax.diffusion import unet as unet_lib

    s = SHAPE
    model = unet_lib.UNet(in_channels=s["channels"], out_channels=s["channels"], block_out_channels=s["blocks"],
                          attention=s["attention"], layers_per_block=s["layers"], heads=s["heads"],
                          cross_attention_dim=s["ctx_dim"], norm_groups=s["groups"])
    b = args.batch
    x = jax.random.normal(jax.random.key(0), (b, s["size"], s["size"], s["channels"]))
    ctx = jax.random.normal(jax.random.key(1), (b, s["ctx_len"], s["ctx_dim"]))
    t = jnp.full((b,), 500)
    params = nn.meta.unbox(model.init(jax.random.key(2), x, t, ctx))["params"]
    n_params = sum(a.size for a in jax.tree.leaves(params))
    tx = optax.adamw(1e-4)
    opt = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((model.apply({"params": p}, x, t, ctx) - x) ** 2))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    state = [params, opt]

    def train_once():
        state[0], state[1], loss = step(*state)
        jax.block_until_ready(loss)

    train_times = timed_calls(train_once, args.steps, 2)
    sched = schedules.Schedule(schedules.make_betas("linear", 1000))
    apply_fn = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
    sample = jax.jit(functools.partial(samplers.sample, apply_fn, sched, "epsilon", name="dpmpp_2m",
                                       num_steps=args.sampler_steps, guidance_scale=2.0))
    uncond = jnp.zeros_like(ctx)
    sample_times = timed_calls(lambda: jax.block_until_ready(sample(state[0], x, jax.random.key(3), ctx, uncond)),
                          max(3, args.steps // 3), 1)
    return {"params": int(n_params), "train_step_s": statistics.median(train_times),
            "sample_batch_s": statistics.median(sample_times), "jax": jax.__version__}


def run_torch(args) -> dict:
    try:
        import diffusers
        import torch
    except ImportError as e:
        return {"missing": f"diffusers / torch not installed ({e}); `pip install diffusers` for this row"}
    s = SHAPE
    torch.manual_seed(0)
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in s["attention"])
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(s["attention"]))
    model = diffusers.UNet2DConditionModel(
        sample_size=s["size"], in_channels=s["channels"], out_channels=s["channels"], down_block_types=down,
        up_block_types=up, block_out_channels=s["blocks"], layers_per_block=s["layers"],
        cross_attention_dim=s["ctx_dim"], attention_head_dim=s["heads"], norm_num_groups=s["groups"])
    n_params = sum(p.numel() for p in model.parameters())
    b = args.batch
    x = torch.randn(b, s["channels"], s["size"], s["size"])
    ctx = torch.randn(b, s["ctx_len"], s["ctx_dim"])
    t = torch.full((b,), 500)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_once():
        opt.zero_grad(set_to_none=True)
        loss = ((model(x, t, ctx).sample - x) ** 2).mean()
        loss.backward()
        opt.step()

    train_times = timed_calls(train_once, args.steps, 2)
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                  algorithm_type="dpmsolver++", solver_order=2)
    both = torch.cat([ctx, torch.zeros_like(ctx)])

    @torch.inference_mode()
    def sample_once():
        sched.set_timesteps(args.sampler_steps)
        lat = x.clone()
        for step_t in sched.timesteps:
            out = model(torch.cat([lat, lat]), step_t, both).sample
            c, u = out.chunk(2)
            lat = sched.step(u + 2.0 * (c - u), step_t, lat).prev_sample
        return lat

    sample_times = timed_calls(sample_once, max(3, args.steps // 3), 1)
    return {"params": int(n_params), "train_step_s": statistics.median(train_times),
            "sample_batch_s": statistics.median(sample_times), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed train steps (sampling: a third of it, >= 3)")
    ap.add_argument("--sampler-steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1, help="fresh processes per framework, alternating; best kept")
    ap.add_argument("--framework", choices=("both", "eojax", "torch"), default="both")
    ap.add_argument("--child", choices=("eojax", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(MARK + json.dumps(run_eojax(args) if args.child == "eojax" else run_torch(args)), flush=True)
        return

    names = ("eojax", "torch") if args.framework == "both" else (args.framework,)
    child_args = ["--child", "", "--batch", str(args.batch), "--steps", str(args.steps),
                  "--sampler-steps", str(args.sampler_steps)]
    results: dict = {}
    for _ in range(args.rounds):
        for name in names:
            child_args[1] = name
            # torch keeps OpenMP's default wait policy, as shipped. OMP_WAIT_POLICY=PASSIVE (the bench's
            # default until session 7) made diffusers' train step ~4x slower on a quiet machine.
            env = single_device_env()
            r = run_child(__file__, child_args, env, name)
            old = results.get(name)
            if not isinstance(old, dict) or "train_step_s" not in old or (
                    isinstance(r, dict) and "train_step_s" in r and r["sample_batch_s"] < old["sample_batch_s"]):
                results[name] = r
    rows = []
    for name in names:
        r = results[name]
        label = "eojax (flax, jit + lax.scan)" if name == "eojax" else "diffusers UNet2DConditionModel (torch)"
        if isinstance(r, dict) and "train_step_s" in r:
            rows.append((label, f"{r['params']:,}", f"{args.batch / r['train_step_s']:.1f}",
                         f"{r['train_step_s'] * 1e3:.0f}", f"{args.batch / r['sample_batch_s']:.2f}",
                         f"{r['sample_batch_s'] * 1e3:.0f}", CONFIG_TEXT))
        else:
            reason = r["missing"] if isinstance(r, dict) else str(r).splitlines()[0]
            rows.append((label, "-", "-", "-", "-", "-", reason))
    print_table(("framework", "params", "train img/s", "step ms", "sample img/s", "batch ms", "config"), rows)
    print(f"\nbatch {args.batch}; sampling: DPM-Solver++ 2M, {args.sampler_steps} steps, guidance 2.0 (2B UNet "
          f"batch per step); medians over timed repetitions in fresh single-device processes.")
    e, t = results.get("eojax"), results.get("torch")
    if isinstance(e, dict) and isinstance(t, dict) and "train_step_s" in e and "train_step_s" in t:
        print(f"eojax / diffusers: train {t['train_step_s'] / e['train_step_s']:.2f}x, "
              f"sampling {t['sample_batch_s'] / e['sample_batch_s']:.2f}x (>1: eojax faster)")
        if e["params"] != t["params"]:
            print(f"WARNING: parameter counts differ ({e['params']} vs {t['params']}): shapes are not identical")
    for r in results.values():
        if isinstance(r, str):
            print("\n" + r)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
