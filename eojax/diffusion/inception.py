"""InceptionV3 pool3 features (2048-d) for the Frechet distance, the network FID is defined with.

The layout of torchvision's Inception3 without its auxiliary and classifier heads (Szegedy et al. 2016):
stem convolutions, Mixed_5b-5d (A blocks), 6a (B), 6b-6e (C, 7x7 factorised), 7a (D), 7b-7c (E), global
average pool. `fid_variant=True` is the network of the original TF FID code as pytorch-fid rebuilt it
(FIDInceptionA/C/E_1/E_2): its average pools leave the padding out of the mean, and Mixed_7c pools by max.
Every convolution is conv (no bias) + BatchNorm (eps 1e-3, inference statistics) + ReLU; module and
parameter names follow the state-dict keys (eojax.diffusion.inception_weights converts them).

Input: images (B, H, W, 3) in [-1, 1] (the range the network was trained on, pytorch-fid's
`normalize_input`), resized bilinearly to 299 x 299 as pytorch-fid does.
"""
from __future__ import annotations

from flax import linen as nn
import jax
import jax.numpy as jnp

from eojax.models.layers import partitioned

SIZE = 299


class BasicConv2d(nn.Module):
    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel
        k = self.param("kernel", partitioned(nn.initializers.lecun_normal(), ("height", "width", None, "channels")),
                       (kh, kw, x.shape[-1], self.features))
        vec = lambda name, init: self.param(name, partitioned(init, ("channels",)), (self.features,))
        scale, bias = vec("bn_scale", nn.initializers.ones), vec("bn_bias", nn.initializers.zeros)
        mean, var = vec("bn_mean", nn.initializers.zeros), vec("bn_var", nn.initializers.ones)
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(x, k, (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return nn.relu((y - mean) * jax.lax.rsqrt(var + 1e-3) * scale + bias)


def _avg_pool(x, fid_variant):
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=not fid_variant)


def _max_pool(x, stride=2):
    pad = ((1, 1), (1, 1)) if stride == 1 else "VALID"
    return nn.max_pool(x, (3, 3), (stride, stride), pad)


class InceptionA(nn.Module):
    pool_features: int
    fid_variant: bool = True

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(BasicConv2d(48, name="branch5x5_1")(x))
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool(x, self.fid_variant))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int
    fid_variant: bool = True

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c, name="branch7x7_1")(x)
        b7 = BasicConv2d(c, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c, name="branch7x7dbl_1")(x)
        for i, (width, shape) in enumerate([(c, col), (c, row), (c, col), (192, row)], start=2):
            bd = BasicConv2d(width, **shape, name=f"branch7x7dbl_{i}")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool(x, self.fid_variant))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(BasicConv2d(192, name="branch3x3_1")(x))
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    pool: str = "avg"  # 'avg' (torchvision, FID's Mixed_7b) or 'max' (FID's Mixed_7c)
    fid_variant: bool = True

    @nn.compact
    def __call__(self, x):
        def split(h, name):  # a 1x3 and a 3x1 convolution side by side
            return [BasicConv2d(384, (1, 3), padding=(0, 1), name=f"{name}a")(h),
                    BasicConv2d(384, (3, 1), padding=(1, 0), name=f"{name}b")(h)]

        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = split(BasicConv2d(384, name="branch3x3_1")(x), "branch3x3_2")
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = split(BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd), "branch3x3dbl_3")
        pooled = _max_pool(x, stride=1) if self.pool == "max" else _avg_pool(x, self.fid_variant)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """images (B, H, W, 3) in [-1, 1] -> (B, 2048) pool3 features (resized to 299 x 299 first)."""

    fid_variant: bool = True
    resize: bool = True

    @nn.compact
    def __call__(self, images):
        x = images.astype(jnp.float32)
        if self.resize and x.shape[1:3] != (SIZE, SIZE):
            # Bilinear without antialiasing: torch's F.interpolate(mode='bilinear', align_corners=False).
            x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, x.shape[3]), "bilinear", antialias=False)
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(_max_pool(x))
        x = _max_pool(BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x))
        f = self.fid_variant
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool_features, f, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, f, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", f, name="Mixed_7b")(x)
        x = InceptionE("max" if f else "avg", f, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


class InceptionFeatures:
    """The FD feature extractor over InceptionV3 from a local weights file (eojax.diffusion.inception_weights):
    images (B, H, W, C) in [-1, 1] -> (B, 2048); `rgb` picks the three channels it sees (for
    multispectral images, their red, green and blue bands)."""

    dim = 2048

    def __init__(self, weights_path: str, rgb=(0, 1, 2), fid_variant: bool = True):
        from eojax.diffusion import inception_weights as inception_weights  # it imports this module

        self.model = InceptionV3(fid_variant=fid_variant)
        self.params = inception_weights.load(weights_path, self.model)
        self.rgb = tuple(int(i) for i in rgb)
        if len(self.rgb) != 3:
            raise ValueError(f"InceptionV3 features need 3 channels (red, green, blue), got indices {self.rgb}")
        self.source = f"InceptionV3 pool3 ({'pytorch-fid' if fid_variant else 'torchvision'} layout) from {weights_path}"

    def __call__(self, images):
        return self.model.apply({"params": self.params}, images[..., list(self.rgb)])
