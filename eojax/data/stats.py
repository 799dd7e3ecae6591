"""Per-band mean / std over valid pixels, computed by streaming blocks, cached as JSON."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np
from rasterio.windows import Window

from eojax.data.raster import Scene

_VERSION = 1  # bump when the statistics' definition changes, to invalidate old caches


@dataclasses.dataclass
class BandStats:
    """Population mean / std (ddof=0) and valid-pixel count per band."""
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    band_names: Sequence[str]

    def to_json(self) -> str:
        return json.dumps({"version": _VERSION, "band_names": list(self.band_names),
                           "mean": [float(x) for x in self.mean], "std": [float(x) for x in self.std],
                           "count": [int(x) for x in self.count]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "BandStats":
        d = json.loads(text)
        return cls(mean=np.asarray(d["mean"], np.float64), std=np.asarray(d["std"], np.float64),
                   count=np.asarray(d["count"], np.int64), band_names=list(d["band_names"]))


def compute_stats(scenes: Sequence[Scene], block_rows: int = 256) -> BandStats:
    """Exact mean / std of every band over the valid pixels of all scenes.

    Reads row blocks and merges per-block (count, mean, M2) with Chan et al.'s pairwise formula in
    float64, which stays accurate where a running sum of squares would cancel.
    """
    c = scenes[0].num_channels
    n, mean, m2 = 0, np.zeros(c), np.zeros(c)
    for scene in scenes:
        for r in range(0, scene.height, block_rows):
            h = min(block_rows, scene.height - r)
            image, valid = scene.read(Window(0, r, scene.width, h))
            x = image[valid].astype(np.float64)  # (k, C)
            k = x.shape[0]
            if k == 0:
                continue
            bmean = x.mean(axis=0)
            bm2 = ((x - bmean) ** 2).sum(axis=0)
            delta = bmean - mean
            tot = n + k
            mean = mean + delta * (k / tot)
            m2 = m2 + bm2 + delta ** 2 * (n * k / tot)
            n = tot
    if n == 0:
        raise ValueError(f"no valid pixel in {[s.path for s in scenes]}")
    return BandStats(mean=mean, std=np.sqrt(m2 / n), count=np.full(c, n, np.int64),
                     band_names=list(scenes[0].band_names))


def stats_key(scenes: Sequence[Scene]) -> str:
    """Hash of what the statistics depend on: files (path, size, mtime), bands and nodata."""
    h = hashlib.sha256(f"eojax-stats-v{_VERSION}".encode())
    for scene in scenes:
        for f in scene.files:
            st = os.stat(f)
            h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(f"bands={scene.band_names}|nodata={scene.nodata}\n".encode())
        if hasattr(scene, "grid_key"):  # a stack's statistics also depend on its grid and resampling
            h.update(scene.grid_key().encode())
    return h.hexdigest()[:20]


def _user_cache_dir() -> pathlib.Path:
    root = os.environ.get("EOJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "eojax")
    return pathlib.Path(root) / "stats"


def _writable(directory: pathlib.Path) -> bool:
    """Writable and not marked read-only: root may write anywhere, but a folder whose mode has no
    write bit (shared, archived data) is treated as read-only for everyone."""
    return os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)


def _write_atomic(path: pathlib.Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache must be readable by all
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half
    except BaseException:
        os.unlink(tmp)
        raise


def load_or_compute_stats(scenes: Sequence[Scene],
                          cache_path: str | os.PathLike | None = None) -> tuple[BandStats, str]:
    """Statistics from the cache if present, else computed and cached -> (stats, cache file).

    The cache lives next to the data (`<dir of first file>/.eojax_stats-<hash>.json`), or in
    `$EOJAX_CACHE` / `~/.cache/eojax/stats/<hash>.json` where the data directory is read-only.
    """
    key = stats_key(scenes)
    if cache_path is not None:
        candidates = [pathlib.Path(cache_path)]
    else:
        candidates = [pathlib.Path(scenes[0].files[0]).resolve().parent / f".eojax_stats-{key}.json",
                      _user_cache_dir() / f"{key}.json"]
    for p in candidates:
        if p.is_file():
            try:
                stats = BandStats.from_json(p.read_text())
                if list(stats.band_names) == list(scenes[0].band_names):
                    return stats, str(p)
            except (ValueError, KeyError):
                pass  # a damaged cache is recomputed and overwritten
    stats = compute_stats(scenes)
    for p in candidates:
        if p.parent.exists() and not _writable(p.parent):
            continue
        try:
            _write_atomic(p, stats.to_json())
            return stats, str(p)
        except OSError:
            continue
    raise OSError(f"cannot write the statistics cache to any of {[str(p) for p in candidates]}")
