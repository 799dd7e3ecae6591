"""Meshes, logical-axis shardings, multi-host start-up and global batches."""
from eojax.parallel.mesh import make_mesh, maybe_initialize_distributed, mesh_shape
from eojax.parallel.sharding import (batch_axis_size, batch_sharding, global_batch_shardings,
                                     follow_params, logical_shardings, make_global_batch,
                                     normalize_rules)

__all__ = ["make_mesh", "maybe_initialize_distributed", "mesh_shape", "batch_axis_size", "batch_sharding",
           "global_batch_shardings", "follow_params", "logical_shardings", "make_global_batch", "normalize_rules"]
