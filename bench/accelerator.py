"""Five realistic train steps on one accelerator: step time, throughput, MFU and compiled peak memory,
under both kernel sets ('plain' and 'xla_cpu').

  python bench/accelerator.py [--json out.json]       # an H100 / H200 GPU or a TPU: the full sizes, <= 8 min
  python bench/accelerator.py --smoke                  # tiny sizes (the default when the platform is cpu)

Rows (all built through the real trainer: the config file, size overrides, `train.setup(config)`):
  mae      configs/mae.py        ViT-B/16 MAE at 224 px (10 synthetic Sentinel-2 bands), batch 256
  satmae   configs/satmae.py     SatMAE++ ViT-B/8 at 96 px, multi-scale head (input.scales (1, 2, 4)), batch 128
  gpt2     configs/vsat.py       GPT-2 small (12 x 768, vocabulary 50257, 124M params) at sequence 1024, batch 32
  unet     configs/diffusion.py  the SD-1.5 UNet (320/640/1280/1280, 2 layers per block, cross-attention 768,
                                 8 heads) on 64 x 64 x 3 inputs, 77-token captions, batch 16
  upernet  configs/seg.py        UperNet (512 channels) on an eojax ViT-B/16 MAE encoder, 224 px, finetune, batch 32
Batches are per device (times the device count on a multi-device host; the mesh is the default: every
device on 'data'). Every full-size row runs bf16 (model.dtype) and, on GPUs, cuDNN flash attention in the
MAE-family encoders (model.attention_impl / the seg encoder's attention_impl). Each row runs once with
config.kernels='plain' and once with 'xla_cpu' (the trainer traces every program under config.kernels).

Per row: setup, init (`run.init_state()`; the smoke puts a zero state on the device instead, which
compiles nothing), the step compiled once by `Run.compile_step()` (that compile is `compile s`, trace
and lowering included), a device batch of random values with the shapes, dtypes and shardings of
`Run.abstract_batch()` (no input pipeline is timed), warm-up steps, then timed steps, each blocked on its
result. step ms = median timed step; throughput = batch (x tokens per row for GPT-2) / median;
MFU = `run.flops_per_step` (model FLOPs of one step: analytic for MAE / SatMAE / GPT-2, XLA's count for the
UNet and UperNet) / median / peak, the peak being the device's published dense bf16 rate
(eojax.metric_writer._KNOWN_PEAK_TFLOPS) x devices, or on CPU the measured f32 matmul rate;
peak mem = temp + argument + output - alias bytes of the compiled step's memory_analysis() (one device).

Robustness: the rows run in a child process watched by this one. A row that fails (out of memory,
cuDNN unsupported, ...) is reported in the table; an out-of-memory row is retried at half the batch
while time allows; a row that runs past --row-limit or crashes the child is killed and the remaining
rows go on in a fresh child; rows not started when --budget runs out are reported as skipped. The
number of timed steps shrinks to fit the time left. Exit status 1 when any row has no result.

Workarounds in this script (eojax/ is not changed by it): configs/vsat.py's numeric tokenizer has a
29-token vocabulary, so the gpt2 row sets GPT-2's 50257 (config.model.vocab_size, a padded embedding);
its rows come from eojax's synthetic multiband series (input.source='multiband'), the Landsat files of
the shared data folder not being on accelerator machines. SatMAE++'s 96 px multi-scale input needs
384 px native windows, larger than the default synthetic scenes: one 448 px synthetic scene is written
to ~/.cache/eojax/bench_accelerator. The UNet runs in pixel space on 64 x 64 RGB (eojax has no VAE:
3 input channels where SD-1.5's latents have 4); its caption encoder is eojax's small transformer at
SD's text width (12 x 768, frozen by optim.freeze as SD's CLIP is).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from _common import MARK, REPO, load_config

FAMILIES = ("mae", "satmae", "gpt2", "unet", "upernet")
KERNEL_SETS = ("plain", "xla_cpu")
TITLES = {"mae": "ViT-B/16 MAE 224px", "satmae": "SatMAE++ ViT-B/8 96px multi-scale",
          "gpt2": "GPT-2 small seq 1024", "unet": "SD-1.5 UNet 64x64", "upernet": "UperNet + ViT-B/16 224px"}
TINY_TITLES = {"mae": "MAE (tiny)", "satmae": "SatMAE++ multi-scale (tiny)", "gpt2": "GPT-2 (tiny)",
               "unet": "UNet (tiny)", "upernet": "UperNet + MAE encoder (tiny)"}
INFO, START, DONE = "BENCH_INFO ", "BENCH_START ", "BENCH_DONE"
CACHE = os.path.join(os.environ.get("EOJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "eojax"),
                     "bench_accelerator")
GPT2_VOCAB = 50257


# ---------------------------------------------------------------------------------------------------
# The five families: config, per-device batch, what one example counts as.
# ---------------------------------------------------------------------------------------------------
def _bf16(config, tiny):
    if not tiny:
        config.model.dtype = "bfloat16"


def _mae(tiny, gpu):
    config = load_config("mae", "runlocal" if tiny else "variant=base,patch=16")
    if tiny:
        config.model.update(depth=1, decoder_depth=1)
    else:
        config.input.window = 224
        config.model.attention_impl = "cudnn" if gpu else "xla"
    config.input.num_windows = 64
    _bf16(config, tiny)
    return config, (4 if tiny else 256)


def _big_scene() -> str:
    """One synthetic Sentinel-2-like scene of 448 px (SatMAE++'s 96 px x 4 native windows need 384)."""
    from eojax.data import synthetic
    path = os.path.join(CACHE, "s2_448.tif")
    if not os.path.exists(path):  # write_scene writes atomically
        os.makedirs(CACHE, exist_ok=True)
        synthetic.write_scene(path, seed=21, height=448, width=448, cloud_fraction=0.05, nodata_border=False)
    return path


def _satmae(tiny, gpu):
    config = load_config("satmae", "runlocal" if tiny else None)  # full: variant base, patch 8, 96 px, (1, 2, 4)
    if tiny:
        config.model.update(depth=1, decoder_depth=1)
    else:
        config.input.paths = (_big_scene(),)
        config.input.bands = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")  # not its QA band
        config.model.attention_impl = "cudnn" if gpu else "xla"
    assert tuple(config.input.scales) == (1, 2, 4), config.input.scales
    config.input.num_windows = 64
    _bf16(config, tiny)
    return config, (4 if tiny else 128)


def _gpt2(tiny, gpu):
    config = load_config("vsat", "runlocal,mode=great" if tiny else "mode=great,variant=gpt2")
    config.input.update(source="multiband", synthetic_dir=os.path.join(CACHE, "vsat_series"), target_date="")
    config.model.max_len = 65 if tiny else 1025  # tokens per row: 64 / 1024 predicted positions
    if tiny:
        config.model.n_layer = 1
    _bf16(config, tiny)
    if not tiny:
        config.model.vocab_size = GPT2_VOCAB
    return config, (4 if tiny else 32)


def _unet(tiny, gpu):
    config = load_config("diffusion", "runlocal" if tiny else "sd15")
    if tiny:
        config.input.synthetic_n = 32
        config.model.update(block_out_channels=(16,), attention=(True,), layers_per_block=1, norm_groups=8)
    else:
        # SD-1.5's UNet shapes from the sd15 argument, in pixel space at 64 x 64 (eojax has no VAE; sd15's
        # 8x space-to-depth would read 512 px images and give 192 latent channels instead of 4).
        config.input.update(image_size=64, synthetic_n=64)
        config.model.update(autoencoder="", autoencoder_factor=1, latent_scale=1.0)
        config.optim.freeze = ("^text_encoder/",)  # SD trains the UNet only (its CLIP text encoder is frozen)
    config.input.eval_fraction = 0.25
    _bf16(config, tiny)
    return config, (2 if tiny else 16)


def _upernet(tiny, gpu):
    arg = "encoder=mae,decoder=upernet,mode=finetune"
    config = load_config("seg", arg + (",runlocal" if tiny else ""))
    if tiny:
        config.model.encoder_args.update(depth=1, layers=(0, 0, 0, 0))
    else:
        config.model.encoder_variant = "base"  # ViT-B: 768 x 12, 12 heads
        config.model.encoder_args = dict(patch_size=16, attention_impl="cudnn" if gpu else "xla")
        config.input.synthetic_size = 256  # chips large enough for the 224 px crops
    config.input.num_crops = 32
    _bf16(config, tiny)
    return config, (4 if tiny else 32)


BUILDERS = {"mae": _mae, "satmae": _satmae, "gpt2": _gpt2, "unet": _unet, "upernet": _upernet}


def _param_count(tree) -> int:
    import jax
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _describe(family: str, run, config) -> str:
    """The shape that was really built, read back from the run."""
    task, m = run.task, config.model
    params = run.abstract_state.params
    total = _param_count(params) / 1e6
    if family in ("mae", "satmae"):
        k = task.model_kwargs()
        dec = f"dec {k.get('decoder_width')}x{k.get('decoder_depth')}"
        bands = len(task.band_names)
        extra = f", {len(k['groups'])} groups, multi-scale {k.get('multiscale')}" if family == "satmae" else ""
        return (f"{k['width']}x{k['depth']} h{k['heads']} p{k['patch_size']} {k['image_size']}px {bands}b{extra}, "
                f"{dec}, mask {k['mask_ratio']}, {m.dtype}, attn {m.attention_impl}; {total:.1f}M params")
    if family == "gpt2":
        k = task.model_kwargs()
        return (f"{k['n_layer']}L {k['n_embd']}d {k['n_head']}h vocab {k['vocab_size']} seq {task.max_len - 1}, "
                f"{m.dtype}; {total:.1f}M params")
    if family == "unet":
        unet = _param_count(params["denoiser"]) / 1e6
        c, ae = config.input, task.autoencoder
        size = c.image_size // max(int(m.autoencoder_factor), 1) if m.autoencoder else c.image_size
        return (f"blocks {tuple(m.block_out_channels)} x{m.layers_per_block} attn {tuple(m.attention)} h{m.heads} "
                f"ctx {m.text_width}, in {size}x{size}x{ae.latent_channels}, text {m.text_depth}x{m.text_width} "
                f"L{c.max_len}, {m.dtype}; UNet {unet:.1f}M of {total:.1f}M params")
    if family == "upernet":
        enc = task.model.encoder
        return (f"{m.encoder} {enc.width}x{enc.depth} h{enc.heads} p{enc.patch_size} {config.input.crop}px "
                f"{len(task.band_names)}b + {m.decoder} {dict(m.decoder_args).get('channels')}ch, {m.mode}, "
                f"{m.dtype}, attn {getattr(enc, 'attention_impl', None)}; {total:.1f}M params")
    return ""


# ---------------------------------------------------------------------------------------------------
# Child: runs rows, prints one MARK line per row.
# ---------------------------------------------------------------------------------------------------
def _fake_batch(abstract: dict) -> dict:
    """Random device arrays with the batch's shapes, dtypes and shardings (the step's cost does not
    depend on the values): pixels / images uniform, masks all valid, weights 1, labels and tokens 0,
    token counts full length."""
    import jax
    import jax.numpy as jnp

    out = {}
    for i, (name, s) in enumerate(sorted(abstract.items())):
        def make(key, s=s, name=name):
            dtype = jnp.dtype(s.dtype)
            if dtype == jnp.bool_:
                return jnp.ones(s.shape, dtype)
            if jnp.issubdtype(dtype, jnp.floating):
                if name == "weight":
                    return jnp.ones(s.shape, dtype)
                return jax.random.uniform(key, s.shape, jnp.float32).astype(dtype)
            if name == "lengths" and "tokens" in abstract:
                return jnp.full(s.shape, abstract["tokens"].shape[1], dtype)
            if jnp.issubdtype(dtype, jnp.unsignedinteger):  # raw digital numbers (uint16 scenes)
                return jax.random.randint(key, s.shape, 1, 3000, jnp.int32).astype(dtype)
            return jnp.zeros(s.shape, dtype)
        out[name] = jax.jit(make, out_shardings=s.sharding)(jax.random.key(i))
    return out


def _zero_state(run):
    """The train state as zeros with its shardings, put on the devices without compiling anything.
    Smoke mode only: on a CPU, compiling run.init_state() was ~30% of the smoke's time, and a step
    costs the same whatever the parameter values (the full sizes use run.init_state())."""
    import jax
    import numpy as np

    def zero(s):
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            raise TypeError("a PRNG key in the state")
        return jax.device_put(np.zeros(s.shape, s.dtype), s.sharding)

    try:
        return jax.tree.map(zero, run.abstract_state)
    except TypeError:
        return run.init_state()


def _memory(compiled) -> dict | None:
    """One device's bytes: temp + argument + output - alias (what the step needs live at its peak)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without it
        return None
    if isinstance(ma, (list, tuple)):
        ma = ma[0] if ma else None
    if ma is None:
        return None
    d = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0) for k in ("temp", "argument", "output", "alias")}
    d["peak"] = d["temp"] + d["argument"] + d["output"] - d["alias"]
    return d


def _is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return isinstance(e, MemoryError) or any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory",
                                                                    "out of memory", "OOM"))


def _measure(family, kernels, config, batch, env, deadline, args) -> dict:
    import jax

    from eojax import train

    config.batch_size = batch
    # Enough windows / crops / pairs per epoch for one batch (only the setup reads them).
    for key, times in (("num_windows", 2), ("num_crops", 2), ("synthetic_n", 4)):
        if key in config.input:
            config.input[key] = max(int(config.input[key]), times * batch)
    t0 = time.perf_counter()
    run = train.setup(config)
    state = _zero_state(run) if env["tiny"] else run.init_state()
    jax.block_until_ready(state)
    setup_s = time.perf_counter() - t0
    t = time.perf_counter()
    compiled = run.compile_step()
    compile_s = time.perf_counter() - t
    shape = _describe(family, run, config)
    mem = _memory(compiled)
    limit = env.get("bytes_limit")
    if mem and limit and mem["peak"] > limit:
        raise MemoryError(f"compiled step needs {mem['peak'] / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB of device memory")
    abstract = run.abstract_batch()
    data = _fake_batch(abstract)
    box = {"state": state}

    def step():
        with run.scope():  # the compiled step keys on the kernel set traced under config.kernels
            box["state"], box["metrics"] = compiled(box["state"], data)
        jax.block_until_ready((box["state"], box["metrics"]))

    warm = []
    for _ in range(args.warmup):
        t = time.perf_counter()
        step()
        warm.append(time.perf_counter() - t)
    # As many timed steps as fit before the deadline (at least min_steps, at most --steps).
    per = warm[-1] if warm else 0.0
    left = deadline - time.monotonic() - 1.0
    n = args.steps if per <= 0 else max(args.min_steps, min(args.steps, int(0.8 * left / per)))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    per_example = (abstract["tokens"].shape[1] - 1) if family == "gpt2" else 1
    flops = float(run.flops_per_step)
    loss = float(box["metrics"]["loss"])
    return {"batch": batch, "step_s": med, "min_step_s": min(times), "n_steps": len(times),
            "warmup_s": warm, "throughput": batch * per_example / med,
            "unit": "tokens/s" if family == "gpt2" else "images/s", "flops_per_step": flops,
            "mfu": flops / med / env["peak_flops"], "memory": mem,
            "peak_memory_bytes": mem["peak"] if mem else None, "setup_s": setup_s, "compile_s": compile_s,
            "loss": loss, "shape": shape}


def _row_config(family, kernels, tiny, gpu):
    config, per_device = BUILDERS[family](tiny, gpu)
    config.kernels = kernels
    config.progress_bar = False
    config.mesh = (("data", -1), ("fsdp", 1), ("model", 1))  # the default mesh: every device on 'data'
    return config, per_device


def run_row(family, kernels, env, deadline, args) -> dict:
    """One (family, kernel set) row; an out-of-memory batch is halved while time allows."""
    import jax

    tiny, gpu = env["tiny"], env["platform"] == "gpu"
    row = {"family": family, "kernels": kernels, "notes": []}
    config, per_device = _row_config(family, kernels, tiny, gpu)
    ndev = env["devices"]
    batch = per_device * ndev
    while True:
        if config is None:  # a fresh config per try
            config = _row_config(family, kernels, tiny, gpu)[0]
        try:
            row.update(_measure(family, kernels, config, batch, env, deadline, args))
            return row
        except Exception as e:  # noqa: BLE001 - reported in the table
            oom = _is_oom(e)
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            error = f"{type(e).__name__}: {message}"[:300]
            trace = traceback.format_exc()[-3000:]
        # Out of the except block: the exception's frames (and the arrays they hold) are gone.
        config = None
        gc.collect()
        jax.clear_caches()
        if oom and batch // 2 >= ndev and time.monotonic() < deadline - 20:
            row["notes"].append(f"batch {batch} out of memory")
            batch //= 2
            continue
        row.update(error=error, traceback=trace, batch=batch)
        return row


def child(args) -> None:
    import jax

    from eojax import metric_writer

    platform = jax.default_backend()
    devices = jax.devices()
    tiny = args.smoke or platform == "cpu"
    if platform == "cpu":
        # Measured before any row loads the cores; all simulated CPU devices share them.
        peak, source = metric_writer.measured_matmul_flops(repeats=10), "measured f32 1024^3 matmul of this CPU"
        peak_per_device = peak / len(devices)
    else:
        known = any(k.lower() in devices[0].device_kind.lower() for k in metric_writer._KNOWN_PEAK_TFLOPS)
        peak_per_device = metric_writer.peak_flops_per_device()
        source = "published dense bf16 peak" if known else "measured f32 1024^3 matmul (device kind not in the table)"
        peak = peak_per_device * len(devices)
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        stats = {}
    import jaxlib
    env = {"platform": platform, "device_kind": devices[0].device_kind, "devices": len(devices),
           "jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?"), "tiny": tiny,
           "peak_flops": peak, "peak_flops_per_device": peak_per_device, "peak_source": source,
           "bytes_limit": stats.get("bytes_limit"), "python": sys.version.split()[0]}
    if args.steps is None:
        args.steps = 2 if tiny else 10
    if args.min_steps is None:
        args.min_steps = 1 if tiny else 3
    if args.warmup is None:
        args.warmup = 1 if tiny else 2
    env.update(steps=args.steps, min_steps=args.min_steps, warmup=args.warmup)
    print(INFO + json.dumps(env), flush=True)
    end = time.monotonic() + args.budget_left
    for spec in args.rows.split(","):
        family, kernels = spec.split(":")
        print(START + spec, flush=True)
        deadline = min(end, time.monotonic() + args.row_limit)
        try:
            row = run_row(family, kernels, env, deadline, args)
        except Exception as e:  # noqa: BLE001 - e.g. the config itself did not build
            row = {"family": family, "kernels": kernels, "notes": [], "error": f"{type(e).__name__}: {e}"[:300],
                   "traceback": traceback.format_exc()[-3000:]}
        gc.collect()
        jax.clear_caches()
        print(MARK + json.dumps(row), flush=True)
    print(DONE, flush=True)


# ---------------------------------------------------------------------------------------------------
# Parent: runs the child, watches the time, prints the table.
# ---------------------------------------------------------------------------------------------------
class Child:
    def __init__(self, rows: list[str], args, budget_left: float, row_limit: float):
        self.log = tempfile.TemporaryFile("w+")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--rows", ",".join(rows),
               "--budget-left", f"{budget_left:.1f}", "--row-limit", f"{row_limit:.1f}"]
        for flag in ("steps", "warmup", "min_steps"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.smoke:
            cmd.append("--smoke")
        env = dict(os.environ)
        if args.smoke and "--xla_backend_optimization_level" not in env.get("XLA_FLAGS", ""):
            # Tiny programs compile far longer than they run: LLVM at -O0, as the test suite does.
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
                                     cwd=REPO, env=env, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float):
        """The next protocol line; None when the child ended; TimeoutError when none came in time."""
        end = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                line = self.lines.get(timeout=max(end - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError from None
            if line is None or line.startswith((INFO, START, MARK, DONE)):
                return line

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def tail(self, n: int = 12) -> str:
        self.log.seek(0)
        return "\n".join(self.log.read().strip().splitlines()[-n:])


def run_all(args) -> tuple[dict, list[dict]]:
    order = [f"{f}:{k}" for k in args.kernels for f in args.families]  # every family's first kernel set first
    t_start = time.monotonic()
    budget, row_limit = args.budget, args.row_limit
    env: dict = {}
    results: dict[str, dict] = {}
    pending = list(order)
    while pending:
        left = budget - (time.monotonic() - t_start)
        if left < 5:
            break
        child = Child(pending, args, left, row_limit)
        current = None
        try:
            while True:
                left = budget - (time.monotonic() - t_start)
                wait = min(row_limit + 15, left + 10) if current else left + 10  # start-up: within the budget
                try:
                    line = child.next(wait)
                except TimeoutError:
                    if current:
                        results[current] = _failed(current, f"killed after {row_limit:.0f} s (row limit)"
                                                   if left > 0 else "killed: time budget spent")
                        pending.remove(current)
                    child.kill()
                    break
                if line is None:  # the child died
                    child.proc.wait()
                    why = f"child exited (rc {child.proc.returncode}) {child.tail(1)}"
                    if current:
                        results[current] = _failed(current, why, child.tail())
                        pending.remove(current)
                    elif not env:
                        print(f"the bench child failed before any row:\n{child.tail(30)}", file=sys.stderr)
                        pending.clear()
                    break
                if line.startswith(INFO):
                    env = json.loads(line[len(INFO):])
                    if env["tiny"] and not args.smoke:  # a CPU: the smoke sizes and budgets
                        args.smoke = True
                        budget = args.budget if args.budget_given else SMOKE_BUDGET
                        row_limit = args.row_limit if args.row_limit_given else SMOKE_ROW_LIMIT
                elif line.startswith(START):
                    current = line[len(START):]
                elif line.startswith(MARK):
                    row = json.loads(line[len(MARK):])
                    key = f"{row['family']}:{row['kernels']}"
                    results[key] = row
                    pending.remove(key)
                    current = None
                    status = (f"{row['step_s'] * 1e3:.1f} ms/step" if "step_s" in row else row.get("error", ""))
                    print(f"  {key}: {status}", file=sys.stderr, flush=True)
                elif line == DONE:
                    child.proc.wait()
                    break
        finally:
            child.kill()
    for key in pending:
        results[key] = _failed(key, "skipped: time budget spent")
    env["wall_s"] = time.monotonic() - t_start
    env["budget_s"], env["row_limit_s"] = budget, row_limit
    rows = [results[f"{f}:{k}"] for f in args.families for k in args.kernels if f"{f}:{k}" in results]
    return env, rows


def _failed(key: str, why: str, tail: str = "") -> dict:
    family, kernels = key.split(":")
    return {"family": family, "kernels": kernels, "error": why, "notes": [], **({"log_tail": tail} if tail else {})}


def _fmt_bytes(n) -> str:
    if not n:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _fmt_rate(x: float, unit: str) -> str:
    unit = "tok/s" if unit.startswith("tokens") else "img/s"
    return f"{x / 1e3:.1f}k {unit}" if x >= 1e4 else f"{x:.1f} {unit}" if x < 100 else f"{x:.0f} {unit}"


def markdown(env: dict, rows: list[dict]) -> str:
    titles = TINY_TITLES if env.get("tiny") else TITLES
    head = ("model", "kernels", "batch", "step ms", "throughput", "MFU", "peak mem", "compile s", "shape / notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        title = titles.get(r["family"], r["family"])
        notes = "; ".join(r.get("notes", []))
        if "step_s" in r:
            cells = (title, r["kernels"], str(r["batch"]), f"{r['step_s'] * 1e3:.1f}",
                     _fmt_rate(r["throughput"], r["unit"]), f"{100 * r['mfu']:.1f}%",
                     _fmt_bytes(r["peak_memory_bytes"]), f"{r['compile_s']:.1f}",
                     r["shape"] + (f"; {notes}" if notes else ""))
        else:
            err = r["error"].replace("|", "/")
            cells = (title, r["kernels"], str(r.get("batch", "-")), "-", "-", "-", "-", "-",
                     f"FAILED: {err}" + (f"; {notes}" if notes else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(env: dict) -> str:
    if not env:
        return "# bench/accelerator.py: no device information (the child failed to start)"
    mode = "smoke (tiny sizes, float32)" if env["tiny"] else "full sizes, bf16"
    kernels = "config.kernels traced by the trainer (Run.scope)"
    return (f"# bench/accelerator.py: {env['device_kind']} x{env['devices']} ({env['platform']}), "
            f"jax {env['jax']}, jaxlib {env['jaxlib']}, python {env['python']}\n"
            f"mode: {mode}; peak {env['peak_flops_per_device'] / 1e12:.3f} TFLOP/s per device "
            f"({env['peak_source']}); {kernels}\n"
            f"wall {env['wall_s']:.0f} s (budget {env['budget_s']:.0f} s, row limit {env['row_limit_s']:.0f} s)")


FULL_BUDGET, FULL_ROW_LIMIT = 450.0, 150.0
SMOKE_BUDGET, SMOKE_ROW_LIMIT = 240.0, 120.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, float32 (automatic on a CPU)")
    ap.add_argument("--json", help="also write the header fields and rows here")
    ap.add_argument("--families", default=",".join(FAMILIES), help=f"comma separated, of {','.join(FAMILIES)}")
    ap.add_argument("--kernels", default=",".join(KERNEL_SETS), help="kernel sets, comma separated")
    ap.add_argument("--budget", type=float, help=f"seconds for everything (default {FULL_BUDGET:.0f}; smoke "
                                                 f"{SMOKE_BUDGET:.0f})")
    ap.add_argument("--row-limit", type=float, help=f"seconds one row may take before it is killed (default "
                                                    f"{FULL_ROW_LIMIT:.0f}; smoke {SMOKE_ROW_LIMIT:.0f})")
    ap.add_argument("--steps", type=int, help="timed steps per row, at most (default 10; smoke 2)")
    ap.add_argument("--min-steps", type=int, help="timed steps per row, at least (default 3; smoke 1)")
    ap.add_argument("--warmup", type=int, help="untimed steps after the compile (default 2; smoke 1)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--budget-left", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    args.families = [f for f in args.families.split(",") if f]
    args.kernels = [k for k in args.kernels.split(",") if k]
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        ap.error(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    args.budget_given, args.row_limit_given = args.budget is not None, args.row_limit is not None
    if args.budget is None:
        args.budget = SMOKE_BUDGET if args.smoke else FULL_BUDGET
    if args.row_limit is None:
        args.row_limit = SMOKE_ROW_LIMIT if args.smoke else FULL_ROW_LIMIT
    # Step counts left unset take the child's defaults (it knows the platform: a CPU means smoke).
    env, rows = run_all(args)
    print(header(env))
    print()
    print(markdown(env, rows))
    print("\nstep ms: median of the timed steps (each blocked on its result); throughput from it; MFU = "
          "run.flops_per_step / step / peak; peak mem: compiled step's temp + argument + output - alias "
          "(one device); compile s: Run.compile_step() (trace, lower, compile).")
    for r in rows:
        if "error" in r and (r.get("traceback") or r.get("log_tail")):
            print(f"\n{r['family']}:{r['kernels']} failed:\n{r.get('traceback') or r.get('log_tail')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**env, "rows": rows}, f, indent=2)
    sys.exit(1 if any("error" in r for r in rows) or not rows else 0)


if __name__ == "__main__":
    main()
