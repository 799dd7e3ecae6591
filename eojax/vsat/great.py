"""GReaT text rows (Borisov et al. 2022, arXiv 2210.06280): a table row written as a sentence.

    "B3 is 7421, X is 12, DOY is 213, B1 is 8120"

Byte-compatible with the be_great package: each feature is "<column> is <value>" with the value
printed by Python's str() (stripped), features joined by ", ", the column order a fresh random
permutation per sample; no trailing separator. Integers therefore print as plain digits. Floats are
printed with a fixed number of decimals here (`float_decimals`, default 4, e.g. "0.1250"): Python's
shortest repr would also round-trip, but a fixed width gives the digits a stable place value, which
is what a digit-level tokenizer can learn from. A float row round-trips exactly when its values are
representable with that many decimals (documented in docs/vsat.md).

The conditional mode writes the known columns first (in a fixed or random order) and then the
columns to generate in a fixed order, so a prompt is a prefix of a training-style sentence.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

SEP = ", "
IS = " is "


def format_value(value, float_decimals: int = 4) -> str:
    """One cell as text: ints as str(int) (as be_great), floats with a fixed number of decimals."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"boolean cell {value!r}: encode it as 0/1")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            raise ValueError(f"cell value {value!r} is not finite; GReaT rows hold measured values only")
        return f"{float(value):.{float_decimals}f}"
    return str(value).strip()


def encode_row(row: Mapping[str, object], order: Sequence[str] | None = None, *,
               rng: np.random.Generator | None = None, float_decimals: int = 4) -> str:
    """Row -> sentence; columns in `order`, else a random permutation from `rng`, else row order."""
    names = list(row)
    if order is None:
        order = [names[i] for i in rng.permutation(len(names))] if rng is not None else names
    missing = [c for c in order if c not in row]
    if missing:
        raise KeyError(f"columns {missing} are not in the row (it has {names})")
    return SEP.join(f"{c}{IS}{format_value(row[c], float_decimals)}" for c in order)


def conditional_prompt(known: Mapping[str, object], *, order: Sequence[str] | None = None,
                       rng: np.random.Generator | None = None, float_decimals: int = 4) -> str:
    """The known columns as the start of a sentence ("X is 3, Y is 7, DOY is 120"); the generator
    continues with ", <first target> is ..." in the fixed target order."""
    return encode_row(known, order, rng=rng, float_decimals=float_decimals) if known else ""


def conditional_text(known: Mapping[str, object], targets: Mapping[str, object], *,
                     float_decimals: int = 4) -> str:
    """Full conditional sentence: known columns (their given order) then targets (their order)."""
    row = dict(known)
    row.update(targets)
    return encode_row(row, list(known) + list(targets), float_decimals=float_decimals)


class ParseError(ValueError):
    """A generated sentence that is not a complete, valid row; `reason` says what is wrong."""


def parse_row(text: str, columns: Sequence[str], *, dtypes: Mapping[str, type] | None = None,
              required: Sequence[str] | None = None) -> dict[str, object]:
    """Sentence -> row dict, strictly: every feature "<known column> is <number>", no column twice,
    every `required` column present (default: all `columns`). Values are int unless `dtypes` says
    float. Raises ParseError naming the first fault (be_great silently drops bad features instead;
    eojax reports them so a caller can retry the row)."""
    dtypes = dtypes or {}
    required = list(columns) if required is None else list(required)
    out: dict[str, object] = {}
    text = text.strip()
    if not text:
        raise ParseError("empty text")
    for feature in text.split(SEP):
        name, sep, value = feature.partition(IS)
        if not sep:
            raise ParseError(f"feature {feature!r} has no {IS.strip()!r}")
        if name not in columns:
            raise ParseError(f"unknown column {name!r} in {feature!r}")
        if name in out:
            raise ParseError(f"column {name!r} appears twice")
        kind = dtypes.get(name, int)
        try:
            out[name] = kind(value)
        except ValueError:
            raise ParseError(f"column {name!r}: {value!r} is not a {kind.__name__}") from None
    absent = [c for c in required if c not in out]
    if absent:
        raise ParseError(f"columns {absent} are missing")
    return out
