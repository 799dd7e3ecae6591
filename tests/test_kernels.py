"""layers.kernels: the XLA:CPU-tuned custom VJPs ('xla_cpu') against plain jax/flax autodiff ('plain').

Each kernel, and a whole MAE, must give the same values and gradients under both modes (float32
tolerance; bf16 inputs to bf16 precision), the same parameter tree, and really switch: the traced
program holds a custom_vjp_call under 'xla_cpu' and none under 'plain'."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eojax import config_lib
from eojax.mae.model import MAE, mae_config, mae_loss, permute_tokens, random_masking
from eojax.models import layers

MODES = ("xla_cpu", "plain")


def _tol(dtype, bf16=1e-2):
    """float32: 1e-5; bf16: about one or two bf16 ulps (2^-8 relative)."""
    return 1e-5 if dtype == jnp.float32 else bf16


def _normal(seed, shape, dtype=jnp.float32, scale=1.0, offset=0.0):
    return (offset + scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _under(mode, fn, *args):
    """fn's output, its vjp of a fixed random cotangent, and the forward jaxpr, traced under `mode`."""
    with layers.kernels(mode):
        out, vjp = jax.vjp(fn, *args)
        jaxpr = str(jax.make_jaxpr(fn)(*args))
    g = _normal(99, out.shape, out.dtype)
    return out, vjp(g), jaxpr


def _assert_modes_agree(fn, *args, tol=1e-5):
    (out, grads, tuned), (ref, ref_grads, plain) = (_under(m, fn, *args) for m in MODES)
    assert "custom_vjp_call" in tuned and "custom_vjp_call" not in plain
    for a, b in zip(*(jax.tree.leaves(nn.unbox(t)) for t in ((out, grads), (ref, ref_grads)))):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# the switch
# ---------------------------------------------------------------------------------------------
def test_auto_resolves_by_platform_and_contexts_nest():
    default = "xla_cpu" if jax.default_backend() == "cpu" else "plain"
    assert layers.KERNELS == ("auto", "xla_cpu", "plain")
    assert layers.active_kernels() == default
    with layers.kernels("auto", "cpu"):
        assert layers.active_kernels() == "xla_cpu"
        with layers.kernels("auto", "gpu"):
            assert layers.active_kernels() == "plain"
            with layers.kernels("xla_cpu", "tpu"):  # an explicit mode ignores the platform
                assert layers.active_kernels() == "xla_cpu"
            assert layers.active_kernels() == "plain"
        with layers.kernels("auto", "tpu"):
            assert layers.active_kernels() == "plain"
        with layers.kernels("plain", "cpu"):
            assert layers.active_kernels() == "plain"
    with layers.kernels("auto"):
        assert layers.active_kernels() == default
    with pytest.raises(RuntimeError), layers.kernels("plain"):
        raise RuntimeError  # an error inside the block still restores the setting
    assert layers.active_kernels() == default


def test_bad_mode_is_named_and_config_default_is_auto():
    bad = r"config.kernels='foo' is not one of \('auto', 'xla_cpu', 'plain'\)"
    with pytest.raises(ValueError, match=bad), layers.kernels("foo"):
        pass
    assert config_lib.trainer_defaults().kernels == "auto"


def test_one_jitted_function_is_traced_again_under_another_mode():
    f, x = jax.jit(layers.softmax), _normal(0, (4, 9))
    traced = {}
    for mode in MODES + ("xla_cpu",):
        with layers.kernels(mode):
            traced[mode] = str(f.trace(x).jaxpr)
            f(x)
    assert "custom_vjp_call" in traced["xla_cpu"] and "custom_vjp_call" not in traced["plain"]


