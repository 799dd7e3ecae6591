"""Prithvi-100M (NASA/IBM, v1) encoder: a ViT-B/16 over HLS time series. The variants 'large' and 'huge'
have the sizes of Prithvi-EO-2.0 300M (ViT-L/16) and 600M (ViT-H/14), which share this architecture.

Patches are 3D tubelets (tubelet_size frames x 16 x 16 px x 6 bands) embedded by one linear map (the
reference's Conv3d with stride = kernel); tokens are ordered (frame, row, col) and get a 3D sin-cos
position (channels split 6/16 width, 6/16 height, 4/16 time, in that order) and a cls token; timm
pre-norm blocks. As the PANGAEA wrapper, the feature maps are the chosen blocks' tokens without the
final norm (the checkpoint's `norm` is not used, also where Prithvi-EO-2.0's forward_features puts it
on the last block); multi-temporal tokens are averaged over time into one map per layer.

LayerNorm eps (`norm_eps`): 1e-5 (torch's default) for v1 ('base', and the class default), as
Prithvi-100M and PANGAEA; 1e-6 for Prithvi-EO-2.0 ('large', 'huge'), the default of the Hugging Face
release's prithvi_mae.py (terratorch's copy has used torch's 1e-5 since Dec 2024: norm_eps=1e-5
reproduces it). Parity with both versions: docs/fidelity.md.

pos_embed is a parameter (so a checkpoint's exact values are used) that is never trained
(stop_gradient; the optimizer also skips it in weight decay), as the reference's frozen buffer. An
input whose (frames, rows, cols) grid differs from the configured one gets the fixed 3D sin-cos of
its own grid (frame 0 for a single date), which is what the v1 reference and the 2.0 release build
for that grid (terratorch instead resamples the table bicubically to another image size). The TL
models' date / location encodings are not modelled: the features are the reference's without
temporal_coords / location_coords.
"""
from __future__ import annotations

from typing import ClassVar


import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.models.encoders.base import PublishedViT, arrange_bands, check_layers, grid_of
from eojax.models.layers import Encoder, partitioned, sincos_1d


# HLS bands Prithvi was pretrained on (Sentinel-2 names; HLS: BLUE GREEN RED NIR_NARROW SWIR_1 SWIR_2).
BANDS = ("B2", "B3", "B4", "B8A", "B11", "B12")

VARIANTS = {
    "mu": dict(image_size=32, patch_size=8, width=32, depth=4, heads=2, mlp_dim=64, layers=(0, 1, 2, 3)),
    "base": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12),  # Prithvi-100M
    "large": dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16,  # Prithvi-EO-2.0 300M
                  norm_eps=1e-6),
    "huge": dict(image_size=224, patch_size=14, width=1280, depth=32, heads=16,  # Prithvi-EO-2.0 600M
                 norm_eps=1e-6),
}


def sincos_3d(embed_dim: int, frames: int, rows: int, cols: int) -> np.ndarray:
    """(frames * rows * cols, D) for tokens ordered (frame, row, col): [col (6D/16), row (6D/16),
    frame (4D/16)] 1D sin-cos parts, as Prithvi's get_3d_sincos_pos_embed."""
    if embed_dim % 16:
        raise ValueError(f"3D sin-cos needs embed_dim divisible by 16, got {embed_dim}")
    d_space, d_time = embed_dim // 16 * 6, embed_dim // 16 * 4
    t, r, c = np.meshgrid(np.arange(frames), np.arange(rows), np.arange(cols), indexing="ij")
    return np.concatenate([sincos_1d(d_space, c.reshape(-1)), sincos_1d(d_space, r.reshape(-1)),
                           sincos_1d(d_time, t.reshape(-1))], axis=1)


def pos_embed_table(embed_dim: int, grid) -> np.ndarray:
    """(1, 1 + T*h*w, D) float32: a zero cls row, then sincos_3d of the (frames, rows, cols) grid, as
    get_3d_sincos_pos_embed(..., cls_token=True)."""
    pe = sincos_3d(embed_dim, *grid)
    return np.concatenate([np.zeros((1, embed_dim)), pe])[None].astype(np.float32)


