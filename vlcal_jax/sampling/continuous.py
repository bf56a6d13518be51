"""The continuous engine: S decode slots, each handed the next waiting (prompt, sample) as soon as
its row ends, so a long-tailed batch decodes its rows instead of padding behind its longest one.

    out = generate_continuous(config, params, inputs, rng, temperature, top_p, slots=S,
                              max_new_tokens=M, n=n, greedy=False, top_k=0, eos_token_ids=eos,
                              pad_token_id=pad)    # the static engine's SampleOutput, rows in (g, j) order

Two compiled programs per (prompt length bucket, patch bucket, prompt count, slot count):
  prefill  the vision tower and prefill of every prompt of the call, once per prompt; the first
           token of each of its n samples; the empty slots.
  segment  up to `segment_steps` decode steps, all on device: free slots take the next waiting
           rows (the prompt's KV copied into the slot), one decode step of every slot, the
           tokens recorded; a row that emits EOS or reaches M tokens frees its slot.
The host dispatches as many segments as the longest possible schedule needs, without waiting
on any (once every row is done, a segment returns at once), so a call is as asynchronous as
the static engine's one program: callers overlap host work with it.

Responses do not depend on the slots: the draws of (prompt g, sample j) use the keys of
(rng, g, j, token index) (choose.row_keys), and each slot's cache holds its row's keys at the
positions the static engine uses (prompt, then token t at Tp + t), so every slot count gives
the static engine's tokens.

Each batch shard (a chip's rows under a mesh) has its own slots and queue: its prompts' rows, in
order, go to its own slots, so a prompt's KV is copied only within the chip that prefilled it,
and with several processes each decodes only its own prompts.

KV cache memory, compute dtype bytes s, B prompts of Tp tokens (after padding to the batch
shards), S slots:
    2 * layers * (B * Tp + S * (Tp + M)) * kv_heads * head_dim * s
(the prompts' prefilled KV, kept while their samples wait, and the slots); the static engine
holds 2 * layers * B * n * (Tp + M) * kv_heads * head_dim * s.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vlcal_jax import parallel
from vlcal_jax.models import qwen3_vl
from vlcal_jax.models.config import ModelConfig
from vlcal_jax.sampling import choose, decode
from vlcal_jax.sampling.engine import SampleOutput, count_trace, pad_rows

DEFAULT_SEGMENT_STEPS = 256
_STATIC = ("config", "max_new_tokens", "n", "greedy", "top_k", "eos_token_ids", "pad_token_id", "use_top_p")


def cache_layout(unrolled: bool) -> str:
    """The slots' cache layout (text.KVCache): per-layer head-major arrays where decode layers are
    unrolled (one CPU device, where head-major decode attention is fastest), else one token-major
    stack (under a mesh and on TPU): the cache is an argument of every segment, and TPU copies an
    argument that is not in its decode layout (token-major) into that layout at each call."""
    return "head" if unrolled else "token"


class Prompts(NamedTuple):
    """The call's prefilled prompts (read-only while decoding): k, v [L, B, KV, Tp, hd] (in the
    slots' `cache_layout`: [L, B, Tp, KV, hd] when "token"), valid bool [B, Tp] (their attention
    masks), next_position int32 [B] (the first generated position); keys uint32 [B * n, 2]: each
    output row's `choose.sample_keys`."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    next_position: jax.Array
    keys: jax.Array


class Slots(NamedTuple):
    """The decode slots. k, v [L, S, Tp + M, KV, hd] ("token" `cache_layout`), or tuples of L
    [S, KV, Tp + M, hd] when decode layers are unrolled; prompt_valid bool [S, Tp] (the slot's
    prompt keys); row int32 [S]: the output row it decodes, as an index into its batch shard's
    rows (-1: free); t int32 [S]: that row's tokens so far; last int32 [S]: its last token (the
    next step's input); position int32 [S]: the rotary position of `last`; key uint32 [S, 2]:
    the row's `choose.sample_keys`; next int32 [D]: each batch shard's queue head (the first of
    its rows that no slot has taken yet)."""

    k: jax.Array | tuple
    v: jax.Array | tuple
    prompt_valid: jax.Array
    row: jax.Array
    t: jax.Array
    last: jax.Array
    position: jax.Array
    key: jax.Array
    next: jax.Array


def padded(count: int, shards: int) -> int:
    return count + -count % shards


