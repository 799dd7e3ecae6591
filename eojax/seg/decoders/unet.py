"""seg_unet: PANGAEA's UNet decoder (`pangaea/decoders/unet.py`, the supervised baseline's upward path).

Coarse to fine over the encoder's maps: the decoder state is upsampled by a 2x2 stride-2 transposed
conv (keeping its channels), padded (or cropped) to the skip map's size as PANGAEA's `Up` does
(F.pad, the odd pixel after), concatenated after the skip map ([skip, up], the reference's order) and
refined by a DoubleConv; a 1x1 classifier follows. Widths come from the maps, as PANGAEA's come from
the encoder's topology: the step that joins skip map i leaves the channels of map i - 1 (map 0's for
the finest), so the UNet encoder's 64, 128, 256, 512, 512 give 256, 128, 64, 64.

Any encoder works: a CNN's maps (the UNet encoder's strides 1-16, ResNet's 4-32) go through the
FeaturePyramid unchanged; a ViT's four same-size maps become its 4x / 2x / 1x / 0.5x pyramid first.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.models.unet import DoubleConv, UpConv2x2
from eojax.seg.decoders.blocks import Classifier
from eojax.seg.decoders.pyramid import FeaturePyramid

Dtype = Any


def pad_to(x, size):
    """(B, h, w, C) -> (B, *size, C) by zero padding, half before and the odd pixel after, as
    PANGAEA's `F.pad(x1, (dX // 2, dX - dX // 2, dY // 2, dY - dY // 2))`; a negative difference
    (a map one pixel larger, from a stride-2 conv's ceil) crops the same way."""
    dy, dx = size[0] - x.shape[1], size[1] - x.shape[2]
    if not dy and not dx:
        return x
    zero = jnp.zeros((), x.dtype)
    return jax.lax.pad(x, zero, [(0, 0, 0), (dy // 2, dy - dy // 2, 0), (dx // 2, dx - dx // 2, 0), (0, 0, 0)])


class Up(nn.Module):
    """PANGAEA's Up: transposed conv of the decoder state, pad to the skip map, concat, DoubleConv."""

    features: int
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, skip, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = pad_to(UpConv2x2(x.shape[-1], name="up", **kw)(x), skip.shape[1:3])
        return DoubleConv(self.features, self.norm, name="conv", **kw)(
            jnp.concatenate([skip.astype(self.dtype), x], -1), train)


class UNetDecoder(nn.Module):
    num_classes: int
    dropout: float = 0.0  # PANGAEA's OutConv has none
    norm: str = "batch"  # DoubleConv's norm (layers.channel_norm): 'batch' as the reference, or 'layer'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        maps = FeaturePyramid(self.norm, name="pyramid", **kw)(features, train)
        if len(maps) < 2:
            raise ValueError(f"the unet decoder needs at least 2 encoder maps, got {len(maps)}")
        dims = [m.shape[-1] for m in maps]
        x = maps[-1]
        for i in range(len(maps) - 2, -1, -1):  # coarse -> fine; named up{i+1} as PANGAEA's up_seq
            x = Up(dims[max(i - 1, 0)], self.norm, name=f"up{i + 1}", **kw)(x, maps[i], train)
        return Classifier(self.num_classes, self.dropout, name="head", **kw)(x, train)
