"""Per-device memory of the configs/diffusion.py:sd15 train step (SD-1.5's UNet training under the frozen
VAE and CLIP, AdamW, EMA, gradient accumulation 4, remat) on FSDP meshes of 1..N devices, and the
smallest mesh that fits a 16, 40 and 80 GB accelerator.

  .venv/bin/python bench/sd15_memory.py [--devices 1,2,4] [--micro 1,8] [--dtype float32,bfloat16]
        [--json out.json]

No weights and no accelerator are needed: the step is compiled ahead of time for N simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count) on a folder holding SD-1.5's config files only (the
real model_index / unet / vae / text_encoder / scheduler configs; the tokenizer files of the tiny test
fixture, whose ids fit CLIP's vocabulary), and XLA's memory_analysis() of one device's program gives
  state = the step's arguments (params, AdamW moments, EMA, the batch), donated: updated in place;
  temp  = the step's temporaries (activations kept for the backward pass, gradients, the accumulation);
  peak  = arguments + outputs - aliased + temporaries (what the device must hold).
The batch is `micro` images per device per micro-batch, 4 micro-batches per step (the recipe's
gradient_accumulation_steps 4), so the global batch is 4 * micro * devices.

Caveats, printed with the table: XLA:CPU's buffer assignment is not a GPU's or TPU's (their compilers fuse
and schedule differently; a GPU run also needs the runtime's own reserve and cuDNN workspaces), so the
table is an estimate to choose a mesh with, and "fits" keeps 10 % of the device free for that.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
CAPACITIES_GB = (16, 40, 80)  # the accelerators' memory as sold: 16 GiB V100 / TPU v5e, 40 and 80 GiB A100 / H100
HEADROOM = 0.9

# SD-1.5's config files (runwayml/stable-diffusion-v1-5 as diffusers writes them), the keys eojax reads.
UNET = dict(_class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8,
            block_out_channels=[320, 640, 1280, 1280], center_input_sample=False, cross_attention_dim=768,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
            flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
            norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
VAE = dict(_class_name="AutoencoderKL", act_fn="silu", block_out_channels=[128, 256, 512, 512],
           down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4, layers_per_block=2,
           norm_num_groups=32, out_channels=3, sample_size=512, scaling_factor=0.18215,
           up_block_types=["UpDecoderBlock2D"] * 4)
CLIP = dict(architectures=["CLIPTextModel"], hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072,
            layer_norm_eps=1e-5, max_position_embeddings=77, model_type="clip_text_model", num_attention_heads=12,
            num_hidden_layers=12, projection_dim=768, vocab_size=49408, bos_token_id=49406, eos_token_id=49407,
            pad_token_id=1)


def config_only_folder(path: str) -> str:
    """A diffusers-layout SD-1.5 folder of config files (no weights): enough to build and compile."""
    tiny = os.path.join(REPO, "tests", "fixtures", "sd_tiny")
    shutil.copytree(os.path.join(tiny, "tokenizer"), os.path.join(path, "tokenizer"))
    shutil.copytree(os.path.join(tiny, "scheduler"), os.path.join(path, "scheduler"))
    shutil.copy(os.path.join(tiny, "model_index.json"), path)
    for part, cfg in (("unet", UNET), ("vae", VAE), ("text_encoder", CLIP)):
        os.makedirs(os.path.join(path, part))
        with open(os.path.join(path, part, "config.json"), "w") as f:
            json.dump(cfg, f)
    return path


def measure(folder: str, devices: int, micro: int, dtype: str) -> dict:
    import jax

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from _common import load_config
    from eojax import train

    config = load_config("diffusion", f"sd15,sd_folder={folder}")
    accum = config.optim.accum_steps
    config.update(batch_size=accum * micro * devices, mesh=(("data", 1), ("fsdp", devices), ("model", 1)),
                  progress_bar=False)
    config.model.dtype = dtype
    start = time.perf_counter()
    run = train.setup(config, devices=jax.devices()[:devices])
    ma = run.compile_step().memory_analysis()
    seconds = time.perf_counter() - start
    state, temp = ma.argument_size_in_bytes, ma.temp_size_in_bytes
    peak = state + ma.output_size_in_bytes - ma.alias_size_in_bytes + temp
    return dict(devices=devices, micro=micro, global_batch=config.batch_size, dtype=dtype,
                state_gib=state / GiB, temp_gib=temp / GiB, peak_gib=peak / GiB, compile_s=seconds)


def smallest(rows: list[dict], micro: int, capacity_gb: int) -> int | None:
    fits = [r["devices"] for r in rows if r["micro"] == micro and r["peak_gib"] <= HEADROOM * capacity_gb]
    return min(fits) if fits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--micro", default="1,8")
    parser.add_argument("--dtype", default="float32,bfloat16",
                        help="model.dtype values: the compute dtype (params and optimizer state stay float32)")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    devices = [int(d) for d in args.devices.split(",")]
    micros = [int(m) for m in args.micro.split(",")]
    dtypes = args.dtype.split(",")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={max(devices)}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = config_only_folder(os.path.join(tmp, "sd15"))
        for dtype in dtypes:
            for micro in micros:
                for n in devices:
                    rows.append(measure(folder, n, micro, dtype))
                    r = rows[-1]
                    print(f"  measured {dtype}, {n} devices, micro-batch {micro}: peak {r['peak_gib']:.2f} GiB "
                          f"(compiled in {r['compile_s']:.0f} s)", flush=True)

    print("\nconfigs/diffusion.py:sd15 train step, per device (float32 params, AdamW and EMA state; the compute "
          "dtype as given; XLA:CPU memory_analysis)\n")
    print("| compute dtype | devices (fsdp) | micro-batch / device | global batch | state GiB | temporaries GiB "
          "| peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dtype']} | {r['devices']} | {r['micro']} | {r['global_batch']} | {r['state_gib']:.2f} | "
              f"{r['temp_gib']:.2f} | {r['peak_gib']:.2f} |")
    print(f"\nsmallest mesh that fits (peak <= {HEADROOM:.0%} of the device):")
    for dtype in dtypes:
        for micro in micros:
            sub = [r for r in rows if r["dtype"] == dtype]
            found = ", ".join(f"{c} GB: {smallest(sub, micro, c) or f'> {max(devices)}'}" for c in CAPACITIES_GB)
            print(f"  {dtype}, micro-batch {micro}: {found}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
