"""Fine-tune train-step throughput and MFU of the classification family: eojax's real trainer vs the
PyTorch reference (timm's ViT, torchvision's ResNet), in the same run.

  .venv/bin/python bench/classify_step.py [--model both|vit|resnet] [--framework both|eojax|torch]
        [--cycles 4] [--steps 2] [--warmup 2] [--vit-batch 16] [--resnet-batch 8] [--torch-malloc]
        [--site DIR] [--xla-flags=...] [--json out.json]
  .venv/bin/python bench/classify_step.py --quick      # tiny shapes, 1 cycle of 1 step: a smoke run

Models (both frameworks, float32, 62 classes = fMoW's, fine-tune with every parameter training):
  vit     ViT-B/8 at 96 px, 10 bands (SatMAE++'s fMoW-Sentinel shape): 768 x 12, 12 heads, mlp 3072,
          144 patch tokens + cls, 'avg' pooling of the patch tokens -> fc_norm -> head; drop path 0.1,
          layer-wise lr decay 0.75; batch 16
  resnet  ResNet-50 (torchvision v1.5 layout) at 224 px, 3 bands (ImageNet's RGB shape); batch 8
Both: AdamW (weight decay 0.05, none on biases / norms), Mixup 0.8 / CutMix 1.0 (switch 0.5, timm's
'batch' mode) with label smoothing 0.1, softmax cross-entropy on the soft targets; forward + backward +
optimizer update per timed step.

eojax: configs/classify.py (`encoder=mae` with ViT-B/8 encoder_args, or `encoder=resnet` variant '50'),
built by `eojax.train.setup(config, devices=[one CPU], spec=...)` on fMoW-Sentinel's DataSpec (its 10
bands, SatMAE's normalisation, 62 classes; made here, so no data is read), one micro-batch per step
(optim.accum_steps=1; the recipe's 16-way accumulation is a loop over this step). The timed call is
`run.train_step` on random device batches of the DataSpec's shapes. The recipe's flips and random
erasing are turned off: timm runs them in its data loader, outside the step the reference times.

PyTorch: timm's VisionTransformer(img_size=96, patch_size=8, in_chans=10, embed_dim=768, depth=12,
num_heads=12, drop_path_rate=0.1, global_pool='avg', num_classes=62) with timm's create_optimizer_v2
('adamw', layer_decay=0.75), or torchvision's resnet50(num_classes=62) with the same AdamW (no layer
decay, as eojax's config); timm's Mixup and SoftTargetCrossEntropy; torch.set_num_threads(cpu count),
OpenMP's default wait policy. timm / torchvision are found on sys.path or in --site DIR (a
`pip --target` folder); torchvision._meta_registrations is stubbed before the import, as
scripts/fixtures/make_resnet_fixture.py does (PyPI's torchvision 0.28 wheel fails to register its
detection ops' fake kernels beside the CPU torch; the ResNet uses none of them). Without torch (or
timm / torchvision) the torch rows say why and eojax's rows are still measured.

Protocol (as bench/mae_step.py): one model at a time; each framework in its own child process (one CPU
device for eojax; eojax with eojax.hostmem's malloc settings as the CLI, torch as shipped, and with
--torch-malloc also torch with those settings); the children stay alive and take turns, --steps timed
steps each per cycle in rotated order, so the per-cycle ratio compares both sides under the same
outside load. Step time = median of all timed steps (each blocked on its result); images/s = batch /
median. MFU = analytic model FLOPs per step (3 x the forward's matmul / conv multiply-adds x 2, the
same count for both frameworks) / median / the CPU's measured f32 matmul peak
(eojax.metric_writer.measured_matmul_flops, before and after the runs, best kept). XLA's own count of
eojax's compiled step (run.flops_per_step: the classify task has no analytic count, so the trainer
uses cost_analysis) is printed beside it.
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

NUM_CLASSES = 62  # fMoW's categories
VIT_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")  # SatMAE++'s 10 (fMoW-Sentinel)
RGB_BANDS = ("B4", "B3", "B2")
MIX = dict(mixup=0.8, cutmix=1.0, switch_prob=0.5, label_smoothing=0.1)
WEIGHT_DECAY, LAYER_DECAY, DROP_PATH = 0.05, 0.75, 0.1


def shapes(args) -> dict:
    """model -> its shape, with --vit-batch / --resnet-batch applied."""
    out = _shapes(args.quick)
    for model, batch in (("vit", args.vit_batch), ("resnet", args.resnet_batch)):
        if batch:
            out[model]["batch"] = batch
    return out


def _shapes(quick: bool) -> dict:
    """--quick: tiny sizes with the same structure (a smoke run, not a measurement)."""
    if quick:
        return {"vit": dict(image=32, patch=8, bands=VIT_BANDS, width=64, depth=2, heads=2, mlp=256, batch=4,
                            title="ViT-p8 tiny 32px"),
                "resnet": dict(image=64, bands=RGB_BANDS, stage_sizes=(1, 1, 1, 1), width=64, batch=2,
                               title="ResNet bottleneck 1-1-1-1 64px")}
    return {"vit": dict(image=96, patch=8, bands=VIT_BANDS, width=768, depth=12, heads=12, mlp=3072, batch=16,
                        title="ViT-B/8 96px 10b"),
            "resnet": dict(image=224, bands=RGB_BANDS, stage_sizes=(3, 4, 6, 3), width=64, batch=8,
                           title="ResNet-50 224px 3b")}


def model_flops(model: str, s: dict) -> float:
    """Analytic train FLOPs per image: 3 x the forward's matmul / conv multiply-adds x 2 (backward ~ 2x
    forward); norms, activations, pooling, softmax and the optimizer are not counted."""
    if model == "vit":
        from eojax.models import layers
        n = (s["image"] // s["patch"]) ** 2
        fwd = 2.0 * n * s["patch"] ** 2 * len(s["bands"]) * s["width"]  # patch embedding
        fwd += layers.transformer_flops(n + 1, s["width"], s["depth"], s["mlp"])  # blocks on cls + patches
        fwd += 2.0 * s["width"] * NUM_CLASSES
        return 3.0 * fwd

    def out(size, k, stride):  # torch's padding k // 2
        return (size + 2 * (k // 2) - k) // stride + 1

    width, cin = s["width"], len(s["bands"])
    size = out(s["image"], 7, 2)
    macs = size * size * 49 * cin * width  # stem
    size = out(size, 3, 2)  # max-pool
    cin = width
    for i, n in enumerate(s["stage_sizes"]):
        planes = width * 2 ** i
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            small = out(size, 3, stride)
            macs += size * size * cin * planes  # 1x1 reduce
            macs += small * small * 9 * planes * planes  # 3x3 (strided, v1.5)
            macs += small * small * planes * 4 * planes  # 1x1 expand
            if stride != 1 or cin != 4 * planes:
                macs += small * small * cin * 4 * planes  # projection shortcut
            cin, size = 4 * planes, small
    macs += cin * NUM_CLASSES
    return 3.0 * 2.0 * macs


# -- eojax side (child) ---------------------------------------------------------------------------------
def _spec(s: dict):
    """fMoW-Sentinel's DataSpec for these bands and size (what ClassifyInput builds for source 'fmow')."""
    import numpy as np

    from eojax.data import fmow
    from eojax.tasks.base import DataSpec, elements, stats_info

    size, bands = s["image"], tuple(s["bands"])
    arrays = elements(pixels=((len(bands), size, size), np.float32), valid=((size, size), bool),
                      weight=((), np.float32), label=((), np.int32))
    return DataSpec(arrays, {"band_names": list(bands), "sensor": "sentinel2a",
                             "class_names": list(fmow.FMOW_CATEGORIES), "multi_label": False,
                             "normalize": "satmae", **stats_info(fmow.satmae_stats(bands))})


