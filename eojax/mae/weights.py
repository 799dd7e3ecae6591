"""SatMAE++ (techmn/satmae_pp) PyTorch state dicts <-> eojax SatMAE / GroupChannelViT params; its
plain ViT (fMoW-RGB) files -> eojax MAE / ViTEncoder params (below).

Reference layouts (told apart by `channel_cls_embed`, which only the second has):
  mae  MaskedAutoencoderGroupChannelViT (models_mae_group_channels.py): pretraining checkpoints.
  vit  GroupChannelsVisionTransformer (models_vit_group_channels.py): fine-tuning checkpoints; their
       classifier (head, fc_norm) has no eojax counterpart and is only ever ignored.

torch key -> eojax path (MAE tree; the GroupChannelViT tree is the `encoder/` subtree), D width, p patch:
  cls_token (1,1,D)                      encoder/cls_token (+ pos_embed[:, :1] | channel_cls_embed, vit)
  patch_embed.i.proj.weight (D,Cg,p,p)   encoder/patch_embed_i/proj/kernel (p*p*Cg, D), (row, col, band)
  blocks.k.norm1|norm2.weight / .bias    encoder/blocks/block_k/norm1|norm2/ln/scale / bias
  blocks.k.attn.qkv.weight (3D, D)       .../attn/query|key|value/kernel (D, H, D/H); bias (3D) likewise
  blocks.k.attn.proj.weight (D, D)       .../attn/out/kernel (H, D/H, D); bias (D,)
  blocks.k.mlp.fc1|fc2.weight (out, in)  .../mlp/fc1|fc2/kernel (in, out)
  norm.*                                 encoder/norm/ln/*
  decoder_embed.*, mask_token            decoder_embed/*, mask_token
  decoder_blocks.k.*, decoder_norm.*     decoder/block_k/*, decoder_norm/ln/*
  decoder_pred.i.weight (Cg*p*p, Dd)     decoder_pred_i/kernel (Dd, p*p*Cg): (band, row, col) -> (row, col, band)
  proj_up_conv.weight (M, C, 1, 1)       multiscale_head/proj_up_conv/kernel (1, 1, C, M); proj_up_norm.*
  up_blockb.up_conv.weight (M, M, 4, 4)  multiscale_head/up_blockb/up_conv/kernel (4, 4, out, in)
  up_blockb.res_block.conv1|conv2.weight .../res_conv1|res_conv2/kernel (3, 3, in, out)
  up_blockb.up_norm|res_norm.*, proj_out .../up_norm|res_norm/ln/*, proj_out (3, 3, M, C)
With scan=True the blocks are stacked under `layers` after the mapping.

Embeddings. The pretraining model's pos_embed, channel_embed, decoder_pos_embed and
decoder_channel_embed are fixed sin-cos: they are not eojax parameters, eojax recomputes the same
sin-cos for whatever grid it runs on, so the checkpoint's grid (rows of pos_embed) is irrelevant.
Their widths must match (D - c, c) and their values must be the sin-cos; a drifted one fails a strict
import and is listed as ignored otherwise. The fine-tuning ViT trains pos_embed and channel_embed:
import such a checkpoint into GroupChannelViT(learned_embed=True) (the seg encoder: model.encoder_args
.learned_embed=True), which holds them as parameters:
  pos_embed (1, 1 + N, D - c)            pos_embed (N, D - c) (row 0 is folded into cls_token)
  channel_embed (1, G, c)                channel_embed (G, c)
A pos_embed of another grid is dropped and the model keeps the sin-cos of its own grid, as the
reference's main_finetune.py does (it deletes checkpoint keys of another shape before loading). A
pretraining checkpoint imported so starts from its sin-cos, as the reference's fine-tuning does. The
vit layout adds pos_embed[0] and channel_cls_embed to the cls token; eojax adds nothing, so they are
folded into it.

Decoder order: the reference concatenates the group predictions in group order and trains them
against band order, so its decoder_pred.i output j learns band (offset_i + j), and its multi-scale
head takes them in that order. Weights are copied unchanged; SatMAE(pred_order='reference') reads
them so (the satmae task chooses it for a published file: model.pred_order='auto'). With
non-contiguous groups (the default S2 grouping) `load_pretrained` warns when it imports a
pretraining checkpoint into a model with eojax's pred_order='bands' (right only for a file exported
from such a model).

Plain ViT layout (SatMAE++'s fMoW-RGB checkpoints, told apart by `patch_embed.proj`; the group-channel
ones have `patch_embed.<i>`): models_mae.py MaskedAutoencoderViT (pretraining; one 2x multi-scale
block) and models_vit.py, timm's VisionTransformer (fine-tuning) -> eojax's MAE / ViTEncoder
(plain_vit_from_torch; the ViTEncoder tree is the MAE's `encoder/` subtree), C bands:
  cls_token (1,1,D) (+ pos_embed[:, :1])  encoder/cls_token
  patch_embed.proj.weight (D,C,p,p)       encoder/patch_embed/proj/kernel (p*p*C, D), (row, col, band)
  blocks.k.*, norm.*                      encoder/blocks/block_k/*, encoder/norm/ln/* (timm blocks, as above)
  decoder_embed.*, mask_token             decoder_embed/*, mask_token
  decoder_blocks.k.*, decoder_norm.*      decoder/block_k/*, decoder_norm/ln/*
  decoder_pred.weight (p*p*C, Dd)         decoder_pred/kernel (Dd, p*p*C): both (row, col, band) already
  pos_embed, decoder_pos_embed (1, 1+N, .) fixed sin-cos (a zero cls row), checked as above; the
                                          fine-tuned ViT trains pos_embed: ViTEncoder(learned_embed=True)
                                          holds it as pos_embed (N, D), row 0 folded into cls_token, one
                                          of another grid replaced by the model's sin-cos (main_finetune.py
                                          deletes it)
  proj_up_conv, proj_up_norm, up_block.*  the multi-scale head: eojax's plain MAE has none; reported
  fc_norm.*, head.*                       eojax.classify.weights (a classifier)
The heads count is not in the weights (qkv is (3D, D) for any): it is the model's.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import linen as nn, traverse_util

from eojax.checkpoint import CheckpointMismatchError, check_compatible
from eojax.weights import common
from eojax.weights.common import SUFFIXES
from eojax.weights.common import Entry as _Entry, conv as _conv, linear as _linear, ln as _ln
from eojax.weights.common import export as _common_export, patch as _patch, raise_problems as _raise, same as _same
from eojax.weights.common import timm_block as _block
from eojax.mae.model import MAE
from eojax.mae.satmae import (SatMAE, GroupChannelViT, _check_groups,
                                 decoder_pos_group_embed, pos_group_embed, pred_bands)
from eojax.models import layers
from eojax.models.vit import ViTEncoder, _pair

_TOL = 1e-4  # the reference computes its sin-cos in float32, eojax in float64
_KEYS = ("image_size", "patch_size", "groups", "width", "depth", "heads", "mlp_dim", "group_embed_dim",
         "decoder_width", "decoder_depth", "decoder_heads", "decoder_mlp_dim",
         "decoder_group_embed_dim", "multiscale", "multiscale_ratio", "use_cls_token", "scan",
         "param_dtype", "learned_embed", "pred_order")


def load_state_dict(path) -> dict[str, np.ndarray]:
    """A flat {torch key: array} from a SatMAE++ .safetensors / .npz / .pth (common.load_state_dict)."""
    return common.load_state_dict(path, "SatMAE++ checkpoint")


# --------------------------------------------------------------------------------------------------
# The key table (entries from eojax.weights.common; the decoder head is SatMAE++'s own)
# --------------------------------------------------------------------------------------------------
def _pred(tk, jp, dd, cg, p):  # Linear (Cg*p*p, Dd), outputs (band, row, col) -> (Dd, p*p*Cg) (row, col, band)
    return [_same(f"{tk}.weight", (cg * p * p, dd), jp + ("kernel",),
                    lambda w: w.reshape(cg, p, p, dd).transpose(3, 1, 2, 0).reshape(dd, -1),
                    lambda a: a.reshape(dd, p, p, cg).transpose(3, 1, 2, 0).reshape(-1, dd)),
            _same(f"{tk}.bias", (cg * p * p,), jp + ("bias",),
                    lambda b: b.reshape(cg, p, p).transpose(1, 2, 0).reshape(-1),
                    lambda a: a.reshape(p, p, cg).transpose(2, 0, 1).reshape(-1))]


def _config(model_kwargs: Mapping, target: str | None):
    """Model fields (defaults filled in) and the target tree: 'mae' or 'vit' (None: 'mae' when any
    SatMAE-only field is given)."""
    mae_f, vit_f = SatMAE.__dataclass_fields__, GroupChannelViT.__dataclass_fields__
    fields = {**vit_f, **mae_f}
    unknown = sorted(set(model_kwargs) - set(fields))
    if unknown:
        raise TypeError(f"model_kwargs has fields neither SatMAE nor GroupChannelViT has: {unknown}")
    if target is None:
        target = "mae" if any(k not in vit_f for k in model_kwargs) else "vit"
    if target not in ("mae", "vit"):
        raise ValueError(f"target must be 'mae' or 'vit', got {target!r}")
    if target == "mae" and model_kwargs.get("learned_embed"):
        raise ValueError("learned_embed is the fine-tuning ViT's (GroupChannelViT); SatMAE's embeddings "
                         "are fixed sin-cos")
    cfg = {k: fields[k].default for k in _KEYS}
    cfg.update({k: v for k, v in model_kwargs.items() if k in _KEYS})
    cfg["groups"] = tuple(tuple(int(c) for c in g) for g in cfg["groups"])
    cfg["channels"] = _check_groups(cfg["groups"])
    cfg["mlp_dim"] = cfg["mlp_dim"] or 4 * cfg["width"]
    cfg["decoder_mlp_dim"] = cfg["decoder_mlp_dim"] or 4 * cfg["decoder_width"]
    h, w = _pair(cfg["image_size"])
    cfg["grid"] = (h // cfg["patch_size"], w // cfg["patch_size"])
    return cfg, target


def _entries(cfg, target) -> list[_Entry]:
    d, p, groups = cfg["width"], cfg["patch_size"], cfg["groups"]
    enc = ("encoder",) if target == "mae" else ()
    out = [_same("cls_token", (1, 1, d), enc + ("cls_token",))] if cfg["use_cls_token"] else []
    for i, g in enumerate(groups):
        out += _patch(f"patch_embed.{i}.proj", enc + (f"patch_embed_{i}", "proj"), d, len(g), p)
    for k in range(cfg["depth"]):
        out += _block(f"blocks.{k}", enc + ("blocks", f"block_{k}"), d, cfg["heads"], cfg["mlp_dim"])
    out += _ln("norm", enc + ("norm",), d)
    if target == "vit":
        return out + (_learned_entries(cfg) if cfg["learned_embed"] else [])
    out += _decoder_entries(cfg)
    for i, g in enumerate(groups):
        out += _pred(f"decoder_pred.{i}", (f"decoder_pred_{i}",), cfg["decoder_width"], len(g), p)
    if cfg["multiscale"]:
        c, head = cfg["channels"], ("multiscale_head",)
        m = c * cfg["multiscale_ratio"]
        out += _conv("proj_up_conv", head + ("proj_up_conv",), c, m, 1)
        out += _ln("proj_up_norm", head + ("proj_up_norm",), m)
        for b in (1, 2):
            tk, jp = f"up_block{b}", head + (f"up_block{b}",)
            out += _conv(f"{tk}.up_conv", jp + ("up_conv",), m, m, 4, transposed=True)
            out += _ln(f"{tk}.up_norm", jp + ("up_norm",), m)
            out += _conv(f"{tk}.res_block.conv1", jp + ("res_conv1",), m, m, 3)
            out += _conv(f"{tk}.res_block.conv2", jp + ("res_conv2",), m, m, 3)
            out += _ln(f"{tk}.res_norm", jp + ("res_norm",), m)
            out += _conv(f"{tk}.proj_out", jp + ("proj_out",), m, c, 3)
    return out


def _learned_entries(cfg) -> list[_Entry]:
    """The fine-tuning ViT's trained embeddings (GroupChannelViT(learned_embed=True)); pos_embed's
    row 0 is folded into cls_token (satmae_from_torch), so it exports as zeros."""
    d, c, g = cfg["width"], cfg["group_embed_dim"], len(cfg["groups"])
    n = cfg["grid"][0] * cfg["grid"][1]
    return [_same("pos_embed", (1, 1 + n, d - c), ("pos_embed",), lambda a: a[0, 1:],
                  lambda a: np.concatenate([np.zeros_like(a[:1]), a])[None]),
            _same("channel_embed", (1, g, c), ("channel_embed",), lambda a: a[0], lambda a: a[None])]


def _fixed(cfg, target, layout, grid) -> dict[str, np.ndarray]:
    """The reference's fixed embeddings for a grid (a zero cls row first), from eojax's own ones."""
    d, c, g = cfg["width"], cfg["group_embed_dim"], len(cfg["groups"])
    pe = pos_group_embed(d, c, g, *grid)  # (G, N, D): [position (D - c), group (c)]
    out = {"pos_embed": np.concatenate([np.zeros((1, d - c), np.float32), pe[0, :, :d - c]])[None],
           "channel_embed": np.ascontiguousarray(pe[None, :, 0, d - c:])}
    if layout == "vit":
        out["channel_cls_embed"] = np.zeros((1, 1, c), np.float32)
    if target == "mae":
        dd, dc, n = cfg["decoder_width"], cfg["decoder_group_embed_dim"], grid[0] * grid[1]
        dpe = decoder_pos_group_embed(dd, dc, g, *grid)  # row 0: [zeros, group G], then (group, loc)
        out["decoder_pos_embed"] = np.concatenate([dpe[:1, :dd - dc], dpe[1:1 + n, :dd - dc]])[None]
        out["decoder_channel_embed"] = np.concatenate([dpe[1::n, dd - dc:], dpe[:1, dd - dc:]])[None]
    return out


def _fixed_problems(sd, cfg, target, layout, learned=()) -> tuple[list[str], dict[str, str]]:
    """(shape problems, {key: why its values cannot be used}) of the fixed embeddings (not `learned`,
    which the key table checks)."""
    problems, drift = [], {}
    for key, ref in _fixed(cfg, target, layout, cfg["grid"]).items():
        if key in learned:
            continue
        a, any_grid = sd.get(key), key.endswith("pos_embed")
        want = f"(1, {'N + 1' if any_grid else ref.shape[1]}, {ref.shape[2]})"
        if a is None:
            problems.append(f"missing in checkpoint: {key} {want}")
            continue
        if a.ndim != 3 or a.shape[::2] != (1, ref.shape[2]) or not (any_grid or a.shape == ref.shape):
            problems.append(f"shape of {key}: checkpoint {a.shape} vs model {want}")
            continue
        if key == "channel_cls_embed":
            continue  # trainable, folded into cls_token
        if a.shape != ref.shape:  # another grid: compare with its sin-cos (the reference's are square)
            s = math.isqrt(a.shape[1] - 1)
            if s * s != a.shape[1] - 1 or s == 0:
                drift[key] = f"{a.shape[1] - 1} positions are not a square grid; cannot check the sin-cos"
                continue
            ref = _fixed(cfg, target, layout, (s, s))[key]
        lo = 1 if key == "pos_embed" and layout == "vit" else 0  # vit: row 0 is folded into cls
        err = float(np.max(np.abs(a[:, lo:].astype(np.float64) - ref[:, lo:]), initial=0.0))
        if not err <= _TOL:
            drift[key] = (f"differs from the fixed sin-cos by up to {err:.3g} (trained or interpolated); "
                          "this model uses the sin-cos; set learned_embed=True to load trained embeddings "
                          "(the seg encoder: model.encoder_args.learned_embed=True)")
    return problems, drift


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------
_WHY = ((("proj_up_", "up_block", "decoder", "mask_token"),
         "decoder / multi-scale head of the pretraining model: not in this model"),
        (("head.", "fc_norm."), "classifier of a fine-tuned model: no eojax counterpart"))


def _group_problems(sd, cfg, target) -> tuple[list[str], set[str]]:
    """Band groups of another size, named (before the generic shape list), and the keys they cover."""
    p, groups = cfg["patch_size"], cfg["groups"]
    problems, keys = [], set()
    n_ckpt = len({k.split(".")[1] for k in sd if k.startswith("patch_embed.")})
    if n_ckpt and n_ckpt != len(groups):
        problems.append(f"the checkpoint has {n_ckpt} band groups, the model {len(groups)}: {groups}")
    for i, g in enumerate(groups):
        w, pred = sd.get(f"patch_embed.{i}.proj.weight"), sd.get(f"decoder_pred.{i}.weight")
        got = w.shape[1] if w is not None and w.ndim == 4 else None
        if got is None and target == "mae" and pred is not None and pred.ndim == 2:
            got = pred.shape[0] / (p * p)
        if got is not None and got != len(g):
            problems.append(f"group {i} {g}: the checkpoint's group {i} has {got:g} bands, the model's "
                            f"{len(g)}; a checkpoint's band groups cannot be changed on import")
            keys |= {f"patch_embed.{i}.proj.weight", f"decoder_pred.{i}.weight", f"decoder_pred.{i}.bias"}
    return problems, keys


def satmae_from_torch(state_dict: Mapping, model_kwargs: Mapping, *, target: str | None = None,
                      strict: bool = True) -> tuple[dict, dict[str, str]]:
    """SatMAE++ state dict -> (eojax params, {ignored key: why}).

    model_kwargs: SatMAE or GroupChannelViT keyword arguments (satmae_config output);
    target: 'mae' (SatMAE tree) or 'vit' (GroupChannelViT tree); None infers it from
    model_kwargs. Every missing key, shape mismatch, group of another band count, and (strict)
    unexpected key or drifted fixed embedding is gathered into one CheckpointMismatchError before
    anything is returned. strict=False ignores unexpected keys (the decoder when importing a
    pretraining checkpoint into a GroupChannelViT, a classifier head) and drifted embeddings.
    """
    cfg, target = _config(model_kwargs, target)
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    check_layout(sd, plain=False)
    layout = "vit" if "channel_cls_embed" in sd else "mae"
    entries = _entries(cfg, target)
    learned = {"pos_embed", "channel_embed"} if target == "vit" and cfg["learned_embed"] else set()
    notes = _other_grid(sd, cfg) if learned else {}
    problems, skip = _group_problems(sd, cfg, target)
    for e in entries:
        if e.key not in sd:
            problems.append(f"missing in checkpoint: {e.key} {e.shape}")
        elif sd[e.key].shape != e.shape and e.key not in skip:
            problems.append(f"shape of {e.key}: checkpoint {sd[e.key].shape} vs model {e.shape}")
    if "norm.weight" not in sd and "fc_norm.weight" in sd:
        problems.append("fc_norm but no norm: a global-pool classifier, whose norm follows the pooling; "
                        "GroupChannelViT normalises the tokens, so it cannot take this checkpoint")
    fixed_problems, drift = _fixed_problems(sd, cfg, target, layout, learned)
    problems += fixed_problems
    fixed = {"pos_embed", "channel_embed", "channel_cls_embed"}
    fixed |= {"decoder_pos_embed", "decoder_channel_embed"} if target == "mae" else set()
    unexpected = sorted(set(sd) - fixed - {e.key for e in entries})
    if strict:
        problems += [f"not in this model: {k} {sd[k].shape}" for k in unexpected]
        problems += [f"{k}: {why}" for k, why in drift.items()]
    if problems:
        _raise(problems, "SatMAE++ checkpoint")
    ignored = dict(notes) if strict else dict(drift, **notes)
    for k in [] if strict else unexpected:
        ignored[k] = next((why for pre, why in _WHY if k.startswith(pre)), "not in this model")

    flat = {}
    for e in entries:
        flat.update(zip(e.paths, e.to_jax(sd[e.key])))
    if layout == "vit" and cfg["use_cls_token"]:  # the reference adds these to its cls token
        cls = entries[0].paths[0]
        flat[cls] = flat[cls] + np.concatenate([sd["pos_embed"][:, :1], sd["channel_cls_embed"]], -1)
    dtype = np.dtype(cfg["param_dtype"])
    flat = {k: np.ascontiguousarray(v, dtype=dtype) for k, v in flat.items()}
    return traverse_util.unflatten_dict(_scan_layout(flat, cfg, target, stack=True)), ignored


def _other_grid(sd: dict, cfg) -> dict[str, str]:
    """A trained pos_embed of another grid than the model's is replaced (in sd) by the sin-cos of the
    model's grid, as main_finetune.py drops checkpoint keys of another shape; {key: why} if so."""
    pe, d, c = sd.get("pos_embed"), cfg["width"], cfg["group_embed_dim"]
    n = cfg["grid"][0] * cfg["grid"][1]
    if pe is None or pe.ndim != 3 or pe.shape[::2] != (1, d - c) or pe.shape[1] == 1 + n:
        return {}  # absent, misshapen (reported by the key table) or of the model's grid
    sd["pos_embed"] = _fixed(cfg, "vit", "vit", cfg["grid"])["pos_embed"]
    return {"pos_embed": f"{pe.shape[1] - 1} positions, not the model's grid {cfg['grid']}: its sin-cos "
                         "is used (as the reference's main_finetune.py)"}


