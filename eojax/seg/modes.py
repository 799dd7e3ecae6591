"""Segmentation training modes and input preprocessings, by name (light: configs import it).

Modes (config.model.mode):
- 'frozen': the encoder does not train (optim.freeze '^encoder/'; features under stop_gradient).
- 'finetune': everything trains.
- 'random': finetune from random encoder weights (init_from refused).
- 'retrain_input': the PANGAEA fork's (sig-gis/pangaea-bench) `finetune=retrain_input`: only the
  encoder's input layer (its patch embedding, `unfreeze_input_layer`) and the decoder train; every
  other encoder parameter is frozen by the optimizer (optim.freeze = (retrain_input_freeze(encoder),)).
  ResNet's input layer is its stem conv `conv1` (its BatchNorm statistics still move: the encoder runs
  in training mode, as the fork's).
Encoders in SCRATCH_ONLY (the UNet encoder of PANGAEA's supervised baseline) take 'random' or
'finetune' only.

Preprocessings (config.input.preprocessing), PANGAEA's names (configs/preprocessing/*.yaml):
- 'seg_default': random crops of the encoder's size for training, sliding windows over whole scenes
  for evaluation (RandomCropToEncoder).
- 'seg_resize_input_layer': the fork's: no crop and no resize; the encoder's input layer (position
  embedding / attention bias grid) is built at the scene size (`resize_pos_embed: ${dataset.img_size}`)
  and whole scenes go through it, in training and evaluation.
- 'seg_resize': PANGAEA's ResizeToEncoder: the whole scene resized (bilinear, antialiased) to the
  encoder's input size, the logits resized back (bilinear) to the scene for the loss and the scores
  against full-resolution labels.
"""
from __future__ import annotations

MODES = ("frozen", "finetune", "random", "retrain_input")
PREPROCESSINGS = ("seg_default", "seg_resize_input_layer", "seg_resize")

# The encoder's input layer, as the fork's `unfreeze_input_layer` names it: Prithvi / DOFA / ViT
# `patch_embed` (DOFA: the whole wavelength-conditioned weight generator), CROMA `linear_input`,
# SatMAE++ one `patch_embed_<g>` per channel group, ResNet its stem conv (torchvision's `conv1`).
# Position embeddings and the cls token stay frozen.
INPUT_LAYERS = {"croma": "linear_input", "resnet": "conv1"}
DEFAULT_INPUT_LAYER = "patch_embed"
# Encoders that only exist to be trained from scratch with their decoder (PANGAEA asserts `finetune`
# for its UNet): 'frozen' and 'retrain_input' make no sense for them.
SCRATCH_ONLY = ("unet",)


def input_layer(encoder: str) -> str:
    return INPUT_LAYERS.get(encoder, DEFAULT_INPUT_LAYER)


def retrain_input_freeze(encoder: str) -> str:
    """The optim.freeze regex of mode 'retrain_input': every encoder parameter but the input layer's."""
    return rf"^encoder/(?!{input_layer(encoder)}(_\d+)?/)"


def preprocessing(input_config) -> str:
    """config.input.preprocessing; a config written before it existed crops."""
    return input_config.get("preprocessing", "seg_default")
