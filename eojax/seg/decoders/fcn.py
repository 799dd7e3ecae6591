"""seg_fcn: an FCN head (mmseg FCNHead shape) on the last encoder layer: `num_convs` 3x3 conv-norm-ReLU
layers, the input concatenated back (concat_input), a 3x3 fusion layer, dropout and a 1x1 classifier;
the logits are upsampled to the image by the SegmentationModel."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from eojax.seg.decoders.blocks import Classifier, ConvNormAct

Dtype = Any


class FCNDecoder(nn.Module):
    num_classes: int
    channels: int = 256
    num_convs: int = 2
    dropout: float = 0.1
    norm: str = "batch"  # blocks.Norm: 'batch' as the reference, or 'layer'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = features[-1]
        h = x
        for i in range(self.num_convs):
            h = ConvNormAct(self.channels, 3, self.norm, name=f"conv_{i}", **kw)(h, train)
        h = ConvNormAct(self.channels, 3, self.norm, name="fuse", **kw)(jnp.concatenate([x.astype(h.dtype), h], -1),
                                                                        train)
        return Classifier(self.num_classes, self.dropout, name="head", **kw)(h, train)
