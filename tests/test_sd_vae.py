"""eojax.diffusion.vae against diffusers' AutoencoderKL: the tiny random SD folder's VAE
(tests/fixtures/sd_tiny/vae, saved by diffusers 0.42.1's save_pretrained) and the outputs diffusers
computed from it (tests/fixtures/sd_tiny_io.npz, channels-first; scripts/fixtures/make_sd_fixture.py).
Neither torch nor diffusers is needed here."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn, traverse_util
from safetensors.numpy import load_file

from eojax.checkpoint import CheckpointMismatchError
from eojax.diffusion import vae

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
VAE_DIR = FIXTURES / "sd_tiny" / "vae"


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def relative_error(got, ref):
    """max |got - ref| / max |ref| over the whole array."""
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def config():
    return json.loads((VAE_DIR / "config.json").read_text())


@pytest.fixture(scope="module")
def state_dict():
    return load_file(str(VAE_DIR / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def loaded(config, state_dict):
    kwargs = vae.vae_kwargs_from_config(config)
    return vae.AutoencoderKL(**kwargs), kwargs, vae.params_from_diffusers(state_dict, kwargs)


@pytest.fixture(scope="module")
def io():
    with np.load(FIXTURES / "sd_tiny_io.npz") as z:
        return {k: z[k] for k in z.files if k.startswith("vae_")}


def test_encode_and_decode_match_diffusers(loaded, io):
    module, _, params = loaded
    mean, logvar = jax.jit(lambda x: module.apply({"params": params}, x, method=module.encode))(nhwc(io["vae_x"]))
    decoded = jax.jit(lambda z: module.apply({"params": params}, z, method=module.decode))(nhwc(io["vae_z"]))
    assert mean.shape == logvar.shape == (2, 16, 16, 4) and decoded.shape == (2, 32, 32, 3)
    errors = {"mean": relative_error(mean, nhwc(io["vae_mean"])),
              "logvar": relative_error(logvar, nhwc(io["vae_logvar"])),
              "decoded": relative_error(decoded, nhwc(io["vae_decoded"]))}
    assert max(errors.values()) < 1e-4, errors


def test_export_gives_back_the_file_exactly(loaded, state_dict):
    _, kwargs, params = loaded
    exported = vae.params_to_diffusers({"params": params}, kwargs)
    assert sorted(exported) == sorted(state_dict)
    for key, ref in state_dict.items():
        assert exported[key].dtype == ref.dtype and exported[key].shape == ref.shape, key
        assert np.array_equal(exported[key].view(np.uint32), ref.view(np.uint32)), key  # bit-identical


def test_legacy_attention_names_and_conv_shapes_load_the_same(loaded, state_dict):
    _, kwargs, params = loaded
    legacy = {}
    for key, value in state_dict.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value[:, :, None, None] if value.ndim == 2 else value  # as a 1x1 conv
        legacy[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    assert legacy["decoder.mid_block.attentions.0.query.weight"].shape == (64, 64, 1, 1)
    got = traverse_util.flatten_dict(vae.params_from_diffusers(legacy, kwargs))
    want = traverse_util.flatten_dict(params)
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)
    # export writes the current names
    assert "encoder.mid_block.attentions.0.to_out.0.weight" in vae.params_to_diffusers(params, kwargs)


def test_bad_checkpoint_names_every_key(loaded, state_dict):
    _, kwargs, _ = loaded
    bad = dict(state_dict)
    del bad["decoder.up_blocks.1.resnets.0.conv_shortcut.bias"]
    bad["encoder.conv_in.weight"] = np.zeros((32, 4, 3, 3), np.float32)
    bad["encoder.extra.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        vae.params_from_diffusers(bad, kwargs)
    text = str(err.value)
    assert "missing in checkpoint: decoder.up_blocks.1.resnets.0.conv_shortcut.bias (32,)" in text
    assert "shape of encoder.conv_in.weight: checkpoint (32, 4, 3, 3) vs model (32, 3, 3, 3)" in text
    assert "not in this model: encoder.extra.weight" in text
    # not strict: the unknown key is left out, the rest still has to fit
    del bad["encoder.extra.weight"]
    with pytest.raises(CheckpointMismatchError, match="conv_shortcut.bias"):
        vae.params_from_diffusers(bad, kwargs, strict=False)
    # a checkpoint of another layout (no mid attention in the model) is refused too
    with pytest.raises(CheckpointMismatchError, match="not in this model: decoder.mid_block.attentions.0.to_q.weight"):
        vae.params_from_diffusers(state_dict, {**kwargs, "mid_block_add_attention": False})


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]),
    ("act_fn", "gelu"),
    ("norm_num_groups", 24),
    ("latents_mean", [0.1, 0.2, 0.3, 0.4]),
    ("_class_name", "AutoencoderTiny"),
    ("norm_type", "spatial"),
])
def test_unsupported_config_names_the_key(config, key, value):
    bad = {**config, key: value}
    with pytest.raises(ValueError, match=f"vae config {key}=") as err:
        vae.vae_kwargs_from_config(bad)
        vae.scaling_factor_from_config(bad)
    assert "\n" not in str(err.value)


def test_latent_scaling_from_config(config):
    assert vae.scaling_factor_from_config(config) == pytest.approx(0.18215)
    assert vae.shift_factor_from_config(config) == 0.0
    assert vae.shift_factor_from_config({**config, "shift_factor": 0.0609}) == pytest.approx(0.0609)
    assert vae.scaling_factor_from_config({}) == pytest.approx(0.18215)


@pytest.mark.parametrize("options", [
    dict(use_quant_conv=False, use_post_quant_conv=False),
    dict(mid_block_add_attention=False, layers_per_block=2),
    dict(block_out_channels=(8, 16, 16), norm_num_groups=4, in_channels=5, out_channels=2, latent_channels=3),
])
def test_key_table_covers_every_layout(options):
    """The table and the module agree on every parameter for other settings too: random params of
    the module go out to diffusers' keys and come back unchanged."""
    kwargs = {**vae.vae_kwargs_from_config({"block_out_channels": [8, 16], "norm_num_groups": 4,
                                            "down_block_types": ["DownEncoderBlock2D"] * 2,
                                            "up_block_types": ["UpDecoderBlock2D"] * 2}), **options}
    module = vae.AutoencoderKL(**kwargs)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, kwargs["in_channels"])))
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(v.shape).astype(np.float32)
            for k, v in traverse_util.flatten_dict(nn.meta.unbox(abstract)["params"]).items()}
    sd = vae.params_to_diffusers(traverse_util.unflatten_dict(flat), module)
    assert ("quant_conv.weight" in sd) == kwargs["use_quant_conv"]
    assert any(".attentions.0." in k for k in sd) == kwargs["mid_block_add_attention"]
    back = traverse_util.flatten_dict(vae.params_from_diffusers(sd, module))
    assert back.keys() == flat.keys() and all(np.array_equal(back[k], flat[k]) for k in flat)


