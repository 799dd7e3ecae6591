"""Labelled image chips for scene classification, as Grain sources.

Sources (`config.input.source`):
- 'folders': one folder of chips per class under `root`, class = folder name (sorted, or the order
  of `input.classes`). EuroSAT's two releases have this layout: the 13-band GeoTIFFs
  (`EuroSAT_MS/<Class>/<Class>_<n>.tif`, bands B1..B12 then B8A, `input.preset='eurosat_ms'`) and
  the RGB JPEGs (`EuroSAT/2750/<Class>/<Class>_<n>.jpg`). Any raster GDAL reads works.
- 'csv': a CSV with a `path` column (relative to the CSV's folder or absolute), a `label` column, or
  `labels` with several class names separated by ';' (multi-label, BigEarthNet style), and
  optionally a `split` column (train / val / test).
- 'fmow': fMoW-Sentinel (eojax.data.fmow: its CSVs and splits, the 62 categories).
- 'eolearn_lulc': a real land-use set made from eo-learn's Sentinel-2 patch and its LULC map
  (eojax.classify.datasets: forest / grassland / other, 8-px chips of 13 bands on 3 dates, a
  spatial split), written once to the cache from `root` (default $EOJAX_TEST_DATA/eolearn).
- 'synthetic': eojax's built-in chips (land-cover classes of the synthetic scenes, written once to
  the cache; what `:runlocal` and the tests train on).

A source without its own split gets a fixed one: each chip goes to train / val / test by a hash of
its path relative to the root (60 / 20 / 20, the proportions of the usual EuroSAT split): the same
on every machine and for every chip already there when files are added.

Elements: `pixels` (C, S, S) float32 raw band-first values (normalised on the device), `valid`
(S, S) bool, `label` int32 (single-label) or `labels` (K,) float32 multi-hot, `weight`. A chip of
another size is centre-cropped to a square and resized to S (fMoW's rule, eojax.data.fmow).
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import os
import pathlib
import warnings
from typing import Sequence

import grain
import numpy as np
import rasterio

from eojax.classify import datasets
from eojax.data import fmow, pipeline, synthetic
from eojax.data.raster import RasterError
from eojax.data.stats import BandStats

SOURCES = ("folders", "csv", "fmow", "eolearn_lulc", "synthetic")
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
IMAGE_SUFFIXES = (".tif", ".tiff", ".jpg", ".jpeg", ".png", ".jp2")
# EuroSAT's 13-band GeoTIFFs carry no band descriptions; their order (B8A last) is the release's.
PRESETS = {"eurosat_ms": dict(band_names=("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10",
                                          "B11", "B12", "B8A"), sensor="sentinel2a"),
           "eurosat_rgb": dict(band_names=("B4", "B3", "B2"), sensor="sentinel2a")}


@dataclasses.dataclass(frozen=True)
class Chip:
    path: str
    labels: tuple[int, ...]  # class indices (one for single-label)
    key: str  # what the fixed split hashes: the path relative to the root


def fixed_split(key: str) -> str:
    """train / val / test from a hash of `key` (60 / 20 / 20)."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64
    return "train" if u < SPLIT_FRACTIONS[0] else "val" if u < sum(SPLIT_FRACTIONS[:2]) else "test"


def folder_chips(root: str, classes: Sequence[str] = ()) -> tuple[list[str], list[Chip]]:
    """(class names, chips) of a one-folder-per-class tree."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"config.input.root={root!r} is not a folder")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not found:
        raise ValueError(f"{root} has no class folders (one folder of chips per class)")
    classes = list(classes) or found
    missing = [c for c in classes if c not in found]
    if missing:
        raise ValueError(f"input.classes {missing} have no folder in {root} (found {found})")
    chips = []
    for i, c in enumerate(classes):
        folder = os.path.join(root, c)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
        if not files:
            raise ValueError(f"class folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        chips += [Chip(os.path.join(folder, f), (i,), f"{c}/{f}") for f in files]
    return classes, chips


def csv_chips(path: str, classes: Sequence[str] = ()) -> tuple[list[str], list[Chip], list[str] | None]:
    """(class names, chips, per-chip split or None) of a CSV of path, label or labels [, split]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.input.csv={path!r} is not a file")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0] or not ({"label", "labels"} & set(rows[0])):
        raise ValueError(f"{path}: needs a header with 'path' and 'label' (or 'labels', ';'-separated)")
    column = "labels" if "labels" in rows[0] else "label"
    names = [[n.strip() for n in r[column].split(";") if n.strip()] if column == "labels" else [r[column].strip()]
             for r in rows]
    classes = list(classes) or sorted({n for ns in names for n in ns})
    index = {c: i for i, c in enumerate(classes)}
    base = os.path.dirname(os.path.abspath(path))
    chips, splits = [], []
    for line, (r, ns) in enumerate(zip(rows, names), start=2):
        unknown = [n for n in ns if n not in index]
        if unknown:
            raise ValueError(f"{path} line {line} ({r['path']}): label(s) {unknown} not in the class list {classes}")
        chips.append(Chip(os.path.join(base, r["path"]), tuple(index[n] for n in ns), r["path"]))
        split = (r.get("split") or "").strip()
        if split and split not in SPLITS:
            raise ValueError(f"{path} line {line}: split {split!r} is not one of {SPLITS}")
        splits.append(split)
    return classes, chips, splits if any(splits) else None


