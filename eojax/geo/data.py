"""Labelled window input for the geographic task: rasters with per-scene band selections, windows
sampled as the image families sample them (eojax.data.pipeline), labels made per batch on the fly.

Scenes may differ in sensor, dtype and band count; each source names the bands to use so every scene
gives the same number of channels (a single-band scene may repeat its band). Pixels reach the model
as float32 and are standardised per window and band on the device (`standardize`), because the
scenes' value ranges (uint8 stretches, uint16 DNs, float reflectances, elevations) share no scale.

Scenes may be held out of training (`input.eval_scenes` / `input.eval_fraction`, `held_out_scenes`):
training, the baseline and the vMF centres see only the others; the eval split reads the held-out
scenes' grid windows first, then the training scenes', each window flagged `held_out`.
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eojax.data import pipeline, remote
from eojax.data.raster import Scene
from eojax.data.windows import RandomWindowSampler
from eojax.geo import encoding, synthetic
from eojax.geo.climate import CLASS_GROUP
from eojax.geo.labels import WindowLabeler

def resolve(path: str, root: str) -> str:
    return path if os.path.isabs(path) or remote.is_remote(path) or not root else os.path.join(root, path)


def sources(input_cfg) -> list[dict]:
    """`input.sources` as dicts; empty: eojax's built-in synthetic scenes (eojax.geo.synthetic)."""
    return [dict(s) for s in input_cfg.sources] or [dict(s) for s in synthetic.default_sources()]


def open_sources(input_cfg) -> tuple[list[Scene], dict[str, str]]:
    """`input.sources` (dicts path, bands, nodata, date) -> (scenes, {scene path: date override})."""
    root = input_cfg.get("data_root", "") or ""
    scenes, dates = [], {}
    for i, src in enumerate(sources(input_cfg)):
        unknown = set(src) - {"path", "bands", "nodata", "date"}
        if unknown or "path" not in src:
            raise ValueError(f"input.sources[{i}] = {src}: needs 'path' and may have only bands, nodata, "
                             f"date (unknown: {sorted(unknown)})")
        scene = Scene(resolve(src["path"], root), bands=tuple(src.get("bands", ())), nodata=src.get("nodata"))
        scene.check()
        scenes.append(scene)
        if src.get("date"):
            dates[scene.path] = src["date"]
    channels = {s.num_channels for s in scenes}
    if len(channels) > 1:
        raise ValueError("input.sources give different channel counts "
                         f"{[(s.path, s.num_channels) for s in scenes]}; select the same number of bands "
                         "from each (a band index may repeat)")
    return scenes, dates


def _source_index(sources: list[dict], name) -> int:
    """A held-out scene named by its 0-based index in input.sources (negative counts from the end),
    its path as written there, or its file name."""
    n = len(sources)
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if not -n <= name < n:
            raise ValueError(f"input.eval_scenes: index {name} is not one of the {n} sources (0..{n - 1})")
        return int(name) % n
    paths = [str(s.get("path", "")) for s in sources]
    matches = [i for i, p in enumerate(paths) if name in (p, os.path.basename(p))]
    if len(matches) != 1:
        raise ValueError(f"input.eval_scenes: {name!r} names {len(matches)} of the sources; give an index or "
                         f"one of {paths}")
    return matches[0]


def held_out_scenes(input_cfg) -> list[int]:
    """Indices of the sources held out of training: `input.eval_scenes` (indices, paths or file names)
    or `input.eval_fraction` (int(fraction * scenes), at least 1, picked by a fixed shuffle that does
    not depend on config.seed, as the reference's fixed-seed split of its files); neither: none."""
    names = tuple(input_cfg.get("eval_scenes", ()) or ())
    fraction = float(input_cfg.get("eval_fraction", 0.0) or 0.0)
    if names and fraction:
        raise ValueError("set input.eval_scenes or input.eval_fraction, not both")
    if not 0 <= fraction < 1:
        raise ValueError(f"input.eval_fraction must be in [0, 1), got {fraction}")
    if fraction:
        n = len(sources(input_cfg))
        order = np.random.default_rng(12345).permutation(n)
        return sorted(order[:max(1, int(n * fraction))].tolist())
    return sorted({_source_index(sources(input_cfg), name) for name in names})


class AddLabels:
    """Batch map: adds the window labels and the held-out flag, casts pixels to float32. The batch's
    scene numbers index `scene_ids` (the dataset's scenes as indices into the labeler's). Picklable
    (Grain workers)."""

    def __init__(self, labeler: WindowLabeler, size: int, scene_ids=None, held_out=()):
        self.labeler, self.size = labeler, int(size)
        self.scene_ids = None if scene_ids is None else np.asarray(scene_ids, np.int64)
        self.held_out = np.asarray(held_out, np.int64)

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        ids = batch["scene"] if self.scene_ids is None else self.scene_ids[batch["scene"]]
        out["pixels"] = batch["pixels"].astype(np.float32, copy=False)
        out.update(self.labeler.label(ids, batch["row"], batch["col"], self.size))
        out["held_out"] = np.isin(ids, self.held_out)
        return out