@functools.partial(jax.jit, static_argnames=_STATIC + ("slots",))
def prefill(config: ModelConfig, params, inputs: qwen3_vl.ModelInputs, rng, temperature, top_p, *, slots: int,
            max_new_tokens: int, n: int, greedy: bool, top_k: int, eos_token_ids: tuple[int, ...], pad_token_id: int,
            use_top_p: bool = True) -> tuple[Prompts, Slots, SampleOutput]:
    """Prefills every prompt once and draws the first token of each of its n samples. -> (the
    prompts' KV, empty slots, outputs [B' * n, M] holding the first tokens). Prompts are padded
    to a multiple of the batch shards, slots likewise (padding rows are stripped by the caller)."""
    qwen3_vl.check_inputs(config, inputs)
    batch, prompt_len = inputs.input_ids.shape
    shards = parallel.shards("batch")
    inputs = pad_rows(inputs, -batch % shards)
    logits, (k, v) = decode.prefill(config, params, inputs)
    rows = inputs.input_ids.shape[0] * n
    row_ids = jnp.arange(rows, dtype=jnp.int32)
    keys = choose.sample_keys(rng, row_ids, n)
    token, slp, plp = choose.choose(jnp.repeat(logits, n, axis=0), choose.token_keys(keys, jnp.zeros_like(row_ids)),
                                    greedy, temperature, top_k, top_p, use_top_p)
    out = SampleOutput(jnp.full((rows, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token),
                       jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(slp),
                       jnp.zeros((rows, max_new_tokens), jnp.float32).at[:, 0].set(plp),
                       jnp.ones((rows,), jnp.int32), jnp.isin(token, jnp.asarray(eos_token_ids, jnp.int32)))
    unrolled = decode.unroll_layers()
    layout = cache_layout(unrolled)
    layers, _, kv_heads, _, head_dim = k.shape
    count = padded(slots, shards)
    shape = (layers, count, kv_heads, prompt_len + max_new_tokens, head_dim)
    if layout == "token":
        k, v = k.swapaxes(2, 3), v.swapaxes(2, 3)
        shape = shape[:2] + (shape[3], shape[2]) + shape[4:]
    prompts = Prompts(decode.cache_spec(k, layout), decode.cache_spec(v, layout), inputs.attention_mask > 0,
                      inputs.next_position, keys)
    cache = decode.cache_spec(jnp.zeros(shape, k.dtype), layout)
    empty = Slots(decode.split_cache(cache, unrolled), decode.split_cache(cache, unrolled),
                  jnp.zeros((count, prompt_len), bool), jnp.full((count,), -1, jnp.int32),
                  *(jnp.zeros((count,), jnp.int32) for _ in range(3)), jnp.zeros((count,) + keys.shape[1:], keys.dtype),
                  jnp.zeros((shards,), jnp.int32))
    count_trace()
    return prompts, empty, out


def _waiting(out: SampleOutput, next_row, real_rows):
    """bool [R]: the shard's rows no slot has taken yet that still need decoding (a row whose first
    token ended it, or a padding row, needs none)."""
    index = jnp.arange(out.lengths.shape[0])
    return (index >= next_row) & (index < real_rows) & ~out.finished & (out.lengths < out.tokens.shape[1])


def _refill(slots: Slots, prompts: Prompts, out: SampleOutput, real_rows, *, n: int) -> Slots:
    """One batch shard: its free slots take its next waiting rows, in slot order (row order), and
    each such slot gets its prompt's keys and values. real_rows int32 []: the shard's real rows."""
    free = slots.row < 0
    rank = jnp.cumsum(free) - 1
    waiting = jnp.cumsum(_waiting(out, slots.next[0], real_rows))
    count = jnp.minimum(jnp.sum(free), waiting[-1])
    take = free & (rank < count)
    row = jnp.searchsorted(waiting, rank, side="right").astype(jnp.int32)  # the rank-th waiting row
    row = jnp.minimum(row, out.lengths.shape[0] - 1)
    prompt = row // n
    where = lambda new, old: jnp.where(take.reshape(take.shape + (1,) * (old.ndim - 1)), new, old)  # noqa: E731
    slot_of = jnp.nonzero(take, size=take.shape[0], fill_value=0)[0]

    def copy(i, cache):
        s, g = slot_of[i], prompt[slot_of[i]]
        return tuple(_write_prompt(c, src, g, s) for c, src in zip(cache, (prompts.k, prompts.v)))

    k, v = jax.lax.fori_loop(0, count, copy, (slots.k, slots.v))
    return slots._replace(
        k=k, v=v, prompt_valid=where(prompts.valid[prompt], slots.prompt_valid), row=where(row, slots.row),
        t=where(1, slots.t), last=where(out.tokens[row, 0], slots.last),
        position=where(prompts.next_position[prompt], slots.position), key=where(prompts.keys[row], slots.key),
        next=jnp.searchsorted(waiting, count, side="right").astype(jnp.int32)[None])


def _write_prompt(cache, source, prompt, slot):
    """Prompt `prompt`'s keys (or values) of `source` [L, B, ...] into the first Tp positions of
    slot `slot` of `cache` (stacked [L, S, ...] in the same layout, or a tuple of L [S, ...])."""
    one = jax.lax.dynamic_index_in_dim(source, prompt, axis=1, keepdims=True)  # [L, 1, KV, Tp, hd]
    if isinstance(cache, tuple):
        return tuple(jax.lax.dynamic_update_slice(c, one[i], (slot, 0, 0, 0)) for i, c in enumerate(cache))
    return jax.lax.dynamic_update_slice(cache, one, (0, slot, 0, 0, 0))


def _record(slots: Slots, out: SampleOutput, token, sample_lp, policy_lp, *, eos_token_ids, max_new_tokens: int):
    """One batch shard: each busy slot's new token (index t of its row) goes into the outputs; a
    row that emitted EOS or holds max_new_tokens tokens frees its slot."""
    busy = slots.row >= 0
    row = jnp.where(busy, slots.row, out.lengths.shape[0])  # free slots write out of bounds: dropped
    ended = jnp.isin(token, jnp.asarray(eos_token_ids, jnp.int32))
    out = SampleOutput(out.tokens.at[row, slots.t].set(token, mode="drop"),
                       out.logprobs.at[row, slots.t].set(sample_lp, mode="drop"),
                       out.policy_logprobs.at[row, slots.t].set(policy_lp, mode="drop"),
                       out.lengths.at[row].set(slots.t + 1, mode="drop"),
                       out.finished.at[row].set(ended, mode="drop"))
    t = slots.t + 1
    free = busy & (ended | (t >= max_new_tokens))
    return slots._replace(row=jnp.where(free, -1, slots.row), t=t, last=token, position=slots.position + 1), out


def _per_shard(fn, *args):
    """fn on each batch shard's own block of `args` (Slots, Prompts, SampleOutput and arrays whose
    leading axis is rows or slots): a shard_map over the batch axes of the context mesh, so a
    slot's refill and records stay on the chip that holds it; fn itself without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(*args)
    batch = parallel.axes("batch") or None
    kv_heads = next((x.shape[3] for x in jax.tree.leaves(args) if x.ndim == 5), 0)
    heads = "tensor" if kv_heads and parallel.axes("tensor") and parallel.divides(kv_heads, "tensor") else None

    def spec(x):  # a stacked token-major cache [L, rows, T, KV, hd]: heads over "tensor" where they divide
        return P(None, batch, None, heads, None) if x.ndim == 5 else P(batch, *[None] * (x.ndim - 1))

    def local(x, s):
        sizes = [1 if a is None else parallel.shards("batch" if a == batch else "tensor") for a in s]
        return jax.ShapeDtypeStruct(tuple(d // k for d, k in zip(x.shape, sizes)), x.dtype)

    specs = jax.tree.map(spec, args)
    out = jax.eval_shape(fn, *jax.tree.map(local, args, specs))  # one shard's outputs: their ranks give the specs
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=jax.tree.map(spec, out), check_vma=False)(*args)


# keep_unused: the vision tower's weights, unread while decoding, stay arguments, so XLA's memory
# report of the program (vlcal_jax.fit) counts the whole policy as the other engines' do
@functools.partial(jax.jit, static_argnames=_STATIC + ("steps", "real_rows"), donate_argnames=("slots", "out"),
                   keep_unused=True)
def segment(config: ModelConfig, params, prompts: Prompts, slots: Slots, out: SampleOutput, temperature, top_p, *,
            steps: int, real_rows: int, max_new_tokens: int, n: int, greedy: bool, top_k: int,
            eos_token_ids: tuple[int, ...], pad_token_id: int, use_top_p: bool = True):
    """Up to `steps` decode steps of every slot (each preceded by the refill of free slots), ending
    early once no slot is busy and no row waits. -> (slots, out, whether work remains)."""
    del pad_token_id  # outputs were filled with it by prefill
    shards = slots.next.shape[0]
    shard_rows = out.lengths.shape[0] // shards
    prompt_len = prompts.valid.shape[1]
    # each shard's real rows (padding prompts sit at the end of the last shards)
    real = jnp.clip(real_rows - jnp.arange(shards, dtype=jnp.int32) * shard_rows, 0, shard_rows)
    unrolled = decode.unroll_layers()
    step_params = decode.decode_params(params, unrolled)
    layout = cache_layout(unrolled)

    def remaining(slots, out):
        waiting = _per_shard(lambda o, s, r: jnp.any(_waiting(o, s[0], r[0]))[None], out, slots.next, real)
        return jnp.any(slots.row >= 0) | jnp.any(waiting)

    def cond(state):
        i, slots, out = state
        return (i < steps) & remaining(slots, out)

    def body(state):
        i, slots, out = state
        slots = _per_shard(lambda s, p, o, r: _refill(s, p, o, r[0], n=n), slots, prompts, out, real)
        valid = jnp.concatenate([slots.prompt_valid, jnp.arange(max_new_tokens)[None] < slots.t[:, None]], axis=1)
        logits, (k, v) = decode.step(config, step_params, slots.last, slots.position, (slots.k, slots.v), valid,
                                     prompt_len + slots.t - 1, layout)
        token, slp, plp = choose.choose(logits, choose.token_keys(slots.key, slots.t), greedy, temperature, top_k,
                                        top_p, use_top_p)
        slots, out = _per_shard(functools.partial(_record, eos_token_ids=eos_token_ids, max_new_tokens=max_new_tokens),
                                slots._replace(k=k, v=v), out, token, slp, plp)
        return i + 1, slots, out

    _, slots, out = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, out))
    count_trace()
    return slots, out, remaining(slots, out)


def schedule_steps(prompts: int, slots: int, n: int, max_new_tokens: int, shards: int = 1) -> int:
    """An upper bound on the decode steps of a call: each shard's slots take its rows greedily, each
    row needing at most max_new_tokens - 1 steps, so the last one ends within
    (ceil(rows / slots) + 1) * (max_new_tokens - 1) steps."""
    rows = padded(prompts, shards) * n // shards
    per_shard = padded(slots, shards) // shards
    return (-(-rows // per_shard) + 1) * (max_new_tokens - 1)


def generate_continuous(config: ModelConfig, params, inputs: qwen3_vl.ModelInputs, rng, temperature, top_p, *,
                        slots: int, max_new_tokens: int, n: int, greedy: bool, top_k: int,
                        eos_token_ids: tuple[int, ...], pad_token_id: int, use_top_p: bool = True,
                        segment_steps: int = DEFAULT_SEGMENT_STEPS) -> SampleOutput:
    """Samples n responses per prompt of `inputs` with `slots` decode slots (see the module
    docstring; the other arguments as the static engine's `generate_from_inputs`). Call it
    under `parallel.use_mesh(mesh)` to split rows and slots over the mesh's batch axes."""
    if slots < 1:
        raise ValueError(f"slots={slots} must be >= 1")
    static = dict(max_new_tokens=max_new_tokens, n=n, greedy=greedy, top_k=top_k, eos_token_ids=eos_token_ids,
                  pad_token_id=pad_token_id, use_top_p=use_top_p)
    prompts, state, out = prefill(config, params, inputs, rng, temperature, top_p, slots=slots, **static)
    batch = inputs.input_ids.shape[0]
    if max_new_tokens > 1:
        shards = parallel.shards("batch")
        bound = schedule_steps(batch, slots, n, max_new_tokens, shards)
        steps = min(segment_steps or bound, bound)
        for _ in range(-(-bound // steps)):  # dispatched without waiting: segments past the end return at once
            state, out, _ = segment(config, params, prompts, state, out, temperature, top_p, steps=steps,
                                    real_rows=batch * n, **static)
    return out if out.lengths.shape[0] == batch * n else SampleOutput(*(x[:batch * n] for x in out))
