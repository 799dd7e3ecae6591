"""Diffusion family: UNet shapes and the SD-1.5 parameter count, schedules, losses, samplers (DDIM
determinism and inversion, guidance), Frechet distance vs scipy, InceptionV3 features, caption readers,
frozen GPT-2 caption features, one trainer run."""
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from flax import linen as nn

from eojax import checkpoint as ckpt_lib
from eojax import train
from eojax.diffusion import captions as captions_lib
from eojax.data import synthetic
from eojax.diffusion import fid, losses, pictures, samplers, schedules
from eojax.diffusion.model import space_to_depth_autoencoder
from eojax.diffusion.task import DiffusionInput, DiffusionTask
from eojax.diffusion import unet as unet_lib
from eojax.diffusion.text_encoder import WordTokenizer
from eojax.tasks import DataSpec
from helpers import cli, load_config


# ------------------------------------------------------------------------------------------ UNet
@pytest.mark.parametrize("kw,size,ctx", [
    (dict(in_channels=3, out_channels=3, block_out_channels=(16, 32), attention=(False, True),
          layers_per_block=1, heads=2, cross_attention_dim=24, norm_groups=8), 16, 5),
    (dict(in_channels=4, out_channels=8, block_out_channels=(16, 16, 32), attention=(True, False, True),
          layers_per_block=2, heads=4, cross_attention_dim=16, norm_groups=4), 8, 3),
    (dict(in_channels=10, out_channels=10, block_out_channels=(32,), attention=(True,), layers_per_block=1,
          heads=1, cross_attention_dim=8, norm_groups=32), 6, 7),
])
def test_unet_output_shapes(kw, size, ctx):
    model = unet_lib.UNet(**kw)
    x = jnp.zeros((2, size, size, kw["in_channels"]))
    out = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), x, jnp.zeros((2,)), jnp.zeros((2, ctx, kw["cross_attention_dim"])))[0])
    assert out.shape == (2, size, size, kw["out_channels"])


def test_unet_rejects_indivisible_image():
    model = unet_lib.UNet(in_channels=3, out_channels=3, block_out_channels=(8, 8), attention=(False, False),
                          layers_per_block=1, heads=2, cross_attention_dim=8, norm_groups=4)
    with pytest.raises(ValueError, match="not divisible by 2"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 7, 7, 3)), jnp.zeros((1,)),
                                          jnp.zeros((1, 2, 8))))


def test_sd15_parameter_count_is_published_value():
    """Stable Diffusion 1.5's UNet has 859,520,964 parameters; shapes only (jax.eval_shape)."""
    cfg = load_config("diffusion", "sd15")
    m = cfg.model
    model = unet_lib.UNet(**unet_lib.sd15_config(cross_attention_dim=m.text_width))
    assert tuple(m.block_out_channels) == (320, 640, 1280, 1280) and m.text_width == 768
    assert unet_lib.count_params(model, 64) == 859_520_964


def test_unet_layouts_match_diffusers_parameter_counts():
    """Parameter counts equal diffusers' UNet2DConditionModel with the same arguments (stored fixture,
    written by scripts/fixtures/make_diffusion_unet_params.py): same skips, shortcuts and blocks."""
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "diffusion_unet_params.json")) as f:
        cases = json.load(f)["cases"]
    for case in cases:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in case.items() if k != "params"}
        assert unet_lib.count_params(unet_lib.UNet(**kw), 16, 4) == case["params"], kw


def test_timestep_embedding_formula():
    t = np.array([0.0, 1.0, 500.0])
    emb = np.asarray(unet_lib.timestep_embedding(jnp.asarray(t), 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    np.testing.assert_allclose(emb, np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], 1),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ schedules and losses
def test_schedules_match_numpy_formulas():
    lin = schedules.make_betas("linear", 1000)
    np.testing.assert_allclose(lin[[0, -1]], [1e-4, 0.02])
    np.testing.assert_allclose(np.diff(lin), (0.02 - 1e-4) / 999, rtol=1e-9)
    sl = schedules.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    np.testing.assert_allclose(np.sqrt(sl), np.linspace(np.sqrt(0.00085), np.sqrt(0.012), 1000), rtol=1e-12)
    cos = schedules.make_betas("cosine", 1000)
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = np.cumprod(1 - cos)
    ok = cos < 0.999  # before the clip, the product telescopes to f(t+1)/f(0)
    np.testing.assert_allclose(abar[ok], (f(np.arange(1, 1001)) / f(0))[ok], rtol=1e-9)
    assert cos.max() <= 0.999
    with pytest.raises(ValueError, match="unknown noise schedule"):
        schedules.make_betas("sigmoid", 10)


def test_q_sample_matches_closed_form():
    sched = schedules.Schedule(schedules.make_betas("linear", 1000))
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(4, 3, 3, 2)), rng.normal(size=(4, 3, 3, 2))
    t = np.array([0, 10, 500, 999])
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    expected = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps
    got = sched.q_sample(jnp.asarray(x0, jnp.float32), jnp.asarray(t), jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sched.snr(jnp.asarray(t))), (abar / (1 - abar)).ravel(), rtol=1e-4)


