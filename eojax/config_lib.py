"""Shared pieces of the config files in configs/, and the checks a run's config and workdir pass
before anything runs (`validate`, `check_workdir`, `disk_check`).

They live in the package (not in configs/common.py as DESIGN.md sketched) so that a config file can
import them from any working directory once eojax is installed; see docs/architecture.md.
"""
from __future__ import annotations

import ast
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from typing import Any, Iterator

import ml_collections

from eojax import errors

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
    c.restart_from_scratch_if_corrupt = False  # when no checkpoint of the workdir is intact
    c.init_from = ""  # a workdir or checkpoint folder whose params start this run
    c.best_metric = ""  # an eval metric (e.g. "miou"): keep the best params in <workdir>/best, test on them
    c.best_mode = "max"  # or "min"
    # Kernel set (models/layers.py): 'auto' = the XLA:CPU-tuned custom VJPs on CPU, plain jax/flax
    # autodiff elsewhere; 'plain' / 'xla_cpu' force one. Parameters are the same under each.
    c.kernels = "auto"
    c.peak_tflops = 0.0  # for MFU; 0 = a known device peak, or a measured matmul rate on CPU
    c.progress_bar = True
    # The family's pictures at every eval too (PNG in the workdir, TensorBoard and W&B images), not only
    # at the end. Diffusion samples max_classes x samples_per_class images for them each time.
    c.eval_pictures = True
    # Weights & Biases (pip install wandb; never required): project '' = off; mode 'online', 'offline'
    # (written under <workdir>/wandb, `wandb sync` later) or 'disabled'; name '' = the workdir's name.
    c.wandb = ml_collections.ConfigDict({"project": "", "entity": "", "name": "", "mode": "online"})
    c.lora = lora_defaults()
    c.mesh = (("data", -1), ("fsdp", 1), ("model", 1))
    c.sharding_rules = DEFAULT_RULES
    c.distributed = ml_collections.ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1})
    return c


def lora_defaults() -> ml_collections.ConfigDict:
    """`config.lora`: low-rank adapters (eojax/lora.py) on the kernels whose parameter paths `targets`
    matches, the base frozen; '' = off (full training)."""
    return ml_collections.ConfigDict(dict(
        targets="",    # regex (re.search) over parameter paths, e.g. 'c_attn' (GPT-2's fused q/k/v projection)
        rank=16,       # r: A is (d_in, r), B (r, d_out)
        alpha=32.0,    # the kernel's update is A @ B * alpha / rank
        dropout=0.0,   # on the adapter input, in training (koyacolab/aispace: 0.05); nn.Dense / HeadDense layers
    ))


def image_input_defaults(**overrides) -> ml_collections.ConfigDict:
    """`config.input` of the image families: GeoTIFF windows read on the fly (eojax.data.pipeline)."""
    c = ml_collections.ConfigDict(dict(
        paths=(),  # GeoTIFFs (local or s3:// gs:// https://), globs, '{band}' templates, STAC items (.json),
        # NetCDF / Zarr grids (.nc, .zarr); empty = synthetic default scenes
        crs=ml_collections.config_dict.placeholder(str),  # CRS of NetCDF / Zarr grids without a CF grid mapping
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
        valid_range=(),  # (lo, hi) every valid pixel lies in (None: open end); (): |x| <= 1.8e19 for float rasters
    ))
    c.update(overrides)
    return c


def export_defaults() -> ml_collections.ConfigDict:
    """`config.export` of the MAE families: `eojax export`'s grid of windows over each raster."""
    return ml_collections.ConfigDict(dict(
        stride=0,          # pixels between window starts; 0 = the window: windows tile the raster, no gap
        allow_gaps=False,  # a stride larger than the window is refused unless True (ground skipped on purpose)
    ))


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


# Trainer keys that count steps or things: 0 is not meaningful for these ...
_POSITIVE = ("total_steps", "batch_size", "log_every", "keep_checkpoints")
# ... and 0 means "off" for these: eval and checkpoint only at the end, eval on the whole eval set.
_NON_NEGATIVE = ("eval_every", "checkpoint_every", "eval_steps")


