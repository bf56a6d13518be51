"""Intrinsic visual certainty estimation (VCE): PAPER.md section 4.

Per token, teacher-forced on a sampled response o, with p = pi(. | prefix_t, I) under the
clean image and q = pi(. | prefix_t, I') under a perturbed one:

  exact (the paper's definition)   entropy_t = H(p),  kl_t = KL(p || q)   (full vocabulary)
  sampled (the released code)      nll_t = -log p(o_t)
                                   kl_sample_t = clamp(p(o_t) clamp(log p(o_t) - log q(o_t), -20, 20), 0, 10)
                                   k3_t = clamp(exp(d) - d - 1, 0, 10), d = clamp(log q(o_t) - log p(o_t), -20, 20)

Soft-label variant "paper" (the default) averages the exact kl_t and entropy_t; variant
"released" averages the sampled proxies kl_sample_t and nll_t, as the authors' code does.

Per response, both are averaged over the `<vision>` span; the score
S = log(KL + 1e-8) - log(H + 1e-8) is z-scored over the rollout batch and squashed by a
sigmoid into the soft label S_vis. The per-token certainty used by token-level advantage
reweighting (section 5) is the same construction within one response.

Names used below: N responses (= B sequences), T response tokens, V vocabulary, D hidden
size, K perturbed images per response.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from vlcal_jax import parallel

LOG_EPS = 1e-8  # eps inside log(KL + eps) - log(H + eps), PAPER.md section 4.
STD_FLOOR = 1e-6  # a z-score whose std is below this is 0 (sections 4 and 5).
SAMPLED_CLAMP = 10.0  # the released code clamps sampled KL estimators to [0, 10].

# Keys of the token-statistics dict that depend on the perturbed image (they carry a
# leading K axis when several perturbations are scored).
PERTURBED_KEYS = ("logq", "kl", "kl_sample", "k3")

# Which per-token statistics the two soft-label variants average over the vision span
# (rollout.response_vision_stats): (grounding D_KL, certainty H).
SOFT_LABEL_VARIANTS = {
    "paper": ("kl", "entropy"),  # exact full-vocabulary KL and entropy (default).
    "released": ("kl_sample", "nll"),  # sampled-token proxies of the authors' code.
}


def masked_mean(values: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Mean of `values` over entries where `mask` is true; 0 where nothing is selected."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, values, 0.0) * mask, axis=axis)
    count = jnp.sum(mask, axis=axis)
    return total / jnp.maximum(count, 1.0)


def masked_zscore(values: jax.Array, mask: jax.Array, *, axis: int = -1, ddof: int = 0) -> jax.Array:
    """z-score of `values` over the entries selected by `mask` along `axis`.

    std uses `ddof` (0: population, as for soft labels; 1: Bessel, as for TAR). Where the std
    is below 1e-6, or fewer than ddof + 1 entries are selected, every z along that axis is 0.
    Unselected entries get z = 0; their values (possibly inf or NaN) never reach the sums.
    """
    mask = mask.astype(bool)
    weight = mask.astype(jnp.float32)
    clean = jnp.where(mask, values, 0.0).astype(jnp.float32)
    count = jnp.sum(weight, axis=axis, keepdims=True)
    mean = jnp.sum(clean, axis=axis, keepdims=True) / jnp.maximum(count, 1.0)
    centered = jnp.where(mask, clean - mean, 0.0)
    var = jnp.sum(centered * centered, axis=axis, keepdims=True) / jnp.maximum(count - ddof, 1.0)
    std = jnp.sqrt(var)
    ok = (count > ddof) & (std >= STD_FLOOR)
    return jnp.where(ok & mask, centered / jnp.where(ok, std, 1.0), 0.0)


@jax.jit
def k3_from_logprobs(
    logp: jax.Array, logq: jax.Array, clamp_min: float = 0.0, clamp_max: float = SAMPLED_CLAMP
) -> jax.Array:
    """k3 estimator of KL(p || q) on the sampled token: [N, T] -> [N, T] (PAPER.md section 5).

    d = clamp(logq - logp, -20, 20); k3 = exp(d) - d - 1, clamped to [clamp_min, clamp_max]
    ([0, 10] in the released TAR code; the reference-KL penalty of section 6 uses [-10, 10]).
    """
    d = jnp.clip(logq.astype(jnp.float32) - logp.astype(jnp.float32), -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, clamp_min, clamp_max)


@jax.jit
def sampled_kl_from_logprobs(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """The released sampled-token proxy of KL(p || q): [N, T] -> [N, T] (PAPER.md section 4).

    kl_sample = clamp(p(o_t) * clamp(log p(o_t) - log q(o_t), -20, 20), 0, 10), the authors'
    `compute_kl`; the "released" soft-label variant averages it. Not the paper's KL: that is
    the exact full-vocabulary sum in `token_stats_from_logits` ("kl", variant "paper").
    """
    logp, logq = logp.astype(jnp.float32), logq.astype(jnp.float32)
    return jnp.clip(jnp.exp(logp) * jnp.clip(logp - logq, -20.0, 20.0), 0.0, SAMPLED_CLAMP)


def visual_certainty_score(kl: jax.Array, entropy: jax.Array) -> jax.Array:
    """S = log(D_KL + 1e-8) - log(H + 1e-8), elementwise: [...] -> [...] float32 (PAPER.md section 4;
    per token, the s_t of TAR, section 5)."""
    return jnp.log(kl.astype(jnp.float32) + LOG_EPS) - jnp.log(entropy.astype(jnp.float32) + LOG_EPS)


@jax.jit
def soft_labels(kl: jax.Array, entropy: jax.Array, valid: jax.Array) -> jax.Array:
    """Soft visual-certainty labels S_vis: kl [N], entropy [N], valid [N] -> [N] (section 4).

    kl and entropy are each response's D_KL and H over its `<vision>` span
    (`rollout.response_vision_stats`). S_vis = sigmoid(z), z the z-score of
    S = log(kl + 1e-8) - log(entropy + 1e-8) over the valid responses of the whole rollout
    batch (population std; std < 1e-6 gives z = 0, so S_vis = 0.5). A row that is not valid
    (no vision span) or whose kl or entropy is not finite gets no label: NaN, and no say in
    the batch statistics; the reward treats it as missing (R_vis = -1).
    """
    valid = valid.astype(bool) & jnp.isfinite(kl) & jnp.isfinite(entropy)
    score = visual_certainty_score(jnp.where(valid, kl, 1.0), jnp.where(valid, entropy, 1.0))
    z = masked_zscore(score, valid, axis=-1, ddof=0)
    return jnp.where(valid, jax.nn.sigmoid(z), jnp.nan)


@jax.jit
def token_certainty(token_kl: jax.Array, token_entropy: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-token certainty S_t within each response: [N, T] -> [N, T] (PAPER.md section 5).

    s_t = log(kl_t + 1e-8) - log(entropy_t + 1e-8), z-scored within each response over the
    tokens selected by `mask` (unbiased std; z = 0 if std < 1e-6 or fewer than 2 tokens),
    S_t = sigmoid(z). Unselected tokens get S_t = 0.5 (z = 0).
    """
    mask = mask.astype(bool)
    score = visual_certainty_score(jnp.where(mask, token_kl, 1.0), jnp.where(mask, token_entropy, 1.0))
    return jax.nn.sigmoid(masked_zscore(score, mask, axis=-1, ddof=1))


