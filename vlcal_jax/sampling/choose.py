"""The next token of each row from its logits: temperature, top-k, top-p, a draw, log-probs.

Every row draws from its own key, derived from (rng, prompt g, sample j, token index t)
(`row_keys`), so a response depends only on the seed and on which (prompt, sample) it is, not
on the row or decode slot it happens to occupy, nor on the step it is decoded at: the static
and the continuous engine give the same responses for the same seed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# vocabulary block of the two-level inverse CDF (`sample_categorical`)
CDF_BLOCK = 256


def sample_keys(rng, rows, n: int):
    """Key data uint32 [N, 2] of output rows `rows` [N] (row = g * n + j: prompt g, sample j):
    fold_in(fold_in(rng, g), j). Raw data, so that it can be selected and carried like any array."""
    per_prompt = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, rows // n)
    return jax.random.key_data(jax.vmap(jax.random.fold_in)(per_prompt, rows % n))


def token_keys(keys, t):
    """The keys [N] of token index t [N] of the rows whose `sample_keys` are `keys` [N, 2]:
    fold_in(fold_in(fold_in(rng, g), j), t)."""
    return jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), t)


def row_keys(rng, rows, t, n: int):
    """Keys [N] of output rows `rows` [N] at token index t [N] (`token_keys` of `sample_keys`)."""
    return token_keys(sample_keys(rng, rows, n), t)


def uniforms(keys):
    """One float32 U[0, 1) per key [N] -> [N]."""
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)


def nucleus_threshold(probs, top_p, iterations: int = 32):
    """Per-row probability threshold of the top-p nucleus, by bisection (no vocabulary sort).

    Token i is in the nucleus when the mass of strictly more probable tokens is < top_p; the
    returned tau [..., 1] keeps exactly `probs >= tau` (up to 2**-iterations * max prob).
    """
    def mass_above(t):
        return jnp.sum(jnp.where(probs > t, probs, 0.0), axis=-1, keepdims=True)

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        inside = mass_above(mid) < top_p  # mid is at or above the boundary
        return jnp.where(inside, lo, mid), jnp.where(inside, mid, hi)

    hi = jnp.max(probs, axis=-1, keepdims=True)
    lo = jnp.zeros_like(hi)
    _, hi = jax.lax.fori_loop(0, iterations, body, (lo, hi))
    # the most probable token is always kept
    return jnp.minimum(hi, jnp.max(probs, axis=-1, keepdims=True))


def filter_logits(logits, temperature, top_k: int, top_p, use_top_p: bool = True):
    """Scaled and filtered logits [..., V] (-inf outside the top-k / nucleus). The nucleus keeps
    the tokens whose strictly-more-probable mass is below top_p (at least 1 token); exact ties
    at the boundary are kept together. `use_top_p=False` (static) skips it when top_p == 1."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if not use_top_p:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs >= nucleus_threshold(probs, top_p), logits, -jnp.inf)


def sample_categorical(u, logits, block: int = CDF_BLOCK):
    """One draw per row of softmax(logits [N, V]) by inverse CDF at u [N] in [0, 1), and the
    draw's log-probability: -> (token int32 [N], logprob [N]).

    Two levels instead of a cumulative sum over the whole vocabulary (8 ms for [32, 32000] on
    XLA:CPU, most of a sampling step): the cumulative mass of V / block block sums picks the
    block, then a cumulative sum inside that one block picks the token. The token is the first
    whose cumulative mass exceeds u * total, so zero-probability tokens are never drawn (a draw
    that rounding would put on one falls back to the row's most probable token).
    """
    rows, vocab = logits.shape
    top = jnp.max(logits, axis=-1, keepdims=True)
    weights = jnp.exp(logits - top)  # 0 where logits are -inf
    pad = -vocab % block
    blocks = jnp.pad(weights, ((0, 0), (0, pad))).reshape(rows, -1, block)
    block_mass = jnp.sum(blocks, axis=-1)  # [N, V / block]
    block_end = jnp.cumsum(block_mass, axis=-1)
    total = block_end[:, -1]
    target = u * total
    chosen = jnp.minimum(jnp.sum(block_end <= target[:, None], axis=-1), block_end.shape[1] - 1)
    start = jnp.take_along_axis(block_end - block_mass, chosen[:, None], axis=1)
    inner = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [N, block]
    offset = jnp.minimum(jnp.sum(start + jnp.cumsum(inner, axis=-1) <= target[:, None], axis=-1), block - 1)
    token = jnp.minimum(chosen * block + offset, vocab - 1)
    picked = jnp.take_along_axis(logits, token[:, None], axis=1)[:, 0]
    token = jnp.where(jnp.isfinite(picked), token, jnp.argmax(logits, axis=-1))
    picked = jnp.take_along_axis(logits, token[:, None], axis=1)[:, 0]
    return token.astype(jnp.int32), picked - top[:, 0] - jnp.log(total)


def choose(logits, keys, greedy: bool, temperature, top_k: int, top_p, use_top_p: bool):
    """-> (token int32 [N], sampling logprob [N], policy logprob [N]) from logits [N, V] and one
    key per row (`row_keys`; unused when greedy). The sampling log-prob is that of the
    distribution the token was drawn from (0 for greedy), the policy one that of softmax(logits)."""
    logits = logits.astype(jnp.float32)
    if greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sample_lp = jnp.zeros(token.shape, jnp.float32)
    else:
        filtered = filter_logits(logits, temperature, top_k, top_p, use_top_p)
        token, sample_lp = sample_categorical(uniforms(keys), filtered)
    picked = jnp.take_along_axis(logits, token[:, None], axis=-1)[:, 0]
    return token, sample_lp, picked - jax.nn.logsumexp(logits, axis=-1)
