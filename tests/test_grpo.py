"""GRPO advantages, TAR, perception filter, policy loss and the loss registry (PAPER.md 5-6)."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import numpy_reference as ref
from vlcal_jax.rl import grpo, losses

TOL = dict(rtol=1e-6, atol=1e-6)


def _token_batch(seed, n=6, t_len=9):
    """Random [n, t_len] token arrays with edge rows: one valid token, all-negative A, constant k3."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, t_len + 1, n)
    lengths[0] = 1  # a response with a single valid token
    response = np.arange(t_len)[None, :] < lengths[:, None]
    vision = response & (rng.random((n, t_len)) < 0.6)
    k3 = rng.gamma(0.5, 0.5, (n, t_len)).astype(np.float32)
    k3[2] = 0.25  # constant s_t within a response: std < 1e-6
    ent = rng.gamma(1.0, 1.0, (n, t_len)).astype(np.float32) + 0.01
    ent[2] = 1.5
    adv_rows = rng.normal(size=n).astype(np.float32)
    adv_rows[1] = -abs(adv_rows[1]) - 0.1
    adv = (adv_rows[:, None] * response).astype(np.float32)
    return k3, ent, response, vision, adv


# ---------------------------------------------------------------- group advantages

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_advantages_match_reference(seed):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=24).astype(np.float32)
    rewards[8:16] = 0.7  # a group with equal rewards
    rewards[16:24] = rng.integers(0, 2, 8)  # binary rewards
    got = np.asarray(jax.jit(grpo.group_advantages, static_argnums=1)(rewards, 8))
    np.testing.assert_allclose(got, ref.group_advantages(rewards, 8), **TOL)
    assert np.all(got[8:16] == 0.0)


def test_group_advantages_hand_computed():
    # rewards (1, 0, 0, 0): mean 0.25, Bessel std sqrt(0.75 / 3) = 0.5.
    got = np.asarray(grpo.group_advantages(jnp.array([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1]), 4))
    expected = [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, 0, 0, 0, 0]
    np.testing.assert_allclose(got, expected, **TOL)
    assert np.all(got[4:] == 0.0)


def test_group_advantages_rejects_bad_group_size():
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size"):
        grpo.group_advantages(jnp.zeros(6), 1)


def test_token_advantages_broadcast():
    got = grpo.token_advantages(jnp.array([2.0, -1.0]), jnp.array([[1, 1, 0], [1, 0, 0]]))
    np.testing.assert_array_equal(np.asarray(got), [[2, 2, 0], [-1, 0, 0]])


def test_token_advantages_per_token_are_masked():
    got = grpo.token_advantages(jnp.array([[2.0, 3.0, 4.0], [-1.0, 5.0, 6.0]]), jnp.array([[1, 1, 0], [1, 0, 0]]))
    np.testing.assert_array_equal(np.asarray(got), [[2, 3, 0], [-1, 0, 0]])


def _after_answer_reference(after_rewards, correct, n):
    """rl.post_answer_advantage="reward_to_go", re-derived one response at a time: C_i minus the
    mean C of the group's responses with the same correctness (i included), 0 when i is alone."""
    out = np.zeros(len(after_rewards))
    for i in range(len(after_rewards)):
        group = range(i - i % n, i - i % n + n)
        peers = [after_rewards[j] for j in group if bool(correct[j]) == bool(correct[i])]
        if len(peers) > 1:
            out[i] = after_rewards[i] - sum(peers) / len(peers)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_after_answer_advantages_match_reference(seed):
    rng = np.random.default_rng(seed)
    correct = rng.integers(0, 2, 32).astype(bool)
    correct[:8] = True  # a unanimous group
    correct[8:16] = [True] + [False] * 7  # one right answer alone in its subgroup
    after = (-2.0 * rng.random(32) ** 2).astype(np.float32)
    got = np.asarray(grpo.after_answer_advantages(after, correct, 8))
    np.testing.assert_allclose(got, _after_answer_reference(after, correct, 8), **TOL)
    assert got[8] == 0.0


