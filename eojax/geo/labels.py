"""Labels of a raster window made from the data itself: location, Koppen-Geiger fractions, date.

For a window of a georeferenced scene the labeller samples a g x g grid of the window's pixel centres
(g = `grid`), takes them to longitude/latitude (WGS84) and to the climate raster's CRS through GDAL
(rasterio.warp.transform, any CRS), and returns
  latlon   the window centre, or with location='mean' the mean of the grid points' unit vectors
           (the spherical mean of the window's pixels; equal to the centre for small windows)
  climate  the fraction of grid points in each of the 31 classes (nearest cell of the climate raster,
           i.e. a nearest-neighbour reprojection of the climate raster onto the g x g grid);
           climate[0] is the sea fraction
  doy      the scene's acquisition day of year (1..366) or 0 when unknown (`acquisition_date`).
All windows of one scene are transformed in one GDAL call, so a batch costs two calls per scene.
"""
from __future__ import annotations

import datetime as dt
import glob
import os
import re
from typing import Mapping, Sequence

import numpy as np
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

from eojax.geo import encoding
from eojax.geo.climate import NUM_CLASSES, ClimateMap

WGS84 = CRS.from_epsg(4326)
# Dataset tags that hold an acquisition time, most specific first. TIFFTAG_DATETIME is often the
# time the file was written, so it is the last resort.
DATE_TAGS = ("DATE_ACQUIRED", "ACQUISITIONDATE", "ACQUISITION_DATE", "SENSING_TIME", "SENSING_DATE",
             "TIFFTAG_DATETIME")
_LANDSAT_ID = re.compile(r"L[CETOM]\d\d{6}(\d{4})(\d{3})")  # LC8 PPPRRR YYYY DDD (pre-collection)
_YYYYMMDD = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)")
_YYYYDDD = re.compile(r"(?<!\d)(\d{4})(\d{3})(?!\d)")


def _valid_year(y: int) -> bool:
    return 1950 <= y <= 2100


def parse_date_text(text: str) -> dt.date | None:
    """'2015-08-04', '2015:08:04 10:00:00', '2024-04-29T21:11:59Z; ...' -> the first valid date."""
    m = re.search(r"(\d{4})[-:/](\d{2})[-:/](\d{2})", text)
    if m and _valid_year(int(m.group(1))):
        try:
            return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:
            return None
    return None


def date_from_name(name: str) -> dt.date | None:
    """A date in a file name: a Landsat scene ID (LC80200392015216LGN00 -> 2015 day 216), else the
    first YYYYMMDD (or YYYY-MM-DD) that is a real date, else the first YYYYDDD (2024120T...)."""
    m = _LANDSAT_ID.search(name)
    if m and _valid_year(int(m.group(1))) and 1 <= int(m.group(2)) <= 366:
        return dt.date(int(m.group(1)), 1, 1) + dt.timedelta(int(m.group(2)) - 1)
    for m in _YYYYMMDD.finditer(name):
        y, mo, d = map(int, m.groups())
        if _valid_year(y):
            try:
                return dt.date(y, mo, d)
            except ValueError:
                pass
    for m in _YYYYDDD.finditer(name):
        y, doy = int(m.group(1)), int(m.group(2))
        if _valid_year(y) and 1 <= doy <= 366:
            return dt.date(y, 1, 1) + dt.timedelta(doy - 1)
    return None


def _mtl_date(folder: str) -> dt.date | None:
    for mtl in sorted(glob.glob(os.path.join(folder, "*MTL.txt"))):
        with open(mtl, errors="replace") as f:
            for line in f:
                if line.strip().startswith(("DATE_ACQUIRED", "ACQUISITION_DATE")):
                    return parse_date_text(line)
    return None


def acquisition_date(path: str, tags: Mapping[str, str] | None = None,
                     override: str | None = None) -> tuple[dt.date | None, str]:
    """(date or None, where it came from). The rules, first that applies:
    1. `override` ('YYYY-MM-DD'), from the config;
    2. a dataset tag in DATE_TAGS;
    3. DATE_ACQUIRED in a Landsat *MTL.txt in the raster's folder;
    4. the file name (see date_from_name; for a '{band}' template, with '{band}' removed).
    """
    if override:
        date = parse_date_text(override)
        if date is None:
            raise ValueError(f"date override {override!r} for {path} is not YYYY-MM-DD")
        return date, "config"
    for key in DATE_TAGS:
        for k, v in (tags or {}).items():
            if k.upper() == key and (date := parse_date_text(str(v))):
                return date, f"tag {k}"
    if date := _mtl_date(os.path.dirname(os.path.abspath(path))):
        return date, "MTL file"
    if date := date_from_name(os.path.basename(path).replace("{band}", "")):
        return date, "file name"
    return None, "unknown"


