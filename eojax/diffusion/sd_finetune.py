"""Fine-tuning a diffusers Stable Diffusion folder in the diffusion task (`model.sd_folder`).

The task's params are {'denoiser': the UNet, 'text_encoder': CLIP, 'vae': the AutoencoderKL}, all three
loaded from the folder by the trainer's pretrained_parts hook (eojax.diffusion.sd reads them). Only the
UNet trains: the VAE and CLIP run under stop_gradient and optim.freeze gives them an update of 0 and no
optimizer moments, as diffusers' train_text_to_image.py (which the diffusion project ran) keeps them out
of its optimizer. The sizes come from the folder's config.json files, so `model.*` size keys are not read.

Facts of that recipe kept here: a prompt is an image's captions joined with ' ' (the project's
metadata.jsonl held RSICD's five captions of an image joined so), tokenised by the folder's CLIP
tokenizer to its 77 tokens (padded and truncated as the pipeline does); images are encoded as
`vae.encode(x).latent_dist.sample() * scaling_factor`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Sequence

import numpy as np

from eojax.diffusion import clip as clip_lib
from eojax.diffusion import samplers, sd, unet_weights, vae as vae_lib
from eojax.diffusion.schedules import Schedule

# params subtree -> the folder's component; the first is the one that trains
PARTS = {"denoiser": "unet", "text_encoder": "text_encoder", "vae": "vae"}
FROZEN = ("^text_encoder/", "^vae/")
MAX_CAPTIONS = 5  # RSICD's captions per image


def folder_of(config) -> str | None:
    """config.model.sd_folder: '' (not a Stable Diffusion run), None (required but not given: sd15),
    or the folder."""
    return config.model.get("sd_folder", "")


def join_captions(captions: Sequence[str]) -> str:
    """One prompt from an image's captions (up to MAX_CAPTIONS), joined with ' ' as the project did."""
    return " ".join(c.strip() for c in captions[:MAX_CAPTIONS])


class CLIPCaptionTokenizer:
    """The folder's CLIP tokenizer behind the caption-tokenizer interface of eojax.diffusion.text_encoder:
    <|startoftext|> caption <|endoftext|>, padded and truncated to `max_len` (the pipeline's 77)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)

    @classmethod
    def from_folder(cls, folder: str) -> "CLIPCaptionTokenizer":
        return cls(clip_lib.load_tokenizer(os.path.join(folder, "tokenizer")))

    @property
    def max_len(self) -> int:
        n = self.tokenizer.model_max_length
        return int(n) if 0 < n <= 100_000 else clip_lib.CLIP_CONTEXT  # transformers' "unset" is ~1e30

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, caption: str, max_len: int) -> np.ndarray:
        return clip_lib.tokenize(self.tokenizer, [caption], max_length=max_len)[0]

    def encode_batch(self, captions: Sequence[str], max_len: int) -> np.ndarray:
        if not captions:
            return np.zeros((0, max_len), np.int32)
        return clip_lib.tokenize(self.tokenizer, list(captions), max_length=max_len)

    def unknown_words(self, caption: str) -> list[str]:
        return []  # byte-level BPE spells every word


@dataclasses.dataclass(frozen=True)
class Folder:
    """What the task reads of a folder: its configs (JSON only; weights are read by load_part)."""

    path: str
    configs: dict

    @classmethod
    @functools.lru_cache(maxsize=8)
    def read(cls, path: str) -> "Folder":
        return cls(path, sd.read_configs(path))

    @property
    def unet_kwargs(self) -> dict:
        return unet_weights.unet_kwargs_from_config(self.configs["unet"])

    @property
    def vae_kwargs(self) -> dict:
        return vae_lib.vae_kwargs_from_config(self.configs["vae"])

    @property
    def clip_kwargs(self) -> dict:
        return clip_lib.clip_kwargs_from_config(self.configs["text_encoder"])

    @property
    def scaling_factor(self) -> float:
        return float(vae_lib.scaling_factor_from_config(self.configs["vae"]))

    @property
    def shift_factor(self) -> float:
        return float(vae_lib.shift_factor_from_config(self.configs["vae"]))

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae_kwargs["block_out_channels"]) - 1)

    def sampler_settings(self, name: str = "") -> tuple[Schedule, dict, str]:
        """(schedule, sample() options, prediction) of the folder's scheduler, or of sampler `name` made
        from its config as diffusers' <Scheduler>.from_config does (same betas and timestep spacing)."""
        cls = None
        if name:
            cls = {v: k for k, v in samplers.DIFFUSERS_SCHEDULERS.items()}[name]
        return samplers.sampler_settings_from_diffusers(self.configs["scheduler"], cls)