def test_after_answer_advantages_hand_computed():
    # group 1: right answers C = -0.1, -0.3 (mean -0.2), wrong -1.2, -0.5 (mean -0.85);
    # group 2: wrong -2, -1, -0.5 (mean -7/6), the right one alone -> 0
    got = np.asarray(grpo.after_answer_advantages(
        np.array([-0.1, -0.3, -1.2, -0.5, -2.0, -1.0, -0.5, -1.5], np.float32),
        np.array([1, 1, 0, 0, 0, 0, 0, 1]), 4))
    np.testing.assert_allclose(got, [0.1, -0.1, -0.35, 0.35, -5 / 6, 1 / 6, 2 / 3, 0.0], **TOL)
    with pytest.raises(ValueError, match="group_size"):
        grpo.after_answer_advantages(jnp.zeros(6), jnp.zeros(6), 4)


def test_split_token_advantages():
    got = grpo.split_token_advantages(jnp.array([1.0, -2.0]), jnp.array([5.0, 6.0]),
                                      jnp.array([[0, 1, 1, 1], [0, 0, 1, 1]]), jnp.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(got), [[1, 5, 5, 0], [-2, -2, 6, 6]])


@pytest.mark.parametrize("per_token", [False, True])
def test_confidence_entropy_advantages_match_reference(per_token):
    rng = np.random.default_rng(3)
    n, t = 6, 9
    adv = rng.normal(size=(n, t) if per_token else n).astype(np.float32)
    nll = rng.random((n, t)).astype(np.float32) * 3
    response = (np.arange(t)[None] < rng.integers(3, t + 1, n)[:, None])
    scores = rng.random((n, t)) < 0.3
    scores[0, t - 1] = True  # a score mark on padding is ignored
    response[0, t - 1] = False
    got = np.asarray(grpo.confidence_entropy_advantages(adv, nll, scores, response, 0.25))
    token = (adv if per_token else np.repeat(adv[:, None], t, 1)) * response
    keep = scores & response
    expected = token + np.where(keep, 0.25 * (nll - nll[keep].mean()), 0.0)
    np.testing.assert_allclose(got, expected, **TOL)
    # the bonus has zero mean over the score tokens, and 0 leaves the advantages as they were
    assert abs(float((got - token)[keep].sum())) < 1e-5
    np.testing.assert_allclose(np.asarray(grpo.confidence_entropy_advantages(adv, nll, scores, response, 0.0)),
                               token, **TOL)


# ---------------------------------------------------------------- k3

def test_k3_hand_computed_and_clamps():
    logp = jnp.array([0.0, 0.0, 0.0, -1.0])
    logq = jnp.array([math.log(2.0), -30.0, 0.0, -1.5])
    got = np.asarray(grpo.k3_from_logprobs(logp, logq))
    expected = [2.0 - math.log(2.0) - 1.0, 10.0, 0.0, math.exp(-0.5) + 0.5 - 1.0]
    np.testing.assert_allclose(got, expected, **TOL)
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=50) * 3).astype(np.float32), (rng.normal(size=50) * 3).astype(np.float32)
    np.testing.assert_allclose(np.asarray(grpo.k3_from_logprobs(a, b)), [ref.k3(x, y) for x, y in zip(a, b)], **TOL)
    np.testing.assert_allclose(
        np.asarray(grpo.k3_from_logprobs(a, b, -10.0, 10.0)), [ref.k3(x, y, -10.0, 10.0) for x, y in zip(a, b)],
        **TOL
    )


# ---------------------------------------------------------------- TAR

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_token_advantage_weights_match_reference(seed):
    k3, ent, response, vision, adv = _token_batch(seed)
    got = np.asarray(jax.jit(grpo.token_advantage_weights)(k3, ent, response, vision, adv))
    np.testing.assert_allclose(got, ref.tar_weights_released(k3, ent, response, vision, adv), **TOL)
    assert np.all(got[0] == 1.0)  # a single valid token: z = 0, S = 0.5, w = 1
    assert np.all(got[2] == 1.0)  # constant score: std < 1e-6
    assert np.all(got[~(vision & (adv < 0))] == 1.0)
    assert np.any(got != 1.0)


