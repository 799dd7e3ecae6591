"""Grain pipelines of image windows: random windows for training, grid windows for evaluation.

Index arithmetic does all the work (shards, per-epoch shuffles, padding), so the position of an
iterator is one integer and `get_state()` / `set_state()` restore it exactly.

Index convention (Grain's): element `i` of a MapDataset of length N belongs to epoch i // N.
`random_window_dataset` draws the window of element i from an rng seeded by (seed, i), so epochs
past the first draw fresh windows; `make_iterator` asks for epoch e's elements at e * N + j.
"""
from __future__ import annotations

import math
import os
import sys
import threading
from typing import Any, Callable, Sequence

import grain
import numpy as np
from rasterio.windows import Window

from eojax.data import stac, synthetic
from eojax.data.multiscale import check_scales, read_multiscale, scale_key
from eojax.data.raster import Scene, expand_paths, open_scenes
from eojax.data.stack import StackedScene
from eojax.data.stats import load_or_compute_stats
from eojax.data.windows import GridWindowSampler, RandomWindowSampler, counter_uniforms


class _WindowDataset(grain.MapDataset):
    """Element i: the window `pick(i)` -> (scene index, Window) read from its scene.

    Elements hold the raw pixels, band-first, in one dtype common to all scenes; normalisation and
    the move to channels-last happen on the device (eojax.data.device), where they are nearly free.
    With `scales` other than (1,), the picked window is size * max(scales) pixels at native
    resolution and every scale s gets `pixels[_<s>x]` (size * s) and `valid[_<s>x]`, all float32
    (see eojax.data.multiscale for the averaging rule).
    """

    def __init__(self, scenes: Sequence[Scene], pick: Callable[[int], tuple[int, Window]],
                 length: int, size: int, scales: Sequence[int] = (1,)):
        super().__init__()
        self._scenes, self._pick, self._length = list(scenes), pick, length
        self._size, self._scales = int(size), check_scales(scales)
        if self._scales == (1,):
            self.dtype = np.result_type(*[np.dtype(sc.dtype) for sc in self._scenes])
        else:
            self.dtype = np.dtype(np.float32)  # block means are fractional

    @property
    def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-element shape and dtype of every array key (a batch adds a leading axis)."""
        c, spec = self._scenes[0].num_channels, {}
        for s in self._scales:
            n = self._size * s
            spec[scale_key("pixels", s)] = ((c, n, n), self.dtype)
            spec[scale_key("valid", s)] = ((n, n), np.dtype(bool))
        spec.update(scene=((), np.dtype(np.int32)), row=((), np.dtype(np.int32)),
                    col=((), np.dtype(np.int32)))
        return spec

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"WindowDataset(len={self._length}, size={self._size})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch = self.read_batch([int(index)])
        return {k: v[0] for k, v in batch.items() if k != "weight"}

    def read_batch(self, indices: Sequence[int | None]) -> dict[str, np.ndarray]:
        """Elements `indices` (None = zero padding, weight 0) read straight into one batch."""
        n = len(indices)
        picks = self._pick.batch(indices)
        # np.empty: every real slot is overwritten; padding slots are zeroed below.
        out = {k: np.empty((n, *shape), dtype) for k, (shape, dtype) in self.element_spec.items()}
        out.update(scene=np.zeros(n, np.int32), row=np.zeros(n, np.int32), col=np.zeros(n, np.int32),
                   weight=np.zeros(n, np.float32))
        arrays = [k for k in out if k.startswith(("pixels", "valid"))]
        # Plain scenes in the batch dtype: read every window, then test validity scene by scene
        # over all its windows at once (one vectorised pass instead of one per window).
        batch_valid = self._scales == (1,) and all(
            type(sc) is Scene and np.dtype(sc.dtype) == self.dtype for sc in self._scenes)
        for k, p in enumerate(picks):
            if p is None:
                for key in arrays:
                    out[key][k] = 0
                continue
            i, win = p
            # Each window lands in its batch slot directly: no per-element arrays, no stacking copy.
            if batch_valid:
                self._scenes[i].read_raw(win, out["pixels"][k])
            elif self._scales == (1,):
                _, out["valid"][k] = self._scenes[i].read_pixels(win, out=out["pixels"][k])
            else:
                read_multiscale(self._scenes[i], win, self._scales, out, k)
            out["scene"][k], out["row"][k], out["col"][k] = i, win.row_off, win.col_off
            out["weight"][k] = 1.0
        if batch_valid:
            # Scenes sharing one validity rule (nodata values, float or not) are tested together.
            groups: dict = {}
            for k, p in enumerate(picks):
                if p is not None:
                    groups.setdefault(self._scenes[p[0]].validity_rule, (p[0], []))[1].append(k)
            for i, rows in groups.values():
                if len(rows) == n:  # the whole batch: no gather / scatter copies
                    out["valid"] = self._scenes[i].valid_mask(out["pixels"])
                else:
                    out["valid"][rows] = self._scenes[i].valid_mask(out["pixels"][rows])
        return out


class _RandomPick:
    """Picklable (seed, i) -> window draw, for Grain worker processes. Element i's window depends
    only on (seed, i) (counter-based uniforms), and a batch of them is drawn in one vectorised call."""

    def __init__(self, sampler: RandomWindowSampler, seed: int):
        self.sampler, self.seed = sampler, int(seed)

    def batch(self, indices: Sequence[int | None]) -> list[tuple[int, Window] | None]:
        real = [i for i in indices if i is not None]
        if not real:
            return [None] * len(indices)
        u = counter_uniforms(self.seed, np.asarray(real, np.uint64), self.sampler.draws_per_window)
        size, picks = self.sampler.size, []
        drawn = zip(*(a.tolist() for a in self.sampler.choose(u)))
        for i in indices:
            if i is None:
                picks.append(None)
            else:
                scene, row, col = next(drawn)
                picks.append((scene, Window(col, row, size, size)))
        return picks

    def __call__(self, index: int):
        return self.batch([index])[0]


class _GridPick:
    def __init__(self, sampler: GridWindowSampler):
        self.windows = sampler.windows

    def batch(self, indices: Sequence[int | None]) -> list[tuple[int, Window] | None]:
        return [None if i is None else self(i) for i in indices]

    def __call__(self, index: int):
        return self.windows[index % len(self.windows)]


def random_window_dataset(scenes: Sequence[Scene], *, size: int, num_windows: int, seed: int,
                          min_valid_fraction: float = 0.5,
                          scales: Sequence[int] = (1,)) -> grain.MapDataset:
    """`num_windows` random windows per epoch (see RandomWindowSampler for the rule).

    Element i's window is drawn from uniforms that depend only on (seed, i) (windows.counter_uniforms):
    deterministic, and since
    Grain addresses epoch e's element j as e * num_windows + j, every epoch draws new windows.
    Elements: pixels (C, size, size) in the scenes' common dtype, valid (size, size) bool,
    scene / row / col int32. With `scales`, windows of size * max(scales) native pixels are drawn
    (the validity rule applies to them) and each scale gets its own pixels / valid keys.
    """
    if num_windows <= 0:
        raise ValueError(f"num_windows must be positive, got {num_windows}")
    scales = check_scales(scales)
    sampler = RandomWindowSampler(scenes, size * scales[-1], min_valid_fraction)
    return _WindowDataset(scenes, _RandomPick(sampler, seed), int(num_windows), size, scales)


def grid_window_dataset(scenes: Sequence[Scene], *, size: int, stride: int,
                        min_valid_fraction: float = 0.0,
                        scales: Sequence[int] = (1,)) -> grain.MapDataset:
    """Every grid window (row-major, scene by scene) meeting `min_valid_fraction`. With `scales`,
    the native windows are size * max(scales) pixels at a stride of stride * max(scales)."""
    scales = check_scales(scales)
    sampler = GridWindowSampler(scenes, size * scales[-1], stride * scales[-1], min_valid_fraction)
    return _WindowDataset(scenes, _GridPick(sampler), len(sampler), size, scales)


class _HostBatches(grain.MapDataset):
    """This host's batches: its share of every epoch, shuffled per epoch, padded to equal lengths.

    Epoch e is a permutation of the parent's N indices (seeded by (seed, e)), cut into global batches
    of P * B elements (P hosts, B per host); host p's batch t is block p of global batch t, i.e.
    positions t*P*B + p*B ... t*P*B + p*B + B - 1. So hosts never overlap, together cover the epoch,
    and the global batch (hosts' rows concatenated in process order, as
    jax.make_array_from_process_local_data does) is the same for any number of hosts: a run can be
    resumed on a different host count and see the same data. Every host gets `per_epoch` elements per
    epoch (lockstep multi-host steps): whole global batches only when dropping the remainder, otherwise
    rounded up, the extra slots being zero padding with weight 0.
    """

    def __init__(self, parent: grain.MapDataset, *, batch_size: int, process_index: int,
                 process_count: int, shuffle: bool, seed: int, num_epochs: int | None,
                 per_epoch: int):
        super().__init__(parent)
        self._n, self._b = len(parent), batch_size
        self._p, self._count = process_index, process_count
        self._shuffle, self._seed, self._per_epoch = shuffle, int(seed), per_epoch
        self._length = (sys.maxsize if num_epochs is None else per_epoch * num_epochs) // batch_size
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"HostBatches({self._p}/{self._count}, per_epoch={self._per_epoch}, batch={self._b})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_lock"], state["_perms"] = None, {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng((self._seed, epoch)).permutation(self._n)
                if len(self._perms) >= 2:  # prefetch threads straddle at most one epoch boundary
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
            return perm

    def source_index(self, position: int) -> int | None:
        """Share position -> index into the parent (epoch e's element j is e * N + j), None = pad."""
        epoch, k = divmod(position, self._per_epoch)
        t, r = divmod(k, self._b)
        g = (t * self._count + self._p) * self._b + r
        if g >= self._n:
            return None
        return epoch * self._n + (int(self._perm(epoch)[g]) if self._shuffle else g)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        start = int(index) * self._b
        indices = [self.source_index(j) for j in range(start, start + self._b)]
        if hasattr(self._parent, "read_batch"):  # a dataset that reads many elements at once
            return self._parent.read_batch(indices)
        # Any other MapDataset of dicts: read the elements and stack them.
        els = [None if i is None else self._parent[i] for i in indices]
        ref = next((e for e in els if e is not None), None) or self._parent[0]
        zeros = {k: np.zeros_like(v) for k, v in ref.items()}
        batch = {k: np.stack([(zeros if e is None else e)[k] for e in els]) for k in ref}
        batch["weight"] = np.array([i is not None for i in indices], np.float32)
        return batch


def make_iter_dataset(ds: grain.MapDataset, *, batch_size: int, process_index: int = 0,
                      process_count: int = 1, shuffle: bool = True, seed: int = 0,
                      num_epochs: int | None = None, drop_remainder: bool = True,
                      worker_count: int = 0, prefetch_buffer: int = 2,
                      num_threads: int | None = None) -> grain.IterDataset:
    """The re-iterable form of `make_iterator` (each `iter()` starts from the beginning)."""
    n = len(ds)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    global_batch = batch_size * process_count
    if drop_remainder:
        per_epoch = n // global_batch * batch_size
    else:
        per_epoch = math.ceil(n / global_batch) * batch_size
    if per_epoch == 0:
        raise ValueError(f"{n} elements make no global batch of {batch_size} x {process_count} hosts")
    # Batches are built on the MapDataset, so batch k is a pure function of k: identical whether
    # it is produced by a thread, a worker process or after a restore.
    batches = _HostBatches(ds, batch_size=batch_size, process_index=process_index,
                           process_count=process_count, shuffle=shuffle, seed=seed,
                           num_epochs=num_epochs, per_epoch=per_epoch)
    if num_threads is None:
        # GDAL reads and numpy copies release the GIL, so threads overlap reading with training;
        # up to half the cores (1 on a 2-core laptop: more readers there only fight for the CPU).
        num_threads = max(1, min(4, (os.cpu_count() or 2) // 2))
    it_ds = batches.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads if prefetch_buffer > 0 else 0, prefetch_buffer_size=prefetch_buffer))
    if worker_count > 0:
        from absl import flags  # Grain's workers read absl flags; outside an absl app, use defaults
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=max(1, prefetch_buffer)))
    return it_ds


