"""Model state in the spine: BatchNorm statistics are trained, sharded, checkpointed, averaged into the
EMA and used in eval; under a sharded batch they are global over the batch (SyncBatchNorm)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eojax import checkpoint as ckpt_lib
from eojax import train
from eojax.seg import data as segdata
from eojax.seg.decoders.blocks import Norm
from helpers import max_diff, run_steps
from test_seg import tiny_config

EIGHT = (("data", 8), ("fsdp", 1), ("model", 1))


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    return segdata.synthetic_burnscars(tmp_path_factory.mktemp("burnscars"), size=64, n_train=10, n_test=4)


def bn_config(chips, **overrides):
    """A fine-tuned UperNet with BatchNorm in its neck and decoder, batch 8."""
    return tiny_config(chips, decoder="upernet", mode="finetune", **{"batch_size": 8, **overrides})


def test_batch_norm_matches_numpy_and_updates_statistics_as_torch():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(4, 5, 6, 3)).astype(np.float32)
    norm = Norm("batch")
    variables = norm.init(jax.random.key(0), x)
    y, updated = norm.apply(variables, x, train=True, mutable=["batch_stats"])
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    stats = updated["batch_stats"]["bn"]
    np.testing.assert_allclose(stats["mean"], 0.1 * mean, rtol=1e-5)  # torch momentum 0.1
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * var, rtol=1e-5)
    # Eval uses the running statistics, not the batch's.
    y_eval = norm.apply({**variables, "batch_stats": updated["batch_stats"]}, x, train=False)
    np.testing.assert_allclose(y_eval, (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * var + 1e-5), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_statistics_are_global_over_the_sharded_batch(chips):
    """1 device == 8 devices (one row each): per-device statistics would differ."""
    _, one, _ = run_steps(bn_config(chips), jax.devices()[:1], n=2)
    _, eight, _ = run_steps(bn_config(chips, mesh=EIGHT), jax.devices(), n=2)
    assert jax.tree.leaves(eight.model_state), "the UperNet has BatchNorm statistics"
    stats_one, stats_eight = ckpt_lib.host_numpy(one.model_state), ckpt_lib.host_numpy(eight.model_state)
    assert max_diff(stats_one, stats_eight) < 1e-5
    # Every parameter agrees except the attention key bias: its gradient is zero in exact arithmetic
    # (softmax ignores a shift shared by all keys), so Adam turns rounding noise into updates there.
    flat_one = jax.tree_util.tree_flatten_with_path(ckpt_lib.host_numpy(one.params))[0]
    for (path, a), b in zip(flat_one, jax.tree.leaves(ckpt_lib.host_numpy(eight.params))):
        if "key" not in jax.tree_util.keystr(path):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    # The statistics moved away from their init (mean 0, var 1).
    means = [v for p, v in jax.tree_util.tree_flatten_with_path(stats_eight)[0] if "mean" in str(p[-1])]
    assert max(float(np.abs(m).max()) for m in means) > 1e-3


@pytest.mark.slow
def test_resume_with_batch_norm_is_bit_identical(chips, tmp_path):
    config = bn_config(chips, mesh=EIGHT)
    run = train.setup(config)
    state = run.init_state()
    for _ in range(2):
        state, _ = run.train_step(state, run.next_batch())
    saver = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    saver.save(2, state, run.train_iter, force=True)
    saver.close()
    for _ in range(2):
        state, _ = run.train_step(state, run.next_batch())
    straight = ckpt_lib.host_numpy(state)

    again = train.setup(config)
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    resumed = train.restore_or_init(again, checkpointer)
    checkpointer.close()
    assert int(resumed.step) == 2
    for _ in range(2):
        resumed, _ = again.train_step(resumed, again.next_batch())
    for a, b in zip(jax.tree.leaves(ckpt_lib.host_numpy(resumed)), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)


def test_ema_averages_the_statistics_and_eval_uses_them(chips):
    config = bn_config(chips, mesh=EIGHT, **{"optim.ema_decay": 0.9})
    config.input.eval_batch_size = 8
    run = train.setup(config)
    state = run.init_state()
    ema = ckpt_lib.host_numpy(state.model_state)
    for n in range(3):
        state, _ = run.train_step(state, run.next_batch())
        d = min(0.9, (1 + n) / (10 + n))  # the parameters' EMA warm-up (optim)
        ema = jax.tree.map(lambda e, s: e + (1 - d) * (s - e), ema, ckpt_lib.host_numpy(state.model_state))
    assert max_diff(ckpt_lib.host_numpy(state.ema_model_state), ema) < 1e-6
    assert max_diff(ema, ckpt_lib.host_numpy(state.model_state)) > 1e-4  # averaged, not the live stats
    params, model_state = train.eval_variables(run, state)
    assert model_state is state.ema_model_state and params is state.opt_state.ema
    batch = run.global_batch(next(iter(run.input.eval(0, 1))))
    with_ema = jax.device_get(run.eval_step(params, model_state, batch))
    with_live = jax.device_get(run.eval_step(params, state.model_state, batch))
    assert float(with_ema["loss_sum"]) != float(with_live["loss_sum"])


def test_layer_norm_option_has_no_model_state(chips):
    run = train.setup(bn_config(chips, **{"model.norm": "layer"}), devices=jax.devices()[:1])
    assert jax.tree.leaves(run.abstract_state.model_state) == []
    with pytest.raises(ValueError, match="model.norm='group'"):
        Norm("group").init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))
