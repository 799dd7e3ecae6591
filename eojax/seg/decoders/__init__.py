"""Segmentation: decoders on the feature maps of any encoder in eojax.models.encoders.

`SegmentationModel(encoder, decoder)` maps images (B, H, W, C) (or (B, T, H, W, C) for multi-temporal
encoders) to float32 logits (B, H, W, num_classes) at the input resolution. The encoder returns a list
of (B, h, w, D) maps (a ViT's `layers`, all at 1/p; a CNN's stages, finest first, at their own strides);
the decoder turns them into logits at some fraction of the image (linear / FCN: the last map's stride),
which are upsampled bilinearly to the input's size. With `freeze_encoder` the features pass through
stop_gradient (no backward pass through the encoder) and the encoder runs in eval mode; the parameters
themselves are frozen by the optimizer's freeze mask (config.optim.freeze = ('^encoder/',)); a CNN
encoder's BatchNorm then normalises with its running statistics and leaves them as they are.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.seg.decoders.blocks import resize
from eojax.seg.decoders.fcn import FCNDecoder
from eojax.seg.decoders.linear import LinearDecoder
from eojax.seg.decoders.muster import Muster
from eojax.seg.decoders.pyramid import FeaturePyramid
from eojax.seg.decoders.segformer import SegFormerHead
from eojax.seg.decoders.unet import UNetDecoder
from eojax.seg.decoders.upernet import UperNet

DECODERS = {"linear": LinearDecoder, "fcn": FCNDecoder, "upernet": UperNet, "segformer": SegFormerHead,
            "muster": Muster, "unet": UNetDecoder}


def build_decoder(name: str, num_classes: int, norm: str = "batch", **kwargs) -> nn.Module:
    """`norm` ('batch' | 'layer', blocks.Norm) goes to the decoders that have norms (not 'linear')."""
    if name not in DECODERS:
        raise ValueError(f"unknown decoder {name!r}; known: {sorted(DECODERS)}")
    cls = DECODERS[name]
    if "norm" in cls.__dataclass_fields__:
        kwargs["norm"] = norm
    return cls(num_classes=num_classes, **kwargs)


class SegmentationModel(nn.Module):
    encoder: nn.Module
    decoder: nn.Module
    freeze_encoder: bool = False

    def features(self, images, train: bool = False) -> list:
        feats = self.encoder(images, train=train and not self.freeze_encoder)
        if self.freeze_encoder:
            feats = [jax.lax.stop_gradient(f) for f in feats]
        return list(feats)

    def decode(self, feats, size, train: bool = False):
        return resize(self.decoder(feats, train=train).astype(jnp.float32), size)

    def __call__(self, images, train: bool = False, size=None):
        """`size`: the logits' (H, W), default the images' (PANGAEA's output_shape: a resized scene's
        logits go straight back to the scene's size)."""
        return self.decode(self.features(images, train), size or images.shape[-3:-1], train)


__all__ = ["DECODERS", "FeaturePyramid", "SegmentationModel", "build_decoder"]
