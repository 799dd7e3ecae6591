"""Virtual Satellite: a GPT-2 that writes pixels of a satellite time series as GReaT text rows, and
fills the cloudy pixels of a date by conditional generation (koyacolab/aispace, in eojax's spine).

Data: a TimeSeries (eojax.vsat.timeseries) -> rows X, Y, DOY, bands of every usable (clear, snow or
water) pixel and date. Held out: the usable pixels in a box on the target date (as aispace); they
are the eval set (token loss) and what the infill is scored on. Training rows are sentences in a
fresh random column order per sample and epoch (element i's order comes from rng (seed, i)), padded
to a fixed length; the loss is next-token cross-entropy over real tokens only.

`VSatInput` reads the series and makes the rows; `VSatTask`, the core, is built from the config and
the DataSpec alone: its tokenizer from the spec's columns and digits per column (or config.model's
BPE folder), its GPT-2 from config.model. The infill (`eojax infer`) reads the series through the
run's input.
"""
from __future__ import annotations

import functools
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eojax.checkpoint import CheckpointMismatchError
from eojax.data import pipeline, qa as qa_lib
from eojax.models import gpt2 as gpt2_lib
from eojax.optim import sample_labels
from eojax.tasks.base import DataSpec, Input, Task, elements
from eojax.vsat import great, infill, timeseries, tokenizers
from eojax.weights import gpt2 as gpt2_weights

_INPUT_KEYS = timeseries.INPUT_KEYS | {"holdout", "holdout_fraction", "holdout_seed"}
# config.model sizes; 0 (or absent, in configs older than n_inner / vocab_size) = the default
# (the variant's; vocab_size: the numeric tokenizer's).
_SIZE_KEYS = ("n_layer", "n_head", "n_embd", "n_inner", "vocab_size")


class TextRows(grain.MapDataset):
    """Element i: row i % N as a sentence (random column order from rng (seed, i) when `shuffle`
    columns, else the table order), tokenized with bos / eos and right-padded to `max_len`."""

    def __init__(self, rows: np.ndarray, columns, tok, max_len: int, seed: int, random_order: bool):
        super().__init__()
        self._rows, self._columns, self._tok = rows, list(columns), tok
        self._max_len, self._seed, self._random = max_len, int(seed), random_order

    def __len__(self) -> int:
        return len(self._rows)

    def __str__(self) -> str:
        return f"TextRows({len(self._rows)} rows, {len(self._columns)} columns, max_len={self._max_len})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        index = int(index)
        row = dict(zip(self._columns, self._rows[index % len(self._rows)].tolist()))
        rng = np.random.default_rng((self._seed, index)) if self._random else None
        ids = self._tok.encode(great.encode_row(row, rng=rng), bos=True, eos=True)
        if len(ids) > self._max_len:
            raise ValueError(f"row {row} needs {len(ids)} tokens > max_len {self._max_len}")
        tokens = np.full(self._max_len, self._tok.pad_id, np.int32)
        tokens[:len(ids)] = ids
        return {"tokens": tokens, "lengths": np.int32(len(ids))}


class SeriesInput(Input):
    """The time series and its train / held-out split, shared by both modes' inputs."""

    @functools.cached_property
    def series(self) -> timeseries.TimeSeries:
        return timeseries.load_series(self.config.input)

    @functools.cached_property
    def split(self) -> dict:
        """target date index, train / held-out masks (T, H, W), pixels to fill on the target (H, W)."""
        return make_split(self.series, self.config.input)

    def fingerprint(self):
        return {"files": self.series.fingerprint(), "dates": list(self.series.dates),
                "bands": list(self.series.band_names), "target_date": self.series.dates[self.split["t"]],
                "train_pixels": int(self.split["train"].sum()), "holdout_pixels": int(self.split["holdout"].sum())}


