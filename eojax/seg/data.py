"""Image / mask GeoTIFF pairs for semantic segmentation, as Grain sources.

Layouts:
- HLS Burn Scars (`dataset='burnscars'`): `<root>/training/*_merged.tif` and `<root>/validation/...`,
  each image (6 bands B2, B3, B4, B8A, B11, B12, 512 x 512, float reflectance, 9999 = missing) next
  to `<name>.mask.tif` (1 burn scar, 0 not burned, -1 missing). PANGAEA's splits: train and val are a
  fixed 90 / 10 shuffle of `training/` (sklearn's train_test_split(test_size=0.1, random_state=23),
  reproduced exactly with numpy's RandomState), test is `validation/`. An empty root uses synthetic
  chips in that layout (eojax.data.synthetic.write_burn_scar_chips), written once to the cache.
- Any folder (`dataset='folder'`): per split a glob of images and either a glob of masks (paired in
  sorted order) or the `mask_suffix` rule (image suffix -> mask suffix, e.g. '_merged.tif' ->
  '.mask.tif'). Without a val glob, val is the same 10 % holdout of train as PANGAEA's.
- SpaceNet buildings from solaris (`dataset='solaris'`): the 900 x 900 pan image and its pixel-aligned
  0/255 footprint mask cut into a 3 x 3 grid of 300 x 300 chips (6 train, 1 val, 2 test).

Training elements are random crops (input.preprocessing='seg_default') or whole scenes (the resize
preprocessings, eojax.seg.modes); evaluation elements are whole scenes. Elements carry raw band-first
pixels in the file's dtype (normalised on the device, as every eojax input), `valid` (no band at
nodata) and an int32 `label` in which missing mask values, values that are no class and invalid
pixels are `ignore_index`.
"""
from __future__ import annotations

import hashlib
import math
import os
import pathlib
from dataclasses import dataclass
from typing import Sequence

import grain
import numpy as np
import rasterio
from rasterio.windows import Window

from eojax.data import pipeline, sensors, synthetic
from eojax.data.raster import RasterError, Scene, expand_paths
from eojax.data.stats import BandStats, load_or_compute_stats
from eojax.seg.modes import preprocessing

BURNSCARS_BANDS = ("B2", "B3", "B4", "B8A", "B11", "B12")
BURNSCARS_CLASSES = ("not_burned", "burn_scar")
# PANGAEA's configs/dataset/hlsburnscars.yaml (reflectance units, the files' own).
PANGAEA_BURNSCARS_MEAN = (0.033349706741586264, 0.05701185520536176, 0.05889748132001316,
                          0.2323245113436119, 0.1972854853760658, 0.11944914225186566)
PANGAEA_BURNSCARS_STD = (0.02269135568823774, 0.026807560223070237, 0.04004109844362779,
                         0.07791732423672691, 0.08708738838140137, 0.07241979477437814)
BURNSCARS_NODATA = 9999.0  # PANGAEA zeroes pixels equal to 9999


@dataclass(frozen=True)
class Pair:
    image: str
    mask: str


def pair_files(images, masks=None, mask_suffix: Sequence[str] = ("_merged.tif", ".mask.tif")) -> list[Pair]:
    """Image paths / globs with their masks: from `masks` (paired in sorted order) or by suffix."""
    image_paths = expand_paths(images)
    if masks:
        mask_paths = expand_paths(masks)
        if len(mask_paths) != len(image_paths):
            raise FileNotFoundError(f"{len(image_paths)} images ({images}) but {len(mask_paths)} masks "
                                    f"({masks}): every image needs exactly one mask")
        return [Pair(i, m) for i, m in zip(image_paths, mask_paths)]
    old, new = mask_suffix
    pairs = []
    for path in image_paths:
        if not path.endswith(old):
            raise ValueError(f"image {path} does not end with {old!r}, so its mask cannot be named; "
                             f"give a mask glob or another mask_suffix")
        mask = path[: -len(old)] + new
        if not os.path.exists(mask):
            raise FileNotFoundError(f"mask not found for image {path}: expected {mask}")
        pairs.append(Pair(path, mask))
    return pairs


def holdout_split(n: int, fraction: float = 0.1, seed: int = 23) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of sklearn's train_test_split(range(n), test_size=fraction, random_state=seed)."""
    n_val = math.ceil(fraction * n)
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_val:], perm[:n_val]


def burnscars_splits(root: str) -> dict[str, list[Pair]]:
    training = pair_files(os.path.join(root, "training", "*_merged.tif"))
    train, val = holdout_split(len(training))
    return {"train": [training[i] for i in train], "val": [training[i] for i in val],
            "test": pair_files(os.path.join(root, "validation", "*_merged.tif"))}


