"""Losses of the geographic heads (jax): hierarchical climate cross-entropy, the mixture of
von Mises-Fisher distributions on the sphere (Izbicki et al. 2019), and their weighted sum.

All per-example losses are averaged with a weight per example (0 for padding rows), and the
coordinate and date losses also with a land mask: a tile that is (almost) all sea has no learnable
location or season, so only the climate loss ('sea') sees it. A batch without any counted row gives
0 for that part, never 0/0.

`mode` ('exact', the default, or 'reference') chooses between eojax's losses and those of the PhilEO
reference (LuytsA/Phileo-geographical-expert: MvMFLoss, GeographicalLoss), kept so its numbers can be
reproduced: the reference's vMF normaliser is log(2 kappa) - kappa (the large-kappa limit of
log(kappa / sinh kappa), without the 1/(4 pi) of a density per steradian), its coarse climate logits
and targets are the means of the member logits and targets, its land rule is sea fraction < 0.95
(eojax: 0.9), and a batch without land rows is trained on the climate loss alone, unweighted
(training_loop_inf.py). The reference mode is tested against the reference's own code (tests/test_geo.py).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from eojax.geo import encoding
from eojax.geo.climate import membership

DEFAULT_WEIGHTS = (1.0, 5.0, 8.0)  # coordinates, climate, date (summing to 14), as the reference
LOSS_MODES = ("exact", "reference")
# Tiles with at least this sea fraction are sea (no coordinate or date loss), per mode.
SEA_THRESHOLDS = {"exact": 0.9, "reference": 0.95}


def check_mode(mode: str) -> str:
    if mode not in LOSS_MODES:
        raise ValueError(f"the geographic loss mode must be one of {LOSS_MODES}, got {mode!r}")
    return mode


def sea_threshold(model_cfg) -> float:
    """The land rule of a model config: model.sea_threshold, or the loss mode's when it is unset."""
    value = model_cfg.get("sea_threshold")
    return SEA_THRESHOLDS[check_mode(model_cfg.get("loss_mode", "exact"))] if value is None else float(value)


def weighted_mean(values, weights):
    """sum(w v) / sum(w), and 0 when every weight is 0 (no NaN, no gradient blow-up)."""
    total = jnp.sum(weights)
    return jnp.sum(values * weights) / jnp.maximum(total, 1e-12) * (total > 0)


# -- climate ------------------------------------------------------------------------------------------
def coarse_log_probs(logits):
    """(B, 31) fine logits -> (B, 6) coarse-group log-probabilities: log-sum-exp of each group's
    member logits minus the log-sum-exp of all (the exact log of the summed fine probabilities)."""
    member = jnp.asarray(membership(), bool)  # (31, 6)
    grouped = jnp.where(member[None], logits[..., :, None], -jnp.inf)
    return jax.nn.logsumexp(grouped, axis=-2) - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def climate_loss(logits, targets, mode: str = "exact"):
    """Per-example 0.5 * CE(fine, soft targets) + 0.5 * CE(coarse groups, summed targets).

    The reference ('reference') averaged the member logits and targets of each group, so its coarse
    targets do not sum to 1; here ('exact') the coarse probabilities are the sums of the fine ones and
    the coarse targets the sums of the fine targets, a proper distribution."""
    fine = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    member = membership()
    if check_mode(mode) == "reference":
        mean = jnp.asarray(member / member.sum(0))  # (31, 6): each group's mean over its members
        coarse_logits = logits @ mean
        coarse = -jnp.sum((targets @ mean) * jax.nn.log_softmax(coarse_logits, axis=-1), axis=-1)
    else:
        coarse = -jnp.sum((targets @ jnp.asarray(member)) * coarse_log_probs(logits), axis=-1)
    return 0.5 * fine + 0.5 * coarse


# -- von Mises-Fisher mixture --------------------------------------------------------------------------
def log_c3(kappa):
    """log of the vMF normaliser on S^2, C3 = kappa / (4 pi sinh kappa), written so it is finite
    for kappa from ~1e-30 to 1e30: log kappa - log 2 pi - kappa - log(1 - exp(-2 kappa))."""
    return jnp.log(kappa) - math.log(2 * math.pi) - kappa - jnp.log(-jnp.expm1(-2 * kappa))


