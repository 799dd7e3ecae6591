"""Samplers as one `lax.scan` over timesteps: DDPM, DDIM (eta), DPM-Solver++(2M), PNDM (PLMS);
DDIM inversion.

`apply_fn(params, x, t, cond) -> model output` (eps or v, per `prediction`). With `uncond` given,
classifier-free guidance runs the model once on a 2B batch [cond; uncond] and combines
uncond + scale * (cond - uncond). Everything is a pure function of (params, x_T or rng, cond): jit
it with the static choices bound, e.g. `jax.jit(functools.partial(sample, apply_fn, schedule, ...))`.

Timesteps: `timestep_spacing='eojax'` (the default) spaces `num_steps` evenly from T-1 (or t_start)
down to 0, each step going to the next one and the last to abar = 1. 'leading', 'trailing' and
'linspace' are diffusers' spacings, applied as each diffusers scheduler applies them (DDIM and PNDM
step from t to t - T // num_steps; DPM-Solver++ spaces num_steps + 1 points and drops the last;
steps_offset shifts 'leading'), and `set_alpha_to_one=False` ends DDIM / PNDM at alphas_cumprod[0]
instead of 1 (diffusers' final_alpha_cumprod). `sampler_settings_from_diffusers` reads all of it
from a diffusers scheduler config, e.g. Stable Diffusion 1.5's PNDM one.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from eojax.diffusion.losses import to_eps_x0
from eojax.diffusion.schedules import Schedule, make_betas

NAMES = ("ddpm", "ddim", "dpmpp_2m", "pndm")
SPACINGS = ("eojax", "leading", "trailing", "linspace")

# PLMS (Liu et al. 2022) as diffusers' PNDMScheduler(skip_prk_steps=True) runs it: the weights of
# [the new model output, the last three kept outputs (newest first)] from the third model call on
# (the 2nd call only refines the 1st step and is never kept).
_PLMS_WEIGHTS = (np.array([3, -1, 0, 0]) / 2, np.array([23, -16, 5, 0]) / 12, np.array([55, -59, 37, -9]) / 24)


def _eojax_grid(schedule: Schedule, num_steps: int, t_max: int | None) -> np.ndarray:
    t_max = schedule.num_timesteps - 1 if t_max is None else int(t_max)
    if not 0 < t_max < schedule.num_timesteps:
        raise ValueError(f"t_max={t_max} must be in [1, {schedule.num_timesteps - 1}]")
    if not 1 <= num_steps <= t_max + 1:
        raise ValueError(f"num_steps={num_steps} must be in [1, {t_max + 1}]")
    return np.round(np.linspace(t_max, 0, num_steps)).astype(np.int32)


def _diffusers_grid(spacing: str, num_train: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """diffusers' DDIM / DDPM / PNDM `set_timesteps` grid, descending."""
    if spacing == "leading":
        return (np.arange(num_steps) * (num_train // num_steps) + steps_offset)[::-1]
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / num_steps)).astype(np.int64) - 1
    if spacing == "linspace":
        return np.round(np.linspace(0, num_train - 1, num_steps)).astype(np.int64)[::-1]
    raise ValueError(f"timestep_spacing={spacing!r}; known: {SPACINGS}")


