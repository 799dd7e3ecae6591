"""Deterministic, plausible multispectral scenes: eojax's default data and test fixtures.

A scene is land cover (water, forest, grassland, cropland parcels, urban, bare soil) drawn from
smooth random fields, rendered through approximate reflectance spectra per class, with texture,
clouds, cloud shadows and an irregular nodata swath edge. Files are uint16 GeoTIFFs (reflectance x
10000, nodata 0) with band descriptions = band names and a final 'QA' band of bit flags.
Same seed and arguments -> byte-identical file.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib

import numpy as np
import rasterio
import rasterio.warp
from affine import Affine

from eojax.data import files

# Land-cover classes of the label rasters (0 = nodata).
CLASSES = ("nodata", "water", "forest", "grassland", "cropland", "urban", "bare_soil")
WATER, FOREST, GRASS, CROP, URBAN, BARE = range(1, 7)
# QA bit flags. 'clear' makes every data pixel's QA non-zero, so it never equals nodata 0.
QA_FILL, QA_CLOUD, QA_SHADOW, QA_CLEAR = 1, 2, 4, 8


@dataclasses.dataclass(frozen=True)
class Sensor:
    name: str
    bands: tuple[str, ...]
    wavelengths_nm: tuple[float, ...]  # band centres
    gsd_m: float


SENSORS = {
    "sentinel2": Sensor("sentinel2", ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"),
                        (492., 560., 665., 704., 740., 783., 833., 865., 1614., 2202.), 10.0),
    "landsat8": Sensor("landsat8", ("B1", "B2", "B3", "B4", "B5", "B6", "B7"),
                       (443., 482., 561., 655., 865., 1609., 2201.), 30.0),
}

# Approximate surface reflectance at anchor wavelengths, rounded from typical published curves
# (USGS splib07 / ECOSTRESS library shapes): water dark and falling into the NIR; green vegetation
# with a red trough, the red edge and a high NIR plateau, lower again in SWIR (leaf water);
# soil rising steadily into SWIR; clouds bright and flat, darker in SWIR (ice/water absorption).
_ANCHORS = np.array([443., 490., 560., 665., 705., 740., 783., 842., 865., 1610., 2200.])
_SPECTRA = {
    "water": [.060, .055, .045, .025, .020, .012, .010, .008, .007, .003, .002],
    "forest": [.020, .025, .050, .025, .080, .200, .270, .300, .305, .150, .070],
    "grass": [.030, .035, .080, .040, .120, .280, .360, .390, .400, .230, .110],
    "crop": [.025, .030, .085, .030, .130, .330, .430, .470, .480, .220, .090],
    "urban": [.090, .100, .120, .140, .150, .160, .170, .180, .185, .210, .190],
    "soil": [.070, .085, .120, .170, .200, .220, .240, .260, .265, .330, .290],
    "turbid": [.010, .015, .030, .025, .015, .008, .005, .003, .003, .001, .001],
    "cloud": [.700, .700, .680, .660, .650, .640, .630, .620, .620, .450, .300],
}


def _spectrum(name: str, sensor: Sensor) -> np.ndarray:
    return np.interp(sensor.wavelengths_nm, _ANCHORS, _SPECTRA[name]).astype(np.float32)


def _smooth(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise (FFT), standardised: organic patches about `sigma` px wide."""
    noise = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    kernel = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))
    f = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=(h, w))
    return ((f - f.mean()) / (f.std() + 1e-12)).astype(np.float32)


@dataclasses.dataclass
class _Land:
    labels: np.ndarray  # (h, w) uint8 class ids 1..6
    cover: np.ndarray  # (h, w) green vegetation fraction at peak season
    texture: np.ndarray  # (h, w) multiplicative brightness
    turbidity: np.ndarray  # (h, w) 0..1, water only


