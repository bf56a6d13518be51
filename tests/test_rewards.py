"""rl.rewards: hand-computed values for every branch of PAPER.md section 3 and the section 4 soft labels."""

import math
import statistics

import numpy as np
import pytest

from vlcal_jax.rl import certainty, rewards


def decoupled(answer="4", vision="I see four apples.", v="8", r="6", analysis=True):
    vision_part = f"<vision>{vision}</vision>" if vision is not None else ""
    scores = "<confidence>"
    scores += f"<vision_confidence>{v}</vision_confidence>" if v is not None else ""
    scores += f"<reasoning_confidence>{r}</reasoning_confidence>" if r is not None else ""
    scores += "</confidence>"
    return (
        f"<think>{vision_part}<reasoning>Count them.</reasoning></think> The answer is \\boxed{{{answer}}}. "
        + ("<analysis>Clear image.</analysis>" if analysis else "")
        + scores
    )


LABEL_TOL = 1e-6  # soft labels are computed in float32 (certainty.soft_labels, jitted)


def reference_soft_labels(kl, entropy):
    """Section 4 written out with the standard library."""
    scores = [math.log(k + 1e-8) - math.log(h + 1e-8) for k, h in zip(kl, entropy)]
    mean, std = statistics.fmean(scores), statistics.pstdev(scores)
    z = [0.0] * len(scores) if std < 1e-6 else [(s - mean) / std for s in scores]
    return [1.0 / (1.0 + math.exp(-x)) for x in z]


def test_registry():
    assert {"vl_calibration", "rlcr", "rlcr_vlm", "rlvr", "rlvr_easyr1"} <= set(rewards.available())
    assert rewards.get("vl_calibration") is rewards.vl_calibration
    with pytest.raises(ValueError, match="unknown reward 'rlhf'.*registered"):
        rewards.get("rlhf")
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("rlvr")(lambda responses, golds, **kw: {})

    @rewards.register("test_constant")
    def constant(responses, golds, **kwargs):
        return {"reward": np.ones(len(responses))}

    try:
        assert rewards.get("test_constant")(["a"], ["b"])["reward"].tolist() == [1.0]
    finally:
        rewards._REGISTRY.pop("test_constant")


def test_vl_calibration_every_branch_by_hand():
    responses = [
        decoupled(),                              # 0: valid, correct, v = 0.8, r = 0.6
        decoupled(answer="5"),                    # 1: valid, wrong
        decoupled(v=None),                        # 2: vision confidence missing
        decoupled(vision=None),                   # 3: no <vision> span
        decoupled(v="0"),                         # 4: zero vision confidence
        decoupled(analysis=False),                # 5: invalid format, confidences still parse
        decoupled(v="12"),                        # 6: score out of range -> missing
    ]
    golds = ["4"] * len(responses)
    kl = np.array([0.2, 0.1, 0.4, 99.0, 0.3, 0.05, 0.2])
    entropy = np.array([1.0, 2.0, 0.5, 0.01, 1.0, 0.5, 1.5])
    out = rewards.get("vl_calibration")(responses, golds, vision_kl=kl, vision_entropy=entropy)

    has_vision = [True, True, True, False, True, True, True]
    assert out["has_vision"].tolist() == has_vision
    labels = reference_soft_labels(kl[has_vision], entropy[has_vision])
    expected_labels = [labels[0], labels[1], labels[2], math.nan, labels[3], labels[4], labels[5]]
    np.testing.assert_allclose(out["soft_label"], expected_labels, rtol=0, atol=LABEL_TOL)

    phi = 2 * 0.8 * 0.6 / (0.8 + 0.6)
    accuracy = [1, 0, 1, 1, 1, 1, 1]
    fmt = [1, 1, 0, 0, 1, 0, 0]  # 2: a missing score breaks the layout; 3: no vision; 6: score > 10
    brier = [-(phi - 1) ** 2, -(phi - 0) ** 2, -1.0, -(phi - 1) ** 2, -(0 - 1) ** 2, -(phi - 1) ** 2, -1.0]
    r_vis = [-(0.8 - labels[0]) ** 2, -(0.8 - labels[1]) ** 2, -1.0, -1.0, -(0.0 - labels[3]) ** 2,
             -(0.8 - labels[4]) ** 2, -1.0]
    expected = [a + 2.0 * b + 0.4 * f + 0.4 * v for a, b, f, v in zip(accuracy, brier, fmt, r_vis)]
    np.testing.assert_allclose(out["accuracy"], accuracy)
    np.testing.assert_allclose(out["format"], fmt)
    np.testing.assert_allclose(out["brier"], brier, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["r_vis"], r_vis, rtol=0, atol=LABEL_TOL)
    np.testing.assert_allclose(out["reward"], expected, rtol=0, atol=LABEL_TOL)
    np.testing.assert_allclose(rewards.total_reward(accuracy, brier, fmt, r_vis, lambda_acc=1.0, lambda_cal=2.0,
                                                    lambda_fmt=0.4, lambda_vis=0.4), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["confidence"], [phi, phi, np.nan, phi, 0.0, phi, np.nan], rtol=0, atol=1e-12)
    assert out["has_confidence"].tolist() == [True, True, False, True, True, True, False]
    # One response: std 0, so S_vis = 0.5; R = 1 + 2 * -(0.6857 - 1)^2 + 0.4 - 0.4 * (0.8 - 0.5)^2.
    single = rewards.vl_calibration([decoupled()], ["4"], vision_kl=[0.2], vision_entropy=[1.0])
    assert single["soft_label"][0] == 0.5
    assert single["reward"][0] == pytest.approx(1 + 2 * -(phi - 1) ** 2 + 0.4 - 0.4 * 0.09, abs=1e-12)


