"""seg_segformer: the SegFormer all-MLP head (Xie et al. 2021) on the ViT feature pyramid.

Each level is projected by a linear layer to `channels`, upsampled to the finest level, the four are
concatenated and fused by a 1x1 conv-norm-ReLU, then dropout and a 1x1 classifier.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from eojax.seg.decoders.blocks import Classifier, Conv, ConvNormAct, resize
from eojax.seg.decoders.pyramid import FeaturePyramid

Dtype = Any


class SegFormerHead(nn.Module):
    num_classes: int
    channels: int = 256
    dropout: float = 0.1
    norm: str = "batch"  # blocks.Norm: 'batch' as the reference, or 'layer'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        maps = FeaturePyramid(self.norm, name="pyramid", **kw)(features, train)
        finest = maps[0].shape[1:3]
        proj = [resize(Conv(self.channels, 1, name=f"linear_{i}", **kw)(m), finest) for i, m in enumerate(maps)]
        fused = ConvNormAct(self.channels, 1, self.norm, name="fuse", **kw)(jnp.concatenate(proj[::-1], -1), train)
        return Classifier(self.num_classes, self.dropout, name="head", **kw)(fused, train)
