"""Logical axis names -> mesh shardings, and host-local batches -> global arrays.

Models name their dimensions (batch, embed, mlp, heads, ...); `config.sharding_rules` maps those names
to mesh axes. Changing the rules switches between data parallel, FSDP and tensor parallel without
touching a model.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


def normalize_rules(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
    """Config rules come as lists/tuples from ml_collections; flax wants tuples of (name, axes)."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"config.sharding_rules entries must be (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        out.append((str(name), tuple(axes) if isinstance(axes, list) else axes))
    return tuple(out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide, leaving those dimensions replicated.

    A user who asks for model=2 on a layer with 3 heads gets a working (if less sharded) program
    instead of a compile error; the divisible dimensions stay sharded.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        kept, size = [], 1
        for name in names:
            if dim % (size * mesh.shape[name]) == 0:
                kept.append(name)
                size *= mesh.shape[name]
        fitted.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a tree whose leaves may be boxed with flax logical names (unboxed result).

    Unboxed leaves (step counters, rng keys, ...) are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    abstract = nn.meta.unbox(abstract_tree)

    def to_sharding(spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
        return NamedSharding(mesh, _fit_spec(mesh_spec, leaf.shape, mesh))

    return jax.tree.map(to_sharding, specs, abstract, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
    """The sharding of a batch array: its leading dimension over whatever 'batch' maps to."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def batch_axis_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch is split: global batch sizes must be a multiple of this."""
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[n] for n in names]))


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over the batch axes."""
    def to_global(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x)

    return jax.tree.map(to_global, local_batch)


def global_batch_shardings(abstract_batch: Any, mesh: Mesh, rules: Rules) -> Any:
    return jax.tree.map(lambda x: batch_sharding(mesh, rules, len(x.shape)), abstract_batch)


def follow_params(abstract_tree: Any, abstract_params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for optimizer state: a leaf whose key path ends with a parameter's path and has that
    parameter's shape (Adam moments, Sophia's Hessian, ...) is sharded like the parameter; anything
    else (step counters, rng keys) is replicated."""
    by_path = {}
    flat_params, _ = jax.tree_util.tree_flatten_with_path(abstract_params)
    flat_shardings = jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat_params, flat_shardings):
        by_path[tuple(str(k) for k in path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, P())

    def choose(path, leaf):
        keys = tuple(str(k) for k in path)
        for i in range(len(keys)):
            match = by_path.get(keys[i:])
            if match is not None and match[0] == tuple(leaf.shape):
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(choose, abstract_tree)