def make_iterator(ds: grain.MapDataset, *, batch_size: int, process_index: int = 0,
                  process_count: int = 1, shuffle: bool = True, seed: int = 0,
                  num_epochs: int | None = None, drop_remainder: bool = True,
                  worker_count: int = 0, prefetch_buffer: int = 2,
                  num_threads: int | None = None) -> grain.DatasetIterator:
    """Host-local batches of `ds`: a checkpointable Grain iterator.

    Each host reads a disjoint strided share of every epoch (see `_HostBatches`), reshuffled each
    epoch when `shuffle`, repeated `num_epochs` times (None: forever), batched to `batch_size`
    (per host). Every batch has a float32 'weight' (1 real, 0 padding). `get_state()` returns a
    small JSON-able dict; `set_state(state)` resumes with exactly the batch that followed it.
    `worker_count > 0` reads in Grain worker processes; `num_threads` prefetch threads per process.
    """
    return iter(make_iter_dataset(
        ds, batch_size=batch_size, process_index=process_index, process_count=process_count,
        shuffle=shuffle, seed=seed, num_epochs=num_epochs, drop_remainder=drop_remainder,
        worker_count=worker_count, prefetch_buffer=prefetch_buffer, num_threads=num_threads))


def _cfg(cfg, name, default):
    v = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    return default if v is None else v


