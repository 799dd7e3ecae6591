"""SatMAE++ multi-scale reconstruction head: the MAE's full-resolution reconstruction is refined by two
upsampling blocks into 2x and 4x images, trained with an L1 loss against real higher-resolution pixels.

Layout (facts from SatMAE++, models_mae_group_channels.py), channels-last here:
  recon (B, H, W, C) -> 1x1 conv to M = C * ratio channels -> GELU -> channel LayerNorm
  block(x): transposed conv k4 s2 p1 (M -> M, doubles H, W) -> channel LayerNorm -> leaky ReLU(0.01)
            -> residual block [x + 0.5 * conv3x3(relu(conv3x3(x)))] -> channel LayerNorm = features
            and a 3x3 conv projection features -> C = the image at this scale
  up2 = proj(block1(x)); up4 = proj(block2(features of block1)).
Convolutions are small (M = 40 for 10 bands), so their kernels are left unsharded except for a
'channels' name on the output dim (unmapped by DEFAULT_RULES); activations are constrained to
(batch, height, width, channels) so batch parallelism carries through.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.models import layers

Dtype = Any

BHWC = ("batch", "height", "width", "channels")


def _conv(features, kernel, dtype, param_dtype, name):
    pad = (kernel - 1) // 2  # 'same' size for odd kernels, as padding=1 with 3x3 in the reference
    return nn.Conv(
        features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
        param_dtype=param_dtype, name=name,
        kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), (None, None, None, "channels")),
        bias_init=layers.partitioned(nn.initializers.zeros, ("channels",)))


class ChannelNorm(nn.Module):
    """LayerNorm over the channel dim only (the reference's 'channels_first' LayerNorm on NCHW is the
    same normalisation); float32 statistics, eps 1e-6, cast back to the compute dtype."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(
            epsilon=1e-6, dtype=jnp.float32, param_dtype=self.param_dtype, name="ln",
            scale_init=layers.partitioned(nn.initializers.ones, ("channels",)),
            bias_init=layers.partitioned(nn.initializers.zeros, ("channels",)),
        )(x.astype(jnp.float32))
        return y.astype(self.dtype)


class UpsampleBlock(nn.Module):
    """(B, H, W, M) -> (features (B, 2H, 2W, M), image (B, 2H, 2W, out_channels))."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        m = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(_conv, **kw)
        # torch ConvTranspose2d(k=4, s=2, p=1) == input dilated by 2, padded k-1-p = 2 per side, then a
        # 4x4 conv; transpose_kernel=True makes the kernel act exactly like torch's (kh, kw, out, in).
        x = nn.ConvTranspose(
            m, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True,
            kernel_init=layers.partitioned(nn.initializers.xavier_uniform(),
                                           (None, None, "channels", None)),
            bias_init=layers.partitioned(nn.initializers.zeros, ("channels",)),
            name="up_conv", **kw)(x)
        x = nn.with_logical_constraint(x, BHWC)
        x = nn.leaky_relu(ChannelNorm(name="up_norm", **kw)(x), negative_slope=0.01)
        h = nn.relu(conv(m, 3, name="res_conv1")(x))
        x = x + 0.5 * conv(m, 3, name="res_conv2")(h)
        x = nn.with_logical_constraint(ChannelNorm(name="res_norm", **kw)(x), BHWC)
        return x, conv(self.out_channels, 3, name="proj_out")(x)


class MultiScaleHead(nn.Module):
    """recon (B, H, W, C) -> (up2 (B, 2H, 2W, C), up4 (B, 4H, 4W, C)), both float32."""

    ratio: int = 4  # hidden channels = C * ratio (the reference's proj_ratio)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, recon):
        c = recon.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(c * self.ratio, 1, name="proj_up_conv", **kw)(recon.astype(self.dtype))
        x = ChannelNorm(name="proj_up_norm", **kw)(nn.gelu(x, approximate=False))
        x = nn.with_logical_constraint(x, BHWC)
        x, up2 = UpsampleBlock(c, name="up_block1", **kw)(x)
        _, up4 = UpsampleBlock(c, name="up_block2", **kw)(x)
        return up2.astype(jnp.float32), up4.astype(jnp.float32)


def multiscale_flops(height: int, width: int, channels: int, ratio: int = 4) -> float:
    """Forward FLOPs (2 per multiply-add) of MultiScaleHead on one (height, width, channels) image.

    Useful multiply-adds only: a k4 s2 transposed conv does 16 * M * M per INPUT pixel (an XLA
    implementation through input dilation spends 4x that on zeros). Norms and activations ignored.
    """
    c, m = channels, channels * ratio
    hw = height * width
    macs = hw * c * m  # 1x1 projection
    for scale in (4, 16):  # blocks 1 and 2 produce 2x (4 hw pixels) and 4x (16 hw pixels)
        macs += 16 * m * m * hw * scale // 4  # transposed conv on the block's input pixels
        macs += scale * hw * (2 * 9 * m * m + 9 * m * c)  # residual convs + projection
    return 2.0 * macs
