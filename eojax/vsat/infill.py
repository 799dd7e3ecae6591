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

Outputs: the filled series as Cloud Optimized GeoTIFFs (same grid, CRS, dtype and nodata as the
input; only the target date changes), a status COG for the target date (0 observed, 1 filled,
2 failed, 3 no data, the nodata value), and a PNG before | filled pixels | after. Metrics: per-band
L1 (mean absolute error) and L2 (mean squared error), in the data's units (DN), on the held-out
pixels, for the model and for the baselines linear temporal interpolation and nearest clear date.
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from eojax import viz
from eojax.data import qa as qa_lib
from eojax.data.cog import write_cog
from eojax.vsat import great, references, timeseries, tokenizers
from eojax.vsat import generate as gen_lib

OBSERVED, FILLED, FAILED, NODATA = range(4)


# ------------------------------------------------------------------ baselines

def band_errors(pred: np.ndarray, truth: np.ndarray, ok: np.ndarray, band_names) -> dict:
    """Per-band L1 (mean |error|) and L2 (mean error^2) over the rows where `ok`, plus their means."""
    d = (pred[ok] - truth[ok]).astype(np.float64)
    if not len(d):
        return {"n": 0}
    l1, l2 = np.abs(d).mean(0), (d ** 2).mean(0)
    sig = lambda v: float(f"{v:.6g}")  # noqa: E731 - 6 significant digits: DN and NDVI alike
    return {"n": int(ok.sum()), "l1": {b: sig(v) for b, v in zip(band_names, l1)},
            "l2": {b: sig(v) for b, v in zip(band_names, l2)},
            "l1_mean": sig(l1.mean()), "l2_mean": sig(l2.mean())}


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


def evaluate(run, variables, workdir: str, options) -> dict:
    """`eojax eval vsat` (the 'eval' plug-in): the held-out clear pixels of the target date filled by
    the model and by the four references; metrics.json, a PNG and GeoTIFFs in options['output']."""
    out_dir = options.get("output") or os.path.join(workdir, "eval")
    return score(run.task, variables[0], run.input.series, run.input.split, out_dir, int(options.get("seed", 0)))


def fill(task, params, ts: timeseries.TimeSeries, split: dict, out_dir: str, seed: int = 0) -> dict:
    """Fill the cloud and shadow pixels of the target date split["t"] of `ts` with the vsat core
    `task` (and score its held-out pixels); write GeoTIFFs, status, PNG and metrics.json into out_dir."""
    t = split["t"]
    fill_y, fill_x = np.nonzero(split["fill"])
    hold_y, hold_x = np.nonzero(split["holdout"][t])
    ys, xs = np.concatenate([fill_y, hold_y]), np.concatenate([fill_x, hold_x])
    tick = time.perf_counter()
    values, ok = task.fill_values(params, ts, split, ys, xs, seed)
    seconds = time.perf_counter() - tick
    nf = len(fill_y)
    ok_fill = ok[:nf]

    # The filled target date; every other date is written as read (regridded).
    after = ts.values[t].copy()
    after[:, fill_y[ok_fill], fill_x[ok_fill]] = values[:nf][ok_fill].T
    status = np.where(ts.classes[t] == qa_lib.FILL, NODATA, OBSERVED).astype(np.uint8)
    status[fill_y, fill_x] = np.where(ok_fill, FILLED, FAILED)
    os.makedirs(out_dir, exist_ok=True)
    files = []
    for i, date in enumerate(ts.dates):
        files.append(timeseries.write_date(ts, after if i == t else ts.values[i],
                                           os.path.join(out_dir, f"filled_{date}.tif")))
    status_path = os.path.join(out_dir, f"status_{ts.dates[t]}.tif")
    _write_status(ts, status, status_path)
    summary = {
        "target_date": ts.dates[t], "requested": int(len(ys)), "to_fill": int(nf),
        "filled": int(ok_fill.sum()), "failed": int(nf - ok_fill.sum()), "holdout": int(len(hold_y)),
        "pixels_per_sec": round(len(ys) / max(seconds, 1e-9), 1), "seconds": round(seconds, 2),
        "metrics": compare(ts, split, methods(ts, split, values[nf:], ok[nf:], hold_y, hold_x), hold_y, hold_x)
        if len(hold_y) else {},
        "geotiffs": files, "status": status_path,
    }
    summary["png"] = viz.save_figure(before_after_figure(ts, t, after, status, split["holdout"][t], summary),
                                     os.path.join(out_dir, f"infill_{ts.dates[t]}.png"))
    _write_json(summary, out_dir)
    if summary["metrics"]:
        print(metrics_table(summary["metrics"]))
    return summary


