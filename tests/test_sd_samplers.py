"""Samplers under diffusers' scheduler settings (Stable Diffusion 1.5's PNDM config, DDIM and
DPM-Solver++ made from it) against diffusers' own schedulers run on a toy model
(tests/fixtures/sd_schedulers.npz, scripts/fixtures/make_sd_scheduler_fixture.py); reading
scheduler configs; the samplers staying one scan."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eojax.diffusion import samplers, schedules

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
META = json.load(open(os.path.join(FIX, "sd_schedulers.json")))
ARRAYS = np.load(os.path.join(FIX, "sd_schedulers.npz"))
SD15_CONFIG = os.path.join(FIX, "sd_tiny", "scheduler", "scheduler_config.json")
RUNS = [(case, n) for case, c in META["cases"].items() for n in c["steps"]]


def toy_model(params, x, t, cond):
    """The fixture's model: x * (0.1 + 0.9 sqrt(t / 1000)) + 0.1 sin(3 x) cos(t / 300)."""
    t = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return x * (0.1 + 0.9 * jnp.sqrt(t / 1000)) + 0.1 * jnp.sin(3 * x) * jnp.cos(t / 300)


def _settings(case):
    return samplers.sampler_settings_from_diffusers(META["cases"][case]["config"])


@pytest.mark.parametrize("case,n", RUNS, ids=[f"{c}-{n}" for c, n in RUNS])
def test_matches_diffusers_scheduler(case, n):
    """The timesteps are diffusers' exactly; the final sample agrees to 1e-5 of its largest magnitude
    (max |eojax - diffusers| / max |diffusers|, float32 on both sides; measured <= 1.2e-6)."""
    schedule, options, prediction = _settings(case)
    ts = samplers.timesteps(schedule, n, spacing=options["timestep_spacing"], steps_offset=options["steps_offset"],
                            name=options["name"])
    np.testing.assert_array_equal(ts, ARRAYS[f"{case}_{n}_timesteps"])
    if META["cases"][case].get("timesteps_only"):  # DDPM: random, the timesteps only
        return
    x = samplers.sample(toy_model, schedule, prediction, None, jnp.asarray(ARRAYS["x_T"]), jax.random.key(0), None,
                        num_steps=n, **options)
    ref = ARRAYS[f"{case}_{n}_final"]
    err = float(np.max(np.abs(np.asarray(x) - ref)) / np.max(np.abs(ref)))
    assert err < 1e-5, err


def test_sd15_config_and_swapped_scheduler():
    """SD-1.5's scheduler_config.json reads as PNDM with its settings; `class_name` swaps the scheduler
    as DDIMScheduler.from_config(that config) does, keys of other schedulers ignored."""
    config = json.load(open(SD15_CONFIG))
    schedule, options, prediction = samplers.sampler_settings_from_diffusers(config)
    assert options == dict(name="pndm", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip=0.0)
    assert prediction == "epsilon"
    np.testing.assert_array_equal(schedule.betas, schedules.make_betas("scaled_linear", 1000, 0.00085, 0.012))
    for cls, case in (("DDIMScheduler", "ddim"), ("DPMSolverMultistepScheduler", "dpmpp_2m")):
        swapped = samplers.sampler_settings_from_diffusers(config, class_name=cls)[1]
        assert swapped == _settings(case)[1], cls


@pytest.mark.parametrize("config,key", [
    ({"_class_name": "EulerDiscreteScheduler"}, "EulerDiscreteScheduler"),
    ({"_class_name": "DDIMScheduler", "clip_sample": False, "thresholding": True}, "thresholding"),
    ({"_class_name": "DDIMScheduler"}, "clip_sample"),  # diffusers' default True: steps with the unclipped eps
    ({"_class_name": "PNDMScheduler"}, "skip_prk_steps"),  # the Runge-Kutta warm-up, PNDM's default
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "solver_order"),
    ({"_class_name": "DDPMScheduler", "prediction_type": "sample"}, "prediction_type"),
    ({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule"),
])
def test_unsupported_scheduler_settings_are_refused(config, key):
    with pytest.raises(ValueError, match=key):
        samplers.sampler_settings_from_diffusers(config)


def test_ddpm_config_clips_and_reads_trained_betas():
    betas = np.linspace(1e-4, 0.02, 50)
    schedule, options, _ = samplers.sampler_settings_from_diffusers(
        {"_class_name": "DDPMScheduler", "trained_betas": betas.tolist(), "clip_sample_range": 2.0})
    np.testing.assert_array_equal(schedule.betas, betas)
    assert options["name"] == "ddpm" and options["clip"] == 2.0 and options["timestep_spacing"] == "leading"


@pytest.mark.parametrize("name", ["pndm", "ddim", "dpmpp_2m"])
def test_sampling_is_one_scan_whatever_the_steps(name):
    """The sampler traces to one scan over a precomputed step table: the same program for 5 and 20
    steps (no Python loop per step, PNDM's warm-up included), and it runs under jit."""
    schedule, options, prediction = _settings(name)
    x_T = jnp.asarray(ARRAYS["x_T"])

    def program(n):
        fn = functools.partial(samplers.sample, toy_model, schedule, prediction, num_steps=n, **options)
        return fn, jax.make_jaxpr(fn)(None, x_T, jax.random.key(0), None).jaxpr

    (fn5, jaxpr5), (_, jaxpr20) = program(5), program(20)
    scans = [e for e in jaxpr5.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and len(jaxpr5.eqns) == len(jaxpr20.eqns)
    assert scans[0].params["length"] == len(ARRAYS[f"{name}_5_timesteps"])
    out, ref = jax.jit(fn5)(None, x_T, jax.random.key(0), None), ARRAYS[f"{name}_5_final"]
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_diffusers_spacing_options_are_checked():
    schedule = schedules.Schedule(schedules.make_betas("scaled_linear", 1000, 0.00085, 0.012))
    with pytest.raises(ValueError, match="t_start"):
        samplers.timesteps(schedule, 5, 500, spacing="leading")
    with pytest.raises(ValueError, match="timestep_spacing"):
        samplers.timesteps(schedule, 5, spacing="karras")
    with pytest.raises(ValueError, match="outside"):
        samplers.timesteps(schedule, 1000, spacing="leading", steps_offset=1)
    # the default spacing is unchanged: evenly from T-1 to 0; PNDM on it repeats its second timestep
    np.testing.assert_array_equal(samplers.timesteps(schedule, 5), [999, 749, 500, 250, 0])
    np.testing.assert_array_equal(samplers.timesteps(schedule, 5, name="pndm"), [999, 749, 749, 500, 250, 0])
