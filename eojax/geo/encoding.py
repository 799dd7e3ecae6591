"""Encodings of coordinates and day of year in [0, 1], their exact inverses, and unit vectors.

As the PhilEO geographical expert: lat_enc = (90 - lat) / 180 (the co-latitude over pi), longitude
as ((sin + 1) / 2, (cos + 1) / 2) so that -180 and 180 meet, day of year likewise on a circle of
365 days. Decoding uses atan2, so it is exact up to float rounding and insensitive to a common
scale of the two circle components (a model's outputs need not lie on the circle).

The functions work on numpy and jax arrays alike (they only use the array namespace of the input).
"""
from __future__ import annotations

import numpy as np

DAYS = 365.0


def _xp(x):
    """numpy for numpy input, jax.numpy for jax arrays."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    import jax.numpy as jnp
    return jnp


def encode_coords(lat, lon):
    """lat, lon degrees (...,) -> (..., 3): (lat_enc, lon_sin, lon_cos), all in [0, 1]."""
    xp = _xp(lat)
    lat, lon = xp.asarray(lat), xp.asarray(lon)
    lam = xp.deg2rad(lon)
    return xp.stack([(90.0 - lat) / 180.0, (xp.sin(lam) + 1) / 2, (xp.cos(lam) + 1) / 2], axis=-1)


def decode_coords(enc):
    """(..., 3) encodings -> (lat, lon) degrees; lon in (-180, 180]."""
    xp = _xp(enc)
    lat = 90.0 - 180.0 * enc[..., 0]
    lon = xp.rad2deg(xp.arctan2(2 * enc[..., 1] - 1, 2 * enc[..., 2] - 1))
    return lat, lon


def encode_doy(doy):
    """Day of year (1..365; 366 wraps to 1) -> (..., 2): ((1 + sin) / 2, (1 + cos) / 2)."""
    xp = _xp(doy)
    a = 2 * np.pi * xp.asarray(doy) / DAYS
    return xp.stack([(1 + xp.sin(a)) / 2, (1 + xp.cos(a)) / 2], axis=-1)


def decode_doy(enc):
    """(..., 2) -> day of year in [0.5, 365.5) (day 365 and day 0 are the same point on the circle;
    the half-day offset keeps days 1..365 exact)."""
    xp = _xp(enc)
    d = xp.arctan2(2 * enc[..., 0] - 1, 2 * enc[..., 1] - 1) * DAYS / (2 * np.pi)
    d = xp.mod(d, DAYS)
    return xp.where(d < 0.5, d + DAYS, d)


def latlon_to_xyz(lat, lon):
    """Degrees -> unit vectors (..., 3) on the sphere (x towards (0, 0), z towards the north pole)."""
    xp = _xp(lat)
    phi, lam = xp.deg2rad(xp.asarray(lat)), xp.deg2rad(xp.asarray(lon))
    return xp.stack([xp.cos(phi) * xp.cos(lam), xp.cos(phi) * xp.sin(lam), xp.sin(phi)], axis=-1)


def xyz_to_latlon(xyz):
    """Vectors (..., 3) (any length > 0) -> (lat, lon) degrees."""
    xp = _xp(xyz)
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    return xp.rad2deg(xp.arctan2(z, xp.hypot(x, y))), xp.rad2deg(xp.arctan2(y, x))


def circular_doy_error(a, b):
    """Days between two days of year on the 365-day circle, in [0, 182.5]."""
    xp = _xp(a)
    d = xp.mod(xp.asarray(a) - xp.asarray(b), DAYS)
    return xp.minimum(d, DAYS - d)
