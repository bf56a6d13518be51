"""Jitted multimodal KV-cache sampler: one prefill per prompt, n samples, `lax.while_loop` decode.

The prefill is the model's full forward (`qwen3_vl.apply`, layers under scan) returning each
layer's keys and values; decoding (`sampling.decode`) runs one token per row per step through
unrolled layers against a per-layer cache carried in the loop and written in place.

Memory while sampling B prompts x n samples (N = B * n rows, S = T_prompt + max_new_tokens
slots per row, s = bytes per element of the compute dtype):
    KV cache        2 * L * KV * hd * s * N * S     (the prompt's keys are repeated per sample)
    params          as placed (e.g. sharded by parallel.shard_params)
    decode weights  one more copy of the decoder layers, L * (D * (H + 2 KV) * hd + H * hd * D
                    + 3 * D * I) * s, plus V * D * s for an untied head (`decode.decode_weights`)
    transients      prefill activations (float32 attention scores H * T^2 * 4 bytes per prompt
                    and layer without a flash kernel), the prompt's keys and values while they
                    are copied into the cache, logits N * V * 4.

Qwen3-VL-4B and -8B both have L = 36, KV = 8, hd = 128: in bf16 2*36*8*128*2 B = 144 KiB per
token slot, so one prompt x 8 samples x (4096 prompt + 4096 response) = 65,536 slots = 9.0 GiB.
Per chip, params and decode weights sharded over all chips, 1 GiB kept for transients:

                    params  decode copy  cache budget  prompts (x8 samples)  token slots
    4B  v4-8  (4 x 32 GiB)  2.05    1.69     27.3 GiB      3 per chip, 12 per host   198k
    4B  v5e-8 (8 x 16 GiB)  1.02    0.85     13.1 GiB      1 per chip,  8 per host    96k
    8B  v4-8  (4 x 32 GiB)  4.10    3.52     23.4 GiB      2 per chip,  8 per host   170k
    8B  v5e-8 (8 x 16 GiB)  2.05    1.76     11.2 GiB      1 per chip,  8 per host    81k

(4B = 4.4B params, tied head; 8B = 8.8B params, untied head; GiB = 2^30 B.) 4B on v4 at 3 per
chip leaves ~0.3 GiB: the 4096-token prefill's transients (2 GiB of scores per prompt and
layer in float32, 0.56 GiB of prompt keys/values per prompt) need a flash-attention kernel or
2 prompts per chip. Sharing the prompt's cache across the n samples instead of repeating it
would cut a prompt to (4096 + 8 * 4096) slots = 5.1 GiB. With FSDP-sharded params every decode
step all-gathers each layer's weights; a (data, tensor) mesh avoids that for long rollouts.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax import parallel
from vlcal_jax.models import qwen3_vl
from vlcal_jax.models.config import ModelConfig
from vlcal_jax.sampling import decode, select

log = logging.getLogger(__name__)

DEFAULT_LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


class SampleOutput(NamedTuple):
    """tokens int32 [B*n, M] (pad after EOS); logprobs [B*n, M] of each token under the sampling
    distribution (temperature / top-k / top-p applied; 0 for greedy); policy_logprobs [B*n, M]
    under the untempered policy; lengths int32 [B*n] (EOS included); finished bool [B*n].
    Rows of one prompt are adjacent: prompt g owns rows g*n .. g*n+n-1."""

    tokens: jax.Array
    logprobs: jax.Array
    policy_logprobs: jax.Array
    lengths: jax.Array
    finished: jax.Array


def _rows_constraint(mesh, tree):
    """Splits the leading (row) axis of every array in `tree` over the mesh's batch axes."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, parallel.batch_sharding(mesh, a.ndim)), tree)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "n", "greedy", "top_k", "eos_token_ids",
                                             "pad_token_id", "use_top_p", "suppress_token_ids", "mesh"))
