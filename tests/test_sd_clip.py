"""CLIP text encoder (eojax.diffusion.clip) against transformers' CLIPTextModel and CLIPTokenizer.

The fixture (tests/fixtures/sd_tiny/text_encoder, tokenizer/ and sd_tiny_io.npz's clip_ids /
clip_hidden) was written once by scripts/fixtures/make_sd_fixture.py with torch + transformers; these
tests need no torch.
"""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from eojax.checkpoint import CheckpointMismatchError
from eojax.diffusion import clip

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SD = os.path.join(FIXTURES, "sd_tiny")
TEXT_ENCODER, TOKENIZER = os.path.join(SD, "text_encoder"), os.path.join(SD, "tokenizer")


@pytest.fixture(scope="module")
def io():
    with np.load(os.path.join(FIXTURES, "sd_tiny_io.npz")) as z:
        return {"ids": z["clip_ids"], "hidden": z["clip_hidden"]}


@pytest.fixture(scope="module")
def kwargs():
    with open(os.path.join(TEXT_ENCODER, "config.json")) as f:
        return clip.clip_kwargs_from_config(json.load(f))


@pytest.fixture(scope="module")
def state_dict():
    return load_file(os.path.join(TEXT_ENCODER, "model.safetensors"))


@pytest.fixture(scope="module")
def loaded():
    return clip.load_pretrained(TEXT_ENCODER)


