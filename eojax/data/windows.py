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
        # Every kept scene's integral image in one flat array, so a batch of candidate windows from
        # any scenes is scored in one vectorised pass.
        idx = [self._index[i] for i in self.scene_ids]
        self._span = np.array([(self.scenes[i].height - size + 1, self.scenes[i].width - size + 1)
                               for i in self.scene_ids])
        self._scale = np.array([(x.rs, x.cs) for x in idx])
        self._cells = np.array([(x.oh, x.ow) for x in idx])
        self._flat = np.concatenate([x.integral.ravel() for x in idx])
        self._base = np.cumsum([0] + [x.integral.size for x in idx])[:-1]

    @property
    def draws_per_window(self) -> int:
        """Uniform numbers one window consumes: the scene, then (row, col) for each of the tries."""
        return 1 + 2 * (self.max_tries + 1)

    def sample(self, rng: np.random.Generator) -> tuple[int, Window]:
        """One draw -> (scene_index into the `scenes` given, Window)."""
        (i,), (r,), (c,) = self.choose(rng.random((1, self.draws_per_window)))
        return int(i), Window(int(c), int(r), self.size, self.size)

    def choose(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rule applied to uniforms u (n, draws_per_window) in [0, 1), vectorised over windows
        and tries -> (scene indices, rows, cols), each (n,)."""
        k = np.minimum(np.searchsorted(self._cum, u[:, 0], side="right"), len(self.scene_ids) - 1)
        span = self._span[k]
        rows = (u[:, 1::2] * span[:, :1]).astype(np.int64)  # (n, tries): uniform top-left corners
        cols = (u[:, 2::2] * span[:, 1:]).astype(np.int64)
        # Most windows pass within a few tries: score those first, the rest only where none passed.
        first = min(4, rows.shape[1])
        frac = np.full(rows.shape, -1.0)
        frac[:, :first] = self._fraction(k[:, None], rows[:, :first], cols[:, :first])
        todo = np.flatnonzero(~(frac[:, :first] >= self.min_valid_fraction).any(axis=1))
        if len(todo) and first < rows.shape[1]:
            frac[todo, first:] = self._fraction(k[todo, None], rows[todo, first:], cols[todo, first:])
        ok = frac >= self.min_valid_fraction
        # The first acceptable try, else the best one seen (the first of equals).
        pick = np.where(ok.any(axis=1), ok.argmax(axis=1), frac.argmax(axis=1))
        n = np.arange(len(u))
        return self.scene_ids[k], rows[n, pick], cols[n, pick]


    def _fraction(self, k, rows, cols) -> np.ndarray:
        """_ValidityIndex.fraction for windows of kept scene k (arrays broadcast), all scenes at once."""
        (rs, cs), (oh, ow) = np.moveaxis(self._scale[k], -1, 0), np.moveaxis(self._cells[k], -1, 0)
        r0 = np.clip(np.floor(rows / rs + 0.5).astype(np.int64), 0, oh - 1)
        r1 = np.clip(np.floor((rows + self.size) / rs + 0.5).astype(np.int64), r0 + 1, oh)
        c0 = np.clip(np.floor(cols / cs + 0.5).astype(np.int64), 0, ow - 1)
        c1 = np.clip(np.floor((cols + self.size) / cs + 0.5).astype(np.int64), c0 + 1, ow)
        at = lambda r, c: self._flat[self._base[k] + r * (ow + 1) + c]
        return (at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)) / ((r1 - r0) * (c1 - c0))


def counter_uniforms(seed: int, index: np.ndarray, n: int) -> np.ndarray:
    """(len(index), n) uniforms in [0, 1) that depend only on (seed, index, j): a counter-based
    generator (SplitMix64's mixer on seed, index and position), so element i's draws are the same
    whichever batch, thread or process computes them, for ~1/20 of the cost of a numpy Generator per
    element."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
             + np.asarray(index, np.uint64)[:, None] * np.uint64(0xD1B54A32D192ED03)
             + np.arange(n, dtype=np.uint64)[None, :] * np.uint64(0x8CB92BA72F3D8DD7))
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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
