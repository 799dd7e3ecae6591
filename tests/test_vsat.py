"""Virtual Satellite: text rows, QA bits, tokenizer FSM, the padded loss, infill, baselines, outputs."""
import datetime
import functools
import itertools
import json
import os
import shutil

import jax
import numpy as np
import pytest
import rasterio

from eojax import tasks, train
from eojax.checkpoint import CheckpointMismatchError
from eojax.data import qa, synthetic
from eojax.optim import sophia as sophia_lib
from eojax.tasks.base import DataSpec
from eojax.vsat import great, infill, references, timeseries, tokenizers
from eojax.vsat import task as vsat_task
from helpers import ONE_DEVICE, load_config

COLUMNS = ["X", "Y", "DOY", "B1", "B2", "B10"]


# ---------------------------------------------------------------- text rows

def _reference_great_text(row, order):
    """be_great's GReaTDataset._getitem sentence for a given column order (its published formula)."""
    return ", ".join("%s is %s" % (c, str(row[c]).strip()) for c in order)


def test_text_round_trip_random_orders():
    rng = np.random.default_rng(0)
    tok = tokenizers.NumericTokenizer(COLUMNS)
    orders = set()
    for _ in range(200):
        row = {c: int(v) for c, v in zip(COLUMNS, rng.integers(0, 65536, len(COLUMNS)))}
        text = great.encode_row(row, rng=rng)
        order = [f.split(" is ")[0] for f in text.split(", ")]
        orders.add(tuple(order))
        assert sorted(order) == sorted(COLUMNS)
        assert text == _reference_great_text(row, order)  # byte-exact with the reference format
        assert great.parse_row(text, COLUMNS) == row
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
    assert len(orders) > 150  # a fresh order per sample
    assert great.encode_row({"B01": 1234, "B02": 567}) == "B01 is 1234, B02 is 567"


def test_float_rows_fixed_decimals_round_trip():
    row = {"NDVI": 0.125, "B4": 0.0731}
    text = great.encode_row(row, ["NDVI", "B4"])
    assert text == "NDVI is 0.1250, B4 is 0.0731"
    assert great.parse_row(text, ["NDVI", "B4"], dtypes={"NDVI": float, "B4": float}) == row


def test_conditional_mode_and_parser_faults():
    known = {"X": 3, "Y": 7, "DOY": 120}
    targets = {"B1": 9000, "B2": 812, "B10": 30000}
    prompt = great.conditional_prompt(known)
    full = great.conditional_text(known, targets)
    assert prompt == "X is 3, Y is 7, DOY is 120"
    assert full == prompt + ", B1 is 9000, B2 is 812, B10 is 30000"
    assert great.parse_row(full, COLUMNS) == {**known, **targets}
    for bad, why in [("X is 3, Y is 7", "missing"), ("X is 3, X is 4", "twice"), ("Z is 1", "unknown"),
                     ("X is 3, Y is seven", "not a int"), ("X 3", "no"), ("", "empty")]:
        with pytest.raises(great.ParseError, match=why):
            great.parse_row(bad, COLUMNS if why != "missing" else ["X", "Y", "DOY"])


def test_numeric_tokenizer_tokens():
    tok = tokenizers.NumericTokenizer(COLUMNS)
    # 'B10' is one token, not 'B1' + '0'; separators are single tokens; numbers are digits.
    ids = tok.encode("B10 is 42, B1 is 7")
    assert [tok.vocab[i] for i in ids] == ["B10", " is ", "4", "2", ", ", "B1", " is ", "7"]
    with pytest.raises(ValueError, match="cannot tokenize"):
        tok.encode("B3 is 4")


# ---------------------------------------------------------------- QA bits

def _bits(*bits):
    return sum(1 << b for b in bits)