def test_min_snr_weights_and_v_target():
    snr = jnp.array([0.01, 1.0, 5.0, 100.0])
    np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "epsilon"), [1.0, 1.0, 1.0, 0.05], rtol=1e-6)
    np.testing.assert_allclose(losses.min_snr_weight(snr, 5.0, "v_prediction"),
                               [0.01 / 1.01, 0.5, 5 / 6, 5 / 101], rtol=1e-6)
    np.testing.assert_allclose(losses.min_snr_weight(snr, 0.0, "epsilon"), 1.0)
    # The weights equalise what they claim to: w_eps * |eps err|^2 == w_v * |v err|^2 == min(snr, g) * |x0 err|^2
    sched = schedules.Schedule(schedules.make_betas("cosine", 1000))
    rng = np.random.default_rng(1)
    x0, eps = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(3, 4)))
    t = jnp.array([5, 300, 900])
    x_t = sched.q_sample(x0, t, eps)
    guess_x0 = x0 + 0.1 * jnp.asarray(rng.normal(size=(3, 4)))
    a = sched.abar(t)[:, None]
    guess_eps = (x_t - jnp.sqrt(a) * guess_x0) / jnp.sqrt(1 - a)
    guess_v = jnp.sqrt(a) * guess_eps - jnp.sqrt(1 - a) * guess_x0
    s = sched.snr(t)
    x0_loss = jnp.minimum(s, 5.0) * jnp.sum((guess_x0 - x0) ** 2, 1)
    for pred, guess in (("epsilon", guess_eps), ("v_prediction", guess_v)):
        tgt = losses.target(pred, sched, x0, eps, t)
        np.testing.assert_allclose(losses.min_snr_weight(s, 5.0, pred) * jnp.sum((guess - tgt) ** 2, 1), x0_loss,
                                   rtol=2e-3)
        e, x = losses.to_eps_x0(pred, sched, x_t, tgt, t)  # the exact target gives back eps and x0
        np.testing.assert_allclose(e, eps, atol=2e-3)
        np.testing.assert_allclose(x, x0, atol=2e-3)


# ------------------------------------------------------------------------------------- samplers
MU, STD = 0.5, 0.3
LINEAR = schedules.Schedule(schedules.make_betas("linear", 1000))


def _gaussian_eps(params, x, t, cond):
    """The exact E[eps | x_t] for data ~ N(MU, STD^2 I): the optimal denoiser."""
    a = LINEAR.abar(t).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * STD ** 2 + 1 - a)


@pytest.mark.parametrize("name", samplers.NAMES)
def test_samplers_reach_the_data_distribution(name):
    """With the exact denoiser of a Gaussian, each sampler's output has the data mean and std."""
    x_T = jax.random.normal(jax.random.key(0), (4000, 2))
    fn = jax.jit(functools.partial(samplers.sample, _gaussian_eps, LINEAR, "epsilon", name=name, num_steps=250))
    x = np.asarray(fn(None, x_T, jax.random.key(1), None))
    assert abs(x.mean() - MU) < 0.01 and abs(x.std() - STD) / STD < 0.05, (x.mean(), x.std())


def _toy_model():
    """A small MLP denoiser trained (inside the test, 800 steps, a few seconds) on 4-d data: x0 = c * (1, -1, 0.5, 2) + noise."""
    direction = jnp.array([1.0, -1.0, 0.5, 2.0])

    def apply_fn(p, x, t, cond):
        h = jnp.concatenate([x, jnp.sin(t[:, None] / 1000 * jnp.arange(1, 5)), cond], axis=1)
        for i in range(2):
            h = jax.nn.silu(h @ p[f"w{i}"] + p[f"b{i}"])
        return h @ p["w2"] + p["b2"]

    sizes = [(4 + 4 + 1, 64), (64, 64), (64, 4)]
    keys = jax.random.split(jax.random.key(0), 3)
    params = {}
    for i, ((m, n), k) in enumerate(zip(sizes, keys)):
        params[f"w{i}"] = jax.random.normal(k, (m, n)) / np.sqrt(m)
        params[f"b{i}"] = jnp.zeros((n,))
    sched = schedules.Schedule(schedules.make_betas("cosine", 1000))
    tx = optax.adam(3e-3)

    @jax.jit
    def step(p, opt, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        c = jax.random.uniform(k1, (256, 1), minval=-1, maxval=1)
        x0 = c * direction + 0.05 * jax.random.normal(k4, (256, 4))
        t = jax.random.randint(k2, (256,), 0, 1000)
        eps = jax.random.normal(k3, x0.shape)
        loss_fn = lambda p: jnp.mean((apply_fn(p, sched.q_sample(x0, t, eps), t, c) - eps) ** 2)
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, upd), opt, loss

    opt = tx.init(params)
    for i in range(800):
        params, opt, loss = step(params, opt, jax.random.key(i))
    return apply_fn, params, sched, direction, float(loss)


