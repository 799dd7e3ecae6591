"""Pixel time series: a stack of dates on one grid, with a QA class per pixel, and its table rows.

A `TimeSeries` is a (T, C, H, W) cube of band values (NaN = no data), a (T, H, W) cube of QA classes
(eojax.data.qa), the dates, and the grid (CRS, transform) plus what is needed to write GeoTIFFs like
the input (source dtype and nodata). Three ways in:

- `from_band_files`: one file per band per date (the USGS Landsat layout, e.g. ../shared/data/
  gdalcubes_L8NY18); `landsat_scenes(root, pathrow)` finds the files and dates.
- `from_multiband_files`: one multi-band file per date with a QA band (eojax.data.synthetic writes
  these); the date from a 'date' / 'DATE_ACQUIRED' tag or from the file name.
- `from_csv`: aispace's layout, one row per pixel and date: B01..B11, 0/1 flag columns
  (cirrus, cloud, adj_cloud, cloud_shadow, snow_ice, water), X, Y, DOY; -9999 = no data.

Dates whose footprints differ are regridded onto one reference grid (the first date's, by default)
by GDAL's warper through eojax.data.stack (rasterio WarpedVRT), with nearest resampling so that
digital numbers and QA bits stay exactly as measured. Pixels outside a date's footprint are fill.

Table rows (for GReaT text) are X (column), Y (row), DOY and the bands, all integers.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import glob
import hashlib
import os
import re
from typing import Mapping, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window

from eojax.data import qa as qa_lib
from eojax.data.raster import RasterError
from eojax.data.stack import StackedScene

COORD_COLUMNS = ("X", "Y", "DOY")


@dataclasses.dataclass
class TimeSeries:
    values: np.ndarray          # (T, C, H, W) float32 (float64 for wide types), NaN = no data
    classes: np.ndarray         # (T, H, W) uint8 eojax.data.qa classes
    dates: tuple[str, ...]      # ISO dates, ascending
    band_names: tuple[str, ...]
    crs: object = None          # rasterio CRS (None for a CSV table)
    transform: Affine = Affine.identity()
    dtype: str = "uint16"       # the source dtype, for output GeoTIFFs
    nodata: float | None = None  # the source nodata (None: the files had none)
    files: tuple[str, ...] = ()

    def __post_init__(self):
        t, c, h, w = self.values.shape
        if self.classes.shape != (t, h, w):
            raise ValueError(f"classes {self.classes.shape} do not match values {self.values.shape}")
        if len(self.dates) != t or len(self.band_names) != c:
            raise ValueError(f"{len(self.dates)} dates / {len(self.band_names)} band names for values "
                             f"{self.values.shape}")
        if list(self.dates) != sorted(self.dates):
            raise ValueError(f"dates must ascend: {self.dates}")
        # A pixel without every band measured is fill, whatever its QA says.
        self.classes = np.where(np.isnan(self.values).any(axis=1), qa_lib.FILL, self.classes).astype(np.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[2:]

    @property
    def doy(self) -> np.ndarray:
        return np.array([datetime.date.fromisoformat(d).timetuple().tm_yday for d in self.dates])

    @property
    def columns(self) -> tuple[str, ...]:
        return COORD_COLUMNS + tuple(self.band_names)

    def date_index(self, date: str) -> int:
        if date not in self.dates:
            raise ValueError(f"date {date!r} is not in the series {list(self.dates)}")
        return self.dates.index(date)

    def rows(self, mask: np.ndarray) -> np.ndarray:
        """Table rows of the pixels where mask (T, H, W) is True -> (N, 3 + C) int64 in `columns`
        order, in (t, y, x) order. Only usable pixels (all bands measured) may be asked for."""
        t, y, x = np.nonzero(mask)
        vals = self.values[t, :, y, x]
        if np.isnan(vals).any():
            raise ValueError("rows() asked for pixels with missing band values")
        return np.concatenate([np.stack([x, y, self.doy[t]], 1), np.rint(vals)], 1).astype(np.int64)

    def fingerprint(self) -> str:
        """Hash of the input files' names, sizes and modification times (results.json)."""
        h = hashlib.sha256()
        for f in self.files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- dates

