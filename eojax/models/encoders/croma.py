"""CROMA optical encoder (Fuller et al. 2023, antofuller/CROMA): a ViT over 12 Sentinel-2 bands with
8x8 patches, no position embeddings, and a 2D-ALiBi attention bias instead.

  patch embedding   a linear map of each flattened 8x8x12 patch (no conv, no cls token)
  attention bias    bias[h, i, j] = -slope_h * |pos_i - pos_j| (Euclidean, in patches), with
                    ALiBi's geometric per-head slopes; added to every block's logits
  blocks            pre-norm, q/k/v without bias, exact-GELU MLP, LayerNorm eps 1e-5
  final norm        `norm_out`, applied to the last requested layer's output only (as PANGAEA's
                    BaseTransformer with output_layers), whichever block that is
The bias is computed for the input's own grid, so any size divisible by 8 works without resampling.
"""
from __future__ import annotations

from typing import ClassVar

import math

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.models.encoders.base import PublishedViT, arrange_bands, check_layers, grid_of
from eojax.models.layers import Encoder, LayerNorm, partitioned
from eojax.models.vit import patchify


# Sentinel-2 L1C/L2A bands in CROMA's order (B10 dropped).
BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")

VARIANTS = {
    "mu": dict(image_size=32, patch_size=8, width=32, depth=4, heads=4, mlp_dim=64, layers=(0, 1, 2, 3)),
    "base": dict(image_size=120, patch_size=8, width=768, depth=12, heads=16),
    # PANGAEA taps (3, 5, 7, 11) of CROMA-large too (configs/encoder/croma_optical.yaml).
    "large": dict(image_size=120, patch_size=8, width=1024, depth=24, heads=16),
}


def alibi_slopes(heads: int) -> np.ndarray:
    """ALiBi's per-head slopes: for a power of two n, r, r^2, ..., r^n with r = 2^(-8/n); otherwise
    those of the next lower power of two, then every other slope of twice that power."""
    def power_of_two(n):
        r = 2.0 ** (-8.0 / n)
        return [r ** (i + 1) for i in range(n)]
    if math.log2(heads).is_integer():
        return np.asarray(power_of_two(heads))
    low = 2 ** math.floor(math.log2(heads))
    return np.asarray(power_of_two(low) + list(alibi_slopes(2 * low)[0::2][:heads - low]))


def alibi_2d(heads: int, rows: int, cols: int) -> np.ndarray:
    """(1, heads, N, N) bias for row-major tokens: -slope_h * Euclidean distance of the patches."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    pts = np.stack([r.reshape(-1), c.reshape(-1)], axis=1).astype(np.float64)
    dist = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    return (-alibi_slopes(heads)[:, None, None] * dist[None])[None].astype(np.float32)


class CROMA(PublishedViT):
    """images (B, H, W, C), channels = input_bands -> [(B, H/8, W/8, width)] for `layers`."""

    converter: ClassVar[str] = "eojax.weights.croma:load_pretrained"  # weights.common.load_encoder

    image_size: int = 120
    patch_size: int = 8
    heads: int = 16

    bands = BANDS
    bands_sensor: ClassVar[str] = "sentinel2a"

    @nn.compact
    def __call__(self, images, train: bool = False):
        layers = check_layers(self.layers, self.depth, "croma")
        if images.ndim != 4:
            raise ValueError(f"croma: expected images (B, H, W, C), got {images.shape}")
        x = arrange_bands(images, BANDS, self.input_bands, "croma", self.sensor,
                          self.bands_sensor).astype(self.dtype)
        b, h, w, _ = x.shape
        grid = (grid_of(h, self.patch_size, "croma"), grid_of(w, self.patch_size, "croma"))
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.width, kernel_init=partitioned(nn.initializers.xavier_uniform(), (None, "embed")),
                     bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="linear_input",
                     **kw)(patchify(x, self.patch_size))
        bias = jnp.asarray(alibi_2d(self.heads, *grid))
        blocks = Encoder(depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                         dropout=self.dropout, scan=self.scan, remat=self.remat,
                         drop_path_rate=self.drop_path_rate,
                         attention_impl=self.attention_impl, qkv_bias=False, norm_eps=1e-5,
                         name="blocks", **kw)
        outs = blocks(x, train, bias, return_layers=layers)
        norm, top = LayerNorm(epsilon=1e-5, name="norm_out", **kw), max(layers)
        return [(norm(o) if i == top else o).reshape(b, *grid, self.width) for i, o in zip(layers, outs)]
