"""Fetching one file and unpacking one archive, safely: the mechanics of eojax.data.download.

`obtain` downloads into <root>/.partial/<file>, resuming with an HTTP Range request what an earlier
transfer left, checks the size and checksum (`verify`), and moves the file to <root>/.downloads/.
A file that fails is moved aside as .partial/<file>.corrupt. A file with no published checksum gets
the sha256 of its first download recorded beside it (<file>.sha256), and later checks compare to it.

`extract` unpacks a zip or tar member by member; an absolute path, a `..`, a link or a device file
refuses the whole archive (zip: before anything is written; tar, streamed: the caller removes the
folder it was unpacking into).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import os
import pathlib
import re
import stat
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib

from tqdm import tqdm

from eojax.errors import DataError

MIRROR_ENV = "EOJAX_DATA_MIRROR"
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Remote:
    """One file to download: its name under .downloads/ (and on a mirror), URL, checksum and size."""
    file: str
    url: str
    md5: str = ""  # the published checksum (at most one of md5 / sha256); both empty: none is published
    sha256: str = ""
    size: int = 0  # bytes, when published (0: unknown; the server's Content-Length is checked instead)
    archive: bool = False  # a zip / tar to unpack into the dataset folder

    @property
    def checksum(self) -> tuple[str, str] | None:
        return ("sha256", self.sha256) if self.sha256 else ("md5", self.md5) if self.md5 else None


# --- downloading ------------------------------------------------------------------------------------

class _Interrupted(Exception):
    def __init__(self, have: int, total: int | None, reason: str):
        super().__init__(reason)
        self.have, self.total, self.reason = have, total, reason


def _digest(path: pathlib.Path, kind: str) -> str:
    h = hashlib.new(kind)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _range_start(response) -> int | None:
    m = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def _transfer(url: str, partial: pathlib.Path, timeout: float) -> None:
    """Appends the rest of `url` to `partial` (a Range request when it holds bytes already)."""
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "eojax-data-download"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the partial file is whole (verification decides)
            return
        raise DataError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot reach {url}: {reason} (a mirror: {MIRROR_ENV}=URL or --mirror=URL)") from None
    with response:
        length = response.headers.get("Content-Length")
        if have and response.status == 206 and _range_start(response) == have:
            mode, total = "ab", have + int(length) if length else None
        elif response.status == 200:  # the whole file (a server without Range support starts over)
            mode, have, total = "wb", 0, int(length) if length else None
        else:
            raise DataError(f"{url}: the server answered the request for bytes {have}- with HTTP "
                            f"{response.status} {response.headers.get('Content-Range', '')}".rstrip())
        with open(partial, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                            desc=partial.name, disable=None, leave=False) as bar:
            while True:
                try:
                    block = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _Interrupted(have, total, str(e) or type(e).__name__) from None
                if not block:
                    break
                f.write(block)
                have += len(block)
                bar.update(len(block))
    if total is not None and have < total:
        raise _Interrupted(have, total, "the connection closed early")


def _corrupt(path: pathlib.Path, root: pathlib.Path, what: str) -> DataError:
    """Moves a file that failed verification aside as .partial/<file>.corrupt -> the error to raise."""
    aside = root / ".partial" / f"{path.name}.corrupt"
    aside.parent.mkdir(parents=True, exist_ok=True)
    path.replace(aside)
    return DataError(f"{path.name}: {what}; refused and kept aside as {aside}; rerun to download it again")


def verify(remote: Remote, path: pathlib.Path, root: pathlib.Path) -> dict:
    """Size and checksum of a downloaded file against the published ones, else against the sha256
    recorded at its first download (recorded now when there is none) -> what was checked."""
    size = path.stat().st_size
    if remote.size and size != remote.size:
        raise _corrupt(path, root, f"{size} bytes, the published size is {remote.size}")
    published = remote.checksum
    kind, want = published or ("sha256", "")
    record = root / ".downloads" / f"{remote.file}.sha256"
    if not published and record.is_file():
        want = record.read_text().split()[0]
    got = _digest(path, kind)
    if want and got != want:
        source = "published" if published else f"recorded at its first download ({record})"
        raise _corrupt(path, root, f"{kind} {got} does not match the {source} {want}")
    if not want:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{got}  {remote.file}\n")
    return {"file": remote.file, "size": size, kind: got, "checksum": "published" if published else "first download"}


def obtain(remote: Remote, url: str, root: pathlib.Path, *, attempts: int = 3, timeout: float = 60.0) -> tuple:
    """.downloads/<file>, downloaded (resuming .partial/<file>) unless a verified copy is there ->
    (path, what verify checked). An interrupted transfer that made progress is resumed up to
    `attempts` times; one that stays broken leaves .partial/<file> for the next run to resume."""
    done = root / ".downloads" / remote.file
    if done.is_file():
        return done, verify(remote, done, root)
    partial = root / ".partial" / remote.file
    partial.parent.mkdir(parents=True, exist_ok=True)
    print(f"eojax data: downloading {url}", file=sys.stderr)
    for attempt in range(attempts):
        before = partial.stat().st_size if partial.exists() else 0
        try:
            _transfer(url, partial, timeout)
            break
        except _Interrupted as e:
            if attempt + 1 == attempts or e.have <= before:
                of = f" of {e.total}" if e.total else ""
                raise DataError(f"{url}: download interrupted at {e.have}{of} bytes ({e.reason}); {partial} "
                                f"is kept: rerun the same command to resume") from None
    checked = verify(remote, partial, root)
    done.parent.mkdir(parents=True, exist_ok=True)
    partial.replace(done)
    return done, checked


# --- unpacking ---------------------------------------------------------------------------------------

def _safe_member(archive: pathlib.Path, name: str, into: pathlib.Path) -> None:
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in posix.split("/"):
        raise DataError(f"{archive.name}: member {name!r} would be written outside the dataset folder; "
                        "the archive is refused")
    base, target = os.path.realpath(into), os.path.realpath(into / posix)
    if target != base and not target.startswith(base + os.sep):
        raise DataError(f"{archive.name}: member {name!r} resolves outside the dataset folder; the archive is refused")


def extract(archive: pathlib.Path, into: pathlib.Path) -> int:
    """Unpacks a zip or tar (any compression tarfile reads) into `into` -> member count. A member
    that is a link, a device or a path leaving `into` refuses the archive (the caller removes `into`)."""
    if archive.suffix.lower() == ".zip":
        try:
            with zipfile.ZipFile(archive) as zf:
                members = zf.infolist()
                for m in members:  # the central directory lists every member: check them all first
                    _safe_member(archive, m.filename, into)
                    if stat.S_ISLNK(m.external_attr >> 16):
                        raise DataError(f"{archive.name}: member {m.filename!r} is a symbolic link; "
                                        "the archive is refused")
                for m in members:
                    zf.extract(m, into)
                return len(members)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise DataError(f"{archive.name}: not a readable zip archive ({e})") from None
    count = 0
    try:
        with tarfile.open(archive, "r|*") as tf:  # streamed: one pass over a many-GB .tar.gz
            for m in tf:
                _safe_member(archive, m.name, into)
                if not (m.isfile() or m.isdir()):
                    kind = "link" if m.issym() or m.islnk() else "special file"
                    raise DataError(f"{archive.name}: member {m.name!r} is a {kind}; the archive is refused")
                tf.extract(m, into, filter="data")
                count += 1
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{archive.name}: not a readable tar archive ({e})") from None
    return count
