"""Built-in scenes for the geographic heads, so `configs/geo.py:runlocal` needs nothing but eojax.

Eight synthetic multispectral scenes (eojax.data.synthetic) placed in eight Koppen-Geiger climates
on six continents, each in the UTM zone of its place, on its own date. The generator knows nothing of
climate, so each place is given a land-cover mix that suits it (forest in Manaus, bare soil near Cairo,
cropland in Iowa, ...); the places also differ by landscape (seed), sensor (Sentinel-2, Landsat-8) and
the bands taken from it, season (the date, flipped in the south) and cloud cover: what the model can
learn to tell apart. Written once under the eojax cache (EOJAX_CACHE,
default ~/.cache/eojax).
"""
from __future__ import annotations

import math

from rasterio.warp import transform as warp_transform

from eojax.data import synthetic

# name, latitude, longitude (the scene's centre), date, sensor, the three bands the model sees (as the
# real runlocal scenes: natural or false colour, a single band repeated), cloud fraction, land-cover mix
# (biases of forest, grassland, cropland, urban, bare soil: eojax.data.synthetic.write_scene's
# cover_bias); the climate class of the packaged raster at the centre in the comment.
PLACES = (
    ("vienna", 48.2, 16.4, "2021-06-15", "sentinel2", ("B4", "B3", "B2"), 0.10, (0.2, 0.0, 0.6, -0.5, -1.5)),  # Cfb
    ("iowa", 42.0, -93.5, "2021-08-02", "landsat8", ("B5", "B4", "B3"), 0.05, (-0.8, -0.3, 1.5, -1.0, -1.5)),  # Dfa
    ("cairo", 26.0, 30.5, "2021-03-10", "landsat8", ("B7", "B6", "B4"), 0.0, (-2.0, -1.0, -1.0, -0.5, 2.0)),  # BWh
    ("manaus", -3.1, -60.0, "2021-10-20", "sentinel2", ("B8",) * 3, 0.30, (2.0, -0.5, -1.5, -1.5, -2.0)),  # Af
    ("perth", -31.9, 116.0, "2021-01-20", "sentinel2", ("B12", "B8A", "B4"), 0.0, (-0.5, 1.0, -0.5, -0.3, 0.6)),  # Csa
    ("delhi", 28.6, 77.2, "2021-11-05", "landsat8", ("B4",) * 3, 0.05, (-1.5, 0.0, 0.3, 0.6, 0.5)),  # BSh
    ("yakutsk", 62.0, 129.7, "2021-07-12", "sentinel2", ("B8", "B4", "B3"), 0.20, (1.0, 0.8, -2.0, -2.0, -1.0)),  # Dfc
    ("tokyo", 36.0, 139.8, "2021-04-28", "landsat8", ("B4", "B3", "B2"), 0.15, (0.5, -1.0, -0.5, 1.5, -2.0)),  # Cfa
)
SIZE = 192  # pixels a side


def utm_crs(lat: float, lon: float) -> str:
    """The WGS84 / UTM zone of a point, as an EPSG code."""
    zone = int((lon + 180) // 6) % 60 + 1
    return f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}"


def default_sources(directory=None) -> tuple[dict, ...]:
    """`input.sources` of the built-in scenes (written once, atomically): absolute paths, the bands
    and the acquisition date of each."""
    directory = directory or synthetic.default_dir() / "geo"
    sources = []
    for k, (name, lat, lon, date, sensor, bands, clouds, cover) in enumerate(PLACES):
        path = directory / f"{name}.tif"
        if not path.exists():
            crs = utm_crs(lat, lon)
            (x,), (y,) = warp_transform("EPSG:4326", crs, [lon], [lat])
            half = SIZE * synthetic.SENSORS[sensor].gsd_m / 2
            origin = (math.floor(x - half), math.floor(y + half))  # the upper left corner
            synthetic.write_scene(path, seed=100 + k, height=SIZE, width=SIZE, sensor=sensor, crs=crs,
                                  origin=origin, date=date, cloud_fraction=clouds, nodata_border=False,
                                  cover_bias=cover)
        sources.append(dict(path=str(path), bands=bands, date=date))
    return tuple(sources)