def vmf_log_components(log_kappa, centres, xyz, mode: str = "exact"):
    """(B, K) log C3(kappa_k) + kappa_k mu_k . x, with the large terms cancelled analytically:
    [log kappa - log 2 pi - log(1 - exp(-2 kappa))] - kappa |mu - x|^2 / 2 (for unit vectors
    1 - mu.x = |mu - x|^2 / 2). Neither kappa nor kappa mu.x (both ~1e6 at kappa 1e6) is ever
    formed, and the squared chord keeps float32 precision for points close to a centre, where
    1 - mu.x would be lost to rounding. mode='reference': the reference's log(2 kappa) for the
    normaliser (log 4 pi + log(1 - exp(-2 kappa)) above the exact one)."""
    kappa = jnp.exp(log_kappa)
    half_chord2 = 0.5 * jnp.sum((xyz[:, None, :] - centres[None, :, :]) ** 2, axis=-1)  # (B, K)
    if check_mode(mode) == "reference":
        head = math.log(2.0) + log_kappa
    else:
        head = log_kappa - math.log(2 * math.pi) - jnp.log(-jnp.expm1(-2 * kappa))
    return head[None] - kappa[None] * half_chord2


def vmf_mixture_nll(logits, log_kappa, centres, xyz, mode: str = "exact"):
    """Per-example -log sum_k pi_k vMF(x; mu_k, kappa_k), pi = softmax(logits): the negative log
    density per steradian of the true location x (unit vector (B, 3)); log-sum-exp throughout."""
    log_pi = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jax.nn.logsumexp(log_pi + vmf_log_components(log_kappa, centres, xyz, mode), axis=-1)


def vmf_mixture_log_density(logits, log_kappa, centres, xyz_grid):
    """log density of each example's mixture at every grid point: (B, N) (for the world map)."""
    log_pi = jax.nn.log_softmax(logits, axis=-1)  # (B, K)
    comp = vmf_log_components(log_kappa, centres, xyz_grid)  # (N, K)
    return jax.nn.logsumexp(log_pi[:, None, :] + comp[None], axis=-1)


def mixture_mode_xyz(logits, log_kappa, centres):
    """A point estimate of the location: the centre of the component with the largest weighted peak
    density (log pi_k + log C3(kappa_k) + kappa_k, i.e. its value at its own centre)."""
    log_pi = jax.nn.log_softmax(logits, axis=-1)
    kappa = jnp.exp(log_kappa)
    peak = log_pi + log_kappa - math.log(2 * math.pi) - jnp.log(-jnp.expm1(-2 * kappa))
    return centres[jnp.argmax(peak, axis=-1)]


# -- mixture centres (numpy, once) ----------------------------------------------------------------------
def fibonacci_centres(k: int) -> np.ndarray:
    """k nearly uniform unit vectors (Fibonacci lattice), (k, 3)."""
    i = np.arange(k) + 0.5
    z = 1 - 2 * i / k
    phi = np.pi * (1 + 5 ** 0.5) * i
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], -1)


