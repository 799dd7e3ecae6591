"""DOFA (Xiong et al. 2024, zhu-xlab/DOFA) encoder: a ViT-B/16 whose patch embedding is generated
from the wavelengths of the input bands, so one set of weights takes any band combination.

Weight generation (the reference's Dynamic_MLP_OFA), for C bands of wavelengths w (micrometres):
  e = sincos_1d(wave_dim, 1000 * w)                     (C, wave_dim) wavelength embedding
  e = e + relu(w2(relu(w1(e))))                         residual MLP ("fclayer")
  s = [weight_tokens (128), e (C), bias_token (1)]      learnable queries around the band tokens
  s = post-norm transformer layer(s)                    (4 heads, GELU MLP 2048, LayerNorm eps 1e-5)
  kernel = 0.01 * fc_weight(s[band rows] + e)           (C, p*p*D) -> the conv kernel per band
  bias   = 0.01 * fc_bias(s[last])                      (D,)
The generated kernel embeds 16x16 patches as the reference's conv (stride 16, padding 1: its patch
grid starts one pixel up and left, so each patch sees the row/column of the previous one plus zero
padding at the image border; kept so pretrained weights see what they were trained on).
Then a cls token, fixed 2D sin-cos positions (a never-trained parameter, resampled bicubically for
another grid), and timm pre-norm blocks (LayerNorm eps 1e-6).

Feature maps (`feature_norm`, FEATURE_NORMS):
  'final'        (default) current PANGAEA: the checkpoint's LayerNorm `norm` (eps 1e-6) on the
                 last block's tokens, so only the map of block depth-1 is normalised, if requested.
  'standardise'  PANGAEA before Oct 2024 with its class default use_norm=True (eojax's earlier
                 default): every returned map standardised over (h, w, D), what its LayerNorm over
                 (D, h, w) with affine 1 / 0 amounts to; the checkpoint's `norm` is not used.
  'none'         the blocks' tokens as they are (that older PANGAEA as its dofa.yaml ran it).
True / False (the earlier boolean field) mean 'standardise' / 'none'.
"""
from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.data import sensors
from eojax.models.encoders.base import (WAVELENGTHS_UM, PublishedViT, canonical_band, check_layers,
                                        data_bands, grid_of, resize_grid_embed)
from eojax.models.layers import Attention, Encoder, LayerNorm, Mlp, partitioned, sincos_1d, sincos_2d
from eojax.models.vit import patchify

Dtype = Any
SCALER = 0.01  # the reference scales the generated kernel and bias by this
NUM_WEIGHT_TOKENS = 128
FEATURE_NORMS = ("final", "standardise", "none")

VARIANTS = {
    "mu": dict(image_size=32, patch_size=8, width=32, depth=4, heads=2, mlp_dim=64, wave_dim=16,
               generator_heads=2, generator_mlp_dim=32, layers=(0, 1, 2, 3)),
    "base": dict(image_size=224, patch_size=16, width=768, depth=12, heads=12),
    "large": dict(image_size=224, patch_size=16, width=1024, depth=24, heads=16),  # DOFA's vit_large_patch16
}


def band_wavelengths(bands, sensor: str | None = None) -> tuple[float, ...]:
    """Central wavelengths (micrometres) of named bands, of `sensor` (None: found from the names).

    Sentinel-2 names (bands of a 'sentinel2' family sensor: S2A, S2B, HLS S30) take DOFA's own table
    (WAVELENGTHS_UM, PANGAEA's wave_list) so they get the reference's kernels; bands of other sensors
    the registry's centre (Landsat 8 B5 -> 0.865); names the registry does not know, DOFA's table
    (Sentinel-1 VV / VH)."""
    bands = [str(b) for b in bands]
    unknown = [b for b in bands if not sensors.known(b) and canonical_band(b) not in WAVELENGTHS_UM]
    if unknown:
        raise ValueError(f"dofa: no wavelength known for bands {unknown}; give `wavelengths` "
                         f"(micrometres) instead. Known: {sorted(WAVELENGTHS_UM)}, and the bands of "
                         f"{', '.join(sensors.names())}")
    out = []
    for name, band in zip(bands, data_bands(bands, sensor, "dofa")):
        if band is None:
            out.append(WAVELENGTHS_UM[canonical_band(name)])
        elif band.sensor and sensors.get(band.sensor).family == "sentinel2" and band.name in WAVELENGTHS_UM:
            out.append(WAVELENGTHS_UM[band.name])
        elif band.centre_um is None:
            raise ValueError(f"dofa: {name!r} is a common name ({band.common_name}); its wavelength "
                             "depends on the sensor: give `sensor` or `wavelengths` (micrometres)")
        else:
            out.append(band.centre_um)
    return tuple(out)


