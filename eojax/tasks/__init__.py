"""Families as tasks: `get(config, spec)` returns the core of the family named by `config.task`,
`make_input(config)` its input stage. Each family lives in its own package (eojax/<family>/); one
line here names its task class, which names its Input and its plug-ins."""
from __future__ import annotations

import importlib

from eojax.tasks.base import (DataSpec, Input, NotApplicableError, Task, load_pretrained_parts, plugin,
                              require_plugin)

_TASKS = {
    "mae": "eojax.mae.task:MAETask",
    "satmae": "eojax.mae.satmae_task:SatMAETask",  # SatMAE++ and GRID-MAE (configs/satmae.py, gridmae.py)
    "seg": "eojax.seg.task:SegTask",
    "vsat": "eojax.vsat.context:ContextTask",  # configs/vsat.py; mode=great: the GReaT text rows
    "vsat_great": "eojax.vsat.task:VSatTask",
    "diffusion": "eojax.diffusion.task:DiffusionTask",
    "prompt_writer": "eojax.diffusion.prompt_writer:PromptWriterTask",  # the diffusion project's LoRA prompt LM
    "geo": "eojax.geo.task:GeoTask",
    "classify": "eojax.classify.task:ClassifyTask",
}


# Earlier names, still accepted in config files.
_ALIASES = {"group_mae": "satmae"}


def task_class(config) -> type[Task]:
    name = _ALIASES.get(config.task, config.task)
    if name not in _TASKS:
        raise ValueError(f"config.task={name!r} is unknown; known tasks: {sorted(_TASKS)}")
    module, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_input(config) -> Input:
    """The input stage of config.task: reads the data, states the DataSpec, makes the iterators."""
    cls = task_class(config)
    cls.check_config(config)
    return cls.input_class(config)


def get(config, spec: DataSpec) -> Task:
    """The core of config.task, built from the config and the input's DataSpec alone."""
    return task_class(config)(config, spec)


__all__ = ["get", "make_input", "task_class", "plugin", "require_plugin", "load_pretrained_parts", "DataSpec",
           "Input", "Task", "NotApplicableError"]
