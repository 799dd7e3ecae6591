"""SatMAE++ group-channel MAE (with its multi-scale head) and GRID-MAE pretraining.

The same task serves both: SatMAE++ groups spectral bands (configs/satmae.py), GRID-MAE gives each
geophysics grid its own group (configs/gridmae.py, `model.groups = 'per_source'`). Everything else
(input, pictures, export) is the plain MAE family's.
"""
from __future__ import annotations

import ast
import functools

import numpy as np

from eojax.mae import satmae, weights as satmae_weights
from eojax.mae.task import MAETask

PRED_ORDERS = ("auto",) + satmae.PRED_ORDERS  # config.model.pred_order
_SHAPE_KEYS = ("width", "depth", "heads", "mlp_dim", "group_embed_dim", "decoder_width",
               "decoder_depth", "decoder_heads", "decoder_group_embed_dim")


class SatMAETask(MAETask):
    name = "satmae"

    def groups(self) -> tuple[tuple[int, ...], ...]:
        """config.model.groups: 'per_source' (one group per stacked grid), 'sentinel2_10' (SatMAE++'s
        grouping of the 10 S2 bands), 'all' (one group), or a tuple of groups of band names/indices."""
        spec, names = self.config.model.groups, self.band_names
        if isinstance(spec, str) and spec.lstrip().startswith(("(", "[")):
            spec = ast.literal_eval(spec)  # a tuple given on the command line arrives as text
        if spec == "per_source":
            return tuple(tuple(g) for g in self.spec.info["source_channels"])
        if spec == "sentinel2_10":
            if len(names) != 10:
                raise ValueError(f"model.groups='sentinel2_10' needs the 10 SatMAE bands, the input has "
                                 f"{len(names)}: {names}")
            return satmae.GROUPS_S2_10
        if spec == "all":
            return (tuple(range(len(names))),)
        unknown = [b for g in spec for b in g if isinstance(b, str) and b not in names]
        if unknown:
            raise ValueError(f"model.groups names bands {unknown} the input does not have: {names}")
        groups = tuple(tuple(names.index(b) if isinstance(b, str) else int(b) for b in g) for g in spec)
        flat = sorted(i for g in groups for i in g)
        if flat != list(range(len(names))):
            raise ValueError(f"model.groups={spec!r} must use every input band exactly once: {names}")
        return groups

    def pred_order(self) -> str:
        """config.model.pred_order, 'auto' (the default, also when absent) resolved: SatMAE++'s order
        when config.init_from is a published checkpoint file (its decoder and multi-scale head were
        trained in it), eojax's ('bands') otherwise."""
        order = self.config.model.get("pred_order", "auto")
        if order != "auto":
            return order
        init_from = self.config.get("init_from")
        return "reference" if init_from and satmae_weights.is_checkpoint_file(init_from) else "bands"

    def model_kwargs(self) -> dict:
        m = self.config.model
        skip = ("variant", "groups")
        overrides = {k: v for k, v in m.items() if k not in skip and not (k in _SHAPE_KEYS and v == 0)}
        overrides.update(image_size=self.config.input.window, groups=self.groups(),
                         pred_order=self.pred_order(),
                         multiscale=tuple(self.config.input.scales) == (1, 2, 4),
                         dtype=np.dtype(m.dtype), param_dtype=np.dtype(m.param_dtype))
        return satmae.satmae_config(m.variant, **overrides)

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        scales = tuple(config.input.scales)
        if scales not in ((1,), (1, 2, 4)):
            raise ValueError(f"input.scales={scales}: the group MAE takes (1,) or (1, 2, 4)")
        order = config.model.get("pred_order", "auto")
        if order not in PRED_ORDERS:
            raise ValueError(f"model.pred_order={order!r}: one of {PRED_ORDERS}")

    @functools.cached_property
    def model(self) -> satmae.SatMAE:
        return satmae.SatMAE(**self.model_kwargs())

    def loss(self, out, images, valid):
        return satmae.satmae_loss(
            out, images["image"], valid["valid"], self.model.patch_size, self.model.groups,
            self.config.model.norm_pix_loss, targets2=images.get("image_2x"), valid2=valid.get("valid_2x"),
            targets4=images.get("image_4x"), valid4=valid.get("valid_4x"), pred_order=self.model.pred_order)

    def load_pretrained(self, path, abstract_params):
        """A published SatMAE++ checkpoint (.safetensors / .npz / .pth). Parts this model lacks (a
        multi-scale head, a classifier) are dropped with a warning; anything missing or misshapen is
        an error naming the keys. model.pred_order='auto' reads the decoder in SatMAE++'s order."""
        return satmae_weights.load_pretrained(path, abstract_params, self.model_kwargs(), strict=False)

    def train_flops_per_example(self) -> float:
        return satmae.flops_per_image(self.model_kwargs(), training=True)

    def reconstruction(self, out):
        return out["recon"]