def satmae_to_torch(params: Mapping, model_kwargs: Mapping, *, target: str | None = None
                    ) -> dict[str, np.ndarray]:
    """eojax params -> SatMAE++ state dict: the pretraining (mae) layout for a SatMAE tree,
    the fine-tuning (vit, no classifier) layout for a GroupChannelViT tree; fixed embeddings for the
    model's grid are included, as the reference's state_dict has them."""
    cfg, target = _config(model_kwargs, target)
    params = nn.meta.unbox(params)
    params = params["params"] if set(params) == {"params"} else params
    flat = traverse_util.flatten_dict(jax.tree.map(np.asarray, params))
    flat = _scan_layout(flat, cfg, target, stack=False)
    sd = _common_export(flat, _entries(cfg, target), "eojax params")
    for key, value in _fixed(cfg, target, target, cfg["grid"]).items():
        sd.setdefault(key, value)  # learned embeddings come from the params
    return sd


def _scan_layout(flat: dict, cfg, target, stack: bool) -> dict:
    """Flat params between blocks named block_i and scan's stacked 'layers' (leading depth axis)."""
    if not cfg["scan"]:
        return flat
    enc = ("encoder",) if target == "mae" else ()
    stacks = [(enc + ("blocks",), cfg["depth"])]
    stacks += [(("decoder",), cfg["decoder_depth"])] if target == "mae" else []
    for pre, depth in stacks:
        flat = common.stack_blocks(flat, pre, depth) if stack else common.unstack_blocks(flat, pre, depth)
    return flat


