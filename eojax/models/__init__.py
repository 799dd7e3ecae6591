"""Shared pure flax.linen building blocks: layers, the ViT, encoders used by several families, the
upsampling head, GPT-2. Family models live in their family's package (eojax/<family>/)."""
from eojax.models.layers import (
    Attention,
    Encoder,
    EncoderBlock,
    LayerNorm,
    Mlp,
    sincos_1d,
    sincos_2d,
    stack_layers,
    unstack_layers,
)
from eojax.models.vit import VARIANTS, PatchEmbed, ViTEncoder, patchify, unpatchify, vit_config