def synthetic_burnscars(root=None, *, size: int = 128, n_train: int = 40, n_test: int = 8) -> str:
    """Synthetic chips in the HLS Burn Scars layout, written once -> the root folder."""
    root = pathlib.Path(root) if root else synthetic.default_dir() / f"burnscars_{size}"
    for split, n, seed in (("training", n_train, 1), ("validation", n_test, 2)):
        folder = root / split
        if len(list(folder.glob("*.mask.tif"))) < n:
            synthetic.write_burn_scar_chips(folder, n=n, size=size, seed=seed)
    return str(root)


def solaris_chips(source: str, out=None, chip: int = 300) -> dict[str, list[Pair]]:
    """SpaceNet pan image + building mask (solaris test data) -> 3 x 3 chips with georeferenced masks."""
    image_path = os.path.join(source, "sample_geotiff.tif")
    mask_path = os.path.join(source, "sample_fp_mask.tif")
    for p in (image_path, mask_path):
        if not os.path.exists(p):
            raise FileNotFoundError(f"solaris sample not found: {p}")
    out = pathlib.Path(out) if out else synthetic.default_dir().parent / "solaris_chips"
    with rasterio.open(image_path) as src, rasterio.open(mask_path) as msk:
        if (src.height, src.width) != (msk.height, msk.width):
            raise RasterError(f"{mask_path} is {msk.height}x{msk.width} but {image_path} is "
                              f"{src.height}x{src.width}")
        rows, cols = src.height // chip, src.width // chip
        splits = {"train": [], "val": [], "test": []}
        for r in range(rows):
            for c in range(cols):
                split = "train" if r < rows - 1 else ("val" if c == 0 else "test")
                name = out / split / f"sn_r{r}c{c}"
                pair = Pair(f"{name}_merged.tif", f"{name}.mask.tif")
                if not (os.path.exists(pair.image) and os.path.exists(pair.mask)):
                    win = Window(c * chip, r * chip, chip, chip)
                    profile = dict(driver="GTiff", height=chip, width=chip, crs=src.crs,
                                   transform=src.window_transform(win))
                    os.makedirs(name.parent, exist_ok=True)
                    labels = (msk.read(1, window=win) > 127).astype(np.uint8)[None]
                    synthetic._write_atomic_tif(pair.mask, labels, dict(profile, count=1, dtype="uint8"),
                                                ["building"], {"classes": "0 background, 1 building"})
                    synthetic._write_atomic_tif(pair.image, src.read(window=win),
                                                dict(profile, count=src.count, dtype=src.dtypes[0],
                                                     nodata=src.nodata), ["pan"], {})
                splits[split].append(pair)
    return splits