def score(task, params, ts: timeseries.TimeSeries, split: dict, out_dir: str, seed: int = 0) -> dict:
    """The held-out pixels of the target date: the model against the references (metrics.json, a PNG
    of truth, each method and its error, one GeoTIFF per method of the date with them filled)."""
    t = split["t"]
    hold_y, hold_x = np.nonzero(split["holdout"][t])
    if not len(hold_y):
        raise ValueError("config.input.holdout='none' hides no pixel: nothing to score (use 'box' or 'random')")
    tick = time.perf_counter()
    values, ok = task.fill_values(params, ts, split, hold_y, hold_x, seed)
    seconds = time.perf_counter() - tick
    preds = methods(ts, split, values, ok, hold_y, hold_x)
    metrics = compare(ts, split, preds, hold_y, hold_x)
    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for name, (pred, good) in preds.items():
        date = ts.values[t].copy()
        date[:, hold_y[good], hold_x[good]] = pred[good].T
        files[name] = timeseries.write_date(ts, date, os.path.join(out_dir, f"{name}_{ts.dates[t]}.tif"))
    png = viz.save_figure(comparison_figure(ts, t, split["holdout"][t], preds, metrics),
                          os.path.join(out_dir, f"holdout_{ts.dates[t]}.png"))
    summary = {"target_date": ts.dates[t], "holdout": int(len(hold_y)), "seconds": round(seconds, 2),
               "metrics": metrics, "geotiffs": files, "png": png}
    _write_json(summary, out_dir)
    print(metrics_table(metrics))
    return summary


def methods(ts, split, values, ok, hold_y, hold_x) -> dict:
    """{name: (values (N, C), ok (N,))}: the model's and the four references' for the held-out pixels,
    the references from the same knowledge as the model (the training pixels)."""
    refs = references.compute(ts.values, split["train"], ts.days, split["t"], hold_y, hold_x)
    return {"model": (values, ok), **refs}


def compare(ts, split, preds: dict, hold_y, hold_x) -> dict:
    """Per-band and mean L1 / L2 of each method (`methods`) on the held-out pixels, the fraction each
    filled, and how much its values vary per pixel (std ratio to the truth, per band)."""
    truth = np.moveaxis(ts.values[split["t"]][:, hold_y, hold_x], 0, 1).astype(np.float64)
    out = {}
    for name, (pred, good) in preds.items():
        m = band_errors(pred.astype(np.float64), truth, good, ts.band_names)
        m["filled_fraction"] = round(float(good.mean()), 4) if len(good) else 0.0
        if good.any():
            spread = pred[good].std(0) / np.maximum(truth[good].std(0), 1e-12)
            m["std_ratio"] = dict(zip(ts.band_names, np.round(spread, 3).tolist()))
        out[name] = m
    best = min(references.NAMES, key=lambda k: out[k].get("l1_mean", np.inf))
    if "l1_mean" in out["model"] and out[best].get("l1_mean", 0) > 0:
        out["summary"] = {"best_reference": best,
                          "gain_over_best": round(1 - out["model"]["l1_mean"] / out[best]["l1_mean"], 4)}
    return out


def _write_json(summary, out_dir):
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)


def metrics_table(metrics: dict) -> str:
    lines = ["| method | pixels | filled | mean L1 | mean L2 | min std ratio |", "| --- | --- | --- | --- | --- | --- |"]
    for name, m in metrics.items():
        if name == "summary":
            continue
        spread = min(m["std_ratio"].values()) if m.get("std_ratio") else "n/a"
        lines.append(f"| {name} | {m['n']} | {m['filled_fraction']} | {m.get('l1_mean', 'n/a')} | "
                     f"{m.get('l2_mean', 'n/a')} | {spread} |")
    if "summary" in metrics:
        lines.append(f"model vs the best reference ({metrics['summary']['best_reference']}): "
                     f"{100 * metrics['summary']['gain_over_best']:.1f} % lower mean L1")
    return "\n".join(lines)


