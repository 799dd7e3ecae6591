"""eojax.models: position embeddings, ViT / MAE shapes, masking, the nodata-aware loss, layouts,
partitioning, bf16 and FLOP accounting. Models are 'mu'-sized; bigger ones only through eval_shape."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eojax.mae.model import MAE, flops_per_image, mae_config, mae_loss, random_masking
from eojax.models import ViTEncoder, sincos_1d, sincos_2d, stack_layers, unstack_layers, vit_config

RNGS = {"params": jax.random.key(0), "mask": jax.random.key(1)}


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
    # Shapes only (eval_shape: no compile); real values are exercised by the MAE tests below.
    model = ViTEncoder(**vit_config("mu", image_size=32, patch_size=8, in_channels=channels),
                       use_cls_token=cls)
    x = jax.ShapeDtypeStruct((2, 32, 32, channels), jnp.float32)
    params = jax.eval_shape(model.init, RNGS, x)
    y = jax.eval_shape(model.apply, params, x)
    assert y.shape == (2, 16 + cls, 32) and y.dtype == jnp.float32
    # Any grid divisible by the patch works (fixed positions): 48x32 -> 6*4 patches.
    y2 = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((1, 48, 32, channels), jnp.float32))
    assert y2.shape == (1, 24 + cls, 32)


def test_vit_tiny_and_mae_tiny_shapes_96():
    x = jax.ShapeDtypeStruct((2, 96, 96, 4), jnp.float32)
    vit = ViTEncoder(**vit_config("tiny", image_size=96, patch_size=16, in_channels=4), scan=True)
    params = jax.eval_shape(vit.init, RNGS, x)
    assert jax.eval_shape(vit.apply, params, x).shape == (2, 37, 192)
    mae = MAE(**mae_config("tiny", image_size=96, patch_size=16, in_channels=4), scan=True)
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


def test_permute_tokens_and_its_gradient():
    # The unshuffle's custom backward (gather by the inverse permutation) against numpy's gather
    # and against autodiff of the plain gather (a scatter-add).
    from eojax.mae.model import permute_tokens
    _, _, perm = random_masking(jax.random.key(7), 3, 10, 0.5)
    x = jax.random.normal(jax.random.key(8), (3, 10, 4))
    g = jax.random.normal(jax.random.key(9), (3, 10, 4))
    out, vjp = jax.vjp(lambda x: permute_tokens(x, perm), x)
    np.testing.assert_array_equal(out, np.take_along_axis(np.asarray(x), np.asarray(perm)[:, :, None], 1))
    _, ref_vjp = jax.vjp(lambda x: jnp.take_along_axis(x, perm[:, :, None], axis=1), x)
    np.testing.assert_array_equal(vjp(g)[0], ref_vjp(g)[0])


def test_random_masking_rejects_bad_ratio():
    with pytest.raises(ValueError):
        random_masking(jax.random.key(0), 1, 4, 1.0)
    with pytest.raises(ValueError, match="keeps no patch"):
        random_masking(jax.random.key(0), 1, 4, 0.9)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------
def _numpy_attention(q, k, v, bias):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1]) + bias
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def test_dot_product_attention_and_its_gradients_match_references():
    """eojax's attention (custom softmax backward) against numpy in float64 for the values and
    against autodiff of jax.nn.dot_product_attention for the gradients, with an additive bias."""
    from eojax.models.layers import dot_product_attention, softmax
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (2, 7, 3, 8))
    k, v = (jax.random.normal(kk, (2, 9, 3, 8)) for kk in ks[1:3])
    bias = 2.0 * jax.random.normal(ks[3], (1, 3, 7, 9))
    g = jax.random.normal(ks[4], q.shape)
    out, vjp = jax.vjp(lambda *a: dot_product_attention(*a), q, k, v, bias)
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, np.asarray(bias)), atol=1e-5)
    ref_out, ref_vjp = jax.vjp(lambda *a: jax.nn.dot_product_attention(*a[:3], bias=a[3]), q, k, v, bias)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    for got, want in zip(vjp(g), ref_vjp(g)):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # bf16 inputs: float32 probabilities, output in bf16, close to the float32 result.
    low = dot_product_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(low.astype(jnp.float32), dot_product_attention(q, k, v), atol=5e-2)
    # the softmax alone: rows sum to one, invariant to a shift, gradient of sum(p * w) by finite differences
    x = jax.random.normal(ks[0], (4, 5))
    np.testing.assert_allclose(softmax(x).sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(softmax(x + 100.0), softmax(x), atol=1e-6)
    w = jax.random.normal(ks[1], (4, 5))
    grad = jax.grad(lambda x: (softmax(x) * w).sum())(x)
    eps = 1e-3
    fd = [(float((softmax(x.at[i, j].add(eps)) * w).sum()) - float((softmax(x.at[i, j].add(-eps)) * w).sum())) / (2 * eps)
          for i in range(4) for j in range(5)]
    np.testing.assert_allclose(np.asarray(grad).ravel(), fd, atol=2e-3)
    # bf16 logits: float32 probabilities, a bf16 gradient (the input's dtype)
    g16 = jax.grad(lambda x: (softmax(x) * w).sum())(x.astype(jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g16, np.float32), grad, atol=2e-2)


def test_linear_and_dense_gradients_match_autodiff_of_tensordot():
    """layers.linear (custom backward: the kernel gradient as one 2-D product) against autodiff of
    jnp.tensordot, for 1 and 2 contracted axes and multi-axis kernels (attention's q/k/v and output
    projections); layers.Dense keeps nn.Dense's parameter tree and its numbers."""
    from eojax.models.layers import Dense, linear
    ks = jax.random.split(jax.random.key(5), 6)
    cases = [((3, 7, 12), (12, 5), 1), ((3, 7, 12), (12, 2, 6), 1), ((2, 5, 3, 4), (3, 4, 12), 2),
             ((12,), (12, 5), 1)]
    for x_shape, k_shape, n_in in cases:
        x, kernel = jax.random.normal(ks[0], x_shape), jax.random.normal(ks[1], k_shape)
        g = jax.random.normal(ks[2], x_shape[: len(x_shape) - n_in] + k_shape[n_in:])
        np.testing.assert_allclose(linear(x, kernel, n_in), jnp.tensordot(x, kernel, n_in),
                                   rtol=1e-5, atol=1e-5)
        ours = jax.grad(lambda x, k: (linear(x, k, n_in) * g).sum(), argnums=(0, 1))(x, kernel)
        ref = jax.grad(lambda x, k: (jnp.tensordot(x, k, n_in) * g).sum(), argnums=(0, 1))(x, kernel)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    x = jax.random.normal(ks[3], (4, 9, 12))
    params = nn.Dense(5).init(ks[4], x)
    assert jax.tree.structure(Dense(5).init(ks[4], x)) == jax.tree.structure(params)
    loss = lambda m: lambda p: (m.apply(p, x) ** 2).sum()  # noqa: E731
    np.testing.assert_allclose(Dense(5).apply(params, x), nn.Dense(5).apply(params, x), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(loss(Dense(5)))(params)),
                    jax.tree.leaves(jax.grad(loss(nn.Dense(5)))(params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_layer_norm_and_its_gradients_match_references():
    """eojax's LayerNorm (custom backward) against numpy in float64 for the values and against
    autodiff of flax's nn.LayerNorm for the gradients of x, scale and bias; same parameter tree."""
    from eojax.models.layers import LayerNorm
    ks = jax.random.split(jax.random.key(3), 4)
    x = 3.0 + 2.0 * jax.random.normal(ks[0], (2, 5, 16))  # an offset mean, as a residual stream has
    ours, ref = LayerNorm(epsilon=1e-6), nn.LayerNorm(epsilon=1e-6)
    params = {"params": {"ln": {"scale": 1.0 + 0.1 * jax.random.normal(ks[1], (16,)),
                                "bias": 0.1 * jax.random.normal(ks[2], (16,))}}}
    assert jax.tree.structure(nn.unbox(ours.init(ks[0], x))) == jax.tree.structure(params)
    xs = np.asarray(x, np.float64)
    want = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + 1e-6)
    want = want * np.asarray(params["params"]["ln"]["scale"]) + np.asarray(params["params"]["ln"]["bias"])
    np.testing.assert_allclose(ours.apply(params, x), want, atol=1e-5)
    g = jax.random.normal(ks[3], x.shape)
    grads = jax.grad(lambda p, x: (ours.apply(p, x) * g).sum(), argnums=(0, 1))(params, x)
    ref_grads = jax.grad(lambda p, x: (ref.apply({"params": p["params"]["ln"]}, x) * g).sum(),
                         argnums=(0, 1))(params, x)
    np.testing.assert_allclose(grads[1], ref_grads[1], atol=1e-5)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(grads[0]["params"]["ln"][name], ref_grads[0]["params"]["ln"][name], atol=1e-5)
    # bf16 activations: statistics in float32, output and input gradient in bf16
    low = LayerNorm(dtype=jnp.bfloat16)
    y16, gx16 = jax.value_and_grad(lambda x: (low.apply(params, x).astype(jnp.float32) * g).sum())(
        x.astype(jnp.bfloat16))
    assert gx16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gx16, np.float32), grads[1], atol=5e-2)


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
# model behaviour: masking in the model, layouts, remat, partitioning, bf16.
# Params are filled from eval_shape with numpy noise (random init costs a long XLA compile on a
# small CPU; init itself is traced by every eval_shape here). Scanned params are derived from the
# loop params, so the two layouts are comparable.
# ---------------------------------------------------------------------------------------------
MU16 = dict(image_size=16, patch_size=4, in_channels=3)  # 16 patches of 48 values, 4 kept


