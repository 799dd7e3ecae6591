"""The MAE family's pictures plug-in: original / masked / reconstructed tiles, and for a multi-scale
SatMAE++ model the targets and predictions at 2x and 4x."""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from eojax import viz


def picture_arrays(task, params, batch, n: int) -> dict:
    """The n most-valid tiles of `batch` through the model, fetched to host numpy (every process
    takes part in the gather)."""
    rng = jax.random.key(task.config.seed + 1)
    out = jax.jit(lambda p, b: task._forward(p, b, rng, False)[2])(params, batch)
    arrays = {k: v for k, v in out.items() if k.startswith(("image", "up"))}
    arrays.update({k: v for k, v in batch.items() if k.startswith("valid")})
    arrays.update(mask=out["mask"], recon=task.reconstruction(out))
    fetched = multihost_utils.process_allgather(arrays, tiled=True)
    # The tiles with the most valid data: nodata corners make poor pictures.
    pick = np.argsort(-np.asarray(fetched["valid"]).mean(axis=(1, 2)), kind="stable")[:n]
    return {k: np.asarray(v)[pick] for k, v in fetched.items()}


def write_pictures(run, variables, batch, workdir, step) -> list[str]:
    """<task>_reconstruction_step<N>.png (RGB from the band names when it can), and
    <task>_multiscale_step<N>.png for a multi-scale model."""
    task, (params, _) = run.task, variables
    f = picture_arrays(task, params, batch, min(4, batch["valid"].shape[0]))
    if jax.process_index() != 0:
        return []
    paths = [_reconstruction(task, f, os.path.join(workdir, f"{task.name}_reconstruction_step{step}.png"))]
    if getattr(task.model, "multiscale", False):
        paths.append(_multiscale(task, f, os.path.join(workdir, f"{task.name}_multiscale_step{step}.png")))
    return paths


def _reconstruction(task, f, path) -> str:
    p, image, valid = task.model.patch_size, f["image"], f["valid"]
    h, w, _ = image.shape[1:]
    recon = f["recon"]
    if task.config.model.norm_pix_loss:
        recon = _denormalize_patches(recon, image, valid, p)
    # Masked pixels: a pixel is masked if its patch is masked in every band group.
    mask = f["mask"].reshape(len(image), -1, (h // p) * (w // p)).min(axis=1)
    mask_px = np.repeat(np.repeat(mask.reshape(-1, h // p, w // p), p, 1), p, 2) > 0.5
    viz.save_reconstruction_png(path, image, valid, mask_px, recon, task.band_names)
    return path


def _multiscale(task, f, path) -> str:
    names, size = task.band_names, f["image_4x"].shape[1]
    rows = []
    for i in range(len(f["image"])):
        row = []
        for key, up in (("", None), ("_2x", "up2"), ("_4x", "up4")):
            target, valid = f["image" + key][i], f["valid" + key][i]
            row.append(viz.resize_nearest(viz.to_rgb8(target, names, valid), size))
            if up:
                row.append(viz.resize_nearest(viz.to_rgb8(f[up][i], names, valid, ref=target), size))
        rows.append(row)
    return viz.save_grid_png(path, rows, scale=max(1, 256 // size))


def _denormalize_patches(recon, image, valid, p):
    """With norm_pix_loss the model predicts standardised patches: give them each patch's own
    mean and std (over valid pixels) so the picture is comparable to the input."""
    b, h, w, c = image.shape
    out = recon.copy()
    for i in range(0, h, p):
        for j in range(0, w, p):
            tile, v = image[:, i:i + p, j:j + p], valid[:, i:i + p, j:j + p, None]
            cnt = np.maximum(v.sum(axis=(1, 2, 3)) * c, 1)
            mean = (tile * v).sum(axis=(1, 2, 3)) / cnt
            var = (((tile - mean[:, None, None, None]) * v) ** 2).sum(axis=(1, 2, 3)) / np.maximum(cnt - 1, 1)
            out[:, i:i + p, j:j + p] = recon[:, i:i + p, j:j + p] * np.sqrt(var + 1e-6)[:, None, None, None] \
                + mean[:, None, None, None]
    return out
