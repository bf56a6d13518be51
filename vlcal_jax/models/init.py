"""Random initialisation of a Qwen3-VL params pytree (for training small models from scratch)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlcal_jax.models.checkpoint import ParamSpec, param_specs
from vlcal_jax.models.config import ModelConfig


def hf_shape(config: ModelConfig, spec: ParamSpec) -> tuple[int, ...]:
    """Shape of one HF tensor of `spec` (one layer)."""
    v, t = config.vision, config.text
    dv, wide, d = v.hidden_size, v.hidden_size * v.merge_unit, t.hidden_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    path = spec.path
    if path[0] == "visual":
        if path[1] == "patch_embed":
            return (dv, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size) \
                if path[2] == "kernel" else (dv,)
        if path[1] == "pos_embed":
            return (v.num_position_embeddings, dv)
        if path[1] == "blocks":
            out_in = {"qkv": (3 * dv, dv), "proj": (dv, dv), "fc1": (v.intermediate_size, dv),
                      "fc2": (dv, v.intermediate_size)}
            if path[2] in ("norm1", "norm2"):
                return (dv,)
            shape = out_in[path[3]]
            return shape if path[4] == "kernel" else shape[:1]
        norm_width = wide if path[1] == "deepstack_mergers" else dv
        out_in = {"fc1": (wide, wide), "fc2": (v.out_hidden_size, wide)}
        if path[2] == "norm":
            return (norm_width,)
        return out_in[path[2]] if path[3] == "kernel" else out_in[path[2]][:1]
    if path[0] == "lm_head":
        return (t.vocab_size, d)
    if path[1] == "embed":
        return (t.vocab_size, d)
    if path[1] == "norm" or path[2] in ("input_norm", "post_norm"):
        return (d,)
    if path[2] == "attn":
        if path[3] in ("q_norm", "k_norm"):
            return (t.head_dim,)
        shape = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}[path[3]]
        return shape if path[4] == "kernel" else shape[:1]
    return {"gate_proj": (t.intermediate_size, d), "up_proj": (t.intermediate_size, d),
            "down_proj": (d, t.intermediate_size)}[path[3]]


def init_params(config: ModelConfig, rng: jax.Array, dtype=jnp.float32, std: float = 0.02):
    """Normal(0, std) weights, unit norm scales, zero biases (HF's `_init_weights` scheme).
    One compiled program for the whole tree (per-leaf random draws would each compile)."""
    return _init_jit(config, rng, jnp.dtype(dtype), std)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_jit(config: ModelConfig, rng: jax.Array, dtype, std: float):
    from vlcal_jax.models.checkpoint import _set, _to_ours

    params: dict = {}
    specs = param_specs(config)
    keys = jax.random.split(rng, len(specs))
    for key, spec in zip(keys, specs):
        shape = hf_shape(config, spec)
        ours = jax.eval_shape(lambda s=shape, t=spec.transform: _to_ours(jnp.zeros(s), t)).shape
        full = ((spec.layers,) if spec.layers else ()) + tuple(ours)
        leaf = spec.path[-1]
        if leaf == "bias":
            value = jnp.zeros(full, dtype)
        elif leaf in ("scale", "q_norm", "k_norm", "input_norm", "post_norm") or spec.path[-1] == "norm":
            value = jnp.ones(full, dtype)
        else:
            value = (std * jax.random.normal(key, full, jnp.float32)).astype(dtype)
        _set(params, spec.path, value)
    return params
