"""The static engine: one prefill per prompt, n samples, `lax.while_loop` decode of every row
until the batch's last one ends (sampling.continuous refills finished rows instead).

KV cache memory (per generate call, compute dtype bytes `s`):
    2 * num_layers * (B * n) * (T_prompt + max_new_tokens) * num_kv_heads * head_dim * s
e.g. Qwen3-VL-4B (36 layers, 8 KV heads, head_dim 128), bf16, one prompt x 8 samples x
(1024 + 4096) tokens: 2*36*8*5120*8*128*2 = 6.0 GB; see README "Sampling memory". Under a mesh
each chip holds 1 / (data * fsdp) of the rows (B * n padded to a multiple of that) and, where
num_kv_heads divides it, 1 / tensor of the heads.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax import parallel
from vlcal_jax.models import qwen3_vl
from vlcal_jax.models.config import ModelConfig
from vlcal_jax.sampling import choose, decode

DEFAULT_LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)

# Programs traced by the engines (`count_trace`): a jitted function's Python body runs only when
# jit traces a new signature (each completed trace is one compiled program); counting there needs
# no private jit state.
_programs_traced = 0


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


def count_trace() -> None:
    """Called at the end of each engine program's Python body: one completed trace, i.e. one
    program compiled (the line does not run when the compiled program does)."""
    global _programs_traced
    _programs_traced += 1


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "n", "greedy", "top_k", "eos_token_ids",
                                             "pad_token_id", "use_top_p"))
def generate_from_inputs(config: ModelConfig, params, inputs: qwen3_vl.ModelInputs, rng, temperature, top_p, *,
                         max_new_tokens: int, n: int, greedy: bool, top_k: int, eos_token_ids: tuple[int, ...],
                         pad_token_id: int, use_top_p: bool = True) -> SampleOutput:
    """The static engine: the whole rollout as one compiled program (see `generate` for the
    arguments). Every row decodes until the batch's last row ends. Traced under
    `parallel.use_mesh(mesh)`, its rows and KV cache are split over the mesh."""
    qwen3_vl.check_inputs(config, inputs)
    batch, prompt_len = inputs.input_ids.shape
    real_rows = batch * n
    total = prompt_len + max_new_tokens
    # Prompts and sample rows are padded to a multiple of the batch shards (1 without a mesh), so
    # the prefill and the KV cache split over the batch axes whatever the prompt count; padding
    # rows come last and are done from the start (every row draws from its own key: they change
    # no real row's draws), and are stripped from the outputs.
    shards = parallel.shards("batch")
    last_logits, kv = decode.prefill(config, params, pad_rows(inputs, -batch % shards))
    rows = real_rows + -real_rows % shards

    def per_row(x, axis=0):
        """Prompt rows -> sample rows (then padding rows, copies of the last prompt). When the
        prompts split evenly, a repeat: each chip's samples come from its own prompts."""
        if batch % shards == 0:
            return jnp.repeat(x, n, axis=axis)
        return jnp.take(x, jnp.minimum(jnp.arange(rows) // n, batch - 1), axis=axis)

    unrolled = decode.unroll_layers()
    pad = [(0, 0), (0, 0), (0, 0), (0, max_new_tokens), (0, 0)]
    # [L, rows, KV, Tp + M, hd]: rows over the batch axes, KV heads over "tensor"
    k, v = (decode.split_cache(decode.cache_spec(jnp.pad(per_row(a, axis=1), pad)), unrolled) for a in kv)
    step_params = decode.decode_params(params, unrolled)
    valid = jnp.pad(per_row(inputs.attention_mask > 0), [(0, 0), (0, max_new_tokens)])
    next_position = per_row(inputs.next_position)
    eos = jnp.asarray(eos_token_ids, jnp.int32)
    row_ids = jnp.arange(rows, dtype=jnp.int32)
    keys = choose.sample_keys(rng, row_ids, n)

    def pick(logits, t):
        return choose.choose(logits, choose.token_keys(keys, jnp.full((rows,), t, jnp.int32)), greedy, temperature,
                             top_k, top_p, use_top_p)

    token, slp, plp = pick(per_row(last_logits), 0)
    tokens = jnp.full((rows, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
    sample_lps = jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(slp)
    policy_lps = jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(plp)
    done = jnp.isin(token, eos) | (row_ids >= real_rows)
    lengths = jnp.ones((rows,), jnp.int32)

    def cond(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new_tokens - 1) & ~jnp.all(done)

    def body(state):
        step, tokens, sample_lps, policy_lps, cache, done, lengths = state
        write = prompt_len + step
        columns = jnp.arange(total)[None, :]
        valid_now = valid | (columns < write + 1) & (columns >= prompt_len)
        logits, cache = decode.step(config, step_params, tokens[:, step], next_position + step, cache, valid_now,
                                    write)
        token, slp, plp = pick(logits, step + 1)
        active = ~done
        token = jnp.where(active, token, pad_token_id)
        tokens = tokens.at[:, step + 1].set(token)
        sample_lps = sample_lps.at[:, step + 1].set(jnp.where(active, slp, 0.0))
        policy_lps = policy_lps.at[:, step + 1].set(jnp.where(active, plp, 0.0))
        lengths = lengths + active.astype(jnp.int32)
        done = done | (active & jnp.isin(token, eos))
        return step + 1, tokens, sample_lps, policy_lps, cache, done, lengths

    state = (jnp.int32(0), tokens, sample_lps, policy_lps, (k, v), done, lengths)
    _, tokens, sample_lps, policy_lps, _, done, lengths = jax.lax.while_loop(cond, body, state)
    count_trace()
    return SampleOutput(*(x[:real_rows] for x in (tokens, sample_lps, policy_lps, lengths, done)))


def pad_rows(inputs: qwen3_vl.ModelInputs, extra: int) -> qwen3_vl.ModelInputs:
    """`inputs` with `extra` all-padding prompt rows appended (no attention, image row 0); the
    images are left as they are (the vision tower splits them by itself)."""
    if not extra:
        return inputs

    def rows(x, axis=0):
        return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])

    return inputs._replace(input_ids=rows(inputs.input_ids), attention_mask=rows(inputs.attention_mask),
                           position_ids=rows(inputs.position_ids, axis=1), next_position=rows(inputs.next_position),
                           image_index=rows(inputs.image_index))


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


def compile_count() -> int:
    """How many sampler programs (the static engine's, the continuous engine's prefill and
    segment) have been traced, i.e. compiled, in this process (a program placed on another
    device compiles again without a new trace, and is not counted)."""
    return _programs_traced