def _plan(schedule: Schedule, name: str, num_steps: int, t_start: int | None, spacing: str,
          steps_offset: int) -> dict[str, np.ndarray]:
    """Per model call: t_eval (where the model runs), t_from -> t_to (the step it makes; -1 = the end)."""
    if name not in NAMES:
        raise ValueError(f"unknown sampler {name!r}; known: {NAMES}")
    num_train = schedule.num_timesteps
    stride = None  # None: each step goes to the next grid point
    if spacing == "eojax":
        grid = _eojax_grid(schedule, num_steps, t_start)
    else:
        if t_start is not None:
            raise ValueError(f"t_start works with timestep_spacing='eojax' only, not {spacing!r}")
        if not 1 <= num_steps <= num_train:
            raise ValueError(f"num_steps={num_steps} must be in [1, {num_train}]")
        if name == "dpmpp_2m" and spacing != "trailing":
            # DPMSolverMultistepScheduler spaces one point more and drops the last (t = 0 or the offset)
            grid = _diffusers_grid(spacing, num_train, num_steps + 1, steps_offset)[:-1]
        else:
            grid = _diffusers_grid(spacing, num_train, num_steps, steps_offset)
        if grid.min() < 0 or grid.max() >= num_train:
            raise ValueError(f"timestep_spacing={spacing!r} with steps_offset={steps_offset} gives timesteps "
                             f"{grid.min()}..{grid.max()} outside [0, {num_train - 1}]")
        if name in ("ddim", "pndm"):  # diffusers' DDIM and PNDM step by the stride, whatever the grid
            stride = num_train // num_steps
    grid = np.asarray(grid, np.int64)
    if stride is None:
        grid_to = np.concatenate([grid[1:], [-1]])
    else:
        grid_to = np.maximum(grid - stride, -1)
    if name != "pndm":
        return dict(t_eval=grid, t_from=grid, t_to=grid_to)
    # PLMS: the 2nd call runs the model at the end of the 1st step and redoes that step with the mean
    # of both outputs (diffusers: from grid[1] + stride to grid[1]); then one call per grid point.
    t_eval, t_from, t_to = grid[:1], grid[:1], grid_to[:1]
    if len(grid) > 1:
        redo_from = grid[0] if stride is None else grid[1] + stride
        t_eval = np.concatenate([t_eval, grid[1:2], grid[1:]])
        t_from = np.concatenate([t_from, [redo_from], grid[1:]])
        t_to = np.concatenate([t_to, grid[1:2], grid_to[1:]])
    return dict(t_eval=t_eval, t_from=t_from, t_to=t_to)


def _plms_table(num_calls: int) -> dict[str, np.ndarray]:
    """Per PLMS call: weights of [new output, kept outputs newest first], whether the step starts from
    the saved sample (the 2nd call), saves the current one (the 1st), keeps the new output (not the 2nd)."""
    weights = np.zeros((num_calls, 4))
    weights[0, 0] = 1.0
    if num_calls > 1:
        weights[1, :2] = 0.5
    for k in range(2, num_calls):
        weights[k] = _PLMS_WEIGHTS[min(k - 2, 2)]
    first, second = np.arange(num_calls) == 0, np.arange(num_calls) == 1
    return dict(weights=weights, from_saved=second, save=first, keep=~second)


