"""Fine-tuning a Stable Diffusion folder through the trainer (model.sd_folder, configs/diffusion.py:sd15):
the recipe's numbers, the one-line error without a folder, the prompts, the VAE latents, the UNet's remat
and odd-size options, sampling equal to sd.generate, and (slow) sd15_tiny trained and sampled
through the CLI with only the UNet changing and no optimizer moments for the frozen VAE and CLIP."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from eojax import optim, train
from eojax.diffusion import captions as captions_lib
from eojax.diffusion import clip as clip_lib
from eojax.diffusion import sd as sd_lib, sd_finetune, unet as unet_lib, unet_weights, vae as vae_lib
from eojax.diffusion.task import DiffusionInput, DiffusionTask
from eojax.tasks import DataSpec
from eojax.tasks.base import elements
from eojax.weights import common as weights_common
from helpers import ONE_DEVICE, cli, load_config

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd_tiny")
NEGATIVE = ("weird colors, low quality, jpeg artifacts, lowres, grainy, deformed structures, blurry, opaque, "
            "low contrast, distorted details, details are low")


@pytest.fixture(scope="module")
def folder_sd():
    return sd_lib.load(FOLDER)


def _spec(size=32):
    """The DataSpec of an sd15_tiny run, without reading any data."""
    return DataSpec(elements(image=((size, size, 3), np.float32), tokens=((77,), np.int32), index=((), np.int32),
                             weight=((), np.float32)),
                    {"band_names": ["R", "G", "B"], "vocab_size": 0, "vocab": None, "prompts": [["a", "a"]]})


def _paths(tree) -> list[str]:
    """'/'-joined key paths of the leaves (dict keys, NamedTuple fields, sequence indices)."""
    name = lambda k: next(str(getattr(k, a)) for a in ("key", "name", "idx") if hasattr(k, a))
    return ["/".join(name(k) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _folder_params(s):
    return {"denoiser": s.unet_params, "text_encoder": s.text_params, "vae": s.vae_params}


# ------------------------------------------------------------------------------------------ config
def test_sd15_config_is_the_recipe():
    """Every number of the diffusion project's train.sh (diffusers' train_text_to_image.py defaults for
    the rest) and of its sampling constants."""
    c = load_config("diffusion", "sd15,sd_folder=/data/sd15")
    o = c.optim
    assert c.model.sd_folder == "/data/sd15" and c.model.remat and c.model.dtype == "auto"
    assert (o.name, o.lr, o.schedule, o.warmup_steps) == ("adamw", 1e-6, "constant", 0)
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.no_decay) == (0.9, 0.999, 1e-8, 1e-2, ())
    assert (o.clip_norm, o.ema_decay, o.accum_steps) == (1.0, 0.9999, 4)
    assert tuple(o.freeze) == ("^text_encoder/", "^vae/") == sd_finetune.FROZEN
    assert (c.batch_size // o.accum_steps, c.total_steps, c.checkpoint_every) == (1, 3500, 500)
    assert (c.input.image_size, c.input.max_len, c.model.caption_dropout) == (224, 77, 0.0)
    d = c.diffusion
    assert (d.prediction, d.min_snr_gamma) == ("epsilon", 0.0)
    assert (d.schedule.name, d.schedule.num_timesteps, d.schedule.beta_start, d.schedule.beta_end) == \
        ("scaled_linear", 1000, 0.00085, 0.012)
    s = c.sampler
    assert (s.name, s.num_steps, s.guidance_scale, s.image_size) == ("", 100, 7.5, 512)
    assert s.negative_prompt == NEGATIVE and s.prompt_suffix == " , 8k, best quality, high-resolution"
    assert tuple(c.mesh) == (("data", 1), ("fsdp", -1), ("model", 1))
    assert sd_finetune.join_captions(["a b", "c", "d", "e", "f", "g"]) == "a b c d e f"
    # the folder's scheduler gives these betas (the tiny folder carries SD-1.5's scheduler config)
    schedule, options, prediction = sd_finetune.Folder.read(os.path.abspath(FOLDER)).sampler_settings()
    assert prediction == "epsilon" and options["name"] == "pndm" and schedule.num_timesteps == 1000
    np.testing.assert_allclose(np.sqrt(schedule.betas), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000), rtol=1e-12)
    DiffusionTask.check_config(load_config("diffusion", f"sd15,sd_folder={FOLDER}"))
    # without sd15 nothing changes: no folder, no suffix or negative prompt
    plain = load_config("diffusion", "runlocal")
    assert plain.model.sd_folder == "" and plain.sampler.negative_prompt == plain.sampler.prompt_suffix == ""


def test_a_missing_folder_is_one_clear_error_before_any_data(tmp_path, monkeypatch):
    def unreachable(*args, **kwargs):
        raise AssertionError("data was read")
    monkeypatch.setattr(captions_lib, "read_captions", unreachable)
    not_diffusers = tmp_path / "plain"
    not_diffusers.mkdir()
    cases = [("sd15", ValueError, "model.sd_folder is required"),
             (f"sd15,sd_folder={tmp_path / 'gone'}", FileNotFoundError, "does not exist"),
             (f"sd15,sd_folder={not_diffusers}", FileNotFoundError, "no model_index.json")]
    for arg, kind, words in cases:
        with pytest.raises(kind, match=words) as err:
            train.setup(load_config("diffusion", arg, mesh=ONE_DEVICE), devices=jax.devices()[:1])
        assert "huggingface-cli download stable-diffusion-v1-5" in str(err.value) and "\n" not in str(err.value)
    # sd15's missing folder is still a str key the command line can set
    proc = cli("config", "diffusion:sd15", tmp_path, "--config.model.sd_folder=/data/sd15")
    assert re.search(r"model\.sd_folder +str +'/data/sd15'", proc.stdout)
    for key, value in (("optim.freeze", ("^vae/",)), ("diffusion.prediction", "v_prediction"),
                       ("model.autoencoder", "space_to_depth"), ("sampler.name", "euler")):
        with pytest.raises(ValueError, match=key.split(".")[-1]):
            DiffusionTask.check_config(load_config("diffusion", "sd15_tiny", **{key: value}))


# ------------------------------------------------------------------------------- prompts, latents
def test_prompts_are_the_captions_joined_in_77_clip_tokens(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(tmp_path / "images" / "farm_1.png")
    caps = ["a farm", "fields ", "green fields", "crops", "a road", "a sixth one"]
    json.dump({"images": [{"id": 0, "file_name": "farm_1.png"}],
               "annotations": [{"image_id": 0, "caption": c} for c in caps]}, open(tmp_path / "c.json", "w"))
    config = load_config("diffusion", "sd15_tiny", **{"input.captions": str(tmp_path / "c.json"),
                                                      "input.eval_fraction": 0.0})
    inp = DiffusionInput(config)
    assert inp.class_prompts(1) == [["farm", "a farm fields green fields crops a road"]]
    item = inp._source(inp.records[0], True)[0]
    want = clip_lib.tokenize(clip_lib.load_tokenizer(os.path.join(FOLDER, "tokenizer")),
                             "a farm fields green fields crops a road")[0]
    assert item["tokens"].shape == (77,) and np.array_equal(item["tokens"], want)
    assert item["image"].shape == (32, 32, 3) and inp.spec().elements["tokens"] == ((77,), "int32")


def test_latents_are_a_vae_posterior_sample_times_the_scaling_factor(folder_sd):
    task = DiffusionTask(load_config("diffusion", "sd15_tiny"), _spec())
    params = _folder_params(folder_sd)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)
    rng = jax.random.key(7)
    mean, logvar = folder_sd.vae.apply({"params": folder_sd.vae_params}, images, method=vae_lib.AutoencoderKL.encode)
    want = vae_lib.latent_sample(mean, logvar, rng) * 0.18215
    np.testing.assert_array_equal(np.asarray(task.encode(params, images, rng)), np.asarray(want))
    assert not np.array_equal(np.asarray(task.encode(params, images, jax.random.key(8))), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(task.encode(params, images)), np.asarray(mean * 0.18215))
    assert task.pretrained_parts() == {"denoiser": FOLDER, "text_encoder": FOLDER, "vae": FOLDER}


def test_the_frozen_parts_get_no_optimizer_moments(folder_sd):
    """optim.freeze leaves the VAE and CLIP out of AdamW's state and of the EMA (the trainer's run keeps
    them bit-identical: colab/diffusion.ipynb's fine-tune, checked by tests/test_notebook.py)."""
    config = load_config("diffusion", "sd15_tiny")
    opt = optim.build(config.optim, config.total_steps)
    state = jax.eval_shape(opt.tx.init, _folder_params(folder_sd))
    paths = _paths(state.inner)
    assert len([p for p in paths if "/mu/denoiser/" in p]) == len(jax.tree.leaves(folder_sd.unet_params))
    assert not [p for p in paths if "vae/" in p or "text_encoder/" in p]
    # The EMA averages the UNet alone, as diffusers' EMAModel(unet.parameters()).
    assert len(jax.tree.leaves(state.ema)) == len(jax.tree.leaves(folder_sd.unet_params))
    assert not jax.tree.leaves(state.ema["vae"]) and not jax.tree.leaves(state.ema["text_encoder"])


