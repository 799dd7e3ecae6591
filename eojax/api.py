"""Trained runs from Python: `eojax.load(workdir)` gives back a run's model, its evaluation parameters,
its saved config and its DataSpec, and predicts on a raster with the family's own `eojax infer` /
`eojax export` plug-in.

    import eojax
    trained = eojax.load("/tmp/seg")                  # the latest checkpoint (its EMA when the run kept one)
    classes = trained.predict("scene.tif", as_xarray=True)   # a DataArray with x / y and the CRS

The config is `<workdir>/config.json` (written by the trainer as `to_json_best_effort`) read back over
the trainer's and optimizer's defaults, so its values keep their types (JSON lists become the tuples
the configs use; keys added to eojax since the run was trained get their defaults). The model is built
from `<workdir>/data_spec.json`, so neither the config files nor the training data are needed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any

import ml_collections
import numpy as np

from eojax import checkpoint as ckpt_lib
from eojax import errors, optim, tasks, train
from eojax.config_lib import trainer_defaults

CONFIG_FILE = "config.json"

# What `predict` runs per task, and the file of its output it returns: the plug-in kind and a function
# (plug-in result, options) -> the GeoTIFF to read back.
_RASTER_PLUGINS = {
    "seg": ("infer", lambda summary, probabilities: summary["outputs"]["probabilities" if probabilities
                                                                       else "classes"]),
    "mae": ("export", lambda paths, probabilities: paths[0]),
    "satmae": ("export", lambda paths, probabilities: paths[0]),  # SatMAE++ and GRID-MAE
}


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with: its config.json over the trainer's and the
    optimizer's defaults, JSON lists turned back into tuples, locked like the command line's config
    (a misspelt key is an error, values can still be changed)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise errors.WorkdirError(f"{workdir}: no {CONFIG_FILE}, so not an eojax run folder (`eojax train` "
                                  "writes it when training starts)")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise errors.WorkdirError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(saved, dict) or not saved.get("task"):
        raise errors.WorkdirError(f"{path} names no task: not a config written by `eojax train`")
    config = trainer_defaults()
    config.optim = optim.default_config()
    try:
        config.update(_tuples(saved))
    except (TypeError, ValueError) as e:
        raise errors.ConfigError(f"{path}: {e}") from e
    config.lock()
    return config


def _tuples(value):
    """JSON -> config values: lists become tuples (to_json_best_effort writes tuples as lists)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _checkpoint(workdir: str, best: bool, step: int | None) -> str:
    """The step folder to read, checked before any model is built."""
    if best and step is not None:
        raise errors.ConfigError("eojax.load: give best=True or step=N, not both")
    if step is not None:
        folder = os.path.join(workdir, "checkpoints", str(int(step)))
        if not os.path.isdir(folder):
            steps = sorted(int(n) for n in os.listdir(os.path.dirname(folder)) if n.isdigit()) \
                if os.path.isdir(os.path.dirname(folder)) else []
            raise errors.CheckpointError(f"{workdir} has no checkpoint of step {step} (its steps: "
                                         f"{', '.join(map(str, steps)) or 'none'})")
    try:
        return ckpt_lib.step_folder(folder if step is not None else workdir, best)
    except FileNotFoundError as e:
        kept = "no best parameters (config.best_metric was not set, or no eval ran)" if best else "no checkpoint"
        raise errors.CheckpointError(f"{workdir} has {kept}") from e


