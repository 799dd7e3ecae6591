"""Prithvi-100M and Prithvi-EO-2.0 (NASA-IMPACT/hls-foundation-os, IBM/terratorch) state dicts <-> eojax
Prithvi params (the encoder variants base, large = 2.0 300M, huge = 2.0 600M).

Accepted layouts: the pretraining MaskedAutoencoderViT (bare keys, decoder alongside), the same
under an 'encoder.' prefix (terratorch's PrithviMAE / the Hugging Face release), or PANGAEA's
encoder-only dict. torch key -> eojax path, D width, p patch, t tubelet, C = 6 bands:
  patch_embed.proj.weight (D, C, t, p, p)   patch_embed/kernel (t*p*p*C, D), (frame, row, col, band)
  patch_embed.proj.bias (D,)                patch_embed/bias
  cls_token (1, 1, D)                       cls_token
  pos_embed (1, 1 + T*h*w, D)               pos_embed; of another grid: not used (below)
  blocks.k.* (timm Block)                   blocks/block_k/* (scan: blocks/layers stacked)
Ignored (reported): the final `norm` (PANGAEA's Prithvi features do not use it), mask_token, the
decoder and the date / location encodings' scales of Prithvi-EO-2.0's TL models. The checkpoint's
band count must be 6; bands the data lacks are zero-filled by the encoder at run time, and the
report names them.

A pos_embed of another (frames, rows, cols) grid than the model's (Prithvi-100M's 3 frames on
single-date input, another image size) is not used: the model keeps its fixed 3D sin-cos for its own
grid, as PANGAEA's loader skips a pos_embed of another shape and keeps the sin-cos it built (for
one frame: t = 0). The report lists the key as ignored, with both grids.

The file does not record the LayerNorm eps, which differs between the versions: build the encoder
with the variant of the checkpoint ('base' for Prithvi-100M: 1e-5; 'large' / 'huge' for
Prithvi-EO-2.0: 1e-6, the release's prithvi_mae.py) or set `norm_eps` (eojax.models.encoders.prithvi).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from eojax.models.encoders.prithvi import BANDS, Prithvi, pos_embed_table
from eojax.weights import common

_IGNORED = ((("norm.",), "final norm: Prithvi's feature maps are taken before it (as PANGAEA)"),
            (("mask_token", "decoder"), "decoder of the pretraining MAE: not in this model"),
            (("temporal_embed_enc.", "location_embed_enc."),
             "Prithvi-EO-2.0 TL's date / location encoding: this model takes no dates or coordinates (the "
             "reference adds it only when given them)"))


def _entries(enc: Prithvi, pre: str = "") -> list[common.Entry]:
    d, p, t, c = enc.width, enc.patch_size, enc.tubelet_size, len(BANDS)
    mlp = enc.mlp_dim or 4 * d
    out = [common.same(f"{pre}patch_embed.proj.weight", (d, c, t, p, p), ("patch_embed", "kernel"),
                       lambda w: w.transpose(2, 3, 4, 1, 0).reshape(t * p * p * c, d),
                       lambda a: a.reshape(t, p, p, c, d).transpose(4, 3, 0, 1, 2)),
           common.same(f"{pre}patch_embed.proj.bias", (d,), ("patch_embed", "bias")),
           common.same(f"{pre}cls_token", (1, 1, d), ("cls_token",)),
           common.same(f"{pre}pos_embed", (1, 1 + math.prod(enc.grid), d), ("pos_embed",))]
    for k in range(enc.depth):
        out += common.timm_block(f"{pre}blocks.{k}", ("blocks", f"block_{k}"), d, enc.heads, mlp)
    return out


def checkpoint_grid(rows: int, model_grid: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """(frames, h, w) of a checkpoint's pos_embed with `rows` grid rows (cls excluded): the model's
    spatial grid if it divides, else a square grid of the fewest frames; None if neither fits."""
    _, h, w = model_grid
    if rows % (h * w) == 0:
        return rows // (h * w), h, w
    for frames in range(1, rows + 1):
        s = math.isqrt(rows // frames)
        if rows % frames == 0 and s * s * frames == rows:
            return frames, s, s
    return None


def prithvi_from_torch(state_dict: Mapping[str, np.ndarray], encoder: Prithvi, *, strict: bool = True
                       ) -> tuple[dict, dict[str, Any]]:
    """State dict -> (eojax params, report). The report holds 'ignored' {key: why} (a pos_embed of
    another grid among them), 'resized' (always empty: nothing is resampled), 'zero_filled_bands' and
    'unused_bands' (data bands). Missing keys, shape mismatches (a pos_embed of another grid is
    replaced by the model's sin-cos, not refused) and, when strict, unknown keys raise one
    CheckpointMismatchError naming each key and both shapes."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    pre = common.find_prefix(sd, "patch_embed.proj.weight", "Prithvi checkpoint")
    entries = _entries(encoder, pre)
    pos_key = f"{pre}pos_embed"
    problems = common.check_entries(sd, entries, skip={pos_key})
    report: dict[str, Any] = {"ignored": {}, "resized": {}}
    pe = sd.get(pos_key)
    if pe is not None:
        if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != encoder.width or pe.shape[1] < 2:
            problems.append(f"shape of {pos_key}: checkpoint {pe.shape} vs model (1, 1 + T*h*w, "
                            f"{encoder.width})")
        elif pe.shape[1] != 1 + math.prod(encoder.grid):
            src = checkpoint_grid(pe.shape[1] - 1, encoder.grid)
            src = f"grid {src}" if src else f"{pe.shape[1] - 1} positions"
            report["ignored"][pos_key] = (f"{src}, not the model's grid {encoder.grid}: the fixed 3D "
                                          "sin-cos of the model's grid is used (as PANGAEA)")
            sd[pos_key] = pos_embed_table(encoder.width, encoder.grid)
    known = {e.key for e in entries}
    for k in sorted(set(sd) - known):
        rest = k[len(pre):] if k.startswith(pre) else k
        why = next((w for starts, w in _IGNORED if rest.startswith(starts) or k.startswith(starts)), None)
        if why is None and not k.startswith(pre):
            why = "outside the encoder's prefix"
        if why is None and strict:
            problems.append(f"not in this model: {k} {sd[k].shape}")
        else:
            report["ignored"][k] = why or "not in this model"
    if problems:
        common.raise_problems(problems, "Prithvi checkpoint")
    flat = common.convert(sd, entries, encoder.param_dtype)
    if encoder.scan:
        flat = common.stack_blocks(flat, ("blocks",), encoder.depth)
    source, missing, unused = encoder.plan_bands()
    report.update(zero_filled_bands=missing, unused_bands=unused,
                  band_sources=common.band_sources(encoder, source))
    return traverse_util.unflatten_dict(flat), report


def prithvi_to_torch(params: Mapping, encoder: Prithvi) -> dict[str, np.ndarray]:
    """eojax Prithvi params -> the encoder part of the published layout (bare keys)."""
    flat = common.flat_params(params)
    if encoder.scan:
        flat = common.unstack_blocks(flat, ("blocks",), encoder.depth)
    return common.export(flat, _entries(encoder))


def load_pretrained(path, abstract_params: Any, encoder: Prithvi, *, strict: bool = True):
    """(params placed like abstract_params, report) from a Prithvi .safetensors / .npz / .pth."""
    return common.load_encoder_file(path, abstract_params, encoder, "Prithvi checkpoint", prithvi_from_torch,
                                    strict=strict)