def test_token_advantage_weights_hand_computed():
    # Two valid vision tokens with s = (0, 2): z = -+1/sqrt(2) (Bessel std sqrt(2)).
    ent = np.array([[1.0, 1.0, 1.0]], np.float32)
    k3 = np.array([[1.0, math.e**2, 5.0]], np.float32)
    response = np.array([[1, 1, 0]], bool)
    adv = np.array([[-1.0, -1.0, 0.0]], np.float32)
    got = np.asarray(grpo.token_advantage_weights(k3, ent, response, response, adv))
    s = [math.log(1.0 + 1e-8) - math.log(1.0 + 1e-8), math.log(math.e**2 + 1e-8) - math.log(1.0 + 1e-8)]
    z = (s[0] - s[1]) / 2 / math.sqrt(((s[0] - s[1]) / 2) ** 2 * 2)
    w = [1.1 - 0.2 * ref.sigmoid(z), 1.1 - 0.2 * ref.sigmoid(-z)]
    np.testing.assert_allclose(got, [[w[0], w[1], 1.0]], **TOL)
    assert abs(w[0] - 1.03395) < 1e-5
    # Positive advantages leave the tokens alone.
    assert np.all(np.asarray(grpo.token_advantage_weights(k3, ent, response, response, -adv)) == 1.0)


def test_tar_weights_paper_hand_computed_and_reference():
    certainty = jnp.array([[0.0, 1.0, 0.5, 0.25]])
    vision = jnp.array([[1, 1, 1, 0]])
    got = np.asarray(grpo.tar_weights_paper(certainty, vision, jnp.array([[-1.0, -2.0, -1.0, -1.0]])))
    np.testing.assert_allclose(got, [[1.1, 0.9, 1.0, 1.0]], **TOL)
    assert np.all(np.asarray(grpo.tar_weights_paper(certainty, vision, jnp.ones((1, 4)))) == 1.0)
    rng = np.random.default_rng(5)
    cert = rng.random((4, 7)).astype(np.float32)
    vis = rng.random((4, 7)) < 0.5
    adv = rng.normal(size=(4, 7)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(grpo.tar_weights_paper(cert, vis, adv, 0.3)), ref.tar_weights_paper(cert, vis, adv, 0.3), **TOL
    )


def test_released_and_paper_forms_agree_for_lambda_0_1():
    k3, ent, response, vision, adv = _token_batch(7)
    from vlcal_jax.rl.certainty import token_certainty

    released = grpo.token_advantage_weights(k3, ent, response, vision, adv)
    paper = grpo.tar_weights_paper(token_certainty(k3, ent, response), vision & response, adv, 0.1)
    np.testing.assert_allclose(np.asarray(released), np.asarray(paper), **TOL)


# ---------------------------------------------------------------- perception filter

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_p", [0.2, 0.5])
def test_perception_mask_matches_reference(seed, top_p):
    k3, _, response, _, _ = _token_batch(seed, n=5, t_len=16)
    k3[3] = np.round(k3[3] * 2) / 2  # many ties
    got = np.asarray(jax.jit(grpo.perception_mask, static_argnums=2)(k3, response, top_p))
    np.testing.assert_array_equal(got, ref.perception_mask(k3, response, top_p))


