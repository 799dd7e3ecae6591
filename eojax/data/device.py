"""Raw windows -> model input, inside the jitted step.

The host pipeline only reads: pixels arrive band-first in the raster's own dtype, exactly as GDAL
delivers them. Casting, moving channels last, normalising and zeroing nodata are elementwise work that
XLA fuses into the train step almost for free, while on the host it cost as much as the read itself.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from eojax.data.stats import BandStats

MODES = ("standard", "satmae_minmax")


def _shift_scale(stats: BandStats, mode: str):
    # x -> (x - shift) * scale per band, as constants; a band with std 0 keeps scale 1.
    mean, std = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
    if mode == "satmae_minmax":
        shift, spread = mean - 2.0 * std, 4.0 * std
    else:
        shift, spread = mean, std
    scale = np.where(spread > 0, 1.0 / np.where(spread > 0, spread, 1.0), 1.0)
    return jnp.asarray(shift.astype(np.float32)), jnp.asarray(scale.astype(np.float32))


def to_model_input(pixels, valid, stats: BandStats | None = None, dtype=jnp.float32,
                   mode: str = "standard"):
    """pixels (B, C, H, W) any dtype, valid (B, H, W) -> image (B, H, W, C) `dtype`.

    mode 'standard': with `stats`, each band becomes (x - mean) / std (a band with std 0 is only
    centred). mode 'satmae_minmax' (SatMAE's Sentinel normalisation, needs `stats`): the range
    mean +- 2 std maps linearly onto [0, 1], clipped: clip((x - (mean - 2 std)) / (4 std), 0, 1).
    Invalid pixels are 0 either way.
    """
    if mode not in MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; one of {MODES}")
    image = jnp.moveaxis(pixels, 1, -1).astype(jnp.float32)
    if mode == "satmae_minmax" and stats is None:
        raise ValueError("mode 'satmae_minmax' needs band statistics (mean and std)")
    if stats is not None:
        shift, scale = _shift_scale(stats, mode)
        image = (image - shift) * scale
        if mode == "satmae_minmax":
            image = jnp.clip(image, 0.0, 1.0)
    image = jnp.where(valid[..., None], image, 0.0)
    return image.astype(dtype)


def model_inputs(batch: dict, stats: BandStats | None = None, dtype=jnp.float32,
                 mode: str = "standard") -> dict:
    """Every `pixels[_<s>x]` / `valid[_<s>x]` pair of a batch -> {'image[_<s>x]': (B, H, W, C)}
    (multi-scale batches carry one pair per scale; see eojax.data.multiscale)."""
    return {"image" + k[len("pixels"):]: to_model_input(v, batch["valid" + k[len("pixels"):]], stats,
                                                        dtype, mode)
            for k, v in batch.items() if k.startswith("pixels")}
