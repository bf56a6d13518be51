"""GRPO advantages, token-level advantage reweighting, perception filter and policy loss.

PAPER.md sections 5 (advantages, TAR, perception filter) and 6 (clipped surrogate with dual
clip, k3 reference KL, token-mean aggregation). Everything is pure and jittable: masks
instead of boolean indexing, static shapes. Names: N responses, T response tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlcal_jax.rl.certainty import k3_from_logprobs, token_certainty

__all__ = [
    "group_advantages",
    "token_advantages",
    "after_answer_advantages",
    "split_token_advantages",
    "group_scales",
    "score_expectation_advantages",
    "k3_from_logprobs",
    "token_advantage_weights",
    "tar_weights_paper",
    "perception_mask",
    "policy_loss",
]

ADV_EPS = 1e-6  # A = (R - mean) / (std + 1e-6), section 5.
# ceil(top_p * L) is taken after subtracting this, so that float round-off in top_p * L
# (0.2 * 15 is 3.0000000000000004 in float64) cannot add a token: the intent is the exact ceiling.
_CEIL_TOLERANCE = 1e-4


@functools.partial(jax.jit, static_argnums=1)
def group_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """GRPO advantages: rewards [N] -> [N] (PAPER.md section 5).

    Groups are consecutive rows: group g is rows g*n .. g*n+n-1 with n = group_size.
    A_i = (R_i - mean_g) / (std_g + 1e-6), std with Bessel's correction. A group whose rewards
    are all equal gets exactly 0 (not round-off of R - mean).
    """
    num = rewards.shape[0]
    if group_size < 2 or num % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the {num} rewards")
    grouped = rewards.astype(jnp.float32).reshape(num // group_size, group_size)
    mean = jnp.mean(grouped, axis=1, keepdims=True)
    std = jnp.std(grouped, axis=1, keepdims=True, ddof=1)
    constant = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
    adv = jnp.where(constant, 0.0, (grouped - mean) / (std + ADV_EPS))
    return adv.reshape(num)


@jax.jit
def token_advantages(advantages: jax.Array, response_mask: jax.Array) -> jax.Array:
    """Broadcasts response advantages [N] to response tokens [N, T] (0 on padding); advantages
    already per token [N, T] (`split_token_advantages`) are only masked."""
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    return advantages.astype(jnp.float32) * response_mask.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=2)
def after_answer_advantages(after_rewards: jax.Array, correct: jax.Array, group_size: int) -> jax.Array:
    """Advantages [N] of the tokens after the answer (rl.post_answer_advantage="reward_to_go").

    after_rewards [N]: the part of each response's reward that its tokens after the answer can
    still change, R_i - lambda_acc I_i (the Brier, format and R_vis terms); correct [N]: I_i.
    Those tokens are taken from the state "answer given, right or wrong": their baseline is the
    mean of after_rewards over the responses of the same group with the same correctness (the
    value of that state, estimated by GRPO's own samples), and the advantage is the difference,
    not divided by a standard deviation (as Dr. GRPO, Liu et al. 2025), so that it is the Brier
    score's own gradient: large for a confident wrong answer, small for a confident right one.
    A response alone in its (group, correctness) subgroup gets 0. Groups are consecutive rows.
    """
    num = after_rewards.shape[0]
    if group_size < 2 or num % group_size:
        raise ValueError(f"group_size={group_size} must be >= 2 and divide the {num} rewards")
    c = after_rewards.astype(jnp.float32).reshape(num // group_size, group_size)
    right = correct.astype(bool).reshape(c.shape)
    same = right[:, :, None] == right[:, None, :]  # [G, n, n]: j is in i's subgroup
    count = jnp.sum(same, axis=2)
    baseline = jnp.sum(jnp.where(same, c[:, None, :], 0.0), axis=2) / count
    return jnp.where(count > 1, c - baseline, 0.0).reshape(num)


@jax.jit
def split_token_advantages(advantages: jax.Array, after_advantages: jax.Array, after_mask: jax.Array,
                           response_mask: jax.Array) -> jax.Array:
    """Token advantages [N, T]: `after_advantages` [N] on the tokens of `after_mask` [N, T] (after
    the answer), the response advantages [N] on the other response tokens, 0 on padding."""
    after = after_mask.astype(bool) & response_mask.astype(bool)
    token = jnp.where(after, after_advantages.astype(jnp.float32)[:, None], advantages.astype(jnp.float32)[:, None])
    return token * response_mask.astype(jnp.float32)


@jax.jit
def confidence_entropy_advantages(advantages: jax.Array, nll: jax.Array, score_mask: jax.Array,
                                  response_mask: jax.Array, bonus) -> jax.Array:
    """Token advantages [N, T] plus a maximum-entropy bonus on the stated confidences'
    first tokens (rl.confidence_entropy_bonus; not the paper's objective).

    advantages [N] or [N, T]; nll [N, T]: -log pi_old(o_t) of the sampled tokens; score_mask
    [N, T]: the first token of each stated score (`rollout.confidence_token_mask`). On those
    tokens A_t <- A_t + bonus * (nll_t - mean nll over the batch's score tokens): the
    score-function estimate of the gradient of bonus * H(pi(. | prefix_t)), the mean a baseline.
    Without it GRPO with a Brier reward drives a scene-independent digit distribution to a point
    mass (every sample of a group then states the same digit and the digits get no gradient);
    with it the objective's optimum is a softmax over digits whose mode tracks
    P(right | state)."""
    response = response_mask.astype(bool)
    token = token_advantages(advantages, response)
    scores = score_mask.astype(bool) & response
    nll = nll.astype(jnp.float32)
    count = jnp.sum(scores)
    baseline = jnp.sum(jnp.where(scores, nll, 0.0)) / jnp.maximum(count, 1)
    return token + jnp.where(scores, jnp.asarray(bonus, jnp.float32) * (nll - baseline), 0.0)


def group_scales(rewards: jax.Array, group_size: int) -> jax.Array:
    """1 / (std_g + 1e-6) of each response's group [N]: what turns a reward difference into a GRPO
    advantage difference (group_advantages); 0 for a group whose rewards are all equal, which
    GRPO gives no gradient."""
    num = rewards.shape[0]
    grouped = rewards.astype(jnp.float32).reshape(num // group_size, group_size)
    std = jnp.std(grouped, axis=1, keepdims=True, ddof=1)
    constant = jnp.max(grouped, axis=1, keepdims=True) == jnp.min(grouped, axis=1, keepdims=True)
    return jnp.broadcast_to(jnp.where(constant, 0.0, 1.0 / (std + ADV_EPS)), grouped.shape).reshape(num)


def score_expectation_advantages(token_adv: jax.Array, tokens: jax.Array, positions: jax.Array,
                                 reward_delta: jax.Array, scale: jax.Array, digit_ids, known) -> tuple:
    """The advantages of rl.score_expectation (not the paper's objective): at the first token of each
    stated score the sampled digit's policy-gradient term is replaced by the exact expectation over
    the digits whose counterfactual reward is known.

    token_adv [N, T]: the update's token advantages; tokens [N, T]: the sampled response tokens;
    positions [N, J]: the first token of score j (-1: none, `rollout.score_counterfactuals`);
    reward_delta [N, J, K]: the reward with score j rewritten as digit k minus the response's own;
    scale [N, J]: what turns a reward difference into an advantage difference at that token (1 /
    (std_g + eps) for GRPO's shared advantage, rl.post_answer_weight after the answer); digit_ids
    [K]; known [K] bool: the digits that end a score (not "1", which may open "10").

    Returns (score_adv [N, J, K]: A_t + scale * reward_delta for the known digits, 0 for the others
    and where there is no score; token_adv [N, T] with A_t set to 0 where the sampled token is a
    known digit, whose term the expectation now holds). The update's gradient at that token is then
    sum_{k known} grad pi(k) score_adv_k + [sampled token not known] A_t grad log pi(sampled): in
    expectation over the sampled token, the score-function gradient of the expected reward, with the
    sampling noise of the known digits removed."""
    token_adv = jnp.asarray(token_adv, jnp.float32)
    positions = jnp.asarray(positions, jnp.int32)
    has = positions >= 0
    at = jnp.maximum(positions, 0)
    a_t = jnp.take_along_axis(token_adv, at, axis=1)  # [N, J]
    sampled = jnp.take_along_axis(jnp.asarray(tokens), at, axis=1)
    digit_ids, known = jnp.asarray(digit_ids, jnp.int32), jnp.asarray(known, bool)
    sampled_known = jnp.any((sampled[..., None] == digit_ids) & known, axis=-1) & has
    score_adv = a_t[..., None] + jnp.asarray(scale, jnp.float32)[..., None] * jnp.asarray(reward_delta, jnp.float32)
    score_adv = jnp.where(has[..., None] & known, score_adv, 0.0)
    cleared = jnp.zeros(token_adv.shape, bool)
    rows = jnp.broadcast_to(jnp.arange(token_adv.shape[0])[:, None], at.shape)
    cleared = cleared.at[rows, at].max(sampled_known)
    return score_adv, jnp.where(cleared, 0.0, token_adv)


def _tar_applies(vision_mask, advantages, response_mask=None):
    applies = vision_mask.astype(bool) & (advantages < 0)
    if response_mask is not None:
        applies &= response_mask.astype(bool)
    return applies


@jax.jit
def token_advantage_weights(
    token_kl: jax.Array,
    token_entropy: jax.Array,
    response_mask: jax.Array,
    vision_mask: jax.Array,
    advantages: jax.Array,
    w_min: float = 0.9,
    w_max: float = 1.1,
) -> jax.Array:
    """TAR token weights, released form (PAPER.md section 5): all inputs [N, T] -> w [N, T].

    Args:
      token_kl: k3_t per token, already computed (`k3_from_logprobs(log p, log q)`, clamped
        to [0, 10]) from the clean (p) and perturbed-image (q) log-probs of the sampled token.
      token_entropy: the released entropy proxy ent_t = -log pi(o_t | I).
      response_mask, vision_mask: valid response tokens and `<vision>`-span tokens.
      advantages: per-token advantages A_t.

    s_t = log(k3_t + 1e-8) - log(ent_t + 1e-8); z-scored within each response over all its
    valid tokens (unbiased std; z = 0 if std < 1e-6 or only one token); S_t = sigmoid(z);
    w_t = w_max - (w_max - w_min) * S_t. The weight is used only where the token is a valid
    vision-span token with A_t < 0; everywhere else w_t = 1.
    """
    certainty = token_certainty(token_kl, token_entropy, response_mask)
    weights = w_max - (w_max - w_min) * certainty
    return jnp.where(_tar_applies(vision_mask, advantages, response_mask), weights, 1.0)


@jax.jit
def tar_weights_paper(
    token_certainty: jax.Array, vision_mask: jax.Array, advantages: jax.Array, lambda_tar: float = 0.1
) -> jax.Array:
    """TAR factor, paper form (PAPER.md section 5): [N, T] -> [N, T].

    A_t <- A_t * (1 + lambda_TAR * (1 - 2 S_t)) on vision-span tokens with A_t < 0; returns
    the factor (1 elsewhere). `vision_mask` must already exclude padding. With
    lambda_TAR = 0.1 it equals the released weight for w_min = 0.9, w_max = 1.1.
    """
    factor = 1.0 + lambda_tar * (1.0 - 2.0 * token_certainty.astype(jnp.float32))
    return jnp.where(_tar_applies(vision_mask, advantages), factor, 1.0)


@jax.jit
def perception_mask(token_kl: jax.Array, response_mask: jax.Array, top_p: float = 0.2) -> jax.Array:
    """Perception filter (PAPER.md section 5): token_kl, response_mask [N, T] -> keep [N, T] bool.

    Per response with L valid tokens, keeps the ceil(top_p * L) valid tokens with the largest
    k3_t. Ties are broken by position: the earlier token ranks higher. Jittable: a stable
    argsort gives every token its rank, no dynamic shapes.
    """
    valid = response_mask.astype(bool)
    length = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
    keep_count = jnp.ceil(top_p * length - _CEIL_TOLERANCE)
    # 0 - x (not -x) so that k3 values 0.0 and -0.0 get the same key and tie by position.
    key = jnp.where(valid, 0.0 - token_kl.astype(jnp.float32), jnp.inf)
    order = jnp.argsort(key, axis=-1, stable=True)  # best first; equal keys keep index order
    positions = jnp.broadcast_to(jnp.arange(key.shape[-1]), key.shape)
    rank = jnp.zeros_like(order).at[jnp.arange(key.shape[0])[:, None], order].set(positions)
    return valid & (rank < keep_count)


@jax.jit
def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    advantages: jax.Array,
    response_mask: jax.Array,
    pg_mask: jax.Array | None = None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float = 3.0,
    kl_coef: float = 1e-4,
    kl_clamp: float = 10.0,
    num_tokens: jax.Array | float | None = None,
    num_pg_tokens: jax.Array | float | None = None,
) -> tuple[jax.Array, dict]:
    """Clipped-surrogate GRPO loss with dual clip and k3 reference KL (PAPER.md section 6).

    Args (all [N, T]):
      logp, old_logp, ref_logp: log-probs of the sampled tokens under the policy being
        trained, the rollout policy and the reference policy.
      advantages: per-token (effective, after TAR) advantages A_t.
      response_mask: valid response tokens.
      pg_mask: tokens the policy-gradient term averages over (the perception filter);
        None means response_mask.
      num_tokens: global count of response tokens (sharded or micro-batched updates divide by
        the whole batch); default: the count in this call.
      num_pg_tokens: global count of pg_mask tokens; default: num_tokens when pg_mask is None,
        else the count in this call.

    Per token, with r = exp(clamp(logp - old_logp, -20, 20)):
      l1 = -A r,  l2 = -A clip(r, 1 - clip_low, 1 + clip_high),  l = max(l1, l2);
      for A < 0 (dual clip): l = min(l, -A dual_clip).
      kl = clamp(ref_logp - logp, -20, 20); k = clamp(exp(kl) - kl - 1, -kl_clamp, kl_clamp).
    loss = sum(l * pg_mask) / num_pg_tokens + kl_coef * sum(k * response_mask) / num_tokens.

    Returns (loss scalar, metrics). Metrics are token means over this call's response tokens:
    pg_loss, ref_kl, clipfrac_low (A < 0 and r < 1 - clip_low), clipfrac_high (A > 0 and
    r > 1 + clip_high), dual_clip_frac (A < 0 and the -A c bound is active), ratio_mean,
    ppo_kl (old_logp - logp), filter_keep_frac (pg tokens / response tokens), loss.
    """
    f32 = jnp.float32
    logp, old_logp, ref_logp = logp.astype(f32), old_logp.astype(f32), ref_logp.astype(f32)
    advantages = advantages.astype(f32)
    resp = response_mask.astype(f32)
    pg = resp if pg_mask is None else pg_mask.astype(f32) * resp
    local_tokens = jnp.sum(resp)
    if num_tokens is None:
        num_tokens = local_tokens
    if num_pg_tokens is None:
        num_pg_tokens = num_tokens if pg_mask is None else jnp.sum(pg)
    num_tokens = jnp.maximum(jnp.asarray(num_tokens, f32), 1.0)
    num_pg_tokens = jnp.maximum(jnp.asarray(num_pg_tokens, f32), 1.0)

    log_ratio = logp - old_logp
    ratio = jnp.exp(jnp.clip(log_ratio, -20.0, 20.0))
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_ppo = jnp.maximum(loss_unclipped, loss_clipped)
    loss_dual = -advantages * dual_clip
    negative = advantages < 0
    per_token = jnp.where(negative, jnp.minimum(loss_ppo, loss_dual), loss_ppo)

    ref_kl = k3_from_logprobs(logp, ref_logp, clamp_min=-kl_clamp, clamp_max=kl_clamp)

    pg_loss = jnp.sum(jnp.where(pg > 0, per_token, 0.0)) / num_pg_tokens
    kl_loss = jnp.sum(jnp.where(resp > 0, ref_kl, 0.0)) / num_tokens
    loss = pg_loss + kl_coef * kl_loss

    def token_mean(x):
        return jnp.sum(jnp.where(resp > 0, x.astype(f32), 0.0)) / jnp.maximum(local_tokens, 1.0)

    metrics = {
        "loss": loss,
        "pg_loss": pg_loss,
        "ref_kl": kl_loss,
        "clipfrac_low": token_mean(negative & (ratio < 1.0 - clip_low)),
        "clipfrac_high": token_mean((advantages > 0) & (ratio > 1.0 + clip_high)),
        "dual_clip_frac": token_mean(negative & (loss_ppo > loss_dual)),
        "ratio_mean": token_mean(ratio),
        "ppo_kl": token_mean(-log_ratio),
        "filter_keep_frac": jnp.sum(pg) / jnp.maximum(local_tokens, 1.0),
    }
    return loss, metrics

