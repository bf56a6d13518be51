"""Policy-loss variants by name: what happens to the advantages before `grpo.policy_loss`.

Each registered entry is a pure, jittable function

    fn(token_stats, advantages, response_mask, vision_mask, config)
        -> (effective_advantages [N, T], pg_mask [N, T] bool, metrics dict)

with token_stats a dict of [N, T] arrays from `certainty` (K axis already averaged:
"k3", "nll" for the released form; "kl", "entropy" for the paper form), advantages the
GRPO advantages broadcast to tokens, and config any mapping or ConfigDict (read with
.get; missing keys take the defaults below). The name fixes WHICH mechanisms run; the
config only sets their numbers:

  grpo                      plain GRPO: no TAR, no filter.
  vl_calibration            released TAR (k3/nll, w_min..w_max) + perception filter (default).
  vl_calibration_paper      paper TAR A (1 + lambda (1 - 2 S_t)), S_t from the exact
                            full-vocabulary KL and entropy; no filter (the paper has none).
  vl_calibration_no_tar     perception filter only.
  vl_calibration_no_filter  released TAR only.

Config keys: w_min (0.9), w_max (1.1), lambda_tar (0.1), filter_top_p (0.2).
See PAPER.md section 5.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vlcal_jax.rl import certainty, grpo

LossPrep = Callable[..., tuple[jax.Array, jax.Array, dict]]

DEFAULTS = {"w_min": 0.9, "w_max": 1.1, "lambda_tar": 0.1, "filter_top_p": 0.2}

_REGISTRY: dict[str, LossPrep] = {}


def register(name: str) -> Callable[[LossPrep], LossPrep]:
    """Decorator that registers a loss-preparation function under `name`."""

    def decorator(fn: LossPrep) -> LossPrep:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return decorator


def get(name: str) -> LossPrep:
    """The loss-preparation function registered as `name`."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; registered: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    """Registered loss names, sorted."""
    return sorted(_REGISTRY)


def _option(config, key: str):
    if config is None:
        return DEFAULTS[key]
    return config.get(key, DEFAULTS[key])


def _weight_metrics(weights: jax.Array, affected: jax.Array) -> dict:
    """Mean / min / max of the token weights over the tokens TAR touches (1.0 if none)."""
    count = jnp.sum(affected)
    any_affected = count > 0
    return {
        "tar_weight_mean": jnp.where(any_affected, certainty.masked_mean(weights, affected), 1.0),
        "tar_weight_min": jnp.where(any_affected, jnp.min(jnp.where(affected, weights, jnp.inf)), 1.0),
        "tar_weight_max": jnp.where(any_affected, jnp.max(jnp.where(affected, weights, -jnp.inf)), 1.0),
        "tar_tokens": count.astype(jnp.float32),
    }


def _prepare(token_stats, advantages, response_mask, vision_mask, config, *, tar: str | None, use_filter: bool):
    response = response_mask.astype(bool)
    advantages = jnp.where(response, advantages.astype(jnp.float32), 0.0)
    affected = response & vision_mask.astype(bool) & (advantages < 0)
    if tar == "released":
        weights = grpo.token_advantage_weights(
            token_stats["k3"], token_stats["nll"], response, vision_mask, advantages,
            w_min=_option(config, "w_min"), w_max=_option(config, "w_max"),
        )
    elif tar == "paper":
        token_certainty = certainty.token_certainty(token_stats["kl"], token_stats["entropy"], response)
        weights = grpo.tar_weights_paper(
            token_certainty, vision_mask.astype(bool) & response, advantages, lambda_tar=_option(config, "lambda_tar")
        )
    else:
        weights = jnp.ones_like(advantages)
    if use_filter:
        pg_mask = grpo.perception_mask(token_stats["k3"], response, top_p=_option(config, "filter_top_p"))
    else:
        pg_mask = response
    metrics = _weight_metrics(weights, affected)
    metrics["filter_keep_frac"] = jnp.sum(pg_mask) / jnp.maximum(jnp.sum(response), 1)
    return advantages * weights, pg_mask, metrics


@register("grpo")
def grpo_loss(token_stats, advantages, response_mask, vision_mask, config=None):
    """Plain GRPO: advantages unchanged, every response token in the policy-gradient mean."""
    return _prepare(token_stats, advantages, response_mask, vision_mask, config, tar=None, use_filter=False)


@register("vl_calibration")
def vl_calibration_loss(token_stats, advantages, response_mask, vision_mask, config=None):
    """Released VL-Calibration: TAR weights from k3 / -log p, then the top-k3 perception filter."""
    return _prepare(token_stats, advantages, response_mask, vision_mask, config, tar="released", use_filter=True)


@register("vl_calibration_paper")
def vl_calibration_paper_loss(token_stats, advantages, response_mask, vision_mask, config=None):
    """Paper VL-Calibration: TAR factor 1 + lambda (1 - 2 S_t) with the exact per-token S_t."""
    return _prepare(token_stats, advantages, response_mask, vision_mask, config, tar="paper", use_filter=False)


@register("vl_calibration_no_tar")
def vl_calibration_no_tar_loss(token_stats, advantages, response_mask, vision_mask, config=None):
    """Ablation: the perception filter without token reweighting."""
    return _prepare(token_stats, advantages, response_mask, vision_mask, config, tar=None, use_filter=True)


@register("vl_calibration_no_filter")
def vl_calibration_no_filter_loss(token_stats, advantages, response_mask, vision_mask, config=None):
    """Ablation: released TAR weights, every response token in the policy-gradient mean."""
    return _prepare(token_stats, advantages, response_mask, vision_mask, config, tar="released", use_filter=False)
