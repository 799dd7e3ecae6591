"""Files that readers (and other processes sharing a cache) only ever see whole."""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def replaced_whole(path: str, suffix: str = ""):
    """Yields a temporary path beside `path`; when the block ends without an error it is renamed to
    `path`, readable by all (a shared cache), else removed: `path` holds the old file or the whole new one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
