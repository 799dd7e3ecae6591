"""Multi-host start-up and the device mesh.

The same program runs on a laptop CPU, a GPU box and a TPU pod: what changes is only how many
processes there are and how the mesh is shaped, both of which come from the config or the launcher's
environment.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

def maybe_initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                                 process_id: int = -1) -> bool:
    """Calls `jax.distributed.initialize` when this is one process of several.

    Explicit arguments win, then the EOJAX_* variables the local multi-process launcher sets, then the
    cluster's own environment (Slurm, TPU pod, ...), which jax detects itself. Must run before any
    device is touched. Returns whether a multi-process runtime was started.
    """
    coordinator_address = coordinator_address or os.environ.get("EOJAX_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("EOJAX_NUM_PROCESSES", "0"))
    if process_id < 0:
        process_id = int(os.environ.get("EOJAX_PROCESS_ID", "-1"))
    if jax.distributed.is_initialized():
        return True
    if coordinator_address:
        if num_processes <= 0 or process_id < 0:
            raise ValueError(
                "distributed.coordinator_address is set, so distributed.num_processes and "
                f"distributed.process_id must be too (got {num_processes}, {process_id})")
        # Cross-process collectives between CPU devices need gloo; the setting is ignored on GPU/TPU.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        return True
    if _in_managed_cluster():
        jax.distributed.initialize()  # Slurm / TPU pod: jax reads the cluster's environment.
        return True
    return False


def _in_managed_cluster() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
    return slurm or tpu_pod


def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Resolves one -1 in `axes` (name, size) pairs to 'the rest of the devices'."""
    names = tuple(name for name, _ in axes)
    sizes = [int(size) for _, size in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"config.mesh names an axis twice: {names}")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh may contain at most one -1, got {tuple(axes)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh sizes must be positive or -1, got {tuple(axes)}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh {tuple(axes)}: {num_devices} devices are not divisible by {fixed}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {tuple(axes)} needs {math.prod(sizes)} devices, "
                         f"but {num_devices} are available")
    return names, tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all devices (of all processes) with GSPMD ('Auto') axes.

    jax.make_mesh orders devices so that the last axes are the fastest interconnect, which is where
    tensor parallelism ('model') belongs.
    """
    devices = list(devices) if devices is not None else jax.devices()
    names, sizes = mesh_shape(axes, len(devices))
    auto = (AxisType.Auto,) * len(names)
    if devices == jax.devices():
        mesh = jax.make_mesh(sizes, names, axis_types=auto)
    else:
        mesh = Mesh(np.asarray(devices).reshape(sizes), names, axis_types=auto)
    logging.info("mesh %s over %d devices (%d processes)", dict(zip(names, sizes)), len(devices),
                 jax.process_count())
    return mesh
