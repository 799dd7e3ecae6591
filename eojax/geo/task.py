"""Geographic heads: learn where (coordinates, Koppen-Geiger climate) and when (day of year) a raster
window was taken, from labels made out of the data itself (PhilEO geographical expert; docs/geo.md)."""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from eojax.geo import data as geo_data
from eojax.geo import encoding, losses, maps, metrics
from eojax.geo.climate import NUM_CLASSES, ClimateMap, membership, packaged_raster
from eojax.geo.labels import WindowLabeler
from eojax.geo.heads import GeoModel
from eojax.tasks.base import DataSpec, Input, Task, apply_model, elements


class GeoInput(Input):
    """The georeferenced rasters and the climate raster; windows labelled per batch. Everything is
    read when first asked for (build_spec asks first, before anything is compiled).

    Scenes held out by input.eval_scenes / eval_fraction never reach training, the baseline or the
    centres; the eval split reads their grid windows, then the training scenes' (flagged held_out)."""

    @functools.cached_property
    def _sources(self):
        return geo_data.open_sources(self.config.input)  # (scenes, their dates)

    @property
    def scenes(self):
        """Every source's scene (held-out ones included), in input.sources order."""
        return self._sources[0]

    @functools.cached_property
    def held_out(self) -> list[int]:
        return geo_data.held_out_scenes(self.config.input)

    @property
    def train_scenes(self) -> list[int]:
        """Indices of the scenes training sees (all but the held-out ones)."""
        return [i for i in range(len(self.scenes)) if i not in self.held_out]

    def _check_trainable(self):
        if not self.train_scenes:
            raise ValueError(f"input.eval_scenes / eval_fraction hold out all {len(self.held_out)} sources: "
                             "nothing is left to train on (such a config can only evaluate a trained run)")

    @functools.cached_property
    def climate_map(self) -> ClimateMap:
        inp = self.config.input
        if not inp.climate:  # eojax's own copy of the 0.5-degree Rubel et al. (2017) raster
            return ClimateMap(packaged_raster())
        return ClimateMap(geo_data.resolve(inp.climate, inp.get("data_root", "") or ""))

    @functools.cached_property
    def labeler(self) -> WindowLabeler:
        inp = self.config.input
        return WindowLabeler(self.scenes, self.climate_map, grid=int(inp.label_grid), location=inp.location,
                             dates=self._sources[1])

    @functools.cached_property
    def label_sample(self) -> dict:
        """Labels of windows drawn as in training (labels only): the baseline's and the centres' data."""
        inp = self.config.input
        self._check_trainable()
        return geo_data.label_sample(self.scenes, self.labeler, int(inp.window), int(inp.baseline_windows),
                                     self.config.seed, float(inp.min_valid_fraction), self.train_scenes)

    def centres(self) -> np.ndarray | None:
        """The vMF mixture's centres (coord_loss='vmf'), else None."""
        m = self.config.model
        if m.coord_loss != "vmf":
            return None
        if m.centres == "fibonacci":
            c = losses.fibonacci_centres(int(m.num_centres))
        elif m.centres == "random":
            c = losses.random_centres(int(m.num_centres), self.config.seed)
        elif m.centres == "train":
            sample = self.label_sample
            land = sample["climate"][:, 0] < losses.sea_threshold(m)
            c = losses.dedup_centres(sample["latlon"][land], float(m.centres_min_km), int(m.num_centres) or None)
        else:
            c = losses.load_centres(geo_data.resolve(m.centres, self.config.input.get("data_root", "") or ""))
        return np.asarray(c, np.float32)

    def build_spec(self) -> DataSpec:
        """Windows (float32 pixels, validity) with labels made from their georeference: lat/lon and its
        encoding, Koppen-Geiger class fractions, the date encoding and day of year, whether the window's
        scene is held out. Info: the band names, the vMF centres (float32 values, exact through JSON)
        and the training-mean baseline, both of the training scenes only."""
        c, s, f32 = self.scenes[0].num_channels, int(self.config.input.window), np.float32
        arrays = elements(pixels=((c, s, s), f32), valid=((s, s), bool), weight=((), f32), latlon=((2,), f32),
                          coords=((3,), f32), climate=((NUM_CLASSES,), f32), date=((2,), f32), doy=((), np.int32),
                          held_out=((), bool))
        centres = self.centres()
        baseline = geo_data.training_mean(self.label_sample, losses.sea_threshold(self.config.model))
        return DataSpec(arrays, {
            "band_names": list(self.scenes[0].band_names),
            "centres": None if centres is None else centres.tolist(),
            "num_centres": 0 if centres is None else len(centres),
            "baseline": {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in baseline.items()}})

    def _batches(self, split, scene_ids, process_index, process_count):
        return geo_data.labelled_batches(
            self.scenes, self.labeler, self.config.input, split=split,
            batch_size=self.config.batch_size // process_count, process_index=process_index,
            process_count=process_count, seed=self.config.seed, scene_ids=scene_ids, held_out=self.held_out)

    def train(self, process_index, process_count):
        self._check_trainable()
        return self._batches("train", self.train_scenes, process_index, process_count)

    def eval(self, process_index, process_count):
        """Grid windows of the held-out scenes, then of the training scenes."""
        return self._batches("eval", self.held_out + self.train_scenes, process_index, process_count)

    def fingerprint(self):
        files = [f for s in self.scenes for f in s.files] + [self.climate_map.path]
        paths = [src["path"] for src in geo_data.sources(self.config.input)]
        return dict(geo_data.fingerprint(files), held_out_scenes=[paths[i] for i in self.held_out])