# ----------------------------------------------------------------------------------------- UNet
def test_unet_remat_keeps_params_outputs_and_gradients():
    kw = dict(in_channels=4, out_channels=4, block_out_channels=(8,), attention=(True,), layers_per_block=1,
              heads=2, cross_attention_dim=8, norm_groups=8)
    x, t, ctx = jax.random.normal(jax.random.key(0), (2, 4, 4, 4)), jnp.array([3, 900]), jnp.ones((2, 3, 8))
    plain, remat = unet_lib.UNet(**kw), unet_lib.UNet(**kw, remat=True)
    shapes = lambda m: jax.tree.map(lambda a: a.shape, nn.meta.unbox(jax.eval_shape(m.init, jax.random.key(1), x, t, ctx)))
    assert shapes(plain) == shapes(remat)
    params = nn.meta.unbox(jax.jit(plain.init)(jax.random.key(1), x, t, ctx))["params"]
    loss = lambda m: jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply({"params": p}, x, t, ctx) ** 2)))
    (a, ga), (b, gb) = loss(plain)(params), loss(remat)(params)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # The same sums, perhaps in another order: within 1e-5 of the largest gradient (some, such as the
    # attention keys', are ~0 and all rounding).
    scale = max(float(np.max(np.abs(u))) for u in jax.tree.leaves(ga))
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5 * scale), ga, gb)