def eojax_config(model: str, s: dict):
    if model == "vit":
        config = load_config("classify", "encoder=mae,mode=finetune")
        config.model.encoder_variant = "base"
        config.model.encoder_args = dict(width=s["width"], depth=s["depth"], heads=s["heads"], mlp_dim=s["mlp"],
                                         patch_size=s["patch"], drop_path_rate=DROP_PATH)
    else:
        config = load_config("classify", "encoder=resnet,mode=finetune")
        config.model.encoder_variant = "50"
        config.model.encoder_args = dict(stage_sizes=tuple(s["stage_sizes"]), width=s["width"])
    config.input.size = s["image"]
    config.batch_size = s["batch"]
    config.total_steps, config.optim.warmup_steps = 10_000, 100  # the schedule's shape costs nothing
    config.optim.accum_steps = 1
    config.mesh = (("data", 1), ("fsdp", 1), ("model", 1))
    config.progress_bar = False
    config.augment.update(flips=False, random_erase=0.0, mix_prob=1.0, **MIX)
    # What the bench relies on from configs/classify.py's fine-tune recipe.
    assert config.model.mode == "finetune" and config.model.pool == "avg" and config.optim.name == "adamw"
    assert config.optim.weight_decay == WEIGHT_DECAY and config.optim.clip_norm == 0.0
    assert config.optim.layer_decay == (LAYER_DECAY if model == "vit" else 1.0), config.optim.layer_decay
    return config


