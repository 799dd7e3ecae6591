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

    @classmethod
    def from_sums(cls, total, outer, count) -> "FeatureStats":
        """From the sum of features (D,), the sum of outer products (D, D) and the count (the form an
        eval loop accumulates batch by batch)."""
        n = float(count)
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {n:g}")
        total, outer = np.asarray(total, np.float64), np.asarray(outer, np.float64)
        mean = total / n
        cov = (outer - n * np.outer(mean, mean)) / (n - 1)
        return cls(mean, (cov + cov.T) / 2, int(round(n)))


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
