"""Transformer building blocks shared by the ViT / MAE families.

Every parameter is created through `nn.with_logical_partitioning` with the shared logical names
(embed, mlp, heads, kv, ...), and activations are constrained at block boundaries, so the same
modules shard under any rule set a config supplies (the constraints are no-ops without rules).

Kernels: `layer_norm`, `linear` (hence Dense, HeadDense and Attention's q/k/v product), `softmax`,
`dot_product_attention` and mae.permute_tokens have custom backward passes that were measured
faster on XLA:CPU only. Which computation they trace is chosen by `kernels(mode)` (one of KERNELS):
'xla_cpu' the custom VJPs, 'plain' standard jax/flax autodiff of the same math, 'auto' the first on
CPU and the second elsewhere (nobody has measured the custom ones on GPU/TPU). The switch only
changes computations, never parameters, so checkpoints and importers work under every mode.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

# Logical name given to the stacked leading axis when the encoder is scanned. It is never sharded
# unless a config maps it (flax leaves names absent from the rules unsharded).
LAYERS_AXIS = "layers"

# Activations at block boundaries.
BLE = ("batch", "length", "embed")


def partitioned(init, names):
    return nn.with_logical_partitioning(init, names)


CHANNEL_NORMS = ("batch", "layer")


def channel_norm(kind: str, name: str, train: bool, param_dtype, what: str = "model.norm"):
    """A norm over the channels (last axis) of conv maps, to call inside a compact module: x -> float32.
    'batch': torch's BatchNorm2d (momentum 0.1, eps 1e-5; running statistics in 'batch_stats', batch
    statistics in training); 'layer': a per-pixel LayerNorm (eps 1e-6). Scale and bias on 'channels'."""
    affine = dict(param_dtype=param_dtype, name=name, scale_init=partitioned(nn.initializers.ones, ("channels",)),
                  bias_init=partitioned(nn.initializers.zeros, ("channels",)))
    if kind == "batch":
        norm = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=jnp.float32, **affine)
    elif kind == "layer":
        norm = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32, **affine)
    else:
        raise ValueError(f"{what}={kind!r} is not one of {CHANNEL_NORMS}")
    return lambda x: norm(x.astype(jnp.float32))


# --------------------------------------------------------------------------------------------------
# Fixed sin-cos position embeddings (numpy: they are constants, never trained).
# --------------------------------------------------------------------------------------------------
def sincos_1d(embed_dim: int, positions) -> np.ndarray:
    """(len, embed_dim) embedding: [sin(pos * omega), cos(pos * omega)], omega_i = 10000^(-i/(D/2))."""
    if embed_dim % 2:
        raise ValueError(f"sincos_1d needs an even embed_dim, got {embed_dim}")
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (np.arange(half, dtype=np.float64) / half)
    angles = np.asarray(positions, dtype=np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """(grid_h * grid_w, embed_dim) embedding for a row-major token grid (token t = row * grid_w + col).

    MAE convention (get_2d_sincos_pos_embed builds `meshgrid(grid_w, grid_h)` and encodes grid[0]
    first): the FIRST half of the channels encodes the column (x / width) coordinate, the second half
    the row (y / height) coordinate. Keeping it lets MAE checkpoints be imported unchanged.
    """
    if embed_dim % 4:
        raise ValueError(f"sincos_2d needs embed_dim divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb_col = sincos_1d(embed_dim // 2, cols.reshape(-1))
    emb_row = sincos_1d(embed_dim // 2, rows.reshape(-1))
    return np.concatenate([emb_col, emb_row], axis=1)


# --------------------------------------------------------------------------------------------------
# Kernel switch
# --------------------------------------------------------------------------------------------------
KERNELS = ("auto", "xla_cpu", "plain")

# The resolved mode ('xla_cpu' / 'plain') set by `kernels`; None: 'auto' on jax.default_backend().
# A jax user context rather than a plain contextvar: jit's caches key on it, so a function jitted
# under one mode is traced again under the other instead of silently keeping its first kernels.
_ACTIVE = jax.make_user_context(None)


def _resolve(mode: str, platform: str | None = None) -> str:
    if mode not in KERNELS:
        raise ValueError(f"config.kernels={mode!r} is not one of {KERNELS}")
    if mode != "auto":
        return mode
    return "xla_cpu" if (platform or jax.default_backend()) == "cpu" else "plain"


@contextlib.contextmanager
def kernels(mode: str, platform: str | None = None):
    """Makes `mode` (one of KERNELS; 'auto' resolved with `platform`, default jax.default_backend())
    the kernel set of everything traced inside the block, in this thread.

    The setting is read at trace time, not at run time: the trainer traces every step under the run's
    `config.kernels`. It is part of jit's cache key, so calling a jitted function under another mode
    traces and compiles it again."""
    with _ACTIVE(_resolve(mode, platform)):
        yield


def active_kernels() -> str:
    """'xla_cpu' or 'plain': the kernel set a trace made now uses (outside `kernels`: 'auto')."""
    return _ACTIVE.value or _resolve("auto")


def _tuned() -> bool:
    return active_kernels() == "xla_cpu"


# --------------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------------
def layer_norm(x, scale, bias, epsilon: float):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in x's dtype (callers pass
    float32). Statistics as flax's nn.LayerNorm (one pass: var = E[x^2] - E[x]^2, clipped at 0).
    Under kernels 'xla_cpu' a custom backward keeps only x's normalised form and 1/std and needs two
    row reductions where autodiff of the forward makes more passes: the MAE train step ran ~5% faster
    with it on XLA:CPU. Under 'plain' JAX differentiates the same forward."""
    if _tuned():
        return _layer_norm_vjp(x, scale, bias, epsilon)
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_vjp(x, scale, bias, epsilon):
    return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.maximum((x * x).mean(axis=-1, keepdims=True) - mean * mean, 0.0)
    rstd = jax.lax.rsqrt(var + epsilon)
    xhat = (x - mean) * rstd
    return xhat * scale + bias, (xhat, rstd, scale)


