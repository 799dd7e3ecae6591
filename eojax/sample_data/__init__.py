"""Small real Earth-observation data shipped with eojax (1.3 MB), so that the notebooks and the
`data=sample` configs run on real imagery with nothing beside the package.

- 'eolearn_lulc': eo-learn's Sentinel-2 L1C test patch over Slovenia (101 x 100 pixels of 10 m, 13
  bands, three cloud-free dates of 2015) with its RABA land-use map: `scenes/<date>.tif`, `lulc.tif`,
  and per split a class raster for segmentation, `classes_<train|val|test>.tif` (forest, grassland,
  other; 255 elsewhere). The classification set `eolearn_lulc` (8-px chips, eojax.classify.datasets)
  is made from it. configs/seg.py:data=sample, configs/classify.py:data=sample.
- 'landsat8_013032': 8 dates of 2018 of Landsat-8 path/row 013/032 (New York), downsampled to ~3 km
  pixels by gdalcubes: bands B1-B7 and BQA as USGS names them. configs/vsat.py:data=sample.

Each folder's NOTICE says where its files come from, their licence and what was done to them;
scripts/make_sample_data.py remakes them from the shared data folder.
"""
from __future__ import annotations

import importlib.resources
import os

from eojax.errors import DataError

NAMES = ("eolearn_lulc", "landsat8_013032")


def path(name: str) -> str:
    """The folder of the sample `name` (one of NAMES), inside the installed package."""
    if name not in NAMES:
        raise DataError(f"eojax.sample_data: no sample named {name!r}; one of {NAMES}")
    folder = str(importlib.resources.files(__name__) / name)
    if not os.path.isdir(folder):
        raise DataError(f"eojax.sample_data: {folder} is missing from this installation of eojax "
                        "(reinstall it, or remake it with scripts/make_sample_data.py)")
    return folder
