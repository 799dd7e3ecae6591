"""STAC items as inputs: an item's assets mapped onto the requested bands (pystac: `eojax[stac]`).

An item is a JSON file or URL (`*.json`, or any path or URL prefixed `stac:`). Each requested band is
looked up among the item's assets, first by name: the key of a one-band asset, or the `name` of an
`eo:bands` entry (STAC 1.0) or `bands` entry (STAC 1.1), case and zero padding ignored ('B4' = 'B04');
then by STAC common name: 'red' itself, or a band name of the item's sensor standing for its common
name through eojax's sensor registry (Sentinel-2's 'B04' is 'red' in an item whose `platform` is
'sentinel-2a' and whose assets are keyed 'red'). Data assets win over visual ones, one-band assets
over multi-band ones; a tie left is refused, naming the assets. Asset hrefs may be relative to the item
and may be remote (read through GDAL, see remote.py).

`Scene` reads the bands of an item on one pixel grid like a `{band}` template (one file per band);
bands of several resolutions are refused there, and stacked by `input.stack=True` (each band a source
of a StackedScene, warped onto one grid).
"""
from __future__ import annotations

import dataclasses
import re

from eojax.data import remote, sensors

PREFIX = "stac:"


@dataclasses.dataclass(frozen=True)
class AssetBand:
    name: str  # the band name asked for (with no bands asked for: the entry's name, or the asset key)
    href: str  # absolute path or URL of the asset's raster
    index: int  # 1-based band of that raster
    asset: str  # asset key (for messages)


def is_item(path) -> bool:
    """Whether `path` names a STAC item: `stac:` + path or URL, or a name ending in .json."""
    path = str(path)
    return path.startswith(PREFIX) or re.sub(r"[?#].*$", "", path).lower().endswith(".json")


def _error(message: str):
    from eojax.data.raster import RasterError  # raster.py imports this module
    return RasterError(message)


def read_item(path: str):
    """The pystac Item at `path` (file or URL, `stac:` prefix allowed)."""
    href = path[len(PREFIX):] if path.startswith(PREFIX) else path
    try:
        import pystac
    except ImportError as e:
        raise _error(f"{path}: STAC items need pystac (pip install 'eojax[stac]'): {e}") from None
    if not remote.is_remote(href) and not remote.exists(href):
        raise FileNotFoundError(f"STAC item not found: {href}")
    try:
        return pystac.Item.from_file(href)
    except Exception as e:  # urllib, json and pystac raise many kinds for an unreadable item
        raise _error(f"{path}: cannot read the STAC item ({remote.one_line(e)})") from None


def _entries(key: str, asset) -> list[tuple[int, str | None, str | None]]:
    """(1-based index, name, common name) of each band of an asset (one unnamed band if none listed)."""
    listed = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands") or []
    if not listed:
        return [(1, None, None)]
    return [(i, b.get("name"), b.get("common_name") or b.get("eo:common_name"))
            for i, b in enumerate(listed, start=1)]


def _is_data(asset) -> bool:
    roles = asset.roles or []
    return not roles or "data" in roles


def _same(a: str | None, b: str) -> bool:
    return a is not None and sensors.native_name(a) == sensors.native_name(b)


def _common_name(name: str, sensor: str | None) -> str | None:
    """The STAC common name `name` is, or stands for in `sensor` (or in the one family having it)."""
    cn = sensors.common_name(name)
    if cn is not None:
        return cn
    try:
        band = sensors.band(sensor, name) if sensor else sensors.resolve([name], strict=False)[0]
    except ValueError:  # unknown to the sensor, or ambiguous without one
        return None
    return band.common_name if band is not None else None


def _sensor(item) -> str | None:
    for key in ("platform", "constellation", "instruments"):
        value = item.properties.get(key)
        found = sensors.mentioned_sensor(" ".join(value) if isinstance(value, list) else str(value or ""))
        if found:
            return found
    return None


def item_bands(path: str, bands=()) -> list[AssetBand]:
    """The asset band of each requested band name (all data bands when none are requested)."""
    item = read_item(path)
    rows = [(key, asset, i, name, cn) for key, asset in item.assets.items()
            for i, name, cn in _entries(key, asset)]
    if not bands:
        picked = [AssetBand(name or key, asset.get_absolute_href(), i, key)
                  for key, asset, i, name, cn in rows
                  if _is_data(asset) and (name or cn or "eo:bands" in asset.extra_fields
                                          or "bands" in asset.extra_fields)]
        if not picked:
            raise _error(f"{path}: the item lists no bands (eo:bands / bands) in its data assets; name "
                         f"the bands (input.bands) by asset key")
        return picked
    sensor = _sensor(item)
    out = []
    for b in bands:
        if not isinstance(b, str):
            raise _error(f"{path}: bands of a STAC item are named, got {b!r}")
        hits = [r for r in rows if _same(r[3], b) or (_same(r[0], b) and len(_entries(r[0], r[1])) == 1)]
        cn = None if hits else _common_name(b, sensor)
        if cn is not None:
            hits = [r for r in rows if r[4] == cn]
        if len(hits) > 1:  # prefer data assets, then one-band assets
            hits = [r for r in hits if _is_data(r[1])] or hits
            hits = [r for r in hits if len(_entries(r[0], r[1])) == 1] or hits
        if not hits:
            have = ", ".join(f"{key}" + (f" ({'/'.join(filter(None, (name, c)))})" if name or c else "")
                             for key, _, _, name, c in rows)
            raise _error(f"{path}: the STAC item has no band {b!r}"
                         + (f" (common name {cn})" if cn else "") + f"; its assets: {have}")
        if len(hits) > 1:
            raise _error(f"{path}: band {b!r} matches several assets {[r[0] for r in hits]}; name one "
                         f"by its asset key or band name")
        key, asset, i, _, _ = hits[0]
        out.append(AssetBand(b, asset.get_absolute_href(), i, key))
    return out
