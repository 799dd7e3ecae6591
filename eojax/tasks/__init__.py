"""Families as tasks: `get(config)` returns the task named by `config.task`. Each family lives in its
own package (eojax/<family>/); one line here names its task class."""
from __future__ import annotations

import importlib

from eojax.tasks.base import NotApplicableError, Task

_TASKS = {
    "mae": "eojax.mae.task:MAETask",
    "satmae": "eojax.mae.satmae_task:SatMAETask",  # SatMAE++ and GRID-MAE (configs/satmae.py, gridmae.py)
    "seg": "eojax.seg.task:SegTask",
    "vsat": "eojax.vsat.task:VSatTask",
    "diffusion": "eojax.diffusion.task:DiffusionTask",
    "geo": "eojax.geo.task:GeoTask",
}


# Earlier names, still accepted in config files.
_ALIASES = {"group_mae": "satmae"}


def get(config) -> Task:
    name = _ALIASES.get(config.task, config.task)
    if name not in _TASKS:
        raise ValueError(f"config.task={name!r} is unknown; known tasks: {sorted(_TASKS)}")
    module, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config)


__all__ = ["get", "Task", "NotApplicableError"]
