"""eojax.mae.weights: SatMAE++ PyTorch state dicts <-> eojax params.

The expected key list is written from the reference modules (techmn/satmae_pp), and the layout checks
run numpy ports of the reference's torch operations on a torch-layout state dict built here, so
neither depends on the exporter."""
import argparse
import math
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from eojax.checkpoint import CheckpointMismatchError
from eojax.models import layers
from eojax.mae.satmae import SatMAE, GroupChannelViT, satmae_config
from eojax.models.upsample import ConvTranspose4x2, MultiScaleHead
from eojax.models.vit import PatchEmbed, unpatchify
from eojax.mae.weights import (load_pretrained, load_state_dict, satmae_from_torch,
                                  satmae_to_torch)

CFG = satmae_config("mu")  # multiscale on; 10 bands in groups (0,1,2,6), (3,4,5,7), (8,9)
ENC_KEYS = ("image_size", "patch_size", "groups", "width", "depth", "heads", "mlp_dim",
            "group_embed_dim")
VIT = {k: CFG[k] for k in ENC_KEYS}
RNGS = {"params": jax.random.key(0), "mask": jax.random.key(1)}


def _random_params(model, seed):
    """Every leaf random (zero biases / unit scales would hide a permuted bias)."""
    shapes = nn.unbox(jax.eval_shape(model.init, RNGS, jnp.zeros((1, 16, 16, 10))))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _mu_reference_shapes():
    """MaskedAutoencoderGroupChannelViT(img_size=16, patch_size=4, in_chans=10, channel_embed=8,
    embed_dim=32, depth=2, num_heads=2, decoder_channel_embed=8, decoder_embed_dim=32,
    decoder_depth=1, decoder_num_heads=2, proj_ratio=4) state_dict, written from its __init__ (mu's
    encoder MLP is 64 wide, the decoder's 128: the reference's single mlp_ratio cannot say that, the
    key layout is the same)."""
    d, n, c, m, p = 32, 16, 8, 40, 4
    out = {"cls_token": (1, 1, d), "pos_embed": (1, n + 1, d - c), "channel_embed": (1, 3, c),
           "mask_token": (1, 1, d), "decoder_pos_embed": (1, n + 1, d - c),
           "decoder_channel_embed": (1, 4, c),
           "proj_up_conv.weight": (m, 10, 1, 1), "proj_up_conv.bias": (m,),
           "proj_up_norm.weight": (m,), "proj_up_norm.bias": (m,),
           "norm.weight": (d,), "norm.bias": (d,), "decoder_norm.weight": (d,), "decoder_norm.bias": (d,),
           "decoder_embed.weight": (d, d), "decoder_embed.bias": (d,)}
    for b in ("up_block1", "up_block2"):  # UpsampleBlock(ms_dim, in_c)
        out.update({f"{b}.up_conv.weight": (m, m, 4, 4), f"{b}.up_conv.bias": (m,),
                    f"{b}.up_norm.weight": (m,), f"{b}.up_norm.bias": (m,),
                    f"{b}.res_block.conv1.weight": (m, m, 3, 3), f"{b}.res_block.conv1.bias": (m,),
                    f"{b}.res_block.conv2.weight": (m, m, 3, 3), f"{b}.res_block.conv2.bias": (m,),
                    f"{b}.res_norm.weight": (m,), f"{b}.res_norm.bias": (m,),
                    f"{b}.proj_out.weight": (10, m, 3, 3), f"{b}.proj_out.bias": (10,)})
    for i, cg in enumerate((4, 4, 2)):
        out.update({f"patch_embed.{i}.proj.weight": (d, cg, p, p), f"patch_embed.{i}.proj.bias": (d,),
                    f"decoder_pred.{i}.weight": (cg * p * p, d), f"decoder_pred.{i}.bias": (cg * p * p,)})
    for pre, mlp in [("blocks.0", 64), ("blocks.1", 64), ("decoder_blocks.0", 128)]:
        out.update({f"{pre}.norm1.weight": (d,), f"{pre}.norm1.bias": (d,),
                    f"{pre}.attn.qkv.weight": (3 * d, d), f"{pre}.attn.qkv.bias": (3 * d,),
                    f"{pre}.attn.proj.weight": (d, d), f"{pre}.attn.proj.bias": (d,),
                    f"{pre}.norm2.weight": (d,), f"{pre}.norm2.bias": (d,),
                    f"{pre}.mlp.fc1.weight": (mlp, d), f"{pre}.mlp.fc1.bias": (mlp,),
                    f"{pre}.mlp.fc2.weight": (d, mlp), f"{pre}.mlp.fc2.bias": (d,)})
    return out


