"""Plain ViT-MAE pretraining on multispectral GeoTIFF windows."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from eojax import viz
from eojax.data import device, pipeline
from eojax.mae import model as mae_lib
from eojax.tasks.base import DataSpec, Task, stats_info

# config.model size keys; 0 means "the variant's own size".
_SHAPE_KEYS = ("width", "depth", "heads", "mlp_dim", "decoder_width", "decoder_depth", "decoder_heads")


class MAETask(Task):
    name = "mae"

    def __init__(self, config):
        super().__init__(config)
        self._model = None

    # -- input (phase 3) ---------------------------------------------------------------------------
    @functools.cached_property
    def info(self) -> dict:
        """The input's scenes, statistics, band names and window arrays (pipeline.image_input_info)."""
        return pipeline.image_input_info(self.config.input)

    def data_spec(self) -> DataSpec:
        # Pixel arrays (every scale) as the pipeline makes them, plus the per-row weight.
        arrays = {k: (shape, np.dtype(dtype).name) for k, (shape, dtype) in self.info["element_spec"].items()
                  if k.startswith(("pixels", "valid"))}
        return DataSpec(dict(arrays, weight=((), "float32")), {
            "band_names": self.info["band_names"], "source_channels": [list(c) for c in self.info["source_channels"]],
            "scales": list(self.info["scales"]), **stats_info(self.info["stats"])})

    def _input(self, split, process_index, process_count):
        it, _ = pipeline.make_image_input(
            self.config.input, split=split, batch_size=self.config.batch_size // process_count,
            process_index=process_index, process_count=process_count, seed=self.config.seed)
        return it

    def train_input(self, process_index, process_count):
        return self._input("train", process_index, process_count)

    def eval_input(self, process_index, process_count):
        return self._input("eval", process_index, process_count)

    # -- model (phase 4) ---------------------------------------------------------------------------
    def model_kwargs(self) -> dict:
        m = self.config.model
        overrides = {k: v for k, v in m.items() if k != "variant" and not (k in _SHAPE_KEYS and v == 0)}
        overrides.update(image_size=self.config.input.window, in_channels=self.info["num_channels"],
                         dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
        return mae_lib.mae_config(m.variant, **overrides)

    @property
    def model(self) -> mae_lib.MAE:
        if self._model is None:
            self._model = mae_lib.MAE(**self.model_kwargs())
        return self._model

    def images(self, batch) -> dict:
        """Raw band-first pixels -> normalised channels-last model input (inside the jitted step);
        'image', and 'image_2x' / 'image_4x' for multi-scale batches."""
        return device.model_inputs(batch, self.info["stats"], mode=self.config.input.normalize_mode)

    def init(self, rng, batch):
        params_rng, mask_rng = jax.random.split(rng)
        return self.model.init({"params": params_rng, "mask": mask_rng}, self.images(batch)["image"],
                               train=False)

    # -- loss and evaluation -------------------------------------------------------------------------
    def _forward(self, params, batch, rng, train, mask_ratio=None):
        """The MAE has no model state: its functions take `state` ({}) and pass it through."""
        mask_rng, dropout_rng = jax.random.split(rng)
        images = self.images(batch)
        out = self.model.apply({"params": params}, images["image"], train=train, mask_ratio=mask_ratio,
                               rngs={"mask": mask_rng, "dropout": dropout_rng})
        # Padding rows of a partial eval batch carry weight 0: they count as all-invalid.
        real = batch["weight"] > 0
        valid = {k: v & real.reshape((-1,) + (1,) * (v.ndim - 1)) for k, v in batch.items()
                 if k.startswith("valid")}
        loss, aux = self.loss(out, images, valid)
        return loss, aux, dict(out, **images)

    def loss(self, out, images, valid):
        return mae_lib.mae_loss(out["pred"], images["image"], valid["valid"], out["mask"],
                                self.model.patch_size, self.config.model.norm_pix_loss)

    def loss_fn(self, params, state, batch, rng, train):
        loss, aux, _ = self._forward(params, batch, rng, train)
        return loss, {k: v for k, v in aux.items() if k != "loss_weight"}, state

    def eval_fn(self, params, state, batch, rng):
        # A fixed masking rng: eval losses of different checkpoints see the same masks.
        loss, aux, _ = self._forward(params, batch, rng, train=False)
        return {"loss_sum": loss * aux["loss_weight"], "count": aux["loss_weight"]}

    def embed(self, params, state, batch):
        """Per-window embedding for feature export: the encoder on every patch (no masking), patch
        tokens averaged. Takes native-resolution `pixels` / `valid` only (a multi-scale model is
        trained on downsampled windows but, as in SatMAE++ fine-tuning, applied to native ones)."""
        image = device.to_model_input(batch["pixels"], batch["valid"], self.info["stats"],
                                      mode=self.config.input.normalize_mode)
        out = self.model.apply({"params": params}, image, train=False, mask_ratio=0.0,
                               rngs={"mask": jax.random.key(0)})
        return jnp.mean(out["latent"][:, self.model.use_cls_token:], axis=1)

    def train_flops_per_example(self) -> float:
        return mae_lib.flops_per_image(self.model_kwargs(), training=True)

    # -- pictures ----------------------------------------------------------------------------------
    def reconstruction(self, out):
        """(B, H, W, C) reconstruction in model-input units (before undoing norm-pix)."""
        h, w, c = out["image"].shape[1:]
        return mae_lib.unpatchify(out["pred"], self.model.patch_size, h, w, c)

    def _picture_arrays(self, params, batch, n):
        """The n most-valid tiles of `batch` through the model, fetched to host numpy (process 0)."""
        rng = jax.random.key(self.config.seed + 1)
        out = jax.jit(lambda p, b: self._forward(p, b, rng, False)[2])(params, batch)
        arrays = {k: v for k, v in out.items() if k.startswith(("image", "up"))}
        arrays.update({k: v for k, v in batch.items() if k.startswith("valid")})
        arrays.update(mask=out["mask"], recon=self.reconstruction(out))
        fetched = multihost_utils.process_allgather(arrays, tiled=True)
        # The tiles with the most valid data: nodata corners make poor pictures.
        pick = np.argsort(-np.asarray(fetched["valid"]).mean(axis=(1, 2)), kind="stable")[:n]
        return {k: np.asarray(v)[pick] for k, v in fetched.items()}

    def write_pictures(self, params, state, batch, workdir, step):
        """original / masked / reconstructed tiles as one PNG (RGB from the band names when it can)."""
        f = self._picture_arrays(params, batch, min(4, batch["valid"].shape[0]))
        if jax.process_index() != 0:
            return []
        p, image, valid = self.model.patch_size, f["image"], f["valid"]
        h, w, _ = image.shape[1:]
        recon = f["recon"]
        if self.config.model.norm_pix_loss:
            recon = _denormalize_patches(recon, image, valid, p)
        # Masked pixels: a pixel is masked if its patch is masked in every band group.
        mask = f["mask"].reshape(len(image), -1, (h // p) * (w // p)).min(axis=1)
        mask_px = np.repeat(np.repeat(mask.reshape(-1, h // p, w // p), p, 1), p, 2) > 0.5
        path = os.path.join(workdir, f"{self.name}_reconstruction_step{step}.png")
        viz.save_reconstruction_png(path, image, valid, mask_px, recon, self.info["band_names"])
        return [path]


def _denormalize_patches(recon, image, valid, p):
    """With norm_pix_loss the model predicts standardised patches: give them each patch's own
    mean and std (over valid pixels) so the picture is comparable to the input."""
    b, h, w, c = image.shape
    out = recon.copy()
    for i in range(0, h, p):
        for j in range(0, w, p):
            tile, v = image[:, i:i + p, j:j + p], valid[:, i:i + p, j:j + p, None]
            cnt = np.maximum(v.sum(axis=(1, 2, 3)) * c, 1)
            mean = (tile * v).sum(axis=(1, 2, 3)) / cnt
            var = (((tile - mean[:, None, None, None]) * v) ** 2).sum(axis=(1, 2, 3)) / np.maximum(cnt - 1, 1)
            out[:, i:i + p, j:j + p] = recon[:, i:i + p, j:j + p] * np.sqrt(var + 1e-6)[:, None, None, None] \
                + mean[:, None, None, None]
    return out