def tubelets(videos, t: int, p: int):
    """(B, T, H, W, C) -> (B, (T/t)*(H/p)*(W/p), t*p*p*C): tokens (frame, row, col), each tubelet's
    pixels ordered (frame, row, col, band)."""
    b, frames, h, w, c = videos.shape
    x = videos.reshape(b, frames // t, t, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, (frames // t) * (h // p) * (w // p), t * p * p * c)


class Prithvi(PublishedViT):
    """images (B, H, W, C) or (B, T, H, W, C), channels = input_bands -> [(B, H/p, W/p, width)]."""

    converter: ClassVar[str] = "eojax.weights.prithvi:load_pretrained"  # weights.common.load_encoder

    num_frames: int = 1
    tubelet_size: int = 1
    norm_eps: float = 1e-5  # v1; Prithvi-EO-2.0 (the 'large' / 'huge' variants) 1e-6

    bands = BANDS
    bands_sensor: ClassVar[str] = "hls_s30"  # HLS (S30 names), as Prithvi-100M

    @property
    def grid(self) -> tuple[int, int, int]:
        """(frames, rows, cols) token grid of the configured input size."""
        if self.num_frames % self.tubelet_size:
            raise ValueError(f"prithvi: num_frames {self.num_frames} is not a multiple of "
                             f"tubelet_size {self.tubelet_size}")
        g = grid_of(self.image_size, self.patch_size, "prithvi")
        return self.num_frames // self.tubelet_size, g, g

    @nn.compact
    def __call__(self, images, train: bool = False):
        layers = check_layers(self.layers, self.depth, "prithvi")
        if images.ndim == 4:
            images = images[:, None]
        if images.ndim != 5:
            raise ValueError(f"prithvi: expected (B, H, W, C) or (B, T, H, W, C), got {images.shape}")
        x = arrange_bands(images, BANDS, self.input_bands, "prithvi", self.sensor,
                          self.bands_sensor).astype(self.dtype)
        b, frames, h, w, _ = x.shape
        if frames % self.tubelet_size:
            raise ValueError(f"prithvi: {frames} frames are not a multiple of tubelet_size "
                             f"{self.tubelet_size}")
        grid = (frames // self.tubelet_size, grid_of(h, self.patch_size, "prithvi"),
                grid_of(w, self.patch_size, "prithvi"))

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.width, kernel_init=partitioned(nn.initializers.xavier_uniform(), (None, "embed")),
                     bias_init=partitioned(nn.initializers.zeros, ("embed",)), name="patch_embed",
                     **kw)(tubelets(x, self.tubelet_size, self.patch_size))
        cls = self.param("cls_token", partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                         (1, 1, self.width), self.param_dtype)
        pos = self.param("pos_embed", partitioned(self._sincos_init, (None, None, "embed")),
                         (1, 1 + int(np.prod(self.grid)), self.width), self.param_dtype)
        pos = jax.lax.stop_gradient(pos[0]).astype(self.dtype)
        grid_pos = pos[1:] if grid == self.grid else jnp.asarray(sincos_3d(self.width, *grid), self.dtype)
        x = x + grid_pos[None]
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype) + pos[:1], (b, 1, self.width)), x], 1)

        blocks = Encoder(depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                         dropout=self.dropout, scan=self.scan, remat=self.remat,
                         drop_path_rate=self.drop_path_rate,
                         attention_impl=self.attention_impl, norm_eps=self.norm_eps, name="blocks", **kw)
        outs = blocks(x, train, return_layers=layers)
        return [o[:, 1:].reshape(b, *grid, self.width).mean(axis=1) for o in outs]

    def _sincos_init(self, key, shape, dtype):
        del key, shape
        return jnp.asarray(pos_embed_table(self.width, self.grid), dtype)
