"""fMoW-Sentinel as a TFDS dataset, built and read without TensorFlow.

`FMoWSentinel` converts the manually downloaded tree (see `eojax.data.fmow` for the layout) into
ArrayRecord files: one record per image with all 13 bands at native size (zlib-compressed), its
label and metadata. TFDS writes and reads ArrayRecord with numpy alone (`file_format='array_record'`,
the default here; TFRecord would need TensorFlow), and `as_data_source` gives random access for Grain.
`FMoWSentinelTFDSSource` turns those records into the same elements as `FMoWSentinelSource`.

    builder = FMoWSentinel(data_dir=...)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    source = FMoWSentinelTFDSSource(builder.as_data_source(split="train"), size=96)
"""
from __future__ import annotations

import inspect
import os
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from eojax.data import fmow
from eojax.data.raster import RasterError


class FMoWSentinelConfig(tfds.core.BuilderConfig):
    """`dtype`: how pixels are stored; files whose dtype does not cast safely to it are refused."""

    def __init__(self, *, dtype: str = "uint16", **kwargs):
        super().__init__(**kwargs)
        self.dtype = dtype


class FMoWSentinel(tfds.core.GeneratorBasedBuilder):
    """fMoW-Sentinel: 13-band Sentinel-2 images of 62 fMoW categories (train / val / test)."""

    name = "fmow_sentinel"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "All 13 bands at native size, label, CSV metadata."}
    BUILDER_CONFIGS = [
        FMoWSentinelConfig(name="uint16", dtype="uint16", description="Sentinel-2 L1C digital numbers"),
        FMoWSentinelConfig(name="float32", dtype="float32", description="for float-valued files"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download fMoW-Sentinel (https://purl.stanford.edu/vg497cb6002) and extract it so that the manual
    directory holds train.csv / val.csv / test.csv and the image folders train/, val/ and test/ (or
    test_gt/), each laid out as <category>/<category>_<location_id>/<category>_<location_id>_<image_id>.tif.
    """

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup, for a builder inside a package, touches the `importlib_resources`
        # backport (not installed here); this file is where that lookup ends up anyway.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        dtype = np.dtype(self.builder_config.dtype)
        return tfds.core.DatasetInfo(
            builder=self,
            description="fMoW-Sentinel (SatMAE): Sentinel-2 time series of fMoW locations.",
            features=tfds.features.FeaturesDict({
                # Band-first like the files; sizes vary from image to image.
                "image": tfds.features.Tensor(shape=(len(fmow.FMOW_BANDS), None, None), dtype=dtype,
                                              encoding="zlib"),
                "nodata": np.float32,  # the file's nodata value, NaN if none
                "label": tfds.features.ClassLabel(names=fmow.FMOW_CATEGORIES),
                "location_id": np.int64,
                "image_id": np.int64,
                "timestamp": tfds.features.Text(),
                "polygon": tfds.features.Text(),
                "row": np.int64,  # the CSV row
            }),
            homepage="https://sustainlab-group.github.io/SatMAE/",
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        splits = {s: self._generate_examples(root, s) for s in ("train", "val", "test")
                  if os.path.isfile(fmow.split_csv(root, s))}
        if not splits:
            raise FileNotFoundError(f"no train.csv / val.csv / test.csv in the manual directory {root}")
        return splits

    def _generate_examples(self, root: str, split: str):
        _, rows = fmow.read_rows(root, split, fmow.FMOW_CATEGORIES)
        folder = fmow.split_folder(root, split)
        dtype = np.dtype(self.builder_config.dtype)
        for i, (cat, loc, img, ts, poly) in enumerate(rows):
            path = fmow.image_path(root, folder, cat, loc, img)
            image, nodata = fmow.read_image(path)
            if not np.can_cast(image.dtype, dtype, "safe"):
                raise RasterError(f"{path} is {image.dtype}, which the {dtype} config cannot hold "
                                  f"exactly; use the 'float32' config")
            yield f"{split}-{i}", {
                "image": image.astype(dtype, copy=False),
                "nodata": np.float32(np.nan if nodata is None else nodata),
                "label": cat, "location_id": loc, "image_id": img, "timestamp": ts, "polygon": poly,
                "row": i}


class FMoWSentinelTFDSSource:
    """Grain source over TFDS fMoW-Sentinel records: the elements of `FMoWSentinelSource`.

    `records`: `FMoWSentinel(...).as_data_source(split=...)` (or `tfds.data_sources(...)[split]`).
    Record order is TFDS's (shuffled when written); `index` is still the CSV row.
    """

    def __init__(self, records, *, size: int = 96, bands: Sequence[str] | None = None,
                 drop: Sequence[str] = fmow.DEFAULT_DROP, nodata: float | None = None,
                 crop: float = 1.0):
        self._records, self.size, self.nodata, self.crop = records, int(size), nodata, float(crop)
        self.band_names = list(fmow.select_bands(bands, drop))
        self._band_index = [fmow.FMOW_BANDS.index(b) for b in self.band_names]
        self.categories = fmow.FMOW_CATEGORIES

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict:
        r = self._records[int(i)]
        file_nodata = None if np.isnan(r["nodata"]) else float(r["nodata"])
        pixels, valid = fmow.make_element(np.asarray(r["image"]),
                                          file_nodata if self.nodata is None else self.nodata,
                                          self._band_index, self.size, self.crop)
        ts = r["timestamp"]
        ts = ts.decode() if isinstance(ts, bytes) else str(ts)
        return {"pixels": pixels, "valid": valid, "label": np.int32(r["label"]),
                "location_id": np.int64(r["location_id"]), "image_id": np.int64(r["image_id"]),
                "timestamp": np.int64(fmow.unix_seconds(ts)), "index": np.int64(r["row"])}
