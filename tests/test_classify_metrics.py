"""eojax.classify.metrics against scikit-learn, on random logits with padding rows, a class that is never
predicted and a class without samples; summed-over-batches results equal the one-shot computation."""
from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score,
                             confusion_matrix, f1_score, recall_score, top_k_accuracy_score)

from eojax.classify import metrics

BATCH = 32


def batched_sums(fn, *arrays, batch=BATCH, **kwargs):
    """fn's outputs summed over batches of `batch` rows (the last one padded with weight-0 rows holding
    garbage), in float64 as train.evaluate sums them."""
    jitted = jax.jit(lambda *a: fn(*a, **kwargs))
    n = arrays[0].shape[0]
    sums = {}
    for start in range(0, n, batch):
        parts = []
        for a in arrays:
            part = a[start:start + batch]
            if len(part) < batch:  # padding: garbage values, weight 0 (weights are the last array)
                fill = np.full((batch - len(part), *a.shape[1:]), -1 if a is not arrays[-1] else 0, a.dtype)
                part = np.concatenate([part, fill])
            parts.append(part)
        for key, v in jax.device_get(jitted(*parts)).items():
            v = np.asarray(v, np.float64)
            sums[key] = sums[key] + v if key in sums else v
    return sums


def single_label_case(seed: int, k: int, n: int = 203):
    """Logits (n, k), labels, weights: some rows padding (weight 0, label -1); class 1 occurs but is
    never predicted (its logit is always the lowest), class k-2 neither occurs nor is predicted, class
    k-1 is predicted but never occurs."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    low = logits.min()
    logits[:, 1], logits[:, k - 2] = low - 1.0, low - 2.0  # distinct: sklearn breaks exact ties the other way
    labels = rng.integers(0, k - 2, size=n)
    weights = np.ones(n, np.float32)
    pad = rng.random(n) < 0.15
    weights[pad] = 0.0
    labels[pad] = -1
    return logits, labels.astype(np.int32), weights


@pytest.mark.parametrize("seed,k", [(0, 7), (1, 10), (2, 4), (3, 62)])
def test_single_label_matches_sklearn(seed, k):
    logits, labels, weights = single_label_case(seed, k)
    sums = batched_sums(metrics.single_label_sums, logits, labels, weights)
    out = metrics.finalize_single_label(sums)
    valid = weights > 0
    y, scores = labels[valid], logits[valid]
    pred = scores.argmax(axis=1)
    assert 1 in y and 1 not in pred and k - 2 not in pred and k - 2 not in y and k - 1 in pred and k - 1 not in y
    np.testing.assert_array_equal(sums["confusion"], confusion_matrix(y, pred, labels=range(k)))
    assert out["count"] == valid.sum()
    assert out["top1"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    with warnings.catch_warnings():
        # "'k' (4) greater than or equal to 'n_classes'", "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore")
        top5 = top_k_accuracy_score(y, scores, k=min(5, k), labels=range(k))
        balanced = balanced_accuracy_score(y, pred)
    assert out["top5"] == pytest.approx(top5, abs=1e-12)
    assert out["balanced_accuracy"] == pytest.approx(balanced, abs=1e-12)
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
    recall = recall_score(y, pred, labels=range(k), average=None, zero_division=np.nan)
    np.testing.assert_allclose([out[f"acc_{i}"] for i in range(k)], recall, atol=1e-12)
    assert np.isnan(out[f"acc_{k - 1}"]) and np.isnan(out[f"acc_{k - 2}"]) and out["acc_1"] == 0.0

    # One batch holding every row (padding included) gives the same sums as the batched path.
    once = jax.device_get(jax.jit(metrics.single_label_sums)(logits, labels, weights))
    for key in sums:
        np.testing.assert_allclose(np.asarray(once[key], np.float64), sums[key], atol=1e-4, err_msg=key)


def test_single_label_sample_weights_and_names():
    logits, labels, weights = single_label_case(5, 6, n=150)
    rng = np.random.default_rng(5)
    weights = np.where(weights > 0, rng.uniform(0.2, 3.0, size=weights.shape), 0.0).astype(np.float32)
    sums = batched_sums(metrics.single_label_sums, logits, labels, weights)
    names = ["field", "forest", "water", "urban", "road", "snow"]
    out = metrics.finalize_single_label(sums, names)
    valid = weights > 0
    y, scores, w = labels[valid], logits[valid], weights[valid]
    pred = scores.argmax(axis=1)
    np.testing.assert_allclose(sums["confusion"], confusion_matrix(y, pred, labels=range(6), sample_weight=w),
                               rtol=1e-5)
    assert out["top1"] == pytest.approx(accuracy_score(y, pred, sample_weight=w), rel=1e-5)
    assert out["top5"] == pytest.approx(top_k_accuracy_score(y, scores, k=5, labels=range(6), sample_weight=w),
                                        rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(y, pred, sample_weight=w)
    assert out["balanced_accuracy"] == pytest.approx(balanced, rel=1e-5)
    assert out["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", sample_weight=w), rel=1e-5)
    assert np.isnan(out["acc_snow"]) and np.isnan(out["acc_road"]) and out["acc_forest"] == 0.0
    with pytest.raises(ValueError, match="3 class names"):
        metrics.finalize_single_label(sums, names[:3])


def test_nothing_counted_is_nan():
    out = metrics.finalize_single_label({"count": 0.0, "top1_correct": 0.0, "top5_correct": 0.0,
                                         "confusion": np.zeros((3, 3))})
    assert all(np.isnan(out[key]) for key in ("top1", "top5", "balanced_accuracy", "macro_f1"))


def multilabel_case(seed: int, n: int = 181, k: int = 9):
    """Logits (n, k), 0/1 targets, weights with padding rows; class 2 has no positive, class 4 is never
    predicted (all logits negative), class 6 is predicted everywhere."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < rng.uniform(0.05, 0.6, size=k)).astype(np.float32)
    targets[:, 2] = 0
    logits = (rng.normal(size=(n, k)) + 1.5 * (targets - 0.5)).astype(np.float32)
    logits[:, 4] = -np.abs(logits[:, 4]) - 0.1
    logits[:, 6] = np.abs(logits[:, 6]) + 0.1
    weights = (rng.random(n) > 0.12).astype(np.float32)
    return logits, targets, weights


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_f1_matches_sklearn(seed):
    logits, targets, weights = multilabel_case(seed)
    sums = batched_sums(metrics.multilabel_sums, logits, targets, weights)
    out = metrics.finalize_multilabel(sums)
    valid = weights > 0
    y, pred = targets[valid].astype(int), (logits[valid] > 0).astype(int)
    assert pred[:, 4].sum() == 0 and y[:, 2].sum() == 0
    for average in ("micro", "macro"):
        assert out[f"{average}_f1"] == pytest.approx(f1_score(y, pred, average=average, zero_division=0), abs=1e-12)
    per_class = f1_score(y, pred, average=None, zero_division=0)
    np.testing.assert_allclose([out[f"f1_{i}"] for i in range(targets.shape[1])], per_class, atol=1e-12)
    assert out["count"] == valid.sum()
    once = jax.device_get(jax.jit(metrics.multilabel_sums)(logits, targets, weights))
    for key in sums:
        np.testing.assert_allclose(np.asarray(once[key], np.float64), sums[key], err_msg=key)


