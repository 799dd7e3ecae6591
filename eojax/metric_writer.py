"""Where training metrics go: the console, TensorBoard event files and a JSON-lines file; and the
console itself: the progress bar and the log handler that prints above it.

Only process 0 writes; the JSON-lines file is what tests and notebooks read back.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

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
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self._tb = None
        self._jsonl = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional: metrics still reach the console and metrics.jsonl
                logging.warning("tensorboardX is not installed; no TensorBoard event files")

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

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
