"""LoRA (eojax/lora.py) on GPT-2: the adapters' algebra, dropout on their input, and a run through the real
trainer on the 8-device mesh (only the adapters train; the checkpoint holds them; inference sees the
merged params)."""
import os

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from eojax import checkpoint as ckpt_lib
from eojax import config_lib, errors, lora, optim, tasks, train
from eojax.data import pipeline
from eojax.models import layers
from eojax.models.gpt2 import GPT2, gpt2_config

SIZES = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16)
LENGTH = 17  # tokens per row: 16 inputs, 16 labels


@pytest.fixture(scope="module")
def gpt2():
    """(params, tokens, logits(params) jitted) of a 2-layer GPT-2 (everything jitted: eager dispatch of a
    GPT-2 compiles op by op, slower than one program)."""
    model = GPT2(**gpt2_config("mu", **SIZES), dropout=0.0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, 16)), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    return params, tokens, lambda p: model.apply({"params": p}, tokens)


def randomized(adapters, seed=3):
    """Adapters with a non-zero B, as after some training."""
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), adapters)


# ---------------------------------------------------------------- the adapters on a model

def test_zero_b_leaves_the_model_unchanged(gpt2):
    params, _, logits = gpt2
    adapters = lora.init(params, jax.random.key(1), "c_attn|c_fc", rank=4)
    forward = jax.jit(logits)
    base = forward(params)
    np.testing.assert_array_equal(forward(lora.merge(params, adapters, 2.0)), base)
    # ... also through the layers' inputs, with dropout (it only scales the adapter's zero term).
    on_inputs = jax.jit(lambda ad: lora.apply_on_inputs(logits, params, ad, 2.0, 0.5, jax.random.key(2)))
    np.testing.assert_array_equal(on_inputs(adapters), base)


def test_adapters_follow_the_layers_shapes_and_count(gpt2):
    params = gpt2[0]
    rank = 4
    # The fused c_attn (embed, 3, heads, kv) is Hugging Face's (embed, 3 * embed) Conv1D; the attention's
    # c_proj (heads, kv, embed) is (embed, embed); the MLP's are plain Dense kernels. Biases are left alone.
    assert lora.targeted(params, r"c_attn|attn/c_proj|c_fc") == {
        f"h_{i}/{name}/kernel": shape for i in range(2)
        for name, shape in (("attn/c_attn", (32, 96)), ("attn/c_proj", (32, 32)), ("mlp/c_fc", (32, 128)))}
    adapters = lora.init(params, jax.random.key(0), "c_attn", rank)
    assert jax.tree.map(jnp.shape, adapters) == {
        f"h_{i}": {"attn": {"c_attn": {"kernel": {"a": (32, rank), "b": (rank, 96)}}}} for i in range(2)}
    assert lora.count(adapters) == 2 * rank * (32 + 96)
    a = np.asarray(adapters["h_0"]["attn"]["c_attn"]["kernel"]["a"])
    assert np.abs(a).max() <= 1 / np.sqrt(32) and a.std() > 0.5 / np.sqrt(3 * 32)  # PEFT's kaiming-uniform A
    assert not np.any(adapters["h_0"]["attn"]["c_attn"]["kernel"]["b"])
    # The update is A @ B * alpha / r, laid out as the kernel.
    adapters = randomized(adapters)
    ad = adapters["h_1"]["attn"]["c_attn"]["kernel"]
    merged = lora.merge(params, adapters, 0.5)["h_1"]["attn"]["c_attn"]["kernel"]
    w = params["h_1"]["attn"]["c_attn"]["kernel"]
    expected = np.asarray(w).reshape(32, 96) + 0.5 * np.asarray(ad["a"], np.float64) @ np.asarray(ad["b"], np.float64)
    np.testing.assert_allclose(np.asarray(merged).reshape(32, 96), expected, rtol=1e-6, atol=1e-7)


def test_a_pattern_that_matches_nothing_is_one_clear_line(gpt2):
    params = gpt2[0]
    with pytest.raises(errors.ConfigError) as e:
        lora.init(params, jax.random.key(0), "q_proj", 4)
    assert "\n" not in str(e.value) and "config.lora.targets='q_proj' matches no kernel" in str(e.value)
    assert errors.exit_code(e.value) == errors.USAGE


