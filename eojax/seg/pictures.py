"""The seg family's pictures plug-in: image | truth | prediction | overlay, one row per scene; and
the class colours and the overlay that `eojax infer` (eojax/seg/infer.py) uses too."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from eojax import viz
from eojax.seg import evaluation as seg_eval

# Class colours (class 0 grey, then red, yellow, cyan, ...); more classes than colours repeat them.
PALETTE = np.array([[80, 80, 80], [230, 40, 40], [250, 210, 30], [30, 200, 220], [150, 60, 220],
                    [40, 200, 80], [240, 130, 30], [30, 90, 240], [240, 120, 190], [140, 90, 40],
                    [170, 230, 120], [0, 130, 130], [200, 200, 255], [128, 0, 0], [128, 128, 0],
                    [255, 255, 255]], np.uint8)
IGNORED = (0, 0, 0)  # truth pixels with model.ignore_index
COLUMNS = ("image", "truth", "prediction", "overlay")


def class_names(config) -> list[str]:
    """model.class_names when there is one per class, else the class numbers."""
    k, names = config.model.num_classes, list(config.model.class_names or ())
    return [str(n) for n in (names if len(names) == k else range(k))]


def legend(config) -> list[tuple[str, np.ndarray]]:
    """(name, colour) of each class, as the pictures and the overlays colour them."""
    return [(n, PALETTE[i % len(PALETTE)]) for i, n in enumerate(class_names(config))]


def overlay(rgb: np.ndarray, classes: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Class colours blended over an RGB picture; class 0 (background) left as it is."""
    colour = PALETTE[classes % len(PALETTE)].astype(np.float32)
    out = np.where((classes > 0)[..., None], (1 - alpha) * rgb + alpha * colour, rgb)
    return out.round().astype(np.uint8)


def rgb(task, pixels, valid) -> np.ndarray:
    """Raw band-first pixels (C, H, W) -> an RGB picture (bands picked by the task's band names)."""
    image = np.moveaxis(np.asarray(pixels, np.float32), 0, -1)
    return viz.to_rgb8(image, task.band_names, valid)


@functools.lru_cache(maxsize=2)
def _predict(task):
    """One compiled prediction per task: pictures are made at every eval and at the end."""
    return jax.jit(lambda p, s, b: jnp.argmax(task.predict_scenes(p, s, task.images(b)), -1))


def write_pictures(run, variables, batch, workdir, step) -> list[str]:
    """seg_prediction_step<N>.png: image | truth | prediction | overlay, one row per scene of the
    first (up to) 4 of `batch` (probe 0 in a sweep)."""
    task, (params, state) = run.task, variables
    if not task.config.model.pictures:
        return []
    n = min(4, batch["pixels"].shape[0])
    pred = _predict(task)(params, state, batch)
    fetched = multihost_utils.process_allgather({"pred": pred, **batch}, tiled=True)
    if jax.process_index() != 0:
        return []
    f = {k: np.asarray(v) for k, v in fetched.items()}
    preds = f["pred"][0] if task.k else f["pred"]
    keep = [i for i in range(n) if f["weight"][i] > 0]
    if not keep:
        return []
    fig = prediction_figure(task.config, [rgb(task, f["pixels"][i], f["valid"][i]) for i in keep],
                            f["label"][keep], preds[keep], step)
    return [viz.save_figure(fig, os.path.join(workdir, f"seg_prediction_step{step}.png"))]


def prediction_figure(config, pictures, labels, preds, step):
    """One row per scene: image | truth | prediction | prediction over the image, a legend of the
    classes (model.class_names), each row labelled with its pixel accuracy and the caption with the
    accuracy and mIoU of the scenes shown (truth pixels with ignore_index left out)."""
    k, ignore = config.model.num_classes, config.model.ignore_index
    rows, labels_txt, confusion = [], [], np.zeros((k, k), np.int64)
    for picture, label, pred in zip(pictures, labels, preds):
        scored = (label != ignore) & (label >= 0) & (label < k)
        truth = np.where(scored[..., None], PALETTE[np.where(scored, label, 0) % len(PALETTE)], IGNORED)
        rows.append([picture, truth.astype(np.uint8), PALETTE[pred % len(PALETTE)], overlay(picture, pred)])
        cm = np.bincount(label[scored] * k + pred[scored], minlength=k * k).reshape(k, k)
        confusion += cm
        labels_txt.append(f"accuracy {np.trace(cm) / max(cm.sum(), 1):.1%}")
    scores = seg_eval.metrics_from_confusion(confusion)
    classes = legend(config) + ([("ignored", IGNORED)] if any((lab == ignore).any() for lab in labels) else [])
    return viz.grid_figure(rows, columns=COLUMNS, row_labels=labels_txt, classes=classes,
                           title="segmentation: predictions of the eval scenes",
                           caption=viz.caption(step, {"accuracy": scores["accuracy"], "mIoU": scores["miou"]},
                                               f"{len(rows)} scenes shown"))
