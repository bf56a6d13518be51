"""Mesh, partition rules, activation constraints, multi-host start-up."""

from vlcal_jax.parallel.activations import LOGICAL, axes, constrain, divides, mesh_of, shards, use_mesh
from vlcal_jax.parallel.distributed import initialize
from vlcal_jax.parallel.sharding import (AXES, BATCH, QWEN3_VL_RULES, batch_sharding, make_mesh, param_shardings,
                                         path_str, replicated, shard_params, spec_for, unused_rules)

__all__ = ["AXES", "BATCH", "LOGICAL", "axes", "QWEN3_VL_RULES", "batch_sharding", "constrain", "divides", "initialize",
           "make_mesh", "mesh_of", "param_shardings", "path_str", "replicated", "shard_params", "shards",
           "spec_for", "unused_rules", "use_mesh"]
