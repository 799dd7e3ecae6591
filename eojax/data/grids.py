"""NetCDF / Zarr grids and xarray datasets as rasters (xarray + rioxarray: `pip install 'eojax[grids]'`).

A grid file (`.nc`, `.nc4`, `.cdf`, `.zarr`) is opened with xarray and CF-decoded (scale_factor /
add_offset applied, _FillValue -> NaN); each data variable on the two spatial dimensions is one band
named after the variable (a variable with one more dimension gives one band per index,
`<var>:<label>`). The CRS is the CF grid mapping's (rioxarray reads `grid_mapping` / `spatial_ref` /
`crs_wkt`), else EPSG:4326 for latitude / longitude coordinates, else the one given (`input.crs`);
a CRS given that contradicts the file's is refused.

The grid is copied once into a tiled GeoTIFF in eojax's local cache ($EOJAX_CACHE/grids, keyed by the
file's path, size and time and the CRS given), which every reader (`Scene`, `StackedScene`, the
statistics, export) then reads window by window like any GeoTIFF. Why a copy: netCDF chunks are often
the whole grid (each fatiando grid is one zlib chunk of 1081 x 2161), so every window read straight
from the file would decompress all of it; and GDAL's warper, which stacks grids of several
resolutions and CRSs onto one, reads GDAL datasets only. The copy is written one chunk row at a time
and renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import threading
import warnings

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from eojax.data import files, remote

log = logging.getLogger(__name__)

SUFFIXES = (".nc", ".nc4", ".cdf", ".zarr")
_VERSION = 1  # bump when the copy's layout changes
_BLOCK_BYTES = 256 << 20  # rows read from the grid at once, at most (but at least one chunk row)
_copies: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def is_grid(path) -> bool:
    """Whether `path` names a NetCDF file or a Zarr store (by its suffix)."""
    return str(path).rstrip("/").lower().endswith(SUFFIXES)


def _error(message: str):
    from eojax.data.raster import RasterError  # raster.py imports this module
    return RasterError(message)


def _xarray(what: str):
    try:
        import xarray
        importlib.import_module("rioxarray")  # registers the .rio accessor
    except ImportError as e:
        raise _error(f"{what}: reading NetCDF / Zarr grids needs xarray and rioxarray "
                     f"(pip install 'eojax[grids]'): {e}") from None
    return xarray


def open_dataset(path: str):
    """The grid file as a lazily read, CF-decoded xarray Dataset."""
    xr = _xarray(path)
    if remote.is_remote(path):
        raise _error(f"{path}: NetCDF / Zarr grids are read from local files; download it first")
    if not os.path.exists(path):
        raise FileNotFoundError(f"grid file not found: {path}")
    engine = "zarr" if path.rstrip("/").lower().endswith(".zarr") else None
    try:
        with warnings.catch_warnings():  # a store without consolidated metadata opens a little slower
            warnings.filterwarnings("ignore", "Failed to open Zarr store with consolidated", RuntimeWarning)
            return xr.open_dataset(path, engine=engine, chunks=None, decode_coords="all")
    except Exception as e:  # xarray / h5py / zarr raise many kinds for a file they cannot read
        raise _error(f"{path}: cannot read it as a NetCDF / Zarr grid ({remote.one_line(e)}); "
                     f"NetCDF needs h5netcdf (or netCDF4), Zarr needs zarr: pip install 'eojax[grids]'"
                     ) from None


def _axis(values: np.ndarray, what: str, name: str) -> tuple[float, float]:
    """A 1-D coordinate of cell centres -> (first, step); refused unless evenly spaced."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise _error(f"{what}: coordinate {name!r} needs at least 2 values on one axis")
    step = (values[-1] - values[0]) / (len(values) - 1)
    off = np.abs(values - (values[0] + step * np.arange(len(values))))
    if step == 0 or off.max() > 0.01 * abs(step):
        raise _error(f"{what}: coordinate {name!r} is not evenly spaced (off by up to {off.max():.4g} "
                     f"for a step of {step:.6g}); eojax reads regular grids: regrid it first")
    return float(values[0]), float(step)


