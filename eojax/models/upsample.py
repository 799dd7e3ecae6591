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
        return layers.channel_norm("layer", "ln", False, self.param_dtype)(x).astype(self.dtype)


# Sub-pixel form of a k4 s2 p1 transposed conv: output phase a (row 2m + a) reads input rows m-1, m,
# m+1 through these taps of the 4x4 kernel (None = no tap); the same holds for columns.
_PHASE_TAPS = ((3, 1, None), (None, 2, 0))


class ConvTranspose4x2(nn.Module):
    """torch ConvTranspose2d(kernel 4, stride 2, padding 1) with a (4, 4, out, in) kernel, computed
    as one 3x3 convolution to 4 * out channels followed by a pixel shuffle. Same numbers as the
    dilated-input form, but a plain convolution: 4x faster on CPU, where XLA's input-dilated
    convolutions fall off the fast path, and no multiplications by inserted zeros anywhere."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cin, cout = x.shape[-1], self.features
        kernel = self.param("kernel", layers.partitioned(nn.initializers.xavier_uniform(),
                                                         (None, None, "channels", None)),
                            (4, 4, cout, cin), self.param_dtype)
        bias = self.param("bias", layers.partitioned(nn.initializers.zeros, ("channels",)), (cout,),
                          self.param_dtype)
        zero = jnp.zeros((cin, cout), kernel.dtype)
        rows = []
        for dy in range(3):
            cols = []
            for dx in range(3):
                # Input offset (dy - 1, dx - 1) feeds output phase (a, b) through one tap, or none.
                phases = [zero if _PHASE_TAPS[a][dy] is None or _PHASE_TAPS[b][dx] is None
                          else kernel[_PHASE_TAPS[a][dy], _PHASE_TAPS[b][dx]].T
                          for a in (0, 1) for b in (0, 1)]
                cols.append(jnp.concatenate(phases, axis=-1))  # (in, 4 * out), ordered (a, b, out)
            rows.append(jnp.stack(cols))
        x, k3, bias = nn.dtypes.promote_dtype(x, jnp.stack(rows), bias, dtype=self.dtype)
        y = jax.lax.conv_general_dilated(x, k3, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        b, h, w, _ = y.shape
        y = y.reshape(b, h, w, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, cout)
        return y + bias


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
        x = ConvTranspose4x2(m, name="up_conv", **kw)(x)
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

    Useful multiply-adds only: a k4 s2 transposed conv does 16 * M * M per INPUT pixel (its sub-pixel
    form spends 36 per input pixel, 20 of them on zero taps). Norms and activations ignored.
    """
    c, m = channels, channels * ratio
    hw = height * width
    macs = hw * c * m  # 1x1 projection
    for scale in (4, 16):  # blocks 1 and 2 produce 2x (4 hw pixels) and 4x (16 hw pixels)
        macs += 16 * m * m * hw * scale // 4  # transposed conv on the block's input pixels
        macs += scale * hw * (2 * 9 * m * m + 9 * m * c)  # residual convs + projection
    return 2.0 * macs
