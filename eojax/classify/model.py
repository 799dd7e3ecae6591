"""An encoder from the shared registry, pooled to one vector per image, and a linear head.

Pooling (`pool`):
- 'avg': the mean of the last block's tokens, cls excluded, before the encoder's final norm, then
  `fc_norm` (MAE's and SatMAE++'s `global_pool` fine-tuning head); encoders that only give maps
  (ResNet, Prithvi, DOFA, CROMA) pool their last map, as torchvision's avgpool.
- 'cls': the cls token after the final norm (MAE's linear-probe default, `global_pool=False`).

Head norm (`head_norm`): 'layer' (fc_norm, with 'avg'), 'batch' (MAE's linear probe: a BatchNorm
without scale or bias, eps 1e-6, whose running statistics are the model state), or 'none'.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.models import layers

POOLS = ("avg", "cls")
HEAD_NORMS = ("layer", "batch", "none")


def pooled_features(encoder: nn.Module, images, pool: str, train: bool):
    """(B, D): the encoder's pooled representation of images (B, H, W, C)."""
    if hasattr(encoder, "pool_tokens"):  # eojax's ViTs: 'avg' before the final norm, or the cls token
        return encoder.pool_tokens(images, pool, train)
    if pool != "avg":
        raise ValueError(f"pool={pool!r}: encoder {type(encoder).__name__} gives feature maps only; use 'avg'")
    if hasattr(encoder, "pooled"):  # ResNet: its global average pool
        return encoder.pooled(images, train)
    return encoder(images, train)[-1].mean(axis=(1, 2))


class Classifier(nn.Module):
    """images (B, H, W, C) -> logits (B, K) float32."""

    encoder: nn.Module
    num_classes: int
    pool: str = "avg"
    head_norm: str = "layer"
    freeze_encoder: bool = False
    head_init_std: float = 2e-5  # MAE fine-tuning's trunc-normal std (its linear probe: 0.01)
    dtype: jnp.dtype = jnp.float32

    def features(self, images, train: bool = False):
        x = pooled_features(self.encoder, images, self.pool, train and not self.freeze_encoder)
        return jax.lax.stop_gradient(x) if self.freeze_encoder else x

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = self.features(images, train)
        if self.head_norm == "layer":
            x = layers.LayerNorm(name="fc_norm", dtype=self.dtype)(x)
        elif self.head_norm == "batch":
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_scale=False,
                             use_bias=False, name="head_bn")(x.astype(jnp.float32))
        init = nn.initializers.truncated_normal(self.head_init_std)
        return nn.Dense(self.num_classes, kernel_init=init, name="head", dtype=jnp.float32)(x).astype(jnp.float32)
