"""eojax data layer: GeoTIFF scenes read window by window (rasterio), rasters of several grids
stacked onto one (stack.py), window samplers, per-band statistics, Grain pipelines of host-local
numpy batches (optionally multi-scale, multiscale.py), fMoW-Sentinel (fmow.py; its TFDS builder in
fmow_tfds.py, imported on demand), and deterministic synthetic scenes.

Batches are dicts of numpy arrays: raw pixels (B, C, H, W) band-first in the scenes' dtype,
valid (B, H, W) bool, scene / row / col (B,) int32, weight (B,) float32 (0 marks padding); with
scales, pixels_<s>x / valid_<s>x too. `device.to_model_input` makes the model's channels-last input.
"""
from eojax.data.fmow import FMoWSentinelSource
from eojax.data.pipeline import (grid_window_dataset, make_image_input, make_iter_dataset,
                                 make_iterator, random_window_dataset)
from eojax.data.raster import RasterError, Scene, open_scenes
from eojax.data.stack import StackedScene
from eojax.data.stats import BandStats, compute_stats, load_or_compute_stats
from eojax.data.synthetic import SENSORS, default_dataset, write_scene, write_time_series
from eojax.data.windows import (GridWindowSampler, RandomWindowSampler, grid_offsets,
                                grid_windows)

__all__ = [
    "BandStats", "FMoWSentinelSource", "GridWindowSampler", "RandomWindowSampler", "RasterError",
    "SENSORS", "Scene", "StackedScene", "compute_stats", "default_dataset", "grid_offsets", "grid_windows",
    "grid_window_dataset", "load_or_compute_stats", "make_image_input", "make_iter_dataset",
    "make_iterator", "open_scenes", "random_window_dataset", "write_scene", "write_time_series",
]