@pytest.mark.parametrize("fmt,cases", [
    ("hls_fmask", [(0, qa.CLEAR), (_bits(0), qa.CLOUD), (_bits(1), qa.CLOUD), (_bits(2), qa.CLOUD),
                   (_bits(3), qa.SHADOW), (_bits(4), qa.SNOW), (_bits(5), qa.WATER), (_bits(6, 7), qa.CLEAR),
                   (_bits(3, 4), qa.SHADOW), (_bits(1, 3, 5), qa.CLOUD), (_bits(4, 5), qa.SNOW), (255, qa.FILL)]),
    # Collection-1 BQA: 2720 = low confidences everywhere (clear), confidence pairs at 5, 7, 9, 11.
    ("landsat_c1", [(1, qa.FILL), (2720, qa.CLEAR), (2720 + _bits(4, 6), qa.CLOUD), (2720 + _bits(8), qa.SHADOW),
                    (2720 + _bits(10), qa.SNOW), (2720 + _bits(12), qa.CLOUD), (2720 + _bits(6), qa.CLOUD),
                    (_bits(5, 8), qa.CLEAR), (_bits(0, 4), qa.FILL), (_bits(7, 8, 9, 10), qa.SHADOW)]),
    ("landsat_c2", [(_bits(6), qa.CLEAR), (_bits(0), qa.FILL), (_bits(1), qa.CLOUD), (_bits(2), qa.CLOUD),
                    (_bits(3), qa.CLOUD), (_bits(4), qa.SHADOW), (_bits(5), qa.SNOW), (_bits(7), qa.WATER),
                    (_bits(3, 4), qa.CLOUD), (_bits(5, 7), qa.SNOW)]),
    ("eojax_synthetic", [(8, qa.CLEAR), (2, qa.CLOUD), (4, qa.SHADOW), (1, qa.FILL)]),
])
def test_qa_decoding_hand_made(fmt, cases):
    values = np.array([v for v, _ in cases], np.uint16)
    expected = np.array([c for _, c in cases], np.uint8)
    np.testing.assert_array_equal(qa.decode(values, fmt), expected)


def test_qa_on_real_bqa_and_fmask(test_data):
    (bqa,) = [os.path.join(r, f) for r, _, fs in os.walk(test_data / "gdalcubes_L8NY18") for f in fs
              if "013032_20180827" in f and f.endswith("BQA.TIF")]
    with rasterio.open(bqa) as src:
        q = src.read(1).astype(np.int64)
    classes = qa.decode(q, "landsat_c1")
    np.testing.assert_array_equal(classes == qa.FILL, (q & 1) == 1)
    assert np.all(classes[((q >> 4) & 1 == 1) & ((q & 1) == 0)] == qa.CLOUD)
    (fmask,) = (test_data / "hls-vi").glob("HLS.L30*Fmask.tif")
    with rasterio.open(fmask) as src:
        f = src.read(1, window=((0, 512), (0, 512))).astype(np.int64)
    got = qa.decode(f, "hls_fmask")
    cloud = (f & 0b111 > 0) & (f != 255)
    np.testing.assert_array_equal(got == qa.CLOUD, cloud)
    np.testing.assert_array_equal(got == qa.SHADOW, ~cloud & (f & 8 > 0) & (f != 255))