@pytest.fixture(scope="module")
def toy():
    return _toy_model()


def test_ddim_eta0_is_deterministic_on_trained_toy(toy):
    apply_fn, params, sched, direction, loss = toy
    assert loss < 0.3, loss  # it did learn (eps MSE starts at ~1)
    cond = jnp.array([[0.8], [-0.3], [0.1]])
    x_T = jax.random.normal(jax.random.key(5), (3, 4))
    ddim = jax.jit(functools.partial(samplers.sample, apply_fn, sched, "epsilon", name="ddim", num_steps=50, eta=0.0))
    a = ddim(params, x_T, jax.random.key(1), cond)
    b = ddim(params, x_T, jax.random.key(2), cond)  # eta = 0: the rng plays no part
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # eta > 0 uses the rng
    noisy = jax.jit(functools.partial(samplers.sample, apply_fn, sched, "epsilon", name="ddim", num_steps=50, eta=1.0))
    assert float(jnp.max(jnp.abs(noisy(params, x_T, jax.random.key(1), cond) - noisy(params, x_T, jax.random.key(2), cond)))) > 1e-3


def test_ddim_inversion_with_the_exact_denoiser():
    """With the optimal denoiser of Gaussian data (the limit of perfect training), DDIM inversion followed by
    DDIM sampling returns the input up to a first-order discretisation error: it halves as the steps double."""
    sched = schedules.Schedule(schedules.make_betas("cosine", 1000))

    def eps_fn(params, x, t, cond):
        a = sched.abar(t).reshape((-1, 1))
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * STD ** 2 + 1 - a)

    x0 = MU + STD * jax.random.normal(jax.random.key(2), (16, 4))
    errors = []
    for n in (50, 100):
        x_T = samplers.ddim_invert(eps_fn, sched, "epsilon", None, x0, None, num_steps=n)
        assert abs(float(x_T.std()) - 1.0) < 0.15  # inverted to noise-like latents
        back = samplers.sample(eps_fn, sched, "epsilon", None, x_T, jax.random.key(0), None, name="ddim", num_steps=n)
        errors.append(float(jnp.max(jnp.abs(back - x0))))
    assert errors[1] < 0.05 and errors[1] < 0.6 * errors[0], errors


def test_ddim_inversion_round_trip_on_trained_toy(toy):
    """DDIM inversion of held-out data x0 -> x_500 and DDIM (eta = 0) back to x0 with the trained toy
    model: the round trip returns x0 within a few % of the data scale, and the error shrinks with more
    steps. t = 500 (not T-1): the usual editing depth; all the way to T-1 a briefly trained model's
    errors at high noise are amplified (the same check gives O(1) errors there)."""
    apply_fn, params, sched, direction, _ = toy
    c = jnp.linspace(-0.9, 0.9, 16)[:, None]
    x0 = c * direction + 0.05 * jax.random.normal(jax.random.key(3), (16, 4))
    scale = float(x0.std())
    errors = []
    for n in (10, 50):
        x_t = samplers.ddim_invert(apply_fn, sched, "epsilon", params, x0, c, num_steps=n, t_end=500)
        assert float(jnp.mean(jnp.abs(x_t - x0))) > 0.5 * scale  # really noised, not a no-op
        back = samplers.sample(apply_fn, sched, "epsilon", params, x_t, jax.random.key(0), c, name="ddim",
                               num_steps=n, t_start=500)
        errors.append(float(jnp.max(jnp.abs(back - x0))))
    assert errors[1] < 0.06 * scale and errors[1] < 0.5 * errors[0], (errors, scale)


def test_guidance_scale_one_equals_conditional_model(toy):
    apply_fn, params, sched, _, _ = toy
    cond, uncond = jnp.array([[0.8], [-0.5]]), jnp.zeros((2, 1))
    x_T = jax.random.normal(jax.random.key(7), (2, 4))
    calls = []

    def counting(p, x, t, c):
        calls.append(x.shape[0])
        return apply_fn(p, x, t, c)

    run = lambda u, g: samplers.sample(counting, sched, "epsilon", params, x_T, jax.random.key(0), cond, u,
                                       name="dpmpp_2m", num_steps=20, guidance_scale=g)
    guided, plain = run(uncond, 1.0), run(None, 1.0)
    assert calls == [4, 2]  # cond and uncond ran as one 2B batch
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), atol=1e-5)
    # and a larger scale moves the sample away from the unconditional one
    assert float(jnp.max(jnp.abs(run(uncond, 4.0) - plain))) > 1e-3


