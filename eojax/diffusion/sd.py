"""Stable Diffusion folders in the diffusers layout: load, save back, and generate as its pipeline does.

A folder (what `StableDiffusionPipeline.save_pretrained` writes, e.g. a local copy of
stable-diffusion-v1-5) holds `model_index.json` and one sub-folder per component:

  unet/          config.json + diffusion_pytorch_model.safetensors  -> eojax.diffusion.unet.UNet
  vae/           config.json + diffusion_pytorch_model.safetensors  -> eojax.diffusion.vae.AutoencoderKL
  text_encoder/  config.json + model.safetensors                    -> eojax.diffusion.clip.CLIPTextEncoder
  tokenizer/     CLIP's BPE files, read by transformers' tokenizer classes (local files only)
  scheduler/     scheduler_config.json                              -> eojax.diffusion.samplers settings

Weights are read from .safetensors, or from .bin with torch.load(weights_only=True) when torch is
installed (eojax.weights.common.load_state_dict); `variant='fp16'` picks `*.fp16.safetensors`.

`generate` follows StableDiffusionPipeline: prompts (and the negative prompt, '' by default) are
tokenised to 77 tokens and encoded by CLIP, initial latents are drawn per image from its own seed (or
given), the scheduler's sampler runs with classifier-free guidance, and the VAE decodes
latents / scaling_factor to images mapped from [-1, 1] to [0, 1].
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eojax.diffusion import clip as clip_lib
from eojax.diffusion import samplers, unet_weights, vae as vae_lib
from eojax.diffusion.schedules import Schedule
from eojax.diffusion.unet import UNet
from eojax.weights import common

HOW_TO_GET = ("a diffusers-format Stable Diffusion folder is needed, e.g. `huggingface-cli download "
              "stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR --include 'model_index.json' "
              "'*/*.json' '*/*.txt' 'unet/diffusion_pytorch_model.safetensors' "
              "'vae/diffusion_pytorch_model.safetensors' 'text_encoder/model.safetensors'` (the mirror of "
              "runwayml/stable-diffusion-v1-5), or give zoo:stable-diffusion-v1-5 (docs/zoo.md)")
COMPONENTS = {  # sub-folder: (weights file stem, the classes eojax reads)
    "unet": ("diffusion_pytorch_model", ("UNet2DConditionModel",)),
    "vae": ("diffusion_pytorch_model", ("AutoencoderKL",)),
    "text_encoder": ("model", ("CLIPTextModel",)),
}


@dataclasses.dataclass
class StableDiffusion:
    """The modules and params of a loaded folder; `schedule` / `sampler_options` / `prediction` come
    from its scheduler config (samplers.sampler_settings_from_diffusers)."""

    unet: UNet
    unet_params: Any
    vae: vae_lib.AutoencoderKL
    vae_params: Any
    text_encoder: clip_lib.CLIPTextEncoder
    text_params: Any
    tokenizer: Any
    schedule: Schedule
    sampler_options: dict
    prediction: str
    scaling_factor: float
    shift_factor: float
    configs: dict  # {component: its config.json dict}; 'scheduler' and 'model_index' too
    folder: str
    text_key_prefix: str = ""  # the text encoder file's key spelling, kept on export
    # generate's compiled samplers, one per (sampler, steps, guided): params stay arguments, not constants
    programs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def check_folder(folder: str) -> dict:
    """model_index.json of a diffusers Stable Diffusion folder, every component eojax reads present;
    one-line errors naming what is missing, before any weight is read."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Stable Diffusion folder {folder} does not exist; {HOW_TO_GET}")
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder} is not a diffusers folder (no model_index.json); {HOW_TO_GET}")
    index = _read_json(index_path)
    for name, (_, classes) in COMPONENTS.items():
        entry = index.get(name) or [None, None]
        if entry[1] not in classes:
            raise ValueError(f"{index_path}: component {name!r} is {entry[1]!r}; eojax reads {classes[0]}")
    for sub in (*COMPONENTS, "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise FileNotFoundError(f"{folder}: the {sub}/ folder is missing; {HOW_TO_GET}")
    return index


def weights_file(folder: str, sub: str, variant: str | None = None) -> str:
    """The component's weights: <stem>[.variant].safetensors, else .bin (read with torch, weights only)."""
    stem = COMPONENTS[sub][0] + (f".{variant}" if variant else "")
    for suffix in (".safetensors", ".bin"):
        path = os.path.join(folder, sub, stem + suffix)
        if os.path.isfile(path):
            return path
    if os.path.isfile(os.path.join(folder, sub, stem + ".safetensors.index.json")):
        raise ValueError(f"{folder}/{sub}: sharded weights ({stem}.safetensors.index.json) are not read; "
                         "save the component unsharded (save_pretrained(max_shard_size='100GB'))")
    raise FileNotFoundError(f"{folder}/{sub}: no {stem}.safetensors or {stem}.bin")


def read_configs(folder: str) -> dict:
    """{component: its config.json dict, 'scheduler': scheduler_config.json, 'model_index'}: the
    folder checked (check_folder) and its JSON read, no weights (what a model's shapes need)."""
    folder = os.fspath(folder)
    index = check_folder(folder)
    configs = {sub: _read_json(os.path.join(folder, sub, "config.json")) for sub in COMPONENTS}
    configs["scheduler"] = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    configs["model_index"] = index
    return configs


def component_params(folder: str, sub: str, configs: dict | None = None, *, variant: str | None = None,
                     param_dtype=jnp.float32):
    """The params of one component ('unet', 'vae', 'text_encoder') of a folder, as its eojax module
    (UNet, AutoencoderKL, CLIPTextEncoder) names them; only that component's weights file is read."""
    configs = configs or read_configs(folder)
    state = _state_dict(os.fspath(folder), sub, variant)
    if sub == "unet":
        params = unet_weights.params_from_diffusers(state, unet_weights.unet_kwargs_from_config(configs[sub]),
                                                    consume=True)
    elif sub == "vae":
        params = vae_lib.params_from_diffusers(state, vae_lib.vae_kwargs_from_config(configs[sub]))
    elif sub == "text_encoder":
        params = clip_lib.params_from_transformers(state, clip_lib.clip_kwargs_from_config(configs[sub]))
    else:
        raise ValueError(f"unknown Stable Diffusion component {sub!r}; known: {tuple(COMPONENTS)}")
    return common.to_device(params, param_dtype)  # one copy of the weights at a time


def load(folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, variant: str | None = None) -> StableDiffusion:
    """Every component of a diffusers Stable Diffusion folder as flax modules and params (`dtype`:
    the modules' compute dtype, e.g. bfloat16 on accelerators; `param_dtype`: the params')."""
    folder = os.fspath(folder)
    configs = read_configs(folder)
    unet = UNet(**unet_weights.unet_kwargs_from_config(configs["unet"]), dtype=dtype, param_dtype=param_dtype)
    vae = vae_lib.AutoencoderKL(**vae_lib.vae_kwargs_from_config(configs["vae"]), dtype=dtype,
                                param_dtype=param_dtype)
    scaling, shift = vae_lib.scaling_factor_from_config(configs["vae"]), vae_lib.shift_factor_from_config(configs["vae"])
    clip_kwargs = clip_lib.clip_kwargs_from_config(configs["text_encoder"])
    text_encoder = clip_lib.CLIPTextEncoder(**clip_kwargs, dtype=dtype, param_dtype=param_dtype)
    text_state = _state_dict(folder, "text_encoder", variant)
    text_params = clip_lib.params_from_transformers(text_state, clip_kwargs)
    # Exported under the file's own spelling: transformers 4 wrote 'text_model.' keys, 5 bare ones.
    text_prefix = "text_model." if any(k.startswith("text_model.") for k in text_state) else ""
    tokenizer = clip_lib.load_tokenizer(os.path.join(folder, "tokenizer"))

    schedule, options, prediction = samplers.sampler_settings_from_diffusers(configs["scheduler"])
    params = {sub: component_params(folder, sub, configs, variant=variant, param_dtype=param_dtype)
              for sub in ("unet", "vae")}
    return StableDiffusion(unet, params["unet"], vae, params["vae"], text_encoder,
                           common.to_device(text_params, param_dtype), tokenizer, schedule, options, prediction,
                           float(scaling), float(shift), configs, folder, text_prefix)


def _state_dict(folder, sub, variant):
    return common.load_state_dict(weights_file(folder, sub, variant), f"{sub} weights")


def save(sd: StableDiffusion, folder: str, *, unet_params=None) -> None:
    """Writes `sd` back in the diffusers layout (safetensors, float32), e.g. after fine-tuning its UNet
    (`unet_params`, default sd.unet_params): the configs, tokenizer and scheduler files are copied
    from the folder it was loaded from, so diffusers' `from_pretrained` reads the result."""
    from safetensors.numpy import save_file

    folder = os.fspath(folder)
    if os.path.abspath(folder) == os.path.abspath(sd.folder):
        raise ValueError(f"refusing to overwrite the source folder {folder}; save to a new one")
    os.makedirs(folder, exist_ok=True)
    unet_kwargs = unet_weights.unet_kwargs_from_config(sd.configs["unet"])
    vae_kwargs = vae_lib.vae_kwargs_from_config(sd.configs["vae"])
    clip_kwargs = clip_lib.clip_kwargs_from_config(sd.configs["text_encoder"])
    state_dicts = {
        "unet": unet_weights.params_to_diffusers(sd.unet_params if unet_params is None else unet_params, unet_kwargs),
        "vae": vae_lib.params_to_diffusers(sd.vae_params, vae_kwargs),
        "text_encoder": clip_lib.params_to_transformers(sd.text_params, clip_kwargs,
                                                        prefix=sd.text_key_prefix),
    }
    for sub, state in state_dicts.items():
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        state = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state.items()}
        save_file(state, os.path.join(folder, sub, COMPONENTS[sub][0] + ".safetensors"))
        with open(os.path.join(folder, sub, "config.json"), "w") as f:
            json.dump(sd.configs[sub], f, indent=2)
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(os.path.join(sd.folder, sub), os.path.join(folder, sub), dirs_exist_ok=True)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(sd.configs["model_index"], f, indent=2)


