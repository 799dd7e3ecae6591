"""Per-window embeddings of a whole raster, written as a georeferenced Cloud Optimized GeoTIFF.

The encoder runs over a regular grid of windows (offsets 0, stride, 2*stride, ... while the window
fits). Output pixel (i, j) is the window at (i*stride, j*stride); it is georeferenced as the
stride x stride cell centred on that window, so with stride == window (the default) the output tiles
the input exactly and each embedding sits over the ground it describes. A stride larger than the
window leaves the ground between windows unembedded: it is refused unless asked for (allow_gaps).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import jax
import numpy as np
from affine import Affine
from rasterio.windows import Window

from eojax import errors, parallel, train
from eojax.data.cog import write_cog
from eojax.data.raster import RasterError, open_scenes


def feature_grid(height: int, width: int, window: int, stride: int) -> tuple[list[int], list[int]]:
    """Regular window offsets (rows, cols); raises if not even one window fits."""
    if height < window or width < window:
        raise RasterError(f"raster {height}x{width} is smaller than the {window}-pixel window")
    rows = list(range(0, height - window + 1, stride))
    cols = list(range(0, width - window + 1, stride))
    return rows, cols


def check_stride(window: int, stride: int, allow_gaps: bool = False,
                 names: tuple[str, str, str] = ("window", "stride", "allow_gaps")) -> None:
    """Raises ConfigError for a stride that is not positive, or larger than the window without
    `allow_gaps`; `names` are the keys the message names."""
    window_key, stride_key, gaps_key = names
    if stride <= 0:
        raise errors.ConfigError(f"{stride_key}={stride} must be a positive number of pixels")
    if stride > window and not allow_gaps:
        raise errors.ConfigError(
            f"{stride_key}={stride} is larger than {window_key}={window}: the {stride - window} px between "
            f"windows would get no embedding; use a stride <= {window} or {gaps_key}=True to skip them on purpose")


def export_stride(config) -> int:
    """config.export.stride (0 = the window), checked against config.input.window; a config without
    `export` (a run from before it existed) exports with the window as stride."""
    window = int(config.input.window)
    export = config.get("export") or {}
    stride = int(export.get("stride", 0)) or window
    check_stride(window, stride, bool(export.get("allow_gaps", False)),
                 ("config.input.window", "config.export.stride", "config.export.allow_gaps"))
    return stride


def feature_transform(transform: Affine, window: int, stride: int) -> Affine:
    """Input transform -> output transform: one output pixel per stride, centred on its window."""
    shift = (window - stride) / 2.0
    return transform @ Affine.translation(shift, shift) @ Affine.scale(stride)


def export_features(scene, embed: Callable[[np.ndarray, np.ndarray], np.ndarray], out_path: str, *,
                    window: int, stride: int, batch_size: int = 32,
                    min_valid_fraction: float = 0.0, allow_gaps: bool = False) -> str:
    """Runs `embed(pixels (B, C, w, w), valid (B, w, w)) -> (B, D)` over `scene` (a Scene or
    StackedScene) and writes a float32 COG with D bands ('emb0', ...; NaN = no data), the scene's CRS
    and the feature transform. Windows whose valid fraction is below `min_valid_fraction` (or zero)
    are NaN. Batches are padded to `batch_size` so `embed` compiles once.
    """
    check_stride(window, stride, allow_gaps)
    rows, cols = feature_grid(scene.height, scene.width, window, stride)
    positions = [(r, c) for r in rows for c in cols]
    out, dim = None, None
    for start in range(0, len(positions), batch_size):
        chunk = positions[start:start + batch_size]
        pixels = np.zeros((batch_size, scene.num_channels, window, window), np.dtype(scene.dtype))
        valid = np.zeros((batch_size, window, window), bool)
        for k, (r, c) in enumerate(chunk):
            _, valid[k] = scene.read_pixels(Window(c, r, window, window), out=pixels[k])
        emb = np.asarray(embed(pixels, valid), np.float32)[:len(chunk)]
        if out is None:
            dim = emb.shape[-1]
            out = np.full((dim, len(rows), len(cols)), np.nan, np.float32)
        fractions = valid[:len(chunk)].mean(axis=(1, 2))
        for k, (r, c) in enumerate(chunk):
            if fractions[k] > 0 and fractions[k] >= min_valid_fraction:
                out[:, r // stride, c // stride] = emb[k]
    write_cog(out_path, out, crs=scene.crs, transform=feature_transform(scene.transform, window, stride),
              nodata=float("nan"), descriptions=tuple(f"emb{i}" for i in range(dim)),
              tags=dict(window=window, stride=stride, source=scene.path))
    logging.info("wrote %dx%d embeddings of width %d to %s", len(rows), len(cols), dim, out_path)
    return out_path


def _stem(scene) -> str:
    """Output name: the file's stem; a '{band}' template without the placeholder; a stack's stems
    joined by '+'."""
    stems = [os.path.splitext(os.path.basename(f))[0] for f in scene.files]
    if "{band}" in scene.path:
        return os.path.splitext(os.path.basename(scene.path))[0].replace("{band}", "").strip("_-")
    return "+".join(stems)


def export_run(run, variables, workdir: str, options: dict) -> list[str]:
    """The `eojax export` plug-in: the run's encoder (its EMA when the run kept one, as eval and infer
    use) over every scene of `config.input`, or over the raster `--input` names (opened with
    config.input's bands and nodata); one feature GeoTIFF per scene in options['output']."""
    if jax.process_count() > 1:
        raise RuntimeError("eojax export runs as a single process (it reads whole rasters itself)")
    config = run.config
    if options.get("input"):
        scenes = open_scenes(options["input"], bands=tuple(config.input.get("bands", ()) or ()),
                             nodata=config.input.get("nodata"))
        want = len(run.task.band_names)
        if scenes[0].num_channels != want:
            raise RasterError(f"{options['input']}: {scenes[0].num_channels} bands; the model takes {want} "
                              f"({run.task.band_names})")
    else:
        scenes = run.input.info["scenes"]
    embed_step = jax.jit(run.task.embed)

    def embed(pixels, valid):
        batch = parallel.make_global_batch({"pixels": pixels, "valid": valid}, run.mesh, run.rules)
        return jax.device_get(embed_step(*variables, batch))

    out_dir = options.get("output") or os.path.join(workdir, "features")
    window, stride = config.input.window, export_stride(config)
    return [export_features(scene, embed, os.path.join(out_dir, f"{_stem(scene)}_features.tif"), window=window,
                            stride=stride, batch_size=config.batch_size, allow_gaps=True)  # checked above
            for scene in scenes]


def export_run_features(config, workdir: str, out_dir: str | None = None, raster: str = "") -> list[str]:
    """`eojax export` from Python: the latest checkpoint of `workdir` over config.input's scenes (or
    `raster`), feature GeoTIFFs in `out_dir` (default <workdir>/features)."""
    run, variables = train.load_for_inference(config, workdir)
    with run.scope():
        return export_run(run, variables, workdir, {"input": raster, "output": out_dir})