def day_of_year(date: dt.date | None) -> int:
    return 0 if date is None else date.timetuple().tm_yday


class WindowLabeler:
    """Labels for windows of `scenes` (objects with path, crs, transform, files). Build once: the
    climate raster is read into memory and every scene's date is resolved here."""

    def __init__(self, scenes: Sequence, climate: ClimateMap | str, *, grid: int = 8,
                 location: str = "centre", dates: Mapping[str, str] | None = None):
        if location not in ("centre", "mean"):
            raise ValueError(f"location must be 'centre' or 'mean', got {location!r}")
        if grid < 1:
            raise ValueError(f"the label grid must be at least 1x1, got {grid}")
        self.climate = climate if isinstance(climate, ClimateMap) else ClimateMap(climate)
        self.grid, self.location = int(grid), location
        self.scenes = list(scenes)
        self.doy, self.date_source = [], []
        dates = dict(dates or {})
        for s in self.scenes:
            if s.crs is None:
                raise ValueError(f"{s.path} has no CRS: geographic labels need georeferenced rasters")
            tags = _tags(s.files[0])
            date, source = acquisition_date(s.path, tags, dates.get(s.path))
            self.doy.append(day_of_year(date))
            self.date_source.append(source)
        # Sample positions inside a window, as fractions of its size (pixel-centre grid).
        self._frac = (np.arange(self.grid) + 0.5) / self.grid

    def _points(self, scene, rows, cols, size):
        """(n, g*g) x, y in the scene CRS of the grid points of windows at (rows, cols)."""
        f = self._frac * size
        r = np.asarray(rows, np.float64)[:, None, None] + f[None, :, None]
        c = np.asarray(cols, np.float64)[:, None, None] + f[None, None, :]
        r, c = np.broadcast_arrays(r, c)
        t = scene.transform
        x = t.c + t.a * c + t.b * r
        y = t.f + t.d * c + t.e * r
        return x.reshape(len(rows), -1), y.reshape(len(rows), -1)

    def label(self, scene_ids, rows, cols, size: int) -> dict[str, np.ndarray]:
        """Windows (scene index, top row, left col) of `size` pixels -> per-window labels:
        latlon (n, 2) degrees, coords (n, 3) and date (n, 2) encodings, climate (n, 31) fractions,
        doy (n,) int32 (0 = unknown)."""
        scene_ids, rows, cols = (np.asarray(a).reshape(-1) for a in (scene_ids, rows, cols))
        n = len(scene_ids)
        latlon = np.zeros((n, 2), np.float64)
        climate = np.zeros((n, NUM_CLASSES), np.float32)
        doy = np.zeros(n, np.int32)
        g2 = self.grid * self.grid
        for s in np.unique(scene_ids):
            sel = np.flatnonzero(scene_ids == s)
            scene = self.scenes[int(s)]
            x, y = self._points(scene, rows[sel], cols[sel], size)
            ccx, ccy = self._centres(scene, rows[sel], cols[sel], size)
            # One GDAL call: the grid points, then the window centres.
            xs, ys = np.concatenate([x.ravel(), ccx]), np.concatenate([y.ravel(), ccy])
            lon, lat = map(np.asarray, warp_transform(scene.crs, WGS84, xs, ys))
            m = len(sel)
            if self.location == "centre":
                latlon[sel] = np.stack([lat[-m:], lon[-m:]], -1)
            else:
                v = encoding.latlon_to_xyz(lat[:-m], lon[:-m]).reshape(m, g2, 3).mean(axis=1)
                latlon[sel] = np.stack(encoding.xyz_to_latlon(v), -1)
            if self.climate.crs == WGS84:
                kx, ky = lon[:-m], lat[:-m]
            else:
                kx, ky = map(np.asarray, warp_transform(scene.crs, self.climate.crs, x.ravel(), y.ravel()))
            cls = self.climate.classes_at(kx, ky).reshape(m, g2)
            counts = np.bincount((cls + NUM_CLASSES * np.arange(m)[:, None]).ravel(),
                                 minlength=m * NUM_CLASSES)
            climate[sel] = counts.reshape(m, NUM_CLASSES) / g2
            doy[sel] = self.doy[int(s)]
        return {"latlon": latlon.astype(np.float32),
                "coords": encoding.encode_coords(latlon[:, 0], latlon[:, 1]).astype(np.float32),
                "climate": climate, "doy": doy,
                "date": encoding.encode_doy(doy.astype(np.float64)).astype(np.float32)}

    @staticmethod
    def _centres(scene, rows, cols, size):
        t = scene.transform
        r = np.asarray(rows, np.float64) + size / 2
        c = np.asarray(cols, np.float64) + size / 2
        return t.c + t.a * c + t.b * r, t.f + t.d * c + t.e * r


def _tags(path: str) -> dict:
    import rasterio
    with rasterio.open(path) as src:
        return dict(src.tags())
