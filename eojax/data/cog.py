"""Every GeoTIFF eojax writes for a user is a Cloud Optimized GeoTIFF (COG).

A COG opens anywhere (QGIS, GDAL, a browser over HTTP range requests) and stays small: 256 x 256
tiles, lossless DEFLATE with a predictor (horizontal differencing for integers, floating-point for
floats), internal overviews (nearest for class maps, where an average would invent classes; average
for continuous values, nodata pixels left out), nodata, band descriptions, tags, CRS and transform
kept. DEFLATE rather than ZSTD because every TIFF reader has it.

`CogWriter` takes windows one at a time (a scene larger than memory is never held whole): they go
into a temporary tiled, uncompressed GTiff beside the output (windowed writes that straddle tiles
stay cheap), which GDAL's COG driver (GDAL >= 3.1) then copies, computing the overviews, into the
layout COG readers expect (IFDs first, then the smallest overview's tiles ... the full resolution's
last). Only a finished file is renamed to the output path; a failure leaves none and keeps an
earlier file there.
`write_cog` writes an array that is already in memory.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from typing import Sequence

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

BLOCK = 256


def cog_options(categorical: bool) -> dict:
    """The COG driver's creation options eojax writes with."""
    return dict(BLOCKSIZE=str(BLOCK), COMPRESS="DEFLATE", PREDICTOR="YES", BIGTIFF="IF_SAFER",
                OVERVIEWS="IGNORE_EXISTING", RESAMPLING="NEAREST" if categorical else "AVERAGE")


class CogWriter:
    """`with CogWriter(path, ...) as out: out.write(block, window)`; the COG appears at `path` when the
    block ends without an error. `categorical` (class maps, masks) makes nearest-neighbour overviews."""

    def __init__(self, path: str, *, height: int, width: int, count: int, dtype, crs=None, transform=None,
                 nodata=None, descriptions: Sequence[str] = (), tags: dict | None = None,
                 categorical: bool = False):
        if descriptions and len(descriptions) != count:
            raise ValueError(f"{path}: {len(descriptions)} band descriptions for {count} bands")
        self.path = os.path.abspath(path)
        self.categorical = categorical
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".tif")
        os.close(fd)
        profile = dict(driver="GTiff", height=height, width=width, count=count, dtype=np.dtype(dtype).name,
                       crs=crs, transform=transform, nodata=nodata, tiled=True, blockxsize=BLOCK,
                       blockysize=BLOCK, BIGTIFF="IF_SAFER")
        self._georeferenced = crs is not None or transform is not None
        try:
            with self._quiet():
                self._dst = rasterio.open(self._tmp, "w", **profile)
            for i, d in enumerate(descriptions):
                self._dst.set_band_description(i + 1, d)
            if tags:
                self._dst.update_tags(**tags)
        except BaseException:
            self._discard()
            raise

    @contextlib.contextmanager
    def _quiet(self):
        """An image without a georeference (a generated picture) is meant to be one: no warning."""
        with warnings.catch_warnings():
            if not self._georeferenced:
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
            yield

    def write(self, array: np.ndarray, window: Window | None = None) -> None:
        """(count, h, w) values at `window` (None: the whole raster)."""
        self._dst.write(array, window=window)

    def close(self) -> str:
        """Converts the written raster into the COG at `path` and returns the path."""
        self._dst.close()
        out = self._tmp[:-len(".tif")] + ".cog.tif"
        try:
            with self._quiet():
                rasterio.shutil.copy(self._tmp, out, driver="COG", **cog_options(self.categorical))
            os.chmod(out, 0o644)  # mkstemp's 0600 would hide the output from other users
            os.replace(out, self.path)
        except BaseException:
            if os.path.exists(out):
                os.unlink(out)
            raise
        finally:
            self._discard()
        return self.path

    def abort(self) -> None:
        self._dst.close()
        self._discard()

    def _discard(self) -> None:
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> "CogWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_cog(path: str, array: np.ndarray, *, crs=None, transform=None, nodata=None,
              descriptions: Sequence[str] = (), tags: dict | None = None, categorical: bool = False) -> str:
    """A (count, height, width) array as a COG at `path` (written whole; see CogWriter)."""
    if array.ndim != 3:
        raise ValueError(f"{path}: write_cog takes a (bands, height, width) array, got shape {array.shape}")
    count, height, width = array.shape
    with CogWriter(path, height=height, width=width, count=count, dtype=array.dtype, crs=crs,
                   transform=transform, nodata=nodata, descriptions=descriptions, tags=tags,
                   categorical=categorical) as out:
        out.write(array)
    return path
