"""GeoTIFF scenes read window by window with rasterio.

A `Scene` is one pixel grid with C selected bands, stored either as one multi-band GeoTIFF or as one
single-band GeoTIFF per band (a path template containing ``{band}``, or a STAC item's assets, see
stac.py). Nothing is loaded up front: the constructor reads headers only, `read` reads one window,
`validity_overview` reads a decimated copy once (for window sampling and the all-nodata check), from
the file's overviews where it has them.

Input kinds, all read through `open_raster`: local GeoTIFFs; remote ones (`s3://`, `gs://`, `https://`,
`/vsi...`: remote.py, only the byte ranges needed are fetched); NetCDF / Zarr grids (grids.py, through
a cached GeoTIFF copy); STAC items (stac.py).
"""
from __future__ import annotations

import glob
import math
import os
import re
import threading
import warnings
from typing import Sequence

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.windows import Window

from eojax.data import grids, remote, stac
from eojax.errors import DataError

BandSpec = Sequence["str | int"]


class RasterError(DataError):
    """Bad raster input; the message names the file, band or value at fault."""


def read_error(path: str, window: Window | None, e: Exception) -> RasterError:
    """A failed GDAL read (a truncated or corrupt file that still opens) -> one line naming the file
    and window. rasterio says only "Read failed. See previous exception"; GDAL's reason is the cause."""
    where = ""
    if window is not None:
        r, c = int(window.row_off), int(window.col_off)
        where = f" in window rows {r}..{r + int(window.height) - 1}, cols {c}..{c + int(window.width) - 1}"
    if remote.is_remote(path):  # a network failure mid-read, most likely
        return RasterError(f"{path}: read failed{where} ({remote.one_line(e)}); check the network and the "
                           f"credentials, or the file is truncated")
    return RasterError(f"{path}: read failed{where} ({e.__cause__ or e}); the file is truncated or corrupt")


def _natural_key(s: str):
    # "B2" < "B10": band names sort the way people number them.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def open_raster(path: str, crs=None):
    """Opens `path` read-only, insisting on a GeoTIFF (whatever the suffix says), local or remote (no
    local existence check: GDAL's error names what is wrong); a NetCDF / Zarr grid opens as its
    cached GeoTIFF copy, made with `crs` where the grid has none (see grids.py)."""
    if grids.is_grid(path):
        return open_raster(grids.geotiff_copy(path, crs))
    if not remote.exists(path):
        raise FileNotFoundError(f"raster file not found: {path}")
    try:
        with warnings.catch_warnings(), remote.gdal_env(path):
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(remote.gdal_path(path))
    except RasterioIOError as e:
        if remote.is_remote(path):
            raise RasterError(f"{path}: cannot open it ({remote.one_line(e)}); check the URL, the network "
                              f"and the credentials") from None
        raise RasterError(f"{path} is not a GeoTIFF (rasterio cannot open it: {e})") from None
    if src.driver != "GTiff":
        driver = src.driver
        src.close()
        raise RasterError(f"{path} is not a GeoTIFF (GDAL driver {driver}); convert it with "
                          f"`gdal_translate -of GTiff`")
    return src


