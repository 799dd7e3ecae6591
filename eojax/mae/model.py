"""Masked autoencoder (He et al. 2021) on the ViT encoder, with a nodata-aware loss.

The encoder sees only the kept patches (plus cls); a light decoder sees every position (mask tokens
where patches were dropped) and predicts the pixels of each patch. The loss is taken on masked
patches only and, for Earth-observation rasters, on valid (non-nodata) pixels only.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.models import layers
from eojax.models.vit import ViTEncoder, _pair, gather_tokens, patchify, unpatchify, vit_config

__all__ = [
    "MAE",
    "mae_config",
    "mae_loss",
    "random_masking",
    "patchify",
    "unpatchify",
    "num_kept",
    "flops_per_image",
]

Dtype = Any

# Decoder sizes by encoder variant: MAE's 512-wide, 8-deep decoder except for test / small models.
DECODER_VARIANTS = {
    "mu": dict(decoder_width=32, decoder_depth=1, decoder_heads=2),
    "tiny": dict(decoder_width=256, decoder_depth=4, decoder_heads=8),
    "small": dict(decoder_width=256, decoder_depth=4, decoder_heads=8),
}
_DEFAULT_DECODER = dict(decoder_width=512, decoder_depth=8, decoder_heads=16)


def mae_config(variant: str, **overrides) -> dict:
    """Keyword arguments for MAE: encoder sizes from vit.VARIANTS, decoder sizes, overrides."""
    cfg = vit_config(variant)
    cfg.update(DECODER_VARIANTS.get(variant, _DEFAULT_DECODER))
    cfg.update(overrides)
    return cfg


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """Patches kept per sample: int(N * (1 - mask_ratio)), exactly as MAE."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    keep = int(num_tokens * (1 - mask_ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch out of {num_tokens}")
    return keep


def random_masking(rng, batch: int, num_tokens: int, mask_ratio: float):
    """Per-sample random shuffle; the first K of each shuffle are kept.

    Returns keep_idx (B, K) int32, mask (B, N) float32 with 1 = masked (dropped), restore_idx (B, N)
    such that take_along_axis(shuffled_tokens, restore_idx) puts tokens back in grid order.
    """
    k = num_kept(num_tokens, mask_ratio)
    noise = jax.random.uniform(rng, (batch, num_tokens))
    shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)  # ascending: small noise is kept
    restore = jnp.argsort(shuffle, axis=1).astype(jnp.int32)
    # restore[n] is token n's rank in the shuffle; ranks >= K were dropped.
    mask = (restore >= k).astype(jnp.float32)
    return shuffle[:, :k], mask, restore


def permute_tokens(x, perm):
    """x (B, N, D) with its tokens reordered per row: out[b, i] = x[b, perm[b, i]], perm (B, N) a
    permutation of each row. Under layers.kernels 'xla_cpu' the backward gathers with the inverse
    permutation instead of autodiff's scatter-add into zeros (a full-size zero fill and a scatter on
    XLA:CPU); under 'plain' JAX differentiates the gather."""
    if layers.active_kernels() == "xla_cpu":
        return _permute_tokens_vjp(x, perm)
    return gather_tokens(x, perm)


@jax.custom_vjp
def _permute_tokens_vjp(x, perm):
    return gather_tokens(x, perm)


def _permute_tokens_fwd(x, perm):
    return gather_tokens(x, perm), perm


def _permute_tokens_bwd(perm, g):
    return gather_tokens(g, jnp.argsort(perm, axis=1)), None


_permute_tokens_vjp.defvjp(_permute_tokens_fwd, _permute_tokens_bwd)


