"""Families as tasks: `get(config)` returns the task named by `config.task`."""
from __future__ import annotations

import importlib

from eojax.tasks.base import NotApplicableError, Task

_TASKS = {
    "mae": "eojax.tasks.mae:MAETask",
    "group_mae": "eojax.tasks.group_mae:GroupMAETask",
    "seg": "eojax.tasks.seg:SegTask",
    "vsat": "eojax.tasks.vsat:VSatTask",
    "diffusion": "eojax.tasks.diffusion:DiffusionTask",
    "geo": "eojax.tasks.geo:GeoTask",
}


def get(config) -> Task:
    name = config.task
    if name not in _TASKS:
        raise ValueError(f"config.task={name!r} is unknown; known tasks: {sorted(_TASKS)}")
    module, cls = _TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)(config)


__all__ = ["get", "Task", "NotApplicableError"]
