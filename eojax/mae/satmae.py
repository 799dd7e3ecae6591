"""SatMAE++ group-channel masked autoencoder (Noman et al. 2024) with a multi-scale head.

Bands are split into groups; each group has its own patch embedding, so an image gives G * N tokens
ordered (group, location): token g * N + n. Each token gets a fixed 2D sin-cos position embedding
(width D - c) concatenated with a fixed 1D sin-cos group embedding (width c, group index g), position
part first. The encoder sees the kept tokens (plus a cls token with no embedding); the decoder sees
all G * N positions (its cls gets a zero position part and the group embedding of index G), and one
linear head per group predicts that group's pixels. The reconstruction (all bands) feeds the
multi-scale head (eojax.models.upsample) that predicts the image at 2x and 4x.

Deviations from the reference (techmn/satmae_pp), all deliberate:
  * Patch vectors use eojax's (row, col, channel) pixel order, not the reference's (channel, row, col).
  * The reference concatenates the per-group predictions in group order and then treats them as band
    order (loss and multi-scale input); with non-contiguous groups that pairs a prediction with
    another band. By default (pred_order='bands') every group's prediction is compared with, and
    placed at, its own bands; pred_order='reference' is SatMAE++'s order, which a published
    pretraining checkpoint's decoder and multi-scale head were trained on (the satmae task picks it
    for config.init_from=<file>). The two agree when the groups are contiguous.
  * Losses honour a validity mask (nodata), at every scale.
  * All convolutions use Xavier-uniform kernels (the reference leaves the transposed and 1x1 convs
    at torch's default init).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.models import layers
from eojax.mae.model import num_kept, random_masking
from eojax.models.upsample import MultiScaleHead, multiscale_flops
from eojax.models.vit import (PatchEmbed, _pair, block_maps, constant_init, interpolate_pos_embed, patchify,
                              pool_tokens, unpatchify)

Dtype = Any

# 10 Sentinel-2 bands B2,B3,B4,B5,B6,B7,B8,B8A,B11,B12 (B1, B9, B10 dropped) grouped as
# (B2,B3,B4,B8), (B5,B6,B7,B8A), (B11,B12): the reference's default grouping.
GROUPS_S2_10 = ((0, 1, 2, 6), (3, 4, 5, 7), (8, 9))

# Reference sizes: c = 256 for both ViT-B and ViT-L, decoder 512 wide with c = 128, 96 px, patch 8.
VARIANTS = {
    "mu": dict(image_size=16, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64, group_embed_dim=8,
               decoder_width=32, decoder_depth=1, decoder_heads=2, decoder_group_embed_dim=8),
    "tiny": dict(width=192, depth=12, heads=3, group_embed_dim=64, decoder_width=256,
                 decoder_depth=4, decoder_heads=8, decoder_group_embed_dim=64),
    "base": dict(width=768, depth=12, heads=12, group_embed_dim=256),
    "large": dict(width=1024, depth=24, heads=16, group_embed_dim=256),
}
# How a group's decoder prediction maps to bands (SatMAE.pred_order, pred_bands).
PRED_ORDERS = ("bands", "reference")

_COMMON = dict(image_size=96, patch_size=8, groups=GROUPS_S2_10, decoder_width=512, decoder_depth=8,
               decoder_heads=16, decoder_group_embed_dim=128, mask_ratio=0.75, spatial_mask=False,
               multiscale=True, norm_pix_loss=False)


def satmae_config(variant: str, **overrides) -> dict:
    """Keyword arguments for SatMAE (mlp_dim = 4 * width unless given) + overrides."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown SatMAE variant {variant!r}; known: {sorted(VARIANTS)}")
    cfg = dict(_COMMON, **VARIANTS[variant])
    cfg.setdefault("mlp_dim", 4 * cfg["width"])
    cfg.update(overrides)
    return cfg