# ---------------------------------------------------------------------------------------------
# each kernel: same values and gradients, custom VJP only under 'xla_cpu'
# ---------------------------------------------------------------------------------------------
def test_layer_norm():
    x = _normal(0, (2, 5, 16), scale=2.0, offset=3.0)  # an offset mean, as a residual stream has
    scale, bias = _normal(1, (16,), scale=0.1, offset=1.0), _normal(2, (16,), scale=0.1)
    _assert_modes_agree(lambda *a: layers.layer_norm(*a, 1e-6), x, scale, bias)
    # and against flax's nn.LayerNorm: the 'plain' set is its math
    with layers.kernels("plain"):
        ours = layers.LayerNorm(epsilon=1e-6).apply({"params": {"ln": {"scale": scale, "bias": bias}}}, x)
    ref = nn.LayerNorm(epsilon=1e-6).apply({"params": {"scale": scale, "bias": bias}}, x)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_norm_module(dtype):
    x = _normal(0, (2, 5, 16), dtype, scale=2.0, offset=3.0)
    module = layers.LayerNorm(dtype=dtype)
    params = module.init(jax.random.key(1), x)
    _assert_modes_agree(lambda p, x: module.apply(p, x), params, x, tol=_tol(dtype))


@pytest.mark.parametrize("x_shape,k_shape,n_in", [((3, 7, 12), (12, 5), 1), ((3, 7, 12), (12, 2, 6), 1),
                                                  ((2, 5, 3, 4), (3, 4, 12), 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear(x_shape, k_shape, n_in, dtype):
    x, kernel = _normal(0, x_shape, dtype), _normal(1, k_shape, dtype, scale=0.3)
    _assert_modes_agree(lambda x, k: layers.linear(x, k, n_in), x, kernel, tol=_tol(dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_softmax(dtype):
    x = _normal(0, (4, 3, 9), dtype, scale=3.0)
    _assert_modes_agree(layers.softmax, x, tol=_tol(dtype))


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention(with_bias, dtype):
    q = _normal(0, (2, 7, 3, 8), dtype)
    k, v = _normal(1, (2, 9, 3, 8), dtype), _normal(2, (2, 9, 3, 8), dtype)
    bias = _normal(3, (1, 3, 7, 9), dtype, scale=2.0) if with_bias else None
    args = (q, k, v) + ((bias,) if with_bias else ())  # a broadcast bias, differentiated too
    _assert_modes_agree(layers.dot_product_attention, *args, tol=_tol(dtype, bf16=2e-2))
    with layers.kernels("plain"):  # 'plain' is jax.nn's XLA attention itself
        np.testing.assert_array_equal(layers.dot_product_attention(q, k, v, bias),
                                      jax.nn.dot_product_attention(q, k, v, bias=bias))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_permute_tokens(dtype):
    _, _, perm = random_masking(jax.random.key(7), 3, 10, 0.5)
    _assert_modes_agree(lambda x: permute_tokens(x, perm), _normal(8, (3, 10, 4), dtype), tol=0)


# ---------------------------------------------------------------------------------------------
# a whole model
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_mae_same_params_loss_and_gradients(scan):
    model = MAE(**mae_config("mu", image_size=16, patch_size=4, in_channels=3), scan=scan)
    images = _normal(0, (2, 16, 16, 3))
    valid = jnp.ones((2, 16, 16), bool).at[0, :5].set(False)
    rngs = {"params": jax.random.key(1), "mask": jax.random.key(2)}

    def loss(params):
        out = model.apply(params, images, rngs={"mask": rngs["mask"]})
        return mae_loss(out["pred"], images, valid, out["mask"], 4, norm_pix_loss=True)[0]

    results = {}
    for mode in MODES:
        with layers.kernels(mode):
            # Jitted (eager dispatch compiled every op on its own: ~50 s); fresh lambdas per mode, since the
            # kernel mode is a trace-time setting that jit's cache does not see.
            params = jax.jit(lambda r, x: model.init(r, x))(rngs, images)
            jaxpr = str(jax.make_jaxpr(loss)(params))
            results[mode] = params, jaxpr.count("custom_vjp_call"), *jax.jit(
                lambda p: jax.value_and_grad(loss)(p))(params)
    (params, n_tuned, value, grads), (ref_params, n_plain, ref_value, ref_grads) = results.values()
    # identical parameter trees: names, boxes (logical axes), shapes, dtypes and values
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    # custom VJPs under 'xla_cpu', none left under 'plain'
    assert n_tuned > 0 and n_plain == 0
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    jax.tree_util.tree_map_with_path(lambda path, a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)), nn.unbox(grads), nn.unbox(ref_grads))