def _layer_norm_bwd(epsilon, res, g):
    xhat, rstd, scale = res
    rows = tuple(range(g.ndim - 1))
    gx = g * scale
    # d/dx of xhat: rstd * (gx - mean(gx) - xhat * mean(gx * xhat)), the means over the normalised axis.
    dx = rstd * (gx - gx.mean(axis=-1, keepdims=True) - xhat * (gx * xhat).mean(axis=-1, keepdims=True))
    return dx, (g * xhat).sum(axis=rows), g.sum(axis=rows)


_layer_norm_vjp.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """LayerNorm whose statistics and affine run in float32 (bf16 statistics are too coarse), then
    cast back to the compute dtype, through `layer_norm` (its lean backward under 'xla_cpu'). eps
    1e-6 as MAE / timm ViTs (torch's default 1e-5 for models that use a plain nn.LayerNorm, e.g.
    Prithvi, CROMA).
    Parameters live under 'ln' ('ln/scale', 'ln/bias'), the layout of flax's nn.LayerNorm."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale, bias = _NormAffine(self.param_dtype, name="ln")(x.shape[-1])
        y = layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
                       self.epsilon)
        return y.astype(self.dtype)


class _NormAffine(nn.Module):
    """The scale and bias of a norm over `features` channels (logical axis 'embed')."""

    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: int):
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (features,), self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (features,), self.param_dtype)
        return scale, bias


def linear(x, kernel, n_in: int = 1):
    """x (..., *K) times kernel (*K, *N), contracting x's last `n_in` axes with the kernel's first:
    jnp.tensordot(x, kernel, n_in), as one lax.dot_general (what nn.Dense runs). Under kernels
    'xla_cpu' its backward forms the kernel gradient as one 2-D product over the flattened leading
    axes, x (M, K) with dy (M, N) contracted on M, which XLA:CPU runs without the operand transposes
    and slow matmul path that autodiff of the 3-D tensordot got: 1.2-1.6x faster backward for most of
    the MAE's Dense shapes alone; in-process A/B of the MAE bench step: loss and gradients 1.13x
    faster, the whole train step 1.01-1.09x (three runs). Under 'plain' JAX differentiates it."""
    if _tuned():
        return _linear_vjp(x, kernel, n_in)
    return _linear_fwd(x, kernel, n_in)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear_vjp(x, kernel, n_in):
    return _linear_fwd(x, kernel, n_in)[0]


def _linear_fwd(x, kernel, n_in):
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, kernel, dims), (x, kernel)


def _linear_bwd(n_in, res, g):
    x, kernel = res
    n_out = kernel.ndim - n_in
    out_axes = lambda a: tuple(range(a.ndim - n_out, a.ndim))  # noqa: E731
    dx = jax.lax.dot_general(g, kernel, ((out_axes(g), out_axes(kernel)), ((), ())))
    rows = int(np.prod(x.shape[: x.ndim - n_in]))
    dk = jax.lax.dot_general(x.reshape(rows, -1), g.reshape(rows, -1), (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_linear_vjp.defvjp(_linear_fwd, _linear_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general for nn.Dense: its (x, kernel) product goes through `linear`."""
    plain = precision is None and preferred_element_type is None
    if plain and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())):
        return linear(lhs, rhs, 1)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


