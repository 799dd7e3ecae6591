"""Frechet distance between two feature distributions, and the feature extractors it is taken in.

FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted to the features
(Heusel et al. 2017). The matrix square root is scipy.linalg.sqrtm on the host, as pytorch-fid does:
if the product is near-singular (non-finite root), eps * I is added to both covariances; a root with
a non-negligible imaginary part is an error; otherwise its real part is used.

Features: `MAEFeatures` mean-pools the tokens of an eojax MAE / ViT encoder, either from an eojax MAE
run (a remote-sensing feature space, trained on your data) or a fixed random-init encoder (with a
warning: untrained features only compare low-level statistics). The covariance of D-dim features
needs well over D samples: fewer than D samples give a singular covariance and an FD dominated by
noise, so `frechet_distance_from_stats` warns, and every FD is reported with its sample count.

KID (Binkowski et al. 2018): the unbiased estimate of MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / D + 1)^3, averaged over `subsets` random subsets of `subset_size` samples drawn
without replacement from each set (torchmetrics' KernelInceptionDistance and clean-fid's
kernel_distance; defaults 100 x 1000). Its std is over the subsets (population std, as torchmetrics).
The subsets are drawn from np.random.RandomState(seed), second set first, as clean-fid draws them
after np.random.seed(seed), so its values are reproduced exactly. Unbiased, it needs no more samples
than dimensions, but a set smaller than `subset_size` shrinks the subsets (with a warning), and every
KID is reported with its sample count and subset size.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from flax import linen as nn

from eojax import checkpoint as ckpt_lib
from eojax.models.vit import ViTEncoder, vit_config


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    mean: np.ndarray  # (D,)
    cov: np.ndarray  # (D, D), unbiased
    count: int

    @classmethod
    def from_features(cls, feats) -> "FeatureStats":
        f = np.asarray(feats, np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), len(f))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mean/covariance shapes do not match: {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        logging.warning("Frechet distance: singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(len(s1)) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} "
                             "in the covariance square root")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> dict:
    """{'fd': ..., 'fd_samples': min count} with a warning when a sample count is below the dimension."""
    dim = len(a.mean)
    for name, s in (("first", a), ("second", b)):
        if s.count < dim:
            warnings.warn(f"Frechet distance from {s.count} {name}-set samples of {dim}-d features: "
                          "fewer samples than dimensions give a singular covariance and a noisy FD; "
                          "use more samples or a smaller feature space", stacklevel=2)
    return {"fd": frechet_distance(a.mean, a.cov, b.mean, b.cov), "fd_samples": float(min(a.count, b.count))}


def polynomial_mmd(x, y, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> float:
    """Unbiased MMD^2 between two samples of equal size m (m, D) under k(a, b) = (gamma a.b + coef)^degree
    (gamma default 1 / D): the means of k(x, x) and k(y, y) off their diagonals minus twice the mean of
    k(x, y)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or x.shape != y.shape or len(x) < 2:
        raise ValueError(f"polynomial_mmd needs two (m >= 2, D) feature arrays of one shape, got {x.shape} and {y.shape}")
    m = len(x)
    gamma = 1.0 / x.shape[1] if gamma is None else float(gamma)
    kxx, kyy, kxy = ((a @ b.T * gamma + coef) ** degree for a, b in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.sum() / (m * m))