def test_aispace_csv_table(tmp_path):
    rows = ["B01,B02,cirrus,cloud,adj_cloud,cloud_shadow,snow_ice,water,X,Y,DOY",
            "100,200,0,0,0,0,0,0,10,20,171", "101,201,0,1,0,1,0,0,11,20,171",
            "-9999,202,0,0,0,0,0,0,10,21,171", "103,203,0,0,0,1,0,0,11,21,171",
            "104,204,0,0,0,0,0,1,10,20,179", "105,205,0,0,1,0,0,0,11,21,179"]
    path = tmp_path / "pixels.csv"
    path.write_text("\n".join(rows) + "\n")
    ts = timeseries.from_csv(str(path), year=2023)
    assert ts.band_names == ("B01", "B02") and ts.dates == ("2023-06-20", "2023-06-28")
    np.testing.assert_array_equal(ts.doy, [171, 179])
    # t=0: (y0,x0) clear, (y0,x1) cloud (wins over shadow), (y1,x0) band missing, (y1,x1) shadow
    np.testing.assert_array_equal(ts.classes[0], [[qa.CLEAR, qa.CLOUD], [qa.FILL, qa.SHADOW]])
    np.testing.assert_array_equal(ts.classes[1], [[qa.WATER, qa.FILL], [qa.FILL, qa.CLOUD]])
    np.testing.assert_array_equal(ts.rows(qa.usable(ts.classes)), [[0, 0, 171, 100, 200], [0, 0, 179, 104, 204]])
    with pytest.raises(ValueError, match="columns"):
        path.write_text("B01,X,Y\n1,2,3\n")
        timeseries.from_csv(str(path))


# ---------------------------------------------------------------- FSM

def test_fsm_allows_exactly_the_valid_continuations():
    """Every valid completion ', B1 is <1-2 digits>, B2 is <1-2 digits><eos>' is enumerated; at each
    prefix the FSM must allow exactly the tokens that continue some valid completion."""
    tok = tokenizers.NumericTokenizer(["X", "B1", "B2", "B10"])
    allowed, next_state, start = tokenizers.build_fsm(tok, ["B1", "B2"], after_prompt=True, max_number_tokens=2)
    numbers = [str(i) for i in range(10)] + [f"{a}{b}" for a in range(10) for b in range(10)]
    trie: dict[tuple, set] = {}
    for a, b in itertools.product(numbers, numbers):
        seq = tok.encode(f", B1 is {a}, B2 is {b}") + [tok.eos_id]
        for k in range(len(seq)):
            trie.setdefault(tuple(seq[:k]), set()).add(seq[k])
    states = {(): start}
    for prefix in sorted(trie, key=len):
        s = states[prefix]
        assert set(np.flatnonzero(allowed[s])) == trie[prefix], tok.decode(list(prefix))
        for v in trie[prefix]:
            states[prefix + (v,)] = int(next_state[s, v])
    # After eos the row is done: only eos, and it stays there.
    final = {states[p + (v,)] for p, vs in trie.items() for v in vs if v == tok.eos_id}
    (done,) = final
    assert set(np.flatnonzero(allowed[done])) == {tok.eos_id} and next_state[done, tok.eos_id] == done


def test_fixed_width_numbers_and_their_fsm():
    tok = tokenizers.NumericTokenizer(["X", "B1", "B2"], widths={"X": 2, "B1": 4, "B2": 4})
    text = "X is 3, B1 is 7, B2 is 1234"
    ids = tok.encode(text)
    assert [tok.vocab[i] for i in ids[:4]] == ["X", " is ", "0", "3"] and len(ids) == 4 + 7 + 7
    assert tok.decode(ids) == text  # the padding is the tokenizer's, not the text's
    with pytest.raises(ValueError, match="more than 4 digits"):
        tok.encode("B1 is 12345")
    allowed, next_state, s = tokenizers.build_fsm(tok, ["B1", "B2"], max_number_tokens=9)
    digit = tok.encode("5")[0]
    for t in tok.encode(", B1 is ") + [digit] * 4:  # exactly 4 digits, then only the separator
        assert allowed[s, t]
        s = next_state[s, t]
    assert set(np.flatnonzero(allowed[s])) == {tok.encode(", ")[0]}


