"""Samplers as one `lax.scan` over timesteps: DDPM, DDIM (eta), DPM-Solver++(2M); DDIM inversion.

`apply_fn(params, x, t, cond) -> model output` (eps or v, per `prediction`). With `uncond` given,
classifier-free guidance runs the model once on a 2B batch [cond; uncond] and combines
uncond + scale * (cond - uncond). Everything is a pure function of (params, x_T or rng, cond): jit
it with the static choices bound, e.g. `jax.jit(functools.partial(sample, apply_fn, schedule, ...))`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eojax.diffusion.losses import to_eps_x0
from eojax.diffusion.schedules import Schedule

NAMES = ("ddpm", "ddim", "dpmpp_2m")


def timesteps(schedule: Schedule, num_steps: int, t_max: int | None = None) -> np.ndarray:
    """`num_steps` integer timesteps from t_max (default T-1) down to 0, evenly spaced (descending)."""
    t_max = schedule.num_timesteps - 1 if t_max is None else int(t_max)
    if not 0 < t_max < schedule.num_timesteps:
        raise ValueError(f"t_max={t_max} must be in [1, {schedule.num_timesteps - 1}]")
    if not 1 <= num_steps <= t_max + 1:
        raise ValueError(f"num_steps={num_steps} must be in [1, {t_max + 1}]")
    return np.round(np.linspace(t_max, 0, num_steps)).astype(np.int32)


def guided_model(apply_fn, guidance_scale: float):
    """(params, x, t, cond, uncond) -> guided output; uncond None = the plain conditional model."""
    def fn(params, x, t, cond, uncond):
        if uncond is None:
            return apply_fn(params, x, t, cond)
        cat = lambda a, b: jnp.concatenate([a, b], axis=0)
        out = apply_fn(params, cat(x, x), cat(t, t), jax.tree.map(cat, cond, uncond))
        c, u = jnp.split(out, 2, axis=0)
        return u + guidance_scale * (c - u)
    return fn


def _bcast(a, like):
    return jnp.reshape(a, (-1,) + (1,) * (like.ndim - 1))


def sample(apply_fn, schedule: Schedule, prediction: str, params, x_T, rng, cond, uncond=None, *,
           name: str = "ddim", num_steps: int = 50, eta: float = 0.0, guidance_scale: float = 1.0,
           clip: float = 0.0, t_start: int | None = None):
    """Runs the reverse process from noise `x_T` (B, ...) at timestep `t_start` (default T-1; an
    intermediate one for SDEdit-style editing or after `ddim_invert(..., t_end=...)`) to a clean sample.

    ddpm: ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (on the skipped grid when
      num_steps < T: the DDIM update with eta = 1 and the posterior variance).
    ddim: Song et al. 2021, sigma = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)); eta = 0 is
      deterministic (rng unused).
    dpmpp_2m: DPM-Solver++ 2M (Lu et al. 2022), multistep second order in log-SNR on the data
      prediction, first order on the first and the last step.
    clip > 0 clips x0_hat to [-clip, clip] (pixel space), not used by the ODE samplers' inversion.
    """
    if name not in NAMES:
        raise ValueError(f"unknown sampler {name!r}; known: {NAMES}")
    ts = timesteps(schedule, num_steps, t_start)
    prev = np.concatenate([ts[1:], [-1]]).astype(np.int32)
    model = guided_model(apply_fn, guidance_scale)
    b = x_T.shape[0]

    def predict(x, t):
        out = model(params, x, jnp.full((b,), t, jnp.int32), cond, uncond)
        eps, x0 = to_eps_x0(prediction, schedule, x, out.astype(jnp.float32), jnp.full((b,), t))
        if clip > 0:
            x0 = jnp.clip(x0, -clip, clip)
            a = schedule.abar(t)
            eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        return eps, x0

    def ddim_step(carry, xs):
        x, key = carry
        i, t, t_prev = xs
        eps, x0 = predict(x, t)
        a, a_prev = schedule.abar(t), schedule.abar(t_prev)
        e = 1.0 if name == "ddpm" else eta
        sigma = e * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        key, sub = jax.random.split(key)
        noise = jax.random.normal(sub, x.shape, x.dtype)
        x = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0)) * eps + sigma * noise
        return (x, key), None

    def dpm_step(carry, xs):
        x, x0_last, h_last = carry
        i, t, t_prev = xs
        _, x0 = predict(x, t)
        a, a_prev = schedule.abar(t), schedule.abar(t_prev)
        lam, lam_prev = 0.5 * jnp.log(a / (1 - a)), 0.5 * jnp.log(a_prev / (1 - a_prev))
        h = lam_prev - lam
        first_order = (i == 0) | (t_prev < 0)
        r = h_last / jnp.where(first_order, 1.0, h)
        d = jnp.where(first_order, x0, (1 + 0.5 / r) * x0 - (0.5 / r) * x0_last)
        x_next = jnp.sqrt((1 - a_prev) / (1 - a)) * x - jnp.sqrt(a_prev) * jnp.expm1(-h) * d
        x_next = jnp.where(t_prev < 0, x0, x_next)  # sigma = 0: the data prediction itself
        return (x_next, x0, h), None

    steps = (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(prev))
    x = x_T.astype(jnp.float32)
    if name == "dpmpp_2m":
        (x, _, _), _ = jax.lax.scan(dpm_step, (x, jnp.zeros_like(x), jnp.ones(())), steps)
    else:
        (x, _), _ = jax.lax.scan(ddim_step, (x, rng), steps)
    return x


def ddim_invert(apply_fn, schedule: Schedule, prediction: str, params, x0, cond, uncond=None, *,
                num_steps: int = 50, guidance_scale: float = 1.0, t_end: int | None = None):
    """Deterministic DDIM run backwards: clean x0 -> the x at timestep `t_end` (default T-1) that DDIM
    (eta = 0, same steps, t_start=t_end) maps back to x0, up to the discretisation (each step reuses
    the noise predicted at its start). Editing inverts to an intermediate t_end: the full way to T-1
    passes through the high-noise steps where a learned model's errors are amplified most."""
    ts = timesteps(schedule, num_steps, t_end)[::-1]  # ascending
    cur = np.concatenate([[-1], ts[:-1]]).astype(np.int32)
    model = guided_model(apply_fn, guidance_scale)
    b = x0.shape[0]

    def step(x, xs):
        t_cur, t_next = xs
        t_eval = jnp.where(t_cur < 0, t_next, t_cur)  # the clean start is evaluated at the first step
        out = model(params, x, jnp.full((b,), t_eval, jnp.int32), cond, uncond)
        eps, x0_hat = to_eps_x0(prediction, schedule, x, out.astype(jnp.float32), jnp.full((b,), t_eval))
        a_next = schedule.abar(t_next)
        return jnp.sqrt(a_next) * x0_hat + jnp.sqrt(1 - a_next) * eps, None

    x, _ = jax.lax.scan(step, x0.astype(jnp.float32), (jnp.asarray(cur), jnp.asarray(ts)))
    return x
