"""seg_linear: a per-token linear probe on the last encoder layer (logits at 1/p, upsampled by the
SegmentationModel)."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from eojax.seg.decoders.blocks import Classifier

Dtype = Any


class LinearDecoder(nn.Module):
    num_classes: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features, train: bool = False):
        return Classifier(self.num_classes, self.dropout, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="head")(features[-1], train)
