"""Jitted KV-cache rollout engine."""

from vlcal_jax.sampling.engine import (SampleOutput, compile_count, generate, generate_from_inputs, place_inputs)
from vlcal_jax.sampling.select import filter_logits

__all__ = ["SampleOutput", "compile_count", "filter_logits", "generate", "generate_from_inputs", "place_inputs"]