def _check_groups(groups) -> int:
    """Groups must partition channels 0..C-1 (each band in exactly one group); returns C."""
    flat = [int(c) for g in groups for c in g]
    if not groups or any(len(g) == 0 for g in groups) or sorted(flat) != list(range(len(flat))):
        raise ValueError(f"groups must partition channels 0..C-1 exactly once, got {groups}")
    return len(flat)


def pred_bands(groups, pred_order: str = "bands") -> tuple[tuple[int, ...], ...]:
    """The bands each group's decoder prediction stands for: the group's own bands ('bands'), or
    SatMAE++'s reading ('reference'): the predictions concatenated in group order ARE band order, so
    group i predicts the consecutive bands after those of groups 0..i-1."""
    if pred_order not in PRED_ORDERS:
        raise ValueError(f"pred_order={pred_order!r}: one of {PRED_ORDERS}")
    if pred_order == "bands":
        return tuple(tuple(int(c) for c in g) for g in groups)
    starts = np.cumsum([0] + [len(g) for g in groups])
    return tuple(tuple(range(a, b)) for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()))


def pos_group_embed(width: int, group_dim: int, num_groups: int, grid_h: int, grid_w: int):
    """(G, N, width) fixed embedding: [sincos_2d(width - c) of the location, sincos_1d(c) of g]."""
    if not 0 < group_dim < width or (width - group_dim) % 4 or group_dim % 2:
        raise ValueError(f"group embedding {group_dim} of width {width}: need an even c < width "
                         "with width - c divisible by 4")
    n = grid_h * grid_w
    pos = np.broadcast_to(layers.sincos_2d(width - group_dim, grid_h, grid_w)[None],
                          (num_groups, n, width - group_dim))
    grp = np.broadcast_to(layers.sincos_1d(group_dim, np.arange(num_groups))[:, None],
                          (num_groups, n, group_dim))
    return np.concatenate([pos, grp], axis=-1)


def decoder_pos_group_embed(width: int, group_dim: int, num_groups: int, grid_h: int, grid_w: int):
    """(1 + G * N, width): the decoder's embedding, row 0 for its cls token (a zero position part and
    the group embedding of the extra index G, as the reference), then pos_group_embed flattened."""
    cls = np.concatenate([np.zeros(width - group_dim, np.float32),
                          layers.sincos_1d(group_dim, [num_groups])[0]])
    rest = pos_group_embed(width, group_dim, num_groups, grid_h, grid_w).reshape(-1, width)
    return np.concatenate([cls[None], rest], axis=0)


