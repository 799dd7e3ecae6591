"""Vision Transformer encoder (MAE flavour: pre-LN blocks, fixed 2D sin-cos positions, cls token)."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.models import layers

Dtype = Any

# width, depth, heads (mlp_dim = 4 * width unless given). 'mu' is a test-size model.
VARIANTS = {
    "mu": dict(width=32, depth=2, heads=2, mlp_dim=64),
    "tiny": dict(width=192, depth=12, heads=3),
    "small": dict(width=384, depth=12, heads=6),
    "base": dict(width=768, depth=12, heads=12),
    "large": dict(width=1024, depth=24, heads=16),
    "huge": dict(width=1280, depth=32, heads=16),
}


def vit_config(variant: str, **overrides) -> dict:
    """Keyword arguments for ViTEncoder / MAE: the variant's sizes (mlp_dim filled in) + overrides."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown ViT variant {variant!r}; known: {sorted(VARIANTS)}")
    cfg = dict(VARIANTS[variant])
    cfg.setdefault("mlp_dim", 4 * cfg["width"])
    cfg.update(overrides)
    return cfg


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, (int,)) else (int(x[0]), int(x[1]))


def patchify(images, p: int):
    """(B, H, W, C) -> (B, (H/p)*(W/p), p*p*C); patches row-major, pixels ordered (row, col, channel)
    inside a patch, the same order as MAE's patchify."""
    b, h, w, c = images.shape
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def gather_tokens(x, idx):
    """x (B, N, ...) -> (B, K, ...): rows idx (B, K) of each sample; idx must be in range (it comes
    from argsort), which spares the gather its out-of-bounds select."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1, mode="promise_in_bounds")


def unpatchify(patches, p: int, h: int, w: int, c: int):
    """Inverse of patchify: (B, (h/p)*(w/p), p*p*c) -> (B, h, w, c); h, w are pixel sizes."""
    b = patches.shape[0]
    gh, gw = h // p, w // p
    if patches.shape[1:] != (gh * gw, p * p * c):
        raise ValueError(f"patches {patches.shape} do not match image {h}x{w}x{c} with patch {p}")
    x = patches.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def constant_init(value: np.ndarray):
    """A replicated parameter initialiser returning `value` (a fixed table made trainable)."""
    return layers.partitioned(lambda key, shape, dtype: jnp.asarray(value, dtype), (None,) * value.ndim)


def interpolate_pos_embed(pos, old_hw, new_hw, method: str = "bicubic"):
    """Resizes a LEARNED position embedding (..., extra + oh*ow, D) to (..., extra + nh*nw, D).

    Leading `extra` tokens (cls, ...) are kept; the grid part is resized with jax.image.resize
    (half-pixel centres like torch align_corners=False; jax's bicubic uses Keys a = -0.5 where torch
    uses -0.75, and antialiases when shrinking, so values differ slightly from a torch import).
    Fixed sin-cos embeddings need none of this: the models recompute them for any grid.
    """
    (oh, ow), (nh, nw) = _pair(old_hw), _pair(new_hw)
    pos = jnp.asarray(pos)
    extra = pos.shape[-2] - oh * ow
    if extra < 0:
        raise ValueError(f"pos embedding {pos.shape} has fewer than {oh}x{ow} tokens")
    if (oh, ow) == (nh, nw):
        return pos
    lead, d = pos.shape[:-2], pos.shape[-1]
    grid = pos[..., extra:, :].reshape(lead + (oh, ow, d))
    grid = jax.image.resize(grid.astype(jnp.float32), lead + (nh, nw, d), method=method)
    grid = grid.astype(pos.dtype).reshape(lead + (nh * nw, d))
    return jnp.concatenate([pos[..., :extra, :], grid], axis=-2)


def block_maps(blocks, norm, tokens, layers, depth: int, train: bool, prefix: int, to_map):
    """Run `blocks` (a layers.Encoder) on tokens and return `to_map(output)` of blocks `layers`,
    prefix (cls) tokens dropped. The final `norm` is applied to the last block's output (and always
    called, so the parameter tree is the encoder's whether or not the last block is requested)."""
    layers = tuple(int(i) for i in layers)
    outs = blocks(tokens, train, return_layers=layers + (depth - 1,))
    last = norm(outs[-1])
    return [to_map((last if i == depth - 1 else o)[:, prefix:]) for i, o in zip(layers, outs)]


class PatchEmbed(nn.Module):
    """Patchify + Dense: the same map as a conv with kernel = stride = patch_size. The kernel's input
    rows follow patchify's (row, col, channel) order; the pixel dim is never sharded (None).
    `keep_idx` (B, K) embeds only those patches (MAE's kept ones): a quarter of the work at mask 0.75."""

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, keep_idx=None):
        x = patchify(images, self.patch_size).astype(self.dtype)
        if keep_idx is not None:
            x = gather_tokens(x, keep_idx)
        x = layers.Dense(
            self.width,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=layers.partitioned(nn.initializers.xavier_uniform(), (None, "embed")),
            bias_init=layers.partitioned(nn.initializers.zeros, ("embed",)),
            name="proj",
        )(x)
        return nn.with_logical_constraint(x, layers.BLE)


