"""eojax's own pretraining encoders as segmentation backbones.

Subclasses, so the parameter trees are exactly those of ViTEncoder / GroupChannelViT: the `encoder`
subtree of an eojax MAE or SatMAE++ run loads into them unchanged.
"""
from __future__ import annotations

from typing import ClassVar

from eojax.models.encoders.base import DEFAULT_LAYERS, check_layers
from eojax.mae.satmae import GroupChannelViT
from eojax.models.vit import ViTEncoder


class MAEEncoder(ViTEncoder):
    """eojax's plain MAE ViT; __call__ returns the `layers` block outputs as (B, h, w, D) maps."""

    layers: tuple = DEFAULT_LAYERS
    bands = None  # any `in_channels` bands

    @property
    def embed_dim(self) -> int:
        return self.width

    def __call__(self, images, train: bool = False):
        return self.features(images, check_layers(self.layers, self.depth, "mae"), train)


class SatMAEEncoder(GroupChannelViT):
    """eojax's SatMAE++ group-channel ViT; group tokens of a location are averaged into one map."""

    converter: ClassVar[str] = "eojax.mae.weights:load_encoder"  # weights.common.load_encoder

    layers: tuple = DEFAULT_LAYERS
    bands = None

    @property
    def embed_dim(self) -> int:
        return self.width

    def __call__(self, images, train: bool = False):
        return self.features(images, check_layers(self.layers, self.depth, "satmae"), train)
