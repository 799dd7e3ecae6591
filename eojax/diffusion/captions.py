"""Caption datasets for text-to-image diffusion: readers and a Grain source.

Layouts:
- RSICD (COCO style): a JSON with images[].{id, file_name} and annotations[].{image_id, caption}
  (RSICD has 5 per image), images in `<json dir>/images/` (or the JSON's own folder).
- `metadata.jsonl` (HF imagefolder): one {"file_name": ..., "text": ...} object per line, file names
  relative to the file's folder; several lines may name one image.

Images are read through rasterio, so PNG / JPEG and multi-band GeoTIFFs take one path: the shorter
side is resampled (bilinear) to `size`, the centre square is kept, and values are mapped from
[0, max_value] to [-1, 1]. The class of an image (for per-class picture grids) is its file name
without the trailing `_<number>` (RSICD names files like `airport_17.jpg`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from typing import Sequence

import grain
import numpy as np
import rasterio
from rasterio.enums import Resampling


@dataclasses.dataclass(frozen=True)
class Record:
    path: str
    captions: tuple[str, ...]
    label: str  # class name for picture grids


def _label(file_name: str) -> str:
    stem = os.path.splitext(os.path.basename(file_name))[0]
    return re.sub(r"_\d+$", "", stem)


def read_rsicd(json_path: str, image_dir: str | None = None, check_files: bool = True,
               skip_missing: bool = False) -> list[Record]:
    with open(json_path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path} is not valid JSON: {e}") from e
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{json_path} has no '{key}' list: not a COCO / RSICD caption file")
    if image_dir is None:
        folder = os.path.dirname(os.path.abspath(json_path))
        image_dir = os.path.join(folder, "images") if os.path.isdir(os.path.join(folder, "images")) else folder
    caps: dict = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(str(a["caption"]).strip())
    records = [Record(os.path.join(image_dir, im["file_name"]), tuple(caps.get(im["id"], ())),
                      _label(im["file_name"])) for im in data["images"]]
    return _checked(records, json_path, check_files, skip_missing)


def read_metadata_jsonl(path: str, check_files: bool = True, skip_missing: bool = False) -> list[Record]:
    folder = os.path.dirname(os.path.abspath(path))
    caps: dict[str, list[str]] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row["file_name"], row["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected {{\"file_name\": ..., \"text\": ...}}, got {line.strip()[:80]!r}") from e
            caps.setdefault(name, []).append(str(text).strip())
    records = [Record(os.path.join(folder, name), tuple(texts), _label(name)) for name, texts in caps.items()]
    return _checked(records, path, check_files, skip_missing)


def read_captions(path: str, check_files: bool = True, skip_missing: bool = False) -> list[Record]:
    """Either layout, by extension (.jsonl: metadata.jsonl; .json: RSICD / COCO). A listed image that
    does not exist is an error naming it, or (skip_missing) left out with a warning."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path} does not exist")
    if path.endswith(".jsonl"):
        return read_metadata_jsonl(path, check_files, skip_missing)
    return read_rsicd(path, check_files=check_files, skip_missing=skip_missing)


def _checked(records: list[Record], source: str, check_files: bool, skip_missing: bool = False) -> list[Record]:
    if not records:
        raise ValueError(f"{source} lists no images")
    no_caption = [r.path for r in records if not r.captions]
    if no_caption:
        raise ValueError(f"{source}: {len(no_caption)} image(s) have no caption, e.g. {no_caption[0]}")
    if check_files:
        missing = [r.path for r in records if not os.path.isfile(r.path)]
        if missing and skip_missing and len(missing) < len(records):
            warnings.warn(f"{source}: leaving out {len(missing)} missing image(s), e.g. {missing[0]}", stacklevel=3)
            records = [r for r in records if os.path.isfile(r.path)]
        elif missing:
            raise FileNotFoundError(f"{source}: {len(missing)} image file(s) missing, e.g. {missing[0]}")
    return sorted(records, key=lambda r: r.path)


def split(records: Sequence[Record], eval_fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, held-out) by a hash of each file name: stable when files are added or removed."""
    def held_out(r):
        h = int(hashlib.md5(os.path.basename(r.path).encode()).hexdigest()[:8], 16)
        return h / 0xFFFFFFFF < eval_fraction
    train = [r for r in records if not held_out(r)]
    held = [r for r in records if held_out(r)]
    if not train or (eval_fraction > 0 and not held):
        raise ValueError(f"eval_fraction={eval_fraction} leaves {len(train)} training and {len(held)} "
                         f"held-out images out of {len(records)}")
    return train, held


def load_image(path: str, size: int, bands: Sequence[int] = (), max_value: float = 0.0) -> np.ndarray:
    """(size, size, C) float32 in [-1, 1]. bands: 1-based indices (empty: all). max_value 0: 255 for
    8-bit files, else 5000 (reflectance x 10000 up to 0.5)."""
    try:
        with warnings.catch_warnings():  # PNG / JPEG carry no georeference: expected here
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    with src:
        idx = list(bands) or list(range(1, src.count + 1))
        bad = [b for b in idx if not 1 <= b <= src.count]
        if bad:
            raise ValueError(f"{path} has {src.count} band(s); band(s) {bad} requested")
        scale = size / min(src.height, src.width)
        h, w = max(size, round(src.height * scale)), max(size, round(src.width * scale))
        data = src.read(idx, out_shape=(len(idx), h, w), resampling=Resampling.bilinear).astype(np.float32)
        top = max_value or (255.0 if src.dtypes[0] == "uint8" else 5000.0)
    if not np.isfinite(data).all():
        raise ValueError(f"{path} contains NaN or infinite values")
    r0, c0 = (h - size) // 2, (w - size) // 2
    data = data[:, r0:r0 + size, c0:c0 + size]
    return (np.clip(data / top, 0.0, 1.0) * 2.0 - 1.0).transpose(1, 2, 0)


class CaptionSource(grain.MapDataset):
    """Element i: {'image' (size, size, C) float32 in [-1, 1], 'tokens' (max_len,) int32}.

    train: a random one of the image's captions and a random horizontal flip, both drawn from an rng
    seeded by (seed, i) (Grain indices run on across epochs, so each epoch draws afresh).
    eval: the first caption, no flip.
    """

    def __init__(self, records: Sequence[Record], tokenizer, *, size: int, max_len: int,
                 bands: Sequence[int] = (), max_value: float = 0.0, train: bool = True, seed: int = 0):
        super().__init__()
        self.records, self.tokenizer = list(records), tokenizer
        self.size, self.max_len, self.bands, self.max_value = size, max_len, tuple(bands), max_value
        self.train, self.seed = train, seed

    def __len__(self) -> int:
        return len(self.records)

    def __str__(self) -> str:
        return f"CaptionSource({len(self.records)} images, train={self.train})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rec = self.records[index % len(self.records)]
        image = load_image(rec.path, self.size, self.bands, self.max_value)
        caption = rec.captions[0]
        if self.train:
            rng = np.random.default_rng((self.seed, int(index)))
            caption = rec.captions[rng.integers(len(rec.captions))]
            if rng.random() < 0.5:
                image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "tokens": self.tokenizer.encode(caption, self.max_len)}