def _landscape(seed: int, h: int, w: int, cover_bias=(0.0,) * 5) -> _Land:
    rng = np.random.default_rng((seed, 0))
    elev = _smooth(rng, h, w, max(h, w) / 8)
    # Class scores: the largest wins; biases set rough proportions (`cover_bias` shifts them: a place's
    # land-cover mix), elevation pushes forest uphill.
    scores = np.asarray(cover_bias, np.float32)[:, None, None] + np.stack([
        _smooth(rng, h, w, 14) + 0.6 * elev + 0.2,  # forest
        _smooth(rng, h, w, 10) - 0.1,  # grassland
        _smooth(rng, h, w, 20) - 0.4 * elev + 0.3,  # cropland
        _smooth(rng, h, w, 8) - 0.7,  # urban
        _smooth(rng, h, w, 6) - 0.9,  # bare soil
    ])
    labels = (np.argmax(scores, axis=0) + FOREST).astype(np.uint8)
    labels[elev < np.quantile(elev, 0.08)] = WATER  # lakes in the lowest ground

    # Cropland is a rotated grid of parcels, each at its own growth stage.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, np.pi / 2)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    pu, pv = rng.uniform(16, 28), rng.uniform(8, 14)
    parcel = (np.floor(u / pu).astype(np.int64) * 100003 + np.floor(v / pv).astype(np.int64))
    _, inverse = np.unique(parcel, return_inverse=True)
    stage = rng.uniform(0.15, 1.0, size=inverse.max() + 1).astype(np.float32)[inverse.reshape(h, w)]

    fine = _smooth(rng, h, w, 2)
    cover = np.select(
        [labels == FOREST, labels == GRASS, labels == CROP, labels == URBAN, labels == BARE],
        [0.9 + 0.08 * fine, 0.75 + 0.1 * fine, stage, 0.15 + 0.1 * fine, 0.05 + 0.03 * fine], 0.0)
    texture = 1.0 + 0.07 * _smooth(rng, h, w, 3) + 0.03 * rng.standard_normal((h, w))
    turbidity = np.clip(0.5 + 0.3 * _smooth(rng, h, w, 12), 0, 1)
    return _Land(labels, np.clip(cover, 0, 1).astype(np.float32), texture.astype(np.float32),
                 turbidity.astype(np.float32))


def _season(date: str, crs: str = "") -> float:
    """0 in mid-winter .. 1 in mid-summer: scales green cover of grass, crops and (less) forest."""
    doy = datetime.date.fromisoformat(date).timetuple().tm_yday
    if str(crs).upper().startswith("EPSG:327"):  # southern-hemisphere UTM: seasons flip
        doy += 182
    return float(0.5 - 0.5 * np.cos(2 * np.pi * (doy - 15) / 365.0))


def _fill_mask(seed: int, h: int, w: int) -> np.ndarray:
    """Nodata beyond a tilted, slightly ragged swath edge along one side."""
    rng = np.random.default_rng((seed, 2))
    tilt = np.tan(np.deg2rad(rng.uniform(6, 18)))
    rows = np.arange(h, dtype=np.float32)
    ragged = 1.5 * _smooth(rng, 1, h, 3)[0]
    edge = w * rng.uniform(0.06, 0.16) + tilt * (rows - h / 2) + ragged
    fill = np.arange(w)[None, :] < edge[:, None]
    return fill[:, ::-1] if rng.random() < 0.5 else fill