# -- the pipeline -----------------------------------------------------------------------------------
def encode_prompts(sd: StableDiffusion, prompts: Sequence[str]):
    """CLIP's last hidden states (B, 77, width) of the prompts, tokenised as the pipeline does."""
    ids = clip_lib.tokenize(sd.tokenizer, list(prompts))
    return sd.text_encoder.apply({"params": sd.text_params}, jnp.asarray(ids))


def initial_latents(sd: StableDiffusion, seeds: Sequence[int], height: int, width: int):
    """(B, h, w, C) standard normal latents, image i from jax.random.key(seeds[i]) alone, so an
    image does not change with the batch it is generated in."""
    scale = sd.vae_scale
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} is not divisible by the VAE's factor {scale}")
    shape = (height // scale, width // scale, sd.unet.in_channels)
    return jnp.stack([jax.random.normal(jax.random.key(int(s)), shape) for s in seeds])


def denoise_fn(sd: StableDiffusion):
    return lambda params, x, t, context: sd.unet.apply({"params": params}, x, t, context)


def sampler_settings(sd: StableDiffusion, sampler: str | None = None) -> tuple[Schedule, dict, str]:
    """(schedule, sample() options, prediction) of the folder's scheduler, or of `sampler` ('pndm',
    'ddim', 'ddpm', 'dpmpp_2m') read from the same config as diffusers' <Scheduler>.from_config does."""
    if not sampler or sampler == sd.sampler_options["name"]:
        return sd.schedule, sd.sampler_options, sd.prediction
    classes = {name: cls for cls, name in samplers.DIFFUSERS_SCHEDULERS.items()}
    if sampler not in classes:
        raise ValueError(f"unknown sampler {sampler!r}; known: {tuple(classes)}")
    return samplers.sampler_settings_from_diffusers(sd.configs["scheduler"], classes[sampler])


def _program(sd: StableDiffusion, sampler: str | None, num_steps: int, guided: bool):
    """The jitted CLIP + sampler for these static choices, made once per StableDiffusion."""
    key = (sampler or sd.sampler_options["name"], int(num_steps), guided)
    if key not in sd.programs:
        schedule, options, prediction = sampler_settings(sd, sampler)

        def run(unet_params, text_params, ids, negative_ids, latents, guidance):
            encode = lambda i: sd.text_encoder.apply({"params": text_params}, i)  # noqa: E731
            return samplers.sample(denoise_fn(sd), schedule, prediction, unet_params, latents, jax.random.key(0),
                                   encode(ids), encode(negative_ids) if guided else None, num_steps=num_steps,
                                   guidance_scale=guidance, **options)

        sd.programs[key] = jax.jit(run)
    return sd.programs[key]


def generate(sd: StableDiffusion, prompts: Sequence[str], negative_prompt: str | Sequence[str] = "", *,
             num_steps: int = 50, guidance_scale: float = 7.5, seeds: Sequence[int] | None = None,
             latents=None, sampler: str | None = None, height: int | None = None, width: int | None = None,
             suffix: str = "", return_latents: bool = False):
    """Images (B, H, W, 3) float32 in [0, 1] for `prompts` (each + `suffix`, e.g. the diffusion
    project's ' , 8k, best quality, high-resolution'), as StableDiffusionPipeline makes them.

    `latents` (B, h, w, C) replace the seeded draw; `sampler` overrides the folder's scheduler
    ('pndm', 'ddim', 'ddpm', 'dpmpp_2m', keeping its betas and timestep spacing); height / width
    default to the UNet's sample_size x the VAE factor. Guidance <= 1 runs the conditional model
    alone, as the pipeline does. One compiled program per (sampler, num_steps, guided), reused."""
    prompts = [p + suffix for p in prompts]
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    if latents is None:
        size = sd.configs["unet"].get("sample_size", 64) * sd.vae_scale
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        latents = initial_latents(sd, seeds, height or size, width or size)
    guided = guidance_scale > 1.0
    run = _program(sd, sampler, num_steps, guided)
    out = run(sd.unet_params, sd.text_params, jnp.asarray(clip_lib.tokenize(sd.tokenizer, prompts)),
              jnp.asarray(clip_lib.tokenize(sd.tokenizer, negatives)), jnp.asarray(latents),
              jnp.asarray(guidance_scale if guided else 1.0, jnp.float32))
    if return_latents:
        return out
    return decode_latents(sd, out)


def decode_latents(sd: StableDiffusion, latents):
    """Latents -> images in [0, 1] (the VAE's decode of latents / scaling_factor + shift_factor)."""
    if "decode" not in sd.programs:
        def decode(vae_params, latents):
            z = latents / sd.scaling_factor + sd.shift_factor
            images = sd.vae.apply({"params": vae_params}, z, method="decode")
            return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        sd.programs["decode"] = jax.jit(decode)
    return sd.programs["decode"](sd.vae_params, latents)


__all__ = ["StableDiffusion", "check_folder", "read_configs", "component_params", "load", "save", "generate",
           "sampler_settings", "encode_prompts", "decode_latents", "initial_latents", "weights_file", "HOW_TO_GET"]
