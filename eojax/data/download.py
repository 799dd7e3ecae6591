"""Dataset downloads: `eojax data download NAME --root DIR` and `eojax data list`.

Each entry of DATASETS names its remote files (URL, the checksum its publisher or torchgeo lists, the
size when known), how to arrange them into the layout an eojax reader reads, and the check that the
reader finds every file it lists. Under --root:

  .partial/<file>          a download in progress; a rerun resumes it with an HTTP Range request
  .partial/<file>.corrupt  a download whose checksum or size was wrong: kept aside, never used
  .downloads/<file>        verified downloads (archives, split lists); `<file>.sha256` beside a file
                           with no published checksum holds its first download's sha256 (checked later)
  <name>/                  the dataset in the readers' layout, with .eojax-download.json
  .tmp-<name>/             extraction in progress, renamed to <name>/ once checked

A folder `<name>/` with its marker is done: a rerun checks its layout again and touches no network;
verified files in .downloads/ are reused without the network. Archives are unpacked only after their
checksum matched, member by member: an absolute path, a `..`, a link or a device file refuses the
whole archive, and a failure anywhere removes .tmp-<name>/, so nothing half written is left in place.

EOJAX_DATA_MIRROR=URL (or --mirror=URL) fetches `<URL>/<name>/<file>` instead of each file's own URL.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import difflib
import json
import os
import pathlib
import shutil
import sys
from typing import Callable

from eojax.data.fetch import MIRROR_ENV, Remote, extract, obtain
from eojax.errors import ConfigError, DataError

MARKER = ".eojax-download.json"


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    about: str  # one line: what it is, where it comes from
    files: tuple[Remote, ...]
    prepare: Callable  # (folder being built, {file: downloaded path}) -> None: the readers' layout
    check: Callable  # (folder) -> a summary line; raises DataError when the reader would miss a file
    train: str  # the command that trains on it; {dest} is the dataset folder


# --- one dataset -------------------------------------------------------------------------------------

def url_for(dataset: Dataset, remote: Remote, mirror: str = "") -> str:
    mirror = mirror or os.environ.get(MIRROR_ENV, "")
    return f"{mirror.rstrip('/')}/{dataset.name}/{remote.file}" if mirror else remote.url


def download(dataset: Dataset, root, *, mirror: str = "", attempts: int = 3, timeout: float = 60.0) -> tuple:
    """Downloads, verifies and unpacks `dataset` into <root>/<name> -> (folder, summary line)."""
    root = pathlib.Path(root).absolute()
    dest = root / dataset.name
    if (dest / MARKER).is_file():
        return dest, dataset.check(dest)
    if dest.exists():
        raise DataError(f"{dest} exists but was not written by `eojax data download` (no {MARKER}); "
                        "move it away or choose another --root")
    root.mkdir(parents=True, exist_ok=True)
    paths, checked = {}, []
    for remote in dataset.files:
        paths[remote.file], info = obtain(remote, url_for(dataset, remote, mirror), root, attempts=attempts,
                                          timeout=timeout)
        checked.append(dict(info, url=url_for(dataset, remote, mirror)))
    tmp = root / f".tmp-{dataset.name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that was killed
    tmp.mkdir()
    try:
        for remote in dataset.files:
            if remote.archive:
                print(f"eojax data: unpacking {remote.file}", file=sys.stderr)
                extract(paths[remote.file], tmp)
        dataset.prepare(tmp, paths)
        summary = dataset.check(tmp)
        (tmp / MARKER).write_text(json.dumps({
            "dataset": dataset.name, "files": checked, "summary": summary,
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, indent=1))
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest, summary


def get(name: str) -> Dataset:
    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown dataset {name!r}; {hint}`eojax data list` shows them: {', '.join(DATASETS)}")
    return DATASETS[name]


def command(words: list[str], root: str = "", mirror: str = "") -> int:
    """`eojax data list [--root=DIR]` and `eojax data download NAME --root=DIR [--mirror=URL]`."""
    if words == ["list"]:
        for ds in DATASETS.values():
            state = ""
            if root:
                done = (pathlib.Path(root) / ds.name / MARKER).is_file()
                state = "  [downloaded]" if done else "  [not downloaded]"
            print(f"{ds.name:<16}{ds.about}{state}")
            for r in ds.files:
                check = (" ".join(r.checksum) if r.checksum else
                         "no published checksum (the first download's sha256 is recorded)")
                size = f"{r.size:,} bytes, " if r.size else ""
                print(f"{'':<18}{r.file}: {size}{check}")
        return 0
    if len(words) != 2 or words[0] != "download":
        raise ConfigError("usage: eojax data download NAME --root=DIR [--mirror=URL], or eojax data list")
    dataset = get(words[1])
    if not root:
        raise ConfigError("eojax data download needs --root=DIR (the dataset goes to DIR/" + dataset.name + ")")
    dest, summary = download(dataset, root, mirror=mirror)
    print(f"{dataset.name}: ready in {dest} ({summary})")
    print("train on it: " + dataset.train.format(dest=dest))
    return 0


# --- the readers' layouts ----------------------------------------------------------------------------

def _missing_error(source: str, missing: list, total: int) -> DataError:
    return DataError(f"{source} lacks {len(missing)} of the {total} files it should hold, e.g. {missing[0]}; refused")


def _eurosat(release_folder: str, new_folder: str, suffix: str) -> Callable:
    """EuroSAT's class folders moved to <new_folder>/, and labels.csv (path, label, split) from the
    split lists of "In-domain representation learning for remote sensing" (the ones torchgeo uses)."""
    def prepare(folder: pathlib.Path, paths: dict) -> None:
        archive = next(p for p in paths.values() if p.suffix == ".zip")
        release = folder / release_folder
        if not release.is_dir():
            raise DataError(f"{archive.name} has no {release_folder}/ folder of class folders; refused")
        release.rename(folder / new_folder)
        top = pathlib.Path(release_folder).parts[0]
        if top != new_folder and (folder / top).exists():
            shutil.rmtree(folder / top)
        rows, missing, total = [], [], 0
        for split in ("train", "val", "test"):
            listing = paths[f"eurosat-{split}.txt"]
            for line in listing.read_text().split():
                stem = os.path.splitext(line)[0]
                label = stem.rsplit("_", 1)[0]
                rel = f"{new_folder}/{label}/{stem}{suffix}"
                total += 1
                if not (folder / rel).is_file():
                    missing.append(rel)
                rows.append((rel, label, split))
        if missing:
            raise _missing_error(archive.name, missing, total)
        with open(folder / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label", "split"), *rows])
    return prepare


def _check_csv(folder: pathlib.Path) -> str:
    from eojax.classify import data as cdata
    table = folder / "labels.csv"
    if not table.is_file():
        raise DataError(f"{table} is missing")
    try:
        classes, chips, splits = cdata.csv_chips(str(table))
    except ValueError as e:
        raise DataError(str(e)) from None
    missing = [c.path for c in chips if not os.path.isfile(c.path)]
    if missing:
        raise _missing_error(str(folder), missing, len(chips))
    counts = {s: (splits or []).count(s) for s in cdata.SPLITS}
    return f"{len(chips)} chips of {len(classes)} classes: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def _burnscars_prepare(folder: pathlib.Path, paths: dict) -> None:
    for split in ("training", "validation"):
        if not (folder / split).is_dir():
            raise DataError(f"hls_burn_scars.tar.gz has no {split}/ folder; refused")


def _burnscars_check(folder: pathlib.Path) -> str:
    from eojax.seg import data as segdata
    try:
        splits = segdata.burnscars_splits(str(folder))
    except FileNotFoundError as e:
        raise DataError(f"HLS Burn Scars in {folder}: {e}") from None
    return ", ".join(f"{len(v)} {k}" for k, v in splits.items()) + " scenes"


def _hoist(folder: pathlib.Path, top: str) -> None:
    """The contents of folder/top moved up into folder (a release's own top folder)."""
    inner = folder / top
    if inner.is_dir():
        for entry in inner.iterdir():
            entry.rename(folder / entry.name)
        inner.rmdir()


def _fmow_prepare(folder: pathlib.Path, paths: dict) -> None:
    _hoist(folder, "fmow-sentinel")
    for name in ("train.csv", "val.csv", "test_gt.csv"):
        shutil.copyfile(paths[name], folder / name)


def _fmow_check(folder: pathlib.Path) -> str:
    from eojax.data import fmow
    counts = []
    for split in ("train", "val", "test"):
        source = fmow.FMoWSentinelSource(str(folder), split)
        missing = [p for p in map(source.path, range(len(source))) if not os.path.isfile(p)]
        if missing:
            raise _missing_error(f"fMoW-Sentinel {split} ({source.csv_path})", missing, len(source))
        counts.append(f"{len(source)} {split}")
    return ", ".join(counts) + " images"


RSICD_SPLITS = {"train": "train", "valid": "val", "test": "test"}  # the parquet files' names -> eojax's


def _rsicd_prepare(folder: pathlib.Path, paths: dict) -> None:
    """The parquet files' images written as they are into images/, captions as COCO-style
    captions_<split>.json (eojax.diffusion.captions reads them), one per official split."""
    import pyarrow.parquet as pq
    images = folder / "images"
    images.mkdir()
    next_id = 0
    for hf_split, split in RSICD_SPLITS.items():
        path = paths[f"{hf_split}-00000-of-00001.parquet"]
        coco = {"images": [], "annotations": []}
        try:
            table = pq.ParquetFile(path)
            columns = set(table.schema_arrow.names)
            if not {"captions", "image"} <= columns:
                raise DataError(f"{path.name} has columns {sorted(columns)}; RSICD's are filename, captions, image")
            for batch in table.iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    name = row.get("filename") or (row["image"] or {}).get("path") or ""
                    if not name or os.path.basename(name) != name or name in (".", ".."):
                        raise DataError(f"{path.name}: image file name {name!r} is not a plain file name; refused")
                    data = (row["image"] or {}).get("bytes")
                    if not data:
                        raise DataError(f"{path.name}: image {name} has no bytes")
                    (images / name).write_bytes(data)
                    coco["images"].append({"id": next_id, "file_name": name})
                    coco["annotations"] += [{"image_id": next_id, "caption": c} for c in row["captions"]]
                    next_id += 1
        except (OSError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path.name}: not a readable parquet file ({e})") from None
        (folder / f"captions_{split}.json").write_text(json.dumps(coco))


def _rsicd_check(folder: pathlib.Path) -> str:
    from eojax.diffusion import captions
    counts = []
    for split in RSICD_SPLITS.values():
        try:
            counts.append(f"{len(captions.read_captions(str(folder / f'captions_{split}.json')))} {split}")
        except FileNotFoundError as e:
            raise DataError(f"RSICD in {folder}: {e}") from None
    return ", ".join(counts) + " images"


def _bigearthnet_prepare(folder: pathlib.Path, paths: dict) -> None:
    from eojax.classify import bigearthnet
    bigearthnet.write_table(folder, {s: paths[f"bigearthnet-{s}.csv"] for s in ("train", "val", "test")})


# --- the registry: URLs and checksums as torchgeo and the other cited code list them ------------------

_EUROSAT_HF = "https://hf.co/datasets/torchgeo/eurosat/resolve/1ce6f1bfb56db63fd91b6ecc466ea67f2509774c/"
_EUROSAT_SPLITS = tuple(Remote(f"eurosat-{s}.txt", _EUROSAT_HF + f"eurosat-{s}.txt", md5=m) for s, m in (
    ("train", "908f142e73d6acdf3f482c5e80d851b1"), ("val", "95de90f2aa998f70a3b2416bfe0687b4"),
    ("test", "7ae5ab94471417b6e315763121e67c5f")))
_EUROSAT_RGB = ("https://huggingface.co/datasets/torchgeo/eurosat/resolve/"
                "c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip")  # torchvision's
_HLS = ("https://huggingface.co/datasets/ibm-nasa-geospatial/hls_burn_scars/resolve/"
        "1864285e25010d346a842e4f068b1a1d4248ed6d/hls_burn_scars.tar.gz")
_FMOW = "https://stacks.stanford.edu/file/druid:vg497cb6002/"
_RSICD = "https://huggingface.co/datasets/arampacha/rsicd/resolve/main/data/"
_BEN = "https://zenodo.org/records/12687186/files/BigEarthNet-S2-v1.0.tar.gz"
_BEN_SPLITS = ("https://git.tu-berlin.de/rsim/BigEarthNet-MM_19-classes_models/-/raw/"
               "9a5be07346ab0884b2d9517475c27ef9db9b5104/splits/{}.csv?inline=false")
_TRAIN = "eojax train --workdir=RUN --config=configs/"
_CLASSIFY_CSV = _TRAIN + "classify.py:data=csv --config.input.csv={dest}/labels.csv"

DATASETS = {ds.name: ds for ds in (
    Dataset("eurosat_ms", "EuroSAT, 13-band Sentinel-2 GeoTIFFs (27,000 64-px chips, 10 classes), torchgeo's copy",
            (Remote("EuroSATallBands.zip", _EUROSAT_HF + "EuroSATallBands.zip", md5="5ac12b3b2557aa56e1826e981e8e200e",
                    archive=True), *_EUROSAT_SPLITS),
            _eurosat("ds/images/remote_sensing/otherDatasets/sentinel_2/tif", "EuroSAT_MS", ".tif"), _check_csv,
            _CLASSIFY_CSV + " --config.input.preset=eurosat_ms"),
    Dataset("eurosat_rgb", "EuroSAT, RGB JPEGs (27,000 64-px chips, 10 classes), torchvision's copy",
            (Remote("EuroSAT.zip", _EUROSAT_RGB, md5="c8fa014336c82ac7804f0398fcb19387", archive=True),
             *_EUROSAT_SPLITS),
            _eurosat("2750", "EuroSAT_RGB", ".jpg"), _check_csv, _CLASSIFY_CSV + " --config.input.preset=eurosat_rgb"),
    Dataset("hls_burn_scars", "HLS Burn Scars (NASA / IBM): 804 512-px HLS scenes with burn-scar masks",
            (Remote("hls_burn_scars.tar.gz", _HLS, size=2_645_552_531, archive=True,
                    sha256="4e6f99a75cb2c500547b20662a15cbd531dc421376f815e91846ea542798e8e6"),),
            _burnscars_prepare, _burnscars_check, _TRAIN + "seg.py --config.input.root={dest}"),
    Dataset("fmow_sentinel", "fMoW-Sentinel (SatMAE): 13-band Sentinel-2 images of 62 fMoW categories, ~78 GB",
            (Remote("fmow-sentinel.tar.gz", _FMOW + "fmow-sentinel.tar.gz", archive=True),
             *(Remote(f, _FMOW + f) for f in ("train.csv", "val.csv", "test_gt.csv"))),
            _fmow_prepare, _fmow_check, _TRAIN + "classify.py --config.input.root={dest}"),
    Dataset("rsicd", "RSICD: 10,921 224-px images with 5 captions each (the arampacha/rsicd parquet copy)",
            tuple(Remote(f"{s}-00000-of-00001.parquet", _RSICD + f"{s}-00000-of-00001.parquet") for s in RSICD_SPLITS),
            _rsicd_prepare, _rsicd_check, _TRAIN + "diffusion.py --config.input.captions={dest}/captions_train.json"),
    Dataset("bigearthnet_s2", "BigEarthNet-S2 v1.0: 590,326 Sentinel-2 patches, BigEarthNet-19 multi-label, ~66 GB",
            (Remote("BigEarthNet-S2-v1.0.tar.gz", _BEN, md5="5a64e9ce38deb036a435a7b59494924c", archive=True),
             *(Remote(f"bigearthnet-{s}.csv", _BEN_SPLITS.format(s), md5=m) for s, m in (
                 ("train", "623e501b38ab7b12fe44f0083c00986d"), ("val", "22efe8ed9cbd71fa10742ff7df2b7978"),
                 ("test", "697fb90677e30571b9ac7699b7e5b432")))),
            _bigearthnet_prepare, _check_csv,
            _CLASSIFY_CSV + " --config.input.multi_label=True --config.input.sensor=sentinel2a"),
)}
