"""Weighted k-NN classification of frozen embeddings, as DINO evaluates its features (eval_knn.py).

Train and test features are L2-normalised; each test embedding takes its k most cosine-similar train
embeddings, each neighbour votes for its label with weight exp(similarity / T), and the class with the
largest total is the prediction. DINO's defaults: k = 20, T = 0.07.

Test embeddings go through in fixed-size chunks (one compiled program, the last chunk padded), so memory
is one (chunk, N_train) similarity block however many test embeddings there are. The train features stay
where they are: a jax array sharded over devices is used in place (XLA partitions the matmul and top-k).

Deterministic ties, where DINO's torch sort leaves them open: among equally similar train embeddings
the lower train index is the nearer neighbour (jax.lax.top_k), among equal vote totals the lower class
index wins, and a class no neighbour voted for never counts as a top-5 hit (DINO's top-5 can pick such
a class from the zero votes).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Bytes of float32 similarities one chunk may hold when the chunk size is chosen automatically.
SIMILARITY_BUDGET_BYTES = 256 << 20
MAX_CHUNK = 1024


class KNNResult(NamedTuple):
    predictions: np.ndarray  # (N_test,) int: the class with the largest vote
    neighbors: np.ndarray    # (N_test, k) int: train indices, most similar first
    top1: float | None       # accuracy; None without test labels
    top5: float | None       # true class among the min(5, num_classes) largest votes (votes > 0)


def l2_normalize(x, eps: float = 1e-12):
    """Rows divided by their L2 norm (at least eps, as torch's F.normalize: a zero row stays 0)."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def auto_chunk(num_train: int) -> int:
    """Test rows per chunk: a (chunk, num_train) float32 block within SIMILARITY_BUDGET_BYTES, at most
    MAX_CHUNK rows (larger chunks stop helping the matmul on CPU)."""
    return int(max(1, min(MAX_CHUNK, SIMILARITY_BUDGET_BYTES // (4 * max(num_train, 1)))))


@functools.partial(jax.jit, static_argnames=("chunk", "k", "num_classes", "top"))
def _chunk_votes(train, train_labels, test, start, *, chunk, k, num_classes, top, temperature):
    """Neighbours, prediction and top-`top` classes (with their votes) of test[start:start + chunk]."""
    x = l2_normalize(jax.lax.dynamic_slice_in_dim(test, start, chunk, axis=0))
    sim = jnp.matmul(x, train.T, precision=jax.lax.Precision.HIGHEST)
    near_sim, near = jax.lax.top_k(sim, k)
    weights = jnp.exp(near_sim / temperature)
    votes = jnp.einsum("ck,ckn->cn", weights, jax.nn.one_hot(train_labels[near], num_classes, dtype=jnp.float32))
    top_votes, top_classes = jax.lax.top_k(votes, top)
    return near, jnp.argmax(votes, axis=-1), top_classes, top_votes


def knn_classify(train_features, train_labels, test_features, test_labels=None, *, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int | None = None) -> KNNResult:
    """Weighted k-NN (DINO) of test embeddings against train embeddings.

    train_features (N_train, D), train_labels (N_train,) int, test_features (N_test, D): numpy or jax
    arrays, possibly sharded; test_labels (N_test,) optional, for top-1 / top-5 accuracy.
    num_classes defaults to 1 + the largest label seen. chunk_size: test rows per step (default
    `auto_chunk(N_train)`); the result does not depend on it."""
    n_train = int(train_features.shape[0])
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError(f"features must be (N, D), got train {train_features.shape}, test {test_features.shape}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have dimension {train_features.shape[1]}, "
                         f"test features {test_features.shape[1]}")
    if tuple(train_labels.shape) != (n_train,):
        raise ValueError(f"train_labels must be ({n_train},), got {tuple(train_labels.shape)}")
    if not 1 <= k <= n_train:
        raise ValueError(f"k={k} must be between 1 and the number of train embeddings ({n_train})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels_np = np.asarray(jax.device_get(train_labels)).astype(np.int64)
    if labels_np.size and labels_np.min() < 0:
        raise ValueError(f"train labels must be >= 0, found {labels_np.min()}")
    n_test = int(test_features.shape[0])
    if test_labels is not None:
        test_labels = np.asarray(jax.device_get(test_labels)).astype(np.int64).reshape(-1)
        if test_labels.shape != (n_test,):
            raise ValueError(f"test_labels must be ({n_test},), got {test_labels.shape}")
    if num_classes is None:
        seen = [labels_np.max() if labels_np.size else 0]
        if test_labels is not None and n_test:
            seen.append(test_labels.max())
        num_classes = int(max(seen)) + 1
    elif labels_np.size and labels_np.max() >= num_classes:
        raise ValueError(f"train label {labels_np.max()} >= num_classes={num_classes}")
    if n_test == 0:
        empty = np.zeros((0,), np.int64)
        return KNNResult(empty, np.zeros((0, k), np.int64), None, None)

    chunk = int(chunk_size) if chunk_size else auto_chunk(n_train)
    chunk = max(1, min(chunk, n_test))
    n_chunks = -(-n_test // chunk)
    train = l2_normalize(train_features)  # once; keeps the input's sharding
    labels = jnp.asarray(train_labels, jnp.int32)
    test = jnp.asarray(test_features)
    if n_chunks * chunk != n_test:  # pad so every chunk has the compiled shape
        test = jnp.pad(test, ((0, n_chunks * chunk - n_test), (0, 0)))
    top = min(5, num_classes)
    outs = [_chunk_votes(train, labels, test, i * chunk, chunk=chunk, k=k, num_classes=num_classes, top=top,
                         temperature=float(temperature)) for i in range(n_chunks)]
    near, pred, top_classes, top_votes = (np.concatenate([np.asarray(o[j]) for o in outs])[:n_test]
                                          for j in range(4))
    top1 = top5 = None
    if test_labels is not None:
        top1 = float(np.mean(pred == test_labels))
        top5 = float(np.mean(np.any((top_classes == test_labels[:, None]) & (top_votes > 0), axis=1)))
    return KNNResult(pred.astype(np.int64), near.astype(np.int64), top1, top5)
