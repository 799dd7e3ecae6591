"""Text-to-image diffusion on caption datasets (RSICD / metadata.jsonl / synthetic), one trainer.

Train: x_t = q_sample(x_0, t, eps) on pixels or autoencoder latents, the model predicts eps or v,
MSE with optional min-SNR weighting; captions are dropped (replaced by the empty caption) with
probability `model.caption_dropout`, which is what classifier-free guidance needs.
Eval (held-out pairs): the denoising loss at fixed timesteps and fixed noise, and, with `fd.enabled`,
the Frechet distance between held-out images and samples generated for their captions (features summed
batch by batch on the device; the distance is taken in finalize_eval, reported with its sample count).
"""
from __future__ import annotations

import hashlib
import functools
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import rasterio
from flax import linen as nn

from eojax import viz
from eojax.diffusion import captions as captions_lib
from eojax.data import pipeline, synthetic
from eojax.diffusion import fid, losses, samplers
from eojax.diffusion.inception import InceptionFeatures
from eojax.diffusion.model import DiffusionModel, make_autoencoder
from eojax.diffusion.schedules import Schedule
from eojax.diffusion.text_encoder import BPECaptionTokenizer, WordTokenizer
from eojax.tasks.base import DataSpec, Task, elements



class DiffusionTask(Task):
    name = "diffusion"

    def __init__(self, config):
        super().__init__(config)
        self._model = None
        self._features = None
        self._sample_fn = None
        d = config.diffusion
        self.schedule = Schedule.from_config(d.schedule)
        if d.prediction not in losses.PREDICTIONS:
            raise ValueError(f"diffusion.prediction={d.prediction!r}; known: {losses.PREDICTIONS}")
        if config.sampler.name not in samplers.NAMES:
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

    # -- data ------------------------------------------------------------------------------------
    @functools.cached_property
    def records(self) -> tuple[list, list]:
        """(train, held-out) caption records, read once (the synthetic set is written on first use)."""
        c = self.config.input
        path = c.captions
        if not path:
            directory = os.path.join(synthetic.default_dir().parent, "captions",
                                     f"{c.synthetic_bands}_{c.image_size}_{c.synthetic_n}_{c.synthetic_layout}")
            path = synthetic.write_caption_dataset(directory, n=c.synthetic_n, size=c.image_size,
                                                   seed=self.config.seed, layout=c.synthetic_layout,
                                                   bands=c.synthetic_bands)
        records = captions_lib.read_captions(path, skip_missing=c.skip_missing_images)
        return captions_lib.split(records, c.eval_fraction)

    @functools.cached_property
    def tokenizer(self):
        return self._make_tokenizer([t for r in self.records[0] for t in r.captions])

    @functools.cached_property
    def channels(self) -> int:
        c = self.config.input
        return captions_lib.load_image(self.records[0][0].path, c.image_size, tuple(c.bands), c.max_value).shape[-1]

    @functools.cached_property
    def band_names(self) -> list[str]:
        return _band_names(self.records[0][0].path, tuple(self.config.input.bands))

    def _make_tokenizer(self, captions):
        m = self.config.model
        if m.text_encoder == "gpt2":
            from eojax.weights import gpt2 as gpt2_weights
            return BPECaptionTokenizer(gpt2_weights.load_tokenizer(m.text_init_from))
        return WordTokenizer.from_captions(captions, self.config.input.vocab_size)

    def _source(self, records, train):
        c = self.config.input
        return captions_lib.CaptionSource(records, self.tokenizer, size=c.image_size, max_len=c.max_len,
                                          bands=tuple(c.bands), max_value=c.max_value, train=train,
                                          seed=self.config.seed)

    def train_input(self, process_index, process_count):
        train, _ = self.records
        return pipeline.make_iterator(
            _indexed(self._source(train, True)), batch_size=self.config.batch_size // process_count,
            process_index=process_index, process_count=process_count, shuffle=True, seed=self.config.seed,
            num_epochs=None, drop_remainder=True, worker_count=self.config.input.worker_count)

    def eval_input(self, process_index, process_count):
        _, held = self.records
        if not held:
            return None
        return pipeline.make_iter_dataset(
            _indexed(self._source(held, False)), batch_size=self.config.batch_size // process_count,
            process_index=process_index, process_count=process_count, shuffle=False, num_epochs=1,
            drop_remainder=False, worker_count=self.config.input.worker_count)

    def data_fingerprint(self):
        train, held = self.records
        h = hashlib.sha256()
        for r in train + held:
            st = os.stat(r.path)
            h.update(f"{r.path}|{st.st_size}|{int(st.st_mtime)}|{'|'.join(r.captions)}\n".encode())
        return {"sha256": h.hexdigest(), "train_images": len(train), "held_out_images": len(held)}

    # -- model -----------------------------------------------------------------------------------
    @property
    def autoencoder(self):
        m = self.config.model
        return make_autoencoder(m.autoencoder, self.channels, m.autoencoder_factor, m.latent_scale)

    @property
    def model(self) -> DiffusionModel:
        if self._model is None:
            m, ae = self.config.model, self.autoencoder
            dtype = jnp.dtype(m.dtype)
            max_len = self.config.input.max_len
            if m.text_encoder == "gpt2":
                from eojax.weights import gpt2 as gpt2_weights
                text = dict(gpt2_weights.load_config(m.text_init_from), dropout=0.0, dtype=dtype)
                if max_len > text["n_positions"] or len(self.tokenizer) > text["vocab_size"]:
                    raise ValueError(f"model.text_init_from={m.text_init_from}: input.max_len={max_len} / "
                                     f"tokenizer size {len(self.tokenizer)} exceed GPT-2's n_positions="
                                     f"{text['n_positions']} / vocab_size={text['vocab_size']}")
                context_dim = text["n_embd"]
            else:
                text = dict(vocab_size=len(self.tokenizer), max_len=max_len, width=m.text_width,
                            depth=m.text_depth, heads=m.text_heads, dtype=dtype)
                context_dim = m.text_width
            unet = dict(in_channels=ae.latent_channels, out_channels=ae.latent_channels,
                        block_out_channels=tuple(m.block_out_channels), attention=tuple(m.attention),
                        layers_per_block=m.layers_per_block, heads=m.heads,
                        transformer_depth=m.transformer_depth, cross_attention_dim=context_dim,
                        norm_groups=m.norm_groups, dtype=dtype)
            self._model = DiffusionModel(unet=unet, text=text, text_kind=m.text_encoder)
        return self._model

    def data_spec(self) -> DataSpec:
        """Images in [-1, 1], channels-last, with their caption tokens and record index."""
        c = self.config.input
        size = c.image_size
        arrays = elements(image=((size, size, self.channels), np.float32), tokens=((c.max_len,), np.int32),
                          index=((), np.int32), weight=((), np.float32))
        return DataSpec(arrays, {"band_names": list(self.band_names), "vocab_size": len(self.tokenizer)})

    def init(self, rng, batch):
        x0 = self.autoencoder.encode(batch["image"])
        t = jnp.zeros((x0.shape[0],), jnp.int32)
        params = self.model.init(rng, x0, t, batch["tokens"])["params"]
        if self.config.model.text_encoder == "gpt2":
            params = dict(params, text_encoder=self._pretrained_text_encoder(params["text_encoder"]))
        return {"params": params}

    def _pretrained_text_encoder(self, boxed):
        """The GPT-2 checkpoint's params in place of the random ones, keeping their partitioning boxes.
        Loaded here, inside init, so the optimizer state (and the EMA) start from them too."""
        from eojax.checkpoint import CheckpointMismatchError
        from eojax.weights import gpt2 as gpt2_weights

        loaded = gpt2_weights.load_params(self.config.model.text_init_from)
        is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
        want = jax.tree.map(lambda b: tuple(nn.meta.unbox(b).shape), boxed, is_leaf=is_box)
        if jax.tree.map(np.shape, loaded) != want:
            raise CheckpointMismatchError(f"model.text_init_from={self.config.model.text_init_from}: "
                                          "parameter tree differs from the GPT-2 built from its config.json")
        return jax.tree.map(lambda b, v: b.replace_boxed(jnp.asarray(v, nn.meta.unbox(b).dtype))
                            if is_box(b) else jnp.asarray(v, b.dtype), boxed, loaded, is_leaf=is_box)

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
        x0 = self.autoencoder.encode(batch["image"])
        b = x0.shape[0]
        t = jax.random.randint(t_rng, (b,), 0, self.schedule.num_timesteps)
        noise = jax.random.normal(n_rng, x0.shape, x0.dtype)
        tokens = batch["tokens"]
        if train and self.config.model.caption_dropout > 0:
            drop = jax.random.uniform(d_rng, (b,)) < self.config.model.caption_dropout
            tokens = jnp.where(drop[:, None], self.tokenizer.pad_id, tokens)
        per, mse = self._denoising_loss(params, x0, tokens, t, noise)
        w = batch["weight"]
        n = jnp.maximum(jnp.sum(w), 1.0)
        return jnp.sum(per * w) / n, {"mse": jnp.sum(mse * w) / n}, state

    def _row_keys(self, rng, index):
        return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)

    def eval_fn(self, params, state, batch, rng):
        """Loss at fixed timesteps with per-example fixed noise; FD feature sums of real vs generated."""
        x0 = self.autoencoder.encode(batch["image"])
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
            samples = self._generate(params, batch["tokens"], keys)
            real, gen = self.features(batch["image"]), self.features(samples)
            for name, f in (("real", real), ("gen", gen)):
                fw = f * w[:, None]
                out[f"feat_{name}"] = jnp.sum(fw, axis=0)
                out[f"feat_{name}_outer"] = fw.T @ f
        return out

    def finalize_eval(self, sums):
        count = max(float(sums["count"]), 1e-12)
        out = {"loss": float(sums["loss_sum"]) / count}
        if "feat_real" in sums and count >= 2:
            real = fid.FeatureStats.from_sums(sums["feat_real"], sums["feat_real_outer"], count)
            gen = fid.FeatureStats.from_sums(sums["feat_gen"], sums["feat_gen_outer"], count)
            out.update(fid.frechet_distance_from_stats(real, gen))
        return out

    # -- sampling --------------------------------------------------------------------------------
    @property
    def features(self):
        """The FD feature extractor: fid.MAEFeatures, or InceptionV3 from fd.inception_weights."""
        if self._features is None:
            f, c = self.config.fd, self.config.input
            if f.features == "inception":
                self._features = InceptionFeatures(f.inception_weights, viz.rgb_indices(self.band_names),
                                                   fid_variant=f.inception_variant == "pytorch-fid")
                return self._features
            self._features = fid.MAEFeatures(c.image_size, self.channels, f.mae_run_dir, width=f.feature_width,
                                             depth=f.feature_depth, heads=f.feature_heads,
                                             patch_size=f.patch_size, seed=f.seed)
        return self._features

    def _generate(self, params, tokens, keys):
        """Samples (B, H, W, C) in [-1, 1] for caption tokens (B, L), noise from per-row keys (B,)."""
        s, d, ae = self.config.sampler, self.config.diffusion, self.autoencoder
        c = self.config.input
        lat = c.image_size // ae.downsample
        x_T = jax.vmap(lambda k: jax.random.normal(k, (lat, lat, ae.latent_channels)))(keys)
        cond = self.model.apply({"params": params}, tokens, method=DiffusionModel.encode_text)
        uncond = None
        if s.guidance_scale != 1.0:
            empty = jnp.full_like(tokens, self.tokenizer.pad_id)
            uncond = self.model.apply({"params": params}, empty, method=DiffusionModel.encode_text)
        apply_fn = lambda p, x, t, ctx: self.model.apply({"params": p}, x, t, ctx, method=DiffusionModel.denoise)
        z = samplers.sample(apply_fn, self.schedule, d.prediction, params, x_T, keys[0], cond, uncond,
                            name=s.name, num_steps=s.num_steps, eta=s.eta, guidance_scale=s.guidance_scale,
                            clip=s.clip * ae.scaling_factor if ae.bounded else 0.0)
        return jnp.clip(ae.decode(z), -1.0, 1.0)

    def sample(self, params, captions, seed: int = 0) -> np.ndarray:
        """Host numpy samples (N, H, W, C) in [-1, 1], one per caption, deterministic from `seed`
        (sample i's noise depends on (seed, i) only). Runs in chunks of `config.batch_size` so that
        pictures and `eojax infer` share one compiled sampler whatever the number of prompts."""
        tokens = self.tokenizer.encode_batch(list(captions), self.config.input.max_len)
        n, chunk = len(tokens), self.config.batch_size
        if self._sample_fn is None:
            self._sample_fn = jax.jit(self._generate)
        out = []
        for start in range(0, n, chunk):
            idx = np.arange(start, start + chunk)
            tok = np.full((chunk, tokens.shape[1]), self.tokenizer.pad_id, np.int32)
            tok[:min(chunk, n - start)] = tokens[start:start + chunk]
            keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(idx))
            out.append(np.asarray(jax.device_get(self._sample_fn(params, jnp.asarray(tok), keys))))
        return np.concatenate(out)[:n]

    def class_prompts(self, max_classes: int) -> list[tuple[str, str]]:
        """(class, caption) for the most frequent classes of the training set: its first caption."""
        train, _ = self.records
        counts: dict[str, int] = {}
        for r in train:
            counts[r.label] = counts.get(r.label, 0) + 1
        classes = sorted(counts, key=lambda k: (-counts[k], k))[:max_classes]
        return [(k, next(r.captions[0] for r in train if r.label == k)) for k in classes]

    def to_rgb8(self, images) -> list[np.ndarray]:
        """[-1, 1] images -> uint8 RGB tiles (the B4/B3/B2 bands of multispectral output), linear scale."""
        idx = viz.rgb_indices(self.band_names)
        return [(np.clip((im[..., idx] + 1) / 2, 0, 1) * 255).round().astype(np.uint8) for im in images]

    def write_pictures(self, params, state, batch, workdir, step):
        """A grid of samples: one row per caption class (the row captions go to a .txt beside it)."""
        p = self.config.pictures
        prompts = self.class_prompts(p.max_classes)
        images = self.sample(params, [cap for _, cap in prompts for _ in range(p.samples_per_class)],
                             seed=self.config.seed)
        if jax.process_index() != 0:
            return []
        tiles = self.to_rgb8(images)
        k = p.samples_per_class
        rows = [tiles[i * k:(i + 1) * k] for i in range(len(prompts))]
        path = os.path.join(workdir, f"diffusion_samples_step{step}.png")
        viz.save_grid_png(path, rows)
        with open(path[:-4] + ".txt", "w") as f:
            f.writelines(f"row {i}: [{cls}] {cap}\n" for i, (cls, cap) in enumerate(prompts))
        return [path]

    def infer(self, params, state, workdir, options):
        """`eojax infer diffusion --prompt=...`: num_samples PNGs per prompt (and float32 GeoTIFFs in
        data units when infer.geotiff or the data has other than 3 bands)."""
        prompts = list(options.get("prompt") or [cap for _, cap in self.class_prompts(3)])
        n, out_dir = int(options.get("num_samples") or 1), options["output"]
        unknown = sorted({w for pr in prompts for w in self.tokenizer.unknown_words(pr)})
        images = self.sample(params, [pr for pr in prompts for _ in range(n)], seed=int(options.get("seed", 0)))
        multiband = self.config.infer.geotiff or self.channels != 3
        files = []
        if jax.process_index() == 0:
            os.makedirs(out_dir, exist_ok=True)
            tiles = self.to_rgb8(images)
            for i, pr in enumerate(prompts):
                slug = re.sub(r"[^a-z0-9]+", "_", pr.lower()).strip("_")[:60] or "empty"
                for j in range(n):
                    base = os.path.join(out_dir, f"{i:02d}_{slug}_{j}")
                    viz.save_grid_png(base + ".png", [[tiles[i * n + j]]], scale=1)
                    files.append(base + ".png")
                    if multiband:
                        files.append(_write_geotiff(base + ".tif", images[i * n + j], self.band_names,
                                                    self.config.input.max_value, pr))
        return {"prompts": prompts, "num_samples": n, "files": files, "unknown_words": unknown}


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


def _write_geotiff(path, image, band_names, max_value, prompt) -> str:
    data = ((image + 1) / 2 * (max_value or (255.0 if len(band_names) == 3 else 5000.0))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0],
                           count=data.shape[2], dtype="float32") as dst:
            dst.write(data.transpose(2, 0, 1))
            for i, name in enumerate(band_names):
                dst.set_band_description(i + 1, name)
            dst.update_tags(prompt=prompt, source="eojax diffusion sample")
    return path

