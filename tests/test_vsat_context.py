"""The Virtual Satellite's context mode: example building against per-pixel loops, batching, the
loss, training through the trainer and the built-in evaluation against the references."""
import json
import os

import jax
import numpy as np
import pytest

from eojax import tasks, train
from eojax.data import synthetic
from eojax.vsat import context, references
from helpers import ONE_DEVICE, load_config

LAYOUT = context.Layout(n_own=3, n_neighbours=4, radius=3, n_analogs=3, analog_radius=6, analog_stride=2)


def _series(seed=0, t=5, c=2, h=12, w=13):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(t, c, h, w)).astype(np.float32)
    known = rng.random((t, h, w)) > 0.35
    days = np.array([0.0, 30.0, 45.0, 90.0, 200.0])[:t]
    return values, known, days


def _loop_example(values, known, days, lay, t, y, x, hide):
    """One pixel's context from the definitions, with plain loops."""
    T, C, H, W = values.shape
    own = [d for d in sorted(range(T), key=lambda d: (abs(days[d] - days[t]), d)) if d != t and known[d, y, x]]
    own = own[:lay.n_own]

    def hidden(cy, cx):
        return hide is not None and hide[0] <= cy < hide[2] and hide[1] <= cx < hide[3]

    def clear(cy, cx):
        return 0 <= cy < H and 0 <= cx < W and known[t, cy, cx] and not hidden(cy, cx) and (cy, cx) != (y, x)

    def compare(cy, cx):
        shared = [d for d in own if known[d, cy, cx]]
        diffs = np.array([values[d, :, cy, cx] - values[d, :, y, x] for d in shared]).reshape(len(shared), C)
        rms = np.sqrt((diffs ** 2).sum() / (max(len(shared), 1) * C))
        mean = diffs.sum(0) / max(len(shared), 1)
        near = diffs[0] if shared else np.zeros(C)  # own dates are nearest first
        gap = abs(days[shared[0]] - days[t]) if shared else 0.0
        return rms, len(shared), mean, near, gap

    def grid(radius, stride):
        cells = [(dy, dx) for dy in range(-radius, radius + 1, stride) for dx in range(-radius, radius + 1, stride)
                 if (dy, dx) != (0, 0)]
        return sorted(cells, key=lambda o: np.hypot(*o))  # stable: raster order among ties

    near = [(y + dy, x + dx) for dy, dx in grid(lay.radius, 1) if clear(y + dy, x + dx)][:lay.n_neighbours]
    candidates = [(y + dy, x + dx) for dy, dx in grid(lay.analog_radius, lay.analog_stride) if clear(y + dy, x + dx)]
    scored = [(compare(*p)[0], i, p) for i, p in enumerate(candidates) if compare(*p)[1] > 0]
    analogs = [p for _, _, p in sorted(scored)[:lay.n_analogs]]
    return own, near, analogs, compare