class MAE(nn.Module):
    """images (B, H, W, C) -> dict(pred (B, N, p*p*C) float32, mask (B, N), latent, ids)."""

    # Encoder (same meaning as ViTEncoder).
    image_size: int | Sequence[int] = 224
    patch_size: int = 16
    in_channels: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool = False
    use_cls_token: bool = True
    attention_impl: str | None = None
    # Decoder and objective.
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int | None = None
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False  # read by the task's loss (mae_loss), kept here with the model

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = ViTEncoder(
            image_size=self.image_size,
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            width=self.width,
            depth=self.depth,
            heads=self.heads,
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            scan=self.scan,
            remat=self.remat,
            use_cls_token=self.use_cls_token,
            attention_impl=self.attention_impl,
            **kw,
        )
        # Encoder width -> decoder width: both are model dims; only one may be named 'embed'.
        self.decoder_embed = layers.Dense(
            self.decoder_width,
            kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
            bias_init=layers.partitioned(nn.initializers.zeros, (None,)),
            **kw,
        )
        self.mask_token = self.param(
            "mask_token",
            layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, 1, self.decoder_width),
            self.param_dtype,
        )
        self.decoder = layers.Encoder(
            depth=self.decoder_depth,
            heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp_dim or 4 * self.decoder_width,
            dropout=self.dropout,
            scan=self.scan,
            remat=self.remat,
            attention_impl=self.attention_impl,
            **kw,
        )
        self.decoder_norm = layers.LayerNorm(**kw)
        self.decoder_pred = layers.Dense(
            self.patch_size**2 * self.in_channels,
            kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
            bias_init=layers.partitioned(nn.initializers.zeros, (None,)),
            **kw,
        )

    def __call__(self, images, train: bool = True, mask_ratio: float | None = None):
        """`mask_ratio` overrides the configured ratio (e.g. for reconstructions); needs the 'mask' rng."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        b, (gh, gw) = images.shape[0], self.encoder.patch_grid(images)
        n = gh * gw
        keep_idx, mask, restore_idx = random_masking(self.make_rng("mask"), b, n, ratio)
        x = self.encoder.embed(images, keep_idx)  # (B, K, D): the kept patches only, with positions
        latent = self.encoder.encode(self.encoder.prepend_cls(x), train)

        y = self.decoder_embed(latent)
        prefix = self.encoder.num_prefix_tokens
        cls, y = y[:, :prefix], y[:, prefix:]
        mask_tokens = jnp.broadcast_to(
            self.mask_token.astype(y.dtype), (b, n - y.shape[1], self.decoder_width)
        )
        y = jnp.concatenate([y, mask_tokens], axis=1)  # shuffled order: kept first
        y = permute_tokens(y, restore_idx)  # back to grid order
        y = y + jnp.asarray(layers.sincos_2d(self.decoder_width, gh, gw), y.dtype)[None]
        y = jnp.concatenate([cls, y], axis=1)  # cls gets no position, as in MAE
        y = self.decoder_norm(self.decoder(y, train))
        pred = self.decoder_pred(y[:, prefix:])  # the cls token predicts no patch
        return dict(
            pred=pred.astype(jnp.float32),
            mask=mask,
            latent=latent,
            keep_idx=keep_idx,
            restore_idx=restore_idx,
        )


def mae_loss(pred, images, valid, mask, patch_size: int, norm_pix_loss: bool = False):
    """Masked-patch, valid-pixel MSE.

    pred (B, N, p*p*C); images (B, H, W, C); valid (B, H, W) bool (or 0/1 weights); mask (B, N)
    with 1 = masked. Each pixel's squared error is averaged over channels and weighted by
    valid * masked; the sum is divided by the total weight (0 when there is none).

    norm_pix_loss: the target patch is standardised by its own mean and variance over its VALID pixels
    (all channels together, as MAE's per-patch statistics; unbiased variance like torch's .var(),
    eps 1e-6). Values under invalid pixels never reach the loss, nor do unmasked patches.
    Returns (loss, aux) with float32 scalars.
    """
    b, h, w, c = images.shape
    p = patch_size
    n, pp = (h // p) * (w // p), p * p
    v = patchify(valid.astype(jnp.float32)[..., None], p)  # (B, N, p*p)
    target = patchify(images.astype(jnp.float32), p).reshape(b, n, pp, c)
    # where(), not multiply: a NaN or Inf under nodata must not leak in.
    target = jnp.where(v[..., None] > 0, target, 0.0)
    if norm_pix_loss:
        count = jnp.sum(v, axis=-1, keepdims=True)[..., None] * c  # (B, N, 1, 1) valid values
        mean = jnp.sum(target * v[..., None], axis=(2, 3), keepdims=True) / jnp.maximum(count, 1.0)
        sq = jnp.where(v[..., None] > 0, (target - mean) ** 2, 0.0)
        var = jnp.sum(sq, axis=(2, 3), keepdims=True) / jnp.maximum(count - 1.0, 1.0)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    pred = pred.astype(jnp.float32).reshape(b, n, pp, c)
    err = jnp.mean((pred - target) ** 2, axis=-1)  # (B, N, p*p)
    weight = v * mask.astype(jnp.float32)[:, :, None]
    err = jnp.where(weight > 0, err, 0.0)
    total = jnp.sum(weight)
    loss = jnp.sum(err * weight) / jnp.where(total > 0, total, 1.0)
    aux = dict(
        masked_valid_fraction=total / weight.size,
        valid_fraction=jnp.mean(v),
        loss_weight=total,
    )
    return loss, aux


def flops_per_image(cfg: Mapping, training: bool = False) -> float:
    """Analytic matmul FLOPs per image (2 per multiply-add) of MAE(**cfg) at its image_size.

    Forward: patch embedding of the K kept patches, encoder on K kept (+cls) tokens, decoder embedding,
    decoder on N (+cls) tokens, prediction head on the N patch tokens. training=True returns 3x forward (backward ~ 2x).
    Missing keys take the MAE field defaults.
    """
    d = {f.name: f.default for f in MAE.__dataclass_fields__.values() if f.name in _FLOP_KEYS}
    d.update({k: v for k, v in cfg.items() if k in _FLOP_KEYS})
    h, w = _pair(d["image_size"])
    p, c = d["patch_size"], d["in_channels"]
    n = (h // p) * (w // p)
    prefix = 1 if d["use_cls_token"] else 0
    t_enc, t_dec = num_kept(n, d["mask_ratio"]) + prefix, n + prefix
    width, dw = d["width"], d["decoder_width"]
    flops = 2.0 * (t_enc - prefix) * (p * p * c) * width
    flops += layers.transformer_flops(t_enc, width, d["depth"], d["mlp_dim"] or 4 * width)
    flops += 2.0 * t_enc * width * dw
    flops += layers.transformer_flops(t_dec, dw, d["decoder_depth"], d["decoder_mlp_dim"] or 4 * dw)
    flops += 2.0 * n * dw * (p * p * c)  # prediction head: patch tokens only
    return 3.0 * flops if training else flops


_FLOP_KEYS = (
    "image_size", "patch_size", "in_channels", "width", "depth", "mlp_dim", "use_cls_token",
    "decoder_width", "decoder_depth", "decoder_mlp_dim", "mask_ratio",
)
