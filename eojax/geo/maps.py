"""World map PNG of a predicted vMF-mixture density, with the true (and predicted) location marked.

Equirectangular (plate carree) lat/lon grid drawn with a matplotlib Figure (Agg, no pyplot, no display,
no network).
Coastlines come from data available offline: the climate raster's sea mask is the background
(sea dark, land light), and its land/sea boundary is drawn as a contour.
"""
from __future__ import annotations

import numpy as np

from eojax import viz
from eojax.geo import encoding


def lat_lon_grid(step_deg: float = 1.0):
    """Cell-centre (lat (n_lat,), lon (n_lon,)) of a global grid, north first."""
    lat = np.arange(90 - step_deg / 2, -90, -step_deg)
    lon = np.arange(-180 + step_deg / 2, 180, step_deg)
    return lat, lon


def grid_xyz(step_deg: float = 1.0) -> np.ndarray:
    lat, lon = lat_lon_grid(step_deg)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    return encoding.latlon_to_xyz(la, lo).reshape(-1, 3).astype(np.float32)


def sea_mask(climate_map, step_deg: float = 1.0) -> np.ndarray:
    """(n_lat, n_lon) bool: sea at each grid cell centre of the climate raster (EPSG:4326 rasters
    directly; others through GDAL)."""
    lat, lon = lat_lon_grid(step_deg)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    x, y = lo.ravel(), la.ravel()
    if climate_map.crs.to_epsg() != 4326:
        from rasterio.warp import transform
        x, y = map(np.asarray, transform("EPSG:4326", climate_map.crs, x, y))
    return (climate_map.classes_at(x, y) == 0).reshape(la.shape)


def save_world_map(path: str, log_density: np.ndarray | None, true_latlon, *, pred_latlon=None,
                   sea: np.ndarray | None = None, step_deg: float = 1.0, title: str = "",
                   caption: str = "") -> str:
    """The PNG of `world_map_figure` (written under a temporary name, renamed when complete)."""
    return viz.save_figure(world_map_figure(log_density, true_latlon, pred_latlon=pred_latlon, sea=sea,
                                            step_deg=step_deg, title=title, caption=caption), path)


def world_map_figure(log_density: np.ndarray | None, true_latlon, *, pred_latlon=None,
                     sea: np.ndarray | None = None, step_deg: float = 1.0, title: str = "", caption: str = ""):
    """log_density: (n_lat, n_lon) log density per steradian on `lat_lon_grid(step_deg)` (or None to
    mark only points). Colours show the density relative to its peak, on a log scale over 6 decades
    (the colour bar); a legend names the true and predicted marks; `caption` goes under the map."""
    from matplotlib.figure import Figure

    extent = (-180, 180, -90, 90)
    fig = Figure(figsize=(10, 5.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    if sea is not None:
        ax.imshow(np.where(sea, 0.15, 0.85), extent=extent, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        lat, lon = lat_lon_grid(step_deg)
        ax.contour(lon, lat, sea.astype(float), levels=[0.5], colors="k", linewidths=0.4)
    if log_density is not None:
        rel = (log_density - np.max(log_density)) / np.log(10)  # decades below the peak
        shown = np.ma.masked_less(rel, -6)
        im = ax.imshow(shown, extent=extent, cmap="magma", vmin=-6, vmax=0, alpha=0.75,
                       interpolation="bilinear")
        fig.colorbar(im, ax=ax, shrink=0.8, label="log10 density / peak")
    ax.plot(true_latlon[1], true_latlon[0], marker="*", color="cyan", markersize=16,
            markeredgecolor="k", linestyle="none", label="true location")
    if pred_latlon is not None:
        ax.plot(pred_latlon[1], pred_latlon[0], marker="x", color="lime", markersize=11, mew=2.5,
                linestyle="none", label="predicted")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title, fontsize=10)
    if caption:
        fig.supxlabel(caption, fontsize=8)
    return fig