class GroupChannelViT(nn.Module):
    """images (B, H, W, C) -> tokens (B, [1 +] G * N, width) after the final LayerNorm.

    The encoder of SatMAE (same parameter tree). Positions are recomputed for the input's own
    grid, so a fine-tuning resolution different from pretraining needs no parameter change.

    learned_embed=True is the reference's fine-tuning ViT (GroupChannelsVisionTransformer), whose
    position and group embeddings are trained: parameters `pos_embed` (h * w, width - c) for the
    configured grid and `channel_embed` (G, c), initialised to the same sin-cos; an input of another
    grid gets `pos_embed` resized bicubically (interpolate_pos_embed).
    """

    image_size: int | Sequence[int] = 96
    patch_size: int = 8
    groups: tuple = GROUPS_S2_10
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int | None = None
    group_embed_dim: int = 256
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool = False
    use_cls_token: bool = True
    attention_impl: str | None = None
    learned_embed: bool = False
    drop_path_rate: float = 0.0  # stochastic-depth rate of the last block, 0 at the first (layers.Encoder)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) token grid of the configured image_size."""
        h, w = _pair(self.image_size)
        return h // self.patch_size, w // self.patch_size

    def setup(self):
        self.in_channels = _check_groups(self.groups)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.patch_embed = [PatchEmbed(self.patch_size, self.width, **kw) for _ in self.groups]
        if self.learned_embed:  # (h * w, D - c) and (G, c): the fixed table's two parts, trainable
            table = pos_group_embed(self.width, self.group_embed_dim, len(self.groups), *self.grid)
            c = self.width - self.group_embed_dim
            self.pos_embed = self.param("pos_embed", constant_init(table[0, :, :c]),
                                        table[0, :, :c].shape, self.param_dtype)
            self.channel_embed = self.param("channel_embed", constant_init(table[:, 0, c:]),
                                            table[:, 0, c:].shape, self.param_dtype)
        if self.use_cls_token:
            self.cls_token = self.param(
                "cls_token", layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                (1, 1, self.width), self.param_dtype)
        self.blocks = layers.Encoder(
            depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim or 4 * self.width,
            dropout=self.dropout, scan=self.scan, remat=self.remat,
            attention_impl=self.attention_impl, drop_path_rate=self.drop_path_rate, **kw)
        self.norm = layers.LayerNorm(**kw)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.use_cls_token else 0

    def embed(self, images):
        """(B, H, W, C) -> (B, G, N, width): per-group patch embeddings + position/group embedding."""
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(f"expected images (B, H, W, {self.in_channels}) channels-last, "
                             f"got {images.shape}")
        gh, gw = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
        x = jnp.stack([emb(images[..., list(g)]) for emb, g in zip(self.patch_embed, self.groups)], 1)
        if not self.learned_embed:
            pe = pos_group_embed(self.width, self.group_embed_dim, len(self.groups), gh, gw)
            return x + jnp.asarray(pe, self.dtype)[None]
        g, n = len(self.groups), gh * gw
        pos = interpolate_pos_embed(self.pos_embed, self.grid, (gh, gw)).astype(self.dtype)
        pe = jnp.concatenate([jnp.broadcast_to(pos[None], (g, n, pos.shape[-1])),
                              jnp.broadcast_to(self.channel_embed.astype(self.dtype)[:, None],
                                               (g, n, self.group_embed_dim))], axis=-1)
        return x + pe[None]

    def prepend_cls(self, tokens):
        if not self.use_cls_token:
            return tokens
        cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
        return jnp.concatenate([cls, tokens], axis=1)

    def encode(self, tokens, train: bool = False):
        """Blocks + final LayerNorm on any token sequence (B, T, width)."""
        return self.norm(self.blocks(nn.with_logical_constraint(tokens, layers.BLE), train))

    def __call__(self, images, train: bool = False):
        x = self.embed(images)
        x = x.reshape(x.shape[0], -1, self.width)
        return self.encode(self.prepend_cls(x), train)

    def pool_tokens(self, images, pool: str = "avg", train: bool = False):
        """(B, width) for a classification head: 'avg' the mean over every group's patch tokens
        before the final norm (SatMAE++'s fine-tuning global_pool), 'cls' the normed cls token."""
        x = self.embed(images)
        tokens = self.blocks(nn.with_logical_constraint(self.prepend_cls(x.reshape(x.shape[0], -1, self.width)),
                                                        layers.BLE), train)
        return pool_tokens(tokens, self.norm, pool, self.num_prefix_tokens)

    def features(self, images, layers: Sequence[int] = (3, 5, 7, 11), train: bool = False):
        """Outputs of blocks `layers` (0-based) as (B, H/p, W/p, width) maps: the G group tokens of
        a location are averaged into one vector (a dense head needs one map; the mean keeps the
        width, concatenation would multiply it by G). The last block gets the final LayerNorm."""
        x = self.embed(images)
        b, g, n, d = x.shape
        gh, gw = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
        return block_maps(self.blocks, self.norm, self.prepend_cls(x.reshape(b, g * n, d)), layers,
                          self.depth, train, self.num_prefix_tokens,
                          lambda t: t.reshape(b, g, gh, gw, d).mean(axis=1))


