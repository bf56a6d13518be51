"""Jitted KV-cache rollout engines: continuous batching (decode slots refilled as rows end) and static."""

from vlcal_jax.sampling.api import ENGINES, default_slots, generate, sample, shard_inputs
from vlcal_jax.sampling.choose import filter_logits
from vlcal_jax.sampling.engine import SampleOutput, compile_count, generate_from_inputs

__all__ = ["ENGINES", "SampleOutput", "compile_count", "default_slots", "filter_logits", "generate",
           "generate_from_inputs", "sample", "shard_inputs"]