@dataclasses.dataclass(frozen=True)
class Header:
    count: int
    dtype: str
    nodata: float | None
    descriptions: tuple


def _header(path: str) -> Header:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"chip not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                return Header(src.count, src.dtypes[0], src.nodata, tuple(src.descriptions))
    except rasterio.errors.RasterioError as e:
        raise RasterError(f"cannot read chip {path}: {e}") from None


def band_plan(first: Header, path: str, bands: Sequence = (), band_names: Sequence[str] = ()) -> tuple[list[int], list[str]]:
    """(0-based indexes, names) of the bands to read: `bands` as names (from `band_names`, else the
    file's descriptions) or 1-based indexes; default all."""
    names = list(band_names) or [d or f"band{i + 1}" for i, d in enumerate(first.descriptions)]
    if len(names) != first.count:
        raise RasterError(f"{path} has {first.count} bands but input.band_names names {len(names)}: {names}")
    if not bands:
        return list(range(first.count)), names
    index = []
    for b in bands:
        if isinstance(b, (int, np.integer)) or str(b).isdigit():
            i = int(b) - 1
            if not 0 <= i < first.count:
                raise RasterError(f"input.bands: band {b} is outside 1..{first.count} of {path}")
        elif b in names:
            i = names.index(b)
        else:
            raise RasterError(f"input.bands: {b!r} is not a band of {path} (bands {names})")
        index.append(i)
    return index, [names[i] for i in index]


