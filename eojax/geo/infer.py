"""The geographic family's infer plug-in: `eojax infer geo --input=scene.tif`, where and when the
model thinks a raster was taken. Needs the checkpoint, its saved DataSpec and the climate raster
(for the true labels and the sea mask), not the training rasters."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from eojax.data.raster import Scene
from eojax.data.windows import GridWindowSampler
from eojax.geo import maps, metrics
from eojax.geo.climate import CLASSES, NUM_CLASSES
from eojax.geo.labels import WindowLabeler


def infer(run, variables, workdir, options) -> dict:
    """The raster is cut into grid windows (size input.window); every window is predicted; the
    scene's location density is the mean of its land windows' vMF mixtures (as the reference
    pooled patch predictions per tile) and its peak (on a 1-degree grid) the predicted location,
    drawn on the world map with the true location from the raster's own transform and CRS. Bands:
    the first C of the raster (C = the model's channels), a single-band raster repeated. Writes
    <output>/geo_infer_map.png and geo_infer.json."""
    task, config, (params, state) = run.task, run.config, variables
    path = options.get("input") or ""
    if not path:
        raise ValueError("eojax infer geo needs --input=<a georeferenced GeoTIFF>")
    c, size = task.channels, int(config.input.window)
    with_count = Scene(path)
    if with_count.num_channels < c and with_count.num_channels != 1:
        raise ValueError(f"{path} has {with_count.num_channels} bands; the model takes {c} (or 1, repeated)")
    scene = Scene(path, bands=tuple(range(1, c + 1)) if with_count.num_channels >= c else (1,) * c)
    windows = GridWindowSampler([scene.check()], size, size, float(config.input.min_valid_fraction)).windows
    climate_map = run.input.climate_map  # the config's climate raster (no training raster is read)
    labeler = WindowLabeler([scene], climate_map, grid=int(config.input.label_grid))
    apply = jax.jit(task.predict_and_logits)
    preds = []
    for start in range(0, len(windows), config.batch_size):
        chunk = windows[start:start + config.batch_size]
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
    if task.centres is not None:
        # The mean of the windows' mixtures is one mixture with the mean weights.
        weights = jax.nn.softmax(jnp.asarray(pred["vmf"][pool]), axis=-1).mean(axis=0)
        log_kappa = np.asarray(jax.device_get(params["head"]["log_kappa"]))
        density = task.log_density_map(jnp.log(weights), log_kappa)
        g_lat, g_lon = maps.lat_lon_grid(1.0)
        i, j = np.unravel_index(np.argmax(density), density.shape)
        lat, lon = float(g_lat[i]), float(g_lon[j])
    centre = labeler.label([0], [scene.height / 2 - size / 2], [scene.width / 2 - size / 2], size)["latlon"][0]
    km = float(metrics.haversine_km(centre[0], centre[1], lat, lon))
    png = maps.save_world_map(os.path.join(options["output"], "geo_infer_map.png"), density, centre,
                              pred_latlon=(lat, lon), sea=maps.sea_mask(climate_map),
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