def test_examples_match_per_pixel_loops():
    values, known, days = _series()
    source = context.Source(values, known, days, days + 1, LAYOUT)
    rng = np.random.default_rng(3)
    ts, ys, xs = np.nonzero(known)
    pick = rng.choice(len(ts), 40, replace=False)
    t, y, x = ts[pick], ys[pick], xs[pick]
    hide = source.random_hide(rng.random((40, 4)), y, x)
    hide[::2] = -100  # half the pixels without a simulated cloud (a box off the grid)
    ex = source.examples(t, y, x, hide)
    checked_analogs = 0
    for i in range(40):
        own, near, analogs, compare = _loop_example(values, known, days, LAYOUT, t[i], y[i], x[i], hide[i])
        m = len(own)
        assert ex["own_mask"][i].tolist() == [True] * m + [False] * (LAYOUT.n_own - m)
        np.testing.assert_allclose(ex["own_val"][i, :m], values[own, :, y[i], x[i]], rtol=1e-6)
        np.testing.assert_allclose(ex["own_dt"][i, :m], days[own] - days[t[i]])
        for k, d in enumerate(own):  # the date's mean change from d, over the pixels known on both
            both = known[d] & known[t[i]]
            np.testing.assert_allclose(ex["own_shift"][i, k], (values[t[i]] - values[d])[:, both].mean(1),
                                       rtol=1e-5, atol=1e-6)
        assert ex["doy"][i] == days[t[i]] + 1
        for kind, cells, n in (("nb", near, LAYOUT.n_neighbours), ("an", analogs, LAYOUT.n_analogs)):
            assert ex[f"{kind}_mask"][i].tolist() == [True] * len(cells) + [False] * (n - len(cells))
            for j, (cy, cx) in enumerate(cells):
                rms, shared, mean, near_diff, gap = compare(cy, cx)
                assert (ex[f"{kind}_dy"][i, j], ex[f"{kind}_dx"][i, j]) == (cy - y[i], cx - x[i])
                np.testing.assert_allclose(ex[f"{kind}_val"][i, j], values[t[i], :, cy, cx], rtol=1e-6)
                np.testing.assert_allclose(ex[f"{kind}_diff"][i, j], mean, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(ex[f"{kind}_rms"][i, j], rms, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(ex[f"{kind}_shared"][i, j], shared / LAYOUT.n_own)
                np.testing.assert_allclose(ex[f"{kind}_near"][i, j], near_diff, rtol=1e-5, atol=1e-6)
                assert ex[f"{kind}_near_gap"][i, j] == gap
            checked_analogs += len(analogs) if kind == "an" else 0
            assert not ex[f"{kind}_val"][i, len(cells):].any()  # padding is zeros
    assert checked_analogs > 40


def test_read_batch_is_elementwise_and_deterministic():
    values, known, days = _series(1)
    source = context.Source(values, known, days, days, LAYOUT)
    ds = context.ContextExamples(source, values, np.argwhere(known), seed=7, hide=True)
    batch = ds.read_batch([3, None, len(ds) + 3])
    assert batch["weight"].tolist() == [1.0, 0.0, 1.0]
    one = ds[3]
    for k, v in one.items():
        np.testing.assert_array_equal(batch[k][0], v)
        assert not batch[k][1].any()
    # Element N + 3 (the next epoch) is the same pixel under another simulated cloud.
    assert np.array_equal(batch["target"][2], batch["target"][0])
    assert any(not np.array_equal(batch[k][2], batch[k][0]) for k in ("nb_dy", "nb_mask", "an_dy"))
    again = ds.read_batch([3, None, len(ds) + 3])
    assert all(np.array_equal(again[k], batch[k]) for k in batch)


@pytest.fixture(scope="module")
def syn_config(tmp_path_factory):
    d = tmp_path_factory.mktemp("vsat_ctx")
    synthetic.write_time_series(str(d), seed=5, n_dates=5, height=24, width=24, sensor="landsat8",
                                labels=False, cloud_fraction=0.25)
    return lambda arg="runlocal", **kw: load_config("vsat", arg, **{
        "input.source": "multiband", "mesh": ONE_DEVICE,
        "input.paths": (str(d / "ts_*.tif"),), "input.qa_format": "eojax_synthetic",
        "input.bands": ("B2", "B3", "B4"), "input.target_date": "", "batch_size": 16,
        "model.n_own": 3, "model.n_neighbours": 4, "model.radius": 3, "model.n_analogs": 4,
        "model.analog_radius": 8, "model.analog_stride": 2, "model.n_embd": 32, **kw})


def test_loss_is_the_weighted_l1_and_sophia_counts_real_rows(syn_config):
    run = train.setup(syn_config(), devices=jax.devices()[:1])
    state = run.init_state()
    task = run.task
    batch = {k: np.asarray(v) for k, v in next(run.train_iter).items() if k in run.batch_shardings}
    batch["weight"][-3:] = 0.0
    rng = jax.random.key(0)
    loss = float(jax.jit(lambda p, b: task.loss_fn(p, {}, b, rng, False)[0])(state.params, batch))
    pred = np.asarray(jax.jit(lambda p, b: task.model.apply({"params": p}, b))(state.params, batch), np.float64)
    real = batch["weight"] > 0
    np.testing.assert_allclose(loss, np.abs(pred - batch["target"])[real].mean(), rtol=1e-5)
    scribbled = dict(batch, target=batch["target"].copy())
    scribbled["target"][~real] += 100.0
    np.testing.assert_allclose(float(task.loss_fn(state.params, {}, scribbled, rng, False)[0]), loss, rtol=1e-6)
    _, n = jax.jit(lambda p, b: task.sampled_loss_fn(p, {}, b, rng))(state.params, batch)
    assert int(n) == int(real.sum())


def test_config_errors_name_the_key(syn_config):
    with pytest.raises(ValueError, match="n_neighbours=60"):
        tasks.make_input(syn_config(**{"model.n_neighbours": 60}))
    with pytest.raises(ValueError, match="analog_stride"):
        tasks.make_input(syn_config(**{"model.analog_stride": 0}))
    with pytest.raises(ValueError, match="holdout_fraction"):
        tasks.make_input(syn_config(**{"input.holdout": "random", "input.holdout_fraction": 1.5})).split


@pytest.mark.slow
def test_trains_then_beats_the_median_and_eval_writes_every_method(syn_config, tmp_path):
    """A short run through the trainer (8 devices), then `eojax eval vsat`'s plug-in: every method
    scored on the same held-out pixels, the model fills all of them and is better than the date's
    median (the one reference that knows nothing of the pixel); PNG and one GeoTIFF per method."""
    config = syn_config(total_steps=200, checkpoint_every=200, eval_every=0, log_every=100, eval_steps=1,
                        **{"optim.lr": 3e-3, "input.holdout": "random", "input.holdout_fraction": 0.2},
                        mesh=(("data", -1), ("fsdp", 1), ("model", 1)))
    result = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(result["train"]["loss"])
    run, variables = train.load_for_inference(config, str(tmp_path))
    with run.scope():
        out = tasks.require_plugin(run.task, "eval", "eojax eval")(
            run, variables, str(tmp_path), {"output": str(tmp_path / "eval"), "seed": 0})
    m = out["metrics"]
    assert set(m) == {"model", *references.NAMES, "summary"}
    assert m["model"]["filled_fraction"] == 1.0 and m["model"]["n"] == out["holdout"] > 0
    assert m["model"]["l1_mean"] < m["median"]["l1_mean"]
    assert min(m["model"]["std_ratio"].values()) > 0.3
    assert os.path.getsize(out["png"]) > 0 and set(out["geotiffs"]) == {"model", *references.NAMES}
    with open(tmp_path / "eval" / "metrics.json") as f:
        assert json.load(f)["metrics"]["model"]["l1_mean"] == m["model"]["l1_mean"]


def test_split_errors_name_the_problem():
    import ml_collections

    from eojax.data import qa
    from eojax.vsat import task as vsat_task, timeseries

    values = np.ones((3, 2, 6, 6), np.float32)
    classes = np.full((3, 6, 6), qa.CLEAR, np.uint8)
    dates = ("2020-01-01", "2020-02-01", "2020-03-01")

    def split(classes=classes, dates=dates, **kw):
        cfg = ml_collections.ConfigDict({**dict(target_date="2020-02-01", holdout="box",
                                                holdout_box=(0.0, 0.0, 0.5, 0.5), holdout_fraction=0.1), **kw})
        n = len(dates)
        return vsat_task.make_split(timeseries.TimeSeries(values[:n], classes[:n], dates, ("B1", "B2")), cfg)

    assert split()["holdout"].sum() == 9
    with pytest.raises(ValueError, match="one date"):
        split(classes=classes[:1], dates=dates[:1], target_date="")
    cloudy = classes.copy()
    cloudy[1] = qa.CLOUD
    with pytest.raises(ValueError, match="no clear pixel is left visible on the target date 2020-02-01"):
        split(classes=cloudy, holdout="none")
    with pytest.raises(ValueError, match="hides no clear pixel of 2020-02-01"):
        split(classes=cloudy)
    with pytest.raises(ValueError, match=r"holdout_box=\(0.5, 0.0, 1.5, 0.5\)"):
        split(holdout_box=(0.5, 0.0, 1.5, 0.5))
    with pytest.raises(ValueError, match="'sometimes'"):
        split(holdout="sometimes")
    with pytest.raises(ValueError, match="2021-01-01"):
        split(target_date="2021-01-01")