def _write_status(ts, status, path):
    write_cog(path, status[None].astype(np.uint8), crs=ts.crs, transform=ts.transform, nodata=NODATA,
              descriptions=("0 observed, 1 filled, 2 failed, 3 no data",), categorical=True)


STATUS_COLOURS = {OBSERVED: ("observed", (0, 0, 0)), FILLED: ("filled", (255, 255, 255)),
                  FAILED: ("failed", (255, 0, 0)), NODATA: ("no data", (128, 128, 128))}


def before_after_figure(ts, t, after, status, hold, summary):
    """before (clouds as measured) | what was filled or failed | after; one stretch (the filled
    date's), the held-out pixels outlined, the counts and the model's held-out L1 in the caption."""
    valid = status != NODATA
    before = np.nan_to_num(np.moveaxis(ts.values[t], 0, -1))
    filled = np.nan_to_num(np.moveaxis(after, 0, -1))
    colours = np.array([c for _, c in STATUS_COLOURS.values()], np.uint8)
    tiles = [viz.to_rgb8(before, ts.band_names, valid, ref=filled), colours[status],
             viz.to_rgb8(filled, ts.band_names, valid, ref=filled)]
    shown = {"filled": f"{summary['filled']} of {summary['to_fill']}", "failed": summary["failed"]}
    if "l1_mean" in summary["metrics"].get("model", {}):
        shown[f"model L1 on {summary['holdout']} held-out pixels"] = summary["metrics"]["model"]["l1_mean"]
    return viz.grid_figure([tiles], columns=(f"before ({ts.dates[t]})", "status", "after"),
                           classes=list(STATUS_COLOURS.values()), outlines=viz.outline_of(hold),
                           title=f"infill of {ts.dates[t]}" + (" (held-out pixels outlined)" if hold.any() else ""),
                           caption=viz.caption(None, shown, f"{summary['pixels_per_sec']} pixels/s"))


def comparison_figure(ts, t, hold, preds: dict, metrics: dict):
    """Top row: the truth, then each method's date (held-out pixels replaced), titled with its mean L1;
    bottom row: each method's mean absolute error over the bands on the held-out pixels, on one colour
    scale for every method; the held-out pixels outlined everywhere."""
    valid = np.isfinite(ts.values[t]).all(0)
    truth = np.nan_to_num(np.moveaxis(ts.values[t], 0, -1))
    ys, xs = np.nonzero(hold)
    images, errors = [], []
    for pred, good in preds.values():
        image = truth.copy()
        image[ys[good], xs[good]] = pred[good]
        images.append(image)
        err = np.zeros(hold.shape)
        err[ys[good], xs[good]] = np.abs(pred[good] - truth[ys[good], xs[good]]).mean(1)
        errors.append(err)
    top = max(max(e.max() for e in errors), 1e-12)
    rows = [[viz.to_rgb8(truth, ts.band_names, valid)] + [viz.to_rgb8(im, ts.band_names, valid, ref=truth)
                                                         for im in images],
            [None] + errors]
    columns = ["truth"] + [f"{name}\nL1 {viz.fmt(metrics[name]['l1_mean'])}" if "l1_mean" in metrics.get(name, {})
                           else name for name in preds]
    summary = metrics.get("summary")
    note = (f"model vs best reference ({summary['best_reference']}): {100 * summary['gain_over_best']:.1f} % "
            "lower mean L1") if summary else ""
    return viz.grid_figure(rows, columns=columns, row_labels=("date", "|error|"), outlines=viz.outline_of(hold),
                           colour_bar=viz.ColourBar("mean |error| over bands (DN)", 0.0, top),
                           title=f"held-out pixels of {ts.dates[t]} ({len(ys)} pixels, outlined)",
                           caption=viz.caption(None, {}, note))