class _WindowReading:
    """What every scene-like reader shares, given `read_pixels`, `validity_overview`, `band_names`,
    `nodata`, `path`, `_files` and a per-thread `_local` (Scene here, StackedScene in stack.py)."""

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_local"]  # handles never travel into worker processes
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def files(self) -> list[str]:
        return list(self._files)

    @property
    def num_channels(self) -> int:
        return len(self.band_names)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Reads `window` -> (image float32 (h, w, C) channels-last, valid bool (h, w)); invalid pixels
        are 0. Convenient for analysis; the training pipeline ships `read_pixels` output instead."""
        raw, valid = self.read_pixels(window)
        image = np.ascontiguousarray(raw.transpose(1, 2, 0), dtype=np.float32)
        image[~valid] = 0.0
        return image, valid

    def check(self):
        """Raises RasterError if the scene has no valid pixel (a reduced-resolution check), naming
        the bands (and their files) that hold no valid pixel at all."""
        mask, _ = self.validity_overview()
        if not mask.any():
            empty = [ch for ch in range(self.num_channels) if not self._band_any[ch]]
            if empty:
                files = ", ".join(dict.fromkeys(self.band_file(ch) for ch in empty))
                raise RasterError(
                    f"{files}: every pixel is nodata/NaN in band(s) {[self.band_names[ch] for ch in empty]} "
                    f"(nodata {[self.nodata[ch] for ch in empty]}); pass the right `nodata` or drop the "
                    f"band or file")
            raise RasterError(
                f"{self.path}: every pixel is nodata/NaN in at least one of the bands {self.band_names} "
                f"(nodata {self.nodata}), though no band is empty on its own; pass the right `nodata` or "
                f"drop this file")
        return self

    def read_all(self) -> tuple[np.ndarray, np.ndarray]:
        """The whole scene (tests and small rasters only)."""
        return self.read(Window(0, 0, self.width, self.height))


class Scene(_WindowReading):
    """C bands of one raster on one pixel grid, read lazily window by window.

    Args:
      path: a GeoTIFF (local, or remote: `s3://`, `gs://`, `https://`, `/vsi...`), a template with
        ``{band}`` naming one single-band GeoTIFF per band, a STAC item (`*.json` or `stac:<url>`),
        or a NetCDF / Zarr grid (`.nc`, `.zarr`: one band per grid variable).
      bands: band names (matched against the file's band descriptions, substituted into the
        template, or looked up among the STAC item's assets) or 1-based band indices; empty selects
        every band.
      nodata: overrides the files' nodata: one value for all bands, or one per band (None = none).
        NaN is always invalid. A pixel is valid only where every selected band is valid.
      crs: the CRS of a NetCDF / Zarr grid that has no CF grid mapping (ignored for GeoTIFFs).
    """

    def __init__(self, path: str, bands: BandSpec = (), nodata=None, crs=None):
        self.path, self._grid_crs = str(path), crs
        bands = (bands,) if isinstance(bands, (str, int)) else tuple(bands)
        if "{band}" in self.path:
            self._init_template(bands)
        elif stac.is_item(self.path):
            found = stac.item_bands(self.path, bands)
            self._init_band_files([b.name for b in found], [b.href for b in found],
                                  [b.index for b in found], hint="; stack them onto one grid with "
                                  "input.stack=True")
        else:
            self._init_multiband(bands)
        c = len(self.band_names)
        if nodata is None:
            pass
        elif np.ndim(nodata) == 0:
            self.nodata = [float(nodata)] * c
        else:
            if len(nodata) != c:
                raise RasterError(f"{self.path}: {len(nodata)} nodata values given for {c} bands")
            self.nodata = [None if v is None else float(v) for v in nodata]
        self._np_dtype = np.dtype(self.dtype)
        self._float_src = np.issubdtype(self._np_dtype, np.floating)
        # Nodata compared in the read dtype, grouped by value: [(value, channels)], channels being
        # a slice when all bands share the value (the common case: one vectorised comparison).
        groups: dict = {}
        for ch, v in enumerate(self.nodata):
            if v is None or np.isnan(v):
                continue  # no nodata, or NaN (always caught by the NaN test)
            if not self._float_src:
                info = np.iinfo(self.dtype)
                if v != int(v) or not info.min <= v <= info.max:
                    continue  # an integer band can never hold this value
            groups.setdefault(np.dtype(self.dtype).type(v), []).append(ch)
        c = len(self.band_names)
        self._nodata_checks = [(v, slice(0, c) if chs == list(range(c)) else chs)
                               for v, chs in groups.items()]
        # Hashable: scenes with equal rules have their windows' validity tested in one pass.
        self.validity_rule = (self._float_src, str(self._np_dtype),
                              tuple((float(v), tuple(range(c)) if isinstance(chs, slice) else tuple(chs))
                                    for v, chs in self._nodata_checks))
        self._local = threading.local()
        self._overview = None

    # -- construction -------------------------------------------------------------------------------

    def _init_multiband(self, bands):
        with open_raster(self.path, self._grid_crs) as src:
            count = src.count
            names = [d if d else f"band{i + 1}" for i, d in enumerate(src.descriptions)]
            indexes = []
            for b in bands or range(1, count + 1):
                if isinstance(b, (int, np.integer)) and not isinstance(b, bool):
                    if not 1 <= b <= count:
                        raise RasterError(f"{self.path}: band index {b} out of range 1..{count}")
                    indexes.append(int(b))
                elif isinstance(b, str):
                    if b not in names:
                        raise RasterError(f"{self.path}: no band named {b!r}; the file has bands {names}")
                    indexes.append(names.index(b) + 1)
                else:
                    raise RasterError(f"{self.path}: band {b!r} is neither a name nor a 1-based index")
            self._set_grid(src)
            self.dtype = np.result_type(*[src.dtypes[i - 1] for i in indexes]).name
            self.nodata = [src.nodatavals[i - 1] for i in indexes]
            self.band_names = [names[i - 1] for i in indexes]
        self._files = [self.path]
        self._reads = [(self.path, indexes, slice(0, len(indexes)))]

    def _init_template(self, bands):
        if not bands:
            pattern = self.path.replace("{band}", "*")
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"no file matches the band template {self.path} ({pattern})")
            head, tail = self.path.split("{band}", 1)
            bands = sorted((m[len(head):len(m) - len(tail)] for m in matches), key=_natural_key)
        for b in bands:
            if not isinstance(b, str):
                raise RasterError(f"{self.path}: a band template needs band names, got {b!r}")
        files = [self.path.replace("{band}", b) for b in bands]
        for b, f in zip(bands, files):
            if not remote.exists(f):
                raise FileNotFoundError(f"band {b!r} of template {self.path}: file not found: {f}")
        self._init_band_files(list(bands), files, [1] * len(files))

    def _init_band_files(self, names, files, indexes, hint=""):
        """Channel i is band indexes[i] of files[i]; all files must share one pixel grid."""
        dtypes, self.nodata = [], []
        for i, (f, k) in enumerate(zip(files, indexes)):
            with open_raster(f) as src:
                if i == 0:
                    self._set_grid(src)
                    first = f
                elif (src.height, src.width) != (self.height, self.width) or (
                    src.transform != self.transform or src.crs != self.crs):
                    raise RasterError(
                        f"band files disagree on the pixel grid: {first} is {self.height}x{self.width} "
                        f"{self.crs} {tuple(self.transform)[:6]} but {f} is {src.height}x{src.width} "
                        f"{src.crs} {tuple(src.transform)[:6]}{hint}")
                if not 1 <= k <= src.count:
                    raise RasterError(f"{self.path}: band {names[i]!r} is band {k} of {f}, which has "
                                      f"{src.count}")
                dtypes.append(src.dtypes[k - 1])
                self.nodata.append(src.nodatavals[k - 1])
        self.dtype = np.result_type(*dtypes).name
        self.band_names = list(names)
        self._files = list(dict.fromkeys(files))
        self._reads = [(f, [k], slice(i, i + 1)) for i, (f, k) in enumerate(zip(files, indexes))]

    def _set_grid(self, src):
        self.height, self.width = src.height, src.width
        self.crs, self.transform = src.crs, src.transform

    # -- handles --------------------------------------------------------------------------------------

    def _handle(self, path):
        # GDAL dataset handles are not thread-safe and must not cross a fork, so they are cached per
        # thread and per process: opened once, reused for every later window.
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.handles = os.getpid(), {}
        src = local.handles.get(path)
        if src is None:
            src = local.handles[path] = open_raster(path, self._grid_crs)
        return src

    def close(self):
        """Closes this thread's handles (others close when their thread or the Scene goes away)."""
        for src in getattr(self._local, "handles", {}).values():
            src.close()
        self._local = threading.local()

    def band_file(self, ch: int) -> str:
        """The file holding channel `ch` (a template has one file per band)."""
        return next(path for path, _, channels in self._reads if ch in range(self.num_channels)[channels])

    def __repr__(self):
        return (f"Scene({self.path!r}, bands={self.band_names}, {self.height}x{self.width}, "
                f"{self.crs}, {self.dtype})")

    # -- reading --------------------------------------------------------------------------------------

    def valid_mask(self, raw: np.ndarray) -> np.ndarray:
        """Band-first raw (..., C, h, w) -> valid (..., h, w): no band at its nodata value, no NaN.

        Any leading axes (a whole batch of one scene's windows at once). A nodata value at the end of
        an integer type's range is tested on the band-wise min / max (one reduction, about twice as
        fast as comparing every band), others band by band."""
        valid = np.ones(raw.shape[:-3] + raw.shape[-2:], bool)
        for v, chs in self._nodata_checks:
            bands = raw[..., chs, :, :]
            if not self._float_src and v == np.iinfo(raw.dtype).min:
                valid &= bands.min(axis=-3) != v
            elif not self._float_src and v == np.iinfo(raw.dtype).max:
                valid &= bands.max(axis=-3) != v
            else:
                valid &= (bands != v).all(axis=-3)
        if self._float_src:
            valid &= ~np.isnan(raw).any(axis=-3)
        return valid

    def _band_valid(self, raw: np.ndarray) -> np.ndarray:
        """(C, h, w) raw -> (C, h, w) validity of each band on its own (the rule of `valid_mask`)."""
        ok = ~np.isnan(raw) if self._float_src else np.ones(raw.shape, bool)
        for v, chs in self._nodata_checks:
            ok[chs] &= raw[chs] != v
        return ok

    def read_raw(self, window: Window, out: np.ndarray) -> np.ndarray:
        """Reads `window` (inside the raster) into `out` ((C, h, w), this scene's dtype), values
        untouched; validity is left to `valid_mask`, so a batch of windows is tested in one pass."""
        for path, indexes, channels in self._reads:
            _read_window(self._handle(path), indexes, window, out[channels])
        return out

    def read_pixels(self, window: Window, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Reads `window` -> (pixels (C, h, w) band-first, valid bool (h, w)), values untouched.

        GDAL fills a band-first buffer in the file's own dtype: its fastest path (no per-pixel
        conversion, no strided writes). `out`: a (C, h, w) array to fill, e.g. a slot of a batch;
        if its dtype differs from the file's, the values are cast into it after the validity test.
        """
        h, w = int(window.height), int(window.width)
        if out is not None and out.dtype == self._np_dtype:
            raw = out
        else:
            raw = np.empty((len(self.band_names), h, w), self._np_dtype)
        self.read_raw(window, raw)
        valid = self.valid_mask(raw)
        if out is not None and raw is not out:
            out[...] = raw
            raw = out
        return raw, valid

    def read_coarse(self, window: Window, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """`window` decimated to `shape` (oh, ow) -> (pixels (C, oh, ow), valid (oh, ow)).

        Nearest resampling. GDAL serves a decimated read from the file's overviews where it has them
        (a COG's internal ones, an .ovr beside a local file): the finest overview no finer than
        needed, so a remote COG sends only that overview's tiles. A pixel is then one overview pixel
        (made as the file's maker chose, often an average); without overviews, one real pixel."""
        raw = np.empty((len(self.band_names), *shape), self._np_dtype)
        for path, indexes, channels in self._reads:
            try:
                self._handle(path).read(indexes, window=window, out=raw[channels],
                                        resampling=Resampling.nearest)
            except RasterioError as e:
                raise read_error(path, window, e) from None
        return raw, self.valid_mask(raw)

    def validity_overview(self, max_size: int = 512) -> tuple[np.ndarray, tuple[float, float]]:
        """Validity at reduced resolution -> (mask (oh, ow) bool, (row_scale, col_scale)).

        Full-resolution pixel (r, c) corresponds to overview cell (r / row_scale, c / col_scale).
        Read by `read_coarse` (from the file's overviews where it has them, which is what keeps a
        remote scene's first look small), computed once, then cached.
        """
        if self._overview is not None and self._overview[0] == max_size:
            return self._overview[1], self._overview[2]
        f = max(1.0, max(self.height, self.width) / max_size)
        oh, ow = max(1, math.ceil(self.height / f)), max(1, math.ceil(self.width / f))
        raw, mask = self.read_coarse(Window(0, 0, self.width, self.height), (oh, ow))
        self._band_any = self._band_valid(raw).any(axis=(1, 2))  # names the empty bands in check()
        scales = (self.height / oh, self.width / ow)
        self._overview = (max_size, mask, scales)
        return mask, scales


_FAST_READ = [True]


def _read_window(src, indexes: list[int], window: Window, out: np.ndarray) -> None:
    """`src.read(indexes, window=window, out=out)` for a window inside the raster, without the
    argument checks of rasterio's Python wrapper: `read()` spends ~65 us per call on them, 3x the
    ~20 us GDAL takes to copy a cached 96 x 96 x 10 window. `DatasetReaderBase._read` is the call
    `read()` ends in; if a rasterio version changes it, eojax falls back to `read()` for good
    (tests/test_data.py checks the two agree)."""
    # try/except costs nothing until something is raised (Python >= 3.11).
    if _FAST_READ[0]:
        try:
            src._read(indexes, out, window, None)
            return
        except (AttributeError, TypeError):
            _FAST_READ[0] = False
        except RasterioError as e:
            raise read_error(src.name, window, e) from None
    try:
        src.read(indexes, window=window, out=out)
    except RasterioError as e:
        raise read_error(src.name, window, e) from None


def expand_paths(paths: Sequence[str] | str) -> list[str]:
    """Expands globs (sorted); templates with ``{band}`` pass through. Missing -> FileNotFoundError.
    Remote paths and URLs pass through unchecked (GDAL or pystac checks them on open; a URL's '?'
    is a query, not a pattern)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = []
    for p in map(str, paths):
        if remote.is_remote(p) or p.startswith(stac.PREFIX):
            out.append(p)
            continue
        if "{band}" in p or not glob.has_magic(p):
            if "{band}" not in p and not os.path.exists(p):
                raise FileNotFoundError(f"raster file not found: {p}")
            out.append(p)
            continue
        matches = sorted(glob.glob(p))
        if not matches:
            raise FileNotFoundError(f"no file matches the pattern {p}")
        out.extend(matches)
    if not out:
        raise FileNotFoundError("no raster paths given")
    return out


def open_scenes(paths: Sequence[str] | str, bands: BandSpec = (), nodata=None, crs=None) -> list[Scene]:
    """Scenes for every path / glob / template; all must have the same number of channels."""
    scenes = [Scene(p, bands=bands, nodata=nodata, crs=crs) for p in expand_paths(paths)]
    ref = scenes[0]
    for s in scenes[1:]:
        if s.num_channels != ref.num_channels:
            raise RasterError(
                f"{s.path} has {s.num_channels} channels {s.band_names} but {ref.path} has "
                f"{ref.num_channels} {ref.band_names}; select the same bands in every file")
    return scenes