class VSatInput(SeriesInput):
    """GReaT mode: the text-row datasets made from the series."""

    @functools.cached_property
    def digits(self) -> dict[str, int]:
        return number_digits(self.series)

    @functools.cached_property
    def tokenizer(self):
        return make_tokenizer(self.config.model, self.series.columns, self.digits)

    def build_spec(self) -> DataSpec:
        """Pixel rows as token sequences (padded to max_len) with their lengths; the info holds what
        the core rebuilds its tokenizer and its infill lengths from (columns, digits per column)."""
        max_len = int(self.config.model.max_len) or row_length(self.tokenizer, self.digits, self.digits)
        arrays = elements(tokens=((max_len,), np.int32), lengths=((), np.int32), weight=((), np.float32))
        ts = self.series
        return DataSpec(arrays, {"bands": list(ts.band_names), "dates": list(ts.dates),
                                 "tokenizer": self.config.model.tokenizer,
                                 "vocab_size": int(self.tokenizer.vocab_size),
                                 "columns": list(ts.columns), "digits": dict(self.digits)})

    def _dataset(self, mask, random_order, seed):
        max_len = self.spec().elements["tokens"][0][0]
        return TextRows(self.series.rows(mask), self.series.columns, self.tokenizer, max_len, seed, random_order)

    def train(self, process_index, process_count):
        ds = self._dataset(self.split["train"], True, self.config.seed)
        return pipeline.make_iterator(ds, batch_size=self.config.batch_size // process_count,
                                      process_index=process_index, process_count=process_count,
                                      shuffle=True, seed=self.config.seed)

    def eval(self, process_index, process_count):
        if not self.split["holdout"].any():
            return None
        # The held-out rows in the infill's own layout: X, Y, DOY first, then the bands in order.
        ds = self._dataset(self.split["holdout"], False, 0)
        return pipeline.make_iter_dataset(ds, batch_size=self.config.batch_size // process_count,
                                          process_index=process_index, process_count=process_count,
                                          shuffle=False, num_epochs=1, drop_remainder=False)

def check_input_config(config):
    unknown = set(config.input.keys()) - _INPUT_KEYS
    if unknown:
        raise ValueError(f"unknown config.input keys {sorted(unknown)}; known: {sorted(_INPUT_KEYS)}")


