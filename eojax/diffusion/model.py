"""The trained network (text encoder + UNet) and the autoencoder interface between pixels and latents."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from eojax.models.gpt2 import GPT2
from eojax.diffusion.clip import CLIPTextEncoder
from eojax.diffusion.text_encoder import TextEncoder
from eojax.diffusion.unet import UNet


@dataclasses.dataclass(frozen=True)
class Autoencoder:
    """Pixels (B, H, W, C) in [-1, 1] <-> latents (B, H/f, W/f, latent_channels) the UNet works on.

    `encode` / `decode` are pure jax callables (a learned VAE's apply with bound params fits here
    too); latents are multiplied by `scaling_factor` after encoding and divided before decoding, so
    they have roughly unit variance as the noise schedule assumes (SD's VAE: 0.18215).
    """

    encode_fn: Callable[[Any], Any]
    decode_fn: Callable[[Any], Any]
    downsample: int
    latent_channels: int
    scaling_factor: float = 1.0
    bounded: bool = False  # latents stay in [-scaling_factor, scaling_factor] (pixels in [-1, 1] rearranged)

    def encode(self, images):
        return self.encode_fn(images) * self.scaling_factor

    def decode(self, latents):
        return self.decode_fn(latents / self.scaling_factor)


def identity_autoencoder(channels: int) -> Autoencoder:
    """Pixel-space diffusion."""
    return Autoencoder(lambda x: x, lambda z: z, 1, channels, bounded=True)


def space_to_depth_autoencoder(channels: int, factor: int, scaling_factor: float = 1.0) -> Autoencoder:
    """A fixed, lossless autoencoder: each factor x factor block of pixels becomes one latent pixel with
    factor^2 * C channels, so the UNet runs at 1/factor the resolution (and decoding is exact)."""
    def encode(x):
        b, h, w, c = x.shape
        if h % factor or w % factor:
            raise ValueError(f"image {h}x{w} is not divisible by the autoencoder factor {factor}")
        x = x.reshape(b, h // factor, factor, w // factor, factor, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h // factor, w // factor, factor * factor * c)

    def decode(z):
        b, h, w, _ = z.shape
        z = z.reshape(b, h, w, factor, factor, channels).transpose(0, 1, 3, 2, 4, 5)
        return z.reshape(b, h * factor, w * factor, channels)

    return Autoencoder(encode, decode, factor, factor * factor * channels, scaling_factor, bounded=True)


def make_autoencoder(name: str, channels: int, factor: int = 2, scaling_factor: float = 1.0) -> Autoencoder:
    if name in ("", "none"):
        return identity_autoencoder(channels)
    if name == "space_to_depth":
        return space_to_depth_autoencoder(channels, factor, scaling_factor)
    raise ValueError(f"unknown model.autoencoder {name!r}; known: '' (pixel space), 'space_to_depth'")


class DiffusionModel(nn.Module):
    """Text encoder + UNet. `__call__(x_t, t, tokens)` for training; `encode_text` once and `denoise`
    per step for sampling (the caption is encoded once per sample, not once per step).

    text_kind 'small': a TextEncoder(**text) trained with the UNet. 'gpt2': GPT2(**text), whose final
    hidden states are the context; padding tokens (< 0) are masked out and their features zeroed, and
    no gradient flows into it (its params must also be frozen in the optimizer: optim.freeze).
    'clip': a Stable Diffusion folder's CLIPTextEncoder(**text), frozen likewise; its last hidden
    state over all 77 positions, no padding mask, as StableDiffusionPipeline and diffusers'
    train_text_to_image.py condition the UNet."""

    unet: dict
    text: dict
    text_kind: str = "small"

    def setup(self):
        encoders = {"gpt2": GPT2, "clip": CLIPTextEncoder}
        self.text_encoder = encoders.get(self.text_kind, TextEncoder)(**self.text)
        self.denoiser = UNet(**self.unet)

    def encode_text(self, tokens):
        if self.text_kind == "clip":
            return jax.lax.stop_gradient(self.text_encoder(tokens))
        if self.text_kind != "gpt2":
            return self.text_encoder(tokens)
        valid = tokens >= 0
        h = self.text_encoder.hidden_states(jnp.maximum(tokens, 0), attention_mask=valid)
        return jax.lax.stop_gradient(h * valid[..., None].astype(h.dtype))

    def denoise(self, x, t, context):
        return self.denoiser(x, t, context)

    def __call__(self, x, t, tokens):
        return self.denoise(x, t, self.encode_text(tokens))


__all__ = ["Autoencoder", "DiffusionModel", "identity_autoencoder", "space_to_depth_autoencoder",
           "make_autoencoder"]