# Reference util/pos_embed.py, ported (float32 as there; w first).
def _ref_1d(dim, pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(pos, np.float32).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _ref_2d(dim, size):
    gw, gh = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32))
    emb = np.concatenate([_ref_1d(dim // 2, gw), _ref_1d(dim // 2, gh)], axis=1)
    return np.concatenate([np.zeros((1, dim)), emb])[None].astype(np.float32)


def _reference_state_dict(seed=0, finetune=False):
    """A random state dict in the reference's layout (mu sizes); fixed embeddings as the reference
    computes them. finetune: GroupChannelsVisionTransformer (trained channel_cls_embed, a head)."""
    rng = np.random.default_rng(seed)
    shapes = _mu_reference_shapes()
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    sd.update(pos_embed=_ref_2d(24, 4), channel_embed=_ref_1d(8, np.arange(3))[None],
              decoder_pos_embed=_ref_2d(24, 4), decoder_channel_embed=_ref_1d(8, np.arange(4))[None])
    if finetune:
        sd = {k: v for k, v in sd.items() if k.startswith(("cls_token", "pos_embed", "channel_embed",
                                                            "patch_embed.", "blocks.", "norm."))}
        sd.update({"channel_cls_embed": rng.standard_normal((1, 1, 8)).astype(np.float32),
                   "head.weight": np.zeros((5, 32), np.float32), "head.bias": np.zeros(5, np.float32)})
    return sd


# ---------------------------------------------------------------------------------------------
# Round trips and the published layout
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mae_params():
    return _random_params(SatMAE(**CFG), seed=1)


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_round_trip_mae(mae_params, tmp_path, fmt):
    sd = satmae_to_torch(mae_params, CFG)
    assert {k: v.shape for k, v in sd.items()} == _mu_reference_shapes()
    path = str(tmp_path / f"ckpt.{fmt}")
    if fmt == "safetensors":
        from safetensors.numpy import save_file
        save_file(sd, path)
    else:
        np.savez(path, **sd)
    params, ignored = satmae_from_torch(load_state_dict(path), CFG)
    assert ignored == {}
    _assert_trees_equal(params, mae_params)


def test_round_trip_vit_and_scan(mae_params, tmp_path):
    vit = _random_params(GroupChannelViT(**VIT), seed=2)
    sd = satmae_to_torch(vit, VIT)
    want = {k: s for k, s in _mu_reference_shapes().items()
            if k.startswith(("cls_token", "pos_embed", "channel_embed", "patch_embed.", "blocks.", "norm."))}
    assert {k: v.shape for k, v in sd.items()} == dict(want, channel_cls_embed=(1, 1, 8))
    np.testing.assert_array_equal(sd["channel_cls_embed"], 0)
    _assert_trees_equal(satmae_from_torch(sd, VIT)[0], vit)
    # scan=True: stacked blocks, the same checkpoint.
    scan_cfg = dict(CFG, scan=True)
    enc = dict(mae_params["encoder"], blocks=layers.stack_layers(mae_params["encoder"]["blocks"], 2))
    scanned = dict(mae_params, encoder=enc, decoder=layers.stack_layers(mae_params["decoder"], 1))
    scanned = jax.tree.map(np.asarray, scanned)
    shapes = nn.unbox(jax.eval_shape(SatMAE(**scan_cfg).init, RNGS, jnp.zeros((1, 16, 16, 10))))
    assert jax.tree.map(np.shape, shapes["params"]) == jax.tree.map(np.shape, scanned)
    sd_scan = satmae_to_torch(scanned, scan_cfg)
    jax.tree.map(np.testing.assert_array_equal, sd_scan, satmae_to_torch(mae_params, CFG))
    _assert_trees_equal(satmae_from_torch(sd_scan, scan_cfg)[0], scanned)


def test_vit_large_table_matches_model_shapes():
    """At the published sizes (ViT-L, 96 px, patch 8): reference key shapes, and the eojax shapes
    the table produces equal the model's (no arrays are made)."""
    from eojax.mae.weights import _config, _entries, _fixed
    cfg = satmae_config("large")
    c, target = _config(cfg, None)
    entries = _entries(c, target)
    torch_shapes = {e.key: e.shape for e in entries}
    torch_shapes.update({k: v.shape for k, v in _fixed(c, target, target, c["grid"]).items()})
    # cls, mask tokens + 4 fixed; patch embeds; blocks; norm; decoder_embed; decoder blocks;
    # decoder_norm; decoder_pred; proj_up conv + norm; 2 upsample blocks of 6 weight/bias pairs.
    n = 6 + 3 * 2 + 24 * 12 + 2 + 2 + 8 * 12 + 2 + 3 * 2 + 4 + 2 * 12
    assert target == "mae" and len(torch_shapes) == n == 436
    assert torch_shapes["blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert torch_shapes["blocks.23.mlp.fc1.weight"] == (4096, 1024)
    assert torch_shapes["decoder_blocks.7.mlp.fc2.weight"] == (512, 2048)
    assert torch_shapes["patch_embed.2.proj.weight"] == (1024, 2, 8, 8)
    assert torch_shapes["decoder_pred.0.weight"] == (256, 512)
    assert torch_shapes["up_block2.up_conv.weight"] == (40, 40, 4, 4)
    assert (torch_shapes["pos_embed"], torch_shapes["channel_embed"]) == ((1, 145, 768), (1, 3, 256))
    assert torch_shapes["decoder_pos_embed"] == (1, 145, 384)
    assert torch_shapes["decoder_channel_embed"] == (1, 4, 128)
    model = nn.unbox(jax.eval_shape(SatMAE(**cfg).init, RNGS, jnp.zeros((1, 96, 96, 10))))
    want = {"/".join(k): v.shape for k, v in flax.traverse_util.flatten_dict(model["params"]).items()}
    got = {}
    for e in entries:
        outs = e.to_jax(np.broadcast_to(np.float32(0), e.shape))
        got.update({"/".join(p): a.shape for p, a in zip(e.paths, outs)})
    assert got == want


def test_pth_checkpoint(mae_params, tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: .pth reading is optional")
    sd = satmae_to_torch(mae_params, CFG)
    path = str(tmp_path / "checkpoint-49.pth")
    # What main_pretrain.py saves (misc.save_model), args included.
    torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}, "epoch": 49,
                "args": argparse.Namespace(model="mae_vit_large_patch16", grouped_bands=[[0, 1, 2, 6]])},
               path)
    _assert_trees_equal(satmae_from_torch(load_state_dict(path), CFG)[0], mae_params)


_RAN = []


def _record(what):
    _RAN.append(what)


class _Evil:
    """Unpickling it would call _record: a stand-in for arbitrary code."""

    def __reduce__(self):
        return (_record, ("unpickled",))


def test_pth_never_unpickles_arbitrary_objects(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="torch not installed: .pth reading is optional")
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "x": _Evil()}, path)
    with pytest.raises(ValueError, match="evil.pth"):
        load_state_dict(path)
    assert _RAN == []
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(ImportError, match="safetensors"):
        load_state_dict(path)