def _geographic(ds, x: str, y: str) -> bool:
    def says(name, units, standard):
        attrs = ds[name].attrs
        return attrs.get("units") in units or attrs.get("standard_name") == standard
    return (says(x, ("degrees_east", "degree_east", "degrees_E"), "longitude")
            and says(y, ("degrees_north", "degree_north", "degrees_N"), "latitude"))


def _layout(ds, what: str, crs=None) -> dict:
    """Bands (name, variable, extra index), grid and CRS of a Dataset (see the module docstring)."""
    try:
        x, y = ds.rio.x_dim, ds.rio.y_dim
    except Exception as e:  # rioxarray's MissingSpatialDimensionError
        raise _error(f"{what}: no spatial dimensions found ({remote.one_line(e)}); name them x / y or "
                     f"longitude / latitude") from None
    bands, variables = [], []
    for name, var in ds.data_vars.items():
        if x not in var.dims or y not in var.dims:
            continue  # grid mappings, bounds, time series of other shapes
        extra = [d for d in var.dims if d not in (x, y)]
        if len(extra) > 1:
            raise _error(f"{what}: variable {name!r} has dimensions {var.dims}; eojax reads 2-D variables "
                         f"or 3-D ones (one band per index): select a slice with xarray first")
        variables.append(name)
        if not extra:
            bands.append((str(name), name, None))
        else:
            d = extra[0]
            labels = ds[d].values if d in ds.coords else range(ds.sizes[d])
            bands += [(f"{name}:{label}", name, (d, i)) for i, label in enumerate(labels)]
    if not bands:
        raise _error(f"{what}: no data variable on the dimensions ({y}, {x})")
    x0, dx = _axis(ds[x].values, what, x)
    y0, dy = _axis(ds[y].values, what, y)
    file_crs = None
    for name in variables:
        c = ds[name].rio.crs
        if c is not None and file_crs is not None and c != file_crs:
            raise _error(f"{what}: variables disagree on the CRS ({file_crs} vs {c} of {name!r})")
        file_crs = file_crs or c
    if file_crs is None and _geographic(ds, x, y):
        file_crs = CRS.from_epsg(4326)  # CF latitude / longitude coordinates without a grid mapping
    if crs is not None:
        given = CRS.from_user_input(crs)
        if file_crs is not None and given != file_crs:
            raise _error(f"{what}: input.crs {given} contradicts the file's CRS {file_crs} (its CF grid "
                         f"mapping); leave input.crs unset for this file")
        file_crs = given
    if file_crs is None:
        raise _error(f"{what}: no CRS (no CF grid_mapping and no latitude / longitude coordinates); set "
                     f"input.crs, e.g. 'EPSG:32633'")
    # North-up, left to right: the first row is the largest y, the first column the smallest x.
    left = min(x0, x0 + dx * (ds.sizes[x] - 1)) - abs(dx) / 2
    top = max(y0, y0 + dy * (ds.sizes[y] - 1)) + abs(dy) / 2
    return dict(x=x, y=y, bands=bands, crs=file_crs, flip_x=dx < 0, flip_y=dy > 0,
                height=ds.sizes[y], width=ds.sizes[x],
                transform=Affine(abs(dx), 0.0, left, 0.0, -abs(dy), top))