# --------------------------------------------------------------------------------------------------
# The plain ViT layout (fMoW-RGB): MAE / ViTEncoder
# --------------------------------------------------------------------------------------------------
_PLAIN_KEYS = ("image_size", "patch_size", "in_channels", "width", "depth", "heads", "mlp_dim", "decoder_width",
               "decoder_depth", "decoder_heads", "decoder_mlp_dim", "use_cls_token", "scan", "param_dtype",
               "learned_embed")
# Parts of a plain checkpoint that a model may lack by design: left out and reported, never an error.
MULTISCALE = (("proj_up_", "up_block"), "multi-scale head of the pretraining model: eojax's plain MAE has none")
DECODER = (("decoder", "mask_token"), "decoder of the pretraining model: not in an encoder")
CLASSIFIER = (("head.",), "classifier head of a fine-tuned model: not in an encoder")  # fc_norm: its own error


def check_layout(sd: Mapping, plain: bool, what: str = "SatMAE++ checkpoint") -> None:
    """One-line CheckpointMismatchError when the file is the other SatMAE++ layout than the model's."""
    is_plain = "patch_embed.proj.weight" in sd
    is_group = any(k.startswith("patch_embed.") for k in sd) and not is_plain
    if plain and is_group:
        raise CheckpointMismatchError(
            f"{what} is a group-channel checkpoint (patch_embed.0, ...: SatMAE++'s fMoW-Sentinel layout), not a "
            "plain ViT: it loads into encoder 'satmae' (pretraining: task satmae), not 'mae'")
    if not plain and is_plain:
        raise CheckpointMismatchError(
            f"{what} is a plain ViT checkpoint (patch_embed.proj: SatMAE++'s fMoW-RGB layout), not a group-channel "
            "one: it loads into encoder 'mae' (pretraining: task mae), not 'satmae'")


