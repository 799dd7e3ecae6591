"""Classification metrics: single-label (top-1, top-5, confusion matrix, per-class and balanced accuracy,
macro F1) and multi-label (F1 at a threshold, average precision), plus a confusion-matrix PNG.

The trainer sums eval_fn's outputs elementwise over the eval batches (train.evaluate), so everything an
eval step returns is a sum: `single_label_sums` and `multilabel_sums` run inside the jitted eval step
(padding rows have weight 0 and count nothing); `finalize_single_label` and `finalize_multilabel` turn
the totals into metrics on the host. Average precision needs every score, not a sum, so it is a numpy
function over the collected (N, K) scores.

Every metric is defined as scikit-learn defines it (tests/test_classify_metrics.py compares them):
  top-1, top-5        accuracy_score, top_k_accuracy_score (k = min(5, K); exact score ties, which
                      sklearn breaks the other way, aside)
  per-class accuracy  recall of each class: correct / true count; NaN for a class with no samples
  balanced accuracy   balanced_accuracy_score: the mean per-class accuracy over the classes that have
                      samples (sklearn drops the others too, with a warning; here silently)
  macro F1            f1_score(average='macro'): mean of 2TP / (2TP + FP + FN) over the classes that
                      occur in the truth or the predictions (sklearn's default label set)
  multi-label F1      f1_score(average='micro' / 'macro', zero_division=0) over all K classes
  average precision   average_precision_score(average=None / 'micro' / 'macro'); a class without a
                      positive gets AP 0 and counts in the macro mean, as in sklearn
                      ('macro_with_positives' leaves such classes out)
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------------------------------
# single-label


def single_label_sums(logits, labels, weights, top_k: int = 5) -> dict[str, jax.Array]:
    """Per-batch sums (jax, inside the eval step) for `finalize_single_label`.

    logits (B, K); labels (B,) int in [0, K); weights (B,), 0 for padding rows (their labels may be
    anything). Returns {'count': sum of weights, 'top1_correct', 'top5_correct': weighted counts
    (top-k with k = min(top_k, K)), 'confusion': (K, K) weighted counts, rows true, columns predicted}.
    The prediction is the argmax (the lowest class index among equal logits)."""
    num_classes = logits.shape[-1]
    w = jnp.asarray(weights, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    keep = w != 0
    # Padding rows may carry any label (-1, garbage): point them at cell 0, where they add weight 0.
    labels = jnp.where(keep, labels, 0)
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    _, top = jax.lax.top_k(logits, min(top_k, num_classes))
    in_top = jnp.any(top == labels[:, None], axis=-1)
    cells = labels * num_classes + pred
    confusion = jnp.zeros((num_classes * num_classes,), jnp.float32).at[cells].add(w)
    return {"count": jnp.sum(w),
            "top1_correct": jnp.sum(jnp.where(pred == labels, w, 0.0)),
            "top5_correct": jnp.sum(jnp.where(in_top, w, 0.0)),
            "confusion": confusion.reshape(num_classes, num_classes)}


def per_class_accuracy(confusion) -> np.ndarray:
    """(K,) recall of each class from a (K, K) confusion matrix (rows true); NaN for a class with no
    samples."""
    cm = np.asarray(confusion, np.float64)
    true = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(true > 0, np.diag(cm) / true, np.nan)


def macro_f1_from_confusion(confusion) -> float:
    """Mean F1 over the classes that occur in truth or prediction (sklearn's macro F1); NaN if none."""
    cm = np.asarray(confusion, np.float64)
    tp = np.diag(cm)
    true, pred = cm.sum(axis=1), cm.sum(axis=0)
    present = (true + pred) > 0
    if not present.any():
        return float("nan")
    return float(np.mean(2 * tp[present] / (true[present] + pred[present])))


def finalize_single_label(sums, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Metrics from `single_label_sums` summed over all batches: top1, top5, balanced_accuracy,
    macro_f1, count, and acc_<class name> (per-class accuracy, NaN for a class with no samples; names
    default to the class indices). Everything is NaN when nothing was counted."""
    cm = np.asarray(sums["confusion"], np.float64)
    k = cm.shape[0]
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    count = float(sums["count"])
    per_class = per_class_accuracy(cm)
    seen = ~np.isnan(per_class)
    nan = float("nan")
    out = {"top1": float(sums["top1_correct"]) / count if count > 0 else nan,
           "top5": float(sums["top5_correct"]) / count if count > 0 else nan,
           "balanced_accuracy": float(np.mean(per_class[seen])) if seen.any() else nan,
           "macro_f1": macro_f1_from_confusion(cm),
           "count": count}
    out.update({f"acc_{n}": float(a) for n, a in zip(names, per_class)})
    return out


# ----------------------------------------------------------------------------------------------------
# multi-label


def multilabel_sums(logits, targets, weights, threshold: float = 0.5,
                    from_logits: bool = True) -> dict[str, jax.Array]:
    """Per-batch sums (jax, inside the eval step) for `finalize_multilabel`.

    logits (B, K) (probabilities with from_logits=False); targets (B, K) in {0, 1}; weights (B,), 0 for
    padding rows. A class is predicted when its probability is > threshold; with logits that is
    compared as logit > log(t / (1 - t)) (0 for t = 0.5), so a float32 sigmoid rounding to 1.0 cannot
    move a score across it. Returns {'count', 'tp', 'fp', 'fn'}: the last three (K,) weighted counts."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    cut = math.log(threshold / (1.0 - threshold)) if from_logits else threshold
    pred = jnp.asarray(logits) > cut
    truth = jnp.asarray(targets) > 0.5
    w = jnp.asarray(weights, jnp.float32)[:, None]
    return {"count": jnp.sum(w),
            "tp": jnp.sum(jnp.where(pred & truth, w, 0.0), axis=0),
            "fp": jnp.sum(jnp.where(pred & ~truth, w, 0.0), axis=0),
            "fn": jnp.sum(jnp.where(~pred & truth, w, 0.0), axis=0)}


def _f1(tp, fp, fn) -> np.ndarray:
    """2TP / (2TP + FP + FN), 0 where that is 0 / 0 (sklearn's zero_division=0)."""
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def finalize_multilabel(sums, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """micro_f1, macro_f1 (over all K classes, zero_division=0), micro_precision, micro_recall, count
    and f1_<class name>, from `multilabel_sums` summed over all batches."""
    tp, fp, fn = (np.asarray(sums[key], np.float64) for key in ("tp", "fp", "fn"))
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"{len(names)} class names for {len(tp)} classes")
    per_class = _f1(tp, fp, fn)
    t, p, n = tp.sum(), fp.sum(), fn.sum()
    out = {"micro_f1": float(_f1(np.array(t), np.array(p), np.array(n))),
           "macro_f1": float(per_class.mean()) if len(per_class) else float("nan"),
           "micro_precision": float(t / (t + p)) if t + p > 0 else 0.0,
           "micro_recall": float(t / (t + n)) if t + n > 0 else 0.0,
           "count": float(sums["count"])}
    out.update({f"f1_{name}": float(f) for name, f in zip(names, per_class)})
    return out


def _average_precision_columns(scores: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(K,) AP of each column: sum over the positives of (their weight / total positive weight) times
    the precision at their score's threshold. Equal scores share one threshold, whose precision counts
    the whole tie group, which is what sklearn's precision-recall curve does with tied scores."""
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    y = np.take_along_axis(targets, order, axis=0)
    w = np.take_along_axis(np.broadcast_to(weights, scores.shape), order, axis=0)
    pos = y * w
    tps = np.cumsum(pos, axis=0)
    fps = np.cumsum((1.0 - y) * w, axis=0)
    # Index of the last row of each row's tie group: the running minimum, from the bottom, of the
    # group-end rows' indices.
    ends = np.ones_like(s, dtype=bool)
    ends[:-1] = s[:-1] != s[1:]
    end_index = np.where(ends, np.arange(n)[:, None], n - 1)
    end_index = np.minimum.accumulate(end_index[::-1], axis=0)[::-1]
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros_like(tps), where=predicted != 0)
    at_threshold = np.take_along_axis(precision, end_index, axis=0)
    total = tps[-1] if n else np.zeros(scores.shape[1])
    ap = np.sum(pos * at_threshold, axis=0)
    # No positive: sklearn sets recall to 1 at every threshold and its AP comes out 0.
    return np.divide(ap, total, out=np.zeros_like(ap), where=total > 0)


def average_precision(scores, targets, weights=None) -> dict:
    """Average precision of multi-label scores, as sklearn.metrics.average_precision_score.

    scores (N, K): any monotone score (logits or probabilities); targets (N, K) in {0, 1}; weights
    (N,) optional sample weights (0 drops a padding row). Returns {'per_class': (K,) AP
    (average=None), 'micro': AP of all (score, target) pairs pooled (average='micro'), 'macro': mean
    of the per-class APs (average='macro'), 'macro_with_positives': the mean over the classes that
    have a positive (NaN if none)}. A class without a positive has AP 0 and counts in 'macro', as in
    sklearn (which warns)."""
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets, np.float64)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be (N, K), got {scores.shape} and {targets.shape}")
    if not np.all((targets == 0) | (targets == 1)):
        raise ValueError("targets must be 0 or 1")
    n, k = scores.shape
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64).reshape(n)
    per_class = _average_precision_columns(scores, targets, w[:, None])
    micro = _average_precision_columns(scores.reshape(-1, 1), targets.reshape(-1, 1),
                                       np.repeat(w, k)[:, None])[0]
    has_positive = (targets * w[:, None]).sum(axis=0) > 0
    return {"per_class": per_class, "micro": float(micro),
            "macro": float(per_class.mean()) if k else float("nan"),
            "macro_with_positives": float(per_class[has_positive].mean()) if has_positive.any() else float("nan")}


