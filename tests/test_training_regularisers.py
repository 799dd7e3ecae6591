"""Training regularisers shared by every family, against their references re-derived here:
layer-wise lr decay (MAE / BEiT param_groups_lrd + get_layer_id_for_vit), stochastic depth (timm
DropPath + its linspace of rates), Mixup / CutMix (timm Mixup, 'batch' mode) and random erasing
(timm RandomErasing, 'pixel' mode)."""
import math
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.core import meta

from eojax import optim
from eojax.data import mixing
from eojax.models import encoders, layers
from eojax.models.vit import ViTEncoder

VIT = dict(image_size=16, patch_size=8, in_channels=3, width=16, depth=3, heads=2, mlp_dim=32)


def vit_params(**kw):
    model = ViTEncoder(**{**VIT, **kw})
    return meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"])


def make_cfg(**kw):
    cfg = optim.default_config()
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def flat(tree):
    return dict(zip(jax.tree.leaves(optim.param_paths(tree)), jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# layer-wise lr decay
# ---------------------------------------------------------------------------------------------
def torch_name(path: str) -> str:
    """eojax path -> the timm ViT parameter name it corresponds to ('blocks/block_2/mlp/fc1/kernel'
    -> 'blocks.2.mlp.fc1.kernel'), so the reference rule can be applied as written."""
    return re.sub(r"blocks/block_(\d+)", r"blocks.\1", path).replace("/", ".")


def reference_layer_id(name, num_layers):
    """MAE util/lr_decay.py get_layer_id_for_vit, verbatim in behaviour."""
    if name in ["cls_token", "pos_embed"]:
        return 0
    elif name.startswith("patch_embed"):
        return 0
    elif name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    else:
        return num_layers


def reference_scales(params, layer_decay):
    num_layers = VIT["depth"] + 1  # len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    return {p: layer_scales[reference_layer_id(torch_name(p), num_layers)] for p in flat(params)}


def test_layer_ids_follow_the_mae_rule_on_eojax_paths():
    params = vit_params()
    ids, num_layers = optim.layer_ids(params, optim.default_config().layer_decay_block,
                                      optim.default_config().layer_decay_embed)
    assert num_layers == VIT["depth"] + 1
    got = flat(ids)
    for path in got:
        assert got[path] == reference_layer_id(torch_name(path), num_layers), path
    # Other families' embeddings and blocks: SatMAE++ per-group patch embeddings, CROMA's linear_input.
    for model, x in [(encoders.build("satmae", "mu"), jnp.zeros((1, 16, 16, 10))),
                     (encoders.build("croma", "mu"), jnp.zeros((1, 32, 32, 12)))]:
        shapes = meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
        ids, n = optim.layer_ids(shapes, optim.default_config().layer_decay_block,
                                 optim.default_config().layer_decay_embed)
        got = flat(ids)
        assert n == model.depth + 1
        for path, k in got.items():
            want = (0 if re.match(r"(patch_embed_\d|linear_input|cls_token)", path) else
                    int(re.match(r"blocks/block_(\d+)", path).group(1)) + 1 if path.startswith("blocks/")
                    else n)
            assert k == want, path


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_layer_decay_scales_one_step_by_the_reference_factors(name):
    """One step of plain SGD / AdamW (decoupled weight decay on): every parameter's update is the
    undecayed update times layer_decay ** (num_layers - layer id); the scanned layout gets the same
    factors along its leading axis."""
    params = vit_params()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)
    common = dict(name=name, lr=0.1, schedule="constant", weight_decay=0.05 if name == "adamw" else 0.0)
    base = optim.build(make_cfg(**common), 10)
    decayed = optim.build(make_cfg(layer_decay=0.75, **common), 10)
    plain, _ = jax.jit(base.tx.update)(grads, base.tx.init(params), params)
    scaled, _ = jax.jit(decayed.tx.update)(grads, decayed.tx.init(params), params)
    want = reference_scales(params, 0.75)
    plain, scaled = flat(plain), flat(scaled)
    assert len(set(want.values())) == VIT["depth"] + 2  # embeddings, three blocks, the rest
    for path, factor in want.items():
        np.testing.assert_allclose(scaled[path], np.float32(factor) * np.asarray(plain[path]), rtol=1e-6,
                                   err_msg=path)
        if factor == 1.0:
            np.testing.assert_array_equal(scaled[path], plain[path])

    stacked = dict(params, blocks=layers.stack_layers(params["blocks"], VIT["depth"]))
    got, _ = decayed.tx.update(dict(grads, blocks=layers.stack_layers(grads["blocks"], VIT["depth"])),
                               decayed.tx.init(stacked), stacked)
    got = dict(got, blocks=layers.unstack_layers(got["blocks"], VIT["depth"]))
    for path, value in flat(got).items():
        np.testing.assert_allclose(value, scaled[path], rtol=1e-6, err_msg=path)


def test_layer_decay_multiplies_lr_scales():
    params = vit_params()
    grads = jax.tree.map(jnp.ones_like, params)
    opt = optim.build(make_cfg(name="sgd", lr=1.0, schedule="constant", layer_decay=0.5,
                               lr_scales=(("^blocks/block_1/", 3.0),)), 10)
    got = flat(opt.tx.update(grads, opt.tx.init(params), params)[0])
    np.testing.assert_array_equal(got["blocks/block_1/mlp/fc1/kernel"], -3.0 * 0.5 ** 2)
    np.testing.assert_array_equal(got["blocks/block_0/mlp/fc1/kernel"], -(0.5 ** 3))
    np.testing.assert_array_equal(got["norm/ln/scale"], -1.0)


def test_layer_decay_off_is_the_plain_adamw_chain():
    """layer_decay=1.0 (the default) adds nothing: updates and state bit-identical to optax's own chain."""
    params = vit_params()
    cfg = dict(lr=1e-2, schedule="constant", weight_decay=0.05)
    opt = optim.build(make_cfg(layer_decay=1.0, **cfg), 10)
    mask = lambda p: jax.tree.map(lambda path: not any(re.search(x, path) for x in  # noqa: E731
                                                      optim.default_config().no_decay), optim.param_paths(p))
    ref = optax.chain(optax.scale_by_adam(0.9, 0.999, 1e-8), optax.add_decayed_weights(0.05, mask),
                      optax.scale_by_learning_rate(optax.constant_schedule(1e-2)))
    s1, s2 = opt.tx.init(params), ref.init(params)
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    p1 = p2 = params
    for step in range(3):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(step), p.shape), params)
        u1, s1 = opt.tx.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_layer_decay_bad_values_are_named():
    params = vit_params()
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="layer_decay"):
            optim.build(make_cfg(layer_decay=bad), 5)
    with pytest.raises(ValueError, match="named group"):
        optim.build(make_cfg(layer_decay=0.5, layer_decay_block=r"block_(\d+)"), 5)
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.build(make_cfg(layer_decay=0.5, layer_decay_block=r"enc/(?P<block>\d+)/"), 5).tx.init(params)
    with pytest.raises(ValueError, match="unknown key"):
        optim.build(make_cfg(layer_decay_rule="x"), 5)


