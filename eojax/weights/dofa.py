"""DOFA (zhu-xlab/DOFA, PANGAEA's dofa_encoder) state dicts <-> eojax DOFA params.

torch key -> eojax path; D width, E = wave_dim (128), p patch, M generator MLP (2048):
  patch_embed.fclayer.w1|w2.weight (E, E)                       patch_embed/w1|w2/kernel (E, E)
  patch_embed.weight_generator.weight_tokens (128, E)           .../weight_generator/weight_tokens
  patch_embed.weight_generator.bias_token (1, E)                .../weight_generator/bias_token
  ...weight_generator.transformer_encoder.layers.0.
      self_attn.in_proj_weight (3E, E), in_proj_bias (3E,)      .../attn/query|key|value
      self_attn.out_proj.weight (E, E)                          .../attn/out
      linear1 (M, E), linear2 (E, M)                            .../mlp/fc1, fc2
      norm1, norm2                                              .../norm1, norm2
  ...weight_generator.fc_weight.weight (p*p*D, E)               .../fc_weight/kernel (E, p*p*D)
  ...weight_generator.fc_bias.weight (D, E)                     .../fc_bias/kernel (E, D)
  cls_token (1, 1, D), pos_embed (1, 1 + h*w, D)                cls_token, pos_embed (resampled)
  blocks.k.* (timm Block)                                       blocks/block_k/*
  norm (D,), eps 1e-6; only with feature_norm='final'           norm (after the last block)
The fc_weight output index is (row, col, d) of the generated kernel for each band; eojax keeps that
order and permutes the generated kernel at run time, so the weights copy unchanged.
Ignored (reported): fc_norm / head (the classifier), norm with feature_norm 'standardise' or 'none',
mask_token and a decoder. Nothing is zero-filled: the kernel is generated for the data's bands.
The keys are those PANGAEA's DOFA_Encoder.load_encoder_weights reads from DOFA_ViT_base_e100.pth
(its own parameter names, bare): tests/fixtures/reference/dofa holds a small file in that layout.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from eojax.models.encoders.base import resize_grid_embed
from eojax.models.encoders.dofa import DOFA, NUM_WEIGHT_TOKENS, feature_norm_mode
from eojax.weights import common

_IGNORED = ((("fc_norm.", "head."), "classifier: DOFA's feature maps do not use it"),
            (("norm.",), "final norm: used only with feature_norm='final'"),
            (("mask_token", "decoder"), "decoder of the pretraining MAE: not in this model"))


def _entries(enc: DOFA, pre: str = "") -> list[common.Entry]:
    d, p, e = enc.width, enc.patch_size, enc.wave_dim
    m, mlp = enc.generator_mlp_dim, enc.mlp_dim or 4 * enc.width
    g = 1 + (enc.image_size // p) ** 2
    pe, gen = f"{pre}patch_embed.", f"{pre}patch_embed.weight_generator."
    jpe, jgen = ("patch_embed",), ("patch_embed", "weight_generator")
    layer = f"{gen}transformer_encoder.layers.0."
    out = [*common.linear(f"{pe}fclayer.w1", jpe + ("w1",), e, e),
           *common.linear(f"{pe}fclayer.w2", jpe + ("w2",), e, e),
           common.same(f"{gen}weight_tokens", (NUM_WEIGHT_TOKENS, e), jgen + ("weight_tokens",)),
           common.same(f"{gen}bias_token", (1, e), jgen + ("bias_token",)),
           *common.qkv(f"{layer}self_attn.in_proj_weight", f"{layer}self_attn.in_proj_bias",
                       jgen + ("attn",), e, enc.generator_heads),
           *common.attn_out(f"{layer}self_attn.out_proj", jgen + ("attn", "out"), e, enc.generator_heads),
           *common.linear(f"{layer}linear1", jgen + ("mlp", "fc1"), e, m),
           *common.linear(f"{layer}linear2", jgen + ("mlp", "fc2"), m, e),
           *common.ln(f"{layer}norm1", jgen + ("norm1",), e),
           *common.ln(f"{layer}norm2", jgen + ("norm2",), e),
           *common.linear(f"{gen}fc_weight", jgen + ("fc_weight",), e, p * p * d),
           *common.linear(f"{gen}fc_bias", jgen + ("fc_bias",), e, d),
           common.same(f"{pre}cls_token", (1, 1, d), ("cls_token",)),
           common.same(f"{pre}pos_embed", (1, g, d), ("pos_embed",))]
    for k in range(enc.depth):
        out += common.timm_block(f"{pre}blocks.{k}", ("blocks", f"block_{k}"), d, enc.heads, mlp)
    if feature_norm_mode(enc.feature_norm) == "final":
        out += common.ln(f"{pre}norm", ("norm",), d)
    return out


def dofa_from_torch(state_dict: Mapping[str, np.ndarray], encoder: DOFA, *, strict: bool = True
                    ) -> tuple[dict, dict[str, Any]]:
    """State dict -> (eojax params, report: 'ignored', 'resized', 'wavelengths' of the data's bands).
    Mismatches (a square pos_embed of another grid is resampled) raise CheckpointMismatchError."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    pre = common.find_prefix(sd, "patch_embed.weight_generator.fc_weight.weight", "DOFA checkpoint")
    entries = _entries(encoder, pre)
    pos_key = f"{pre}pos_embed"
    problems = common.check_entries(sd, entries, skip={pos_key})
    if feature_norm_mode(encoder.feature_norm) == "final" and f"{pre}norm.weight" not in sd:
        problems.append("feature_norm='final' applies the checkpoint's final norm; for a file "
                        "without it set feature_norm='none' (or 'standardise')")
    report: dict[str, Any] = {"ignored": {}, "resized": {}, "wavelengths": encoder.band_wavelengths()}
    pe, g = sd.get(pos_key), encoder.image_size // encoder.patch_size
    if pe is not None and pe.shape != (1, 1 + g * g, encoder.width):
        s = math.isqrt(max(pe.shape[1] - 1, 0)) if pe.ndim == 3 else 0
        if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != encoder.width or s < 1 or s * s != pe.shape[1] - 1:
            problems.append(f"shape of {pos_key}: checkpoint {pe.shape} vs model (1, 1 + h*w, "
                            f"{encoder.width}) with a square grid")
        else:
            grid = np.asarray(resize_grid_embed(pe[0, 1:], (s, s), (g, g)))
            sd[pos_key] = np.concatenate([pe[:, :1], grid[None]], axis=1)
            report["resized"][pos_key] = ((s, s), (g, g))
    known = {e.key for e in entries}
    for k in sorted(set(sd) - known):
        rest = k[len(pre):] if k.startswith(pre) else k
        why = next((w for starts, w in _IGNORED if rest.startswith(starts)), None)
        if why is None and strict:
            problems.append(f"not in this model: {k} {sd[k].shape}")
        else:
            report["ignored"][k] = why or "not in this model"
    if problems:
        common.raise_problems(problems, "DOFA checkpoint")
    flat = common.convert(sd, entries, encoder.param_dtype)
    if encoder.scan:
        flat = common.stack_blocks(flat, ("blocks",), encoder.depth)
    return traverse_util.unflatten_dict(flat), report


def dofa_to_torch(params: Mapping, encoder: DOFA) -> dict[str, np.ndarray]:
    flat = common.flat_params(params)
    if encoder.scan:
        flat = common.unstack_blocks(flat, ("blocks",), encoder.depth)
    return common.export(flat, _entries(encoder))


def load_pretrained(path, abstract_params: Any, encoder: DOFA, *, strict: bool = True):
    """(params placed like abstract_params, report) from a DOFA .safetensors / .npz / .pth."""
    return common.load_encoder_file(path, abstract_params, encoder, "DOFA checkpoint", dofa_from_torch,
                                    strict=strict)
