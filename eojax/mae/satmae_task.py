"""SatMAE++ group-channel MAE (with its multi-scale head) and GRID-MAE pretraining.

The same task serves both: SatMAE++ groups spectral bands (configs/satmae.py), GRID-MAE gives each
geophysics grid its own group (configs/gridmae.py, `model.groups = 'per_source'`). Everything else
(input, pictures, export) is the plain MAE task's.
"""
from __future__ import annotations

import ast
import os

import jax
import numpy as np

from eojax import viz
from eojax.mae import satmae
from eojax.mae.task import MAETask

_SHAPE_KEYS = ("width", "depth", "heads", "mlp_dim", "group_embed_dim", "decoder_width",
               "decoder_depth", "decoder_heads", "decoder_group_embed_dim")


class SatMAETask(MAETask):
    name = "satmae"

    def groups(self) -> tuple[tuple[int, ...], ...]:
        """config.model.groups: 'per_source' (one group per stacked grid), 'sentinel2_10' (SatMAE++'s
        grouping of the 10 S2 bands), 'all' (one group), or a tuple of groups of band names/indices."""
        spec, names = self.config.model.groups, self.info["band_names"]
        if isinstance(spec, str) and spec.lstrip().startswith(("(", "[")):
            spec = ast.literal_eval(spec)  # a tuple given on the command line arrives as text
        if spec == "per_source":
            return tuple(tuple(g) for g in self.info["source_channels"])
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

    def model_kwargs(self) -> dict:
        m = self.config.model
        skip = ("variant", "groups")
        overrides = {k: v for k, v in m.items() if k not in skip and not (k in _SHAPE_KEYS and v == 0)}
        overrides.update(image_size=self.config.input.window, groups=self.groups(),
                         multiscale=tuple(self.config.input.scales) == (1, 2, 4),
                         dtype=np.dtype(m.dtype), param_dtype=np.dtype(m.param_dtype))
        return satmae.satmae_config(m.variant, **overrides)

    @property
    def model(self) -> satmae.SatMAE:
        if self._model is None:
            scales = tuple(self.config.input.scales)
            if scales not in ((1,), (1, 2, 4)):
                raise ValueError(f"input.scales={scales}: the group MAE takes (1,) or (1, 2, 4)")
            self._model = satmae.SatMAE(**self.model_kwargs())
        return self._model

    def loss(self, out, images, valid):
        return satmae.satmae_loss(
            out, images["image"], valid["valid"], self.model.patch_size, self.model.groups,
            self.config.model.norm_pix_loss, targets2=images.get("image_2x"), valid2=valid.get("valid_2x"),
            targets4=images.get("image_4x"), valid4=valid.get("valid_4x"))

    def load_pretrained(self, path, abstract_params):
        """A published SatMAE++ checkpoint (.safetensors / .npz / .pth). Parts this model lacks (a
        multi-scale head, a classifier) are dropped with a warning; anything missing or misshapen is
        an error naming the keys."""
        from eojax.mae import weights as satmae_weights
        return satmae_weights.load_pretrained(path, abstract_params, self.model_kwargs(), strict=False)

    def train_flops_per_example(self) -> float:
        return satmae.flops_per_image(self.model_kwargs(), training=True)

    def reconstruction(self, out):
        return out["recon"]

    def write_pictures(self, params, state, batch, workdir, step):
        """The 1x picture of the MAE task, plus target / prediction at 2x and 4x when multi-scale."""
        paths = super().write_pictures(params, state, batch, workdir, step)
        if jax.process_index() != 0 or not self.model.multiscale:
            return paths
        f = self._picture_arrays(params, batch, min(4, batch["valid"].shape[0]))
        names, size = self.info["band_names"], f["image_4x"].shape[1]
        rows = []
        for i in range(len(f["image"])):
            row = []
            for key, up in (("", None), ("_2x", "up2"), ("_4x", "up4")):
                target, valid = f["image" + key][i], f["valid" + key][i]
                row.append(viz.resize_nearest(viz.to_rgb8(target, names, valid), size))
                if up:
                    row.append(viz.resize_nearest(viz.to_rgb8(f[up][i], names, valid, ref=target), size))
            rows.append(row)
        path = os.path.join(workdir, f"{self.name}_multiscale_step{step}.png")
        return paths + [viz.save_grid_png(path, rows, scale=max(1, 256 // size))]