def _byte_chars():
    """GPT-2's printable stand-in for every byte (printable latin-1 bytes stand for themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


def _write_tiny_bpe(directory):
    """A tiny byte-level BPE in GPT-2's file layout: digits with a leading space, a few two-digit
    pieces, ' is', ' B'; 290 tokens, <|endoftext|> last."""
    import json
    vocab = {c: i for i, c in enumerate(sorted(_byte_chars().values()))}
    merges = []
    for a, b in [("Ġ", d) for d in "0123456789"] + [(a, b) for a in "12" for b in "0123456789"] + \
            [("Ġ", "i"), ("Ġi", "s"), ("Ġ", "B")]:
        merges.append(f"{a} {b}")
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_bpe_number_tokens_and_fsm(tmp_path):
    """A tiny byte-level BPE in GPT-2's file layout (vocab.json + merges.txt), read through part A's
    load_tokenizer: number tokens come from the vocabulary, and the FSM accepts the BPE spelling of
    a valid continuation (', B1 is 1234' is ',', ' B', '1', ' is', ' 1', '23', '4')."""
    pytest.importorskip("transformers")
    _write_tiny_bpe(tmp_path)
    tok = tokenizers.BPETokenizer.from_directory(str(tmp_path))
    text = "X is 3, B1 is 1234, B2 is 56"
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    start, cont = tok.number_tokens()
    assert {tok.hf.decode([i]) for i in start} == {f" {d}" for d in "0123456789"}
    assert {tok.hf.decode([i]) for i in cont} == set("0123456789") | {f"{a}{b}" for a in "12" for b in "0123456789"}
    allowed, next_state, s = tokenizers.build_fsm(tok, ["B1", "B2"], max_number_tokens=4)
    for t in tok.encode(", B1 is 1234, B2 is 56") + [tok.eos_id]:
        assert allowed[s, t], tok.hf.decode([t])
        s = next_state[s, t]
    assert not allowed[s, tok.encode(" 5")[0]]  # done: nothing but eos


def test_fsm_without_prompt_forces_first_column():
    tok = tokenizers.NumericTokenizer(["B1", "B2"])
    allowed, next_state, start = tokenizers.build_fsm(tok, ["B2", "B1"], after_prompt=False)
    assert set(np.flatnonzero(allowed[start])) == {tok.encode("B2")[0]}


# ---------------------------------------------------------------- baselines

def test_references_match_direct_numpy():
    """The four references against per-pixel loops written from their definitions."""
    rng = np.random.default_rng(1)
    t_dates = ["2020-01-05", "2020-02-11", "2020-03-01", "2020-05-20", "2020-07-04", "2020-09-30"]
    values = rng.uniform(0, 1000, (6, 2, 5, 4)).astype(np.float32)
    known = rng.random((6, 5, 4)) >= 0.4
    known[:, 0, 0] = False  # a pixel never clear: the per-pixel references must report it
    t = 3
    ys, xs = np.nonzero(np.ones((5, 4), bool))
    days = np.array([datetime.date.fromisoformat(d).toordinal() for d in t_dates], float)
    out = references.compute(values, known, days, t, ys, xs)
    for k, (y, x) in enumerate(zip(ys, xs)):
        clear = [i for i in range(6) if i != t and known[i, y, x]]
        assert out["linear"][1][k] == out["nearest"][1][k] == out["nearest_shifted"][1][k] == bool(clear)
        assert out["median"][1][k]
        for c in range(2):
            np.testing.assert_allclose(out["median"][0][k, c], np.median(values[t, c][known[t]]), rtol=1e-6)
        if not clear:
            continue
        for c in range(2):
            lin = np.interp(days[t], days[clear], values[clear, c, y, x])
            np.testing.assert_allclose(out["linear"][0][k, c], lin, rtol=1e-6)
        near = min(clear, key=lambda i: (abs(days[i] - days[t]), i))
        np.testing.assert_allclose(out["nearest"][0][k], values[near, :, y, x])
        both = known[near] & known[t]
        shift = [np.mean(values[t, c][both].astype(np.float64) - values[near, c][both]) for c in range(2)]
        np.testing.assert_allclose(out["nearest_shifted"][0][k], values[near, :, y, x] + np.array(shift), rtol=1e-6)
    err = infill.band_errors(np.array([[1.0, 2.0], [3.0, 5.0]]), np.array([[0.0, 0.0], [0.0, 0.0]]),
                             np.array([True, True]), ["B1", "B2"])
    assert err["l1"] == {"B1": 2.0, "B2": 3.5} and err["l2"] == {"B1": 5.0, "B2": 14.5}


# ---------------------------------------------------------------- the task on a synthetic series

@pytest.fixture(scope="module")
def syn_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("vsat_syn")
    synthetic.write_time_series(str(d), seed=5, n_dates=5, height=24, width=24, sensor="landsat8",
                                labels=False, cloud_fraction=0.25)
    return lambda arg="runlocal,mode=great", **kw: load_config("vsat", arg, **{
        "input.source": "multiband", "input.synthetic_dir": "", "mesh": ONE_DEVICE,
        "input.paths": tuple(sorted(str(p) for p in d.glob("ts_*.tif"))), "input.qa_format": "eojax_synthetic",
        "input.bands": ("B2", "B3", "B4"), "input.target_date": "", "batch_size": 8,
        "infill.batch_size": 64, "infill.retries": 1, **kw})


@pytest.fixture(scope="module")
def syn_run(syn_config):
    run = train.setup(syn_config(), devices=jax.devices()[:1])
    return run, run.init_state()


def test_loss_ignores_padding(syn_run):
    run, state = syn_run
    task = run.task
    batch = {k: np.asarray(v) for k, v in next(run.train_iter).items() if k in run.batch_shardings}
    rng = jax.random.key(0)
    loss_of = jax.jit(lambda p, b: task.loss_fn(p, {}, b, rng, False)[0])
    loss = loss_of(state.params, batch)
    # Reference: numpy log-softmax of the model's logits, averaged over real next tokens only.
    logits = np.asarray(jax.jit(task.model.apply)({"params": state.params}, batch["tokens"][:, :-1]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = [-logp[i, j, batch["tokens"][i, j + 1]] for i in range(len(logits))
           for j in range(batch["lengths"][i] - 1)]
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    # Scribbling over the padding changes nothing; changing a real token does.
    scribbled = dict(batch, tokens=batch["tokens"].copy())
    pad = np.arange(batch["tokens"].shape[1])[None] >= batch["lengths"][:, None]
    assert pad.any()
    scribbled["tokens"][pad] = np.random.default_rng(0).integers(0, task.tokenizer.vocab_size, pad.sum())
    np.testing.assert_allclose(float(loss_of(state.params, scribbled)), float(loss), rtol=1e-6)
    changed = dict(batch, tokens=batch["tokens"].copy())
    changed["tokens"][0, 3] = (changed["tokens"][0, 3] + 1) % task.tokenizer.vocab_size
    assert abs(float(loss_of(state.params, changed)) - float(loss)) > 1e-4
    # Sophia-G's sampled loss counts the same real label tokens.
    _, n = jax.jit(lambda p, b: task.sampled_loss_fn(p, {}, b, rng))(state.params, batch)
    assert int(n) == int((batch["lengths"] - 1).sum())


def test_constrained_generation_and_failures_reported(syn_run):
    """Random weights: every generated row is in the FSM's language (parses; values have the
    column's 5 digits); asking for uint8 values makes most rows fail the range check, and each
    failure is counted and retried, never dropped."""
    run, state = syn_run
    task = run.task
    known = np.array([[x, y, 100] for x in range(6) for y in range(5)])
    cols, targets = list(timeseries.COORD_COLUMNS), list(task.spec.info["bands"])
    res = infill.generate_values(task.model, state.params, task.tokenizer, known, cols, targets, dtype="uint8",
                                 batch_size=16, greedy=False, temperature=1.0, retries=1, max_number_tokens=3)
    for text in res["texts"]:
        row = great.parse_row(text, cols + targets)  # the FSM only lets well-formed rows out
        assert [row[c] for c in cols] == list(known[res["texts"].index(text)])
        assert all(0 <= row[c] <= 99999 for c in targets)  # 5 digits: the uint16 series' width
    assert np.all(res["values"][res["ok"]] <= 255)
    assert (~res["ok"]).sum() > 0 and np.all(res["attempts"][~res["ok"]] == 2)


@pytest.mark.slow
def test_trainer_runs_then_infill_fills_every_cell(syn_config, tmp_path):
    """Train a few steps through the one trainer, restore for inference, fill the target date."""
    config = syn_config(total_steps=6, checkpoint_every=6, log_every=3, eval_steps=1,
                        mesh=(("data", -1), ("fsdp", 1), ("model", 1)))  # all 8 devices, as the CLI
    result = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(result["train"]["loss"]) and "loss" in result["eval"]
    run, variables = train.load_for_inference(config, str(tmp_path))
    with run.scope():  # as `eojax infer`
        out = tasks.require_plugin(run.task, "infer", "eojax infer")(
            run, variables, str(tmp_path), {"output": str(tmp_path / "infer"), "seed": 0})
    assert out["to_fill"] > 0 and out["filled"] + out["failed"] == out["to_fill"] and out["holdout"] > 0
    assert out["metrics"]["model"]["n"] == round(out["metrics"]["model"]["filled_fraction"] * out["holdout"])
    for name in ("model", *references.NAMES):
        assert set(out["metrics"][name]) >= {"n", "l1", "l2"} or out["metrics"][name]["n"] == 0
    ts, split = run.input.series, run.input.split
    t = split["t"]
    with rasterio.open(out["status"]) as src:
        status = src.read(1)
    assert (status == infill.FILLED).sum() == out["filled"] and (status == infill.FAILED).sum() == out["failed"]
    np.testing.assert_array_equal(np.isin(status, (infill.FILLED, infill.FAILED)), split["fill"])
    source = config.input.paths[t]
    with rasterio.open(source) as src, rasterio.open(out["geotiffs"][t]) as dst:
        assert (dst.crs, dst.transform, dst.dtypes[0], dst.nodata, dst.shape) == \
            (src.crs, src.transform, src.dtypes[0], src.nodata, src.shape)
        filled, original = dst.read(), src.read([1 + list(src.descriptions).index(b) for b in ts.band_names])
    keep = status == infill.OBSERVED
    np.testing.assert_array_equal(filled[:, keep], original[:, keep])
    assert os.path.getsize(out["png"]) > 0


@pytest.mark.parametrize("optimizer", ["adamw", "sophia_g"])
def test_optimizers_reduce_tabular_loss(syn_config, optimizer):
    config = syn_config(**{"optim.name": optimizer, "optim.warmup_steps": 0, "optim.lr": 3e-3,
                           "optim.sophia.update_every": 2, "total_steps": 10})
    run = train.setup(config, devices=jax.devices()[:1])
    state = run.init_state()
    fixed = run.next_batch()
    loss_of = jax.jit(lambda p: run.task.loss_fn(p, {}, fixed, jax.random.key(0), False)[0])
    before = float(loss_of(state.params))
    for _ in range(10):
        state, metrics = run.train_step(state, run.next_batch())
    after = float(loss_of(state.params))
    assert after < before - 0.2, (before, after)
    if optimizer == "sophia_g":
        assert 0.0 <= float(metrics["sophia_win_rate"]) <= 1.0


@pytest.mark.slow
def test_sophia_g_estimates_the_hessian_on_a_fresh_batch(syn_config, tmp_path, monkeypatch):
    """As the official loop: the refresh before steps k, 2k, ... estimates on a batch of its own, drawn
    before the step's gradient batch; other steps ignore it."""
    config = syn_config(**{"optim.name": "sophia_g", "optim.sophia.update_every": 2, "total_steps": 5,
                           "eval_every": 0, "checkpoint_every": 5})
    run = train.setup(config, devices=jax.devices()[:1])
    assert [run.optimizer.takes_hessian_batch(i) for i in range(6)] == [False, False, True, False, True, False]
    a, b = run.next_batch(), run.next_batch()
    copy = lambda state: jax.tree.map(lambda x: x.copy(), state)  # noqa: E731 - the step donates its state
    nu = lambda state: np.asarray(sophia_lib.find_sophia_state(state.opt_state).nu["wte"]["embedding"])  # noqa: E731

    def after(state, hessian_batch):
        new, _ = run.train_step(copy(state), a, hessian_batch)
        return new

    state = run.init_state()
    np.testing.assert_array_equal(nu(after(state, b)), nu(after(state, a)))  # step 0: no refresh
    for _ in range(2):
        state, _ = run.train_step(state, run.next_batch())
    with_b, with_a = nu(after(state, b)), nu(after(state, a))  # step 2 refreshes on the batch it is given
    assert np.abs(with_b - with_a).max() > 1e-3 * np.abs(with_a).max()

    # The training loop draws k + 1 batches per k steps: 5 steps, refreshes before steps 2 and 4.
    calls = []
    original = train.Run.next_batch
    monkeypatch.setattr(train.Run, "next_batch", lambda self: calls.append(1) or original(self))
    config.mesh = (("data", -1), ("fsdp", 1), ("model", 1))  # the loop runs on every device
    train.train_and_evaluate(config, str(tmp_path / "run"))
    assert len(calls) == 7


