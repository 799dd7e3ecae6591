"""Where a raster lives: a local file, or an object GDAL reads over the network.

`s3://bucket/key` -> `/vsis3/bucket/key`, `gs://bucket/key` -> `/vsigs/bucket/key`,
`http(s)://host/path` -> `/vsicurl/http(s)://host/path`; a `/vsi...` path is GDAL's own already.
Remote paths are never checked with os.path (they are not files here): GDAL opens them and reads
only the byte ranges it needs (a COG's header, then the tiles of each window), and a failure is one
line naming the path. Credentials are GDAL's usual settings (AWS_* / GS_* / GOOGLE_APPLICATION_
CREDENTIALS environment variables, or AWS_NO_SIGN_REQUEST=YES for public buckets).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib

_SCHEMES = {"s3://": "/vsis3/", "gs://": "/vsigs/", "http://": "/vsicurl/http://",
            "https://": "/vsicurl/https://"}
# GDAL's network file systems: opening one must not list the "directory" (a request per sidecar
# name GDAL would look for, or an HTML index page that is not a listing at all).
_NETWORK = ("/vsicurl/", "/vsicurl?", "/vsis3/", "/vsigs/", "/vsiaz/", "/vsiadls/", "/vsioss/",
            "/vsiswift/", "/vsiwebhdfs/")


def gdal_path(path) -> str:
    """The path as GDAL wants it: cloud / HTTP URLs become their /vsi... form, the rest unchanged."""
    path = str(path)
    for scheme, prefix in _SCHEMES.items():
        if path.startswith(scheme):
            return prefix + path[len(scheme):]
    return path


def is_remote(path) -> bool:
    """Whether GDAL, not the local file system, resolves `path` (a URL or a /vsi... path)."""
    return gdal_path(path).startswith("/vsi")


def is_network(path) -> bool:
    return gdal_path(path).startswith(_NETWORK)


def exists(path) -> bool:
    """os.path.exists for local paths; True for remote ones, which only GDAL can check (on open)."""
    return is_remote(path) or os.path.exists(path)


def gdal_env(path):
    """The GDAL settings to open `path` with: no directory listing for network paths (a no-op
    context for local ones, whose sidecar .ovr / .msk files GDAL finds by listing)."""
    if not is_network(path):
        return contextlib.nullcontext()
    import rasterio
    return rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR")


def one_line(e: BaseException) -> str:
    """GDAL's message (rasterio's, or its cause's), on one line."""
    text = str(e.__cause__ or e) or type(e).__name__
    return " ".join(text.split())


def fingerprint(path) -> str:
    """What identifies the content at `path` for caches: a local file's absolute path, size and
    modification time (for a directory, e.g. a Zarr store: its files' total size and newest time);
    a remote path itself (its content is not seen without reading it; caches of remote data also
    key on the raster's header)."""
    path = str(path)
    if is_remote(path):
        return path
    p = pathlib.Path(path).resolve()
    if p.is_dir():
        size, mtime = 0, 0
        for f in p.rglob("*"):
            if f.is_file():
                st = f.stat()
                size, mtime = size + st.st_size, max(mtime, st.st_mtime_ns)
    else:
        st = p.stat()
        size, mtime = st.st_size, st.st_mtime_ns
    return f"{p}|{size}|{mtime}"


def cache_dir(kind: str) -> pathlib.Path:
    """eojax's local cache folder for `kind` ('stats', 'grids'): $EOJAX_CACHE/<kind>, default
    ~/.cache/eojax/<kind>; where caches of remote data go (never beside the data)."""
    root = os.environ.get("EOJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "eojax")
    return pathlib.Path(root) / kind


def short_hash(*parts) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:20]
