"""GPT-2: parity with transformers (stored fixture), HF import/export, KV-cache generation against full
recomputation, constrained decoding, per-row stopping, sharding and the local tokenizer.

The fixture (tests/fixtures/gpt2_tiny + gpt2_tiny_logits.npz) was written once by
scripts/fixtures/make_gpt2_fixture.py with torch + transformers; these tests need neither.
"""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from eojax.checkpoint import CheckpointMismatchError
from eojax.config_lib import DEFAULT_RULES
from eojax.vsat import generate as gen
from eojax.models.gpt2 import GPT2, flops_per_sequence, gpt2_config, num_params
from eojax.parallel.sharding import logical_shardings
from eojax.weights import gpt2 as weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = os.path.join(FIXTURES, "gpt2_tiny")


@pytest.fixture(scope="module")
def tiny():
    model, params = weights.load_pretrained(TINY)
    return model, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def fixture_batch():
    with np.load(os.path.join(FIXTURES, "gpt2_tiny_logits.npz")) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def forward(tiny):
    model, _ = tiny
    return jax.jit(lambda p, ids, mask: model.apply({"params": p}, ids, attention_mask=mask))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(1)
    return gen.left_pad([list(rng.integers(1, 300, n)) for n in (5, 9, 1, 7)])


@pytest.fixture(scope="module")
def greedy(tiny, prompts):
    """Ten greedy tokens per row with their logits; the compiled generator is reused by later tests
    (stop tokens are an argument, not a compile-time setting)."""
    model, params = tiny
    return gen.generate(model, params, *prompts, max_new_tokens=10, return_logits=True)


# ---------------------------------------------------------------------------------------------
# parity with transformers, import / export
# ---------------------------------------------------------------------------------------------
def test_logits_match_transformers(tiny, forward, fixture_batch):
    _, params = tiny
    ids, mask, want = fixture_batch["input_ids"], fixture_batch["attention_mask"], fixture_batch["logits"]
    got = np.asarray(forward(params, ids, mask))
    real = mask.astype(bool)  # padded positions are garbage in both and never used
    assert got.shape == want.shape and np.abs(want).max() > 1.0  # the fixture's logits are not flat
    assert np.abs(got - want)[real].max() < 1e-4
    # Row 1 is row 0's first 8 tokens left-padded, row 2 its first 9 right-padded: the same logits.
    np.testing.assert_allclose(got[1, 4:], got[0, :8], atol=1e-5)
    np.testing.assert_allclose(got[2, :9], got[0, :9], atol=1e-5)