def _block_rows(ds, lay: dict, itemsize: int) -> int:
    """Rows per read: whole chunk rows (a chunk is decompressed whole), within _BLOCK_BYTES."""
    chunk = 1
    for _, name, _ in lay["bands"]:
        enc = ds[name].encoding
        sizes = enc.get("chunksizes") or enc.get("chunks") or enc.get("preferred_chunks")
        if isinstance(sizes, dict):
            sizes = [sizes.get(d, 1) for d in ds[name].dims]
        if sizes:
            chunk = max(chunk, int(sizes[list(ds[name].dims).index(lay["y"])]))
    fit = max(1, _BLOCK_BYTES // max(1, lay["width"] * len(lay["bands"]) * itemsize))
    return min(lay["height"], max(chunk, fit // chunk * chunk))


def write_geotiff(ds, dst_path: str, what: str, crs=None) -> None:
    """Writes the grid bands of Dataset `ds` to a tiled GeoTIFF at `dst_path` (temporary name first)."""
    lay = _layout(ds, what, crs)
    dtype = np.result_type(*[ds[name].dtype for _, name, _ in lay["bands"]])
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise _error(f"{what}: grid values of type {dtype} are not numbers eojax reads")
    floating = dtype.kind == "f"
    profile = dict(driver="GTiff", height=lay["height"], width=lay["width"], count=len(lay["bands"]),
                   dtype=dtype.name, crs=lay["crs"], transform=lay["transform"],
                   nodata=np.nan if floating else None, tiled=True, blockxsize=256, blockysize=256,
                   BIGTIFF="IF_SAFER")
    h, y, x = lay["height"], lay["y"], lay["x"]
    step = _block_rows(ds, lay, dtype.itemsize)
    with files.replaced_whole(dst_path, ".tif") as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            for r0 in range(0, h, step):
                r1 = min(h, r0 + step)
                # Output rows [r0, r1) are source rows [h - r1, h - r0) reversed when y ascends.
                rows = slice(h - r1, h - r0) if lay["flip_y"] else slice(r0, r1)
                for b, (name, var, extra) in enumerate(lay["bands"], start=1):
                    da = ds[var].isel({y: rows, **({extra[0]: extra[1]} if extra else {})})
                    block = np.asarray(da.transpose(y, x).values, dtype)
                    if lay["flip_y"]:
                        block = block[::-1]
                    if lay["flip_x"]:
                        block = block[:, ::-1]
                    dst.write(block, b, window=Window(0, r0, lay["width"], r1 - r0))
            for b, (name, var, _) in enumerate(lay["bands"], start=1):
                dst.set_band_description(b, name)
                units = ds[var].attrs.get("units")
                if units:
                    dst.update_tags(b, units=str(units))
            dst.update_tags(source=what)


def geotiff_copy(path: str, crs=None) -> str:
    """The cached GeoTIFF copy of the grid file `path` (made on first use) -> its path."""
    path = str(path)
    key = (path, "" if crs is None else str(crs))
    with _lock:
        done = _copies.get(key)
        if done is not None and os.path.exists(done):
            return done
        stem = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
        digest = remote.short_hash(f"grids-v{_VERSION}", remote.fingerprint(path), key[1])
        out = str(remote.cache_dir("grids") / f"{stem}-{digest}.tif")
        if not os.path.exists(out):
            ds = open_dataset(path)
            try:
                log.info("copying grid %s into %s (once)", path, out)
                write_geotiff(ds, out, path, crs)
            finally:
                ds.close()
        _copies[key] = out
        return out


def scene_from_xarray(obj, bands=(), crs=None, nodata=None):
    """An xarray Dataset (or DataArray) held in memory -> a `Scene` of its grid variables, through
    a cached GeoTIFF copy keyed by the values, coordinates and CRS."""
    from eojax.data.raster import Scene
    xr = _xarray("xarray input")
    ds = obj.to_dataset(name=obj.name or "band") if isinstance(obj, xr.DataArray) else obj
    h = hashlib.sha256(f"xarray-v{_VERSION}|{crs}".encode())
    for name in sorted(map(str, ds.variables)):
        v = ds[name]
        h.update(f"{name}|{v.dims}|{v.dtype}|{sorted(v.attrs.items(), key=str)}".encode())
        h.update(np.ascontiguousarray(v.values).tobytes())
    out = str(remote.cache_dir("grids") / f"xarray-{h.hexdigest()[:20]}.tif")
    if not os.path.exists(out):
        write_geotiff(ds, out, "xarray input", crs)
    return Scene(out, bands=bands, nodata=nodata)