# ------------------------------------------------------------------------------ Frechet distance
def _scipy_fd(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)


def test_frechet_distance_matches_scipy_and_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    b = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1.0
    fa, fb = fid.FeatureStats.from_features(a), fid.FeatureStats.from_features(b)
    got = fid.frechet_distance(fa.mean, fa.cov, fb.mean, fb.cov)
    np.testing.assert_allclose(got, _scipy_fd(a, b), rtol=1e-9)
    # Commuting diagonal covariances: FD = |dmu|^2 + sum (s1 - s2)^2 for std devs s.
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    closed = 3 * 0.25 + np.sum((s1 - s2) ** 2)
    np.testing.assert_allclose(fid.frechet_distance(np.zeros(3), np.diag(s1 ** 2), np.full(3, 0.5), np.diag(s2 ** 2)),
                               closed, rtol=1e-9)
    out = fid.frechet_distance_from_stats(fa, fb)
    assert out["fd_samples"] == 400


def test_frechet_distance_warns_below_dimension_and_handles_singular():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))  # rank-4 covariances
    with pytest.warns(UserWarning, match="fewer samples than dimensions"):
        out = fid.frechet_distance_from_stats(fid.FeatureStats.from_features(a), fid.FeatureStats.from_features(b))
    assert np.isfinite(out["fd"]) and out["fd_samples"] == 5


def test_mae_features_bad_run_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fid.MAEFeatures(16, 3, run_dir=str(tmp_path))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning", "ignore:Frechet distance from")
def test_fd_features_from_an_mae_run(tmp_path, monkeypatch):
    """fd.mae_run_dir: the encoder of an eojax MAE run (checkpoint.load_variables, run when the eval
    step is first traced) gives the FD features of a diffusion eval."""
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "cache"))
    mae_dir = tmp_path / "mae"
    mae = load_config("mae", "runlocal", **{"total_steps": 1, "checkpoint_every": 1, "eval_every": 0,
                                            "input.num_windows": 32})
    train.train_and_evaluate(mae, str(mae_dir))
    (mae_dir / "config.json").write_text(mae.to_json_best_effort())  # as `eojax train` writes it
    config = load_config("diffusion", "runlocal,multispectral", **{  # 10 bands at 32x32, as the MAE
        "input.synthetic_n": 24, "fd.mae_run_dir": str(mae_dir), "batch_size": 4, "sampler.num_steps": 2,
        "model.block_out_channels": (16,), "model.attention": (True,), "model.heads": 2})
    run = train.setup(config, devices=jax.devices()[:1])
    metrics = train.evaluate(run, train.eval_variables(run, run.init_state()))
    assert run.task.features.source == f"MAE encoder of {mae_dir}"
    assert np.isfinite(metrics["fd"]) and metrics["fd_samples"] >= 2


def test_mae_features_random_init_warns():
    with pytest.warns(UserWarning, match="random-init"):
        f = fid.MAEFeatures(16, 3, width=32, depth=1, heads=2)
    out = f(jnp.zeros((2, 16, 16, 3)))
    assert out.shape == (2, 32) == (2, f.dim)


# ---------------------------------------------------------------------------------- caption data
def test_rsicd_reader_on_shared_sample(test_data):
    path = test_data / "rsicd_captions" / "captions_train_sample6.json"
    with pytest.raises(FileNotFoundError, match="airport_48.jpg"):  # listed, but not in the sample
        captions_lib.read_captions(str(path))
    with pytest.warns(UserWarning, match="leaving out 1 missing"):
        records = captions_lib.read_captions(str(path), skip_missing=True)
    assert len(records) == 5 and all(len(r.captions) >= 1 for r in records)
    labels = {r.label for r in records}
    assert {"airport", "square", "sparseresidential"} <= labels
    img = captions_lib.load_image(records[0].path, 32)
    assert img.shape == (32, 32, 3) and img.min() >= -1 and img.max() <= 1 and img.std() > 0.01
    # captions-only files name their missing images
    with pytest.raises(FileNotFoundError, match="missing"):
        captions_lib.read_captions(str(test_data / "rsicd_captions" / "captions_val2017.json"))


