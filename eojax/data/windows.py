"""Where to cut square windows out of scenes: regular grids and validity-aware random draws.

Valid fractions are estimated on each scene's validity overview (`Scene.validity_overview`) through
an integral image, so choosing a window never reads full-resolution pixels.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
from rasterio.windows import Window

from eojax.data.raster import RasterError, Scene

log = logging.getLogger(__name__)


def grid_offsets(length: int, size: int, stride: int) -> list[int]:
    """0, stride, 2*stride, ... and a last offset flush with the edge (so every pixel is covered)."""
    if size <= 0 or stride <= 0:
        raise RasterError(f"window size {size} and stride {stride} must be positive")
    if length < size:
        raise RasterError(f"a window of {size} pixels does not fit in a length of {length}")
    offsets = list(range(0, length - size + 1, stride))
    if offsets[-1] != length - size:
        offsets.append(length - size)
    return offsets


def grid_windows(scene: Scene, size: int, stride: int) -> list[Window]:
    """Row-major grid of size x size windows covering `scene`."""
    try:
        rows = grid_offsets(scene.height, size, stride)
        cols = grid_offsets(scene.width, size, stride)
    except RasterError as e:
        raise RasterError(f"{scene.path} ({scene.height}x{scene.width}): {e}") from None
    return [Window(c, r, size, size) for r in rows for c in cols]


class _ValidityIndex:
    """Integral image of a scene's validity overview: valid fraction of any window in O(1)."""

    def __init__(self, scene: Scene):
        mask, (self.rs, self.cs) = scene.check().validity_overview()
        self.oh, self.ow = mask.shape
        self.integral = np.zeros((self.oh + 1, self.ow + 1), np.int64)
        self.integral[1:, 1:] = mask.cumsum(0).cumsum(1)
        # Each overview cell stands for rs x cs full-resolution pixels.
        self.valid_pixels = float(self.integral[-1, -1]) * self.rs * self.cs

    def _cells(self, off, size, scale, n):
        # Overview cells covered by [off, off + size) at full resolution (at least one cell).
        a = np.clip(np.floor(np.asarray(off) / scale + 0.5).astype(np.int64), 0, n - 1)
        b = np.clip(np.floor((np.asarray(off) + size) / scale + 0.5).astype(np.int64), a + 1, n)
        return a, b

    def fraction(self, rows, cols, size: int) -> np.ndarray:
        """Estimated valid fraction of the windows with top-left (rows, cols) (arrays broadcast)."""
        r0, r1 = self._cells(rows, size, self.rs, self.oh)
        c0, c1 = self._cells(cols, size, self.cs, self.ow)
        s = self.integral
        total = s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0]
        return total / ((r1 - r0) * (c1 - c0))

    def fraction_at(self, row: int, col: int, size: int) -> float:
        """`fraction` for one window in plain Python (the per-sample path: no numpy overhead)."""
        r0 = min(max(math.floor(row / self.rs + 0.5), 0), self.oh - 1)
        r1 = min(max(math.floor((row + size) / self.rs + 0.5), r0 + 1), self.oh)
        c0 = min(max(math.floor(col / self.cs + 0.5), 0), self.ow - 1)
        c1 = min(max(math.floor((col + size) / self.cs + 0.5), c0 + 1), self.ow)
        s = self.integral
        total = int(s[r1, c1]) - int(s[r0, c1]) - int(s[r1, c0]) + int(s[r0, c0])
        return total / ((r1 - r0) * (c1 - c0))


def _names(scenes: Sequence[Scene]) -> str:
    return ", ".join(s.path for s in scenes)