class GeoTask(Task):
    name = "geo"
    input_class = GeoInput
    plugins = {"pictures": "eojax.geo.pictures:write_pictures", "infer": "eojax.geo.infer:infer"}

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.loss_mode = config.model.get("loss_mode", "exact")
        self.sea_threshold = losses.sea_threshold(config.model)
        # The mixture's centres and the training-mean baseline, as the input stated them.
        info = spec.info
        self.centres = None if info.get("centres") is None else np.asarray(info["centres"], np.float32)
        self.baseline = dict(info["baseline"])

    @classmethod
    def check_config(cls, config):
        m = config.model
        if m.coord_loss not in ("vmf", "mse"):
            raise ValueError(f"model.coord_loss must be 'vmf' or 'mse', got {m.coord_loss!r}")
        if m.backbone not in ("cnn", "vit"):
            raise ValueError(f"model.backbone must be 'cnn' or 'vit', got {m.backbone!r}")
        if m.get("loss_mode", "exact") not in losses.LOSS_MODES:
            raise ValueError(f"model.loss_mode must be one of {losses.LOSS_MODES}, got {m.loss_mode!r}")
        if not 0 < losses.sea_threshold(m) <= 1:
            raise ValueError(f"model.sea_threshold must be in (0, 1], got {m.sea_threshold}")
        geo_data.held_out_scenes(config.input)  # a bad eval_scenes / eval_fraction, before any data is read

    @property
    def channels(self) -> int:
        return self.spec.elements["pixels"][0][0]

    # -- model ----------------------------------------------------------------------------------------
    @functools.cached_property
    def model(self) -> GeoModel:
        m = self.config.model
        heads = dict(coord_loss=m.coord_loss, hidden=int(m.head_hidden), init_kappa=float(m.init_kappa),
                     num_centres=0 if self.centres is None else len(self.centres))
        vit_kw = dict(image_size=int(self.config.input.window), in_channels=self.channels, use_cls_token=False,
                      **dict(m.vit))
        return GeoModel(backbone=m.backbone, cnn=dict(m.cnn), vit=vit_kw, heads=heads,
                        dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))

    def images(self, batch):
        return geo_data.standardize(batch["pixels"], batch["valid"]).astype(jnp.dtype(self.config.model.dtype))

    def init(self, rng, batch):
        return self.model.init({"params": rng}, self.images(batch), train=False)

    # -- loss and evaluation -----------------------------------------------------------------------------
    def _loss(self, out, batch, weight=None):
        m = self.config.model
        return losses.geographic_loss(
            out, batch, batch["weight"] if weight is None else weight, coord_loss=m.coord_loss,
            log_kappa=out.get("log_kappa"), centres=None if self.centres is None else jnp.asarray(self.centres),
            loss_weights=tuple(m.loss_weights), sea_threshold=self.sea_threshold, mode=self.loss_mode)

    def loss_fn(self, params, state, batch, rng, train):
        out, state = apply_model(self.model, params, state, self.images(batch), train=train)
        return (*self._loss(out, batch), state)

    def predict(self, out) -> dict:
        """Model outputs -> point predictions: lat/lon (degrees), day of year, fine / coarse class."""
        if self.config.model.coord_loss == "vmf":
            xyz = losses.mixture_mode_xyz(out["vmf"], out["log_kappa"], jnp.asarray(self.centres))
            lat, lon = encoding.xyz_to_latlon(xyz)
        else:
            lat, lon = encoding.decode_coords(out["coords"])
        coarse = losses.coarse_log_probs(out["climate"])
        return {"lat": lat, "lon": lon, "doy": encoding.decode_doy(out["date"]),
                "fine": jnp.argmax(out["climate"], -1), "coarse": jnp.argmax(coarse, -1)}

    def _metric_sums(self, pred, batch, w, prefix=""):
        land = w * (batch["climate"][:, 0] < self.sea_threshold)
        dated = land * (batch["doy"] > 0)
        true_fine = jnp.argmax(batch["climate"], -1)
        true_coarse = jnp.argmax(batch["climate"] @ jnp.asarray(membership()), -1)
        km = metrics.haversine_km(pred["lat"], pred["lon"], batch["latlon"][:, 0], batch["latlon"][:, 1])
        days = encoding.circular_doy_error(pred["doy"], batch["doy"].astype(jnp.float32))
        return {prefix + "fine_correct": jnp.sum(w * (pred["fine"] == true_fine)),
                prefix + "coarse_correct": jnp.sum(w * (pred["coarse"] == true_coarse)),
                prefix + "km_hist": metrics.histogram(km, land, metrics.KM_EDGES),
                prefix + "day_error_sum": jnp.sum(dated * days),
                prefix + "day_hist": metrics.histogram(days, dated, metrics.DAY_EDGES)}

    def _group_sums(self, out, pred, const, batch, w, group):
        """Eval sums of the rows weighted by w (one group: held-out or training scenes), keys `group`+name."""
        loss, parts = self._loss(out, batch, w)
        land = w * (batch["climate"][:, 0] < self.sea_threshold)
        sums = {"count": jnp.sum(w), "land": jnp.sum(land), "dated": jnp.sum(land * (batch["doy"] > 0)),
                "loss_sum": loss * jnp.sum(w)}
        sums.update({f"{k}_sum": v * jnp.sum(w) for k, v in parts.items() if k != "land_fraction"})
        sums.update(self._metric_sums(pred, batch, w))
        sums.update(self._metric_sums(const, batch, w, prefix="baseline_"))
        return {group + k: v for k, v in sums.items()}

    def eval_fn(self, params, state, batch, rng):
        """Sums for the windows of held-out scenes ('held:') and of training scenes ('in:'); every window
        is a training scene's when the batch has no held_out flag (a run saved before the split)."""
        out, _ = apply_model(self.model, params, state, self.images(batch), train=False)
        pred = self.predict(out)
        b = self.baseline
        w = batch["weight"]
        n = w.shape[0]
        const = {"lat": jnp.full((n,), b["latlon"][0], jnp.float32),
                 "lon": jnp.full((n,), b["latlon"][1], jnp.float32), "doy": jnp.full((n,), b["doy"], jnp.float32),
                 "fine": jnp.full((n,), b["climate_class"]), "coarse": jnp.full((n,), b["coarse_group"])}
        held = batch["held_out"].astype(w.dtype) if "held_out" in batch else jnp.zeros_like(w)
        return {**self._group_sums(out, pred, const, batch, w * held, "held:"),
                **self._group_sums(out, pred, const, batch, w * (1 - held), "in:")}

    @staticmethod
    def _summary(sums):
        count = max(float(sums["count"]), 1e-12)
        out = {k[:-4]: float(v) / count for k, v in sums.items() if k.endswith("_sum") and not
               k.startswith("baseline_") and k != "day_error_sum"}
        out.update(metrics.summarize(sums))
        out.update({f"baseline_{k}": v for k, v in metrics.summarize(sums, "baseline_").items()})
        out["land_windows"] = float(sums["land"])
        return out

    def finalize_eval(self, sums):
        """With held-out scenes: their metrics unprefixed and the training scenes' as insample_*; without:
        the training scenes' unprefixed."""
        groups = {g: {k[len(g):]: v for k, v in sums.items() if k.startswith(g)} for g in ("held:", "in:")}
        if float(groups["held:"]["count"]) == 0:
            return self._summary(groups["in:"])
        out = self._summary(groups["held:"])
        if float(groups["in:"]["count"]) > 0:
            out.update({f"insample_{k}": v for k, v in self._summary(groups["in:"]).items()})
        return out

    # -- for the pictures and inference plug-ins ----------------------------------------------------------
    def predict_and_logits(self, params, state, pixels, valid) -> dict:
        """Point predictions (and the vMF mixture logits) for raw pixels (B, C, H, W) + valid."""
        out, _ = apply_model(self.model, params, state, geo_data.standardize(pixels, valid), train=False)
        res = dict(self.predict(out))
        if self.centres is not None:
            res["vmf"] = out["vmf"]
        return res

    def log_density_map(self, vmf_logits, log_kappa, step_deg: float = 1.0) -> np.ndarray:
        """(n_lat, n_lon) log density of one window's mixture on the global step_deg grid."""
        lat, lon = maps.lat_lon_grid(step_deg)
        dens = losses.vmf_mixture_log_density(jnp.asarray(vmf_logits)[None], jnp.asarray(log_kappa),
                                              jnp.asarray(self.centres), jnp.asarray(maps.grid_xyz(step_deg)))
        return np.asarray(dens).reshape(len(lat), len(lon))
