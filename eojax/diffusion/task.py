"""Text-to-image diffusion on caption datasets (RSICD / metadata.jsonl / synthetic), one trainer.

Train: x_t = q_sample(x_0, t, eps) on pixels or autoencoder latents, the model predicts eps or v,
MSE with optional min-SNR weighting; captions are dropped (replaced by the empty caption) with
probability `model.caption_dropout`, which is what classifier-free guidance needs.
Eval (held-out pairs): the denoising loss at fixed timesteps and fixed noise, and, with `fd.enabled`,
the Frechet distance between held-out images and samples generated for their captions (features summed
batch by batch on the device; the distance is taken in finalize_eval, reported with its sample count).

DiffusionInput reads the caption records; its DataSpec.info carries what the core needs of them (band
names, the word vocabulary, the class prompts of the sample grid and `eojax infer`), so DiffusionTask,
and with it `eojax infer`, runs from a saved data_spec.json without the captions. The picture grid and
`eojax infer` are plug-ins (eojax/diffusion/pictures.py).

With `model.sd_folder` the model is a diffusers Stable Diffusion folder fine-tuned as diffusers'
train_text_to_image.py does (eojax/diffusion/sd_finetune.py): its UNet trains, its VAE encodes the images
(a posterior sample per step) and decodes the samples, its CLIP encodes the prompts (an image's captions
joined), both frozen; sampling uses the folder's scheduler, a negative prompt and a prompt suffix.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import rasterio
from flax import traverse_util

from eojax import viz
from eojax.checkpoint import CheckpointMismatchError, key_problems
from eojax.data import pipeline, synthetic
from eojax.diffusion import captions as captions_lib
from eojax.diffusion import fid, losses, samplers
from eojax.diffusion import sd_finetune, vae as vae_lib
from eojax.diffusion.inception import InceptionFeatures
from eojax.diffusion.model import DiffusionModel, make_autoencoder
from eojax.diffusion.schedules import Schedule
from eojax.diffusion.text_encoder import BPECaptionTokenizer, WordTokenizer
from eojax.tasks.base import DataSpec, Input, Task, elements
from eojax.weights import gpt2 as gpt2_weights


def _gpt2_tokenizer(config) -> BPECaptionTokenizer:
    """model.text_encoder='gpt2': the BPE of the GPT-2 folder (config, not data: Input and core both
    read it)."""
    return BPECaptionTokenizer(gpt2_weights.load_tokenizer(config.model.text_init_from))


class DiffusionInput(Input):
    """Caption / image pairs: (train, held-out) records, their tokenizer, Grain sources."""

    @functools.cached_property
    def records(self) -> tuple[list, list]:
        """(train, held-out) caption records, read once (the synthetic set is written on first use)."""
        c = self.config.input
        path = c.captions
        if not path:
            size = c.get("synthetic_size", 0) or c.image_size  # images are resized to image_size when read
            directory = os.path.join(synthetic.default_dir().parent, "captions",
                                     f"{c.synthetic_bands}_{size}_{c.synthetic_n}_{c.synthetic_layout}")
            path = synthetic.write_caption_dataset(directory, n=c.synthetic_n, size=size,
                                                   seed=self.config.seed, layout=c.synthetic_layout,
                                                   bands=c.synthetic_bands)
        records = captions_lib.read_captions(path, skip_missing=c.skip_missing_images)
        return captions_lib.split(records, c.eval_fraction)

    @functools.cached_property
    def tokenizer(self):
        if sd_finetune.folder_of(self.config):
            return sd_finetune.CLIPCaptionTokenizer.from_folder(self.config.model.sd_folder)
        if self.config.model.text_encoder == "gpt2":
            return _gpt2_tokenizer(self.config)
        return WordTokenizer.from_captions([t for r in self.records[0] for t in r.captions],
                                           self.config.input.vocab_size)

    @property
    def max_len(self) -> int:
        """Tokens per caption: input.max_len, or the folder's CLIP length (77) with model.sd_folder."""
        return _max_len(self.config, self.tokenizer)

    def prompts(self, record) -> tuple[str, ...]:
        """The captions an image is trained with: its own, or with model.sd_folder one prompt of them all
        joined (sd_finetune.join_captions)."""
        if sd_finetune.folder_of(self.config):
            return (sd_finetune.join_captions(record.captions),)
        return record.captions

    @functools.cached_property
    def channels(self) -> int:
        c = self.config.input
        return captions_lib.load_image(self.records[0][0].path, c.image_size, tuple(c.bands), c.max_value).shape[-1]

    @functools.cached_property
    def band_names(self) -> list[str]:
        return _band_names(self.records[0][0].path, tuple(self.config.input.bands))

    def class_prompts(self, max_classes: int) -> list[list[str]]:
        """[class, caption] for the most frequent classes of the training set: its first caption."""
        train, _ = self.records
        counts: dict[str, int] = {}
        for r in train:
            counts[r.label] = counts.get(r.label, 0) + 1
        classes = sorted(counts, key=lambda k: (-counts[k], k))[:max_classes]
        return [[k, next(self.prompts(r)[0] for r in train if r.label == k)] for k in classes]

    def build_spec(self) -> DataSpec:
        """Images in [-1, 1], channels-last, with their caption tokens and record index. info: what the
        core rebuilds the tokenizer from (the word vocabulary; GPT-2's BPE comes from the config) and
        the default prompts of the pictures and `eojax infer` (3 of them without --prompt)."""
        c = self.config.input
        size = c.image_size
        arrays = elements(image=((size, size, self.channels), np.float32), tokens=((self.max_len,), np.int32),
                          index=((), np.int32), weight=((), np.float32))
        vocab = list(self.tokenizer.vocab) if isinstance(self.tokenizer, WordTokenizer) else None
        return DataSpec(arrays, {"band_names": list(self.band_names), "vocab_size": len(self.tokenizer),
                                 "vocab": vocab,
                                 "prompts": self.class_prompts(max(self.config.pictures.max_classes, 3))})

    def _source(self, records, train):
        c = self.config.input
        if sd_finetune.folder_of(self.config):
            records = [dataclasses.replace(r, captions=self.prompts(r)) for r in records]
        return captions_lib.CaptionSource(records, self.tokenizer, size=c.image_size, max_len=self.max_len,
                                          bands=tuple(c.bands), max_value=c.max_value, train=train,
                                          seed=self.config.seed)

    def train(self, process_index, process_count):
        train, _ = self.records
        return pipeline.make_iterator(
            _indexed(self._source(train, True)), batch_size=self.config.batch_size // process_count,
            process_index=process_index, process_count=process_count, shuffle=True, seed=self.config.seed,
            num_epochs=None, drop_remainder=True, worker_count=self.config.input.worker_count)

    def eval(self, process_index, process_count):
        _, held = self.records
        if not held:
            return None
        return pipeline.make_iter_dataset(
            _indexed(self._source(held, False)), batch_size=self.config.batch_size // process_count,
            process_index=process_index, process_count=process_count, shuffle=False, num_epochs=1,
            drop_remainder=False, worker_count=self.config.input.worker_count)

    def fingerprint(self):
        train, held = self.records
        h = hashlib.sha256()
        for r in train + held:
            st = os.stat(r.path)
            h.update(f"{r.path}|{st.st_size}|{int(st.st_mtime)}|{'|'.join(r.captions)}\n".encode())
        return {"sha256": h.hexdigest(), "train_images": len(train), "held_out_images": len(held)}


