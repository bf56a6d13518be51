"""Visual certainty estimation (PAPER.md section 4): soft labels, token statistics, chunking."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference as ref
from vlcal_jax.rl import certainty, rollout

TOL = dict(rtol=1e-6, atol=1e-6)
B, T, D, V, K = 3, 7, 8, 32, 3


# ---------------------------------------------------------------- soft labels

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_soft_labels_match_reference(seed):
    rng = np.random.default_rng(seed)
    kl = rng.gamma(0.5, 0.2, 16).astype(np.float32)
    kl[3] = 0.0  # a response whose perturbation changed nothing
    entropy = rng.gamma(2.0, 0.5, 16).astype(np.float32)
    valid = rng.random(16) < 0.8
    valid[0] = False
    got = np.asarray(certainty.soft_labels(kl, entropy, valid))
    np.testing.assert_allclose(got[valid], ref.soft_labels(kl, entropy, valid)[valid], **TOL)
    assert np.isnan(got[~valid]).all()  # no span: no label


def test_soft_labels_hand_computed_and_degenerate():
    # Two valid responses: the population z-scores are exactly -1 and +1 whatever S is.
    got = np.asarray(certainty.soft_labels(jnp.array([0.1, 0.5, 9.0]), jnp.ones(3), jnp.array([1, 1, 0])))
    np.testing.assert_allclose(got, [1 / (1 + math.e), 1 / (1 + math.exp(-1)), np.nan], **TOL)
    # All scores equal: std < 1e-6 -> every z = 0 -> 0.5. A single valid response: the same.
    same = certainty.soft_labels(jnp.full(4, 0.2), jnp.full(4, 0.7), jnp.ones(4, bool))
    np.testing.assert_array_equal(np.asarray(same), 0.5)
    one = certainty.soft_labels(jnp.array([0.2, 0.3]), jnp.array([1.0, 2.0]), jnp.array([True, False]))
    np.testing.assert_array_equal(np.asarray(one), [0.5, np.nan])
    # A non-finite statistic (a vision span that covered no token) gets no label and no say in the z-score.
    with_nan = certainty.soft_labels(jnp.array([0.2, np.nan, 0.1]), jnp.array([1.0, 1.0, 2.0]), jnp.ones(3, bool))
    np.testing.assert_allclose(np.asarray(with_nan), [1 / (1 + math.exp(-1)), np.nan, 1 / (1 + math.e)], **TOL)


# ---------------------------------------------------------------- token statistics

def _logits(seed, k=K):
    rng = np.random.default_rng(seed)
    clean = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
    pert = (clean[None] + rng.normal(size=(k, B, T, V)) * 0.7).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    return clean, pert, targets


@pytest.mark.parametrize("seed", [0, 1])
def test_token_stats_match_direct_numpy(seed):
    clean, pert, targets = _logits(seed)
    got = certainty.token_stats_from_logits(clean, pert, targets)
    for k in range(K):
        expected = ref.token_stats_from_logits(clean, pert[k], targets)
        for key in certainty.PERTURBED_KEYS:
            np.testing.assert_allclose(np.asarray(got[key][k]), expected[key], err_msg=key, rtol=1e-5, atol=1e-6)
    for key in ("logp", "nll", "entropy"):
        np.testing.assert_allclose(np.asarray(got[key]), expected[key], err_msg=key, rtol=1e-5, atol=1e-6)
    single = certainty.token_stats_from_logits(clean, pert[1], targets)
    for key in certainty.PERTURBED_KEYS:
        np.testing.assert_array_equal(np.asarray(single[key]), np.asarray(got[key][1]))


def test_sampled_kl_proxy_clamps_the_log_ratio_like_the_release():
    # Released compute_kl: p(o) * clamp(log p(o) - log q(o), -20, 20), then clamped to [0, 10].
    # p = 0.3 and log q = log p - 30: 0.3 * 20 = 6.0 (without the inner clamp 0.3 * 30 = 9.0).
    logp = math.log(0.3)
    clean = jnp.array([[[logp, math.log(0.7)]]], jnp.float32)
    pert = jnp.array([[[logp - 30.0, 0.0]]], jnp.float32)
    targets = jnp.zeros((1, 1), jnp.int32)
    got = certainty.token_stats_from_logits(clean, pert, targets)
    assert float(got["kl_sample"][0, 0]) == pytest.approx(6.0, rel=1e-5)
    chunked = certainty.chunked_token_stats(clean, pert, jnp.eye(2), targets, chunk_size=1)
    assert float(chunked["kl_sample"][0, 0]) == pytest.approx(6.0, rel=1e-5)
    assert ref.token_stats_from_logits(np.asarray(clean), np.asarray(pert), np.asarray(targets))[
        "kl_sample"][0, 0] == pytest.approx(6.0, rel=1e-5)


def test_token_stats_identical_images_give_zero_kl():
    clean, _, targets = _logits(3)
    got = certainty.token_stats_from_logits(clean, clean, targets)
    for key in ("kl", "kl_sample", "k3"):
        np.testing.assert_allclose(np.asarray(got[key]), 0.0, atol=1e-6)
    # Uniform logits: entropy log V exactly.
    zeros = jnp.zeros((1, 1, V))
    uniform = certainty.token_stats_from_logits(zeros, zeros, jnp.zeros((1, 1), jnp.int32))
    np.testing.assert_allclose(float(uniform["entropy"][0, 0]), math.log(V), **TOL)
    np.testing.assert_allclose(float(uniform["nll"][0, 0]), math.log(V), **TOL)


def _hidden(seed):
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(B, T, D)).astype(np.float32)
    pert = (clean[None] + rng.normal(size=(K, B, T, D)) * 0.5).astype(np.float32)
    lm_head = (rng.normal(size=(D, V)) * 0.7).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    return clean, pert, lm_head, targets


@pytest.mark.parametrize("chunk_size", [3, 7])  # 3 does not divide T = 7: padded last chunk
def test_chunked_equals_unchunked(chunk_size):
    clean, pert, lm_head, targets = _hidden(0)
    hp = jax.lax.Precision.HIGHEST
    full = certainty.token_stats_from_logits(
        jnp.einsum("btd,dv->btv", clean, lm_head, precision=hp),
        jnp.einsum("kbtd,dv->kbtv", pert, lm_head, precision=hp),
        targets,
    )
    chunked = certainty.chunked_token_stats(clean, pert, lm_head, targets, chunk_size=chunk_size, precision=hp)
    assert set(chunked) == set(full)
    for key, value in full.items():
        assert chunked[key].shape == value.shape, key
        np.testing.assert_allclose(np.asarray(chunked[key]), np.asarray(value), err_msg=key, **TOL)


def test_chunked_k_vmap_equals_loop_over_k():
    clean, pert, lm_head, targets = _hidden(1)
    batched = certainty.chunked_token_stats(clean, pert, lm_head, targets, chunk_size=4)
    for k in range(K):
        one = certainty.chunked_token_stats(clean, pert[k], lm_head, targets, chunk_size=4)
        for key in certainty.PERTURBED_KEYS:
            assert one[key].shape == (B, T)
            np.testing.assert_allclose(np.asarray(batched[key][k]), np.asarray(one[key]), err_msg=key, **TOL)


# ---------------------------------------------------------------- response statistics and labels

def _token_stats(seed, n=6, t_len=8):
    rng = np.random.default_rng(seed)
    stats = {key: rng.gamma(1.0, 0.5, (n, t_len)).astype(np.float32) for key in ("kl", "entropy", "kl_sample", "nll")}
    vision = rng.random((n, t_len)) < 0.5
    vision[2] = False  # no vision span
    return stats, vision


def test_response_vision_stats_and_soft_label_variants():
    stats, vision = _token_stats(0)
    for variant, (kl_key, ent_key) in {"paper": ("kl", "entropy"), "released": ("kl_sample", "nll")}.items():
        kl, entropy = rollout.response_vision_stats(stats, vision, variant)
        for got, key in ((kl, kl_key), (entropy, ent_key)):
            expected = [stats[key][i][vision[i]].mean() if vision[i].any() else np.nan for i in range(len(vision))]
            np.testing.assert_allclose(got, expected, err_msg=f"{variant} {key}", **TOL)
        labels = np.asarray(certainty.soft_labels(kl, entropy, vision.any(axis=1)))
        expected = ref.soft_labels(kl, entropy, vision.any(axis=1))
        np.testing.assert_allclose(np.delete(labels, 2), np.delete(expected, 2), err_msg=variant, **TOL)
        assert np.isnan(labels[2])
    with pytest.raises(ValueError, match="unknown soft-label variant"):
        rollout.response_vision_stats(stats, vision, "exact")


def test_mean_over_perturbations():
    clean, pert, targets = _logits(4)
    stats = certainty.mean_over_perturbations(certainty.token_stats_from_logits(clean, pert, targets))
    per_k = [certainty.token_stats_from_logits(clean, pert[k], targets) for k in range(K)]
    for key in certainty.PERTURBED_KEYS:
        np.testing.assert_allclose(np.asarray(stats[key]), np.mean([np.asarray(s[key]) for s in per_k], 0), **TOL)
    np.testing.assert_array_equal(np.asarray(stats["entropy"]), np.asarray(per_k[0]["entropy"]))


def test_token_certainty_matches_reference():
    stats, vision = _token_stats(5)
    mask = vision.copy()
    mask[0] = False
    mask[0, 3] = True  # a single selected token
    got = np.asarray(certainty.token_certainty(stats["kl"], stats["entropy"], mask))
    expected = np.stack([ref.token_certainty_row(stats["kl"][i], stats["entropy"][i], mask[i])
                         for i in range(len(mask))])
    np.testing.assert_allclose(got, expected, **TOL)
    assert np.all(got[0] == 0.5)


def test_chunked_never_holds_full_logits():
    # The compiled kernel's scratch memory stays below ONE [B, T, V] float32 array, while the
    # unchunked path needs several of them.
    b, t_len, d, v, k = 2, 128, 16, 1024, 2
    shapes = [(b, t_len, d), (k, b, t_len, d), (d, v)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes] + [jax.ShapeDtypeStruct((b, t_len), jnp.int32)]
    full_logits_bytes = b * t_len * v * 4
    chunked = certainty.chunked_token_stats.lower(*args, chunk_size=8).compile().memory_analysis()
    assert chunked.temp_size_in_bytes < full_logits_bytes
    unchunked = jax.jit(lambda h, hp, w, tg: certainty.token_stats_from_logits(h @ w, hp @ w, tg))
    assert unchunked.lower(*args).compile().memory_analysis().temp_size_in_bytes > 2 * full_logits_bytes
