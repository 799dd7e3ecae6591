"""`eojax infer` for segmentation: sliding-window prediction over a GeoTIFF of any size, written row
of windows by row of windows, so memory holds at most two rows of windows, never the whole scene.

The windows and the averaging are those of evaluation (seg_eval.window_offsets, overlapping logits
averaged per pixel): after row i of windows is predicted, every output row above the next row's
start has seen all its windows and is final, so it is written (into a temporary tiled GTiff that
becomes a COG at the end) and dropped.
Windows are the training element's size (`task.window`: input.crop; under the resize preprocessings
the training scenes' size, and 'seg_resize' resizes each window to the encoder and its logits back,
as it did the scenes in training).
Outputs, Cloud Optimized GeoTIFFs (eojax.data.cog) with the input's CRS and transform:
`<stem>_classes.tif` (uint8, 255 = no data, nearest-neighbour overviews), optionally
`<stem>_probabilities.tif` (float32, one band per class, NaN = no data), and `<stem>_overlay.png`.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from rasterio.windows import Window

from eojax import viz
from eojax.data import remote, stac
from eojax.data.cog import CogWriter
from eojax.data.raster import RasterError, Scene, open_raster
from eojax.seg import evaluation as seg_eval
from eojax.seg import pictures

NODATA = 255


def _open_input(task, path: str) -> Scene:
    if not path:
        raise ValueError("eojax infer for 'seg' needs --input=<GeoTIFF>")
    names = task.band_names
    c = task.config.input
    if stac.is_item(path):  # the training bands by name, among the item's assets
        return Scene(path, bands=names, nodata=c.nodata)
    if not remote.exists(path):  # a URL or s3:// / gs:// path is GDAL's to check
        raise FileNotFoundError(f"input GeoTIFF not found: {path}")
    with open_raster(path) as src:
        described = [d for d in src.descriptions if d]
        count = src.count
    if described and all(n in described for n in names):
        bands = names  # pick the training bands by name
    elif count == len(names):
        bands = c.bands or ()
    else:
        raise RasterError(f"{path} has {count} bands {described or ''}, the model was trained on "
                          f"{len(names)} bands {names}")
    return Scene(path, bands=bands, nodata=c.nodata)


def predict_geotiff(run, variables, workdir: str, options: dict) -> dict:
    """The `eojax infer` plug-in: classes (and probabilities) of the GeoTIFF options['input'] into
    options['output'] (default <workdir>/infer); probabilities too with config.infer.probabilities or
    options['probabilities'] (eojax.load(...).predict). It needs only the task (band names and statistics
    from the run's DataSpec), never the training data."""
    task, (params, state) = run.task, variables
    scene = _open_input(task, options.get("input", ""))
    out_dir = options.get("output") or os.path.join(workdir, "infer")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(scene.path))[0]
    wy, wx = task.window  # the training element's size (input.crop, or the scene's)
    stride = task.config.input.eval_stride
    k = task.config.model.num_classes
    probabilities = bool(options.get("probabilities") or task.config.infer.probabilities)

    @jax.jit
    def predict(p, s, pixels, valid):
        logits, _ = task.logits(p, s, task.images({"pixels": pixels, "valid": valid}))
        return logits[0] if task.k else logits  # a sweep predicts with probe 0

    h, w = scene.height, scene.width
    ys, xs = seg_eval.window_offsets(h, wy, stride or wy), seg_eval.window_offsets(w, wx, stride or wx)
    names = list(task.config.model.class_names or ())
    names = [str(n) for n in (names if len(names) == k else range(k))]  # band descriptions: one per class
    grid = dict(height=h, width=w, crs=scene.crs, transform=scene.transform)
    paths = {"classes": os.path.join(out_dir, f"{stem}_classes.tif")}
    if probabilities:
        paths["probabilities"] = os.path.join(out_dir, f"{stem}_probabilities.tif")
    legend = ", ".join(f"{i} {n}" for i, n in enumerate(names)) + f", {NODATA} no data"
    dst = CogWriter(paths["classes"], count=1, dtype="uint8", nodata=NODATA, descriptions=("class",),
                    tags={"classes": legend}, categorical=True, **grid)
    prob = None
    thumb_step = max(1, max(h, w) // 1024)
    thumb_rows, class_counts = [], np.zeros(k, np.int64)
    try:
        if probabilities:
            prob = CogWriter(paths["probabilities"], count=k, dtype="float32", nodata=np.nan,
                             descriptions=tuple(f"p({n})" for n in names), **grid)
        base, total = 0, np.zeros((0, w, k), np.float32)
        count = np.zeros((0, w), np.float32)
        for i, y in enumerate(ys):
            crops = [_read(scene, x, y, wy, wx) for x in xs]
            logits = np.asarray(predict(params, state, np.stack([c[0] for c in crops]),
                                        np.stack([c[1] for c in crops])))
            need = y + wy - base
            if need > total.shape[0]:
                grow = need - total.shape[0]
                total = np.concatenate([total, np.zeros((grow, w, k), np.float32)])
                count = np.concatenate([count, np.zeros((grow, w), np.float32)])
            for j, x in enumerate(xs):
                hh, ww = min(wy, h - y), min(wx, w - x)
                total[y - base:y - base + hh, x:x + ww] += logits[j, :hh, :ww]
                count[y - base:y - base + hh, x:x + ww] += 1
            done = ys[i + 1] if i + 1 < len(ys) else h
            rows = done - base
            mean = total[:rows] / count[:rows, :, None]
            pixels, valid = scene.read_pixels(Window(0, base, w, rows))
            classes = np.where(valid, np.argmax(mean, -1), NODATA).astype(np.uint8)
            dst.write(classes[None], window=Window(0, base, w, rows))
            if prob is not None:
                p = np.exp(mean - mean.max(-1, keepdims=True))
                p = np.where(valid[..., None], p / p.sum(-1, keepdims=True), np.nan)
                prob.write(np.moveaxis(p, -1, 0).astype(np.float32), window=Window(0, base, w, rows))
            class_counts += np.bincount(classes[valid].ravel(), minlength=k)[:k]
            first = (-base) % thumb_step
            thumb_rows.append((pixels[:, first::thumb_step, ::thumb_step], valid[first::thumb_step, ::thumb_step],
                               classes[first::thumb_step, ::thumb_step]))
            total, count, base = total[rows:], count[rows:], done
    except BaseException:
        for out in (dst, prob):
            if out is not None:
                out.abort()
        raise
    for out in (dst, prob):
        if out is not None:
            out.close()  # the COGs appear only now, complete
    n = max(int(class_counts.sum()), 1)
    fractions = {name: float(c) / n for name, c in zip(names, class_counts)}
    paths["overlay"] = _overlay_png(task, thumb_rows, os.path.join(out_dir, f"{stem}_overlay.png"),
                                    f"{stem}: predicted classes", fractions)
    return {"input": scene.path, "outputs": paths, "size": [h, w], "windows": len(ys) * len(xs),
            "class_fractions": fractions}


def _read(scene: Scene, x: int, y: int, wy: int, wx: int):
    """A wy x wx crop at (x, y), zero-padded (invalid) where the scene is smaller."""
    hh, ww = min(wy, scene.height - y), min(wx, scene.width - x)
    pixels, valid = scene.read_pixels(Window(x, y, ww, hh))
    if (hh, ww) != (wy, wx):
        pixels = np.pad(pixels, ((0, 0), (0, wy - hh), (0, wx - ww)))
        valid = np.pad(valid, ((0, wy - hh), (0, wx - ww)))
    return pixels, valid


def _overlay_png(task, rows, path, title, fractions) -> str:
    """The scene (thumbnail, at most ~1024 px) beside its classes over it, a legend of the classes, and
    the share of each class in the caption."""
    pixels = np.concatenate([r[0] for r in rows], axis=1)
    valid = np.concatenate([r[1] for r in rows], axis=0)
    classes = np.concatenate([r[2] for r in rows], axis=0)
    rgb = pictures.rgb(task, pixels, valid)
    fig = viz.grid_figure([[rgb, pictures.overlay(rgb, np.where(classes == NODATA, 0, classes))]],
                          columns=("image", "predicted classes"), classes=pictures.legend(task.config),
                          title=title, tile_px=min(max(classes.shape), 768),
                          caption=", ".join(f"{name} {share:.1%}" for name, share in fractions.items()))
    return viz.save_figure(fig, path)