# ---------------------------------------------------------------------------------------------
# stochastic depth
# ---------------------------------------------------------------------------------------------
def test_drop_path_rates_are_timms_linspace():
    for rate, depth in [(0.1, 12), (0.2, 24), (0.3, 2), (0.5, 1)]:
        np.testing.assert_allclose(layers.drop_path_rates(rate, depth), np.linspace(0, rate, depth), atol=1e-15)
    with pytest.raises(ValueError, match="drop_path_rate"):
        layers.drop_path_rates(1.0, 4)

    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, layers.EncoderBlock):
            seen[context.module.name] = context.module.drop_path
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        layers.Encoder(depth=5, heads=2, mlp_dim=8, drop_path_rate=0.2).init(jax.random.key(0), jnp.zeros((1, 3, 4)))
    assert seen == {f"block_{i}": pytest.approx(0.05 * i, abs=1e-15) for i in range(5)}


@pytest.mark.parametrize("scan", [False, True])
def test_drop_path_off_or_eval_is_bit_identical(scan):
    """drop_path_rate 0, or train=False: the same parameter tree and bit-identical outputs."""
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    off, on = ViTEncoder(**VIT, scan=scan), ViTEncoder(**VIT, scan=scan, drop_path_rate=0.3)
    p_off, p_on = off.init(jax.random.key(0), x), on.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, p_off, p_on)
    assert jax.tree.structure(p_off) == jax.tree.structure(p_on)
    ref = off.apply(p_off, x, False)
    np.testing.assert_array_equal(on.apply(p_off, x, False), ref)
    np.testing.assert_array_equal(off.apply(p_off, x, True, rngs={"dropout": jax.random.key(5)}), ref)
    assert not np.array_equal(on.apply(p_off, x, True, rngs={"dropout": jax.random.key(5)}), ref)