def test_perception_mask_hand_computed():
    k3 = jnp.array([[0.5, 2.0, 2.0, 0.1, 3.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [4.0, 1.0, 0, 0, 0, 0]])
    response = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    got = np.asarray(grpo.perception_mask(k3, response, 0.5))
    # Row 0: L = 5 -> ceil(2.5) = 3 tokens: k3 3.0, then the tied 2.0s; padding (9.0) never.
    # Row 1: all tied, L = 6 -> 3: the first three. Row 2: no valid token -> nothing.
    np.testing.assert_array_equal(got, [[0, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    # ceil(0.2 * 15) is 3, not the 4 that float round-off in 0.2 * 15 would give.
    assert int(grpo.perception_mask(jnp.arange(15.0)[None], jnp.ones((1, 15)), 0.2).sum()) == 3
    assert int(grpo.perception_mask(jnp.ones((1, 1)), jnp.ones((1, 1)), 0.2).sum()) == 1


# ---------------------------------------------------------------- policy loss

def _loss_inputs(seed, n=6, t_len=8):
    rng = np.random.default_rng(seed)
    k3, _, response, _, adv = _token_batch(seed, n, t_len)
    old = (rng.normal(size=(n, t_len)) - 2).astype(np.float32)
    logp = (old + rng.normal(size=(n, t_len)) * 0.6).astype(np.float32)  # ratios well outside the clip range
    ref_logp = (old + rng.normal(size=(n, t_len)) * 0.3).astype(np.float32)
    return logp, old, ref_logp, adv, response, k3


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("filtered", [False, True])
def test_policy_loss_matches_reference(seed, filtered):
    logp, old, ref_logp, adv, response, k3 = _loss_inputs(seed)
    if seed == 2:
        adv = -np.abs(adv) - 0.5 * response  # all-negative advantages: the dual clip is exercised
    pg_mask = ref.perception_mask(k3, response, 0.2) if filtered else None
    loss, metrics = jax.jit(grpo.policy_loss)(logp, old, ref_logp, adv, response, pg_mask)
    expected, pg_loss, kl_loss = ref.policy_loss(logp, old, ref_logp, adv, response, pg_mask)
    np.testing.assert_allclose(float(loss), expected, **TOL)
    np.testing.assert_allclose(float(metrics["pg_loss"]), pg_loss, **TOL)
    np.testing.assert_allclose(float(metrics["ref_kl"]), kl_loss, **TOL)
    keep = (pg_mask if filtered else response).sum() / response.sum()
    np.testing.assert_allclose(float(metrics["filter_keep_frac"]), keep, **TOL)


def test_policy_loss_hand_computed():
    # A = 1, r = 1.5 -> -1.3 (high clip); A = -1, r = 5 -> 3 (dual clip); A = -1, r = 0.5 -> 0.8.
    logp = jnp.log(jnp.array([[1.5, 5.0, 0.5, 1.0]]))
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -1.0, -1.0, 7.0]])
    response = jnp.array([[1, 1, 1, 0]])
    loss, m = grpo.policy_loss(logp, old, logp, adv, response, kl_coef=0.5)
    np.testing.assert_allclose(float(loss), (-1.3 + 3.0 + 0.8) / 3, **TOL)
    np.testing.assert_allclose(float(m["ref_kl"]), 0.0, atol=1e-7)
    fractions = [float(m[k]) for k in ("clipfrac_high", "clipfrac_low", "dual_clip_frac")]
    np.testing.assert_allclose(fractions, [1 / 3] * 3, **TOL)
    np.testing.assert_allclose(float(m["ratio_mean"]), (1.5 + 5.0 + 0.5) / 3, **TOL)
    # Reference KL: ref - logp = log 2 on one token -> k3 = 1 - log 2, times kl_coef.
    loss2, m2 = grpo.policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.log(jnp.full((1, 1), 2.0)),
                                 jnp.zeros((1, 1)), jnp.ones((1, 1)), kl_coef=0.5)
    np.testing.assert_allclose(float(m2["ref_kl"]), 1 - math.log(2), **TOL)
    np.testing.assert_allclose(float(loss2), 0.5 * (1 - math.log(2)), **TOL)


def test_policy_loss_gradient_vanishes_on_clipped_tokens():
    logp = jnp.log(jnp.array([[1.5, 5.0, 1.1]]))
    adv = jnp.array([[1.0, -1.0, 1.0]])
    grad = jax.grad(lambda lp: grpo.policy_loss(lp, jnp.zeros((1, 3)), lp, adv, jnp.ones((1, 3)))[0])(logp)
    grad = np.asarray(grad)
    assert grad[0, 0] == 0.0 and grad[0, 1] == 0.0  # high clip and dual clip: no gradient
    np.testing.assert_allclose(grad[0, 2], -1.1 / 3, rtol=1e-5)  # d(-A r)/dlogp = -A r, token-mean


