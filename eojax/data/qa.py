"""Quality-assessment bits -> one class per pixel: clear / cloud / shadow / snow / water / fill.

Formats (bit 0 is the least significant):
- 'hls_fmask' (HLS v2 Fmask, uint8): 0 cirrus, 1 cloud, 2 adjacent to cloud/shadow, 3 cloud shadow,
  4 snow/ice, 5 water, 6-7 aerosol level (ignored). 255 is the file's nodata -> fill.
- 'landsat_c1' (Landsat Collection-1 BQA, uint16): 0 designated fill, 4 cloud, 5-6 cloud confidence,
  7-8 cloud-shadow confidence, 9-10 snow/ice confidence, 11-12 cirrus confidence (confidence
  pairs: 0 not determined, 1 low, 2 medium, 3 high). Collection 1 has no water flag.
- 'landsat_c2' (Landsat Collection-2 QA_PIXEL, uint16): 0 fill, 1 dilated cloud, 2 cirrus, 3 cloud,
  4 cloud shadow, 5 snow, 7 water.
- 'eojax_synthetic' (eojax.data.synthetic QA band): 0 fill, 1 cloud, 2 cloud shadow, 3 clear.

Precedence when several flags are set (the first wins): fill > cloud > shadow > snow > water > clear.
Fill first because nothing was measured; cloud before shadow because a cloud pixel's value is the
cloud; snow and water are real surface observations, so they only matter for the clear/unclear split
of callers that want them (`usable` treats snow and water as usable by default).
Cirrus, HLS 'adjacent' and C2 'dilated cloud' count as cloud: their values are contaminated.
Landsat C1 confidences count when they reach `min_confidence` (default 3 = high, as USGS advises
for the cloud-shadow / snow / cirrus pairs; the cloud bit 4 is used as it is).
"""
from __future__ import annotations

import numpy as np

CLEAR, CLOUD, SHADOW, SNOW, WATER, FILL = range(6)
CLASS_NAMES = ("clear", "cloud", "shadow", "snow", "water", "fill")
FORMATS = ("hls_fmask", "landsat_c1", "landsat_c2", "eojax_synthetic")


def _bit(qa, b):
    return (qa >> b) & 1 == 1


def _pair(qa, b):
    return (qa >> b) & 3


def _classify(fill, cloud, shadow, snow, water) -> np.ndarray:
    """Flag masks -> class per pixel with the documented precedence (np.select takes the first)."""
    return np.select([fill, cloud, shadow, snow, water], [FILL, CLOUD, SHADOW, SNOW, WATER],
                     CLEAR).astype(np.uint8)


def decode(qa: np.ndarray, fmt: str, *, min_confidence: int = 3, nodata=None) -> np.ndarray:
    """QA integers (any shape) -> uint8 classes (CLEAR .. FILL), same shape.

    `nodata`: a QA value meaning "no data" (e.g. the file's nodata tag); defaults to 255 for HLS.
    NaN (a warped pixel outside the source footprint) is fill in every format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown QA format {fmt!r}; one of {FORMATS}")
    if not 1 <= min_confidence <= 3:
        raise ValueError(f"min_confidence={min_confidence} must be 1 (low), 2 (medium) or 3 (high)")
    qa = np.asarray(qa)
    missing = np.isnan(qa) if np.issubdtype(qa.dtype, np.floating) else np.zeros(qa.shape, bool)
    if np.issubdtype(qa.dtype, np.floating):
        finite = qa[~missing]
        if finite.size and (np.any(finite != np.round(finite)) or finite.min() < 0):
            raise ValueError("QA values must be non-negative integers (bit flags); got fractional or "
                             "negative values - was the QA band resampled with a non-nearest method?")
    q = np.where(missing, 0, qa).astype(np.int64)
    if nodata is None and fmt == "hls_fmask":
        nodata = 255
    fill = missing | (q == nodata if nodata is not None else False)
    if fmt == "hls_fmask":
        return _classify(fill, _bit(q, 0) | _bit(q, 1) | _bit(q, 2), _bit(q, 3), _bit(q, 4), _bit(q, 5))
    if fmt == "landsat_c1":
        c = min_confidence
        cloud = _bit(q, 4) | (_pair(q, 5) >= c) | (_pair(q, 11) >= c)
        return _classify(fill | _bit(q, 0), cloud, _pair(q, 7) >= c, _pair(q, 9) >= c,
                         np.zeros(q.shape, bool))
    if fmt == "landsat_c2":
        return _classify(fill | _bit(q, 0), _bit(q, 1) | _bit(q, 2) | _bit(q, 3), _bit(q, 4),
                         _bit(q, 5), _bit(q, 7))
    # eojax_synthetic
    return _classify(fill | _bit(q, 0), _bit(q, 1), _bit(q, 2), np.zeros(q.shape, bool),
                     np.zeros(q.shape, bool))


def usable(classes: np.ndarray, *, snow: bool = True, water: bool = True) -> np.ndarray:
    """Pixels whose values are a surface observation: clear, plus snow / water unless excluded."""
    ok = classes == CLEAR
    if snow:
        ok |= classes == SNOW
    if water:
        ok |= classes == WATER
    return ok


def to_fill(classes: np.ndarray) -> np.ndarray:
    """Pixels an infiller should fill: cloud or shadow (fill = outside the scene, never invented)."""
    return (classes == CLOUD) | (classes == SHADOW)