def test_multilabel_threshold_on_logits_equals_probabilities():
    logits, targets, weights = multilabel_case(7)
    probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
    a = jax.device_get(metrics.multilabel_sums(logits, targets, weights, threshold=0.3))
    b = jax.device_get(metrics.multilabel_sums(probs, targets, weights, threshold=0.3, from_logits=False))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    y, pred = targets[weights > 0].astype(int), (probs[weights > 0] > 0.3).astype(int)
    assert metrics.finalize_multilabel(a)["macro_f1"] == pytest.approx(
        f1_score(y, pred, average="macro", zero_division=0), abs=1e-12)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True), (3, True)])
def test_average_precision_matches_sklearn(seed, ties):
    logits, targets, weights = multilabel_case(seed)
    scores = np.round(logits, 0) if ties else logits  # ties: a handful of distinct scores per class
    valid = weights > 0
    got = metrics.average_precision(scores[valid], targets[valid])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found in y_true" for class 2
        want = {avg: average_precision_score(targets[valid], scores[valid], average=avg)
                for avg in (None, "micro", "macro")}
    np.testing.assert_allclose(got["per_class"], want[None], rtol=1e-12, atol=1e-12)
    assert got["per_class"][2] == 0.0
    assert got["micro"] == pytest.approx(want["micro"], rel=1e-12)
    assert got["macro"] == pytest.approx(want["macro"], rel=1e-12)
    has_positive = targets[valid].sum(axis=0) > 0
    assert got["macro_with_positives"] == pytest.approx(want[None][has_positive].mean(), rel=1e-12)
    # Weight-0 (padding) rows change nothing.
    padded = metrics.average_precision(scores, targets, weights)
    np.testing.assert_allclose(padded["per_class"], got["per_class"], rtol=1e-12, atol=1e-12)
    assert padded["micro"] == pytest.approx(got["micro"], rel=1e-12)


def test_average_precision_sample_weights():
    logits, targets, _ = multilabel_case(11, n=120)
    w = np.random.default_rng(11).uniform(0.1, 2.0, size=len(logits))
    scores = np.round(logits * 2, 0)
    got = metrics.average_precision(scores, targets, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for avg, key in ((None, "per_class"), ("micro", "micro"), ("macro", "macro")):
            np.testing.assert_allclose(got[key], average_precision_score(targets, scores, average=avg,
                                                                         sample_weight=w), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.average_precision(scores, targets * 2)


def read_png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


@pytest.mark.parametrize("k", [5, 62])
def test_confusion_png(tmp_path, k):
    rng = np.random.default_rng(k)
    cm = rng.integers(0, 20, size=(k, k)).astype(np.float64) + np.eye(k) * 50
    cm[1] = 0  # a class without samples: an empty row, not NaN
    names = [f"class_{i}_{'recreational_facility' if i % 3 == 0 else 'airport'}" for i in range(k)]
    path = metrics.confusion_png(cm, names, str(tmp_path / "sub" / "confusion.png"), title=f"{k} classes")
    width, height = read_png_size(path)
    if k == 5:
        assert 300 <= width <= 900 and 300 <= height <= 900, (width, height)
    else:
        assert 1500 <= width <= 2400 and 1500 <= height <= 2400, (width, height)
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # something was drawn
    if k == 5:  # raw counts (cell text as integers)
        counts = metrics.confusion_png(cm, names, str(tmp_path / "counts.png"), normalize=False)
        assert read_png_size(counts)[0] > 300
    with pytest.raises(ValueError, match="class names"):
        metrics.confusion_png(cm, names[:-1], str(tmp_path / "bad.png"))
