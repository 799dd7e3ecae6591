"""fMoW-Sentinel (SatMAE's Sentinel-2 version of Functional Map of the World) as a Grain source.

Layout under `root`: `<split>.csv` (train / val / test; the release's `test_gt.csv` also works)
with columns category, location_id, image_id, timestamp, polygon; one 13-band GeoTIFF per row at
`<split>/<cat>/<cat>_<loc>/<cat>_<loc>_<img>.tif`, bands B1, B2, B3, B4, B5, B6, B7, B8, B8A, B9,
B10, B11, B12 (the released test images live in `test_gt/`, used when `test/` is absent).

Elements are fixed-size: the centred square of side min(h, w) resized to `size` x `size` (the
"resize the shorter side, centre-crop" of SatMAE's evaluation transform), float32, band-first;
normalisation happens on the device (`eojax.data.device.to_model_input(..., mode='satmae_minmax')`
with `satmae_stats(bands)` reproduces SatMAE's mean +- 2 std scaling).
"""
from __future__ import annotations

import csv
import datetime
import os
from typing import Sequence

import numpy as np

from eojax.data.raster import RasterError, open_raster
from eojax.data.stats import BandStats

FMOW_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
DEFAULT_DROP = ("B1", "B9", "B10")  # SatMAE's dropped bands: 60 m aerosol, water vapour, cirrus
CSV_COLUMNS = ("category", "location_id", "image_id", "timestamp", "polygon")

# The 62 fMoW categories, sorted: label = index here (SatMAE's list), stable across splits.
FMOW_CATEGORIES = (
    "airport", "airport_hangar", "airport_terminal", "amusement_park", "aquaculture",
    "archaeological_site", "barn", "border_checkpoint", "burial_site", "car_dealership",
    "construction_site", "crop_field", "dam", "debris_or_rubble", "educational_institution",
    "electric_substation", "factory_or_powerplant", "fire_station", "flooded_road", "fountain",
    "gas_station", "golf_course", "ground_transportation_station", "helipad", "hospital",
    "impoverished_settlement", "interchange", "lake_or_pond", "lighthouse", "military_facility",
    "multi-unit_residential", "nuclear_powerplant", "office_building", "oil_or_gas_facility", "park",
    "parking_lot_or_garage", "place_of_worship", "police_station", "port", "prison", "race_track",
    "railway_bridge", "recreational_facility", "road_bridge", "runway", "shipyard", "shopping_mall",
    "single-unit_residential", "smokestack", "solar_farm", "space_facility", "stadium",
    "storage_tank", "surface_mine", "swimming_pool", "toll_booth", "tower", "tunnel_opening",
    "waste_disposal", "water_treatment_facility", "wind_farm", "zoo")

# Per-band statistics SatMAE uses for fMoW-Sentinel (13 bands, file order).
_SATMAE_MEAN = (1370.19151926, 1184.3824625, 1120.77120066, 1136.26026392, 1263.73947144,
                1645.40315151, 1846.87040806, 1762.59530783, 1972.62420416, 582.72633433,
                14.77112979, 1732.16362238, 1247.91870117)
_SATMAE_STD = (633.15169573, 650.2842772, 712.12507725, 965.23119807, 948.9819932, 1108.06650639,
               1258.36394548, 1233.1492281, 1364.38688993, 472.37967789, 14.3114637, 1310.36996126,
               1087.6020813)


def select_bands(bands: Sequence[str] | None = None, drop: Sequence[str] = DEFAULT_DROP) -> tuple[str, ...]:
    """Band names to read: `bands` in the order given, else the file's order without `drop`."""
    chosen = tuple(bands) if bands else tuple(b for b in FMOW_BANDS if b not in set(drop))
    unknown = [b for b in chosen + tuple(drop) if b not in FMOW_BANDS]
    if unknown:
        raise RasterError(f"unknown fMoW-Sentinel band(s) {unknown}; the files hold {FMOW_BANDS}")
    if not chosen:
        raise RasterError("no fMoW-Sentinel band left to read")
    return chosen


