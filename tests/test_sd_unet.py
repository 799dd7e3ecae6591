"""eojax's UNet gives diffusers' UNet2DConditionModel's outputs through eojax.diffusion.unet_weights:
tests/fixtures/sd_tiny/unet/ is a tiny random SD-1.5-style UNet saved by diffusers 0.42.1's
save_pretrained, and sd_tiny_io.npz holds its epsilon for random inputs (both written by
scripts/fixtures/make_sd_fixture.py). No torch or diffusers here: the SD-1.5 / SD-2.1 key counts below
were counted once from diffusers 0.42.1's UNet2DConditionModel built on torch's meta device."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from eojax.checkpoint import CheckpointMismatchError
from eojax.diffusion import unet as unet_lib
from eojax.diffusion import unet_weights as uw

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
UNET_DIR = os.path.join(FIXTURES, "sd_tiny", "unet")
TOL = 1e-4  # max |eojax - diffusers| / max |diffusers| over the whole epsilon batch

# SD-1.5's unet/config.json (runwayml/stable-diffusion-v1-5, diffusers 0.6.0): the fields it writes.
SD15 = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# SD-2.1 (768-v): per-level head counts of 64 channels, Linear proj_in / proj_out, OpenCLIP-H context.
SD21 = {**SD15, "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
        "only_cross_attention": False, "upcast_attention": True, "use_linear_projection": True, "sample_size": 96}


def fixture_config() -> dict:
    with open(os.path.join(UNET_DIR, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def fixture_unet():
    kw = uw.unet_kwargs_from_config(fixture_config())
    return kw, load_file(os.path.join(UNET_DIR, "diffusion_pytorch_model.safetensors"))


def abstract_params(kw: dict, size: int = 64):
    m = unet_lib.UNet(**kw)
    return jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, size, size, kw["in_channels"])),
                                         jnp.zeros((1,)), jnp.zeros((1, 77, kw["cross_attention_dim"]))))


def test_fixture_epsilon_matches_diffusers(fixture_unet):
    kw, sd = fixture_unet
    assert kw == dict(in_channels=4, out_channels=4, block_out_channels=(32, 64), attention=(True, False),
                      layers_per_block=2, heads=2, transformer_depth=1, cross_attention_dim=32, norm_groups=32,
                      linear_projection=False)
    params = uw.params_from_diffusers(sd, kw)
    with np.load(os.path.join(FIXTURES, "sd_tiny_io.npz")) as io:
        x, t, ctx, ref = (io[k] for k in ("unet_x", "unet_t", "unet_context", "unet_eps"))
    eps = unet_lib.UNet(**kw).apply({"params": params}, x.transpose(0, 2, 3, 1), t, ctx)  # NCHW -> NHWC
    eps = np.asarray(eps).transpose(0, 3, 1, 2)
    rel = np.abs(eps - ref).max() / np.abs(ref).max()
    assert rel < TOL, rel  # measured 1.5e-6


def test_export_round_trip_is_the_file(fixture_unet):
    kw, sd = fixture_unet
    back = uw.params_to_diffusers({"params": uw.params_from_diffusers(sd, kw)}, kw)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
        assert back[k].tobytes() == sd[k].tobytes(), k


def test_consuming_load_gives_the_same_params_and_empties_its_inputs(fixture_unet):
    """The loading path of eojax.diffusion.sd (one copy of the weights at a time): the state dict and then
    the host params are emptied as they are converted, and the device params equal the plain conversion."""
    from eojax.weights import common

    kw, sd = fixture_unet
    want = uw.params_from_diffusers(sd, kw)
    state = dict(sd)
    host = uw.params_from_diffusers(state, kw, consume=True)
    assert state == {}
    got = common.to_device(host)
    assert host == {} and jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(a, jax.Array)
        np.testing.assert_array_equal(np.asarray(a), b)


def test_params_take_the_requested_dtype(fixture_unet):
    kw, sd = fixture_unet
    params = uw.params_from_diffusers(sd, kw, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("config,n_params,heads,proj_in", [
    (SD15, 859_520_964, 8, (320, 320, 1, 1)),
    (SD21, 865_910_724, (5, 10, 20, 20), (320, 320)),
])
def test_published_configs_map_to_diffusers_layout(config, n_params, heads, proj_in):
    """Shapes only: the abstract params of the mapped UNet exported to diffusers' keys. diffusers 0.42.1
    builds both with 686 state-dict keys; SD-1.5 has 859,520,964 parameters, SD-2.1 865,910,724."""
    kw = uw.unet_kwargs_from_config(config)
    assert kw["heads"] == heads and kw["linear_projection"] == (config is SD21)
    if config is SD15:
        assert kw == {**unet_lib.sd15_config(), "linear_projection": False}
    shapes = {k: v.shape for k, v in uw.params_to_diffusers(abstract_params(kw), kw).items()}
    assert len(shapes) == 686
    assert sum(int(np.prod(s)) for s in shapes.values()) == n_params
    assert shapes["down_blocks.0.attentions.0.proj_in.weight"] == proj_in
    ctx = config["cross_attention_dim"]
    assert shapes["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"] == (1280, ctx)
    assert shapes["up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"] == (2560, 320)
    assert shapes["up_blocks.0.resnets.0.conv1.weight"] == (1280, 2560, 3, 3)  # deepest level first
    assert shapes["up_blocks.3.resnets.0.conv_shortcut.weight"] == (320, 960, 1, 1)
    assert shapes["up_blocks.2.upsamplers.0.conv.weight"] == (640, 640, 3, 3)
    assert "up_blocks.3.upsamplers.0.conv.weight" not in shapes and "down_blocks.3.attentions.0.norm.weight" not in shapes
    assert uw.unet_kwargs_from_config(uw.diffusers_config(kw)) == kw


def test_diffusers_config_reads_back(fixture_unet):
    kw, _ = fixture_unet
    config = uw.diffusers_config(kw, sample_size=16)
    assert config["attention_head_dim"] == 2 and config["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D"]
    assert uw.unet_kwargs_from_config(config) == kw
    fixture = fixture_config()
    assert {k: config[k] for k in config if not k.startswith("_")} == {
        k: fixture[k] for k in config if not k.startswith("_")}


def test_bad_checkpoint_names_every_key(fixture_unet):
    kw, sd = fixture_unet
    bad = dict(sd)
    del bad["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    bad["up_blocks.1.resnets.2.conv1.weight"] = np.zeros((32, 65, 3, 3), np.float32)
    bad["mid_block.attentions.0.extra.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        uw.params_from_diffusers(bad, kw)
    msg = str(err.value)
    assert "3 differences" in msg
    assert "missing in checkpoint: down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight (32, 32)" in msg
    assert "shape of up_blocks.1.resnets.2.conv1.weight: checkpoint (32, 65, 3, 3) vs model (32, 64, 3, 3)" in msg
    assert "not in this model: mid_block.attentions.0.extra.weight (3,)" in msg


def test_export_of_other_params_is_refused(fixture_unet):
    kw, sd = fixture_unet
    params = uw.params_from_diffusers(sd, kw)
    with pytest.raises(CheckpointMismatchError, match="conv_in/kernel"):
        uw.params_to_diffusers(params, {**kw, "in_channels": 5})


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("addition_embed_type", "text_time"), ("time_cond_proj_dim", 256),
    ("resnet_time_scale_shift", "scale_shift"), ("only_cross_attention", True),
    ("only_cross_attention", [False, True]), ("mid_block_only_cross_attention", True),
    ("dual_cross_attention", True), ("center_input_sample", True), ("mid_block_type", None),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("num_attention_heads", 8), ("flip_sin_to_cos", False),
    ("freq_shift", 1), ("norm_eps", 1e-6), ("downsample_padding", 0), ("conv_in_kernel", 1),
    ("encoder_hid_dim", 64), ("time_embedding_type", "fourier"), ("act_fn", "gelu"),
    ("layers_per_block", [2, 1]), ("transformer_layers_per_block", [1, 2]), ("cross_attention_dim", [32, 16]),
    ("attention_head_dim", 3), ("attention_head_dim", [2, 3, 4]), ("norm_num_groups", 24),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D"]), ("some_future_option", 1),
    ("_class_name", "UNet2DModel"),
])
def test_unsupported_config_option_is_named(key, value):
    with pytest.raises(ValueError, match=f"^UNet config {key}="):
        uw.unet_kwargs_from_config({**fixture_config(), key: value})
