"""Fill the cloudy pixels of a date by conditional generation, and score it against two baselines.

For every cloud / shadow pixel of the target date (to fill) and every held-out clear pixel of its
box (to score), the prompt is the pixel's known columns "X is <col>, Y is <row>, DOY is <doy>" and the
model writes the bands in a fixed order under a finite-state constraint (eojax.vsat.tokenizers.
build_fsm): separators and column names are forced, values can only be number tokens, then eos.
aispace conditions on a pixel id and DOY only; eojax conditions on X, Y, DOY (the same information
plus the position, so neighbouring pixels share structure). Values of the pixel on other dates are
not in the prompt: training sentences hold one date each, as in aispace.

Generation is batched (part A's KV-cache generator, one compiled shape); a row whose text does not
parse into every band with a value the output dtype can hold is retried by sampling, a few times;
every requested cell ends up either filled or counted as failed (never silently dropped).

Outputs: the filled series as GeoTIFFs (same grid, CRS, dtype and nodata as the input; only the
target date changes), a status GeoTIFF for the target date (0 observed, 1 filled, 2 failed, 3 no
data), and a PNG before | filled pixels | after. Metrics: per-band L1 (mean absolute error) and L2
(mean squared error), in the data's units (DN), on the held-out pixels, for the model and for the
baselines linear temporal interpolation and nearest clear date.
"""
from __future__ import annotations

import datetime
import json
import os
import time

import jax
import numpy as np
import rasterio

from eojax import viz
from eojax.data import qa as qa_lib
from eojax.vsat import great, timeseries, tokenizers
from eojax.vsat import generate as gen_lib

OBSERVED, FILLED, FAILED, NODATA = range(4)


# ------------------------------------------------------------------ baselines

def temporal_baselines(ts: timeseries.TimeSeries, t: int, ys, xs, usable) -> dict:
    """Per pixel (ys, xs) of date t, from the pixel's usable values on the other dates:
    'linear': linear interpolation in time between the nearest usable dates before and after
    (the nearest one alone at either end of the series); 'nearest': the nearest usable date
    (ties: the earlier). -> {name: (values (N, C) float, ok (N,) bool)}; ok False = no usable date."""
    days = np.array([datetime.date.fromisoformat(d).toordinal() for d in ts.dates], np.float64)
    use = usable[:, ys, xs].T.copy()  # (N, T)
    use[:, t] = False
    vals = np.moveaxis(ts.values[:, :, ys, xs], 2, 0).astype(np.float64)  # (N, T, C)
    n, nt = use.shape
    rows = np.arange(n)
    before, after = use & (days < days[t]), use & (days > days[t])
    has_b, has_a = before.any(1), after.any(1)
    ib = nt - 1 - np.argmax(before[:, ::-1], axis=1)  # last usable date before t
    ia = np.argmax(after, axis=1)  # first usable date after t
    vb, va = vals[rows, ib], vals[rows, ia]
    w = ((days[t] - days[ib]) / np.where(has_a & has_b, days[ia] - days[ib], 1.0))[:, None]
    linear = np.where((has_b & has_a)[:, None], vb + w * (va - vb), np.where(has_b[:, None], vb, va))
    dist = np.where(use, np.abs(days[None] - days[t]), np.inf)
    nearest = vals[rows, np.argmin(dist, axis=1)]
    ok = use.any(1)
    return {"linear": (linear, ok), "nearest": (nearest, ok)}


def band_errors(pred: np.ndarray, truth: np.ndarray, ok: np.ndarray, band_names) -> dict:
    """Per-band L1 (mean |error|) and L2 (mean error^2) over the rows where `ok`, plus their means."""
    d = (pred[ok] - truth[ok]).astype(np.float64)
    if not len(d):
        return {"n": 0}
    l1, l2 = np.abs(d).mean(0), (d ** 2).mean(0)
    return {"n": int(ok.sum()), "l1": dict(zip(band_names, l1.round(3).tolist())),
            "l2": dict(zip(band_names, l2.round(1).tolist())),
            "l1_mean": round(float(l1.mean()), 3), "l2_mean": round(float(l2.mean()), 1)}


# ------------------------------------------------------------------ generation

