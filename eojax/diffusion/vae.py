"""Stable Diffusion's VAE (diffusers' AutoencoderKL) in flax, NHWC, and its weights from / to diffusers.

Encoder: conv_in -> per level `layers_per_block` ResnetBlocks (+ a stride-2 conv, padded only on the
bottom/right, except at the last level) -> mid block (ResnetBlock, single-head self-attention,
ResnetBlock) -> GroupNorm, SiLU, conv_out to 2 * latent_channels -> quant_conv (1x1). The halves are
the posterior's mean and log-variance (clamped to [-30, 20]).
Decoder: post_quant_conv (1x1) -> conv_in -> mid block -> per level, widest first, layers_per_block + 1
ResnetBlocks (+ nearest x2 and a conv, except at the last level) -> GroupNorm, SiLU, conv_out.
Every norm is a GroupNorm (eps 1e-6) computed in float32.

Weights: `params_from_diffusers` reads a `vae/diffusion_pytorch_model.safetensors` state dict (also
with the legacy attention names query / key / value / proj_attn and 1x1-conv shaped (C, C, 1, 1)
attention weights of older SD-1.5 files) and `params_to_diffusers` writes diffusers' current names.
diffusers key -> eojax path (torch Conv2d (O, I, kh, kw) -> (kh, kw, I, O), Linear (O, I) -> (I, O)):
  {encoder,decoder}.conv_in | conv_out                    {encoder,decoder}/conv_in | conv_out
  {encoder,decoder}.conv_norm_out                         .../conv_norm_out/gn/{scale,bias}
  encoder.down_blocks.{i}.resnets.{j}.{norm1,conv1,norm2,conv2,conv_shortcut}
                                                          encoder/down_{i}/res_{j}/...
  encoder.down_blocks.{i}.downsamplers.0.conv             encoder/down_{i}/downsample
  decoder.up_blocks.{i}.resnets.{j}.* | upsamplers.0.conv decoder/up_{i}/res_{j}/... | upsample
  *.mid_block.resnets.{0,1}.*                             */mid/res_{0,1}/...
  *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
                                                          */mid/attn/{group_norm,to_q,to_k,to_v,to_out}
  quant_conv | post_quant_conv                            quant_conv | post_quant_conv
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn, traverse_util

from eojax.diffusion.model import Autoencoder
from eojax.diffusion.unet import BHWC, GroupNorm, _conv, _dense
from eojax.models import layers
from eojax.weights import common

Dtype = Any
EPS = 1e-6  # every GroupNorm of diffusers' VAE (resnets, attention, conv_norm_out)
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, GN-SiLU-conv, + input (through a 1x1 conv when the width changes); no time input."""

    features: int
    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _conv(self.features, name="conv1", **kw)(nn.silu(GroupNorm(self.groups, EPS, name="norm1", **kw)(x)))
        h = _conv(self.features, name="conv2", **kw)(nn.silu(GroupNorm(self.groups, EPS, name="norm2", **kw)(h)))
        if x.shape[-1] != self.features:
            x = _conv(self.features, kernel=1, name="conv_shortcut", **kw)(x)
        return nn.with_logical_constraint(x + h, BHWC)


class SpatialSelfAttention(nn.Module):
    """One head over all H*W positions: GroupNorm, q/k/v/out projections with biases, + input."""

    groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        tokens = GroupNorm(self.groups, EPS, name="group_norm", **kw)(x).reshape(b, h * w, 1, c)
        q, k, v = (_dense(c, ("embed", "heads"), name=n, **kw)(tokens) for n in ("to_q", "to_k", "to_v"))
        o = layers.dot_product_attention(q, k, v).reshape(b, h * w, c)
        o = _dense(c, ("heads", "embed"), name="to_out", **kw)(o)
        return nn.with_logical_constraint(x + o.reshape(b, h, w, c), BHWC)


