"""Reward functions by name (PAPER.md section 3), host-side NumPy; the section 4 soft
labels inside R_vis come from `certainty.soft_labels`.

`get(name)` returns a batch function

    fn(responses: list[str], golds: list[str], *, choices=None, vision_kl=None,
       vision_entropy=None, **weights) -> dict[str, np.ndarray]

whose result has "reward" [N], "accuracy_reward" [N] (the reward's accuracy term, lambda I: the
part that a response's tokens after its answer cannot change; rl.post_answer_advantage) and
every component for logging (accuracy, format, brier,
confidences, ...; a missing value is nan). Names: "vl_calibration", "rlcr", "rlcr_vlm",
"rlvr", "rlvr_easyr1". `register(name)` adds one. `choices` is None or one entry per
response (None or the option list of a multiple-choice question). Every function accepts
vision_kl / vision_entropy (those that do not use them ignore them), so one call site serves
every name; weights are keyword arguments with the released defaults.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vlcal_jax.rl import certainty
from vlcal_jax.rl.format import parse_response, rlcr_vlm_format_score
from vlcal_jax.rl.grading import grade_answer

RewardFn = Callable[..., dict[str, np.ndarray]]
_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a batch reward function to the registry under `name`."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is already registered (by {_REGISTRY[name].__module__}); pick another name")
        _REGISTRY[name] = fn
        return fn

    return add


def get(name: str) -> RewardFn:
    """The batch reward function registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available() -> list[str]:
    """Registered reward names."""
    return sorted(_REGISTRY)


