"""Multi-scale windows: one native-resolution window and its block means (SatMAE++-style targets).

With scales (1, 2, 4) and a window of W pixels, one native window of 4W x 4W is read; it is the 4x
target as is, and its 2 x 2 and 4 x 4 block means are the 2x target (2W) and the 1x input (W). So the
higher-resolution targets are real pixels, not upsampled inputs.

Averaging rule: a block's value is the mean over its valid native pixels (per band); the block is
valid when at least half of its native pixels are valid (count * 2 >= f * f), otherwise its value is
0. Every coarser scale is averaged straight from the native window, never from another coarse one.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def scale_key(base: str, scale: int) -> str:
    """'pixels', 1 -> 'pixels'; 'pixels', 2 -> 'pixels_2x'."""
    return base if scale == 1 else f"{base}_{scale}x"


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Validated scales: ascending, distinct, starting at 1, each dividing the largest."""
    scales = tuple(int(s) for s in scales)
    if not scales or scales[0] != 1 or list(scales) != sorted(set(scales)) or any(
            scales[-1] % s for s in scales):
        raise ValueError(f"scales must be ascending distinct integers starting at 1, each dividing the "
                         f"largest, e.g. (1, 2, 4); got {scales}")
    return scales


def block_mean(pixels: np.ndarray, valid: np.ndarray, factor: int,
               out: np.ndarray | None = None, valid_out: np.ndarray | None = None):
    """(C, H, W) pixels and (H, W) validity -> their factor x factor block means (see the rule above).

    H and W must be multiples of `factor`; invalid native pixels (NaN, nodata) never enter a mean.
    """
    c, h, w = pixels.shape
    if h % factor or w % factor:
        raise ValueError(f"a {h}x{w} window is not a whole number of {factor}x{factor} blocks")
    hb, wb = h // factor, w // factor
    sums = np.where(valid, pixels, 0).reshape(c, hb, factor, wb, factor).sum(axis=(2, 4),
                                                                             dtype=np.float32)
    counts = valid.reshape(hb, factor, wb, factor).sum(axis=(1, 3))
    ok = 2 * counts >= factor * factor
    mean = np.where(ok, sums / np.maximum(counts, 1), 0)
    if out is None:
        return mean.astype(np.float32), ok
    out[...] = mean
    valid_out[...] = ok
    return out, valid_out


def read_multiscale(scene, window, scales: Sequence[int], batch: dict, k: int):
    """Reads the native `window` of `scene` into slot k of every scale's arrays in `batch`."""
    top = scales[-1]
    native, native_valid = batch[scale_key("pixels", top)][k], batch[scale_key("valid", top)]
    _, native_valid[k] = scene.read_pixels(window, out=native)
    for s in scales[:-1]:
        block_mean(native, native_valid[k], top // s, out=batch[scale_key("pixels", s)][k],
                   valid_out=batch[scale_key("valid", s)][k])