def test_stochastic_depth_drops_samples_at_the_rate_and_rescales():
    x = jnp.ones((4000, 3, 2), jnp.float32)
    for rate in (0.1, 0.4):
        y = np.asarray(layers.stochastic_depth(x, rate, jax.random.key(3)))
        kept = y[:, 0, 0] != 0
        assert np.all(y[~kept] == 0) and np.all(y[kept] == np.float32(1) / np.float32(1 - rate))
        assert abs((~kept).mean() - rate) < 4.5 * math.sqrt(rate * (1 - rate) / len(x))


@pytest.mark.parametrize("scan", [False, True])
def test_encoder_drops_each_blocks_branch_at_its_rate(scan):
    """Two blocks with rate 0.5: block rates (0, 0.5). The MLP branches are zeroed, so block i's
    output is h + s * attn_i(LN(h)), s per sample in {0, 1 / (1 - rate_i)}: block 0 is never dropped,
    block 1 drops about half the samples and scales the others by 2."""
    enc = layers.Encoder(depth=2, heads=2, mlp_dim=8, drop_path_rate=0.5, scan=scan)
    x = jax.random.normal(jax.random.key(0), (2000, 3, 8))
    params = meta.unbox(enc.init(jax.random.key(1), x[:1])["params"])
    zero = lambda path, a: jnp.zeros_like(a) if "mlp/fc2" in path else a  # noqa: E731
    params = jax.tree.map(zero, optim.param_paths(params), params)
    h0, ev = enc.apply({"params": params}, x, False, return_layers=(0, 1))
    t0, tr = enc.apply({"params": params}, x, True, return_layers=(0, 1), rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(t0, h0)
    branch = np.asarray(ev - h0)  # block 1's attention branch (its input h0 is the same in both)
    got = np.asarray(tr - h0)
    dropped = np.all(got == 0, axis=(1, 2))
    np.testing.assert_allclose(got[~dropped], 2 * branch[~dropped], rtol=1e-5, atol=1e-6)
    assert abs(dropped.mean() - 0.5) < 4.5 * math.sqrt(0.25 / len(x))


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix
# ---------------------------------------------------------------------------------------------
def batch(b=6, h=12, w=10, c=5, k=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, h, w, c)).astype(np.float32)
    y = np.eye(k, dtype=np.float32)[rng.integers(0, k, b)]
    return jnp.asarray(x), jnp.asarray(y)


