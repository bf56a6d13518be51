"""Qwen3 text decoder with interleaved MRoPE and DeepStack injection, layers under `lax.scan`.

The same layer function serves the full (teacher-forced / prefill) pass and single-step
decoding against a preallocated KV cache, so cached decoding is the full forward by
construction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax import parallel
from vlcal_jax.models import attention, layers
from vlcal_jax.models.config import ModelConfig, TextConfig


class KVCache(NamedTuple):
    """Static-shape cache: k/v [L, B, KV, S, head_dim] ("head" layout) or [L, B, S, KV, head_dim]
    ("token"), valid [B, S] bool (keys that exist)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    layout: str = "head"


def mrope_axis(config: TextConfig) -> np.ndarray:
    """Which position axis (0=t, 1=h, 2=w) drives each of the head_dim/2 rotary frequencies."""
    axis = np.zeros(config.head_dim // 2, np.int32)
    for dim, offset in ((1, 1), (2, 2)):
        axis[offset:config.mrope_section[dim] * 3:3] = dim
    return axis


def mrope_cos_sin(position_ids, config: TextConfig):
    """position_ids int [3, B, T] -> cos, sin float32 [B, T, head_dim] (interleaved MRoPE)."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, half]
    axis = jnp.asarray(mrope_axis(config))
    freqs = jnp.take_along_axis(freqs, jnp.broadcast_to(axis, (1,) + freqs.shape[1:3] + (half,)), axis=0)[0]
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def decoder_layer(config: TextConfig, p, x, cos, sin, key_valid, kv=None, write_index=None, layer=None, *,
                  attention_impl: str = "xla", kv_layout: str = "head"):
    """One layer. x [B, T, D]; key_valid bool [B, S] (False: a padding key, or a cache slot not yet written).

    Without `kv`: causal self-attention over this call's own tokens (S == T); returns
    (x, (k, v)) with k/v head-major [B, KV, T, hd].
    With `kv=(k_stack, v_stack)`, the whole stacked cache [L, B, KV, S, hd], and a scalar `layer`:
    this call's k/v are written at [layer, :, :, write_index], attention runs over layer
    `layer`'s cache, and the updated stacks are returned, so a decode step writes T positions of
    the cache instead of copying every layer's cache in and out of the layer scan. With
    `layer=None`, `kv` is this layer's own cache [B, KV, S, hd] (the unrolled decode loop).
    `write_index` is a scalar (every row writes at the same position) or, for T = 1, int [B]
    (row b writes at its own position: the continuous engine's slots). `kv_layout="token"`: the
    cache is [.., B, S, KV, hd] (`write_cache`). Every valid key is visible to every query of the
    call (decoding calls it with T = 1).
    """
    batch, length, _ = x.shape
    hd = config.head_dim
    # the residual stream's rows over the batch axes (left to itself, XLA ran every row on every chip)
    x = parallel.constrain(x, "batch", None, None)
    h = layers.rms_norm(x, p["input_norm"], config.rms_norm_eps)
    attn = p["attn"]
    q = layers.linear(h, attn["q_proj"]["kernel"], attn["q_proj"].get("bias")).reshape(batch, length, -1, hd)
    k = layers.linear(h, attn["k_proj"]["kernel"], attn["k_proj"].get("bias")).reshape(batch, length, -1, hd)
    v = layers.linear(h, attn["v_proj"]["kernel"], attn["v_proj"].get("bias")).reshape(batch, length, -1, hd)
    q, k, v = (parallel.constrain(a, "batch", None, "tensor", None) for a in (q, k, v))  # heads over "tensor"
    q = layers.apply_rotary(layers.rms_norm(q, attn["q_norm"], config.rms_norm_eps), cos, sin, q.dtype)
    k = layers.apply_rotary(layers.rms_norm(k, attn["k_norm"], config.rms_norm_eps), cos, sin, k.dtype)
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    if kv is not None:
        token_major = kv_layout == "token"
        new_kv = tuple(write_cache(c, x, layer, write_index, token_major) for c, x in zip(kv, (k, v)))
        k_all, v_all = (c if layer is None else jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in new_kv)
        k_all, v_all = ((c.swapaxes(1, 2) if token_major else c).astype(q.dtype) for c in (k_all, v_all))
        out = attention.attention(q, k_all, v_all, hd**-0.5, key_valid, causal=False, impl=attention_impl)
    else:
        new_kv = (k, v)
        out = attention.attention(q, k, v, hd**-0.5, key_valid, causal=True, impl=attention_impl)
    out = out.reshape(batch, length, -1)
    x = x + layers.linear(out, attn["o_proj"]["kernel"], attn["o_proj"].get("bias"))
    h = layers.rms_norm(x, p["post_norm"], config.rms_norm_eps)
    mlp = p["mlp"]
    gate, up = layers.linear(h, mlp["gate_proj"]["kernel"]), layers.linear(h, mlp["up_proj"]["kernel"])
    gate, up = (parallel.constrain(a, "batch", None, "tensor") for a in (gate, up))  # the inner dim over "tensor"
    if config.hidden_act == "silu":
        inner = layers.swiglu(gate, up)
    else:
        inner = layers.activation(config.hidden_act)(gate) * up
    h = layers.linear(inner, mlp["down_proj"]["kernel"])
    return x + h, new_kv


def write_cache(cache, new, layer, write_index, token_major: bool = False):
    """`new` [B, KV, T, hd] written into `cache` ([L, B, KV, S, hd] at layer `layer`, or one
    layer's [B, KV, S, hd] when `layer` is None; [.., B, S, KV, hd] when `token_major`) at
    position `write_index`: a scalar (one dynamic_update_slice) or int [B] with T = 1 (a scatter,
    one position per row).

    Token-major is how TPU lays a decode cache out (one token's [KV, hd] is one tile, so a step
    writes whole tiles); a cache that crosses programs (the continuous engine's slots) is kept in
    it, since an argument in another layout is copied into it at every call."""
    new = new.astype(cache.dtype)
    if token_major:
        new = new.swapaxes(1, 2)  # [B, T, KV, hd]
    lead = () if layer is None else (layer,)
    if jnp.ndim(write_index) == 0:
        start = (0, write_index, 0, 0) if token_major else (0, 0, write_index, 0)
        return jax.lax.dynamic_update_slice(cache, new if layer is None else new[None], lead + start)
    rows = jnp.arange(new.shape[0])
    if token_major:
        return cache.at[lead + (rows, write_index)].set(new[:, 0], unique_indices=True)
    return cache.at[lead + (rows, slice(None), write_index)].set(new[:, :, 0], unique_indices=True)


def embed_tokens(config: ModelConfig, params, input_ids, image_index=None, image_embeds=None):
    """Token embeddings [B, T, D]; image pads take row image_index [B, T] of image_embeds [N, D]."""
    # the table is split over (vocab, hidden): its hidden dim is gathered (FSDP) before the lookup,
    # since rows looked up hidden-split cannot reach the batch split but by replicating them
    table = parallel.constrain(params["text"]["embed"].astype(config.compute_dtype), "tensor", None)
    x = parallel.constrain(table[input_ids], "batch", None, None)
    if image_embeds is None:
        return x, None
    is_image = input_ids == config.image_token_id
    x = jnp.where(is_image[..., None], image_embeds.astype(x.dtype)[image_index], x)
    return x, (is_image, image_index)


def lm_head_kernel(config: ModelConfig, params):
    """[D, V] output projection (the transposed embedding when tied)."""
    if config.tie_word_embeddings:
        return params["text"]["embed"].T
    return params["lm_head"]["kernel"]


def unstack_layers(params):
    """`params` with the stacked per-layer text weights [L, ...] split into a tuple of L layer dicts,
    for the unrolled decode loop of `decoder` (a cache of per-layer arrays). Inside a decode
    loop, a layer scan slices each layer's weights and cache out of the stacks every step, and
    XLA:CPU copies those slices before its matmuls read them (the whole model's weights and
    cache once more per token); split once before the loop, the matmuls read them in place."""
    stacked = params["text"]["layers"]
    count = jax.tree.leaves(stacked)[0].shape[0]
    split = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(count))
    return {**params, "text": {**params["text"], "layers": split}}


def decoder(config: ModelConfig, params, x, cos, sin, key_valid, *, image_slots=None, deepstack=None,
            cache: KVCache | None = None, write_index=None, return_kv: bool = False):
    """Runs all layers (scan) and the final norm. x [B, T, D] -> (hidden [B, T, D], kv or None);
    key_valid bool [B, S]: the attention mask of the tokens (S == T), or of the cache.
    Decoding with `cache`: k/v stacked [L, B, KV, S, hd] (a layer scan), or tuples of L
    per-layer arrays [B, KV, S, hd] with params from `unstack_layers` (layers unrolled).

    DeepStack: after layer i < n_ds, deepstack[i] is added at the image positions
    (`image_slots` = (is_image [B, T], index [B, T]) from `embed_tokens`).
    """
    tc = config.text
    n_ds = 0 if deepstack is None else deepstack.shape[0]
    if n_ds:  # rows read any image's features: gathered onto every chip once, not in every layer
        deepstack = parallel.constrain(deepstack, None, None, None)

    def add_deepstack(h, i):
        if not n_ds:
            return h
        is_image, index = image_slots
        extra = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(i, n_ds - 1), keepdims=False)
        return h + jnp.where(is_image[..., None] & (i < n_ds), extra.astype(h.dtype)[index], 0)

    if cache is not None and isinstance(cache.k, (tuple, list)):  # decoding, layers unrolled (`unstack_layers`)
        if n_ds:
            raise ValueError("the unrolled decode loop takes no DeepStack features (decoded tokens are text)")
        k_out, v_out = [], []
        for p, k, v in zip(params["text"]["layers"], cache.k, cache.v):
            x, (k, v) = decoder_layer(tc, p, x, cos, sin, key_valid, (k, v), write_index,
                                      attention_impl=config.attention_impl, kv_layout=cache.layout)
            k_out.append(k)
            v_out.append(v)
        return layers.rms_norm(x, params["text"]["norm"], tc.rms_norm_eps), (tuple(k_out), tuple(v_out))

    layer_ids = jnp.arange(tc.num_hidden_layers)
    if cache is not None:  # decoding: the stacked cache rides in the carry, updated in place
        def cached_body(carry, xs):
            h, k_stack, v_stack = carry
            p, i = xs
            h, (k_stack, v_stack) = decoder_layer(tc, p, h, cos, sin, key_valid, (k_stack, v_stack), write_index, layer=i,
                                                     attention_impl=config.attention_impl, kv_layout=cache.layout)
            return (add_deepstack(h, i), k_stack, v_stack), None

        (x, k_out, v_out), _ = jax.lax.scan(cached_body, (x, cache.k, cache.v), (params["text"]["layers"], layer_ids))
        return layers.rms_norm(x, params["text"]["norm"], tc.rms_norm_eps), (k_out, v_out)

    def body(h, xs):
        p, i = xs
        h, kv = decoder_layer(tc, p, h, cos, sin, key_valid, attention_impl=config.attention_impl)
        return add_deepstack(h, i), (kv if return_kv else None)

    body = layers.rematerialized(body, config.remat, config.remat_offload)
    x, kv = jax.lax.scan(body, x, (params["text"]["layers"], layer_ids))
    x = layers.rms_norm(x, params["text"]["norm"], tc.rms_norm_eps)
    return x, kv