def test_synthetic_caption_layouts_and_reader(tmp_path):
    rs = synthetic.write_caption_dataset(tmp_path / "rs", n=20, size=16, seed=3, layout="rsicd")
    js = synthetic.write_caption_dataset(tmp_path / "js", n=20, size=16, seed=3, layout="metadata_jsonl")
    ms = synthetic.write_caption_dataset(tmp_path / "ms", n=4, size=16, seed=3, layout="metadata_jsonl",
                                         bands="sentinel2")
    a, b = captions_lib.read_captions(rs), captions_lib.read_captions(js)
    assert len(a) == len(b) == 20 and all(len(r.captions) == 5 for r in a) and all(len(r.captions) == 1 for r in b)
    assert [r.captions[0] for r in a] == [r.captions[0] for r in b]  # same scenes, same first caption
    for r in a:  # the caption names the dominant cover that the file name records
        first = {"water": ("lake", "water"), "forest": ("forest", "woodland"), "grassland": ("grass", "meadow"),
                 "cropland": ("farm", "crops", "fields"), "urban": ("town", "built"),
                 "bare_soil": ("bare",)}[r.label]
        assert any(w in r.captions[0].split(" next")[0].split(" with")[0].split(" near")[0].split(" beside")[0]
                   for w in first), (r.label, r.captions[0])
    m = captions_lib.read_captions(ms)
    img = captions_lib.load_image(m[0].path, 16)
    assert img.shape == (16, 16, 10)
    tok = WordTokenizer.from_captions([c for r in a for c in r.captions])
    src = captions_lib.CaptionSource(a, tok, size=16, max_len=8, train=True, seed=0)
    el = src[3]
    assert el["image"].shape == (16, 16, 3) and el["tokens"].shape == (8,) and el["tokens"][0] > 1
    # bad input is named
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file_name": "x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        captions_lib.read_captions(str(bad))
    with pytest.raises(ValueError, match="band"):
        captions_lib.load_image(m[0].path, 16, bands=(11,))


def test_space_to_depth_autoencoder_is_lossless():
    ae = space_to_depth_autoencoder(3, 2, scaling_factor=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    z = ae.encode(x)
    assert z.shape == (2, 4, 4, 12)
    np.testing.assert_allclose(np.asarray(ae.decode(z)), np.asarray(x))


# --------------------------------------------------------------------------- saved DataSpec
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_core_from_saved_spec_needs_no_captions(tmp_path, monkeypatch):
    """The core built from the JSON round trip of the DataSpec, with the captions and images
    unreachable, has the live core's tokenizer, param shapes and losses, and the infer plug-in samples
    the spec's default prompts (the first captions of the 3 most frequent classes) from it."""
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "cache"))
    config = load_config("diffusion", "runlocal", **{
        "input.synthetic_n": 24, "input.image_size": 16, "batch_size": 4, "fd.enabled": False,
        "model.block_out_channels": (16,), "model.attention": (True,), "model.heads": 2, "sampler.num_steps": 2})
    inp = DiffusionInput(config)
    spec, source = inp.spec(), inp._source(inp.records[0], True)
    batch = {k: np.stack([source[i][k] for i in range(4)]) for k in ("image", "tokens")}
    batch.update(index=np.arange(4, dtype=np.int32), weight=np.ones(4, np.float32))
    defaults = [cap for _, cap in inp.class_prompts(3)]
    live = DiffusionTask(config, spec)

    def unreachable(*args, **kwargs):
        raise AssertionError("the core read the training data")
    for name in ("read_captions", "load_image"):
        monkeypatch.setattr(captions_lib, name, unreachable)
    monkeypatch.setattr(DiffusionInput, "build_spec", unreachable)
    saved = DiffusionTask(config, DataSpec.from_json(json.loads(json.dumps(spec.to_json()))))

    assert saved.tokenizer.vocab == inp.tokenizer.vocab and saved.channels == live.channels == 3
    key = jax.random.key(0)
    shapes = lambda task: jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(jax.eval_shape(task.init, key, batch)))
    assert shapes(saved) == shapes(live)
    params = nn.meta.unbox(jax.jit(live.init)(key, batch)["params"])
    # train=True: caption dropout puts the tokenizer's padding id in
    loss_live, loss_saved = [float(jax.jit(t.loss_fn, static_argnums=4)(params, {}, batch, jax.random.key(1), True)[0])
                             for t in (live, saved)]
    assert np.isfinite(loss_live) and loss_live == loss_saved

    run = types.SimpleNamespace(task=saved, config=config)
    out = pictures.infer(run, (params, {}), str(tmp_path), {"prompt": [], "num_samples": 1, "seed": 0,
                                                            "output": str(tmp_path / "infer")})
    assert out["prompts"] == defaults and len(out["files"]) == 3 and all(os.path.exists(f) for f in out["files"])


