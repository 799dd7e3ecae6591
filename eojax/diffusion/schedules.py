"""Noise schedules: betas -> alphas_cumprod, forward noising q(x_t | x_0) and the SNR.

Conventions (DDPM, Ho et al. 2020): t = 0 .. T-1, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with
abar_t = prod_{s<=t} (1 - beta_s).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

NAMES = ("linear", "scaled_linear", "cosine")


def make_betas(name: str, num_timesteps: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, cosine_s: float = 0.008) -> np.ndarray:
    """float64 betas of length `num_timesteps`.

    linear: evenly spaced from beta_start to beta_end (DDPM: 1e-4 .. 0.02).
    scaled_linear: evenly spaced in sqrt(beta) (Stable Diffusion: 0.00085 .. 0.012).
    cosine: abar(t) = cos^2(((t / T + s) / (1 + s)) pi / 2), beta_t = 1 - abar(t + 1) / abar(t)
      clipped at 0.999 (Nichol & Dhariwal 2021); beta_start / beta_end are not used.
    """
    if name == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if name == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    if name == "cosine":
        t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        abar = np.cos((t + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
        return np.minimum(1 - abar[1:] / abar[:-1], 0.999)
    raise ValueError(f"unknown noise schedule {name!r}; known: {NAMES}")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete schedule. Arrays are float32 jax constants indexed by integer timesteps."""

    betas: np.ndarray  # float64, (T,)

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        return cls(make_betas(cfg.name, cfg.num_timesteps, cfg.beta_start, cfg.beta_end))

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas)

    def abar(self, t):
        """abar_t for integer t; t = -1 means 'clean' (abar = 1), the end point of every sampler."""
        table = jnp.asarray(np.concatenate([self.alphas_cumprod, [1.0]]), jnp.float32)
        return table[jnp.where(t < 0, self.num_timesteps, t)]

    def snr(self, t):
        """Signal-to-noise ratio abar_t / (1 - abar_t) (from a float64 table: 1 - abar is tiny at t = 0)."""
        a = self.alphas_cumprod
        return jnp.asarray(a / (1.0 - a), jnp.float32)[t]

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, t of shape (B,)."""
        a = self.abar(t).reshape((-1,) + (1,) * (x0.ndim - 1))
        return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
