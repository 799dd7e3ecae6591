"""Where training metrics go: the console, TensorBoard event files and a JSON-lines file.

Only process 0 writes; the JSON-lines file is what tests and notebooks read back.
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

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


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


def read_metrics(workdir: str, split: str = "train") -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("split") == split]