class RandomWindowSampler:
    """Random size x size windows, favouring valid data.

    The rule: a scene is chosen with probability proportional to its count of valid pixels
    (from its validity overview); the window's top-left corner is uniform over all positions where the
    window fits; the window is accepted if its valid fraction (estimated on the overview through an
    integral image) is >= `min_valid_fraction`; after `max_tries` rejections the best candidate
    seen is used. Scenes smaller than the window, or without any position meeting the threshold, are
    excluded at construction (with a warning); if none remain, RasterError.
    """

    def __init__(self, scenes: Sequence[Scene], size: int, min_valid_fraction: float = 0.5,
                 max_tries: int = 64):
        self.scenes = list(scenes)
        self.size, self.min_valid_fraction, self.max_tries = int(size), float(min_valid_fraction), max_tries
        self._index = {}
        for i, scene in enumerate(self.scenes):
            if scene.height < size or scene.width < size:
                log.warning("skipping %s: %dx%d is smaller than the %d-pixel window", scene.path,
                            scene.height, scene.width, size)
                continue
            idx = _ValidityIndex(scene)
            if _best_fraction(idx, scene, size) < self.min_valid_fraction:
                log.warning("skipping %s: no %d-pixel window is at least %.0f%% valid", scene.path,
                            size, 100 * self.min_valid_fraction)
                continue
            self._index[i] = idx
        if not self._index:
            raise RasterError(
                f"no scene has a {size}x{size} window with valid fraction >= {self.min_valid_fraction} "
                f"(scenes: {_names(self.scenes)})")
        self.scene_ids = np.array(sorted(self._index))
        weights = np.array([self._index[i].valid_pixels for i in self.scene_ids])
        self.probs = weights / weights.sum()
        self._cum = np.cumsum(self.probs)

    def sample(self, rng: np.random.Generator) -> tuple[int, Window]:
        """One draw -> (scene_index into the `scenes` given, Window)."""
        k = min(int(np.searchsorted(self._cum, rng.random(), side="right")), len(self.scene_ids) - 1)
        i = int(self.scene_ids[k])
        scene, idx, size = self.scenes[i], self._index[i], self.size
        best, best_frac = None, -1.0
        for _ in range(self.max_tries + 1):
            r = int(rng.integers(0, scene.height - size + 1))
            c = int(rng.integers(0, scene.width - size + 1))
            frac = idx.fraction_at(r, c, size)
            if frac >= self.min_valid_fraction:
                return i, Window(c, r, size, size)
            if frac > best_frac:
                best, best_frac = (r, c), frac
        return i, Window(best[1], best[0], size, size)


def _best_fraction(idx: _ValidityIndex, scene: Scene, size: int) -> float:
    # Every top-left position on the overview's resolution (plus the far edges), vectorised.
    rows = np.unique(np.append(np.arange(0, scene.height - size + 1, max(1, math.floor(idx.rs))),
                               scene.height - size))
    cols = np.unique(np.append(np.arange(0, scene.width - size + 1, max(1, math.floor(idx.cs))),
                               scene.width - size))
    return float(idx.fraction(rows[:, None], cols[None, :], size).max())


class GridWindowSampler:
    """Every grid window of every scene whose valid fraction is >= `min_valid_fraction` (and > 0:
    a window without any valid pixel is never useful).

    `windows` is a deterministic list of (scene_index, Window): scenes in order, windows row-major.
    Scenes smaller than the window are skipped with a warning; RasterError if nothing remains.
    """

    def __init__(self, scenes: Sequence[Scene], size: int, stride: int,
                 min_valid_fraction: float = 0.0):
        self.scenes = list(scenes)
        self.windows: list[tuple[int, Window]] = []
        for i, scene in enumerate(self.scenes):
            if scene.height < size or scene.width < size:
                log.warning("skipping %s: %dx%d is smaller than the %d-pixel window", scene.path,
                            scene.height, scene.width, size)
                continue
            wins = grid_windows(scene, size, stride)
            idx = _ValidityIndex(scene)
            frac = idx.fraction(np.array([w.row_off for w in wins]), np.array([w.col_off for w in wins]),
                                size)
            self.windows.extend((i, w) for w, f in zip(wins, frac) if f >= min_valid_fraction and f > 0)
        if not self.windows:
            raise RasterError(
                f"no {size}x{size} grid window (stride {stride}) has valid fraction >= "
                f"{min_valid_fraction} (scenes: {_names(self.scenes)})")

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[int, Window]:
        return self.windows[i]
