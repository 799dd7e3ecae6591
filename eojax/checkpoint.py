"""Orbax checkpoints of the train state together with the Grain iterator state.

A checkpoint is `<workdir>/checkpoints/<step>/{state,data}`; Orbax writes each step into a temporary
directory and renames it only when complete, so a run killed while writing leaves the previous
checkpoints untouched and the half-written one is ignored on restart.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being trained."""


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(leaf.shape) for path, leaf in flat}


def key_problems(found: Mapping[Any, tuple], expected: Mapping[Any, tuple], source: str = "checkpoint",
                 name: Callable[[Any], str] = str) -> list[str]:
    """THE report of a set of arrays against what a model expects (key -> shape on both sides): one
    line per missing, unexpected or reshaped key, each named, in key order."""
    found = {k: tuple(v) for k, v in found.items()}
    expected = {k: tuple(v) for k, v in expected.items()}
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    return ([f"missing in {source}: {name(k)} {expected[k]}" for k in missing]
            + [f"not in this model: {name(k)} {found[k]}" for k in unexpected]
            + [f"shape of {name(k)}: {source} {found[k]} vs model {expected[k]}"
               for k in sorted(found.keys() & expected.keys()) if found[k] != expected[k]])


def raise_mismatch(problems: list[str], what: str, limit: int = 40) -> None:
    """CheckpointMismatchError listing `problems` (key_problems' lines) when there are any."""
    if problems:
        shown = "\n  ".join(problems[:limit]) + ("\n  ..." if len(problems) > limit else "")
        raise CheckpointMismatchError(f"{what} ({len(problems)} differences):\n  {shown}")


def check_compatible(saved: Any, expected: Any, what: str) -> None:
    """Raises CheckpointMismatchError listing every missing, unexpected or reshaped array."""
    raise_mismatch(key_problems(_flat_shapes(saved), _flat_shapes(expected)), f"{what} was written by a different model")


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
        """Restores into `abstract_state` (a dataclass of ShapeDtypeStructs carrying their shardings)."""
        saved = self._manager.item_metadata(step)["state"]
        where = f"checkpoint {self.directory}/{step}"
        # Parameters first: their differences are the ones a user recognises.
        check_compatible(saved["params"], abstract_state.params, where)
        check_compatible(saved, abstract_state, where)
        # Fields with no arrays (an empty model state) may be absent from checkpoints written before
        # eojax kept model state: restore the rest and keep them empty.
        fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
        target = {k: v for k, v in fields.items() if k in saved or jax.tree.leaves(v)}
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return type(abstract_state)(**{**fields, **restored["state"]})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def is_eojax_checkpoint(path: str) -> bool:
    """A run folder, its checkpoints/ or best/ folder, or one step folder written by eojax."""
    if not os.path.isdir(path):
        return False
    if any(os.path.isdir(os.path.join(path, n)) for n in ("state", "checkpoints", "best")):
        return True
    return any(n.isdigit() and os.path.isdir(os.path.join(path, n, "state")) for n in os.listdir(path))


def step_folder(path: str, best: bool = False) -> str:
    """The step folder `path` names: a run folder (its latest checkpoint, or with `best` its kept best
    parameters), its checkpoints/ or best/ folder, or a step folder itself."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(os.path.join(path, "state")):
        return path
    candidates = [os.path.join(path, "best")] if best else [os.path.join(path, "checkpoints")]
    for candidate in candidates + [path]:
        steps = [int(n) for n in os.listdir(candidate) if n.isdigit()] if os.path.isdir(candidate) else []
        if steps:
            return os.path.join(candidate, str(max(steps)))
    raise FileNotFoundError(f"no eojax checkpoint {'best/ ' if best else ''}under {path}")


def load_variables(path: str, abstract_params: Any, abstract_model_state: Any = None, *,
                   best: bool = False) -> tuple[Any, Any]:
    """(params, model_state) to evaluate an eojax run with: its EMA when it kept one, else its live
    parameters; the model state (e.g. BatchNorm statistics) likewise.

    `path` is as `step_folder` takes it. With abstract trees (ShapeDtypeStructs, optionally carrying
    shardings) only those arrays are read, checked key by key against the checkpoint; with
    `abstract_params=None` the params and model state are read whole to host numpy (for export)."""
    step_dir = step_folder(path, best)
    _, state_dir, saved = _open_state(step_dir)
    ema = isinstance(saved.get("opt_state"), dict) and "ema" in saved["opt_state"]
    params_key = ("opt_state", "ema") if ema else ("params",)
    state_key = "ema_model_state" if ema and saved.get("ema_model_state") else "model_state"
    saved_params = saved["opt_state"]["ema"] if ema else saved.get("params")
    if saved_params is None:
        raise CheckpointMismatchError(f"{state_dir} holds no 'params'")
    saved_state = saved.get(state_key) or {}
    if abstract_params is None:
        abstract_params = _abstract_from_metadata(saved_params)
        abstract_model_state = _abstract_from_metadata(saved_state)
    abstract_model_state = abstract_model_state or {}
    check_compatible(saved_params, abstract_params, f"the params of {step_dir}")
    check_compatible(saved_state, abstract_model_state, f"the model state of {step_dir}")
    # Partial restore: only these subtrees are read (the optimizer state may be large).
    target, args = {}, {}
    for key, tree in ((params_key, abstract_params), ((state_key,), abstract_model_state)):
        if not jax.tree.leaves(tree):
            continue
        node_t, node_a = target, args
        for k in key[:-1]:
            node_t, node_a = node_t.setdefault(k, {}), node_a.setdefault(k, {})
        node_t[key[-1]] = tree
        node_a[key[-1]] = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=getattr(a, "sharding", None)), tree)
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=True))
    params = restored["opt_state"]["ema"] if ema else restored["params"]
    logging.info("read %s params from %s", "EMA" if ema else "live", step_dir)
    return params, restored.get(state_key, {}) if jax.tree.leaves(abstract_model_state) else {}


def _abstract_from_metadata(tree: Any) -> Any:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


def _open_state(step_dir: str, what: str = ""):
    """-> (checkpointer, state folder, metadata tree) of one checkpoint step."""
    state_dir = os.path.join(os.path.abspath(step_dir), "state")
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