class SatMAE(nn.Module):
    """images (B, H, W, C) -> dict(pred [per group (B, N, p*p*Cg)], mask (B, G, N) 1 = masked,
    recon (B, H, W, C), up2, up4 (when multiscale), latent, keep_idx, restore_idx); float32 outputs
    except latent. Masking draws from the 'mask' rng. keep_idx / restore_idx index the G * N tokens,
    or the N locations with spatial_mask (the kept tokens are then (group, kept location))."""

    image_size: int | Sequence[int] = 96
    patch_size: int = 8
    groups: tuple = GROUPS_S2_10
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_dim: int | None = None
    group_embed_dim: int = 256
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int | None = None
    decoder_group_embed_dim: int = 128
    mask_ratio: float = 0.75
    spatial_mask: bool = False  # True: a location is masked in all groups or in none
    multiscale: bool = True
    multiscale_ratio: int = 4  # hidden channels of the multi-scale head = C * ratio
    norm_pix_loss: bool = False  # read by satmae_loss; kept with the model like MAE
    pred_order: str = "bands"  # PRED_ORDERS; 'reference' for a published SatMAE++ checkpoint
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False
    remat: bool = False
    use_cls_token: bool = True
    attention_impl: str | None = None

    def setup(self):
        pred_bands(self.groups, self.pred_order)  # a bad pred_order fails at init
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = GroupChannelViT(
            image_size=self.image_size, patch_size=self.patch_size, groups=self.groups,
            width=self.width, depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim,
            group_embed_dim=self.group_embed_dim, dropout=self.dropout, scan=self.scan,
            remat=self.remat, use_cls_token=self.use_cls_token,
            attention_impl=self.attention_impl, **kw)
        # Both widths are model dims; only one may be named 'embed' (as in MAE).
        dense = lambda f, name: layers.Dense(  # noqa: E731
            f, name=name, **kw,
            kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), ("embed", None)),
            bias_init=layers.partitioned(nn.initializers.zeros, (None,)))
        self.decoder_embed = dense(self.decoder_width, "decoder_embed")
        self.mask_token = self.param(
            "mask_token", layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
            (1, 1, self.decoder_width), self.param_dtype)
        self.decoder = layers.Encoder(
            depth=self.decoder_depth, heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp_dim or 4 * self.decoder_width, dropout=self.dropout,
            scan=self.scan, remat=self.remat, attention_impl=self.attention_impl, **kw)
        self.decoder_norm = layers.LayerNorm(**kw)
        self.decoder_pred = [dense(self.patch_size**2 * len(g), f"decoder_pred_{i}")
                             for i, g in enumerate(self.groups)]
        if self.multiscale:
            self.multiscale_head = MultiScaleHead(self.multiscale_ratio, **kw)

    def __call__(self, images, train: bool = True, mask_ratio: float | None = None):
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        x = self.encoder.embed(images)  # (B, G, N, D), embeddings added before masking
        b, g, n, d = x.shape
        rng = self.make_rng("mask")
        if self.spatial_mask:
            keep_idx, mask, restore_idx = random_masking(rng, b, n, ratio)
            x = jnp.take_along_axis(x, keep_idx[:, None, :, None], axis=2).reshape(b, -1, d)
            mask = jnp.broadcast_to(mask[:, None], (b, g, n))
        else:  # one shuffle over all G * N tokens: groups keep different (and unequal) subsets
            keep_idx, mask, restore_idx = random_masking(rng, b, g * n, ratio)
            x = jnp.take_along_axis(x.reshape(b, g * n, d), keep_idx[:, :, None], axis=1)
            mask = mask.reshape(b, g, n)
        latent = self.encoder.encode(self.encoder.prepend_cls(x), train)

        y = self.decoder_embed(latent)
        prefix, dw = self.encoder.num_prefix_tokens, self.decoder_width
        cls, y = y[:, :prefix], y[:, prefix:]
        tok = self.mask_token.astype(y.dtype)
        if self.spatial_mask:  # kept tokens are (group, kept location): restore within each group
            y = y.reshape(b, g, -1, dw)
            y = jnp.concatenate([y, jnp.broadcast_to(tok[None], (b, g, n - y.shape[2], dw))], 2)
            y = jnp.take_along_axis(y, restore_idx[:, None, :, None], axis=2).reshape(b, g * n, dw)
        else:
            y = jnp.concatenate([y, jnp.broadcast_to(tok, (b, g * n - y.shape[1], dw))], 1)
            y = jnp.take_along_axis(y, restore_idx[:, :, None], axis=1)
        gh, gw = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
        pe = decoder_pos_group_embed(dw, self.decoder_group_embed_dim, g, gh, gw)[1 - prefix:]
        y = jnp.concatenate([cls, y], axis=1) + jnp.asarray(pe, y.dtype)[None]
        y = self.decoder_norm(self.decoder(y, train))[:, prefix:].reshape(b, g, n, dw)
        pred = [head(y[:, i]).astype(jnp.float32) for i, head in enumerate(self.decoder_pred)]

        h, w = images.shape[1:3]
        parts = [unpatchify(pr, self.patch_size, h, w, len(gr)) for pr, gr in zip(pred, self.groups)]
        recon = jnp.concatenate(parts, axis=-1)[..., _to_band_order(self.groups, self.pred_order)]
        out = dict(pred=pred, mask=mask, recon=recon, latent=latent, keep_idx=keep_idx,
                   restore_idx=restore_idx)
        if self.multiscale:
            out["up2"], out["up4"] = self.multiscale_head(recon)
        return out


