"""Plain ViT-MAE pretraining on multispectral GeoTIFF windows."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from eojax.data import device, pipeline
from eojax.mae import model as mae_lib
from eojax.tasks.base import DataSpec, Input, Task, stats_from_info, stats_info

# config.model size keys; 0 means "the variant's own size".
_SHAPE_KEYS = ("width", "depth", "heads", "mlp_dim", "decoder_width", "decoder_depth", "decoder_heads")


class MAEInput(Input):
    """GeoTIFF windows (one or several scales) through the Grain pipeline."""

    @functools.cached_property
    def info(self) -> dict:
        """The input's scenes, statistics, band names and window arrays (pipeline.image_input_info)."""
        return pipeline.image_input_info(self.config.input)

    def build_spec(self) -> DataSpec:
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

    def train(self, process_index, process_count):
        return self._input("train", process_index, process_count)

    def eval(self, process_index, process_count):
        return self._input("eval", process_index, process_count)


class MAETask(Task):
    name = "mae"
    input_class = MAEInput
    plugins = {"pictures": "eojax.mae.pictures:write_pictures", "export": "eojax.mae.export:export_run"}

    @classmethod
    def check_config(cls, config):
        window, patch = int(config.input.window), int(config.model.get("patch_size", 0) or 0)
        if window <= 0 or (patch and window % patch):
            raise ValueError(f"config.input.window={window} must be a positive multiple of the patch size"
                             + (f" {patch}" if patch else ""))
        from eojax.mae import export  # `eojax export`'s stride, refused before a checkpoint is read
        export.export_stride(config)

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.stats = stats_from_info(spec.info)  # None with input.normalize=False
        self.band_names = list(spec.info["band_names"])

    # -- model (phase 4) ---------------------------------------------------------------------------
    def model_kwargs(self) -> dict:
        m = self.config.model
        overrides = {k: v for k, v in m.items() if k != "variant" and not (k in _SHAPE_KEYS and v == 0)}
        overrides.update(image_size=self.config.input.window, in_channels=len(self.band_names),
                         dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
        return mae_lib.mae_config(m.variant, **overrides)

    @functools.cached_property
    def model(self) -> mae_lib.MAE:
        return mae_lib.MAE(**self.model_kwargs())

    def images(self, batch) -> dict:
        """Raw band-first pixels -> normalised channels-last model input (inside the jitted step);
        'image', and 'image_2x' / 'image_4x' for multi-scale batches."""
        return device.model_inputs(batch, self.stats, mode=self.config.input.normalize_mode)

    def init(self, rng, batch):
        params_rng, mask_rng = jax.random.split(rng)
        return self.model.init({"params": params_rng, "mask": mask_rng}, self.images(batch)["image"],
                               train=False)

    def load_pretrained(self, path, init_params):
        """`config.init_from=<file>`: SatMAE++'s fMoW-RGB pretraining checkpoint (models_mae.py's
        MaskedAutoencoderViT), encoder and decoder; its multi-scale head (eojax's MAE has none) is
        reported, not loaded (eojax.mae.weights.load_plain_pretrained)."""
        from eojax.mae import weights as mae_weights

        return mae_weights.load_plain_pretrained(path, init_params, self.model_kwargs())

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
        image = device.to_model_input(batch["pixels"], batch["valid"], self.stats,
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
