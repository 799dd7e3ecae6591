"""Geographic evaluation: great-circle error (haversine), climate top-1, circular day-of-year error.

Eval outputs are summed elementwise over batches by the trainer, so medians and "within d km"
fractions come from fixed histograms: great-circle errors in 1 km bins up to 2,500 km and 10 km bins
up to 20,040 km (half the circumference, the largest possible error), day-of-year errors in 1-day
bins. The thresholds 25, 200, 750, 2500 km are bin edges, so those fractions are exact; medians are
interpolated linearly inside their bin (resolution 1 km below 2,500 km, 10 km above; 1 day).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

EARTH_RADIUS_KM = 6371.0
THRESHOLDS_KM = (25, 200, 750, 2500)
KM_EDGES = np.concatenate([np.arange(0, 2500, 1.0), np.arange(2500, 20040 + 1, 10.0)])
DAY_EDGES = np.arange(0, 184, 1.0)


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km between points given in degrees (numpy or jax arrays)."""
    xp = jnp if any(isinstance(a, jnp.ndarray) and not isinstance(a, np.ndarray)
                    for a in (lat1, lon1, lat2, lon2)) else np
    p1, p2 = xp.deg2rad(lat1), xp.deg2rad(lat2)
    dp, dl = p2 - p1, xp.deg2rad(lon2) - xp.deg2rad(lon1)
    h = xp.sin(dp / 2) ** 2 + xp.cos(p1) * xp.cos(p2) * xp.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * xp.arcsin(xp.sqrt(xp.clip(h, 0.0, 1.0)))


def histogram(values, weights, edges: np.ndarray):
    """Weighted counts of `values` in the bins [edges[i], edges[i+1]) (the last bin also takes
    everything beyond) (jax, inside the eval step)."""
    idx = jnp.clip(jnp.searchsorted(jnp.asarray(edges, jnp.float32), values, side="right") - 1,
                   0, len(edges) - 1)
    return jnp.zeros(len(edges), jnp.float32).at[idx].add(weights)


def hist_quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """The q-quantile of histogrammed values, linear inside its bin; NaN for an empty histogram."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    widths = np.diff(np.append(edges, edges[-1] + (edges[-1] - edges[-2])))
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, q * total, side="left"))
    before = cum[i - 1] if i > 0 else 0.0
    inside = (q * total - before) / counts[i] if counts[i] > 0 else 0.0
    return float(edges[i] + inside * widths[i])


def fraction_below(counts: np.ndarray, edges: np.ndarray, threshold: float) -> float:
    """Fraction of histogrammed values < threshold (threshold must be a bin edge)."""
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    k = int(np.searchsorted(edges, threshold))
    if k >= len(edges) or edges[k] != threshold:
        raise ValueError(f"{threshold} is not a histogram edge")
    return float(counts[:k].sum() / total) if total > 0 else float("nan")


def summarize(sums: dict, prefix: str = "") -> dict[str, float]:
    """Metrics from summed histograms / counts with keys `<prefix>km_hist`, `<prefix>day_hist`,
    `<prefix>fine_correct`, `<prefix>coarse_correct`, and `count`, `land`, `dated`."""
    out = {}
    count = max(float(sums["count"]), 1e-12)
    out["climate_top1"] = float(sums[prefix + "fine_correct"]) / count
    out["climate_coarse_top1"] = float(sums[prefix + "coarse_correct"]) / count
    km = sums[prefix + "km_hist"]
    out["km_median"] = hist_quantile(km, KM_EDGES, 0.5)
    out["km_p25"] = hist_quantile(km, KM_EDGES, 0.25)
    out["km_p75"] = hist_quantile(km, KM_EDGES, 0.75)
    for t in THRESHOLDS_KM:
        out[f"within_{t}km"] = fraction_below(km, KM_EDGES, t)
    if float(sums.get("dated", 0.0)) > 0:
        out["doy_error_days"] = float(sums[prefix + "day_error_sum"]) / float(sums["dated"])
        out["doy_error_median"] = hist_quantile(sums[prefix + "day_hist"], DAY_EDGES, 0.5)
    return out