class MidBlock(nn.Module):
    width: int
    groups: int = 32
    attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(groups=self.groups, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock(self.width, name="res_0", **kw)(x)
        if self.attention:
            x = SpatialSelfAttention(name="attn", **kw)(x)
        return ResnetBlock(self.width, name="res_1", **kw)(x)


def _downsample_conv(features, dtype, param_dtype, name):
    # diffusers' encoder Downsample2D: padding=0 after a zero pad of one row / column at the bottom and
    # right only, so it is not _conv's symmetric padding.
    names = (None, None, "channels", "embed")
    return nn.Conv(features, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=dtype,
                   param_dtype=param_dtype, name=name,
                   kernel_init=layers.partitioned(nn.initializers.lecun_normal(), names),
                   bias_init=layers.partitioned(nn.initializers.zeros, (names[-1],)))


class DownLevel(nn.Module):
    """`depth` ResnetBlocks, then (not at the last level) the stride-2 downsampling conv."""

    width: int
    depth: int
    groups: int = 32
    downsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.depth):
            x = ResnetBlock(self.width, self.groups, name=f"res_{j}", **kw)(x)
        if self.downsample:
            x = _downsample_conv(self.width, name="downsample", **kw)(x)
        return x


class UpLevel(nn.Module):
    """`depth` ResnetBlocks, then (not at the last level) nearest x2 and a conv."""

    width: int
    depth: int
    groups: int = 32
    upsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.depth):
            x = ResnetBlock(self.width, self.groups, name=f"res_{j}", **kw)(x)
        if self.upsample:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _conv(self.width, name="upsample", **kw)(x)
        return x


class Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int  # 2 * latent_channels: mean and log-variance
    groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = list(self.block_out_channels)
        x = _conv(widths[0], name="conv_in", **kw)(x.astype(self.dtype))
        for i, width in enumerate(widths):
            x = DownLevel(width, self.layers_per_block, self.groups, downsample=i < len(widths) - 1,
                          name=f"down_{i}", **kw)(x)
        x = MidBlock(widths[-1], self.groups, self.mid_attention, name="mid", **kw)(x)
        x = nn.silu(GroupNorm(self.groups, EPS, name="conv_norm_out", **kw)(x))
        return _conv(self.out_channels, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        widths = list(reversed(self.block_out_channels))
        x = _conv(widths[0], name="conv_in", **kw)(z.astype(self.dtype))
        x = MidBlock(widths[0], self.groups, self.mid_attention, name="mid", **kw)(x)
        for i, width in enumerate(widths):
            # One more ResnetBlock than the encoder's level (diffusers: layers_per_block + 1).
            x = UpLevel(width, self.layers_per_block + 1, self.groups, upsample=i < len(widths) - 1,
                        name=f"up_{i}", **kw)(x)
        x = nn.silu(GroupNorm(self.groups, EPS, name="conv_norm_out", **kw)(x))
        return _conv(self.out_channels, name="conv_out", **kw)(x)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL (DownEncoderBlock2D / UpDecoderBlock2D, SiLU) on NHWC arrays.

    encode(x (B, H, W, in_channels)) -> (mean, logvar), each (B, H/f, W/f, latent_channels) float32
    with f = 2 ** (len(block_out_channels) - 1); decode(z) -> (B, H, W, out_channels) float32.
    `__call__` decodes the posterior mean (it exists to initialize every parameter)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(groups=self.norm_num_groups, mid_attention=self.mid_block_add_attention,
                  dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = tuple(self.block_out_channels)
        self.encoder = Encoder(blocks, self.layers_per_block, 2 * self.latent_channels, **kw)
        self.decoder = Decoder(blocks, self.layers_per_block, self.out_channels, **kw)
        conv_kw = dict(kernel=1, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.use_quant_conv:
            self.quant_conv = _conv(2 * self.latent_channels, **conv_kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = _conv(self.latent_channels, **conv_kw)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x):
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"AutoencoderKL.encode: expected NHWC images with {self.in_channels} channels, "
                             f"got shape {x.shape}")
        h = self.encoder(x)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])