def test_autoencoder_interface(loaded, io, config):
    module, _, params = loaded
    scale = vae.scaling_factor_from_config(config)
    x = nhwc(io["vae_x"])
    ae = vae.autoencoder(module, params, sample=False, scaling_factor=scale)
    assert (ae.downsample, ae.latent_channels, ae.scaling_factor) == (2, 4, scale)
    latents = np.asarray(ae.encode(x))
    np.testing.assert_allclose(latents / scale, nhwc(io["vae_mean"]), atol=1e-4 * np.abs(io["vae_mean"]).max())
    decoded = np.asarray(ae.decode(nhwc(io["vae_z"]) * scale))
    np.testing.assert_allclose(decoded, nhwc(io["vae_decoded"]), atol=1e-4 * np.abs(io["vae_decoded"]).max())

    # sampling: mean + exp(logvar / 2) * noise, fresh with each rng, one fixed draw without
    sampled = vae.autoencoder(module, params, sample=True, scaling_factor=scale)
    z1, z2 = (np.asarray(sampled.encode_fn(x, jax.random.PRNGKey(i))) for i in (1, 2))
    assert not np.allclose(z1, z2)
    noise = (z1 - nhwc(io["vae_mean"])) / np.exp(0.5 * nhwc(io["vae_logvar"]))
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    np.testing.assert_array_equal(np.asarray(sampled.encode(x)), np.asarray(sampled.encode(x)))

    # a shift factor is subtracted before scaling and added back before decoding
    shifted = vae.autoencoder(module, params, scaling_factor=scale, shift_factor=0.5)
    np.testing.assert_allclose(np.asarray(shifted.encode(x)), latents - 0.5 * scale, atol=1e-6)
    # (the shift is undone in float32 before the decoder: rounding-level differences)
    np.testing.assert_allclose(np.asarray(shifted.decode(latents - 0.5 * scale)), np.asarray(ae.decode(latents)),
                               atol=1e-5 * np.abs(decoded).max())


def test_bfloat16_compute_stays_close(loaded, io):
    module, kwargs, params = loaded
    half = vae.AutoencoderKL(**kwargs, dtype=jnp.bfloat16)
    mean, logvar = jax.jit(lambda x: half.apply({"params": params}, x, method=half.encode))(nhwc(io["vae_x"]))
    assert mean.dtype == logvar.dtype == jnp.float32
    assert relative_error(mean, nhwc(io["vae_mean"])) < 5e-2
