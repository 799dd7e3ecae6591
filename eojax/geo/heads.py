"""Geographic heads on any encoder embedding, a small CNN backbone, and the two put together.

GeoHeads: (B, D) embedding -> climate logits (31), date encodings (2, sigmoid) and either coordinate
encodings (3, sigmoid; the MSE loss) or vMF-mixture logits (K; the mixture loss, whose learnable
log-concentrations `log_kappa` (K,) live here too so the optimizer sees them as parameters).

CoreCNN: a small conv net in the spirit of the PhilEO reference's CoreEncoder ('nano' sizes): a stem
block, then stages of residual blocks (1x1 conv, depthwise 3x3, 3x3 conv, squeeze-excitation) each
followed by 2x2 max-pooling, and a global average pool. Norms (`norm`): 'batch', the reference's
BatchNorm (statistics kept by the trainer as model state, global over the sharded batch), or 'layer',
LayerNorm over channels (eojax's earlier choice; per-sample, independent of the batch).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from eojax.geo.climate import NUM_CLASSES
from eojax.models import layers, vit

Dtype = Any
CONV_NAMES = (None, None, None, "channels")


def _conv(features, kernel, name, *, dtype=jnp.float32, param_dtype=jnp.float32):
    # No conv biases: every conv here is followed by a norm that would remove them (and each
    # parameter leaf costs optimizer ops and compile time).
    return nn.Conv(features, (kernel, kernel), padding="SAME", use_bias=False, dtype=dtype,
                   param_dtype=param_dtype, name=name,
                   kernel_init=layers.partitioned(nn.initializers.he_normal(), CONV_NAMES))


def _norm(kind, name, train, dtype, param_dtype):
    return layers.channel_norm(kind, name, train, param_dtype, what="model.cnn.norm")


class DepthwiseConv3x3(nn.Module):
    """Per-channel 3x3 convolution ('SAME' padding, no bias: a norm follows) written as nine shifted multiply-adds: the same
    function as a grouped conv (tests/test_geo.py checks it against one), but XLA's CPU backend runs
    grouped convolutions and their gradients slowly: 2-3x the time of these fused elementwise ops for
    a (16, 32, 32, 16) forward + backward pass."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel = self.param("kernel", layers.partitioned(nn.initializers.variance_scaling(2.0, "fan_in", "normal",
                                                                                          in_axis=(0, 1), out_axis=2),
                                                         (None, None, "channels")), (3, 3, c), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        h, w = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(padded[:, i:i + h, j:j + w] * kernel[i, j] for i in range(3) for j in range(3))


class SqueezeExcite(nn.Module):
    reduction: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        s = jnp.mean(x, axis=(1, 2))
        s = nn.relu(dense(max(1, c // self.reduction), name="reduce",
                          kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("channels", None)))(s))
        s = nn.sigmoid(dense(c, name="expand",
                             kernel_init=layers.partitioned(nn.initializers.lecun_normal(), (None, "channels")))(s))
        return x * s[:, None, None, :].astype(x.dtype)


class CoreBlock(nn.Module):
    """Residual block: 1x1 conv -> depthwise 3x3 -> 3x3 conv (norms, activations), squeeze-excitation,
    plus the input (projected by a 1x1 conv when the width changes)."""

    features: int
    norm: str = "batch"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(_norm, self.norm, train=train, **kw)
        f = self.features
        skip = x
        if x.shape[-1] != f:
            skip = norm("skip_norm")(_conv(f, 1, "skip", **kw)(x)).astype(self.dtype)
        h = nn.gelu(norm("norm1")(_conv(f, 1, "conv1", **kw)(x))).astype(self.dtype)
        h = nn.gelu(norm("norm2")(DepthwiseConv3x3(name="conv2", **kw)(h))).astype(self.dtype)
        h = norm("norm3")(_conv(f, 3, "conv3", **kw)(h)).astype(self.dtype)
        h = SqueezeExcite(name="se", **kw)(h)
        return nn.gelu(h + skip)