@pytest.fixture
def hf_folder(tmp_path):
    """Part A's tiny HF GPT-2 fixture (2 x 64, 4 heads, vocabulary 300) plus a tiny BPE tokenizer."""
    pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "gpt2_tiny"), hf)
    _write_tiny_bpe(hf)
    return hf


def test_pretrained_hf_gpt2_with_bpe(syn_config, hf_folder, tmp_path):
    """configs/vsat.py's pretrained path on the tiny HF GPT-2 and BPE tokenizer: the config takes the
    checkpoint's sizes from its config.json (the variant alone would be distilgpt2's 6 x 768), the
    trainer imports the checkpoint (init_from=<dir>/model.safetensors), trains a step, and
    constrained infill with the BPE tokenizer writes parseable rows."""
    from eojax import checkpoint as ckpt_lib
    from eojax.weights import gpt2 as gpt2_weights
    hf = hf_folder
    config = syn_config(f"runlocal,mode=great,pretrained={hf}", **{"input.bands": ("B4",), "optim.lr": 1e-4})
    assert config.init_from == f"{hf}/model.safetensors" and config.model.tokenizer == "bpe"
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd, config.model.vocab_size) == (2, 4, 64, 300)
    run = train.setup(config, devices=jax.devices()[:1])
    model = run.task.model
    assert (model.vocab_size, model.n_embd, model.n_layer, model.n_head) == (300, 64, 2, 4)  # the checkpoint's sizes
    state = train.restore_or_init(run, ckpt_lib.Checkpointer(str(tmp_path / "ckpt")))
    ref = gpt2_weights.load_params(str(hf))
    np.testing.assert_array_equal(np.asarray(state.params["h_1"]["mlp"]["c_fc"]["kernel"]),
                                  ref["h_1"]["mlp"]["c_fc"]["kernel"])
    state, metrics = run.train_step(state, run.next_batch())
    assert np.isfinite(float(metrics["loss"]))
    task = run.task
    known = np.array([[x, 3, 200] for x in range(4)])
    res = infill.generate_values(task.model, state.params, task.tokenizer, known, list(timeseries.COORD_COLUMNS),
                                 ["B4"], dtype="uint16", batch_size=4, greedy=False, temperature=1.0, retries=0,
                                 max_number_tokens=3)
    for text in res["texts"]:
        assert great.parse_row(text, ["X", "Y", "DOY", "B4"])["Y"] == 3, text


