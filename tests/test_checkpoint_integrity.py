"""Checkpoint integrity: checksums recorded once a step is finalised, restore falling back past a
damaged newest step (saying which and why, deleting nothing), a one-line refusal when none is intact,
no checkpoint of non-finite parameters, and `verify_run`'s report."""
import json
import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import xxhash

from eojax import checkpoint as ckpt_lib
from eojax import errors
from eojax import train
from helpers import load_config, max_diff

CONFIG = {"total_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 3, "eval_every": 0}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A real runlocal MAE run with checkpoints at steps 2, 3, 4, and a Run to restore into."""
    workdir = tmp_path_factory.mktemp("written")
    config = load_config("mae", "runlocal", **CONFIG)
    train.train_and_evaluate(config, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3", "4"]
    return workdir / "checkpoints", train.setup(config)


def _copy(written, tmp_path):
    source, run = written
    directory = tmp_path / "checkpoints"
    shutil.copytree(source, directory)
    return directory, run


def _contents(step_dir) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(step_dir):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), step_dir)] = f.read()
    return out


def _largest_data_file(step_dir) -> str:
    shards = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    return max((os.path.join(shards, n) for n in os.listdir(shards)), key=os.path.getsize)


def _random_bytes(step_dir):
    path = _largest_data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        old = f.read(64)
        new = bytes(b ^ 0x5A for b in old)  # every byte changed, size kept
        f.seek(os.path.getsize(path) // 2)
        f.write(new)
    return os.path.relpath(path, step_dir), "does not match its checksum"


def _truncate(step_dir):
    path = _largest_data_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)
    return os.path.relpath(path, step_dir), "bytes"


def _delete_manifest(step_dir):
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
    return "state/manifest.ocdbt", "missing"


def _garbage_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "wb") as f:
        f.write(b'{"tree_metadata": \x00\x17garbage')
    return "state/_METADATA", "not readable JSON"


def _garbage_iterator_json(step_dir):
    with open(os.path.join(step_dir, "data", "process_0-of-1.json"), "w") as f:
        f.write("{next_index: oops")
    return "data/process_0-of-1.json", "not readable JSON"


def _delete_state(step_dir):
    shutil.rmtree(os.path.join(step_dir, "state"))
    return "state/", "missing"


DAMAGE = {"random_bytes": _random_bytes, "truncated": _truncate, "deleted_manifest": _delete_manifest,
          "garbage_metadata": _garbage_metadata, "garbage_iterator_json": _garbage_iterator_json,
          "deleted_state": _delete_state}


