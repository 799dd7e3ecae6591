"""The pictures a user looks at: RGB stretches of multispectral tiles, and one titled grid figure
(matplotlib.figure.Figure on the Agg canvas: no pyplot, no display, no global figure state) that
every family's PNG goes through: column and row titles, a class legend or a colour bar, outlines of
held-out boxes or masks, and a caption with the step and the metrics of what is shown."""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

# True-colour band names per sensor convention (Sentinel-2 and Landsat 8 share B4/B3/B2 = R/G/B).
_RGB_NAMES = (("B4", "B3", "B2"), ("B04", "B03", "B02"), ("red", "green", "blue"), ("R", "G", "B"))
OUTLINE_COLOUR = "#00e5ff"  # cyan: visible on vegetation, soil, water and the grey of masked patches


def rgb_indices(band_names: Sequence[str]) -> list[int]:
    """Indices of red, green, blue among `band_names`, else the first three bands (or one, as grey)."""
    lower = [str(b).lower() for b in band_names]
    for names in _RGB_NAMES:
        if all(n.lower() in lower for n in names):
            return [lower.index(n.lower()) for n in names]
    return list(range(min(3, len(band_names)))) if len(band_names) >= 3 else [0, 0, 0]


def to_rgb8(image: np.ndarray, band_names: Sequence[str], valid: np.ndarray | None = None,
            ref: np.ndarray | None = None) -> np.ndarray:
    """(H, W, C) -> (H, W, 3) uint8 with a 2-98 percentile stretch per band (taken from `ref` if given,
    so an original and its reconstruction share one stretch). Invalid pixels are black."""
    idx = rgb_indices(band_names)
    rgb = image[..., idx].astype(np.float64)
    base = (ref if ref is not None else image)[..., idx].astype(np.float64)
    sel = base[valid] if valid is not None and valid.any() else base.reshape(-1, 3)
    lo, hi = np.percentile(sel, 2, axis=0), np.percentile(sel, 98, axis=0)
    out = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    if valid is not None:
        out = out * valid[..., None]
    return (out * 255).round().astype(np.uint8)