@dataclasses.dataclass
class Trained:
    """A trained run: `config` (read back from the workdir), `spec` (its DataSpec), `run` (the trainer's
    set-up run: mesh, task, jitted steps), `params` and `model_state` (the checkpoint's evaluation
    variables: their EMAs when the run kept them, a LoRA run's adapters merged) and `checkpoint` (the
    step folder they were read from)."""
    workdir: str
    config: ml_collections.ConfigDict
    run: train.Run
    params: Any
    model_state: Any
    checkpoint: str

    @property
    def spec(self) -> tasks.DataSpec:
        return self.run.task.spec

    @property
    def task(self) -> tasks.Task:
        return self.run.task

    @property
    def model(self):
        return self.run.task.model

    @property
    def variables(self) -> tuple:
        """(params, model_state), as the families' plug-ins take them."""
        return self.params, self.model_state

    @property
    def step(self) -> int:
        return int(os.path.basename(self.checkpoint))

    def __repr__(self) -> str:
        return f"Trained(task={self.task.name!r}, workdir={self.workdir!r}, checkpoint={self.checkpoint!r})"

    def predict(self, raster, *, as_xarray: bool = False, probabilities: bool = False, output: str | None = None,
                transform=None, crs=None, nodata=None):
        """The family's prediction on one raster, through its own `eojax infer` / `eojax export` plug-in.

        `raster`: a GeoTIFF path, or a band-first (C, H, W) array (written to a temporary GeoTIFF with
        the model's band names, `transform`, `crs` and `nodata`; default: pixel coordinates, no CRS, no
        nodata value).
        Returns seg: the class map (H, W) uint8 (255 = no data), or with `probabilities` the (K, H, W)
        float32 class probabilities (NaN = no data); mae / satmae / gridmae: the (D, rows, cols)
        float32 embeddings of the export grid (NaN = no data); geo: the summary and per-window
        predictions of its infer plug-in (a dict). With `as_xarray` a raster result is an
        xarray.DataArray with x / y coordinates from the output's transform and its CRS (rioxarray).
        `output`: a folder to keep the plug-in's files in (default: a temporary one, removed)."""
        name = self.task.name
        if name == "geo":
            if as_xarray or probabilities:
                raise errors.ConfigError("geo predicts one location per raster and per window, not a raster: "
                                         "as_xarray and probabilities do not apply")
        elif name not in _RASTER_PLUGINS:
            raise tasks.NotApplicableError(f"task {name!r} does not predict on rasters (eojax.load(...).predict "
                                           f"serves {', '.join(sorted(_RASTER_PLUGINS))} and geo)")
        if probabilities and name != "seg":
            raise errors.ConfigError(f"probabilities=True is for seg runs; this run trains {name!r}")
        if as_xarray:
            _import_rioxarray()  # before any work
        with tempfile.TemporaryDirectory(prefix="eojax_predict_") as scratch:
            path = raster if isinstance(raster, (str, os.PathLike)) else \
                self._write_array(np.asarray(raster), os.path.join(scratch, "input.tif"), transform, crs, nodata)
            out_dir = os.path.abspath(output) if output else os.path.join(scratch, "out")
            options = {"input": os.fspath(path), "output": out_dir, "probabilities": probabilities, "seed": 0}
            kind = "infer" if name == "geo" else _RASTER_PLUGINS[name][0]
            plug_in = tasks.require_plugin(self.task, kind, f"eojax {kind}")
            with self.run.scope():
                result = plug_in(self.run, self.variables, self.workdir, options)
            if name == "geo":
                with open(os.path.join(out_dir, "geo_infer.json")) as f:
                    return json.load(f)
            return _read(_RASTER_PLUGINS[name][1](result, probabilities), as_xarray, squeeze=not probabilities
                         and name == "seg")

    def _write_array(self, pixels: np.ndarray, path: str, transform, crs, nodata) -> str:
        import rasterio
        from affine import Affine

        if pixels.ndim == 2:
            pixels = pixels[None]
        names = list(self.task.band_names) if hasattr(self.task, "band_names") else []
        if pixels.ndim != 3 or (names and pixels.shape[0] != len(names)):
            raise errors.DataError(f"predict: an array must be band-first (C, H, W) with the model's "
                                   f"{len(names)} bands {names}, got shape {pixels.shape}")
        profile = dict(driver="GTiff", count=pixels.shape[0], height=pixels.shape[1], width=pixels.shape[2],
                       dtype=pixels.dtype, transform=transform or Affine.identity(), crs=crs, nodata=nodata)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(pixels)
            for i, n in enumerate(names):
                dst.set_band_description(i + 1, str(n))
        return path


def _import_rioxarray():
    try:
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray  # noqa: F401
    except ImportError as e:
        raise ImportError("as_xarray=True needs xarray and rioxarray: pip install 'eojax[xarray]'") from e
    return rioxarray


def _read(path: str, as_xarray: bool, squeeze: bool):
    """A plug-in's GeoTIFF, whole, in memory: numpy (bands first), or an xarray.DataArray (band, y, x)
    with its coordinates and CRS; `squeeze` drops the band axis of a one-band result."""
    if as_xarray:
        rioxarray = _import_rioxarray()
        with rioxarray.open_rasterio(path, cache=False) as da:
            da = da.load()
        return da.squeeze("band", drop=True) if squeeze else da
    import rasterio

    with rasterio.open(path) as src:
        array = src.read()
    return array[0] if squeeze else array


def load(workdir: str, *, best: bool = False, step: int | None = None) -> Trained:
    """A trained run of `workdir` ready to use from Python: its latest intact checkpoint, or its kept
    best parameters (`best`, config.best_metric), or checkpoint step `step`. The config is the run's
    own (config.json), the model is built from its saved DataSpec: neither configs/ nor the training
    data are read. A folder that is not a run, or has no such checkpoint, is refused in one line
    before any model is built."""
    workdir = os.path.abspath(os.fspath(workdir))
    if not os.path.isdir(workdir):
        raise errors.WorkdirError(f"{workdir} is not a directory")
    config = read_config(workdir)
    checkpoint = _checkpoint(workdir, best, step)
    run, (params, model_state) = train.load_for_inference(config, workdir, checkpoint=checkpoint)
    return Trained(workdir, config, run, params, model_state, checkpoint)