def feature_norm_mode(value) -> str:
    """DOFA's `feature_norm` as one of FEATURE_NORMS (the earlier booleans accepted)."""
    mode = {True: "standardise", False: "none"}[value] if isinstance(value, bool) else value
    if mode not in FEATURE_NORMS:
        raise ValueError(f"dofa: feature_norm={value!r} is unknown; one of {FEATURE_NORMS}")
    return mode


def _dense(features, names, name, bias_value=0.0, **kw):
    # The reference initialises the generator's linears Xavier-uniform with biases 0.01.
    return nn.Dense(features, kernel_init=partitioned(nn.initializers.xavier_uniform(), names),
                    bias_init=partitioned(nn.initializers.constant(bias_value), names[-1:]),
                    name=name, **kw)


class WeightGenerator(nn.Module):
    """Band tokens (C, wave_dim) -> (patch kernel (p*p*C, D) in patchify order, bias (D,))."""

    patch_size: int
    width: int
    heads: int = 4
    mlp_dim: int = 2048
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, bands):
        c, e = bands.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = lambda name, n: self.param(  # noqa: E731
            name, partitioned(nn.initializers.normal(0.02), (None, None)), (n, e), self.param_dtype)
        seq = jnp.concatenate([tok("weight_tokens", NUM_WEIGHT_TOKENS), bands, tok("bias_token", 1)])
        seq = seq[None].astype(self.dtype)  # a batch of one sequence
        # Post-norm layer (torch TransformerEncoderLayer, norm_first=False, no dropout).
        seq = LayerNorm(epsilon=1e-5, name="norm1", **kw)(
            seq + Attention(self.heads, name="attn", **kw)(seq))
        seq = LayerNorm(epsilon=1e-5, name="norm2", **kw)(seq + Mlp(self.mlp_dim, name="mlp", **kw)(seq))
        seq = seq[0]
        p = self.patch_size
        w = _dense(p * p * self.width, (None, None), "fc_weight", 0.01, **kw)(
            seq[NUM_WEIGHT_TOKENS:-1] + bands)
        b = _dense(self.width, (None, "embed"), "fc_bias", 0.01, **kw)(seq[-1])
        # (C, p*p*D) viewed (C, p, p, D) as the reference, reordered to patchify's (row, col, band).
        kernel = w.reshape(c, p, p, self.width).transpose(1, 2, 0, 3).reshape(p * p * c, self.width)
        return kernel * SCALER, b * SCALER


