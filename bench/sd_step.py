"""Stable Diffusion 1.5's UNet at its real shape: eojax (flax) vs diffusers' UNet2DConditionModel (PyTorch),
both on the SAME random weights, in the same run.

  .venv/bin/python bench/sd_step.py --site /tmp/sdsite            # every row, both frameworks (~1 h on 2 cores)
  .venv/bin/python bench/sd_step.py --site /tmp/sdsite --rows unet,train_tiny --cycles 4 --json sd.json
  .venv/bin/python bench/sd_step.py --site /tmp/sdsite --quick    # tiny shapes, 1 cycle of 1 call: a smoke run
  .venv/bin/python bench/sd_step.py --quick --framework eojax     # no torch needed (tests/test_bench_sd.py)

Rows (float32; batch 1 unless given; latents 64 x 64 x 4, text 77 x 768 for SD-1.5's layout):
  unet        one guided denoising call: the UNet on the 2-image classifier-free-guidance batch
              [x; x] with [cond; uncond] context at PNDM's first timestep, then uncond + 7.5 (cond - uncond)
  sample      one 50-step PNDM sample with guidance 7.5: SD-1.5's scheduler config (scaled_linear betas
              0.00085-0.012, skip_prk_steps, 'leading' spacing, steps_offset 1, set_alpha_to_one False),
              51 guided UNet calls (PLMS repeats its 2nd timestep; both sides count theirs)
  train_tiny  forward + backward + AdamW of the tests/fixtures/sd_tiny UNet (32/64 channels, 1.1M
              parameters) at 16 x 16 latents, text 77 x 32, batch 4
  train_full  the same step for SD-1.5's UNet (859.5M parameters), batch 1
Both sides time exactly the UNet calls and the scheduler: no VAE, no CLIP (their inputs are random
latents and random 77-token text states; SD's pipeline runs CLIP once and the VAE once per image).

eojax: UNet(**sd15_config()) (eojax.diffusion.unet), its guided call = samplers.guided_model under jit;
the sample = samplers.sample(name='pndm', **sampler_settings_from_diffusers(SD-1.5's PNDM config)), one
jitted lax.scan compiled ahead of time; the train step = jit(value_and_grad of the epsilon MSE + optax.adamw)
with params and optimizer state donated. diffusers: UNet2DConditionModel built from
unet_weights.diffusers_config(the same kwargs); the guided call under torch.inference_mode; the sample =
PNDMScheduler(SD-1.5's config) stepping unet(cat([x, x]), t, cat([cond, uncond])) as
StableDiffusionPipeline's loop does; the train step = zero_grad + forward + MSE + backward + torch.optim.AdamW
(the same lr, betas, eps, weight decay). Same weights: a short child initialises eojax's UNet (seed 0) and
writes it as a diffusers state dict (unet_weights.params_to_diffusers, .safetensors); eojax reads it back
with params_from_diffusers, diffusers with load_state_dict(strict). Same inputs: both draw them from
numpy's generator with the same seed. The first outputs are compared under the table (guided epsilon,
final latents, first loss): a large difference means the two sides did not do the same work.

Protocol (bench/README.md): each framework in its own child process (eojax: one device, eojax.hostmem's
malloc settings as the CLI; torch: as shipped, torch.set_num_threads(cpu count), OpenMP's default wait
policy). The rows of one layout share a child (unet and sample load the full UNet once). Children that fit
in memory together stay alive and take turns: each cycle every framework runs --steps timed calls of a row
in rotated order, so the per-cycle ratio compares the two seconds apart under the same load. The full
train step does not fit twice in a 23 GiB machine (params + gradients + AdamW's two moments = 16 bytes per
parameter, ~13.8 GB, plus activations, per framework): then the frameworks run one after the other
('sequential' in the table: no paired ratio), and a framework that would not fit even alone is reported as
not measured, with the reason (eojax checks its compiled step's memory_analysis() before loading anything).
Warm-up: --warmup calls of each row (the first compiles), but no untimed sample by default (one costs
9-12 min at full size): it is compiled ahead of time and warmed by the guided calls (the same UNet at the
same shape). What is left of a first run is once-only (~0.4 s for eojax's compiled sample at the --quick
shapes, where --sample-warmup defaults to 1), < 0.1% of a full-size sample.
Median of all timed calls; images/s = batch / median (for `unet`: denoising steps of one image per second).
MFU = FLOPs per timed call / median / peak: FLOPs from XLA's cost analysis of eojax's UNet forward
(unet.flops_per_image: convolutions, matmuls and the elementwise work) x 2 images per guided call, x the
calls of a sample, x 3 for a train step (backward ~ 2 forwards); the same count for both frameworks. Peak =
the device's best measured f32 1024^3 matmul rate (eojax.metric_writer.measured_matmul_flops, in a fresh
child before and after the runs, best kept). peak RSS = the child's ru_maxrss (on an accelerator: host memory).

On an accelerator: eojax's children use jax's default device, torch's use CUDA when torch has it (the
project's torch is the CPU build); the memory checks against host RAM are then skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from _common import MARK, READY, REPO, print_table, read_reply, run_child, single_device_env, summary

GUIDANCE = 7.5
SAMPLE_STEPS = 50
# SD-1.5's scheduler_config.json (the PNDMScheduler StableDiffusionPipeline ships with).
PNDM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading",
            prediction_type="epsilon", trained_betas=None)
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)  # torch.optim.AdamW's defaults but lr
CTX_LEN = 77  # CLIP's tokens in every layout
TINY_UNET = os.path.join(REPO, "tests", "fixtures", "sd_tiny", "unet", "config.json")
ROWS = ("unet", "sample", "train_tiny", "train_full")
# Children are per group: the rows of one group share a model (and its weights in memory).
GROUPS = {"infer": dict(layout="full", batch=1, rows=("unet", "sample"), train=False),
          "train_tiny": dict(layout="tiny", batch=4, rows=("train_tiny",), train=True),
          "train_full": dict(layout="full", batch=1, rows=("train_full",), train=True)}
STEPS = {"unet": 2, "sample": 1, "train_tiny": 5, "train_full": 1}  # timed calls per cycle (--steps overrides)
GiB = 2 ** 30


def layout(name: str, quick: bool) -> dict:
    """UNet kwargs, latent size and context length of a layout. --quick keeps SD-1.5's structure (4 levels,
    attention at the first 3, 2 layers per block) for 'full' but with 32-64 channels at 16 x 16."""
    from eojax.diffusion import unet, unet_weights

    if name == "tiny":
        with open(TINY_UNET) as f:
            kwargs = unet_weights.unet_kwargs_from_config(json.load(f))
        return dict(kwargs=kwargs, size=16, title="sd_tiny UNet 16x16")
    if quick:
        kwargs = unet.sd15_config(block_out_channels=(32, 32, 64, 64), heads=2, cross_attention_dim=32)
        return dict(kwargs=kwargs, size=16, title="SD-1.5 layout 32-64 ch 16x16 (quick)")
    return dict(kwargs=unet.sd15_config(), size=64, title="SD-1.5 UNet 64x64")


def mem_available() -> int:
    """Linux's MemAvailable in bytes (what can be allocated without swapping; other jobs count)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def inputs(b: int, s: int, c: int, d: int, seed: int = 0) -> dict:
    """Random float32 latents (b, s, s, c), text states (b, 77, d), timesteps: the same numbers in both children."""
    import numpy as np

    rng = np.random.default_rng(seed)
    text = lambda: rng.standard_normal((b, CTX_LEN, d), dtype=np.float32)
    out = dict(x=rng.standard_normal((b, s, s, c), dtype=np.float32), cond=text(), uncond=text())
    out["noise"] = rng.standard_normal(out["x"].shape, dtype=np.float32)
    out["t"] = rng.integers(0, PNDM["num_train_timesteps"], (b,)).astype(np.int32)  # train rows' timesteps
    return out