def plain_config(model_kwargs: Mapping, target: str) -> dict:
    """MAE (target 'mae') or ViTEncoder ('vit') fields, defaults filled in."""
    fields = {**ViTEncoder.__dataclass_fields__, **MAE.__dataclass_fields__}
    if target not in ("mae", "vit"):
        raise ValueError(f"target must be 'mae' or 'vit', got {target!r}")
    cfg = {k: fields[k].default for k in _PLAIN_KEYS}
    cfg.update({k: v for k, v in model_kwargs.items() if k in _PLAIN_KEYS})
    cfg["mlp_dim"] = cfg["mlp_dim"] or 4 * cfg["width"]
    cfg["decoder_mlp_dim"] = cfg["decoder_mlp_dim"] or 4 * cfg["decoder_width"]
    h, w = _pair(cfg["image_size"])
    cfg["grid"] = (h // cfg["patch_size"], w // cfg["patch_size"])
    cfg["learned_embed"] = bool(cfg["learned_embed"]) and target == "vit"
    return cfg


def check_plain_sizes(sd: Mapping, cfg: Mapping, target: str, what: str = "SatMAE++ checkpoint") -> None:
    """One-line CheckpointMismatchError naming every size where the file's ViT and the model differ (the
    key table would list each key of the wrong width on its own)."""
    def rows(prefix):
        return len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})

    w, fc1 = sd.get("patch_embed.proj.weight"), sd.get("blocks.0.mlp.fc1.weight")
    if w is None or w.ndim != 4:
        return
    found = dict(width=w.shape[0], in_channels=w.shape[1], patch_size=w.shape[2], depth=rows("blocks"))
    if fc1 is not None and fc1.ndim == 2:
        found["mlp_dim"] = fc1.shape[0]
    emb = sd.get("decoder_embed.weight")
    if target == "mae" and emb is not None and emb.ndim == 2:
        found.update(decoder_width=emb.shape[0], decoder_depth=rows("decoder_blocks"))
    diffs = [f"{k} {v} (the model's {cfg[k]})" for k, v in found.items() if v != cfg[k]]
    if diffs:
        raise CheckpointMismatchError(f"{what} does not fit the model: its ViT has {', '.join(diffs)}")


