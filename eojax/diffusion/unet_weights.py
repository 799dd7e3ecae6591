"""diffusers' UNet2DConditionModel (config.json + state dict) <-> eojax's diffusion UNet, both ways.

The layouts are the same module for module (see eojax.diffusion.unet); only names and kernel layouts
differ. diffusers key -> eojax path (L = levels, lvl = an eojax level, 0 = finest):
  conv_in, conv_out                                  conv_in, conv_out
  time_embedding.linear_1 | linear_2                 time_embed_1 | time_embed_2
  down_blocks.{lvl}.resnets.{i}                      down_{lvl}_res_{i}
    .norm1 .conv1 .time_emb_proj .norm2 .conv2         /norm1/gn /conv1 /time_proj /norm2/gn /conv2
    .conv_shortcut                                     /shortcut
  down_blocks.{lvl}.attentions.{i}                   down_{lvl}_attn_{i}
    .norm .proj_in .proj_out                           /norm/gn /proj_in /proj_out
    .transformer_blocks.{d}.norm1|2|3                  /block_{d}/norm1|2|3
      .attn1|attn2.to_q|to_k|to_v|to_out.0               /self_attn|cross_attn/query|key|value|out
      .ff.net.0.proj | .ff.net.2                         /geglu | /ff_out
  down_blocks.{lvl}.downsamplers.0.conv              down_{lvl}_downsample
  mid_block.resnets.0|1, mid_block.attentions.0      mid_res_0|1, mid_attn
  up_blocks.{L-1-lvl}.resnets|attentions.{i}         up_{lvl}_res_{i} | up_{lvl}_attn_{i}
  up_blocks.{L-1-lvl}.upsamplers.0.conv              up_{lvl}_upsample
  conv_norm_out                                      norm_out/gn
Conv2d (O, I, kh, kw) <-> flax (kh, kw, I, O); Linear (out, in) <-> Dense (in, out); norms as they are.

Checked against diffusers 0.42.1 (models/unets/unet_2d_condition.py and the blocks it builds): the
numbers eojax's UNet fixes and diffusers takes from the config are GroupNorm eps 1e-5 (norm_eps) in the
ResBlocks and conv_norm_out and 1e-6 in Transformer2DModel's norm (fixed there too), LayerNorm eps 1e-5,
[cos | sin] timestep features without a frequency shift (flip_sin_to_cos True, freq_shift 0), SiLU,
GEGLU as value * gelu(gate) (erf GELU), softmax(q k^T / sqrt(head_dim)), nearest x2 upsampling, the
skip concatenated after the running features, a 3x3 stride-2 downsample padded by 1 on every side
(downsample_padding 1) and a timestep embedding added to the features (resnet_time_scale_shift
'default'). Every config option that would change any of these, or add a module eojax's UNet has not
(class / addition embeddings, time_cond_proj_dim, dual or cross-only attention, ...), is refused by
unet_kwargs_from_config with a ValueError naming the key and its value.

The config key `attention_head_dim` is, in UNet2DConditionModel, the NUMBER of heads (num_attention_heads
must be unset; diffusers' own naming mistake, kept for compatibility): SD-1.5's 8 means 8 heads at
every level, SD-2's [5, 10, 20, 20] 5 .. 20 heads of 64 channels. The mid block takes the last level's.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import linen as nn, traverse_util

from eojax.checkpoint import key_problems
from eojax.diffusion.unet import UNet
from eojax.weights import common

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"
DIFFUSERS_VERSION = "0.42.1"  # the layout this module was checked against

# Options whose only accepted value is the one eojax's UNet computes (diffusers' default when absent).
FIXED = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": MID,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_attention_heads": None,
    "dual_cross_attention": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}
# Options that shape the model, read into the UNet's keyword arguments.
SHAPING = ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
           "layers_per_block", "attention_head_dim", "transformer_layers_per_block", "cross_attention_dim",
           "norm_num_groups", "use_linear_projection", "only_cross_attention", "mid_block_only_cross_attention")
# Options without effect on eojax's forward pass: `sample_size` is the training resolution (eojax takes
# any divisible size), `dropout` acts only in training, `upcast_attention` computes the attention
# logits in float32, which eojax's attention always does, and `addition_embed_type_num_heads` is read
# only with an addition_embed_type (refused above).
INERT = ("sample_size", "dropout", "upcast_attention", "addition_embed_type_num_heads")

# diffusers' defaults for the shaping keys a config.json may leave out (old files do).
DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN),
    "up_block_types": (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP), "layers_per_block": 2,
    "attention_head_dim": 8, "transformer_layers_per_block": 1, "cross_attention_dim": 1280,
    "norm_num_groups": 32, "use_linear_projection": False, "only_cross_attention": False,
    "mid_block_only_cross_attention": None,
}


def _refuse(key: str, value: Any, why: str):
    raise ValueError(f"UNet config {key}={value!r}: {why}")


def _matches(value, want) -> bool:
    if want is None or isinstance(want, bool):
        return value is want  # JSON null / true / false; 0 is not False here
    if isinstance(want, str):
        return value == want
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == want


def _one_value(config: Mapping, key: str, levels: int, what: str):
    """An int, or a per-level list whose entries agree (eojax's UNet has one value for all levels)."""
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            _refuse(key, value, f"needs one entry per level ({levels})")
        if any(isinstance(v, (list, tuple)) for v in value) or len(set(value)) != 1:
            _refuse(key, value, f"eojax's UNet has one {what} for all levels")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _refuse(key, value, "expected a positive integer")
    return value


def unet_kwargs_from_config(config: Mapping[str, Any]) -> dict:
    """eojax UNet keyword arguments from a diffusers UNet2DConditionModel config.json (a dict).

    Accepts what SD-1.x (1x1-conv projections, one head count) and SD-2.x (linear projections,
    per-level head counts) describe; anything else raises ValueError naming the key and value."""
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        _refuse("_class_name", name, "only UNet2DConditionModel converts to eojax's UNet")
    known = set(FIXED) | set(SHAPING) | set(INERT)
    for key in sorted(config):
        if not key.startswith("_") and key not in known:
            _refuse(key, config[key], f"an option unknown to this converter (diffusers {DIFFUSERS_VERSION}'s "
                                      "UNet2DConditionModel)")
    for key, want in FIXED.items():
        value = config.get(key, want)
        if not _matches(value, want):
            _refuse(key, value, f"not supported; eojax's UNet has only {key}={want!r}")
    cfg = {**DEFAULTS, **{k: config[k] for k in SHAPING if k in config}}

    chans = cfg["block_out_channels"]
    if not isinstance(chans, (list, tuple)) or not chans or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chans):
        _refuse("block_out_channels", chans, "expected a list of positive integers")
    chans, levels = tuple(chans), len(chans)
    down, up = tuple(cfg["down_block_types"]), tuple(cfg["up_block_types"])
    if len(down) != levels:
        _refuse("down_block_types", list(down), f"needs one block per entry of block_out_channels {list(chans)}")
    for t in down:
        if t not in (CROSS_DOWN, PLAIN_DOWN):
            _refuse("down_block_types", list(down), f"{t} is not one of {CROSS_DOWN}, {PLAIN_DOWN}")
    attention = tuple(t == CROSS_DOWN for t in down)
    want_up = tuple(CROSS_UP if a else PLAIN_UP for a in reversed(attention))
    if up != want_up:
        _refuse("up_block_types", list(up), f"eojax's UNet mirrors down_block_types: expected {list(want_up)}")
    for key in ("only_cross_attention", "mid_block_only_cross_attention"):
        value = cfg[key]
        flags = value if isinstance(value, (list, tuple)) else [value]
        if any(f not in (False, None) for f in flags):
            _refuse(key, value, "eojax's transformers always have self-attention")
    for key in ("in_channels", "out_channels", "norm_num_groups"):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < 1:
            _refuse(key, cfg[key], "expected a positive integer")
    if not isinstance(cfg["use_linear_projection"], bool):
        _refuse("use_linear_projection", cfg["use_linear_projection"], "expected true or false")

    heads = cfg["attention_head_dim"]  # the number of heads (module docstring)
    if isinstance(heads, (list, tuple)):
        if len(heads) != levels or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in heads):
            _refuse("attention_head_dim", heads, f"needs one positive head count per level ({levels})")
        heads = heads[0] if len(set(heads)) == 1 else tuple(heads)
    elif isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        _refuse("attention_head_dim", heads, "expected a positive head count")
    per_level = heads if isinstance(heads, tuple) else (heads,) * levels
    # Transformers at the attention levels and the mid block (the last level's count).
    for lvl in [i for i in range(levels) if attention[i]] + [levels - 1]:
        if chans[lvl] % per_level[lvl]:
            _refuse("attention_head_dim", cfg["attention_head_dim"],
                    f"{per_level[lvl]} heads (diffusers reads attention_head_dim as the head count) do not "
                    f"divide the {chans[lvl]} channels of level {lvl}")
    groups = cfg["norm_num_groups"]
    for c in sorted(set(chans)):
        if c % groups:
            _refuse("norm_num_groups", groups, f"does not divide {c} channels")
    return dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], block_out_channels=chans,
                attention=attention, layers_per_block=_one_value(cfg, "layers_per_block", levels, "layer count"),
                heads=heads,
                transformer_depth=_one_value(cfg, "transformer_layers_per_block", levels, "transformer depth"),
                cross_attention_dim=_one_value(cfg, "cross_attention_dim", levels, "cross-attention width"),
                norm_groups=groups, linear_projection=cfg["use_linear_projection"])


