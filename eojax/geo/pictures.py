"""The geographic family's pictures plug-in: the predicted location density of a window on a world map."""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from eojax import viz
from eojax.geo import maps, metrics


@functools.lru_cache(maxsize=2)
def _predict(task):
    """One compiled prediction per task: pictures are made at every eval and at the end."""
    return jax.jit(task.predict_and_logits)


def map_arrays(task, params, state, batch) -> dict:
    """Host numpy predictions for `batch`, with the vMF logits and the (replicated) log_kappa (every
    process takes part in the gather)."""
    res = _predict(task)(params, state, batch["pixels"], batch["valid"])
    res = {k: np.asarray(v) for k, v in multihost_utils.process_allgather(res, tiled=True).items()}
    if task.centres is not None:
        res["log_kappa"] = np.asarray(jax.device_get(params["head"]["log_kappa"]))
    return res


def write_pictures(run, variables, batch, workdir, step) -> list[str]:
    """geo_map_step<N>.png: the predicted density of the first land window of `batch`, with the true
    and predicted locations, over the climate raster's sea mask."""
    task, (params, state) = run.task, variables
    res = map_arrays(task, params, state, batch)
    labels = {k: np.asarray(multihost_utils.process_allgather(batch[k], tiled=True))
              for k in ("latlon", "climate", "weight")}
    if jax.process_index() != 0:
        return []
    ok = np.flatnonzero((labels["weight"] > 0) & (labels["climate"][:, 0] < task.sea_threshold))
    i = int(ok[0]) if len(ok) else 0
    true = labels["latlon"][i]
    pred = (float(res["lat"][i]), float(res["lon"][i]))
    km = float(metrics.haversine_km(true[0], true[1], pred[0], pred[1]))
    path = os.path.join(workdir, f"geo_map_step{step}.png")
    density = task.log_density_map(res["vmf"][i], res["log_kappa"]) if "vmf" in res else None
    maps.save_world_map(path, density, true, pred_latlon=pred, sea=maps.sea_mask(run.input.climate_map),
                        title=f"where the model puts eval window {i}: true ({true[0]:.2f}, {true[1]:.2f}), "
                              f"predicted ({pred[0]:.2f}, {pred[1]:.2f})",
                        caption=viz.caption(step, {"error km": round(km)}))
    return [path]