def _decoder_entries(cfg) -> list[_Entry]:
    """The MAE decoder both layouts share up to its prediction heads: embed, mask token, blocks, norm."""
    d, dd = cfg["width"], cfg["decoder_width"]
    out = _linear("decoder_embed", ("decoder_embed",), d, dd) + [_same("mask_token", (1, 1, dd), ("mask_token",))]
    for k in range(cfg["decoder_depth"]):
        out += _block(f"decoder_blocks.{k}", ("decoder", f"block_{k}"), dd, cfg["decoder_heads"],
                      cfg["decoder_mlp_dim"])
    return out + _ln("decoder_norm", ("decoder_norm",), dd)


def _plain_entries(cfg, target) -> list[_Entry]:
    d, p, c = cfg["width"], cfg["patch_size"], cfg["in_channels"]
    enc = ("encoder",) if target == "mae" else ()
    out = [_same("cls_token", (1, 1, d), enc + ("cls_token",))] if cfg["use_cls_token"] else []
    out += _patch("patch_embed.proj", enc + ("patch_embed", "proj"), d, c, p)
    for k in range(cfg["depth"]):
        out += _block(f"blocks.{k}", enc + ("blocks", f"block_{k}"), d, cfg["heads"], cfg["mlp_dim"])
    out += _ln("norm", enc + ("norm",), d)
    if target == "vit":
        n = cfg["grid"][0] * cfg["grid"][1]
        learned = [_same("pos_embed", (1, 1 + n, d), ("pos_embed",), lambda a: a[0, 1:])]
        return out + (learned if cfg["learned_embed"] else [])
    return out + _decoder_entries(cfg) + _linear("decoder_pred", ("decoder_pred",), cfg["decoder_width"], p * p * c)