def labelled_batches(scenes, labeler, input_cfg, *, split, batch_size, process_index, process_count,
                     seed, scene_ids=None, held_out=()):
    """Train: endless random windows (a checkpointable iterator); eval: every grid window once.
    `scene_ids`: the scenes (indices into `scenes` and the labeler's) to draw from, default all;
    `held_out`: the indices whose windows are flagged held_out."""
    size = int(input_cfg.window)
    scene_ids = list(range(len(scenes))) if scene_ids is None else list(scene_ids)
    chosen = [scenes[i] for i in scene_ids]
    labels = AddLabels(labeler, size, scene_ids, held_out)
    if split == "train":
        ds = pipeline.random_window_dataset(chosen, size=size, num_windows=int(input_cfg.num_windows),
                                            seed=seed, min_valid_fraction=float(input_cfg.min_valid_fraction))
        it = pipeline.make_iter_dataset(ds, batch_size=batch_size, process_index=process_index,
                                        process_count=process_count, shuffle=True, seed=seed,
                                        num_epochs=None, drop_remainder=True)
        return iter(it.map(labels))
    ds = pipeline.grid_window_dataset(chosen, size=size, stride=int(input_cfg.eval_stride) or size,
                                      min_valid_fraction=float(input_cfg.min_valid_fraction))
    it = pipeline.make_iter_dataset(ds, batch_size=batch_size, process_index=process_index,
                                    process_count=process_count, shuffle=False, num_epochs=1,
                                    drop_remainder=False)
    return it.map(labels)


def label_sample(scenes, labeler, size: int, n: int, seed: int, min_valid: float, scene_ids=None) -> dict:
    """Labels of n windows drawn as training draws them (no pixels read): for the training-mean
    baseline and for vMF centres from training locations. `scene_ids`: the training scenes (indices
    into `scenes`), default all."""
    scene_ids = np.arange(len(scenes)) if scene_ids is None else np.asarray(scene_ids)
    sampler = RandomWindowSampler([scenes[i] for i in scene_ids], size, min_valid)
    rng = np.random.default_rng((seed, 7))
    picks = [sampler.sample(rng) for _ in range(n)]
    ids = scene_ids[np.array([i for i, _ in picks], np.int64)]
    rows = np.array([w.row_off for _, w in picks])
    cols = np.array([w.col_off for _, w in picks])
    return labeler.label(ids, rows, cols, size)


def training_mean(labels: dict, sea_threshold: float) -> dict:
    """The baseline that always predicts the training mean: the mean location on the sphere (of land
    windows), the mean climate distribution, the circular mean date (of dated land windows)."""
    land = labels["climate"][:, 0] < sea_threshold
    xyz = encoding.latlon_to_xyz(labels["latlon"][land, 0].astype(np.float64),
                                 labels["latlon"][land, 1].astype(np.float64))
    lat, lon = encoding.xyz_to_latlon(xyz.mean(axis=0)) if land.any() else (0.0, 0.0)
    climate = labels["climate"].mean(axis=0)
    dated = land & (labels["doy"] > 0)
    # Circular mean: decoding the mean encoding is the direction of the mean (sin, cos).
    doy = float(encoding.decode_doy(encoding.encode_doy(labels["doy"][dated].astype(np.float64)).mean(axis=0))) \
        if dated.any() else 1.0
    coarse = np.bincount(CLASS_GROUP, weights=climate, minlength=6)
    return {"latlon": np.array([lat, lon], np.float32), "climate_class": int(np.argmax(climate)),
            "coarse_group": int(np.argmax(coarse)), "doy": doy, "climate": climate.astype(np.float32)}


def standardize(pixels, valid, eps: float = 1e-6):
    """(B, C, H, W) float32 + valid (B, H, W) -> (B, H, W, C): each window's bands to zero mean and
    unit variance over its valid pixels; invalid pixels 0 (inside the jitted step)."""
    v = valid[:, None].astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v, axis=(2, 3), keepdims=True), 1.0)
    x = jnp.where(valid[:, None], pixels, 0.0)
    mean = jnp.sum(x, axis=(2, 3), keepdims=True) / n
    var = jnp.sum(((x - mean) * v) ** 2, axis=(2, 3), keepdims=True) / n
    x = (x - mean) * jax.lax.rsqrt(var + eps) * v
    return jnp.moveaxis(x, 1, -1)


def fingerprint(paths: Sequence[str]) -> dict:
    """sha256 of the files' names, sizes and modification times (cheap; changes when data changes)."""
    h = hashlib.sha256()
    files = []
    for p in sorted(set(paths)):
        if remote.is_remote(p):  # known by its URL: its size and time would cost a request
            h.update(f"{p}\n".encode())
        else:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}|{st.st_size}|{int(st.st_mtime)}\n".encode())
        files.append(p)
    return {"sha256": h.hexdigest(), "files": len(files)}