def test_kernels_whose_axes_cannot_be_told_apart_are_refused_by_name():
    params = {"block": {"proj": {"kernel": jnp.zeros((4, 8, 16))}},            # no bias
              "layers": {"fc": {"kernel": jnp.zeros((3, 8, 16)), "bias": jnp.zeros((3, 16))}}}  # scanned stack
    for target, path in (("proj", "block/proj/kernel"), ("fc", "layers/fc/kernel")):
        with pytest.raises(errors.ConfigError, match=f"cannot adapt {path}"):
            lora.init(params, jax.random.key(0), target, 2)


@pytest.mark.parametrize("key,value", [("rank", 0), ("alpha", -1.0), ("dropout", 1.0), ("targets", "(")])
def test_bad_settings_name_the_key(key, value):
    config = ml_collections.ConfigDict({"lora": dict(config_lib.lora_defaults(), targets="c_attn")})
    config.lora[key] = value
    with pytest.raises(errors.ConfigError, match=rf"config\.lora\.{key}"):
        lora.settings(config)
    assert lora.settings(ml_collections.ConfigDict({"lora": config_lib.lora_defaults()})) is None  # '' = off


def test_the_input_forward_is_the_merged_forward(gpt2):
    """Without dropout, adding x @ A @ B * s to each adapted layer's output (PEFT's forward) is the
    model with the merged kernels: same logits, same adapter gradients."""
    params, _, logits = gpt2
    adapters = randomized(lora.init(params, jax.random.key(1), "c_attn|mlp/c_proj", 4))
    merged = lambda ad: logits(lora.merge(params, ad, 2.0))  # noqa: E731
    on_inputs = lambda ad: lora.apply_on_inputs(logits, params, ad, 2.0, 0.0, jax.random.key(0))  # noqa: E731
    (_, out_m), g_m, (_, out_i), g_i = (x for f in (merged, on_inputs) for x in jax.jit(jax.value_and_grad(
        lambda ad, f=f: (jnp.mean(f(ad) ** 2), f(ad)), has_aux=True))(adapters))
    np.testing.assert_allclose(out_i, out_m, rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(g_i), jax.tree.leaves(g_m)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_dropout_drops_the_adapter_input_only():
    """A Dense layer with A = B = I and alpha = rank: the adapter's term is dropout(x) itself, so
    output - (x @ W + b) is x / (1 - p) where kept and 0 where dropped, about p of the entries."""
    d, p = 16, 0.5
    dense = nn.Dense(d)
    x = jax.random.normal(jax.random.key(0), (64, d))
    params = dense.init(jax.random.key(1), x)["params"]
    adapters = {"kernel": {"a": jnp.eye(d), "b": jnp.eye(d)}}
    forward = lambda q: dense.apply({"params": q}, x)  # noqa: E731
    term = jax.jit(lambda key: lora.apply_on_inputs(forward, params, adapters, 1.0, p, key) - forward(params))
    out = np.asarray(term(jax.random.key(2)))
    kept = np.isclose(out, np.asarray(x) / (1 - p), rtol=1e-5, atol=1e-5)
    dropped = np.abs(out) < 1e-6
    assert np.all(kept | dropped) and 0.4 < dropped.mean() < 0.6
    np.testing.assert_array_equal(term(jax.random.key(2)), out)  # the mask is a function of the key
    assert not np.array_equal(term(jax.random.key(3)), out)


def test_dropout_needs_layers_that_apply_their_kernel():
    """eojax's Attention has its query / key / value layers return their kernels (weights_only) and
    applies them stacked: dropout on their input is refused by name; merged (dropout 0) they adapt."""
    block = layers.EncoderBlock(heads=2, mlp_dim=32)
    x = jax.random.normal(jax.random.key(3), (2, 5, 16))
    params = nn.meta.unbox(jax.eval_shape(block.init, jax.random.key(0), x)["params"])
    adapters = lora.init(params, jax.random.key(1), "attn/query", 2)
    fn = lambda q: block.apply({"params": q}, x)  # noqa: E731
    with pytest.raises(errors.ConfigError, match="attn/query/kernel belongs to a HeadDense"):
        jax.eval_shape(lambda p, ad: lora.apply_on_inputs(fn, p, ad, 1.0, 0.1, jax.random.key(2)), params, adapters)
    jax.eval_shape(lambda p, ad: lora.apply(fn, p, ad, 1.0, 0.0, None), params, adapters)  # merged: any layer


# ---------------------------------------------------------------- through the trainer

class TokenRows(tasks.Input):
    """Rows counting up in steps of 3 from a random start (mod 50): a pattern a tiny GPT-2 learns."""

    def build_spec(self):
        return tasks.DataSpec(tasks.base.elements(tokens=((LENGTH,), np.int32), weight=((), np.float32)))

    def _rows(self, seed):
        start = np.random.default_rng(seed).integers(0, 50, 64)
        rows = ((start[:, None] + 3 * np.arange(LENGTH)) % 50).astype(np.int32)
        return grain.MapDataset.source([{"tokens": r} for r in rows])

    def train(self, process_index, process_count):
        return pipeline.make_iterator(self._rows(0), batch_size=self.config.batch_size // process_count,
                                      process_index=process_index, process_count=process_count,
                                      seed=self.config.seed, num_threads=1)

    def eval(self, process_index, process_count):
        return pipeline.make_iter_dataset(self._rows(1), batch_size=self.config.batch_size // process_count,
                                          process_index=process_index, process_count=process_count,
                                          shuffle=False, num_epochs=1, num_threads=1)


class TinyLM(tasks.Task):
    """Next-token prediction with a 2-layer GPT-2 (its residual dropout on: train and eval differ)."""

    name = "tiny_lm"
    input_class = TokenRows

    @property
    def model(self):
        return GPT2(**gpt2_config("mu", **SIZES), dropout=0.1)

    def init(self, rng, batch):
        return self.model.init({"params": rng}, batch["tokens"][:, :-1])

    def _ce(self, params, batch, rng, train):
        logits = self.model.apply({"params": params}, batch["tokens"][:, :-1], train=train,
                                  rngs={"dropout": rng} if train else {})
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
        return ce * batch["weight"][:, None]

    def loss_fn(self, params, state, batch, rng, train):
        ce = self._ce(params, batch, rng, train)
        return ce.sum() / jnp.maximum(batch["weight"].sum() * ce.shape[1], 1.0), {}, state

    def eval_fn(self, params, state, batch, rng):
        ce = self._ce(params, batch, rng, False)
        return {"loss_sum": ce.sum(), "count": batch["weight"].sum() * ce.shape[1]}


RANK, ALPHA = 4, 8.0


def tiny_config(**lora_settings):
    config = config_lib.trainer_defaults()
    config.update(task="tiny_lm", total_steps=3, batch_size=8, log_every=1, checkpoint_every=3, eval_steps=1,
                  progress_bar=False, mesh=(("data", -1), ("fsdp", 2), ("model", 1)))  # 4 x 2 of the 8 devices
    config.optim = optim.default_config()
    config.optim.update(lr=0.05, schedule="constant")
    config.lora.update(dict(dict(targets="c_attn", rank=RANK, alpha=ALPHA, dropout=0.05), **lora_settings))
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 LoRA steps of the tiny LM through train_and_evaluate on the 8-device mesh (fsdp 2)."""
    mp = pytest.MonkeyPatch()
    mp.setitem(tasks._TASKS, "tiny_lm", f"{__name__}:TinyLM")
    workdir = str(tmp_path_factory.mktemp("lora_run"))
    config = tiny_config()
    result = train.train_and_evaluate(config, workdir)
    run, variables = train.load_for_inference(config, workdir)
    yield dict(config=config, workdir=workdir, result=result, run=run, variables=variables,
               init=ckpt_lib.host_numpy(run.init_state()))
    mp.undo()


def test_trainer_changes_only_the_adapters(trained):
    init, state = trained["init"], trained["result"]["state"]
    assert len(jax.devices()) == 8 and trained["run"].mesh.shape == {"data": 4, "fsdp": 2, "model": 1}
    saved = ckpt_lib.read_state(os.path.join(trained["workdir"], "checkpoints", "3"))
    for tree in (ckpt_lib.host_numpy(state.params), saved["params"]):  # bit-identical base, live and saved
        jax.tree.map(np.testing.assert_array_equal, tree, init.params)
    assert int(saved["step"]) == 3 and float(saved["lora"]["scale"]) == ALPHA / RANK
    for kernel, fresh in zip(lora.by_kernel(saved["lora"]["adapters"]).values(),
                             lora.by_kernel(init.lora["adapters"]).values()):
        assert np.abs(kernel["b"]).max() > 0 and not np.allclose(kernel["a"], fresh["a"])  # both trained
    jax.tree.map(np.testing.assert_array_equal, saved["lora"]["adapters"],
                 ckpt_lib.host_numpy(state.lora["adapters"]))
    assert np.isfinite(trained["result"]["train"]["loss"]) and "loss" in trained["result"]["eval"]


def test_the_optimizer_holds_only_adapter_state(trained):
    state, run = trained["result"]["state"], trained["run"]
    adapters = state.lora["adapters"]
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
    assert len(adam) == 1 and jax.tree.structure(adam[0].mu) == jax.tree.structure(adapters)
    assert lora.count(adam[0].mu) == lora.count(adapters) == 2 * RANK * (32 + 96)  # r * (d_in + d_out) per c_attn
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) < 3 * lora.count(adapters) + 10 < n_params
    # The base is sharded over fsdp as without LoRA; the adapters and their moments are replicated.
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    for x in jax.tree.leaves((state.lora, state.opt_state)):
        assert x.sharding.is_fully_replicated
    assert run.abstract_state.lora["adapters"]["h_0"]["attn"]["c_attn"]["kernel"]["a"].shape == (32, RANK)


def test_inference_sees_the_merged_params(trained):
    """load_for_inference (eojax eval / infer / export) gives base + A @ B * alpha / r, whose forward is the
    adapted model's (each c_attn's output + its input @ A @ B * alpha / r, no dropout)."""
    run, (params, _) = trained["run"], trained["variables"]
    state = trained["result"]["state"]
    adapters, base = ckpt_lib.host_numpy(state.lora["adapters"]), ckpt_lib.host_numpy(state.params)
    expected = lora.merge(base, adapters, ALPHA / RANK)
    for x, y in zip(jax.tree.leaves(ckpt_lib.host_numpy(params)), jax.tree.leaves(expected)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    assert not np.allclose(params["h_0"]["attn"]["c_attn"]["kernel"], base["h_0"]["attn"]["c_attn"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, params, ckpt_lib.host_numpy(train.eval_variables(run, state)[0]))
    tokens = jnp.asarray(np.arange(32).reshape(2, 16) % 50, jnp.int32)
    logits = lambda p: run.task.model.apply({"params": p}, tokens)  # noqa: E731
    served = jax.jit(logits)(ckpt_lib.host_numpy(params))
    adapted = jax.jit(lambda ad: lora.apply_on_inputs(logits, base, ad, ALPHA / RANK, 0.0, jax.random.key(0)))(adapters)
    np.testing.assert_allclose(served, adapted, rtol=1e-5, atol=1e-5)


def test_resuming_with_another_alpha_is_refused(trained):
    config = tiny_config(alpha=2 * ALPHA)
    run = train.setup(config, spec=train.saved_spec(trained["workdir"]))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(trained["workdir"], "checkpoints"))
    try:
        with pytest.raises(errors.CheckpointError, match="alpha / rank = 2; config.lora gives 4"):
            train.restore_or_init(run, checkpointer)
    finally:
        checkpointer.close()


def test_setup_names_a_pattern_that_matches_nothing(trained):
    with pytest.raises(errors.ConfigError, match="config.lora.targets='c_atn' matches no kernel"):
        train.setup(tiny_config(targets="c_atn"), spec=train.saved_spec(trained["workdir"]))


@pytest.mark.slow
def test_ema_and_accumulation_export_the_merged_average(tmp_path, monkeypatch):
    """optim.ema_decay keeps an EMA of the adapters (the optimizer's tree): eval, load_for_inference and a
    whole-run read (load_variables(path, None), as export_encoder / FID / init_from) give the base with the
    averaged adapters merged; dropout 0 trains through the merged kernels, with 2 micro-batches."""
    monkeypatch.setitem(tasks._TASKS, "tiny_lm", f"{__name__}:TinyLM")
    config = tiny_config(dropout=0.0)
    config.optim.update(ema_decay=0.5, accum_steps=2)
    config.batch_size = 16
    result = train.train_and_evaluate(config, str(tmp_path))
    state = result["state"]
    run, (params, _) = train.load_for_inference(config, str(tmp_path))
    ema = state.opt_state.ema
    assert jax.tree.structure(ema) == jax.tree.structure(state.lora["adapters"])
    expected = lora.merge(ckpt_lib.host_numpy(state.params), ckpt_lib.host_numpy(ema), ALPHA / RANK)
    live = lora.merge(ckpt_lib.host_numpy(state.params), ckpt_lib.host_numpy(state.lora["adapters"]), ALPHA / RANK)
    whole, _ = ckpt_lib.load_variables(str(tmp_path), None)
    for got in (ckpt_lib.host_numpy(params), whole, ckpt_lib.host_numpy(train.eval_variables(run, state)[0])):
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    kernel = lambda p: np.asarray(p["h_0"]["attn"]["c_attn"]["kernel"])  # noqa: E731
    assert not np.allclose(kernel(expected), kernel(live))