def _sincos_with_cls(width: int, grid) -> np.ndarray:
    """The reference's get_2d_sincos_pos_embed(cls_token=True): a zero row, then the grid's sin-cos."""
    return np.concatenate([np.zeros((1, width), np.float32), layers.sincos_2d(width, *grid)])[None]


def _plain_embeddings(sd: dict, cfg, target) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(problems, {key: why its values cannot be used}, {key: note}) of pos_embed / decoder_pos_embed.
    A learned pos_embed of another grid is replaced in sd by the model's sin-cos."""
    problems, drift, notes = [], {}, {}
    widths = {"pos_embed": cfg["width"]}
    if target == "mae":
        widths["decoder_pos_embed"] = cfg["decoder_width"]
    for key, width in widths.items():
        a, want = sd.get(key), f"(1, N + 1, {width})"
        if a is None:
            problems.append(f"missing in checkpoint: {key} {want}")
            continue
        s = math.isqrt(a.shape[1] - 1) if a.ndim == 3 and a.shape[1] > 1 else 0
        if a.ndim != 3 or a.shape[::2] != (1, width) or s * s != a.shape[1] - 1:
            problems.append(f"shape of {key}: checkpoint {a.shape} vs model {want} (N a square grid)")
            continue
        if key == "pos_embed" and cfg["learned_embed"]:
            if (s, s) != tuple(cfg["grid"]):  # main_finetune.py deletes it: the model keeps its sin-cos
                sd[key] = _sincos_with_cls(width, cfg["grid"])
                notes[key] = (f"{s}x{s} positions, not the model's grid {cfg['grid']}: its sin-cos is used "
                              "(as the reference's main_finetune.py)")
            continue
        err = float(np.max(np.abs(a[:, 1:].astype(np.float64) - _sincos_with_cls(width, (s, s))[:, 1:])))
        if not err <= _TOL:
            hint = ("; set learned_embed=True to load trained positions (classify / seg: "
                    "model.encoder_args.learned_embed=True)" if key == "pos_embed" and target == "vit" else "")
            drift[key] = (f"differs from the fixed sin-cos by up to {err:.3g} (trained); this model uses the "
                          f"sin-cos{hint}")
    return problems, drift, notes


