"""CROMA (antofuller/CROMA) optical-encoder state dicts <-> eojax CROMA params.

The published CROMA_base.pt is {'s1_encoder': ..., 's2_encoder': ..., 'joint_encoder': ...,
's1_GAP_FFN': ..., 's2_GAP_FFN': ...}; load_state_dict flattens it to 's2_encoder.<key>'. A bare
s2_encoder state dict (PANGAEA's load) works too. torch key (under s2_encoder.) -> eojax path:
  linear_input.weight (D, C*p*p), patch pixels (band, row, col)    linear_input/kernel (p*p*C, D),
                                                                   patchify's (row, col, band)
  linear_input.bias (D,)                                           linear_input/bias
  transformer.layers.k.0.input_norm                                blocks/block_k/norm1
  transformer.layers.k.0.to_qkv.weight (3D, D), no bias            .../attn/query|key|value/kernel
  transformer.layers.k.0.to_out                                    .../attn/out
  transformer.layers.k.1.input_norm                                .../norm2
  transformer.layers.k.1.net.0 | net.3 (Linear, GELU, Dropout, Linear)  .../mlp/fc1 | fc2
  transformer.norm_out                                             norm_out
No position embeddings (2D-ALiBi is computed), so nothing is resampled. Ignored (reported): the SAR
and joint encoders and the pooling heads. Bands the data lacks are zero-filled at run time.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from eojax.models.encoders.croma import BANDS, CROMA
from eojax.weights import common


def _entries(enc: CROMA, pre: str = "") -> list[common.Entry]:
    d, p, c, h = enc.width, enc.patch_size, len(BANDS), enc.heads
    mlp = enc.mlp_dim or 4 * d
    out = [common.same(f"{pre}linear_input.weight", (d, c * p * p), ("linear_input", "kernel"),
                       lambda w: w.reshape(d, c, p, p).transpose(2, 3, 1, 0).reshape(p * p * c, d),
                       lambda a: a.reshape(p, p, c, d).transpose(3, 2, 0, 1).reshape(d, c * p * p)),
           common.same(f"{pre}linear_input.bias", (d,), ("linear_input", "bias"))]
    for k in range(enc.depth):
        tk, jp = f"{pre}transformer.layers.{k}", ("blocks", f"block_{k}")
        out += [*common.ln(f"{tk}.0.input_norm", jp + ("norm1",), d),
                *common.qkv(f"{tk}.0.to_qkv.weight", None, jp + ("attn",), d, h),
                *common.attn_out(f"{tk}.0.to_out", jp + ("attn", "out"), d, h),
                *common.ln(f"{tk}.1.input_norm", jp + ("norm2",), d),
                *common.linear(f"{tk}.1.net.0", jp + ("mlp", "fc1"), d, mlp),
                *common.linear(f"{tk}.1.net.3", jp + ("mlp", "fc2"), mlp, d)]
    return out + common.ln(f"{pre}transformer.norm_out", ("norm_out",), d)


def croma_from_torch(state_dict: Mapping[str, np.ndarray], encoder: CROMA, *, strict: bool = True
                     ) -> tuple[dict, dict[str, Any]]:
    """State dict -> (eojax params, report: 'ignored', 'zero_filled_bands', 'unused_bands').
    Missing keys, shape mismatches and (strict) unknown keys under the optical prefix raise one
    CheckpointMismatchError naming each key and both shapes."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    pre = common.find_prefix(sd, "linear_input.weight", "CROMA checkpoint", prefer="s2_encoder.")
    entries = _entries(encoder, pre)
    problems = common.check_entries(sd, entries)
    report: dict[str, Any] = {"ignored": {}, "resized": {}}
    for k in sorted(set(sd) - {e.key for e in entries}):
        if pre and not k.startswith(pre):
            report["ignored"][k] = ("another CROMA branch (SAR / joint encoder, pooling heads): not "
                                    "used by the optical encoder")
        elif strict:
            problems.append(f"not in this model: {k} {sd[k].shape}")
        else:
            report["ignored"][k] = "not in this model"
    if problems:
        common.raise_problems(problems, "CROMA checkpoint")
    flat = common.convert(sd, entries, encoder.param_dtype)
    if encoder.scan:
        flat = common.stack_blocks(flat, ("blocks",), encoder.depth)
    source, missing, unused = encoder.plan_bands()
    report.update(zero_filled_bands=missing, unused_bands=unused,
                  band_sources=common.band_sources(encoder, source))
    return traverse_util.unflatten_dict(flat), report


def croma_to_torch(params: Mapping, encoder: CROMA) -> dict[str, np.ndarray]:
    """eojax CROMA params -> {'s2_encoder.<key>': array}, the flattened published layout."""
    flat = common.flat_params(params)
    if encoder.scan:
        flat = common.unstack_blocks(flat, ("blocks",), encoder.depth)
    return common.export(flat, _entries(encoder, "s2_encoder."))


def load_pretrained(path, abstract_params: Any, encoder: CROMA, *, strict: bool = True):
    """(params placed like abstract_params, report) from a CROMA .safetensors / .npz / .pth."""
    return common.load_encoder_file(path, abstract_params, encoder, "CROMA checkpoint", croma_from_torch,
                                    strict=strict)
