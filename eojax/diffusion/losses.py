"""Training targets and the (min-SNR weighted) MSE loss."""
from __future__ import annotations

import jax.numpy as jnp

from eojax.diffusion.schedules import Schedule

PREDICTIONS = ("epsilon", "v_prediction")


def _bcast(a, like):
    return a.reshape((-1,) + (1,) * (like.ndim - 1))


def target(prediction: str, schedule: Schedule, x0, noise, t):
    """What the model learns to output: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho)."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        a = _bcast(schedule.abar(t), x0)
        return jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
    raise ValueError(f"unknown prediction {prediction!r}; known: {PREDICTIONS}")


def to_eps_x0(prediction: str, schedule: Schedule, x_t, model_out, t):
    """Model output at (x_t, t) -> (eps_hat, x0_hat)."""
    a = _bcast(schedule.abar(t), x_t)
    sa, s1 = jnp.sqrt(a), jnp.sqrt(1.0 - a)
    if prediction == "epsilon":
        eps = model_out
        return eps, (x_t - s1 * eps) / sa
    if prediction == "v_prediction":
        return sa * model_out + s1 * x_t, sa * x_t - s1 * model_out
    raise ValueError(f"unknown prediction {prediction!r}; known: {PREDICTIONS}")


def min_snr_weight(snr, gamma: float, prediction: str):
    """Per-example loss weight of min-SNR-gamma (Hang et al. 2023).

    The paper weights the x0-loss by min(SNR, gamma). Since |x0 - x0_hat|^2 = |eps - eps_hat|^2 / SNR
    = |v - v_hat|^2 / (SNR + 1), the same weighting of an eps-loss is min(SNR, gamma) / SNR and of a
    v-loss min(SNR, gamma) / (SNR + 1). gamma <= 0 turns weighting off (weight 1).
    """
    if gamma <= 0:
        return jnp.ones_like(snr)
    clipped = jnp.minimum(snr, gamma)
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v_prediction":
        return clipped / (snr + 1.0)
    raise ValueError(f"unknown prediction {prediction!r}; known: {PREDICTIONS}")


def diffusion_loss(model_out, tgt, weight):
    """(B,) per-example mean squared error times `weight`."""
    err = jnp.mean(jnp.square(model_out.astype(jnp.float32) - tgt), axis=tuple(range(1, tgt.ndim)))
    return err * weight