def test_vl_calibration_weights_and_missing_statistics():
    responses, golds = [decoupled(), decoupled(answer="7")], ["4", "4"]
    with pytest.raises(ValueError, match="vision_kl and vision_entropy.*lambda_vis=0"):
        rewards.vl_calibration(responses, golds)
    out = rewards.vl_calibration(responses, golds, lambda_vis=0.0, lambda_cal=1.0, lambda_fmt=0.0, lambda_acc=3.0)
    phi = 2 * 0.8 * 0.6 / 1.4
    np.testing.assert_allclose(out["reward"], [3 - (phi - 1) ** 2, -phi**2], rtol=0, atol=1e-12)
    assert out["r_vis"].tolist() == [-1.0, -1.0] and np.isnan(out["soft_label"]).all()
    with pytest.raises(ValueError, match=r"must be \[2\]"):
        rewards.vl_calibration(responses, golds, vision_kl=[0.1], vision_entropy=[0.2])
    with pytest.raises(ValueError, match="one gold per response"):
        rewards.vl_calibration(responses, ["4"], lambda_vis=0.0)
    with pytest.raises(TypeError):
        rewards.vl_calibration(responses, golds, lambda_vis=0.0, lambda_visual=1.0)


def test_soft_labels_in_the_reward():
    rng = np.random.default_rng(0)
    responses = [decoupled() if rng.random() < 0.7 else decoupled(vision=None) for _ in range(16)]
    kl, entropy = rng.random(16) * 0.5, rng.random(16) * 3
    out = rewards.vl_calibration(responses, ["4"] * 16, vision_kl=kl, vision_entropy=entropy)
    valid = out["has_vision"]
    assert 0 < valid.sum() < 16
    np.testing.assert_allclose(out["soft_label"][valid], reference_soft_labels(kl[valid], entropy[valid]),
                               rtol=0, atol=LABEL_TOL)
    assert np.isnan(out["soft_label"][~valid]).all() and (out["r_vis"][~valid] == -1.0).all()
    # A non-finite statistic (a vision span that covered no token) gets no label and no say in the z-score.
    with_nan = rewards.vl_calibration([decoupled()] * 3, ["4"] * 3, vision_kl=[0.2, np.nan, 0.1],
                                      vision_entropy=[1.0, 1.0, 2.0])["soft_label"]
    np.testing.assert_allclose(with_nan, [reference_soft_labels([0.2, 0.1], [1.0, 2.0])[0], np.nan,
                                          reference_soft_labels([0.2, 0.1], [1.0, 2.0])[1]], atol=LABEL_TOL)
    with pytest.raises(ValueError, match=">= 0"):
        rewards.vl_calibration([decoupled()] * 2, ["4"] * 2, vision_kl=[-0.1, 0.2], vision_entropy=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"must be \[2\]"):
        rewards.vl_calibration([decoupled()] * 2, ["4"] * 2, vision_kl=[0.1, 0.2], vision_entropy=[1.0])