# flax's nn.Dense (same parameters, names and initialisers) through `linear` (its own backward
# under 'xla_cpu').
Dense = functools.partial(nn.Dense, dot_general=_dense_dot_general)


class Mlp(nn.Module):
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = x.shape[-1]
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        h = dense(
            self.mlp_dim,
            kernel_init=partitioned(nn.initializers.xavier_uniform(), ("embed", "mlp")),
            bias_init=partitioned(nn.initializers.zeros, ("mlp",)),
            name="fc1",
        )(x)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = nn.gelu(h, approximate=False)  # exact GELU, as PyTorch nn.GELU in MAE
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        y = dense(
            width,
            kernel_init=partitioned(nn.initializers.xavier_uniform(), ("mlp", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="fc2",
        )(h)
        return nn.Dropout(self.dropout)(y, deterministic=not train)


def softmax(logits):
    """Softmax over the last axis, float32 out, the gradient in the logits' dtype. Under kernels
    'xla_cpu' its backward keeps only the probabilities and runs p * (g - sum(g * p)): on XLA:CPU,
    autodiff of jax.nn.softmax made an MAE train step ~15% slower (more passes over the (B, H, T, S)
    attention tensors, more of them kept). Under 'plain' it is jax.nn.softmax in float32."""
    if _tuned():
        return _softmax_vjp(logits)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@jax.custom_vjp
def _softmax_vjp(logits):
    return _softmax_fwd(logits)[0]


def _softmax_fwd(logits):
    x = logits.astype(jnp.float32)
    e = jnp.exp(x - jax.lax.stop_gradient(x.max(axis=-1, keepdims=True)))
    p = e / e.sum(axis=-1, keepdims=True)
    return p, (p, jnp.zeros((0,), logits.dtype))  # the empty array carries the input's dtype


def _softmax_bwd(res, g):
    p, like = res
    return ((p * (g - (g * p).sum(axis=-1, keepdims=True))).astype(like.dtype),)


_softmax_vjp.defvjp(_softmax_fwd, _softmax_bwd)


def dot_product_attention(q, k, v, bias=None):
    """q (B, T, H, Dh), k / v (B, S, H, Dh) -> (B, T, H, Dh): softmax(q k^T / sqrt(Dh) + bias) v with
    logits and softmax in float32. Under kernels 'plain' it is jax.nn.dot_product_attention's XLA
    path; under 'xla_cpu' the same math with heads moved before length for the batched matmuls, the
    scale applied to q (T x Dh values rather than T x S), and `_attend`'s own backward."""
    if not _tuned():
        return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")
    q = q * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    return _attend(q, k, v, bias).transpose(0, 2, 1, 3)


def _swap(x):
    return jnp.swapaxes(x, -1, -2)


@jax.custom_vjp
def _attend(q, k, v, bias):
    """softmax(q k^T + bias) v on heads-first (B, H, T, Dh) arrays ('xla_cpu' kernels). The backward
    keeps only the probabilities (`softmax`'s lean form) and writes its two A^T B products as
    (B^T A)^T, so the large (T, S) operand is read in its stored order: autodiff's form of them was
    left by XLA:CPU to a slow batched-matmul path (~20 GFLOP/s on MAE's decoder shapes)."""
    return _attend_fwd(q, k, v, bias)[0]


def _attend_fwd(q, k, v, bias):
    logits = jnp.matmul(q, _swap(k), preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    p = _softmax_fwd(logits)[0]
    return jnp.matmul(p.astype(v.dtype), v), (q, k, v, p, bias)


def _attend_bwd(res, g):
    q, k, v, p, bias = res
    dp = jnp.matmul(g, _swap(v), preferred_element_type=jnp.float32)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # the softmax backward, float32
    dq = jnp.matmul(ds.astype(q.dtype), k)
    dk = _swap(jnp.matmul(_swap(q), ds.astype(q.dtype)))
    dv = _swap(jnp.matmul(_swap(g), p.astype(v.dtype)))
    return dq, dk, dv, None if bias is None else _sum_to_shape(ds, bias.shape).astype(bias.dtype)


def _sum_to_shape(x, shape):
    """Sums x over the axes that `shape` broadcasts (leading ones and size-1 ones)."""
    x = x.sum(axis=tuple(range(x.ndim - len(shape))))
    ones = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=ones, keepdims=True)


_attend.defvjp(_attend_fwd, _attend_bwd)


ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


class Attention(nn.Module):
    """Multi-head self-attention.

    `implementation` (one of ATTENTION_IMPLEMENTATIONS): None / 'xla' run eojax's
    `dot_product_attention` (any backend; its form follows `kernels`); 'cudnn' goes to
    `jax.nn.dot_product_attention`'s flash attention on GPUs (needs bf16/fp16 and a head dim that
    is a multiple of 8).

    `bias` (optional, broadcastable to (batch, heads, length, length)) is added to the logits, e.g.
    CROMA's 2D-ALiBi distance penalty. qkv_bias=False drops the query/key/value biases (CROMA).
    """

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None
    qkv_bias: bool = True

    @nn.compact
    def __call__(self, x, bias=None):
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"width {width} is not divisible by heads {self.heads}")
        if self.implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention_impl {self.implementation!r} is not one of "
                             f"{ATTENTION_IMPLEMENTATIONS} (None and 'xla' run eojax's own attention)")
        head_dim = width // self.heads
        if self.implementation == "cudnn" and (jnp.dtype(self.dtype) not in (jnp.bfloat16, jnp.float16)
                                               or head_dim % 8):
            raise ValueError(f"attention_impl 'cudnn' needs dtype bfloat16 / float16 and a head dim that is a "
                             f"multiple of 8; got dtype {jnp.dtype(self.dtype).name}, head dim {head_dim}")
        # query / key / value keep their own parameters; they are applied as ONE (D, 3, H, Dh)
        # product, which on XLA:CPU beat three (1184 x 384 x 384) ones by 1-3% of an MAE step.
        weights = [HeadDense((self.heads, head_dim), 1, ("embed", "heads", "kv"), ("heads", "kv"),
                             dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.qkv_bias,
                             weights_only=True, name=name)(x) for name in ("query", "key", "value")]
        qkv = linear(x.astype(weights[0][0].dtype), jnp.stack([w[0] for w in weights], axis=1), 1)
        if self.qkv_bias:
            qkv = qkv + jnp.stack([w[1] for w in weights])
        qkv = nn.with_logical_constraint(qkv, ("batch", "length", None, "heads", "kv"))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if bias is not None:
            bias = bias.astype(q.dtype)
        if self.implementation in (None, "xla"):  # logits and softmax in float32 even for bf16 inputs
            o = dot_product_attention(q, k, v, bias)
        else:
            o = jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=self.implementation)
        o = nn.with_logical_constraint(o, ("batch", "length", "heads", "kv"))
        return HeadDense((width,), 2, ("heads", "kv", "embed"), ("embed",),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="out")(o)