def generate_from_inputs(config: ModelConfig, params, inputs: qwen3_vl.ModelInputs, rng, temperature, top_p, *,
                         max_new_tokens: int, n: int, greedy: bool, top_k: int, eos_token_ids: tuple[int, ...],
                         pad_token_id: int, use_top_p: bool = True, suppress_token_ids: tuple[int, ...] = (),
                         mesh=None) -> SampleOutput:
    """The whole rollout as one compiled program (see `generate` for the arguments). With a
    `mesh`, rows (caches, tokens, log-probs) stay split over its ("data", "fsdp") axes."""
    batch, prompt_len = inputs.input_ids.shape
    rows = batch * n
    total = prompt_len + max_new_tokens
    hidden, kv = qwen3_vl.apply(config, params, inputs, return_hidden=True, return_kv=True)
    last_logits = qwen3_vl.logits_from_hidden(config, params, hidden[:, -1])  # [B, V]
    weights = decode.decode_weights(config, params)
    cache = _rows_constraint(mesh, decode.prefill_cache(kv, n, max_new_tokens, config.compute_dtype))
    prompt_keys = jnp.pad(jnp.repeat(inputs.attention_mask > 0, n, axis=0), [(0, 0), (0, max_new_tokens)])
    next_position = jnp.repeat(inputs.next_position, n)
    eos = jnp.asarray(eos_token_ids, jnp.int32)

    def choose(logits, key):
        return select.choose(logits, key, greedy, temperature, top_k, top_p, use_top_p, suppress_token_ids)

    rng, key = jax.random.split(rng)
    token, slp, plp = choose(jnp.repeat(last_logits, n, axis=0), key)
    tokens = jnp.full((rows, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    sample_lps = jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(slp)
    policy_lps = jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(plp)
    done = jnp.isin(token, eos)
    lengths = jnp.ones((rows,), jnp.int32)
    key_index = jnp.arange(total)[None, :]

    def cond(state):
        step, done = state[0], state[6]
        return (step < max_new_tokens - 1) & ~jnp.all(done)

    def body(state):
        step, token, tokens, sample_lps, policy_lps, cache, done, lengths, rng = state
        write = prompt_len + step  # cache slot of `token`, the newest sampled token
        valid = prompt_keys | (key_index >= prompt_len) & (key_index <= write)
        logits, cache = decode.decode_step(config, weights, token, next_position + step, valid, cache, write)
        rng, key = jax.random.split(rng)
        token, slp, plp = choose(logits, key)
        active = ~done
        token = jnp.where(active, token, pad_token_id)
        tokens = tokens.at[:, step + 1].set(token)
        sample_lps = sample_lps.at[:, step + 1].set(jnp.where(active, slp, 0.0))
        policy_lps = policy_lps.at[:, step + 1].set(jnp.where(active, plp, 0.0))
        lengths = lengths + active.astype(jnp.int32)
        done = done | (active & jnp.isin(token, eos))
        return step + 1, token, tokens, sample_lps, policy_lps, cache, done, lengths, rng

    state = (jnp.int32(0), token, tokens, sample_lps, policy_lps, cache, done, lengths, rng)
    state = jax.lax.while_loop(cond, body, state)
    _, _, tokens, sample_lps, policy_lps, _, done, lengths, _ = state
    return SampleOutput(*_rows_constraint(mesh, (tokens, sample_lps, policy_lps, lengths, done)))


def bucket_length(length: int, buckets=DEFAULT_LENGTH_BUCKETS) -> int:
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"prompt length {length} exceeds the largest length bucket {buckets[-1]}; "
                     "raise max_prompt_length buckets or shorten the prompt")


def left_pad(input_ids, attention_mask, length: int, pad_token_id: int):
    """Left-pads [B, T] arrays to [B, length]."""
    extra = length - input_ids.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad length {input_ids.shape[1]} down to {length}")
    ids = np.pad(np.asarray(input_ids), ((0, 0), (extra, 0)), constant_values=pad_token_id)
    return ids, np.pad(np.asarray(attention_mask), ((0, 0), (extra, 0)))


def place_inputs(inputs: qwen3_vl.ModelInputs, mesh) -> qwen3_vl.ModelInputs:
    """Puts the batch-major arrays of `inputs` split over the mesh's ("data", "fsdp") axes and
    the vision inputs replicated."""
    shards = int(np.prod([mesh.shape[axis] for axis in parallel.BATCH]))
    batch = inputs.input_ids.shape[0]
    if batch % shards:
        raise ValueError(f"batch of {batch} prompts does not split over the mesh's {shards} data x fsdp shards; "
                         f"pass a multiple of {shards} prompts")

    def put(a, axis=0):
        return jax.device_put(a, parallel.batch_sharding(mesh, np.ndim(a), axis))

    vision = None if inputs.vision is None else jax.device_put(inputs.vision, parallel.replicated(mesh))
    return inputs._replace(input_ids=put(inputs.input_ids), attention_mask=put(inputs.attention_mask),
                           position_ids=put(inputs.position_ids, 1), next_position=put(inputs.next_position),
                           image_index=put(inputs.image_index), vision=vision)


def generate(config: ModelConfig, params, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, n: int = 1,
             rng=None, eos_token_ids=(), pad_token_id: int = 0, suppress_token_ids=(),
             length_buckets=DEFAULT_LENGTH_BUCKETS, patch_bucket: int | None = None, mesh=None) -> SampleOutput:
    """Samples `n` continuations of each processor-format prompt (see models.prepare_inputs).

    temperature == 0 is greedy. `suppress_token_ids` are never generated (e.g. the vision
    placeholders `config.image_token_id` ...: a response holding one cannot be teacher-forced,
    where such ids are image slots). Prompts are left-padded to a length bucket and patches to a
    patch bucket, so repeated calls with the same buckets reuse one compiled program. With a
    `mesh` (params already placed, e.g. by `parallel.shard_params`), prompts are split over its
    ("data", "fsdp") axes; the batch must divide into those shards.
    """
    if max_new_tokens < 1 or n < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and n={n} must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    mask = np.ones_like(np.asarray(input_ids)) if attention_mask is None else attention_mask
    length = bucket_length(np.asarray(input_ids).shape[1], length_buckets) if length_buckets else None
    if length:
        input_ids, mask = left_pad(input_ids, mask, length, pad_token_id)
    inputs = qwen3_vl.prepare_inputs(config, input_ids, mask, pixel_values, image_grid_thw, patch_bucket=patch_bucket)
    if mesh is not None:
        inputs = place_inputs(inputs, mesh)
    rng = jax.random.key(0) if rng is None else rng
    greedy = temperature == 0
    before = generate_from_inputs._cache_size()
    out = generate_from_inputs(config, params, inputs, rng, jnp.float32(temperature or 1.0), jnp.float32(top_p),
                               max_new_tokens=max_new_tokens, n=n, greedy=greedy, top_k=int(top_k),
                               eos_token_ids=tuple(int(e) for e in eos_token_ids), pad_token_id=pad_token_id,
                               use_top_p=top_p < 1.0,
                               suppress_token_ids=tuple(sorted(int(t) for t in suppress_token_ids)), mesh=mesh)
    if generate_from_inputs._cache_size() > before:
        log.info("compiled generate: batch=%d length=%d patches=%s n=%d max_new_tokens=%d (%d programs)",
                 inputs.input_ids.shape[0], inputs.input_ids.shape[1],
                 None if inputs.vision is None else inputs.vision.pixel_values.shape[0], n, max_new_tokens,
                 generate_from_inputs._cache_size())
    return out


def compile_count() -> int:
    """How many generate programs have been compiled in this process."""
    return generate_from_inputs._cache_size()