class CoreCNN(nn.Module):
    """images (B, H, W, C) -> (B, dims[-1]) embedding."""

    dims: Sequence[int] = (32, 64, 128, 256)
    depths: Sequence[int] = (1, 1, 2, 1)
    norm: str = "batch"  # 'batch' (the reference's) | 'layer'
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False):
        if len(self.dims) != len(self.depths):
            raise ValueError(f"CoreCNN dims {tuple(self.dims)} and depths {tuple(self.depths)} differ in length")
        kw = dict(norm=self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
        x = CoreBlock(self.dims[0], name="stem", **kw)(images.astype(self.dtype), train)
        for i, (dim, depth) in enumerate(zip(self.dims, self.depths)):
            for j in range(depth):
                x = CoreBlock(dim, name=f"stage{i}_block{j}", **kw)(x, train)
            if x.shape[1] > 1 and x.shape[2] > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class GeoHeads(nn.Module):
    """(B, D) -> {'climate': (B, 31), 'date': (B, 2), 'coords': (B, 3) | 'vmf': (B, K), 'log_kappa': (K,)}."""

    coord_loss: str = "vmf"
    num_centres: int = 0
    init_kappa: float = 100.0
    hidden: int = 0  # > 0: a shared Dense + GELU layer before the outputs
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _dense(self, n, name):
        return nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                        kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", None)),
                        bias_init=layers.partitioned(nn.initializers.zeros, (None,)))

    @nn.compact
    def __call__(self, z):
        z = z.astype(self.dtype)
        if self.hidden:
            z = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype, name="hidden",
                                 kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", "mlp")),
                                 bias_init=layers.partitioned(nn.initializers.zeros, ("mlp",)))(z))
        out = {"climate": self._dense(NUM_CLASSES, "climate")(z).astype(jnp.float32),
               "date": nn.sigmoid(self._dense(2, "date")(z).astype(jnp.float32))}
        if self.coord_loss == "vmf":
            if self.num_centres < 1:
                raise ValueError("the vMF head needs num_centres >= 1")
            out["vmf"] = self._dense(self.num_centres, "vmf")(z).astype(jnp.float32)
            out["log_kappa"] = self.param(
                "log_kappa", layers.partitioned(nn.initializers.constant(np.log(self.init_kappa)), (None,)),
                (self.num_centres,), jnp.float32)
        elif self.coord_loss == "mse":
            out["coords"] = nn.sigmoid(self._dense(3, "coords")(z).astype(jnp.float32))
        else:
            raise ValueError(f"coord_loss must be 'vmf' or 'mse', got {self.coord_loss!r}")
        return out


class GeoModel(nn.Module):
    """Backbone ('cnn': CoreCNN; 'vit': eojax's ViTEncoder with mean-pooled tokens) + GeoHeads."""

    backbone: str = "cnn"
    cnn: dict | None = None  # CoreCNN kwargs
    vit: dict | None = None  # ViTEncoder kwargs
    heads: dict | None = None  # GeoHeads kwargs
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.backbone == "cnn":
            self.encoder = CoreCNN(**dict(self.cnn or {}), **kw)
        elif self.backbone == "vit":
            self.encoder = vit.ViTEncoder(**dict(self.vit or {}), **kw)
        else:
            raise ValueError(f"model.backbone must be 'cnn' or 'vit', got {self.backbone!r}")
        self.head = GeoHeads(**dict(self.heads or {}), **kw)

    def embed(self, images, train: bool = False):
        if self.backbone == "cnn":
            return self.encoder(images, train)
        tokens = self.encoder(images, train)
        return jnp.mean(tokens[:, self.encoder.num_prefix_tokens:].astype(jnp.float32), axis=1)

    def __call__(self, images, train: bool = False):
        return self.head(self.embed(images, train))