def satmae_stats(bands: Sequence[str] | None = None, drop: Sequence[str] = DEFAULT_DROP) -> BandStats:
    """SatMAE's fMoW-Sentinel mean / std for the selected bands (count unknown: 0)."""
    names = select_bands(bands, drop)
    idx = [FMOW_BANDS.index(b) for b in names]
    return BandStats(mean=np.array(_SATMAE_MEAN)[idx], std=np.array(_SATMAE_STD)[idx],
                     count=np.zeros(len(idx), np.int64), band_names=list(names))


def _resize_weights(n_in: int, n_out: int, offset: float, span: float) -> np.ndarray:
    """(n_out, n_in) interpolation weights mapping [offset, offset + span) onto n_out pixels.

    Triangle (bilinear) kernel at half-pixel centres, widened by the scale when shrinking (so it
    averages instead of skipping pixels); rows sum to 1. A whole-pixel offset at scale 1 is a copy.
    """
    scale = span / n_out
    centres = offset + (np.arange(n_out) + 0.5) * scale - 0.5
    radius = max(scale, 1.0)
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] - centres[:, None]) / radius)
    return w / w.sum(axis=1, keepdims=True)


def center_resize(pixels: np.ndarray, valid: np.ndarray, size: int,
                  crop: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(C, h, w), (h, w) -> the centred square of side crop * min(h, w) resized to (C, size, size)
    float32, and its validity (crop 0.875 = SatMAE's evaluation crop_pct; 1 = the whole square).

    Invalid pixels never enter a value: each output is the kernel average over valid pixels only,
    and is valid when at least half of its kernel weight lies on valid pixels (else 0).
    """
    _, h, w = pixels.shape
    m = min(h, w) * float(crop)
    wr = _resize_weights(h, size, (h - m) / 2, m)
    wc = _resize_weights(w, size, (w - m) / 2, m)
    v = valid.astype(np.float64)
    # Two matrix products (rows, then columns): a 3-operand einsum loops over o*h*w*p per band (4 s per 120-px chip).
    num = wr @ np.where(valid, pixels, 0).astype(np.float64) @ wc.T
    den = wr @ v @ wc.T
    ok = den >= 0.5 - 1e-9
    out = np.where(ok, num / np.where(ok, den, 1.0), 0.0).astype(np.float32)
    return out, ok


def unix_seconds(timestamp: str) -> int:
    """ISO-8601 timestamp (UTC if no zone) -> seconds since 1970; -1 if unparsable."""
    try:
        t = datetime.datetime.fromisoformat(timestamp.strip().replace("Z", "+00:00"))
    except ValueError:
        return -1
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    return int(t.timestamp())


def split_csv(root: str, split: str) -> str:
    """`<root>/<split>.csv` (for 'test', the release's `test_gt.csv` when `test.csv` is absent)."""
    path = os.path.join(root, f"{split}.csv")
    if split == "test" and not os.path.isfile(path) and os.path.isfile(os.path.join(root, "test_gt.csv")):
        return os.path.join(root, "test_gt.csv")
    return path


def read_rows(root: str, split: str, categories: Sequence[str]) -> tuple[str, list[tuple]]:
    """`<root>/<split>.csv` -> (csv path, [(category, location_id, image_id, timestamp, polygon)])."""
    path = split_csv(root, split)
    if not os.path.isfile(path):
        found = sorted(f for f in os.listdir(root) if f.endswith(".csv")) if os.path.isdir(root) else []
        raise FileNotFoundError(f"fMoW-Sentinel split {split!r}: {path} not found (CSV files in "
                                f"{root}: {found or 'none'})")
    known = set(categories)
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for line, r in enumerate(reader, start=2):
            if r["category"] not in known:
                raise ValueError(f"{path} line {line}: unknown category {r['category']!r}")
            try:
                loc, img = int(r["location_id"]), int(r["image_id"])
            except ValueError:
                raise ValueError(f"{path} line {line}: location_id {r['location_id']!r} / image_id "
                                 f"{r['image_id']!r} are not integers") from None
            rows.append((r["category"], loc, img, r["timestamp"], r["polygon"]))
    return path, rows


def image_path(root: str, folder: str, category: str, location_id: int, image_id: int) -> str:
    stem = f"{category}_{location_id}"
    return os.path.join(root, folder, category, stem, f"{stem}_{image_id}.tif")


def read_image(path: str) -> tuple[np.ndarray, float | None]:
    """All 13 bands of one fMoW-Sentinel GeoTIFF -> (pixels (13, h, w) file dtype, nodata)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fMoW-Sentinel image not found: {path}")
    with open_raster(path) as src:
        if src.count != len(FMOW_BANDS):
            raise RasterError(f"{path} has {src.count} bands; fMoW-Sentinel images have "
                              f"{len(FMOW_BANDS)} ({', '.join(FMOW_BANDS)})")
        return src.read(), src.nodata


def make_element(image: np.ndarray, nodata, band_index: Sequence[int], size: int,
                 crop: float = 1.0) -> tuple:
    """13-band native image -> (pixels (C, size, size) float32, valid): selected bands, a pixel
    valid where none of them is NaN or `nodata`, then `center_resize`."""
    x = image[list(band_index)]
    valid = np.ones(x.shape[1:], bool)
    if np.issubdtype(x.dtype, np.floating):
        valid &= ~np.isnan(x).any(axis=0)
    if nodata is not None and not np.isnan(nodata):
        valid &= (x != nodata).all(axis=0)
    return center_resize(x, valid, size, crop)


def split_folder(root: str, split: str) -> str:
    if split == "test" and not os.path.isdir(os.path.join(root, "test")) and os.path.isdir(
            os.path.join(root, "test_gt")):
        return "test_gt"  # the released fMoW-Sentinel test images
    return split


class FMoWSentinelSource:
    """Random-access fMoW-Sentinel source for Grain (`grain.MapDataset.source(...)`).

    Element i (CSV row i): pixels (C, size, size) float32, valid (size, size) bool, label int32
    (index of the category in `categories`, default the 62 sorted fMoW categories), location_id,
    image_id, timestamp (seconds since 1970, -1 if unparsable) and index (the CSV row) as int64.
    `metadata(i)` gives the strings (category, timestamp, polygon, path).

    Args:
      root: folder holding `<split>.csv` and the `<split>/` image tree.
      split: 'train', 'val' or 'test'.
      size: output side in pixels.
      bands: band names to read, in this order; default: all but `drop`.
      drop: bands left out when `bands` is not given (default B1, B9, B10: SatMAE's 10 bands
        B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12).
      categories: the label list (default the 62 sorted fMoW categories); a CSV category outside
        it is an error.
      nodata: overrides the files' nodata value (NaN is always invalid).
      crop: fraction of the centred square kept before resizing (SatMAE's evaluation: 0.875).
    """

    def __init__(self, root: str, split: str = "train", *, size: int = 96,
                 bands: Sequence[str] | None = None, drop: Sequence[str] = DEFAULT_DROP,
                 categories: Sequence[str] | None = None, nodata: float | None = None,
                 crop: float = 1.0):
        self.root, self.split, self.size, self.crop = str(root), split, int(size), float(crop)
        self.band_names = list(select_bands(bands, drop))
        self._band_index = [FMOW_BANDS.index(b) for b in self.band_names]
        self.categories = tuple(categories or FMOW_CATEGORIES)
        self.csv_path, self._rows = read_rows(self.root, split, self.categories)
        self._folder = split_folder(self.root, split)
        self._label = {c: i for i, c in enumerate(self.categories)}
        self.nodata = nodata

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self):
        return (f"FMoWSentinelSource({self.root!r}, {self.split!r}, {len(self)} images, "
                f"bands={self.band_names}, size={self.size})")

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def path(self, i: int) -> str:
        cat, loc, img = self._rows[i][:3]
        return image_path(self.root, self._folder, cat, loc, img)

    def metadata(self, i: int) -> dict:
        cat, loc, img, ts, poly = self._rows[i]
        return {"category": cat, "location_id": loc, "image_id": img, "timestamp": ts,
                "polygon": poly, "path": self.path(i)}

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        cat, loc, img, ts, _ = self._rows[i]
        image, file_nodata = read_image(self.path(i))
        pixels, valid = make_element(image, file_nodata if self.nodata is None else self.nodata,
                                     self._band_index, self.size, self.crop)
        return {"pixels": pixels, "valid": valid, "label": np.int32(self._label[cat]),
                "location_id": np.int64(loc), "image_id": np.int64(img),
                "timestamp": np.int64(unix_seconds(ts)), "index": np.int64(i)}
