"""Segmentation evaluation pieces, pure functions: sliding windows with overlap averaging, the
confusion matrix and the metrics derived from it.

The confusion matrix is the one global sum: each eval batch returns its (C, C) counts, the trainer
sums them elementwise over all batches (globally sharded, so over all hosts too), and
`metrics_from_confusion` turns the total into IoU / F1 / precision / recall per class, their means
and the overall accuracy. Rows are the true class, columns the predicted one.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def window_offsets(size: int, window: int, stride: int | None = None) -> list[int]:
    """Start offsets of sliding windows along one axis: evenly spread from 0 to size - window, as
    many as stride needs (ceil((size - window) / stride) + 1), so the last window ends at the edge
    and neighbours overlap by at least window - stride. 512 with 224 (stride 224) -> 0, 144, 288."""
    stride = stride or window
    if size <= window:
        return [0]
    n = math.ceil((size - window) / stride) + 1
    return [int(round(v)) for v in np.linspace(0, size - window, n)]


def sliding_window_logits(predict: Callable, images, window: int, stride: int | None = None,
                          num_classes: int | None = None):
    """images (B, H, W, C) -> logits (B, H, W, K): `predict` ((N, window, window, C) -> (N, window,
    window, K)) on every window, the logits of overlapping windows averaged per pixel.

    Works inside jit (offsets are static): all windows of the batch go through `predict` as one
    batch. Images smaller than the window are zero-padded and cropped back.
    """
    b, h, w, _ = images.shape
    ph, pw = max(window - h, 0), max(window - w, 0)
    if ph or pw:
        images = jnp.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hh, ww = h + ph, w + pw
    spots = [(y, x) for y in window_offsets(hh, window, stride) for x in window_offsets(ww, window, stride)]
    crops = jnp.concatenate([images[:, y:y + window, x:x + window] for y, x in spots], axis=0)
    logits = predict(crops).astype(jnp.float32)
    k = logits.shape[-1] if num_classes is None else num_classes
    total = jnp.zeros((b, hh, ww, k), jnp.float32)
    count = np.zeros((hh, ww), np.float32)
    for i, (y, x) in enumerate(spots):
        total = total.at[:, y:y + window, x:x + window].add(logits[i * b:(i + 1) * b])
        count[y:y + window, x:x + window] += 1
    return (total / count[None, :, :, None])[:, :h, :w]


def confusion_matrix(labels, predictions, num_classes: int, ignore_index: int, weights=None):
    """(C, C) float32 counts: [true, predicted], over pixels whose label is not ignore_index (and,
    with `weights` (B,), only rows of weight > 0: a padded eval batch's filler rows count nothing)."""
    keep = labels != ignore_index
    if weights is not None:
        keep = keep & (weights > 0).reshape((-1,) + (1,) * (labels.ndim - 1))
    idx = jnp.where(keep, labels * num_classes + predictions, 0).reshape(-1)
    counts = jnp.zeros((num_classes * num_classes,), jnp.float32).at[idx].add(keep.reshape(-1).astype(jnp.float32))
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Per-class IoU, F1, precision (TP / predicted), recall (TP / true); their means over the classes
    that occur (in truth or prediction); overall accuracy. A class absent from both truth and
    prediction has no defined score and is left out of the means (NaN per class)."""
    cm = np.asarray(confusion, np.float64)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    tp = np.diag(cm)
    true, pred = cm.sum(axis=1), cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (true + pred - tp)
        precision = tp / pred
        recall = tp / true
        f1 = 2 * tp / (true + pred)
    present = (true + pred) > 0
    out = {"miou": float(np.mean(iou[present])) if present.any() else float("nan"),
           "mf1": float(np.mean(f1[present])) if present.any() else float("nan"),
           "mprecision": float(np.nanmean(np.where(present, precision, np.nan))) if present.any() else float("nan"),
           "mrecall": float(np.nanmean(np.where(present, recall, np.nan))) if present.any() else float("nan"),
           "accuracy": float(tp.sum() / max(cm.sum(), 1.0)), "pixels": float(cm.sum())}
    for i, n in enumerate(names):
        out.update({f"iou_{n}": float(iou[i]), f"f1_{n}": float(f1[i]), f"precision_{n}": float(precision[i]),
                    f"recall_{n}": float(recall[i])})
    return out


def majority_baseline(confusion: np.ndarray) -> dict[str, float]:
    """mIoU and accuracy of predicting the most frequent true class everywhere (same pixels)."""
    cm = np.asarray(confusion, np.float64)
    true = cm.sum(axis=1)
    base = np.zeros_like(cm)
    base[:, int(np.argmax(true))] = true
    m = metrics_from_confusion(base)
    return {"miou": m["miou"], "accuracy": m["accuracy"]}


def mean_std(values) -> tuple[float, float]:
    v = np.asarray(jax.device_get(values), np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0
