"""Pixel time series: a stack of dates on one grid, with a QA class per pixel, and its table rows.

A `TimeSeries` is a (T, C, H, W) cube of band values (the true values as floats, NaN = no data), a
(T, H, W) cube of QA classes (eojax.data.qa), the ISO dates (with their year, ascending, one per
date), and the grid (CRS, transform) plus what is needed to write GeoTIFFs like the input (source
dtype and nodata). `load_series(config.input)` is the entry point; the readers under it:

- source='landsat' `from_band_files`: one file per band per date (the USGS Landsat layout, e.g.
  ../shared/data/gdalcubes_L8NY18); `landsat_scenes(root, pathrow)` finds the files and dates (or
  `paths`: the band files / glob patterns themselves).
- source='multiband' `from_multiband_files`: one multi-band GeoTIFF per date (`paths`, glob
  patterns allowed, or eojax's synthetic series in `synthetic_dir`); band descriptions name the
  bands; the date from a 'date' / 'DATE_ACQUIRED' tag or from the file name.
- source='csv' `from_csv`: aispace's layout, one row per pixel and date: B01..B11, 0/1 flag columns
  (cirrus, cloud, adj_cloud, cloud_shadow, snow_ice, water), X, Y, and the date: a DATE column (ISO),
  or YEAR + DOY columns, or DOY alone (then every date is in `year`: a series longer than a year
  cannot be told apart and needs DATE or YEAR); -9999 = no data.
- source='eopatch' `from_eopatch`: an eo-learn EOPatch folder (`root`): the data feature `feature`
  (data/<feature>.npy or .npy.gz, (T, H, W, C)), timestamps.json, the mask feature `mask_band`
  (default mask/CLM, binary), mask/IS_DATA (0 = fill) when present, CRS and transform from
  bbox.geojson when present. Arrays are loaded with allow_pickle=False.

config.input keys (INPUT_KEYS; defaults of the new ones in INPUT_DEFAULTS):
- decimals (0): digits kept after the point. Table rows hold codes = value x 10**decimals as
  integers (`TimeSeries.codes`, back with `TimeSeries.from_codes`); the values themselves stay true.
  A value that `decimals` digits cannot hold (within float32 tolerance: a float raster of NDVI with
  decimals=0, say) is an error naming the file and the value, unless rounding='nearest' declares
  that rounding to `decimals` digits is wanted. Codes beyond 2**53 are refused either way.
- rounding ('error'): 'error' or 'nearest' (see decimals).
- mask_band (''): the cloud mask: a band of each multiband file (by description; default 'QA'), the
  Landsat QA band suffix (default 'BQA'), the EOPatch mask feature (default 'CLM'), or the band of
  multi-band mask files. A band missing from a file is an error naming the file and its bands.
- mask_format (''): 'binary' or an eojax.data.qa format; '' = qa_format for the default QA band /
  BQA, 'binary' when mask_band or mask_paths is given and for an EOPatch. Binary masks: a pixel equal
  to mask_cloud_value is cloud (to fill), any other value of {0, 1} clear; nodata / outside the
  footprint is fill; any other value is an error naming the file (a probability or QA band given as
  binary).
- mask_cloud_value (1): the cloud value of a binary mask (0 for masks where 1 = valid / clear).
- mask_paths (()): one mask file per date instead of a mask band (paths or glob patterns), matched to
  the series' dates by the date in the file name (YYYY-MM-DD or YYYYMMDD); every date needs one, two
  for one date or one for no date are errors naming the files.
- year (2000): the year of a CSV without DATE / YEAR columns.
- feature (''): the EOPatch data feature ('' = the only one there).
- same_day ('error'): two acquisitions on one date are an error naming both files (or timestamps);
  'mosaic' merges them per pixel (the first usable one, else the first cloudy one, else fill).
Glob patterns (*, ?, [...]) in paths, mask_paths, csv and an EOPatch root are expanded (sorted); a
pattern that matches nothing is an error naming it. A series needs at least 2 dates; target_date
must be one of its dates.

Dates whose footprints differ are regridded onto one reference grid (the first date's, by default)
by GDAL's warper through eojax.data.stack (rasterio WarpedVRT), with nearest resampling so that
digital numbers and QA bits stay exactly as measured. Pixels outside a date's footprint are fill.

Table rows (for GReaT text) are X (column), Y (row), DOY and the bands' codes, all integers (negative
codes stay negative). `TimeSeries.days` gives each date's days since the first date (multi-year
series repeat DOYs). `write_date` writes values back in the source dtype: rounded only for integer
dtypes, negatives kept, NaN -> nodata (NaN for a float raster without one).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import glob
import gzip
import hashlib
import json
import os
import re
from typing import Mapping, Sequence

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from eojax.data import qa as qa_lib
from eojax.data import remote
from eojax.data.cog import write_cog
from eojax.data.raster import RasterError, open_raster
from eojax.data.stack import StackedScene

COORD_COLUMNS = ("X", "Y", "DOY")
SOURCES = ("landsat", "multiband", "csv", "eopatch", "synthetic")
ROUNDING = ("error", "nearest")
SAME_DAY = ("error", "mosaic")
MASK_FORMATS = ("binary", *qa_lib.FORMATS)
# The config.input keys that eojax.vsat.task's _INPUT_KEYS had, and the new ones with their defaults.
_BASE_KEYS = {"source", "root", "pathrow", "paths", "csv", "bands", "qa_format", "target_date",
              "holdout_box", "synthetic_dir"}
INPUT_DEFAULTS = {"decimals": 0, "rounding": "error", "year": 2000, "mask_band": "", "mask_format": "",
                  "mask_cloud_value": 1, "mask_paths": (), "feature": "", "same_day": "error"}
INPUT_KEYS = frozenset(_BASE_KEYS | set(INPUT_DEFAULTS))
_EXACT = 2.0 ** 53  # codes beyond this are not exact integers in float64
_WIDE = {"float64", "int32", "uint32", "int64", "uint64"}  # kept as float64 values


def _value_dtype(dtype: str):
    return np.float64 if str(dtype) in _WIDE else np.float32


# ---------------------------------------------------------------- precision

def precision_problem(values: np.ndarray, decimals: int, rounding: str = "error"):
    """None if every finite value of `values` is held by `decimals` digits after the point (within
    float32 tolerance: the value rounded to them is the same float32, or within one float32 step of
    it), or rounding='nearest' declares rounding; else (flat index, value, reason) of the first one
    that is not. Codes (value x 10**decimals) beyond 2**53 are a problem either way."""
    v = np.asarray(values, np.float64)
    finite = np.isfinite(v)
    scaled = v * 10.0 ** decimals
    big = finite & (np.abs(scaled) >= _EXACT)
    if big.any():
        i = int(np.flatnonzero(big.ravel())[0])
        return i, float(v.ravel()[i]), f"is too large for {decimals} decimals (x 10^{decimals} > 2^53)"
    if rounding == "nearest":
        return None
    back = np.rint(scaled) / 10.0 ** decimals
    tol = np.spacing(np.abs(v).astype(np.float32)).astype(np.float64)
    bad = finite & (np.abs(back - v) > tol)
    if not bad.any():
        return None
    i = int(np.flatnonzero(bad.ravel())[0])
    what = "is not an integer" if decimals == 0 else f"has more than {decimals} decimals"
    return i, float(v.ravel()[i]), what


def _precision_error(where: str, value: float, what: str, decimals: int) -> ValueError:
    hint = ("set config.input.decimals to the digits to keep after the point (rows then hold "
            "value x 10^decimals)" if decimals == 0 else "raise config.input.decimals")
    return ValueError(f"{where}: the value {value:.9g} {what}, so rows would lose it; {hint}, or set "
                      f"config.input.rounding='nearest' to round to {decimals} decimals")


def check_precision(values: np.ndarray, decimals: int, rounding: str, where: str, locate=None):
    """Raises a one-line ValueError naming `where` (a file) and the first value `decimals` digits
    cannot hold (see `precision_problem`); `locate(flat_index) -> str` adds where in `values` it is."""
    p = precision_problem(values, decimals, rounding)
    if p is not None:
        i, value, what = p
        raise _precision_error(f"{where}{locate(i) if locate else ''}", value, what, decimals)


def _check_decimals(decimals, rounding):
    if isinstance(decimals, bool) or not isinstance(decimals, (int, np.integer)) or not 0 <= decimals <= 15:
        raise ValueError(f"config.input.decimals={decimals!r} must be an integer from 0 to 15")
    if rounding not in ROUNDING:
        raise ValueError(f"config.input.rounding={rounding!r}: one of {ROUNDING}")


@dataclasses.dataclass
class TimeSeries:
    values: np.ndarray          # (T, C, H, W) float32 (float64 for wide types), NaN = no data
    classes: np.ndarray         # (T, H, W) uint8 eojax.data.qa classes
    dates: tuple[str, ...]      # ISO dates (YYYY-MM-DD), strictly ascending
    band_names: tuple[str, ...]
    crs: object = None          # rasterio CRS (None for a CSV table, or an EOPatch without bbox)
    transform: Affine = Affine.identity()
    dtype: str = "uint16"       # the source dtype, for output GeoTIFFs
    nodata: float | None = None  # the source nodata (None: the files had none)
    files: tuple[str, ...] = ()
    decimals: int = 0           # digits after the point the table rows keep (codes = value x 10^decimals)
    rounding: str = "error"     # 'nearest': codes round to `decimals` digits; 'error': they must not need to

    def __post_init__(self):
        t, c, h, w = self.values.shape
        if self.classes.shape != (t, h, w):
            raise ValueError(f"classes {self.classes.shape} do not match values {self.values.shape}")
        if len(self.dates) != t or len(self.band_names) != c:
            raise ValueError(f"{len(self.dates)} dates / {len(self.band_names)} band names for values "
                             f"{self.values.shape}")
        for d in self.dates:
            try:
                datetime.date.fromisoformat(d)
            except (TypeError, ValueError):
                raise ValueError(f"date {d!r} is not an ISO date (YYYY-MM-DD)") from None
        if list(self.dates) != sorted(self.dates):
            raise ValueError(f"dates must ascend: {self.dates}")
        dup = [d for d, n in zip(self.dates, self.dates[1:]) if d == n]
        if dup:
            raise ValueError(f"date {dup[0]} is in the series twice; one acquisition per date")
        _check_decimals(self.decimals, self.rounding)
        # A pixel without every band measured is fill, whatever its QA says.
        self.classes = np.where(np.isnan(self.values).any(axis=1), qa_lib.FILL, self.classes).astype(np.uint8)

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[2:]

    @property
    def doy(self) -> np.ndarray:
        return np.array([datetime.date.fromisoformat(d).timetuple().tm_yday for d in self.dates])

    @property
    def days(self) -> np.ndarray:
        """(T,) float64: days since the first date (0 for it), across years."""
        o = np.array([datetime.date.fromisoformat(d).toordinal() for d in self.dates], np.float64)
        return o - o[0]

    @property
    def columns(self) -> tuple[str, ...]:
        return COORD_COLUMNS + tuple(self.band_names)

    @property
    def scale(self) -> float:
        """A code's unit: value = code x scale (10**-decimals)."""
        return 10.0 ** -self.decimals

    def date_index(self, date: str) -> int:
        if date not in self.dates:
            raise ValueError(f"date {date!r} is not in the series {list(self.dates)}")
        return self.dates.index(date)

    def codes(self, values: np.ndarray) -> np.ndarray:
        """Values (any shape, finite) -> int64 codes value x 10**decimals, refusing values the codes
        cannot hold unless rounding='nearest'."""
        values = np.asarray(values, np.float64)
        if not np.isfinite(values).all():
            raise ValueError("codes() needs measured (finite) values")
        p = precision_problem(values, self.decimals, self.rounding)
        if p is not None:
            raise _precision_error("a value of the series", p[1], p[2], self.decimals)
        return np.rint(values * 10.0 ** self.decimals).astype(np.int64)

    def from_codes(self, codes: np.ndarray) -> np.ndarray:
        """Codes (ints) -> float64 values (code x 10**-decimals)."""
        return np.asarray(codes, np.float64) / 10.0 ** self.decimals

    def value_digits(self) -> dict[str, int]:
        """Most digit tokens a band's code can take, a sign counted as one: an integer source dtype's
        range x 10**decimals; a float one: the largest code seen, at least decimals + 1 digits."""
        dt = np.dtype(self.dtype)
        out = {}
        for c, b in enumerate(self.band_names):
            if np.issubdtype(dt, np.integer):
                info = np.iinfo(dt)
                out[b] = len(str(int(info.max) * 10 ** self.decimals)) + (info.min < 0)
                continue
            v = self.values[:, c][np.isfinite(self.values[:, c])]
            codes = np.rint(v.astype(np.float64) * 10.0 ** self.decimals) if v.size else np.zeros(1)
            out[b] = max(len(str(int(np.abs(codes).max()))), self.decimals + 1) + bool((codes < 0).any())
        return out

    def rows(self, mask: np.ndarray) -> np.ndarray:
        """Table rows of the pixels where mask (T, H, W) is True -> (N, 3 + C) int64 in `columns`
        order, in (t, y, x) order: X, Y, DOY and the bands' codes (value x 10**decimals). Only usable
        pixels (all bands measured) may be asked for."""
        t, y, x = np.nonzero(mask)
        vals = self.values[t, :, y, x]
        if np.isnan(vals).any():
            raise ValueError("rows() asked for pixels with missing band values")
        return np.concatenate([np.stack([x, y, self.doy[t]], 1).astype(np.int64), self.codes(vals)], 1)

    def fingerprint(self) -> str:
        """Hash of the input files' names, sizes and modification times (results.json)."""
        h = hashlib.sha256()
        for f in self.files:
            if remote.is_remote(f):  # known by its URL: its size and time would cost a request
                h.update(f"{f}\n".encode())
                continue
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- dates and paths

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
    with open_raster(path) as src:
        tags = src.tags()
    for key in ("date", "DATE_ACQUIRED", "ACQUISITION_DATE"):
        if key in tags:
            try:
                return datetime.date.fromisoformat(tags[key][:10]).isoformat()
            except ValueError:
                raise ValueError(f"{path}: tag {key}={tags[key]!r} is not an ISO date") from None
    return date_from_name(path)


