"""What both engines share: the prefill of a batch of prompts and one decode step of N rows
against a preallocated KV cache.

A decode step is the model's own layer function (models.text.decoder_layer) on one token per
row, so cached decoding is the full forward by construction. Its cost beyond the matmuls is what
the layout of weights and cache makes XLA do around them; see `unroll_layers`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlcal_jax import parallel
from vlcal_jax.models import qwen3_vl, text
from vlcal_jax.models.config import ModelConfig


def unroll_layers() -> bool:
    """Whether decode loops traced now run the layers unrolled, with per-layer weights and caches
    (`text.unstack_layers`), instead of a scan over the stacks: on one CPU device (no mesh in
    context). XLA:CPU copies each layer's weights and cache out of the stacks before every decode
    step's matmuls read them (measured: a third of a step of the benchmark model). Under a mesh,
    and on TPU, the scan stays: there the per-layer slices feed the matmuls in place, FSDP
    gathers each layer's weights inside the loop (an unrolled loop may hoist every gather and hold
    the whole model per chip), and a 36-layer model compiles one layer body instead of 36."""
    return jax.sharding.get_abstract_mesh().empty and jax.default_backend() == "cpu"


def decode_params(params, unrolled: bool):
    return text.unstack_layers(params) if unrolled else params


def split_cache(stacked, unrolled: bool):
    """A stacked [L, ...] cache array -> what the decode loop carries (a tuple of L when unrolled)."""
    return tuple(stacked[i] for i in range(stacked.shape[0])) if unrolled else stacked


def cache_spec(cache, layout: str = "head"):
    """Pins a cache (stacked [L, B, KV, S, hd], [L, B, S, KV, hd] in the "token" layout, or a tuple
    of [B, KV, S, hd]) to rows over the batch axes and KV heads over "tensor" where they divide
    it, else whole (no-op without a mesh)."""
    if isinstance(cache, tuple):
        return tuple(parallel.constrain(c, "batch", _heads(c.shape[1]), None, None) for c in cache)
    if layout == "token":
        return parallel.constrain(cache, None, "batch", None, _heads(cache.shape[3]), None)
    return parallel.constrain(cache, None, "batch", _heads(cache.shape[2]), None, None)


def _heads(kv_heads: int):
    return "tensor" if parallel.divides(kv_heads, "tensor") else None


def prefill(config: ModelConfig, params, inputs: qwen3_vl.ModelInputs):
    """Vision tower + prefill of the prompts: -> (last-position logits float32 [B, V], (k, v)
    stacked [L, B, KV, T, hd] in the compute dtype)."""
    hidden, (k, v) = qwen3_vl.apply(config, params, inputs, return_hidden=True, return_kv=True)
    logits = qwen3_vl.logits_from_hidden(config, params, hidden[:, -1])
    return logits, (k.astype(config.compute_dtype), v.astype(config.compute_dtype))


def step(config: ModelConfig, params, tokens, positions, cache, key_valid, write_index, layout: str = "head"):
    """One decode step of N rows: tokens int [N] (each row's last token) at rotary positions int [N]
    (text tokens: the same on the 3 MRoPE axes) are written into `cache` (k, v) at `write_index`
    (scalar, or int [N] per row) and attend to the keys `key_valid` bool [N, S] marks, which
    must include the written one. -> (next-token logits float32 [N, V], updated cache).
    `params` and `cache` as `decode_params` / `split_cache` lay them out; `layout` the cache's
    (text.KVCache)."""
    rows = tokens.shape[0]
    x = params["text"]["embed"][tokens].astype(config.compute_dtype)[:, None]
    pos = jnp.broadcast_to(positions[None, :, None], (3, rows, 1))
    cos, sin = text.mrope_cos_sin(pos, config.text)
    hidden, (k, v) = text.decoder(config, params, x, cos, sin, key_valid,
                                  cache=text.KVCache(cache[0], cache[1], key_valid, layout), write_index=write_index)
    return qwen3_vl.logits_from_hidden(config, params, hidden[:, 0]), (cache_spec(k, layout), cache_spec(v, layout))