def eojax_side(args, s):
    """(step(i): one train step blocked on its result, finish(): the result fields)."""
    import jax
    import numpy as np

    from eojax import train

    config = eojax_config(args.model, s)
    run = train.setup(config, devices=jax.devices()[:1], spec=_spec(s))
    enc = run.task.model.encoder
    if args.model == "vit":
        got = (enc.width, enc.depth, enc.heads, enc.mlp_dim, enc.patch_size, enc.in_channels, enc.image_size)
        assert got == (s["width"], s["depth"], s["heads"], s["mlp"], s["patch"], len(s["bands"]), s["image"]), got
    else:
        assert (tuple(enc.stage_sizes), enc.width, enc.block) == (tuple(s["stage_sizes"]), s["width"], "bottleneck")
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract_state.params))
    rng = np.random.default_rng(0)

    def fake(abstract):
        """Random batches of the DataSpec's shapes on the device (the step's cost does not depend on them)."""
        out = {}
        for k, a in abstract.items():
            if k == "pixels":
                v = rng.uniform(0, 4000, a.shape).astype(a.dtype)  # raw reflectance DNs (SatMAE's normalisation)
            elif k == "label":
                v = rng.integers(0, NUM_CLASSES, a.shape).astype(a.dtype)
            else:  # valid, weight
                v = np.ones(a.shape, a.dtype)
            out[k] = jax.device_put(v, a.sharding)
        return out

    pool = [fake(run.abstract_batch()) for _ in range(2)]
    box = {"state": run.init_state()}
    jax.block_until_ready((box["state"], pool))

    def step(i):
        box["state"], box["metrics"] = run.train_step(box["state"], pool[i % len(pool)])
        jax.block_until_ready((box["state"], box["metrics"]))

    def finish():
        return {"xla_flops_per_step": float(run.flops_per_step), "params": params,
                "last_loss": float(box["metrics"]["loss"]), "jax": jax.__version__}

    return step, finish


# -- PyTorch reference side (child) ---------------------------------------------------------------------
def import_references(site: str | None, need_torchvision: bool):
    """timm (and torchvision) from sys.path or `site`, torchvision's fake-kernel registrations stubbed."""
    import types
    if site:
        sys.path.insert(0, site)
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import timm
    torchvision = None
    if need_torchvision:
        import torchvision
    return timm, torchvision