class VSatTask(Task):
    name = "vsat_great"
    input_class = VSatInput
    plugins = {"infer": "eojax.vsat.infill:run"}

    @classmethod
    def check_config(cls, config):
        check_input_config(config)
        m = config.model
        if m.tokenizer not in ("numeric", "bpe"):
            raise ValueError(f"config.model.tokenizer={m.tokenizer!r}: 'numeric' or 'bpe'")
        if m.tokenizer == "bpe" and not m.tokenizer_dir:
            raise ValueError("config.model.tokenizer='bpe' needs config.model.tokenizer_dir (a local "
                             "folder with the GPT-2 tokenizer files)")

    @functools.cached_property
    def tokenizer(self):
        return make_tokenizer(self.config.model, self.spec.info["columns"], self.digits)

    @property
    def digits(self) -> dict[str, int]:
        """Most digits a value of each column can have (the input's number_digits)."""
        return dict(self.spec.info["digits"])

    @property
    def max_len(self) -> int:
        return self.spec.elements["tokens"][0][0]

    def infill_length(self) -> int:
        """Positions an infill row can reach: bos + the known columns + the generated ones."""
        prompt = 1 + field_tokens(self.tokenizer, self.digits, timeseries.COORD_COLUMNS)
        return prompt + infill.max_new_tokens(self.tokenizer, self.spec.info["bands"], True,
                                              self.max_number_tokens())

    def max_number_tokens(self) -> int:
        """Tokens a generated value may take: config.infill.max_number_tokens, or (0) the digits of
        the band dtype's largest value (a digit is at most one token in either tokenizer)."""
        n = self.config.infill.max_number_tokens
        return int(n) if n else max(self.digits[b] for b in self.spec.info["bands"])

    # -- model -----------------------------------------------------------------------------------------
    def model_kwargs(self) -> dict:
        """GPT2 settings from the config alone: the variant's sizes overridden by config.model's
        (configs/vsat.py sets a pretrained checkpoint's from its config.json)."""
        m = self.config.model
        kw = gpt2_lib.gpt2_config(m.variant, **{k: m[k] for k in _SIZE_KEYS if m.get(k)})
        if m.tokenizer == "numeric" and not m.get("vocab_size"):
            kw["vocab_size"] = self.tokenizer.vocab_size
        kw.setdefault("vocab_size", 50257)
        if kw["vocab_size"] < self.tokenizer.vocab_size:
            raise ValueError(f"config.model.vocab_size={kw['vocab_size']} is smaller than the "
                             f"{m.tokenizer} tokenizer's {self.tokenizer.vocab_size} tokens")
        kw.update(n_positions=max(self.max_len, m.n_positions, self.infill_length()), dropout=m.dropout,
                  dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
        return kw

    @functools.cached_property
    def model(self) -> gpt2_lib.GPT2:
        return gpt2_lib.GPT2(**self.model_kwargs())

    def init(self, rng, batch):
        return self.model.init({"params": rng}, batch["tokens"][:, :-1], train=False)

    def load_pretrained(self, path, init_params):
        """`config.init_from=<hf dir>/model.safetensors`: the Hugging Face GPT-2 in that folder, whose
        sizes config.model must state (configs/vsat.py:pretrained=<hf dir> copies them)."""
        directory = os.path.dirname(path)
        ours = _sizes({k: getattr(self.model, k) for k in _SIZE_KEYS})
        theirs = _sizes(gpt2_weights.load_config(directory))
        differ = [f"{k} {ours[k]} (checkpoint {theirs[k]})" for k in ours if ours[k] != theirs[k]]
        if differ:
            raise CheckpointMismatchError(
                f"{path}: config.model sizes differ from its config.json: {', '.join(differ)}; set them to "
                f"the checkpoint's (configs/vsat.py:pretrained={directory} does)")
        params = gpt2_weights.load_params(directory)
        # The checkpoint's position table may be longer than this task's rows need: keep the first ones.
        want = init_params["wpe"]["embedding"].shape
        wpe = params["wpe"]["embedding"]
        if wpe.shape[0] < want[0]:
            raise CheckpointMismatchError(f"{path}: {wpe.shape[0]} positions < the {want[0]} this task needs")
        params["wpe"]["embedding"] = wpe[:want[0]]
        got = jax.tree.map(np.shape, params)
        if got != jax.tree.map(lambda a: tuple(a.shape), init_params):
            raise CheckpointMismatchError(f"{path}: parameter shapes {got} differ from the model's")
        return jax.tree.map(lambda v, a: jax.device_put(jnp.asarray(v, a.dtype), a.sharding), params,
                            init_params)

    # -- loss ------------------------------------------------------------------------------------------
    @staticmethod
    def label_mask(batch) -> jax.Array:
        """(B, L-1) float: label j (token j+1) is a real token of a real row."""
        steps = batch["tokens"].shape[1] - 1
        real = jnp.arange(steps)[None, :] < (batch["lengths"] - 1)[:, None]
        return (real & (batch["weight"] > 0)[:, None]).astype(jnp.float32)

    def _logits(self, params, batch, rng, train):
        return self.model.apply({"params": params}, batch["tokens"][:, :-1], train=train,
                                rngs={"dropout": rng} if train else {})

    def token_losses(self, params, batch, rng, train):
        logits = self._logits(params, batch, rng, train)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
        return ce, logits

    def loss_fn(self, params, state, batch, rng, train):
        ce, logits = self.token_losses(params, batch, rng, train)
        mask = self.label_mask(batch)
        n = jnp.maximum(mask.sum(), 1.0)
        correct = (jnp.argmax(logits, -1) == batch["tokens"][:, 1:]) * mask
        return (ce * mask).sum() / n, {"token_accuracy": correct.sum() / n}, state

    def sampled_loss_fn(self, params, state, batch, rng):
        """Sophia-G's GNB: labels drawn from the model's own logits at the real-token positions; the
        mean over those tokens and their count (the per-token batch size of the official code)."""
        sample_rng, dropout_rng = jax.random.split(rng)
        logits = self._logits(params, batch, dropout_rng, True)
        labels = sample_labels(sample_rng, logits)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        mask = self.label_mask(batch)
        n = mask.sum()
        return (ce * mask).sum() / jnp.maximum(n, 1.0), n

    def eval_fn(self, params, state, batch, rng):
        ce, _ = self.token_losses(params, batch, rng, False)
        mask = self.label_mask(batch)
        return {"loss_sum": (ce * mask).sum(), "count": mask.sum()}

    def fill_values(self, params, ts, split, ys, xs, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (ys, xs) of the target date by constrained generation from "X, Y, DOY" prompts ->
        (values (N, C) float, ok (N,) bool: parsed and fits the band dtype)."""
        cfg = self.config.infill
        known = np.stack([xs, ys, np.full(len(xs), ts.doy[split["t"]])], 1)
        res = infill.generate_values(self.model, params, self.tokenizer, known, timeseries.COORD_COLUMNS,
                                     ts.band_names, dtype=ts.dtype, batch_size=cfg.batch_size, greedy=cfg.greedy,
                                     temperature=cfg.temperature, retries=cfg.retries,
                                     max_number_tokens=self.max_number_tokens(), seed=seed)
        return res["values"].astype(np.float64), res["ok"]

    def train_flops_per_example(self) -> float:
        return gpt2_lib.flops_per_sequence(self.model_kwargs(), self.max_len - 1, training=True)


def _sizes(cfg) -> dict:
    """A GPT-2's sizes, the MLP width resolved (None = 4 * n_embd)."""
    return {k: cfg[k] for k in _SIZE_KEYS} | {"n_inner": cfg["n_inner"] or 4 * cfg["n_embd"]}


# ------------------------------------------------------------------------ tokens

def number_digits(ts: timeseries.TimeSeries) -> dict[str, int]:
    """Most digits a value of each column can have: X / Y from the grid, DOY 3, bands from dtype."""
    h, w = ts.shape
    return {"X": len(str(w - 1)), "Y": len(str(h - 1)), "DOY": 3, **ts.value_digits()}


def make_tokenizer(model_cfg, columns, digits: dict[str, int]):
    """config.model.tokenizer: 'numeric' zero-pads every column to its most digits (fixed place value,
    fixed token count); 'bpe' is GPT-2's from config.model.tokenizer_dir."""
    if model_cfg.tokenizer == "numeric":
        return tokenizers.NumericTokenizer(columns, widths=digits)
    return tokenizers.BPETokenizer.from_directory(model_cfg.tokenizer_dir)


def field_tokens(tok, digits: dict[str, int], columns) -> int:
    """Most tokens the `columns` take in a row: each one's "<name> is <digits>" and separator (a digit
    is at most a token)."""
    return sum(len(tok.encode(tokenizers.field_prefix(tok, c, sep=True))) + digits[c] for c in columns)


def row_length(tok, digits: dict[str, int], columns) -> int:
    """A whole row's most tokens: bos + the columns + eos."""
    return 2 + field_tokens(tok, digits, columns)


# ------------------------------------------------------------------------ data helpers

def make_split(ts: timeseries.TimeSeries, cfg) -> dict:
    """The target date (config.input.target_date, or the date with the most cloud + shadow) and the
    clear pixels hidden on it (input.holdout: 'box', the clear pixels inside input.holdout_box,
    fractions x0, y0, x1, y1 of the grid, as aispace; 'random', a fraction input.holdout_fraction of
    the date's clear pixels drawn with input.holdout_seed; 'none'), and the masks that follow."""
    if len(ts.dates) < 2:
        raise ValueError(f"the time series has one date ({ts.dates[0]}): filling a date needs others")
    usable = qa_lib.usable(ts.classes)
    t = ts.date_index(cfg.target_date) if cfg.target_date else int(np.argmax(qa_lib.to_fill(ts.classes).sum(axis=(1, 2))))
    h, w = ts.shape
    kind = cfg.get("holdout", "box")
    hidden = np.zeros((h, w), bool)
    if kind == "box":
        x0, y0, x1, y1 = cfg.holdout_box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise ValueError(f"config.input.holdout_box={tuple(cfg.holdout_box)} must be fractions x0 < x1, "
                             "y0 < y1 in [0, 1]")
        hidden[int(round(y0 * h)):int(round(y1 * h)), int(round(x0 * w)):int(round(x1 * w))] = True
    elif kind == "random":
        frac = float(cfg.holdout_fraction)
        if not 0 < frac < 1:
            raise ValueError(f"config.input.holdout_fraction={frac} must be in (0, 1)")
        hidden = np.random.default_rng(int(cfg.get("holdout_seed", 0))).random((h, w)) < frac
    elif kind != "none":
        raise ValueError(f"config.input.holdout={kind!r}: 'box', 'random' or 'none'")
    holdout = np.zeros_like(usable)
    holdout[t] = usable[t] & hidden
    if kind != "none" and not holdout[t].any():
        raise ValueError(f"config.input.holdout={kind!r} hides no clear pixel of {ts.dates[t]}: nothing "
                         "to score on (move the box or pick another date)")
    train = usable & ~holdout
    if not train[t].any():
        raise ValueError(f"no clear pixel is left visible on the target date {ts.dates[t]}")
    if not train.any():
        raise ValueError("no usable (clear) pixel is left to train on")
    return {"t": t, "train": train, "holdout": holdout, "fill": qa_lib.to_fill(ts.classes[t]),
            "box": hidden}
