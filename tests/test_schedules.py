"""optim.schedule='cosine_restarts' against Hugging Face's formula, written out here in plain Python."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eojax import optim


def hf_cosine_with_hard_restarts(step, lr, warmup, total, num_cycles):
    """transformers' get_cosine_with_hard_restarts_schedule_with_warmup (its lr_lambda times lr)."""
    if step < warmup:
        return lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def build(total, **kw):
    cfg = optim.default_config()
    cfg.update(schedule="cosine_restarts", **kw)
    return optim.build(cfg, total)


@pytest.mark.parametrize("lr,warmup,total,cycles", [
    (1e-3, 10, 110, 4),   # cycles of 25 steps: restarts at 35, 60, 85
    (0.5, 0, 90, 3),      # no warmup; cycles of 30 steps
    (2.0, 7, 57, 1),      # one cycle: plain cosine
    (1.0, 5, 22, 3),      # 17 steps over 3 cycles: restarts between steps
])
def test_matches_hugging_face(lr, warmup, total, cycles):
    opt = build(total, lr=lr, warmup_steps=warmup, num_cycles=cycles)
    steps = np.arange(0, total + 15)
    ours = np.array([float(opt.schedule(int(s))) for s in steps])
    ref = np.array([hf_cosine_with_hard_restarts(int(s), lr, warmup, total, cycles) for s in steps])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7 * lr)


def test_cycle_boundaries_restart_at_the_peak():
    lr, warmup, total, cycles = 1e-3, 10, 110, 4
    opt = build(total, lr=lr, warmup_steps=warmup, num_cycles=cycles)
    span = (total - warmup) // cycles
    for k in range(cycles):
        start = warmup + k * span
        assert float(opt.schedule(start)) == pytest.approx(lr, rel=1e-6), start   # each cycle starts at lr
        ref = hf_cosine_with_hard_restarts(start - 1, lr, warmup, total, cycles)
        assert float(opt.schedule(start - 1)) == pytest.approx(ref, rel=1e-5, abs=1e-12)
        if k:
            assert float(opt.schedule(start - 1)) < 0.01 * lr          # ... right after the previous ended
        mid = start + span // 2 + (span % 2) * 0.5
        assert float(opt.schedule(mid)) == pytest.approx(lr / 2, rel=1e-5)
    assert float(opt.schedule(total)) == 0.0 and float(opt.schedule(total + 100)) == 0.0


def test_restarts_are_exact_where_the_float_formula_rounds():
    """HF's (n * p) % 1 is 0.999... at step 15 of 22 cycles over 22 steps (a restart), so its lr is ~0
    there and restarts one step late; the schedule computes the cycle position exactly."""
    assert hf_cosine_with_hard_restarts(15, 1.0, 0, 22, 22) < 1e-6
    opt = build(22, lr=1.0, warmup_steps=0, num_cycles=22)
    assert [float(opt.schedule(s)) for s in range(22)] == [1.0] * 22
    assert float(opt.schedule(22)) == 0.0
    # Large step counts too: 7 cycles over 3.5M steps restart on their steps.
    opt = build(3_500_000, lr=1.0, warmup_steps=0, num_cycles=7)
    for k in range(1, 7):
        assert float(opt.schedule(k * 500_000)) == 1.0
        assert float(opt.schedule(k * 500_000 - 1)) < 1e-10


def test_one_cycle_is_cosine_and_end_lr_factor_is_the_floor():
    kw = dict(lr=0.3, warmup_steps=4, end_lr_factor=0.1)
    restarts, cosine = build(40, num_cycles=1, **kw), optim.build(
        ml_collections.ConfigDict(dict(schedule="cosine", **kw)), 40)
    for s in range(0, 50):
        assert float(restarts.schedule(s)) == pytest.approx(float(cosine.schedule(s)), rel=1e-5, abs=1e-8)
    # With end_lr_factor each cycle decays to lr * end_lr_factor (HF's formula rescaled), held after the end.
    opt = build(44, num_cycles=2, **kw)
    end = 0.3 * 0.1
    for s in range(4, 60):
        hf = hf_cosine_with_hard_restarts(s, 1.0, 4, 44, 2)
        expected = end if s >= 44 else end + (0.3 - end) * hf
        assert float(opt.schedule(s)) == pytest.approx(expected, rel=1e-5), s


def test_jit_and_optimizer_use_it():
    opt = build(50, lr=0.1, warmup_steps=5, num_cycles=3)
    steps = jnp.arange(60)
    jitted = jax.jit(jax.vmap(opt.schedule))(steps)
    np.testing.assert_allclose(np.asarray(jitted), [float(opt.schedule(int(s))) for s in steps], rtol=1e-5,
                               atol=1e-9)
    # The optimizer's own count drives it: SGD's update is -lr(step) * grad.
    params = {"w": jnp.zeros(())}
    sgd = optim.build(ml_collections.ConfigDict(dict(name="sgd", schedule="cosine_restarts", lr=0.1,
                                                     warmup_steps=5, num_cycles=3)), 50)
    state = sgd.tx.init(params)
    update = jax.jit(sgd.tx.update)
    for s in range(25):
        u, state = update({"w": jnp.ones(())}, state, params)
        assert float(u["w"]) == pytest.approx(-hf_cosine_with_hard_restarts(s, 0.1, 5, 50, 3), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("value", [0, -2, 1.5, "3"])
def test_bad_num_cycles_names_the_key(value):
    with pytest.raises(ValueError, match=r"optim\.num_cycles"):
        optim.build(ml_collections.ConfigDict(dict(schedule="cosine_restarts", num_cycles=value)), 100)