def plain_vit_from_torch(state_dict: Mapping, model_kwargs: Mapping, *, target: str, strict: bool = True,
                         parts=(), what: str = "SatMAE++ checkpoint") -> tuple[dict, dict[str, str]]:
    """SatMAE++ plain-ViT state dict -> (eojax params, {ignored key: why}).

    model_kwargs: MAE (target 'mae') or ViTEncoder ('vit') keyword arguments. parts: (prefixes, why)
    pairs (MULTISCALE, DECODER, CLASSIFIER) the model lacks by design, left out and reported. The
    other layout or other sizes are a one-line CheckpointMismatchError; every missing key, shape
    mismatch and (strict) unexpected key or trained position embedding in a fixed one is gathered
    into one before anything is returned; strict=False reports the last two instead."""
    cfg = plain_config(model_kwargs, target)
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    check_layout(sd, plain=True, what=what)
    check_plain_sizes(sd, cfg, target, what)
    ignored = {k: why for k in sd for starts, why in parts if k.startswith(starts)}
    sd = {k: v for k, v in sd.items() if k not in ignored}
    entries = _plain_entries(cfg, target)
    problems, drift, notes = _plain_embeddings(sd, cfg, target)
    problems += common.check_entries(sd, entries)
    if "norm.weight" not in sd and "fc_norm.weight" in sd:
        problems.append("fc_norm but no norm: a global-pool classifier, whose norm follows the pooling; load it "
                        "as a classifier (classify: config.init_from or model.encoder_init)")
    unexpected = sorted(set(sd) - {"pos_embed", "decoder_pos_embed"} - {e.key for e in entries})
    if strict:
        problems += [f"not in this model: {k} {sd[k].shape}" for k in unexpected]
        problems += [f"{k}: {why}" for k, why in drift.items()]
    if problems:
        _raise(problems, what)
    ignored.update(notes)
    if not strict:
        ignored.update(drift)
        ignored.update({k: "not in this model" for k in unexpected})

    flat = common.convert(sd, entries, np.float32)
    if cfg["use_cls_token"]:  # both references add pos_embed[:, :1] to the cls token
        cls = entries[0].paths[0]
        flat[cls] = flat[cls] + sd["pos_embed"][:, :1].astype(np.float32)
    flat = {k: np.ascontiguousarray(v, dtype=np.dtype(cfg["param_dtype"])) for k, v in flat.items()}
    return traverse_util.unflatten_dict(_scan_layout(flat, cfg, target, stack=True)), ignored


# --------------------------------------------------------------------------------------------------
# config.init_from
# --------------------------------------------------------------------------------------------------
def is_checkpoint_file(path) -> bool:
    """Whether config.init_from names a file this module reads (else: an eojax run folder)."""
    return os.path.splitext(os.fspath(path))[1].lower() in SUFFIXES


def load_pretrained(path, abstract_params: Any, model_kwargs: Mapping, *, strict: bool = True) -> Any:
    """Params for `config.init_from` from a SatMAE++ .safetensors / .npz / .pth file.

    abstract_params: the model's params as ShapeDtypeStructs (their shardings, if any, are used);
    a tree with 'encoder' is a SatMAE, otherwise a GroupChannelViT. Names and shapes are
    checked against it (CheckpointMismatchError); arrays are cast to its dtypes. strict=False drops
    the decoder of a pretraining checkpoint (and a classifier head); what was dropped is logged.
    A SatMAE++ checkpoint's decoder is read right with pred_order='reference' (see the module doc).
    """
    return _load(load_state_dict(path), path, abstract_params, model_kwargs, strict, {})[0]