def torch_side(args, s):
    import torch

    timm, torchvision = import_references(args.site, args.model == "resnet")
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    if args.model == "vit":
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(img_size=s["image"], patch_size=s["patch"], in_chans=len(s["bands"]),
                                  embed_dim=s["width"], depth=s["depth"], num_heads=s["heads"],
                                  mlp_ratio=s["mlp"] / s["width"], drop_path_rate=DROP_PATH, global_pool="avg",
                                  num_classes=NUM_CLASSES)
        layer_decay = LAYER_DECAY
        version = f"timm {timm.__version__}"
    else:
        from torchvision.models.resnet import Bottleneck, ResNet
        model = ResNet(Bottleneck, list(s["stage_sizes"]), num_classes=NUM_CLASSES)  # = resnet50() at 3-4-6-3
        assert s["width"] == 64 and len(s["bands"]) == 3, "torchvision's ResNet is 64 wide on 3 bands"
        layer_decay = None
        version = f"torchvision {torchvision.__version__}"
    model.train()
    # The reference recipes' optimizer (MAE / SatMAE++ main_finetune: AdamW, no decay on biases and norms,
    # layer-wise lr decay for the ViT); lr matches configs/classify.py's blr scaling.
    opt = create_optimizer_v2(model, "adamw", lr=2e-4 * s["batch"] / 256, weight_decay=WEIGHT_DECAY,
                              layer_decay=layer_decay)
    mixup = Mixup(mixup_alpha=MIX["mixup"], cutmix_alpha=MIX["cutmix"], prob=1.0, switch_prob=MIX["switch_prob"],
                  mode="batch", label_smoothing=MIX["label_smoothing"], num_classes=NUM_CLASSES)
    criterion = SoftTargetCrossEntropy()
    shape = (s["batch"], len(s["bands"]), s["image"], s["image"])
    pool = [(torch.randn(shape), torch.randint(0, NUM_CLASSES, (s["batch"],))) for _ in range(2)]
    params = sum(p.numel() for p in model.parameters())
    box = {}

    def step(i):
        x, y = pool[i % len(pool)]
        x, target = mixup(x.clone(), y)  # in-step, as eojax's (timm mixes the loader's fresh batch in place)
        loss = criterion(model(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        box["loss"] = loss

    def finish():
        return {"last_loss": float(box["loss"]), "torch": torch.__version__, "reference": version,
                "params": params, "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}

    return step, finish


def serve(args) -> None:
    """A child: set up, warm up, print READY; then for each 'run N' line on stdin run N timed steps and
    print their times; on 'finish' print the result and exit."""
    s = shapes(args)[args.model]
    step, finish = eojax_side(args, s) if args.child == "eojax" else torch_side(args, s)
    for i in range(args.warmup):
        step(i)
    print(READY, flush=True)
    i = 0
    for line in sys.stdin:
        if not line.startswith("run "):
            break
        times = []
        for _ in range(int(line.split()[1])):
            t = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t)
            i += 1
        print(MARK + json.dumps(times), flush=True)
    from eojax import hostmem
    print(MARK + json.dumps({"framework": args.child, "malloc": hostmem.status or "glibc defaults", **finish()}),
          flush=True)


# -- parent ---------------------------------------------------------------------------------------------
class Child:
    """One framework's serving child process for one model, fed commands on stdin; its log goes to a temp file."""

    def __init__(self, framework: str, model: str, args):
        self.framework, self.log = framework, tempfile.TemporaryFile("w+")
        env = single_device_env(args.xla_flags if framework == "eojax" else "")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--model", model,
               "--warmup", str(args.warmup)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--vit-batch", str(args.vit_batch)] if args.vit_batch else []
        cmd += ["--resnet-batch", str(args.resnet_batch)] if args.resnet_batch else []
        cmd += ["--site", args.site] if args.site else []
        # torch keeps OpenMP's default wait policy (as shipped; see bench/README.md, session 7).
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     bufsize=1, cwd=REPO, env=env)
        self.error = None if self._read() == READY else self._failure()

    def _read(self):
        return read_reply(self.proc.stdout)

    def _failure(self) -> str:
        self.proc.wait()
        self.log.seek(0)
        tail = [l for l in self.log.read().strip().splitlines() if l.strip()][-12:]
        last = tail[-1].strip() if tail else ""
        hint = " (timm / torchvision: --site DIR)" if "No module named" in last and self.framework != "eojax" else ""
        return (f"{self.framework} run failed (rc {self.proc.returncode}): {last}{hint}\n    "
                + "\n    ".join(tail))

    def _send(self, text: str):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def run(self, steps: int) -> list[float]:
        self._send(f"run {steps}")
        times = self._read()
        if times is None:
            raise RuntimeError(self._failure())
        return times

    def finish(self) -> dict:
        self._send("finish")
        result = self._read()
        self.proc.wait()
        if result is None:
            raise RuntimeError(self._failure())
        return result


def _torch_importable() -> bool:
    return subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode == 0


def measure(model: str, frameworks: tuple, args) -> tuple[dict, list]:
    """All of one model's children, alive together and taking turns. Returns (results, cycles)."""
    s = shapes(args)[model]
    results, children = {}, {}
    for fw in frameworks:
        if fw != "eojax" and not args.torch_ok:
            results[fw] = "torch not importable (pip install torch, and timm / torchvision via --site, to compare)"
            continue
        print(f"{model}: starting {fw} (batch {s['batch']}, {args.warmup} warm-up steps) ...", flush=True)
        child = Child(fw, model, args)
        if child.error:
            results[fw] = child.error
        else:
            children[fw] = child
    live, times, cycles = list(children), {fw: [] for fw in children}, []
    for c in range(args.cycles if live else 0):
        order = live[c % len(live):] + live[:c % len(live)]  # rotated: nobody always goes first
        cycle = {}
        for fw in order:
            t = children[fw].run(args.steps)
            times[fw] += t
            cycle[fw] = statistics.median(t)
        cycles.append(cycle)
        print(f"  cycle {c + 1}: " + ", ".join(f"{fw} {cycle[fw] * 1e3:.0f} ms" for fw in live), flush=True)
    for fw in live:
        results[fw] = {**children[fw].finish(), "step": summary(times[fw], s["batch"])}
    return results, cycles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("both", "vit", "resnet"), default="both")
    ap.add_argument("--framework", choices=("both", "eojax", "torch"), default="both")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per framework per cycle")
    ap.add_argument("--cycles", type=int, default=4, help="cycles: every framework runs --steps steps in turn")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile, allocator warm-up)")
    ap.add_argument("--vit-batch", type=int, help="ViT batch (default 16; --quick 4)")
    ap.add_argument("--resnet-batch", type=int, help="ResNet batch (default 8; --quick 2)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes, 1 cycle of 1 step after 1 warm-up (unless given): checks the bench runs")
    ap.add_argument("--torch-malloc", action="store_true",
                    help="also run torch with eojax.hostmem's malloc settings (a third child)")
    ap.add_argument("--site", default=os.environ.get("EOJAX_BENCH_TORCH_SITE", ""),
                    help="a `pip install --target` folder holding timm / torchvision (env EOJAX_BENCH_TORCH_SITE)")
    ap.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the eojax child")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", choices=("eojax", "torch", "torch+malloc"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick and "--cycles" not in sys.argv:
        args.cycles = 1
    if args.quick and "--steps" not in sys.argv:
        args.steps = 1
    if args.quick and "--warmup" not in sys.argv:
        args.warmup = 1

    if args.child:
        from eojax import hostmem
        if args.child in ("eojax", "torch+malloc"):
            print(hostmem.tune_malloc(), file=sys.stderr, flush=True)
        serve(args)
        return
    if min(args.steps, args.warmup, args.cycles) < 1:
        ap.error("--steps, --cycles and --warmup must be >= 1 (the first step compiles)")

    from eojax import metric_writer
    peak = metric_writer.measured_matmul_flops(repeats=30)  # in this idle process, before any child runs
    print(f"peak: measured best f32 1024^3 matmul rate of this CPU = {peak / 1e9:.1f} GFLOP/s ({os.cpu_count()} cores)")

    frameworks = {"both": ("eojax", "torch"), "torch": ("torch",), "eojax": ("eojax",)}[args.framework]
    if args.torch_malloc and "torch" in frameworks:
        frameworks += ("torch+malloc",)
    args.torch_ok = "torch" not in frameworks or _torch_importable()
    models = ("vit", "resnet") if args.model == "both" else (args.model,)
    all_results = {}
    for model in models:
        results, cycles = measure(model, frameworks, args)
        all_results[model] = {"results": results, "cycles": cycles}
    peak = max(peak, metric_writer.measured_matmul_flops(repeats=30))
    print(f"peak (best of before / after): {peak / 1e9:.1f} GFLOP/s\n")

    rows, notes, out = [], [], {"peak_flops": peak, "quick": args.quick, "models": {}}
    for model in models:
        s, res, cycles = shapes(args)[model], all_results[model]["results"], all_results[model]["cycles"]
        flops = model_flops(model, s) * s["batch"]
        ej = res.get("eojax")
        ratios = {}
        for fw in frameworks[1:] if frameworks[0] == "eojax" else ():
            if isinstance(ej, dict) and isinstance(res.get(fw), dict):
                per = sorted(c[fw] / c["eojax"] for c in cycles)
                ratios[fw] = {"median": statistics.median(per), "min": per[0], "max": per[-1],
                              "eojax_faster_cycles": sum(r >= 1 for r in per), "cycles": len(per),
                              "from_medians": res[fw]["step"]["step_s"] / ej["step"]["step_s"],
                              "from_best": res[fw]["step"]["min_step_s"] / ej["step"]["min_step_s"]}
        for fw in frameworks:
            r = res.get(fw)
            name = "eojax" if fw == "eojax" else fw
            if isinstance(r, dict):
                st = r["step"]
                ratio = "1.00 (ref)" if fw == "torch" and "torch" in ratios else "-"
                if fw == "eojax" and "torch" in ratios:
                    ratio = f"{ratios['torch']['median']:.2f}x"
                if fw == "eojax":
                    name = f"eojax (jax {r['jax']})"
                else:
                    name = f"{fw} {r['torch']} ({r['reference']})"
                rows.append((s["title"], name, s["batch"], f"{st['images_per_s']:.2f}", f"{st['step_s'] * 1e3:,.0f}",
                             f"{st['min_step_s'] * 1e3:,.0f}", f"{100 * flops / st['step_s'] / peak:.1f}%", ratio))
            elif r is not None:
                rows.append((s["title"], fw, s["batch"], "-", "-", "-", "-", r.splitlines()[0]))
        notes.append(f"{s['title']}: analytic {flops / s['batch'] / 1e9:.2f} GFLOP per image (3 x forward), "
                     f"{flops / 1e9:.1f} GFLOP per step of {s['batch']}"
                     + (f"; XLA's count of eojax's compiled step {ej['xla_flops_per_step'] / 1e9:.1f} GFLOP "
                        f"(MFU by it {100 * ej['xla_flops_per_step'] / ej['step']['step_s'] / peak:.1f}%)"
                        if isinstance(ej, dict) else ""))
        params = {fw: r["params"] for fw, r in res.items() if isinstance(r, dict)}
        if params:
            notes.append("  parameters: " + ", ".join(f"{fw} {n / 1e6:.2f}M" for fw, n in params.items()))
        for fw, q in ratios.items():
            notes.append(f"  eojax / {fw} (speed, per cycle): {q['median']:.2f}x median over {q['cycles']} cycles "
                         f"(range {q['min']:.2f}-{q['max']:.2f}, eojax faster in {q['eojax_faster_cycles']}); "
                         f"{q['from_medians']:.2f}x from the overall medians, "
                         f"{q['from_best']:.2f}x from the best steps")
        for fw, r in res.items():
            if isinstance(r, str) and "\n" in r:
                notes.append(f"\n{r}")
        out["models"][model] = {"shape": dict(s), "flops_per_step": flops, "cycles": cycles,
                                "ratios": ratios, **res}

    print_table(("model", "framework", "batch", "images/s", "ms/step", "best ms", "MFU", "eojax/torch"), rows)
    print(f"\nms/step = median of {args.cycles} cycles x {args.steps} timed steps per framework, each blocked on "
          f"its result; best ms = fastest step; MFU = analytic model FLOPs / median / peak "
          f"{peak / 1e9:.1f} GFLOP/s; eojax/torch = median of the per-cycle speed ratios (torch ms / eojax ms).")
    for n in notes:
        print(n)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
