"""Feature pyramid from a plain ViT (ViTDet / BEiT style, as PANGAEA's UperNet neck).

Four same-resolution maps at 1/p of the image become 4x, 2x, 1x and 0.5x that resolution: two
stride-2 transposed convs (with a norm + GELU between), one transposed conv, identity, 2x2 max-pool
(floor, so an odd map of 15 gives 7).

A CNN's maps (ResNet: strides 4, 8, 16, 32; the UNet encoder: 1 to 16) are a pyramid already: maps
that differ in size pass through unchanged (any number of them, finest first), with no neck
parameters, as PANGAEA feeds a hierarchical encoder's outputs straight to its decoders.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
from flax import linen as nn

from eojax.seg.decoders.blocks import Deconv2x2, Norm, constrain

Dtype = Any


class FeaturePyramid(nn.Module):
    norm: str = "batch"  # between the two 4x transposed convs (blocks.Norm)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence, train: bool = False) -> list:
        sizes = [tuple(f.shape[1:3]) for f in features]
        if len(set(sizes)) > 1:  # a CNN's maps: already at successive strides
            if any(a[0] < b[0] or a[1] < b[1] for a, b in zip(sizes, sizes[1:])):
                raise ValueError(f"encoder maps of different sizes must not grow from the first to the last "
                                 f"(a CNN's pyramid, finest first); got sizes {sizes}")
            return [constrain(f) for f in features]
        if len(features) != 4:
            raise ValueError(f"the feature pyramid needs 4 same-size (ViT) encoder maps, got {len(features)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        f0, f1, f2, f3 = features
        d = f0.shape[-1]
        x0 = Deconv2x2(d, name="up4_a", **kw)(f0)
        x0 = nn.gelu(Norm(self.norm, name="up4_norm", **kw)(x0, train), approximate=False)
        x0 = Deconv2x2(d, name="up4_b", **kw)(x0)
        x1 = Deconv2x2(d, name="up2", **kw)(f1)
        x3 = nn.max_pool(f3, (2, 2), strides=(2, 2), padding="VALID")
        return [constrain(x) for x in (x0, x1, f2, x3)]
