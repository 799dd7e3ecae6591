"""Orbax checkpoints of the train state together with the Grain iterator state.

A checkpoint is `<workdir>/checkpoints/<step>/{state,data}`; Orbax writes each step into a temporary
directory and renames it only when complete, so a run killed while writing leaves the previous
checkpoints untouched and the half-written one is ignored on restart.

Integrity: Orbax keeps no checksums of its files, so once a step is finalised (its async write has
finished: found at the next save, which records it in a background thread while training goes on, or
at `wait()` / `close()`) eojax records the size and XXH3-64 hash of every file of the step in
`<step>/eojax_integrity.json`, written atomically (process 0; local folders only). A step is then
- intact: every recorded file is there with its size and checksum;
- unverified: finalised by Orbax and well formed, but with no record (written before eojax recorded
  checksums, or the run stopped between the write finishing and the record): restorable, with a warning;
- corrupt: anything else (a file missing, truncated or changed, unreadable metadata, no state/).
`Checkpointer.restore_latest_intact` restores the newest step that is not corrupt, warning about each
skipped one and deleting nothing; when the trainer next saves, the skipped steps are renamed
`<step>.corrupt` (kept for inspection, out of Orbax's rotation). A checkpoint is written only when
every floating-point array of the state is finite.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
from typing import Any, Callable, Mapping

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import xxhash
from jax.experimental import multihost_utils

from eojax import errors, lora

INTEGRITY_FILE = "eojax_integrity.json"
SET_ASIDE_SUFFIX = ".corrupt"
INTACT, UNVERIFIED, CORRUPT = "intact", "unverified", "corrupt"
_CHUNK = 16 << 20  # bytes read per hashing call


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being trained."""


class CheckpointCorruptError(RuntimeError):
    """No checkpoint step of a run can be restored (each is named with its reason, on one line)."""


def _key(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _by_key(tree: Any) -> dict[str, Any]:
    """{'a/b/c': leaf} of a tree (None leaves left out)."""
    return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(leaf.shape) for k, leaf in _by_key(tree).items()}


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


RESTART_FROM_SCRATCH_KEY = "restart_from_scratch_if_corrupt"  # the config key the trainer passes on