def _clouds(rng: np.random.Generator, h: int, w: int, fraction: float, fill: np.ndarray):
    """-> (cloud mask, opacity, shadow mask); `fraction` of the data pixels are flagged cloudy."""
    if fraction <= 0:
        z = np.zeros((h, w), bool)
        return z, np.zeros((h, w), np.float32), z
    field = _smooth(rng, h, w, 16) + 0.35 * _smooth(rng, h, w, 4)
    thr = np.quantile(field[~fill], 1.0 - min(fraction, 1.0))
    cloud = field > thr
    opacity = np.where(cloud, np.clip(0.4 + (field - thr) / 0.6, 0, 1), 0).astype(np.float32)
    # Shadows: the cloud mask displaced away from the sun, on the ground only.
    ang = rng.uniform(0, 2 * np.pi)
    dist = rng.uniform(0.04, 0.08) * max(h, w)
    dy, dx = int(round(dist * np.sin(ang))), int(round(dist * np.cos(ang)))
    shifted = np.zeros_like(cloud)
    shifted[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        cloud[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return cloud, opacity, shifted & ~cloud


def _render(land: _Land, sensor: Sensor, season: float, cloud_rng, cloud_fraction: float,
            fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (bands uint16 (C, h, w), qa uint16 (h, w))."""
    h, w = land.labels.shape
    spec = {k: _spectrum(k, sensor) for k in _SPECTRA}
    lab = land.labels
    green = land.cover * np.select([lab == FOREST, lab == URBAN], [0.7 + 0.3 * season, 1.0],
                                   0.2 + 0.8 * season)
    canopy = np.select([lab == FOREST, lab == CROP], [1.0, 2.0], 0.0)  # which canopy spectrum
    refl = np.empty((len(sensor.bands), h, w), np.float32)
    for b in range(len(sensor.bands)):
        veg = np.choose(canopy.astype(np.int64), [spec["grass"][b], spec["forest"][b], spec["crop"][b]])
        background = np.where(lab == URBAN, spec["urban"][b], spec["soil"][b])
        surface = green * veg + (1 - green) * background
        water = spec["water"][b] + land.turbidity * spec["turbid"][b]
        refl[b] = np.where(lab == WATER, water, surface) * land.texture
    cloud, opacity, shadow = _clouds(cloud_rng, h, w, cloud_fraction, fill)
    # Shadowed ground sees only diffuse skylight: blue keeps more than SWIR.
    dark = np.interp(sensor.wavelengths_nm, [400, 2300], [0.45, 0.25]).astype(np.float32)
    refl = np.where(shadow[None], refl * dark[:, None, None], refl)
    bright = (0.85 + 0.1 * np.clip(opacity, 0, 1))[None]
    refl = (1 - opacity[None]) * refl + opacity[None] * spec["cloud"][:, None, None] * bright
    dn = np.clip(np.round(refl * 10000), 1, 65535).astype(np.uint16)  # 0 is reserved for nodata
    dn[:, fill] = 0
    qa = np.full((h, w), QA_CLEAR, np.uint16)
    qa[cloud] = QA_CLOUD
    qa[shadow] = QA_SHADOW
    qa[fill] = QA_FILL
    return dn, qa


def _write_atomic_tif(path: str, array: np.ndarray, profile: dict, descriptions, tags, band_tags=()):
    """Writes a GeoTIFF to a unique temp name, then renames: never a half-written file at `path`."""
    with files.replaced_whole(path, ".tif") as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            dst.write(array)
            for i, d in enumerate(descriptions):
                dst.set_band_description(i + 1, d)
            dst.update_tags(**tags)
            for i, t in enumerate(band_tags):
                dst.update_tags(i + 1, **t)
    return path


def _profile(count, h, w, crs, origin, gsd, dtype, nodata):
    return dict(driver="GTiff", count=count, height=h, width=w, dtype=dtype, nodata=nodata,
                crs=crs, transform=Affine(gsd, 0.0, origin[0], 0.0, -gsd, origin[1]),  # north-up
                tiled=True, blockxsize=128, blockysize=128, interleave="pixel")


def _write_labels(path, land, fill, crs, origin, gsd):
    labels = np.where(fill, 0, land.labels).astype(np.uint8)[None]
    return _write_atomic_tif(path, labels, _profile(1, *labels.shape[1:], crs, origin, gsd, "uint8", 0),
                             ["landcover"], {"classes": ",".join(CLASSES)})


def _write(path, dn, qa, sensor, crs, origin, date):
    c, h, w = dn.shape
    return _write_atomic_tif(
        str(path), np.concatenate([dn, qa[None]]),
        _profile(c + 1, h, w, crs, origin, sensor.gsd_m, "uint16", 0),
        list(sensor.bands) + ["QA"],
        {"date": date, "sensor": sensor.name, "scale": "reflectance x 10000",
         "QA_bits": "0 fill, 1 cloud, 2 cloud shadow, 3 clear"},
        [{"wavelength_nm": str(wl)} for wl in sensor.wavelengths_nm] + [{}])


def write_scene(path, *, seed: int, height: int, width: int, sensor: str = "sentinel2",
                crs: str = "EPSG:32633", origin=(500000.0, 5200000.0), date: str = "2021-06-15",
                cloud_fraction: float = 0.15, nodata_border: bool = True, labels_path=None,
                cover_bias=(0.0,) * 5) -> str:
    """Writes one synthetic scene (and optionally its land-cover labels) -> `path`. `cover_bias` is
    added to the scores of forest, grassland, cropland, urban and bare soil (0: the default mix)."""
    sens = SENSORS[sensor]
    land = _landscape(seed, height, width, cover_bias)
    fill = _fill_mask(seed, height, width) if nodata_border else np.zeros((height, width), bool)
    dn, qa = _render(land, sens, _season(date, crs), np.random.default_rng((seed, 1)), cloud_fraction,
                     fill)
    if labels_path is not None:
        _write_labels(str(labels_path), land, fill, crs, origin, sens.gsd_m)
    return _write(path, dn, qa, sens, crs, origin, date)


def write_time_series(directory, *, seed: int, n_dates: int = 8, height: int = 256,
                      width: int = 256, sensor: str = "sentinel2", crs: str = "EPSG:32633",
                      origin=(500000.0, 5200000.0), start_date: str = "2021-01-15",
                      cloud_fraction: float = 0.2, nodata_border: bool = True,
                      labels: bool = True) -> list[str]:
    """One scene per date over a year on one grid: the seasonal NDVI cycle, clouds differing by date.

    Files are `<directory>/ts_<date>.tif` (plus `labels.tif` when `labels`); returns the scenes.
    """
    sens = SENSORS[sensor]
    land = _landscape(seed, height, width)
    fill = _fill_mask(seed, height, width) if nodata_border else np.zeros((height, width), bool)
    start = datetime.date.fromisoformat(start_date)
    paths = []
    for i in range(n_dates):
        date = (start + datetime.timedelta(days=round(i * 365 / n_dates))).isoformat()
        rng = np.random.default_rng((seed, 1, i))
        frac = float(min(0.9, rng.uniform(0, 2 * cloud_fraction)))  # some dates clear, some cloudy
        dn, qa = _render(land, sens, _season(date, crs), rng, frac, fill)
        paths.append(_write(os.path.join(directory, f"ts_{date}.tif"), dn, qa, sens, crs, origin, date))
    if labels:
        _write_labels(os.path.join(directory, "labels.tif"), land, fill, crs, origin, sens.gsd_m)
    return paths


# name, seed, height, width, crs, origin, date (southern summer for the EPSG:32755 scene)
_DEFAULT_SCENES = (
    ("s2_a", 11, 320, 288, "EPSG:32633", (500000.0, 5200000.0), "2021-06-15"),
    ("s2_b", 12, 256, 256, "EPSG:32618", (600000.0, 4500000.0), "2021-08-02"),
    ("s2_c", 13, 384, 352, "EPSG:32755", (300000.0, 6000000.0), "2021-01-20"),
)


def default_dir() -> pathlib.Path:
    root = os.environ.get("EOJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "eojax")
    return pathlib.Path(root) / "synthetic" / "v1"


def default_dataset(directory=None) -> list[str]:
    """The three default Sentinel-2-like scenes (different sizes and CRSs), written once.

    Idempotent and race-safe: a file that exists is complete (atomic rename), and two processes
    writing at once write identical bytes. Also writes `<name>_labels.tif` next to each scene.
    """
    directory = pathlib.Path(directory) if directory is not None else default_dir()
    paths = []
    for name, seed, h, w, crs, origin, date in _DEFAULT_SCENES:
        path = directory / f"{name}.tif"
        if not path.exists():
            write_scene(path, seed=seed, height=h, width=w, crs=crs, origin=origin, date=date,
                        labels_path=directory / f"{name}_labels.tif")
        paths.append(str(path))
    return paths


# Two potential-field surveys over one area: gravity on a 100 m grid in UTM and magnetics on a
# 200 m grid in another projection, each with irregular coverage (NaN outside the survey).
_GRIDS = (("gravity_100m", "mGal", 100.0, "EPSG:32633", 224),
          ("magnetics_200m", "nT", 200.0, "EPSG:3035", 120))
_GRID_AREA = ("EPSG:32633", 500000.0, 5177600.0, 522400.0, 5200000.0)  # the surveyed area


def write_geophysics_grids(directory=None, *, seed: int = 7) -> list[str]:
    """Default GRID-MAE data: two single-band float32 grids of different resolutions and CRSs,
    smooth anomalies plus a regional trend, NaN outside an irregular survey outline. Written once."""
    directory = pathlib.Path(directory) if directory is not None else default_dir()
    paths = []
    for k, (name, unit, gsd, crs, size) in enumerate(_GRIDS):
        path = directory / f"{name}.tif"
        if not path.exists():
            left, _, _, top = rasterio.warp.transform_bounds(_GRID_AREA[0], crs, *_GRID_AREA[1:])
            origin = (round(left, -2), round(top, -2))
            rng = np.random.default_rng((seed, k))
            field = 20.0 * _smooth(rng, size, size, 6.0) + 5.0 * _smooth(rng, size, size, 1.5)
            field += np.linspace(-30.0, 30.0, size, dtype=np.float32)[None, :]  # regional trend
            outline = _smooth(rng, size, size, 12.0) + 1.2 * (1 - np.hypot(*np.meshgrid(
                np.linspace(-1, 1, size), np.linspace(-1, 1, size))))
            field[outline < -0.4] = np.nan  # irregular survey coverage
            profile = _profile(1, size, size, crs, origin, gsd, "float32", float("nan"))
            _write_atomic_tif(str(path), field[None].astype(np.float32), profile, (name,),
                              {"unit": unit, "source": "eojax synthetic"})
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------
# Caption / image pairs for the diffusion family: crops of synthetic landscapes whose captions name
# their dominant land cover (and the runner-up when it covers a sizeable share).
_CAPTION_MAIN = {
    WATER: ("a lake", "a large lake", "open water"),
    FOREST: ("a dense forest", "a forest", "thick woodland"),
    GRASS: ("open grassland", "a green meadow", "grassland"),
    CROP: ("farmland", "fields of crops", "cultivated fields"),
    URBAN: ("a town", "a built-up area", "a dense town"),
    BARE: ("bare soil", "bare ground", "dry bare land"),
}
_CAPTION_NEXT = {
    WATER: ("next to a lake", "beside a lake"), FOREST: ("next to a forest", "beside a forest"),
    GRASS: ("with some grassland", "next to a meadow"), CROP: ("near farmland", "beside some fields"),
    URBAN: ("with a small town", "near some buildings"), BARE: ("with bare soil", "near bare ground"),
}


def _caption_scene(labels: np.ndarray, rng: np.random.Generator, n: int = 5) -> tuple[str, list[str]]:
    """-> (class name of the dominant cover, n captions in varied wording)."""
    frac = np.bincount(labels.ravel(), minlength=len(CLASSES))[1:] / labels.size
    order = np.argsort(-frac, kind="stable") + 1
    first, second = int(order[0]), int(order[1])
    captions = []
    for _ in range(n):
        text = str(rng.choice(_CAPTION_MAIN[first]))
        if frac[second - 1] >= 0.2:
            text += " " + str(rng.choice(_CAPTION_NEXT[second]))
        captions.append(text)
    return CLASSES[first], captions


def write_caption_dataset(directory, *, n: int, size: int = 32, seed: int = 0, layout: str = "rsicd",
                          bands: str = "rgb") -> str:
    """Writes `n` synthetic caption/image pairs (written once; returns the annotation file).

    Each image is a (2 size)-pixel crop of a 384 x 384 landscape (16 crops per landscape), averaged
    down to size x size. bands='rgb': 8-bit true-colour PNGs (B4, B3, B2, gamma-stretched);
    'sentinel2': 10-band uint16 GeoTIFFs (reflectance x 10000). layout='rsicd': `captions.json`
    (COCO style, 5 captions per image) and `images/<class>_<i>.<ext>`; 'metadata_jsonl':
    `metadata.jsonl` with one {"file_name", "text"} line per image (HF imagefolder).
    """
    if layout not in ("rsicd", "metadata_jsonl"):
        raise ValueError(f"layout must be 'rsicd' or 'metadata_jsonl', got {layout!r}")
    if bands not in ("rgb", "sentinel2"):
        raise ValueError(f"bands must be 'rgb' or 'sentinel2', got {bands!r}")
    directory = pathlib.Path(directory)
    index = directory / ("captions.json" if layout == "rsicd" else "metadata.jsonl")
    if index.exists():
        return str(index)
    import json

    from PIL import Image

    sens, crop, per_scene, big = SENSORS["sentinel2"], 2 * size, 16, 384
    rgb = [sens.bands.index(b) for b in ("B4", "B3", "B2")]
    (directory / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        k, j = divmod(i, per_scene)
        if j == 0:
            land = _landscape(seed * 1_000_003 + k, big, big)
            dn, _ = _render(land, sens, 0.8, np.random.default_rng((seed, k, 1)), 0.0,
                            np.zeros((big, big), bool))
        rng = np.random.default_rng((seed, i, 3))
        r0, c0 = rng.integers(0, big - crop, size=2)
        labels = land.labels[r0:r0 + crop, c0:c0 + crop]
        cls, captions = _caption_scene(labels, rng)
        pixels = dn[:, r0:r0 + crop, c0:c0 + crop].astype(np.float32)
        pixels = pixels.reshape(len(sens.bands), size, 2, size, 2).mean(axis=(2, 4))
        name = f"{cls}_{i:05d}"
        if bands == "rgb":
            img = np.clip(pixels[rgb] / 3000.0, 0, 1) ** 0.6
            file_name = f"images/{name}.png"
            Image.fromarray((img.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(directory / file_name)
        else:
            file_name = f"images/{name}.tif"
            profile = _profile(len(sens.bands), size, size, "EPSG:32633", (500000.0 + 640 * i, 5200000.0),
                               sens.gsd_m * 2, "uint16", 0)
            _write_atomic_tif(str(directory / file_name), np.clip(pixels.round(), 1, 65535).astype(np.uint16),
                              profile, sens.bands, {"sensor": sens.name, "scale": "reflectance x 10000"})
        entries.append((i, file_name, captions))
    tmp = index.with_suffix(".tmp")
    with open(tmp, "w") as f:
        if layout == "rsicd":
            json.dump({"images": [{"id": i, "file_name": fn.split("/", 1)[1], "width": size, "height": size}
                                  for i, fn, _ in entries],
                       "annotations": [{"id": 5 * i + m, "image_id": i, "caption": c}
                                       for i, _, caps in entries for m, c in enumerate(caps)]}, f)
        else:
            for _, fn, caps in entries:
                f.write(json.dumps({"file_name": fn, "text": caps[0]}) + "\n")
    os.replace(tmp, index)
    return str(index)


# ---------------------------------------------------------------------------------------------------
# HLS Burn Scars-like chips (segmentation): `<name>_merged.tif` (6 HLS bands, float32 reflectance)
# + `<name>.mask.tif` (int16: 1 burn scar, 0 not burned, -1 missing = cloud).
# ---------------------------------------------------------------------------------------------------
HLS_BURN_SCARS = Sensor("hls", ("B2", "B3", "B4", "B8A", "B11", "B12"),
                        (490., 560., 665., 865., 1610., 2190.), 30.0)
# Freshly burned ground (char and ash): dark in the visible, low NIR, brighter in SWIR than vegetation,
# so NBR = (NIR - SWIR2) / (NIR + SWIR2) turns negative, the signal burn-scar mappers use.
_BURNED = [.035, .040, .045, .055, .060, .070, .080, .090, .095, .170, .190]


def write_burn_scar_chips(directory, *, n: int, size: int = 512, seed: int = 0) -> list[str]:
    """Writes n chips in the HLS Burn Scars layout into `directory` -> the image paths.

    Each chip is a synthetic landscape (seeded by (seed, i)) in which smooth blobs of vegetated land
    burned; clouds are marked missing (-1) in the mask. Same arguments -> identical files.
    """
    paths = []
    for i in range(n):
        chip_seed = 100_003 * (seed + 1) + i
        rng = np.random.default_rng((chip_seed, 5))
        land = _landscape(chip_seed, size, size)
        dn, qa = _render(land, HLS_BURN_SCARS, 0.8, np.random.default_rng((chip_seed, 1)),
                         float(rng.uniform(0.0, 0.1)), np.zeros((size, size), bool))
        refl = dn.astype(np.float32) / 10000.0
        field = _smooth(rng, size, size, size / 12)
        burnable = (land.labels != WATER) & (land.labels != URBAN)
        burn = (field > np.quantile(field, 1.0 - rng.uniform(0.05, 0.3))) & burnable
        burned = np.interp(HLS_BURN_SCARS.wavelengths_nm, _ANCHORS, _BURNED).astype(np.float32)
        refl = np.where(burn[None], burned[:, None, None] * land.texture[None], refl)
        cloud = (qa & QA_CLOUD) > 0
        refl = np.where(cloud[None], dn.astype(np.float32) / 10000.0, refl)  # clouds hide the ground
        mask = np.where(cloud, -1, burn.astype(np.int16)).astype(np.int16)
        name = f"subsetted_{size}x{size}_HLS.S30.T10S{chr(65 + seed % 26)}H.{2018001 + i}.v1.4"
        origin = (500000.0 + 30.0 * size * i, 4200000.0)
        image_path = os.path.join(str(directory), f"{name}_merged.tif")
        _write_atomic_tif(image_path, refl.astype(np.float32),
                          _profile(6, size, size, "EPSG:32610", origin, 30.0, "float32", 9999.0),
                          HLS_BURN_SCARS.bands, {"sensor": "HLS S30 (synthetic)", "scale": "reflectance"})
        _write_atomic_tif(os.path.join(str(directory), f"{name}.mask.tif"), mask[None],
                          _profile(1, size, size, "EPSG:32610", origin, 30.0, "int16", None),
                          ["burn_scar"], {"classes": "-1 missing, 0 not burned, 1 burn scar"})
        paths.append(image_path)
    return paths


def write_classification_chips(directory, *, n: int, size: int = 32, seed: int = 0) -> list[str]:
    """Writes up to n cloud-free Sentinel-2 chips in EuroSAT's layout (`<class>/<class>_<k>.tif`)
    into `directory` -> their paths. Chips are cut on a grid from synthetic scenes of several
    seasons; a chip's class is its majority land cover when that covers at least half of it (other
    chips are skipped), taken round-robin over the classes so they stay balanced. Same arguments ->
    identical files."""
    sens = SENSORS["sentinel2"]
    per_class: dict[int, list[np.ndarray]] = {}
    for k in range(8):
        date = ("2021-04-15", "2021-06-15", "2021-08-15", "2021-10-15")[k % 4]
        land = _landscape(200_003 * (seed + 1) + k, 8 * size, 8 * size)
        dn, _ = _render(land, sens, _season(date), np.random.default_rng((seed, k)), 0.0,
                        np.zeros(land.labels.shape, bool))
        for y in range(0, 8 * size, size):
            for x in range(0, 8 * size, size):
                counts = np.bincount(land.labels[y:y + size, x:x + size].ravel(), minlength=len(CLASSES))
                if counts.max() >= 0.5 * size * size:
                    per_class.setdefault(int(counts.argmax()), []).append(dn[:, y:y + size, x:x + size])
    order = [(c, i) for i in range(max(len(v) for v in per_class.values()))
             for c in sorted(per_class) if i < len(per_class[c])][:n]
    paths = []
    for c, i in order:
        name = CLASSES[c]
        path = os.path.join(str(directory), name, f"{name}_{i}.tif")
        _write_atomic_tif(path, per_class[c][i], _profile(len(sens.bands), size, size, "EPSG:32633",
                                                          (500000.0 + 10.0 * size * i, 5200000.0),
                                                          sens.gsd_m, "uint16", 0),
                          sens.bands, {"sensor": "sentinel2 (synthetic)", "class": name})
        paths.append(path)
    return paths