@pytest.fixture(scope="module")
def encode(loaded):
    model, params = loaded
    fn = jax.jit(lambda ids, mask: model.apply({"params": params}, ids, mask))
    return lambda ids, mask=None: np.asarray(fn(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


def test_tokenizer_ids_match_the_pipeline(io):
    with open(os.path.join(FIXTURES, "sd_tiny.json")) as f:
        prompts = json.load(f)["prompts"]
    tokenizer = clip.load_tokenizer(TOKENIZER)
    ids, mask = clip.tokenize(tokenizer, prompts, return_attention_mask=True)
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    np.testing.assert_array_equal(ids, io["ids"])
    np.testing.assert_array_equal(mask.sum(1), (io["ids"] != tokenizer.pad_token_id).sum(1) + 1)  # + the eos
    # truncation keeps the length and ends on <|endoftext|>, as the pipeline's tokenizer call does
    long = clip.tokenize(tokenizer, " ".join(prompts * 20), max_length=16)
    assert long.shape == (1, 16) and long[0, 0] == tokenizer.bos_token_id and long[0, -1] == tokenizer.eos_token_id


def test_tokenizer_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        clip.load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        clip.load_tokenizer(tmp_path)  # no tokenizer files
    bad = tmp_path / "bad"
    shutil.copytree(TOKENIZER, bad)
    (bad / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match=str(bad)) as err:
        clip.load_tokenizer(bad)
    assert "\n" not in str(err.value)


def test_hidden_states_match_transformers(io, encode, loaded):
    got = encode(io["ids"])
    assert got.dtype == np.float32 and got.shape == io["hidden"].shape
    rel = np.abs(got - io["hidden"]).max() / np.abs(io["hidden"]).max()
    assert rel < 1e-4, rel
    # bf16 compute (float32 LayerNorms / softmax) stays near the float32 reference
    model, params = loaded
    bf16 = clip.CLIPTextEncoder(**{**{k: getattr(model, k) for k in clip.SIZES}, "dtype": jnp.bfloat16})
    got16 = np.asarray(bf16.apply({"params": params}, io["ids"]))
    assert got16.dtype == np.float32 and np.abs(got16 - io["hidden"]).max() / np.abs(io["hidden"]).max() < 0.05


def test_clip_skip_is_the_final_norm_of_an_earlier_layer(io, loaded):
    model, params = loaded
    ids = io["ids"][:1]
    states = model.apply({"params": params}, ids, method=model.hidden_states)
    assert len(states) == model.num_hidden_layers + 1
    last = model.apply({"params": params}, states[-1], method=lambda m, x: m.final_layer_norm(x))
    np.testing.assert_allclose(np.asarray(last), io["hidden"][:1], rtol=0, atol=1e-5)
    skipped = model.apply({"params": params}, ids, clip_skip=1)
    penultimate = model.apply({"params": params}, states[-2], method=lambda m, x: m.final_layer_norm(x))
    np.testing.assert_allclose(np.asarray(skipped), np.asarray(penultimate), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="clip_skip"):
        model.apply({"params": params}, ids, clip_skip=model.num_hidden_layers)


def test_attention_is_causal(io, encode):
    ids = io["ids"][:1].copy()
    changed = ids.copy()
    changed[0, 4] = (changed[0, 4] + 7) % 500
    a, b = encode(ids), encode(changed)
    np.testing.assert_array_equal(a[0, :4], b[0, :4])  # earlier positions never see a later token
    assert np.abs(a[0, 4] - b[0, 4]).max() > 1e-3 and np.abs(a[0, 5:] - b[0, 5:]).max() > 1e-3


def test_padding_mask_hides_padding_keys(io, encode):
    ids = io["ids"][:1].copy()
    real = int((ids[0] != ids[0, -1]).sum()) + 1  # bos .. eos
    mask = (np.arange(ids.shape[1]) < real).astype(np.int32)[None]
    changed = ids.copy()
    changed[0, real + 3] = 320  # a word token in a padding slot
    a, b = encode(ids, mask), encode(changed, mask)
    others = np.arange(ids.shape[1]) != real + 3
    np.testing.assert_array_equal(a[0, others], b[0, others])  # only the changed slot's own output moves
    assert np.abs(a[0, real + 3] - b[0, real + 3]).max() > 1e-3
    # without the mask the later padding positions attend to the changed slot
    assert np.abs(encode(ids)[0, real + 4:] - encode(changed)[0, real + 4:]).max() > 1e-3
    # the real tokens' outputs do not depend on the mask (causal: they never see the padding)
    np.testing.assert_allclose(a[0, :real], encode(ids)[0, :real], rtol=0, atol=1e-6)


def test_export_round_trip_is_exact(state_dict, kwargs, loaded):
    _, params = loaded
    back = clip.params_to_transformers(params, kwargs, prefix="")
    assert back.keys() == state_dict.keys()
    for k, v in state_dict.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    # transformers 4's spelling, with the position_ids buffer old files carry: the same params
    prefixed = clip.params_to_transformers({"params": params}, kwargs)
    assert all(k.startswith("text_model.") for k in prefixed)
    prefixed["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    again = clip.params_from_transformers(prefixed, kwargs)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_bad_checkpoint_names_every_key(state_dict, kwargs):
    sd = dict(state_dict)
    del sd["encoder.layers.1.mlp.fc2.bias"]
    sd["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 16), np.float32)
    sd["encoder.layers.0.self_attn.rotary.weight"] = np.zeros((4,), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        clip.params_from_transformers(sd, kwargs)
    msg = str(err.value)
    assert "3 differences" in msg
    for key in ("missing in checkpoint: encoder.layers.1.mlp.fc2.bias",
                "shape of encoder.layers.0.self_attn.q_proj.weight: checkpoint (32, 16) vs model (32, 32)",
                "not in this model: encoder.layers.0.self_attn.rotary.weight"):
        assert key in msg, msg
    with pytest.raises(CheckpointMismatchError, match="token_embedding"):
        clip.params_from_transformers({"vision_model.x": np.zeros(1)}, kwargs)


def test_config_and_param_layout(kwargs):
    with pytest.raises(ValueError, match="'swiglu'"):
        clip.clip_kwargs_from_config({"hidden_act": "swiglu"})
    assert clip.clip_kwargs_from_config({"text_config": {"hidden_size": 64}})["hidden_size"] == 64
    model = clip.CLIPTextEncoder(**kwargs)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    specs = nn.get_partition_spec(boxed)
    assert specs["token_embedding"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
    assert specs["layers_0"]["mlp"]["fc1"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
    assert specs["layers_0"]["self_attn"]["query"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.init(jax.random.key(0), jnp.zeros((1, 78), jnp.int32))