def diffusers_config(kwargs: Mapping[str, Any], sample_size: int = 64) -> dict:
    """The config.json of a UNet2DConditionModel equal to UNet(**kwargs), in SD-1.5's style (every
    option of FIXED at its value, written out); unet_kwargs_from_config reads it back to kwargs."""
    m = _module(kwargs)
    chans, levels = tuple(m.block_out_channels), len(m.block_out_channels)
    heads = tuple(m.heads) if isinstance(m.heads, (list, tuple)) else m.heads
    widths = set(chans) | {a + b for a, b in _up_resnet_inputs(m)}
    bad = sorted(c for c in widths if c % m.norm_groups)
    if bad:  # eojax's GroupNorm falls back to gcd(groups, C) groups; torch's GroupNorm refuses such widths
        raise ValueError(f"norm_groups {m.norm_groups} does not divide the widths {bad}: not a diffusers UNet")
    config = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        **FIXED,
        "in_channels": m.in_channels, "out_channels": m.out_channels, "block_out_channels": list(chans),
        "down_block_types": [CROSS_DOWN if a else PLAIN_DOWN for a in m.attention],
        "up_block_types": [CROSS_UP if a else PLAIN_UP for a in reversed(tuple(m.attention))],
        "layers_per_block": m.layers_per_block,
        "attention_head_dim": list(heads) if isinstance(heads, tuple) else heads,
        "transformer_layers_per_block": m.transformer_depth, "cross_attention_dim": m.cross_attention_dim,
        "norm_num_groups": m.norm_groups, "use_linear_projection": bool(m.linear_projection),
        "only_cross_attention": False, "upcast_attention": False, "dropout": 0.0, "sample_size": sample_size,
    }
    if isinstance(heads, tuple) and len(heads) != levels:
        raise ValueError(f"heads {heads} needs one count per level of {chans}")
    unet_kwargs_from_config(config)  # what is written must read back
    return config


