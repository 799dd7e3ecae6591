"""seg_upernet: UperNet (Xiao et al. 2018) on the ViT feature pyramid, as in PANGAEA.

PSP module on the coarsest map (adaptive average pools to 1, 2, 3, 6 bins, 1x1 conv each, upsampled
and concatenated with the map, 3x3 bottleneck), FPN top-down path (1x1 laterals, upsample + add,
3x3 output convs), all levels upsampled to the finest and fused by a 3x3 conv, then dropout and
a 1x1 classifier. `channels` = 512 as in PANGAEA / mmseg.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from eojax.seg.decoders.blocks import Classifier, ConvNormAct, adaptive_avg_pool, resize
from eojax.seg.decoders.pyramid import FeaturePyramid

Dtype = Any


class UperNet(nn.Module):
    num_classes: int
    channels: int = 512
    pool_scales: tuple = (1, 2, 3, 6)
    dropout: float = 0.1
    norm: str = "batch"  # blocks.Norm: 'batch' as the reference, or 'layer'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        cna = lambda x, k, name: ConvNormAct(self.channels, k, self.norm, name=name, **kw)(x, train)  # noqa: E731
        maps = FeaturePyramid(self.norm, name="pyramid", **kw)(features, train)
        top = maps[-1]
        size = top.shape[1:3]
        pooled = [resize(cna(adaptive_avg_pool(top, b), 1, f"psp_{b}"), size) for b in self.pool_scales]
        psp = cna(jnp.concatenate([top, *pooled], -1), 3, "psp_bottleneck")

        lateral = [cna(m, 1, f"lateral_{i}") for i, m in enumerate(maps[:-1])]
        lateral.append(psp)
        for i in range(len(lateral) - 1, 0, -1):  # top-down
            lateral[i - 1] = lateral[i - 1] + resize(lateral[i], lateral[i - 1].shape[1:3])
        outs = [cna(x, 3, f"fpn_{i}") for i, x in enumerate(lateral[:-1])]
        outs.append(lateral[-1])
        finest = outs[0].shape[1:3]
        fused = cna(jnp.concatenate([resize(o, finest) for o in outs], -1), 3, "fuse")
        return Classifier(self.num_classes, self.dropout, name="head", **kw)(fused, train)