def latent_sample(mean, logvar, rng):
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1), in float32."""
    noise = jax.random.normal(rng, mean.shape, jnp.float32)
    return mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise


# --------------------------------------------------------------------------------------------------
# diffusers config
# --------------------------------------------------------------------------------------------------
# AutoencoderKL's __init__ defaults (diffusers 0.42), for keys a config leaves out.
DIFFUSERS_DEFAULTS = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                          up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
                          act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32,
                          scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
                          force_upcast=True, use_quant_conv=True, use_post_quant_conv=True,
                          mid_block_add_attention=True)
# Of these, sample_size (the tiling size) and force_upcast (the pipelines' fp32 upcast) do not change
# the network, and the latent scaling is read by scaling_factor_from_config / shift_factor_from_config.


def _refuse(key, value, why):
    raise ValueError(f"vae config {key}={value!r}: {why}")


def vae_kwargs_from_config(config: Mapping[str, Any]) -> dict:
    """AutoencoderKL(**kwargs) fields from a diffusers `vae/config.json` dict; anything this port does
    not implement (another class or block type, an activation other than SiLU, an unknown key)
    raises a one-line ValueError naming the key and its value."""
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        _refuse("_class_name", name, "only AutoencoderKL is supported")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        _refuse(unknown[0], config[unknown[0]], "an AutoencoderKL option this port does not know")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    blocks = tuple(int(b) for b in c["block_out_channels"])
    if not blocks:
        _refuse("block_out_channels", c["block_out_channels"], "needs at least one level")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(c[key])
        if len(types) != len(blocks):
            _refuse(key, types, f"needs one entry per block_out_channels level ({len(blocks)})")
        # diffusers' get_*_block drops a 'UNetRes' prefix before matching.
        bad = [t for t in types if t.removeprefix("UNetRes") != kind]
        if bad:
            _refuse(key, bad[0], f"only {kind} is supported")
    if c["act_fn"] not in ("silu", "swish"):
        _refuse("act_fn", c["act_fn"], "only silu (swish) is supported")
    groups = int(c["norm_num_groups"])
    if groups < 1 or any(b % groups for b in blocks):
        _refuse("norm_num_groups", groups, f"must divide every block_out_channels {list(blocks)}")
    for key in ("layers_per_block", "latent_channels", "in_channels", "out_channels"):
        if int(c[key]) < 1:
            _refuse(key, c[key], "must be >= 1")
    return dict(in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]), block_out_channels=blocks,
                layers_per_block=int(c["layers_per_block"]), latent_channels=int(c["latent_channels"]),
                norm_num_groups=groups, use_quant_conv=bool(c["use_quant_conv"]),
                use_post_quant_conv=bool(c["use_post_quant_conv"]),
                mid_block_add_attention=bool(c["mid_block_add_attention"]))


def _no_channel_statistics(config):
    # Per-channel latents_mean / latents_std (used by some other pipelines) have no place in the
    # scalar scale + shift of eojax's Autoencoder.
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            _refuse(key, config[key], "per-channel latent statistics are not supported")


def scaling_factor_from_config(config: Mapping[str, Any]) -> float:
    """Latents for the diffusion model are (z - shift_factor) * scaling_factor (SD-1.5: 0.18215)."""
    _no_channel_statistics(config)
    value = config.get("scaling_factor", DIFFUSERS_DEFAULTS["scaling_factor"])
    return float(DIFFUSERS_DEFAULTS["scaling_factor"] if value is None else value)


def shift_factor_from_config(config: Mapping[str, Any]) -> float:
    """The config's shift_factor, 0.0 when absent or null (SD-1.5 has none)."""
    _no_channel_statistics(config)
    value = config.get("shift_factor")
    return 0.0 if value is None else float(value)