def timesteps(schedule: Schedule, num_steps: int, t_max: int | None = None, *, spacing: str = "eojax",
              steps_offset: int = 0, name: str = "ddim") -> np.ndarray:
    """The timesteps the sampler `name` runs the model at, in order (descending; PNDM repeats its second
    one, as diffusers' PNDMScheduler(skip_prk_steps=True).timesteps do: num_steps + 1 calls).

    spacing 'eojax': `num_steps` integer timesteps from t_max (default T-1) down to 0, evenly spaced;
    'leading' / 'trailing' / 'linspace': diffusers' `set_timesteps` for that scheduler (t_max unused)."""
    return _plan(schedule, name, num_steps, t_max, spacing, steps_offset)["t_eval"].astype(np.int32)


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
           clip: float = 0.0, t_start: int | None = None, timestep_spacing: str = "eojax",
           steps_offset: int = 0, set_alpha_to_one: bool = True):
    """Runs the reverse process from noise `x_T` (B, ...) at timestep `t_start` (default T-1; an
    intermediate one for SDEdit-style editing or after `ddim_invert(..., t_end=...)`) to a clean sample.

    ddpm: ancestral sampling from the posterior q(x_prev | x_t, x0_hat) (on the skipped grid when
      num_steps < T: the DDIM update with eta = 1 and the posterior variance).
    ddim: Song et al. 2021, sigma = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)); eta = 0 is
      deterministic (rng unused).
    dpmpp_2m: DPM-Solver++ 2M (Lu et al. 2022), multistep second order in log-SNR on the data
      prediction, first order on the first and the last step.
    pndm: PLMS (Liu et al. 2022) as diffusers' PNDMScheduler with skip_prk_steps: num_steps + 1 model
      calls, linear multistep (Adams-Bashforth up to 4th order) on the model outputs, each step the
      PNDM transfer x_t -> x_prev; deterministic.
    clip > 0 clips x0_hat to [-clip, clip] (pixel space), not used by the ODE samplers' inversion.
    timestep_spacing / steps_offset / set_alpha_to_one: see the module docstring (set_alpha_to_one
      concerns ddim and pndm; ddpm and dpmpp_2m end at abar = 1 as diffusers' do).
    """
    plan = _plan(schedule, name, num_steps, t_start, timestep_spacing, steps_offset)
    model = guided_model(apply_fn, guidance_scale)
    b = x_T.shape[0]
    final_abar = np.float32(1.0 if set_alpha_to_one else schedule.alphas_cumprod[0])

    def abar_to(t):  # abar at a step's end: t = -1 is the end of sampling
        return jnp.where(t < 0, final_abar, schedule.abar(t)) if final_abar != 1 else schedule.abar(t)

    def clip_x0(x, t, eps, x0):
        if clip > 0:
            x0 = jnp.clip(x0, -clip, clip)
            a = schedule.abar(t)
            eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        return eps, x0

    def predict(x, t):
        out = model(params, x, jnp.full((b,), t, jnp.int32), cond, uncond)
        eps, x0 = to_eps_x0(prediction, schedule, x, out.astype(jnp.float32), jnp.full((b,), t))
        return clip_x0(x, t, eps, x0)

    def ddim_step(carry, xs):
        x, key = carry
        i, t, t_prev = xs
        eps, x0 = predict(x, t)
        a, a_prev = schedule.abar(t), abar_to(t_prev)
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

    def pndm_step(carry, xs):
        x, x_saved, kept = carry  # kept: the last three kept model outputs, newest first
        t, t_from, t_to, w, from_saved, save, keep = xs
        out = model(params, x, jnp.full((b,), t, jnp.int32), cond, uncond).astype(jnp.float32)
        # diffusers combines the raw outputs and converts the mix (v -> eps) at the step's start
        mixed = w[0] * out + w[1] * kept[0] + w[2] * kept[1] + w[3] * kept[2]
        start = jnp.where(from_saved, x_saved, x)
        eps, x0 = to_eps_x0(prediction, schedule, start, mixed, jnp.full((b,), t_from))
        eps, _ = clip_x0(start, t_from, eps, x0)
        a, a_prev = schedule.abar(t_from), abar_to(t_to)
        # PNDM's transfer (Liu et al. eq. 9): equal to DDIM's eta = 0 step, written as diffusers does
        denom = a * jnp.sqrt(1 - a_prev) + jnp.sqrt(a * (1 - a) * a_prev)
        x_next = jnp.sqrt(a_prev / a) * start - (a_prev - a) * eps / denom
        kept = jnp.where(keep, jnp.concatenate([out[None], kept[:-1]]), kept)
        return (x_next, jnp.where(save, x, x_saved), kept), None

    x = x_T.astype(jnp.float32)
    if name == "pndm":
        table = _plms_table(len(plan["t_eval"]))
        steps = tuple(jnp.asarray(plan[k], jnp.int32) for k in ("t_eval", "t_from", "t_to"))
        steps += (jnp.asarray(table["weights"], jnp.float32),) + tuple(
            jnp.asarray(table[k]) for k in ("from_saved", "save", "keep"))
        carry = (x, x, jnp.zeros((3,) + x.shape, jnp.float32))
        (x, _, _), _ = jax.lax.scan(pndm_step, carry, steps)
        return x
    steps = (jnp.arange(len(plan["t_eval"])), jnp.asarray(plan["t_eval"], jnp.int32),
             jnp.asarray(plan["t_to"], jnp.int32))
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


