"""eojax.data.download: datasets fetched from a loopback HTTP server (127.0.0.1, written here) that
serves tiny archives in each release's layout; the whole path (download -> verify -> unpack -> the
eojax reader reads it), resume with Range requests, and every refusal (checksum, path-escaping or
link members, a missing file, an unreachable URL) leaving nothing half written in place."""
import dataclasses
import hashlib
import http.server
import importlib.util
import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling

from eojax import errors
from eojax.data import download as dl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with Range support; `cut[path] = n` sends only the first n bytes of the next answer."""

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        asked = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
        if asked:
            start = int(asked.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:srv.cut.pop(self.path, len(body))])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.cut, srv.log = {}, {}, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _publish(srv, dataset: dl.Dataset, blobs: dict, checksum: str = "md5") -> dl.Dataset:
    """Serves `blobs` (file -> bytes) as the mirror layout <name>/<file> -> the dataset with these
    files' own checksums (what a publisher would list for them)."""
    files = []
    for remote in dataset.files:
        data = blobs[remote.file]
        srv.files[f"/{dataset.name}/{remote.file}"] = data
        digest = dict(md5="", sha256="", size=0)
        digest[checksum] = hashlib.new(checksum, data).hexdigest()
        files.append(dataclasses.replace(remote, **digest))
    return dataclasses.replace(dataset, files=tuple(files))


