"""Encoders for dense prediction: name -> flax module returning a list of (B, h, w, D) maps.

    enc = build("prithvi", variant="base", input_bands=("B2", "B3", "B4", "B8A", "B11", "B12"))
    maps = enc.apply(params, images)          # [(B, 14, 14, 768)] * 4 for 224 px, layers (3,5,7,11)

Every module keeps all its parameters under its own name, so a model that holds it as `encoder`
freezes it with the optimizer's freeze regex '^encoder/'. Weight import from the published PyTorch
checkpoints lives in eojax.weights.{prithvi,dofa,croma,resnet}; "mae" / "satmae" load eojax runs directly.
"resnet" (eojax.models.resnet) is a CNN: its four maps have strides 4, 8, 16, 32 and widths
`feature_dims`, and it carries BatchNorm statistics ('batch_stats', the trainer's model state);
"unet" (eojax.models.unet) is PANGAEA's supervised UNet encoder (five maps, strides 1-16), trained from
scratch with the seg family's 'unet' decoder.
"""
from __future__ import annotations

import importlib
import math

from flax import linen as nn

from eojax.models.encoders.base import DEFAULT_LAYERS  # noqa: F401  (re-export)

# name -> (module, class, variants attribute, how a variant dict is filtered)
_REGISTRY = {
    "mae": ("eojax.models.encoders.mae", "MAEEncoder", "eojax.models.vit", "VARIANTS"),
    "satmae": ("eojax.models.encoders.mae", "SatMAEEncoder", "eojax.mae.satmae", "VARIANTS"),
    "prithvi": ("eojax.models.encoders.prithvi", "Prithvi", "eojax.models.encoders.prithvi", "VARIANTS"),
    "dofa": ("eojax.models.encoders.dofa", "DOFA", "eojax.models.encoders.dofa", "VARIANTS"),
    "croma": ("eojax.models.encoders.croma", "CROMA", "eojax.models.encoders.croma", "VARIANTS"),
    "resnet": ("eojax.models.resnet", "ResNet", "eojax.models.resnet", "VARIANTS"),
    "unet": ("eojax.models.unet", "UNetEncoder", "eojax.models.unet", "VARIANTS"),
}
NAMES = tuple(_REGISTRY)
__all__ = ["DEFAULT_LAYERS", "NAMES", "build", "build_for_data", "encoder_class", "variants"]


def encoder_class(name: str) -> type[nn.Module]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(NAMES)}")
    mod, cls, _, _ = _REGISTRY[name]
    return getattr(importlib.import_module(mod), cls)


def variants(name: str) -> dict:
    encoder_class(name)
    _, _, mod, attr = _REGISTRY[name]
    return getattr(importlib.import_module(mod), attr)


def build(name: str, variant: str | None = None, **kwargs) -> nn.Module:
    """The encoder `name` with the sizes of `variant` (e.g. 'mu' for tests, 'base'), overridden by
    kwargs (any field of the encoder class: layers, image_size, input_bands, dtype, scan, ...).
    A model too shallow for the default layers (3, 5, 7, 11) gets four spread over its depth."""
    cls = encoder_class(name)
    fields = {f for f in cls.__dataclass_fields__ if f not in ("parent", "name")}
    cfg = {}
    if variant is not None:
        table = variants(name)
        if variant not in table:
            raise KeyError(f"unknown {name} variant {variant!r}; known: {sorted(table)}")
        cfg = {k: v for k, v in table[variant].items() if k in fields}  # SatMAE: drop decoder sizes
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise TypeError(f"encoder {name!r} has no fields {unknown}; it has {sorted(fields)}")
    cfg.update(kwargs)
    depth = cfg.get("depth", getattr(cls.__dataclass_fields__.get("depth"), "default", None))
    if depth is not None and "layers" not in cfg and max(DEFAULT_LAYERS) >= depth:  # shallow: spread 4 over it
        cfg["layers"] = tuple(sorted({math.ceil(depth * (i + 1) / 4) - 1 for i in range(4)}))
    if "layers" in cfg:
        cfg["layers"] = tuple(int(i) for i in cfg["layers"])
    for key in ("input_bands", "wavelengths"):
        if cfg.get(key) is not None:
            cfg[key] = tuple(cfg[key])
    return cls(**cfg)


def build_for_data(model_cfg, band_names, sensor: str | None, input_size: int) -> nn.Module:
    """The encoder of a family's `config.model` (encoder, encoder_variant, encoder_args, dtype) for
    data with `band_names` of `sensor` at `input_size` pixels: those facts fill the encoder's fields
    of the same meaning that encoder_args leaves unset."""
    import jax.numpy as jnp

    fields = encoder_class(model_cfg.encoder).__dataclass_fields__
    kwargs = dict(model_cfg.encoder_args)
    derived = {"image_size": input_size, "in_channels": len(band_names), "input_bands": tuple(band_names),
               "sensor": sensor, "dtype": jnp.dtype(model_cfg.dtype)}
    for key, value in derived.items():
        if key in fields and key not in kwargs:
            kwargs[key] = value
    return build(model_cfg.encoder, model_cfg.encoder_variant or None, **kwargs)