def _clean_stats(logits: jax.Array, targets: jax.Array):
    """Log-softmax, probabilities, target log-prob and exact entropy of [..., V] logits."""
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    p_all = jnp.exp(logp_all)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.where(p_all > 0, p_all * logp_all, 0.0), axis=-1)
    return logp_all, p_all, logp, jnp.maximum(entropy, 0.0)


def _perturbed_stats(logp_all, p_all, logp, logits_pert, targets) -> dict:
    """KL statistics of one perturbed image's [..., V] logits against the clean ones."""
    logq_all = jax.nn.log_softmax(logits_pert.astype(jnp.float32), axis=-1)
    logq = jnp.take_along_axis(logq_all, targets[..., None], axis=-1)[..., 0]
    # KL >= 0; the floor only removes float round-off so that log(KL + 1e-8) stays finite.
    kl = jnp.maximum(jnp.sum(jnp.where(p_all > 0, p_all * (logp_all - logq_all), 0.0), axis=-1), 0.0)
    return {"logq": logq, "kl": kl, "kl_sample": sampled_kl_from_logprobs(logp, logq),
            "k3": k3_from_logprobs(logp, logq)}


@jax.jit
def token_stats_from_logits(logits_clean: jax.Array, logits_pert: jax.Array, targets: jax.Array) -> dict:
    """Per-token VCE statistics from full logits (PAPER.md section 4).

    Args:
      logits_clean: [B, T, V] logits under the clean image (position t predicts targets[t]).
      logits_pert: [K, B, T, V] (or [B, T, V]) logits under K perturbed images.
      targets: [B, T] int sampled response tokens o_t.

    Returns a dict of float32 arrays: "logp", "nll", "entropy" [B, T]; "logq", "kl",
    "kl_sample", "k3" [K, B, T] (or [B, T] when logits_pert has no K axis). The caller masks
    padding; values there are finite but meaningless.
    """
    single = logits_pert.ndim == 3
    if single:
        logits_pert = logits_pert[None]
    logp_all, p_all, logp, entropy = _clean_stats(logits_clean, targets)
    pert = jax.vmap(lambda lq: _perturbed_stats(logp_all, p_all, logp, lq, targets))(logits_pert)
    if single:
        pert = {k: v[0] for k, v in pert.items()}
    return {"logp": logp, "nll": -logp, "entropy": entropy, **pert}


