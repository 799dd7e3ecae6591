"""ResNet-18 / 34 / 50 / 101 (He et al. 2016) in torchvision's layout, channels-last, any band count.

    net = ResNet(**VARIANTS["50"], num_classes=10)
    variables = net.init(rng, images)                      # {'params': ..., 'batch_stats': ...}
    maps = net.apply(variables, images)                    # 4 stage maps, strides 4, 8, 16, 32
    vec = net.apply(variables, images, method="pooled")    # (B, D) global average pool
    logits = net.apply(variables, images, method="logits") # (B, num_classes): pooled -> fc
    maps, new = net.apply(variables, images, train=True, mutable=["batch_stats"])

torchvision's v1.5 network: a 7x7 stride-2 stem conv, BatchNorm, ReLU, a 3x3 stride-2 max-pool
(padding 1, padded with -inf), then four stages of BasicBlocks (18 / 34) or Bottlenecks (50 / 101)
with `width` * (1, 2, 4, 8) planes; a stage's first block downsamples (stride 2 from stage 2 on) and
projects the shortcut with a 1x1 conv + BatchNorm when the shape changes; the Bottleneck strides on its
3x3 conv (v1.5, not the 1x1 of the paper's v1). Padding is torch's explicit padding, so odd image
sizes give torch's map sizes. BatchNorm is torch's (momentum 0.1, eps 1e-5): running statistics in the
'batch_stats' collection (the trainer's model state), batch statistics in training; it computes in
float32 whatever the compute dtype.

Parameter names follow the torch keys one to one: `conv1`, `bn1`, `layer{s}_{j}/conv1`, `.../bn1`,
`.../downsample_conv`, `.../downsample_bn`, `fc` (eojax.weights.resnet converts both ways). The input
conv takes whatever channel count the images have; eojax.weights.resnet adapts a 3-band checkpoint's
to other counts (timm's adapt_input_conv rule).
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.models import layers

Dtype = Any
BHWC = ("batch", "height", "width", "channels")
BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}

VARIANTS = {
    "mu": dict(block="basic", stage_sizes=(1, 1, 1, 1), width=8),  # tests
    "18": dict(block="basic", stage_sizes=(2, 2, 2, 2), width=64),
    "34": dict(block="basic", stage_sizes=(3, 4, 6, 3), width=64),
    "50": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3), width=64),
    "101": dict(block="bottleneck", stage_sizes=(3, 4, 23, 3), width=64),
}


def conv(features: int, kernel: int, stride: int, name: str, dtype, param_dtype) -> nn.Conv:
    """torch Conv2d(bias=False, padding=kernel // 2); torchvision's init (He normal over fan-out)."""
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, param_dtype=param_dtype, name=name,
                   kernel_init=layers.partitioned(nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                                  (None, None, None, "channels")))


def batch_norm(name: str, param_dtype) -> nn.BatchNorm:
    """torch BatchNorm2d; `use_running_average` is given at call time (not train)."""
    return nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype, name=name,
                        scale_init=layers.partitioned(nn.initializers.ones, ("channels",)),
                        bias_init=layers.partitioned(nn.initializers.zeros, ("channels",)))