# --------------------------------------------------------------------------------------------------
# The key table
# --------------------------------------------------------------------------------------------------
_UNET_FIELDS = ("in_channels", "out_channels", "block_out_channels", "attention", "layers_per_block", "heads",
                "transformer_depth", "cross_attention_dim", "norm_groups", "linear_projection")


def _module(kwargs: Mapping[str, Any]) -> UNet:
    """A UNet from kwargs (its defaults fill the rest; dtype settings play no part in the layout)."""
    if isinstance(kwargs, UNet):
        return kwargs
    return UNet(**{k: v for k, v in kwargs.items() if k in _UNET_FIELDS})


def _up_resnet_inputs(m: UNet) -> list[tuple[int, int]]:
    """(running width, skip width) entering each up ResBlock, in eojax's order (deepest level first)."""
    chans, levels = tuple(m.block_out_channels), len(m.block_out_channels)
    skips = [chans[0]]
    for lvl, c in enumerate(chans):
        skips += [c] * m.layers_per_block + ([c] if lvl < levels - 1 else [])
    out, width = [], chans[-1]
    for c in reversed(chans):
        for _ in range(m.layers_per_block + 1):
            out.append((width, skips.pop()))
            width = c
    return out


def _norm(dk: str, jp: tuple, n: int, inner: tuple = ("gn",)) -> list[common.Entry]:
    """torch GroupNorm / LayerNorm weight, bias -> flax scale, bias (eojax's GroupNorm wraps 'gn')."""
    return [common.same(f"{dk}.weight", (n,), jp + inner + ("scale",)),
            common.same(f"{dk}.bias", (n,), jp + inner + ("bias",))]