def test_export_round_trip_is_exact(tiny, tmp_path):
    model, params = tiny
    weights.export(params, model, tmp_path / "out")
    # Byte-for-byte the arrays transformers saved (same keys, same layout), and its config sizes.
    np.testing.assert_equal(load_file(str(tmp_path / "out" / "model.safetensors")),
                            load_file(os.path.join(TINY, "model.safetensors")))
    assert weights.load_config(tmp_path / "out") == weights.load_config(TINY)
    model2, params2 = weights.load_pretrained(tmp_path / "out")
    assert model2 == model
    jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_import_accepts_hub_layout(tiny, tmp_path):
    # The hub's gpt2 / distilgpt2 files: no 'transformer.' prefix, causal-mask buffers, a tied lm_head.
    d = tmp_path / "hub"
    shutil.copytree(TINY, d)
    sd = {k.removeprefix("transformer."): v for k, v in load_file(str(d / "model.safetensors")).items()}
    sd["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    sd["lm_head.weight"] = sd["wte.weight"].astype(np.float16).astype(np.float32)
    sd["wte.weight"] = sd["lm_head.weight"]
    save_file(sd, str(d / "model.safetensors"))
    params = weights.load_params(d)
    np.testing.assert_array_equal(params["wte"]["embedding"], sd["wte.weight"])
    np.testing.assert_array_equal(params["h_1"]["mlp"]["c_proj"]["kernel"], sd["h.1.mlp.c_proj.weight"])


def _edit_checkpoint(tmp_path, edit_sd=None, edit_config=None):
    d = tmp_path / "bad"
    shutil.copytree(TINY, d)
    if edit_sd:
        sd = load_file(str(d / "model.safetensors"))
        edit_sd(sd)
        save_file(sd, str(d / "model.safetensors"))
    if edit_config:
        cfg = json.loads((d / "config.json").read_text())
        edit_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("case,error,match", [
    ("missing_key", CheckpointMismatchError, r"missing in checkpoint: h\.1\.mlp\.c_fc\.bias"),
    ("shape", CheckpointMismatchError, r"shape of wpe\.weight: checkpoint \(32, 64\)"),
    ("untied", CheckpointMismatchError, "lm_head.weight differs"),
    ("activation", ValueError, "activation_function='relu'"),
    ("no_weights", FileNotFoundError, "model.safetensors"),
    ("corrupt", ValueError, "not a readable safetensors"),
])
def test_import_errors_name_the_fault(tmp_path, case, error, match):
    edits = {
        "missing_key": dict(edit_sd=lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias")),
        "shape": dict(edit_sd=lambda sd: sd.update({"transformer.wpe.weight": sd["transformer.wpe.weight"][:32]})),
        "untied": dict(edit_sd=lambda sd: sd.update({"lm_head.weight": sd["transformer.wte.weight"] + 1})),
        "activation": dict(edit_config=lambda c: c.update(activation_function="relu")),
    }.get(case, {})
    d = _edit_checkpoint(tmp_path, **edits)
    if case == "no_weights":
        os.remove(d / "model.safetensors")
    if case == "corrupt":
        (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(error, match=match):
        weights.load_pretrained(d)


def test_bf16_compute_and_dropout(tiny, forward, fixture_batch):
    model, params = tiny
    ids, mask = fixture_batch["input_ids"], fixture_batch["attention_mask"]
    want = np.asarray(forward(params, ids, mask))
    half = GPT2(**{**{k: getattr(model, k) for k in GPT2.__dataclass_fields__ if k not in ("parent", "name")},
                   "dtype": jnp.bfloat16})
    got = jax.jit(lambda p: half.apply({"params": p}, ids, attention_mask=mask))(params)
    assert got.dtype == jnp.float32  # logits stay float32
    err = np.abs(np.asarray(got) - want)[mask.astype(bool)].max()
    assert 0 < err < 0.1 * np.abs(want).max()  # really computed in bf16, and close
    # Dropout only with train=True, and reproducible from its rng.
    train = jax.jit(lambda p, rng: model.apply({"params": p}, ids, train=True, attention_mask=mask,
                                               rngs={"dropout": rng}))
    drop = lambda seed: np.asarray(train(params, jax.random.key(seed)))
    assert np.abs(drop(0) - want).max() > 1e-2
    np.testing.assert_array_equal(drop(0), drop(0))


def test_import_refuses_a_model_of_other_sizes():
    with pytest.raises(CheckpointMismatchError, match="n_layer"):
        weights.load_params(TINY, GPT2(**gpt2_config("mu", n_layer=3)))


def test_param_count_and_flops_from_shapes(tiny):
    model, params = tiny
    cfg = {k: getattr(model, k) for k in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions", "n_inner")}
    assert num_params(cfg) == sum(x.size for x in jax.tree.leaves(params))
    # distilgpt2: 81.9M parameters with its embeddings (its model card says 82M).
    assert abs(num_params(gpt2_config("distilgpt2", vocab_size=50257)) / 1e6 - 81.9) < 0.1
    d, n, v, t = 64, 2, 300, 10
    blocks = n * (2 * t * (4 * d * d + 2 * d * 4 * d) + 4 * t * t * d)
    assert flops_per_sequence(cfg, t, training=False) == blocks + 2 * t * d * v


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------
def _recompute(model, params, prompts, lengths, tokens, n):
    """Logits of the full padded sequence prompt + generated tokens, no cache, at the positions
    that predicted each generated token."""
    b, p = prompts.shape
    full = np.concatenate([prompts, tokens], axis=1)
    mask = np.concatenate([np.arange(p)[None] >= (p - lengths)[:, None],
                           np.arange(tokens.shape[1])[None] < n[:, None]], axis=1)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(full), attention_mask=jnp.asarray(mask)))
    return logits[:, p - 1:p - 1 + tokens.shape[1]]


def test_kv_cache_generation_equals_full_recomputation(tiny, prompts, greedy):
    model, params = tiny
    tokens, lengths = prompts
    out = greedy
    got = np.asarray(out.tokens)
    assert (np.asarray(out.lengths) == 10).all() and not np.asarray(out.finished).any()
    want = _recompute(model, params, tokens, lengths, got, np.asarray(out.lengths))
    np.testing.assert_allclose(np.asarray(out.logits), want, atol=1e-4)
    np.testing.assert_array_equal(got, want.argmax(-1))


@pytest.mark.slow
def test_packed_prefill_equals_the_padded_grid(tiny, prompts):
    """Packing the prompts' real tokens (no projection/MLP work on padding) changes nothing a later
    step can see: the same last-token logits and the same cache on every valid slot."""
    model, params = tiny
    tokens, lengths = prompts
    n = gen.packed_length(lengths, tokens.shape[1])
    assert n is not None and lengths.sum() <= n < tokens.size
    mask = jnp.asarray(np.arange(tokens.shape[1])[None] >= (tokens.shape[1] - lengths)[:, None])
    run = lambda packed: model.apply({"params": params}, jnp.asarray(tokens), model.init_cache(len(tokens), 12),
                                     token_mask=mask, last_only=True, packed_length=packed, method=GPT2.decode)
    (want, want_cache), (got, got_cache) = run(None), run(n)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    valid = np.asarray(want_cache["mask"])
    np.testing.assert_array_equal(np.asarray(got_cache["mask"]), valid)
    for a, b in zip(jax.tree.leaves(got_cache["layers"]), jax.tree.leaves(want_cache["layers"])):
        np.testing.assert_allclose(np.asarray(a).transpose(0, 2, 1, 3)[valid],
                                   np.asarray(b).transpose(0, 2, 1, 3)[valid], atol=1e-5)
    assert gen.packed_length(np.full(4, 9), 9) is None  # nothing to save


def test_stops_per_row_and_pads_after(tiny, prompts, greedy):
    model, params = tiny
    tokens, lengths = prompts
    free = np.asarray(greedy.tokens)
    stop = int(free[0, 3])  # row 0 emits it at step 3 (or earlier); other rows maybe never
    out = gen.generate(model, params, tokens, lengths, max_new_tokens=10, stop_tokens=(stop,), pad_id=0,
                       return_logits=True)
    got, n, done = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.finished)
    for row in range(len(free)):
        hits = np.flatnonzero(free[row] == stop)
        if hits.size:
            k = hits[0] + 1
            assert done[row] and n[row] == k
            np.testing.assert_array_equal(got[row, :k], free[row, :k])  # the stop token included
            assert (got[row, k:] == 0).all()
        else:
            assert not done[row] and n[row] == 10
            np.testing.assert_array_equal(got[row], free[row])
    assert done[0] and n[0] <= 4


def test_sampling_is_deterministic_from_the_key(tiny, prompts):
    model, params = tiny
    tokens, lengths = prompts
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=20)
    a = np.asarray(gen.generate(model, params, tokens, lengths, jax.random.key(3), **kw).tokens)
    b = np.asarray(gen.generate(model, params, tokens, lengths, jax.random.key(3), **kw).tokens)
    c = np.asarray(gen.generate(model, params, tokens, lengths, jax.random.key(4), **kw).tokens)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    # Sampled tokens lie in the top 20 of the recomputed logits.
    ref = _recompute(model, params, tokens, lengths, a, np.full(len(a), 8))
    rank = (ref > np.take_along_axis(ref, a[..., None], -1)).sum(-1)
    assert rank.max() < 20


