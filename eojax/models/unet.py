"""PANGAEA's supervised UNet baseline: the encoder half, trained from scratch on the task's bands.

    enc = UNetEncoder(topology=(64, 128, 256, 512))         # PANGAEA configs/encoder/unet_encoder.yaml
    variables = enc.init(rng, images)                       # {'params': ..., 'batch_stats': ...}
    maps = enc.apply(variables, images)                     # 5 maps, strides 1, 2, 4, 8, 16

PANGAEA-bench's `pangaea/encoders/unet_encoder.py` (yurujaja/pangaea-bench): `in_conv`, a DoubleConv
(3x3 conv with bias -> BatchNorm -> ReLU, twice) from the bands to topology[0] at full resolution, then
one `down{k}` per topology entry: a 2x2 max-pool (floor) and a DoubleConv to the next entry (the last
keeps the last width). With (64, 128, 256, 512) the maps have 64, 128, 256, 512, 512 channels. PANGAEA
returns them coarsest first; here they are finest first, as every eojax encoder's (features[-1] is the
deepest map). The decoder half is eojax.seg.decoders.unet, which reuses `DoubleConv` and `UpConv2x2`.

Initialisation is torch's default for Conv2d / ConvTranspose2d (uniform within 1 / sqrt(fan_in) for
kernel and bias), as PANGAEA trains these layers from that init; BatchNorm is torch's (momentum 0.1,
eps 1e-5, running statistics in 'batch_stats', computed in float32).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.models import layers

Dtype = Any
BHWC = ("batch", "height", "width", "channels")

VARIANTS = {
    "mu": dict(topology=(8, 16, 32, 64)),  # tests and runlocal
    "base": dict(topology=(64, 128, 256, 512)),  # PANGAEA's configs/encoder/unet_encoder.yaml
}


def torch_uniform(fan_in: int, names: tuple):
    """torch's default Conv init for kernel and bias alike: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (kaiming_uniform with a=sqrt(5) gives exactly that bound)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return layers.partitioned(init, names)


class Conv3x3(nn.Module):
    """torch Conv2d(in, out, 3, padding=1) with bias."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        fan_in = 9 * x.shape[-1]
        return nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv",
                       kernel_init=torch_uniform(fan_in, (None, None, None, "channels")),
                       bias_init=torch_uniform(fan_in, ("channels",)))(x)


class DoubleConv(nn.Module):
    """(3x3 conv -> norm -> ReLU) x 2, PANGAEA's DoubleConv. `norm`: layers.channel_norm ('batch' as
    the reference; 'layer' for eojax's per-pixel LayerNorm)."""

    features: int
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(2):
            x = Conv3x3(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i}")(x)
            x = layers.channel_norm(self.norm, f"norm{i}", train, self.param_dtype)(x).astype(self.dtype)
            x = nn.relu(x)
        return nn.with_logical_constraint(x, BHWC)


class UpConv2x2(nn.Module):
    """torch ConvTranspose2d(c, features, 2, stride=2): the 2x2 windows do not overlap, so output pixel
    (2h + i, 2w + j) is x[h, w] @ kernel[i, j] + bias, one einsum (no zero-dilated convolution).
    kernel (2, 2, c, features) is torch's weight (c, features, 2, 2) transposed (2, 3, 0, 1); torch
    takes fan_in from the weight's second axis: features * 4."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        fan_in = 4 * self.features
        kernel = self.param("kernel", torch_uniform(fan_in, (None, None, None, "channels")),
                            (2, 2, c, self.features), self.param_dtype)
        bias = self.param("bias", torch_uniform(fan_in, ("channels",)), (self.features,), self.param_dtype)
        y = jnp.einsum("bhwc,ijcf->bhiwjf", x.astype(self.dtype), kernel.astype(self.dtype))
        y = y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)
        return nn.with_logical_constraint(y, BHWC)


class UNetEncoder(nn.Module):
    """images (B, H, W, C) -> len(topology) + 1 maps, finest first: strides 1, 2, 4, ..., with
    `feature_dims` channels. Any band count (the first conv is built for the images' channels);
    `input_bands` only checks that count. No published weights: PANGAEA trains it from scratch."""

    topology: tuple = (64, 128, 256, 512)
    input_bands: tuple | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    converter: ClassVar[None] = None  # no published checkpoint (weights.common.load_encoder refuses)
    bands: ClassVar[None] = None  # any band set: nothing to match by name

    @property
    def feature_dims(self) -> tuple[int, ...]:
        return (*self.topology, self.topology[-1])

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(2 ** i for i in range(len(self.topology) + 1))

    @property
    def embed_dim(self) -> int:
        return self.topology[-1]

    @nn.compact
    def __call__(self, images, train: bool = False) -> list:
        if images.ndim != 4:
            raise ValueError(f"unet: expected images (B, H, W, C), got {images.shape}")
        if self.input_bands is not None and images.shape[-1] != len(self.input_bands):
            raise ValueError(f"unet: images have {images.shape[-1]} channels (last axis of {images.shape}) "
                             f"but input_bands {tuple(self.input_bands)} say {len(self.input_bands)}")
        if not self.topology or min(self.topology) < 1:
            raise ValueError(f"unet: topology {tuple(self.topology)} must be one or more channel counts >= 1")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = DoubleConv(self.topology[0], name="in_conv", **kw)(images.astype(self.dtype), train)
        maps = [x]
        for k in range(len(self.topology)):
            out = self.topology[min(k + 1, len(self.topology) - 1)]
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # torch MaxPool2d(2): floor
            x = DoubleConv(out, name=f"down{k + 1}", **kw)(x, train)
            maps.append(x)
        return maps