def test_records_match_an_independent_checksum(written):
    """Every file of every step is recorded with its size and XXH3-64 hash, computed here again."""
    directory, _ = written
    for step in ("2", "3", "4"):
        step_dir = directory / step
        with open(step_dir / ckpt_lib.INTEGRITY_FILE) as f:
            recorded = json.load(f)["files"]
        files = {k: v for k, v in _contents(step_dir).items() if k != ckpt_lib.INTEGRITY_FILE}
        assert sorted(recorded) == sorted(files) and len(files) > 10
        for name, data in files.items():
            assert recorded[name] == {"size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}, name
        assert ckpt_lib.check_step(str(step_dir)) == (ckpt_lib.INTACT, "")


def _restore_with_damage(written, tmp_path, caplog, damage, *, unverified=False):
    directory, run = _copy(written, tmp_path)
    if unverified:  # as a run killed between a write finishing and its record
        for step in ("2", "3", "4"):
            os.remove(directory / step / ckpt_lib.INTEGRITY_FILE)
    earlier = {s: _contents(directory / s) for s in ("2", "3")}
    culprit, why = DAMAGE[damage](str(directory / "4"))
    if unverified and damage == "truncated":  # found by TensorStore when reading: names array and folder
        culprit, why = "restoring it failed", 'Error reading "'
    checkpointer = ckpt_lib.Checkpointer(str(directory), keep=3, every=1)
    with caplog.at_level(logging.WARNING):
        step, state = checkpointer.restore_latest_intact(run.abstract_state, run.train_iter)
    checkpointer.close()
    assert step == 3
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and f"{directory}/4:" in skipped[0], skipped
    assert culprit in skipped[0] and why in skipped[0], skipped[0]
    # The state is step 3's, as Orbax reads it directly, and the iterator is where step 3 left it.
    assert int(state.step) == 3
    assert max_diff(ckpt_lib.host_numpy(state.params), ckpt_lib.read_state(str(directory / "3"))["params"]) == 0
    with open(directory / "3" / "data" / "process_0-of-1.json") as f:
        assert run.train_iter.get_state()["next_index"] == json.load(f)["next_index"]
    # Nothing deleted, the earlier steps untouched.
    assert sorted(os.listdir(directory)) == ["2", "3", "4"]
    assert {s: _contents(directory / s) for s in ("2", "3")} == earlier


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_step_falls_back(written, tmp_path, caplog, damage):
    _restore_with_damage(written, tmp_path, caplog, damage)


@pytest.mark.parametrize("damage", ["truncated", "deleted_manifest", "garbage_iterator_json"])
def test_damaged_unverified_step_falls_back(written, tmp_path, caplog, damage):
    """Without records the layout checks and Orbax's own errors still catch these (random bytes in
    an unrecorded step cannot be told from data: why steps are recorded)."""
    _restore_with_damage(written, tmp_path, caplog, damage, unverified=True)


def test_no_intact_step_is_a_one_line_error(written, tmp_path, caplog):
    directory, run = _copy(written, tmp_path)
    for step, damage in (("2", _delete_state), ("3", _random_bytes), ("4", _garbage_metadata)):
        damage(str(directory / step))
    checkpointer = ckpt_lib.Checkpointer(str(directory), keep=3, every=1)
    with pytest.raises(ckpt_lib.CheckpointCorruptError) as error:
        checkpointer.restore_latest_intact(run.abstract_state, run.train_iter)
    message = str(error.value)
    assert "\n" not in message and str(directory) in message
    for part in ("step 4: state/_METADATA is not readable JSON", "step 3: state/ocdbt.process_0/d/",
                 "step 2: state/ is missing", ckpt_lib.RESTART_FROM_SCRATCH_KEY):
        assert part in message, message
    checkpointer.close()
    assert sorted(os.listdir(directory)) == ["2", "3", "4"]

    # Opted in: a fresh start; the corrupt steps are moved aside (not deleted) at the first save.
    checkpointer = ckpt_lib.Checkpointer(str(directory), keep=3, every=1, restart_from_scratch_if_corrupt=True)
    assert checkpointer.restore_latest_intact(run.abstract_state, run.train_iter) == (None, None)
    assert sorted(os.listdir(directory)) == ["2", "3", "4"]
    assert checkpointer.save(1, run.init_state(), run.train_iter)
    checkpointer.close()
    assert sorted(os.listdir(directory)) == ["1", "2.corrupt", "3.corrupt", "4.corrupt"]
    assert ckpt_lib.check_step(str(directory / "1"))[0] == ckpt_lib.INTACT


def test_resumed_run_sets_corrupt_step_aside_and_saves_it_again(written, tmp_path):
    directory, run = _copy(written, tmp_path)
    _random_bytes(str(directory / "4"))
    damaged = _contents(directory / "4")
    earlier = {s: _contents(directory / s) for s in ("2", "3")}
    checkpointer = ckpt_lib.Checkpointer(str(directory), keep=3, every=1)
    step, state = checkpointer.restore_latest_intact(run.abstract_state, run.train_iter)
    state, _ = run.train_step(state, run.next_batch())
    assert checkpointer.save(4, state, run.train_iter)
    checkpointer.close()
    assert sorted(os.listdir(directory)) == ["2", "3", "4", "4.corrupt"]
    assert _contents(directory / "4.corrupt") == damaged
    assert {s: _contents(directory / s) for s in ("2", "3")} == earlier
    assert ckpt_lib.verify_run(str(directory.parent)).exit_code() == 0


def test_restore_of_a_named_corrupt_step_refuses(written, tmp_path):
    directory, run = _copy(written, tmp_path)
    _truncate(str(directory / "4"))
    checkpointer = ckpt_lib.Checkpointer(str(directory), keep=3, every=1)
    with pytest.raises(ckpt_lib.CheckpointCorruptError, match=r"checkpoints/4 is corrupt: state/ocdbt"):
        checkpointer.restore(4, run.abstract_state, run.train_iter)
    checkpointer.close()
    # Evaluation and export read the newest step that is not corrupt.
    assert ckpt_lib.step_folder(str(directory.parent)) == str(directory / "3")


def _small_state(value=1.0):
    return {"params": {"w": jnp.full((4, 3), value), "b": jnp.zeros(3)},
            "opt_state": {"mu": jnp.ones((4, 3)), "count": jnp.int32(0)}}


@pytest.mark.parametrize("where, value", [("params/w", np.nan), ("params/b", np.inf), ("opt_state/mu", -np.inf)])
def test_nonfinite_state_is_not_saved(tmp_path, caplog, where, value):
    state = _small_state()
    node = state
    *parents, leaf = where.split("/")
    for p in parents:
        node = node[p]
    node[leaf] = node[leaf].at[0, ...].set(value)
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, every=1)
    assert checkpointer.save(1, _small_state())
    with caplog.at_level(logging.WARNING):
        assert not checkpointer.save(2, state)
    checkpointer.close()
    assert sorted(os.listdir(tmp_path)) == ["1"]
    assert any(f"not saving checkpoint {tmp_path}/2" in r.getMessage() and where in r.getMessage()
               for r in caplog.records)
    assert ckpt_lib.newest_verified_step(str(tmp_path)) == 1