def _random_fsm(rng, states=6, vocab=300, final=5, per_state=12):
    """A random machine; state `final` allows nothing (the row stops there)."""
    allowed = np.zeros((states, vocab), bool)
    for s in range(states):
        if s != final:
            allowed[s, rng.choice(vocab, per_state, replace=False)] = True
    next_state = rng.integers(0, states, (states, vocab)).astype(np.int32)
    return gen.Constraint(allowed, next_state)


def _replay(fsm, start, tokens, n):
    """Walks each row's emitted tokens through the machine on the host: every token must be allowed
    in the state it was emitted in. Returns the final states."""
    states = []
    for row, s in enumerate(start):
        for tok in tokens[row, :n[row]]:
            assert fsm.allowed[s, tok], f"row {row}: token {tok} emitted in state {s}, which forbids it"
            s = fsm.next_state[s, tok]
        states.append(s)
    return np.array(states)


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_constrained_decoding_follows_the_fsm(tiny, prompts, temperature):
    model, params = tiny
    tokens, lengths = prompts
    rng = np.random.default_rng(7)
    fsm = _random_fsm(rng)
    start = np.array([0, 1, 2, 3], np.int32)
    out = gen.generate(model, params, tokens, lengths, jax.random.key(0), max_new_tokens=12, temperature=temperature,
                       constraint=fsm, start_state=start, return_logits=True)
    got, n, done = np.asarray(out.tokens), np.asarray(out.lengths), np.asarray(out.finished)
    final = _replay(fsm, start, got, n)
    np.testing.assert_array_equal(final, np.asarray(out.states))
    np.testing.assert_array_equal(done, final == 5)  # finished exactly when the final state is reached
    assert ((got[np.arange(12)[None] >= n[:, None]]) == 0).all()
    if temperature == 0:
        # Greedy = the best allowed token of the full-vocabulary recomputation (the restricted
        # output matmul changes nothing), and the scored columns are the allowed union.
        vocab = np.flatnonzero(fsm.allowed.any(0))
        ref = _recompute(model, params, tokens, lengths, got, n)
        emitted = np.arange(12)[None] < n[:, None]
        np.testing.assert_allclose(np.asarray(out.logits)[emitted], ref[..., vocab][emitted], atol=1e-4)
        state = start.copy()
        for t in range(emitted.sum(1).max()):
            best = np.where(fsm.allowed[state], ref[:, t], -np.inf).argmax(-1)
            rows = emitted[:, t]
            np.testing.assert_array_equal(got[rows, t], best[rows])
            state = np.where(rows, fsm.next_state[state, best], state)


