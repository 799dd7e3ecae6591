"""eojax.mae.satmae: SatMAE++ group-channel MAE shapes, embeddings, masking, loss, multi-scale head,
the fine-tuning encoder, FLOPs and sharding. Models are 'mu'-sized; ViT-L only through eval_shape."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eojax.config_lib import DEFAULT_RULES
from eojax.mae.satmae import (
    GROUPS_S2_10,
    SatMAE,
    GroupChannelViT,
    flops_per_image,
    satmae_loss,
    decoder_pos_group_embed,
    interpolate_pos_embed,
    pos_group_embed,
    pred_bands,
    satmae_config,
)
from eojax.models.upsample import UpsampleBlock
from eojax.models.vit import patchify, unpatchify
from eojax.parallel import make_mesh

RNGS = {"params": jax.random.key(0), "mask": jax.random.key(1)}
ENC_KEYS = ("image_size", "patch_size", "groups", "width", "depth", "heads", "mlp_dim",
            "group_embed_dim")


def _key(i):
    return jax.random.key(100 + i)


def _mu(**kw):
    return SatMAE(**satmae_config("mu", **{"multiscale": False, **kw}))


def _fwd(model):
    return jax.jit(lambda p, x, key, ratio=None: model.apply(p, x, mask_ratio=ratio,
                                                             rngs={"mask": key}),
                   static_argnums=(3,))


@pytest.fixture(scope="module")
def mu():
    model = _mu()
    x = jax.random.normal(_key(0), (8, 16, 16, 10))
    params = jax.jit(model.init)(RNGS, x)
    return model, nn.unbox(params), x, _fwd(model)


# ---------------------------------------------------------------------------------------------
# Shapes, embeddings
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial", [False, True])
def test_golden_shapes_vit_large_96(spatial):
    cfg = satmae_config("large", scan=True, spatial_mask=spatial)
    assert (cfg["image_size"], cfg["patch_size"], cfg["groups"]) == (96, 8, GROUPS_S2_10)
    model, b = SatMAE(**cfg), 2
    x = jax.ShapeDtypeStruct((b, 96, 96, 10), jnp.float32)
    params = jax.eval_shape(model.init, RNGS, x)
    out = jax.eval_shape(lambda p, x: model.apply(p, x, rngs={"mask": RNGS["mask"]}), params, x)
    assert [a.shape for a in out["pred"]] == [(b, 144, 256), (b, 144, 256), (b, 144, 128)]
    assert out["mask"].shape == (b, 3, 144)
    assert out["restore_idx"].shape == ((b, 144) if spatial else (b, 432))
    assert out["keep_idx"].shape == ((b, 36) if spatial else (b, 108))  # 108 of 432 tokens
    assert out["latent"].shape == (b, 1 + 108, 1024)
    assert out["recon"].shape == (b, 96, 96, 10)
    assert out["up2"].shape == (b, 192, 192, 10) and out["up4"].shape == (b, 384, 384, 10)
    assert all(a.dtype == jnp.float32 for a in [*out["pred"], out["recon"], out["up2"]])
    p = nn.unbox(params)["params"]
    assert [p["encoder"][f"patch_embed_{i}"]["proj"]["kernel"].shape for i in range(3)] == \
        [(256, 1024), (256, 1024), (128, 1024)]
    assert p["decoder_pred_2"]["kernel"].shape == (512, 128)
    assert p["multiscale_head"]["proj_up_conv"]["kernel"].shape == (1, 1, 10, 40)
    # bf16 compute: pixels come back float32.
    bf16 = SatMAE(**dict(cfg, dtype=jnp.bfloat16))
    out = jax.eval_shape(lambda p, x: bf16.apply(p, x, rngs={"mask": RNGS["mask"]}), params, x)
    assert out["latent"].dtype == jnp.bfloat16
    assert all(a.dtype == jnp.float32 for a in [*out["pred"], out["recon"], out["up4"]])


def _np_1d(dim, pos):  # the reference's get_1d_sincos_pos_embed_from_grid
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.asarray(pos, np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _np_pos_group(width, c, groups, gh, gw):
    # meshgrid(w, h): the first half of the 2D part encodes the column; token t = row * gw + col.
    grid = np.meshgrid(np.arange(gw), np.arange(gh))
    pos = np.concatenate([_np_1d((width - c) // 2, grid[0]), _np_1d((width - c) // 2, grid[1])], 1)
    chan = _np_1d(c, np.arange(groups))
    return np.concatenate([np.repeat(pos[None], groups, 0),
                           np.repeat(chan[:, None], gh * gw, 1)], axis=-1)  # (G, N, D): pos first


def test_pos_group_embedding_matches_numpy(mu):
    model, params, _, _ = mu
    # Encoder embedding on a non-square grid (4 x 6 patches): zero images leave bias + embedding.
    emb = model.apply(params, jnp.zeros((1, 16, 24, 10)), method=lambda m, x: m.encoder.embed(x))
    bias = np.stack([params["params"]["encoder"][f"patch_embed_{g}"]["proj"]["bias"]
                     for g in range(3)])[:, None]
    np.testing.assert_allclose(emb[0] - bias, _np_pos_group(32, 8, 3, 4, 6), atol=1e-5)
    # The decoder's pair at the reference's sizes (384 position + 128 group of 512); its cls row is
    # a zero position part + the group embedding of the extra index G (decoder_channel_embed[-1]).
    want = _np_pos_group(512, 128, 3, 12, 12)
    np.testing.assert_allclose(pos_group_embed(512, 128, 3, 12, 12), want, atol=1e-5)
    dec = decoder_pos_group_embed(512, 128, 3, 12, 12)
    np.testing.assert_allclose(dec[1:], want.reshape(-1, 512), atol=1e-5)
    np.testing.assert_allclose(dec[0], np.r_[np.zeros(384), _np_1d(128, np.arange(4))[3]], atol=1e-6)
    with pytest.raises(ValueError):
        pos_group_embed(32, 6, 3, 4, 4)  # 32 - 6 is not divisible by 4


# ---------------------------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------------------------
def test_independent_masking_and_group_token_order(mu):
    model, params, x, fwd = mu
    out = fwd(params, x, _key(1))
    mask = np.asarray(out["mask"])  # (B, G, N), 48 tokens, 12 kept in all
    np.testing.assert_array_equal(mask.sum((1, 2)), 36)
    assert set(np.unique(mask)) == {0.0, 1.0}
    assert any(not np.array_equal(mask[b, 0], mask[b, 1]) for b in range(len(mask)))
    assert len({tuple(m.sum(1)) for m in mask}) > 1  # one shuffle over G*N: per-group counts vary
    assert not np.array_equal(mask, np.asarray(fwd(params, x, _key(2))["mask"]))
    # recon puts each group's prediction at its own bands; pred pixels are (row, col, band) ordered.
    pred, recon = [np.asarray(a) for a in out["pred"]], np.asarray(out["recon"])
    for g, group in enumerate(GROUPS_S2_10):
        for k, band in enumerate(group):
            r, c, i, j = 2, 3, 1, 2  # patch (2, 3) = token 11, pixel (1, 2) inside it
            assert recon[5, 4 * r + i, 4 * c + j, band] == pred[g][5, 4 * r + c, (4 * i + j) * len(group) + k]
    # The encoder sees a (group, location) token only when it is kept: perturb band 0 (group 0) and
    # band 3 (group 1) at a location masked in group 0 but kept in group 1.
    b, n = next((b, n) for b in range(len(mask)) for n in range(16)
                if mask[b, 0, n] == 1 and mask[b, 1, n] == 0)
    r, c = (n // 4) * 4, (n % 4) * 4
    for band, same in ((0, True), (3, False)):
        px = np.array(x)
        px[b, r:r + 4, c:c + 4, band] += 10.0
        got = fwd(params, jnp.asarray(px), _key(1))["latent"][b]
        assert np.allclose(got, out["latent"][b], atol=1e-5) == same


def test_spatial_masking_same_locations_in_all_groups(mu):
    _, params, x, _ = mu
    out = _fwd(_mu(spatial_mask=True))(params, x, _key(3))
    mask = np.asarray(out["mask"])
    assert out["latent"].shape == (8, 1 + 12, 32)
    np.testing.assert_array_equal(mask[:, 0], mask[:, 1])
    np.testing.assert_array_equal(mask[:, 0], mask[:, 2])
    np.testing.assert_array_equal(mask.sum(2), 12)
    assert "up2" not in out and all(np.isfinite(a).all() for a in out["pred"])


@pytest.mark.parametrize("spatial", [False, True])
def test_decoder_restores_tokens_to_their_group_and_location(mu, spatial):
    # With no decoder blocks a masked (g, n) token is head_g(LN(mask_token + embedding[g, n])):
    # exactly that at the masked positions, something else (an encoded token) at the kept ones.
    _, params, x, _ = mu
    p = {k: v for k, v in params["params"].items() if k != "decoder"}
    out = _fwd(_mu(decoder_depth=0, spatial_mask=spatial))({"params": p}, x, _key(4))
    pe = decoder_pos_group_embed(32, 8, 3, 4, 4)[1:].reshape(3, 16, 32)
    h = np.asarray(p["mask_token"])[0] + pe
    h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
    h = h * p["decoder_norm"]["ln"]["scale"] + p["decoder_norm"]["ln"]["bias"]
    mask = np.asarray(out["mask"]) > 0
    for g in range(3):
        want = h[g] @ p[f"decoder_pred_{g}"]["kernel"] + p[f"decoder_pred_{g}"]["bias"]  # (N, out)
        got = np.asarray(out["pred"][g])
        close = np.isclose(got, want[None], rtol=1e-4, atol=1e-4).all(-1)  # (B, N)
        np.testing.assert_array_equal(close, mask[:, g])


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def _np_loss(preds, images, valid, mask, p, groups, norm_pix, ups, tgts, vups):
    b, h, w, c = images.shape
    gw = w // p
    num = den = 0.0
    for bi in range(b):
        for n in range(mask.shape[2]):
            ys, xs = slice((n // gw) * p, (n // gw + 1) * p), slice((n % gw) * p, (n % gw + 1) * p)
            patch, v = images[bi, ys, xs].astype(np.float64), valid[bi, ys, xs]
            if norm_pix and v.any():
                vals = patch[v]  # (valid pixels, all bands)
                var = vals.var(ddof=1) if vals.size > 1 else vals.var()
                patch = (patch - vals.mean()) / np.sqrt(var + 1e-6)
            for g, group in enumerate(groups):
                pr = preds[g][bi, n].reshape(p, p, len(group))
                err = ((pr - patch[..., list(group)]) ** 2).mean(-1)
                wgt = v * mask[bi, g, n]
                num += (err * wgt).sum()
                den += wgt.sum()
    mse = num / den
    l1s = [(np.abs(u - t) * vv[..., None]).sum() / (vv.sum() * c) for u, t, vv in zip(ups, tgts, vups)]
    return mse, l1s, 0.6 * mse + 0.4 * (0.5 * l1s[0] + 0.5 * l1s[1])


@pytest.mark.parametrize("norm_pix,partial_valid", [(False, False), (True, False), (True, True)])
def test_loss_matches_numpy(norm_pix, partial_valid):
    rng = np.random.default_rng(0)
    b, h, p = 2, 8, 4
    images = rng.normal(size=(b, h, h, 10)).astype(np.float32)
    preds = [rng.normal(size=(b, 4, p * p * len(g))).astype(np.float32) for g in GROUPS_S2_10]
    mask = (rng.random((b, 3, 4)) < 0.6).astype(np.float32)
    ups = [rng.normal(size=(b, h * s, h * s, 10)).astype(np.float32) for s in (2, 4)]
    tgts = [rng.normal(size=u.shape).astype(np.float32) for u in ups]
    shapes = [(b, h, h), (b, 2 * h, 2 * h), (b, 4 * h, 4 * h)]
    valid = [rng.random(s) < 0.7 if partial_valid else np.ones(s, bool) for s in shapes]
    out = dict(pred=[jnp.asarray(a) for a in preds], mask=jnp.asarray(mask), up2=ups[0], up4=ups[1])
    loss, aux = satmae_loss(out, images, valid[0], p, GROUPS_S2_10, norm_pix, tgts[0], valid[1],
                              tgts[1], valid[2])
    mse, l1s, total = _np_loss(preds, images, valid[0], mask, p, GROUPS_S2_10, norm_pix, ups, tgts,
                               valid[1:])
    np.testing.assert_allclose([aux["mse"], aux["l1_2x"], aux["l1_4x"], loss], [mse, *l1s, total],
                               rtol=1e-5)
    if not partial_valid and not norm_pix:
        # The reference's forward_loss: per-patch group means summed over masked (group, patch)
        # pairs, over the total masked count; and torch l1_loss (a plain mean).
        per = [((preds[g].reshape(b, 4, p, p, -1) - images.reshape(b, 2, p, 2, p, 10)
                 .transpose(0, 1, 3, 2, 4, 5).reshape(b, 4, p, p, 10)[..., list(grp)]) ** 2)
               .mean((2, 3, 4)) for g, grp in enumerate(GROUPS_S2_10)]
        ref = sum((per[g] * mask[:, g]).sum() for g in range(3)) / mask.sum()
        np.testing.assert_allclose(aux["mse"], ref, rtol=1e-5)
        np.testing.assert_allclose(aux["l1_2x"], np.abs(ups[0] - tgts[0]).mean(), rtol=1e-5)
    no_ms = dict(out)
    del no_ms["up2"], no_ms["up4"]
    alone, _ = satmae_loss(no_ms, images, valid[0], p, GROUPS_S2_10, norm_pix)
    np.testing.assert_allclose(alone, mse, rtol=1e-5)
    with pytest.raises(ValueError):
        satmae_loss(out, images, valid[0], p, GROUPS_S2_10, norm_pix)  # multi-scale, no targets


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_loss_invariances(norm_pix):
    rng = np.random.default_rng(1)
    b, h, p = 2, 8, 4
    images = rng.normal(size=(b, h, h, 10)).astype(np.float32)
    preds = [jnp.asarray(rng.normal(size=(b, 4, p * p * len(g))), jnp.float32) for g in GROUPS_S2_10]
    mask = np.zeros((b, 3, 4), np.float32)
    mask[:, 0, :2] = mask[:, 1, 1] = mask[:, 1, 3] = mask[:, 2, 3] = 1  # patch 2: never masked
    valid = np.ones((b, h, h), bool)
    valid[:, 5:, 6:] = False  # part of patch 3
    out = dict(pred=preds, mask=jnp.asarray(mask))

    def mse(img):
        return float(satmae_loss(out, img, valid, p, GROUPS_S2_10, norm_pix)[0])

    base = mse(images)
    changed = images.copy()
    changed[:, 5:, 6:] = np.nan  # nodata under invalid pixels
    changed[:, 4:, :4, :] += rng.normal(size=(b, 4, 4, 10)) * 50.0  # patch 2, unmasked everywhere
    assert mse(changed) == pytest.approx(base, rel=1e-6, abs=1e-6)
    moved = images.copy()
    moved[:, :4, :4, 3] += 5.0  # patch 0 is masked in group 0 only: band 3 (group 1) does not count
    if not norm_pix:  # (with norm_pix it moves the patch's statistics over all bands)
        assert mse(moved) == pytest.approx(base, rel=1e-6)
    moved[:, :4, :4, 0] += 5.0  # ... but group 0 masks it
    assert abs(mse(moved) - base) > 1e-3


def test_pred_order_reference_reads_group_order_as_band_order(mu):
    """pred_order='reference' (SatMAE++): the group predictions concatenated in group order are the
    reconstruction's bands, and the loss compares them so; with contiguous groups the orders agree."""
    assert pred_bands(GROUPS_S2_10, "bands") == GROUPS_S2_10
    assert pred_bands(GROUPS_S2_10, "reference") == ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9))
    with pytest.raises(ValueError, match="pred_order='groups'"):
        pred_bands(GROUPS_S2_10, "groups")
    model, params, x, fwd = mu
    ref = _mu(pred_order="reference")
    out, out_ref = fwd(params, x, _key(9)), _fwd(ref)(params, x, _key(9))
    jax.tree.map(np.testing.assert_array_equal, out["pred"], out_ref["pred"])  # same weights, same heads
    concat = np.concatenate([unpatchify(pr, 4, 16, 16, len(g)) for pr, g in zip(out["pred"], GROUPS_S2_10)], -1)
    np.testing.assert_allclose(out_ref["recon"], concat, atol=1e-6)
    np.testing.assert_allclose(out["recon"], concat[..., np.argsort(sum(GROUPS_S2_10, ()))], atol=1e-6)
    # The loss: each group's bands are compared with the predictions that stand for them.
    mask = np.asarray(out["mask"])
    target = np.asarray(patchify(x, 4)).reshape(8, 16, 16, 10)
    rec = np.asarray(patchify(jnp.asarray(concat), 4)).reshape(8, 16, 16, 10)  # reference band order
    num = sum((((rec - target)[..., list(g)] ** 2).mean((-1, -2)) * mask[:, i]).sum()
              for i, g in enumerate(GROUPS_S2_10))
    got = float(satmae_loss(out_ref, x, None, 4, GROUPS_S2_10, pred_order="reference")[0])
    assert got == pytest.approx(num / mask.sum(), rel=1e-5)
    assert abs(got - float(satmae_loss(out_ref, x, None, 4, GROUPS_S2_10)[0])) > 1e-4  # 'bands' differs
    contiguous = ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9))
    assert pred_bands(contiguous, "reference") == contiguous