def _load(sd, path, abstract_params, model_kwargs, strict, ignored) -> tuple[Any, dict[str, str]]:
    """(placed params, {ignored key: why}) of load_pretrained; `ignored`: keys already left out."""
    check_layout(sd, plain=False, what=f"SatMAE++ checkpoint {path}")
    wrapped = set(abstract_params) == {"params"}
    abstract = abstract_params["params"] if wrapped else abstract_params
    target = "mae" if "encoder" in abstract else "vit"
    cfg, _ = _config(model_kwargs, target)
    groups = cfg["groups"]
    if target == "mae" and pred_bands(groups, cfg["pred_order"]) != pred_bands(groups, "reference"):
        logging.warning("init_from %s: the model reads its decoder in eojax's band order (pred_order="
                        "'bands'); a SatMAE++ checkpoint's decoder and multi-scale head were trained in "
                        "SatMAE++'s (pred_order='reference'), which differs for the groups %s", path, groups)
    params, more = satmae_from_torch(sd, model_kwargs, target=target, strict=strict)
    ignored = {**ignored, **more}
    check_compatible(params, abstract, f"SatMAE++ checkpoint {path}")
    by_reason: dict[str, list[str]] = {}
    for key, why in ignored.items():
        by_reason.setdefault(why, []).append(key)
    for why, keys in by_reason.items():  # one line per reason: a ViT-L decoder is ~150 keys
        logging.warning("init_from %s: ignored %d keys (%s): %s%s", path, len(keys), why,
                        ", ".join(keys[:6]), ", ..." if len(keys) > 6 else "")

    placed = common.place(traverse_util.flatten_dict(params), abstract)
    logging.info("initialised params from SatMAE++ checkpoint %s", path)
    return ({"params": placed} if wrapped else placed), ignored


def load_encoder(path, abstract_params: Any, encoder, *, strict: bool = True):
    """(params, report) of a SatMAE++ encoder (the seg encoder 'satmae') from a published file.

    The parts of a pretraining or fine-tuning checkpoint that are not the encoder (decoder,
    multi-scale head, classifier) are left out and reported in report['ignored'], as the other seg
    encoders' converters do; any other unexpected key and, when strict, trained embeddings loaded
    into fixed ones (set learned_embed=True) are errors."""
    kwargs = {f: getattr(encoder, f) for f in GroupChannelViT.__dataclass_fields__ if f not in ("parent", "name")}
    sd = load_state_dict(path)
    parts = {k: why for k in sd for starts, why in _WHY
             if k.startswith(starts) and not k.startswith("fc_norm.")}  # fc_norm: its own error
    sd = {k: v for k, v in sd.items() if k not in parts}
    params, ignored = _load(sd, path, abstract_params, kwargs, strict, parts)
    report = {"ignored": ignored}
    if getattr(encoder, "bands", None) is not None:  # named bands: matched by common name / wavelength
        source, missing, unused = encoder.plan_bands()
        report.update(zero_filled_bands=missing, unused_bands=unused,
                      band_sources=common.band_sources(encoder, source))
        common.log_report(f"SatMAE++ checkpoint {path}", {k: v for k, v in report.items() if k != "ignored"})
    return params, report


def load_plain_pretrained(path, abstract_params: Any, model_kwargs: Mapping, *, strict: bool = True) -> Any:
    """Params for the mae task's `config.init_from` from SatMAE++'s fMoW-RGB pretraining file
    (MaskedAutoencoderViT): encoder and decoder; its multi-scale head is reported, not loaded."""
    def convert(sd, kwargs, strict):
        params, ignored = plain_vit_from_torch(sd, kwargs, target="mae", strict=strict, parts=(MULTISCALE,),
                                               what=f"SatMAE++ checkpoint {path}")
        return params, {"ignored": ignored}
    return common.load_encoder_file(path, abstract_params, model_kwargs, "SatMAE++ checkpoint", convert,
                                    strict=strict)[0]


def load_plain_encoder(path, abstract_params: Any, encoder, *, strict: bool = True):
    """(params, report) of eojax's plain ViT encoder ('mae': MAEEncoder.converter) from SatMAE++'s
    fMoW-RGB pretraining or fine-tuned file; the decoder, multi-scale head and classifier head are
    left out and reported in report['ignored']. A fine-tuned file's trained pos_embed needs
    learned_embed=True; a global-pool classifier has no final norm (classify loads it whole)."""
    kwargs = {f: getattr(encoder, f) for f in ViTEncoder.__dataclass_fields__ if f not in ("parent", "name")}

    def convert(sd, _, strict):
        params, ignored = plain_vit_from_torch(sd, kwargs, target="vit", strict=strict,
                                               parts=(DECODER, MULTISCALE, CLASSIFIER),
                                               what=f"SatMAE++ checkpoint {path}")
        return params, {"ignored": ignored}
    return common.load_encoder_file(path, abstract_params, encoder, "SatMAE++ checkpoint", convert, strict=strict)
