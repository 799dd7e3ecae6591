"""Sensor registry: what a band name means, per sensor.

A band name alone is sensor-blind: 'B5' is Sentinel-2's red edge at 0.704 um, Landsat 8's NIR at
0.865 um and Landsat 7's SWIR at 1.65 um. Each sensor here lists its bands with their native name,
centre wavelength and width (micrometres) and STAC `eo:common_name`, and inputs name their sensor
(`input.sensor`) or have it found (`detect`: Landsat MTL files beside the data, HLS / Landsat /
Sentinel-2 product file names, GeoTIFF band descriptions and tags, or band names only one family of
sensors has).

    sensors.get("landsat8").title                      -> 'Landsat 8 OLI-TIRS'
    sensors.band("landsat8", "B5")                      -> Band('landsat8', 'B5', 'nir08', 0.865, 0.03)
    sensors.resolve(["B2", "B8A"])                      -> Sentinel-2A bands (only Sentinel-2 has B8A)
    sensors.resolve(["B5"])                             -> ValueError naming the choices
    sensors.resolve(["B5", "nir08"], sensor="landsat8")  -> [landsat8 B5, landsat8 B5]

Names are matched case-insensitively, with zero padding ('B05' = 'B5') and the Landsat Collection-2
prefixes SR_ / ST_ removed. Common names (and HLS's colour names BLUE ... SWIR_2, Prithvi's) name a
band of the given sensor, or, without a sensor, a sensor-less Band that has no wavelength.

Sensors sharing band designations form a family ('sentinel2': S2A, S2B, HLS S30; 'oli': Landsat 8,
9, HLS L30; 'tm': Landsat 7 ETM+, Landsat 4-5 TM): a name that every sensor having it uses within one
family is unambiguous without a sensor, and resolves to the family's first sensor here.

Sources (values as published; centre = middle of the published range where a range is given):
- Sentinel-2A / 2B MSI: ESA, Sentinel-2 Spectral Response Functions (S2-SRF,
  COPE-GSEG-EOPG-TN-15-0007, v3.0), central wavelength and bandwidth per satellite, as tabulated in
  the Sentinel-2 MSI User Guide ("Radiometric resolution / spectral bands").
- Landsat: USGS, "What are the band designations for the Landsat satellites?" (Landsat 8-9
  OLI-TIRS, Landsat 7 ETM+, Landsat 4-5 TM band ranges in micrometres).
- HLS v2.0: NASA HLS Product User Guide v2.0, Table of S30 / L30 bands. S30's coastal, blue,
  green, red, NIR narrow and SWIR bands are adjusted to OLI's bandpasses (hence OLI's ranges); its
  red edge, NIR broad, water vapour and cirrus bands keep MSI's.
- Common names: STAC eo extension `eo:common_name` (S2 B9 is 'nir09'; the TM / ETM+ thermal band,
  which spans both TIRS bands, is 'lwir').
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Iterable, Sequence

COMMON_NAMES = ("coastal", "blue", "green", "red", "rededge", "nir", "nir08", "nir09", "cirrus",
                "swir16", "swir22", "pan", "lwir", "lwir11", "lwir12")
# Other names of common names: HLS's (Prithvi's) colour names.
COMMON_ALIASES = {"NIR_NARROW": "nir08", "SWIR_1": "swir16", "SWIR_2": "swir22", "SWIR1": "swir16",
                  "SWIR2": "swir22"}
# What a run whose data spec predates the sensor registry meant by its band names.
LEGACY_SENSOR = "sentinel2a"


@dataclasses.dataclass(frozen=True)
class Band:
    sensor: str  # registry name; '' for a bare common name given without a sensor
    name: str  # native name ('B8A'); the common name for a sensor-less band
    common_name: str | None
    centre_um: float | None  # None only for a sensor-less band
    width_um: float | None

    def describe(self) -> str:
        where = f"{self.sensor} {self.name}" if self.sensor else self.name
        wave = f" {self.centre_um:.3f} um" if self.centre_um is not None else ""
        return f"{where} ({self.common_name}{wave})"


@dataclasses.dataclass(frozen=True)
class Sensor:
    name: str
    title: str
    family: str  # sensors of one family share band designations
    bands: tuple[Band, ...]
    aliases: tuple[str, ...] = ()

    def band(self, name: str) -> Band | None:
        native = native_name(name)
        return next((b for b in self.bands if b.name == native), None)


def _centred(sensor, rows):
    """(name, common name, centre, width) rows -> Bands."""
    return tuple(Band(sensor, n, c, float(centre), float(width)) for n, c, centre, width in rows)


def _ranged(sensor, rows):
    """(name, common name, low, high) rows (micrometres) -> Bands centred in the range."""
    return tuple(Band(sensor, n, c, round((lo + hi) / 2, 6), round(hi - lo, 6)) for n, c, lo, hi in rows)


_S2_COMMON = ("coastal", "blue", "green", "red", "rededge", "rededge", "rededge", "nir", "nir08", "nir09",
              "cirrus", "swir16", "swir22")
_S2_NAMES = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12")
# ESA S2-SRF v3.0: (centre, bandwidth) in nm, S2A then S2B.
_S2A_NM = ((442.7, 21), (492.4, 66), (559.8, 36), (664.6, 31), (704.1, 15), (740.5, 15), (782.8, 20),
           (832.8, 106), (864.7, 21), (945.1, 20), (1373.5, 31), (1613.7, 91), (2202.4, 175))
_S2B_NM = ((442.2, 21), (492.1, 66), (559.0, 36), (664.9, 31), (703.8, 16), (739.1, 15), (779.7, 20),
           (832.9, 106), (864.0, 22), (943.2, 21), (1376.9, 30), (1610.4, 94), (2185.7, 185))
# USGS band designations (micrometres).
_OLI = (("B1", "coastal", 0.43, 0.45), ("B2", "blue", 0.45, 0.51), ("B3", "green", 0.53, 0.59),
        ("B4", "red", 0.64, 0.67), ("B5", "nir08", 0.85, 0.88), ("B6", "swir16", 1.57, 1.65),
        ("B7", "swir22", 2.11, 2.29), ("B8", "pan", 0.50, 0.68), ("B9", "cirrus", 1.36, 1.38),
        ("B10", "lwir11", 10.60, 11.19), ("B11", "lwir12", 11.50, 12.51))
_ETM = (("B1", "blue", 0.45, 0.52), ("B2", "green", 0.52, 0.60), ("B3", "red", 0.63, 0.69),
        ("B4", "nir08", 0.77, 0.90), ("B5", "swir16", 1.55, 1.75), ("B6", "lwir", 10.40, 12.50),
        ("B7", "swir22", 2.09, 2.35), ("B8", "pan", 0.52, 0.90))
_TM = (("B1", "blue", 0.45, 0.52), ("B2", "green", 0.52, 0.60), ("B3", "red", 0.63, 0.69),
       ("B4", "nir08", 0.76, 0.90), ("B5", "swir16", 1.55, 1.75), ("B6", "lwir", 10.40, 12.50),
       ("B7", "swir22", 2.08, 2.35))
# HLS v2.0 User Guide (micrometres).
_S30 = (("B1", "coastal", 0.43, 0.45), ("B2", "blue", 0.45, 0.51), ("B3", "green", 0.53, 0.59),
        ("B4", "red", 0.64, 0.67), ("B5", "rededge", 0.69, 0.71), ("B6", "rededge", 0.73, 0.75),
        ("B7", "rededge", 0.77, 0.79), ("B8", "nir", 0.78, 0.88), ("B8A", "nir08", 0.85, 0.88),
        ("B9", "nir09", 0.93, 0.95), ("B10", "cirrus", 1.36, 1.38), ("B11", "swir16", 1.57, 1.65),
        ("B12", "swir22", 2.11, 2.29))
_L30 = tuple(r for r in _OLI if r[0] != "B8")  # no panchromatic band


def _s2(sensor, table):
    return _centred(sensor, [(n, c, nm / 1000, w / 1000) for n, c, (nm, w) in zip(_S2_NAMES, _S2_COMMON, table)])


SENSORS: dict[str, Sensor] = {s.name: s for s in (
    Sensor("sentinel2a", "Sentinel-2A MSI", "sentinel2", _s2("sentinel2a", _S2A_NM),
           ("s2a", "s2", "sentinel2", "msi")),
    Sensor("sentinel2b", "Sentinel-2B MSI", "sentinel2", _s2("sentinel2b", _S2B_NM), ("s2b",)),
    Sensor("landsat8", "Landsat 8 OLI-TIRS", "oli", _ranged("landsat8", _OLI), ("l8", "lc08", "lc8")),
    Sensor("landsat9", "Landsat 9 OLI-TIRS", "oli", _ranged("landsat9", _OLI), ("l9", "lc09", "lc9")),
    Sensor("landsat7", "Landsat 7 ETM+", "tm", _ranged("landsat7", _ETM), ("l7", "le07", "le7", "etm+", "etm")),
    Sensor("landsat5", "Landsat 4-5 TM", "tm", _ranged("landsat5", _TM),
           ("landsat4", "landsat45", "l5", "l4", "lt05", "lt04", "tm")),
    Sensor("hls_s30", "HLS S30 (Sentinel-2 MSI, harmonised)", "sentinel2", _ranged("hls_s30", _S30),
           ("s30", "hlss30")),
    Sensor("hls_l30", "HLS L30 (Landsat 8-9 OLI-TIRS, harmonised)", "oli", _ranged("hls_l30", _L30),
           ("l30", "hlsl30")),
)}


def _key(name: str) -> str:
    return re.sub(r"[\s_.\-]", "", str(name).lower())


_LOOKUP = {_key(k): s.name for s in SENSORS.values() for k in (s.name, *s.aliases)}


def names() -> tuple[str, ...]:
    return tuple(SENSORS)


def get(name: str) -> Sensor:
    """The sensor called `name` (or one of its aliases, case, '-', '_', '.' and spaces ignored)."""
    found = _LOOKUP.get(_key(name))
    if found is None:
        raise ValueError(f"unknown sensor {name!r}; known: {', '.join(SENSORS)} (or aliases such as "
                         "s2, l8, tm)")
    return SENSORS[found]


def native_name(name: str) -> str:
    """'b05' / 'B05' / 'SR_B5' -> 'B5'; anything else upper-cased and stripped."""
    up = str(name).strip().upper()
    m = re.fullmatch(r"(?:SR_|ST_|TOA_)?B0*(\d{1,2}A?)", up)
    return f"B{m.group(1)}" if m else up


def common_name(name: str) -> str | None:
    """The STAC common name that `name` is (or is an alias of), else None."""
    low = str(name).strip().lower()
    return low if low in COMMON_NAMES else COMMON_ALIASES.get(low.upper())


def band(sensor: str, band_name: str) -> Band:
    """One band of one sensor, by native or common name."""
    return _in_sensor(str(band_name), get(sensor), strict=True)


def _with_native(native: str) -> list[Band]:
    return [b for s in SENSORS.values() for b in s.bands if b.name == native]


def known(name: str) -> bool:
    """Whether the registry knows `name` (a native band name of some sensor, or a common name)."""
    return common_name(name) is not None or bool(_with_native(native_name(name)))


def _listing(sensor: Sensor) -> str:
    return ", ".join(f"{b.name} {b.common_name}" for b in sensor.bands)


def _in_sensor(name: str, sensor: Sensor, strict: bool) -> Band | None:
    found = sensor.band(name)
    if found is not None:
        return found
    cn = common_name(name)
    if cn is not None:
        hits = [b for b in sensor.bands if b.common_name == cn]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise ValueError(f"{sensor.name} has {len(hits)} {cn} bands "
                             f"({', '.join(b.describe() for b in hits)}): name one by its band name")
        raise ValueError(f"{sensor.name} has no {cn} band ({name!r}); its bands: {_listing(sensor)}")
    if strict or _with_native(native_name(name)):
        raise ValueError(f"{sensor.name} has no band {name!r}; its bands: {_listing(sensor)}")
    return None


def _choices(native: str) -> dict[str, list[Band]]:
    """family -> the bands called `native` in it, for the families that have one."""
    out: dict[str, list[Band]] = {}
    for b in _with_native(native):
        out.setdefault(SENSORS[b.sensor].family, []).append(b)
    return out


def resolve(band_names: Iterable[str], sensor: str | None = None, *, strict: bool = True
            ) -> list[Band | None]:
    """The registry's Band for each name, of `sensor` when given.

    Without a sensor: the sensor the names identify (`detect_from_names`: e.g. any set with B8A is
    Sentinel-2's), else each name on its own: a common name is a sensor-less Band (no wavelength),
    a native name must mean one family's band, and a name that means different bands in different
    families ('B5') is an error naming the choices. strict=False gives None for names the registry
    does not know at all (e.g. 'VV', 'band1') instead of an error.
    """
    band_names = [str(b) for b in band_names]
    sensor = sensor or detect_from_names(band_names)
    if sensor:
        s = get(sensor)
        return [_in_sensor(n, s, strict) for n in band_names]
    out, ambiguous = [], []
    for n in band_names:
        cn, choices = common_name(n), _choices(native_name(n))
        if cn is not None:
            out.append(Band("", cn, cn, None, None))
        elif len(choices) == 1:
            out.append(next(iter(choices.values()))[0])
        elif choices:
            ambiguous.append(n)
            out.append(None)
        elif strict:
            raise ValueError(f"band {n!r} is not a band name of any sensor ({', '.join(SENSORS)}) nor a "
                             f"common name ({', '.join(COMMON_NAMES)})")
        else:
            out.append(None)
    if ambiguous:
        raise ValueError(ambiguity_message(ambiguous))
    return out


def ambiguity_message(ambiguous: Sequence[str]) -> str:
    first = ambiguous[0]
    parts = []
    for family, bands in _choices(native_name(first)).items():
        b = bands[0]
        parts.append(f"{'/'.join(x.sensor for x in bands)} {b.common_name} {b.centre_um:.3f} um")
    more = f" (so are {', '.join(repr(a) for a in ambiguous[1:])})" if len(ambiguous) > 1 else ""
    return (f"band {first!r} is ambiguous without a sensor{more}: {'; '.join(parts)}. Name the sensor "
            f"(input.sensor, or sensor= of the encoder): one of {', '.join(SENSORS)}")


# --------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------
def detect_from_names(band_names: Iterable[str]) -> str | None:
    """The sensor a set of band names identifies: the first sensor of the one family whose sensors
    all have every native name given ('B8A' only in Sentinel-2's); None when the names fit several
    families or none. Common names and names no sensor has are not evidence."""
    natives = {native_name(n) for n in band_names if common_name(n) is None}
    natives = {n for n in natives if _with_native(n)}
    if not natives:
        return None
    fits = [s for s in SENSORS.values() if all(s.band(n) is not None for n in natives)]
    families = {s.family for s in fits}
    return fits[0].name if len(families) == 1 else None


# A sensor named in free text (descriptions, tags, MTL values, file names).
_MENTIONS = (
    (re.compile(r"HLS[ ._]?S30", re.I), "hls_s30"),
    (re.compile(r"HLS[ ._]?L30", re.I), "hls_l30"),
    (re.compile(r"sentinel[ _-]?2[ _-]?A\b|\bS2A\b", re.I), "sentinel2a"),
    (re.compile(r"sentinel[ _-]?2[ _-]?B\b|\bS2B\b", re.I), "sentinel2b"),
    (re.compile(r"landsat[ _-]?0?([4-9])\b", re.I), None),  # landsat<n>
)


def mentioned_sensor(text: str) -> str | None:
    """The registry sensor a free-text string names ('Landsat 8', 'LANDSAT_9', 'Sentinel-2B',
    'HLS S30'), else None. A plain 'Sentinel-2' names no one satellite: None."""
    text = str(text)
    for pattern, name in _MENTIONS:
        m = pattern.search(text)
        if m:
            return name or _landsat(int(m.group(1)), text)
    return None


def _landsat(number: int, sensor_id: str = "") -> str:
    if "MSS" in sensor_id.upper() and number <= 5:
        raise ValueError(f"Landsat {number} MSS is not in eojax's sensor registry ({', '.join(SENSORS)})")
    return {8: "landsat8", 9: "landsat9", 7: "landsat7", 6: "landsat5", 5: "landsat5", 4: "landsat5"}[number]


def detect_from_mtl(path: str) -> str | None:
    """The sensor a Landsat MTL file (.txt ODL, .xml or .json; Collection 1 or 2) names in
    SPACECRAFT_ID / SENSOR_ID."""
    with open(path, errors="replace") as f:
        text = f.read()
    craft = re.search(r"SPACECRAFT_ID\W+LANDSAT_?(\d)", text)
    if craft is None:
        return None
    sensor_id = re.search(r"SENSOR_ID\W+([A-Z_+]+)", text)
    return _landsat(int(craft.group(1)), sensor_id.group(1) if sensor_id else "")


def _mtl_files(directory: str) -> tuple[str, ...]:
    pats = ("*MTL.txt", "*MTL.xml", "*MTL.json", "*mtl.txt")
    return tuple(sorted({p for pat in pats for p in glob.glob(os.path.join(glob.escape(directory), pat))}))


def mtl_beside(path: str) -> str | None:
    """The Landsat MTL file of a data file: in its folder, the one whose scene prefix starts the
    data file's name, else the folder's only MTL file; None when there is none or it is unclear."""
    directory, base = os.path.split(os.path.abspath(path))
    mtls = _mtl_files(directory)
    own = [m for m in mtls if base.startswith(re.sub(r"_?MTL\.\w+$", "", os.path.basename(m), flags=re.I))]
    if len(own) == 1:
        return own[0]
    return mtls[0] if len(mtls) == 1 else None


# Product file names: HLS.S30.* / HLS.L30.*; Landsat product / scene IDs (LC08_..., LC8...,
# LE07_..., LT05_...: sensor letter, mission number); Sentinel-2 products (S2A_MSIL2A_...).
_LANDSAT_ID = re.compile(r"^L([COTE])0?([4-9])(?:_|\d{6})")
_S2_ID = re.compile(r"^S2([AB])_MSI")


def detect_from_filename(path: str) -> str | None:
    base = os.path.basename(str(path))
    hls = re.search(r"HLS\.([SL])30\.", base)
    if hls:
        return f"hls_{hls.group(1).lower()}30"
    m = _LANDSAT_ID.match(base)
    if m:
        letter, number = m.group(1), int(m.group(2))
        if number in (4, 5) and letter == "T" or number == 7 and letter == "E" or number >= 8:
            return _landsat(number)
    s2 = _S2_ID.match(base)
    return f"sentinel2{s2.group(1).lower()}" if s2 else None


def detect_from_descriptions(descriptions: Iterable[str], tags: dict | None = None) -> str | None:
    """From a GeoTIFF's band descriptions and dataset tags: a sensor they name ('Landsat 8 SR B5',
    tag SENSOR='Sentinel-2A'), else the sensor the descriptions identify as band names."""
    descriptions = [d for d in descriptions if d]
    return _named_in(descriptions, tags) or detect_from_names(descriptions)


def _named_in(descriptions: Sequence[str], tags: dict | None) -> str | None:
    texts = list(descriptions) + [f"{k}={v}" for k, v in (tags or {}).items()
                                  if re.search(r"sensor|spacecraft|platform|satellite", k, re.I)]
    found = {s for s in map(mentioned_sensor, texts) if s}
    if len(found) > 1:
        raise ValueError(f"the band descriptions / tags name several sensors: {sorted(found)}")
    return found.pop() if found else None


def detect_from_geotiff(path: str) -> str | None:
    """detect_from_descriptions on a GeoTIFF's band descriptions and dataset tags."""
    descriptions, tags = _geotiff_text(path)
    return detect_from_descriptions(descriptions, tags)


def _geotiff_text(path: str) -> tuple[list[str], dict]:
    import rasterio
    with rasterio.open(path) as src:
        return [d or "" for d in src.descriptions], src.tags()


def detect(paths: Iterable[str], band_names: Iterable[str] = ()) -> str | None:
    """The sensor of a scene from its files: an MTL file beside them, their product file names, a
    sensor their descriptions / tags name, in that order of trust (an HLS S30 file's tags name the
    Sentinel-2 satellite it came from: its file name wins); only then the band names and descriptions
    as names (which give a family's first sensor). File evidence of different families is an error
    naming each source."""
    found: list[tuple[str, str]] = []  # (sensor, where), most trusted first
    names = list(band_names)
    for p in paths:
        p = str(p)
        mtl = mtl_beside(p)
        sources = [(mtl, detect_from_mtl(mtl) if mtl else None), (p, detect_from_filename(p))]
        if os.path.isfile(p) and p.lower().endswith((".tif", ".tiff")):
            descriptions, tags = _geotiff_text(p)
            sources.append((f"{p} (band descriptions / tags)", _named_in(descriptions, tags)))
            names += descriptions
        found += [(sensor, where) for where, sensor in sources if sensor]
    if len({SENSORS[s].family for s, _ in found}) > 1:
        raise ValueError("the data's files name sensors of different families: "
                         + "; ".join(f"{s} ({w})" for s, w in dict(found).items()) + ". Set input.sensor")
    return found[0][0] if found else detect_from_names(names)