def kernel_distance(feats_a, feats_b, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                    gamma: float | None = None, coef: float = 1.0, seed: int = 0) -> dict:
    """KID between two feature sets (N_a, D), (N_b, D): {'kid': mean over subsets, 'kid_std': their
    std, 'kid_samples': min(N_a, N_b), 'kid_subset_size', 'kid_subsets'}. Subsets are min(subset_size,
    N_a, N_b) samples of each set (a warning when that is below subset_size)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID needs two (N, D) feature arrays with the same D, got {a.shape} and {b.shape}")
    if int(subsets) < 1:
        raise ValueError(f"KID subsets={subsets} must be at least 1")
    m = min(int(subset_size), len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if m < subset_size:
        warnings.warn(f"KID from {len(a)} and {len(b)} samples: subsets of {m} instead of subset_size="
                      f"{subset_size}; the estimate is unbiased but noisier (see kid_std)", stacklevel=2)
    rs = np.random.RandomState(seed)
    values = []
    for _ in range(int(subsets)):
        if m == len(a) == len(b):  # every subset is the whole of both sets: MMD^2 does not depend on order
            values = [polynomial_mmd(a, b, degree, gamma, coef)] * int(subsets)
            break
        pick_b = rs.choice(len(b), m, replace=False)  # clean-fid's order: its second set, then its first
        pick_a = rs.choice(len(a), m, replace=False)
        values.append(polynomial_mmd(a[pick_a], b[pick_b], degree, gamma, coef))
    values = np.asarray(values)
    return {"kid": float(values.mean()), "kid_std": float(values.std()), "kid_samples": float(min(len(a), len(b))),
            "kid_subset_size": float(m), "kid_subsets": float(subsets)}


def feature_distances(feats_a, feats_b, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                      seed: int = 0) -> dict:
    """FD and KID of two feature sets, each with its sample count (and the warnings of either)."""
    fd = frechet_distance_from_stats(FeatureStats.from_features(feats_a), FeatureStats.from_features(feats_b))
    return {**fd, **kernel_distance(feats_a, feats_b, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)}


class MAEFeatures:
    """images (B, H, W, C) in [-1, 1] -> (B, width) mean-pooled patch tokens of a ViT encoder.

    `run_dir`: an eojax MAE run (its config.json and latest checkpoint); the images must have the
    channel count it was trained on. Empty: a fixed random-init encoder (seed `seed`) of the given
    size, with a warning that its features are untrained.
    """

    def __init__(self, image_size: int, channels: int, run_dir: str = "", *, width: int = 64,
                 depth: int = 2, heads: int = 4, patch_size: int = 4, seed: int = 0):
        if run_dir:
            self.encoder, self.params = _encoder_from_run(run_dir, image_size, channels)
            self.source = f"MAE encoder of {run_dir}"
        else:
            warnings.warn("Frechet distance features come from a random-init MAE encoder (untrained): "
                          "they compare low-level image statistics only; set fd.mae_run_dir to an eojax "
                          "MAE run for a trained remote-sensing feature space", stacklevel=2)
            self.encoder = ViTEncoder(**vit_config("mu", width=width, depth=depth, heads=heads, mlp_dim=2 * width),
                                      image_size=image_size, patch_size=patch_size, in_channels=channels,
                                      use_cls_token=False)
            dummy = jnp.zeros((1, image_size, image_size, channels))
            self.params = jax.jit(self.encoder.init)(jax.random.key(seed), dummy)["params"]
            self.params = nn.meta.unbox(jax.device_get(self.params))
            self.source = f"random-init ViT encoder (width {width}, depth {depth}, seed {seed})"
        self.dim = self.encoder.width

    def __call__(self, images):
        tokens = self.encoder.apply({"params": self.params}, images.astype(jnp.float32))
        return jnp.mean(tokens[:, self.encoder.num_prefix_tokens:], axis=1)


def _encoder_from_run(run_dir: str, image_size: int, channels: int):
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"fd.mae_run_dir={run_dir}: no config.json (is it an eojax MAE run folder?)")
    with open(cfg_path) as f:
        model_cfg = json.load(f).get("model", {})
    params = ckpt_lib.load_variables(run_dir, None)[0]["encoder"]  # the EMA when the run kept one
    kernel = np.asarray(params["patch_embed"]["proj"]["kernel"])
    sizes = {k: model_cfg[k] for k in ("width", "depth", "heads", "mlp_dim") if model_cfg.get(k)}
    cfg = vit_config(model_cfg.get("variant", "mu"), **sizes)
    p = int(model_cfg.get("patch_size", 8))
    if kernel.shape[0] != p * p * channels:
        raise ValueError(f"fd.mae_run_dir={run_dir}: its encoder takes {kernel.shape[0] // (p * p)} channels, "
                         f"the generated images have {channels}")
    if image_size % p:
        raise ValueError(f"fd.mae_run_dir={run_dir}: patch size {p} does not divide image size {image_size}")
    encoder = ViTEncoder(**cfg, image_size=image_size, patch_size=p, in_channels=channels,
                         use_cls_token="cls_token" in params)
    return encoder, nn.meta.unbox(params)
