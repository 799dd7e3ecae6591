"""Per-band mean / std over valid pixels, computed by streaming blocks, cached as JSON.

Pixel values are checked on the way: a non-finite value (inf) is refused while computing, the
per-band min / max (kept in the cache) are checked against `valid_range`, and non-finite statistics
are never cached. Every refusal is one RasterError line naming the file and the band.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Sequence

import numpy as np
from rasterio.windows import Window

from eojax.data import remote
from eojax.data.raster import RasterError, Scene

log = logging.getLogger(__name__)

_VERSION = 2  # bump when the statistics' definition changes, to invalidate old caches (2: min / max)

# Default plausible magnitude of float pixels: sqrt(float32 max) ~ 1.8e19, so a pixel's square
# (variances, squared-error losses in float32 on the accelerator) stays finite. No physical
# measurement comes near it; the fill values that do are refused: float32 max (3.4e38), netCDF's
# default fill (9.97e36), CMIP's missing value (1e20). Integer pixels are plausible over their
# dtype's whole range (nodata aside), so they get no default range.
FLOAT_LIMIT = float(np.sqrt(np.finfo(np.float32).max))


@dataclasses.dataclass
class BandStats:
    """Population mean / std (ddof=0) and valid-pixel count per band; min / max and the file each
    was found in (None where the statistics came from elsewhere, e.g. published constants)."""
    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    band_names: Sequence[str]
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    min_file: Sequence[str] | None = None
    max_file: Sequence[str] | None = None

    def to_json(self) -> str:
        d = {"version": _VERSION, "band_names": list(self.band_names),
             "mean": [float(x) for x in self.mean], "std": [float(x) for x in self.std],
             "count": [int(x) for x in self.count]}
        if self.min is not None:
            d.update(min=[float(x) for x in self.min], max=[float(x) for x in self.max],
                     min_file=list(self.min_file), max_file=list(self.max_file))
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "BandStats":
        d = json.loads(text)
        return cls(mean=np.asarray(d["mean"], np.float64), std=np.asarray(d["std"], np.float64),
                   count=np.asarray(d["count"], np.int64), band_names=list(d["band_names"]),
                   min=np.asarray(d["min"], np.float64), max=np.asarray(d["max"], np.float64),
                   min_file=list(d["min_file"]), max_file=list(d["max_file"]))

    def finite(self) -> bool:
        return bool(np.isfinite(self.mean).all() and np.isfinite(self.std).all())


def _refuse_non_finite(scene: Scene, x: np.ndarray, rows: tuple[int, int]):
    """x (C, k) float64 pixels of rows [r0, r1) of `scene` -> RasterError if any is inf."""
    bad = ~np.isfinite(x)
    if bad.any():
        ch = int(np.flatnonzero(bad.any(axis=1))[0])
        raise RasterError(
            f"{scene.band_file(ch)}: band {scene.band_names[ch]!r} holds {x[ch][bad[ch]][0]} in rows "
            f"{rows[0]}..{rows[1] - 1} ({int(bad[ch].sum())} such pixels there); statistics need finite "
            f"values: mark them nodata (input.nodata) or fix the file")


def compute_stats(scenes: Sequence[Scene], block_rows: int = 256) -> BandStats:
    """Exact mean / std, min / max of every band over the valid pixels of all scenes, in the files'
    own values (no float32 rounding). RasterError on an inf pixel or a scene without valid pixels.

    Reads row blocks and merges per-block (count, mean, M2) with Chan et al.'s pairwise formula in
    float64, which stays accurate where a running sum of squares would cancel.
    """
    c = scenes[0].num_channels
    n, mean, m2 = 0, np.zeros(c), np.zeros(c)
    lo, hi = np.full(c, np.inf), np.full(c, -np.inf)
    lo_file, hi_file = [""] * c, [""] * c
    for scene in scenes:
        for r in range(0, scene.height, block_rows):
            h = min(block_rows, scene.height - r)
            raw, valid = scene.read_pixels(Window(0, r, scene.width, h))
            x = raw[:, valid].astype(np.float64)  # (C, k)
            k = x.shape[1]
            if k == 0:
                continue
            if np.issubdtype(raw.dtype, np.floating):
                _refuse_non_finite(scene, x, (r, r + h))
            bmin, bmax = x.min(axis=1), x.max(axis=1)
            for ch in np.flatnonzero(bmin < lo):
                lo[ch], lo_file[ch] = bmin[ch], scene.band_file(ch)
            for ch in np.flatnonzero(bmax > hi):
                hi[ch], hi_file[ch] = bmax[ch], scene.band_file(ch)
            with np.errstate(over="ignore", invalid="ignore"):  # overflow: refused by check_stats
                bmean = x.mean(axis=1)
                bm2 = ((x - bmean[:, None]) ** 2).sum(axis=1)
                delta = bmean - mean
                tot = n + k
                mean = mean + delta * (k / tot)
                m2 = m2 + bm2 + delta ** 2 * (n * k / tot)
            n = tot
    if n == 0:
        raise RasterError(f"{', '.join(s.path for s in scenes)}: no valid pixel (every pixel is nodata/NaN "
                          f"in some band); pass the right `nodata` or drop these files")
    return BandStats(mean=mean, std=np.sqrt(m2 / n), count=np.full(c, n, np.int64),
                     band_names=list(scenes[0].band_names), min=lo, max=hi, min_file=lo_file,
                     max_file=hi_file)


def resolve_valid_range(scenes: Sequence[Scene], valid_range=()) -> tuple[float, float]:
    """`input.valid_range` -> (lo, hi): () or None = the default (±FLOAT_LIMIT where any scene is
    float, unbounded for integer scenes); (lo, hi) with None for an open end."""
    if valid_range is None or (isinstance(valid_range, (tuple, list)) and len(valid_range) == 0):
        if any(np.issubdtype(np.dtype(s.dtype), np.floating) for s in scenes):
            return -FLOAT_LIMIT, FLOAT_LIMIT
        return -np.inf, np.inf
    try:
        lo, hi = valid_range
        lo, hi = -np.inf if lo is None else float(lo), np.inf if hi is None else float(hi)
    except (TypeError, ValueError):
        raise RasterError(f"input.valid_range must be (lo, hi) (None for an open end), "
                          f"got {valid_range!r}") from None
    if not lo < hi:
        raise RasterError(f"input.valid_range {tuple(valid_range)!r}: lo must be below hi")
    return lo, hi


def check_stats(stats: BandStats, scenes: Sequence[Scene], valid_range=()) -> BandStats:
    """RasterError, naming the file and band, if a band's values leave `valid_range` (see
    `resolve_valid_range`) or its statistics are not finite."""
    lo, hi = resolve_valid_range(scenes, valid_range)
    dtypes = sorted({s.dtype for s in scenes})
    for ch, name in enumerate(stats.band_names):
        where = None
        if stats.min is not None and stats.min[ch] < lo:
            where, value = stats.min_file[ch], stats.min[ch]
        elif stats.max is not None and stats.max[ch] > hi:
            where, value = stats.max_file[ch], stats.max[ch]
        if where is not None:
            raise RasterError(
                f"{where}: band {name!r} holds {value:.7g}, outside the plausible range [{lo:.4g}, {hi:.4g}] "
                f"for {'/'.join(dtypes)} (band std {stats.std[ch]:.3g}); mark such pixels nodata "
                f"(input.nodata) or set input.valid_range")
        if not (np.isfinite(stats.mean[ch]) and np.isfinite(stats.std[ch])):
            files = stats.max_file[ch] if stats.max_file else ", ".join(s.path for s in scenes)
            raise RasterError(f"{files}: band {name!r} has non-finite statistics (mean {stats.mean[ch]}, "
                              f"std {stats.std[ch]}); its values overflow float64 arithmetic: narrow "
                              f"input.valid_range or mark such pixels nodata")
    return stats


def stats_key(scenes: Sequence[Scene]) -> str:
    """Hash of what the statistics depend on: files (path, size, mtime), bands and nodata. A remote
    file is known by its URL and the scene's header (its size and time would cost a request each);
    a folder (a Zarr store) by its files' total size and newest time."""
    h = hashlib.sha256(f"eojax-stats-v{_VERSION}".encode())
    for scene in scenes:
        for f in scene.files:
            if remote.is_remote(f):
                h.update(f"{f}|{scene.height}x{scene.width}|{tuple(scene.transform)[:6]}|{scene.crs}|"
                         f"{scene.dtype}\n".encode())
            elif os.path.isdir(f):
                h.update(f"{remote.fingerprint(f)}\n".encode())
            else:
                st = os.stat(f)
                h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        h.update(f"bands={scene.band_names}|nodata={scene.nodata}\n".encode())
        if hasattr(scene, "grid_key"):  # a stack's statistics also depend on its grid and resampling
            h.update(scene.grid_key().encode())
    return h.hexdigest()[:20]