def _stacked_scene_from_cfg(input_cfg, paths, bands) -> StackedScene:
    """`input.sources` (dicts path / bands / resampling / nodata / names / crs) or every path of
    `input.paths` as one source (each band of a STAC item one source) -> one StackedScene on the
    reference grid."""
    sources = [dict(s) for s in _cfg(input_cfg, "sources", ())]
    if not sources:
        if not paths:
            raise ValueError("input.stack needs input.paths (one source per path) or input.sources")
        for p in expand_paths(paths):
            if stac.is_item(p):  # bands of several resolutions: each warped onto the grid
                sources += [{"path": b.href, "bands": (b.index,), "names": (b.name,)}
                            for b in stac.item_bands(p, bands)]
            else:
                sources.append({"path": p, "bands": bands})
    for key in ("nodata", "crs"):
        value = _cfg(input_cfg, key, None)
        if value is not None:
            for s in sources:
                s.setdefault(key, value)
    return StackedScene(sources, reference=_cfg(input_cfg, "reference", None),
                        resampling=_cfg(input_cfg, "resampling", "bilinear"))


def _scenes_from_cfg(input_cfg) -> list[Scene]:
    paths, bands = _cfg(input_cfg, "paths", ()), _cfg(input_cfg, "bands", ())
    paths = (paths,) if isinstance(paths, str) else tuple(paths)
    bands = (bands,) if isinstance(bands, (str, int)) else tuple(bands)
    stacking = _cfg(input_cfg, "stack", False) or _cfg(input_cfg, "sources", ())
    if stacking:
        if not paths and not _cfg(input_cfg, "sources", ()):
            paths = tuple(synthetic.write_geophysics_grids())  # default GRID-MAE data
        return [_stacked_scene_from_cfg(input_cfg, paths, bands).check()]
    if not paths:
        paths = tuple(synthetic.default_dataset())
        bands = bands or synthetic.SENSORS["sentinel2"].bands
    scenes = open_scenes(paths, bands=bands, nodata=_cfg(input_cfg, "nodata", None),
                         crs=_cfg(input_cfg, "crs", None))
    for s in scenes:
        s.check()  # all-nodata files fail here, before any training starts
    return scenes