def _resnet(dk: str, jp: tuple, cin: int, cout: int, temb: int) -> list[common.Entry]:
    out = [*_norm(f"{dk}.norm1", jp + ("norm1",), cin),
           *common.conv(f"{dk}.conv1", jp + ("conv1",), cin, cout, 3),
           *common.linear(f"{dk}.time_emb_proj", jp + ("time_proj",), temb, cout),
           *_norm(f"{dk}.norm2", jp + ("norm2",), cout),
           *common.conv(f"{dk}.conv2", jp + ("conv2",), cout, cout, 3)]
    if cin != cout:
        out += common.conv(f"{dk}.conv_shortcut", jp + ("shortcut",), cin, cout, 1)
    return out


def _attention(dk: str, jp: tuple, width: int, context: int) -> list[common.Entry]:
    """diffusers Attention (bias-free to_q/k/v, to_out.0 with bias) -> eojax MultiHeadAttention; its
    kernels are plain (in, out) matrices, so the heads need no reshaping."""
    return [*common.linear(f"{dk}.to_q", jp + ("query",), width, width, bias=False),
            *common.linear(f"{dk}.to_k", jp + ("key",), context, width, bias=False),
            *common.linear(f"{dk}.to_v", jp + ("value",), context, width, bias=False),
            *common.linear(f"{dk}.to_out.0", jp + ("out",), width, width)]


def _transformer(dk: str, jp: tuple, c: int, m: UNet) -> list[common.Entry]:
    """Transformer2DModel -> SpatialTransformer."""
    proj = (lambda k, p: common.linear(k, p, c, c)) if m.linear_projection else (
        lambda k, p: common.conv(k, p, c, c, 1))
    out = [*_norm(f"{dk}.norm", jp + ("norm",), c), *proj(f"{dk}.proj_in", jp + ("proj_in",))]
    for d in range(m.transformer_depth):
        bk, bp = f"{dk}.transformer_blocks.{d}", jp + (f"block_{d}",)
        out += [*_norm(f"{bk}.norm1", bp + ("norm1",), c, ()),
                *_attention(f"{bk}.attn1", bp + ("self_attn",), c, c),
                *_norm(f"{bk}.norm2", bp + ("norm2",), c, ()),
                *_attention(f"{bk}.attn2", bp + ("cross_attn",), c, m.cross_attention_dim),
                *_norm(f"{bk}.norm3", bp + ("norm3",), c, ()),
                # GEGLU's proj: (value | gate) halves, the order eojax's geglu splits them in
                *common.linear(f"{bk}.ff.net.0.proj", bp + ("geglu",), c, 8 * c),
                *common.linear(f"{bk}.ff.net.2", bp + ("ff_out",), 4 * c, c)]
    return out + proj(f"{dk}.proj_out", jp + ("proj_out",))


