"""Low-rank adapters (LoRA, Hu et al. 2021, with Hugging Face PEFT's semantics) as a parameter transform.

Any family gets them without touching its model: `config.lora.targets` is a regex matched with re.search
on the '/'-joined parameter paths (the names of `optim.param_paths`, e.g. 'h_0/attn/c_attn/kernel'), and
every matched parameter named 'kernel' gets an adapter (a matched bias or norm scale is ignored, so
'c_attn' means the layer, as PEFT's target_modules). For a kernel W viewed as a (d_in, d_out) matrix:

    W' = W + A @ B * alpha / rank,   A (d_in, rank) ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B (rank, d_out) = 0

A is PEFT's kaiming_uniform(a=sqrt(5)) of its (rank, d_in) weight, B starts at zero so the adapted model
starts as the base model. Kernels with more than 2 axes are matrices over (input axes, output axes); the
output axes are those of the layer's bias (its sibling 'bias', which a layer adds to its output): GPT-2's
fused c_attn (embed, 3, heads, kv) with bias (3, heads, kv) is the (embed, 3*heads*kv) matrix of Hugging
Face's Conv1D, an attention output (heads, kv, embed) with bias (embed,) is (heads*kv, embed), a conv
kernel (kh, kw, cin, cout) is (kh*kw*cin, cout) as PEFT's Conv2d LoRA. A kernel of more than 2 axes
without such a bias (use_bias=False; a scanned layer stack (L, d_in, d_out), whose bias (L, d_out) has the
layers axis first, unless L == d_in) is refused by name: which axes it contracts is not in the parameters.

Adapters are a tree like the params holding only the adapted kernels, each {'a': A, 'b': B}; their paths
are '<kernel path>/a' and '/b'. The trainer (eojax/train.py) keeps them in TrainState.lora with the
scale alpha / rank (so a checkpoint says how to merge itself), trains only them (the optimizer is built
over the adapter tree: no moments for the frozen base, whose params pass through the step unchanged), and
evaluates, exports and serves the merged params (`merge`; `checkpoint.load_variables` merges a LoRA run's
checkpoint for every reader).

Dropout on the adapter input (PEFT's lora_dropout) cannot be a parameter transform: its mask is per
input element (token and feature). With lora.dropout > 0 the training forward runs the base params and
adds the adapter's term on each adapted layer's dropped-out input through a flax method interceptor
(`apply_on_inputs`), which knows the layers that compute input @ kernel (+ bias): nn.Dense and eojax's
layers.HeadDense; any other layer is refused by name. With dropout 0 (the default) the step uses the
merged kernel, which works for any layer; both give the same function and gradients without dropout
(tests/test_lora.py). The merged form differentiates through the whole kernel (the backward of full
fine-tuning for the adapted kernels: LoRA's saving there is the optimizer state), the interceptor only
through A and B. Eval and inference never drop.
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from eojax import config_lib, errors
from eojax.models import layers
from eojax.optim import param_paths

KEYS = tuple(config_lib.lora_defaults().keys())


@dataclasses.dataclass(frozen=True)
class Settings:
    """config.lora, checked (`settings`)."""
    targets: str
    rank: int
    alpha: float
    dropout: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def settings(config: ml_collections.ConfigDict) -> Settings | None:
    """config.lora checked (ConfigError naming the key), or None when it is off or absent."""
    c = config.get("lora")
    if c is None:
        return None
    unknown = sorted(set(c.keys()) - set(KEYS))
    if unknown:
        raise errors.ConfigError(f"unknown key config.lora.{unknown[0]}; allowed: {list(KEYS)}")
    c = {**config_lib.lora_defaults().to_dict(), **dict(c.items())}

    def need(ok: bool, key: str, allowed: str):
        if not ok:
            raise errors.ConfigError(f"config.lora.{key}={c[key]!r} is invalid: {allowed}")

    need(isinstance(c["targets"], str), "targets", "a regex string ('' = off)")
    try:
        re.compile(c["targets"])
    except re.error as e:
        raise errors.ConfigError(f"config.lora.targets={c['targets']!r} is not a valid regex: {e}") from None
    need(isinstance(c["rank"], int) and not isinstance(c["rank"], bool) and c["rank"] >= 1, "rank", "an int >= 1")
    need(isinstance(c["alpha"], (int, float)) and c["alpha"] > 0, "alpha", "a number > 0")
    need(isinstance(c["dropout"], (int, float)) and 0 <= c["dropout"] < 1, "dropout", "a number in [0, 1)")
    if not c["targets"]:
        return None
    return Settings(c["targets"], int(c["rank"]), float(c["alpha"]), float(c["dropout"]))


# ---------------------------------------------------------------- adapters

def _flat(tree) -> dict[str, Any]:
    return dict(zip(jax.tree.leaves(param_paths(tree)), jax.tree.leaves(tree)))


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def matrix_shape(path: str, shape: tuple, bias_shape: tuple | None) -> tuple[int, int]:
    """(d_in, d_out) of the kernel at `path` (see the module docstring); ConfigError naming it if unknown."""
    shape = tuple(shape)
    if len(shape) == 2:
        return shape
    n_out = len(bias_shape) if bias_shape is not None else 0
    if len(shape) < 2 or not (0 < n_out < len(shape) and shape[-n_out:] == tuple(bias_shape)):
        raise errors.ConfigError(
            f"lora: cannot adapt {path} {shape}: a kernel of more than 2 axes needs a sibling bias whose shape "
            f"is its trailing (output) axes to tell them from its input axes (got bias "
            f"{None if bias_shape is None else tuple(bias_shape)}); leave it out of config.lora.targets")
    return math.prod(shape[:-n_out]), math.prod(shape[-n_out:])


def targeted(params, targets: str) -> dict[str, tuple[int, int]]:
    """{kernel path: (d_in, d_out)} of the kernels `targets` matches; ConfigError naming the pattern if none."""
    shapes = {p: tuple(x.shape) for p, x in _flat(params).items()}
    kernels = [p for p in shapes if p.rsplit("/", 1)[-1] == "kernel"]
    pattern = re.compile(targets)
    chosen = [p for p in kernels if pattern.search(p)]
    if not chosen:
        raise errors.ConfigError(f"config.lora.targets={targets!r} matches no kernel; kernels look like "
                                 f"{kernels[:5]}")
    return {p: matrix_shape(p, shapes[p], shapes.get(p[: -len("kernel")] + "bias")) for p in chosen}


def init(params, rng, targets: str, rank: int) -> dict:
    """Adapters for the kernels of `params` that `targets` matches: {..., 'kernel': {'a', 'b'}} nested as
    the params, float32, B = 0 (so merge(params, init(...)) == params)."""
    out = {}
    for i, (path, (d_in, d_out)) in enumerate(targeted(params, targets).items()):
        bound = 1.0 / math.sqrt(d_in)
        out[path] = {"a": jax.random.uniform(jax.random.fold_in(rng, i), (d_in, rank), jnp.float32, -bound, bound),
                     "b": jnp.zeros((rank, d_out), jnp.float32)}
    return _nest(out)


def new_state(params, rng, s: Settings) -> dict:
    """TrainState.lora of a fresh run: the adapters and the scale they are merged with."""
    return {"adapters": init(params, rng, s.targets, s.rank), "scale": jnp.asarray(s.scale, jnp.float32)}


def by_kernel(adapters) -> dict[str, dict]:
    """{kernel path: {'a': A, 'b': B}}."""
    out: dict = {}
    for path, x in _flat(adapters).items():
        kernel, part = path.rsplit("/", 1)
        out.setdefault(kernel, {})[part] = x
    return out


def count(adapters) -> int:
    """Trainable numbers: rank * (d_in + d_out) per adapted kernel."""
    return sum(x.size for x in jax.tree.leaves(adapters))


def merge(params, adapters, scale) -> Any:
    """params with every adapted kernel W replaced by W + A @ B * scale, the product laid out as W
    (row-major: input axes first), summed in float32 and cast to W's dtype."""
    ad = by_kernel(adapters)

    def one(path, w):
        if path not in ad:
            return w
        # Full precision: the merged model must be the adapted one (TPU / GPU default to bf16 / TF32 passes).
        ab = jnp.matmul(ad[path]["a"].astype(jnp.float32), ad[path]["b"].astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
        return (w.astype(jnp.float32) + (ab * scale).reshape(w.shape)).astype(w.dtype)

    return jax.tree.map(one, param_paths(params), params)


# ---------------------------------------------------------------- the training forward

def apply(fn: Callable[[Any], Any], params, adapters, scale, dropout: float, rng) -> Any:
    """fn(params) with the adapters in force: merged into the kernels, or with dropout > 0 on each adapted
    layer's dropped-out input (`apply_on_inputs`)."""
    if dropout == 0:
        return fn(merge(params, adapters, scale))
    return apply_on_inputs(fn, params, adapters, scale, dropout, rng)


# Layers whose __call__(x) is x @ kernel (+ bias), contracting x's trailing axes with the kernel's first
# (eojax's layers.Dense is an nn.Dense).
LINEAR_LAYERS = (nn.Dense, layers.HeadDense)


def apply_on_inputs(fn: Callable[[Any], Any], params, adapters, scale, dropout: float, rng) -> Any:
    """fn(params) where each adapted layer's output gets + dropout(x) @ A @ B * scale (PEFT's forward), x
    the layer's input: a flax method interceptor on the layers whose kernel is adapted. Every adapter
    must be reached by a call (a task applying a sub-model on a sub-tree of the params would not match
    the paths: that is an error, not a silent no-op)."""
    ad = by_kernel(adapters)
    shapes = {p: tuple(x.shape) for p, x in _flat(params).items() if p in ad}
    rng = jax.random.fold_in(rng, 0x4C6F5241)  # a stream of its own, apart from the model's dropout
    calls = {p: 0 for p in ad}  # a layer called twice (shared weights) draws a fresh mask each time

    def intercept(next_fun, args, kwargs, context):
        path = "/".join((*context.module.path, "kernel"))
        if context.method_name != "__call__" or path not in ad:
            return next_fun(*args, **kwargs)
        module = context.module
        if not isinstance(module, LINEAR_LAYERS) or getattr(module, "weights_only", False):
            raise errors.ConfigError(
                f"config.lora.dropout={dropout} drops the adapter input, which eojax does for nn.Dense and "
                f"layers.HeadDense layers; {path} belongs to a {type(module).__name__}: set "
                f"config.lora.dropout=0 (the adapter is then merged into the kernel, which works for any layer)")
        y = next_fun(*args, **kwargs)
        x, shape, a = args[0], shapes[path], ad[path]["a"]
        n_in = next((k for k in range(1, len(shape)) if math.prod(shape[:k]) == a.shape[0]
                     and tuple(x.shape[x.ndim - k:]) == shape[:k]), None)
        if n_in is None or tuple(y.shape[y.ndim - (len(shape) - n_in):]) != shape[n_in:]:
            raise errors.ConfigError(f"lora: {path} {shape} is called on {x.shape} -> {y.shape}, not as "
                                     f"input @ kernel; set config.lora.dropout=0")
        h = x.reshape(*x.shape[: x.ndim - n_in], a.shape[0]).astype(jnp.float32)
        key = jax.random.fold_in(jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF), calls[path])
        calls[path] += 1
        keep = jax.random.bernoulli(key, 1.0 - dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout), 0.0)
        out = (h @ a.astype(jnp.float32)) @ ad[path]["b"].astype(jnp.float32) * scale
        return y + out.reshape(y.shape).astype(y.dtype)

    with nn.intercept_methods(intercept):
        result = fn(params)
    missing = sorted(p for p, n in calls.items() if n == 0)
    if missing:
        raise errors.ConfigError(
            f"config.lora.dropout={dropout}: no layer call reached the adapters of {missing} (the task applies "
            f"its model to a sub-tree of the params?); set config.lora.dropout=0")
    return result