def _to_band_order(groups, pred_order: str) -> np.ndarray:
    """Indices that reorder the group predictions, concatenated in group order, into band order."""
    return np.argsort([c for g in pred_bands(groups, pred_order) for c in g])


def _masked_l1(pred, target, valid):
    """Mean |pred - target| over channels and valid pixels (torch l1_loss when all are valid)."""
    c = target.shape[-1]
    v = jnp.ones(target.shape[:3], bool) if valid is None else valid.astype(bool)
    if pred.shape != target.shape or v.shape != target.shape[:3]:
        raise ValueError(f"multi-scale prediction {pred.shape}, target {target.shape} and valid "
                         f"{v.shape} do not match")
    err = jnp.where(v[..., None], jnp.abs(pred - target.astype(jnp.float32)), 0.0)  # NaN-safe
    total = jnp.sum(v) * c
    return jnp.sum(err) / jnp.maximum(total, 1).astype(jnp.float32)


def satmae_loss(out: Mapping, images, valid, patch_size: int, groups, norm_pix_loss: bool = False,
                  targets2=None, valid2=None, targets4=None, valid4=None, weights=(0.6, 0.4),
                  pred_order: str = "bands"):
    """SatMAE++ loss with validity masks. Returns (loss, aux of float32 scalars).

    mse: per pixel, the squared error averaged over the group's bands, weighted by valid * masked
      (mask of that group at that patch) and summed over all groups, divided by the total weight.
      The predictions are read in the model's pred_order (pred_bands): with 'reference' a group's
      bands are compared with whichever group's prediction stands for them, as SatMAE++ does.
      With every pixel valid this is the reference's forward_loss: per-patch group means summed over
      masked (group, patch) pairs / the total masked count. norm_pix_loss standardises each target
      patch over its valid pixels and ALL bands together (as the reference), unbiased var, eps 1e-6.
    multi-scale (when out has 'up2'): loss = w0 * mse + w1 * (0.5 * l1_2x + 0.5 * l1_4x), the L1s
      taken on every valid pixel of the 2x / 4x targets (valid2 / valid4; None = all valid).
    Without it the loss is the mse alone.
    """
    b, h, w, c = images.shape
    p, pp = patch_size, patch_size**2
    n = (h // p) * (w // p)
    if valid is None:
        valid = jnp.ones((b, h, w), bool)
    v = patchify(valid.astype(jnp.float32)[..., None], p)  # (B, N, p*p)
    target = patchify(images.astype(jnp.float32), p).reshape(b, n, pp, c)
    target = jnp.where(v[..., None] > 0, target, 0.0)  # NaN / Inf under nodata never leak in
    if norm_pix_loss:
        count = jnp.sum(v, axis=-1, keepdims=True)[..., None] * c
        mean = jnp.sum(target * v[..., None], axis=(2, 3), keepdims=True) / jnp.maximum(count, 1.0)
        sq = jnp.where(v[..., None] > 0, (target - mean) ** 2, 0.0)
        var = jnp.sum(sq, axis=(2, 3), keepdims=True) / jnp.maximum(count - 1.0, 1.0)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    mask = out["mask"].astype(jnp.float32)
    pred = jnp.concatenate([pr.astype(jnp.float32).reshape(b, n, pp, -1) for pr in out["pred"]], -1)
    pred = pred[..., _to_band_order(groups, pred_order)]  # (B, N, p*p, C) in band order
    num, den = 0.0, 0.0
    for i, group in enumerate(groups):
        err = jnp.mean((pred[..., list(group)] - target[..., list(group)]) ** 2, axis=-1)  # (B, N, p*p)
        wgt = v * mask[:, i, :, None]
        num = num + jnp.sum(jnp.where(wgt > 0, err, 0.0) * wgt)
        den = den + jnp.sum(wgt)
    mse = num / jnp.where(den > 0, den, 1.0)
    aux = dict(mse=mse, loss_weight=den, masked_valid_fraction=den / (len(groups) * v.size))
    has_up, has_targets = "up2" in out, targets2 is not None and targets4 is not None
    if has_up != has_targets:
        raise ValueError("multi-scale outputs and targets2/targets4 must be given together "
                         f"(outputs: {has_up}, targets: {has_targets})")
    if not has_up:
        return mse, aux
    aux["l1_2x"] = _masked_l1(out["up2"], targets2, valid2)
    aux["l1_4x"] = _masked_l1(out["up4"], targets4, valid4)
    loss = weights[0] * mse + weights[1] * (0.5 * aux["l1_2x"] + 0.5 * aux["l1_4x"])
    return loss, aux


def flops_per_image(cfg: Mapping, training: bool = False) -> float:
    """Analytic forward FLOPs (2 per multiply-add) of SatMAE(**cfg) per image; training=True
    gives 3x. Patch embeddings on all G*N tokens, encoder on the kept (+cls), decoder on G*N (+cls),
    per-group heads, and the multi-scale convolutions (upsample.multiscale_flops)."""
    fields = SatMAE.__dataclass_fields__
    d = {k: fields[k].default for k in _FLOP_KEYS}
    d.update({k: v for k, v in cfg.items() if k in _FLOP_KEYS})
    h, w = _pair(d["image_size"])
    p, groups = d["patch_size"], d["groups"]
    c, g = _check_groups(groups), len(groups)
    n = (h // p) * (w // p)
    prefix = 1 if d["use_cls_token"] else 0
    kept = g * num_kept(n, d["mask_ratio"]) if d["spatial_mask"] else num_kept(g * n, d["mask_ratio"])
    t_enc, t_dec = kept + prefix, g * n + prefix
    width, dw = d["width"], d["decoder_width"]
    flops = 2.0 * n * p * p * c * width  # every group's patches: sum_g N * p*p*Cg * D
    flops += layers.transformer_flops(t_enc, width, d["depth"], d["mlp_dim"] or 4 * width)
    flops += 2.0 * t_enc * width * dw
    flops += layers.transformer_flops(t_dec, dw, d["decoder_depth"], d["decoder_mlp_dim"] or 4 * dw)
    flops += 2.0 * n * dw * p * p * c  # group heads: sum_g N * Dd * p*p*Cg
    if d["multiscale"]:
        flops += multiscale_flops(h, w, c, d["multiscale_ratio"])
    return 3.0 * flops if training else flops


_FLOP_KEYS = ("image_size", "patch_size", "groups", "width", "depth", "mlp_dim", "decoder_width",
              "decoder_depth", "decoder_mlp_dim", "mask_ratio", "spatial_mask", "multiscale",
              "multiscale_ratio", "use_cls_token")