# ----------------------------------------------------------------------------------------------------
# picture

CELL_TEXT_MAX_CLASSES = 15  # above this many classes the cells are too small for numbers


def confusion_png(confusion, class_names: Sequence[str], path: str, normalize: bool = True,
                  title: str = "", caption: str = "") -> str:
    """A (K, K) confusion matrix (rows true, columns predicted) as a PNG heat map. normalize: each row
    divided by its total (the share of a true class given each prediction; an empty row stays 0).
    The figure grows with K and the fonts shrink, so the 62 fMoW classes stay legible; cell values
    are written only up to CELL_TEXT_MAX_CLASSES classes; `caption` goes under it. A matplotlib
    Figure (Agg, no pyplot), written through viz.save_figure. Returns `path`."""
    from matplotlib.figure import Figure

    from eojax import viz

    cm = np.asarray(confusion, np.float64)
    k = cm.shape[0]
    if cm.shape != (k, k):
        raise ValueError(f"confusion must be square, got {cm.shape}")
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}x{k} confusion matrix")
    if normalize:
        rows = cm.sum(axis=1, keepdims=True)
        shown = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    else:
        shown = cm
    side = float(np.clip(2.5 + 0.17 * k, 4.0, 14.0))  # inches: ~0.17 in per class, room for labels
    # Rows ~12 pt apart at 62 classes: 6 pt labels fit, drawn at 140 dpi so 6 pt is ~12 pixels tall.
    font = 8 if k <= CELL_TEXT_MAX_CLASSES else (7 if k <= 30 else 6)
    dpi = 100 if k <= 30 else 140
    fig = Figure(figsize=(side + 1.2, side), dpi=dpi, layout="constrained")
    ax = fig.subplots()
    vmax = 1.0 if normalize else max(float(shown.max()), 1.0)
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=90, fontsize=font)
    ax.set_yticklabels(names, fontsize=font)
    ax.tick_params(length=2, pad=1)
    ax.set_xlabel("predicted", fontsize=9)
    ax.set_ylabel("true", fontsize=9)
    if k <= CELL_TEXT_MAX_CLASSES:
        for i in range(k):
            for j in range(k):
                v = shown[i, j]
                text = f"{v:.2f}" if normalize else f"{v:.0f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=font - 1,
                        color="white" if v > 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    if caption:
        fig.supxlabel(caption, fontsize=8)
    return viz.save_figure(fig, path)
