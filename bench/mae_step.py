"""MAE train-step throughput and MFU: eojax's real trainer vs the PyTorch (transformers) reference.

  .venv/bin/python bench/mae_step.py [--steps 5] [--cycles 8] [--warmup 3] [--batch 32] [--rounds 1]
                                     [--framework both|eojax|torch] [--xla-flags=...] [--json out.json]

Shape (both sides): 96x96 px, 10 bands, patch 8, encoder 384 wide x 6 deep (6 heads, mlp 1536),
decoder 192 x 2 (6 heads, mlp 768), mask ratio 0.75, norm-pix loss, AdamW, float32.

Each framework runs in its own child process (eojax, torch as shipped, torch with eojax's malloc
settings), so neither one's thread pools or allocator state touches the other's. The children stay
alive and take turns: in each cycle every framework runs --steps timed steps while the others wait,
in rotated order. On a shared machine whose speed drifts 10-20% over minutes, comparing the two
sides cycle by cycle (seconds apart, same outside load) is what makes the ratio stable; separate
runs minutes apart could not tell a few percent from drift. Step times are per step, blocked on the
result; the table reports the median over all timed steps, images/s = batch / median, and MFU =
analytic model FLOPs per step / median / measured peak; under it, the per-cycle speed ratios.

eojax runs with eojax.hostmem's malloc settings, as the `eojax` CLI does (EOJAX_MALLOC=system in
the environment turns them off).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _common import MARK, READY, REPO, load_config, print_table, read_reply, single_device_env, summary

SHAPE = dict(image=96, bands=10, patch=8, width=384, depth=6, heads=6, mlp=1536,
             dec_width=192, dec_depth=2, dec_heads=6, dec_mlp=768, mask_ratio=0.75)
CONFIG_TEXT = "96px 10b p8 enc384x6 dec192x2 mask.75 f32 AdamW"


def _mae_config(batch: int, num_windows: int):
    config = load_config("mae")  # the default model is the bench shape (variant small, depth 6, 192x2 decoder)
    config.batch_size = batch
    config.input.window = SHAPE["image"]
    config.input.num_windows = num_windows
    config.mesh = (("data", 1), ("fsdp", 1), ("model", 1))
    config.progress_bar = False
    return config


# -- eojax side (child) -------------------------------------------------------------------------------
def eojax_side(args):
    """Sets up the real trainer; returns (step(i): one train step blocked on its result, finish(): the
    end-to-end and input-pipeline measurements and the result fields)."""
    import jax

    from eojax import train

    config = _mae_config(args.batch, 4096)
    run = train.setup(config, devices=jax.devices()[:1])
    m = run.task.model_kwargs()
    assert (m["width"], m["depth"], m["heads"], m["mlp_dim"], m["decoder_width"], m["decoder_depth"],
            m["decoder_heads"], m["patch_size"], m["in_channels"]) == (
        SHAPE["width"], SHAPE["depth"], SHAPE["heads"], SHAPE["mlp"], SHAPE["dec_width"], SHAPE["dec_depth"],
        SHAPE["dec_heads"], SHAPE["patch"], SHAPE["bands"]), f"configs/mae.py no longer has the bench shape: {m}"
    # Batches already on device, so the timed steps measure the step alone. A small pool is cycled:
    # the step's cost does not depend on the pixel values.
    pool = [run.next_batch() for _ in range(4)]
    jax.block_until_ready(pool)
    box = {"state": run.init_state()}

    def step(i):
        box["state"], box["metrics"] = run.train_step(box["state"], pool[i % len(pool)])
        jax.block_until_ready((box["state"], box["metrics"]))

    def finish():
        # End to end: the trainer's own loop body, next_batch() (Grain read + normalise + device_put) included.
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            box["state"], box["metrics"] = run.train_step(box["state"], run.next_batch())
            jax.block_until_ready((box["state"], box["metrics"]))
            times.append(time.perf_counter() - t)
        # The input pipeline alone, to compare with what the step consumes. Total time over many batches,
        # not a median: the first couple come out of Grain's prefetch buffer almost for free.
        n = max(args.steps, 10)
        t = time.perf_counter()
        for _ in range(n):
            next(run.train_iter)
        dt = (time.perf_counter() - t) / n
        return {"flops_per_step": float(run.task.train_flops_per_example()) * args.batch,
                "end_to_end": summary(times, args.batch),
                "input": {"step_s": dt, "images_per_s": args.batch / dt, "n": n},
                "last_loss": float(box["metrics"]["loss"]), "devices": str(jax.devices()[0]),
                "jax": jax.__version__}

    return step, finish


# -- PyTorch reference side (child) ------------------------------------------------------------------
def torch_side(args):
    """transformers' ViTMAEForPreTraining with the same shapes and optimizer; (step, finish) as eojax_side."""
    import torch
    import transformers
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    cfg = ViTMAEConfig(
        image_size=SHAPE["image"], patch_size=SHAPE["patch"], num_channels=SHAPE["bands"],
        hidden_size=SHAPE["width"], num_hidden_layers=SHAPE["depth"], num_attention_heads=SHAPE["heads"],
        intermediate_size=SHAPE["mlp"], decoder_hidden_size=SHAPE["dec_width"],
        decoder_num_hidden_layers=SHAPE["dec_depth"], decoder_num_attention_heads=SHAPE["dec_heads"],
        decoder_intermediate_size=SHAPE["dec_mlp"], mask_ratio=SHAPE["mask_ratio"], norm_pix_loss=True)
    model = ViTMAEForPreTraining(cfg).train()
    # Same optimizer settings as configs/mae.py (AdamW b2=0.95, wd 0.05, global-norm clip 1.0).
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    pool = [torch.randn(args.batch, SHAPE["bands"], SHAPE["image"], SHAPE["image"]) for _ in range(4)]
    box = {}

    def step(i):
        opt.zero_grad(set_to_none=True)
        loss = model(pixel_values=pool[i % len(pool)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        box["loss"] = loss

    def finish():
        return {"last_loss": float(box["loss"]), "torch": torch.__version__,
                "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}

    return step, finish


def serve(args) -> None:
    """A child: set up, warm up, print READY; then for each 'run N' line on stdin run N timed steps and
    print their times; on 'finish' print the result and exit."""
    step, finish = eojax_side(args) if args.child == "eojax" else torch_side(args)
    for i in range(args.warmup):
        step(i)
    print(READY, flush=True)
    i = 0
    for line in sys.stdin:
        if line.startswith("run "):
            times = []
            for _ in range(int(line.split()[1])):
                t = time.perf_counter()
                step(i)
                times.append(time.perf_counter() - t)
                i += 1
            print(MARK + json.dumps(times), flush=True)
        else:
            break
    from eojax import hostmem
    print(MARK + json.dumps({"framework": args.child, "malloc": hostmem.status or "glibc defaults", **finish()}),
          flush=True)


# -- parent --------------------------------------------------------------------------------------------
class Child:
    """One framework's serving child process, fed commands on stdin; its log goes to a temp file."""

    def __init__(self, framework: str, args):
        self.framework, self.log = framework, tempfile.TemporaryFile("w+")
        env = single_device_env(args.xla_flags if framework == "eojax" else "")
        # torch keeps OpenMP's default wait policy (as shipped): its threads spin briefly at barriers,
        # then sleep, so a waiting child uses no CPU. OMP_WAIT_POLICY=PASSIVE (used here until session 6)
        # made torch's step 10-15% slower; ACTIVE keeps idle children spinning and slows everyone.
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--child", framework, "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--batch", str(args.batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1, cwd=REPO, env=env)
        self.error = None if self._read() == READY else self._failure()

    def _read(self):
        return read_reply(self.proc.stdout)

    def _failure(self) -> str:
        self.proc.wait()
        self.log.seek(0)
        tail = self.log.read().strip().splitlines()[-15:]
        return f"{self.framework} run failed (rc {self.proc.returncode}):\n    " + "\n    ".join(tail)

    def run(self, steps: int) -> list[float]:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        times = self._read()
        if times is None:
            raise RuntimeError(self._failure())
        return times

    def finish(self) -> dict:
        self.proc.stdin.write("finish\n")
        self.proc.stdin.flush()
        result = self._read()
        self.proc.wait()
        if result is None:
            raise RuntimeError(self._failure())
        return result


def _torch_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import torch, transformers"], capture_output=True).returncode == 0


def _model_flops(batch: int) -> float:
    """The analytic count for the bench shape, when the eojax child did not run (torch only)."""
    from eojax.mae import model as mae_lib
    cfg = mae_lib.mae_config("small", depth=SHAPE["depth"], decoder_width=SHAPE["dec_width"],
                             decoder_depth=SHAPE["dec_depth"], decoder_heads=SHAPE["dec_heads"],
                             image_size=SHAPE["image"], in_channels=SHAPE["bands"], patch_size=SHAPE["patch"],
                             mask_ratio=SHAPE["mask_ratio"])
    return mae_lib.flops_per_image(cfg, training=True) * batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per framework per cycle")
    ap.add_argument("--cycles", type=int, default=8, help="cycles: every framework runs --steps steps in turn")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator warm-up)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="fresh sets of child processes, each running --cycles")
    ap.add_argument("--framework", choices=("both", "eojax", "torch"), default="both")
    ap.add_argument("--xla-flags", default="",
                    help="extra XLA_FLAGS for the eojax child, to try CPU options (none are on by default: "
                         "none tried gave a clear gain, see bench/README.md)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=("eojax", "torch", "torch+malloc"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if min(args.steps, args.warmup, args.rounds, args.cycles) < 1:
        ap.error("--steps, --cycles, --warmup and --rounds must be >= 1 (the first step compiles)")

    if args.child:
        # eojax runs as the `eojax` CLI does, with eojax.hostmem's malloc settings (EOJAX_MALLOC=system
        # turns them off); torch runs as shipped, and once more with the same settings, for fairness.
        from eojax import hostmem
        if args.child in ("eojax", "torch+malloc"):
            print(hostmem.tune_malloc(), file=sys.stderr, flush=True)
        serve(args)
        return

    # Peak first, in this otherwise idle process, before any child loads the cores.
    from eojax import metric_writer
    peak = metric_writer.measured_matmul_flops(repeats=30)  # best of many: robust to other load
    print(f"peak: measured best f32 1024^3 matmul rate of this CPU = {peak / 1e9:.1f} GFLOP/s "
          f"({os.cpu_count()} cores)")

    frameworks = {"both": ("eojax", "torch", "torch+malloc"), "torch": ("torch", "torch+malloc"),
                  "eojax": ("eojax",)}[args.framework]
    results: dict = {}
    if "torch" in frameworks and not _torch_importable():
        results = {fw: "torch not importable (pip install torch to compare)" for fw in frameworks if fw != "eojax"}
    times = {fw: [] for fw in frameworks}
    cycles = []  # per cycle: framework -> median step (s) of its --steps steps in that cycle
    for rnd in range(args.rounds):
        # All children stay alive for the whole round and take turns, so every framework sees the same
        # spells of outside load within a cycle; only one runs at a time (the others block on stdin).
        children = {}
        for fw in frameworks:
            if isinstance(results.get(fw), str):
                continue
            print(f"round {rnd + 1}/{args.rounds}: starting {fw} ({args.warmup} warm-up steps, batch {args.batch}) ...",
                  flush=True)
            child = Child(fw, args)
            if child.error:
                results[fw] = child.error
            else:
                children[fw] = child
        live = list(children)
        for c in range(args.cycles):
            order = live[c % len(live):] + live[:c % len(live)]  # rotated: nobody always goes first
            cycle = {}
            for fw in order:
                t = children[fw].run(args.steps)
                times[fw] += t
                cycle[fw] = statistics.median(t)
            cycles.append(cycle)
            print(f"  cycle {len(cycles)}: " + ", ".join(f"{fw} {cycle[fw] * 1e3:.0f} ms" for fw in live), flush=True)
        for fw in live:
            results[fw] = {**children[fw].finish(), "step": summary(times[fw], args.batch)}

    # Again after the runs, keeping the best: on a shared machine one measurement can catch the cores busy.
    peak = max(peak, metric_writer.measured_matmul_flops(repeats=30))
    print(f"peak (best of before/after): {peak / 1e9:.1f} GFLOP/s")
    ej = results.get("eojax")
    flops = ej["flops_per_step"] if isinstance(ej, dict) else _model_flops(args.batch)
    print(f"model FLOPs per step: {flops / 1e9:.1f} GFLOP (analytic matmul count x batch {args.batch})\n")

    rows = []
    def row(name, s, config):
        mfu = flops / s["step_s"] / peak
        rows.append((name, f"{s['images_per_s']:.1f}", f"{s['step_s'] * 1e3:.0f}", f"{s['min_step_s'] * 1e3:.0f}",
                     f"{100 * mfu:.1f}%", config))

    if isinstance(ej, dict):
        row("eojax (step only)", ej["step"], f"{CONFIG_TEXT}; {ej['malloc']}")
        row("eojax (end-to-end, + input)", ej["end_to_end"], CONFIG_TEXT + ", Grain input")
    elif ej is not None:
        rows.append(("eojax", "-", "-", "-", "-", ej.splitlines()[0]))
    for fw in ("torch", "torch+malloc"):
        tr = results.get(fw)
        if isinstance(tr, dict):
            row(f"torch {tr['torch']} (HF ViTMAE{', + malloc' if fw == 'torch+malloc' else ''})", tr["step"],
                f"{CONFIG_TEXT}, {tr['threads']} threads, OMP {tr['omp_wait_policy'] or 'default'}; {tr['malloc']}")
        elif tr is not None:
            rows.append((fw, "-", "-", "-", "-", tr.splitlines()[0]))

    print_table(("framework", "images/s", "step ms", "best ms", "MFU", "config"), rows)
    print(f"\nstep ms = median of all {args.rounds * args.cycles * args.steps} timed steps ({args.rounds} round(s) x "
          f"{args.cycles} cycles x {args.steps}), each blocked on its result; images/s and MFU from it; "
          f"best ms = fastest single step.")
    if isinstance(ej, dict):
        inp = ej["input"]
        print(f"input pipeline alone: {inp['images_per_s']:.0f} images/s "
              f"({inp['step_s'] * 1e3:.1f} ms per batch of {args.batch}) vs the step's "
              f"{ej['step']['images_per_s']:.1f} images/s")
    paired = {}
    for fw, label in (("torch", "torch as shipped"), ("torch+malloc", "torch with eojax's malloc settings")):
        tr = results.get(fw)
        if isinstance(ej, dict) and isinstance(tr, dict):
            # Speed ratio per cycle: both sides measured minutes apart at most, under the same load.
            per_cycle = sorted(c[fw] / c["eojax"] for c in cycles)
            wins = sum(r >= 1.0 for r in per_cycle)
            paired[fw] = {"median": statistics.median(per_cycle), "min": per_cycle[0], "max": per_cycle[-1],
                          "eojax_faster_cycles": wins, "cycles": len(per_cycle)}
            print(f"eojax / {label} (speed, step only): {statistics.median(per_cycle):.2f}x median over "
                  f"{len(per_cycle)} cycles (range {per_cycle[0]:.2f}-{per_cycle[-1]:.2f}; eojax faster in "
                  f"{wins}/{len(per_cycle)}); {tr['step']['step_s'] / ej['step']['step_s']:.2f}x from the overall "
                  f"medians, {tr['step']['min_step_s'] / ej['step']['min_step_s']:.2f}x from the best steps")
    for fw, r in results.items():
        if isinstance(r, str) and "\n" in r:
            print(f"\n{r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "flops_per_step": flops, "batch": args.batch, "cycles": cycles,
                       "paired": paired, **results}, f, indent=2)


if __name__ == "__main__":
    main()
