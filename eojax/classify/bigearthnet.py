"""BigEarthNet-S2 v1.0 as a multi-label CSV for the classify family's 'csv' source.

The release (`BigEarthNet-v1.0/<patch>/`) keeps one GeoTIFF per band at its native resolution
(120 x 120 px at 10 m: B02, B03, B04, B08; 60 x 60 at 20 m: B05, B06, B07, B8A, B11, B12; 20 x 20 at
60 m: B01, B09) and the patch's CORINE labels in `<patch>_labels_metadata.json`. `write_table` writes,
beside each listed patch, `<patch>.vrt`: a GDAL virtual raster that stacks the 12 bands at 120 x 120
(bilinear, as torchgeo reads them), names them (B1 ... B12, B8A after B8, eojax's Sentinel-2 names)
and takes the patch's georeferencing from its metadata; no pixel is copied. `labels.csv` holds
path (the .vrt), labels (BigEarthNet-19 classes separated by ';') and split, from the official
BigEarthNet-19 train / val / test lists (CSV lines `<S2 patch>,<S1 patch>`).

43 -> 19 classes: the mapping of the BigEarthNet-19 paper (label_indices.json of
rsim/BigEarthNet-S2_19-classes_models, as torchgeo lists it); a 43-class label with no 19-class
counterpart is dropped, so a patch may have no label.
"""
from __future__ import annotations

import csv
import json
import os
import pathlib
from xml.sax.saxutils import escape

from eojax.errors import DataError

RELEASE_FOLDER = "BigEarthNet-v1.0"
# (file suffix, eojax band name, side in pixels), in the order torchgeo stacks them.
BANDS = (("B01", "B1", 20), ("B02", "B2", 120), ("B03", "B3", 120), ("B04", "B4", 120), ("B05", "B5", 60),
         ("B06", "B6", 60), ("B07", "B7", 60), ("B08", "B8", 120), ("B8A", "B8A", 60), ("B09", "B9", 20),
         ("B11", "B11", 60), ("B12", "B12", 60))
SIZE = 120

CLASSES_43 = (
    "Continuous urban fabric", "Discontinuous urban fabric", "Industrial or commercial units",
    "Road and rail networks and associated land", "Port areas", "Airports", "Mineral extraction sites",
    "Dump sites", "Construction sites", "Green urban areas", "Sport and leisure facilities",
    "Non-irrigated arable land", "Permanently irrigated land", "Rice fields", "Vineyards",
    "Fruit trees and berry plantations", "Olive groves", "Pastures",
    "Annual crops associated with permanent crops", "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest", "Natural grassland",
    "Moors and heathland", "Sclerophyllous vegetation", "Transitional woodland/shrub", "Beaches, dunes, sands",
    "Bare rock", "Sparsely vegetated areas", "Burnt areas", "Inland marshes", "Peatbogs", "Salt marshes",
    "Salines", "Intertidal flats", "Water courses", "Water bodies", "Coastal lagoons", "Estuaries",
    "Sea and ocean")
CLASSES_19 = (
    "Urban fabric", "Industrial or commercial units", "Arable land", "Permanent crops", "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas", "Broad-leaved forest", "Coniferous forest", "Mixed forest",
    "Natural grassland and sparsely vegetated areas", "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub", "Beaches, dunes, sands", "Inland wetlands", "Coastal wetlands",
    "Inland waters", "Marine waters")
# index in CLASSES_43 -> index in CLASSES_19
TO_19 = {0: 0, 1: 0, 2: 1, 11: 2, 12: 2, 13: 2, 14: 3, 15: 3, 16: 3, 18: 3, 17: 4, 19: 5, 20: 6, 21: 7, 22: 8,
         23: 9, 24: 10, 25: 11, 31: 11, 26: 12, 27: 12, 28: 13, 29: 14, 33: 15, 34: 15, 35: 16, 36: 16, 38: 17,
         39: 17, 40: 18, 41: 18, 42: 18}