def test_mixup_blends_with_the_reversed_batch():
    x, y = batch()
    out, t, aux = jax.jit(mixing.mix, static_argnames=("mixup_alpha", "cutmix_alpha"))(
        jax.random.key(0), x, y, mixup_alpha=0.8, cutmix_alpha=0.0)
    lam = float(aux["lam"])
    assert bool(aux["mixed"]) and not bool(aux["cutmix"]) and 0 < lam < 1
    np.testing.assert_allclose(out, lam * np.asarray(x) + (1 - lam) * np.asarray(x)[::-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t, lam * np.asarray(y) + (1 - lam) * np.asarray(y)[::-1], rtol=1e-6)
    np.testing.assert_allclose(np.sum(t, axis=1), 1.0, rtol=1e-6)


def test_cutmix_pastes_a_box_of_the_corrected_area():
    x, y = batch(h=16, w=12)
    xn = np.asarray(x)
    seen_interior = False
    for seed in range(20):
        out, t, aux = mixing.mix(jax.random.key(seed), x, y, mixup_alpha=0.0, cutmix_alpha=1.0)
        top, bottom, left, right = (int(v) for v in aux["box"])
        assert bool(aux["cutmix"]) and 0 <= top <= bottom <= 16 and 0 <= left <= right <= 12
        inside = np.zeros((16, 12), bool)
        inside[top:bottom, left:right] = True
        out = np.asarray(out)
        np.testing.assert_array_equal(out[:, inside], xn[::-1][:, inside])
        np.testing.assert_array_equal(out[:, ~inside], xn[:, ~inside])
        lam = 1 - (bottom - top) * (right - left) / (16 * 12)
        np.testing.assert_allclose(float(aux["lam"]), lam, rtol=1e-6)
        np.testing.assert_allclose(t, lam * np.asarray(y) + (1 - lam) * np.asarray(y)[::-1], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.sum(t, axis=1), 1.0, rtol=1e-6)
        seen_interior |= 0 < top and bottom < 16 and 0 < left and right < 12
    assert seen_interior


def test_cutmix_box_follows_rand_bbox():
    """timm's rand_bbox: sides int(size * sqrt(1 - lam)), centred on a uniform pixel, clipped: a box
    off the border is exactly 2 * (cut // 2) on each side, one on the border shorter."""
    h, w, lam = 20, 14, 0.6
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    full = 0
    for seed in range(200):
        (top, bottom, left, right), corrected = mixing.cutmix_box(jax.random.key(seed), jnp.float32(lam), h, w)
        top, bottom, left, right = int(top), int(bottom), int(left), int(right)
        for lo, hi, cut, size in [(top, bottom, cut_h, h), (left, right, cut_w, w)]:
            assert hi - lo <= 2 * (cut // 2)
            if 0 < lo and hi < size:
                assert hi - lo == 2 * (cut // 2)
        full += 0 < top and bottom < h and 0 < left and right < w
        np.testing.assert_allclose(float(corrected), 1 - (bottom - top) * (right - left) / (h * w), rtol=1e-6)
    # centre uniform over the pixels: P(box strictly inside) = P(cut//2 < cy < size - cut//2) per axis
    p_inside = ((h - 2 * (cut_h // 2) - 1) / h) * ((w - 2 * (cut_w // 2) - 1) / w)
    assert abs(full / 200 - p_inside) < 4.5 * math.sqrt(p_inside * (1 - p_inside) / 200)


def test_label_smoothing_and_prob_zero():
    x, y = batch(k=5)
    for seed in range(3):
        out, t, aux = mixing.mix(jax.random.key(seed), x, y, prob=0.0)
        np.testing.assert_array_equal(out, x)
        np.testing.assert_array_equal(t, y)
        assert float(aux["lam"]) == 1.0 and not bool(aux["mixed"])
    out, t, _ = mixing.mix(jax.random.key(0), x, y, prob=0.0, label_smoothing=0.1)
    off = 0.1 / 5
    np.testing.assert_allclose(t, np.where(np.asarray(y) == 1, 1 - 0.1 + off, off), rtol=1e-6)
    out, t, aux = mixing.mix(jax.random.key(1), x, y, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    lam, ys = float(aux["lam"]), np.where(np.asarray(y) == 1, 1 - 0.1 + off, off)
    np.testing.assert_allclose(t, lam * ys + (1 - lam) * ys[::-1], rtol=1e-6)
    np.testing.assert_allclose(np.sum(t, axis=1), 1.0, rtol=1e-6)


def test_mix_probabilities_and_lambda_distribution():
    """Over many batches: mixed with probability prob, CutMix with switch_prob among them, mixup's
    lambda Beta(0.8, 0.8) (mean 1/2, variance 1 / (4 (2 alpha + 1)))."""
    x, y = batch(b=2, h=8, w=8, c=1)
    n, prob, switch, alpha = 2000, 0.7, 0.3, 0.8
    f = jax.jit(jax.vmap(lambda k: mixing.mix(k, x, y, mixup_alpha=alpha, cutmix_alpha=1.0, prob=prob,
                                              switch_prob=switch)[2]))
    aux = jax.tree.map(np.asarray, f(jax.random.split(jax.random.key(0), n)))
    bound = lambda p, m: 4.5 * math.sqrt(p * (1 - p) / m)  # noqa: E731
    assert abs(aux["mixed"].mean() - prob) < bound(prob, n)
    m = aux["mixed"].sum()
    assert abs(aux["cutmix"][aux["mixed"]].mean() - switch) < bound(switch, m)
    lam = aux["lam"][aux["mixed"] & ~aux["cutmix"]]
    var = 1 / (4 * (2 * alpha + 1))
    assert abs(lam.mean() - 0.5) < 4.5 * math.sqrt(var / len(lam))
    assert abs(lam.var() - var) < 0.2 * var
    np.testing.assert_array_equal(aux["lam"][~aux["mixed"]], 1.0)


def test_mix_rejects_no_alpha():
    x, y = batch()
    with pytest.raises(ValueError, match="alpha"):
        mixing.mix(jax.random.key(0), x, y, mixup_alpha=0.0, cutmix_alpha=0.0)


# ---------------------------------------------------------------------------------------------
# random erasing
# ---------------------------------------------------------------------------------------------
def timm_erase_box(h, w, prob, min_area=0.02, max_area=1 / 3, min_aspect=0.3, rnd=random):
    """timm RandomErasing._erase (count=1) with Python's random: the box it erases, or None."""
    if rnd.random() > prob:
        return None
    log_ratio = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rnd.uniform(min_area, max_area) * h * w
        aspect_ratio = math.exp(rnd.uniform(*log_ratio))
        bh = int(round(math.sqrt(target_area * aspect_ratio)))
        bw = int(round(math.sqrt(target_area / aspect_ratio)))
        if bw < w and bh < h:
            top, left = rnd.randint(0, h - bh), rnd.randint(0, w - bw)
            return top, top + bh, left, left + bw
    return None


def test_random_erase_touches_only_its_box():
    x, _ = batch(b=64, h=16, w=12, c=13)
    out, aux = jax.jit(mixing.random_erase, static_argnames="prob")(jax.random.key(0), x, prob=0.5)
    out, xn = np.asarray(out), np.asarray(x)
    assert out.shape == xn.shape and 0 < aux["erased"].sum() < 64
    for i, ((top, bottom, left, right), erased) in enumerate(zip(np.asarray(aux["box"]), np.asarray(aux["erased"]))):
        inside = np.zeros((16, 12), bool)
        inside[top:bottom, left:right] = True
        assert inside.any() == erased
        np.testing.assert_array_equal(out[i][~inside], xn[i][~inside])
        assert np.all(out[i][inside] != xn[i][inside])
        if erased:
            assert 0 <= top < bottom < 16 + 1 and 0 <= left < right < 12 + 1
            assert bottom - top < 16 and right - left < 12
    out0, aux0 = mixing.random_erase(jax.random.key(1), x, prob=0.0)
    np.testing.assert_array_equal(out0, x)
    assert not np.asarray(aux0["erased"]).any()


def test_random_erase_matches_timms_distribution():
    """With large boxes (half to 95 % of a 6 x 10 image) all 10 attempts often fail to fit, so the
    erase rate is below prob: it, the mean box area, height and top match a simulation of timm's
    sequential attempts."""
    n, h, w, prob, area = 20000, 6, 10, 0.6, (0.5, 0.95)
    erase = jax.jit(mixing.random_erase, static_argnames=("prob", "min_area", "max_area"))
    _, aux = erase(jax.random.key(0), jnp.zeros((n, h, w, 1)), prob=prob, min_area=area[0], max_area=area[1])
    box, erased = np.asarray(aux["box"]), np.asarray(aux["erased"])
    rnd = random.Random(0)
    ref = [timm_erase_box(h, w, prob, *area, rnd=rnd) for _ in range(n)]
    ref_boxes = np.array([b for b in ref if b is not None])
    p_ref = len(ref_boxes) / n
    assert p_ref < prob - 0.05  # the fitting test matters here
    assert abs(erased.mean() - p_ref) < 4.5 * math.sqrt(2 * p_ref * (1 - p_ref) / n)
    for stat in (lambda b: (b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2]), lambda b: b[:, 1] - b[:, 0],
                 lambda b: b[:, 0]):
        a, r = stat(box[erased]).astype(float), stat(ref_boxes).astype(float)
        assert abs(a.mean() - r.mean()) < 4.5 * math.sqrt(a.var() / len(a) + r.var() / len(r))