class Checkpointer:
    """Keeps the last `keep` checkpoints of a run, written every `every` steps (and when forced).

    With `restart_from_scratch_if_corrupt`, `restore_latest_intact` starts over (returns no state)
    when every step is corrupt, instead of raising CheckpointCorruptError."""

    def __init__(self, directory: str, *, keep: int = 3, every: int = 1000, async_save: bool = True,
                 restart_from_scratch_if_corrupt: bool = False):
        # Remote paths (gs://...) go to Orbax as they are; they get no integrity records.
        self.local = "://" not in directory
        self.directory = os.path.abspath(directory) if self.local else directory
        self.every = every
        self.restart_from_scratch_if_corrupt = restart_from_scratch_if_corrupt
        self._keep = keep
        self._unrecorded: list[int] = []  # saved steps whose integrity record is not written yet
        self._recorder: threading.Thread | None = None  # writing records while training goes on
        self._skipped: dict[int, str] = {}  # corrupt steps restore_latest_intact passed over -> reason
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        # Handlers registered up front, so a fresh process can read the metadata of earlier steps.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()})

    def latest_step(self) -> int | None:
        """The newest step on disk, intact or not (`restore_latest_intact` checks)."""
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def check(self, step: int) -> tuple[str, str]:
        """(INTACT | UNVERIFIED | CORRUPT, why) for one step; call after `wait()`."""
        if not self.local:
            return UNVERIFIED, "remote checkpoints carry no eojax checksums"
        return check_step(self.step_dir(step))

    def save(self, step: int, state: Any, data_iter: Any = None, *, force: bool = False) -> bool:
        """Starts writing `step` (asynchronously); False when it is not a checkpoint step, already
        exists, or `state` holds a NaN or inf (logged: a checkpoint must be a good one to go back to)."""
        if not force and (self.every <= 0 or step % self.every):
            return False
        self._manager.wait_until_finished()  # Orbax would wait for the previous write here anyway
        self._record_finished(background=True)
        self._set_aside_skipped()
        if step in self._manager.all_steps():
            return False
        bad = nonfinite_arrays(state)
        if bad:
            logging.warning("not saving checkpoint %s/%d: %d arrays hold NaN or inf (first: %s); the newest "
                            "checkpoint stays the last good one", self.directory, step, len(bad), bad[0])
            return False
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if saved:
            self._unrecorded.append(step)
        return saved

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restores `step` into `abstract_state` (a dataclass of ShapeDtypeStructs carrying their
        shardings); CheckpointCorruptError when its files fail their checks."""
        self.wait()
        status, reason = self.check(step)
        if status == CORRUPT:
            raise CheckpointCorruptError(f"checkpoint {self.step_dir(step)} is corrupt: {reason}")
        return self._restore(step, abstract_state, data_iter)

    def restore_latest_intact(self, abstract_state: Any, data_iter: Any = None) -> tuple[int | None, Any]:
        """(step, state) of the newest step that passes its checks and restores, newest first; one
        warning per skipped step naming it and why; nothing is deleted. (None, None) when there is no
        checkpoint, or none is intact and `restart_from_scratch_if_corrupt` is set; else
        CheckpointCorruptError naming every step and its reason. A checkpoint of another model
        raises CheckpointMismatchError (a user error, not damage)."""
        self.wait()
        skipped: dict[int, str] = {}
        for step in sorted(self._manager.all_steps(), reverse=True):
            status, reason = self.check(step)
            if status != CORRUPT:
                if status == UNVERIFIED:
                    logging.warning("checkpoint %s is unverified (%s); restoring it", self.step_dir(step), reason)
                try:
                    state = self._restore(step, abstract_state, data_iter)
                except CheckpointMismatchError:
                    raise
                except Exception as e:  # any damage Orbax, TensorStore or Grain trips over
                    reason = f"restoring it failed: {_one_line(_root_cause(e))}"
                else:
                    self._skipped = skipped
                    return step, state
            logging.warning("skipping checkpoint %s: %s", self.step_dir(step), reason)
            skipped[step] = reason
        if skipped:
            listed = "; ".join(f"step {s}: {r}" for s, r in skipped.items())
            if not self.restart_from_scratch_if_corrupt:
                raise CheckpointCorruptError(
                    f"no intact checkpoint in {self.directory} ({listed}); nothing was deleted; "
                    f"--config.{RESTART_FROM_SCRATCH_KEY}=True starts the run from scratch")
            logging.warning("no intact checkpoint in %s (%s): starting from scratch (%s)", self.directory, listed,
                            RESTART_FROM_SCRATCH_KEY)
            self._skipped = skipped
        return None, None

    def _restore(self, step: int, abstract_state: Any, data_iter: Any) -> Any:
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

    def _record_finished(self, background: bool = False) -> None:
        """Writes the integrity records of the saved steps, whose writes have finished (call after
        Orbax's wait). In a background thread when asked, overlapping training, unless Orbax's next
        write could rotate the step out while it is read (keep=1)."""
        self._join_recorder()
        steps, self._unrecorded = self._unrecorded, []
        if not steps or not self.local or jax.process_index() != 0:
            return
        if background and (self._keep is None or self._keep > 1):
            self._recorder = threading.Thread(target=self._record, args=(steps,), name="eojax-integrity",
                                              daemon=True)
            self._recorder.start()
        else:
            self._record(steps)

    def _record(self, steps: list[int]) -> None:
        for step in steps:
            if not os.path.isdir(self.step_dir(step)):
                continue  # already rotated out by Orbax
            try:
                record_integrity(self.step_dir(step))
            except OSError as e:  # e.g. a full disk: the step stays restorable, as unverified
                logging.warning("could not record the checksums of %s: %s", self.step_dir(step), _one_line(e))

    def _join_recorder(self) -> None:
        if self._recorder is not None:
            self._recorder.join()
            self._recorder = None

    def _set_aside_skipped(self) -> None:
        """Renames the corrupt steps a restore passed over to `<step>.corrupt`, before the first save:
        left in place they would count towards `keep` (Orbax could rotate out a good step for them),
        and a step that exists is never saved again."""
        if not self._skipped:
            return
        if self.local and jax.process_index() == 0:
            for step in sorted(self._skipped):
                source = self.step_dir(step)
                target, n = source + SET_ASIDE_SUFFIX, 1
                while os.path.exists(target):
                    target, n = f"{source}{SET_ASIDE_SUFFIX}.{n}", n + 1
                if os.path.isdir(source):
                    os.rename(source, target)
                    logging.warning("moved corrupt checkpoint %s aside to %s (%s)", source, target,
                                    self._skipped[step])
        self._skipped = {}
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("eojax_checkpoint_set_aside")
        self._manager.reload()

    def wait(self) -> None:
        """Until pending writes are finalised and their integrity recorded."""
        self._manager.wait_until_finished()
        self._record_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()


# A NaN or inf makes an array's sum non-finite: one vectorised pass, 4x faster than all(isfinite) on
# CPU. A finite array whose sum overflows (values near the float maximum) is told apart exactly after.
_finite_sum = jax.jit(lambda x: jnp.isfinite(jnp.sum(x, dtype=jnp.promote_types(x.dtype, jnp.float32))))
_all_finite = jax.jit(lambda x: jnp.all(jnp.isfinite(x)))


def nonfinite_arrays(tree: Any) -> list[str]:
    """Paths of the floating-point arrays of `tree` holding a NaN or inf: a reduction on device per
    array. One at a time: many sharded reductions in flight at once can starve XLA's CPU collectives
    of threads (a rendezvous timeout abort on simulated devices)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(path, simple=True, separator="/") for path, x in flat
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
            and not bool(_finite_sum(x)) and not bool(_all_finite(x))]


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error of a chain: TensorStore's names the array and file, Orbax's wrapper
    prints the whole TensorStore spec."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        error = inner
        seen.add(id(error))
    return error


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or "no message"
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- integrity records -------------------------------------------------------------------------