def pndm_grid(steps: int) -> list[int]:
    """diffusers' PNDM 'leading' grid, descending; the guided call runs at its first timestep."""
    stride = PNDM["num_train_timesteps"] // steps
    return [i * stride + PNDM["steps_offset"] for i in reversed(range(steps))]


# -- children ---------------------------------------------------------------------------------------------
def write_weights(args) -> dict:
    """eojax's UNet of each --layout initialised (seed 0) -> FILES/<layout>/unet.safetensors in diffusers'
    keys, with its diffusers config.json beside it."""
    import jax
    import numpy as np
    from flax import linen as nn
    from safetensors.numpy import save_file

    from eojax.diffusion import unet_weights
    from eojax.diffusion.unet import UNet

    out = {}
    for name in args.layout.split(","):
        lay = layout(name, args.quick)
        model, s = UNet(**lay["kwargs"]), 2 ** (len(lay["kwargs"]["block_out_channels"]) - 1)
        x = np.zeros((1, s, s, model.in_channels), np.float32)  # the params do not depend on the input size
        c = np.zeros((1, 1, model.cross_attention_dim), np.float32)
        # RngBitGenerator keys and LLVM -O0 (as eojax.train's init): threefry's init program took 20-50 s to
        # compile for a 2.4M-parameter UNet on the 2 shared cores, this one ~10 s. Same initialisers.
        init = jax.jit(lambda: nn.meta.unbox(model.init(jax.random.key(0, impl="unsafe_rbg"), x,
                                                        np.zeros((1,), np.int32), c)))
        compiled = init.lower().compile({"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu"
                                        else {})
        state = unet_weights.params_to_diffusers(compiled(), lay["kwargs"])
        save_file(state, os.path.join(args.files, name, "unet.safetensors"))
        with open(os.path.join(args.files, name, "config.json"), "w") as f:
            json.dump(unet_weights.diffusers_config(lay["kwargs"], sample_size=lay["size"]), f)
        out[name] = int(sum(np.prod(a.shape) for a in state.values()))
        del state
    return {"params": out}


def measure_peak(_args) -> dict:
    import jax

    from eojax import metric_writer
    d = jax.devices()[0]
    return {"peak": metric_writer.measured_matmul_flops(repeats=30), "platform": d.platform,
            "device_kind": d.device_kind}


class Skip(Exception):
    """A group this child cannot run here (memory), with the reason."""


def eojax_side(args, g: dict, lay: dict) -> tuple[dict, dict]:
    """({row: call}, info): each call runs once and blocks on its result."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import linen as nn
    from safetensors.numpy import load_file

    from eojax.diffusion import samplers, unet_weights
    from eojax.diffusion.unet import UNet
    from eojax.weights import common as weights_common

    model = UNet(**lay["kwargs"])
    apply = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
    dev = jax.devices()[0]
    host = inputs(g["batch"], lay["size"], model.in_channels, model.cross_attention_dim)
    data = {k: jax.device_put(v, dev) for k, v in host.items()}
    info = {"jax": jax.__version__, "platform": dev.platform, "device_kind": dev.device_kind}

    def load():  # as eojax.diffusion.sd loads a UNet: one copy of the weights held at a time
        params = unet_weights.params_from_diffusers(load_file(os.path.join(args.files, "unet.safetensors")),
                                                    lay["kwargs"], consume=True)
        with jax.default_device(dev):
            return weights_common.to_device(params)

    calls = {}
    if g["train"]:
        tx = optax.adamw(ADAMW["lr"], ADAMW["b1"], ADAMW["b2"], ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

        def step(p, o, x, t, ctx, noise):
            loss, grads = jax.value_and_grad(lambda p: jnp.mean((apply(p, x, t, ctx) - noise) ** 2))(p)
            updates, o = tx.update(grads, o, p)
            return optax.apply_updates(p, updates), o, loss

        abstract_p = jax.eval_shape(lambda: nn.meta.unbox(model.init(
            jax.random.key(0), host["x"][:1], host["t"][:1], host["cond"][:1]))["params"])
        batch = (data["x"], data["t"], data["cond"], data["noise"])
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(abstract_p, jax.eval_shape(tx.init, abstract_p), *batch)
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        info["xla_flops_per_step"] = float((cost or {}).get("flops", 0.0))
        compiled = lowered.compile()
        ma = compiled.memory_analysis()
        need = sum(int(getattr(ma, f"{k}_size_in_bytes", 0) or 0) for k in ("temp", "argument", "output"))
        need -= int(getattr(ma, "alias_size_in_bytes", 0) or 0)
        info["compiled_bytes"] = need
        avail = mem_available()
        if dev.platform == "cpu" and need > 0.95 * avail:  # checked before anything big is allocated
            raise Skip(f"not measured: eojax's compiled step needs {need / GiB:.1f} GiB (XLA memory_analysis), "
                       f"{avail / GiB:.1f} GiB available")
        params = load()
        box = [params, tx.init(params)]

        def train():
            box[0], box[1], loss = compiled(box[0], box[1], *batch)
            info.setdefault("first_loss", float(loss))  # float() blocks on the step
            info["last_loss"] = float(loss)

        calls[g["rows"][0]] = train
        return calls, info

    params = load()
    first_t = pndm_grid(args.sample_steps)[0]
    t = jnp.full((g["batch"],), first_t, jnp.int32)
    guided = jax.jit(samplers.guided_model(apply, GUIDANCE))

    def unet_call():
        out = jax.block_until_ready(guided(params, data["x"], t, data["cond"], data["uncond"]))
        if "unet" not in info.setdefault("saved", []):
            np.save(os.path.join(args.files, "eojax_unet.npy"), np.asarray(out))
            info["saved"].append("unet")

    calls["unet"] = unet_call  # always built: the sample is warmed by it
    if "sample" in args.rows:
        schedule, options, prediction = samplers.sampler_settings_from_diffusers({"_class_name": "PNDMScheduler",
                                                                                  **PNDM})
        info["timesteps"] = samplers.timesteps(schedule, args.sample_steps, spacing=options["timestep_spacing"],
                                               steps_offset=options["steps_offset"], name="pndm").tolist()
        info["unet_calls"] = len(info["timesteps"])  # one scan iteration per model call
        fn = jax.jit(functools.partial(samplers.sample, apply, schedule, prediction, num_steps=args.sample_steps,
                                       guidance_scale=GUIDANCE, **options))
        key = jax.random.key(0)
        sample = fn.lower(params, data["x"], key, data["cond"], data["uncond"]).compile()

        def sample_call():
            out = jax.block_until_ready(sample(params, data["x"], key, data["cond"], data["uncond"]))
            if "sample" not in info.setdefault("saved", []):
                np.save(os.path.join(args.files, "eojax_sample.npy"), np.asarray(out))
                info["saved"].append("sample")

        calls["sample"] = sample_call
    return calls, info


def torch_side(args, g: dict) -> tuple[dict, dict]:
    """As eojax_side; nothing of jax is imported here (the layout comes from the weights' config.json)."""
    if args.site:
        sys.path.insert(0, args.site)
    import numpy as np
    import torch
    import diffusers
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    torch.set_num_threads(os.cpu_count())
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with open(os.path.join(args.files, "config.json")) as f:
        config = json.load(f)
    n_params = 0
    if g["train"] and dev.type == "cpu":
        with open(os.path.join(args.files, "unet.safetensors"), "rb") as f:  # the header's shapes, nothing loaded
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        n_params = sum(int(np.prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
        need, avail = 16 * n_params, mem_available()  # params + grads + 2 moments, activations not counted
        if need > 0.95 * avail:
            raise Skip(f"not measured: torch's params, gradients and AdamW moments alone need {need / GiB:.1f} GiB, "
                       f"{avail / GiB:.1f} GiB available")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(load_file(os.path.join(args.files, "unet.safetensors"), device=str(dev)), strict=True,
                         assign=True)
    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
            "platform": dev.type, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
            "params": sum(p.numel() for p in unet.parameters())}
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2) if a.ndim == 4 else a)).to(dev)
    data = {k: nchw(v) for k, v in inputs(g["batch"], config["sample_size"], config["in_channels"],
                                          config["cross_attention_dim"]).items()}
    calls = {}
    if g["train"]:
        unet.train()
        opt = torch.optim.AdamW(unet.parameters(), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                                eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
        t = data["t"].long()

        def train():
            loss = ((unet(data["x"], t, data["cond"]).sample - data["noise"]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
            info.setdefault("first_loss", float(loss))
            info["last_loss"] = float(loss)

        calls[g["rows"][0]] = train
        return calls, info

    unet.eval()
    both = torch.cat([data["cond"], data["uncond"]])

    def guided(lat, t):
        c, u = unet(torch.cat([lat, lat]), t, both).sample.chunk(2)
        return u + GUIDANCE * (c - u)

    first_t = torch.tensor(pndm_grid(args.sample_steps)[0], device=dev)

    @torch.inference_mode()
    def unet_call():
        out = guided(data["x"], first_t)
        sync()
        if "unet" not in info.setdefault("saved", []):
            np.save(os.path.join(args.files, "torch_unet.npy"), out.permute(0, 2, 3, 1).cpu().numpy())
            info["saved"].append("unet")

    calls["unet"] = unet_call
    if "sample" in args.rows:
        sched = PNDMScheduler(**PNDM)

        @torch.inference_mode()
        def sample_call():
            sched.set_timesteps(args.sample_steps, device=dev)  # also resets PLMS's kept outputs
            lat, n = data["x"] * sched.init_noise_sigma, 0
            for t in sched.timesteps:
                lat = sched.step(guided(sched.scale_model_input(lat, t), t), t, lat).prev_sample
                n += 1
            sync()
            info["unet_calls"], info["timesteps"] = n, [int(v) for v in sched.timesteps]
            if "sample" not in info.setdefault("saved", []):
                np.save(os.path.join(args.files, "torch_sample.npy"), lat.permute(0, 2, 3, 1).cpu().numpy())
                info["saved"].append("sample")

        calls["sample"] = sample_call
    return calls, info


def serve(args) -> None:
    """A child: build its rows, warm up, print READY (or a MARK {'skip': reason}); then 'run ROW N' ->
    the N call times; 'finish' -> its info."""
    g = GROUPS[args.group]
    try:
        if args.child == "eojax":
            calls, info = eojax_side(args, g, layout(g["layout"], args.quick))
        else:
            calls, info = torch_side(args, g)
    except Skip as e:
        print(MARK + json.dumps({"skip": str(e)}), flush=True)
        return
    for row, fn in calls.items():
        for _ in range(args.sample_warmup if row == "sample" else args.warmup):
            fn()
    print(READY, flush=True)
    for line in sys.stdin:
        if not line.startswith("run "):
            break
        _, row, n = line.split()
        times = []
        for _ in range(int(n)):
            t = time.perf_counter()
            calls[row]()
            times.append(time.perf_counter() - t)
        print(MARK + json.dumps(times), flush=True)
    from eojax import hostmem
    info["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(MARK + json.dumps({"framework": args.child, "malloc": hostmem.status or "glibc defaults", **info}),
          flush=True)


# -- parent -----------------------------------------------------------------------------------------------
class Child:
    """One framework's serving child for one group, fed commands on stdin; its stderr goes to a temp file."""

    def __init__(self, framework: str, group: str, rows: list[str], args):
        self.framework, self.log = framework, tempfile.TemporaryFile("w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--group", group,
               "--rows", ",".join(rows), "--files", args.files[GROUPS[group]["layout"]],
               "--warmup", str(args.warmup), "--sample-warmup", str(args.sample_warmup),
               "--sample-steps", str(args.sample_steps), "--site", args.site]
        cmd += ["--quick"] if args.quick else []
        # torch keeps OpenMP's default wait policy (as shipped; see bench/README.md, session 7).
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1, cwd=REPO, env=single_device_env(args.xla_flags if framework == "eojax"
                                                                                else ""))
        reply = read_reply(self.proc.stdout)
        self.error = None
        if isinstance(reply, dict):  # it refused (memory) and exited
            self.proc.wait()
            self.error = reply.get("skip", str(reply))
        elif reply != READY:
            self.error = self._failure()

    def _failure(self) -> str:
        self.proc.wait()
        self.log.seek(0)
        tail = [l for l in self.log.read().strip().splitlines() if l.strip()][-12:]
        rc = self.proc.returncode
        last = "killed (SIGKILL: out of memory?)" if rc == -9 else (tail[-1].strip() if tail else "")
        hint = " (diffusers: --site DIR)" if "No module named" in last else ""
        return f"{self.framework} failed (rc {rc}): {last}{hint}\n    " + "\n    ".join(tail)

    def ask(self, text: str):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        reply = read_reply(self.proc.stdout)
        if reply is None:
            raise RuntimeError(self._failure())
        if text == "finish":
            self.proc.wait()
        return reply


def fits_together(group: str, args) -> bool:
    """Whether every framework's child of `group` fits in host memory at once: parameter count x bytes per
    parameter (4 for inference, 16 with gradients and AdamW's moments) + 30% and 1 GiB for activations and
    the runtimes, per framework, against MemAvailable. --together overrides."""
    if args.together != "auto":
        return args.together == "always"
    g = GROUPS[group]
    need = args.params[g["layout"]] * (16 if g["train"] else 4) * 1.3 + GiB
    return len(args.frameworks) * need <= mem_available()


def measure(group: str, rows: list[str], args) -> tuple[dict, dict, str]:
    """One group's children, alive together taking turns (or one after the other when they do not fit).
    Returns ({framework: info or reason}, {row: {framework: [per-cycle medians]}}, mode)."""
    together = fits_together(group, args)
    mode = "alone" if len(args.frameworks) == 1 else "together" if together else "sequential"
    passes = [list(args.frameworks)] if together else [[fw] for fw in args.frameworks]
    results, cycles, times = {}, {r: [] for r in rows}, {}
    for frameworks in passes:
        children = {}
        for fw in frameworks:
            if fw == "torch" and not args.torch_ok:
                results[fw] = "torch / diffusers not importable (pip install torch; diffusers via --site DIR)"
                continue
            print(f"{group}: starting {fw} ({', '.join(rows)}) ...", flush=True)
            child = Child(fw, group, rows, args)
            if child.error:
                results[fw] = child.error
            else:
                children[fw] = child
        live = list(children)
        for row in rows:
            n_cycles = args.sample_cycles if row == "sample" else args.cycles
            for c in range(n_cycles if live else 0):
                order = live[c % len(live):] + live[:c % len(live)]  # rotated: nobody always goes first
                got = {}
                for fw in order:
                    t = children[fw].ask(f"run {row} {args.steps or STEPS[row]}")
                    times.setdefault((row, fw), []).extend(t)
                    got[fw] = statistics.median(t)
                if together:
                    cycles[row].append(got)
                print(f"  {row} cycle {c + 1}: " + ", ".join(f"{fw} {got[fw]:.3f} s" for fw in live), flush=True)
        for fw in live:
            results[fw] = children[fw].ask("finish")
            results[fw]["times"] = {row: times.get((row, fw), []) for row in rows}
    return results, cycles, mode


def rel_error(a, b) -> float:
    import numpy as np
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _fmt_s(t: float) -> str:
    return f"{t * 1e3:,.1f} ms" if t < 10 else f"{t:,.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {ROWS}")
    ap.add_argument("--framework", choices=("both", "eojax", "torch"), default="both")
    ap.add_argument("--cycles", type=int, default=3, help="cycles of the unet and train rows")
    ap.add_argument("--sample-cycles", type=int, default=2,
                    help="cycles of the sample row (one SD-1.5 sample: ~13-25 min on 2 cores)")
    ap.add_argument("--steps", type=int, help=f"timed calls per framework per cycle (default per row: {STEPS})")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls of each row first (the first compiles)")
    ap.add_argument("--sample-warmup", type=int,
                    help="untimed samples first (default 0: compiled ahead and warmed by the guided calls; --quick 1)")
    ap.add_argument("--sample-steps", type=int,
                    help=f"PNDM steps of the sample row (default {SAMPLE_STEPS}; --quick 5)")
    ap.add_argument("--together", choices=("auto", "always", "never"), default="auto",
                    help="run a group's frameworks side by side (auto: when they fit in MemAvailable)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes (SD-1.5's layout at 32-64 channels, 16x16), 5 PNDM steps, 1 cycle of 1 call")
    ap.add_argument("--site", default=os.environ.get("EOJAX_BENCH_TORCH_SITE", ""),
                    help="a `pip install --target` folder holding diffusers (env EOJAX_BENCH_TORCH_SITE)")
    ap.add_argument("--workdir", help="where the weights files go (default: the system temp dir; SD-1.5's is 3.4 GB)")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the eojax child")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=("eojax", "torch", "weights", "peak"), help=argparse.SUPPRESS)
    ap.add_argument("--group", choices=tuple(GROUPS), help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    if args.sample_steps is None:
        args.sample_steps = 5 if args.quick else SAMPLE_STEPS
    if args.sample_warmup is None:
        args.sample_warmup = 1 if args.quick else 0
    if args.quick:
        args.cycles = args.cycles if "--cycles" in sys.argv else 1
        args.sample_cycles = args.sample_cycles if "--sample-cycles" in sys.argv else 1
        args.steps = args.steps or 1

    if args.child in ("weights", "peak"):
        print(MARK + json.dumps((write_weights if args.child == "weights" else measure_peak)(args)), flush=True)
        return
    if args.child:
        from eojax import hostmem
        if args.child == "eojax":
            print(hostmem.tune_malloc(), file=sys.stderr, flush=True)
        serve(args)
        return
    bad = [r for r in args.rows if r not in ROWS]
    if bad or not args.rows:
        ap.error(f"--rows: unknown {bad}; known: {ROWS}")
    if min(args.cycles, args.sample_cycles, args.warmup, args.steps or 1) < 1 or args.sample_warmup < 0:
        ap.error("--cycles, --sample-cycles, --steps and --warmup must be >= 1 (the first call compiles), "
                 "--sample-warmup >= 0")
    run(args)


def run(args) -> None:
    import jax

    jax.config.update("jax_platforms", "cpu")  # the parent only counts FLOPs; children get the device
    from eojax.diffusion import unet as unet_lib

    env = single_device_env()
    peak_info = run_child(__file__, ["--child", "peak"], env, "peak")
    if isinstance(peak_info, str):
        raise SystemExit(peak_info)
    peak = peak_info["peak"]
    print(f"peak: best f32 1024^3 matmul rate of this {peak_info['platform']} device ({peak_info['device_kind']}) = "
          f"{peak / 1e9:.1f} GFLOP/s ({os.cpu_count()} CPU cores); MemAvailable {mem_available() / GiB:.1f} GiB",
          flush=True)
    args.frameworks = {"both": ("eojax", "torch"), "eojax": ("eojax",), "torch": ("torch",)}[args.framework]
    code = f"import sys; sys.path.insert(0, {args.site!r}); import torch, diffusers"
    args.torch_ok = "torch" not in args.frameworks or subprocess.run(
        [sys.executable, "-c", code], capture_output=True).returncode == 0

    groups = [(name, [r for r in g["rows"] if r in args.rows]) for name, g in GROUPS.items()]
    groups = [(name, rows) for name, rows in groups if rows]
    needed = {GROUPS[name]["layout"] for name, _ in groups}
    lays = {name: layout(name, args.quick) for name in needed}
    fwd = {}  # forward FLOPs per image, XLA's count of eojax's UNet
    for name, lay in lays.items():
        m = unet_lib.UNet(**lay["kwargs"])
        fwd[name] = unet_lib.flops_per_image(m, lay["size"], CTX_LEN)
    tmp = tempfile.TemporaryDirectory(prefix="sd_step_", dir=args.workdir)
    args.files = {}
    for name in needed:
        args.files[name] = os.path.join(tmp.name, name)
        os.makedirs(args.files[name])
    t = time.perf_counter()  # the same random weights for both frameworks
    w = run_child(__file__, ["--child", "weights", "--layout", ",".join(sorted(needed)), "--files", tmp.name]
                  + (["--quick"] if args.quick else []), env, "weights")
    if isinstance(w, str):
        raise SystemExit(w)
    args.params = w["params"]
    print("weights: " + ", ".join(f"{lays[n]['title']} {p:,} parameters" for n, p in args.params.items())
          + f", written in {time.perf_counter() - t:.1f} s", flush=True)

    out = {"quick": args.quick, "sample_steps": args.sample_steps, "groups": {}}
    for name, rows in groups:
        results, cycles, mode = measure(name, rows, args)
        out["groups"][name] = {"rows": rows, "mode": mode, "results": results, "cycles": cycles}
    after = run_child(__file__, ["--child", "peak"], env, "peak")
    peak = max(peak, after["peak"]) if isinstance(after, dict) else peak
    print(f"peak (best of before / after): {peak / 1e9:.1f} GFLOP/s\n")
    out.update(peak_flops=peak, platform=peak_info["platform"], device_kind=peak_info["device_kind"],
               forward_flops_per_image=fwd, params=args.params)
    report(out, lays, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    tmp.cleanup()


def report(out: dict, lays: dict, args) -> None:
    """The table, then the checks that both sides did the same work, then the notes."""
    import numpy as np

    peak, table, notes = out["peak_flops"], [], []
    out["rows"] = {}
    for name, grp in out["groups"].items():
        g, res, mode = GROUPS[name], grp["results"], grp["mode"]
        lay = lays[g["layout"]]
        for row in grp["rows"]:
            calls = 1
            if row == "sample":
                counts = {fw: r.get("unet_calls") for fw, r in res.items() if isinstance(r, dict)}
                calls = next((c for c in counts.values() if c), args.sample_steps + 1)
                grids = {fw: r.get("timesteps") for fw, r in res.items() if isinstance(r, dict)}
                if len(set(map(str, grids.values()))) > 1:
                    notes.append(f"WARNING: the samplers' timesteps differ: {grids}")
                notes.append(f"sample: {', '.join(f'{fw} {c}' for fw, c in counts.items())} guided UNet calls "
                             f"({2 * calls} UNet images) for {args.sample_steps} PNDM steps")
            per_image = 3 if g["train"] else 2 * calls  # train: forward + backward; guided: 2 images per call
            flops = out["forward_flops_per_image"][g["layout"]] * per_image * g["batch"]
            med = {}
            for fw in args.frameworks:
                r = res.get(fw)
                if isinstance(r, dict) and r["times"].get(row):
                    st = summary(r["times"][row], g["batch"])
                    med[fw] = st
            ratio = None
            if len(med) == 2:
                per = sorted(c["torch"] / c["eojax"] for c in grp["cycles"].get(row, []))
                ratio = statistics.median(per) if per else med["torch"]["step_s"] / med["eojax"]["step_s"]
                src = (f"median of {len(per)} per-cycle ratios (range {per[0]:.2f}-{per[-1]:.2f})" if per
                       else "from the medians (sequential runs: no paired cycles)")
                notes.append(f"{row}: eojax / torch speed {ratio:.2f}x, {src}")
            for fw in args.frameworks:
                r = res.get(fw)
                label = fw
                if isinstance(r, dict):
                    label = (f"eojax (jax {r['jax']})" if fw == "eojax" else
                             f"diffusers {r['diffusers']} (torch {r['torch']})")
                if fw in med:
                    st = med[fw]
                    ratio_txt = "-" if ratio is None else f"{ratio:.2f}x" if fw == "eojax" else "1.00 (ref)"
                    table.append((f"{row}: {lay['title']}", label, g["batch"], mode, _fmt_s(st["step_s"]),
                                  _fmt_s(st["min_step_s"]), _fmt_s(st["step_s"] / calls) if row == "sample" else "-",
                                  f"{st['images_per_s']:.3g}", f"{100 * flops / st['step_s'] / peak:.1f}%",
                                  f"{r['peak_rss_bytes'] / GiB:.1f}", ratio_txt))
                elif r is not None:
                    reason = r.splitlines()[0] if isinstance(r, str) else "no timed calls"
                    table.append((f"{row}: {lay['title']}", label, g["batch"], mode, "-", "-", "-", "-", "-", "-",
                                  reason))
                    if isinstance(r, str) and "\n" in r:
                        notes.append(r)
            out["rows"][row] = {"layout": lay["title"], "batch": g["batch"], "mode": mode, "flops_per_call": flops,
                                "unet_calls": calls, "eojax_over_torch": ratio,
                                **{fw: st for fw, st in med.items()}}
        e, t = res.get("eojax"), res.get("torch")
        if isinstance(e, dict) and isinstance(t, dict):  # did both sides do the same work?
            if g["train"]:
                if "first_loss" in e and "first_loss" in t:
                    d = abs(e["first_loss"] - t["first_loss"]) / abs(t["first_loss"])
                    notes.append(f"{name}: first loss eojax {e['first_loss']:.6g}, torch {t['first_loss']:.6g} "
                                 f"(relative difference {d:.1e})" + ("  WARNING: large" if d > 1e-3 else ""))
            else:
                for what in ("unet", "sample"):
                    paths = [os.path.join(args.files[g["layout"]], f"{fw}_{what}.npy") for fw in ("eojax", "torch")]
                    if all(os.path.exists(p) for p in paths):
                        a, b = (np.load(p) for p in paths)
                        err = rel_error(a, b)
                        rms, finite = np.sqrt(np.mean(b ** 2)), bool(np.isfinite(a).all())
                        notes.append(f"{what}: eojax vs diffusers output, relative L2 difference {err:.1e} "
                                     f"(torch's rms {rms:.3g}, eojax's all finite: {finite})"
                                     + ("  WARNING: large" if err > 1e-2 else ""))
                        out["groups"][name][f"{what}_rel_error"] = err
        if isinstance(e, dict) and "compiled_bytes" in e:
            notes.append(f"{name}: eojax's compiled train step needs {e['compiled_bytes'] / GiB:.2f} GiB "
                         f"(XLA memory_analysis); XLA's FLOP count of it {e['xla_flops_per_step'] / 1e9:,.1f} GFLOP "
                         f"(3 x forward: {out['forward_flops_per_image'][g['layout']] * 3 * g['batch'] / 1e9:,.1f})")
        if isinstance(t, dict) and t["params"] != args.params[g["layout"]]:
            notes.append(f"WARNING {name}: diffusers' UNet has {t['params']:,} parameters, eojax's "
                         f"{args.params[g['layout']]:,}")
    print_table(("row", "framework", "batch", "mode", "median", "best", "per UNet call", "images/s", "MFU",
                 "peak RSS GiB", "eojax/torch"), table)
    print(f"\nmedian / best over the timed calls ({args.cycles} cycles, {args.sample_cycles} for the sample; "
          f"calls per cycle {args.steps or STEPS}); MFU = XLA's forward FLOPs x images x (2 guided, 3 train) / "
          f"median / peak {peak / 1e9:.1f} GFLOP/s; eojax/torch = speed ratio (>1: eojax faster); "
          f"mode: together = alternating cycles, sequential = one framework after the other.")
    for name, f in out["forward_flops_per_image"].items():
        print(f"{lays[name]['title']}: {f / 1e9:,.2f} GFLOP forward per image; {args.params[name]:,} parameters")
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