def expand_paths(patterns, what: str) -> list[str]:
    """Paths and glob patterns (a string or a list) -> paths: each pattern's matches sorted, in the
    order given, each path once. A pattern matching nothing is an error naming it and `what` (the
    config key); a plain path is kept as it is (its reader says if it is missing)."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    out = []
    for p in patterns:
        p = os.fspath(p)
        if glob.has_magic(p) and not remote.is_remote(p):  # a URL's '?' is a query
            found = sorted(glob.glob(p, recursive=True))
            if not found:
                raise FileNotFoundError(f"{what}: the pattern {p!r} matches no file")
            out += found
        else:
            out.append(p)
    return list(dict.fromkeys(out))


def _one_path(pattern: str, what: str) -> str:
    found = expand_paths(pattern, what)
    if len(found) != 1:
        raise ValueError(f"{what}={pattern!r} matches {len(found)} paths {found[:4]}; it must name one")
    return found[0]


def _refuse_same_day(pairs):
    """pairs [(date, label)] -> raises naming the two labels of the first date given twice."""
    seen = {}
    for d, label in pairs:
        if d in seen:
            raise ValueError(f"{seen[d]} and {label} have the same date {d}; one acquisition per date "
                             f"(remove one, or set config.input.same_day='mosaic' to merge them)")
        seen[d] = label


def _mosaic_same_day(values, classes, dates, labels, same_day: str):
    """Per-acquisition (N, C, H, W) values, (N, H, W) classes, dates (ascending, possibly repeated)
    -> one entry per date. same_day='error': a repeated date is an error naming both labels;
    'mosaic': per pixel the first acquisition whose class is usable, else the first cloud / shadow
    one, else the first (fill)."""
    if same_day not in SAME_DAY:
        raise ValueError(f"config.input.same_day={same_day!r}: one of {SAME_DAY}")
    if len(set(dates)) == len(dates):
        return values, classes, tuple(dates)
    if same_day == "error":
        _refuse_same_day(zip(dates, labels))
    out_v, out_c, out_d = [], [], []
    for d in sorted(set(dates)):
        idx = [i for i, x in enumerate(dates) if x == d]
        v, c = values[idx], classes[idx]
        rank = np.where(qa_lib.usable(c), 0, np.where(c == qa_lib.FILL, 2, 1))
        pick = np.argmin(rank, axis=0)  # ties: the first
        out_v.append(np.take_along_axis(v, pick[None, None], 0)[0])
        out_c.append(np.take_along_axis(c, pick[None], 0)[0])
        out_d.append(d)
    return np.stack(out_v), np.stack(out_c), tuple(out_d)


# ---------------------------------------------------------------- masks

def decode_mask(mask: np.ndarray, fmt: str, where: str, *, cloud_value=1, min_confidence: int = 3,
                nodata=None) -> np.ndarray:
    """A mask band (any shape; NaN = outside the footprint / nodata) -> uint8 classes.

    fmt 'binary': value == cloud_value -> CLOUD, the other value of {0, 1} -> CLEAR, NaN / `nodata`
    -> FILL; any other value is an error naming `where`. Else an eojax.data.qa format."""
    if fmt not in MASK_FORMATS:
        raise ValueError(f"config.input.mask_format={fmt!r}: one of {MASK_FORMATS}")
    m = np.asarray(mask)
    if fmt != "binary":
        return qa_lib.decode(m, fmt, min_confidence=min_confidence, nodata=nodata)
    m = m.astype(np.float64)
    missing = np.isnan(m) | (m == nodata if nodata is not None else False)
    allowed = {0.0, 1.0, float(cloud_value)}
    seen = np.unique(m[~missing])
    odd = [v for v in seen.tolist() if v not in allowed]
    if odd:
        shown = [int(v) if float(v).is_integer() else v for v in odd[:5]]
        raise ValueError(f"{where}: a binary mask holds only 0 / 1 (cloud = {cloud_value}), it has "
                         f"{shown}{' ...' if len(odd) > 5 else ''}; set config.input.mask_format to its "
                         f"QA format (one of {qa_lib.FORMATS}) or mask_cloud_value")
    return np.select([missing, m == float(cloud_value)], [qa_lib.FILL, qa_lib.CLOUD], qa_lib.CLEAR).astype(np.uint8)


def match_masks(mask_files: Sequence[str], dates: Sequence[str], labels: Sequence[str] = ()) -> dict[str, str]:
    """Mask files -> {date: file} by the date in each file name; every date of the series needs one
    (`labels[i]` names date i's data file in the error), a mask for no date or two for one date are
    errors naming the files."""
    by_date: dict[str, str] = {}
    for f in mask_files:
        try:
            d = date_from_name(f)
        except ValueError:
            raise ValueError(f"config.input.mask_paths: no date (YYYY-MM-DD or YYYYMMDD) in the mask file "
                             f"name {f}") from None
        if d in by_date:
            raise ValueError(f"mask files {by_date[d]} and {f} have the same date {d}; one mask per date")
        by_date[d] = f
    extra = [f for d, f in by_date.items() if d not in dates]
    if extra:
        raise ValueError(f"mask file {extra[0]} has date {date_from_name(extra[0])}, which is not a date of "
                         f"the series {list(dates)}")
    for i, d in enumerate(dates):
        if d not in by_date:
            of = f" ({labels[i]})" if i < len(labels) else ""
            raise ValueError(f"config.input.mask_paths has no mask file for the date {d}{of}")
    return by_date


def _mask_source(path: str, band: str) -> dict:
    """A separate mask file as a stack source: band `band` by description, else its only band."""
    if not remote.exists(path):
        raise FileNotFoundError(f"mask file {path} does not exist")
    with open_raster(path) as src:
        descs = list(src.descriptions)
    if band and band in descs:
        idx = descs.index(band) + 1
    elif len(descs) == 1:
        idx = 1
    else:
        raise RasterError(f"{path}: no mask band {band!r} (config.input.mask_band) among its bands {descs}")
    return {"path": path, "bands": [idx], "names": ["__mask__"]}


# ---------------------------------------------------------------- GeoTIFF stacks

def _reference_grid(path: str):
    with open_raster(path) as src:
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
                    min_confidence: int = 3, cloud_value=1, decimals: int = 0, rounding: str = "error",
                    same_day: str = "error") -> TimeSeries:
    """Scenes: [{'date': 'YYYY-MM-DD', 'bands': {name: path}, 'qa': path}, ...] (any date order).

    'qa' is a QA file decoded with `qa_format` (an eojax.data.qa format, or 'binary': a 0/1 cloud
    mask, cloud = `cloud_value`). Every date is warped onto the grid of scene `reference` (index
    after sorting by date). Values `decimals` digits cannot hold are an error naming the band file
    (see `precision_problem`); two scenes of one date an error naming both, unless same_day='mosaic'.
    """
    if not scenes:
        raise ValueError("from_band_files needs at least one scene")
    _check_decimals(decimals, rounding)
    scenes = sorted(scenes, key=lambda s: s["date"])
    names = list(scenes[0]["bands"])
    for s in scenes:
        if list(s["bands"]) != names:
            raise ValueError(f"scene {s['date']} has bands {list(s['bands'])}, the first has {names}")
        for p in [*s["bands"].values(), s["qa"]]:
            if not remote.exists(p):
                raise FileNotFoundError(f"scene {s['date']}: {p} does not exist")
    if same_day not in SAME_DAY:
        raise ValueError(f"config.input.same_day={same_day!r}: one of {SAME_DAY}")
    if same_day == "error":
        _refuse_same_day([(s["date"], s["bands"][names[0]]) for s in scenes])
    crs, transform, shape, dtype, nodata = _reference_grid(scenes[reference]["bands"][names[0]])
    values, classes, files = [], [], []
    for s in scenes:
        paths = [s["bands"][n] for n in names] + [s["qa"]]
        cube = _read_on_grid(paths, (crs, transform, shape), names + ["__qa__"])
        values.append(cube[:-1])
        classes.append(decode_mask(cube[-1], qa_format, s["qa"], cloud_value=cloud_value,
                                   min_confidence=min_confidence))
        files += paths
    values = np.stack(values).astype(_value_dtype(dtype))
    if nodata is not None:
        values[values == nodata] = np.nan
    for s, v in zip(scenes, values):
        for c, n in enumerate(names):
            check_precision(v[c], decimals, rounding, s["bands"][n], _pixel_locator(v.shape[1:]))
    values, classes, dates = _mosaic_same_day(values, np.stack(classes), [s["date"] for s in scenes],
                                              [s["bands"][names[0]] for s in scenes], same_day)
    return TimeSeries(values, classes, dates, tuple(names), crs, transform, dtype, nodata, tuple(files),
                      decimals, rounding)


def _pixel_locator(shape):
    def locate(i):
        y, x = np.unravel_index(i, shape)
        return f" (row {y}, column {x})"
    return locate


_LANDSAT = re.compile(r"L[COTE]0\d_L\w{3}_(\d{6})_(\d{8})_")


def landsat_scenes(root: str | None, pathrow: str, bands: Sequence[str] = ("B1", "B2", "B3", "B4", "B5", "B6", "B7"),
                   qa: str | None = "BQA", files: Sequence[str] | None = None) -> list[dict]:
    """USGS Landsat file layout (e.g. LC08_L1TP_013032_20180131_..._B4.TIF) under `root` (in any
    folders), or the given `files` -> scene dicts for `from_band_files`, one per acquisition date of
    `pathrow` ('013032'; '' = the only path/row there). qa=None: no QA file (masks come from
    elsewhere). Two files of one band and date (two products, or copies) are an error naming both."""
    if files is None:
        files = glob.glob(os.path.join(root, "**", "*.[Tt][Ii][Ff]"), recursive=True)
    where = f"under {root}" if root else "in config.input.paths"
    found: dict[str, dict[str, dict[str, str]]] = {}
    for f in sorted(files):
        m = _LANDSAT.search(os.path.basename(f))
        if not m:
            continue
        band = os.path.splitext(os.path.basename(f))[0].rsplit("_", 1)[-1]
        per_band = found.setdefault(m.group(1), {}).setdefault(m.group(2), {})
        if band in per_band:
            raise ValueError(f"{per_band[band]} and {f} are both band {band} of path/row {m.group(1)} on "
                             f"{m.group(2)}; one file per band and date")
        per_band[band] = f
    if not pathrow and len(found) > 1:
        raise ValueError(f"files of path/rows {sorted(found)} {where}; set config.input.pathrow to one")
    pathrow = pathrow or next(iter(found), "")
    by_date = found.get(pathrow)
    if not by_date:
        raise FileNotFoundError(f"no Landsat files of path/row {pathrow} {where}")
    scenes = []
    for d, fs in sorted(by_date.items()):
        wanted = (*bands, qa) if qa else tuple(bands)
        missing = [b for b in wanted if b not in fs]
        if missing:
            raise FileNotFoundError(f"path/row {pathrow}, date {d}: no file for bands {missing} {where} "
                                    f"(it has {sorted(fs)})")
        scene = {"date": datetime.date(int(d[:4]), int(d[4:6]), int(d[6:])).isoformat(),
                 "bands": {b: fs[b] for b in bands}}
        if qa:
            scene["qa"] = fs[qa]
        scenes.append(scene)
    return scenes


def from_multiband_files(paths: Sequence[str], *, qa_band: str = "QA", qa_format: str = "eojax_synthetic",
                         bands: Sequence[str] = (), reference: int = 0, mask_paths: Sequence[str] = (),
                         cloud_value=1, decimals: int = 0, rounding: str = "error",
                         same_day: str = "error") -> TimeSeries:
    """One multi-band GeoTIFF per date (band descriptions name the bands, one of them `qa_band`,
    decoded with `qa_format`: an eojax.data.qa format or 'binary', cloud = `cloud_value`).

    `mask_paths`: one mask file per date instead (matched by the date in its name; its band
    `qa_band` if it has several); the data files then need no mask band. Globs in `paths` and
    `mask_paths` are expanded. Two files of one date are an error naming both (unless
    same_day='mosaic'); values `decimals` digits cannot hold an error naming the file."""
    paths = expand_paths(paths, "config.input.paths")
    mask_paths = expand_paths(mask_paths, "config.input.mask_paths") if mask_paths else []
    if not paths:
        raise ValueError("from_multiband_files needs at least one file (config.input.paths)")
    _check_decimals(decimals, rounding)
    if same_day not in SAME_DAY:
        raise ValueError(f"config.input.same_day={same_day!r}: one of {SAME_DAY}")
    scenes = []
    for p in paths:
        if not remote.exists(p):
            raise FileNotFoundError(f"{p} does not exist")
        with open_raster(p) as src:
            descs = list(src.descriptions)
        if not mask_paths and qa_band not in descs:
            raise RasterError(f"{p}: no mask band {qa_band!r} (config.input.mask_band); its bands are {descs}")
        names = list(bands) or [d for d in descs if d != qa_band]
        absent = [b for b in names if b not in descs]
        if absent:
            raise RasterError(f"{p}: no bands {absent}; its bands are {descs}")
        if not names or None in names:
            raise RasterError(f"{p}: its bands need descriptions (names); it has {descs}")
        scene = {"date": _date_of(p), "path": p, "bands": names, "idx": [descs.index(b) + 1 for b in names]}
        if not mask_paths:
            scene["qa"] = descs.index(qa_band) + 1
        scenes.append(scene)
    scenes.sort(key=lambda s: (s["date"], s["path"]))
    if same_day == "error":
        _refuse_same_day([(s["date"], s["path"]) for s in scenes])
    if mask_paths:
        first = {s["date"]: s["path"] for s in reversed(scenes)}
        by_date = match_masks(mask_paths, sorted(first), [first[d] for d in sorted(first)])
    crs, transform, shape, dtype, nodata = _reference_grid(scenes[reference]["path"])
    values, classes, files = [], [], []
    for s in scenes:
        if s["bands"] != scenes[0]["bands"]:
            raise RasterError(f"{s['path']} has bands {s['bands']}, {scenes[0]['path']} has {scenes[0]['bands']}")
        src = [{"path": s["path"], "bands": s["idx"], "names": s["bands"]}]
        if mask_paths:
            mask_file = by_date[s["date"]]
            src.append(_mask_source(mask_file, qa_band))
        else:
            # The mask band is read without the file's nodata so that its fill value stays a bit pattern.
            mask_file = s["path"]
            src.append({"path": s["path"], "bands": [s["qa"]], "names": ["__qa__"], "nodata": -1.0})
        cube = _read_on_grid(src, (crs, transform, shape), None)
        check_precision(cube[:-1], decimals, rounding, s["path"], _band_locator(s["bands"], cube.shape[1:]))
        values.append(cube[:-1])
        classes.append(decode_mask(cube[-1], qa_format, mask_file, cloud_value=cloud_value))
        files += [s["path"]] + ([mask_file] if mask_paths else [])
    values, classes, dates = _mosaic_same_day(np.stack(values).astype(_value_dtype(dtype)), np.stack(classes),
                                              [s["date"] for s in scenes], [s["path"] for s in scenes], same_day)
    return TimeSeries(values, classes, dates, tuple(scenes[0]["bands"]), crs, transform, dtype, nodata,
                      tuple(files), decimals, rounding)


def _band_locator(names, shape):
    def locate(i):
        c, y, x = np.unravel_index(i, (len(names), *shape))
        return f" band {names[c]} (row {y}, column {x})"
    return locate


# ---------------------------------------------------------------- aispace CSV

_CSV_FLAGS = {"cirrus": qa_lib.CLOUD, "cloud": qa_lib.CLOUD, "adj_cloud": qa_lib.CLOUD,
              "cloud_shadow": qa_lib.SHADOW, "snow_ice": qa_lib.SNOW, "water": qa_lib.WATER}


def _column(header, *names):
    return next((c for c in names if c in header), None)


def from_csv(path: str, *, bands: Sequence[str] = (), year: int = 2000, nodata: float = -9999,
             decimals: int = 0, rounding: str = "error") -> TimeSeries:
    """aispace's CSV (one row per pixel and date) -> TimeSeries on the X/Y grid it spans.

    Bands default to every column named B<digits>. Flags (0/1) decode with the precedence of
    eojax.data.qa; a row with a missing band (`nodata` or empty) is fill. X and Y are integer pixel
    coordinates. Dates: a DATE column (ISO; a DOY column, if any, must agree), else YEAR + DOY
    columns, else DOYs of `year` (one year only: DOY 5 of two years cannot be told apart). The
    dtype for written outputs: int16 for integers within its range, int32 beyond, float32 when a
    value is not an integer (which then needs `decimals`, or rounding='nearest').
    """
    _check_decimals(decimals, rounding)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        bands = list(bands) or [c for c in header if re.fullmatch(r"B\d+", c)]
        date_col, year_col = _column(header, "DATE", "date"), _column(header, "YEAR", "year")
        needed = [*bands, "X", "Y"] + ([] if date_col else ["DOY"])
        absent = [c for c in needed if c not in header]
        if absent or not bands:
            raise ValueError(f"{path}: columns {absent or 'B01..'} are missing; it has {header}")
        flags = [c for c in _CSV_FLAGS if c in header]
        records = list(reader)
    if not records:
        raise ValueError(f"{path} has no rows")

    def num(r, c, i):
        v = (r[c] or "").strip()
        try:
            return float(v) if v else np.nan
        except ValueError:
            raise ValueError(f"{path}, line {i + 2}: column {c} = {v!r} is not a number") from None

    def whole(r, c, i):
        v = num(r, c, i)
        if not np.isfinite(v) or v != int(v):
            raise ValueError(f"{path}, line {i + 2}: column {c} = {r[c]!r} must be an integer")
        return int(v)

    def date_of(r, i):
        if date_col:
            v = (r[date_col] or "").strip()
            try:
                d = datetime.date.fromisoformat(v[:10])
            except ValueError:
                raise ValueError(f"{path}, line {i + 2}: {date_col} = {v!r} is not an ISO date (YYYY-MM-DD)") from None
            if "DOY" in header and (r["DOY"] or "").strip() and whole(r, "DOY", i) != d.timetuple().tm_yday:
                raise ValueError(f"{path}, line {i + 2}: DOY {r['DOY']} is not the day of year of {date_col} {v}")
            return d.isoformat()
        y, doy = (whole(r, year_col, i) if year_col else int(year)), whole(r, "DOY", i)
        last = 366 if datetime.date(y, 12, 31).timetuple().tm_yday == 366 else 365
        if not 1 <= doy <= last:
            raise ValueError(f"{path}, line {i + 2}: DOY {doy} is not a day of {y} (1..{last})")
        return (datetime.date(y, 1, 1) + datetime.timedelta(days=doy - 1)).isoformat()

    xs = np.array([whole(r, "X", i) for i, r in enumerate(records)])
    ys = np.array([whole(r, "Y", i) for i, r in enumerate(records)])
    row_dates = [date_of(r, i) for i, r in enumerate(records)]
    dates = sorted(set(row_dates))
    t_of = {d: t for t, d in enumerate(dates)}
    x0, y0 = int(xs.min()), int(ys.min())
    h, w = int(ys.max()) - y0 + 1, int(xs.max()) - x0 + 1
    values = np.full((len(dates), len(bands), h, w), np.nan, np.float64)
    classes = np.full((len(dates), h, w), qa_lib.FILL, np.uint8)
    line = np.full((len(dates), h, w), -1, np.int64)
    for i, r in enumerate(records):
        t, y, x = t_of[row_dates[i]], int(ys[i]) - y0, int(xs[i]) - x0
        if line[t, y, x] >= 0:
            raise ValueError(f"{path}: lines {line[t, y, x] + 2} and {i + 2} are both X {xs[i]}, Y {ys[i]} on "
                             f"{row_dates[i]}; one row per pixel and date")
        line[t, y, x] = i
        v = np.array([num(r, b, i) for b in bands], np.float64)
        v[v == nodata] = np.nan
        values[t, :, y, x] = v
        flagged = [_CSV_FLAGS[c] for c in flags if num(r, c, i) == 1]
        # Precedence: cloud > shadow > snow > water (fill comes from missing bands in TimeSeries).
        classes[t, y, x] = min(flagged, default=qa_lib.CLEAR)

    def locate(k):
        t, c, y, x = np.unravel_index(k, values.shape)
        return f", line {line[t, y, x] + 2} column {bands[c]}"

    check_precision(values, decimals, rounding, path, locate)
    finite = values[np.isfinite(values)]
    if finite.size and np.any(finite != np.round(finite)):
        dtype = "float32"
    elif finite.size and (finite.min() < -32768 or finite.max() > 32767):
        dtype = "int32"
    else:
        dtype = "int16"
    return TimeSeries(values.astype(_value_dtype(dtype)), classes, tuple(dates), tuple(bands), None,
                      Affine.translation(x0, y0), dtype, nodata, (os.path.abspath(path),), decimals, rounding)


# ---------------------------------------------------------------- eo-learn EOPatch

def _npy_features(folder: str) -> dict[str, str]:
    """{feature name: file} of the .npy / .npy.gz arrays in an EOPatch sub-folder."""
    out = {}
    if os.path.isdir(folder):
        for f in sorted(os.listdir(folder)):
            for ext in (".npy.gz", ".npy"):
                if f.endswith(ext):
                    out.setdefault(f[:-len(ext)], os.path.join(folder, f))
                    break
    return out


def _load_npy(path: str) -> np.ndarray:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return np.load(f, allow_pickle=False)
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path} is not a readable numpy array ({str(e).splitlines()[0]}); "
                         f"pickled arrays are not loaded") from None


def _eopatch_timestamps(folder: str) -> tuple[list[str], str]:
    for name in ("timestamps.json", "timestamps.json.gz", "timestamp.json", "timestamp.json.gz"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            opener = gzip.open if p.endswith(".gz") else open
            with opener(p, "rt") as f:
                try:
                    stamps = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p} is not JSON: {e}") from None
            if not isinstance(stamps, list) or not all(isinstance(s, str) for s in stamps):
                raise ValueError(f"{p}: a list of ISO timestamps expected")
            return stamps, p
    if any(os.path.isfile(os.path.join(folder, n)) for n in ("timestamp.pkl", "timestamp.pkl.gz")):
        raise ValueError(f"{folder}: its timestamps are pickled (timestamp.pkl, an old eo-learn format), "
                         f"which is not loaded; save the EOPatch with eo-learn >= 1.0 (timestamps.json)")
    raise FileNotFoundError(f"{folder}: no timestamps.json; is it an eo-learn EOPatch folder?")


def _eopatch_grid(folder: str, shape):
    """(crs, transform) from bbox.geojson (a polygon with an EPSG 'crs'), or (None, identity)."""
    p = os.path.join(folder, "bbox.geojson")
    if not os.path.isfile(p):
        return None, Affine.identity()
    with open(p) as f:
        try:
            g = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not JSON: {e}") from None
    try:
        crs = CRS.from_user_input(g["crs"]["properties"]["name"])
        pts = np.asarray(g["coordinates"], np.float64).reshape(-1, 2)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{p}: a polygon with a 'crs' name expected ({type(e).__name__}: {e})") from None
    (minx, miny), (maxx, maxy) = pts.min(0), pts.max(0)
    h, w = shape
    return crs, Affine((maxx - minx) / w, 0.0, minx, 0.0, -(maxy - miny) / h, maxy)


def from_eopatch(folder: str, *, feature: str = "", bands: Sequence[str] = (), mask: str = "CLM",
                 mask_format: str = "binary", cloud_value=1, qa_min_confidence: int = 3,
                 decimals: int = 0, rounding: str = "error", same_day: str = "error") -> TimeSeries:
    """An eo-learn EOPatch folder -> TimeSeries.

    data/<feature>.npy(.gz): (T, H, W, C) values (NaN = no data); band names `bands` (C of them),
    else the feature name (C = 1) or <feature>_1..C. mask/<mask>: (T, H, W, 1) mask decoded with
    `mask_format` ('binary': 1 = cloud for CLM; or a QA format). mask/IS_DATA when present: 0 =
    fill. timestamps.json gives the dates; two timestamps on one date are an error naming both
    unless same_day='mosaic'. CRS and transform from bbox.geojson when present (else none, pixel
    coordinates)."""
    _check_decimals(decimals, rounding)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"config.input.root={folder!r}: not an EOPatch folder")
    data = _npy_features(os.path.join(folder, "data"))
    if not feature:
        if len(data) != 1:
            raise ValueError(f"{folder}: set config.input.feature to one of its data features {sorted(data)}")
        feature = next(iter(data))
    if feature not in data:
        raise ValueError(f"{folder}: no data feature {feature!r} (config.input.feature); it has {sorted(data)}")
    masks = _npy_features(os.path.join(folder, "mask"))
    if mask not in masks:
        raise ValueError(f"{folder}: no mask feature {mask!r} (config.input.mask_band); its mask features "
                         f"are {sorted(masks)}")
    arr = _load_npy(data[feature])
    if arr.ndim != 4:
        raise ValueError(f"{data[feature]}: a (time, height, width, channels) array expected, got {arr.shape}")
    t, h, w, c = arr.shape
    stamps, stamps_file = _eopatch_timestamps(folder)
    if len(stamps) != t:
        raise ValueError(f"{stamps_file} has {len(stamps)} timestamps, {data[feature]} has {t} dates")
    try:
        dates = [datetime.date.fromisoformat(s[:10]).isoformat() for s in stamps]
    except ValueError:
        raise ValueError(f"{stamps_file}: timestamps must be ISO (YYYY-MM-DD...): {stamps[:3]}") from None
    bands = list(bands) or ([feature] if c == 1 else [f"{feature}_{i + 1}" for i in range(c)])
    if len(bands) != c:
        raise ValueError(f"{data[feature]} has {c} channels, config.input.bands names {len(bands)}: {bands}")
    m = _load_npy(masks[mask])
    if m.shape[:3] != (t, h, w) or m.ndim != 4 or m.shape[3] != 1:
        raise ValueError(f"{masks[mask]}: shape {m.shape}, expected {(t, h, w, 1)} like {data[feature]}")
    files = [data[feature], masks[mask], stamps_file]
    if arr.dtype.kind not in "fiub":
        raise ValueError(f"{data[feature]}: dtype {arr.dtype} is not numeric")
    dtype = arr.dtype.name if arr.dtype.kind != "b" else "uint8"
    values = np.moveaxis(arr, 3, 1).astype(_value_dtype(dtype))
    loc_shape = values.shape

    def locate(k):
        ti, ci, y, x = np.unravel_index(k, loc_shape)
        return f" (date {ti} = {stamps[ti]}, channel {ci}, row {y}, column {x})"

    classes = decode_mask(m[..., 0], mask_format, masks[mask], cloud_value=cloud_value,
                          min_confidence=qa_min_confidence)
    if "IS_DATA" in masks and mask != "IS_DATA":
        is_data = _load_npy(masks["IS_DATA"])
        if is_data.shape[:3] != (t, h, w):
            raise ValueError(f"{masks['IS_DATA']}: shape {is_data.shape}, expected {(t, h, w, 1)}")
        no_data = ~is_data.reshape(t, h, w).astype(bool)
        values[np.broadcast_to(no_data[:, None], values.shape)] = np.nan
        files.append(masks["IS_DATA"])
    check_precision(values, decimals, rounding, data[feature], locate)
    order = np.argsort(np.array(stamps), kind="stable")
    values, classes = values[order], classes[order]
    dates = [dates[i] for i in order]
    labels = [f"{folder} timestamp {stamps[i]}" for i in order]
    values, classes, dates = _mosaic_same_day(values, classes, dates, labels, same_day)
    crs, transform = _eopatch_grid(folder, (h, w))
    return TimeSeries(values, classes, dates, tuple(bands), crs, transform, dtype, None, tuple(files),
                      decimals, rounding)


# ---------------------------------------------------------------- config.input -> series

def _opt(cfg, key):
    """config.input[key], or its INPUT_DEFAULTS value in a config without it (ConfigDict or dict)."""
    return cfg.get(key, INPUT_DEFAULTS.get(key))


def load_series(cfg) -> TimeSeries:
    """config.input -> TimeSeries (see the module docstring for the keys): 'landsat' (USGS band
    files under root, or paths, one path/row), 'multiband' (one file per date with a mask band, or
    mask_paths; paths, or synthetic_dir for eojax's synthetic series), 'csv', 'eopatch' (an eo-learn
    EOPatch folder). Keys absent from an older config take INPUT_DEFAULTS. Refuses a series of fewer
    than 2 dates and a target_date that is not one of its dates."""
    source = _opt(cfg, "source")
    decimals, rounding = _opt(cfg, "decimals"), _opt(cfg, "rounding")
    _check_decimals(decimals, rounding)
    same_day = _opt(cfg, "same_day")
    if same_day not in SAME_DAY:
        raise ValueError(f"config.input.same_day={same_day!r}: one of {SAME_DAY}")
    mask_band, mask_format = _opt(cfg, "mask_band") or "", _opt(cfg, "mask_format") or ""
    raw_masks = _opt(cfg, "mask_paths") or ()
    raw_masks = [raw_masks] if isinstance(raw_masks, str) else list(raw_masks)
    if mask_format and mask_format not in MASK_FORMATS:
        raise ValueError(f"config.input.mask_format={mask_format!r}: one of {MASK_FORMATS}")
    # '' = the QA format for the default QA band, binary for a named mask band or mask files.
    fmt = mask_format or ("binary" if (mask_band or raw_masks or source == "eopatch") else _opt(cfg, "qa_format"))
    cloud = _opt(cfg, "mask_cloud_value")
    paths = list(_opt(cfg, "paths") or ())
    bands = tuple(_opt(cfg, "bands") or ())
    common = dict(decimals=decimals, rounding=rounding, same_day=same_day)
    if raw_masks and source in ("csv", "eopatch"):
        raise ValueError(f"config.input.mask_paths is for the landsat and multiband sources, not {source!r}")
    if source == "landsat":
        mask_paths = expand_paths(raw_masks, "config.input.mask_paths")
        if paths:
            scenes = landsat_scenes(None, _opt(cfg, "pathrow"), bands, None if mask_paths else (mask_band or "BQA"),
                                    files=expand_paths(paths, "config.input.paths"))
        else:
            root = _opt(cfg, "root") or os.path.join(os.environ.get("EOJAX_TEST_DATA", ""), "gdalcubes_L8NY18")
            if not os.path.isdir(root):
                raise FileNotFoundError(f"config.input.root={root!r} is not a folder (set it, or EOJAX_TEST_DATA "
                                        "to the shared data folder)")
            scenes = landsat_scenes(root, _opt(cfg, "pathrow"), bands, None if mask_paths else (mask_band or "BQA"))
        if mask_paths:
            by_date = match_masks(mask_paths, [s["date"] for s in scenes],
                                  [next(iter(s["bands"].values())) for s in scenes])
            scenes = [{**s, "qa": by_date[s["date"]]} for s in scenes]
        ts = from_band_files(scenes, qa_format=fmt, cloud_value=cloud, **common)
    elif source == "multiband":
        if not paths and _opt(cfg, "synthetic_dir"):  # eojax's synthetic series (deterministic, rewritten atomically)
            from eojax.data import synthetic
            paths = synthetic.write_time_series(_opt(cfg, "synthetic_dir"), seed=5, n_dates=6, height=32,
                                                width=32, sensor="landsat8", labels=False)
        ts = from_multiband_files(paths, qa_band=mask_band or "QA", qa_format=fmt, bands=bands,
                                  mask_paths=raw_masks, cloud_value=cloud, **common)
    elif source == "csv":
        given = _opt(cfg, "csv") or (paths[0] if len(paths) == 1 else "")
        if not given:
            raise ValueError("config.input.csv: name the CSV file (or one entry in config.input.paths)")
        ts = from_csv(_one_path(given, "config.input.csv"), bands=bands, year=int(_opt(cfg, "year")),
                      decimals=decimals, rounding=rounding)
    elif source == "eopatch":
        given = _opt(cfg, "root") or (paths[0] if len(paths) == 1 else "")
        if not given:
            raise ValueError("config.input.root: name the EOPatch folder")
        ts = from_eopatch(_one_path(given, "config.input.root"), feature=_opt(cfg, "feature") or "",
                          bands=bands, mask=mask_band or "CLM", mask_format=fmt, cloud_value=cloud, **common)
    elif source == "synthetic":  # eojax's built-in series, the demo data: written once, in the cache
        from eojax.data import synthetic
        directory = _opt(cfg, "synthetic_dir") or str(synthetic.default_dir() / "vsat_series")
        paths = synthetic.write_time_series(directory, seed=5, n_dates=8, height=64, width=64,
                                            sensor="landsat8", labels=False)
        ts = from_multiband_files(paths, qa_format="eojax_synthetic", bands=bands, **common)
    else:
        raise ValueError(f"config.input.source={source!r}: one of {SOURCES}")
    if len(ts.dates) < 2:
        raise ValueError(f"config.input (source={source!r}): the series has {len(ts.dates)} date "
                         f"{list(ts.dates)} (from {ts.files[0] if ts.files else '?'}); a time series needs "
                         f"at least 2 dates")
    target = _opt(cfg, "target_date")
    if target and target not in ts.dates:
        raise ValueError(f"config.input.target_date={target!r} is not a date of the series "
                         f"({_dates_around(ts.dates, str(target))})")
    return ts


def _dates_around(dates, target: str) -> str:
    """'its N dates run from A to B; the nearest are X and Y' (all of them when few)."""
    if len(dates) <= 8:
        return f"its dates are {list(dates)}"
    i = int(np.searchsorted(np.array(dates), target))
    near = [d for d in dates[max(i - 1, 0):i + 1]]
    return f"its {len(dates)} dates run from {dates[0]} to {dates[-1]}; the nearest are {' and '.join(near)}"


# ---------------------------------------------------------------- writing

def write_date(ts: TimeSeries, values: np.ndarray, path: str) -> str:
    """One date's (C, H, W) values as a GeoTIFF on the series' grid, in the source dtype and nodata:
    rounded and clipped to the dtype only when it is an integer one (negatives kept in signed types),
    floats written as they are. Missing values -> nodata; when the input had none: 0 for integers (as
    Landsat's fill DN), NaN for floats (tagged as the nodata). A COG (eojax.data.cog)."""
    c, h, w = values.shape
    integer = np.issubdtype(np.dtype(ts.dtype), np.integer)
    nodata = ts.nodata if ts.nodata is not None or integer else float("nan")
    fill = nodata if nodata is not None else 0
    out = np.where(np.isnan(values), fill, values)
    if integer:
        info = np.iinfo(ts.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(ts.dtype)
    return write_cog(path, out, crs=ts.crs, transform=ts.transform, nodata=nodata,
                     descriptions=tuple(ts.band_names))