class DynamicPatchEmbed(nn.Module):
    """(B, H, W, C) + wavelengths (C,) -> (B, H/p * W/p, D) with generated weights."""

    patch_size: int
    width: int
    wave_dim: int = 128
    generator_heads: int = 4
    generator_mlp_dim: int = 2048
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, wavelengths):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        e = jnp.asarray(sincos_1d(self.wave_dim, np.asarray(wavelengths, np.float64) * 1000), self.dtype)
        h = nn.relu(_dense(self.wave_dim, (None, None), "w1", 0.01, **kw)(e))
        e = e + nn.relu(_dense(self.wave_dim, (None, None), "w2", 0.01, **kw)(h))
        kernel, bias = WeightGenerator(self.patch_size, self.width, self.generator_heads,
                                       self.generator_mlp_dim, name="weight_generator", **kw)(e)
        _, h_px, w_px, _ = images.shape
        if self.padding:  # the conv's padding shifts its patch grid up-left by `padding` pixels
            images = jnp.pad(images, ((0, 0), (self.padding, 0), (self.padding, 0), (0, 0)))[:, :h_px, :w_px]
        x = patchify(images.astype(self.dtype), self.patch_size)
        return x @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class DOFA(PublishedViT):
    """images (B, H, W, C), C = len(wavelengths) -> [(B, H/p, W/p, width)] for `layers`.

    The bands are given by `wavelengths` (micrometres) or by name (`input_bands` of `sensor`:
    band_wavelengths; Sentinel-2 names take PANGAEA's DOFA wave list); nothing is zero-filled, any
    subset works.
    """

    converter: ClassVar[str] = "eojax.weights.dofa:load_pretrained"  # weights.common.load_encoder

    wavelengths: tuple | None = None
    wave_dim: int = 128
    generator_heads: int = 4
    generator_mlp_dim: int = 2048
    patch_padding: int = 1
    feature_norm: str = "final"  # FEATURE_NORMS (module docstring)

    bands = None  # wavelength-driven: any bands

    def band_wavelengths(self) -> tuple[float, ...]:
        if self.wavelengths is not None:
            if self.input_bands is not None and len(self.input_bands) != len(self.wavelengths):
                raise ValueError(f"dofa: {len(self.input_bands)} input_bands but "
                                 f"{len(self.wavelengths)} wavelengths")
            return tuple(float(w) for w in self.wavelengths)
        if self.input_bands is None:
            raise ValueError("dofa: give the bands' `wavelengths` (micrometres) or `input_bands` names")
        return band_wavelengths(self.input_bands, self.sensor)

    @nn.compact
    def __call__(self, images, train: bool = False):
        layers = check_layers(self.layers, self.depth, "dofa")
        mode = feature_norm_mode(self.feature_norm)
        waves = self.band_wavelengths()
        if images.ndim != 4 or images.shape[-1] != len(waves):
            raise ValueError(f"dofa: expected images (B, H, W, {len(waves)}) for wavelengths "
                             f"{waves}, got {images.shape}")
        b, h, w, _ = images.shape
        grid = (grid_of(h, self.patch_size, "dofa"), grid_of(w, self.patch_size, "dofa"))
        g0 = grid_of(self.image_size, self.patch_size, "dofa")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = DynamicPatchEmbed(self.patch_size, self.width, self.wave_dim, self.generator_heads,
                              self.generator_mlp_dim, self.patch_padding, name="patch_embed",
                              **kw)(images, waves)
        cls = self.param("cls_token", partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                         (1, 1, self.width), self.param_dtype)
        init = functools.partial(_sincos_2d_init, grid=(g0, g0))
        pos = self.param("pos_embed", partitioned(init, (None, None, "embed")),
                         (1, 1 + g0 * g0, self.width), self.param_dtype)
        pos = jax.lax.stop_gradient(pos[0]).astype(self.dtype)
        x = x + resize_grid_embed(pos[1:], (g0, g0), grid)[None]
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype) + pos[:1], (b, 1, self.width)), x], 1)
        blocks = Encoder(depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
                         dropout=self.dropout, scan=self.scan, remat=self.remat,
                         drop_path_rate=self.drop_path_rate,
                         attention_impl=self.attention_impl, name="blocks", **kw)
        last = self.depth - 1
        outs = blocks(x, train, return_layers=layers + ((last,) if mode == "final" else ()))
        if mode == "final":  # always built, so the parameter tree does not depend on `layers`
            normed = LayerNorm(epsilon=1e-6, name="norm", **kw)(outs[-1])
            outs = [normed if i == last else o for i, o in zip(layers, outs)]
        maps = [o[:, 1:].reshape(b, *grid, self.width) for o in outs]
        return [standardise(m) for m in maps] if mode == "standardise" else maps


def standardise(x, eps: float = 1e-6):
    """Per-sample zero mean, unit variance over (h, w, D), in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis=(1, 2, 3), keepdims=True)
    var = jnp.square(x32 - mean).mean(axis=(1, 2, 3), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _sincos_2d_init(key, shape, dtype, grid):
    del key
    pe = sincos_2d(shape[-1], *grid)
    return jnp.asarray(np.concatenate([np.zeros((1, shape[-1]), np.float32), pe])[None], dtype)