# --------------------------------------------------------------------------------------------------
# diffusers state dict <-> params
# --------------------------------------------------------------------------------------------------
_ATTENTION = ("encoder.mid_block.attentions.0", "decoder.mid_block.attentions.0")
# Pre-0.14 diffusers (and many SD-1.5 files on the hub) named the mid-block attention's layers so.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _fields(model) -> dict:
    """AutoencoderKL fields from a module or a kwargs dict (vae_kwargs_from_config's)."""
    names = [f.name for f in dataclasses.fields(AutoencoderKL) if f.name not in ("parent", "name")]
    if isinstance(model, AutoencoderKL):
        return {n: getattr(model, n) for n in names}
    unknown = sorted(set(model) - set(names))
    if unknown:
        raise ValueError(f"not AutoencoderKL fields: {unknown}")
    return {**{f.name: f.default for f in dataclasses.fields(AutoencoderKL) if f.name in names}, **dict(model)}


def _gn(tk, jp, n):
    return [common.same(f"{tk}.weight", (n,), jp + ("gn", "scale")),
            common.same(f"{tk}.bias", (n,), jp + ("gn", "bias"))]


def _resnet(tk, jp, cin, cout):
    out = [*_gn(f"{tk}.norm1", jp + ("norm1",), cin), *common.conv(f"{tk}.conv1", jp + ("conv1",), cin, cout, 3),
           *_gn(f"{tk}.norm2", jp + ("norm2",), cout), *common.conv(f"{tk}.conv2", jp + ("conv2",), cout, cout, 3)]
    if cin != cout:
        out += common.conv(f"{tk}.conv_shortcut", jp + ("conv_shortcut",), cin, cout, 1)
    return out


def _mid(tk, jp, width, attention):
    out = _resnet(f"{tk}.resnets.0", jp + ("res_0",), width, width)
    if attention:
        at, ap = f"{tk}.attentions.0", jp + ("attn",)
        out += _gn(f"{at}.group_norm", ap + ("group_norm",), width)
        for torch_name, name in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out.0", "to_out")):
            out += common.linear(f"{at}.{torch_name}", ap + (name,), width, width)
    return out + _resnet(f"{tk}.resnets.1", jp + ("res_1",), width, width)


def _entries(model) -> list[common.Entry]:
    """The key table (diffusers key <-> eojax param path) of an AutoencoderKL's fields."""
    f = _fields(model)
    blocks, depth, latent = list(f["block_out_channels"]), int(f["layers_per_block"]), int(f["latent_channels"])
    attention = bool(f["mid_block_add_attention"])
    enc, dec = ("encoder",), ("decoder",)
    out = common.conv("encoder.conv_in", enc + ("conv_in",), f["in_channels"], blocks[0], 3)
    cin = blocks[0]
    for i, width in enumerate(blocks):
        for j in range(depth):
            out += _resnet(f"encoder.down_blocks.{i}.resnets.{j}", enc + (f"down_{i}", f"res_{j}"), cin, width)
            cin = width
        if i < len(blocks) - 1:
            out += common.conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", enc + (f"down_{i}", "downsample"),
                               width, width, 3)
    out += _mid("encoder.mid_block", enc + ("mid",), blocks[-1], attention)
    out += _gn("encoder.conv_norm_out", enc + ("conv_norm_out",), blocks[-1])
    out += common.conv("encoder.conv_out", enc + ("conv_out",), blocks[-1], 2 * latent, 3)
    if f["use_quant_conv"]:
        out += common.conv("quant_conv", ("quant_conv",), 2 * latent, 2 * latent, 1)
    if f["use_post_quant_conv"]:
        out += common.conv("post_quant_conv", ("post_quant_conv",), latent, latent, 1)
    widths = blocks[::-1]
    out += common.conv("decoder.conv_in", dec + ("conv_in",), latent, widths[0], 3)
    out += _mid("decoder.mid_block", dec + ("mid",), widths[0], attention)
    cin = widths[0]
    for i, width in enumerate(widths):
        for j in range(depth + 1):
            out += _resnet(f"decoder.up_blocks.{i}.resnets.{j}", dec + (f"up_{i}", f"res_{j}"), cin, width)
            cin = width
        if i < len(widths) - 1:
            out += common.conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", dec + (f"up_{i}", "upsample"),
                               width, width, 3)
    out += _gn("decoder.conv_norm_out", dec + ("conv_norm_out",), widths[-1])
    out += common.conv("decoder.conv_out", dec + ("conv_out",), widths[-1], f["out_channels"], 3)
    return out