def _tif_bytes(array, dtype, descriptions=()) -> bytes:
    c, h, w = array.shape
    with rasterio.MemoryFile() as mem:
        with mem.open(driver="GTiff", count=c, height=h, width=w, dtype=dtype) as dst:
            dst.write(array.astype(dtype))
            for i, d in enumerate(descriptions):
                dst.set_band_description(i + 1, d)
        return mem.read()


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar_gz(members: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _nothing_left(root, name):
    assert not os.path.exists(os.path.join(root, name)), "a half-built dataset folder was left in place"
    assert not os.path.exists(os.path.join(root, f".tmp-{name}")), "the extraction folder was left behind"


# --- EuroSAT MS, end to end, through the printed config override ---------------------------------------

EUROSAT_DEEP = "ds/images/remote_sensing/otherDatasets/sentinel_2/tif"
EUROSAT_CHIPS = {"AnnualCrop": 3, "Forest": 3, "SeaLake": 3}


def _eurosat_ms_blobs(rng, drop=None):
    images, members = {}, {}
    for cls, n in EUROSAT_CHIPS.items():
        for i in range(1, n + 1):
            images[f"{cls}_{i}"] = rng.integers(0, 4000, (13, 4, 4)).astype(np.uint16)
            if f"{cls}_{i}" != drop:
                members[f"{EUROSAT_DEEP}/{cls}/{cls}_{i}.tif"] = _tif_bytes(images[f"{cls}_{i}"], "uint16")
    split_of = {1: "train", 2: "val", 3: "test"}  # the real lists name the RGB release's .jpg files
    lists = {s: "".join(f"{cls}_{i}.jpg\n" for cls in EUROSAT_CHIPS for i in (1, 2, 3) if split_of[i] == s)
             for s in ("train", "val", "test")}
    blobs = {"EuroSATallBands.zip": _zip(members), **{f"eurosat-{s}.txt": t.encode() for s, t in lists.items()}}
    return blobs, images


def _classify_config_from_override(command: str):
    """configs/classify.py with the argument and --config.KEY=VALUE overrides of a printed command."""
    arg = re.search(r"--config=configs/classify\.py:(\S+)", command).group(1)
    spec = importlib.util.spec_from_file_location("classify_cfg", os.path.join(REPO, "configs", "classify.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    for key, value in re.findall(r"--config\.(\S+?)=(\S+)", command):
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = {"True": True, "False": False}.get(value, value)
    return config


def test_eurosat_ms_download_verify_unpack_and_the_classify_reader_reads_it(server, tmp_path, capsys):
    blobs, images = _eurosat_ms_blobs(np.random.default_rng(0))
    dataset = _publish(server, dl.DATASETS["eurosat_ms"], blobs)
    dest, summary = dl.download(dataset, tmp_path, mirror=server.url)
    assert dest == tmp_path / "eurosat_ms" and summary.startswith("9 chips of 3 classes: 3 train, 3 val, 3 test")
    assert sorted(os.listdir(dest)) == [dl.MARKER, "EuroSAT_MS", "labels.csv"]  # the release's deep folders gone
    marker = json.loads((dest / dl.MARKER).read_text())
    assert [f["md5"] for f in marker["files"]] == [hashlib.md5(blobs[r.file]).hexdigest() for r in dataset.files]

    from eojax.classify import data as cdata
    line = dataset.train.format(dest=dest)
    config = _classify_config_from_override(line)
    classes, sets = cdata.open_splits(config.input)
    assert classes == sorted(EUROSAT_CHIPS)
    assert {s: len(v) for s, v in sets.items()} == {"train": 3, "val": 3, "test": 3}
    assert sets["train"].band_names[-1] == "B8A"  # the eurosat_ms preset named the 13 bands
    config.input.size = 4
    train = cdata.open_splits(config.input)[1]["train"]
    for i, chip in enumerate(train.chips):
        stem = os.path.splitext(os.path.basename(chip.path))[0]
        np.testing.assert_array_equal(train[i]["pixels"], images[stem].astype(np.float32))
        assert classes[train[i]["label"]] == stem.rsplit("_", 1)[0]

    # Already there: the layout is checked again and the network is not touched.
    requests = len(server.log)
    assert dl.download(dataset, tmp_path, mirror="http://127.0.0.1:1")[0] == dest
    assert len(server.log) == requests


def test_archive_missing_a_listed_file_is_refused_and_nothing_is_left(server, tmp_path):
    blobs, _ = _eurosat_ms_blobs(np.random.default_rng(1), drop="Forest_2")
    dataset = _publish(server, dl.DATASETS["eurosat_ms"], blobs)
    refusal = r"EuroSATallBands\.zip lacks 1 of the 9 files .*EuroSAT_MS/Forest/Forest_2\.tif"
    with pytest.raises(errors.DataError, match=refusal):
        dl.download(dataset, tmp_path, mirror=server.url)
    _nothing_left(tmp_path, "eurosat_ms")
    assert (tmp_path / ".downloads" / "EuroSATallBands.zip").is_file()  # verified: reused, not fetched again


# --- HLS Burn Scars (tar.gz, sha256) ---------------------------------------------------------------------

def test_hls_burn_scars_download_and_the_seg_reader_reads_it(server, tmp_path):
    from eojax.seg import data as segdata
    rng = np.random.default_rng(2)
    members, scenes = {}, {}
    for folder, n in (("training", 3), ("validation", 1)):
        for i in range(n):
            name = f"subsetted_512x512_HLS.S30.T10SEH.20181{i}0.v1.4"
            image = rng.uniform(0, 0.3, (6, 8, 8)).astype(np.float32)
            mask = rng.integers(-1, 2, (1, 8, 8)).astype(np.int16)
            members[f"{folder}/{name}_merged.tif"] = _tif_bytes(image, "float32")
            members[f"{folder}/{name}.mask.tif"] = _tif_bytes(mask, "int16")
            scenes[f"{folder}/{name}"] = (image, mask[0])
    dataset = _publish(server, dl.DATASETS["hls_burn_scars"], {"hls_burn_scars.tar.gz": _tar_gz(members)}, "sha256")
    dest, summary = dl.download(dataset, tmp_path, mirror=server.url)
    assert summary == "2 train, 1 val, 1 test scenes"  # PANGAEA's split: ceil(10 %) of training/ is val
    assert dataset.train.format(dest=dest).endswith(f"--config.input.root={dest}")
    splits = segdata.burnscars_splits(str(dest))
    pairs = segdata.PairSet(splits["test"], num_classes=2)
    image, mask = scenes[f"validation/{os.path.basename(splits['test'][0].image)[:-len('_merged.tif')]}"]
    element = pairs.read(0)
    np.testing.assert_array_equal(element["pixels"], image)
    np.testing.assert_array_equal(element["label"], np.where(mask >= 0, mask, -1))


# --- fMoW-Sentinel (no published checksum; the release's top folder and test_gt/) -------------------------

def test_fmow_sentinel_download_and_its_reader_reads_every_split(server, tmp_path):
    from eojax.data import fmow
    rng = np.random.default_rng(6)
    members, images, csvs = {}, {}, {}
    for split, folder in (("train", "train"), ("val", "val"), ("test_gt", "test_gt")):
        rows = ["category,location_id,image_id,timestamp,polygon"]
        for cat, loc, img in (("airport", 1, 0), ("zoo", 7, 2)):
            image = rng.integers(0, 3000, (13, 4, 4)).astype(np.uint16)
            members[f"fmow-sentinel/{folder}/{cat}/{cat}_{loc}/{cat}_{loc}_{img}.tif"] = _tif_bytes(image, "uint16")
            images[(split, cat)] = image
            rows.append(f'{cat},{loc},{img},2017-06-01T10:00:00Z,"POLYGON ((0 0, 1 0, 1 1, 0 0))"')
        csvs[f"{split}.csv"] = ("\n".join(rows) + "\n").encode()
    for file, data in {"fmow-sentinel.tar.gz": _tar_gz(members), **csvs}.items():
        server.files[f"/fmow_sentinel/{file}"] = data
    dest, summary = dl.download(dl.DATASETS["fmow_sentinel"], tmp_path, mirror=server.url)
    assert summary == "2 train, 2 val, 2 test images" and not (dest / "fmow-sentinel").exists()
    for split, release in (("train", "train"), ("val", "val"), ("test", "test_gt")):
        source = fmow.FMoWSentinelSource(str(dest), split, size=4)
        element = source[1]
        keep = [fmow.FMOW_BANDS.index(b) for b in source.band_names]
        np.testing.assert_array_equal(element["pixels"], images[(release, "zoo")][keep].astype(np.float32))
        assert fmow.FMOW_CATEGORIES[element["label"]] == "zoo"
    for file in ("fmow-sentinel.tar.gz", *csvs):  # no published checksum: the first download's sha256 is kept
        assert (tmp_path / ".downloads" / f"{file}.sha256").read_text().split()[0] == hashlib.sha256(
            server.files[f"/fmow_sentinel/{file}"]).hexdigest()


# --- resume, corruption, unreachable -------------------------------------------------------------------

def _blob_dataset(data: bytes) -> dl.Dataset:
    return dl.Dataset("blob", "a test file", (dl.Remote("blob.bin", "http://unused.invalid/blob.bin",
                                                          sha256=hashlib.sha256(data).hexdigest()),),
                      prepare=lambda folder, paths: None, check=lambda folder: "ok", train="")


def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    data = np.random.default_rng(3).bytes(300_000)
    dataset = _blob_dataset(data)
    server.files["/blob/blob.bin"] = data
    server.cut["/blob/blob.bin"] = 100_000
    with pytest.raises(errors.DataError, match=r"interrupted at 100000 of 300000 bytes.*rerun the same command"):
        dl.download(dataset, tmp_path, mirror=server.url, attempts=1)
    assert (tmp_path / ".partial" / "blob.bin").stat().st_size == 100_000
    dl.download(dataset, tmp_path, mirror=server.url)
    assert server.log == [("/blob/blob.bin", None), ("/blob/blob.bin", "bytes=100000-")]  # only the rest
    assert (tmp_path / ".downloads" / "blob.bin").read_bytes() == data
    assert not (tmp_path / ".partial" / "blob.bin").exists()

    # Within one run, a transfer that breaks after making progress is resumed by itself.
    server.log.clear()
    server.cut["/blob/blob.bin"] = 250_000
    dl.download(dataclasses.replace(dataset, name="blob"), tmp_path / "again", mirror=server.url)
    assert server.log == [("/blob/blob.bin", None), ("/blob/blob.bin", "bytes=250000-")]
    assert (tmp_path / "again" / ".downloads" / "blob.bin").read_bytes() == data


def test_a_corrupted_download_is_refused_and_kept_aside(server, tmp_path):
    blobs, _ = _eurosat_ms_blobs(np.random.default_rng(4))
    dataset = _publish(server, dl.DATASETS["eurosat_ms"], blobs)
    good = blobs["EuroSATallBands.zip"]
    server.files["/eurosat_ms/EuroSATallBands.zip"] = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]
    with pytest.raises(errors.DataError) as caught:
        dl.download(dataset, tmp_path, mirror=server.url)
    message = str(caught.value)
    assert "\n" not in message and "EuroSATallBands.zip: md5" in message and "does not match the published" in message
    aside = tmp_path / ".partial" / "EuroSATallBands.zip.corrupt"
    assert aside.read_bytes() == server.files["/eurosat_ms/EuroSATallBands.zip"] and str(aside) in message
    assert not (tmp_path / ".downloads" / "EuroSATallBands.zip").exists()
    _nothing_left(tmp_path, "eurosat_ms")
    server.files["/eurosat_ms/EuroSATallBands.zip"] = good  # the mirror fixed: a rerun succeeds
    assert dl.download(dataset, tmp_path, mirror=server.url)[1].startswith("9 chips")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eojax(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k not in ("EOJAX_VERBOSE", dl.MIRROR_ENV)}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "eojax.main", *map(str, args)], env=env, capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_an_unreachable_url_is_one_clear_line(tmp_path):
    port = _closed_port()
    proc = _eojax("data", "download", "hls_burn_scars", f"--root={tmp_path}",
                  env_extra={dl.MIRROR_ENV: f"http://127.0.0.1:{port}"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == errors.DATA, proc.stderr
    url = f"http://127.0.0.1:{port}/hls_burn_scars/hls_burn_scars.tar.gz"
    assert lines[-1].startswith(f"eojax: error: cannot reach {url}: ")
    assert [line for line in lines if line.startswith("eojax: error")] == lines[-1:]
    _nothing_left(tmp_path, "hls_burn_scars")


# --- unsafe archives ------------------------------------------------------------------------------------

def _tar_with(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        ok = tarfile.TarInfo("training/a_merged.tif")
        ok.size = 3
        tf.addfile(ok, io.BytesIO(b"abc"))
        names = {"dotdot": "training/../../evil.txt", "absolute": "/tmp/eojax-evil.txt"}
        bad = tarfile.TarInfo(names.get(kind, "training/link"))
        if kind in ("dotdot", "absolute"):
            bad.size = 4
            tf.addfile(bad, io.BytesIO(b"evil"))
        else:
            bad.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            bad.linkname = "/etc/passwd" if kind == "symlink" else "../../outside"
            tf.addfile(bad)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_a_tar_member_escaping_the_folder_refuses_the_archive(server, tmp_path, kind):
    dataset = _publish(server, dl.DATASETS["hls_burn_scars"], {"hls_burn_scars.tar.gz": _tar_with(kind)}, "sha256")
    with pytest.raises(errors.DataError, match="the archive is refused"):
        dl.download(dataset, tmp_path / "root", mirror=server.url)
    _nothing_left(tmp_path / "root", "hls_burn_scars")
    assert sorted(os.listdir(tmp_path / "root")) == [".downloads", ".partial"]
    assert not os.path.exists(tmp_path / "evil.txt") and not os.path.exists("/tmp/eojax-evil.txt")


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/eojax-evil.txt", "2750/link"])
def test_a_zip_member_escaping_the_folder_or_a_link_refuses_the_archive(tmp_path, name):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("2750/Forest/Forest_1.jpg", b"jpeg")
        info = zipfile.ZipInfo(name)
        if name.endswith("link"):
            info.external_attr = (0o120777 << 16)  # a symbolic link, as Info-ZIP stores one
        zf.writestr(info, "/etc/passwd" if name.endswith("link") else "evil")
    archive = tmp_path / "EuroSAT.zip"
    archive.write_bytes(buf.getvalue())
    (tmp_path / "out").mkdir()
    with pytest.raises(errors.DataError, match="the archive is refused"):
        dl.extract(archive, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []  # the zip's members are all checked before any is written
    assert not os.path.exists(tmp_path / "evil.txt")


# --- RSICD through the command line (no published checksum: the first download's sha256 is kept) ---------

def _png(value: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_rsicd_through_the_cli_with_a_mirror_and_its_recorded_checksum(server, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from eojax.diffusion import captions
    rows = {"train": [("airport_1.jpg", 10), ("beach_2.jpg", 20)], "valid": [("forest_3.jpg", 30)],
            "test": [("river_4.jpg", 40)]}
    for split, items in rows.items():
        table = pa.table({"filename": [f for f, _ in items],
                          "captions": [[f"{f} caption {k}" for k in range(5)] for f, _ in items],
                          "image": [{"bytes": _png(v), "path": None} for _, v in items]})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        server.files[f"/rsicd/{split}-00000-of-00001.parquet"] = buf.getvalue()
    proc = _eojax("data", "download", "rsicd", f"--root={tmp_path}", f"--mirror={server.url}")
    assert proc.returncode == 0, proc.stderr
    dest = tmp_path / "rsicd"
    assert f"rsicd: ready in {dest} (2 train, 1 val, 1 test images)" in proc.stdout
    assert f"--config.input.captions={dest}/captions_train.json" in proc.stdout
    records = captions.read_captions(str(dest / "captions_train.json"))
    assert [os.path.basename(r.path) for r in records] == ["airport_1.jpg", "beach_2.jpg"]
    assert records[1].captions == tuple(f"beach_2.jpg caption {k}" for k in range(5))
    assert (dest / "images" / "forest_3.jpg").read_bytes() == _png(30)  # written as served, not re-encoded
    served = server.files["/rsicd/train-00000-of-00001.parquet"]
    record = tmp_path / ".downloads" / "train-00000-of-00001.parquet.sha256"
    assert record.read_text().split()[0] == hashlib.sha256(served).hexdigest()

    # A later check of that file against the recorded sha256: a changed copy is refused and kept aside.
    import shutil
    shutil.rmtree(dest)
    changed = tmp_path / ".downloads" / "train-00000-of-00001.parquet"
    changed.write_bytes(changed.read_bytes()[:-1] + b"\0")
    with pytest.raises(errors.DataError, match=r"sha256 \w+ does not match the recorded at its first download"):
        dl.download(dl.DATASETS["rsicd"], tmp_path, mirror=server.url)
    assert (tmp_path / ".partial" / "train-00000-of-00001.parquet.corrupt").is_file()
    _nothing_left(tmp_path, "rsicd")


# --- BigEarthNet-S2: band files -> one virtual raster per patch, 19-class multi-label CSV ----------------

def test_bigearthnet_vrt_stacks_bands_like_a_bilinear_read_and_labels_map_to_19(server, tmp_path):
    from eojax.classify import bigearthnet as ben
    from eojax.classify import data as cdata
    rng = np.random.default_rng(5)
    members, patches = {}, ["S2A_MSIL2A_20170613T101031_61_39", "S2A_MSIL2A_20170613T101031_61_40"]
    labels = {patches[0]: ["Non-irrigated arable land", "Broad-leaved forest", "Water courses"],
              patches[1]: ["Sea and ocean", "Burnt areas"]}  # Burnt areas has no BigEarthNet-19 class
    for p in patches:
        for suffix, _, side in ben.BANDS:
            members[f"{ben.RELEASE_FOLDER}/{p}/{p}_{suffix}.tif"] = _tif_bytes(
                rng.integers(0, 10000, (1, side, side)), "uint16")
        members[f"{ben.RELEASE_FOLDER}/{p}/{p}_labels_metadata.json"] = json.dumps(
            {"labels": labels[p], "coordinates": {"ulx": 500000, "uly": 4400000, "lrx": 501200, "lry": 4398800},
             "projection": 'PROJCS["WGS 84 / UTM zone 34N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",'
                           '6378137,298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],'
                           'PROJECTION["Transverse_Mercator"],PARAMETER["latitude_of_origin",0],'
                           'PARAMETER["central_meridian",21],PARAMETER["scale_factor",0.9996],'
                           'PARAMETER["false_easting",500000],PARAMETER["false_northing",0],UNIT["metre",1]]'}).encode()
    blobs = {"BigEarthNet-S2-v1.0.tar.gz": _tar_gz(members),
             "bigearthnet-train.csv": f"{patches[0]},S1A_x_61_39\n".encode(),
             "bigearthnet-val.csv": f"{patches[1]},S1A_x_61_40\n".encode(), "bigearthnet-test.csv": b""}
    dataset = _publish(server, dl.DATASETS["bigearthnet_s2"], blobs)
    dest, summary = dl.download(dataset, tmp_path, mirror=server.url)
    assert summary.startswith("2 chips of 4 classes: 1 train, 1 val, 0 test")

    classes, chips, splits = cdata.csv_chips(str(dest / "labels.csv"))
    assert [[classes[i] for i in c.labels] for c in chips] == [["Arable land", "Broad-leaved forest", "Inland waters"],
                                                               ["Marine waters"]]
    folder = dest / ben.RELEASE_FOLDER / patches[0]
    with rasterio.open(folder / f"{patches[0]}.vrt") as vrt:
        stacked, names = vrt.read(), vrt.descriptions
        assert vrt.crs.to_epsg() == 32634 and vrt.transform.a == 10.0 and vrt.transform.c == 500000
    # The reference: each band file read at 120 x 120 with bilinear resampling (torchgeo's way).
    reference = []
    for suffix, _, _ in ben.BANDS:
        with rasterio.open(folder / f"{patches[0]}_{suffix}.tif") as src:
            reference.append(src.read(1, out_shape=(120, 120), resampling=Resampling.bilinear))
    np.testing.assert_array_equal(stacked, np.stack(reference))
    assert names == tuple(n for _, n, _ in ben.BANDS) and names[8] == "B8A"
    chip_set = cdata.ChipSet(chips, size=120, num_classes=len(classes), multi_label=True)
    np.testing.assert_array_equal(chip_set[0]["pixels"], np.stack(reference).astype(np.float32))
    np.testing.assert_array_equal(chip_set[1]["labels"], [0, 0, 0, 1])  # Marine waters only


def test_data_list_and_an_unknown_dataset_name(capsys):
    assert dl.command(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("eurosat_ms", "eurosat_rgb", "hls_burn_scars", "fmow_sentinel", "rsicd", "bigearthnet_s2"):
        assert re.search(rf"^{name} ", out, re.M)
    assert "md5 5ac12b3b2557aa56e1826e981e8e200e" in out and "no published checksum" in out
    with pytest.raises(errors.ConfigError, match="did you mean 'eurosat_ms'"):
        dl.command(["download", "eurosat"], "/tmp")
