"""How much of a held-out date can the information the Virtual Satellite reads predict at all?

An optimistic bound for a case of docs/vsat.md: per band, a least-absolute-deviation linear fit of the
held-out pixels' true values from what is known about each pixel (its value on every other date,
the date's median where it was not clear, with a flag; the mean of its clear neighbours within 3 px
on the target date; a constant), fitted ON the held-out pixels themselves. No method that uses this
information linearly can do better on them (with many dates the in-sample fit also overfits, so the
bound is loose there); when even this fit does not reach 20 % below the best reference, the issue's
goal is out of reach for the case. Prints its L1 next to the
references' (the data's units, mean over bands).

  python bench/vsat_oracle.py --config=configs/vsat.py --config.input.pathrow=014032 \
      --config.input.target_date=2018-06-15
"""
from __future__ import annotations

import sys

import numpy as np
from absl import app
from ml_collections import config_flags
from scipy import optimize

from eojax.vsat import references, timeseries
from eojax.vsat.task import make_split

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/vsat.py config")


def lad_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least absolute deviations: argmin_w sum |x w - y| as a linear programme."""
    n, k = x.shape
    # variables: w (k, free), u (n, >= 0), v (n, >= 0) with x w - y = u - v; minimise sum u + v
    c = np.concatenate([np.zeros(k), np.ones(2 * n)])
    a_eq = np.concatenate([x, -np.eye(n), np.eye(n)], axis=1)
    bounds = [(None, None)] * k + [(0, None)] * (2 * n)
    res = optimize.linprog(c, A_eq=a_eq, b_eq=y, bounds=bounds, method="highs")
    return res.x[:k]


def oracle_l1(ts, split) -> float:
    t, train, holdout = split["t"], split["train"], split["holdout"]
    ys, xs = np.nonzero(holdout[t])
    values = ts.values.astype(np.float64)  # (T, C, H, W)
    others = [d for d in range(len(ts.dates)) if d != t]
    errors = []
    for c in range(values.shape[1]):
        cols = [np.ones(len(ys))]
        for d in others:
            clear = train[d, ys, xs]
            median = np.median(values[d, c][train[d]]) if train[d].any() else 0.0
            cols += [np.where(clear, values[d, c, ys, xs], median), clear.astype(float)]
        near = []
        for y, x in zip(ys, xs):
            win = (slice(max(y - 3, 0), y + 4), slice(max(x - 3, 0), x + 4))
            ok = train[t][win]
            near.append(values[t, c][win][ok].mean() if ok.any() else np.median(values[t, c][train[t]]))
        cols.append(np.array(near))
        x = np.stack(cols, 1)
        y = values[t, c, ys, xs]
        errors.append(np.abs(x @ lad_fit(x, y) - y).mean())
    return float(np.mean(errors))


def main(argv):
    cfg = _CONFIG.value
    ts = timeseries.load_series(cfg.input)
    split = make_split(ts, cfg.input)
    t = split["t"]
    ys, xs = np.nonzero(split["holdout"][t])
    refs = references.compute(ts.values, split["train"], ts.days, t, ys, xs)
    truth = ts.values[t][:, ys, xs].T
    row = {name: float(np.abs(pred - truth).mean()) for name, (pred, _) in refs.items()}
    best = min(row, key=row.get)
    bound = oracle_l1(ts, split)
    print(f"| case | held-out px | {' | '.join(row)} | in-sample LAD bound | bound vs best |")
    print(f"| {ts.dates[t]} | {len(ys)} | {' | '.join(f'{v:,.4g}' for v in row.values())} | {bound:,.4g} | "
          f"{100 * (1 - bound / row[best]):.1f} % below {best} |")


if __name__ == "__main__":
    app.run(main, argv=sys.argv[:1] + [a for a in sys.argv[1:]])
