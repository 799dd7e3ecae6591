"""Virtual Satellite: a GPT-2 that writes pixels of a satellite time series as GReaT text rows, and
fills the cloudy pixels of a date by conditional generation (koyacolab/aispace, in eojax's spine).

Data: a TimeSeries (eojax.vsat.timeseries) -> rows X, Y, DOY, bands of every usable (clear, snow or
water) pixel and date. Held out: the usable pixels in a box on the target date (as aispace); they
are the eval set (token loss) and what the infill is scored on. Training rows are sentences in a
fresh random column order per sample and epoch (element i's order comes from rng (seed, i)), padded
to a fixed length; the loss is next-token cross-entropy over real tokens only.
"""
from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eojax.data import pipeline, qa as qa_lib
from eojax.vsat import great, timeseries, tokenizers
from eojax.models import gpt2 as gpt2_lib
from eojax.optim import sample_labels
from eojax.tasks.base import DataSpec, Task, elements

_INPUT_KEYS = {"source", "root", "pathrow", "paths", "csv", "bands", "qa_format", "target_date",
               "holdout_box", "synthetic_dir"}
_SIZE_KEYS = ("n_layer", "n_head", "n_embd")


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


class VSatTask(Task):
    name = "vsat"

    def __init__(self, config):
        super().__init__(config)
        unknown = set(config.input.keys()) - _INPUT_KEYS
        if unknown:
            raise ValueError(f"unknown config.input keys {sorted(unknown)}; known: {sorted(_INPUT_KEYS)}")
        if config.model.tokenizer not in ("numeric", "bpe"):
            raise ValueError(f"config.model.tokenizer={config.model.tokenizer!r}: 'numeric' or 'bpe'")
        self._series = self._split = self._tok = self._model = None

    # -- data ----------------------------------------------------------------------------------------
    @property
    def series(self) -> timeseries.TimeSeries:
        if self._series is None:
            self._series = load_series(self.config.input)
        return self._series

    @property
    def split(self) -> dict:
        """target date index, train / held-out masks (T, H, W), pixels to fill on the target (H, W)."""
        if self._split is None:
            self._split = make_split(self.series, self.config.input.target_date, self.config.input.holdout_box)
        return self._split

    @property
    def tokenizer(self):
        if self._tok is None:
            m = self.config.model
            if m.tokenizer == "numeric":
                # Zero-padded to each column's most digits: fixed place value, fixed token count.
                self._tok = tokenizers.NumericTokenizer(self.series.columns, widths=self.number_digits())
            else:
                if not m.tokenizer_dir:
                    raise ValueError("config.model.tokenizer='bpe' needs config.model.tokenizer_dir (a local "
                                     "folder with the GPT-2 tokenizer files)")
                self._tok = tokenizers.BPETokenizer.from_directory(m.tokenizer_dir)
        return self._tok

    def number_digits(self) -> dict[str, int]:
        """Most digits a value of each column can have: X / Y from the grid, DOY 3, bands from dtype."""
        ts = self.series
        h, w = ts.shape
        info = np.iinfo(ts.dtype) if np.issubdtype(np.dtype(ts.dtype), np.integer) else None
        band = len(str(info.max)) + (info.min < 0) if info else 7
        return {"X": len(str(w - 1)), "Y": len(str(h - 1)), "DOY": 3, **{b: band for b in ts.band_names}}

    @property
    def max_len(self) -> int:
        """bos + every column's "<name> is <digits>" and separator + eos (a digit is at most a token)."""
        if self.config.model.max_len:
            return int(self.config.model.max_len)
        tok = self.tokenizer
        n = 2 + sum(len(tok.encode(tokenizers.field_prefix(tok, c, sep=True))) + d
                    for c, d in self.number_digits().items())
        return int(n)

    def infill_length(self) -> int:
        """Positions an infill row can reach: bos + the known columns + the generated ones."""
        from eojax.vsat import infill
        digits = self.number_digits()
        prompt = 1 + sum(len(self.tokenizer.encode(tokenizers.field_prefix(self.tokenizer, c, sep=True)))
                         + digits[c] for c in timeseries.COORD_COLUMNS)
        return prompt + infill.max_new_tokens(self.tokenizer, self.series.band_names, True,
                                              self.max_number_tokens())

    def max_number_tokens(self) -> int:
        """Tokens a generated value may take: config.infill.max_number_tokens, or (0) the digits of
        the band dtype's largest value (a digit is at most one token in either tokenizer)."""
        n = self.config.infill.max_number_tokens
        return int(n) if n else max(self.number_digits()[b] for b in self.series.band_names)

    def _dataset(self, mask, random_order, seed):
        return TextRows(self.series.rows(mask), self.series.columns, self.tokenizer, self.max_len, seed, random_order)

    def train_input(self, process_index, process_count):
        ds = self._dataset(self.split["train"], True, self.config.seed)
        return pipeline.make_iterator(ds, batch_size=self.config.batch_size // process_count,
                                      process_index=process_index, process_count=process_count,
                                      shuffle=True, seed=self.config.seed)

    def eval_input(self, process_index, process_count):
        if not self.split["holdout"].any():
            return None
        # The held-out rows in the infill's own layout: X, Y, DOY first, then the bands in order.
        ds = self._dataset(self.split["holdout"], False, 0)
        return pipeline.make_iter_dataset(ds, batch_size=self.config.batch_size // process_count,
                                          process_index=process_index, process_count=process_count,
                                          shuffle=False, num_epochs=1, drop_remainder=False)

    def data_fingerprint(self):
        return {"files": self.series.fingerprint(), "dates": list(self.series.dates),
                "bands": list(self.series.band_names), "target_date": self.series.dates[self.split["t"]],
                "train_rows": int(self.split["train"].sum()), "holdout_rows": int(self.split["holdout"].sum())}

    # -- model -----------------------------------------------------------------------------------------
    def model_kwargs(self) -> dict:
        m = self.config.model
        if self.config.init_from.endswith(".safetensors"):  # a Hugging Face GPT-2: its own sizes
            from eojax.weights import gpt2 as gpt2_weights
            hf = gpt2_weights.load_config(os.path.dirname(self.config.init_from))
            kw = {k: hf[k] for k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner")}
        else:
            kw = gpt2_lib.gpt2_config(m.variant, **{k: m[k] for k in _SIZE_KEYS if m[k]})
        kw.update(vocab_size=self.tokenizer.vocab_size if m.tokenizer == "numeric" else kw.get("vocab_size", 50257),
                  n_positions=max(self.max_len, m.n_positions, self.infill_length()), dropout=m.dropout,
                  dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
        return kw

    @property
    def model(self) -> gpt2_lib.GPT2:
        if self._model is None:
            self._model = gpt2_lib.GPT2(**self.model_kwargs())
        return self._model

    def data_spec(self) -> DataSpec:
        """Pixel rows as token sequences (padded to max_len) with their lengths."""
        arrays = elements(tokens=((self.max_len,), np.int32), lengths=((), np.int32), weight=((), np.float32))
        return DataSpec(arrays, {"bands": list(self.series.band_names), "dates": list(self.series.dates),
                                 "tokenizer": self.config.model.tokenizer,
                                 "vocab_size": int(getattr(self.tokenizer, "vocab_size", 0))})

    def init(self, rng, batch):
        return self.model.init({"params": rng}, batch["tokens"][:, :-1], train=False)

    def load_pretrained(self, path, init_params):
        """`config.init_from=<hf dir>/model.safetensors`: the Hugging Face GPT-2 in that folder."""
        from eojax.checkpoint import CheckpointMismatchError
        from eojax.weights import gpt2 as gpt2_weights

        params = gpt2_weights.load_params(os.path.dirname(path))
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

    def train_flops_per_example(self) -> float:
        return gpt2_lib.flops_per_sequence(self.model_kwargs(), self.max_len - 1, training=True)

    # -- inference -------------------------------------------------------------------------------------
    def infer(self, params, state, workdir, options):
        from eojax.vsat import infill
        out = options.get("output") or os.path.join(workdir, "infer")
        return infill.run(self, params, out, seed=int(options.get("seed", 0)))


# ------------------------------------------------------------------------ data helpers

def load_series(cfg) -> timeseries.TimeSeries:
    """config.input -> TimeSeries: 'landsat' (USGS band files under root, one path/row), 'multiband'
    (one file per date with a QA band; paths, or synthetic_dir for eojax's synthetic series), 'csv'."""
    if cfg.source == "landsat":
        root = cfg.root or os.path.join(os.environ.get("EOJAX_TEST_DATA", ""), "gdalcubes_L8NY18")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"config.input.root={root!r} is not a folder (set it, or EOJAX_TEST_DATA "
                                    "to the shared data folder)")
        scenes = timeseries.landsat_scenes(root, cfg.pathrow, tuple(cfg.bands))
        return timeseries.from_band_files(scenes, qa_format=cfg.qa_format)
    if cfg.source == "multiband":
        paths = list(cfg.paths)
        if not paths and cfg.synthetic_dir:  # eojax's synthetic series (deterministic, rewritten atomically)
            from eojax.data import synthetic
            paths = synthetic.write_time_series(cfg.synthetic_dir, seed=5, n_dates=6, height=32, width=32,
                                                sensor="landsat8", labels=False)
        return timeseries.from_multiband_files(paths, qa_format=cfg.qa_format, bands=tuple(cfg.bands))
    if cfg.source == "csv":
        return timeseries.from_csv(cfg.csv, bands=tuple(cfg.bands))
    raise ValueError(f"config.input.source={cfg.source!r}: one of 'landsat', 'multiband', 'csv'")


def make_split(ts: timeseries.TimeSeries, target_date: str, box) -> dict:
    """The target date (given, or the date with the most cloud + shadow), the held-out box on it
    (fractions x0, y0, x1, y1 of the grid), and the masks that follow."""
    usable = qa_lib.usable(ts.classes)
    if target_date:
        t = ts.date_index(target_date)
    else:
        t = int(np.argmax(qa_lib.to_fill(ts.classes).sum(axis=(1, 2))))
    h, w = ts.shape
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"config.input.holdout_box={tuple(box)} must be fractions x0 < x1, y0 < y1 in [0, 1]")
    in_box = np.zeros((h, w), bool)
    in_box[int(round(y0 * h)):int(round(y1 * h)), int(round(x0 * w)):int(round(x1 * w))] = True
    holdout = np.zeros_like(usable)
    holdout[t] = usable[t] & in_box
    train = usable & ~holdout
    if not train.any():
        raise ValueError("no usable (clear) pixel is left to train on")
    return {"t": t, "train": train, "holdout": holdout, "fill": qa_lib.to_fill(ts.classes[t]),
            "box": in_box}
