"""eojax's own pretraining encoders as segmentation backbones.

Subclasses, so the parameter trees are exactly those of ViTEncoder / GroupChannelViT: the `encoder`
subtree of an eojax MAE or SatMAE++ run loads into them unchanged.
"""
from __future__ import annotations

from typing import ClassVar

from eojax.data import sensors
from eojax.models.encoders.base import DEFAULT_LAYERS, arrange_bands, check_layers, plan_bands
from eojax.mae.satmae import GroupChannelViT
from eojax.models.vit import ViTEncoder


class MAEEncoder(ViTEncoder):
    """eojax's plain MAE ViT; __call__ returns the `layers` block outputs as (B, h, w, D) maps. Besides
    eojax runs it imports SatMAE++'s fMoW-RGB files (plain ViT-L/16; fine-tuned: learned_embed=True)."""

    converter: ClassVar[str] = "eojax.mae.weights:load_plain_encoder"  # weights.common.load_encoder

    layers: tuple = DEFAULT_LAYERS
    bands = None  # any `in_channels` bands

    @property
    def embed_dim(self) -> int:
        return self.width

    def __call__(self, images, train: bool = False):
        return self.features(images, check_layers(self.layers, self.depth, "mae"), train)


# The 10 Sentinel-2 bands of SatMAE++'s fMoW-Sentinel pretraining, in its channel order (GROUPS_S2_10).
SATMAE_S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")


class SatMAEEncoder(GroupChannelViT):
    """eojax's SatMAE++ group-channel ViT; group tokens of a location are averaged into one map.

    `bands` None (default): the data's channels go to the groups' channels by position, as before.
    `bands` named (e.g. SATMAE_S2_BANDS for a published SatMAE++): the data's `input_bands` (of
    `sensor`) fill them by common name and wavelength (base.band_plan), the rest zero-filled."""

    converter: ClassVar[str] = "eojax.mae.weights:load_encoder"  # weights.common.load_encoder
    bands_sensor: ClassVar[str] = sensors.LEGACY_SENSOR

    layers: tuple = DEFAULT_LAYERS
    bands: tuple | None = None  # the band names the checkpoint was trained on; None: by position
    input_bands: tuple | None = None  # the data's bands (used only with `bands`)
    sensor: str | None = None

    @property
    def embed_dim(self) -> int:
        return self.width

    def plan_bands(self) -> tuple[list[int | None], list[str], list[str]]:
        """base.band_plan of `bands` (set) and input_bands."""
        return plan_bands(self)

    def __call__(self, images, train: bool = False):
        if self.bands is not None:
            images = arrange_bands(images, self.bands, self.input_bands, "satmae", self.sensor, self.bands_sensor)
        return self.features(images, check_layers(self.layers, self.depth, "satmae"), train)
