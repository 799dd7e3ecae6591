"""Pieces shared by the segmentation encoders: band names, missing-band filling, grid embeddings.

Every encoder here maps channels-last images to a list of (B, h, w, D) feature maps, one per entry
of its `layers` field (0-based block indices, as PANGAEA's output_layers), and exposes
`patch_size`, `embed_dim` and `bands` (the band names it was pretrained on; None when any band set
works, as DOFA).
"""
from __future__ import annotations

import logging
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.data import sensors

DEFAULT_LAYERS = (3, 5, 7, 11)


class PublishedViT(nn.Module):
    """The fields every imported ViT encoder shares (ViT-B defaults; an encoder overrides its own)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int | None = None
    layers: tuple = DEFAULT_LAYERS
    input_bands: tuple | None = None  # bands the data provides, by name; None: exactly `bands`
    sensor: str | None = None  # the input_bands' sensor (eojax.data.sensors); None: from the names
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    scan: bool = False
    remat: bool = False
    attention_impl: str | None = None
    drop_path_rate: float = 0.0  # stochastic-depth rate of the last block, 0 at the first (layers.Encoder)

    bands_sensor: ClassVar[str] = sensors.LEGACY_SENSOR  # the sensor of a fixed-band encoder's `bands`

    @property
    def embed_dim(self) -> int:
        return self.width

    def plan_bands(self) -> tuple[list[int | None], list[str], list[str]]:
        return plan_bands(self)


# Wavelengths in micrometres that DOFA generates its patch kernels from: the `wave_list` of PANGAEA's
# configs/encoder/dofa.yaml, exactly (Sentinel-2 MSI centres rounded as PANGAEA rounds them;
# Sentinel-1 C-band as 3.75), so Sentinel-2 bands given by name get the reference's kernels. Only
# DOFA reads it; bands of other sensors take the sensor registry's centres (eojax.data.sensors).
WAVELENGTHS_UM = {
    "B1": 0.44, "B2": 0.49, "B3": 0.56, "B4": 0.665, "B5": 0.705, "B6": 0.74, "B7": 0.783,
    "B8": 0.832, "B8A": 0.864, "B9": 0.945, "B10": 1.373, "B11": 1.61, "B12": 2.20,
    "VV": 3.75, "VH": 3.75, "ASC_VV": 3.75, "ASC_VH": 3.75, "DSC_VV": 3.75, "DSC_VH": 3.75,
    "VV-VH": 3.75,
}


def canonical_band(name: str) -> str:
    """'b02' -> 'B2', 'SR_B5' -> 'B5'; other names upper-cased (sensors.native_name)."""
    return sensors.native_name(name)


def data_bands(provided: Sequence[str], sensor: str | None, model: str) -> list[sensors.Band | None]:
    """The data's bands through the sensor registry (None for names it does not know, e.g. 'VV');
    a name that is ambiguous without a sensor is an error naming the choices."""
    provided = [str(b) for b in provided]
    keys = [canonical_band(b) for b in provided]
    dupes = sorted({b for b, k in zip(provided, keys) if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"{model}: input_bands {tuple(provided)} name {dupes} more than once")
    try:
        bands = sensors.resolve(provided, sensor, strict=False)
    except ValueError as e:
        raise ValueError(f"{model}: {e}") from None
    same = [f"{a} = {b}" for i, (a, x) in enumerate(zip(provided, bands)) for b, y in
            zip(provided[i + 1:], bands[i + 1:]) if x is not None and x.sensor and x == y]
    if same:
        raise ValueError(f"{model}: input_bands {tuple(provided)} name one band twice ({', '.join(same)})")
    return bands


def match_bands(slots: Sequence[sensors.Band], data: Sequence[sensors.Band | None]) -> list[int | None]:
    """For each encoder slot, the index of the data band filling it, or None: bands of the same
    common name, nearest centre wavelength first, each used once (three S2 red-edge bands go to
    their own slots; Landsat 8's B5 'nir08' to Sentinel-2's B8A)."""
    pairs = sorted((abs(s.centre_um - d.centre_um) if d.centre_um is not None else 0.0, i, j)
                   for i, s in enumerate(slots) for j, d in enumerate(data)
                   if d is not None and d.common_name is not None and d.common_name == s.common_name)
    source: list[int | None] = [None] * len(slots)
    used = set()
    for _, i, j in pairs:
        if source[i] is None and j not in used:
            source[i] = j
            used.add(j)
    return source


def band_plan(expected: Sequence[str], provided: Sequence[str] | None, model: str,
              sensor: str | None = None, expected_sensor: str = sensors.LEGACY_SENSOR
              ) -> tuple[list[int | None], list[str], list[str]]:
    """How to build the encoder's band stack from the data's bands.

    expected: the encoder's band names, bands of `expected_sensor`; provided: the data's, bands of
    `sensor` (None: found from the names, else each name must be unambiguous). Bands are matched by
    common name and wavelength (match_bands), not by name. Returns (source, missing, unused):
    source[i] is the index in the data of the encoder's band i, or None when the data lacks it (it
    is zero-filled, i.e. set to the normalised mean); unused are the data's bands the encoder has no
    slot for. provided=None means exactly `expected`.
    """
    if provided is None:
        return list(range(len(expected))), [], []
    provided = [str(b) for b in provided]
    data = data_bands(provided, sensor, model)
    source = match_bands(sensors.resolve(expected, expected_sensor), data)
    missing = [b for b, s in zip(expected, source) if s is None]
    unused = [b for j, b in enumerate(provided) if j not in source]
    if len(missing) == len(expected):
        raise ValueError(f"{model}: none of the data's bands {tuple(provided)} is one of the "
                         f"encoder's {tuple(expected)}")
    return source, missing, unused


def plan_bands(encoder) -> tuple[list[int | None], list[str], list[str]]:
    """band_plan of a fixed-band encoder's `bands` (of its `bands_sensor`) and its input_bands (of
    its `sensor`)."""
    return band_plan(encoder.bands, encoder.input_bands, type(encoder).__name__.lower(), encoder.sensor,
                     encoder.bands_sensor)


def arrange_bands(images, expected: Sequence[str], provided: Sequence[str] | None, model: str,
                  sensor: str | None = None, expected_sensor: str = sensors.LEGACY_SENSOR):
    """(..., len(provided)) -> (..., len(expected)) in the encoder's band order, missing bands zero.
    Warns (once per trace) which bands are zero-filled and which are dropped."""
    n = len(expected) if provided is None else len(provided)
    if images.shape[-1] != n:
        what = "its bands" if provided is None else f"input_bands {tuple(provided)}"
        raise ValueError(f"{model}: images have {images.shape[-1]} channels (last axis of "
                         f"{images.shape}) but {what} say {n}")
    source, missing, unused = band_plan(expected, provided, model, sensor, expected_sensor)
    if missing:
        logging.warning("%s: the data lacks bands %s; they are zero-filled", model, missing)
    if unused:
        logging.warning("%s: the encoder has no slot for bands %s; they are dropped", model, unused)
    if source == list(range(n)) and n == len(expected):
        return images
    zero = jnp.zeros(images.shape[:-1], images.dtype)
    return jnp.stack([zero if s is None else images[..., s] for s in source], axis=-1)


def resize_grid_embed(pe, src: Sequence[int], dst: Sequence[int]):
    """(prod(src), D) embedding of a row-major token grid -> (prod(dst), D), resampled bicubically
    over every grid axis (jax.image.resize: Keys cubic a = -0.5, half-pixel centres, no antialias,
    so shrinking 3 frames to 1 picks the middle frame). Identity when the grids agree."""
    src, dst = tuple(int(s) for s in src), tuple(int(s) for s in dst)
    if src == dst:
        return pe
    if pe.shape[0] != int(np.prod(src)):
        raise ValueError(f"position embedding of {pe.shape[0]} rows is not a {src} grid")
    grid = jnp.asarray(pe).reshape(*src, pe.shape[-1])
    out = jax.image.resize(grid.astype(jnp.float32), (*dst, pe.shape[-1]), "bicubic",
                           antialias=False)
    return out.reshape(-1, pe.shape[-1]).astype(pe.dtype)


def check_layers(layers: Sequence[int], depth: int, model: str) -> tuple[int, ...]:
    layers = tuple(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if not layers or bad:
        raise ValueError(f"{model}: layers {layers} must be block indices in 0..{depth - 1}")
    return layers


def grid_of(size: int, patch: int, what: str) -> int:
    if size % patch:
        raise ValueError(f"{what}: image size {size} is not divisible by patch size {patch}")
    return size // patch
