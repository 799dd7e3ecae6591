"""Geographic heads: learn where (coordinates, Koppen-Geiger climate) and when (day of year) a raster
window was taken, from labels made out of the data itself (PhilEO geographical expert; docs/geo.md)."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from eojax.geo import data as geo_data
from eojax.geo import encoding, losses, maps, metrics
from eojax.geo.climate import CLASSES, NUM_CLASSES, ClimateMap, membership
from eojax.geo.labels import WindowLabeler
from eojax.geo.heads import GeoModel
from eojax.tasks.base import DataSpec, Task, apply_model, elements


class GeoTask(Task):
    name = "geo"

    def __init__(self, config):
        super().__init__(config)
        self.sea_threshold = float(config.model.sea_threshold)
        self._model = None

    # The data, read when first asked for (data_spec() asks first, before anything is compiled).
    @functools.cached_property
    def _sources(self):
        return geo_data.open_sources(self.config.input)  # (scenes, their dates)

    @property
    def scenes(self):
        return self._sources[0]

    @functools.cached_property
    def climate_map(self) -> ClimateMap:
        inp = self.config.input
        return ClimateMap(geo_data.resolve(inp.climate, inp.get("data_root", "") or ""))

    @functools.cached_property
    def labeler(self) -> WindowLabeler:
        inp = self.config.input
        return WindowLabeler(self.scenes, self.climate_map, grid=int(inp.label_grid), location=inp.location,
                             dates=self._sources[1])

    @functools.cached_property
    def _label_sample(self) -> dict:
        """Labels of windows drawn as in training (labels only): the baseline's and the centres' data."""
        inp = self.config.input
        return geo_data.label_sample(self.scenes, self.labeler, int(inp.window), int(inp.baseline_windows),
                                     self.config.seed, float(inp.min_valid_fraction))

    @functools.cached_property
    def baseline(self) -> dict:
        """The training-mean predictions every metric is compared with."""
        return geo_data.training_mean(self._label_sample, self.sea_threshold)

    @functools.cached_property
    def centres(self) -> np.ndarray | None:
        """The vMF mixture's centres (coord_loss='vmf'), else None."""
        return self._centres(self._label_sample) if self.config.model.coord_loss == "vmf" else None

    def _centres(self, sample) -> np.ndarray:
        m = self.config.model
        if m.centres == "fibonacci":
            c = losses.fibonacci_centres(int(m.num_centres))
        elif m.centres == "random":
            c = losses.random_centres(int(m.num_centres), self.config.seed)
        elif m.centres == "train":
            land = sample["climate"][:, 0] < self.sea_threshold
            c = losses.dedup_centres(sample["latlon"][land], float(m.centres_min_km), int(m.num_centres) or None)
        else:
            c = losses.load_centres(geo_data.resolve(m.centres, self.config.input.get("data_root", "") or ""))
        return np.asarray(c, np.float32)

    # -- input ----------------------------------------------------------------------------------------
    def _batches(self, split, process_index, process_count):
        return geo_data.labelled_batches(
            self.scenes, self.labeler, self.config.input, split=split,
            batch_size=self.config.batch_size // process_count, process_index=process_index,
            process_count=process_count, seed=self.config.seed)

    def train_input(self, process_index, process_count):
        return self._batches("train", process_index, process_count)

    def eval_input(self, process_index, process_count):
        return self._batches("eval", process_index, process_count)

    def data_fingerprint(self):
        files = [f for s in self.scenes for f in s.files] + [self.climate_map.path]
        return geo_data.fingerprint(files)

    # -- model ----------------------------------------------------------------------------------------
    @property
    def model(self) -> GeoModel:
        if self._model is None:
            m, c = self.config.model, self.scenes[0].num_channels
            heads = dict(coord_loss=m.coord_loss, hidden=int(m.head_hidden), init_kappa=float(m.init_kappa),
                         num_centres=0 if self.centres is None else len(self.centres))
            vit_kw = dict(image_size=int(self.config.input.window), in_channels=c, use_cls_token=False,
                          **dict(m.vit))
            self._model = GeoModel(backbone=m.backbone, cnn=dict(m.cnn), vit=vit_kw, heads=heads,
                                   dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
        return self._model

    def data_spec(self) -> DataSpec:
        """Windows (float32 pixels, validity) with labels made from their georeference: lat/lon and its
        encoding, Koppen-Geiger class fractions, the date encoding and day of year."""
        c, s, f32 = self.scenes[0].num_channels, int(self.config.input.window), np.float32
        arrays = elements(pixels=((c, s, s), f32), valid=((s, s), bool), weight=((), f32), latlon=((2,), f32),
                          coords=((3,), f32), climate=((NUM_CLASSES,), f32), date=((2,), f32), doy=((), np.int32))
        return DataSpec(arrays, {"band_names": list(self.scenes[0].band_names),
                                 "num_centres": 0 if self.centres is None else len(self.centres)})

    def images(self, batch):
        return geo_data.standardize(batch["pixels"], batch["valid"]).astype(jnp.dtype(self.config.model.dtype))

    def init(self, rng, batch):
        return self.model.init({"params": rng}, self.images(batch), train=False)

    # -- loss and evaluation -----------------------------------------------------------------------------
    def _loss(self, out, batch):
        m = self.config.model
        return losses.geographic_loss(
            out, batch, batch["weight"], coord_loss=m.coord_loss, log_kappa=out.get("log_kappa"),
            centres=None if self.centres is None else jnp.asarray(self.centres),
            loss_weights=tuple(m.loss_weights), sea_threshold=self.sea_threshold)

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

    def _metric_sums(self, pred, batch, prefix=""):
        w = batch["weight"]
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

    def eval_fn(self, params, state, batch, rng):
        out, _ = apply_model(self.model, params, state, self.images(batch), train=False)
        loss, parts = self._loss(out, batch)
        w = batch["weight"]
        land = w * (batch["climate"][:, 0] < self.sea_threshold)
        sums = {"count": jnp.sum(w), "land": jnp.sum(land), "dated": jnp.sum(land * (batch["doy"] > 0)),
                "loss_sum": loss * jnp.sum(w)}
        sums.update({f"{k}_sum": v * jnp.sum(w) for k, v in parts.items() if k != "land_fraction"})
        sums.update(self._metric_sums(self.predict(out), batch))
        b = self.baseline
        n = w.shape[0]
        const = {"lat": jnp.full((n,), b["latlon"][0]), "lon": jnp.full((n,), b["latlon"][1]),
                 "doy": jnp.full((n,), b["doy"], jnp.float32),
                 "fine": jnp.full((n,), b["climate_class"]), "coarse": jnp.full((n,), b["coarse_group"])}
        sums.update(self._metric_sums(const, batch, prefix="baseline_"))
        return sums

    def finalize_eval(self, sums):
        count = max(float(sums["count"]), 1e-12)
        out = {k[:-4]: float(v) / count for k, v in sums.items() if k.endswith("_sum") and not
               k.startswith("baseline_") and k != "day_error_sum"}
        out.update(metrics.summarize(sums))
        out.update({f"baseline_{k}": v for k, v in metrics.summarize(sums, "baseline_").items()})
        out["land_windows"] = float(sums["land"])
        return out

    # -- pictures and inference ---------------------------------------------------------------------------
    def predict_and_logits(self, params, state, pixels, valid) -> dict:
        """Point predictions (and the vMF mixture logits) for raw pixels (B, C, H, W) + valid."""
        out, _ = apply_model(self.model, params, state, geo_data.standardize(pixels, valid), train=False)
        res = dict(self.predict(out))
        if self.centres is not None:
            res["vmf"] = out["vmf"]
        return res

    def map_arrays(self, params, state, batch) -> dict:
        """Host numpy predictions for `batch`, with the vMF logits and the (replicated) log_kappa."""
        res = jax.jit(self.predict_and_logits)(params, state, batch["pixels"], batch["valid"])
        res = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(res, tiled=True).items()}
        if self.centres is not None:
            res["log_kappa"] = np.asarray(jax.device_get(params["head"]["log_kappa"]))
        return res

    def log_density_map(self, vmf_logits, log_kappa, step_deg: float = 1.0) -> np.ndarray:
        """(n_lat, n_lon) log density of one window's mixture on the global step_deg grid."""
        lat, lon = maps.lat_lon_grid(step_deg)
        dens = losses.vmf_mixture_log_density(jnp.asarray(vmf_logits)[None], jnp.asarray(log_kappa),
                                              jnp.asarray(self.centres), jnp.asarray(maps.grid_xyz(step_deg)))
        return np.asarray(dens).reshape(len(lat), len(lon))

    def write_pictures(self, params, state, batch, workdir, step):
        """The predicted location density of the first land window of `batch` on a world map."""
        res = self.map_arrays(params, state, batch)
        if jax.process_index() != 0:
            return []
        labels = {k: np.asarray(multihost_utils.process_allgather(batch[k], tiled=True))
                  for k in ("latlon", "climate", "weight")}
        ok = np.flatnonzero((labels["weight"] > 0) & (labels["climate"][:, 0] < self.sea_threshold))
        i = int(ok[0]) if len(ok) else 0
        true = labels["latlon"][i]
        pred = (float(res["lat"][i]), float(res["lon"][i]))
        km = float(metrics.haversine_km(true[0], true[1], pred[0], pred[1]))
        path = os.path.join(workdir, f"geo_map_step{step}.png")
        density = self.log_density_map(res["vmf"][i], res["log_kappa"]) if "vmf" in res else None
        maps.save_world_map(path, density, true,
                            pred_latlon=pred, sea=maps.sea_mask(self.climate_map),
                            title=f"step {step}: true ({true[0]:.2f}, {true[1]:.2f}), predicted "
                                  f"({pred[0]:.2f}, {pred[1]:.2f}), error {km:.0f} km")
        return [path]

    def infer(self, params, state, workdir, options):
        """`eojax infer geo --input=scene.tif`: where and when the model thinks a raster was taken.

        The raster is cut into grid windows (size input.window); every window is predicted; the
        scene's location density is the mean of its land windows' vMF mixtures (as the reference
        pooled patch predictions per tile) and its peak (on a 1-degree grid) the predicted location,
        drawn on the world map with the true location from the raster's own transform and CRS. Bands: the first C of the raster (C = the model's channels), a
        single-band raster repeated. Writes <output>/geo_infer_map.png and geo_infer.json."""
        import json

        from eojax.data.raster import Scene
        from eojax.data.windows import GridWindowSampler

        path = options.get("input") or ""
        if not path:
            raise ValueError("eojax infer geo needs --input=<a georeferenced GeoTIFF>")
        c, size = self.scenes[0].num_channels, int(self.config.input.window)
        with_count = Scene(path)
        if with_count.num_channels < c and with_count.num_channels != 1:
            raise ValueError(f"{path} has {with_count.num_channels} bands; the model takes {c} (or 1, repeated)")
        scene = Scene(path, bands=tuple(range(1, c + 1)) if with_count.num_channels >= c else (1,) * c)
        windows = GridWindowSampler([scene.check()], size, size, float(self.config.input.min_valid_fraction)).windows
        labeler = WindowLabeler([scene], self.climate_map, grid=int(self.config.input.label_grid))
        apply = jax.jit(self.predict_and_logits)
        preds = []
        for start in range(0, len(windows), self.config.batch_size):
            chunk = windows[start:start + self.config.batch_size]
            reads = [scene.read_pixels(w) for _, w in chunk]
            px = np.stack([r[0].astype(np.float32) for r in reads])
            valid = np.stack([r[1] for r in reads])
            preds.append({k: np.asarray(v) for k, v in apply(params, state, px, valid).items()})
        pred = {k: np.concatenate([p[k] for p in preds]) for k in preds[0]}
        true = labeler.label(np.zeros(len(windows), int), [w.row_off for _, w in windows],
                             [w.col_off for _, w in windows], size)
        os.makedirs(options["output"], exist_ok=True)
        # Pool over land windows (sea windows carry no location signal), all windows if none.
        land = pred["fine"] != 0
        pool = land if land.any() else np.ones_like(land)
        density, lat, lon = None, float(np.median(pred["lat"][pool])), float(np.median(pred["lon"][pool]))
        if self.centres is not None:
            # The mean of the windows' mixtures is one mixture with the mean weights.
            weights = jax.nn.softmax(jnp.asarray(pred["vmf"][pool]), axis=-1).mean(axis=0)
            log_kappa = np.asarray(jax.device_get(params["head"]["log_kappa"]))
            density = self.log_density_map(jnp.log(weights), log_kappa)
            g_lat, g_lon = maps.lat_lon_grid(1.0)
            i, j = np.unravel_index(np.argmax(density), density.shape)
            lat, lon = float(g_lat[i]), float(g_lon[j])
        centre = labeler.label([0], [scene.height / 2 - size / 2], [scene.width / 2 - size / 2], size)["latlon"][0]
        km = float(metrics.haversine_km(centre[0], centre[1], lat, lon))
        png = maps.save_world_map(os.path.join(options["output"], "geo_infer_map.png"), density, centre,
                                  pred_latlon=(lat, lon), sea=maps.sea_mask(self.climate_map),
                                  title=f"{os.path.basename(path)}: {len(windows)} windows, error {km:.0f} km")
        summary = {"input": path, "windows": len(windows), "land_windows": int(land.sum()),
                   "true_latlon": [float(centre[0]), float(centre[1])], "predicted_latlon": [lat, lon],
                   "error_km": km,
                   "climate": CLASSES[int(np.bincount(pred["fine"], minlength=NUM_CLASSES).argmax())],
                   "true_climate": CLASSES[int(true["climate"].mean(axis=0).argmax())],
                   "doy_median": float(np.median(pred["doy"])), "true_doy": int(true["doy"][0]), "map": png}
        with open(os.path.join(options["output"], "geo_infer.json"), "w") as f:
            json.dump(dict(summary, per_window=[
                {"row": w.row_off, "col": w.col_off, "lat": float(a), "lon": float(b), "climate": CLASSES[int(k)]}
                for (_, w), a, b, k in zip(windows, pred["lat"], pred["lon"], pred["fine"])]), f, indent=1)
        return summary