class PairSet:
    """Opened pairs of one split; headers are checked here (cheap), before any training starts."""

    def __init__(self, pairs: Sequence[Pair], bands=(), nodata=None, *, num_classes: int,
                 ignore_index: int = -1, mask_values: Sequence[float] = ()):
        if not pairs:
            raise FileNotFoundError("no image / mask pairs")
        self.pairs = list(pairs)
        self.scenes = [Scene(p.image, bands=bands, nodata=nodata) for p in self.pairs]
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.mask_values = tuple(mask_values)
        ref = self.scenes[0]
        for pair, scene in zip(self.pairs, self.scenes):
            if scene.num_channels != ref.num_channels:
                raise RasterError(f"{pair.image} has {scene.num_channels} bands {scene.band_names} but "
                                  f"{ref.path} has {ref.num_channels} {ref.band_names}")
            if not os.path.exists(pair.mask):
                raise FileNotFoundError(f"mask not found for image {pair.image}: {pair.mask}")
            with rasterio.open(pair.mask) as m:
                if m.count != 1:
                    raise RasterError(f"mask {pair.mask} has {m.count} bands; a mask has one")
                if (m.height, m.width) != (scene.height, scene.width):
                    raise RasterError(f"mask {pair.mask} is {m.height}x{m.width} but its image "
                                      f"{pair.image} is {scene.height}x{scene.width}")

    @property
    def band_names(self) -> list[str]:
        return list(self.scenes[0].band_names)

    @property
    def num_channels(self) -> int:
        return self.scenes[0].num_channels

    def labels(self, raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Raw mask values -> int32 classes; anything else (e.g. -1 = missing) -> ignore_index."""
        if self.mask_values:
            out = np.full(raw.shape, self.ignore_index, np.int32)
            for k, v in enumerate(self.mask_values):
                out[raw == v] = k
        else:
            known = (raw >= 0) & (raw < self.num_classes)
            # int32 first: in a uint8 mask's own dtype the ignore index -1 would wrap to 255 (NumPy 2)
            out = np.where(known, raw.astype(np.int32), self.ignore_index)
        return np.where(valid, out, self.ignore_index).astype(np.int32)

    def read(self, i: int, window: Window | None = None) -> dict:
        scene = self.scenes[i]
        window = window or Window(0, 0, scene.width, scene.height)
        pixels, valid = scene.read_pixels(window)
        with rasterio.open(self.pairs[i].mask) as m:
            raw = m.read(1, window=window)
        return {"pixels": pixels, "valid": valid, "label": self.labels(raw, valid)}

    def fingerprint(self) -> list:
        out = []
        for p in self.pairs:
            for f in (p.image, p.mask):
                st = os.stat(f)
                out.append((os.path.basename(f), st.st_size, int(st.st_mtime)))
        return out


def _pad(element: dict, h: int, w: int, ignore_index: int) -> dict:
    ph, pw = h - element["label"].shape[0], w - element["label"].shape[1]
    if ph == 0 and pw == 0:
        return element
    return {"pixels": np.pad(element["pixels"], ((0, 0), (0, ph), (0, pw))),
            "valid": np.pad(element["valid"], ((0, ph), (0, pw))),
            "label": np.pad(element["label"], ((0, ph), (0, pw)), constant_values=ignore_index)}


class RandomCrops(grain.MapDataset):
    """Element i: a `size` x `size` crop at a random place of a random pair, seeded by (seed, i)
    (the host batcher numbers epoch e's elements e * N + j, so every epoch draws new crops).
    Pairs smaller than the crop are padded (invalid, ignored)."""

    def __init__(self, pairs: PairSet, size: int, num_crops: int, seed: int):
        super().__init__()
        self._pairs, self._size, self._n, self._seed = pairs, int(size), int(num_crops), int(seed)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rng = np.random.default_rng((self._seed, int(index)))
        i = int(rng.integers(len(self._pairs.scenes)))
        s = self._pairs.scenes[i]
        h, w = min(self._size, s.height), min(self._size, s.width)
        y, x = int(rng.integers(s.height - h + 1)), int(rng.integers(s.width - w + 1))
        return _pad(self._pairs.read(i, Window(x, y, w, h)), self._size, self._size, self._pairs.ignore_index)


class WholeScenes(grain.MapDataset):
    """Element i: pair i whole, padded to the largest scene of the split (at least `min_size`), for
    sliding-window evaluation."""

    def __init__(self, pairs: PairSet, min_size: int = 0):
        super().__init__()
        self._pairs = pairs
        self.height = max([min_size] + [s.height for s in pairs.scenes])
        self.width = max([min_size] + [s.width for s in pairs.scenes])

    def __len__(self) -> int:
        return len(self._pairs.scenes)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return _pad(self._pairs.read(int(index) % len(self)), self.height, self.width, self._pairs.ignore_index)


def splits_from_config(cfg) -> dict[str, list[Pair]]:
    """config.input -> {'train', 'val', 'test'?: [Pair]}."""
    if cfg.dataset == "burnscars":
        return burnscars_splits(cfg.root or synthetic_burnscars(size=cfg.synthetic_size))
    if cfg.dataset == "solaris":
        root = cfg.root or os.path.join(os.environ.get("EOJAX_TEST_DATA", ""), "solaris")
        return solaris_chips(root)
    if cfg.dataset == "folder":
        if not cfg.train_images:
            raise ValueError("input.dataset='folder' needs input.train_images (a glob of images)")
        pick = lambda split: pair_files(cfg[f"{split}_images"], cfg[f"{split}_masks"] or None, cfg.mask_suffix)
        out = {"train": pick("train")}
        if cfg.val_images:
            out["val"] = pick("val")
        else:
            train, val = holdout_split(len(out["train"]))
            out["train"], out["val"] = [out["train"][i] for i in train], [out["train"][i] for i in val]
        if cfg.test_images:
            out["test"] = pick("test")
        return out
    raise ValueError(f"input.dataset={cfg.dataset!r} is unknown; one of 'burnscars', 'folder', 'solaris'")


def sensor(cfg, sets: dict[str, PairSet]) -> str:
    """The sensor of the images' bands (eojax.data.sensors): input.sensor, else found from every
    scene's files (Landsat MTL beside them, HLS / Landsat / Sentinel-2 file names, band descriptions
    and tags), else from the band names; '' when nothing names one. Scenes of different sensors are
    an error (one band list cannot mean both)."""
    configured = cfg.get("sensor", "")
    if configured:
        return sensors.get(configured).name
    found = {}
    for split, pairs in sets.items():
        for pair, scene in zip(pairs.pairs, pairs.scenes):
            name = sensors.detect(scene.files, scene.band_names)
            if name:
                found.setdefault(name, pair.image)
    if len(found) > 1:
        raise ValueError("the images are of several sensors: "
                         + "; ".join(f"{s} ({p})" for s, p in found.items())
                         + "; set input.sensor to the one their band names follow")
    return next(iter(found), "")


def band_stats(cfg, train: PairSet) -> BandStats | None:
    """The normalisation: explicit input.mean/std, PANGAEA's (burn scars bands), the training split's
    own statistics ('data', cached by eojax.data.stats), or none."""
    names = train.band_names
    if cfg.mean or cfg.std:
        mean, std = np.asarray(cfg.mean, np.float64), np.asarray(cfg.std, np.float64)
    elif cfg.normalize == "pangaea":
        if [n.upper() for n in names] != list(BURNSCARS_BANDS):
            raise ValueError(f"input.normalize='pangaea' has HLS burn scars statistics for "
                             f"{BURNSCARS_BANDS}; the data has bands {names}: use 'data'")
        mean, std = np.asarray(PANGAEA_BURNSCARS_MEAN), np.asarray(PANGAEA_BURNSCARS_STD)
    elif cfg.normalize == "data":
        return load_or_compute_stats(train.scenes)[0]
    elif cfg.normalize == "none":
        return None
    else:
        raise ValueError(f"input.normalize={cfg.normalize!r}: one of 'pangaea', 'data', 'none'")
    if len(mean) != len(names) or len(std) != len(names):
        raise ValueError(f"input.mean / input.std have {len(mean)} / {len(std)} values for "
                         f"{len(names)} bands {names}")
    return BandStats(mean=mean, std=std, count=np.zeros(len(names), np.int64), band_names=names)


def scene_size(pairs: PairSet, mode: str, crop: int) -> tuple[int, int]:
    """(H, W) of a training element: the crop ('seg_default'); the largest side of the split's scenes,
    square ('seg_resize_input_layer': the encoder is built at that size, smaller scenes padded); the
    scenes' one size ('seg_resize', which resizes each scene as it is, so padding would be resized
    into the picture)."""
    if mode == "seg_default":
        return crop, crop
    sizes = sorted({(s.height, s.width) for s in pairs.scenes})
    if mode == "seg_resize_input_layer":
        side = max(max(hw) for hw in sizes)
        return side, side
    if len(sizes) > 1:
        big = max(pairs.scenes, key=lambda s: (s.height, s.width))
        raise RasterError(f"input.preprocessing='seg_resize' resizes whole scenes, so a split's scenes need "
                          f"one size; {pairs.scenes[0].path} is {pairs.scenes[0].height}x"
                          f"{pairs.scenes[0].width} but {big.path} is {big.height}x{big.width}")
    return sizes[0]


def make_input(cfg, pairs: PairSet, *, split: str, batch_size: int, process_index: int = 0,
               process_count: int = 1, seed: int = 0, window: int | None = None):
    """split 'train': endless checkpointable iterator of random crops ('seg_default'), or of whole
    scenes, every scene once per epoch, reshuffled each epoch (the resize preprocessings);
    otherwise one pass over the whole scenes (re-iterable), the last batch padded with weight-0 rows.
    `window` is the model's input size (default input.crop): whole scenes are padded to at least it,
    except under 'seg_resize', which takes each scene at its own size."""
    mode = preprocessing(cfg)
    if split == "train" and mode == "seg_default":
        ds = RandomCrops(pairs, cfg.crop, cfg.num_crops, seed)
        return pipeline.make_iterator(ds, batch_size=batch_size, process_index=process_index,
                                      process_count=process_count, shuffle=True, seed=seed,
                                      worker_count=cfg.worker_count)
    if mode == "seg_resize":
        scene_size(pairs, mode, cfg.crop)  # one size, or a one-line error
    ds = WholeScenes(pairs, min_size=0 if mode == "seg_resize" else (window or cfg.crop))
    if split == "train":
        return pipeline.make_iterator(ds, batch_size=batch_size, process_index=process_index,
                                      process_count=process_count, shuffle=True, seed=seed,
                                      worker_count=cfg.worker_count)
    return pipeline.make_iter_dataset(ds, batch_size=batch_size, process_index=process_index,
                                      process_count=process_count, shuffle=False, num_epochs=1,
                                      drop_remainder=False, worker_count=cfg.worker_count)


def fingerprint(sets: dict[str, PairSet]) -> str:
    h = hashlib.sha256(repr({k: v.fingerprint() for k, v in sorted(sets.items())}).encode())
    return h.hexdigest()[:16]
