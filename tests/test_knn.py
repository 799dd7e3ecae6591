"""eojax.classify.knn against a brute-force numpy reference (one test point at a time, float64)."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from eojax.classify.knn import knn_classify


def reference_knn(train, train_labels, test, k, temperature, num_classes):
    """Per test point: cosine similarity to every train point, the k largest (the lower train index
    first among equal similarities), votes exp(sim / T) summed per class. Returns (predictions,
    neighbours, top-5 class lists (only classes with votes, the lower class first among equal votes),
    votes)."""
    train = np.asarray(train, np.float64)
    test = np.asarray(test, np.float64)
    train_n = train / np.linalg.norm(train, axis=1, keepdims=True)
    preds, neighbours, top5, all_votes = [], [], [], []
    for x in test:
        x = x / np.linalg.norm(x)
        sims = np.array([float(np.dot(x, t)) for t in train_n])
        near = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in near:
            votes[train_labels[j]] += np.exp(sims[j] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        preds.append(ranking[0])
        neighbours.append(near)
        top5.append([c for c in ranking[:min(5, num_classes)] if votes[c] > 0])
        all_votes.append(votes)
    return np.array(preds), np.array(neighbours), top5, np.array(all_votes)


def clustered(seed, n_train=304, n_test=121, dim=16, classes=7, spread=0.9):
    """Gaussian clusters, one centre per class, labels noisy enough that k-NN makes mistakes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    ytr = rng.integers(0, classes, n_train)
    yte = rng.integers(0, classes, n_test)
    xtr = centres[ytr] + spread * rng.normal(size=(n_train, dim))
    xte = centres[yte] + spread * rng.normal(size=(n_test, dim))
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte


def accuracies(pred, top5, labels):
    return np.mean(pred == labels), np.mean([y in t for y, t in zip(labels, top5)])


@pytest.mark.parametrize("seed,k,temperature", [(0, 20, 0.07), (1, 5, 0.07), (2, 11, 0.5)])
def test_matches_brute_force(seed, k, temperature):
    xtr, ytr, xte, yte = clustered(seed)
    got = knn_classify(xtr, ytr, xte, yte, k=k, temperature=temperature)
    pred, near, top5, _ = reference_knn(xtr, ytr, xte, k, temperature, 7)
    np.testing.assert_array_equal(got.neighbors, near)
    np.testing.assert_array_equal(got.predictions, pred)
    top1, top5_acc = accuracies(pred, top5, yte)
    assert got.top1 == pytest.approx(top1) and got.top5 == pytest.approx(top5_acc)
    assert 0.3 < got.top1 < 1.0  # the data leaves something to get wrong


def test_chunked_equals_unchunked():
    xtr, ytr, xte, yte = clustered(3)
    whole = knn_classify(xtr, ytr, xte, yte, chunk_size=len(xte))
    for chunk in (7, 64):  # 121 rows: the last chunk is padded
        part = knn_classify(xtr, ytr, xte, yte, chunk_size=chunk)
        np.testing.assert_array_equal(part.neighbors, whole.neighbors)
        np.testing.assert_array_equal(part.predictions, whole.predictions)
        assert (part.top1, part.top5) == (whole.top1, whole.top5)


def test_ties_are_deterministic():
    # Rows of +-1 in 4 of 8 dimensions have norm 2, so normalised features and their dot products
    # (multiples of 1/4) are exact in float32 and float64: many neighbours tie exactly.
    rng = np.random.default_rng(4)

    def rows(n):
        x = np.zeros((n, 8), np.float32)
        for r in x:
            r[rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
        return x

    xtr, xte = rows(60), rows(40)
    ytr, yte = rng.integers(0, 4, 60), rng.integers(0, 4, 40)
    got = knn_classify(xtr, ytr, xte, yte, k=9)
    pred, near, _, votes = reference_knn(xtr, ytr, xte, 9, 0.07, 4)
    sims = (xte / 2) @ (xtr / 2).T
    assert any(len(np.unique(s)) < len(s) for s in sims)  # there are ties to break
    np.testing.assert_array_equal(got.neighbors, near)
    # Votes are sums of exponentials in another order and precision: compare where no two classes
    # come within rounding of each other.
    top2 = np.sort(votes, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4 * top2[:, 1]
    assert clear.sum() > 20
    np.testing.assert_array_equal(got.predictions[clear], pred[clear])


def test_equal_votes_go_to_the_lower_class():
    # Two train points equally similar to the test point, labels 2 and 1: each class gets one equal vote.
    xtr = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 0.0]], np.float32)
    ytr = np.array([2, 1, 0])
    got = knn_classify(xtr, ytr, np.array([[1.0, 0.0]], np.float32), np.array([1]), k=2)
    assert got.predictions[0] == 1 and got.top1 == 1.0
    np.testing.assert_array_equal(got.neighbors[0], [0, 1])


def test_top5_counts_only_classes_with_votes():
    # k = 1: one class gets a vote; a true class without votes is no top-5 hit even with 3 classes.
    xtr, ytr, xte, yte = clustered(5, classes=3)
    got = knn_classify(xtr, ytr, xte, yte, k=1)
    assert got.top5 == got.top1 < 1.0


def test_sharded_features_give_the_same_result():
    xtr, ytr, xte, yte = clustered(6)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, P("data"))
    n_dev = len(jax.devices())
    assert len(xtr) % n_dev == 0
    sharded = knn_classify(jax.device_put(xtr, rows), jax.device_put(ytr, rows), jax.device_put(xte[:120], rows),
                           yte[:120], chunk_size=40)
    plain = knn_classify(xtr, ytr, xte[:120], yte[:120])
    np.testing.assert_array_equal(sharded.neighbors, plain.neighbors)
    np.testing.assert_array_equal(sharded.predictions, plain.predictions)


def test_bad_arguments_name_the_value():
    xtr, ytr, xte, yte = clustered(7, n_train=30)
    with pytest.raises(ValueError, match="k=31"):
        knn_classify(xtr, ytr, xte, yte, k=31)
    with pytest.raises(ValueError, match="dimension 16"):
        knn_classify(xtr, ytr, xte[:, :8], yte)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(xtr, ytr, xte, yte, temperature=0.0)