def random_centres(k: int, seed: int = 0) -> np.ndarray:
    """k uniformly random unit vectors (normalised Gaussians), (k, 3)."""
    v = np.random.default_rng(seed).standard_normal((k, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def dedup_centres(latlon: np.ndarray, min_km: float, max_centres: int | None = None) -> np.ndarray:
    """Training locations (n, 2) degrees thinned greedily so no two kept ones are closer than
    `min_km` (great-circle), in the order given; (k, 3) unit vectors."""
    from eojax.geo.metrics import EARTH_RADIUS_KM
    xyz = encoding.latlon_to_xyz(np.asarray(latlon[:, 0], np.float64), np.asarray(latlon[:, 1], np.float64))
    min_cos = math.cos(min_km / EARTH_RADIUS_KM)
    kept: list[np.ndarray] = []
    for v in xyz:
        if not kept or np.max(np.stack(kept) @ v) < min_cos:
            kept.append(v)
            if max_centres and len(kept) >= max_centres:
                break
    return np.stack(kept)


def load_centres(path: str) -> np.ndarray:
    """Centres from a file: .npy or .npz ('centres'), either (k, 2) lat/lon degrees or (k, 3) unit
    vectors; or a CSV of lat,lon rows. Never unpickles."""
    if path.endswith(".csv"):
        arr = np.loadtxt(path, delimiter=",", ndmin=2, comments="#")
    else:
        data = np.load(path, allow_pickle=False)
        arr = data["centres"] if hasattr(data, "files") else data
    arr = np.asarray(arr, np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3) or not np.all(np.isfinite(arr)) or len(arr) == 0:
        raise ValueError(f"{path}: vMF centres must be a finite (k, 2) lat/lon or (k, 3) array, "
                         f"got shape {arr.shape}")
    if arr.shape[1] == 2:
        if np.any(np.abs(arr[:, 0]) > 90):
            raise ValueError(f"{path}: latitudes beyond +-90 degrees in the centres file")
        return encoding.latlon_to_xyz(arr[:, 0], arr[:, 1])
    norm = np.linalg.norm(arr, axis=-1, keepdims=True)
    if np.any(norm < 1e-9):
        raise ValueError(f"{path}: a zero vector among the vMF centres")
    return arr / norm


# -- the geographic loss ----------------------------------------------------------------------------------
def geographic_loss(out: dict, labels: dict, weight, *, coord_loss: str = "vmf", log_kappa=None,
                    centres=None, loss_weights=DEFAULT_WEIGHTS, sea_threshold: float | None = None,
                    mode: str = "exact"):
    """(loss, parts) for a batch.

    out: 'climate' (B, 31) logits, 'date' (B, 2) encodings, and 'coords' (B, 3) encodings (mse) or
      'vmf' (B, K) mixture logits (vmf, with `log_kappa` (K,) and `centres` (K, 3)).
    labels: 'climate' (B, 31) fractions, 'coords' (B, 3), 'latlon' (B, 2), 'date' (B, 2), 'doy' (B,).
    weight: (B,) per-example weight (0 = padding).
    Coordinates and dates count only on land tiles (sea fraction < sea_threshold, by default the
    mode's: 0.9 exact, 0.95 reference); dates only where the acquisition date is known (doy > 0).
    mode: 'exact' or 'reference' (the module docstring); in 'reference' a batch without land rows
    has loss = its climate loss, as the reference's training loop.
    """
    sea_threshold = SEA_THRESHOLDS[check_mode(mode)] if sea_threshold is None else sea_threshold
    weight = weight.astype(jnp.float32)
    land = weight * (labels["climate"][:, 0] < sea_threshold)
    dated = land * (labels["doy"] > 0)
    climate = weighted_mean(climate_loss(out["climate"], labels["climate"], mode), weight)
    if coord_loss == "vmf":
        xyz = encoding.latlon_to_xyz(labels["latlon"][:, 0], labels["latlon"][:, 1])
        per = vmf_mixture_nll(out["vmf"], log_kappa, centres, xyz, mode)
    elif coord_loss == "mse":
        per = jnp.mean((out["coords"] - labels["coords"]) ** 2, axis=-1)
    else:
        raise ValueError(f"coord_loss must be 'vmf' or 'mse', got {coord_loss!r}")
    coords = weighted_mean(per, land)
    date = weighted_mean(jnp.mean((out["date"] - labels["date"]) ** 2, axis=-1), dated)
    wc, wk, wd = loss_weights
    loss = (wc * coords + wk * climate + wd * date) / (wc + wk + wd)
    if mode == "reference":
        loss = jnp.where(jnp.sum(land) > 0, loss, climate)
    return loss, {"coord_loss": coords, "climate_loss": climate, "date_loss": date,
                  "land_fraction": jnp.sum(land) / jnp.maximum(jnp.sum(weight), 1e-12)}