def pool_tokens(tokens, norm, pool: str, prefix: int):
    """A classifier's (B, width) from the last block's tokens (B, T, width): 'avg' the mean of the
    tokens after the `prefix` (cls) ones, before the final `norm` (MAE's and SatMAE++'s global_pool,
    whose fc_norm follows), 'cls' the cls token after `norm` (MAE's linear probe)."""
    if pool == "cls":
        if not prefix:
            raise ValueError("pool='cls' needs an encoder with a cls token (use_cls_token=True)")
        return norm(tokens[:, 0])
    if pool != "avg":
        raise ValueError(f"pool={pool!r} is unknown; 'avg' or 'cls'")
    norm(tokens[:, :1])  # called all the same, so the parameter tree is the encoder's
    return tokens[:, prefix:].mean(axis=1)


class ViTEncoder(nn.Module):
    """images (B, H, W, C) -> tokens (B, [1 +] N, width) after the final LayerNorm.

    Positions are fixed 2D sin-cos computed from the input's own patch grid, so any H, W divisible by
    patch_size works (image_size is the nominal size used for FLOP counts and dummy inputs). The cls
    token (if any) gets no position, as in MAE.

    learned_embed=True is timm's VisionTransformer (the ViT that MAE / SatMAE++ fine-tune), whose
    positions are trained: a parameter `pos_embed` (h * w, width) for the configured grid, initialised
    to the same sin-cos; an input of another grid gets it resized bicubically (interpolate_pos_embed).
    The reference's cls position (row 0) is folded into cls_token on import.

    MAE uses the pieces separately: `embed` (patches + positions), `prepend_cls`, `encode` (blocks +
    final norm on any token subset).
    """

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
    drop_path_rate: float = 0.0  # stochastic-depth rate of the last block, 0 at the first (layers.Encoder)
    learned_embed: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) token grid of the configured image_size."""
        h, w = _pair(self.image_size)
        return h // self.patch_size, w // self.patch_size

    def setup(self):
        h, w = _pair(self.image_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image_size {h}x{w} is not divisible by patch_size {self.patch_size}"
            )
        self.patch_embed = PatchEmbed(
            self.patch_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype
        )
        if self.learned_embed:
            table = layers.sincos_2d(self.width, *self.grid)
            self.pos_embed = self.param("pos_embed", constant_init(table), table.shape, self.param_dtype)
        if self.use_cls_token:
            self.cls_token = self.param(
                "cls_token",
                layers.partitioned(nn.initializers.normal(0.02), (None, None, "embed")),
                (1, 1, self.width),
                self.param_dtype,
            )
        self.blocks = layers.Encoder(
            depth=self.depth,
            heads=self.heads,
            mlp_dim=self.mlp_dim or 4 * self.width,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scan=self.scan,
            remat=self.remat,
            attention_impl=self.attention_impl,
            drop_path_rate=self.drop_path_rate,
        )
        self.norm = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.use_cls_token else 0

    def patch_grid(self, images) -> tuple[int, int]:
        """(rows, cols) of the patch grid of images (B, H, W, C), after checking their layout."""
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(
                f"expected images (B, H, W, {self.in_channels}) channels-last, got {images.shape}"
            )
        return images.shape[1] // self.patch_size, images.shape[2] // self.patch_size

    def embed(self, images, keep_idx=None):
        """(B, H, W, C) -> (B, N, width): patch embeddings plus positions (no cls token).
        With `keep_idx` (B, K): only those patches, (B, K, width), each with its own position."""
        gh, gw = self.patch_grid(images)
        x = self.patch_embed(images, keep_idx)
        if self.learned_embed:
            pos = interpolate_pos_embed(self.pos_embed, self.grid, (gh, gw)).astype(self.dtype)
        else:
            pos = jnp.asarray(layers.sincos_2d(self.width, gh, gw), dtype=self.dtype)
        return x + (pos[None] if keep_idx is None else jnp.take(pos, keep_idx, axis=0))

    def prepend_cls(self, tokens):
        if not self.use_cls_token:
            return tokens
        cls = jnp.broadcast_to(self.cls_token.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
        return jnp.concatenate([cls, tokens], axis=1)

    def encode(self, tokens, train: bool = False):
        """Blocks + final LayerNorm on an arbitrary token sequence (B, T, width)."""
        return self.norm(self.blocks(tokens, train))

    def __call__(self, images, train: bool = False):
        return self.encode(self.prepend_cls(self.embed(images)), train)

    def pool_tokens(self, images, pool: str = "avg", train: bool = False):
        """(B, width) for a classification head (module function pool_tokens)."""
        tokens = self.blocks(self.prepend_cls(self.embed(images)), train)
        return pool_tokens(tokens, self.norm, pool, self.num_prefix_tokens)

    def features(self, images, layers: Sequence[int] = (3, 5, 7, 11), train: bool = False):
        """Outputs of blocks `layers` (0-based) as (B, H/p, W/p, width) maps, cls token dropped.

        Intermediate blocks are returned as they are; the last block gets the final LayerNorm, so
        it equals what `__call__` returns. Same parameters as `__call__`.
        """
        gh, gw = self.patch_grid(images)
        return block_maps(self.blocks, self.norm, self.prepend_cls(self.embed(images)), layers,
                          self.depth, train, self.num_prefix_tokens,
                          lambda t: t.reshape(t.shape[0], gh, gw, t.shape[-1]))