# ---------------------------------------------------------------------------------------------
# Multi-scale head
# ---------------------------------------------------------------------------------------------
def _np_ln(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["ln"]["scale"] + p["ln"]["bias"]


def _np_conv3(x, p):
    h, w, _ = x.shape
    xp, k = np.pad(x, ((1, 1), (1, 1), (0, 0))), np.asarray(p["kernel"])
    return sum(xp[dy:dy + h, dx:dx + w] @ k[dy, dx] for dy in range(3) for dx in range(3)) + p["bias"]


def test_upsample_block_matches_torch_layout():
    # torch ConvTranspose2d(k=4, s=2, p=1): out[2*iy - 1 + ky, 2*ix - 1 + kx] += x[iy, ix] @ W[ky, kx]
    # (our kernel (kh, kw, out, in)), then LN -> leaky ReLU -> x + 0.5 conv(relu(conv x)) -> LN; proj.
    block = UpsampleBlock(3)
    x = jax.random.normal(_key(5), (1, 4, 5, 8))
    params = block.init(RNGS, x)
    feats, img = block.apply(params, x)
    p = jax.tree.map(np.asarray, nn.unbox(params)["params"])
    xn, k = np.asarray(x[0], np.float64), p["up_conv"]["kernel"]
    up = np.zeros((10, 12, 8))  # padded by one on each side
    for iy in range(4):
        for ix in range(5):
            up[2 * iy:2 * iy + 4, 2 * ix:2 * ix + 4] += np.einsum("i,yxoi->yxo", xn[iy, ix], k)
    y = _np_ln(up[1:-1, 1:-1] + p["up_conv"]["bias"], p["up_norm"])
    y = np.where(y > 0, y, 0.01 * y)
    y = y + 0.5 * _np_conv3(np.maximum(_np_conv3(y, p["res_conv1"]), 0), p["res_conv2"])
    y = _np_ln(y, p["res_norm"])
    np.testing.assert_allclose(feats[0], y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(img[0], _np_conv3(y, p["proj_out"]), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Fine-tuning encoder
# ---------------------------------------------------------------------------------------------
def test_group_channel_vit_loads_mae_encoder(mu):
    model, params, x, fwd = mu
    vit = GroupChannelViT(**{k: v for k, v in satmae_config("mu").items() if k in ENC_KEYS})
    enc = params["params"]["encoder"]
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype),
                          nn.unbox(jax.eval_shape(vit.init, RNGS, x))["params"])
    assert shapes == jax.tree.map(lambda a: (a.shape, a.dtype), enc)
    # Same function: with nothing masked, the MAE latent is the ViT's tokens in shuffled order.
    tokens = jax.jit(vit.apply)({"params": enc}, x)
    out = fwd(params, x, _key(6), 0.0)
    idx = np.asarray(out["keep_idx"])[:, :, None]
    np.testing.assert_allclose(np.take_along_axis(np.asarray(tokens[:, 1:]), idx, 1),
                               out["latent"][:, 1:], rtol=1e-4, atol=1e-4)
    # A different grid (24 x 32 px: 6 x 8 patches): positions recomputed, no parameter change.
    big = jax.jit(vit.apply)({"params": enc}, jax.random.normal(_key(7), (2, 24, 32, 10)))
    assert big.shape == (2, 1 + 3 * 48, 32) and np.isfinite(big).all()


def test_group_channel_vit_learned_embed(mu):
    """learned_embed=True (the fine-tuning ViT): pos_embed / channel_embed parameters initialised to
    the fixed sin-cos (the same function as the fixed model until trained), both used; another grid
    resizes pos_embed."""
    model, params, x, fwd = mu
    kw = {k: v for k, v in satmae_config("mu").items() if k in ENC_KEYS}
    fixed, learned = GroupChannelViT(**kw), GroupChannelViT(**kw, learned_embed=True)
    p = nn.unbox(jax.jit(learned.init)(RNGS, x))["params"]
    assert p["pos_embed"].shape == (16, 24) and p["channel_embed"].shape == (3, 8)
    table = pos_group_embed(32, 8, 3, 4, 4)
    np.testing.assert_allclose(p["pos_embed"], table[0, :, :24], atol=1e-6)
    np.testing.assert_allclose(p["channel_embed"], table[:, 0, 24:], atol=1e-6)
    enc = dict(params["params"]["encoder"])
    want = jax.jit(fixed.apply)({"params": enc}, x)
    ones = dict(enc, pos_embed=p["pos_embed"], channel_embed=p["channel_embed"])
    np.testing.assert_allclose(jax.jit(learned.apply)({"params": ones}, x), want, atol=1e-5)
    moved = dict(ones, channel_embed=ones["channel_embed"] + 1.0)
    assert not np.allclose(jax.jit(learned.apply)({"params": moved}, x), want, atol=1e-3)
    big = jax.random.normal(_key(7), (2, 24, 32, 10))  # 6 x 8 patches: pos_embed resized
    diff = (learned.apply({"params": ones}, big, method=GroupChannelViT.embed)
            - fixed.apply({"params": enc}, big, method=GroupChannelViT.embed))  # (B, G, N, D)
    want = np.asarray(interpolate_pos_embed(ones["pos_embed"], (4, 4), (6, 8))) - pos_group_embed(32, 8, 3, 6, 8)[0, :, :24]
    np.testing.assert_allclose(diff[..., :24], np.broadcast_to(want, (2, 3, 48, 24)), atol=1e-5)
    np.testing.assert_allclose(diff[..., 24:], 0.0, atol=1e-6)


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_interpolate_pos_embed(method):
    pos = jax.random.normal(_key(8), (1, 1 + 4 * 5, 6))
    got = interpolate_pos_embed(pos, (4, 5), (7, 3), method)
    want = jax.image.resize(pos[0, 1:].reshape(4, 5, 6), (7, 3, 6), method).reshape(21, 6)
    assert got.shape == (1, 22, 6)
    np.testing.assert_allclose(got[0, 1:], want, atol=1e-6)
    np.testing.assert_array_equal(got[:, :1], pos[:, :1])  # cls kept
    np.testing.assert_array_equal(interpolate_pos_embed(pos, (4, 5), (4, 5)), pos)
    const = interpolate_pos_embed(jnp.full((16, 2), 3.0), 4, 6, method)  # no prefix, square
    np.testing.assert_allclose(const, 3.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# FLOPs, sharding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,spatial", [("mu", False), ("large", True)])
def test_flops_per_image_from_param_shapes(variant, spatial):
    cfg = satmae_config(variant, spatial_mask=spatial, scan=True)
    s, patch = cfg["image_size"], cfg["patch_size"]
    p = nn.unbox(jax.eval_shape(SatMAE(**cfg).init, RNGS,
                                jax.ShapeDtypeStruct((1, s, s, 10), jnp.float32)))["params"]
    n = (s // patch) ** 2
    kept = 3 * int(n * 0.25) if spatial else int(3 * n * 0.25)
    t_enc, t_dec = kept + 1, 3 * n + 1

    def kmacs(tree, per):  # each kernel entry is one multiply-add per token / pixel
        return per * sum(math.prod(a.shape) for path, a in jax.tree_util.tree_leaves_with_path(tree)
                         if "kernel" in str(path[-1]))

    macs = sum(kmacs(p["encoder"][f"patch_embed_{g}"], n) + kmacs(p[f"decoder_pred_{g}"], n)
               for g in range(3))
    macs += kmacs(p["encoder"]["blocks"], t_enc) + kmacs(p["decoder_embed"], t_enc)
    macs += kmacs(p["decoder"], t_dec)
    macs += 2 * t_enc**2 * cfg["width"] * cfg["depth"]  # q.k and attn.v
    macs += 2 * t_dec**2 * cfg["decoder_width"] * cfg["decoder_depth"]
    ms, hw = p["multiscale_head"], s * s  # transposed convs count their input pixels
    macs += kmacs(ms["proj_up_conv"], hw) + kmacs(ms["up_block1"]["up_conv"], hw)
    macs += kmacs({k: v for k, v in ms["up_block1"].items() if k != "up_conv"}, 4 * hw)
    macs += kmacs(ms["up_block2"]["up_conv"], 4 * hw)
    macs += kmacs({k: v for k, v in ms["up_block2"].items() if k != "up_conv"}, 16 * hw)
    assert flops_per_image(cfg) == pytest.approx(2 * macs, rel=1e-9)
    assert flops_per_image(cfg, training=True) == pytest.approx(6 * macs, rel=1e-9)
    no_ms = flops_per_image(dict(cfg, multiscale=False))
    assert no_ms < flops_per_image(cfg)


@pytest.mark.slow
def test_sharded_init_and_grad(mu):
    # DP x TP and FSDP meshes under the trainer's rules: init lands sharded with the same values as the
    # unsharded init, and both meshes give the same gradients (sharding changes layout, not values).
    _, params0, x, _ = mu
    model = _mu(multiscale=True)
    t2, t4 = (jax.random.normal(_key(9 + s), (8, 16 * s, 16 * s, 10)) for s in (2, 4))
    valid = jnp.ones(x.shape[:3], bool)

    def loss(p, x, t2, t4):
        out = model.apply(p, x, rngs={"mask": _key(11)})
        return satmae_loss(out, x, valid, 4, GROUPS_S2_10, False, t2, None, t4, None)[0]

    grads = []
    for axes in ((("data", 4), ("fsdp", 1), ("model", 2)), (("data", 1), ("fsdp", 8), ("model", 1))):
        mesh, rules = make_mesh(axes), DEFAULT_RULES
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            abstract = jax.eval_shape(model.init, RNGS, x)
            shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
            params = jax.jit(lambda r, x: nn.unbox(model.init(r, x)), out_shardings=shardings)(RNGS, x)
            p = params["params"]
            assert p["encoder"]["blocks"]["block_0"]["mlp"]["fc1"]["kernel"].sharding.spec == \
                jax.sharding.PartitionSpec("fsdp", "model")  # logical (embed, mlp)
            assert p["multiscale_head"]["up_block1"]["up_conv"]["kernel"].sharding.is_fully_replicated
            xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                ("data", "fsdp"))))
            grads.append(jax.jit(jax.grad(loss), out_shardings=shardings)(params, xs, t2, t4))
        shared = {k: v for k, v in p.items() if k != "multiscale_head"}
        jax.tree.map(np.testing.assert_array_equal, shared, params0["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)
    for g in grads:
        assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))
        assert float(jnp.abs(g["params"]["encoder"]["cls_token"]).sum()) > 0
        assert float(jnp.abs(g["params"]["multiscale_head"]["up_block2"]["proj_out"]["kernel"]).sum()) > 0
