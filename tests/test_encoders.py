"""eojax.models.encoders: feature-map shapes at the published sizes (eval_shape only: no ViT-B is
ever materialised), and the behaviour of tiny variants against independent references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from eojax.models import layers
from eojax.models.encoders import NAMES, build
from eojax.models.encoders.base import resize_grid_embed
from eojax.models.encoders.croma import alibi_2d
from eojax.models.encoders.prithvi import sincos_3d
from eojax.mae.satmae import GroupChannelViT
from eojax.models.vit import ViTEncoder

KEY = jax.random.key(0)


def random_params(module, x, seed=0):
    """Random values at the module's parameter shapes (numpy: no RNG program to compile); norm
    scales near 1 so activations stay in range."""
    rng = np.random.default_rng(seed)
    tree = nn.unbox(jax.eval_shape(module.init, KEY, x))
    fill = lambda path, a: (1 + 0.1 * rng.standard_normal(a.shape) if "scale" in jax.tree_util.keystr(path)  # noqa: E731
                            else 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, tree)


def shapes(enc, x):
    """Output shapes of enc on x, by abstract evaluation only."""
    params = jax.eval_shape(enc.init, KEY, x)
    return [o.shape for o in jax.eval_shape(enc.apply, params, x)]


@pytest.mark.parametrize("name,kwargs,x,grid", [
    ("mae", dict(variant="base", in_channels=6), (1, 224, 224, 6), 14),
    ("satmae", dict(variant="base", image_size=96), (1, 96, 96, 10), 12),
    ("prithvi", dict(variant="base"), (1, 224, 224, 6), 14),
    ("prithvi", dict(variant="base", num_frames=3), (1, 3, 224, 224, 6), 14),
    ("dofa", dict(variant="base", input_bands=("B4", "B3", "B2"), sensor="sentinel2a"), (1, 224, 224, 3), 14),
    ("dofa", dict(variant="base", input_bands=("B2", "B3", "B4", "B8A", "B11", "B12")), (1, 224, 224, 6), 14),
    ("croma", dict(variant="base"), (1, 120, 120, 12), 15),
])
def test_published_sizes_give_default_layer_maps(name, kwargs, x, grid):
    enc = build(name, **kwargs)
    assert enc.layers == (3, 5, 7, 11) and enc.embed_dim == 768
    assert enc.patch_size == (8 if name in ("croma", "satmae") else 16)
    assert shapes(enc, jnp.zeros(x)) == [(1, grid, grid, 768)] * 4


def test_registry_and_bad_input():
    assert set(NAMES) == {"mae", "satmae", "prithvi", "dofa", "croma", "resnet", "unet"}
    assert build("prithvi").bands == ("B2", "B3", "B4", "B8A", "B11", "B12")
    assert len(build("croma").bands) == 12 and build("dofa").bands is None
    with pytest.raises(KeyError, match="unknown encoder 'vit'"):
        build("vit")
    with pytest.raises(KeyError, match="unknown prithvi variant 'giant'"):
        build("prithvi", variant="giant")
    with pytest.raises(TypeError, match="no fields \\['widht'\\]"):
        build("croma", widht=3)
    with pytest.raises(ValueError, match="layers \\(0, 4\\) must be block indices in 0..3"):
        shapes(build("croma", variant="mu", layers=(0, 4)), jnp.zeros((1, 32, 32, 12)))
    with pytest.raises(ValueError, match="images have 5 channels .* input_bands \\('B2', 'B3'\\) say 2"):
        shapes(build("prithvi", variant="mu", input_bands=("B2", "B3")), jnp.zeros((1, 32, 32, 5)))
    with pytest.raises(ValueError, match="none of the data's bands"):
        shapes(build("croma", variant="mu", input_bands=("VV",)), jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="no wavelength known for bands \\['X1'\\]"):
        shapes(build("dofa", variant="mu", input_bands=("B2", "X1")), jnp.zeros((1, 32, 32, 2)))
    with pytest.raises(ValueError, match="not divisible by patch size 8"):
        shapes(build("croma", variant="mu"), jnp.zeros((1, 36, 36, 12)))


def np_layernorm(x, scale, bias, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def test_mae_features_are_the_encoder_blocks():
    """Same params as ViTEncoder; the last map is __call__'s output; an intermediate map, put through
    the final LayerNorm, is the output of a ViTEncoder cut after that block."""
    kw = dict(image_size=32, patch_size=8, in_channels=3, width=32, depth=3, heads=2, mlp_dim=64)
    enc = build("mae", layers=(0, 2), **kw)
    x = jax.random.normal(KEY, (2, 32, 32, 3))
    params = random_params(ViTEncoder(**kw), x)
    first, last = jax.jit(enc.apply)(params, x)
    tokens = jax.jit(ViTEncoder(**kw).apply)(params, x)
    np.testing.assert_allclose(last, tokens[:, 1:].reshape(2, 4, 4, 32), atol=1e-5)
    p = params["params"]
    cut = {**p, "blocks": {"block_0": p["blocks"]["block_0"]}}
    one = jax.jit(ViTEncoder(**dict(kw, depth=1)).apply)({"params": cut}, x)
    normed = np_layernorm(np.asarray(first), p["norm"]["ln"]["scale"], p["norm"]["ln"]["bias"])
    np.testing.assert_allclose(normed, np.asarray(one[:, 1:]).reshape(2, 4, 4, 32), atol=1e-4)
    # scan stacks the blocks; the features are the same.
    scanned = build("mae", layers=(0, 2), scan=True, **kw)
    sp = {**p, "blocks": layers.stack_layers(p["blocks"], 3)}
    for a, b in zip(jax.jit(scanned.apply)({"params": sp}, x), (first, last)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_satmae_features_average_the_group_tokens():
    enc = build("satmae", variant="mu", layers=(1,))
    kw = {k: getattr(enc, k) for k in ("image_size", "patch_size", "groups", "width", "depth",
                                       "heads", "mlp_dim", "group_embed_dim")}
    x = jax.random.normal(KEY, (2, 16, 16, 10))
    params = random_params(GroupChannelViT(**kw), x)
    (fmap,) = jax.jit(enc.apply)(params, x)
    tokens = jax.jit(GroupChannelViT(**kw).apply)(params, x)[:, 1:]  # (B, G * N, D), group-major
    want = np.asarray(tokens).reshape(2, 3, 4, 4, 32).mean(axis=1)
    np.testing.assert_allclose(fmap, want, atol=1e-5)


def test_prithvi_frames_and_interpolated_positions():
    enc3 = build("prithvi", variant="mu", num_frames=3)
    x = jax.random.normal(KEY, (2, 3, 32, 32, 6))
    params = random_params(enc3, x)
    assert [o.shape for o in jax.jit(enc3.apply)(params, x)] == [(2, 4, 4, 32)] * 4
    # A 1-frame, 24 px input on the 3-frame, 32 px parameters: positions resampled to (1, 3, 3).
    assert [o.shape for o in jax.jit(enc3.apply)(params, x[:, 0, :24, :24])] == [(2, 3, 3, 32)] * 4
    pe = sincos_3d(32, 3, 4, 4)
    np.testing.assert_allclose(resize_grid_embed(pe, (3, 4, 4), (1, 4, 4)), pe[16:32], atol=1e-6)
    np.testing.assert_array_equal(resize_grid_embed(pe, (3, 4, 4), (3, 4, 4)), pe)
    const = np.full((16, 8), 0.25, np.float32)
    np.testing.assert_allclose(resize_grid_embed(const, (4, 4), (7, 5)), np.full((35, 8), 0.25), atol=1e-6)
    # Prithvi's 3D sin-cos: columns 0..6D/16 encode w, then h, then t (get_3d_sincos_pos_embed).
    t, r, c = 2, 1, 3
    row = sincos_3d(32, 3, 4, 4)[t * 16 + r * 4 + c]
    np.testing.assert_allclose(row[:12], layers.sincos_1d(12, [c])[0], atol=1e-6)
    np.testing.assert_allclose(row[12:24], layers.sincos_1d(12, [r])[0], atol=1e-6)
    np.testing.assert_allclose(row[24:], layers.sincos_1d(8, [t])[0], atol=1e-6)


def test_dofa_is_wavelength_driven():
    """The kernel is generated per band from its wavelength: reordering the bands (names and data
    alike) gives the same features with the same parameters; 3 and 6 bands share them too."""
    x = jax.random.normal(KEY, (2, 32, 32, 6))
    six = ("B2", "B3", "B4", "B8A", "B11", "B12")
    enc = build("dofa", variant="mu", input_bands=six)
    params = random_params(enc, x)
    perm = [4, 0, 5, 2, 1, 3]
    swapped = build("dofa", variant="mu", input_bands=tuple(six[i] for i in perm))
    for a, b in zip(jax.jit(enc.apply)(params, x), jax.jit(swapped.apply)(params, x[..., perm])):
        np.testing.assert_allclose(a, b, atol=2e-5)
    rgb = build("dofa", variant="mu", wavelengths=(0.665, 0.56, 0.49), feature_norm="standardise")
    maps = jax.jit(rgb.apply)(params, x[..., :3])
    assert [m.shape for m in maps] == [(2, 4, 4, 32)] * 4
    m = np.asarray(maps[0])  # per-sample standardised over (h, w, D)
    np.testing.assert_allclose(m.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(m.std(axis=(1, 2, 3)), 1, atol=1e-3)


def test_croma_alibi_bias():
    """bias[h, i, j] = -slope_h * Euclidean patch distance; ALiBi slopes 2^(-8(h+1)/H) for H = 16,
    and for 12 heads the 8-head slopes then every other 16-head slope."""
    bias = alibi_2d(16, 3, 4)
    i, j = 1 * 4 + 0, 2 * 4 + 3  # patches (1, 0) and (2, 3)
    for h in range(16):
        np.testing.assert_allclose(bias[0, h, i, j], -(2 ** (-8 * (h + 1) / 16)) * math.hypot(1, 3), rtol=1e-6)
    b12 = alibi_2d(12, 2, 2)[0, :, 0, 3] / -math.sqrt(2)
    want = [2 ** (-(h + 1)) for h in range(8)] + [2 ** (-0.5 * (2 * k + 1)) for k in range(4)]
    np.testing.assert_allclose(b12, want, rtol=1e-6)
    enc = build("croma", variant="mu")
    params = jax.eval_shape(enc.init, KEY, jnp.zeros((1, 32, 32, 12)))["params"]
    assert "norm_out" in params and "pos_embed" not in params
    assert params["blocks"]["block_0"]["attn"]["query"].keys() == {"kernel"}