def max_new_tokens(tok, targets, after_prompt: bool, max_number_tokens: int) -> int:
    """The most tokens the FSM lets a row generate: forced pieces, numbers, eos."""
    return 1 + sum(len(tok.encode(tokenizers.field_prefix(tok, c, sep=bool(j) or after_prompt)))
                   + tok.number_length(c, max_number_tokens)[1] for j, c in enumerate(targets))


def generate_values(model, params, tok, known: np.ndarray, known_columns, targets, *, dtype: str,
                    batch_size: int = 256, greedy: bool = True, temperature: float = 0.7, retries: int = 3,
                    max_number_tokens: int = 6, seed: int = 0) -> dict:
    """Generate `targets` for each row of `known` (N, K) ints -> {'values' (N, len(targets)) int64,
    'ok' (N,) bool, 'attempts' (N,) int, 'texts' [str]}. A row is ok when its text parses strictly
    (eojax.vsat.great.parse_row), repeats the known values, and every value fits `dtype`."""
    allowed, next_state, start = tokenizers.build_fsm(tok, targets, after_prompt=bool(known_columns),
                                                      max_number_tokens=max_number_tokens,
                                                      vocab_size=model.vocab_size)
    constraint = gen_lib.Constraint(allowed, next_state)
    max_new = max_new_tokens(tok, targets, bool(known_columns), max_number_tokens)
    prompts = [tok.encode(great.conditional_prompt(dict(zip(known_columns, r))), bos=True)
               for r in np.asarray(known).tolist()]
    width = max(len(p) for p in prompts)
    info = np.iinfo(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else None
    columns = list(known_columns) + list(targets)
    n = len(prompts)
    values = np.zeros((n, len(targets)), np.int64)
    ok = np.zeros(n, bool)
    attempts = np.zeros(n, np.int32)
    texts = [""] * n
    key = jax.random.key(seed)
    for attempt in range(1 + retries):
        todo = np.flatnonzero(~ok)
        if not len(todo):
            break
        temp = 0.0 if (attempt == 0 and greedy) else temperature
        for s in range(0, len(todo), batch_size):
            idx = todo[s:s + batch_size]
            rows = [prompts[i] for i in idx] + [prompts[idx[0]]] * (batch_size - len(idx))  # one shape
            toks, lens = gen_lib.left_pad(rows, tok.pad_id, length=width)
            out = gen_lib.generate(model, params, toks, lens, jax.random.fold_in(key, attempt * 100003 + s),
                                   max_new_tokens=max_new, temperature=temp, stop_tokens=(tok.eos_id,),
                                   pad_id=tok.pad_id, constraint=constraint,
                                   start_state=np.full(batch_size, start, np.int32))
            generated = np.asarray(out.tokens)
            for r, i in enumerate(idx):
                attempts[i] += 1
                text = tok.decode(list(prompts[i]) + generated[r, :int(out.lengths[r])].tolist())
                texts[i] = text
                try:
                    row = great.parse_row(text, columns)
                except great.ParseError:
                    continue
                got = np.array([row[c] for c in targets], np.int64)
                same = all(row[c] == v for c, v in zip(known_columns, known[i]))
                fits = info is None or (got.min() >= info.min and got.max() <= info.max)
                if same and fits:
                    values[i], ok[i] = got, True
    return {"values": values, "ok": ok, "attempts": attempts, "texts": texts}


# ------------------------------------------------------------------ the whole infill

def run(run, variables, workdir: str, options) -> dict:
    """`eojax infer` (the vsat 'infer' plug-in): fill the target date of the run's series (its input:
    the data is what is filled) with the run's model; options: output (default <workdir>/infer), seed."""
    out_dir = options.get("output") or os.path.join(workdir, "infer")
    return fill(run.task, variables[0], run.input.series, run.input.split, out_dir, int(options.get("seed", 0)))


def fill(task, params, ts: timeseries.TimeSeries, split: dict, out_dir: str, seed: int = 0) -> dict:
    """Fill the target date split["t"] of `ts` with the vsat core `task`; write GeoTIFFs, status, PNG
    and metrics.json into out_dir."""
    t, cfg = split["t"], task.config.infill
    fill_y, fill_x = np.nonzero(split["fill"])
    hold_y, hold_x = np.nonzero(split["holdout"][t])
    ys, xs = np.concatenate([fill_y, hold_y]), np.concatenate([fill_x, hold_x])
    known = np.stack([xs, ys, np.full(len(xs), ts.doy[t])], 1)
    tick = time.perf_counter()
    res = generate_values(task.model, params, task.tokenizer, known, timeseries.COORD_COLUMNS, ts.band_names,
                          dtype=ts.dtype, batch_size=cfg.batch_size, greedy=cfg.greedy,
                          temperature=cfg.temperature, retries=cfg.retries,
                          max_number_tokens=task.max_number_tokens(), seed=seed)
    seconds = time.perf_counter() - tick
    nf = len(fill_y)
    ok_fill, ok_hold = res["ok"][:nf], res["ok"][nf:]

    # The filled target date; every other date is written as read (regridded).
    after = ts.values[t].copy()
    after[:, fill_y[ok_fill], fill_x[ok_fill]] = res["values"][:nf][ok_fill].T
    status = np.where(ts.classes[t] == qa_lib.FILL, NODATA, OBSERVED).astype(np.uint8)
    status[fill_y, fill_x] = np.where(ok_fill, FILLED, FAILED)
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for i, date in enumerate(ts.dates):
        values = after if i == t else ts.values[i]
        files.append(timeseries.write_date(ts, values, os.path.join(out_dir, f"filled_{date}.tif")))
    status_path = os.path.join(out_dir, f"status_{ts.dates[t]}.tif")
    _write_status(ts, status, status_path)
    png = os.path.join(out_dir, f"infill_{ts.dates[t]}.png")
    _before_after_png(ts, t, after, status, png)

    truth = np.moveaxis(ts.values[t][:, hold_y, hold_x], 0, 1)
    metrics = {"model": band_errors(res["values"][nf:].astype(np.float64), truth, ok_hold, ts.band_names)}
    for name, (pred, ok) in temporal_baselines(ts, t, hold_y, hold_x, qa_lib.usable(ts.classes)).items():
        metrics[name] = band_errors(np.rint(pred), truth, ok, ts.band_names)
    summary = {
        "target_date": ts.dates[t], "requested": int(len(ys)), "to_fill": int(nf),
        "filled": int(ok_fill.sum()), "failed": int(nf - ok_fill.sum()),
        "holdout": int(len(hold_y)), "holdout_generated": int(ok_hold.sum()),
        "holdout_failed": int(len(hold_y) - ok_hold.sum()),
        "retried_rows": int((res["attempts"] > 1).sum()), "rows_per_sec": round(len(ys) / seconds, 1),
        "metrics": metrics, "geotiffs": files, "status": status_path, "png": png,
    }
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(metrics_table(metrics))
    return summary


def metrics_table(metrics: dict) -> str:
    lines = ["| method | pixels | mean L1 (DN) | mean L2 (DN^2) |", "| --- | --- | --- | --- |"]
    for name, m in metrics.items():
        lines.append(f"| {name} | {m['n']} | {m.get('l1_mean', 'n/a')} | {m.get('l2_mean', 'n/a')} |")
    return "\n".join(lines)


def _write_status(ts, status, path):
    h, w = status.shape
    with rasterio.open(path, "w", driver="GTiff", count=1, height=h, width=w, dtype="uint8", crs=ts.crs,
                       transform=ts.transform) as dst:
        dst.write(status[None])
        dst.set_band_description(1, "0 observed, 1 filled, 2 failed, 3 no data")


def _before_after_png(ts, t, after, status, path):
    """before (clouds as measured) | what was filled (white) or failed (red) | after; one stretch
    (the filled date's), tiles enlarged to ~256 px."""
    valid = status != NODATA
    before = np.nan_to_num(np.moveaxis(ts.values[t], 0, -1))
    filled = np.nan_to_num(np.moveaxis(after, 0, -1))
    mask = np.zeros(status.shape + (3,), np.uint8)
    mask[status == FILLED] = 255
    mask[status == FAILED] = (255, 0, 0)
    tiles = [viz.to_rgb8(before, ts.band_names, valid, ref=filled), mask,
             viz.to_rgb8(filled, ts.band_names, valid, ref=filled)]
    viz.save_grid_png(path, [tiles], scale=max(1, 256 // max(status.shape)))
