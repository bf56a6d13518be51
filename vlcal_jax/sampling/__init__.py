"""Jitted KV-cache rollout engine."""

from vlcal_jax.sampling.engine import SampleOutput, compile_count, filter_logits, generate, generate_from_inputs

__all__ = ["SampleOutput", "compile_count", "filter_logits", "generate", "generate_from_inputs"]