def resize_nearest(tile: np.ndarray, size: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (size, size, 3) by pixel repetition, to show scales side by side."""
    return np.asarray(Image.fromarray(tile).resize((size, size), Image.NEAREST))


@dataclasses.dataclass(frozen=True)
class ColourBar:
    """How 2-D float tiles of a grid are coloured, and the bar that says what the colours mean."""
    label: str
    vmin: float = 0.0
    vmax: float = 1.0
    cmap: str = "magma"


def outline_of(mask: np.ndarray):
    """A held-out region as grid_figure draws it: the box (y0, x0, y1, x1), end-exclusive, when the
    mask fills its bounding box, else the mask itself (drawn as its contour); None when empty."""
    mask = np.asarray(mask, bool)
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return None
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    return (y0, x0, y1, x1) if mask[y0:y1, x0:x1].all() else mask


def caption(step: int | None = None, metrics: Mapping[str, float] | None = None, note: str = "") -> str:
    """'step 100 | masked MSE 0.0123 | ...': the line under a figure."""
    parts = [f"step {step}"] if step is not None else []
    parts += [f"{k} {fmt(v)}" for k, v in (metrics or {}).items()]
    return " | ".join(parts + ([note] if note else []))


def grid_figure(rows: Sequence[Sequence[np.ndarray | None]], *, columns: Sequence[str] = (),
                row_labels: Sequence[str] = (), title: str = "", caption: str = "",
                classes: Sequence[tuple[str, Sequence[int]]] = (), colour_bar: ColourBar | None = None,
                outlines=None, tile_px: int = 0):
    """A grid of tiles as a matplotlib Figure (not yet saved: `save_figure`).

    rows: tiles, each (H, W, 3) uint8 RGB, or (H, W) float coloured by `colour_bar`, or None (empty).
    columns: titles over the first row; row_labels: one beside each row.
    classes: (name, (r, g, b) 0-255) of a class legend. colour_bar: the scale of the float tiles.
    outlines: drawn on top of tiles: an outline is a box (y0, x0, y1, x1) in pixels, end-exclusive, or a
      bool mask (H, W) drawn as its boundary; one outline for every tile, or a nested list like `rows`.
    tile_px: the longest side of a tile on the figure (0: the tile's own, between 160 and 384 px)."""
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    nrow, ncol = len(rows), max(len(r) for r in rows)
    first = next(t for r in rows for t in r if t is not None)
    h, w = first.shape[:2]
    side = tile_px or int(np.clip(max(h, w), 160, 384))
    tile_w, tile_h = side * w / max(h, w) / 100, side * h / max(h, w) / 100  # inches at 100 dpi
    extra_w = (0.5 if row_labels else 0.2) + (1.3 if classes else 0) + (0.8 if colour_bar else 0)
    extra_h = 0.3 + (0.3 if columns else 0) + (0.35 if title else 0) + (0.3 if caption else 0)
    fig = Figure(figsize=(ncol * (tile_w + 0.06) + extra_w, nrow * (tile_h + 0.06) + extra_h), dpi=100,
                 layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False)
    norm = Normalize(colour_bar.vmin, colour_bar.vmax) if colour_bar else None
    shared_outline = outlines is not None and not isinstance(outlines, list)
    for i, row in enumerate(rows):
        for j in range(ncol):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i == 0 and j < len(columns):
                ax.set_title(columns[j], fontsize=9)
            if j == 0 and i < len(row_labels):
                ax.set_ylabel(row_labels[i], fontsize=9)
            tile = row[j] if j < len(row) else None
            if tile is None:  # an empty cell that keeps its titles
                ax.set_facecolor("none")
                continue
            interpolation = "nearest" if side >= max(tile.shape[:2]) else "antialiased"
            if tile.ndim == 2:
                if norm is None:
                    raise ValueError("a 2-D tile needs a colour_bar to say what its values mean")
                ax.imshow(tile, cmap=colour_bar.cmap, norm=norm, interpolation=interpolation)
            else:
                ax.imshow(tile, interpolation=interpolation)
            outline = outlines if shared_outline else (
                outlines[i][j] if outlines is not None and i < len(outlines) and j < len(outlines[i]) else None)
            if isinstance(outline, tuple):
                y0, x0, y1, x1 = outline
                ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, gid="outline",
                                       edgecolor=OUTLINE_COLOUR, linewidth=1.5))
            elif outline is not None and np.any(outline) and not np.all(outline):
                # the 0.5 level runs between pixel centres: the boundary between outlined and other pixels
                ax.contour(np.asarray(outline, np.float32), levels=[0.5], colors=OUTLINE_COLOUR,
                           linewidths=1.0)
    if title:
        fig.suptitle(title, fontsize=10)
    if caption:
        fig.supxlabel(caption, fontsize=8)
    if classes:
        handles = [Patch(facecolor=np.asarray(c, float)[:3] / 255, edgecolor="black", label=str(name))
                   for name, c in classes]
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    if colour_bar:
        from matplotlib.cm import ScalarMappable
        # beside the whole grid, so that every tile keeps its size
        bar = fig.colorbar(ScalarMappable(norm, colour_bar.cmap), ax=list(axes.flat), shrink=0.8,
                           aspect=30)
        bar.set_label(colour_bar.label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


def save_figure(fig, path: str) -> str:
    """The figure as a PNG at `path`, written under a temporary name and renamed when complete."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    fig.savefig(partial, format="png")
    os.replace(partial, path)
    return path


def save_png(path: str, image: np.ndarray) -> str:
    """One (H, W, 3) uint8 image as it is (a generated sample, an overlay raster): no figure around it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    Image.fromarray(np.asarray(image, np.uint8)).save(partial, format="PNG")
    os.replace(partial, path)
    return path


def read_png(path: str) -> np.ndarray:
    """(H, W, 3) uint8: a written picture, as the trackers (TensorBoard, W&B) take it."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def fmt(v) -> str:
    """A number for a caption or a title: 4 significant digits; integers and text as they are."""
    if isinstance(v, (int, np.integer)) or not isinstance(v, (float, np.floating)):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