def unet_entries(kwargs: Mapping[str, Any]) -> list[common.Entry]:
    """The key table of UNet(**kwargs): one Entry per diffusers key."""
    m = _module(kwargs)
    chans, levels, layers = tuple(m.block_out_channels), len(m.block_out_channels), m.layers_per_block
    temb = 4 * chans[0]
    out = [*common.conv("conv_in", ("conv_in",), m.in_channels, chans[0], 3),
           *common.linear("time_embedding.linear_1", ("time_embed_1",), chans[0], temb),
           *common.linear("time_embedding.linear_2", ("time_embed_2",), temb, temb)]
    width = chans[0]
    for lvl, (c, attn) in enumerate(zip(chans, m.attention)):
        dk = f"down_blocks.{lvl}"
        for i in range(layers):
            out += _resnet(f"{dk}.resnets.{i}", (f"down_{lvl}_res_{i}",), width, c, temb)
            width = c
            if attn:
                out += _transformer(f"{dk}.attentions.{i}", (f"down_{lvl}_attn_{i}",), c, m)
        if lvl < levels - 1:
            out += common.conv(f"{dk}.downsamplers.0.conv", (f"down_{lvl}_downsample",), c, c, 3)
    c = chans[-1]
    out += [*_resnet("mid_block.resnets.0", ("mid_res_0",), c, c, temb),
            *_transformer("mid_block.attentions.0", ("mid_attn",), c, m),
            *_resnet("mid_block.resnets.1", ("mid_res_1",), c, c, temb)]
    inputs = iter(_up_resnet_inputs(m))
    for lvl in reversed(range(levels)):
        c, attn, dk = chans[lvl], m.attention[lvl], f"up_blocks.{levels - 1 - lvl}"  # diffusers: deepest first
        for i in range(layers + 1):
            running, skip = next(inputs)
            out += _resnet(f"{dk}.resnets.{i}", (f"up_{lvl}_res_{i}",), running + skip, c, temb)
            if attn:
                out += _transformer(f"{dk}.attentions.{i}", (f"up_{lvl}_attn_{i}",), c, m)
        if lvl > 0:
            out += common.conv(f"{dk}.upsamplers.0.conv", (f"up_{lvl}_upsample",), c, c, 3)
    return out + [*_norm("conv_norm_out", ("norm_out",), chans[0]),
                  *common.conv("conv_out", ("conv_out",), chans[0], m.out_channels, 3)]


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------
def params_from_diffusers(state_dict: Mapping[str, np.ndarray], kwargs: Mapping[str, Any],
                          dtype=np.float32, *, consume: bool = False) -> dict:
    """A diffusers UNet state dict -> eojax UNet(**kwargs) params (nested dict of numpy arrays of
    `dtype`, without the {'params': ...} wrapper). Every missing, unexpected or misshapen key is
    named in one CheckpointMismatchError. `consume`: `state_dict` is emptied as it is converted (after
    the checks), so the 3.4 GB SD-1.5 UNet is not held twice."""
    entries = unet_entries(kwargs)
    problems = common.check_entries(state_dict, entries)
    known = {e.key for e in entries}
    problems += [f"not in this model: {k} {tuple(np.shape(state_dict[k]))}" for k in sorted(set(state_dict) - known)]
    if problems:
        common.raise_problems(problems, "diffusers UNet state dict")
    return traverse_util.unflatten_dict(common.convert(state_dict, entries, dtype, consume=consume))


def params_to_diffusers(params: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """eojax UNet params (boxed or not, with or without {'params': ...}) -> diffusers' state dict
    {key: numpy array}, the exact inverse of params_from_diffusers. Given abstract params (jax.eval_shape's
    ShapeDtypeStructs) it returns the state dict's ShapeDtypeStructs instead, nothing materialised."""
    params = nn.meta.unbox(params)
    params = params["params"] if set(params) == {"params"} else params
    flat = traverse_util.flatten_dict(dict(params))
    entries = unet_entries(kwargs)
    if not all(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values()):
        return common.export({k: np.asarray(v) for k, v in flat.items()}, entries, "eojax UNet params")
    # Abstract: export's key check, and each torch shape from to_torch applied to zero-stride views
    # (transposes of those stay views: nothing is allocated).
    zeros = lambda shape: np.broadcast_to(np.float32(0), shape)
    want = {}
    for e in entries:
        want.update(zip(e.paths, (a.shape for a in e.to_jax(zeros(e.shape)))))
    common.raise_problems(key_problems({k: v.shape for k, v in flat.items()}, want, "params", "/".join),
                          "eojax UNet params")
    return {e.key: jax.ShapeDtypeStruct(e.to_torch(*[zeros(flat[p].shape) for p in e.paths]).shape,
                                        flat[e.paths[0]].dtype) for e in entries}


__all__ = ["unet_kwargs_from_config", "params_from_diffusers", "params_to_diffusers", "diffusers_config",
           "unet_entries"]