class HeadDense(nn.Module):
    """Dense layer with a multi-axis kernel (e.g. embed x heads x head_dim), initialised at its full
    shape with Xavier fans over the contracted and produced axes (same numbers as Xavier on the
    flattened matrix). flax's DenseGeneral initialises a flattened kernel and then reshapes it, which
    trips the logical-partitioning constraint of a 3-D kernel when a mesh is active."""

    features: tuple[int, ...]
    contract: int  # how many trailing input axes are contracted
    kernel_names: tuple
    bias_names: tuple
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True
    weights_only: bool = False  # return (kernel, bias) in the compute dtype instead of applying them

    @nn.compact
    def __call__(self, x):
        n_in, n_out = self.contract, len(self.features)
        init = nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", partitioned(init, self.kernel_names),
                            tuple(x.shape[-n_in:]) + tuple(self.features), self.param_dtype)
        if not self.use_bias:
            x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
            return (kernel, None) if self.weights_only else linear(x, kernel, n_in)
        bias = self.param("bias", partitioned(nn.initializers.zeros, self.bias_names), self.features,
                          self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        if self.weights_only:
            return kernel, bias
        return linear(x, kernel, n_in) + bias


def stochastic_depth(x, rate, rng):
    """timm's DropPath in training (scale_by_keep=True): each sample's x (leading axis) is zeroed with
    probability `rate` (a float or a traced scalar), else divided by 1 - rate."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block stochastic-depth rates, 0 at the first block rising linearly to `rate` at the last
    (timm's torch.linspace(0, drop_path_rate, depth))."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate {rate!r} must be in [0, 1)")
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x), bias); x + mlp(LN(x)).

    drop_path > 0: in training each residual branch is dropped per sample with that rate and kept
    ones scaled by 1 / (1 - rate) (stochastic_depth, drawn from the 'dropout' rng); a `drop_path`
    call argument (a traced scalar: nn.scan gives each block its own) overrides the field."""

    heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    scanned: bool = False  # return (x, None), the (carry, output) pair nn.scan expects
    emit: bool = False  # scanned: return (x, x), so the scan stacks every block's output
    drop_path: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, bias=None, drop_path=None):
        rate = self.drop_path if drop_path is None else drop_path
        # Off (eval, or a static rate of 0): no rng is drawn and the graph is the plain block's.
        branch = ((lambda h: stochastic_depth(h, rate, self.make_rng("dropout")))
                  if train and (drop_path is not None or self.drop_path > 0) else (lambda h: h))
        x = nn.with_logical_constraint(x.astype(self.dtype), BLE)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(name="norm1", epsilon=self.norm_eps, **kw)(x)
        h = Attention(self.heads, implementation=self.attention_impl, qkv_bias=self.qkv_bias,
                      name="attn", **kw)(h, bias)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        x = nn.with_logical_constraint(x + branch(h), BLE)
        h = LayerNorm(name="norm2", epsilon=self.norm_eps, **kw)(x)
        h = Mlp(self.mlp_dim, self.dropout, name="mlp", **kw)(h, train)
        x = nn.with_logical_constraint(x + branch(h), BLE)
        return (x, x if self.emit else None) if self.scanned else x