def _files(step_dir: str) -> list[str]:
    """A step's files, relative to it, its integrity record (and that record's temporary) excepted."""
    found = []
    for root, _, names in os.walk(step_dir):
        found += [os.path.relpath(os.path.join(root, n), step_dir) for n in names
                  if not n.startswith(INTEGRITY_FILE)]
    return sorted(found)


HASH = "xxh3_64"


def file_hash(path: str) -> tuple[int, str]:
    """(size, XXH3-64 hex digest) of a file. A non-cryptographic hash: it catches accidental damage
    (no attacker here) at ~11 GB/s, against CRC-32's ~3.6 and SHA-256's ~1.5 (bench/README.md)."""
    digest, size = xxhash.xxh3_64(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _checksums(step_dir: str, names: list[str]) -> dict[str, tuple[int, str]]:
    # The hash and file reads release the GIL: files are hashed in parallel.
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: file_hash(os.path.join(step_dir, n)), names)))


def record_integrity(step_dir: str) -> None:
    """Writes `<step_dir>/eojax_integrity.json` (size and hash of every file), atomically."""
    files = {name: {"size": size, HASH: digest}
             for name, (size, digest) in _checksums(step_dir, _files(step_dir)).items()}
    temporary = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
    with open(temporary, "w") as f:
        json.dump({"version": 1, "algorithm": HASH, "files": files}, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(step_dir, INTEGRITY_FILE))
    directory = os.open(step_dir, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def _json_problem(path: str, name: str) -> str | None:
    try:
        with open(path, "rb") as f:
            json.loads(f.read())
    except (OSError, ValueError) as e:
        return f"{name} is not readable JSON ({_one_line(e, 120)})"
    return None


def _structure_problem(step_dir: str) -> str | None:
    """The first thing missing or unreadable in a step's layout (cheap: no array data is read)."""
    if not os.path.isdir(step_dir):
        return "the step folder is missing"
    state = os.path.join(step_dir, "state")
    if not os.path.isdir(state):
        return "state/ is missing"
    if not os.path.isfile(os.path.join(state, "_METADATA")):
        return "state/_METADATA is missing"
    data = os.path.join(step_dir, "data")
    iterator_files = [os.path.join("data", n) for n in sorted(os.listdir(data)) if n.endswith(".json")] \
        if os.path.isdir(data) else []
    for name in ["_CHECKPOINT_METADATA", os.path.join("state", "_METADATA")] + iterator_files:
        path = os.path.join(step_dir, name)
        if os.path.exists(path) and (problem := _json_problem(path, name)):
            return problem
    shards = sorted(n for n in os.listdir(state) if n.startswith("ocdbt.process_"))
    manifests = ["manifest.ocdbt"] * bool(shards) + [os.path.join(s, "manifest.ocdbt") for s in shards]
    for manifest in manifests:
        if not os.path.isfile(os.path.join(state, manifest)):
            return f"state/{manifest} is missing"
    return None


def check_step(step_dir: str) -> tuple[str, str]:
    """(INTACT | UNVERIFIED | CORRUPT, why) for one step folder: its layout, then every recorded
    file's size, then its checksum."""
    problem = _structure_problem(step_dir)
    if problem:
        return CORRUPT, problem
    record_path = os.path.join(step_dir, INTEGRITY_FILE)
    if not os.path.exists(record_path):
        return UNVERIFIED, f"no {INTEGRITY_FILE} (an older eojax, or stopped before recording it)"
    try:
        with open(record_path, "rb") as f:
            recorded = {name: (int(v["size"]), str(v[HASH])) for name, v in json.loads(f.read())["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return CORRUPT, f"{INTEGRITY_FILE} is unreadable ({_one_line(e, 120)})"
    for name, (size, _) in sorted(recorded.items()):
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return CORRUPT, f"{name} is missing"
        if os.path.getsize(path) != size:
            return CORRUPT, f"{name} has {os.path.getsize(path)} bytes, {size} when written"
    sums = _checksums(step_dir, sorted(recorded))
    changed = [name for name in sorted(recorded) if sums[name][1] != recorded[name][1]]
    if changed:
        more = f" (and {len(changed) - 1} more files)" if len(changed) > 1 else ""
        return CORRUPT, f"{changed[0]} does not match its checksum{more}"
    return INTACT, ""


def _steps(folder: str) -> list[int]:
    """The step numbers of a checkpoint folder, newest first (Orbax's unfinished and eojax's
    set-aside folders are not steps)."""
    if not os.path.isdir(folder):
        return []
    return sorted((int(n) for n in os.listdir(folder) if n.isdigit() and os.path.isdir(os.path.join(folder, n))),
                  reverse=True)


def newest_verified_step(directory: str) -> int | None:
    """The newest step of a checkpoint folder whose files match their record: finalised (its record
    is written only after Orbax finalised it) and on disk. Call `Checkpointer.wait()` first so the
    steps written so far are recorded."""
    for step in _steps(directory):
        if check_step(os.path.join(directory, str(step)))[0] == INTACT:
            return step
    return None


@dataclasses.dataclass
class StepReport:
    folder: str  # "checkpoints" or "best"
    step: int
    status: str  # INTACT, UNVERIFIED or CORRUPT
    reason: str


@dataclasses.dataclass
class RunReport:
    """`verify_run`'s answer: one row per step; `str()` is a short table; `exit_code()` the status
    `eojax verify` exits with: 0 all intact, 1 a step is corrupt, 3 some unverified (none corrupt)."""
    workdir: str
    steps: list[StepReport]
    others: list[str]  # set-aside and unfinished folders, for information

    def count(self, status: str) -> int:
        return sum(s.status == status for s in self.steps)

    def exit_code(self) -> int:
        """`eojax verify`'s status: errors.CHECKPOINT when a step is corrupt. Unverified steps (written
        before eojax recorded checksums, or remote) restore as before: 0."""
        return errors.CHECKPOINT if self.count(CORRUPT) else 0

    def __str__(self) -> str:
        width = max([len(f"{s.folder}/{s.step}") for s in self.steps] + [4])
        lines = [f"{'step':<{width}}  {'status':<10}  reason"]
        lines += [f"{f'{s.folder}/{s.step}':<{width}}  {s.status:<10}  {s.reason}".rstrip() for s in self.steps]
        lines += [f"(not a step: {o})" for o in self.others]
        lines.append(f"{self.workdir}: {self.count(INTACT)} intact, {self.count(UNVERIFIED)} unverified, "
                     f"{self.count(CORRUPT)} corrupt")
        return "\n".join(lines)


def verify_run(workdir: str) -> RunReport:
    """Checks every step of `<workdir>/checkpoints` and `<workdir>/best` (or of `workdir` itself when
    it is such a folder), reading every file once; changes nothing."""
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir} is not a folder")
    folders = [n for n in ("checkpoints", "best") if os.path.isdir(os.path.join(workdir, n))]
    roots = [(n, os.path.join(workdir, n)) for n in folders] or [(os.path.basename(workdir), workdir)]
    steps, others = [], []
    for name, root in roots:
        for step in sorted(_steps(root)):
            steps.append(StepReport(name, step, *check_step(os.path.join(root, str(step)))))
        others += [f"{name}/{n}" for n in sorted(os.listdir(root))
                   if not n.isdigit() and os.path.isdir(os.path.join(root, n))]
    if not steps:
        raise FileNotFoundError(f"no eojax checkpoint under {workdir} (no step folders in checkpoints/ or best/)")
    return RunReport(workdir, steps, others)


def is_eojax_checkpoint(path: str) -> bool:
    """A run folder, its checkpoints/ or best/ folder, or one step folder written by eojax."""
    if not os.path.isdir(path):
        return False
    if any(os.path.isdir(os.path.join(path, n)) for n in ("state", "checkpoints", "best")):
        return True
    return any(n.isdigit() and os.path.isdir(os.path.join(path, n, "state")) for n in os.listdir(path))


def step_folder(path: str, best: bool = False) -> str:
    """The step folder `path` names: a run folder (its newest checkpoint that is not corrupt, or with
    `best` its kept best parameters), its checkpoints/ or best/ folder, or a step folder itself.
    Skipped corrupt steps are logged; CheckpointCorruptError when no step is usable."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(os.path.join(path, "state")):
        status, reason = check_step(path)
        if status == CORRUPT:
            raise CheckpointCorruptError(f"checkpoint {path} is corrupt: {reason}")
        return path
    candidates = [os.path.join(path, "best")] if best else [os.path.join(path, "checkpoints")]
    for candidate in candidates + [path]:
        skipped = []
        for step in _steps(candidate):
            status, reason = check_step(os.path.join(candidate, str(step)))
            if status != CORRUPT:
                return os.path.join(candidate, str(step))
            logging.warning("skipping checkpoint %s/%d: %s", candidate, step, reason)
            skipped.append(f"step {step}: {reason}")
        if skipped:
            raise CheckpointCorruptError(f"no intact checkpoint in {candidate} ({'; '.join(skipped)})")
    raise FileNotFoundError(f"no eojax checkpoint {'best/ ' if best else ''}under {path}")


def load_variables(path: str, abstract_params: Any, abstract_model_state: Any = None, *,
                   best: bool = False) -> tuple[Any, Any]:
    """(params, model_state) to evaluate an eojax run with: its EMA when it kept one, else its live
    parameters; the model state (e.g. BatchNorm statistics) likewise. A LoRA run (config.lora) gives its
    base params with its adapters (their EMA when it kept one) merged in: every reader sees the model
    the run trained.

    `path` is as `step_folder` takes it. With abstract trees (ShapeDtypeStructs, optionally carrying
    shardings) only those arrays are read, checked key by key against the checkpoint; with
    `abstract_params=None` the params and model state are read whole to host numpy (for export)."""
    step_dir = step_folder(path, best)
    _, state_dir, saved = _open_state(step_dir)
    ema = isinstance(saved.get("opt_state"), dict) and "ema" in saved["opt_state"]
    lora_run = isinstance(saved.get("lora"), dict) and bool(jax.tree.leaves(saved["lora"]))
    # A LoRA run's optimizer (and its EMA) holds the adapters; the base params are its 'params'.
    params_key = ("opt_state", "ema") if ema and not lora_run else ("params",)
    state_key = "ema_model_state" if ema and saved.get("ema_model_state") else "model_state"
    saved_params = _subtree(saved, params_key)
    if saved_params is None:
        raise CheckpointMismatchError(f"{state_dir} holds no 'params'")
    # A frozen parameter has no average (optim.without_frozen): it is read from the live params.
    averaged = _flat_shapes(saved_params)
    live_keys = set() if params_key == ("params",) else set(_flat_shapes(saved.get("params") or {})) - set(averaged)
    saved_state = saved.get(state_key) or {}
    if abstract_params is None:
        abstract_params = _abstract_from_metadata(saved["params"] if live_keys else saved_params)
        abstract_model_state = _abstract_from_metadata(saved_state)
    abstract_model_state = abstract_model_state or {}
    live_shapes = {k: v for k, v in _flat_shapes(saved.get("params") or {}).items() if k in live_keys}
    raise_mismatch(key_problems({**averaged, **live_shapes}, _flat_shapes(abstract_params)),
                   f"{step_dir} (its params) was written by a different model")
    check_compatible(saved_state, abstract_model_state, f"{step_dir} (its model state)")
    pick = lambda live: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, a: a if (_key(path) in live_keys) == live else None, abstract_params)
    reads = [(params_key, pick(False)), ((state_key,), abstract_model_state)]
    if live_keys:
        reads.append((("params",), pick(True)))
    if lora_run:
        adapters_key = ("opt_state", "ema") if ema else ("lora", "adapters")
        replicated = _replicated_like(abstract_params)
        reads += [(key, _abstract_from_metadata(_subtree(saved, key), replicated))
                  for key in (adapters_key, ("lora", "scale"))]
    # Partial restore: only these subtrees are read (the optimizer state may be large).
    target, args = {}, {}
    for key, tree in reads:
        if not jax.tree.leaves(tree):
            continue
        node_t, node_a = target, args
        for k in key[:-1]:
            node_t, node_a = node_t.setdefault(k, {}), node_a.setdefault(k, {})
        node_t[key[-1]] = tree
        node_a[key[-1]] = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=getattr(a, "sharding", None)), tree)
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=True))
    params = _subtree(restored, params_key)
    if live_keys:
        found = {**_by_key(params), **_by_key(restored["params"])}
        params = jax.tree_util.tree_map_with_path(lambda path, _: found[_key(path)], abstract_params)
    if lora_run:
        merged = lora.merge(params, _subtree(restored, adapters_key), _subtree(restored, ("lora", "scale")))
        params = jax.tree.map(lambda m, a: m if a.sharding is None else jax.device_put(m, a.sharding),
                              merged, abstract_params)
    logging.info("read %s params from %s%s", "EMA" if ema else "live", step_dir,
                 " (base + LoRA adapters, merged)" if lora_run else "")
    return params, restored.get(state_key, {}) if jax.tree.leaves(abstract_model_state) else {}


def _abstract_from_metadata(tree: Any, sharding: Any = None) -> Any:
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)


def _subtree(tree: Any, keys: tuple) -> Any:
    for k in keys:
        tree = tree.get(k) if isinstance(tree, Mapping) else None
    return tree


def _replicated_like(abstract_tree: Any) -> Any:
    """A sharding that replicates over the devices of `abstract_tree`'s shardings (its mesh, or its device)."""
    sharding = next((x.sharding for x in jax.tree.leaves(abstract_tree) if getattr(x, "sharding", None)), None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


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
