"""Plain ViT-MAE pretraining on multispectral GeoTIFF windows."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from eojax import viz
from eojax.data import device, pipeline
from eojax.models import mae as mae_lib
from eojax.tasks.base import Task

# config.model size keys; 0 means "the variant's own size".
_SHAPE_KEYS = ("width", "depth", "heads", "mlp_dim", "decoder_width", "decoder_depth", "decoder_heads")


class MAETask(Task):
    name = "mae"

    def __init__(self, config):
        super().__init__(config)
        self._info = None
        self._model = None

    # -- input (phase 3) ---------------------------------------------------------------------------
    def _input(self, split, process_index, process_count):
        it, info = pipeline.make_image_input(
            self.config.input, split=split, batch_size=self.config.batch_size // process_count,
            process_index=process_index, process_count=process_count, seed=self.config.seed)
        self._info = info
        return it

    def train_input(self, process_index, process_count):
        return self._input("train", process_index, process_count)

    def eval_input(self, process_index, process_count):
        return self._input("eval", process_index, process_count)

    @property
    def info(self) -> dict:
        if self._info is None:
            raise RuntimeError("the MAE task learns its band count from the data: build train_input first")
        return self._info

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

    def dummy_batch(self, batch_size):
        w, c = self.config.input.window, self.info["num_channels"]
        return {"pixels": jax.ShapeDtypeStruct((batch_size, c, w, w), self.info["dtype"]),
                "valid": jax.ShapeDtypeStruct((batch_size, w, w), jnp.bool_),
                "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

    def image(self, batch):
        """Raw band-first pixels -> normalised channels-last model input (inside the jitted step)."""
        return device.to_model_input(batch["pixels"], batch["valid"], self.info["stats"])

    def init(self, rng, batch):
        params_rng, mask_rng = jax.random.split(rng)
        variables = self.model.init({"params": params_rng, "mask": mask_rng}, self.image(batch), train=False)
        return variables["params"]

    # -- loss and evaluation -------------------------------------------------------------------------
    def _forward(self, params, batch, rng, train, mask_ratio=None):
        mask_rng, dropout_rng = jax.random.split(rng)
        image = self.image(batch)
        out = self.model.apply({"params": params}, image, train=train, mask_ratio=mask_ratio,
                               rngs={"mask": mask_rng, "dropout": dropout_rng})
        # Padding rows of a partial eval batch carry weight 0: they count as all-invalid.
        valid = batch["valid"] & (batch["weight"][:, None, None] > 0)
        loss, aux = mae_lib.mae_loss(out["pred"], image, valid, out["mask"],
                                     self.model.patch_size, self.config.model.norm_pix_loss)
        return loss, aux, dict(out, image=image)

    def loss_fn(self, params, batch, rng, train):
        loss, aux, _ = self._forward(params, batch, rng, train)
        return loss, {"masked_valid_fraction": aux["masked_valid_fraction"]}

    def eval_fn(self, params, batch, rng):
        # A fixed masking rng: eval losses of different checkpoints see the same masks.
        loss, aux, _ = self._forward(params, batch, rng, train=False)
        return {"loss_sum": loss * aux["loss_weight"], "count": aux["loss_weight"]}

    def embed(self, params, batch):
        """Per-window embedding for feature export: the encoder on every patch (no masking), patch
        tokens averaged."""
        _, _, out = self._forward(params, batch, jax.random.key(0), train=False, mask_ratio=0.0)
        return jnp.mean(out["latent"][:, self.model.use_cls_token:], axis=1)

    def train_flops_per_example(self) -> float:
        return mae_lib.flops_per_image(self.model_kwargs(), training=True)

    # -- pictures ----------------------------------------------------------------------------------
    def write_pictures(self, params, batch, workdir, step):
        """original / masked / reconstructed tiles as one PNG (RGB from the band names when it can)."""
        n = min(4, batch["valid"].shape[0])
        rng = jax.random.key(self.config.seed + 1)
        _, _, out = jax.jit(lambda p, b: self._forward(p, b, rng, False))(params, batch)
        fetched = multihost_utils.process_allgather(
            {"image": out["image"], "valid": batch["valid"], "pred": out["pred"], "mask": out["mask"]},
            tiled=True)
        if jax.process_index() != 0:
            return []
        p = self.model.patch_size
        # The tiles with the most valid data: nodata corners make poor pictures.
        pick = np.argsort(-np.asarray(fetched["valid"]).mean(axis=(1, 2)), kind="stable")[:n]
        fetched = {k: np.asarray(v)[pick] for k, v in fetched.items()}
        image = fetched["image"]
        h, w, c = image.shape[1:]
        recon = np.asarray(mae_lib.unpatchify(fetched["pred"], p, h, w, c))
        if self.config.model.norm_pix_loss:
            recon = _denormalize_patches(recon, image, fetched["valid"], p)
        mask_px = np.asarray(mae_lib.unpatchify(
            np.repeat(fetched["mask"][:, :, None], p * p, axis=2), p, h, w, 1))[..., 0]
        path = os.path.join(workdir, f"mae_reconstruction_step{step}.png")
        viz.save_reconstruction_png(path, image, fetched["valid"], mask_px > 0.5, recon,
                                    self.info["band_names"])
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