class Encoder(nn.Module):
    """A stack of `depth` EncoderBlocks (no final norm: callers add the norm they need).

    scan=True: one scanned block named 'layers' whose params carry a leading (depth,) axis with
      logical name LAYERS_AXIS; compiles once per model instead of once per layer.
    scan=False: blocks named 'block_0' ... 'block_{depth-1}'. `stack_layers` / `unstack_layers`
      convert params between the two layouts.
    remat=True: each block is rematerialised in the backward pass (nothing saved but its input).
    drop_path_rate > 0: stochastic depth, block i at rate drop_path_rate * i / (depth - 1) (timm's
      linspace; drop_path_rates); scanned, the rates are a scanned input of the one block.

    `bias` is added to every block's attention logits. With `return_layers` (0-based block indices)
    the call returns the list of those blocks' outputs instead of the last one (feature pyramids
    for dense heads); every block still runs, so the parameter tree is the same either way.
    """

    depth: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool = False
    attention_impl: str | None = None
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, bias=None, return_layers=None):
        if return_layers is not None:
            bad = [i for i in return_layers if not 0 <= int(i) < self.depth]
            if bad:
                raise ValueError(f"return_layers {tuple(return_layers)}: {bad} not in 0..{self.depth - 1}")
        rates = drop_path_rates(self.drop_path_rate, self.depth)
        block_cls = EncoderBlock
        if self.remat:
            # static_argnums counts self as 0, so 2 is `train` (a Python bool that picks dropout).
            block_cls = nn.remat(
                block_cls, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(2,)
            )
        kw = dict(
            heads=self.heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            attention_impl=self.attention_impl,
            qkv_bias=self.qkv_bias,
            norm_eps=self.norm_eps,
            scanned=self.scan,
        )
        if self.scan:
            # With stochastic depth each block's rate is scanned over (one traced scalar per block).
            dropping = self.drop_path_rate > 0
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, 0) if dropping else nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
            )
            args = (x, train, bias) + ((jnp.asarray(rates, jnp.float32),) if dropping else ())
            x, every = stack(name="layers", emit=return_layers is not None, **kw)(*args)
            return x if return_layers is None else [every[int(i)] for i in return_layers]
        outputs = []
        for i in range(self.depth):
            x = block_cls(name=f"block_{i}", drop_path=rates[i], **kw)(x, train, bias)
            outputs.append(x)
        return x if return_layers is None else [outputs[int(i)] for i in return_layers]


# --------------------------------------------------------------------------------------------------
# Param layout conversion (unboxed params of one Encoder).
# --------------------------------------------------------------------------------------------------
def unstack_layers(encoder_params: Mapping, depth: int) -> dict:
    """{'layers': tree with leading depth axis} -> {'block_i': tree}."""
    layers = encoder_params["layers"]
    return {f"block_{i}": jax.tree.map(lambda a, i=i: a[i], layers) for i in range(depth)}


def stack_layers(encoder_params: Mapping, depth: int) -> dict:
    """{'block_i': tree} -> {'layers': tree with leading depth axis}."""
    blocks = [encoder_params[f"block_{i}"] for i in range(depth)]
    return {"layers": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}


def transformer_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> float:
    """Forward matmul FLOPs (2 per multiply-add) of `depth` blocks on `tokens` tokens.

    Per block: q, k, v, out projections 4*T*D^2; scores and weighted sum 2*T^2*D; MLP 2*T*D*M.
    Norms, softmax and GELU are ignored (a few percent at most).
    """
    macs = 4 * tokens * width**2 + 2 * tokens**2 * width + 2 * tokens * width * mlp_dim
    return 2.0 * depth * macs