# --------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_train_cli_then_infer(tmp_path):
    """A few trainer steps through the CLI on synthetic pairs (FD eval, EMA, pictures), then
    `eojax infer diffusion --prompt` writes PNGs and GeoTIFFs."""
    workdir = tmp_path / "run"
    env = {"EOJAX_CACHE": str(tmp_path / "cache")}
    small = ["--config.total_steps=4", "--config.checkpoint_every=4", "--config.eval_every=0",
             "--config.input.synthetic_n=96", "--config.input.image_size=16", "--config.sampler.num_steps=3",
             "--config.pictures.samples_per_class=2", "--config.pictures.max_classes=2"]
    # The infer process finds the sampler that the pictures compiled in the persistent cache.
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = cli("train", "diffusion:runlocal,multispectral", workdir, *small, env_extra=env)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    ev = summary["eval"]
    assert np.isfinite(ev["loss"]) and np.isfinite(ev["fd"]) and ev["fd_samples"] >= 2
    assert os.path.exists(summary["pictures"][0])
    results = json.load(open(workdir / "results.json"))
    assert results["data_fingerprint"]["train_images"] > 0
    # A caption file that does not exist: infer builds the model from the run's data_spec.json alone.
    proc = cli("infer", "diffusion:runlocal,multispectral", workdir, "diffusion", *small,
               f"--config.input.captions={tmp_path / 'gone.json'}",
               "--prompt=a dense forest", "--prompt=farmland", "--num_samples=2", "--negative_prompt=grainy",
               env_extra=env)
    out = json.loads(proc.stdout[proc.stdout.index("{"):])["infer"]
    assert out["negative_prompt"] == "grainy" and out["prompts"] == ["a dense forest", "farmland"]
    pngs = [f for f in out["files"] if f.endswith(".png")]
    tifs = [f for f in out["files"] if f.endswith(".tif")]
    assert len(pngs) == len(tifs) == 4 and all(os.path.exists(f) for f in out["files"])
    import rasterio
    with rasterio.open(tifs[0]) as src:
        assert src.count == 10 and src.descriptions[0] == "B2"


# ------------------------------------------------------------------------ frozen GPT-2 captions
GPT2_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "gpt2_tiny")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table (printable Latin-1 bytes stand for themselves, the
    other bytes are shifted to 256 + n), i.e. the 256 single-byte tokens of a byte-level BPE."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """The tiny GPT-2 fixture (vocab 300) + a byte-level BPE tokenizer written here (the fixture has
    none): the 256 byte tokens, the end-of-text token 256 and no merges, so every caption byte is a token."""
    import shutil
    d = tmp_path_factory.mktemp("gpt2")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(GPT2_FIXTURE, name), d / name)
    vocab = {c: i for i, c in enumerate(_byte_level_alphabet())}
    vocab["<|endoftext|>"] = 256
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return d


@pytest.mark.slow
def test_gpt2_text_encoder_hidden_states_and_padding(gpt2_dir):
    """The context is GPT-2's final hidden states: projected on the tied embedding they give GPT-2's
    logits; a padded caption has the unpadded caption's features and zeros at the padding."""
    from eojax.diffusion.model import DiffusionModel
    from eojax.models.gpt2 import GPT2
    from eojax.diffusion.text_encoder import BPECaptionTokenizer
    from eojax.weights import gpt2 as gpt2_weights

    tok = BPECaptionTokenizer(gpt2_weights.load_tokenizer(gpt2_dir))
    ids = tok.encode("a dense forest", 20)
    assert list(ids[:14]) == [_byte_level_alphabet().index(c) for c in "aĠdenseĠforest"] and (ids[14:] == -1).all()
    cfg, params = gpt2_weights.load_config(gpt2_dir), gpt2_weights.load_params(gpt2_dir)
    gpt2 = GPT2(**dict(cfg, dropout=0.0))
    real = jnp.asarray(ids[None, :14])
    hidden = gpt2.apply({"params": params}, real, method=GPT2.hidden_states)
    np.testing.assert_allclose(np.asarray(hidden @ params["wte"]["embedding"].T),
                               np.asarray(gpt2.apply({"params": params}, real)), atol=1e-4)
    model = DiffusionModel(unet={}, text=dict(cfg, dropout=0.0), text_kind="gpt2")
    ctx = model.apply({"params": {"text_encoder": params}}, jnp.asarray(ids[None]), method=DiffusionModel.encode_text)
    np.testing.assert_allclose(np.asarray(ctx[0, :14]), np.asarray(hidden[0]), atol=1e-5)
    assert ctx.shape == (1, 20, cfg["n_embd"]) and not np.asarray(ctx[0, 14:]).any()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_gpt2_captions_train_with_frozen_gpt2(gpt2_dir, tmp_path, monkeypatch):
    """Two trainer steps with model.text_encoder='gpt2' (captions through the folder's BPE; the GPT-2
    params loaded by the trainer's pretrained_parts hook after init): they stay bit-identical to the
    checkpoint's (their EMA within rounding); a checkpoint that does not fit is named; without
    optim.freeze the config is refused."""
    from eojax.checkpoint import CheckpointMismatchError
    from eojax.weights import gpt2 as gpt2_weights

    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "cache"))
    config = load_config("diffusion", f"runlocal,gpt2={gpt2_dir}", **{
        "input.synthetic_n": 48, "input.image_size": 16, "fd.enabled": False, "batch_size": 8,
        "model.block_out_channels": (16,), "model.attention": (True,), "model.heads": 2})
    run = train.setup(config)
    assert run.task.pretrained_parts() == {"text_encoder": str(gpt2_dir)}
    state = train.restore_or_init(run, ckpt_lib.Checkpointer(str(tmp_path / "ckpt")))
    losses = []
    for _ in range(2):
        state, metrics = run.train_step(state, run.next_batch())
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)), losses
    want = gpt2_weights.load_params(gpt2_dir)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params["text_encoder"], want)
    # The EMA of a constant moves by rounding only: optax-style d * ema + (1 - d) * p is not exactly p.
    ema = run.optimizer.eval_params(state.params, state.opt_state)["text_encoder"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-8), ema, want)
    # the task tokenised its captions with the folder's BPE
    assert isinstance(run.task.tokenizer.encode("forest", 4)[0], np.integer) and run.task.tokenizer.pad_id == -1
    # A text encoder of other sizes than the folder's GPT-2: one line naming the arrays that differ.
    other = dict(state.params["text_encoder"], wpe={"embedding": jnp.zeros((3, 5))})
    with pytest.raises(CheckpointMismatchError, match=r"shape of wpe/embedding: GPT-2 checkpoint \(\d+, \d+\) vs "
                                                      r"model \(3, 5\)") as err:
        run.task.load_pretrained_part("text_encoder", str(gpt2_dir), other)
    assert "\n" not in str(err.value)
    bad = load_config("diffusion", f"runlocal,gpt2={gpt2_dir}", **{"optim.freeze": ()})
    with pytest.raises(ValueError, match="optim.freeze"):
        DiffusionTask.check_config(bad)


