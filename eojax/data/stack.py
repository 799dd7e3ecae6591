"""Several rasters of different resolutions and CRSs stacked onto one target pixel grid.

A `StackedScene` reads like a `Scene` (same attributes, `read_pixels`, `validity_overview`, ...) but
each source is reprojected on the fly by GDAL's warper (rasterio `WarpedVRT`) onto one grid: that of a
reference source (by default the finest one) or one given explicitly. Nothing is resampled up front;
every window read warps just that window, and equals what `rasterio.warp.reproject` of the whole
source gives on those pixels.

Validity rule: pixels are read as floats with NaN as the target nodata, so a channel is invalid where
GDAL's warper left NaN: outside the source's footprint, where the source is nodata/NaN (GDAL drops a
target pixel whose source pixel is invalid and renormalises interpolation kernels over the valid
ones), or where the source holds NaN. A pixel is valid only where every channel is valid; the NaNs
stay in the raw pixels, so per-source masks are `~isnan(pixels)` if a model wants them.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Sequence

import numpy as np
from rasterio.crs import CRS
from affine import Affine
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.transform import array_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window

from eojax.data.raster import RasterError, _WindowReading, open_raster, read_error

# Sources whose values float32 cannot hold exactly are stacked as float64.
_WIDE = {"float64", "int32", "uint32", "int64", "uint64"}


def _resampling(name, where: str) -> Resampling:
    if isinstance(name, Resampling):
        return name
    try:
        return Resampling[str(name)]
    except KeyError:
        raise RasterError(f"{where}: unknown resampling {name!r}; one of "
                          f"{[r.name for r in Resampling]}") from None


class _Source:
    """One stacked raster: its header, selected bands and how it is warped (picklable)."""

    def __init__(self, spec, default_resampling):
        if isinstance(spec, (str, os.PathLike)):
            spec = {"path": spec}
        spec = dict(spec)
        unknown = set(spec) - {"path", "bands", "resampling", "nodata", "names", "crs"}
        if "path" not in spec or unknown:
            raise RasterError(f"a stack source needs 'path' and may have bands / resampling / nodata "
                              f"/ names / crs; got keys {sorted(spec)}")
        self.path, self.grid_crs = str(spec["path"]), spec.get("crs")
        self.resampling = _resampling(spec.get("resampling") or default_resampling, self.path)
        bands = spec.get("bands") or ()
        bands = (bands,) if isinstance(bands, (str, int)) else tuple(bands)
        with open_raster(self.path, self.grid_crs) as src:
            if src.crs is None:
                raise RasterError(f"{self.path} has no CRS, so it cannot be warped onto the stack's "
                                  f"grid; set one (e.g. `gdal_edit.py -a_srs EPSG:...`)")
            self.crs, self.transform = src.crs, src.transform
            self.height, self.width, self.bounds = src.height, src.width, src.bounds
            descs = [d if d else f"band{i + 1}" for i, d in enumerate(src.descriptions)]
            self.indexes = []
            for b in bands or range(1, src.count + 1):
                if isinstance(b, str) and b in descs:
                    self.indexes.append(descs.index(b) + 1)
                elif isinstance(b, (int, np.integer)) and not isinstance(b, bool) and 1 <= b <= src.count:
                    self.indexes.append(int(b))
                else:
                    raise RasterError(f"{self.path}: no band {b!r}; the file has bands {descs} "
                                      f"(names or 1-based indices)")
            self.dtype = np.result_type(*[src.dtypes[i - 1] for i in self.indexes]).name
            nodata = spec.get("nodata")
            self.nodata = src.nodata if nodata is None else float(nodata)
        if self.nodata is None and np.issubdtype(np.dtype(self.dtype), np.floating):
            self.nodata = float("nan")  # NaN is always invalid, tagged or not
        stem = os.path.splitext(os.path.basename(self.path))[0]
        names = spec.get("names")
        if names is not None:
            names = [names] if isinstance(names, str) else list(names)
            if len(names) != len(self.indexes):
                raise RasterError(f"{self.path}: {len(names)} names for {len(self.indexes)} bands")
            self.band_names = names
        elif len(self.indexes) == 1 and not bands:
            self.band_names = [stem]
        else:
            self.band_names = [f"{stem}:{descs[i - 1]}" for i in self.indexes]
        self.same_grid = False  # set once the target grid is known

    def pixel_area(self, crs) -> float:
        """Area of one pixel once expressed in `crs` (how 'finest' is decided)."""
        t = self.transform
        if self.crs != crs:
            t, _, _ = calculate_default_transform(self.crs, crs, self.width, self.height, *self.bounds)
        return abs(t.a * t.e - t.b * t.d)


class StackedScene(_WindowReading):
    """Channels of several rasters, each warped onto one target grid, read window by window.

    Args:
      sources: paths, or dicts {path, bands=(), resampling=None, nodata=None, names=None, crs=None}
        (crs: of a NetCDF / Zarr grid without a CF grid mapping); each source contributes its
        selected bands (all by default) as consecutive channels.
      reference: the source (index, or path) whose grid is the target; default: the finest one
        (smallest pixel area once every grid is expressed in the first source's CRS).
      crs, transform, shape: an explicit target grid (all three), instead of a reference.
      resampling: GDAL resampling name for every source, or one per source ('bilinear' for
        continuous fields, 'nearest' for categories); a source dict's own entry wins.
      band_names: names for all channels; default `<file stem>` for a source read whole with one band,
        `<stem>:<band description or bandN>` otherwise.
      dtype: the stacked dtype; default float32 (float64 if a source needs it: float64 / 32-bit ints).
    """

    def __init__(self, sources: Sequence, *, reference: "int | str | None" = None, crs=None,
                 transform=None, shape=None, resampling="bilinear", band_names=None, dtype=None):
        sources = [sources] if isinstance(sources, (str, os.PathLike, dict)) else list(sources)
        if not sources:
            raise RasterError("a stacked scene needs at least one source")
        if isinstance(resampling, (str, Resampling)):
            resampling = [resampling] * len(sources)
        elif len(resampling) != len(sources):
            raise RasterError(f"{len(resampling)} resampling names for {len(sources)} sources")
        self._sources = [_Source(s, r) for s, r in zip(sources, resampling)]
        self._files = [s.path for s in self._sources]
        self.path = "stack[" + ", ".join(self._files) + "]"
        given = [v is not None for v in (crs, transform, shape)]
        if any(given):
            if not all(given) or reference is not None:
                raise RasterError("an explicit target grid needs crs, transform and shape (and no "
                                  "reference)")
            self.crs, self.transform = CRS.from_user_input(crs), Affine(*tuple(transform)[:6])
            self.height, self.width = (int(v) for v in shape)
        else:
            ref = self._sources[self._reference_index(reference)]
            self.crs, self.transform, self.height, self.width = ref.crs, ref.transform, ref.height, ref.width
        self._check_overlap()
        self.source_channels, c = [], 0
        for s in self._sources:
            s.same_grid = (s.crs == self.crs and s.transform.almost_equals(self.transform)
                           and (s.height, s.width) == (self.height, self.width))
            self.source_channels.append(tuple(range(c, c + len(s.indexes))))
            c += len(s.indexes)
        names = [n for s in self._sources for n in s.band_names]
        if band_names is not None:
            if len(band_names) != len(names):
                raise RasterError(f"{len(band_names)} band names for {len(names)} stacked channels {names}")
            names = list(band_names)
        if len(set(names)) != len(names):
            raise RasterError(f"stacked channel names collide: {names}; give `names` per source")
        self.band_names = names
        self.nodata = [s.nodata for s in self._sources for _ in s.indexes]
        wide = any(s.dtype in _WIDE for s in self._sources)
        self.dtype = np.dtype(dtype or ("float64" if wide else "float32")).name
        if not np.issubdtype(np.dtype(self.dtype), np.floating):
            raise RasterError(f"a stacked scene is read as floats (NaN = invalid), not {self.dtype}")
        self._np_dtype = np.dtype(self.dtype)
        self._local = threading.local()
        self._overview = None

    # -- construction -------------------------------------------------------------------------------

    def _reference_index(self, reference) -> int:
        if reference is None:
            crs0 = self._sources[0].crs
            areas = [s.pixel_area(crs0) for s in self._sources]
            return int(np.argmin(areas))  # ties: the first listed
        if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
            if not 0 <= reference < len(self._sources):
                raise RasterError(f"reference {reference} out of range for {len(self._sources)} sources")
            return int(reference)
        for i, s in enumerate(self._sources):
            if os.path.abspath(s.path) == os.path.abspath(str(reference)):
                return i
        raise RasterError(f"reference {reference!r} is none of the sources {self._files}")

    def _check_overlap(self):
        left, bottom, right, top = array_bounds(self.height, self.width, self.transform)
        for s in self._sources:
            try:
                l, b, r, t = transform_bounds(s.crs, self.crs, *s.bounds, densify_pts=21)
            except Exception as e:  # PROJ cannot express this source in the target CRS
                raise RasterError(f"{s.path}: its bounds cannot be transformed to {self.crs}: {e}") from None
            finite = all(map(math.isfinite, (l, b, r, t)))
            if not finite or l >= right or r <= left or b >= top or t <= bottom:
                raise RasterError(
                    f"{s.path} does not overlap the target grid: its bounds in {self.crs} are "
                    f"({l:.6g}, {b:.6g}, {r:.6g}, {t:.6g}), the grid covers "
                    f"({left:.6g}, {bottom:.6g}, {right:.6g}, {top:.6g})")

    # -- handles --------------------------------------------------------------------------------------

    def _vrt(self, s: _Source, transform, height, width, resampling):
        src = open_raster(s.path, s.grid_crs)
        vrt = WarpedVRT(src, crs=self.crs, transform=transform, height=height, width=width,
                        resampling=resampling, src_nodata=s.nodata, nodata=float("nan"),
                        dtype=self.dtype)
        return src, vrt

    def _handle(self, k: int):
        # Dataset and VRT handles are neither thread-safe nor fork-safe: one set per thread and process.
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.handles = os.getpid(), {}
        h = local.handles.get(k)
        if h is None:
            s = self._sources[k]
            if s.same_grid:
                h = (open_raster(s.path, s.grid_crs), None)  # already on the grid: plain reads, no warper
            else:
                h = self._vrt(s, self.transform, self.height, self.width, s.resampling)
            local.handles[k] = h
        return h

    def close(self):
        """Closes this thread's handles."""
        for src, vrt in getattr(self._local, "handles", {}).values():
            if vrt is not None:
                vrt.close()
            src.close()
        self._local = threading.local()

    def grid_key(self) -> str:
        """What the pixels depend on beyond the files: target grid, bands, resampling, nodata."""
        parts = [self.crs.to_wkt(), repr(tuple(self.transform)[:6]), f"{self.height}x{self.width}",
                 self.dtype] + [f"{s.path}|{s.indexes}|{s.resampling.name}|{s.nodata}" for s in self._sources]
        return "\n".join(parts)

    def band_file(self, ch: int) -> str:
        """The source file of channel `ch`."""
        return next(s.path for s, chs in zip(self._sources, self.source_channels) if ch in chs)

    def __repr__(self):
        return (f"StackedScene({self._files}, bands={self.band_names}, {self.height}x{self.width}, "
                f"{self.crs}, {self.dtype})")

    # -- reading --------------------------------------------------------------------------------------

    def read_pixels(self, window: Window, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Reads `window` of the target grid -> (pixels (C, h, w) float, NaN where invalid; valid (h, w))."""
        h, w = int(window.height), int(window.width)
        raw = out if out is not None and out.dtype == self._np_dtype else np.empty(
            (self.num_channels, h, w), self._np_dtype)
        for k, (s, chs) in enumerate(zip(self._sources, self.source_channels)):
            src, vrt = self._handle(k)
            part = raw[chs[0]:chs[-1] + 1]
            try:
                (src if vrt is None else vrt).read(s.indexes, window=window, out=part)
            except RasterioError as e:
                raise read_error(s.path, window, e) from None
            if vrt is None and s.nodata is not None and not np.isnan(s.nodata):
                part[part == np.asarray(s.nodata).astype(self._np_dtype)] = np.nan
        valid = ~np.isnan(raw).any(axis=0)
        if out is not None and raw is not out:
            out[...] = raw
            raw = out
        return raw, valid

    def validity_overview(self, max_size: int = 512) -> tuple[np.ndarray, tuple[float, float]]:
        """Validity at reduced resolution -> (mask (oh, ow) bool, (row_scale, col_scale)).

        A grid no larger than `max_size` is read whole, so the mask is exact; a larger one is warped
        once onto a coarse grid with nearest resampling (each cell: the validity at its centre).
        """
        if self._overview is not None and self._overview[0] == max_size:
            return self._overview[1], self._overview[2]
        f = max(1.0, max(self.height, self.width) / max_size)
        if f == 1.0:
            ok = ~np.isnan(self.read_pixels(Window(0, 0, self.width, self.height))[0])
        else:
            oh, ow = max(1, math.ceil(self.height / f)), max(1, math.ceil(self.width / f))
            coarse = self.transform @ Affine.scale(self.width / ow, self.height / oh)
            ok = np.empty((self.num_channels, oh, ow), bool)
            for s, chs in zip(self._sources, self.source_channels):
                src, vrt = self._vrt(s, coarse, oh, ow, Resampling.nearest)
                with src, vrt:
                    try:
                        ok[chs[0]:chs[-1] + 1] = ~np.isnan(vrt.read(s.indexes))
                    except RasterioError as e:
                        raise read_error(s.path, None, e) from None
        mask = ok.all(axis=0)
        self._band_any = ok.any(axis=(1, 2))  # names the empty bands in check()
        scales = (self.height / mask.shape[0], self.width / mask.shape[1])
        self._overview = (max_size, mask, scales)
        return mask, scales