def test_unet_any_size_equals_diffusers_at_sizes_the_up_path_does_not_divide():
    """diffusers' UNet2DConditionModel (4 levels, SD-1.5's block types, tests/fixtures/sd_odd_size written by
    scripts/fixtures/make_sd_odd_size_fixture.py) on 28 x 28 latents (SD at 224 pixels: 28 -> 14 -> 7 -> 4
    and back through each skip's size) and on 15 x 13; torch's nearest indices (a half-pixel nearest resize
    is off by ~25 %); at divisible sizes any_size changes nothing."""
    h = jnp.arange(4.0).reshape(1, 4, 1, 1) * jnp.ones((1, 4, 3, 1))
    assert np.asarray(unet_lib._upsample_nearest(h, (7, 6)))[0, :, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3]
    folder = os.path.join(os.path.dirname(FOLDER), "sd_odd_size")
    kwargs = unet_weights.unet_kwargs_from_config(json.load(open(os.path.join(folder, "config.json"))))
    params = unet_weights.params_from_diffusers(
        weights_common.load_state_dict(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "unet"), kwargs)
    io = np.load(os.path.join(folder, "io.npz"))
    apply = jax.jit(unet_lib.UNet(**kwargs, any_size=True).apply)
    for n in ("28", "15"):
        got = apply({"params": params}, io[f"x{n}"].transpose(0, 2, 3, 1), io["t"], io["context"])
        want = io[f"eps{n}"].transpose(0, 2, 3, 1)
        assert np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)) < 1e-4  # measured 1.1e-6
    x = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
    with pytest.raises(ValueError, match="not divisible"):
        unet_lib.UNet(**kwargs).apply({"params": params}, io["x28"].transpose(0, 2, 3, 1), io["t"], io["context"])
    np.testing.assert_array_equal(apply({"params": params}, x, io["t"], io["context"]),
                                  jax.jit(unet_lib.UNet(**kwargs).apply)({"params": params}, x, io["t"], io["context"]))


# ------------------------------------------------------------------------------------- sampling
def test_sampling_equals_sd_generate_with_the_negative_prompt_and_suffix(folder_sd):
    """The task's sampler on the folder's own weights is StableDiffusionPipeline's (sd.generate): PNDM
    from the folder's scheduler, seed + i per image, the suffix on the prompts, guidance 7.5 away from the
    negative prompt."""
    config = load_config("diffusion", "sd15_tiny", **{"batch_size": 2, "sampler.num_steps": 4})
    task = DiffusionTask(config, _spec())
    prompts = ["a river", "dense forest with a road"]
    got = task.sample(_folder_params(folder_sd), prompts, seed=3, negative_prompt="blurry")
    want = sd_lib.generate(folder_sd, prompts, "blurry", num_steps=4, guidance_scale=7.5, seeds=[3, 4],
                           suffix=config.sampler.prompt_suffix)
    np.testing.assert_allclose(got, np.asarray(want) * 2 - 1, atol=2e-5)


