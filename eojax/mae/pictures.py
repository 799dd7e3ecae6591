"""The MAE family's pictures plug-in: original / masked / reconstructed tiles, and for a multi-scale
SatMAE++ model the targets and predictions at 2x and 4x."""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from eojax import viz

RECONSTRUCTION_COLUMNS = ("original", "encoder input (masked grey)", "reconstruction",
                          "reconstruction + visible")


@functools.lru_cache(maxsize=2)
def _forward(task):
    """One compiled forward per task: pictures are made at every eval and at the end."""
    rng = jax.random.key(task.config.seed + 1)
    return jax.jit(lambda p, b: task._forward(p, b, rng, False)[2])


def picture_arrays(task, params, batch, n: int) -> dict:
    """The n most-valid tiles of `batch` through the model, fetched to host numpy (every process
    takes part in the gather)."""
    out = _forward(task)(params, batch)
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
    paths = [viz.save_figure(reconstruction_figure(task, f, step),
                             os.path.join(workdir, f"{task.name}_reconstruction_step{step}.png"))]
    if getattr(task.model, "multiscale", False):
        paths.append(viz.save_figure(multiscale_figure(task, f, step),
                                     os.path.join(workdir, f"{task.name}_multiscale_step{step}.png")))
    return paths


def reconstruction_figure(task, f, step):
    """One row per tile: original | what the encoder saw (masked patches grey) | reconstruction |
    the reconstruction with the visible patches pasted back (as in the MAE paper), the masked patches
    outlined. Each row is labelled with its masked-pixel MSE (model-input units), the caption with
    their mean and the mask ratio."""
    p, image, valid = task.model.patch_size, f["image"], f["valid"]
    h, w, _ = image.shape[1:]
    recon = f["recon"]
    if task.config.model.norm_pix_loss:
        recon = _denormalize_patches(recon, image, valid, p)
    # Masked pixels: a pixel is masked if its patch is masked in every band group.
    mask = f["mask"].reshape(len(image), -1, (h // p) * (w // p)).min(axis=1)
    masked = np.repeat(np.repeat(mask.reshape(-1, h // p, w // p), p, 1), p, 2) > 0.5
    rows, labels, errors = [], [], []
    for img, val, msk, rec in zip(image, valid, masked, recon):
        original = viz.to_rgb8(img, task.band_names, val)
        seen = original.copy()
        seen[msk] = 128
        pasted = np.where(msk[..., None], rec, img)
        rows.append([original, seen, viz.to_rgb8(rec, task.band_names, val, ref=img),
                     viz.to_rgb8(pasted, task.band_names, val, ref=img)])
        scored = msk & val
        errors.append(float(((rec - img)[scored] ** 2).mean()) if scored.any() else float("nan"))
        labels.append(f"masked MSE {errors[-1]:.3g}")
    outlines = [[None, None, None, m] for m in masked]
    return viz.grid_figure(
        rows, columns=RECONSTRUCTION_COLUMNS, row_labels=labels, outlines=outlines,
        title=f"{task.name} reconstruction", caption=viz.caption(step, {
            "mask ratio": float(masked.mean()), "masked MSE (model-input units)": float(np.nanmean(errors))}))


def multiscale_figure(task, f, step):
    """One row per tile: the input, then the target and the prediction at 2x and 4x, all shown at the
    4x size; the caption has their L1 on valid pixels (model-input units)."""
    names, size = task.band_names, f["image_4x"].shape[1]
    rows, columns = [], ["input"]
    for i in range(len(f["image"])):
        row = []
        for key, up in (("", None), ("_2x", "up2"), ("_4x", "up4")):
            target, valid = f["image" + key][i], f["valid" + key][i]
            row.append(viz.resize_nearest(viz.to_rgb8(target, names, valid), size))
            if up:
                row.append(viz.resize_nearest(viz.to_rgb8(f[up][i], names, valid, ref=target), size))
                if i == 0:
                    columns += [f"target {key[1:]}", f"predicted {key[1:]}"]
        rows.append(row)
    errors = {f"L1 {s}x": float(np.abs(f[f"up{s}"] - f[f"image_{s}x"])[f[f"valid_{s}x"]].mean())
              for s in (2, 4) if f[f"valid_{s}x"].any()}  # what the loss's l1_2x / l1_4x measure
    return viz.grid_figure(rows, columns=columns, title=f"{task.name} multi-scale reconstruction",
                           caption=viz.caption(step, errors))


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