def test_policy_loss_global_token_count_splits_exactly():
    logp, old, ref_logp, adv, response, k3 = _loss_inputs(4, n=8)
    pg_mask = ref.perception_mask(k3, response, 0.2)
    full, _ = grpo.policy_loss(logp, old, ref_logp, adv, response, pg_mask, kl_coef=0.1)
    parts = [
        grpo.policy_loss(logp[s], old[s], ref_logp[s], adv[s], response[s], pg_mask[s], kl_coef=0.1,
                         num_tokens=response.sum(), num_pg_tokens=pg_mask.sum())[0]
        for s in (slice(0, 3), slice(3, 8))
    ]
    np.testing.assert_allclose(float(sum(parts)), float(full), **TOL)


# ---------------------------------------------------------------- loss registry

def _registry_inputs(seed):
    k3, ent, response, vision, adv = _token_batch(seed)
    rng = np.random.default_rng(seed + 100)
    stats = {
        "k3": k3, "nll": ent,
        "kl": rng.gamma(0.5, 0.5, k3.shape).astype(np.float32),
        "entropy": rng.gamma(1.0, 1.0, k3.shape).astype(np.float32) + 0.01,
    }
    return stats, adv, response, vision


def test_registry_names_and_unknown_name():
    assert losses.names() == sorted(
        ["grpo", "vl_calibration", "vl_calibration_paper", "vl_calibration_no_tar", "vl_calibration_no_filter"]
    )
    with pytest.raises(ValueError, match="unknown loss 'dapo'"):
        losses.get("dapo")
    with pytest.raises(ValueError, match="already registered"):
        losses.register("grpo")(lambda *a: a)


@functools.lru_cache(maxsize=None)
def _jitted_loss(name):
    return jax.jit(lambda s, a, r, v: losses.get(name)(s, a, r, v, None))


@pytest.mark.parametrize("seed", [0, 1])
def test_registry_entries_match_reference(seed):
    stats, adv, response, vision = _registry_inputs(seed)
    tar = ref.tar_weights_released(stats["k3"], stats["nll"], response, vision, adv)
    certainty = np.stack([ref.token_certainty_row(stats["kl"][i], stats["entropy"][i], response[i])
                          for i in range(len(adv))])
    paper = ref.tar_weights_paper(certainty, vision & response, adv, 0.1)
    keep = ref.perception_mask(stats["k3"], response, 0.2)
    expected = {
        "grpo": (adv, response),
        "vl_calibration": (adv * tar, keep),
        "vl_calibration_paper": (adv * paper, response),
        "vl_calibration_no_tar": (adv, keep),
        "vl_calibration_no_filter": (adv * tar, response),
    }
    affected = response & vision & (adv < 0)
    for name, (eff_expected, mask_expected) in expected.items():
        eff, mask, metrics = _jitted_loss(name)(stats, adv, response, vision)
        np.testing.assert_allclose(np.asarray(eff), eff_expected, err_msg=name, **TOL)
        np.testing.assert_array_equal(np.asarray(mask), mask_expected, err_msg=name)
        weights = (eff_expected / np.where(adv == 0, 1, adv))[affected]
        np.testing.assert_allclose(float(metrics["tar_weight_mean"]), weights.mean(), err_msg=name, **TOL)
        np.testing.assert_allclose(float(metrics["tar_weight_min"]), weights.min(), err_msg=name, **TOL)
        np.testing.assert_allclose(float(metrics["tar_weight_max"]), weights.max(), err_msg=name, **TOL)
        np.testing.assert_allclose(float(metrics["filter_keep_frac"]), mask_expected.sum() / response.sum(), **TOL)


