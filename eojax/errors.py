"""User errors and the command line's exit codes.

A user error is a mistake the person running eojax can fix (a config value, a data file, a workdir, a
checkpoint that does not fit or is damaged): `eojax` prints it as one line, `eojax: error: <message>`,
and exits with the code of its kind, with a traceback only under `--verbose` (or EOJAX_VERBOSE=1).
Anything else is a bug: traceback and exit code 1.

eojax modules may raise the classes below; the exceptions they raised before these existed are mapped
by `exit_code`: NotApplicableError, NonFiniteLossError, WorkdirLockedError, ..., any exception class of
eojax.checkpoint (mismatch, corrupt) or eojax.data (RasterError), and a ValueError, KeyError or
FileNotFoundError raised by a `raise` statement in eojax's own code.
"""
from __future__ import annotations

import errno
import linecache
import os
import re
import traceback

INTERNAL = 1  # a bug: the traceback is printed
USAGE = 2  # command line or config: unknown key, bad value, missing flag
DATA = 3  # input data or files: rasters, statistics, weights, captions
CHECKPOINT = 4  # a checkpoint that is missing, does not fit the model, or is damaged
WORKDIR = 5  # the run folder: not a directory, not writable, no space, in use by another run
DIVERGED = 6  # training stopped on a non-finite loss
PREEMPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM / SIGINT after saving; rerun the same command
INTERRUPTED = 130  # a second Ctrl-C, or one before training started


class EojaxError(Exception):
    """A user error: `eojax` prints its message on one line and exits with `exit_code`."""
    exit_code = INTERNAL


class ConfigError(EojaxError, ValueError):
    exit_code = USAGE


class DataError(EojaxError, ValueError):
    exit_code = DATA


class CheckpointError(EojaxError, ValueError):
    exit_code = CHECKPOINT


class WorkdirError(EojaxError, OSError):
    exit_code = WORKDIR


# Classes defined before this module, by "module.QualName" (matched along the MRO, so subclasses too);
# besides, any exception class of eojax.checkpoint is a checkpoint error and of eojax.data a data error.
_KNOWN = {
    "eojax.tasks.base.NotApplicableError": USAGE,
    "eojax.geo.climate.ClimateError": DATA,
    "eojax.train.WorkdirLockedError": WORKDIR,
    "eojax.train.NonFiniteLossError": DIVERGED,
}
_MODULES = (("eojax.checkpoint", CHECKPOINT), ("eojax.data.", DATA))
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
# A full or read-only disk is the run folder's problem wherever it surfaces.
_WORKDIR_ERRNOS = {errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_PROBLEM = re.compile("|".join(re.escape(os.strerror(n)) for n in sorted(_WORKDIR_ERRNOS)))


def exit_code(e: BaseException) -> int:
    """The exit code for `e`: a user error's kind (USAGE ... WORKDIR, DIVERGED), else INTERNAL."""
    if isinstance(e, EojaxError):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED
    for cls in type(e).__mro__:
        code = _KNOWN.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
        for prefix, code in _MODULES:
            if cls.__module__.startswith(prefix):
                return code
    if isinstance(e, OSError) and e.errno in _WORKDIR_ERRNOS or _DISK_PROBLEM.search(str(e)):
        return WORKDIR  # TensorStore reports a full disk as ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")
    module = _raised_by_eojax(e)
    if module is None:
        return INTERNAL
    if module == "checkpoint":
        return CHECKPOINT
    if module.startswith("data") or isinstance(e, FileNotFoundError):
        return DATA
    return USAGE


def _raised_by_eojax(e: BaseException) -> str | None:
    """The eojax module ('checkpoint', 'data/raster', ...) whose own `raise` statement raised `e` (a
    ValueError, KeyError or FileNotFoundError: eojax's way of reporting bad input), else None. An
    implicit error in eojax code (a failed dict lookup, an unpacking) is a bug, not bad input."""
    if not isinstance(e, (ValueError, KeyError, FileNotFoundError)) or e.__traceback__ is None:
        return None
    frame = traceback.extract_tb(e.__traceback__)[-1]
    path = os.path.abspath(frame.filename)
    if not path.startswith(_PACKAGE):
        return None
    if not linecache.getline(path, frame.lineno).lstrip().startswith("raise"):
        return None
    return os.path.splitext(path[len(_PACKAGE):])[0].replace(os.sep, "/")


def message(e: BaseException, max_lines: int = 8) -> str:
    """`e`'s message on one line: a multi-line message's lines (e.g. a checkpoint's differences, one per
    line) joined with '; ', the first `max_lines` of them (--verbose's traceback has them all)."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]  # str(KeyError) would quote it
    else:
        text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = lines[0] if lines else ""
    for line in lines[1:max_lines]:
        out += (" " if out.endswith(":") else "; ") + line
    if len(lines) > max_lines:
        out += f"; ... ({len(lines) - max_lines} more)"
    return out
