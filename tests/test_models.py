"""eojax.models: position embeddings, ViT / MAE shapes, masking, the nodata-aware loss, layouts,
partitioning, bf16 and FLOP accounting. Models are 'mu'-sized; bigger ones only through eval_shape."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eojax.models import (
    MAE,
    ViTEncoder,
    flops_per_image,
    mae_config,
    mae_loss,
    random_masking,
    sincos_1d,
    sincos_2d,
    stack_layers,
    unstack_layers,
    vit_config,
)
from eojax.models import layers

RNGS = {"params": jax.random.key(0), "mask": jax.random.key(1)}


def _mu_mae(**kw):
    return MAE(**mae_config("mu", image_size=32, patch_size=8, in_channels=3, **kw))


# ---------------------------------------------------------------------------------------------
# sin-cos embeddings
# ---------------------------------------------------------------------------------------------
def _omega(i, half):
    return 1.0 / 10000 ** (i / half)


def test_sincos_1d_matches_formula():
    d, pos = 8, [0, 1, 2.5, 7]
    got = sincos_1d(d, pos)
    want = np.zeros((len(pos), d))
    for t, x in enumerate(pos):
        for i in range(d // 2):
            want[t, i] = math.sin(x * _omega(i, d // 2))
            want[t, d // 2 + i] = math.cos(x * _omega(i, d // 2))
    assert got.shape == (4, 8)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_sincos_2d_matches_formula_on_non_square_grid():
    # First half of the channels encodes the column (MAE convention), second half the row.
    d, gh, gw = 16, 3, 5
    got = sincos_2d(d, gh, gw)
    q = d // 4
    want = np.zeros((gh * gw, d))
    for r in range(gh):
        for c in range(gw):
            t = r * gw + c
            for i in range(q):
                w = _omega(i, q)
                want[t, i], want[t, q + i] = math.sin(c * w), math.cos(c * w)
                want[t, 2 * q + i], want[t, 3 * q + i] = math.sin(r * w), math.cos(r * w)
    assert got.shape == (15, 16)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(6, 2, 2)


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3, 6])
@pytest.mark.parametrize("cls", [True, False])
def test_vit_mu_shapes(channels, cls):
    model = ViTEncoder(**vit_config("mu", image_size=32, patch_size=8, in_channels=channels),
                       use_cls_token=cls)
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, channels))
    params = model.init(RNGS, x)
    y = model.apply(params, x)
    assert y.shape == (2, 16 + cls, 32) and y.dtype == jnp.float32
    assert np.all(np.isfinite(y))
    # Any grid divisible by the patch works (fixed positions): 48x32 -> 6*4 patches.
    y2 = model.apply(params, jnp.zeros((1, 48, 32, channels)))
    assert y2.shape == (1, 24 + cls, 32)


def test_vit_embed_adds_fixed_positions():
    model = ViTEncoder(**vit_config("mu", image_size=16, patch_size=8, in_channels=2))
    x = jnp.zeros((1, 16, 16, 2))
    params = model.init(RNGS, x)
    emb = model.apply(params, x, method=ViTEncoder.embed)
    bias = nn.unbox(params)["params"]["patch_embed"]["proj"]["bias"]
    np.testing.assert_allclose(emb[0], bias[None] + sincos_2d(32, 2, 2), atol=1e-6)


def test_vit_tiny_and_mae_tiny_shapes_96():
    x = jax.ShapeDtypeStruct((2, 96, 96, 4), jnp.float32)
    vit = ViTEncoder(**vit_config("tiny", image_size=96, patch_size=16, in_channels=4))
    params = jax.eval_shape(vit.init, RNGS, x)
    assert jax.eval_shape(vit.apply, params, x).shape == (2, 37, 192)
    mae = MAE(**mae_config("tiny", image_size=96, patch_size=16, in_channels=4))
    params = jax.eval_shape(mae.init, RNGS, x)
    out = jax.eval_shape(lambda p, x: mae.apply(p, x, rngs={"mask": jax.random.key(0)}), params, x)
    assert out["pred"].shape == (2, 36, 16 * 16 * 4) and out["pred"].dtype == jnp.float32
    assert out["mask"].shape == (2, 36)
    assert out["latent"].shape == (2, 1 + 9, 192)  # int(36 * 0.25) = 9 kept + cls


def test_bad_inputs_raise_clear_errors():
    vit = ViTEncoder(**vit_config("mu", image_size=32, patch_size=8, in_channels=3))
    with pytest.raises(ValueError, match="channels-last"):
        vit.init(RNGS, jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="not divisible"):
        vit.init(RNGS, jnp.zeros((1, 30, 32, 3)))
    with pytest.raises(KeyError, match="unknown ViT variant"):
        vit_config("giant")


# ---------------------------------------------------------------------------------------------
# masking
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,ratio", [(16, 0.75), (10, 0.75), (49, 0.6)])
def test_random_masking(n, ratio):
    b = 6
    k = int(n * (1 - ratio))
    keep, mask, restore = random_masking(jax.random.key(3), b, n, ratio)
    keep, mask, restore = map(np.asarray, (keep, mask, restore))
    assert keep.shape == (b, k) and mask.shape == (b, n) and restore.shape == (b, n)
    np.testing.assert_array_equal(mask.sum(1), n - k)
    for i in range(b):
        assert sorted(restore[i]) == list(range(n))
        assert np.all(mask[i, keep[i]] == 0) and len(set(keep[i])) == k
    # MAE's unshuffle: kept tokens then mask tokens, gathered by restore_idx, land in grid order.
    tokens = np.arange(n)[None].repeat(b, 0) + 100
    shuffled = np.concatenate([np.take_along_axis(tokens, keep, 1), -np.ones((b, n - k))], 1)
    back = np.take_along_axis(shuffled, restore, 1)
    np.testing.assert_array_equal(np.where(mask == 1, -1, tokens), back)
    assert len({tuple(m) for m in mask}) > 1  # samples differ


def test_random_masking_rejects_bad_ratio():
    with pytest.raises(ValueError):
        random_masking(jax.random.key(0), 1, 4, 1.0)
    with pytest.raises(ValueError, match="keeps no patch"):
        random_masking(jax.random.key(0), 1, 4, 0.9)


# ---------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------
def _loss_numpy(pred, images, valid, mask, p, norm_pix):
    b, h, w, c = images.shape
    num = den = 0.0
    for i in range(b):
        for r in range(h // p):
            for q in range(w // p):
                n = r * (w // p) + q
                if mask[i, n] == 0:
                    continue
                tgt = images[i, r * p:(r + 1) * p, q * p:(q + 1) * p].astype(np.float64)
                val = valid[i, r * p:(r + 1) * p, q * p:(q + 1) * p]
                prd = pred[i, n].reshape(p, p, c)
                if norm_pix:
                    vals = tgt[val].reshape(-1)
                    if vals.size:
                        mu = vals.mean()
                        var = vals.var(ddof=1) if vals.size > 1 else 0.0
                        tgt = (tgt - mu) / np.sqrt(var + 1e-6)
                for y in range(p):
                    for x in range(p):
                        if val[y, x]:
                            num += np.mean((prd[y, x] - tgt[y, x]) ** 2)
                            den += 1
    return num / den if den else 0.0


def _loss_case(seed=0):
    rng = np.random.default_rng(seed)
    b, h, w, c, p = 2, 8, 12, 3, 4
    n = (h // p) * (w // p)
    images = rng.normal(size=(b, h, w, c)).astype(np.float32) * 3 + 1
    valid = rng.random((b, h, w)) > 0.3
    valid[0, :4, :4] = False  # a whole invalid patch
    valid[1, 4:, 8:] = False
    valid[1, 4, 8] = True  # a patch with one valid pixel
    mask = (rng.random((b, n)) > 0.4).astype(np.float32)
    mask[0, 0] = mask[1, 5] = 1.0
    pred = rng.normal(size=(b, n, p * p * c)).astype(np.float32)
    images[~valid] = 0.0  # the data layer zeroes nodata
    return pred, images, valid, mask, p


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_matches_numpy(norm_pix):
    pred, images, valid, mask, p = _loss_case()
    loss, aux = mae_loss(pred, images, valid, mask, p, norm_pix)
    want = _loss_numpy(pred, images, valid, mask, p, norm_pix)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert loss.dtype == jnp.float32
    assert 0 < float(aux["masked_valid_fraction"]) < 1


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_invariances(norm_pix):
    pred, images, valid, mask, p = _loss_case(1)
    base, _ = mae_loss(pred, images, valid, mask, p, norm_pix)
    # Anything (even NaN) under invalid pixels.
    junk = np.where(valid[..., None], images, np.nan).astype(np.float32)
    np.testing.assert_allclose(mae_loss(pred, junk, valid, mask, p, norm_pix)[0], base, rtol=1e-6)
    junk = np.where(valid[..., None], images, 1e4).astype(np.float32)
    np.testing.assert_allclose(mae_loss(pred, junk, valid, mask, p, norm_pix)[0], base, rtol=1e-6)
    # Anything in unmasked patches (pred and image).
    pix_mask = np.repeat(np.repeat(mask.reshape(2, 2, 3), p, 1), p, 2)  # (B, H, W)
    images2 = np.where(pix_mask[..., None] == 0, 50.0, images).astype(np.float32)
    pred2 = np.where(mask[..., None] == 0, -7.0, pred).astype(np.float32)
    np.testing.assert_allclose(mae_loss(pred2, images2, valid, mask, p, norm_pix)[0], base,
                               rtol=1e-6)
    grad = jax.grad(lambda q: mae_loss(q, junk, valid, mask, p, norm_pix)[0])(pred)
    assert np.all(np.isfinite(grad)) and np.all(grad[mask == 0] == 0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_mae_loss_zero_weight_is_finite_zero(norm_pix):
    pred, images, valid, mask, p = _loss_case(2)
    for v, m in [(valid, np.zeros_like(mask)), (np.zeros_like(valid), mask)]:
        loss, aux = mae_loss(pred, images, v, m, p, norm_pix)
        assert float(loss) == 0.0 and float(aux["loss_weight"]) == 0.0
        g = jax.grad(lambda q: mae_loss(q, images, v, m, p, norm_pix)[0])(pred)
        assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------------------------
# model behaviour: masking in the model, layouts, remat, partitioning, bf16
# ---------------------------------------------------------------------------------------------
def test_mae_forward_and_mask_rng():
    model = _mu_mae()
    x = jax.random.normal(jax.random.key(4), (3, 32, 32, 3))
    params = model.init(RNGS, x)
    a = model.apply(params, x, rngs={"mask": jax.random.key(5)})
    b = model.apply(params, x, rngs={"mask": jax.random.key(6)})
    assert a["pred"].shape == (3, 16, 192) and a["latent"].shape == (3, 5, 32)
    np.testing.assert_array_equal(a["mask"].sum(1), 12)
    assert not np.array_equal(a["mask"], b["mask"])
    full = model.apply(params, x, mask_ratio=0.0, rngs={"mask": jax.random.key(5)})
    assert full["latent"].shape == (3, 17, 32) and float(full["mask"].sum()) == 0
    loss, _ = mae_loss(a["pred"], x, jnp.ones(x.shape[:3], bool), a["mask"], 8, True)
    assert np.isfinite(float(loss))


def _map_layout(params, to_scan):
    p = nn.unbox(params)["params"]
    conv = stack_layers if to_scan else unstack_layers
    out = jax.tree.map(lambda a: a, p)
    out["encoder"]["blocks"] = conv(p["encoder"]["blocks"], 2)
    out["decoder"] = conv(p["decoder"], 1)
    return {"params": out}


def test_scan_and_loop_layouts_agree():
    x = jax.random.normal(jax.random.key(7), (2, 32, 32, 3))
    loop, scan = _mu_mae(), _mu_mae(scan=True)
    p_loop = loop.init(RNGS, x)
    p_scan = _map_layout(p_loop, to_scan=True)
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(jax.eval_shape(scan.init, RNGS, x)))
    assert jax.tree.map(lambda a: a.shape, p_scan) == shapes
    r = {"mask": jax.random.key(8)}
    want = loop.apply(p_loop, x, rngs=r)["pred"]
    np.testing.assert_allclose(scan.apply(p_scan, x, rngs=r)["pred"], want, rtol=1e-5, atol=1e-5)
    back = _map_layout(p_scan, to_scan=False)
    np.testing.assert_allclose(loop.apply(back, x, rngs=r)["pred"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_gives_same_gradients(scan):
    x = jax.random.normal(jax.random.key(9), (2, 32, 32, 3))
    valid = jnp.ones(x.shape[:3], bool)
    plain, remat = _mu_mae(scan=scan), _mu_mae(scan=scan, remat=True)
    params = nn.unbox(plain.init(RNGS, x))

    def grads(model):
        def f(p):
            out = model.apply(p, x, rngs={"mask": jax.random.key(10)})
            return mae_loss(out["pred"], x, valid, out["mask"], 8)[0]
        return jax.jit(jax.grad(f))(params)

    g0, g1 = grads(plain), grads(remat)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)
    assert float(jnp.abs(g0["params"]["encoder"]["cls_token"]).sum()) > 0


@pytest.mark.parametrize("scan,remat", [(False, True), (True, True)])
def test_dropout_trains_under_scan_and_remat(scan, remat):
    model = _mu_mae(scan=scan, remat=remat, dropout=0.5)
    x = jnp.ones((2, 32, 32, 3))
    params = model.init(RNGS, x)
    r = lambda k: {"mask": jax.random.key(0), "dropout": jax.random.key(k)}  # noqa: E731
    a = model.apply(params, x, train=True, rngs=r(1))["pred"]
    b = model.apply(params, x, train=True, rngs=r(2))["pred"]
    c = model.apply(params, x, train=False, rngs=r(1))["pred"]
    d = model.apply(params, x, train=False, rngs=r(2))["pred"]
    assert not np.allclose(a, b) and np.array_equal(c, d)


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_names(scan):
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    for model in (_mu_mae(scan=scan),
                  ViTEncoder(**vit_config("mu", image_size=32, patch_size=8), scan=scan)):
        abstract = jax.eval_shape(model.init, RNGS, x)
        leaves = jax.tree.leaves(abstract, is_leaf=lambda a: isinstance(a, nn.Partitioned))
        assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
        specs = jax.tree.leaves(nn.get_partition_spec(abstract),
                                is_leaf=lambda a: isinstance(a, jax.sharding.PartitionSpec))
        assert len(specs) == len(leaves)
        for leaf, spec in zip(leaves, specs):
            assert len(spec) == leaf.value.ndim
            assert any(name is not None for name in spec), spec  # something is shardable
    blocks = nn.get_partition_spec(jax.eval_shape(_mu_mae(scan=scan).init, RNGS, x))
    blocks = blocks["params"]["encoder"]["blocks"]
    q = (blocks["layers"] if scan else blocks["block_1"])["attn"]["query"]["kernel"]
    assert tuple(q) == (("layers",) if scan else ()) + ("embed", "heads", "kv")


def test_sharded_apply_matches_unsharded():
    # Logical names resolve under a real 3-axis mesh; constraints change layout, never values.
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"),
             ("kv", None), ("length", None))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = _mu_mae(scan=True)
    x = jax.random.normal(jax.random.key(11), (4, 32, 32, 3))
    params = model.init(RNGS, x)
    r = {"mask": jax.random.key(12)}
    want = model.apply(params, x, rngs=r)["pred"]
    with jax.sharding.use_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(params), mesh, rules)
        sharded = jax.device_put(nn.unbox(params), nn.unbox(shardings))
        got = jax.jit(lambda p, x: model.apply(p, x, rngs=r)["pred"])(sharded, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_compute_returns_float32(param_dtype):
    model = _mu_mae(dtype=jnp.bfloat16, param_dtype=param_dtype, scan=True)
    x = jax.random.normal(jax.random.key(13), (2, 32, 32, 3))
    params = model.init(RNGS, x)
    assert all(a.dtype == param_dtype for a in jax.tree.leaves(nn.unbox(params)))
    out = model.apply(params, x, rngs={"mask": jax.random.key(14)})
    assert out["latent"].dtype == jnp.bfloat16 and out["pred"].dtype == jnp.float32
    loss, _ = mae_loss(out["pred"], x, jnp.ones(x.shape[:3], bool), out["mask"], 8, True)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant,size,patch,ch,cls", [("mu", 32, 8, 3, True),
                                                        ("base", 224, 16, 3, True),
                                                        ("mu", 48, 8, 5, False)])
def test_flops_per_image_from_param_shapes(variant, size, patch, ch, cls):
    cfg = mae_config(variant, image_size=size, patch_size=patch, in_channels=ch,
                     use_cls_token=cls)
    x = jax.ShapeDtypeStruct((1, size, size, ch), jnp.float32)
    p = nn.unbox(jax.eval_shape(MAE(**cfg).init, RNGS, x))["params"]
    n = (size // patch) ** 2
    t_enc, t_dec = int(n * 0.25) + cls, n + cls

    def kernel_macs(tree, tokens):  # each kernel entry is one multiply-add per token
        return tokens * sum(math.prod(a.shape) for path, a in
                            jax.tree_util.tree_leaves_with_path(tree) if "kernel" in str(path[-1]))

    macs = kernel_macs(p["encoder"]["patch_embed"], n)
    macs += kernel_macs(p["encoder"]["blocks"], t_enc) + kernel_macs(p["decoder_embed"], t_enc)
    macs += kernel_macs(p["decoder"], t_dec) + kernel_macs(p["decoder_pred"], t_dec)
    macs += 2 * t_enc**2 * cfg["width"] * cfg["depth"]  # q.k and attn.v
    macs += 2 * t_dec**2 * cfg["decoder_width"] * cfg["decoder_depth"]
    assert flops_per_image(cfg) == pytest.approx(2 * macs, rel=1e-9)
    assert flops_per_image(cfg, training=True) == pytest.approx(6 * macs, rel=1e-9)
    if variant == "base":  # sanity: MAE ViT-B/16 pretraining forward is ~ 20 GFLOPs per image
        assert 15e9 < flops_per_image(cfg) < 30e9
