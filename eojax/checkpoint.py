"""Orbax checkpoints of the train state together with the Grain iterator state.

A checkpoint is `<workdir>/checkpoints/<step>/{state,data}`; Orbax writes each step into a temporary
directory and renames it only when complete, so a run killed while writing leaves the previous
checkpoints untouched and the half-written one is ignored on restart.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being trained."""


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in flat}


def check_compatible(saved: Any, expected: Any, what: str) -> None:
    """Raises CheckpointMismatchError listing every missing, unexpected or reshaped array."""
    saved_shapes, expected_shapes = _flat_shapes(saved), _flat_shapes(expected)
    problems = []
    for key in sorted(expected_shapes.keys() - saved_shapes.keys()):
        problems.append(f"missing in checkpoint: {key} {expected_shapes[key]}")
    for key in sorted(saved_shapes.keys() - expected_shapes.keys()):
        problems.append(f"not in this model: {key} {saved_shapes[key]}")
    for key in sorted(saved_shapes.keys() & expected_shapes.keys()):
        if saved_shapes[key] != expected_shapes[key]:
            problems.append(f"shape of {key}: checkpoint {saved_shapes[key]} vs model {expected_shapes[key]}")
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise CheckpointMismatchError(
            f"{what} was written by a different model ({len(problems)} differences):\n  {shown}")


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run, written every `every` steps (and when forced)."""

    def __init__(self, directory: str, *, keep: int = 3, every: int = 1000, async_save: bool = True):
        # Remote paths (gs://...) go to Orbax as they are.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        # Handlers registered up front, so a fresh process can read the metadata of earlier steps.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any = None, *, force: bool = False) -> bool:
        if not force and (self.every <= 0 or step % self.every):
            return False
        if step in self._manager.all_steps():
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restores into `abstract_state` (ShapeDtypeStructs carrying their shardings)."""
        saved = self._manager.item_metadata(step)["state"]
        where = f"checkpoint {self.directory}/{step}"
        # Parameters first: their differences are the ones a user recognises.
        check_compatible(saved["params"], abstract_state.params, where)
        check_compatible(saved, abstract_state, where)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def is_eojax_checkpoint(path: str) -> bool:
    """A run folder, its checkpoints/ folder, or one step folder written by eojax."""
    if not os.path.isdir(path):
        return False
    if os.path.isdir(os.path.join(path, "state")) or os.path.isdir(os.path.join(path, "checkpoints")):
        return True
    return any(n.isdigit() and os.path.isdir(os.path.join(path, n, "state")) for n in os.listdir(path))


def load_params(path: str, abstract_params: Any) -> Any:
    """Parameters from another run for `config.init_from`.

    `path` is a workdir, its checkpoints/ folder, or one step folder. The optimizer state of that run
    is ignored; shapes must match exactly (see weights/ for importing published checkpoints).
    """
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.init_from: {path} does not exist")
    for candidate in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(candidate) and any(n.isdigit() for n in os.listdir(candidate)):
            steps = sorted(int(n) for n in os.listdir(candidate) if n.isdigit())
            path = os.path.join(candidate, str(steps[-1]))
            break
    _, state_dir, saved_tree = _open_state(path, "config.init_from: ")
    if "params" not in saved_tree:
        raise CheckpointMismatchError(f"config.init_from: {state_dir} holds no 'params'")
    check_compatible(saved_tree["params"], abstract_params, f"config.init_from {path}")
    # Partial restore: only the params subtree is read (the optimizer state may be large).
    target = {"params": abstract_params}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=getattr(a, "sharding", None)),
                                abstract_params)
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args={"params": restore_args}, partial_restore=True))
    logging.info("initialised params from %s", path)
    return restored["params"]


def _open_state(step_dir: str, what: str = ""):
    """-> (checkpointer, state folder, metadata tree) of one checkpoint step."""
    state_dir = os.path.join(step_dir, "state")
    if not os.path.isdir(state_dir):
        raise FileNotFoundError(f"{what}no checkpoint state under {step_dir}")
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(state_dir)
    meta = getattr(meta, "item_metadata", meta)
    return checkpointer, state_dir, getattr(meta, "tree", meta)


def read_state(step_dir: str) -> Any:
    """The saved train state of one checkpoint step as numpy arrays, whatever mesh or process count
    wrote it (for inspection, tests and conversions)."""
    checkpointer, state_dir, meta = _open_state(step_dir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return host_numpy(checkpointer.restore(state_dir, target))


def host_numpy(tree: Any) -> Any:
    """Gathers a (possibly sharded) tree to host numpy, e.g. for comparisons in tests."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