class ChipSet:
    """Chips of one split with their bands checked: every file has the first file's band count."""

    def __init__(self, chips: Sequence[Chip], *, bands=(), band_names=(), nodata=None, size: int = 64,
                 num_classes: int, multi_label: bool = False, check_workers: int = 8):
        if not chips:
            raise ValueError("no chip in this split")
        self.chips, self.size, self.num_classes, self.multi_label = list(chips), int(size), num_classes, multi_label
        with concurrent.futures.ThreadPoolExecutor(check_workers) as pool:
            headers = list(pool.map(_header, [c.path for c in self.chips]))
        first = headers[0]
        for chip, h in zip(self.chips, headers):
            if h.count != first.count:
                raise RasterError(f"{chip.path} has {h.count} bands but {self.chips[0].path} has {first.count}; "
                                  "every chip needs the same bands")
        self.band_index, self.band_names = band_plan(first, self.chips[0].path, bands, band_names)
        self.nodata = first.nodata if nodata is None else float(nodata)
        self.dtype = first.dtype

    def __len__(self) -> int:
        return len(self.chips)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Chip i -> (pixels (C, S, S) float32, valid (S, S))."""
        path = self.chips[i].path
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                with rasterio.open(path) as src:
                    if src.count <= max(self.band_index):  # changed since the header check
                        raise RasterError(f"{path} has {src.count} bands; this set reads bands "
                                          f"{[i + 1 for i in self.band_index]}")
                    image = src.read([i + 1 for i in self.band_index])
        except rasterio.errors.RasterioError as e:
            raise RasterError(f"cannot read chip {path}: {e}") from None
        return fmow.make_element(image, self.nodata, range(len(self.band_index)), self.size)

    def __getitem__(self, i: int) -> dict:
        pixels, valid = self.read(i)
        labels = self.chips[i].labels
        if self.multi_label:
            target = {"labels": np.isin(np.arange(self.num_classes), labels).astype(np.float32)}
        else:
            target = {"label": np.int32(labels[0])}
        return {"pixels": pixels, "valid": valid, **target}

    def band_stats(self, max_chips: int = 2000) -> BandStats:
        """Per-band mean and std over the valid pixels of up to `max_chips` chips (evenly spaced)."""
        pick = np.unique(np.linspace(0, len(self) - 1, min(len(self), max_chips)).astype(int))
        c = len(self.band_index)
        s1, s2, n = np.zeros(c), np.zeros(c), np.zeros(c, np.int64)
        for i in pick:
            x, v = self.read(int(i))
            x = x[:, v].astype(np.float64)
            if not np.isfinite(x).all():
                raise RasterError(f"{self.chips[i].path} holds inf or NaN values outside nodata")
            s1, s2, n = s1 + x.sum(1), s2 + (x ** 2).sum(1), n + x.shape[1]
        if not n.all():
            raise RasterError("the training chips hold no valid pixel (check input.nodata)")
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
        return BandStats(mean=mean, std=std, count=n, band_names=list(self.band_names))


class _FMoW:
    """fMoW-Sentinel as a ChipSet-like split (its own reader and statistics)."""

    def __init__(self, cfg, split: str):
        self.source = fmow.FMoWSentinelSource(cfg.root, split, size=cfg.size, bands=tuple(cfg.bands) or None)
        self.band_names, self.num_classes, self.multi_label = self.source.band_names, self.source.num_classes, False

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        e = self.source[i]
        return {"pixels": e["pixels"], "valid": e["valid"], "label": np.int32(e["label"])}

    def band_stats(self, max_chips: int = 0) -> BandStats:
        return fmow.satmae_stats(self.band_names)


def synthetic_chips(directory=None, *, n: int = 240, size: int = 32, seed: int = 0) -> str:
    """eojax's built-in classification chips (written once): `size`-pixel chips cut from synthetic
    Sentinel-2 scenes, each in the folder of its majority land-cover class."""
    directory = pathlib.Path(directory or synthetic.default_dir() / f"classify_{n}_{size}_{seed}")
    if (directory / "DONE").exists():
        return str(directory)
    synthetic.write_classification_chips(directory, n=n, size=size, seed=seed)
    (directory / "DONE").write_text("ok\n")
    return str(directory)


def eolearn_lulc_csv(root: str = "") -> str:
    """labels.csv of the eo-learn land-use set (eojax.classify.datasets), written once to the cache."""
    root = root or os.path.join(os.environ.get("EOJAX_TEST_DATA", ""), "eolearn")
    directory = synthetic.default_dir() / "eolearn_lulc_v1"
    if not (directory / "DONE").exists():
        datasets.write_eolearn_lulc(directory, root)
        (directory / "DONE").write_text("ok\n")
    return str(directory / "labels.csv")


def splits_from_config(cfg) -> tuple[list[str], dict[str, list[Chip]]]:
    """(class names, chips per split) for the 'folders', 'csv', 'eolearn_lulc' and 'synthetic' sources."""
    if cfg.source in ("csv", "eolearn_lulc"):
        table = eolearn_lulc_csv(cfg.root) if cfg.source == "eolearn_lulc" else cfg.csv
        default = datasets.LULC_CLASSES if cfg.source == "eolearn_lulc" else ()
        classes, chips, given = csv_chips(table, cfg.classes or default)
    else:
        root = synthetic_chips() if cfg.source == "synthetic" else cfg.root
        classes, chips = folder_chips(root, cfg.classes)
        given = None
    names = given or [fixed_split(c.key) for c in chips]
    return classes, {s: [c for c, n in zip(chips, names) if n == s] for s in SPLITS}


def open_splits(cfg) -> tuple[list[str], dict]:
    """(class names, {split: ChipSet or fMoW split}) of config.input."""
    if cfg.source not in SOURCES:
        raise ValueError(f"config.input.source={cfg.source!r} is unknown; one of {SOURCES}")
    if cfg.source == "fmow":
        sets = {s: _FMoW(cfg, s) for s in SPLITS if os.path.isfile(fmow.split_csv(cfg.root, s))}
        if "train" not in sets:
            raise FileNotFoundError(f"config.input.root={cfg.root!r} has no fMoW-Sentinel train.csv")
        return list(fmow.FMOW_CATEGORIES), sets
    classes, chips = splits_from_config(cfg)
    preset = PRESETS.get(cfg.preset, {}) if cfg.preset else {}
    if cfg.preset and not preset:
        raise ValueError(f"config.input.preset={cfg.preset!r} is unknown; one of {sorted(PRESETS)}")
    multi = any(len(c.labels) != 1 for s in chips.values() for c in s) or cfg.multi_label
    sets = {}
    for split, items in chips.items():
        if not items:
            if split == "train":
                raise ValueError(f"no training chip in {cfg.root or cfg.csv}")
            continue
        sets[split] = ChipSet(items, bands=tuple(cfg.bands), band_names=tuple(cfg.band_names) or
                              preset.get("band_names", ()), nodata=cfg.nodata, size=cfg.size,
                              num_classes=len(classes), multi_label=multi)
    return classes, sets


class _Elements(grain.MapDataset):
    def __init__(self, source):
        super().__init__()
        self._source = source

    def __len__(self):
        return len(self._source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        return self._source[int(i) % len(self._source)]


def make_input(source, *, endless: bool, batch_size: int, process_index: int, process_count: int, seed: int,
               worker_count: int = 0):
    """endless: a shuffled checkpointable iterator (training); otherwise one ordered pass, the last
    batch padded with weight-0 rows."""
    ds = _Elements(source)
    if endless:
        return pipeline.make_iterator(ds, batch_size=batch_size, process_index=process_index,
                                      process_count=process_count, shuffle=True, seed=seed,
                                      worker_count=worker_count)
    return pipeline.make_iter_dataset(ds, batch_size=batch_size, process_index=process_index,
                                      process_count=process_count, shuffle=False, num_epochs=1,
                                      drop_remainder=False, worker_count=worker_count)
