"""Text-conditioned UNet for diffusion, in the layout of Stable Diffusion's UNet2DConditionModel.

conv_in -> down blocks (ResBlocks [+ transformer blocks], a strided-conv downsample except in the
last block) -> mid block (ResBlock, transformer, ResBlock) -> up blocks (layers_per_block + 1
ResBlocks that each take one skip from the down path, [+ transformers], nearest x2 + conv upsample
except in the last block) -> GroupNorm, SiLU, conv_out.

Every skip pushed on the way down (conv_in's output, each ResBlock/transformer output, each
downsample) is popped on the way up, so the skip widths follow from the layout and
`block_out_channels=(320, 640, 1280, 1280), attention=(True, True, True, False),
cross_attention_dim=768, heads=8` has exactly SD-1.5's 859,520,964 parameters (see `sd15_config`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.models import layers

Dtype = Any
BHWC = ("batch", "height", "width", "embed")


def _conv(features, kernel=3, stride=1, names=(None, None, "channels", "embed"), dtype=jnp.float32,
          param_dtype=jnp.float32, name=None):
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=layers.partitioned(nn.initializers.lecun_normal(), names),
                   bias_init=layers.partitioned(nn.initializers.zeros, (names[-1],)))


def _dense(features, names, use_bias=True, dtype=jnp.float32, param_dtype=jnp.float32, name=None):
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), names),
                    bias_init=layers.partitioned(nn.initializers.zeros, (names[-1],)))


class GroupNorm(nn.Module):
    """GroupNorm in float32 with min(groups, C) groups (tiny test widths have fewer than 32 channels)."""

    groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        groups = math.gcd(self.groups, x.shape[-1])
        y = nn.GroupNorm(num_groups=groups, epsilon=self.epsilon, dtype=jnp.float32,
                         param_dtype=self.param_dtype, name="gn",
                         scale_init=layers.partitioned(nn.initializers.ones, ("embed",)),
                         bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))(x.astype(jnp.float32))
        return y.astype(self.dtype)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """(B,) timesteps -> (B, dim) [cos | sin] features (SD: flip_sin_to_cos, no frequency shift)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class ResBlock(nn.Module):
    """GN-SiLU-conv, + projected timestep embedding, GN-SiLU-conv, + (1x1-conv) shortcut."""

    features: int
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _conv(self.features, name="conv1", **kw)(nn.silu(GroupNorm(self.groups, name="norm1", **kw)(x)))
        h = h + _dense(self.features, ("mlp", "embed"), name="time_proj", **kw)(nn.silu(temb))[:, None, None]
        h = _conv(self.features, name="conv2", **kw)(nn.silu(GroupNorm(self.groups, name="norm2", **kw)(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, kernel=1, name="shortcut", **kw)(x)
        return nn.with_logical_constraint(x + h, BHWC)


class MultiHeadAttention(nn.Module):
    """Attention of `x` to `context` (itself when None): bias-free q/k/v, output projection with bias."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        width = x.shape[-1]
        if width % self.heads:
            raise ValueError(f"attention width {width} is not divisible by heads {self.heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda y: y.reshape(*y.shape[:2], self.heads, width // self.heads)
        q = split(_dense(width, ("embed", "heads"), use_bias=False, name="query", **kw)(x))
        k = split(_dense(width, ("embed", "heads"), use_bias=False, name="key", **kw)(context))
        v = split(_dense(width, ("embed", "heads"), use_bias=False, name="value", **kw)(context))
        o = layers.dot_product_attention(q, k, v)
        return _dense(width, ("heads", "embed"), name="out", **kw)(o.reshape(*o.shape[:2], width))


class TransformerBlock(nn.Module):
    """Pre-LN: self-attention, cross-attention to the text, GEGLU feed-forward (4x width)."""

    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, name=name, **kw,
                                       scale_init=layers.partitioned(nn.initializers.ones, ("embed",)),
                                       bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)))
        x = x + MultiHeadAttention(self.heads, name="self_attn", **kw)(ln("norm1")(x))
        x = x + MultiHeadAttention(self.heads, name="cross_attn", **kw)(ln("norm2")(x), context)
        width = x.shape[-1]
        h = _dense(8 * width, ("embed", "mlp"), name="geglu", **kw)(ln("norm3")(x))
        value, gate = jnp.split(h, 2, axis=-1)
        h = value * nn.gelu(gate, approximate=False)
        x = x + _dense(width, ("mlp", "embed"), name="ff_out", **kw)(h)
        return nn.with_logical_constraint(x, layers.BLE)


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1-conv proj_in, `depth` TransformerBlocks over the H*W tokens, proj_out, + input.
    linear_projection: proj_in / proj_out are Dense layers on the tokens (SD-2's use_linear_projection;
    the same map as the 1x1 convs, with (C, C) kernels)."""

    heads: int
    depth: int = 1
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    linear_projection: bool = False

    @nn.compact
    def __call__(self, x, context):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, epsilon=1e-6, name="norm", **kw)(x)
        if self.linear_projection:
            proj_in = _dense(c, ("embed", "mlp"), name="proj_in", **kw)
            proj_out = _dense(c, ("mlp", "embed"), name="proj_out", **kw)
        else:
            proj_in = _conv(c, kernel=1, names=(None, None, "embed", "mlp"), name="proj_in", **kw)
            proj_out = _conv(c, kernel=1, names=(None, None, "mlp", "embed"), name="proj_out", **kw)
        y = proj_in(y).reshape(b, h * w, c)
        for i in range(self.depth):
            y = TransformerBlock(self.heads, name=f"block_{i}", **kw)(y, context)
        y = proj_out(y.reshape(b, h, w, c))
        return x + y


class UNet(nn.Module):
    """(x (B, H, W, in_channels), timesteps (B,), context (B, L, cross_attention_dim)) -> (B, H, W, out).

    H and W must be divisible by 2 ** (len(block_out_channels) - 1), unless `any_size`: then, as
    diffusers' UNet2DConditionModel does for such sizes, each strided conv rounds up and each upsample
    goes to the size of the skip it meets (torch's 'nearest': source index floor(i * in / out)), e.g.
    SD at 224 x 224 pixels, 28 x 28 latents. heads: one count for every transformer, or one per level
    (SD-2's per-level counts; the mid block takes the last level's, as diffusers' UNet2DConditionModel
    does). linear_projection: see SpatialTransformer. remat: recompute each ResBlock and
    SpatialTransformer in the backward pass instead of keeping their activations (diffusers'
    gradient checkpointing); the parameters and outputs are the same.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    attention: Sequence[bool] = (True, True, True, False)  # per resolution level
    layers_per_block: int = 2
    heads: int | Sequence[int] = 8  # one for all levels, or one per level
    transformer_depth: int = 1
    cross_attention_dim: int = 768
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    linear_projection: bool = False
    remat: bool = False
    any_size: bool = False

    @nn.compact
    def __call__(self, x, timesteps, context):
        chans, levels = tuple(self.block_out_channels), len(self.block_out_channels)
        if len(self.attention) != levels:
            raise ValueError(f"attention {tuple(self.attention)} needs one flag per level of {chans}")
        heads = tuple(self.heads) if isinstance(self.heads, Sequence) else (self.heads,) * levels
        if len(heads) != levels:
            raise ValueError(f"heads {heads} needs one count per level of {chans}")
        if not self.any_size and (x.shape[1] % 2 ** (levels - 1) or x.shape[2] % 2 ** (levels - 1)):
            raise ValueError(f"image {x.shape[1]}x{x.shape[2]} is not divisible by 2^{levels - 1} "
                             f"({levels} UNet levels)")
        if context.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"context width {context.shape[-1]} != cross_attention_dim {self.cross_attention_dim}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # nn.remat keeps the module's name, so the parameter tree is the same either way.
        res_cls, attn_cls = (nn.remat(ResBlock), nn.remat(SpatialTransformer)) if self.remat else \
            (ResBlock, SpatialTransformer)
        res = lambda f, name: res_cls(f, self.norm_groups, name=name, **kw)
        attn = lambda lvl, name: attn_cls(heads[lvl], self.transformer_depth, self.norm_groups, name=name,
                                          linear_projection=self.linear_projection, **kw)
        context = context.astype(self.dtype)

        temb = timestep_embedding(timesteps, chans[0])
        temb = _dense(4 * chans[0], (None, "mlp"), name="time_embed_1", **kw)(temb)
        temb = _dense(4 * chans[0], ("mlp", "embed"), name="time_embed_2", **kw)(nn.silu(temb))

        h = _conv(chans[0], name="conv_in", **kw)(x.astype(self.dtype))
        h = nn.with_logical_constraint(h, BHWC)
        skips = [h]
        for lvl, (c, use_attn) in enumerate(zip(chans, self.attention)):
            for i in range(self.layers_per_block):
                h = res(c, f"down_{lvl}_res_{i}")(h, temb)
                if use_attn:
                    h = attn(lvl, f"down_{lvl}_attn_{i}")(h, context)
                skips.append(h)
            if lvl < levels - 1:
                h = _conv(c, stride=2, name=f"down_{lvl}_downsample", **kw)(h)
                skips.append(h)

        h = res(chans[-1], "mid_res_0")(h, temb)
        h = attn(-1, "mid_attn")(h, context)
        h = res(chans[-1], "mid_res_1")(h, temb)

        for lvl, (c, use_attn) in reversed(list(enumerate(zip(chans, self.attention)))):
            for i in range(self.layers_per_block + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(c, f"up_{lvl}_res_{i}")(h, temb)
                if use_attn:
                    h = attn(lvl, f"up_{lvl}_attn_{i}")(h, context)
            if lvl > 0:
                h = _upsample_nearest(h, skips[-1].shape[1:3])  # to the next skip's size
                h = _conv(c, name=f"up_{lvl}_upsample", **kw)(h)

        h = nn.silu(GroupNorm(self.norm_groups, name="norm_out", **kw)(h))
        out = _conv(self.out_channels, names=(None, None, "embed", "channels"), name="conv_out", **kw)(h)
        return out.astype(jnp.float32)


def _upsample_nearest(h, size):
    """Nearest-neighbour resize of (B, H, W, C) to `size`: x2 by repetition, else torch's legacy
    'nearest' (source index floor(i * in / out)), which F.interpolate(size=...) in diffusers uses."""
    (hh, ww), (th, tw) = h.shape[1:3], size
    if (th, tw) == (2 * hh, 2 * ww):
        return jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
    h = jnp.take(h, jnp.arange(th) * hh // th, axis=1)
    return jnp.take(h, jnp.arange(tw) * ww // tw, axis=2)


def sd15_config(**overrides) -> dict:
    """UNet keyword arguments of Stable Diffusion 1.5 (859,520,964 parameters)."""
    cfg = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
               attention=(True, True, True, False), layers_per_block=2, heads=8, transformer_depth=1,
               cross_attention_dim=768, norm_groups=32)
    cfg.update(overrides)
    return cfg


def count_params(module: nn.Module, image_size: int, context_len: int = 77) -> int:
    """Parameter count from shapes only (jax.eval_shape: nothing is materialised)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, module.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    c = jax.ShapeDtypeStruct((1, context_len, module.cross_attention_dim), jnp.float32)
    shapes = jax.eval_shape(lambda x, t, c: module.init(jax.random.key(0), x, t, c), x, t, c)
    return sum(math.prod(a.shape) for a in jax.tree.leaves(nn.meta.unbox(shapes)))


def flops_per_image(module: nn.Module, image_size: int, context_len: int) -> float:
    """Forward FLOPs of one image from XLA's cost analysis of the (abstract) program."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, module.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    c = jax.ShapeDtypeStruct((1, context_len, module.cross_attention_dim), jnp.float32)
    params = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), jnp.zeros(x.shape),
                                                              jnp.zeros(t.shape), jnp.zeros(c.shape))))
    cost = jax.jit(lambda p, x, t, c: module.apply(p, x, t, c)).lower(params, x, t, c).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


__all__ = ["UNet", "ResBlock", "SpatialTransformer", "TransformerBlock", "timestep_embedding", "sd15_config",
           "count_params", "flops_per_image"]