def test_aispace_lora_fine_tune_trains_only_the_adapters(syn_config, hf_folder, tmp_path):
    """configs/vsat.py's `lora` (aispace: r 16, alpha 32 on c_attn, dropout 0.05): the imported GPT-2
    stays bit-identical through a step, the adapters of every c_attn move, and only they do."""
    from eojax import checkpoint as ckpt_lib
    config = syn_config(f"runlocal,mode=great,pretrained={hf_folder},lora",
                        **{"input.bands": ("B4",), "optim.warmup_steps": 0})  # step 0 moves
    assert (config.lora.targets, config.lora.rank, config.lora.alpha, config.lora.dropout) == ("c_attn", 16, 32.0, 0.05)
    run = train.setup(config, devices=jax.devices()[:1])
    state = train.restore_or_init(run, ckpt_lib.Checkpointer(str(tmp_path / "ckpt")))
    base = jax.tree.map(np.array, state.params)
    adapters = jax.tree.map(np.array, state.lora["adapters"])
    state, metrics = run.train_step(state, run.next_batch())
    assert np.isfinite(float(metrics["loss"]))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(state.params)))
    moved = jax.tree.map(lambda a, b: bool(np.abs(np.asarray(b) - a).max() > 0), adapters, state.lora["adapters"])
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(moved)[0]]
    assert paths and all("c_attn" in p for p in paths) and any(jax.tree.leaves(moved))


