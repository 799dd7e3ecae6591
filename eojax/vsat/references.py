"""The simple references a gap filler must beat, computed from the same knowledge the model has.

For hidden pixels (ys, xs) of date t, knowing `known` (T, H, W) (clear and not hidden):

- linear:   per pixel, linear interpolation in time between its nearest known dates before and
            after t (the nearest one alone at either end of the series);
- nearest:  per pixel, its value on the nearest known date (ties: the earlier);
- nearest_shifted: the nearest known date's value plus the target date's mean change from that
            date, measured on the pixels known on both dates (none shared: unshifted);
- median:   per band, the median of the target date's known pixels (one value for every pixel).

Each returns (values (N, C) float64, ok (N,) bool); ok False where it has nothing to go on.
"""
from __future__ import annotations

import numpy as np

NAMES = ("linear", "nearest", "nearest_shifted", "median")


def compute(values: np.ndarray, known: np.ndarray, days: np.ndarray, t: int, ys, xs) -> dict:
    """values (T, C, H, W) (anything where not known), days (T,) in days -> {name: (pred, ok)}."""
    days = np.asarray(days, np.float64)
    ys, xs = np.asarray(ys), np.asarray(xs)
    use = known[:, ys, xs].T.copy()  # (N, T)
    use[:, t] = False
    vals = np.moveaxis(values[:, :, ys, xs], 2, 0).astype(np.float64)  # (N, T, C)
    n, nt = use.shape
    rows = np.arange(n)
    before, after = use & (days < days[t]), use & (days > days[t])
    has_b, has_a = before.any(1), after.any(1)
    ib = nt - 1 - np.argmax(before[:, ::-1], axis=1)
    ia = np.argmax(after, axis=1)
    vb, va = vals[rows, ib], vals[rows, ia]
    frac = ((days[t] - days[ib]) / np.where(has_a & has_b, days[ia] - days[ib], 1.0))[:, None]
    linear = np.where((has_b & has_a)[:, None], vb + frac * (va - vb), np.where(has_b[:, None], vb, va))
    nearest_t = np.argmin(np.where(use, np.abs(days[None] - days[t]), np.inf), axis=1)
    nearest = vals[rows, nearest_t]
    ok = use.any(1)

    # The target date's mean change from each other date, on the pixels known on both.
    shift = np.zeros((nt, values.shape[1]))
    for d in range(nt):
        both = known[d] & known[t]
        if d != t and both.any():
            shift[d] = (values[t][:, both].astype(np.float64) - values[d][:, both]).mean(1)
    shifted = nearest + shift[nearest_t]

    visible = known[t]
    if visible.any():
        med = np.median(values[t][:, visible].astype(np.float64), axis=1)
        median = (np.broadcast_to(med, (n, len(med))).copy(), np.ones(n, bool))
    else:
        median = (np.zeros((n, values.shape[1])), np.zeros(n, bool))
    return {"linear": (linear, ok), "nearest": (nearest, ok), "nearest_shifted": (shifted, ok),
            "median": median}