# ------------------------------------------------------------------------- InceptionV3 features
@pytest.mark.slow
def test_inception_shapes_and_parameter_count():
    """pool3 features (B, 2048) at 299 and from small images (resized to 299); the conv + BatchNorm
    weights number torchvision's published inception_v3 count 27,161,264 less its AuxLogits head
    (128*768 + 2*128 + 768*128*25 + 2*768 + 768*1000 + 1000) and its fc (2048*1000 + 1000)."""
    from flax import traverse_util
    from eojax.diffusion.inception import InceptionV3
    from eojax.diffusion import inception_weights

    shapes = inception_weights.expected_shapes()
    trained = sum(int(np.prod(s)) for k, s in shapes.items() if k[-1] in ("kernel", "bn_scale", "bn_bias"))
    aux = 128 * 768 + 2 * 128 + 768 * 128 * 25 + 2 * 768 + 768 * 1000 + 1000
    assert trained == 27_161_264 - aux - (2048 * 1000 + 1000)
    model = InceptionV3()
    params = traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()})
    for size in (299, 32):
        out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, jnp.zeros((2, size, size, 3)))
        assert out.shape == (2, 2048)


def _np_conv_bn_relu(x, p, pad):
    """Direct numpy reference: 'same'-padded stride-1 convolution, BatchNorm (eps 1e-3), ReLU."""
    k = p["kernel"]
    kh, kw = k.shape[:2]
    xp = np.pad(x, ((0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)))
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    y = sum(np.einsum("bhwc,co->bhwo", xp[:, a:a + h, b:b + w], k[a, b]) for a in range(kh) for b in range(kw))
    return np.maximum((y - p["bn_mean"]) / np.sqrt(p["bn_var"] + 1e-3) * p["bn_scale"] + p["bn_bias"], 0)