def test_pretrained_sizes_must_match_the_config(syn_config, hf_folder):
    """The model comes from config.model alone: a HF checkpoint of other sizes is refused by name,
    in one line, before any weight is read."""
    config = syn_config(f"runlocal,mode=great,pretrained={hf_folder}", **{"input.bands": ("B4",), "model.n_embd": 32,
                                                              "model.n_head": 2})
    data = tasks.make_input(config)
    task = tasks.get(config, data.spec())
    with pytest.raises(CheckpointMismatchError) as err:
        task.load_pretrained(config.init_from, None)
    message = str(err.value)
    assert "n_embd 32 (checkpoint 64)" in message and "n_head 2 (checkpoint 4)" in message
    assert "n_inner 128 (checkpoint 256)" in message and "n_layer" not in message and "\n" not in message


def test_core_from_the_json_spec_reads_no_data(syn_config, monkeypatch):
    """The core built from the DataSpec read back from JSON, with the series unreachable, rebuilds the
    same tokenizer, lengths and model, and gives the same loss, as the one from the live spec."""
    config = syn_config()
    data = tasks.make_input(config)
    live = data.spec()
    assert set(live.info) >= {"bands", "dates", "tokenizer", "vocab_size", "columns", "digits"}
    batch = {k: np.asarray(v) for k, v in next(iter(data.train(0, 1))).items() if k in live.elements}
    read_back = DataSpec.from_json(json.loads(json.dumps(live.to_json())))
    rng = jax.random.key(0)

    def core(spec):
        task = tasks.get(config, spec)
        params = jax.jit(task.init)(rng, batch)["params"]
        loss = jax.jit(lambda p, b: task.loss_fn(p, {}, b, jax.random.key(1), False)[0])(params, batch)
        return (jax.tree.map(np.shape, params), float(loss), task.max_len, task.infill_length(),
                task.max_number_tokens(), task.model_kwargs(), task.tokenizer.vocab, task.tokenizer.widths)

    expected = core(live)

    def refuse(*args, **kwargs):
        raise AssertionError("the core read the data")

    monkeypatch.setattr(rasterio, "open", refuse)
    monkeypatch.setattr(timeseries, "load_series", refuse)
    for attr, value in vars(vsat_task.VSatInput).items():
        if not attr.startswith("__") and (callable(value) or isinstance(value, (property, functools.cached_property))):
            monkeypatch.setattr(vsat_task.VSatInput, attr, refuse)
    got = core(read_back)
    assert got == expected and np.isfinite(got[1])