def _modern_attention_keys(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Legacy mid-block attention keys renamed as diffusers renames them on load, and 1x1-conv shaped
    (C, C, 1, 1) projection weights as the (C, C) Linear weights they are. A legacy key whose modern
    name is also present is kept, to be reported as not in this model."""
    out = dict(sd)
    for path in _ATTENTION:
        for old, new in LEGACY_ATTENTION_NAMES.items():
            for leaf in ("weight", "bias"):
                src, dst = f"{path}.{old}.{leaf}", f"{path}.{new}.{leaf}"
                if src in out and dst not in out:
                    out[dst] = out.pop(src)
            w = out.get(f"{path}.{new}.weight")
            if w is not None and w.ndim == 4 and w.shape[2:] == (1, 1):
                out[f"{path}.{new}.weight"] = w[:, :, 0, 0]
    return out


def params_from_diffusers(state_dict: Mapping[str, np.ndarray], model, *, strict: bool = True,
                          dtype=None) -> dict:
    """A diffusers AutoencoderKL state dict -> the nested params of AutoencoderKL(**fields) (numpy,
    without the {'params': ...} wrapper), in `dtype` (default: the fields' param_dtype).

    model: an AutoencoderKL or its kwargs (vae_kwargs_from_config's). Legacy attention names and
    1x1-conv attention weights are accepted. Missing keys, shape mismatches and (strict) keys the
    model has no place for raise one CheckpointMismatchError naming each key and both shapes."""
    sd = _modern_attention_keys({k: np.asarray(v) for k, v in state_dict.items()})
    entries = _entries(model)
    problems = common.check_entries(sd, entries)
    if strict:
        known = {e.key for e in entries}
        problems += [f"not in this model: {k} {sd[k].shape}" for k in sorted(set(sd) - known)]
    if problems:
        common.raise_problems(problems, "AutoencoderKL checkpoint")
    dtype = _fields(model)["param_dtype"] if dtype is None else dtype
    return traverse_util.unflatten_dict(common.convert(sd, entries, dtype))


def params_to_diffusers(params: Mapping, model) -> dict[str, np.ndarray]:
    """AutoencoderKL params (boxed or not, {'params': ...} wrapped or not) -> diffusers' state dict
    with its current key names; every parameter must have a key and vice versa."""
    return common.export(common.flat_params(params), _entries(model), "AutoencoderKL params")


# --------------------------------------------------------------------------------------------------
# The diffusion task's interface
# --------------------------------------------------------------------------------------------------
def autoencoder(module: AutoencoderKL, params: Mapping, sample: bool = False, *, scaling_factor: float = 0.18215,
                shift_factor: float = 0.0, seed: int = 0) -> Autoencoder:
    """eojax.diffusion.model.Autoencoder over a VAE with bound params: latents are
    (z - shift_factor) * scaling_factor, where z is the posterior mean (sample=False) or a draw from
    it (sample=True, what SD's training does: latent_dist.sample() * scaling_factor).

    The returned encode_fn takes (images, rng=None): with sample=True and no rng (Autoencoder.encode
    passes none), the key is `seed` folded with a hash of the images' bits, so a batch always gets
    the same draw; pass an rng for fresh noise every step."""
    params = nn.meta.unbox(params)
    variables = params if set(params) == {"params"} else {"params": params}

    def encode_fn(images, rng=None):
        mean, logvar = module.apply(variables, images, method=AutoencoderKL.encode)
        if sample:
            if rng is None:
                bits = jax.lax.bitcast_convert_type(jnp.asarray(images, jnp.float32), jnp.uint32)
                rng = jax.random.fold_in(jax.random.PRNGKey(seed), jnp.sum(bits, dtype=jnp.uint32))
            mean = latent_sample(mean, logvar, rng)
        return mean - shift_factor

    def decode_fn(latents):
        return module.apply(variables, latents + shift_factor, method=AutoencoderKL.decode)

    return Autoencoder(encode_fn, decode_fn, module.downsample, module.latent_channels, scaling_factor)