_DATE_PATTERNS = (re.compile(r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)"),
                  re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"))


def date_from_name(path: str) -> str:
    """The first YYYY-MM-DD or YYYYMMDD in a file name (Landsat: the acquisition date comes first)."""
    name = os.path.basename(os.path.normpath(path))
    for pat in _DATE_PATTERNS:
        for m in pat.finditer(name):
            try:
                return datetime.date(*map(int, m.groups())).isoformat()
            except ValueError:
                continue
    raise ValueError(f"no date (YYYY-MM-DD or YYYYMMDD) in the file name {name!r}; give dates explicitly")


def _date_of(path: str) -> str:
    with rasterio.open(path) as src:
        tags = src.tags()
    for key in ("date", "DATE_ACQUIRED", "ACQUISITION_DATE"):
        if key in tags:
            return datetime.date.fromisoformat(tags[key][:10]).isoformat()
    return date_from_name(path)


# ---------------------------------------------------------------- GeoTIFF stacks

def _reference_grid(path: str):
    with rasterio.open(path) as src:
        if src.crs is None:
            raise RasterError(f"{path} has no CRS; a time series needs georeferenced dates")
        return src.crs, src.transform, (src.height, src.width), src.dtypes[0], src.nodata


def _read_on_grid(sources, grid, names) -> np.ndarray:
    """Sources warped onto `grid` (crs, transform, (h, w)) with nearest resampling -> (C, h, w), NaN
    outside footprints / at nodata."""
    crs, transform, (h, w) = grid
    scene = StackedScene(sources, crs=crs, transform=transform, shape=(h, w), resampling="nearest",
                         band_names=names, dtype="float64")
    try:
        pixels, _ = scene.read_pixels(Window(0, 0, w, h))
    finally:
        scene.close()
    return pixels


def from_band_files(scenes: Sequence[Mapping], *, qa_format: str, reference: int = 0,
                    min_confidence: int = 3) -> TimeSeries:
    """Scenes: [{'date': 'YYYY-MM-DD', 'bands': {name: path}, 'qa': path}, ...] (any date order).

    Every date is warped onto the grid of scene `reference` (index after sorting by date).
    """
    if not scenes:
        raise ValueError("from_band_files needs at least one scene")
    scenes = sorted(scenes, key=lambda s: s["date"])
    names = list(scenes[0]["bands"])
    for s in scenes:
        if list(s["bands"]) != names:
            raise ValueError(f"scene {s['date']} has bands {list(s['bands'])}, the first has {names}")
        for p in [*s["bands"].values(), s["qa"]]:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"scene {s['date']}: {p} does not exist")
    if len({s["date"] for s in scenes}) != len(scenes):
        raise ValueError(f"two scenes share a date: {[s['date'] for s in scenes]}")
    crs, transform, shape, dtype, nodata = _reference_grid(scenes[reference]["bands"][names[0]])
    values, classes, files = [], [], []
    for s in scenes:
        paths = [s["bands"][n] for n in names] + [s["qa"]]
        cube = _read_on_grid(paths, (crs, transform, shape), names + ["__qa__"])
        values.append(cube[:-1])
        classes.append(qa_lib.decode(cube[-1], qa_format, min_confidence=min_confidence))
        files += paths
    values = np.stack(values).astype(np.float32)
    if nodata is not None:
        values[values == nodata] = np.nan
    return TimeSeries(values, np.stack(classes), tuple(s["date"] for s in scenes), tuple(names), crs,
                      transform, dtype, nodata, tuple(files))


_LANDSAT = re.compile(r"L[COTE]0\d_L\w{3}_(\d{6})_(\d{8})_")


def landsat_scenes(root: str, pathrow: str, bands: Sequence[str] = ("B1", "B2", "B3", "B4", "B5", "B6", "B7"),
                   qa: str = "BQA") -> list[dict]:
    """USGS Landsat file layout under `root` (e.g. LC08_L1TP_013032_20180131_..._B4.TIF, in any
    folders) -> scene dicts for `from_band_files`, one per acquisition date of `pathrow` ('013032')."""
    by_date: dict[str, dict[str, str]] = {}
    for f in glob.glob(os.path.join(root, "**", "*.[Tt][Ii][Ff]"), recursive=True):
        m = _LANDSAT.search(os.path.basename(f))
        if not m or m.group(1) != pathrow:
            continue
        band = os.path.splitext(os.path.basename(f))[0].rsplit("_", 1)[-1]
        by_date.setdefault(m.group(2), {})[band] = f
    if not by_date:
        raise FileNotFoundError(f"no Landsat files of path/row {pathrow} under {root}")
    scenes = []
    for d, files in sorted(by_date.items()):
        missing = [b for b in (*bands, qa) if b not in files]
        if missing:
            raise FileNotFoundError(f"path/row {pathrow}, date {d}: no file for bands {missing} under {root}")
        scenes.append({"date": datetime.date(int(d[:4]), int(d[4:6]), int(d[6:])).isoformat(),
                       "bands": {b: files[b] for b in bands}, "qa": files[qa]})
    return scenes


