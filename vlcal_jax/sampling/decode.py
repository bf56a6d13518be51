"""One decoding step: a new token per row through all layers against a per-layer KV cache.

The layer math is `models.text.decoder_layer`'s; only the weight layout differs. `decode_weights`
re-lays the params out once per generate call:
- one array per layer instead of slices of the stacked [L, ...] params. Inside the decode loop
  XLA:CPU materialises every per-layer slice of a stacked weight on every step (the whole
  decoder's weights copied per token); separate arrays are read in place;
- q/k/v and gate/up concatenated, so each is one matmul of [N, D];
- the output projection as [V, D] (a vocabulary-major product is the faster one on CPU).
The copy costs one extra set of decoder weights in memory while sampling (see engine docs).

The cache is a tuple of per-layer (k [N, KV, hd, S], v [N, KV, S, hd]) carried through the
sampling `while_loop` and updated in place at the write position; layers are unrolled, so no
cache slice is copied in or out of a layer scan. Keys are stored transposed so that both
attention products are plain matmuls (`layers.decode_attention`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vlcal_jax.models import layers, text
from vlcal_jax.models.config import ModelConfig


class DecodeWeights(NamedTuple):
    """embed [V, D]; layers: one dict per layer (see `decode_weights`); norm [D]; lm_head [V, D]."""

    embed: jax.Array
    layers: tuple[dict, ...]
    norm: jax.Array
    lm_head: jax.Array


def decode_weights(config: ModelConfig, params) -> DecodeWeights:
    """The text decoder's weights in decoding layout, matmul weights in the compute dtype."""
    dtype = config.compute_dtype
    stacked = params["text"]["layers"]

    def concat(parts, key):
        if all(key in part for part in parts):
            return jnp.concatenate([part[key] for part in parts], axis=-1).astype(dtype)
        return None

    def layer(i):
        p = jax.tree.map(lambda a: a[i], stacked)
        attn, mlp = p["attn"], p["mlp"]
        qkv = [attn["q_proj"], attn["k_proj"], attn["v_proj"]]
        return {
            "input_norm": p["input_norm"], "post_norm": p["post_norm"],
            "q_norm": attn["q_norm"], "k_norm": attn["k_norm"],
            "qkv": concat(qkv, "kernel"), "qkv_bias": concat(qkv, "bias"),
            "o_proj": attn["o_proj"]["kernel"].astype(dtype), "o_bias": attn["o_proj"].get("bias"),
            "gate_up": concat([mlp["gate_proj"], mlp["up_proj"]], "kernel"),
            "down": mlp["down_proj"]["kernel"].astype(dtype),
        }

    embed = params["text"]["embed"]
    lm_head = embed if config.tie_word_embeddings else params["lm_head"]["kernel"].T
    return DecodeWeights(embed, tuple(layer(i) for i in range(config.text.num_hidden_layers)),
                         params["text"]["norm"], lm_head.astype(dtype))


def decode_layer(config: ModelConfig, w: dict, x, cos, sin, valid, k_cache, v_cache, write_index):
    """x [N, D]; cos/sin [N, hd]; valid bool [N, S]; k_cache [N, KV, hd, S], v_cache [N, KV, S, hd]
    with this token's key/value written at `write_index` (scalar). Returns (x, k_cache, v_cache)."""
    tc = config.text
    rows, hd = x.shape[0], tc.head_dim
    q_width, kv_width = tc.num_attention_heads * hd, tc.num_key_value_heads * hd
    h = layers.rms_norm(x, w["input_norm"], tc.rms_norm_eps)
    qkv = layers.linear(h, w["qkv"], w["qkv_bias"])
    q, k, v = jnp.split(qkv, [q_width, q_width + kv_width], axis=-1)
    q, k = text.qk_norm_rotary(tc, w, q.reshape(rows, -1, hd), k.reshape(rows, -1, hd), cos, sin)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k[..., None].astype(k_cache.dtype), (0, 0, 0, write_index))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.reshape(rows, -1, 1, hd).astype(v_cache.dtype),
                                           (0, 0, write_index, 0))
    out = layers.decode_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), valid, hd**-0.5)
    x = x + layers.linear(out.reshape(rows, -1), w["o_proj"], w["o_bias"])
    h = layers.rms_norm(x, w["post_norm"], tc.rms_norm_eps)
    gate, up = jnp.split(layers.linear(h, w["gate_up"]), 2, axis=-1)
    x = x + layers.linear(layers.activation(tc.hidden_act)(gate) * up, w["down"])
    return x, k_cache, v_cache


def decode_step(config: ModelConfig, weights: DecodeWeights, tokens, positions, valid, cache, write_index):
    """tokens/positions int [N]; valid bool [N, S]; cache: per-layer (k [N, KV, hd, S], v [N, KV, S, hd]).
    Returns (logits float32 [N, V], cache with this step written at `write_index`)."""
    tc = config.text
    x = weights.embed[tokens].astype(config.compute_dtype)
    # generated tokens are text: the three MRoPE axes share one position
    cos, sin = text.mrope_cos_sin(jnp.broadcast_to(positions[None, :, None], (3,) + positions.shape + (1,)), tc)
    cos, sin = cos[:, 0], sin[:, 0]
    new_cache = []
    for w, (k_cache, v_cache) in zip(weights.layers, cache):
        x, k_cache, v_cache = decode_layer(config, w, x, cos, sin, valid, k_cache, v_cache, write_index)
        new_cache.append((k_cache, v_cache))
    x = layers.rms_norm(x, weights.norm, tc.rms_norm_eps)
    logits = jnp.einsum("nd,vd->nv", x, weights.lm_head, preferred_element_type=jnp.float32)
    return logits, tuple(new_cache)


def prefill_cache(kv, n: int, max_new_tokens: int, dtype):
    """Prefill (k, v) [L, B, KV, T, hd] -> per-layer (k [B*n, KV, hd, S], v [B*n, KV, S, hd]),
    S = T + max_new_tokens, each prompt's rows repeated n times (adjacent), new slots zero."""
    def one(a, time_axis):
        pad = [(0, 0)] * 4
        pad[time_axis] = (0, max_new_tokens)
        return jnp.pad(jnp.repeat(a.astype(dtype), n, axis=0), pad)

    return tuple((one(kv[0][i].swapaxes(2, 3), 3), one(kv[1][i], 2)) for i in range(kv[0].shape[0]))