# ---------------------------------------------------------------------------------------------
# Layout conversions against numpy ports of the reference's torch operations
# ---------------------------------------------------------------------------------------------
def _ln(x, w, b):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * w + b


def _gelu(x):
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _timm_block(x, sd, pre, heads):
    """timm Block: x + proj(attn(norm1 x)); x + fc2(gelu(fc1(norm2 x))). x: (N, D)."""
    n, d = x.shape
    h = _ln(x, sd[f"{pre}.norm1.weight"], sd[f"{pre}.norm1.bias"])
    qkv = (h @ sd[f"{pre}.attn.qkv.weight"].T + sd[f"{pre}.attn.qkv.bias"])
    q, k, v = qkv.reshape(n, 3, heads, d // heads).transpose(1, 2, 0, 3)  # (H, N, hd) each
    a = q @ k.transpose(0, 2, 1) * (d // heads) ** -0.5
    a = np.exp(a - a.max(-1, keepdims=True))
    o = ((a / a.sum(-1, keepdims=True)) @ v).transpose(1, 0, 2).reshape(n, d)
    x = x + o @ sd[f"{pre}.attn.proj.weight"].T + sd[f"{pre}.attn.proj.bias"]
    h = _ln(x, sd[f"{pre}.norm2.weight"], sd[f"{pre}.norm2.bias"])
    h = _gelu(h @ sd[f"{pre}.mlp.fc1.weight"].T + sd[f"{pre}.mlp.fc1.bias"])
    return x + h @ sd[f"{pre}.mlp.fc2.weight"].T + sd[f"{pre}.mlp.fc2.bias"]


def _patch_conv(x, w, b):
    """Conv2d(kernel = stride = p) on (H, W, Cg) -> (N, D) tokens, row-major."""
    d, cg, p, _ = w.shape
    gh, gw = x.shape[0] // p, x.shape[1] // p
    y = np.einsum("ypxqc,dcpq->yxd", x.reshape(gh, p, gw, p, cg), w) + b
    return y.reshape(gh * gw, d)


def _conv_torch(x, w, b):
    """Conv2d (out, in, k, k), padding (k - 1) / 2, on (H, W, in)."""
    k, (h, wd) = w.shape[-1], x.shape[:2]
    xp = np.pad(x, (((k - 1) // 2,) * 2, ((k - 1) // 2,) * 2, (0, 0)))
    return sum(xp[y:y + h, z:z + wd] @ w[:, :, y, z].T for y in range(k) for z in range(k)) + b


def _conv_transpose_torch(x, w, b):
    """ConvTranspose2d(k=4, s=2, p=1), weight (in, out, 4, 4): the scatter definition."""
    h, wd, _ = x.shape
    out = np.zeros((2 * h + 2, 2 * wd + 2, w.shape[1]))
    for iy in range(h):
        for ix in range(wd):
            out[2 * iy:2 * iy + 4, 2 * ix:2 * ix + 4] += np.einsum("i,iokl->klo", x[iy, ix], w)
    return out[1:-1, 1:-1] + b


def _ref_multiscale(x, sd):
    """forward_multiscale after unpatchify, channels-last numpy."""
    y = _ln(_gelu(_conv_torch(x, sd["proj_up_conv.weight"], sd["proj_up_conv.bias"])),
            sd["proj_up_norm.weight"], sd["proj_up_norm.bias"])
    outs = []
    for b in ("up_block1", "up_block2"):
        g = lambda k: sd[f"{b}.{k}"]  # noqa: E731
        y = _ln(_conv_transpose_torch(y, g("up_conv.weight"), g("up_conv.bias")),
                g("up_norm.weight"), g("up_norm.bias"))
        y = np.where(y > 0, y, 0.01 * y)
        r = np.maximum(_conv_torch(y, g("res_block.conv1.weight"), g("res_block.conv1.bias")), 0)
        y = _ln(y + 0.5 * _conv_torch(r, g("res_block.conv2.weight"), g("res_block.conv2.bias")),
                g("res_norm.weight"), g("res_norm.bias"))
        outs.append(_conv_torch(y, g("proj_out.weight"), g("proj_out.bias")))
    return outs


def _close(a, b, tol=2e-4):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol)


def test_layouts_match_reference_operations():
    sd = _reference_state_dict(seed=3)
    params, _ = satmae_from_torch(sd, CFG)
    rng = np.random.default_rng(4)
    img = rng.standard_normal((16, 16, 10)).astype(np.float32)
    # Patch embedding: the torch conv (stride p) == patchify + Dense with the converted kernel.
    for i, g in enumerate(CFG["groups"]):
        got = PatchEmbed(4, 32).apply({"params": params["encoder"][f"patch_embed_{i}"]}, img[None][..., g])
        _close(got[0], _patch_conv(img[..., g], sd[f"patch_embed.{i}.proj.weight"],
                                   sd[f"patch_embed.{i}.proj.bias"]))
    # qkv / proj / mlp / norms: the timm block == eojax's EncoderBlock.
    x = rng.standard_normal((7, 32)).astype(np.float32)
    for pre, tree, mlp in [("blocks.1", params["encoder"]["blocks"]["block_1"], 64),
                           ("decoder_blocks.0", params["decoder"]["block_0"], 128)]:
        got = layers.EncoderBlock(heads=2, mlp_dim=mlp).apply({"params": tree}, x[None])
        _close(got[0], _timm_block(x, sd, pre, heads=2))
    # qkv alone: timm's fused x @ W.T + b, split in three, == eojax's query / key / value.
    attn = params["encoder"]["blocks"]["block_0"]["attn"]
    fused = x @ sd["blocks.0.attn.qkv.weight"].T + sd["blocks.0.attn.qkv.bias"]
    for j, name in enumerate(("query", "key", "value")):
        got = np.tensordot(x, attn[name]["kernel"], 1) + attn[name]["bias"]
        _close(got.reshape(7, 32), fused[:, 32 * j:32 * (j + 1)])
    # decoder_pred: the reference's (band, row, col) outputs through its unpatchify == eojax's
    # Dense through eojax's unpatchify, for each group.
    y = rng.standard_normal((16, 32)).astype(np.float32)
    for i, g in enumerate(CFG["groups"]):
        dec = y @ sd[f"decoder_pred.{i}.weight"].T + sd[f"decoder_pred.{i}.bias"]  # (L, Cg * p^2)
        ref = dec.reshape(4, 4, len(g), 4, 4).transpose(2, 0, 3, 1, 4).reshape(len(g), 16, 16)
        got = nn.Dense(len(g) * 16).apply({"params": params[f"decoder_pred_{i}"]}, y[None])
        _close(unpatchify(got, 4, 16, 16, len(g))[0], ref.transpose(1, 2, 0))
    # The transposed conv alone, then the whole multi-scale head.
    head = params["multiscale_head"]
    z = rng.standard_normal((5, 6, 40)).astype(np.float32)
    got = ConvTranspose4x2(40).apply({"params": head["up_block1"]["up_conv"]}, z[None])
    _close(got[0], _conv_transpose_torch(z, sd["up_block1.up_conv.weight"], sd["up_block1.up_conv.bias"]))
    up2, up4 = MultiScaleHead(4).apply({"params": head}, img[None])
    ref2, ref4 = _ref_multiscale(img, sd)
    _close(up2[0], ref2, 1e-3)
    _close(up4[0], ref4, 1e-3)


def test_finetune_layout_encoder_matches_reference_forward():
    """GroupChannelsVisionTransformer.forward_features (cls token, no global pool) in numpy ==
    GroupChannelViT on the imported checkpoint: checks the embeddings and the cls fold."""
    sd = _reference_state_dict(seed=5, finetune=True)
    with pytest.raises(CheckpointMismatchError, match="head.weight"):
        satmae_from_torch(sd, VIT)  # strict: the classifier is unexpected
    params, ignored = satmae_from_torch(sd, VIT, strict=False)
    assert set(ignored) == {"head.weight", "head.bias"}
    img = np.random.default_rng(6).standard_normal((16, 16, 10)).astype(np.float32)
    tokens = np.stack([_patch_conv(img[..., g], sd[f"patch_embed.{i}.proj.weight"],
                                   sd[f"patch_embed.{i}.proj.bias"]) for i, g in enumerate(CFG["groups"])])
    pos = np.broadcast_to(sd["pos_embed"][0, 1:][None], (3, 16, 24))
    chan = np.broadcast_to(sd["channel_embed"][0][:, None], (3, 16, 8))
    x = (tokens + np.concatenate([pos, chan], -1)).reshape(48, 32)
    cls = sd["cls_token"][0] + np.concatenate([sd["pos_embed"][0, :1], sd["channel_cls_embed"][0]], -1)
    x = np.concatenate([cls, x])
    for k in range(2):
        x = _timm_block(x, sd, f"blocks.{k}", heads=2)
    ref = _ln(x, sd["norm.weight"], sd["norm.bias"])
    _close(GroupChannelViT(**VIT).apply({"params": params}, img[None])[0], ref, 1e-3)


# ---------------------------------------------------------------------------------------------
# Partial imports, errors
# ---------------------------------------------------------------------------------------------
def test_vit_from_pretraining_checkpoint_drops_decoder(mae_params):
    sd = satmae_to_torch(mae_params, CFG)
    with pytest.raises(CheckpointMismatchError, match="decoder_embed.weight"):
        satmae_from_torch(sd, VIT)
    params, ignored = satmae_from_torch(sd, VIT, strict=False)
    _assert_trees_equal(params, mae_params["encoder"])
    enc = ("cls_token", "pos_embed", "channel_embed", "patch_embed.", "blocks.", "norm.")
    assert set(ignored) == {k for k in sd if not k.startswith(enc)}
    assert "mask_token" in ignored and "up_block2.proj_out.weight" in ignored


def test_drifted_fixed_embedding(mae_params):
    sd = satmae_to_torch(mae_params, CFG)
    sd["pos_embed"] = sd["pos_embed"] + 0.01
    with pytest.raises(CheckpointMismatchError, match="pos_embed: differs from the fixed sin-cos"):
        satmae_from_torch(sd, CFG)
    params, ignored = satmae_from_torch(sd, CFG, strict=False)
    assert list(ignored) == ["pos_embed"]
    _assert_trees_equal(params, mae_params)
    # Another grid (a 6 x 6 checkpoint for this 4 x 4 model): irrelevant, recomputed per grid.
    sd["pos_embed"] = _ref_2d(24, 6)
    assert satmae_from_torch(sd, CFG)[1] == {}


def test_mismatch_errors_list_everything(mae_params):
    sd = satmae_to_torch(mae_params, CFG)
    with pytest.raises(CheckpointMismatchError) as e:  # a checkpoint of another width
        satmae_from_torch(sd, satmae_config("mu", width=48, mlp_dim=96))
    msg = str(e.value)
    assert "shape of cls_token: checkpoint (1, 1, 32) vs model (1, 1, 48)" in msg
    assert "shape of blocks.1.attn.qkv.weight: checkpoint (96, 32) vs model (144, 48)" in msg
    assert "shape of pos_embed" in msg and "decoder_embed.weight" in msg
    missing = {k: v for k, v in sd.items() if k not in ("blocks.1.mlp.fc2.bias", "up_block2.proj_out.weight")}
    with pytest.raises(CheckpointMismatchError) as e:
        satmae_from_torch(missing, CFG)
    assert "missing in checkpoint: blocks.1.mlp.fc2.bias (32,)" in str(e.value)
    assert "missing in checkpoint: up_block2.proj_out.weight (10, 40, 3, 3)" in str(e.value)
    with pytest.raises(CheckpointMismatchError) as e:  # same bands, other band counts per group
        satmae_from_torch(sd, dict(CFG, groups=((0, 1, 2), (3, 4, 5, 6, 7), (8, 9))))
    assert "group 0 (0, 1, 2): the checkpoint's group 0 has 4 bands, the model's 3" in str(e.value)
    assert "group 1 (3, 4, 5, 6, 7)" in str(e.value) and "group 2" not in str(e.value)
    with pytest.raises(CheckpointMismatchError, match="group 1 .* has 4 bands, the model's 5"):
        satmae_from_torch(sd, dict(VIT, groups=((0, 1, 2), (3, 4, 5, 6, 7), (8, 9))), strict=False)
    with pytest.raises(CheckpointMismatchError, match="not in this model: decoder_embed.weight"):
        satmae_from_torch(sd, dict(VIT), target="vit")
    # Export checks the tree too.
    broken = dict(mae_params, encoder={k: v for k, v in mae_params["encoder"].items() if k != "norm"})
    broken["mask_token"] = np.zeros((1, 1, 48), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        satmae_to_torch(broken, CFG)
    assert "missing in params: encoder/norm/ln/scale (32,)" in str(e.value)
    assert "shape of mask_token: params (1, 1, 48) vs model (1, 1, 32)" in str(e.value)


def test_wrappers_unwrapped(tmp_path):
    sd = _reference_state_dict(seed=7)
    np.savez(tmp_path / "ddp.npz", **{f"module.{k}": v for k, v in sd.items()})  # a DDP state dict
    got = load_state_dict(tmp_path / "ddp.npz")
    assert set(got) == set(sd)
    np.testing.assert_array_equal(got["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])


def test_bfloat16_safetensors_read_as_float32(tmp_path):
    import ml_dtypes
    from safetensors.numpy import save_file
    sd = _reference_state_dict(seed=8)
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}, str(tmp_path / "bf16.safetensors"))
    got = load_state_dict(tmp_path / "bf16.safetensors")["blocks.0.attn.qkv.weight"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, sd["blocks.0.attn.qkv.weight"].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_state_dict(tmp_path / "nope.safetensors")
    try:
        __import__("torch")
        pth_error = ValueError
    except ImportError:
        pth_error = ImportError  # the "convert it to safetensors" message
    for suffix, error in ((".safetensors", ValueError), (".npz", ValueError), (".pth", pth_error)):
        path = tmp_path / f"junk{suffix}"
        path.write_bytes(b"this is neither format " * 10)
        with pytest.raises(error, match=f"junk\\{suffix}"):
            load_state_dict(path)
    (tmp_path / "ckpt.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown checkpoint format '.txt'"):
        load_state_dict(tmp_path / "ckpt.txt")
    evil = np.empty(1, dtype=object)
    evil[0] = _Evil()
    np.savez(tmp_path / "pickled.npz", a=evil)  # reading it back needs unpickling: refused
    with pytest.raises(ValueError, match="pickled.npz"):
        load_state_dict(tmp_path / "pickled.npz")
    assert _RAN == []


def test_load_pretrained_places_params(mae_params, tmp_path):
    from safetensors.numpy import save_file
    path = str(tmp_path / "satmae.safetensors")
    save_file(satmae_to_torch(mae_params, CFG), path)
    vit = GroupChannelViT(**VIT)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = nn.unbox(jax.eval_shape(vit.init, RNGS, jnp.zeros((1, 16, 16, 10))))["params"]
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
    abstract["cls_token"] = jax.ShapeDtypeStruct((1, 1, 32), jnp.bfloat16, sharding=rep)
    with pytest.raises(CheckpointMismatchError, match="decoder_embed.weight"):
        load_pretrained(path, abstract, VIT)
    params = load_pretrained(path, abstract, VIT, strict=False)
    assert params["cls_token"].dtype == jnp.bfloat16 and params["cls_token"].sharding == rep
    want = dict(mae_params["encoder"], cls_token=mae_params["encoder"]["cls_token"].astype(jnp.bfloat16))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, want)


# ---------------------------------------------------------------------------------------------
# The fine-tuning ViT's trained embeddings, the decoder order, the seg encoder's loader
# ---------------------------------------------------------------------------------------------
def test_learned_embed_import_and_round_trip():
    """GroupChannelViT(learned_embed=True) takes a fine-tuned checkpoint's trained pos_embed /
    channel_embed (channel_cls_embed and pos_embed row 0 folded into cls_token, as before); export
    writes them back. A pretraining checkpoint starts it from its sin-cos; a pos_embed of another grid
    is replaced by the model's sin-cos, as main_finetune.py drops it."""
    sd = _reference_state_dict(seed=9, finetune=True)
    rng = np.random.default_rng(10)
    sd["pos_embed"] = sd["pos_embed"] + 0.1 * rng.standard_normal(sd["pos_embed"].shape).astype(np.float32)
    sd["channel_embed"] = sd["channel_embed"] + 0.1 * rng.standard_normal((1, 3, 8)).astype(np.float32)
    learned = dict(VIT, learned_embed=True)
    params, ignored = satmae_from_torch(sd, learned, strict=False)
    assert set(ignored) == {"head.weight", "head.bias"}
    np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"][0, 1:])
    np.testing.assert_array_equal(params["channel_embed"], sd["channel_embed"][0])
    fixed, _ = satmae_from_torch(sd, VIT, strict=False)  # the sin-cos model keeps the rest equal
    _assert_trees_equal({k: v for k, v in params.items() if not k.endswith("embed")}, fixed)
    back = satmae_to_torch(params, learned)
    np.testing.assert_array_equal(back["pos_embed"][0, 1:], sd["pos_embed"][0, 1:])
    np.testing.assert_array_equal(back["channel_embed"], sd["channel_embed"])
    _assert_trees_equal(satmae_from_torch(back, learned)[0], params)
    # Reference fine-tuning forward with the trained embeddings == eojax.
    img = np.random.default_rng(11).standard_normal((16, 16, 10)).astype(np.float32)
    tokens = np.stack([_patch_conv(img[..., g], sd[f"patch_embed.{i}.proj.weight"],
                                   sd[f"patch_embed.{i}.proj.bias"]) for i, g in enumerate(CFG["groups"])])
    emb = np.concatenate([np.broadcast_to(sd["pos_embed"][0, 1:], (3, 16, 24)),
                          np.broadcast_to(sd["channel_embed"][0][:, None], (3, 16, 8))], -1)
    x = np.concatenate([sd["cls_token"][0] + np.concatenate([sd["pos_embed"][0, :1], sd["channel_cls_embed"][0]], -1),
                        (tokens + emb).reshape(48, 32)])
    for k in range(2):
        x = _timm_block(x, sd, f"blocks.{k}", heads=2)
    ref = _ln(x, sd["norm.weight"], sd["norm.bias"])
    _close(GroupChannelViT(**learned).apply({"params": params}, img[None])[0], ref, 1e-3)
    # A pretraining checkpoint: the sin-cos; another grid: the model's sin-cos, reported.
    pre, _ = satmae_from_torch(_reference_state_dict(seed=12), learned, strict=False)
    np.testing.assert_allclose(pre["pos_embed"], _ref_2d(24, 4)[0, 1:], atol=1e-6)
    np.testing.assert_allclose(pre["channel_embed"], _ref_1d(8, np.arange(3)), atol=1e-6)
    other = dict(sd, pos_embed=_ref_2d(24, 6) + 0.1)
    moved, ignored = satmae_from_torch(other, learned, strict=False)
    assert "pos_embed" in ignored and "main_finetune" in ignored["pos_embed"]
    np.testing.assert_allclose(moved["pos_embed"], _ref_2d(24, 4)[0, 1:], atol=1e-6)
    with pytest.raises(ValueError, match="learned_embed"):
        satmae_from_torch(sd, dict(CFG, learned_embed=True))


def test_fixed_embed_model_refuses_trained_embeddings():
    sd = _reference_state_dict(seed=13, finetune=True)
    sd["channel_embed"] = sd["channel_embed"] + 0.5
    with pytest.raises(CheckpointMismatchError, match="channel_embed: differs .* set learned_embed=True"):
        satmae_from_torch({k: v for k, v in sd.items() if not k.startswith("head.")}, VIT)


def test_load_pretrained_decoder_order(tmp_path, caplog):
    """A pretraining checkpoint into a SatMAE with non-contiguous groups and eojax's pred_order: the
    same weights, with a warning naming the reference's order; none with it or contiguous groups."""
    from safetensors.numpy import save_file
    path = str(tmp_path / "pretrain.safetensors")
    save_file(_reference_state_dict(seed=14), path)
    abstract = nn.unbox(jax.eval_shape(SatMAE(**CFG).init, RNGS, jnp.zeros((1, 16, 16, 10))))["params"]
    want, _ = satmae_from_torch(_reference_state_dict(seed=14), CFG)
    contiguous = dict(CFG, groups=((0, 1, 2, 3), (4, 5, 6, 7), (8, 9)))
    for kwargs, warns in [(CFG, True), (dict(CFG, pred_order="reference"), False), (contiguous, False)]:
        caplog.clear()
        params = load_pretrained(path, abstract, kwargs)
        assert ("pred_order='reference'" in caplog.text) == warns
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, want)


def test_seg_encoder_loader_reports_other_parts(tmp_path):
    """The seg encoder 'satmae' (common.load_encoder): the decoder / multi-scale head of a pretraining
    checkpoint and a fine-tuned classifier are reported, not refused; an unknown key still is."""
    from safetensors.numpy import save_file
    from eojax.models import encoders
    from eojax.weights import common
    enc = encoders.build("satmae", "mu", layers=(1,))
    abstract = nn.unbox(jax.eval_shape(enc.init, RNGS, jnp.zeros((1, 16, 16, 10))))["params"]
    for name, sd in [("pre", _reference_state_dict(seed=15)), ("ft", _reference_state_dict(seed=15, finetune=True))]:
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        params, report = common.load_encoder(tmp_path / f"{name}.safetensors", abstract, enc)
        enc_keys = ("cls_token", "pos_embed", "channel_embed", "channel_cls_embed", "patch_embed.", "blocks.", "norm.")
        assert set(report["ignored"]) == {k for k in sd if not k.startswith(enc_keys)}
        _assert_trees_equal(params, satmae_from_torch(sd, VIT, strict=False)[0])
    save_file(dict(sd, extra=np.zeros(3, np.float32)), str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="not in this model: extra"):
        common.load_encoder(tmp_path / "bad.safetensors", abstract, enc)
