"""HLS Burn Scars as a TFDS dataset, built and read without TensorFlow.

`HLSBurnScars` converts the manually downloaded dataset (`training/` and `validation/` folders of
`*_merged.tif` + `*.mask.tif`, see eojax.seg.data) into ArrayRecord files with PANGAEA's
splits (train / val = a fixed 90 / 10 split of training/, test = validation/): one record per scene
with the 6 bands at native size (zlib), the int16 mask and the scene name. `BurnScarsTFDSSource` turns
records into the whole-scene elements of `eojax.seg.data.WholeScenes` (pixels, valid, label).

    builder = HLSBurnScars(data_dir=...)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))
    source = BurnScarsTFDSSource(builder.as_data_source(split="test"))
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import rasterio
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from eojax.seg import data as segdata
from eojax.data.raster import RasterError


class HLSBurnScars(tfds.core.GeneratorBasedBuilder):
    """HLS Burn Scars (NASA / IBM): 512 x 512 HLS scenes with burn-scar masks."""

    name = "hls_burn_scars"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "6 bands at native size, int16 mask, PANGAEA splits."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    Download hls_burn_scars.tar.gz (https://huggingface.co/datasets/ibm-nasa-geospatial/hls_burn_scars)
    and extract it so that the manual directory holds training/ and validation/, each with
    <name>_merged.tif (bands B2, B3, B4, B8A, B11, B12) and <name>.mask.tif files.
    """

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))  # see fmow_tfds.py: avoids the importlib_resources backport

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="HLS Burn Scars: burn scar masks for Harmonized Landsat Sentinel-2 scenes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(len(segdata.BURNSCARS_BANDS), None, None),
                                              dtype=np.float32, encoding="zlib"),
                "mask": tfds.features.Tensor(shape=(None, None), dtype=np.int16, encoding="zlib"),
                "name": tfds.features.Text(),
            }),
            homepage="https://huggingface.co/datasets/ibm-nasa-geospatial/hls_burn_scars",
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        if not os.path.isdir(os.path.join(root, "training")):
            raise FileNotFoundError(f"no training/ folder in the manual directory {root}")
        return {split: self._generate_examples(pairs) for split, pairs in segdata.burnscars_splits(root).items()}

    def _generate_examples(self, pairs):
        for pair in pairs:
            with rasterio.open(pair.image) as src, rasterio.open(pair.mask) as m:
                if src.count != len(segdata.BURNSCARS_BANDS):
                    raise RasterError(f"{pair.image} has {src.count} bands; HLS burn scars have "
                                      f"{len(segdata.BURNSCARS_BANDS)} {segdata.BURNSCARS_BANDS}")
                if (m.height, m.width) != (src.height, src.width):
                    raise RasterError(f"mask {pair.mask} is {m.height}x{m.width} but {pair.image} is "
                                      f"{src.height}x{src.width}")
                image, mask = src.read().astype(np.float32), m.read(1).astype(np.int16)
            name = os.path.basename(pair.image)[: -len("_merged.tif")]
            yield name, {"image": image, "mask": mask, "name": name}


class BurnScarsTFDSSource:
    """Grain source over HLSBurnScars records -> {'pixels', 'valid', 'label'} whole scenes, with the
    same validity (9999 = missing) and labels (-1 and invalid pixels -> ignore_index) as PairSet."""

    def __init__(self, records, *, ignore_index: int = -1, nodata: float = segdata.BURNSCARS_NODATA):
        self._records, self.ignore_index, self.nodata = records, int(ignore_index), float(nodata)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict:
        r = self._records[int(i)]
        pixels = np.asarray(r["image"])
        valid = ~((pixels == self.nodata) | np.isnan(pixels)).any(axis=0)
        raw = np.asarray(r["mask"])
        label = np.where(valid & (raw >= 0) & (raw < 2), raw, self.ignore_index).astype(np.int32)
        return {"pixels": pixels, "valid": valid, "label": label}