def to_chunks(x: jax.Array, chunk_size: int, time_axis: int = 1) -> jax.Array:
    """Splits `time_axis` into chunks and moves the chunk index first: [..., T, ...] ->
    [num_chunks, ..., chunk_size, ...], T zero-padded to a multiple of chunk_size (for lax.map/scan)."""
    time_axis %= x.ndim
    length = x.shape[time_axis]
    num_chunks = -(-length // chunk_size)
    widths = [(0, 0)] * x.ndim
    widths[time_axis] = (0, num_chunks * chunk_size - length)
    x = jnp.pad(x, widths)
    x = x.reshape(x.shape[:time_axis] + (num_chunks, chunk_size) + x.shape[time_axis + 1:])
    return jnp.moveaxis(x, time_axis, 0)


def from_chunks(x: jax.Array, length: int, time_axis: int = 1) -> jax.Array:
    """Inverse of `to_chunks`: [num_chunks, ..., chunk_size, ...] -> [..., length, ...];
    `time_axis` indexes the result."""
    time_axis %= x.ndim - 1
    x = jnp.moveaxis(x, 0, time_axis)
    x = x.reshape(x.shape[:time_axis] + (-1,) + x.shape[time_axis + 2:])
    return jax.lax.slice_in_dim(x, 0, length, axis=time_axis)


@functools.partial(jax.jit, static_argnames=("chunk_size", "precision"))
def chunked_token_stats(
    hidden_clean: jax.Array,
    hidden_pert: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    chunk_size: int,
    precision=None,
) -> dict:
    """`token_stats_from_logits` from final hidden states, in sequence chunks (section 4).

    Args:
      hidden_clean: [B, T, D] final (normed) hidden states under the clean image.
      hidden_pert: [K, B, T, D] (or [B, T, D]) hidden states under K perturbed images.
      lm_head: [D, V] output projection.
      targets: [B, T] int sampled tokens.
      chunk_size: tokens per chunk; T is zero-padded to a multiple of it.
      precision: matmul precision passed to the logits einsum.

    The logits are computed chunk by chunk inside `lax.map` (float32 accumulation, float32
    softmax), so only [B, chunk, V] clean and [K, B, chunk, V] perturbed logits are alive at
    once, never [B, T, V] twice. Returns the same dict as `token_stats_from_logits`.
    """
    single = hidden_pert.ndim == 3
    if single:
        hidden_pert = hidden_pert[None]
    length = hidden_clean.shape[1]

    def logits_of(hidden):  # rows over the batch axes, as qwen3_vl.logits_from_hidden keeps them
        hidden = parallel.constrain(hidden, "batch", None, None)
        logits = jnp.einsum("bcd,dv->bcv", hidden, lm_head, precision=precision, preferred_element_type=jnp.float32)
        return parallel.constrain(logits, "batch", None, "tensor")

    def one_chunk(args):
        h_clean, h_pert, tgt = args
        logp_all, p_all, logp, entropy = _clean_stats(logits_of(h_clean), tgt)
        pert = jax.vmap(lambda h: _perturbed_stats(logp_all, p_all, logp, logits_of(h), tgt))(h_pert)
        return {"logp": logp, "nll": -logp, "entropy": entropy, **pert}

    chunks = jax.lax.map(one_chunk, (to_chunks(hidden_clean, chunk_size), to_chunks(hidden_pert, chunk_size, 2),
                                      to_chunks(targets, chunk_size)))
    stats = {k: from_chunks(v, length, time_axis=-1) for k, v in chunks.items()}
    if single:
        stats = {k: (v[0] if k in PERTURBED_KEYS else v) for k, v in stats.items()}
    return stats


def mean_over_perturbations(token_stats: Mapping[str, jax.Array]) -> dict:
    """Averages the K axis of the perturbed statistics ([K, N, T] -> [N, T]).

    With several masks per response the per-token KL estimates are Monte-Carlo averaged over
    the masks; clean statistics pass through unchanged.
    """
    return {k: (jnp.mean(v, axis=0) if k in PERTURBED_KEYS else v) for k, v in token_stats.items()}
