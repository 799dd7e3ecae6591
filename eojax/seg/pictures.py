"""The seg family's pictures plug-in: image | truth | prediction | overlay, one row per scene; and
the class colours and the overlay that `eojax infer` (eojax/seg/infer.py) uses too."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from eojax import viz

# Class colours of the overlays (class 0 transparent-ish grey, then red, yellow, cyan, ...).
PALETTE = np.array([[80, 80, 80], [230, 40, 40], [250, 210, 30], [30, 200, 220], [150, 60, 220],
                    [40, 200, 80], [240, 130, 30], [30, 90, 240]], np.uint8)


def overlay(rgb: np.ndarray, classes: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Class colours blended over an RGB picture; class 0 (background) left as it is."""
    colour = PALETTE[classes % len(PALETTE)].astype(np.float32)
    out = np.where((classes > 0)[..., None], (1 - alpha) * rgb + alpha * colour, rgb)
    return out.round().astype(np.uint8)


def rgb(task, pixels, valid) -> np.ndarray:
    """Raw band-first pixels (C, H, W) -> an RGB picture (bands picked by the task's band names)."""
    image = np.moveaxis(np.asarray(pixels, np.float32), 0, -1)
    return viz.to_rgb8(image, task.band_names, valid)


def write_pictures(run, variables, batch, workdir, step) -> list[str]:
    """seg_prediction_step<N>.png: image | truth | prediction | overlay, one row per scene of the
    first (up to) 4 of `batch` (probe 0 in a sweep)."""
    task, (params, state) = run.task, variables
    if not task.config.model.pictures:
        return []
    n = min(4, batch["pixels"].shape[0])
    pred = jax.jit(lambda p, s, b: jnp.argmax(task.predict_scenes(p, s, task.images(b)), -1))(params, state, batch)
    fetched = multihost_utils.process_allgather({"pred": pred, **batch}, tiled=True)
    if jax.process_index() != 0:
        return []
    f = {k: np.asarray(v) for k, v in fetched.items()}
    preds = f["pred"][0] if task.k else f["pred"]
    rows = []
    for i in range(n):
        if f["weight"][i] <= 0:
            continue
        picture = rgb(task, f["pixels"][i], f["valid"][i])
        label = f["label"][i]
        truth = np.where((label == task.config.model.ignore_index)[..., None], 0,
                         PALETTE[np.clip(label, 0, len(PALETTE) - 1)])
        rows.append([picture, truth.astype(np.uint8), PALETTE[preds[i] % len(PALETTE)], overlay(picture, preds[i])])
    path = os.path.join(workdir, f"seg_prediction_step{step}.png")
    return [viz.save_grid_png(path, rows)] if rows else []