WANDB_MODES = ("online", "offline", "disabled")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises errors.ConfigError naming the first trainer key with an impossible value. Cheap (no jax,
    no data): the command line calls it before anything runs. The families check their own keys in
    their task's `check_config`, the optimizer its own in `optim.build`."""
    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            raise errors.ConfigError(f"config.{key}={config[key]!r} is invalid: {allowed}")

    for key in _POSITIVE:
        if key in config:
            need(_is_int(config[key]) and config[key] >= 1, key, "must be an integer >= 1")
    for key in _NON_NEGATIVE:
        if key in config:
            need(_is_int(config[key]) and config[key] >= 0, key, "must be an integer >= 0 (0 = off)")
    if config.get("best_metric"):
        need(config.get("best_mode") in ("max", "min"), "best_mode", "must be 'max' or 'min'")
    if config.get("wandb") and config.wandb.get("project"):
        need(config.wandb.get("mode") in WANDB_MODES, "wandb", f"mode must be one of {WANDB_MODES}")
        if sys.modules.get("wandb") is None and importlib.util.find_spec("wandb") is None:
            raise errors.ConfigError(f"config.wandb.project={config.wandb.project!r} needs the wandb package, "
                                     "which is not installed (pip install wandb), or wandb.project=''")
    if "mesh" in config:
        mesh = config.mesh
        need(isinstance(mesh, (tuple, list)) and len(mesh) > 0
             and all(isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str) and _is_int(a[1])
                     and (a[1] >= 1 or a[1] == -1) for a in mesh),
             "mesh", "must be ((axis name, size), ...) with sizes >= 1 or -1 (the rest of the devices)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_workdir(workdir: str, *, create: bool) -> None:
    """Raises errors.WorkdirError unless `workdir` is a directory; with `create` (a run to train) it
    is made when missing and must be writable, without (eval, verify: reading a run, perhaps an
    archived read-only one) it must exist. Remote paths (gs://...) are left to the storage layer."""
    if "://" in workdir:
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise errors.WorkdirError(f"--workdir={workdir} is a file, not a directory")
    if not create:
        if not os.path.isdir(workdir):
            raise errors.WorkdirError(f"--workdir={workdir} does not exist")
        return
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise errors.WorkdirError(f"cannot create --workdir={workdir}: {e.strerror}") from e
    try:  # a real write: os.access misjudges read-only mounts, ACLs and root squash
        with tempfile.TemporaryFile(dir=workdir, prefix=".eojax-write-test"):
            pass
    except OSError as e:
        raise errors.WorkdirError(f"--workdir={workdir} is not writable: {e.strerror}") from e


def disk_check(workdir: str, bytes_per_checkpoint: int, keep: int) -> None:
    """Free space of `workdir`'s filesystem against its checkpoints: `keep` of them plus the one being
    written before the oldest is deleted, less what the run's checkpoints already hold. Raises
    errors.WorkdirError when not even one more checkpoint fits; warns when `keep` + 1 may not."""
    if "://" in workdir:
        return
    free = shutil.disk_usage(workdir).free
    held = _tree_bytes(os.path.join(workdir, "checkpoints"))
    wanted = max(bytes_per_checkpoint * (keep + 1) - held, bytes_per_checkpoint)
    if free < bytes_per_checkpoint:
        raise errors.WorkdirError(
            f"--workdir={workdir}: {_size(free)} free, but one checkpoint needs about "
            f"{_size(bytes_per_checkpoint)}; free space or use another workdir")
    if free < wanted:
        logging.warning("%s: %s free; config.keep_checkpoints=%d checkpoints of about %s each may need %s",
                        workdir, _size(free), keep, _size(bytes_per_checkpoint), _size(wanted))


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # deleted meanwhile (Orbax removing an old step)
                pass
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, value, type name) of every leaf of `config`, in key order; a placeholder (a typed
    field that is still None) is named by its type."""
    for key in sorted(config.keys()):
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_items(value, f"{prefix}{key}.")
            continue
        kind = type(value).__name__
        if value is None:
            field_type = config.get_ref(key).get_type()
            kind = f"{field_type.__name__} or None" if field_type not in (None, type(None)) else "None"
        yield f"{prefix}{key}", value, kind
