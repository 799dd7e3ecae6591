"""Pure flax.linen models: no data, no optimizer, no I/O."""
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
from eojax.models.mae import MAE, flops_per_image, mae_config, mae_loss, random_masking
from eojax.models.vit import VARIANTS, PatchEmbed, ViTEncoder, patchify, unpatchify, vit_config
from eojax.models.satmae import (
    GROUPS_S2_10,
    GroupChannelMAE,
    GroupChannelViT,
    groupmae_loss,
    interpolate_pos_embed,
    satmae_config,
)
