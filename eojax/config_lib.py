"""Shared pieces of the config files in configs/.

They live in the package (not in configs/common.py as DESIGN.md sketched) so that a config file can
import them from any working directory once eojax is installed; see docs/architecture.md.
"""
from __future__ import annotations

import ast
from typing import Any

import ml_collections

# One rule set serves data parallel, FSDP and tensor parallel: the mesh sizes decide which are active
# (an axis of size 1 shards nothing). 'batch' comes first so activations give fsdp to the batch and
# parameters (which have no batch dimension) give it to 'embed'.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("length", None),
    ("layers", None),
    ("height", None),
    ("width", None),
    ("channels", None),
)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """'runlocal,variant=small,patch=16' -> ConfigDict, typed by `defaults`.

    A bare word sets a boolean default to True; an unknown word is an error naming it, so a typo
    in a launch command never silently trains the wrong model.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if not _:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, (int, float)):
            try:
                out[key] = type(default)(ast.literal_eval(value))
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"config argument {key}={value!r} is not a {type(default).__name__}") from e
        else:
            out[key] = value
    return out


def trainer_defaults() -> ml_collections.ConfigDict:
    """Every key the trainer reads, with its default; families add task, input, model and optim."""
    c = ml_collections.ConfigDict()
    c.task = ""
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 32  # global, over all processes
    c.log_every = 10
    c.eval_every = 0  # 0 = only at the end
    c.eval_steps = 0  # 0 = the whole eval set
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.init_from = ""  # a workdir or checkpoint folder whose params start this run
    c.best_metric = ""  # an eval metric (e.g. "miou"): keep the best params in <workdir>/best, test on them
    c.best_mode = "max"  # or "min"
    # Kernel set (models/layers.py): 'auto' = the XLA:CPU-tuned custom VJPs on CPU, plain jax/flax
    # autodiff elsewhere; 'plain' / 'xla_cpu' force one. Parameters are the same under each.
    c.kernels = "auto"
    c.peak_tflops = 0.0  # for MFU; 0 = a known device peak, or a measured matmul rate on CPU
    c.progress_bar = True
    c.mesh = (("data", -1), ("fsdp", 1), ("model", 1))
    c.sharding_rules = DEFAULT_RULES
    c.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1})
    return c


def image_input_defaults(**overrides) -> ml_collections.ConfigDict:
    """`config.input` of the image families: GeoTIFF windows read on the fly (eojax.data.pipeline)."""
    c = ml_collections.ConfigDict(dict(
        paths=(),  # GeoTIFFs, globs or '{band}' templates; empty = synthetic default scenes
        bands=(),  # names or 1-based indices; empty = all bands (synthetic: the 10 spectral bands)
        nodata=ml_collections.config_dict.placeholder(float),  # override the files' nodata value
        window=96,
        num_windows=4096,  # random windows per epoch
        min_valid_fraction=0.5,  # windows with less valid data are redrawn (data/windows.py)
        normalize=True,  # per-band statistics over valid pixels, cached next to the data
        normalize_mode="standard",  # or 'satmae_minmax': clip((x - (mean - 2 std)) / (4 std), 0, 1)
        eval_stride=96,
        worker_count=0,
        stack=False,  # True: each path is a layer warped onto one grid (different resolutions / CRSs)
        resampling="bilinear",  # per-path tuple or one name, when stacking
        reference=ml_collections.config_dict.placeholder(str),  # the grid to stack onto (default: finest)
        scales=(1,),  # (1, 2, 4): also real 2x and 4x windows as targets (SatMAE++ multi-scale)
    ))
    c.update(overrides)
    return c


def mae_adamw(lr: float, warmup_steps: int) -> ml_collections.ConfigDict:
    """The MAE-family optimizer: AdamW (b2 0.95, weight decay 0.05), warmup + cosine, clip 1.0."""
    from eojax import optim  # the configs' import of config_lib stays light

    c = optim.default_config()
    c.update(name="adamw", lr=lr, b2=0.95, weight_decay=0.05, warmup_steps=warmup_steps, clip_norm=1.0)
    return c


def make_runlocal(config: ml_collections.ConfigDict, *, total_steps: int, checkpoint_every: int,
                  eval_every: int = 0, lr: float = 2e-3, warmup_steps: int = 6) -> None:
    """The `runlocal` trainer settings shared by every family: batch 16, frequent logs, a short eval."""
    config.update(total_steps=total_steps, batch_size=16, log_every=10, eval_every=eval_every,
                  eval_steps=2, checkpoint_every=checkpoint_every)
    config.optim.update(lr=lr, warmup_steps=warmup_steps)