# -- diffusers scheduler configs ---------------------------------------------------------------------
DIFFUSERS_SCHEDULERS = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
                        "DPMSolverMultistepScheduler": "dpmpp_2m"}
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                        trained_betas=None, prediction_type="epsilon", timestep_spacing="leading", steps_offset=0)
_THRESHOLDING = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
# diffusers 0.42's constructor defaults: a key absent from a config takes these values
_DIFFUSERS_DEFAULTS = {
    "pndm": dict(_COMMON_DEFAULTS, skip_prk_steps=False, set_alpha_to_one=False),
    "ddim": dict(_COMMON_DEFAULTS, **_THRESHOLDING, clip_sample=True, clip_sample_range=1.0,
                 set_alpha_to_one=True, rescale_betas_zero_snr=False),
    "ddpm": dict(_COMMON_DEFAULTS, **_THRESHOLDING, clip_sample=True, clip_sample_range=1.0,
                 variance_type="fixed_small", rescale_betas_zero_snr=False),
    "dpmpp_2m": dict(_COMMON_DEFAULTS, **_THRESHOLDING, timestep_spacing="linspace", solver_order=2,
                     algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
                     euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                     use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0,
                     final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None,
                     rescale_betas_zero_snr=False, use_dynamic_shifting=False, time_shift_type="exponential"),
}
# the only values eojax's samplers implement; other keys become sample's options or change nothing here
# (lower_order_final / euler_at_final: order 2 ending at sigma 0 takes a first-order last step anyway)
_SUPPORTED_VALUES = {
    "prediction_type": ("epsilon", "v_prediction"), "beta_schedule": tuple(_BETA_SCHEDULES),
    "timestep_spacing": SPACINGS[1:], "thresholding": (False,), "rescale_betas_zero_snr": (False,),
    "skip_prk_steps": (True,), "solver_order": (2,), "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",), "use_karras_sigmas": (False,), "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,), "use_lu_lambdas": (False,), "use_flow_sigmas": (False,),
    "final_sigmas_type": ("zero",), "lambda_min_clipped": (-math.inf,), "use_dynamic_shifting": (False,),
}
_SUPPORTED_BY_SAMPLER = {
    # diffusers' DDIM steps with the unclipped eps; eojax's clip re-derives eps from the clipped x0
    "ddim": {"clip_sample": (False,)},
    "ddpm": {"variance_type": ("fixed_small", "fixed_small_log")},  # the same posterior variance
    "dpmpp_2m": {"variance_type": (None,)},
}


def sampler_settings_from_diffusers(config: dict, class_name: str | None = None) -> tuple[Schedule, dict, str]:
    """A diffusers scheduler config (the dict of a `scheduler_config.json`) -> (schedule, the keyword
    options of `sample` that make it sample as that scheduler does: name, timestep_spacing, steps_offset,
    set_alpha_to_one, clip; prediction). `class_name` replaces the config's `_class_name`, as
    `DDIMScheduler.from_config(pndm_config)` does: keys of other schedulers are then ignored.

    Reads PNDMScheduler (skip_prk_steps only), DDIMScheduler, DDPMScheduler and
    DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, final sigma 0); any other class or
    setting that changes the sampling (thresholding, Karras sigmas, prediction_type 'sample', ...) is
    refused with a ValueError naming it. num_steps, eta and the guidance scale are the caller's, as in
    diffusers' pipelines."""
    cls = class_name or config.get("_class_name")
    if cls not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"scheduler class {cls!r} is not supported; known: {tuple(DIFFUSERS_SCHEDULERS)}")
    name = DIFFUSERS_SCHEDULERS[cls]
    defaults = _DIFFUSERS_DEFAULTS[name]
    cfg = {k: config.get(k, default) for k, default in defaults.items()}
    supported = dict(_SUPPORTED_VALUES, **_SUPPORTED_BY_SAMPLER.get(name, {}))
    for key, allowed in supported.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{cls} config {key}={cfg[key]!r} is not supported by eojax's samplers "
                             f"(supported: {', '.join(map(repr, allowed))})")
    if cfg["trained_betas"] is not None:
        schedule = Schedule(np.asarray(cfg["trained_betas"], np.float64))
    else:
        schedule = Schedule(make_betas(_BETA_SCHEDULES[cfg["beta_schedule"]], int(cfg["num_train_timesteps"]),
                                       float(cfg["beta_start"]), float(cfg["beta_end"])))
    options = dict(name=name, timestep_spacing=cfg["timestep_spacing"], steps_offset=int(cfg["steps_offset"]),
                   set_alpha_to_one=bool(cfg.get("set_alpha_to_one", True)),
                   clip=float(cfg["clip_sample_range"]) if cfg.get("clip_sample") else 0.0)
    return schedule, options, cfg["prediction_type"]