def describe_stats(input_cfg) -> dict:
    """JSON-able summary of `config.input`'s scenes and band statistics (`eojax stats`)."""
    scenes = _scenes_from_cfg(input_cfg)
    stats, path = load_or_compute_stats(scenes, valid_range=_cfg(input_cfg, "valid_range", ()))
    return {"scenes": [{"path": s.path, "shape": [s.height, s.width], "crs": str(s.crs),
                        "dtype": s.dtype, "nodata": s.nodata} for s in scenes],
            "bands": {b: {"mean": float(stats.mean[i]), "std": float(stats.std[i]), "count": int(stats.count[i]),
                          "min": float(stats.min[i]), "max": float(stats.max[i])}
                      for i, b in enumerate(stats.band_names)},
            "cache": path}


def make_image_input(input_cfg, *, split: str, batch_size: int, process_index: int = 0,
                     process_count: int = 1, seed: int = 0) -> tuple[Any, dict]:
    """The trainer's entry point: `config.input` -> (batches, info).

    split='train': random windows, reshuffled and redrawn every epoch, endless; returns a
    checkpointable iterator. split='eval': every grid window once, in order, the last batch padded
    (weight 0); returns a re-iterable IterDataset (each `iter()` is a fresh pass).
    Empty `paths` means the synthetic default scenes (Sentinel-2 bands, see synthetic.py).
    Batches carry raw `pixels` (B, C, H, W); `eojax.data.device.to_model_input(pixels, valid,
    info["stats"])` makes the normalised channels-last model input inside the jitted step.

    Keys of `input` beyond the basics: `stack` (True: the paths are the layers of one StackedScene,
    warped onto the grid of `reference`, default the finest; `resampling` one name or one per path)
    or `sources` (list of dicts path / bands / resampling / nodata / names / crs, implies stacking);
    `crs` (the CRS of NetCDF / Zarr grids that have no CF grid mapping); `scales` (default (1,); e.g.
    (1, 2, 4) adds pixels_2x / pixels_4x of real native pixels, see eojax.data.multiscale).
    `valid_range` ((lo, hi), None for an open end; default () = |x| <= stats.FLOAT_LIMIT ~ 1.8e19 for
    float rasters, any value for integer ones): a valid pixel outside it stops the run before
    training, naming the file and band (checked with the statistics, so only with `normalize`).
    info: num_channels, band_names, stats (BandStats or None), scenes, num_windows, dtype, scales,
    source_channels (channel-index tuples, one per stacked source; one tuple of all channels
    otherwise), element_spec (key -> (per-element shape, dtype)).
    """
    info = image_input_info(input_cfg)
    scenes, size, scales = info["scenes"], info["window"], info["scales"]
    min_valid = float(_cfg(input_cfg, "min_valid_fraction", 0.5))
    workers = int(_cfg(input_cfg, "worker_count", 0))
    if split == "train":
        num_windows = int(_cfg(input_cfg, "num_windows", 1024))
        ds = random_window_dataset(scenes, size=size, num_windows=num_windows, seed=seed,
                                   min_valid_fraction=min_valid, scales=scales)
        batches = make_iterator(ds, batch_size=batch_size, process_index=process_index,
                                process_count=process_count, shuffle=True, seed=seed, num_epochs=None,
                                drop_remainder=True, worker_count=workers)
    elif split == "eval":
        stride = int(_cfg(input_cfg, "eval_stride", 0)) or size
        ds = grid_window_dataset(scenes, size=size, stride=stride, min_valid_fraction=min_valid,
                                 scales=scales)
        batches = make_iter_dataset(ds, batch_size=batch_size, process_index=process_index,
                                    process_count=process_count, shuffle=False, num_epochs=1,
                                    drop_remainder=False, worker_count=workers)
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return batches, dict(info, num_windows=len(ds))


def image_input_info(input_cfg) -> dict:
    """What `config.input` gives a model, known before any window is drawn: scenes (opened and
    checked), statistics (computed once, cached), window, scales, band names, channels per stacked
    source, and element_spec (key -> (per-element shape, dtype)) of the windows' arrays."""
    scenes = _scenes_from_cfg(input_cfg)
    stats = (load_or_compute_stats(scenes, valid_range=_cfg(input_cfg, "valid_range", ()))[0]
             if _cfg(input_cfg, "normalize", True) else None)
    size = int(_cfg(input_cfg, "window", 64))
    scales = check_scales(_cfg(input_cfg, "scales", (1,)))
    spec = _WindowDataset(scenes, lambda i: None, 0, size, scales)  # for its dtype and element_spec only
    source_channels = (list(scenes[0].source_channels) if isinstance(scenes[0], StackedScene)
                       else [tuple(range(scenes[0].num_channels))])
    return dict(num_channels=scenes[0].num_channels, band_names=list(scenes[0].band_names), stats=stats,
                scenes=scenes, window=size, dtype=spec.dtype, scales=scales, source_channels=source_channels,
                element_spec=spec.element_spec)