# eojax's own folder: its sample data (eojax.sample_data) gets its statistics cached in the user's cache,
# never written into the installed package.
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]


def _user_cache_dir() -> pathlib.Path:
    return remote.cache_dir("stats")


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


def load_or_compute_stats(scenes: Sequence[Scene], cache_path: str | os.PathLike | None = None,
                          valid_range=()) -> tuple[BandStats, str]:
    """Statistics from the cache if present, else computed and cached -> (stats, cache file),
    checked against `valid_range` (see `check_stats`; a cached file is checked too, so a changed
    range needs no recomputation). Non-finite statistics are never cached, and a cached file holding
    them is ignored (with a warning) and recomputed.

    The cache lives next to the data (`<dir of first file>/.eojax_stats-<hash>.json`), or in
    `$EOJAX_CACHE` / `~/.cache/eojax/stats/<hash>.json` where the data directory is read-only or
    remote.
    """
    key = stats_key(scenes)
    first = scenes[0].files[0]
    if cache_path is not None:
        candidates = [pathlib.Path(cache_path)]
    elif remote.is_remote(first):
        candidates = [_user_cache_dir() / f"{key}.json"]
    else:
        beside = pathlib.Path(first).resolve().parent
        candidates = [] if beside.is_relative_to(_PACKAGE) else [beside / f".eojax_stats-{key}.json"]
        candidates.append(_user_cache_dir() / f"{key}.json")
    for p in candidates:
        if p.is_file():
            try:
                stats = BandStats.from_json(p.read_text())
            except (ValueError, KeyError, TypeError):
                continue  # a damaged cache is recomputed and overwritten
            if not stats.finite():
                log.warning("ignoring %s: its cached statistics are not finite (mean %s, std %s); "
                            "recomputing", p, stats.mean.tolist(), stats.std.tolist())
            elif list(stats.band_names) == list(scenes[0].band_names):
                return check_stats(stats, scenes, valid_range), str(p)
    stats = compute_stats(scenes)
    if not stats.finite():
        check_stats(stats, scenes, valid_range)  # raises, naming the file and band: never cached
    for p in candidates:
        if p.parent.exists() and not _writable(p.parent):
            continue
        try:
            _write_atomic(p, stats.to_json())
        except OSError:
            continue
        # Cached even when out of range: the next run refuses from the cache, without re-reading.
        return check_stats(stats, scenes, valid_range), str(p)
    raise OSError(f"cannot write the statistics cache to any of {[str(p) for p in candidates]}")
