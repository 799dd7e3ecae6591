"""Group-channel MAE (SatMAE++) train-step throughput and MFU, multi-scale head on and off.

  .venv/bin/python bench/groupmae_step.py [--steps 3] [--warmup 1] [--batch 8] [--json out.json]

Model: configs/satmae.py's default config (variant base = ViT-B/8: encoder 768 x 12, 12 heads;
decoder 512 x 8, 16 heads), 96 px input, 10 Sentinel-2 bands in SatMAE++'s 3 groups
(B2,B3,B4,B8) (B5,B6,B7,B8A) (B11,B12), mask ratio 0.75, float32, AdamW. Two rows:
  multi-scale  input.scales=(1, 2, 4): 384 px native windows, the model sees their 4x4 block means
               (96 px) and its 2x / 4x head is trained against the real 192 / 384 px pixels;
  single-scale configs/satmae.py:single_scale (input.scales=(1,), no multi-scale head).
Overrides: batch_size, a one-device mesh, and the data: one 512 x 512 synthetic Sentinel-2 scene
(written once to the eojax cache), since the default synthetic scenes are smaller than a 384 px window.

Each row runs through the real trainer (`eojax.train.setup`) in its own fresh child process with one
CPU device; batches are put on the device before timing, warm-up steps (the first compiles) are not
timed, and every timed step is blocked on its result. images/s = batch / median step; MFU = analytic
model FLOPs (`task.train_flops_per_example() * batch`) / median step / this CPU's best measured f32
matmul rate (`eojax.metric_writer.measured_matmul_flops`, before and after the runs, best kept).
"""
from __future__ import annotations

import argparse
import json
import os

from _common import MARK, load_config, print_table, run_child, single_device_env, summary, time_steps

VARIANTS = {"multi-scale": "", "single-scale": "single_scale"}  # row -> configs/satmae.py argument
SCENE_SIZE = 512  # > 4 x 96: room for random 384 px native windows


def _bench_scene() -> str:
    """One synthetic Sentinel-2 scene big enough for multi-scale windows, written once."""
    from eojax.data import synthetic

    path = synthetic.default_dir().parent / "bench" / f"s2_{SCENE_SIZE}.tif"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synthetic.write_scene(path, seed=21, height=SCENE_SIZE, width=SCENE_SIZE)
    return str(path)


def _config(row: str, batch: int, num_windows: int):
    from eojax.data import synthetic

    config = load_config("satmae", VARIANTS[row])
    config.batch_size = batch
    config.input.paths = (_bench_scene(),)
    config.input.bands = synthetic.SENSORS["sentinel2"].bands
    config.input.num_windows = num_windows
    config.mesh = (("data", 1), ("fsdp", 1), ("model", 1))
    config.progress_bar = False
    return config


def _describe(m: dict, config) -> str:
    """The exact shape that ran, from the model's own arguments."""
    groups = "+".join(str(len(g)) for g in m["groups"])
    head = f"scales {tuple(config.input.scales)}, {m['image_size'] * max(config.input.scales)} px native" \
        if m["multiscale"] else "scales (1,), no multi-scale head"
    return (f"{config.model.variant}: {m['image_size']}px p{m['patch_size']} enc{m['width']}x{m['depth']} "
            f"h{m['heads']} dec{m['decoder_width']}x{m['decoder_depth']} h{m['decoder_heads']}, "
            f"{sum(len(g) for g in m['groups'])} bands in groups {groups}, mask {m['mask_ratio']}, {head}, "
            f"{config.model.dtype}, {config.optim.name}")


def run_child_bench(args) -> dict:
    import jax

    from eojax import train

    config = _config(args.child, args.batch, max(1024, args.batch * (args.steps + args.warmup) * 2))
    run = train.setup(config, devices=jax.devices()[:1])
    m = run.task.model_kwargs()
    assert (m["image_size"], m["patch_size"], m["width"], m["depth"], len(m["groups"]), m["multiscale"]) == (
        96, 8, 768, 12, 3, args.child == "multi-scale"), f"configs/satmae.py no longer has the bench shape: {m}"
    flops = float(run.task.train_flops_per_example()) * args.batch
    state = run.init_state()
    pool = [run.next_batch() for _ in range(min(4, args.steps + args.warmup))]
    jax.block_until_ready(pool)
    state, metrics, times = time_steps(run, state, pool, args.steps, args.warmup)
    return {"row": args.child, "config": _describe(m, config), "flops_per_step": flops,
            "step": summary(times, args.batch), "last_loss": float(metrics["loss"]),
            "devices": str(jax.devices()[0]), "jax": jax.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (compile, allocator warm-up)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1 (the first step compiles)")

    if args.child:
        print(MARK + json.dumps(run_child_bench(args)), flush=True)
        return

    from eojax import metric_writer

    _bench_scene()  # here, not racing in a child
    peak = metric_writer.measured_matmul_flops(repeats=30)  # in this otherwise idle process, first
    print(f"peak: measured best f32 1024^3 matmul rate of this CPU = {peak / 1e9:.1f} GFLOP/s "
          f"({os.cpu_count()} cores)")
    results = {}
    for row in VARIANTS:
        print(f"{row}: {args.warmup} warm-up + {args.steps} timed steps, batch {args.batch} ...", flush=True)
        results[row] = run_child(__file__, ["--child", row, "--steps", str(args.steps), "--warmup",
                                            str(args.warmup), "--batch", str(args.batch)],
                                 single_device_env(), row)
    peak = max(peak, metric_writer.measured_matmul_flops(repeats=30))
    print(f"peak (best of before/after): {peak / 1e9:.1f} GFLOP/s\n")

    rows = []
    for row, r in results.items():
        if isinstance(r, str):
            rows.append((row, "-", "-", "-", "-", "-", r.splitlines()[0]))
            continue
        s = r["step"]
        rows.append((row, f"{s['images_per_s']:.2f}", f"{s['step_s'] * 1e3:.0f}", f"{s['min_step_s'] * 1e3:.0f}",
                     f"{r['flops_per_step'] / args.batch / 1e9:.1f}",
                     f"{100 * r['flops_per_step'] / s['step_s'] / peak:.1f}%", r["config"]))
    print_table(("head", "images/s", "step ms", "best ms", "GFLOP/img", "MFU", "config"), rows)
    print(f"\nconfigs/satmae.py defaults + batch_size={args.batch}, mesh data=1 (one CPU device), "
          f"input.paths=({_bench_scene()!r},), the 10 S2 bands; step ms = median of {args.steps} per-step "
          f"times after {args.warmup} warm-up step(s), batches pre-fetched to the device; best ms = fastest "
          f"step; GFLOP/img = analytic training FLOPs (3x forward) per image.")
    for r in results.values():
        if isinstance(r, str) and "\n" in r:
            print(f"\n{r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "batch": args.batch, **results}, f, indent=2)


if __name__ == "__main__":
    main()