def test_equation_functions():
    np.testing.assert_allclose(rewards.harmonic_confidence([0.8, 0.0, np.nan, 1.0], [0.6, 0.5, 0.5, 1.0]),
                               [0.96 / 1.4, 0.0, np.nan, 1.0])
    assert rewards.brier_term([np.nan, 0.3, 0.3], [1, 1, 0]).tolist() == pytest.approx([-1.0, -0.49, -0.09])
    assert rewards.visual_calibration_term([0.5, np.nan, 0.5], [0.25, 0.5, np.nan]).tolist() == [-0.0625, -1.0, -1.0]
    assert float(certainty.visual_certainty_score(np.array([np.e - 1e-8]), np.array([1 - 1e-8]))[0]) == \
        pytest.approx(1.0, abs=1e-6)


def rlcr_response(answer="4", confidence="7", analysis=True):
    return (f"<think>Count.</think>\\boxed{{{answer}}}" + ("<analysis>ok</analysis>" if analysis else "")
            + (f"<confidence>{confidence}</confidence>" if confidence is not None else ""))


def test_rlcr_and_rlcr_vlm_by_hand():
    responses = [rlcr_response(), rlcr_response(answer="5"), rlcr_response(confidence=None),
                 rlcr_response(confidence="12"), rlcr_response(analysis=False)]
    golds = ["4"] * 5
    out = rewards.get("rlcr")(responses, golds)
    np.testing.assert_allclose(out["reward"], [1 - 0.09, 0 - 0.49, 1 - 1, 1 - 1, 1 - 0.09], atol=1e-12)
    np.testing.assert_allclose(out["format"], [1, 1, 0, 0, 0])
    vlm = rewards.get("rlcr_vlm")(responses, golds)
    q = 0.7**1.3
    expected_q = [q, q, 0.5, 1.0, q]
    # Released format term: 12 parses but is outside [1, 10] (0.5); no analysis fails the layout (0).
    np.testing.assert_allclose(vlm["format"], [1, 1, 0, 0.5, 0])
    expected = [1 - 0.8 * (q - 1) ** 2 + 0.4, -0.8 * q**2 + 0.4, 1 - 0.8 * 0.25, 1 + 0.4 * 0.5,
                1 - 0.8 * (q - 1) ** 2]
    np.testing.assert_allclose(vlm["confidence"], expected_q, atol=1e-12)
    np.testing.assert_allclose(vlm["reward"], expected, atol=1e-12)


def test_rlcr_vlm_format_matches_the_release():
    # examples/reward_function/rlcr_vlm.py: re.fullmatch of the whole (normalised) response;
    # 1.0 for a score in [1, 10], 0.5 for any other number, 0.0 for no match or no number.
    responses = [rlcr_response(confidence="0"), rlcr_response() + " Done.", rlcr_response(confidence="1"),
                 rlcr_response(confidence="10"), rlcr_response(confidence="0.5"), rlcr_response(confidence="high"),
                 "Sure. " + rlcr_response(), rlcr_response(confidence=" 7 ") + "\n"]
    out = rewards.get("rlcr_vlm")(responses, ["4"] * len(responses))
    np.testing.assert_allclose(out["format"], [0.5, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0, 1.0])
    zero = 0.0 ** 1.3
    assert out["reward"][0] == pytest.approx(1 - 0.8 * (zero - 1) ** 2 + 0.4 * 0.5)
    assert out["reward"][1] == pytest.approx(1 - 0.8 * (0.7**1.3 - 1) ** 2)


def test_rlvr_by_hand_and_choices():
    responses = ["<think>t</think>\\boxed{B}", "\\boxed{12}", "<think>t</think> no box", "<think>t</think>\\boxed{(C)}"]
    golds = ["B", "B", "B", "B"]
    choices = [None, ["10", "12", "14"], None, ["10", "12", "14"]]
    out = rewards.get("rlvr")(responses, golds, choices=choices)
    assert out["reward"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out["format"].tolist() == [1.0, 0.0, 0.0, 1.0]
    easy = rewards.get("rlvr_easyr1")(responses, golds, choices=choices)
    np.testing.assert_allclose(easy["reward"], [1.0, 0.9, 0.0, 0.1])
    with pytest.raises(ValueError, match="choices has 1 entries"):
        rewards.rlvr(responses, golds, choices=[None])