def test_inception_a_block_matches_numpy():
    """FID's Mixed_5b block (InceptionA, average pool without the padding in the mean) against numpy."""
    from flax import linen as nn
    from eojax.diffusion.inception import InceptionA

    x = np.random.default_rng(0).normal(size=(2, 5, 5, 6)).astype(np.float32)
    block = InceptionA(pool_features=8, fid_variant=True)
    shapes = jax.eval_shape(block.init, jax.random.key(0), jnp.zeros(x.shape))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32) if s.ndim == 1 else
                          rng.normal(0, 0.2, s.shape).astype(np.float32), nn.meta.unbox(shapes)["params"])
    got = np.asarray(block.apply({"params": params}, jnp.asarray(x)))
    p = params
    b1 = _np_conv_bn_relu(x, p["branch1x1"], (0, 0))
    b5 = _np_conv_bn_relu(_np_conv_bn_relu(x, p["branch5x5_1"], (0, 0)), p["branch5x5_2"], (2, 2))
    b3 = _np_conv_bn_relu(x, p["branch3x3dbl_1"], (0, 0))
    b3 = _np_conv_bn_relu(_np_conv_bn_relu(b3, p["branch3x3dbl_2"], (1, 1)), p["branch3x3dbl_3"], (1, 1))
    xp, valid = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), np.pad(np.ones((5, 5)), 1)
    sums = sum(xp[:, a:a + 5, b:b + 5] for a in range(3) for b in range(3))
    counts = sum(valid[a:a + 5, b:b + 5] for a in range(3) for b in range(3))
    bp = _np_conv_bn_relu(sums / counts[None, :, :, None], p["branch_pool"], (0, 0))
    np.testing.assert_allclose(got, np.concatenate([b1, b5, b3, bp], axis=-1), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_inception_weights_import_round_trip(tmp_path, monkeypatch):
    """A state dict in the PyTorch layout (with the fc / AuxLogits / num_batches_tracked entries that are
    skipped) -> params -> state dict again, through .npz and .safetensors; bad files are named; the
    task's FD features follow fd.features='inception'."""
    from safetensors.numpy import save_file
    from eojax.checkpoint import CheckpointMismatchError
    from eojax.diffusion.inception import InceptionFeatures
    from eojax.diffusion import inception_weights

    from flax import traverse_util

    rng = np.random.default_rng(0)
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in inception_weights.expected_shapes().items()}
    sd = inception_weights.to_state_dict(traverse_util.unflatten_dict(params))
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3) and sd["Mixed_7c.branch_pool.bn.running_var"].shape == (192,)
    extra = {"fc.weight": np.zeros((1008, 2048), np.float32), "AuxLogits.fc.bias": np.zeros((3,), np.float32),
             "Conv2d_1a_3x3.bn.num_batches_tracked": np.zeros((), np.float32)}
    np.savez(tmp_path / "w.npz", **sd, **extra)
    save_file({**sd, **extra}, str(tmp_path / "w.safetensors"))
    for name in ("w.npz", "w.safetensors"):
        loaded = traverse_util.flatten_dict(inception_weights.load(tmp_path / name))
        assert set(loaded) == set(params) and all(np.array_equal(loaded[k], params[k]) for k in params)
    feats = InceptionFeatures(str(tmp_path / "w.npz"), rgb=(2, 1, 0))
    assert feats.dim == 2048 and "pytorch-fid" in feats.source
    bad = dict(sd)
    bad["Mixed_6b.branch7x7_2.conv.weight"] = bad["Mixed_6b.branch7x7_2.conv.weight"][:, :, :, :3]
    del bad["Mixed_5b.branch1x1.bn.running_mean"]
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(CheckpointMismatchError) as err:
        inception_weights.load(tmp_path / "bad.npz")
    assert "missing in file: Mixed_5b/branch1x1/bn_mean" in str(err.value)
    assert "shape of Mixed_6b.branch7x7_2.conv.weight: file (1, 3, 128, 128) vs model (1, 7, 128, 128)" in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        inception_weights.load(tmp_path / "missing.npz")

    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "cache"))
    config = load_config("diffusion", "runlocal,multispectral", **{
        "input.synthetic_n": 24, "input.image_size": 16, "fd.features": "inception",
        "fd.inception_weights": str(tmp_path / "w.npz")})
    DiffusionTask.check_config(config)
    task = DiffusionTask(config, DiffusionInput(config).spec())
    assert task.features.rgb == (2, 1, 0)  # B4, B3, B2 of the 10 Sentinel-2 bands
    out = jax.eval_shape(task.features, jnp.zeros((3, 16, 16, 10)))
    assert out.shape == (3, 2048)
    config.fd.inception_weights = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="fd.inception_weights"):
        DiffusionTask.check_config(config)


def test_eval_gives_fd_and_kid_of_the_unpadded_rows():
    """finalize_eval: FD and KID (with their sample counts) of the rows whose weight is not 0, equal to
    fid.feature_distances of those rows alone."""
    rng = np.random.default_rng(3)
    real, gen = rng.normal(size=(12, 6)), rng.normal(0.3, 1.0, size=(12, 6))
    weight = np.ones(12)
    weight[[4, 11]] = 0.0  # padding rows of the last batches
    config = load_config("diffusion", "runlocal")
    sums = {"loss_sum": np.float64(5.0), "count": weight.sum(), "feat_real_rows": real, "feat_gen_rows": gen,
            "weight_rows": weight}
    out = DiffusionTask.finalize_eval(types.SimpleNamespace(config=config), sums)
    keep = weight > 0
    want = fid.feature_distances(real[keep], gen[keep], kid_subsets=config.fd.kid_subsets,
                                 kid_subset_size=config.fd.kid_subset_size, seed=config.fd.seed)
    assert out["fd_samples"] == out["kid_samples"] == 10 and out["loss"] == 0.5
    assert out["kid"] == want["kid"] and out["fd"] == want["fd"]
    assert out["kid"] != fid.feature_distances(real, gen)["kid"]  # the padding rows are left out
