"""The context mode of the Virtual Satellite: a GPT-2 that reads what is known around a pixel and
writes its value.

What predicts a cloudy pixel is the same pixel on other dates, and the clear pixels of the target
date read against how they relate to the pixel on the dates both were clear. A sequence per (pixel,
date) holds exactly that, as continuous tokens (no digits):

  own_1 .. own_M   the pixel's clear values on the M dates nearest in time, with their date offsets
                   and the scene's mean change from each of those dates to the target date
  nb_1 .. nb_K     the K nearest clear pixels of the target date: their value, their offset, and
                   their mean difference / RMS difference / shared dates against the pixel on its
                   own dates, and their difference on the shared date nearest the target (the local
                   change since then is theirs)
  an_1 .. an_A     analogs: the clear pixels of the target date (within a wider window) whose values
                   on the pixel's own dates are closest to its own, with the same features; they
                   carry the estimate inside large clouds, where no neighbour is near
  query            the target date (season), last

The context comes first and the unknown last, so a causal GPT-2 sees all of it (both earlier and
later dates) when it writes the value: fill-in-the-middle ordering. Values enter through linear
embeddings (nearby values get nearby embeddings, unlike unrelated digit tokens) and leave through a
regression head; the L1 loss makes the prediction a conditional median, the estimate that minimises
the mean absolute error the infill is judged by, without sampling.

Training examples hide a random box of the target date around the pixel (from a single pixel to
twice the neighbour window), so that the model meets the layouts of real clouds: the nearest clear
pixels on one side only, or far away.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np

from eojax.data import pipeline
from eojax.data.windows import counter_uniforms
from eojax.models import gpt2 as gpt2_lib, layers
from eojax.tasks.base import DataSpec, Task, elements
from eojax.vsat.task import SeriesInput, check_input_config

@dataclasses.dataclass(frozen=True)
class Layout:
    """Token counts of a sequence: M own dates; K neighbours, the nearest clear pixels within
    `radius`; A analogs, the clear pixels (on a grid of step `analog_stride` within `analog_radius`)
    whose values on the pixel's own dates are closest to the pixel's."""
    n_own: int = 8
    n_neighbours: int = 16
    radius: int = 12
    n_analogs: int = 16
    analog_radius: int = 32
    analog_stride: int = 3

    @property
    def length(self) -> int:
        return self.n_own + self.n_neighbours + self.n_analogs + 1


def _offsets(radius: int, stride: int = 1):
    """(dy, dx) of a square grid around a pixel, the pixel itself excluded, nearest first (ties in
    raster order, the same everywhere)."""
    oy, ox = np.mgrid[-radius:radius + 1:stride, -radius:radius + 1:stride]
    oy, ox = oy.ravel(), ox.ravel()
    keep = (oy != 0) | (ox != 0)
    oy, ox = oy[keep], ox[keep]
    order = np.argsort(np.hypot(oy, ox), kind="stable")
    return oy[order], ox[order]


class Source:
    """What examples are cut from: normalised values (T, C, H, W), the pixels that may be read as
    context (T, H, W), days since the first date and day of year per date."""

    def __init__(self, values: np.ndarray, known: np.ndarray, days: np.ndarray, doy: np.ndarray,
                 layout: Layout):
        self.values = np.where(known[:, None], values, 0.0).astype(np.float32)
        self.known = known.astype(bool)
        self.days = np.asarray(days, np.float64)
        self.doy = np.asarray(doy, np.float64)
        self.layout = layout
        # Pixel-major copies: a context pixel's whole history is one contiguous read.
        self._values_px = np.ascontiguousarray(self.values.transpose(2, 3, 0, 1))  # (H, W, T, C)
        self._known_px = np.ascontiguousarray(self.known.transpose(1, 2, 0))  # (H, W, T)
        self._near = _offsets(layout.radius)
        self._wide = _offsets(layout.analog_radius, layout.analog_stride)
        self._shift = _date_shifts(self.values, self.known)

    @property
    def num_bands(self) -> int:
        return self.values.shape[1]

    def examples(self, t, y, x, hide=None) -> dict:
        """Sequences for pixels (t[i], y[i], x[i]) -> dict of (N, ...) arrays. hide (N, 4) int: a box
        y0, x0, y1, x1 of the target date read as unknown (training's simulated cloud); the pixel
        itself is never context."""
        t, y, x = (np.asarray(a, np.int64) for a in (t, y, x))
        n, lay = len(t), self.layout
        # -- the pixel's own clear dates, nearest in time first
        own_known = self.known[:, y, x].T.copy()  # (N, T)
        own_known[np.arange(n), t] = False
        gap = np.abs(self.days[None, :] - self.days[t][:, None])
        order = np.argsort(np.where(own_known, gap, np.inf), axis=1, kind="stable")[:, :lay.n_own]
        own_mask = np.take_along_axis(own_known, order, 1)
        if order.shape[1] < lay.n_own:  # fewer dates than tokens: the rest is padding
            short = lay.n_own - order.shape[1]
            order = np.pad(order, ((0, 0), (0, short)))
            own_mask = np.pad(own_mask, ((0, 0), (0, short)))
        own_val = self.values[order, :, y[:, None], x[:, None]] * own_mask[..., None]  # (N, M, C)
        own_dt = (self.days[order] - self.days[t][:, None]) * own_mask
        own_shift = self._shift[t[:, None], order] * own_mask[..., None]
        out = {"own_val": own_val, "own_dt": own_dt, "own_shift": own_shift, "own_mask": own_mask,
               "doy": self.doy[t]}
        own = (order, own_mask, own_val, own_dt)
        # -- neighbours: the nearest clear pixels of the target date
        ny, nx, ok = self._candidates(t, y, x, hide, self._near)
        pick = np.argsort(~ok, axis=1, kind="stable")[:, :lay.n_neighbours]  # offsets are nearest first
        out.update(self._tokens("nb", t, y, x, own, *(np.take_along_axis(a, pick, 1) for a in (ny, nx, ok))))
        # -- analogs: clear pixels of the target date that matched the pixel on its own dates
        ay, ax, ok = self._candidates(t, y, x, hide, self._wide)
        rms, shared, *_ = self._match(own, ay, ax)
        score = np.where(ok & (shared > 0), rms, np.inf)
        pick = np.argsort(score, axis=1, kind="stable")[:, :lay.n_analogs]
        good = np.isfinite(np.take_along_axis(score, pick, 1))
        out.update(self._tokens("an", t, y, x, own, np.take_along_axis(ay, pick, 1),
                                np.take_along_axis(ax, pick, 1), good))
        return out

    def _candidates(self, t, y, x, hide, offsets):
        """Pixels at `offsets` around each (y, x) -> rows, cols (clipped to the grid) and whether
        each is inside the grid, clear on the target date and not hidden."""
        h, w = self.known.shape[1:]
        cy, cx = y[:, None] + offsets[0][None], x[:, None] + offsets[1][None]
        inside = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
        cy, cx = np.clip(cy, 0, h - 1), np.clip(cx, 0, w - 1)
        ok = inside & self.known[t[:, None], cy, cx]
        if hide is not None:
            hide = np.asarray(hide, np.int64)
            ok &= ~((cy >= hide[:, :1]) & (cy < hide[:, 2:3]) & (cx >= hide[:, 1:2]) & (cx < hide[:, 3:4]))
        return cy, cx, ok

    def _match(self, own, cy, cx):
        """How pixels (cy, cx) (N, J) compare with the pixel on its own dates: the RMS difference
        over the dates both are clear (N, J), the number of such dates (N, J), the mean difference
        per band (N, J, C), and the difference on the shared date nearest the target (N, J, C) with
        that date's distance in days (N, J): the local change since then is the context pixel's."""
        order, own_mask, own_val, own_dt = own
        idx = order[:, None, :]
        both = np.take_along_axis(self._known_px[cy, cx], idx, 2) & own_mask[:, None, :]  # (N, J, M)
        diff = np.take_along_axis(self._values_px[cy, cx], idx[..., None], 2) - own_val[:, None]
        diff *= both[..., None]
        count = both.sum(-1)
        per = np.maximum(count, 1)
        rms = np.sqrt((diff ** 2).sum((2, 3)) / (per * diff.shape[-1]))
        first = both.argmax(2)[..., None]  # own dates are nearest first
        near = np.take_along_axis(diff, first[..., None], 2)[:, :, 0]
        gap = np.abs(np.take_along_axis(np.broadcast_to(own_dt[:, None], both.shape), first, 2)[..., 0])
        return rms, count, diff.sum(2) / per[..., None], near, gap * (count > 0)

    def _tokens(self, kind, t, y, x, own, cy, cx, ok) -> dict:
        """Context pixels (cy, cx) (N, J): their value on the target date, their offset, and how they
        compare with the pixel on its own dates (mean difference per band, RMS, shared dates)."""
        rms, count, mean_diff, near, gap = self._match(own, cy, cx)
        m = ok[..., None]
        return {f"{kind}_val": self.values[t[:, None], :, cy, cx] * m, f"{kind}_mask": ok,
                f"{kind}_dy": (cy - y[:, None]) * ok, f"{kind}_dx": (cx - x[:, None]) * ok,
                f"{kind}_diff": mean_diff * m, f"{kind}_rms": rms * ok,
                f"{kind}_shared": count / self.layout.n_own * ok,
                f"{kind}_near": near * m, f"{kind}_near_gap": gap * ok}

    def random_hide(self, uniforms: np.ndarray, y, x) -> np.ndarray:
        """Training's simulated clouds: a box containing each pixel, its sides drawn between 1 and
        twice the neighbour window, from 4 uniforms per pixel (N, 4) (small boxes more often: isolated cloudy pixels are common; large
        clouds, where no neighbour is near and the analogs must carry the estimate, too)."""
        s = 4 * self.layout.radius + 1
        side = 1 + np.floor(s * uniforms[:, :2] ** 1.5).astype(np.int64)
        start = np.stack([y, x], 1) - np.floor(uniforms[:, 2:4] * side).astype(np.int64)
        return np.concatenate([start, start + side], 1)


def _date_shifts(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """(T, T, C): [t, d] the mean change from date d to date t over the pixels known on both (the
    nearest-shifted reference's shift), 0 where no pixel is."""
    a = known.reshape(len(known), -1).astype(np.float64)
    count = a @ a.T
    shift = np.zeros(count.shape + values.shape[1:2], np.float32)
    for c in range(values.shape[1]):  # band by band: one (T, pixels) float64 copy at a time
        s = (values[:, c].reshape(len(a), -1) * a) @ a.T  # [t, d]: sum of v_t over pixels known on both
        shift[..., c] = np.where(count > 0, (s - s.T) / np.maximum(count, 1), 0.0)
    return shift


def element_shapes(layout: Layout, num_bands: int) -> dict:
    """Per-example shapes and dtypes of `Source.examples` plus the target (the DataSpec's)."""
    m, c = layout.n_own, num_bands
    f, b = np.float32, np.bool_
    shapes = {"own_val": ((m, c), f), "own_dt": ((m,), f), "own_shift": ((m, c), f), "own_mask": ((m,), b),
              "doy": ((), f), "target": ((c,), f)}
    for kind, j in (("nb", layout.n_neighbours), ("an", layout.n_analogs)):
        shapes.update({f"{kind}_val": ((j, c), f), f"{kind}_diff": ((j, c), f), f"{kind}_mask": ((j,), b),
                       f"{kind}_dy": ((j,), f), f"{kind}_dx": ((j,), f), f"{kind}_rms": ((j,), f),
                       f"{kind}_shared": ((j,), f), f"{kind}_near": ((j, c), f),
                       f"{kind}_near_gap": ((j,), f)})
    return shapes


# ------------------------------------------------------------------------ model

def _date_features(dt):
    """A date offset in days -> (..., 8): signed and log scale, and phases of a year / half year /
    quarter / month (the seasonal cycle tells dates a year apart are alike)."""
    feats = [dt / 365.25, jnp.sign(dt) * jnp.log1p(jnp.abs(dt)) / 6.0]
    for period in (365.25, 182.6, 91.3):
        a = 2 * math.pi * dt / period
        feats += [jnp.sin(a), jnp.cos(a)]
    return jnp.stack(feats, -1)


def _offset_features(dy, dx, radius: int):
    d = jnp.sqrt(dy ** 2 + dx ** 2)
    return jnp.stack([dy / radius, dx / radius, d / radius, jnp.log1p(d) / 3.0], -1)


class ContextGPT2(nn.Module):
    """GPT-2 blocks (eojax.models.gpt2) over continuous context tokens, a regression head on the last
    (query) token. Output: (N, C) normalised values."""

    num_bands: int
    layout: Layout
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, batch, train: bool = False):
        lay, d = self.layout, self.n_embd
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        own = jnp.concatenate([f32(batch["own_val"]), f32(batch["own_shift"]),
                               _date_features(f32(batch["own_dt"]))], -1)

        def context(kind, radius):
            return jnp.concatenate([
                f32(batch[f"{kind}_val"]), f32(batch[f"{kind}_diff"]), f32(batch[f"{kind}_near"]),
                f32(batch[f"{kind}_rms"])[..., None], f32(batch[f"{kind}_shared"])[..., None],
                jnp.log1p(f32(batch[f"{kind}_near_gap"]))[..., None] / 6.0,
                _offset_features(f32(batch[f"{kind}_dy"]), f32(batch[f"{kind}_dx"]), radius)], -1)

        doy = 2 * math.pi * f32(batch["doy"]) / 365.25
        query = jnp.stack([jnp.sin(doy), jnp.cos(doy)], -1)[:, None]
        x = jnp.concatenate([nn.Dense(d, name="embed_own", **kw)(own),
                             nn.Dense(d, name="embed_neighbour", **kw)(context("nb", lay.radius)),
                             nn.Dense(d, name="embed_analog", **kw)(context("an", lay.analog_radius)),
                             nn.Dense(d, name="embed_query", **kw)(query)], 1)
        n = x.shape[0]
        valid = jnp.concatenate([batch["own_mask"], batch["nb_mask"], batch["an_mask"], jnp.ones((n, 1), bool)], 1)
        wpe = self.param("wpe", nn.initializers.normal(0.01), (lay.length, d), self.param_dtype)
        x = (x + wpe[None]).astype(self.dtype)
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        causal = jnp.tril(jnp.ones((lay.length, lay.length), bool))
        mask = causal[None] & valid[:, None, :]
        for i in range(self.n_layer):
            x, _ = gpt2_lib.Block(self.n_head, 4 * d, self.n_layer, self.dropout, name=f"h_{i}", **kw)(
                x, mask, train)
        x = gpt2_lib.LayerNorm(1e-5, name="ln_f", **kw)(x[:, -1])
        return nn.Dense(self.num_bands, name="head", dtype=jnp.float32, param_dtype=self.param_dtype)(x)


# ------------------------------------------------------------------------ the family's input and core

class ContextExamples(grain.MapDataset):
    """Element i: pixel i % N of `pixels` (t, y, x) with its context and target. With `hide`, the
    simulated cloud comes from counter-based uniforms of (seed, i): epochs differ, and element i is
    the same whichever batch, thread or restore reads it. `read_batch` builds a whole batch in one
    vectorised pass (the pipeline's batch hook), ~20x faster than element by element."""

    def __init__(self, source: Source, target: np.ndarray, pixels: np.ndarray, seed: int, hide: bool):
        super().__init__()
        self._source, self._target, self._pixels = source, target, pixels
        self._seed, self._hide = int(seed), hide

    def __len__(self) -> int:
        return len(self._pixels)

    def __str__(self) -> str:
        return f"ContextExamples({len(self._pixels)} pixels, {self._source.layout})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return {k: v[0] for k, v in self.read_batch([int(index)]).items() if k != "weight"}

    def read_batch(self, indices) -> dict:
        """Elements `indices` (None = padding: zeros, weight 0) as one batch."""
        real = np.array([i is not None for i in indices])
        index = np.array([i if i is not None else 0 for i in indices], np.int64)
        t, y, x = self._pixels[index % len(self._pixels)].T
        hide = self._source.random_hide(counter_uniforms(self._seed, index, 4), y, x) if self._hide else None
        batch = self._source.examples(t, y, x, hide)
        batch["target"] = self._target[t, :, y, x]
        batch = {k: np.where(real.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0).astype(
            bool if v.dtype == bool else np.float32) for k, v in batch.items()}
        batch["weight"] = real.astype(np.float32)
        return batch


def layout_of(model_cfg) -> Layout:
    return Layout(*(int(model_cfg[f.name]) for f in dataclasses.fields(Layout)))


def normalise(ts, stats: dict) -> np.ndarray:
    """The series' values (T, C, H, W) in the model's units (the spec's per-band statistics), 0 where
    missing."""
    mean = np.asarray(stats["mean"], np.float64)[None, :, None, None]
    std = np.asarray(stats["std"], np.float64)[None, :, None, None]
    return np.nan_to_num((ts.values - mean) / std)


def make_source(ts, known: np.ndarray, stats: dict, layout: Layout) -> Source:
    """The normalised series with `known` (T, H, W) readable as context."""
    return Source(normalise(ts, stats), known, ts.days, ts.doy, layout)


class ContextInput(SeriesInput):
    """Context mode: every clear, not held-out (pixel, date) is a training example; the held-out
    pixels are the eval set, read without simulated clouds (their own box is what hides them)."""

    @functools.cached_property
    def stats(self) -> dict:
        """Per-band mean and standard deviation of the training pixels (the model's units)."""
        v = np.moveaxis(self.series.values, 1, 0)[:, self.split["train"]].astype(np.float64)
        std = v.std(1)
        return {"mean": v.mean(1).tolist(), "std": np.where(std > 0, std, 1.0).tolist()}

    @functools.cached_property
    def source(self) -> Source:
        return Source(self.normalised, self.split["train"], self.series.days, self.series.doy,
                      layout_of(self.config.model))

    def build_spec(self) -> DataSpec:
        ts = self.series
        shapes = element_shapes(layout_of(self.config.model), len(ts.band_names))
        return DataSpec(elements(weight=((), np.float32), **shapes),
                        {"bands": list(ts.band_names), "dates": list(ts.dates), "stats": self.stats})

    @functools.cached_property
    def normalised(self) -> np.ndarray:
        """Every value in the model's units: the targets (held-out ones included)."""
        return normalise(self.series, self.stats)

    def _dataset(self, mask, seed, hide):
        return ContextExamples(self.source, self.normalised, np.argwhere(mask), seed, hide)

    def train(self, process_index, process_count):
        return pipeline.make_iterator(self._dataset(self.split["train"], self.config.seed, True),
                                      batch_size=self.config.batch_size // process_count,
                                      process_index=process_index, process_count=process_count,
                                      shuffle=True, seed=self.config.seed)

    def eval(self, process_index, process_count):
        if not self.split["holdout"].any():
            return None
        ds = self._dataset(self.split["holdout"], 0, False)  # the context stays the training pixels
        return pipeline.make_iter_dataset(ds, batch_size=self.config.batch_size // process_count,
                                          process_index=process_index, process_count=process_count,
                                          shuffle=False, num_epochs=1, drop_remainder=False)


class ContextTask(Task):
    name = "vsat"
    input_class = ContextInput
    plugins = {"infer": "eojax.vsat.infill:run", "eval": "eojax.vsat.infill:evaluate"}

    @classmethod
    def check_config(cls, config):
        check_input_config(config)
        if "tokenizer" in config.model:
            raise ValueError("config.model has GReaT text-row keys (tokenizer ...): this config is for "
                             "task 'vsat_great' (configs/vsat.py:mode=great)")
        lay = layout_of(config.model)
        if min(dataclasses.astuple(lay)) < 1:
            raise ValueError(f"config.model {', '.join(f.name for f in dataclasses.fields(lay))} must be >= 1 "
                             f"(got {lay})")
        if lay.n_neighbours > (2 * lay.radius + 1) ** 2 - 1:
            raise ValueError(f"config.model.n_neighbours={lay.n_neighbours} is more than the "
                             f"{(2 * lay.radius + 1) ** 2 - 1} pixels within radius {lay.radius}")

    @property
    def stats(self) -> dict:
        return self.spec.info["stats"]

    @functools.cached_property
    def model(self) -> ContextGPT2:
        m = self.config.model
        return ContextGPT2(len(self.spec.info["bands"]), layout_of(m), n_embd=m.n_embd, n_layer=m.n_layer,
                           n_head=m.n_head, dropout=m.dropout, dtype=jnp.dtype(m.dtype),
                           param_dtype=jnp.dtype(m.param_dtype))

    def init(self, rng, batch):
        return self.model.init({"params": rng}, batch, train=False)

    def _predict(self, params, batch, rng, train):
        return self.model.apply({"params": params}, batch, train=train, rngs={"dropout": rng} if train else {})

    def loss_fn(self, params, state, batch, rng, train):
        err = jnp.abs(self._predict(params, batch, rng, train) - batch["target"])
        w = batch["weight"][:, None]
        n = jnp.maximum(w.sum() * err.shape[1], 1.0)
        return (err * w).sum() / n, {}, state

    def sampled_loss_fn(self, params, state, batch, rng):
        """Sophia-G's Gauss-Newton-Bartlett estimate for the L1 loss, a Laplace likelihood: labels
        drawn from Laplace(prediction, 1), the loss against them (its gradient's outer product is the
        Laplace Fisher, J^T J)."""
        noise_rng, dropout_rng = jax.random.split(rng)
        pred = self._predict(params, batch, dropout_rng, True)
        labels = jax.lax.stop_gradient(pred) + jax.random.laplace(noise_rng, pred.shape)
        w = batch["weight"][:, None]
        n = w.sum()
        return (jnp.abs(pred - labels) * w).sum() / jnp.maximum(n * pred.shape[1], 1.0), n

    def eval_fn(self, params, state, batch, rng):
        err = jnp.abs(self._predict(params, batch, rng, False) - batch["target"])
        w = batch["weight"][:, None]
        return {"loss_sum": (err * w).sum(), "count": w.sum() * err.shape[1]}

    def predict(self, params, source: Source, t, ys, xs, batch_size: int = 1024) -> tuple:
        """Values (N, C) in the data's units of pixels (ys, xs) on date t, and ok (N,) (always True:
        a regression head always answers; a pixel with no context gets the date's typical value)."""
        apply = jax.jit(lambda p, b: self.model.apply({"params": p}, b))
        out = []
        for s in range(0, len(ys), batch_size):
            idx = slice(s, s + batch_size)
            n = len(ys[idx])
            pad = lambda a: np.concatenate([a, np.repeat(a[-1:], batch_size - n, 0)])
            ex = source.examples(pad(np.full(n, t)), pad(ys[idx]), pad(xs[idx]))
            out.append(np.asarray(apply(params, ex))[:n])
        pred = np.concatenate(out) if out else np.zeros((0, len(self.stats["mean"])))
        values = pred * np.asarray(self.stats["std"]) + np.asarray(self.stats["mean"])
        return values, np.ones(len(values), bool)

    def fill_values(self, params, ts, split, ys, xs, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Pixels (ys, xs) of the target date, read against the series' training pixels."""
        source = make_source(ts, split["train"], self.stats, layout_of(self.config.model))
        return self.predict(params, source, split["t"], ys, xs, int(self.config.infill.batch_size))

    def train_flops_per_example(self) -> float:
        m, lay = self.config.model, layout_of(self.config.model)
        return 3.0 * layers.transformer_flops(lay.length, m.n_embd, m.n_layer, 4 * m.n_embd)