def test_registry_reads_config_numbers():
    stats, adv, response, vision = _registry_inputs(3)
    config = ml_collections.ConfigDict({"w_min": 0.5, "w_max": 1.5, "filter_top_p": 0.5})
    eff, mask, _ = losses.get("vl_calibration")(stats, adv, response, vision, config)
    tar = ref.tar_weights_released(stats["k3"], stats["nll"], response, vision, adv, 0.5, 1.5)
    np.testing.assert_allclose(np.asarray(eff), adv * tar, **TOL)
    np.testing.assert_array_equal(np.asarray(mask), ref.perception_mask(stats["k3"], response, 0.5))
    eff, _, _ = losses.get("vl_calibration_paper")(stats, adv, response, vision, {"lambda_tar": 0.4})
    certainty = np.stack([ref.token_certainty_row(stats["kl"][i], stats["entropy"][i], response[i])
                          for i in range(len(adv))])
    paper = ref.tar_weights_paper(certainty, vision & response, adv, 0.4)
    np.testing.assert_allclose(np.asarray(eff), adv * paper, **TOL)


def test_group_scales_are_one_over_the_groups_std():
    rewards = np.array([0.1, 0.7, -0.4, 0.2, 0.5, 0.5, 0.5, 0.5], np.float32)
    got = np.asarray(grpo.group_scales(rewards, 4))
    want = 1.0 / (np.std(rewards[:4], ddof=1) + grpo.ADV_EPS)
    np.testing.assert_allclose(got[:4], want, rtol=1e-6)
    assert got[4:].tolist() == [0.0] * 4  # a constant group: GRPO gives it no gradient


def test_score_expectation_is_an_unbiased_noise_free_score_gradient():
    """Over every token s the policy could sample at a score's first token, the expectation of
    the update's logit gradient (score_expectation_loss over the known digits + the sampled
    token's own term where it is not one) is the exact gradient of E_pi[f] (f: each token's
    reward, any baseline); a known digit's sampled term is cleared, an unknown one's kept."""
    from vlcal_jax.rl import step

    rng = np.random.default_rng(0)
    vocab, digit_ids, baseline, scale = 14, tuple(range(2, 12)), 0.3, 1.7
    known = [d != 1 for d in range(10)]
    z = jnp.asarray(rng.normal(size=vocab), jnp.float32)
    f = rng.normal(size=vocab)
    pi = np.asarray(jax.nn.softmax(z), np.float64)
    expected = np.zeros(vocab)
    for s in range(vocab):
        tokens = np.array([[0, s, 0]])
        token_adv = np.array([[0.4, scale * (f[s] - baseline), -0.2]], np.float32)
        delta = (f[list(digit_ids)] - f[s])[None, None]
        score_adv, cleared = grpo.score_expectation_advantages(token_adv, tokens, np.array([[1]]), delta,
                                                               np.array([[scale]]), digit_ids, known)
        np.testing.assert_allclose(np.asarray(score_adv)[0, 0],
                                   np.where(known, scale * (f[list(digit_ids)] - baseline), 0.0), rtol=1e-5, atol=1e-5)
        is_known = s in digit_ids and known[digit_ids.index(s)]
        assert np.asarray(cleared)[0].tolist() == pytest.approx([0.4, 0.0 if is_known else token_adv[0, 1], -0.2])

        def loss(logits):
            hidden = jnp.broadcast_to(logits, (1, 3, vocab))
            expectation = step.score_expectation_loss(hidden, jnp.eye(vocab), jnp.array([[1]]), score_adv, digit_ids)
            return expectation - cleared[0, 1] * jax.nn.log_softmax(logits)[s]

        expected += pi[s] * np.asarray(jax.grad(loss)(z), np.float64)
    exact = -scale * pi * (f - pi @ f)  # -d/dz of scale * E_pi[f - baseline]
    np.testing.assert_allclose(expected, exact, rtol=1e-4, atol=1e-6)
    # no score: nothing
    score_adv, cleared = grpo.score_expectation_advantages(np.ones((1, 3)), np.zeros((1, 3), int), np.array([[-1]]),
                                                           np.ones((1, 1, 10)), np.ones((1, 1)), digit_ids, known)
    assert not np.asarray(score_adv).any() and np.asarray(cleared).tolist() == [[1.0, 1.0, 1.0]]