def test_newest_verified_step_never_names_a_write_in_progress(tmp_path):
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, every=1)
    assert ckpt_lib.newest_verified_step(str(tmp_path)) is None
    checkpointer.save(1, _small_state())
    checkpointer.wait()
    assert ckpt_lib.newest_verified_step(str(tmp_path)) == 1
    checkpointer.save(2, _small_state(2.0))  # still being written, or written and not yet recorded
    assert ckpt_lib.newest_verified_step(str(tmp_path)) == 1
    checkpointer.wait()
    assert ckpt_lib.newest_verified_step(str(tmp_path)) == 2
    checkpointer.close()


def test_verify_run_report(written, tmp_path):
    directory, _ = _copy(written, tmp_path)
    workdir = str(directory.parent)
    report = ckpt_lib.verify_run(workdir)
    assert [(s.folder, s.step, s.status) for s in report.steps] == [
        ("checkpoints", s, ckpt_lib.INTACT) for s in (2, 3, 4)]
    assert report.exit_code() == 0
    os.remove(directory / "2" / ckpt_lib.INTEGRITY_FILE)
    assert ckpt_lib.verify_run(workdir).exit_code() == 0  # unverified steps restore as before
    culprit, _ = _random_bytes(str(directory / "4"))
    report = ckpt_lib.verify_run(workdir)
    assert [s.status for s in report.steps] == [ckpt_lib.UNVERIFIED, ckpt_lib.INTACT, ckpt_lib.CORRUPT]
    assert report.exit_code() == errors.CHECKPOINT
    table = str(report).splitlines()
    assert len(table) == 5
    assert table[3].startswith("checkpoints/4") and "corrupt" in table[3] and culprit in table[3]
    assert table[-1].endswith("1 intact, 1 unverified, 1 corrupt")
    with pytest.raises(FileNotFoundError, match="no eojax checkpoint"):
        ckpt_lib.verify_run(str(tmp_path / "checkpoints" / "3" / "data"))


def test_next_save_records_the_finished_step_in_the_background(tmp_path):
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=3, every=1)
    assert checkpointer.save(1, _small_state())
    assert checkpointer.save(2, _small_state(2.0))  # step 1 finished: recorded while step 2 is written
    checkpointer._join_recorder()
    assert ckpt_lib.check_step(str(tmp_path / "1")) == (ckpt_lib.INTACT, "")
    checkpointer.close()
    assert [s.status for s in ckpt_lib.verify_run(str(tmp_path)).steps] == [ckpt_lib.INTACT] * 2


def test_nonfinite_arrays_tells_overflowing_sums_from_nan():
    """The fast screen (a sum) overflows for huge finite values: those are not reported."""
    big = jnp.full((1000,), 3e38, jnp.float32)
    half = jnp.full((100_000,), 60_000.0, jnp.float16)
    tree = {"big": big, "half": half, "nan": big.at[3].set(np.nan), "ints": jnp.arange(3)}
    assert ckpt_lib.nonfinite_arrays(tree) == ["nan"]