def labels_19(names) -> list[str]:
    """43-class CORINE names -> the BigEarthNet-19 names (sorted by class index, no repeats)."""
    unknown = [n for n in names if n not in CLASSES_43]
    if unknown:
        raise DataError(f"unknown BigEarthNet label(s) {unknown}")
    index = sorted({TO_19[i] for i in (CLASSES_43.index(n) for n in names) if i in TO_19})
    return [CLASSES_19[i] for i in index]


def vrt_xml(patch: str, metadata: dict) -> str:
    """The 12-band 120 x 120 virtual raster of a patch folder (sources relative to the .vrt)."""
    head = f'<VRTDataset rasterXSize="{SIZE}" rasterYSize="{SIZE}">\n'
    c = metadata.get("coordinates") or {}
    if metadata.get("projection") and c.get("lrx", 0) != c.get("ulx", 0):
        res_x, res_y = (c["lrx"] - c["ulx"]) / SIZE, (c["lry"] - c["uly"]) / SIZE
        head += (f"  <SRS>{escape(metadata['projection'])}</SRS>\n"
                 f"  <GeoTransform>{c['ulx']}, {res_x}, 0, {c['uly']}, 0, {res_y}</GeoTransform>\n")
    bands = []
    for i, (suffix, name, side) in enumerate(BANDS, start=1):
        bands.append(
            f'  <VRTRasterBand dataType="UInt16" band="{i}">\n    <Description>{name}</Description>\n'
            f'    <SimpleSource resampling="bilinear">\n'
            f'      <SourceFilename relativeToVRT="1">{escape(patch)}_{suffix}.tif</SourceFilename>\n'
            f'      <SourceBand>1</SourceBand>\n'
            f'      <SrcRect xOff="0" yOff="0" xSize="{side}" ySize="{side}"/>\n'
            f'      <DstRect xOff="0" yOff="0" xSize="{SIZE}" ySize="{SIZE}"/>\n'
            f'    </SimpleSource>\n  </VRTRasterBand>\n')
    return head + "".join(bands) + "</VRTDataset>\n"


def _check_band_sizes(folder: pathlib.Path, patch: str) -> None:
    """The release's band sizes (BANDS), checked on one patch: the .vrt files rely on them."""
    import rasterio
    for suffix, _, side in BANDS:
        path = folder / f"{patch}_{suffix}.tif"
        with rasterio.open(path) as src:
            if (src.height, src.width) != (side, side):
                raise DataError(f"{path} is {src.height} x {src.width} px; BigEarthNet-S2 v1.0's {suffix} is "
                                f"{side} x {side}")


def write_table(root, split_lists: dict) -> str:
    """<root>/<RELEASE_FOLDER>/<patch>/<patch>.vrt for every patch of the split lists ({split: CSV})
    and <root>/labels.csv -> its path. A listed patch without its 12 bands or metadata is an error."""
    root = pathlib.Path(root)
    rows, missing, total = [], [], 0
    for split, listing in split_lists.items():
        with open(listing, newline="") as f:
            patches = [r[0].strip() for r in csv.reader(f) if r and r[0].strip()]
        for patch in patches:
            if os.path.basename(patch) != patch or patch in (".", ".."):
                raise DataError(f"{listing}: {patch!r} is not a patch name")
            folder = root / RELEASE_FOLDER / patch
            needed = [folder / f"{patch}_labels_metadata.json"] + [folder / f"{patch}_{s}.tif" for s, _, _ in BANDS]
            total += len(needed)
            absent = [str(p.relative_to(root)) for p in needed if not p.is_file()]
            if absent:
                missing += absent
                continue
            if not rows:
                _check_band_sizes(folder, patch)
            metadata = json.loads(needed[0].read_text())
            (folder / f"{patch}.vrt").write_text(vrt_xml(patch, metadata))
            rows.append((f"{RELEASE_FOLDER}/{patch}/{patch}.vrt", ";".join(labels_19(metadata["labels"])), split))
    if missing:
        raise DataError(f"BigEarthNet-S2 lacks {len(missing)} of the {total} files its split lists name, "
                        f"e.g. {missing[0]}; refused")
    table = root / "labels.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([("path", "labels", "split"), *rows])
    return str(table)