def _key(seed):
    # 'rbg' keys compile far faster than threefry on CPU; the models do not care which they get.
    return jax.random.key(seed, impl="rbg")


def _mu16(**kw):
    return MAE(**mae_config("mu", **MU16, **kw))


def _fake_params(model, x):
    abstract = nn.unbox(jax.eval_shape(model.init, RNGS, x))
    rng = np.random.default_rng(0)

    def fill(path, a):
        noise = rng.standard_normal(a.shape)
        v = 1 + 0.1 * noise if "scale" in str(path[-1]) else 0.15 * noise
        return jnp.asarray(v, a.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _to_layout(params, scan):
    p = dict(nn.unbox(params)["params"])
    conv = stack_layers if scan else unstack_layers
    p["encoder"] = dict(p["encoder"], blocks=conv(p["encoder"]["blocks"], 2))
    p["decoder"] = conv(p["decoder"], 1)
    return {"params": p}


def _fwd(model, train=False):
    """Jitted forward -> output dict; `key` drives masking (and dropout through a fold)."""
    return jax.jit(lambda p, x, key: model.apply(
        p, x, train=train, rngs={"mask": key, "dropout": jax.random.fold_in(key, 1)}))


@pytest.fixture(scope="module")
def mu16():
    model = _mu16()
    x = jax.random.normal(_key(4), (4, 16, 16, 3))
    return model, _fake_params(model, x), x, _fwd(model)


def test_mae_forward_and_mask_rng(mu16):
    model, params, x, fwd = mu16
    a, b = fwd(params, x, _key(5)), fwd(params, x, _key(6))
    assert a["pred"].shape == (4, 16, 48) and a["latent"].shape == (4, 5, 32)
    assert np.all(np.isfinite(a["pred"]))
    np.testing.assert_array_equal(a["mask"].sum(1), 12)
    assert not np.array_equal(a["mask"], b["mask"])
    # The encoder only sees the kept patches: changing a masked patch leaves the latent alone,
    # changing a kept one does not.
    m0 = np.asarray(a["mask"][0])
    for n, same in ((int(np.argmax(m0)), True), (int(np.argmin(m0)), False)):
        px = np.array(x)
        px[0, (n // 4) * 4:(n // 4) * 4 + 4, (n % 4) * 4:(n % 4) * 4 + 4] += 10.0
        c = fwd(params, jnp.asarray(px), _key(5))
        assert np.allclose(c["latent"], a["latent"], rtol=1e-6, atol=1e-6) == same
    full = jax.eval_shape(lambda p: model.apply(p, x, mask_ratio=0.0, rngs={"mask": RNGS["mask"]}),
                          params)
    assert full["latent"].shape == (4, 17, 32)


def test_vit_embed_adds_fixed_positions(mu16):
    model, params, _, _ = mu16
    emb = model.apply(params, jnp.zeros((1, 16, 16, 3)), method=lambda m, x: m.encoder.embed(x))
    bias = params["params"]["encoder"]["patch_embed"]["proj"]["bias"]
    np.testing.assert_allclose(emb[0], bias[None] + sincos_2d(32, 4, 4), atol=1e-6)


def test_embedding_kept_patches_equals_gathering_the_full_embedding(mu16):
    # MAE embeds only the kept patches; that must be the full embedding's rows, positions included.
    model, params, x, _ = mu16
    keep = jnp.asarray([[0, 5, 15, 3], [2, 2, 9, 1], [14, 7, 0, 8], [4, 6, 10, 12]], jnp.int32)
    full = model.apply(params, x, method=lambda m, im: m.encoder.embed(im))
    kept = model.apply(params, x, keep, method=lambda m, im, k: m.encoder.embed(im, k))
    np.testing.assert_allclose(kept, np.take_along_axis(np.asarray(full), np.asarray(keep)[:, :, None], 1),
                               rtol=1e-6, atol=1e-6)


def test_scan_layout_with_remat_and_dropout(mu16):
    # Scanned + remat model with dropout: at inference it equals the loop model without dropout
    # (same params, mapped); in training remat's static `train` argument reaches dropout.
    _, params, x, fwd = mu16
    scan = _mu16(scan=True, remat=True, dropout=0.5)
    p_scan = _to_layout(params, scan=True)
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(jax.eval_shape(scan.init, RNGS, x)))
    assert jax.tree.map(lambda a: a.shape, p_scan) == shapes
    k1, k2 = _key(8), _key(9)
    np.testing.assert_allclose(_fwd(scan)(p_scan, x, k1)["pred"], fwd(params, x, k1)["pred"],
                               rtol=1e-5, atol=1e-5)
    train = _fwd(scan, train=True)
    assert not np.allclose(train(p_scan, x, k1)["pred"], train(p_scan, x, k2)["pred"])
    back = _to_layout(p_scan, scan=False)
    assert jax.tree.all(jax.tree.map(np.array_equal, back, params))


def test_remat_gives_same_gradients(mu16):
    # train=True also checks that remat's static `train` argument works in the loop layout.
    model, params, x, _ = mu16
    valid = jnp.ones(x.shape[:3], bool)

    def grads(m):
        def f(p):
            out = m.apply(p, x, train=True, rngs={"mask": _key(10)})
            return mae_loss(out["pred"], x, valid, out["mask"], 4)[0]
        return jax.jit(jax.grad(f))(params)

    g0, g1 = grads(model), grads(_mu16(remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)
    assert float(jnp.abs(g0["params"]["encoder"]["cls_token"]).sum()) > 0


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_names(scan):
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    for model in (_mu16(scan=scan), ViTEncoder(**vit_config("mu", **MU16), scan=scan)):
        abstract = jax.eval_shape(model.init, RNGS, x)
        leaves = jax.tree.leaves(abstract, is_leaf=lambda a: isinstance(a, nn.Partitioned))
        assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
        specs = jax.tree.leaves(nn.get_partition_spec(abstract),
                                is_leaf=lambda a: isinstance(a, jax.sharding.PartitionSpec))
        assert len(specs) == len(leaves)
        for leaf, spec in zip(leaves, specs):
            assert len(spec) == leaf.value.ndim
            if leaf.value.ndim - scan >= 2:  # every matrix has a shardable dim
                assert any(name not in (None, "layers") for name in spec), spec
    spec = nn.get_partition_spec(jax.eval_shape(_mu16(scan=scan).init, RNGS, x))["params"]
    blocks = spec["encoder"]["blocks"]
    q = (blocks["layers"] if scan else blocks["block_1"])["attn"]["query"]["kernel"]
    assert tuple(q) == (("layers",) if scan else ()) + ("embed", "heads", "kv")
    assert tuple(spec["encoder"]["patch_embed"]["proj"]["kernel"]) == (None, "embed")


def test_sharded_apply_matches_unsharded(mu16):
    # Logical names resolve under a real 3-axis mesh; constraints change layout, never values.
    _, params, x, fwd = mu16
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"),
             ("kv", None), ("length", None))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    model = _mu16()
    key = _key(12)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(model.init, RNGS, x)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
        sharded = jax.device_put(params, nn.unbox(shardings))
        assert sharded["params"]["encoder"]["blocks"]["block_0"]["mlp"]["fc1"]["kernel"].sharding \
            .spec == jax.sharding.PartitionSpec("fsdp", "model")
        got = _fwd(model)(sharded, x, key)["pred"]
    np.testing.assert_allclose(got, fwd(params, x, key)["pred"], rtol=1e-5, atol=1e-5)


def test_bf16_compute_returns_float32(mu16):
    _, params, x, fwd = mu16
    key = _key(14)
    # bf16 parameters: dtypes checked by tracing only.
    model = _mu16(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    abstract = nn.unbox(jax.eval_shape(model.init, RNGS, x))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(abstract))
    out = jax.eval_shape(lambda p: model.apply(p, x, rngs={"mask": key}), abstract)
    assert out["latent"].dtype == jnp.bfloat16 and out["pred"].dtype == jnp.float32
    # bf16 compute on float32 parameters (the usual mixed precision): run it.
    out = _fwd(_mu16(dtype=jnp.bfloat16))(params, x, key)
    assert out["latent"].dtype == jnp.bfloat16 and out["pred"].dtype == jnp.float32
    want = fwd(params, x, key)["pred"]
    err = float(jnp.max(jnp.abs(out["pred"] - want)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(want)))  # close, but really computed in bf16
    loss, _ = mae_loss(out["pred"], x, jnp.ones(x.shape[:3], bool), out["mask"], 4, True)
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

    macs = kernel_macs(p["encoder"]["patch_embed"], t_enc - cls)  # only the kept patches are embedded
    macs += kernel_macs(p["encoder"]["blocks"], t_enc) + kernel_macs(p["decoder_embed"], t_enc)
    macs += kernel_macs(p["decoder"], t_dec) + kernel_macs(p["decoder_pred"], n)  # no prediction for cls
    macs += 2 * t_enc**2 * cfg["width"] * cfg["depth"]  # q.k and attn.v
    macs += 2 * t_dec**2 * cfg["decoder_width"] * cfg["decoder_depth"]
    assert flops_per_image(cfg) == pytest.approx(2 * macs, rel=1e-9)
    assert flops_per_image(cfg, training=True) == pytest.approx(6 * macs, rel=1e-9)
    if variant == "base":  # sanity: MAE ViT-B/16 pretraining forward is ~ 20 GFLOPs per image
        assert 15e9 < flops_per_image(cfg) < 30e9
