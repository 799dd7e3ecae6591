"""eojax.weights.{prithvi,dofa,croma}: published PyTorch layouts -> eojax encoder params.

The layout checks build state dicts by hand with the reference key names and shapes (written from
the reference modules: hls-foundation-os / PANGAEA Prithvi_Encoder, DOFA Dynamic_MLP_OFA +
TransformerWeightGenerator, CROMA ViT / BaseTransformer) and compare eojax's forward pass after
import with numpy ports of the reference forward passes, so neither the exporter nor eojax's
modules are the reference. Round trips, mismatch errors and the missing-band report follow.
"""
import itertools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn, traverse_util
from scipy.special import erf

from eojax.checkpoint import CheckpointMismatchError
from eojax.models.encoders import build
from eojax.weights import common, croma as wcroma, dofa as wdofa, prithvi as wprithvi

B = 2
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------ numpy ports of the torch ops
def np_ln(x, sd, key, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * sd[f"{key}.weight"] + sd[f"{key}.bias"]


def np_gelu(x):
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_linear(x, sd, key):
    y = x @ sd[f"{key}.weight"].T
    return y + sd[f"{key}.bias"] if f"{key}.bias" in sd else y


def np_mha(x, w_qkv, b_qkv, sd, out_key, heads, bias=None):
    """(B, N, D): q, k, v = chunks of x @ w_qkv.T (+ b); 'b n (h d) -> b h n d'; softmax(qk/sqrt(d)
    + bias) v; merge heads; output Linear."""
    b, n, d = x.shape
    qkv = x @ w_qkv.T + (0 if b_qkv is None else b_qkv)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(0, 2, 1, 3) for t in np.split(qkv, 3, -1))
    logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads) + (0 if bias is None else bias)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = (att @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return np_linear(o, sd, out_key)


def np_timm_block(x, sd, pre, heads, eps):
    h = np_ln(x, sd, f"{pre}.norm1", eps)
    x = x + np_mha(h, sd[f"{pre}.attn.qkv.weight"], sd[f"{pre}.attn.qkv.bias"], sd,
                   f"{pre}.attn.proj", heads)
    h = np_ln(x, sd, f"{pre}.norm2", eps)
    return x + np_linear(np_gelu(np_linear(h, sd, f"{pre}.mlp.fc1")), sd, f"{pre}.mlp.fc2")


def timm_block_shapes(pre, d, mlp):
    return {f"{pre}.norm1.weight": (d,), f"{pre}.norm1.bias": (d,),
            f"{pre}.attn.qkv.weight": (3 * d, d), f"{pre}.attn.qkv.bias": (3 * d,),
            f"{pre}.attn.proj.weight": (d, d), f"{pre}.attn.proj.bias": (d,),
            f"{pre}.norm2.weight": (d,), f"{pre}.norm2.bias": (d,),
            f"{pre}.mlp.fc1.weight": (mlp, d), f"{pre}.mlp.fc1.bias": (mlp,),
            f"{pre}.mlp.fc2.weight": (d, mlp), f"{pre}.mlp.fc2.bias": (d,)}


def random_sd(shapes, scale=0.2):
    return {k: (RNG.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def sincos_ref(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2.0))
    out = np.asarray(pos, np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def np_apply(enc, params, x):
    return [np.asarray(m) for m in jax.jit(enc.apply)({"params": params}, jnp.asarray(x))]


# ------------------------------------------------------------------ Prithvi
D, P, DEPTH, MLP = 32, 8, 4, 64
LAYERS = (0, 1, 3)


def prithvi_shapes(frames, grid, pre=""):
    n = frames * grid * grid
    out = {f"{pre}cls_token": (1, 1, D), f"{pre}pos_embed": (1, 1 + n, D),
           f"{pre}patch_embed.proj.weight": (D, 6, 1, P, P), f"{pre}patch_embed.proj.bias": (D,),
           f"{pre}norm.weight": (D,), f"{pre}norm.bias": (D,)}
    for k in range(DEPTH):
        out.update(timm_block_shapes(f"{pre}blocks.{k}", D, MLP))
    return out


def prithvi_3d_sincos(frames, h, w):
    """get_3d_sincos_pos_embed written out: [w (6/16), h (6/16), t (4/16)], with a zero cls row."""
    dw, dt = D // 16 * 6, D // 16 * 4
    emb_w = np.tile(sincos_ref(dw, np.arange(w)), (frames * h, 1))
    emb_h = np.tile(np.repeat(sincos_ref(dw, np.arange(h)), w, axis=0), (frames, 1))
    emb_t = np.repeat(sincos_ref(dt, np.arange(frames)), h * w, axis=0)
    return np.concatenate([np.zeros((1, D)), np.concatenate([emb_w, emb_h, emb_t], 1)])[None]


def prithvi_reference(sd, video, layers, heads=2):
    """video (B, C, T, H, W) -> [(B, D, T, h, w)] as PANGAEA's Prithvi_Encoder (no final norm)."""
    b, c, t, hh, ww = video.shape
    w = sd["patch_embed.proj.weight"]  # Conv3d kernel (1, P, P), stride the same
    patches = video.reshape(b, c, t, hh // P, P, ww // P, P)
    x = np.einsum("bcthiwj,dcij->bdthw", patches, w[:, :, 0]) + sd["patch_embed.proj.bias"][None, :, None, None, None]
    x = x.reshape(b, D, -1).transpose(0, 2, 1)
    x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, D)), x], 1) + sd["pos_embed"]
    outs = []
    for k in range(DEPTH):
        x = np_timm_block(x, sd, f"blocks.{k}", heads, 1e-5)
        if k in layers:
            outs.append(x[:, 1:].transpose(0, 2, 1).reshape(b, D, t, hh // P, ww // P))
    return outs


@pytest.mark.parametrize("frames", [1, 3])
def test_prithvi_layout_matches_reference_forward(frames):
    sd = random_sd(prithvi_shapes(frames, 4))
    sd["pos_embed"] = prithvi_3d_sincos(frames, 4, 4).astype(np.float32)
    enc = build("prithvi", variant="mu", num_frames=frames, layers=LAYERS)
    params, report = wprithvi.prithvi_from_torch(sd, enc)
    assert set(report["ignored"]) == {"norm.weight", "norm.bias"}
    video = RNG.standard_normal((B, 6, frames, 32, 32)).astype(np.float32)
    got = np_apply(enc, params, video.transpose(0, 2, 3, 4, 1))  # (B, T, H, W, C)
    want = prithvi_reference(sd, video, LAYERS)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.mean(axis=2).transpose(0, 2, 3, 1), rtol=2e-4, atol=2e-4)
    # eojax's own initial pos_embed is the reference's 3D sin-cos.
    fresh = enc._sincos_init(None, sd["pos_embed"].shape, jnp.float32)
    np.testing.assert_allclose(np.asarray(fresh), sd["pos_embed"], atol=1e-6)


def test_prithvi_base_key_shapes_and_prefixes():
    """Published Prithvi-100M shapes (embed 768, 6 bands, tubelet 1, 3 frames of 14x14), in the
    bare MAE layout and under terratorch's 'encoder.' prefix; shape table only (no arrays)."""
    enc = build("prithvi", variant="base", num_frames=3)
    table = {e.key: e.shape for e in wprithvi._entries(enc, "encoder.")}
    assert table["encoder.patch_embed.proj.weight"] == (768, 6, 1, 16, 16)
    assert table["encoder.pos_embed"] == (1, 589, 768)
    assert table["encoder.blocks.11.attn.qkv.weight"] == (2304, 768)
    assert table["encoder.blocks.11.mlp.fc1.weight"] == (3072, 768)
    assert len(table) == 4 + 12 * 12


def test_prithvi_prefix_resize_and_band_report(caplog):
    """terratorch layout ('encoder.' + decoder), a 3-frame checkpoint into a 1-frame model of another
    size: its pos_embed is not used (the model's 3D sin-cos for T = 1, t = 0, as PANGAEA), missing
    bands zero-filled."""
    sd = random_sd(prithvi_shapes(3, 4, "encoder."))
    sd["encoder.pos_embed"] = prithvi_3d_sincos(3, 4, 4).astype(np.float32)
    sd["decoder.decoder_embed.weight"] = np.zeros((16, D), np.float32)
    enc = build("prithvi", variant="mu", image_size=32, input_bands=("RED", "B2", "NIR_NARROW"),
                sensor="hls_s30")
    with caplog.at_level(logging.WARNING):
        params, report = wprithvi.prithvi_from_torch(sd, enc)
        common.log_report("test", report)
    assert report["resized"] == {} and "grid (3, 4, 4)" in report["ignored"]["encoder.pos_embed"]
    np.testing.assert_allclose(params["pos_embed"], prithvi_3d_sincos(1, 4, 4), atol=1e-6)  # t = 0
    assert report["zero_filled_bands"] == ["B3", "B11", "B12"]
    assert "decoder.decoder_embed.weight" in report["ignored"]
    assert "B3" in caplog.text and "zero-fill" in caplog.text
    # Zero-filling by name == the full model on a 6-band stack with zeros in the missing slots.
    full = build("prithvi", variant="mu")
    x3 = RNG.standard_normal((B, 32, 32, 3)).astype(np.float32)
    x6 = np.zeros((B, 32, 32, 6), np.float32)
    x6[..., 2], x6[..., 0], x6[..., 3] = x3[..., 0], x3[..., 1], x3[..., 2]
    for a, b in zip(np_apply(enc, params, x3), np_apply(full, params, x6)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_prithvi_round_trip_scan_and_mismatch(tmp_path):
    """export -> .safetensors -> load_encoder is the identity (scanned blocks); then mismatches."""
    from safetensors.numpy import save_file
    enc = build("prithvi", variant="mu", num_frames=3, scan=True)
    abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 3, 32, 32, 6))))["params"]
    params = common.flat_params(jax.tree.map(lambda a: RNG.standard_normal(a.shape).astype(np.float32), abstract))
    sd = wprithvi.prithvi_to_torch(traverse_util.unflatten_dict(params), enc)
    assert sd["patch_embed.proj.weight"].shape == (D, 6, 1, P, P)
    save_file({f"encoder.{k}": v for k, v in sd.items()}, tmp_path / "prithvi.safetensors")
    back, _ = common.load_encoder(tmp_path / "prithvi.safetensors", abstract, enc)
    back = traverse_util.flatten_dict(back)
    assert back.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(back[k], params[k])
    bad = dict(sd, **{"blocks.2.mlp.fc1.weight": np.zeros((65, D), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.2\.mlp\.fc1\.weight: checkpoint \(65, 32\) vs model \(64, 32\)"):
        wprithvi.prithvi_from_torch(bad, enc)
    with pytest.raises(CheckpointMismatchError, match=r"missing in checkpoint: cls_token"):
        wprithvi.prithvi_from_torch({k: v for k, v in sd.items() if k != "cls_token"}, enc)
    with pytest.raises(CheckpointMismatchError, match="not in this model: blocks.9.norm1.weight"):
        wprithvi.prithvi_from_torch(dict(sd, **{"blocks.9.norm1.weight": np.zeros(D)}), enc)
    with pytest.raises(CheckpointMismatchError, match="shape of patch_embed.proj.weight"):
        wprithvi.prithvi_from_torch(dict(sd, **{"patch_embed.proj.weight": np.zeros((D, 4, 1, P, P))}), enc)


# ------------------------------------------------------------------ DOFA
E, GM = 16, 32  # wave_dim and generator MLP of the 'mu' variant


def dofa_shapes(grid):
    g = "patch_embed.weight_generator."
    t = g + "transformer_encoder.layers.0."
    out = {"cls_token": (1, 1, D), "pos_embed": (1, 1 + grid * grid, D),
           "patch_embed.fclayer.w1.weight": (E, E), "patch_embed.fclayer.w1.bias": (E,),
           "patch_embed.fclayer.w2.weight": (E, E), "patch_embed.fclayer.w2.bias": (E,),
           g + "weight_tokens": (128, E), g + "bias_token": (1, E),
           t + "self_attn.in_proj_weight": (3 * E, E), t + "self_attn.in_proj_bias": (3 * E,),
           t + "self_attn.out_proj.weight": (E, E), t + "self_attn.out_proj.bias": (E,),
           t + "linear1.weight": (GM, E), t + "linear1.bias": (GM,),
           t + "linear2.weight": (E, GM), t + "linear2.bias": (E,),
           t + "norm1.weight": (E,), t + "norm1.bias": (E,), t + "norm2.weight": (E,), t + "norm2.bias": (E,),
           g + "fc_weight.weight": (P * P * D, E), g + "fc_weight.bias": (P * P * D,),
           g + "fc_bias.weight": (D, E), g + "fc_bias.bias": (D,),
           "norm.weight": (D,), "norm.bias": (D,), "head.weight": (10, D), "head.bias": (10,)}
    for k in range(DEPTH):
        out.update(timm_block_shapes(f"blocks.{k}", D, MLP))
    return out


def dofa_reference(sd, img, waves, layers, mode, heads=2, gen_heads=2):
    """img (B, C, H, W) -> [(B, D, h, w)] as PANGAEA's DOFA_Encoder: mode 'final' as now (the
    checkpoint's LayerNorm on the tokens after the last block), 'standardise' as before Oct 2024 with
    use_norm=True (a LayerNorm over (D, h, w) of each output, weight 1, bias 0)."""
    g = "patch_embed.weight_generator."
    t = g + "transformer_encoder.layers.0."
    e = sincos_ref(E, np.asarray(waves) * 1000)
    h = np.maximum(np_linear(e, sd, "patch_embed.fclayer.w1"), 0)
    e = e + np.maximum(np_linear(h, sd, "patch_embed.fclayer.w2"), 0)
    s = np.concatenate([sd[g + "weight_tokens"], e, sd[g + "bias_token"]])[None]
    s = np_ln(s + np_mha(s, sd[t + "self_attn.in_proj_weight"], sd[t + "self_attn.in_proj_bias"], sd,
                         t + "self_attn.out_proj", gen_heads), sd, t + "norm1", 1e-5)
    s = np_ln(s + np_linear(np_gelu(np_linear(s, sd, t + "linear1")), sd, t + "linear2"), sd,
              t + "norm2", 1e-5)[0]
    c = len(waves)
    weight = np_linear(s[128:-1] + e, sd, g + "fc_weight").reshape(c, P, P, D).transpose(3, 0, 1, 2) * 0.01
    bias = np_linear(s[-1], sd, g + "fc_bias") * 0.01
    b, _, hh, ww = img.shape
    n_h, n_w = (hh + 2 - P) // P + 1, (ww + 2 - P) // P + 1  # conv2d stride P, padding 1
    padded = np.pad(img, ((0, 0), (0, 0), (1, 1), (1, 1)))[:, :, :n_h * P, :n_w * P]
    x = np.einsum("bchiwj,dcij->bhwd", padded.reshape(b, c, n_h, P, n_w, P), weight) + bias
    x = x.reshape(b, -1, D) + sd["pos_embed"][:, 1:]
    x = np.concatenate([np.broadcast_to(sd["cls_token"] + sd["pos_embed"][:, :1], (b, 1, D)), x], 1)
    outs = []
    for k in range(DEPTH):
        x = np_timm_block(x, sd, f"blocks.{k}", heads, 1e-6)
        if k == DEPTH - 1 and mode == "final":
            x = np_ln(x, sd, "norm", 1e-6)
        if k in layers:
            o = x[:, 1:].transpose(0, 2, 1).reshape(b, D, n_h, n_w)
            if mode == "standardise":
                mu = o.mean(axis=(1, 2, 3), keepdims=True)
                o = (o - mu) / np.sqrt(o.var(axis=(1, 2, 3), keepdims=True) + 1e-6)
            outs.append(o)
    return outs


@pytest.mark.parametrize("mode", ["final", "standardise"])
@pytest.mark.parametrize("bands", [("B4", "B3", "B2"), ("B2", "B3", "B4", "B8A", "B11", "B12")])
def test_dofa_layout_matches_reference_forward(bands, mode):
    waves = {"B2": 0.49, "B3": 0.56, "B4": 0.665, "B8A": 0.864, "B11": 1.61, "B12": 2.20}  # PANGAEA's dofa.yaml
    sd = random_sd(dofa_shapes(4))
    sd["pos_embed"][:, 0] = 0.0
    sd["norm.weight"] += 1.0
    enc = build("dofa", variant="mu", input_bands=bands, sensor="sentinel2a", layers=LAYERS, feature_norm=mode)
    params, report = wdofa.dofa_from_torch(sd, enc)
    assert report["wavelengths"] == tuple(waves[b] for b in bands)
    norm = {"norm.weight", "norm.bias"} if mode == "standardise" else set()
    assert set(report["ignored"]) == {"head.weight", "head.bias"} | norm
    img = RNG.standard_normal((B, len(bands), 32, 32)).astype(np.float32)
    got = np_apply(enc, params, img.transpose(0, 2, 3, 1))
    for g, w in zip(got, dofa_reference(sd, img, [waves[b] for b in bands], LAYERS, mode)):
        np.testing.assert_allclose(g, w.transpose(0, 2, 3, 1), rtol=1e-3, atol=1e-3)


def test_dofa_base_shapes_resize_and_errors(tmp_path):
    table = {e.key: e.shape for e in wdofa._entries(build("dofa", variant="base", input_bands=("B2",), sensor="s2"))}
    assert table["patch_embed.weight_generator.fc_weight.weight"] == (16 * 16 * 768, 128)
    assert table["patch_embed.weight_generator.transformer_encoder.layers.0.linear1.weight"] == (2048, 128)
    assert table["patch_embed.weight_generator.weight_tokens"] == (128, 128)
    assert table["pos_embed"] == (1, 197, 768)
    sd = random_sd(dofa_shapes(4))
    enc = build("dofa", variant="mu", image_size=48, wavelengths=(0.665, 0.56))  # 6x6 grid
    np.savez(tmp_path / "dofa.npz", **sd)
    abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 48, 48, 2))))["params"]
    params, report = common.load_encoder(tmp_path / "dofa.npz", abstract, enc)
    assert report["resized"] == {"pos_embed": ((4, 4), (6, 6))} and params["pos_embed"].shape == (1, 37, D)
    np.testing.assert_array_equal(params["blocks"]["block_1"]["mlp"]["fc1"]["kernel"], sd["blocks.1.mlp.fc1.weight"].T)
    np.testing.assert_array_equal(params["pos_embed"][:, 0], sd["pos_embed"][:, 0])  # cls row kept
    bad = dict(sd, **{"patch_embed.weight_generator.fc_bias.weight": np.zeros((D + 1, E), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"fc_bias\.weight: checkpoint \(33, 16\) vs model \(32, 16\)"):
        wdofa.dofa_from_torch(bad, enc)
    with pytest.raises(CheckpointMismatchError, match="pos_embed: checkpoint"):
        wdofa.dofa_from_torch(dict(sd, pos_embed=np.zeros((1, 20, D), np.float32)), enc)
    with pytest.raises(CheckpointMismatchError, match="not this model's layout"):
        wdofa.dofa_from_torch({"cls_token": sd["cls_token"]}, enc)


# ------------------------------------------------------------------ CROMA
def croma_shapes(pre="s2_encoder."):
    out = {f"{pre}linear_input.weight": (D, 12 * P * P), f"{pre}linear_input.bias": (D,),
           f"{pre}transformer.norm_out.weight": (D,), f"{pre}transformer.norm_out.bias": (D,)}
    for k in range(DEPTH):
        t = f"{pre}transformer.layers.{k}"
        out.update({f"{t}.0.to_qkv.weight": (3 * D, D), f"{t}.0.to_out.weight": (D, D),
                    f"{t}.0.to_out.bias": (D,), f"{t}.0.input_norm.weight": (D,),
                    f"{t}.0.input_norm.bias": (D,), f"{t}.1.net.0.weight": (MLP, D),
                    f"{t}.1.net.0.bias": (MLP,), f"{t}.1.net.3.weight": (D, MLP), f"{t}.1.net.3.bias": (D,),
                    f"{t}.1.input_norm.weight": (D,), f"{t}.1.input_norm.bias": (D,)})
    return out


def croma_alibi(heads, n):
    """get_2dalibi as written in the reference: itertools points, recursive slopes."""
    def slopes(k):
        if math.log2(k).is_integer():
            start = 2 ** (-(2 ** -(math.log2(k) - 3)))
            return [start * start ** i for i in range(k)]
        c = 2 ** math.floor(math.log2(k))
        return slopes(c) + slopes(2 * c)[0::2][:k - c]
    side = int(math.sqrt(n))
    pts = list(itertools.product(range(side), range(side)))
    s = np.asarray(slopes(heads))[:, None]
    cols = [-s * math.dist(p1, p2) for p1 in pts for p2 in pts]
    return np.concatenate(cols, 1).reshape(1, heads, n, n)


def croma_reference(sd, img, layers, heads=4, pre="s2_encoder."):
    b, c, hh, ww = img.shape
    x = img.reshape(b, c, hh // P, P, ww // P, P).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * P * P)
    x = np_linear(x, sd, f"{pre}linear_input")
    bias = croma_alibi(heads, x.shape[1])
    outs = []
    for k in range(DEPTH):
        t = f"{pre}transformer.layers.{k}"
        x = np_mha(np_ln(x, sd, f"{t}.0.input_norm", 1e-5), sd[f"{t}.0.to_qkv.weight"], None, sd,
                   f"{t}.0.to_out", heads, bias) + x
        h = np_ln(x, sd, f"{t}.1.input_norm", 1e-5)
        x = np_linear(np_gelu(np_linear(h, sd, f"{t}.1.net.0")), sd, f"{t}.1.net.3") + x
        if k in layers:
            outs.append(x)
    outs[-1] = np_ln(outs[-1], sd, f"{pre}transformer.norm_out", 1e-5)
    return [o.transpose(0, 2, 1).reshape(b, D, hh // P, ww // P) for o in outs]


@pytest.mark.parametrize("layers", [LAYERS, (0, 2)])  # norm_out on the last requested layer
def test_croma_layout_matches_reference_forward(layers):
    sd = random_sd(croma_shapes())
    sd["s1_encoder.linear_input.weight"] = np.zeros((D, 2 * P * P), np.float32)  # the SAR branch
    enc = build("croma", variant="mu", layers=layers)
    params, report = wcroma.croma_from_torch(sd, enc)
    assert list(report["ignored"]) == ["s1_encoder.linear_input.weight"]
    img = RNG.standard_normal((B, 12, 32, 32)).astype(np.float32)
    got = np_apply(enc, params, img.transpose(0, 2, 3, 1))
    for g, w in zip(got, croma_reference(sd, img, layers)):
        np.testing.assert_allclose(g, w.transpose(0, 2, 3, 1), rtol=2e-4, atol=2e-4)
    # Base: ViT-B/8 over 12 bands; shape table only.
    table = {e.key: e.shape for e in wcroma._entries(build("croma", variant="base"), "s2_encoder.")}
    assert table["s2_encoder.linear_input.weight"] == (768, 768)
    assert table["s2_encoder.transformer.layers.11.0.to_qkv.weight"] == (2304, 768)
    assert table["s2_encoder.transformer.layers.11.1.net.0.weight"] == (3072, 768)
    assert "s2_encoder.transformer.layers.0.0.to_qkv.bias" not in table


def test_croma_files_round_trip_and_band_report(tmp_path, caplog):
    """Nested {'s2_encoder': {...}} .pth (torch, weights_only) and flat .npz, through load_pretrained;
    export -> import is the identity; missing bands are reported."""
    enc = build("croma", variant="mu", input_bands=("B2", "B3", "B4", "B8"), sensor="sentinel2a")
    abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), jnp.zeros((1, 32, 32, 4))))["params"]
    params = jax.tree.map(lambda a: RNG.standard_normal(a.shape).astype(np.float32), abstract)
    sd = wcroma.croma_to_torch(params, enc)
    np.savez(tmp_path / "croma.npz", **sd)
    with caplog.at_level(logging.WARNING):
        loaded, report = wcroma.load_pretrained(tmp_path / "croma.npz", abstract, enc)
    assert report["zero_filled_bands"] == ["B1", "B5", "B6", "B7", "B8A", "B9", "B11", "B12"]
    assert "zero-fills" in caplog.text
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    torch = pytest.importorskip("torch")
    nested = {"s2_encoder": {k[len("s2_encoder."):]: torch.from_numpy(v) for k, v in sd.items()},
              "s1_encoder": {"linear_input.weight": torch.zeros(D, 2 * P * P)}}
    torch.save(nested, tmp_path / "CROMA_base.pt")
    loaded, report = common.load_encoder(tmp_path / "CROMA_base.pt", abstract, enc)
    assert "s1_encoder.linear_input.weight" in report["ignored"]
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    bad = dict(sd, **{"s2_encoder.linear_input.weight": np.zeros((D, 10 * P * P), np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"s2_encoder\.linear_input\.weight: checkpoint \(32, 640\) vs model \(32, 768\)"):
        wcroma.croma_from_torch(bad, enc)