def harmonic_confidence(vision_confidence, reasoning_confidence) -> np.ndarray:
    """Phi = 2 v r / (v + r), 0 when v or r is 0, nan when either is missing (PAPER.md section 3).

    vision_confidence [N], reasoning_confidence [N] in [0, 1] (nan = missing) -> [N].
    """
    v = np.asarray(vision_confidence, dtype=np.float64)
    r = np.asarray(reasoning_confidence, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        phi = np.where((v == 0.0) | (r == 0.0), 0.0, 2.0 * v * r / (v + r))
    return np.where(np.isnan(v) | np.isnan(r), np.nan, phi)


def brier_term(confidence, correct) -> np.ndarray:
    """B = -(c - I)^2, and -1 where the confidence is missing (nan) (PAPER.md section 3). [N] -> [N]."""
    c = np.asarray(confidence, dtype=np.float64)
    i = np.asarray(correct, dtype=np.float64)
    return np.where(np.isnan(c), -1.0, -((c - i) ** 2))


def visual_calibration_term(vision_confidence, soft_label) -> np.ndarray:
    """R_vis = -(v - sg(S_vis))^2, and -1 where v or the soft label is missing (PAPER.md section 3). [N] -> [N]."""
    v = np.asarray(vision_confidence, dtype=np.float64)
    s = np.asarray(soft_label, dtype=np.float64)
    return np.where(np.isnan(v) | np.isnan(s), -1.0, -((v - s) ** 2))


def total_reward(accuracy, brier, fmt, r_vis, *, lambda_acc: float, lambda_cal: float, lambda_fmt: float,
                 lambda_vis: float) -> np.ndarray:
    """R = lambda_acc I + lambda_cal B + lambda_fmt fmt + lambda_vis R_vis (PAPER.md section 3). [N] -> [N]."""
    return (lambda_acc * np.asarray(accuracy, np.float64) + lambda_cal * np.asarray(brier, np.float64)
            + lambda_fmt * np.asarray(fmt, np.float64) + lambda_vis * np.asarray(r_vis, np.float64))


def batch_soft_labels(vision_kl, vision_entropy, has_vision) -> np.ndarray:
    """Checks the per-response vision statistics [N] and returns `certainty.soft_labels` (nan = no label)."""
    kl, entropy = np.asarray(vision_kl, np.float64), np.asarray(vision_entropy, np.float64)
    n = len(has_vision)
    if kl.shape != (n,) or entropy.shape != (n,):
        raise ValueError(f"vision_kl {kl.shape} and vision_entropy {entropy.shape} must be [{n}]")
    if np.any(kl[np.isfinite(kl)] < 0) or np.any(entropy[np.isfinite(entropy)] < 0):
        raise ValueError("vision_kl and vision_entropy must be >= 0 (a KL divergence and an entropy)")
    return np.asarray(certainty.soft_labels(kl, entropy, np.asarray(has_vision, bool)), np.float64)


def _check_batch(responses, golds, choices) -> list:
    if isinstance(responses, str) or isinstance(golds, str):
        raise TypeError("responses and golds must be lists of strings, one per response, not a single str")
    if len(responses) != len(golds):
        raise ValueError(f"got {len(responses)} responses but {len(golds)} gold answers; pass one gold per response")
    if choices is None:
        return [None] * len(responses)
    if len(choices) != len(responses):
        raise ValueError(f"choices has {len(choices)} entries for {len(responses)} responses; pass one (or None) each")
    return list(choices)


def _grade(parsed, golds, choices) -> np.ndarray:
    return np.array(
        [float(p.answer is not None and grade_answer(p.answer, g, c)) for p, g, c in zip(parsed, golds, choices)]
    )


def _optional(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@register("vl_calibration")
def vl_calibration(
    responses, golds, *, choices=None, vision_kl=None, vision_entropy=None,
    lambda_acc: float = 1.0, lambda_cal: float = 2.0, lambda_fmt: float = 0.4, lambda_vis: float = 0.4,
    soft_label=None,
) -> dict[str, np.ndarray]:
    """R = lambda_acc I + lambda_cal B + lambda_fmt fmt + lambda_vis R_vis (PAPER.md section 3).

    vision_kl [N], vision_entropy [N]: the response's mean KL and entropy over its `<vision>`
    tokens (section 4, `rollout.response_vision_stats`; nan where it has none); the soft
    labels (`certainty.soft_labels`) are computed over this batch.
    Both may be None only with lambda_vis = 0 (R_vis is then -1 everywhere, as in the
    released code without statistics). `soft_label` [N]: labels already computed over a larger
    batch that these responses are part of (a multi-process step: `certainty.soft_labels` over
    every process's responses); it replaces the labels of this batch.
    """
    choices = _check_batch(responses, golds, choices)
    parsed = [parse_response(text, "decoupled") for text in responses]
    accuracy = _grade(parsed, golds, choices)
    fmt = np.array([float(p.format_ok) for p in parsed])
    v = _optional(p.vision_confidence for p in parsed)
    r = _optional(p.reasoning_confidence for p in parsed)
    has_vision = np.array([p.has_vision for p in parsed])
    if soft_label is not None:
        labels = np.asarray(soft_label, np.float64)
        if labels.shape != (len(parsed),):
            raise ValueError(f"soft_label {labels.shape} must be [{len(parsed)}]")
    elif vision_kl is None or vision_entropy is None:
        if lambda_vis != 0.0:
            raise ValueError(
                "vl_calibration needs vision_kl and vision_entropy [N] (PAPER.md section 4) to build the soft "
                "visual labels; compute them with rollout.response_vision_stats, or pass lambda_vis=0 to drop R_vis"
            )
        labels = np.full(len(parsed), np.nan)
    else:
        labels = batch_soft_labels(vision_kl, vision_entropy, has_vision)
    phi = harmonic_confidence(v, r)
    brier = brier_term(phi, accuracy)
    r_vis = visual_calibration_term(v, labels)
    reward = total_reward(accuracy, brier, fmt, r_vis, lambda_acc=lambda_acc, lambda_cal=lambda_cal,
                          lambda_fmt=lambda_fmt, lambda_vis=lambda_vis)
    return {
        "reward": reward, "accuracy_reward": lambda_acc * accuracy, "accuracy": accuracy, "format": fmt,
        "brier": brier, "r_vis": r_vis,
        "vision_confidence": v, "reasoning_confidence": r, "confidence": phi, "soft_label": labels,
        "has_vision": has_vision, "has_confidence": ~np.isnan(phi),
    }


def _rlcr_parts(responses, golds, choices):
    choices = _check_batch(responses, golds, choices)
    parsed = [parse_response(text, "rlcr") for text in responses]
    return parsed, _grade(parsed, golds, choices), np.array([float(p.format_ok) for p in parsed])


@register("rlcr")
def rlcr(responses, golds, *, choices=None, vision_kl=None, vision_entropy=None,
         lambda_cal: float = 1.0) -> dict[str, np.ndarray]:
    """RLCR (Damani et al. 2025): R = I - (q - I)^2, q = c / 10; B = -1 when q is missing (PAPER.md section 3)."""
    parsed, accuracy, fmt = _rlcr_parts(responses, golds, choices)
    q = _optional(p.confidence for p in parsed)
    brier = brier_term(q, accuracy)
    return {"reward": accuracy + lambda_cal * brier, "accuracy_reward": accuracy, "accuracy": accuracy,
            "format": fmt, "brier": brier,
            "confidence": q, "has_confidence": ~np.isnan(q)}


@register("rlcr_vlm")
def rlcr_vlm(responses, golds, *, choices=None, vision_kl=None, vision_entropy=None,
             exponent: float = 1.3, lambda_cal: float = 0.8, lambda_fmt: float = 0.4,
             missing_confidence: float = 0.5) -> dict[str, np.ndarray]:
    """The authors' VLM RLCR: q = clip((c/10)^1.3, 0, 1), q = 0.5 if missing; R = I + 0.8 B + 0.4 fmt (section 3).

    fmt is the released graded term (`format.rlcr_vlm_format_score`: 1, 0.5 or 0), not RLCR's 0/1.
    """
    parsed, accuracy, _ = _rlcr_parts(responses, golds, choices)
    fmt = np.array([rlcr_vlm_format_score(p.text) for p in parsed])
    raw = _optional(p.raw_confidence for p in parsed)
    q = np.where(np.isnan(raw), missing_confidence, np.clip((raw / 10.0) ** exponent, 0.0, 1.0))
    brier = brier_term(q, accuracy)
    return {"reward": accuracy + lambda_cal * brier + lambda_fmt * fmt, "accuracy_reward": accuracy,
            "accuracy": accuracy, "format": fmt,
            "brier": brier, "confidence": q, "has_confidence": ~np.isnan(raw)}


@register("rlvr")
def rlvr(responses, golds, *, choices=None, vision_kl=None, vision_entropy=None) -> dict[str, np.ndarray]:
    """RLVR: R = I (PAPER.md section 3); `format` reports the plain `<think>` + `\\boxed{}` layout."""
    choices = _check_batch(responses, golds, choices)
    parsed = [parse_response(text, "plain") for text in responses]
    accuracy = _grade(parsed, golds, choices)
    return {"reward": accuracy.copy(), "accuracy_reward": accuracy.copy(), "accuracy": accuracy,
            "format": np.array([float(p.format_ok) for p in parsed])}


@register("rlvr_easyr1")
def rlvr_easyr1(responses, golds, *, choices=None, vision_kl=None, vision_entropy=None,
                format_weight: float = 0.1) -> dict[str, np.ndarray]:
    """EasyR1's default RLVR reward: (1 - w) I + w fmt_plain with w = 0.1 (PAPER.md section 3)."""
    out = rlvr(responses, golds, choices=choices)
    out["reward"] = (1.0 - format_weight) * out["accuracy"] + format_weight * out["format"]
    out["accuracy_reward"] = (1.0 - format_weight) * out["accuracy"]
    return out
