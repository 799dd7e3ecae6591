"""Building blocks shared by the segmentation decoders (channels-last, logically partitioned).

Normalisation (`norm`): 'batch' is the references' (Sync)BatchNorm: the trainer keeps its statistics
as model state, and under jit over a sharded batch they are global over the whole batch, as
SyncBatchNorm's. 'layer' is a per-pixel LayerNorm over channels (`upsample.ChannelNorm`), which does
not depend on the batch (eojax's choice before it had model state).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.models import layers

Dtype = Any
BHWC = ("batch", "height", "width", "channels")


def constrain(x):
    return nn.with_logical_constraint(x, BHWC)


class Conv(nn.Module):
    """k x k 'same' convolution (k = 1 is a per-pixel linear map)."""

    features: int
    kernel: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = (self.kernel - 1) // 2
        return nn.Conv(self.features, (self.kernel, self.kernel), padding=((pad, pad), (pad, pad)),
                       use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=layers.partitioned(nn.initializers.kaiming_normal(),
                                                      (None, None, None, "channels")),
                       bias_init=layers.partitioned(nn.initializers.zeros, ("channels",)), name="conv")(x)


class Norm(nn.Module):
    """layers.channel_norm ('batch' or 'layer') with parameters under 'bn' / 'ln' (the latter the
    layout of upsample.ChannelNorm, which these blocks used before BatchNorm), cast to the compute dtype."""

    kind: str = "batch"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        name = {"batch": "bn", "layer": "ln"}.get(self.kind, "norm")
        return layers.channel_norm(self.kind, name, train, self.param_dtype)(x).astype(self.dtype)


class ConvNormAct(nn.Module):
    """conv (no bias: the norm has one) -> norm -> ReLU."""

    features: int
    kernel: int = 1
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv(self.features, self.kernel, use_bias=False, name="conv", **kw)(x)
        return constrain(nn.relu(Norm(self.norm, name="norm", **kw)(x, train)))


class Deconv2x2(nn.Module):
    """Transposed conv with kernel 2, stride 2: windows do not overlap, so it is one per-pixel linear
    map to 4 x features followed by a pixel shuffle (no zero-dilated convolution)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, _ = x.shape
        y = Conv(4 * self.features, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)
        y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
        return constrain(y.reshape(b, 2 * h, 2 * w, self.features))


def resize(x, size):
    """Bilinear resize of (B, H, W, C) to size (h, w), half-pixel centres (torch align_corners=False)."""
    b, h, w, c = x.shape
    if (h, w) == tuple(size):
        return x
    return jax.image.resize(x, (b, *size, c), "bilinear", antialias=False)


def _pool_matrix(n: int, bins: int) -> np.ndarray:
    """(bins, n) averaging matrix of adaptive average pooling: bin i covers
    [floor(i n / bins), ceil((i + 1) n / bins)), as torch's AdaptiveAvgPool."""
    m = np.zeros((bins, n), np.float32)
    for i in range(bins):
        lo, hi = (i * n) // bins, -((-(i + 1) * n) // bins)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def adaptive_avg_pool(x, bins: int):
    """(B, H, W, C) -> (B, bins, bins, C)."""
    ph, pw = _pool_matrix(x.shape[1], bins), _pool_matrix(x.shape[2], bins)
    return jnp.einsum("ih,bhwc,jw->bijc", jnp.asarray(ph, x.dtype), x, jnp.asarray(pw, x.dtype))


class Classifier(nn.Module):
    """Dropout (active in training) then a 1x1 conv to class logits; no activation on the logits."""

    num_classes: int
    dropout: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return Conv(self.num_classes, 1, dtype=self.dtype, param_dtype=self.param_dtype, name="cls")(x)