def from_multiband_files(paths: Sequence[str], *, qa_band: str = "QA", qa_format: str = "eojax_synthetic",
                         bands: Sequence[str] = (), reference: int = 0) -> TimeSeries:
    """One multi-band GeoTIFF per date (band descriptions name the bands, one of them `qa_band`)."""
    if not paths:
        raise ValueError("from_multiband_files needs at least one file")
    scenes = []
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} does not exist")
        with rasterio.open(p) as src:
            descs = list(src.descriptions)
        if qa_band not in descs:
            raise RasterError(f"{p}: no QA band {qa_band!r}; its bands are {descs}")
        names = list(bands) or [d for d in descs if d != qa_band]
        absent = [b for b in names if b not in descs]
        if absent:
            raise RasterError(f"{p}: no bands {absent}; its bands are {descs}")
        scenes.append({"date": _date_of(p), "path": p, "bands": names,
                       "idx": [descs.index(b) + 1 for b in names], "qa": descs.index(qa_band) + 1})
    scenes.sort(key=lambda s: s["date"])
    crs, transform, shape, dtype, nodata = _reference_grid(scenes[reference]["path"])
    values, classes = [], []
    for s in scenes:
        if s["bands"] != scenes[0]["bands"]:
            raise RasterError(f"{s['path']} has bands {s['bands']}, {scenes[0]['path']} has {scenes[0]['bands']}")
        # The QA band is read without the file's nodata so that its fill value stays a bit pattern.
        src = [{"path": s["path"], "bands": s["idx"], "names": s["bands"]},
               {"path": s["path"], "bands": [s["qa"]], "names": ["__qa__"], "nodata": -1.0}]
        cube = _read_on_grid(src, (crs, transform, shape), None)
        values.append(cube[:-1])
        classes.append(qa_lib.decode(cube[-1], qa_format))
    return TimeSeries(np.stack(values).astype(np.float32), np.stack(classes),
                      tuple(s["date"] for s in scenes), tuple(scenes[0]["bands"]), crs, transform, dtype,
                      nodata, tuple(s["path"] for s in scenes))


# ---------------------------------------------------------------- aispace CSV

_CSV_FLAGS = {"cirrus": qa_lib.CLOUD, "cloud": qa_lib.CLOUD, "adj_cloud": qa_lib.CLOUD,
              "cloud_shadow": qa_lib.SHADOW, "snow_ice": qa_lib.SNOW, "water": qa_lib.WATER}


def from_csv(path: str, *, bands: Sequence[str] = (), year: int = 2000, nodata: float = -9999) -> TimeSeries:
    """aispace's CSV (one row per pixel and date) -> TimeSeries on the X/Y grid it spans.

    Bands default to every column named B<digits>. Flags (0/1) decode with the precedence of
    eojax.data.qa; a row with a missing band (`nodata` or empty) is fill. X and Y are integer pixel
    coordinates; dates are DOYs of `year` (the CSV has no year).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        bands = list(bands) or [c for c in header if re.fullmatch(r"B\d+", c)]
        needed = [*bands, *COORD_COLUMNS]
        absent = [c for c in needed if c not in header]
        if absent or not bands:
            raise ValueError(f"{path}: columns {absent or 'B01..'} are missing; it has {header}")
        flags = [c for c in _CSV_FLAGS if c in header]
        records = list(reader)
    if not records:
        raise ValueError(f"{path} has no rows")

    def num(r, c, line):
        v = r[c].strip()
        try:
            return float(v) if v else np.nan
        except ValueError:
            raise ValueError(f"{path}, data row {line}: column {c} = {v!r} is not a number") from None

    xs = np.array([num(r, "X", i) for i, r in enumerate(records)])
    ys = np.array([num(r, "Y", i) for i, r in enumerate(records)])
    doys = np.array([num(r, "DOY", i) for i, r in enumerate(records)])
    if np.isnan(xs).any() or np.isnan(ys).any() or np.isnan(doys).any():
        raise ValueError(f"{path}: X, Y and DOY must be set on every row")
    x0, y0 = int(xs.min()), int(ys.min())
    ux = np.unique(doys).astype(int)
    h, w = int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1
    values = np.full((len(ux), len(bands), h, w), np.nan, np.float32)
    classes = np.full((len(ux), h, w), qa_lib.FILL, np.uint8)
    for i, r in enumerate(records):
        t, y, x = int(np.searchsorted(ux, doys[i])), int(ys[i]) - y0, int(xs[i]) - x0
        v = np.array([num(r, b, i) for b in bands], np.float32)
        v[v == nodata] = np.nan
        values[t, :, y, x] = v
        flagged = [_CSV_FLAGS[c] for c in flags if num(r, c, i) == 1]
        # Precedence: cloud > shadow > snow > water (fill comes from missing bands in TimeSeries).
        classes[t, y, x] = min(flagged, default=qa_lib.CLEAR)
    start = datetime.date(year, 1, 1)
    dates = tuple((start + datetime.timedelta(days=int(d) - 1)).isoformat() for d in ux)
    return TimeSeries(values, classes, dates, tuple(bands), None, Affine.translation(x0, y0), "int16",
                      nodata, (os.path.abspath(path),))


# ---------------------------------------------------------------- writing

def write_date(ts: TimeSeries, values: np.ndarray, path: str) -> str:
    """One date's (C, H, W) values as a GeoTIFF on the series' grid, in the source dtype and nodata
    (missing values -> nodata, or 0 when the input had none, as Landsat's fill DN)."""
    c, h, w = values.shape
    fill = ts.nodata if ts.nodata is not None else 0
    info = np.iinfo(ts.dtype) if np.issubdtype(np.dtype(ts.dtype), np.integer) else None
    out = np.where(np.isnan(values), fill, values)
    if info is not None:
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(ts.dtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    profile = dict(driver="GTiff", count=c, height=h, width=w, dtype=ts.dtype, crs=ts.crs,
                   transform=ts.transform, nodata=ts.nodata)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(out)
        for i, name in enumerate(ts.band_names):
            dst.set_band_description(i + 1, name)
    return path