def test_pick_tokens_never_escapes_the_constraint():
    # Adversarial logits: huge, +inf and NaN entries on forbidden tokens, all rows but one token banned.
    rng = np.random.default_rng(0)
    b, v = 64, 50
    allowed = rng.random((b, v)) < 0.1
    allowed[np.arange(b), rng.integers(0, v, b)] = True
    allowed[0] = False
    allowed[0, 17] = True
    logits = rng.normal(size=(b, v)).astype(np.float32) * 10
    logits[~allowed] = rng.choice([1e30, np.inf, np.nan], size=(~allowed).sum())
    logits[1, allowed[1]] = np.nan
    for temperature, top_k in [(0.0, 0), (1.0, 0), (0.7, 3)]:
        for seed in range(3):
            idx = np.asarray(gen.pick_tokens(jnp.asarray(logits), jax.random.key(seed), jnp.asarray(allowed),
                                             temperature, top_k))
            assert allowed[np.arange(b), idx].all()
            assert idx[0] == 17


def test_generate_rejects_bad_input(tiny, prompts):
    model, params = tiny
    tokens, lengths = prompts
    with pytest.raises(ValueError, match="n_positions 64"):
        gen.generate(model, params, tokens, lengths, max_new_tokens=60)
    with pytest.raises(ValueError, match="lengths must be"):
        gen.generate(model, params, tokens, np.zeros(4, int), max_new_tokens=2)
    with pytest.raises(ValueError, match="constraint covers 10 tokens"):
        gen.generate(model, params, tokens, lengths, max_new_tokens=2,
                     constraint=gen.Constraint(np.ones((2, 10), bool), np.zeros((2, 10), np.int32)))
    with pytest.raises(ValueError, match=r"next_state\[1, 3\] = 7"):
        nxt = np.zeros((2, 10), np.int32)
        nxt[1, 3] = 7
        gen.Constraint(np.ones((2, 10), bool), nxt)


# ---------------------------------------------------------------------------------------------
# sharding, tokenizer
# ---------------------------------------------------------------------------------------------
def test_sharded_forward_matches_one_device(tiny, forward, fixture_batch):
    model, params = tiny
    ids = np.concatenate([fixture_batch["input_ids"], fixture_batch["input_ids"][:1]])
    mask = np.concatenate([fixture_batch["attention_mask"], fixture_batch["attention_mask"][:1]])
    mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    shardings = logical_shardings(abstract, mesh, DEFAULT_RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        sharded = jax.device_put(params, shardings)
        assert sharded["h_0"]["mlp"]["c_fc"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "model")
        assert sharded["wte"]["embedding"].sharding.spec[0] == "model"  # vocab over model
        assert sharded["h_0"]["attn"]["c_attn"]["kernel"].addressable_shards[0].data.shape == (64, 3, 2, 16)
        got = jax.jit(lambda p, i, m: model.apply({"params": p}, i, attention_mask=m))(sharded, ids, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(forward(params, ids, mask)), atol=1e-5)


def test_load_tokenizer_from_local_bpe_files(tmp_path):
    # A tiny vocabulary in GPT-2's byte-level format ('Ġ' is the space byte).
    # GPT-2's pre-tokenizer splits letters from digits, so 'B01' is 'B' + '01' whatever the merges.
    vocab = {"<|endoftext|>": 0, "B": 1, "0": 2, "1": 3, "2": 4, "Ġ": 5, "i": 6, "s": 7, ",": 8,
             "Ġi": 9, "Ġis": 10, "01": 11}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ i\nĠi s\n0 1\n")
    tok = weights.load_tokenizer(tmp_path)
    ids = tok("B01 is 12,")["input_ids"]
    assert ids == [1, 11, 10, 5, 3, 4, 8]
    assert tok.decode(ids) == "B01 is 12,"
    with pytest.raises(FileNotFoundError, match="tokenizer files"):
        weights.load_tokenizer(tmp_path / "missing")
