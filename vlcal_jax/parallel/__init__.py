"""Mesh, partition rules, multi-host start-up."""

from vlcal_jax.parallel.distributed import initialize
from vlcal_jax.parallel.sharding import (AXES, BATCH, QWEN3_VL_RULES, batch_sharding, make_mesh, param_shardings,
                                         path_str, replicated, shard_params, spec_for, unused_rules)

__all__ = ["AXES", "BATCH", "QWEN3_VL_RULES", "batch_sharding", "initialize", "make_mesh", "param_shardings",
           "path_str", "replicated", "shard_params", "spec_for", "unused_rules"]
