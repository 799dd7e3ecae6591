"""Raw windows -> model input, inside the jitted step.

The host pipeline only reads: pixels arrive band-first in the raster's own dtype, exactly as GDAL
delivers them. Casting, moving channels last, normalising and zeroing nodata are elementwise work that
XLA fuses into the train step almost for free, while on the host it cost as much as the read itself.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from eojax.data.stats import BandStats


def to_model_input(pixels, valid, stats: BandStats | None = None, dtype=jnp.float32):
    """pixels (B, C, H, W) any dtype, valid (B, H, W) -> image (B, H, W, C) `dtype`.

    With `stats`, each band becomes (x - mean) / std (a band with std 0 is only centred); invalid
    pixels are 0 either way, i.e. the band mean after normalisation.
    """
    image = jnp.moveaxis(pixels, 1, -1).astype(jnp.float32)
    if stats is not None:
        mean = jnp.asarray(np.asarray(stats.mean, np.float32))
        std = np.asarray(stats.std, np.float32)
        inv = jnp.asarray(np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0).astype(np.float32))
        image = (image - mean) * inv
    image = jnp.where(valid[..., None], image, 0.0)
    return image.astype(dtype)
