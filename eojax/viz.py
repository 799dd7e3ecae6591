"""The pictures a user looks at. matplotlib-free PNGs (Pillow) so they render anywhere, fast."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from PIL import Image

# True-colour band names per sensor convention (Sentinel-2 and Landsat 8 share B4/B3/B2 = R/G/B).
_RGB_NAMES = (("B4", "B3", "B2"), ("B04", "B03", "B02"), ("red", "green", "blue"), ("R", "G", "B"))


def rgb_indices(band_names: Sequence[str]) -> list[int]:
    """Indices of red, green, blue among `band_names`, else the first three bands (or one, as grey)."""
    lower = [str(b).lower() for b in band_names]
    for names in _RGB_NAMES:
        if all(n.lower() in lower for n in names):
            return [lower.index(n.lower()) for n in names]
    return list(range(min(3, len(band_names)))) if len(band_names) >= 3 else [0, 0, 0]


def to_rgb8(image: np.ndarray, band_names: Sequence[str], valid: np.ndarray | None = None,
            ref: np.ndarray | None = None) -> np.ndarray:
    """(H, W, C) -> (H, W, 3) uint8 with a 2-98 percentile stretch per band (taken from `ref` if given,
    so an original and its reconstruction share one stretch). Invalid pixels are black."""
    idx = rgb_indices(band_names)
    rgb = image[..., idx].astype(np.float64)
    base = (ref if ref is not None else image)[..., idx].astype(np.float64)
    sel = base[valid] if valid is not None and valid.any() else base.reshape(-1, 3)
    lo, hi = np.percentile(sel, 2, axis=0), np.percentile(sel, 98, axis=0)
    out = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    if valid is not None:
        out = out * valid[..., None]
    return (out * 255).round().astype(np.uint8)


def resize_nearest(tile: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (size, size, 3) by pixel repetition, to show scales side by side."""
    return np.asarray(Image.fromarray(tile).resize((size, size), Image.NEAREST))


def save_grid_png(path: str, rows: list[list[np.ndarray]], pad: int = 2, scale: int = 0) -> str:
    """Tiles (H, W, 3) uint8 images in rows; each tile is enlarged `scale` times (nearest; 0 = enough
    for tiles of at least 128 pixels, so small test windows stay readable)."""
    h, w = rows[0][0].shape[:2]
    scale = scale or max(1, 128 // max(h, w))
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = tile
    img = Image.fromarray(canvas)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path


def save_reconstruction_png(path, images, valid, masked_px, recon, band_names) -> str:
    """One row per tile: original | what the encoder saw (masked patches grey) | reconstruction
    (visible patches pasted back, as in the MAE paper)."""
    rows = []
    for img, val, msk, rec in zip(images, valid, masked_px, recon):
        original = to_rgb8(img, band_names, val)
        seen = original.copy()
        seen[msk] = 128
        pasted = np.where(msk[..., None], rec, img)
        rows.append([original, seen, to_rgb8(rec, band_names, val, ref=img), to_rgb8(pasted, band_names, val, ref=img)])
    return save_grid_png(path, rows)
