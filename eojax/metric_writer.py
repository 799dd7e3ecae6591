"""Where training metrics and pictures go: the console, TensorBoard event files (tensorboardX), a
JSON-lines file, and a Weights & Biases run when config.wandb.project is set (wandb is imported only
then: it is never a dependency); and the console itself: the progress bar and the log handler that
prints above it.

Only process 0 writes; the JSON-lines file is what tests and notebooks read back.

Not clu's metric_writers: its TensorBoard writers need TensorFlow (tf.summary) or PyTorch
(torch.utils.tensorboard), neither an eojax dependency, and metrics.jsonl and the progress bar would
stay here anyway; the method names follow clu's (write_images(step, {name: image})).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid

import jax
import numpy as np
from tqdm import tqdm

# Dense bf16/f32 matmul peaks per chip, for MFU. Keys are substrings of jax's device_kind.
_KNOWN_PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "V100": 125.0,
    "TPU v6": 918.0, "TPU v5p": 459.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0,
}


def peak_flops_per_device(configured_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one device: the config's value, a known chip's, or a measured CPU matmul rate."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in _KNOWN_PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return measured_matmul_flops()


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best f32 matmul rate of the host CPU (all simulated devices share the same cores)."""
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), jax.devices()[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


class MetricWriter:
    """Scalars (`write`) and pictures (`write_images`) of a run in `workdir`. `wandb`: the config's
    wandb block (project, entity, name, mode); an empty project = no W&B. `config`: the run's config,
    recorded in the W&B run."""

    def __init__(self, workdir: str, enabled: bool = True, wandb=None, config=None):
        self.enabled = enabled and jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        self._wandb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional: metrics still reach the console and metrics.jsonl
                logging.warning("tensorboardX is not installed; no TensorBoard event files")
            if wandb is not None and wandb.get("project"):
                self._wandb = _start_wandb(wandb, workdir, config)

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items()}
        shown = "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        logging.info("[%s] step %d  %s", prefix, step, shown)
        self._jsonl.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=step)

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """(H, W, 3) uint8 pictures as 'pictures/<name>' at `step`: TensorBoard images, W&B Images."""
        if not self.enabled or not images:
            return
        logging.info("[pictures] step %d  %s", step, "  ".join(images))
        if self._tb is not None:
            for name, image in images.items():
                self._tb.add_image(f"pictures/{name}", np.asarray(image, np.uint8), step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            import wandb
            self._wandb.log({f"pictures/{name}": wandb.Image(np.asarray(image, np.uint8), caption=name)
                             for name, image in images.items()}, step=step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


WANDB_ID_FILE = "wandb_run_id"


def _start_wandb(options, workdir: str, config):
    """A W&B run for the workdir: the same W&B run again when the workdir's run resumes (its id is kept
    in <workdir>/wandb_run_id). W&B ignores a step lower than one it has already logged, so after a
    resume from an earlier checkpoint, the repeated steps reach TensorBoard and metrics.jsonl only."""
    import wandb  # here only: config_lib.validate has checked that it is installed

    id_path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path) as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_path + ".partial", "w") as f:
            f.write(run_id)
        os.replace(id_path + ".partial", id_path)
    recorded = json.loads(config.to_json_best_effort()) if config is not None else None
    return wandb.init(project=options.get("project"), entity=options.get("entity") or None,
                      name=options.get("name") or os.path.basename(os.path.abspath(workdir)),
                      mode=options.get("mode") or "online", dir=workdir, id=run_id, resume="allow",
                      config=recorded)


class Progress:
    """The training progress bar (tqdm on stderr), or nothing when not `enabled`. Its clock starts
    when the first step has finished: that step includes compilation (minutes for a big model), which
    would otherwise dominate the rate and the ETA for the rest of the run. Until then it says
    'compiling'. Log records print above it through LogHandler."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, **tqdm_options):
        self._bar = None
        self._timing = False
        if enabled:
            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, postfix="compiling",
                             **tqdm_options)

    def update(self, n: int = 1) -> None:
        if self._bar is None:
            return
        if self._timing:
            self._bar.update(n)
            return
        # The first step: count it, then restart the clock there. The bar has taken no rate samples
        # yet (tqdm takes them in update()), so only its start and last-print marks move.
        self._timing = True
        bar = self._bar
        bar.n = bar.last_print_n = bar.initial = bar.n + n
        bar.start_t = bar.last_print_t = time.time()
        bar.set_postfix_str("")

    def set_postfix(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    @property
    def format_dict(self) -> dict:
        """tqdm's numbers (n, elapsed, rate, ...): what the bar shows."""
        return self._bar.format_dict if self._bar is not None else {}


class LogHandler(logging.Handler):
    """Log records on stderr, printed above a progress bar (tqdm.write clears and redraws it) rather
    than through it; without a bar, plain lines."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's contract: a failing handler reports and never raises
            self.handleError(record)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("split") == split]