def check_config(config) -> Folder | None:
    """The Stable Diffusion keys of a diffusion config as one-line errors, before any data or weight is
    read; the folder's settings, or None without model.sd_folder."""
    path = folder_of(config)
    if path == "":
        return None
    if path is None:
        raise ValueError("model.sd_folder is required here (configs/diffusion.py:sd15 fine-tunes a Stable "
                         "Diffusion folder): give sd15,sd_folder=DIR or --config.model.sd_folder=DIR; "
                         + sd.HOW_TO_GET)
    folder = Folder.read(os.path.abspath(path))  # missing or not diffusers: one line with sd.HOW_TO_GET
    m = config.model
    if m.text_encoder != "small" or m.autoencoder not in ("", "none"):
        raise ValueError("model.sd_folder brings its own CLIP text encoder and VAE: leave model.text_encoder "
                         f"('small', got {m.text_encoder!r}) and model.autoencoder ('', got {m.autoencoder!r}) unset")
    for pattern_path in ("text_encoder/final_layer_norm/scale", "vae/encoder/conv_in/kernel"):
        if not any(re.search(p, pattern_path) for p in config.optim.freeze):
            raise ValueError(f"model.sd_folder: the VAE and CLIP are frozen: optim.freeze must hold {FROZEN} "
                             f"(it is {tuple(config.optim.freeze)})")
    if any(re.search(p, "denoiser/conv_in/kernel") for p in config.optim.freeze):
        raise ValueError("model.sd_folder: optim.freeze must leave the UNet ('denoiser/...') trainable")
    schedule, _, prediction = folder.sampler_settings()
    mine = Schedule.from_config(config.diffusion.schedule)
    if (mine.num_timesteps != schedule.num_timesteps or not np.allclose(mine.betas, schedule.betas, rtol=1e-9)
            or config.diffusion.prediction != prediction):
        s = folder.configs["scheduler"]
        raise ValueError(f"model.sd_folder={path}: its scheduler trains {s.get('beta_schedule')} betas "
                         f"{s.get('beta_start')} -> {s.get('beta_end')} over {schedule.num_timesteps} steps with "
                         f"{prediction} prediction; set diffusion.schedule and diffusion.prediction to match")
    if config.sampler.name and config.sampler.name not in samplers.DIFFUSERS_SCHEDULERS.values():
        raise ValueError(f"sampler.name={config.sampler.name!r}: with model.sd_folder, '' (the folder's scheduler) "
                         f"or one of {tuple(samplers.DIFFUSERS_SCHEDULERS.values())}")
    for key in ("image_size",):
        size = config.input[key]
        if size % folder.vae_scale:
            raise ValueError(f"input.{key}={size} is not divisible by the folder's VAE factor {folder.vae_scale}")
    size = config.sampler.get("image_size", 0)
    if size % folder.vae_scale:
        raise ValueError(f"sampler.image_size={size} is not divisible by the folder's VAE factor {folder.vae_scale}")
    return folder


def load_part(folder: str, subtree: str):
    """The folder's weights (host arrays) of one params subtree: 'denoiser', 'text_encoder' or 'vae'."""
    if subtree not in PARTS:
        raise ValueError(f"a Stable Diffusion folder has no '{subtree}' part; known: {tuple(PARTS)}")
    return sd.component_params(folder, PARTS[subtree], Folder.read(os.path.abspath(folder)).configs)


__all__ = ["PARTS", "FROZEN", "CLIPCaptionTokenizer", "Folder", "check_config", "folder_of", "join_captions",
           "load_part"]
