"""seg_muster: a MUSTER-style decoder (Xu et al. 2022): hierarchical cross-attention between the
decoder and the encoder's skip features, in Swin windows that alternate between regular and shifted.

Stages run coarse -> fine over the ViT feature pyramid (0.5x, 1x, 2x, 4x). In each stage the decoder
state is upsampled (transposed conv 2x2) to the skip level and `depth` blocks follow; a block lets every
decoder token attend, inside its window, to the window's decoder *and* skip tokens ("skip attention":
queries from the decoder, keys/values from both), then an MLP. Odd blocks shift the windows by half a
window with the Swin attention mask (tokens that wrapped around attend only within their own region);
maps that are not a multiple of the window are padded and the padding is masked out of the keys.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.models import layers
from eojax.seg.decoders.blocks import Classifier, Conv, Deconv2x2, constrain, resize
from eojax.seg.decoders.pyramid import FeaturePyramid

Dtype = Any


def to_windows(x, ws: int):
    """(B, H, W, C), H and W multiples of ws -> (B * H/ws * W/ws, ws * ws, C), windows row-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def from_windows(x, ws: int, b: int, h: int, w: int):
    c = x.shape[-1]
    x = x.reshape(b, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def window_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
    """(nW, 1, T, 2T) bool: which keys (the window's decoder tokens, then its skip tokens) each query
    may see, for an h x w map padded to multiples of ws and rolled by -shift (Swin's regions)."""
    hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws
    region = np.zeros((hp, wp), np.int32)
    if shift:
        cuts = lambda n: (slice(0, n - ws), slice(n - ws, n - shift), slice(n - shift, n))
        for i, rs in enumerate(cuts(hp)):
            for j, cs in enumerate(cuts(wp)):
                region[rs, cs] = 3 * i + j
    pad = np.ones((hp, wp), bool)
    pad[:h, :w] = False
    pad = np.roll(pad, (-shift, -shift), (0, 1))
    win = lambda a: to_windows(a[None, :, :, None], ws)[..., 0]  # (nW, T)
    r, p = np.asarray(win(region)), np.asarray(win(pad))
    mask = (r[:, :, None] == r[:, None, :]) & ~p[:, None, :]
    mask |= np.eye(ws * ws, dtype=bool)[None]  # a token always sees itself (no empty rows)
    return np.concatenate([mask, mask], axis=-1)[:, None]


class SkipAttention(nn.Module):
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, mask):
        c = queries.shape[-1]
        if c % self.heads:
            raise ValueError(f"MUSTER channels {c} are not divisible by heads {self.heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = lambda name, x: layers.HeadDense((self.heads, c // self.heads), 1, ("embed", "heads", "kv"),
                                                ("heads", "kv"), name=name, **kw)(x)
        o = jax.nn.dot_product_attention(proj("query", queries), proj("key", keys), proj("value", keys),
                                         mask=mask)
        return layers.HeadDense((c,), 2, ("heads", "kv", "embed"), ("embed",), name="out", **kw)(o)


class SkipWindowBlock(nn.Module):
    heads: int
    window: int = 7
    shifted: bool = False
    mlp_ratio: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        ws = min(self.window, h, w)
        shift = ws // 2 if self.shifted and (h > ws or w > ws) else 0
        hp, wp = math.ceil(h / ws) * ws, math.ceil(w / ws) * ws

        def windows(t):
            t = jnp.pad(t, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
            return to_windows(jnp.roll(t, (-shift, -shift), (1, 2)) if shift else t, ws)

        xq = windows(layers.LayerNorm(name="norm_x", **kw)(x))
        xs = windows(layers.LayerNorm(name="norm_skip", **kw)(skip))
        mask = jnp.asarray(np.tile(window_mask(h, w, ws, shift), (b, 1, 1, 1)))
        o = SkipAttention(self.heads, name="attn", **kw)(xq, jnp.concatenate([xq, xs], 1), mask)
        o = from_windows(o, ws, b, hp, wp)
        o = (jnp.roll(o, (shift, shift), (1, 2)) if shift else o)[:, :h, :w]
        x = x + nn.Dropout(self.dropout)(o, deterministic=not train)
        t = x.reshape(b, h * w, c)
        t = t + layers.Mlp(self.mlp_ratio * c, self.dropout, name="mlp", **kw)(
            layers.LayerNorm(name="norm_mlp", **kw)(t), train)
        return constrain(t.reshape(b, h, w, c))


class Muster(nn.Module):
    num_classes: int
    channels: int = 256
    heads: int = 8
    window: int = 7
    depth: int = 2  # blocks per stage: regular then shifted windows
    dropout: float = 0.1
    norm: str = "batch"  # the pyramid neck's norm (blocks.Norm); the Swin-style blocks keep LayerNorm
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.channels
        maps = FeaturePyramid(self.norm, name="pyramid", **kw)(features, train)
        x = None
        for i, level in enumerate(reversed(maps)):  # coarse -> fine
            skip = Conv(c, 1, name=f"skip_{i}", **kw)(level)
            x = skip if x is None else resize(Deconv2x2(c, name=f"up_{i}", **kw)(x), skip.shape[1:3])
            for j in range(self.depth):
                x = SkipWindowBlock(self.heads, self.window, shifted=j % 2 == 1, dropout=0.0,
                                    name=f"stage_{i}_block_{j}", **kw)(x, skip, train)
        x = layers.LayerNorm(name="norm", **kw)(x)
        return Classifier(self.num_classes, self.dropout, name="head", **kw)(x, train)