class Block(nn.Module):
    """One residual block: 'basic' (3x3, 3x3) or 'bottleneck' (1x1, 3x3 strided, 1x1 to 4 x planes)."""

    kind: str
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_dim = self.planes * EXPANSION[self.kind]

        def bn(y, name):
            norm = batch_norm(name, self.param_dtype)
            return norm(y.astype(jnp.float32), use_running_average=not train).astype(self.dtype)

        if self.kind == "basic":
            convs = [(self.planes, 3, self.stride), (self.planes, 3, 1)]
        else:
            convs = [(self.planes, 1, 1), (self.planes, 3, self.stride), (out_dim, 1, 1)]
        y = x
        for i, (features, kernel, stride) in enumerate(convs, start=1):
            y = bn(conv(features, kernel, stride, f"conv{i}", **kw)(y), f"bn{i}")
            if i < len(convs):
                y = nn.relu(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out_dim:
            shortcut = bn(conv(out_dim, 1, self.stride, "downsample_conv", **kw)(x), "downsample_bn")
        return nn.with_logical_constraint(nn.relu(y + shortcut), BHWC)


class ResNet(nn.Module):
    """images (B, H, W, C) -> the stage maps of `layers` (default all four: strides 4, 8, 16, 32,
    `feature_dims` channels). `pooled` / `logits` give the classifier's input and output.

    block: 'basic' (ResNet-18 / 34) or 'bottleneck' (50 / 101); stage_sizes: blocks per stage;
    width: the stem's channels and the first stage's planes (64 in every published ResNet);
    num_classes: the `fc` head's outputs (0: no head; `logits` then refuses).
    input_bands: the data's band names, only checked against the images' channel count (any count
    works; the input conv is built for it). In training each pass (one call of __call__, `stages`,
    `pooled` or `logits`) moves the running statistics once: call one of them per apply."""

    block: str = "bottleneck"
    stage_sizes: tuple = (3, 4, 6, 3)
    width: int = 64
    num_classes: int = 0
    layers: tuple = (0, 1, 2, 3)
    input_bands: tuple | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    converter: ClassVar[str] = "eojax.weights.resnet:load_pretrained"  # weights.common.load_encoder
    bands: ClassVar[None] = None  # any band set works (as DOFA): nothing to match by name
    strides: ClassVar[tuple] = (4, 8, 16, 32)

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Channels of the four stage maps."""
        return tuple(self.width * 2 ** s * EXPANSION[self.block] for s in range(4))

    @property
    def embed_dim(self) -> int:
        """Channels of the pooled vector (the last stage's)."""
        return self.feature_dims[-1]

    def setup(self):
        if self.block not in BLOCKS:
            raise ValueError(f"resnet: block={self.block!r} is not one of {BLOCKS}")
        if len(self.stage_sizes) != 4 or min(self.stage_sizes) < 1:
            raise ValueError(f"resnet: stage_sizes {tuple(self.stage_sizes)} must be 4 block counts >= 1")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.conv1 = conv(self.width, 7, 2, None, **kw)
        self.bn1 = batch_norm(None, self.param_dtype)
        # A list attribute named layer{s} makes modules layer{s}_0, layer{s}_1, ...: torch's layer{s}.{j}.
        for s, n in enumerate(self.stage_sizes):
            setattr(self, f"layer{s + 1}", [Block(self.block, self.width * 2 ** s, 2 if j == 0 and s > 0 else 1,
                                                  **kw) for j in range(n)])
        if self.num_classes:
            self.fc = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                               kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("channels", None)),
                               bias_init=layers.partitioned(nn.initializers.zeros, (None,)))

    def stages(self, images, train: bool = False) -> list:
        """All four stage maps (layer1..layer4 of torchvision), each after its last ReLU."""
        if images.ndim != 4:
            raise ValueError(f"resnet: expected images (B, H, W, C), got {images.shape}")
        if self.input_bands is not None and images.shape[-1] != len(self.input_bands):
            raise ValueError(f"resnet: images have {images.shape[-1]} channels (last axis of {images.shape}) "
                             f"but input_bands {tuple(self.input_bands)} say {len(self.input_bands)}")
        x = self.conv1(images.astype(self.dtype))
        x = nn.relu(self.bn1(x.astype(jnp.float32), use_running_average=not train).astype(self.dtype))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        maps = []
        for s in range(4):
            for block in getattr(self, f"layer{s + 1}"):
                x = block(x, train)
            maps.append(x)
        return maps

    def pooled(self, images, train: bool = False):
        """(B, D) float32: the last stage map averaged over height and width (torchvision's avgpool +
        flatten), the input of a classification head."""
        return jnp.mean(self.stages(images, train)[-1].astype(jnp.float32), axis=(1, 2))

    def logits(self, images, train: bool = False):
        """(B, num_classes) float32: `fc` on the pooled vector."""
        if not self.num_classes:
            raise ValueError("resnet: logits needs num_classes > 0 (the fc head); use `pooled` for features")
        return self.fc(self.pooled(images, train).astype(self.dtype)).astype(jnp.float32)

    def __call__(self, images, train: bool = False) -> list:
        """The encoder contract: [(B, h, w, D)] for each stage index in `layers`."""
        picked = tuple(int(i) for i in self.layers)
        if not picked or any(not 0 <= i < 4 for i in picked):
            raise ValueError(f"resnet: layers {picked} must be stage indices in 0..3")
        maps = self.stages(images, train)
        if self.num_classes and self.is_initializing():  # so that init creates the head's params too
            self.fc(jnp.mean(maps[-1], axis=(1, 2)))
        return [maps[i] for i in picked]


def param_count(model: ResNet, channels: int = 3, image: int = 64) -> dict[str, int]:
    """{'params': n, 'batch_stats': n} from shapes alone (jax.eval_shape: nothing is computed)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, image, image, channels),
                                                                                  jnp.float32))
    shapes = nn.meta.unbox(shapes)
    return {col: sum(int(x.size) for x in jax.tree.leaves(tree)) for col, tree in shapes.items()}