class DiffusionTask(Task):
    name = "diffusion"
    input_class = DiffusionInput
    plugins = {"pictures": "eojax.diffusion.pictures:write_pictures", "infer": "eojax.diffusion.pictures:infer"}

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.schedule = Schedule.from_config(config.diffusion.schedule)
        self.band_names = list(spec.info["band_names"])
        self.channels = spec.elements["image"][0][-1]
        # The folder's settings (check_config made sure its betas and prediction are the config's).
        self.sd = sd_finetune.check_config(config)
        if self.sd is not None and self.channels != self.sd.vae_kwargs["in_channels"]:
            raise ValueError(f"model.sd_folder's VAE takes {self.sd.vae_kwargs['in_channels']} bands; the images "
                             f"have {self.channels} ({self.band_names})")

    @classmethod
    def check_config(cls, config):
        d = config.diffusion
        Schedule.from_config(d.schedule)  # an unknown schedule name is named here
        if d.prediction not in losses.PREDICTIONS:
            raise ValueError(f"diffusion.prediction={d.prediction!r}; known: {losses.PREDICTIONS}")
        if sd_finetune.check_config(config) is None and config.sampler.name not in samplers.NAMES:
            raise ValueError(f"sampler.name={config.sampler.name!r}; known: {samplers.NAMES}")
        f = config.fd
        if f.features not in ("mae", "inception"):
            raise ValueError(f"fd.features={f.features!r}; known: 'mae', 'inception' (fd.inception_weights=<file>)")
        if f.features == "inception":
            if not os.path.isfile(f.inception_weights):
                raise FileNotFoundError(f"fd.features='inception' needs fd.inception_weights=<a local InceptionV3 "
                                        f"weights file>; {f.inception_weights!r} is not a file")
            if f.inception_variant not in ("pytorch-fid", "torchvision"):
                raise ValueError(f"fd.inception_variant={f.inception_variant!r}; known: 'pytorch-fid', 'torchvision'")
        m = config.model
        if m.text_encoder not in ("small", "gpt2"):
            raise ValueError(f"model.text_encoder={m.text_encoder!r}; known: 'small' (a transformer trained "
                             "with the model), 'gpt2' (frozen GPT-2 hidden states, model.text_init_from=<dir>)")
        if m.text_encoder == "gpt2":
            if not m.text_init_from:
                raise ValueError("model.text_encoder='gpt2' needs model.text_init_from=<a local Hugging Face "
                                 "GPT-2 folder: config.json, model.safetensors, vocab.json + merges.txt>")
            if not os.path.isdir(m.text_init_from):
                raise FileNotFoundError(f"model.text_init_from: {m.text_init_from} is not a directory")
            # Frozen by the optimizer (update exactly 0, no moments): the encoder has no gradient
            # anyway, but weight decay alone would otherwise shrink it.
            if not any(re.search(p, "text_encoder/wte/embedding") for p in config.optim.freeze):
                raise ValueError("model.text_encoder='gpt2' is a frozen encoder: add optim.freeze="
                                 "('^text_encoder/',) (configs/diffusion.py's gpt2=<dir> argument does)")

    @functools.cached_property
    def tokenizer(self):
        """The Input's tokenizer, rebuilt: from the vocabulary in the DataSpec, GPT-2's BPE, or the folder's
        CLIP tokenizer."""
        if self.sd is not None:
            return sd_finetune.CLIPCaptionTokenizer.from_folder(self.sd.path)
        if self.config.model.text_encoder == "gpt2":
            return _gpt2_tokenizer(self.config)
        return WordTokenizer(self.spec.info["vocab"])

    @property
    def max_len(self) -> int:
        return _max_len(self.config, self.tokenizer)

    # -- model -----------------------------------------------------------------------------------
    @property
    def autoencoder(self):
        """The fixed (parameter-free) autoencoder; None with model.sd_folder, whose VAE has params."""
        if self.sd is not None:
            return None
        m = self.config.model
        return make_autoencoder(m.autoencoder, self.channels, m.autoencoder_factor, m.latent_scale)

    @property
    def dtype(self):
        """model.dtype; 'auto': bfloat16 on accelerators, float32 on CPU."""
        name = self.config.model.dtype
        if name == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return jnp.dtype(name)

    @functools.cached_property
    def model(self) -> DiffusionModel:
        m = self.config.model
        dtype = self.dtype
        if self.sd is not None:
            unet = dict(self.sd.unet_kwargs, dtype=dtype, remat=bool(m.get("remat", False)), any_size=True)
            return DiffusionModel(unet=unet, text=dict(self.sd.clip_kwargs, dtype=dtype), text_kind="clip")
        ae = self.autoencoder
        max_len, vocab_size = self.config.input.max_len, self.spec.info["vocab_size"]
        if m.text_encoder == "gpt2":
            text = dict(gpt2_weights.load_config(m.text_init_from), dropout=0.0, dtype=dtype)
            if max_len > text["n_positions"] or vocab_size > text["vocab_size"]:
                raise ValueError(f"model.text_init_from={m.text_init_from}: input.max_len={max_len} / "
                                 f"tokenizer size {vocab_size} exceed GPT-2's n_positions="
                                 f"{text['n_positions']} / vocab_size={text['vocab_size']}")
            context_dim = text["n_embd"]
        else:
            text = dict(vocab_size=vocab_size, max_len=max_len, width=m.text_width,
                        depth=m.text_depth, heads=m.text_heads, dtype=dtype)
            context_dim = m.text_width
        unet = dict(in_channels=ae.latent_channels, out_channels=ae.latent_channels,
                    block_out_channels=tuple(m.block_out_channels), attention=tuple(m.attention),
                    layers_per_block=m.layers_per_block, heads=m.heads,
                    transformer_depth=m.transformer_depth, cross_attention_dim=context_dim,
                    norm_groups=m.norm_groups, dtype=dtype, remat=bool(m.get("remat", False)))
        return DiffusionModel(unet=unet, text=text, text_kind=m.text_encoder)

    @functools.cached_property
    def vae(self) -> vae_lib.AutoencoderKL:
        """The folder's VAE (model.sd_folder); its params are the 'vae' subtree."""
        return vae_lib.AutoencoderKL(**self.sd.vae_kwargs, dtype=self.dtype)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if self.sd is not None:
            f, c = self.sd.vae_scale, self.sd.vae_kwargs["latent_channels"]
        else:
            f, c = self.autoencoder.downsample, self.autoencoder.latent_channels
        return image_size // f, image_size // f, c

    def init(self, rng, batch):
        """Random params throughout; a frozen GPT-2 encoder, or a Stable Diffusion folder's UNet, CLIP and
        VAE, are loaded over them by the trainer (pretrained_parts), which then starts the optimizer state
        and the EMA from them."""
        if self.sd is None:
            x0 = self.autoencoder.encode(batch["image"])
        else:
            x0 = jnp.zeros((batch["image"].shape[0], *self.latent_shape(batch["image"].shape[1])), jnp.float32)
        t = jnp.zeros((x0.shape[0],), jnp.int32)
        params = self.model.init(rng, x0, t, batch["tokens"])["params"]
        if self.sd is not None:  # the VAE's encoder and decoder (its __call__ runs both)
            params = {**params, "vae": self.vae.init(jax.random.fold_in(rng, 1), batch["image"])["params"]}
        return {"params": params}

    def pretrained_parts(self):
        if self.sd is not None:
            return {subtree: self.sd.path for subtree in sd_finetune.PARTS}
        m = self.config.model
        return {"text_encoder": m.text_init_from} if m.text_encoder == "gpt2" else {}

    def load_pretrained_part(self, subtree, source, init_params):
        """The GPT-2 checkpoint's params in place of the random `text_encoder` ones, or a Stable Diffusion
        folder's UNet / CLIP / VAE in place of 'denoiser' / 'text_encoder' / 'vae', with their dtypes
        and shardings."""
        if self.sd is not None:
            return _place(sd_finetune.load_part(source, subtree), init_params,
                          f"{source}/{sd_finetune.PARTS.get(subtree)}", f"model.sd_folder={source}")
        if subtree != "text_encoder":
            raise ValueError(f"the diffusion task loads no pretrained '{subtree}'")
        return _place(gpt2_weights.load_params(source), init_params, "GPT-2 checkpoint",
                      f"model.text_init_from={source}: the GPT-2 built from its config.json differs from the "
                      "model's text_encoder")

    # -- latents ---------------------------------------------------------------------------------
    def encode(self, params, images, rng=None):
        """Images in [-1, 1] -> the latents the UNet works on. With model.sd_folder: a draw from the VAE's
        posterior from `rng` (the posterior mean without one), (z - shift_factor) * scaling_factor."""
        if self.sd is None:
            return self.autoencoder.encode(images)
        ae = vae_lib.autoencoder(self.vae, params["vae"], sample=rng is not None,
                                 scaling_factor=self.sd.scaling_factor, shift_factor=self.sd.shift_factor)
        return ae.encode_fn(images, rng) * ae.scaling_factor

    def decode(self, params, latents):
        """Latents -> images in [-1, 1]."""
        if self.sd is None:
            return jnp.clip(self.autoencoder.decode(latents), -1.0, 1.0)
        ae = vae_lib.autoencoder(self.vae, params["vae"], scaling_factor=self.sd.scaling_factor,
                                 shift_factor=self.sd.shift_factor)
        return jnp.clip(ae.decode(latents).astype(jnp.float32), -1.0, 1.0)

    def _frozen_stopped(self, params):
        """The frozen parts of a Stable Diffusion model as constants of the gradient: no backward pass
        runs through the VAE or CLIP, so none of their activations are kept."""
        if self.sd is None:
            return params
        return {**params, **{k: jax.lax.stop_gradient(params[k]) for k in ("vae", "text_encoder")}}

    # -- loss ------------------------------------------------------------------------------------
    def _denoising_loss(self, params, x0, tokens, t, noise):
        d = self.config.diffusion
        x_t = self.schedule.q_sample(x0, t, noise)
        out = self.model.apply({"params": params}, x_t, t, tokens)
        tgt = losses.target(d.prediction, self.schedule, x0, noise, t)
        weight = losses.min_snr_weight(self.schedule.snr(t), d.min_snr_gamma, d.prediction)
        return losses.diffusion_loss(out, tgt, weight), losses.diffusion_loss(out, tgt, jnp.ones_like(weight))

    def loss_fn(self, params, state, batch, rng, train):
        t_rng, n_rng, d_rng = jax.random.split(rng, 3)
        params = self._frozen_stopped(params)
        # SD: a fresh posterior draw each step (the key is folded, so the other draws stay as without SD)
        x0 = self.encode(params, batch["image"], None if self.sd is None else jax.random.fold_in(rng, 0x5644))
        b = x0.shape[0]
        t = jax.random.randint(t_rng, (b,), 0, self.schedule.num_timesteps)
        noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
        tokens = batch["tokens"]
        if train and self.config.model.caption_dropout > 0:
            drop = jax.random.uniform(d_rng, (b,)) < self.config.model.caption_dropout
            tokens = jnp.where(drop[:, None], self._empty_tokens(1), tokens)
        per, mse = self._denoising_loss(params, x0, tokens, t, noise)
        w = batch["weight"]
        n = jnp.maximum(jnp.sum(w), 1.0)
        return jnp.sum(per * w) / n, {"mse": jnp.sum(mse * w) / n}, state

    def _empty_tokens(self, n: int):
        """(n, max_len) tokens of the empty caption: all padding, or CLIP's <|startoftext|><|endoftext|>..."""
        return jnp.asarray(self.tokenizer.encode_batch([""] * n, self.max_len))

    def _row_keys(self, rng, index):
        return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)

    def eval_fn(self, params, state, batch, rng):
        """Loss at fixed timesteps with per-example fixed noise (SD: on the VAE's posterior means); FD
        feature sums of real vs generated."""
        x0 = self.encode(params, batch["image"])
        w = batch["weight"]
        keys = self._row_keys(jax.random.key(self.config.seed + 17), batch["index"])
        # Every fixed timestep in one forward pass of K * B rows (one UNet in the program, not K).
        ts = jnp.asarray(self.config.diffusion.eval_timesteps, jnp.int32)
        k, b = len(ts), x0.shape[0]
        noise = jax.vmap(lambda i: jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), x0.shape[1:]))(
            keys))(jnp.arange(k)).reshape((k * b,) + x0.shape[1:])
        rep = lambda a: jnp.broadcast_to(a[None], (k,) + a.shape).reshape((k * b,) + a.shape[1:])
        _, mse = self._denoising_loss(params, rep(x0), rep(batch["tokens"]), jnp.repeat(ts, b), noise)
        total = mse.reshape(k, b).mean(axis=0)
        out = {"loss_sum": jnp.sum(total * w), "count": jnp.sum(w)}
        if self.config.fd.enabled:
            negative = self.tokenizer.encode_batch([self.config.sampler.get("negative_prompt", "")] * b, self.max_len)
            samples = self._generate(params, batch["tokens"], keys, jnp.asarray(negative), self.config.input.image_size)
            real, gen = self.features(batch["image"]), self.features(samples)
            out.update(feat_real_rows=real, feat_gen_rows=gen, weight_rows=w)
        return out

    def finalize_eval(self, sums):
        count = max(float(sums["count"]), 1e-12)
        out = {"loss": float(sums["loss_sum"]) / count}
        if "feat_real_rows" in sums and count >= 2:
            keep = sums["weight_rows"] > 0
            real, gen = sums["feat_real_rows"][keep], sums["feat_gen_rows"][keep]
            f = self.config.fd
            out.update(fid.feature_distances(real, gen, kid_subsets=f.kid_subsets, kid_subset_size=f.kid_subset_size,
                                             seed=f.seed))
        return out

    # -- sampling --------------------------------------------------------------------------------
    @functools.cached_property
    def features(self):
        """The FD feature extractor: fid.MAEFeatures, or InceptionV3 from fd.inception_weights.
        Built on first use, which is inside the traced eval step: compile-time eval makes its params
        (a checkpoint read, a jitted init) concrete arrays, not values of that trace."""
        f, c = self.config.fd, self.config.input
        with jax.ensure_compile_time_eval():
            if f.features == "inception":
                return InceptionFeatures(f.inception_weights, viz.rgb_indices(self.band_names),
                                         fid_variant=f.inception_variant == "pytorch-fid")
            return fid.MAEFeatures(c.image_size, self.channels, f.mae_run_dir, width=f.feature_width,
                                   depth=f.feature_depth, heads=f.feature_heads, patch_size=f.patch_size,
                                   seed=f.seed)

    def _sampler(self):
        """(schedule, prediction, sample() options) of config.sampler; with model.sd_folder its scheduler's
        betas, timestep spacing and final alpha (sampler.name '' = the folder's own sampler)."""
        s, d = self.config.sampler, self.config.diffusion
        options = dict(num_steps=s.num_steps, eta=s.eta, guidance_scale=s.guidance_scale)
        if self.sd is None:
            ae = self.autoencoder
            clip = s.clip * ae.scaling_factor if ae.bounded else 0.0
            return self.schedule, d.prediction, dict(options, name=s.name, clip=clip)
        schedule, folder_options, prediction = self.sd.sampler_settings(s.name)
        return schedule, prediction, dict(options, **folder_options)

    def _generate(self, params, tokens, keys, uncond_tokens, image_size: int):
        """Samples (B, H, W, C) in [-1, 1] for caption tokens (B, L), noise from per-row keys (B,), guided
        away from `uncond_tokens` (B, L) (the negative prompt; all padding = the empty caption)."""
        s = self.config.sampler
        x_T = jax.vmap(lambda k: jax.random.normal(k, self.latent_shape(image_size)))(keys)
        cond = self.model.apply({"params": params}, tokens, method=DiffusionModel.encode_text)
        uncond = None
        if s.guidance_scale != 1.0:
            uncond = self.model.apply({"params": params}, uncond_tokens, method=DiffusionModel.encode_text)
        apply_fn = lambda p, x, t, ctx: self.model.apply({"params": p}, x, t, ctx, method=DiffusionModel.denoise)
        schedule, prediction, options = self._sampler()
        z = samplers.sample(apply_fn, schedule, prediction, params, x_T, keys[0], cond, uncond, **options)
        return self.decode(params, z)

    @functools.cached_property
    def _jit_generate(self):
        return jax.jit(self._generate, static_argnums=4)

    def sample(self, params, captions, seed: int = 0, negative_prompt: str | None = None) -> np.ndarray:
        """Host numpy samples (N, H, W, C) in [-1, 1], one per caption (+ sampler.prompt_suffix),
        deterministic from `seed`, guided away from `negative_prompt` (default sampler.negative_prompt).
        Sample i's noise depends on (seed, i) only: from fold_in(key(seed), i), or with model.sd_folder
        from key(seed + i), the seed per image of sd.generate. Runs in chunks of `config.batch_size` so
        that pictures and `eojax infer` share one compiled sampler whatever the number of prompts."""
        s = self.config.sampler
        suffix = s.get("prompt_suffix", "")
        negative = s.get("negative_prompt", "") if negative_prompt is None else negative_prompt
        tokens = self.tokenizer.encode_batch([c + suffix for c in captions], self.max_len)
        n, chunk = len(tokens), self.config.batch_size
        uncond = jnp.asarray(self.tokenizer.encode_batch([negative] * chunk, self.max_len))
        size = s.get("image_size", 0) or self.config.input.image_size
        key = (lambda i: jax.random.key(seed + i)) if self.sd is not None else \
            (lambda i: jax.random.fold_in(jax.random.key(seed), i))
        out = []
        for start in range(0, n, chunk):
            idx = np.arange(start, start + chunk)
            tok = np.full((chunk, tokens.shape[1]), self.tokenizer.pad_id, np.int32)
            tok[:min(chunk, n - start)] = tokens[start:start + chunk]
            keys = jax.vmap(key)(jnp.asarray(idx))
            out.append(np.asarray(jax.device_get(self._jit_generate(params, jnp.asarray(tok), keys, uncond, size))))
        return np.concatenate(out)[:n]

    def to_rgb8(self, images) -> list[np.ndarray]:
        """[-1, 1] images -> uint8 RGB tiles (the B4/B3/B2 bands of multispectral output), linear scale."""
        idx = viz.rgb_indices(self.band_names)
        return [(np.clip((im[..., idx] + 1) / 2, 0, 1) * 255).round().astype(np.uint8) for im in images]


def _max_len(config, tokenizer) -> int:
    return tokenizer.max_len if sd_finetune.folder_of(config) else config.input.max_len


def _place(loaded, init_params, source: str, context: str):
    """`loaded` (host arrays) in the place of `init_params`: the same keys and shapes (else one line naming
    the arrays that differ), with their dtypes and shardings."""
    shapes = lambda tree: {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}
    problems = key_problems(shapes(loaded), shapes(init_params), source=source)
    if problems:
        raise CheckpointMismatchError(f"{context}: {'; '.join(problems)}")
    return jax.tree.map(lambda v, a: jax.device_put(jnp.asarray(v, a.dtype), a.sharding), loaded, init_params)


def _indexed(ds):
    """Adds each element's dataset index (per-example fixed noise in eval) to a MapDataset."""
    n = len(ds)
    return ds.map_with_index(lambda i, el: dict(el, index=np.int32(i % n)))


def _band_names(path, bands) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            idx = list(bands) or list(range(1, src.count + 1))
            names = [src.descriptions[i - 1] or "" for i in idx]
    if len(idx) == 3 and not all(names):
        return ["R", "G", "B"]
    return [n or f"band{i}" for n, i in zip(names, idx)]
