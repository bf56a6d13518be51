"""The RL update computed by hand from an RLBatch's raw arrays, for the integration tests.

The objective, its derivative with respect to the sampled tokens' log-probs and the AdamW step
are numpy_reference's (float64, loops, no project function). The one model quantity, log pi(o_t)
under the current params and its pull-back to the params, comes from the full-vocabulary logits
of `qwen3_vl.apply` (the forward test_models checks against transformers) through jax's own
log_softmax and vjp: not through `rl.step`'s chunked `token_logprobs` kernel or `loss_fn`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

import numpy_reference as ref
import rl_utils as U
from vlcal_jax.models import qwen3_vl

OBJECTIVE_KEYS = ("clip_low", "clip_high", "dual_clip", "kl_coef", "kl_clamp", "w_min", "w_max", "lambda_tar",
                  "filter_top_p")


def logits_and_vjp(config, params, inputs, num_response):
    """A compiled `(params, cotangent [N, M]) -> (logits [N, T, V], d <cotangent, logp> / d params)`
    with logp [N, M] the log-softmax of the logits that predict the last `num_response` tokens."""
    length = np.asarray(inputs.input_ids).shape[1]
    targets = jnp.asarray(np.asarray(inputs.input_ids)[:, -num_response:])

    def token_logp(p):
        logits = qwen3_vl.apply(config, p, inputs)
        logp = jax.nn.log_softmax(logits[:, length - num_response - 1:length - 1], axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], logits

    def run(p, cotangent):
        (_, logits), pullback = jax.vjp(token_logp, p)
        return logits, pullback((cotangent, jnp.zeros_like(logits)))[0]

    zeros = np.zeros(targets.shape, np.float32)
    return jax.jit(run).lower(params, zeros).compile(compiler_options=U.FAST)


def token_logp(logits, input_ids, num_response):
    """log pi(o_t) [N, M] in float64 from logits [N, T, V]: position t - 1 predicts token t."""
    logits = np.asarray(logits, np.float64)
    length = logits.shape[1]
    window = logits[:, length - num_response - 1:length - 1]
    top = window.max(-1, keepdims=True)
    log_norm = top[..., 0] + np.log(np.exp(window - top).sum(-1))
    targets = np.asarray(input_ids)[:, -num_response:]
    return np.take_along_axis(window, targets[..., None], -1)[..., 0] - log_norm


def objective(rl, logp, batch) -> dict:
    """numpy_reference.rl_objective of `batch`'s arrays under RLConfig `rl`."""
    settings = {k: getattr(rl, k) for k in OBJECTIVE_KEYS}
    return ref.rl_objective(rl.loss, logp, batch.old_logp, batch.ref_logp, batch.advantages, batch.response_mask,
                            batch.vision_mask, batch.token_k3, batch.token_nll, batch.token_kl, batch.token_entropy,
                            **settings)


def flat(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@dataclasses.dataclass
class HandUpdate:
    reference: dict  # rl_objective's dict at the params the update starts from
    grads: dict  # d loss / d params, by leaf path, clipped to rl.grad_clip
    grad_norm: float  # before clipping
    params: dict  # after one AdamW step


def hand_update(config, rl, params, batch, vjp=None) -> HandUpdate:
    """One update of `params` on `batch` computed by hand (see the module docstring)."""
    num_response = np.asarray(batch.response_mask).shape[1]
    vjp = vjp or logits_and_vjp(config, params, batch.inputs, num_response)
    logits, _ = vjp(params, np.zeros(np.asarray(batch.response_mask).shape, np.float32))
    reference = objective(rl, token_logp(logits, batch.inputs.input_ids, num_response), batch)
    _, grads = vjp(params, reference["grad_logp"].astype(np.float32))
    new, clipped, norm = ref.adamw_first_step(flat(params), flat(grads), learning_rate=rl.learning_rate,
                                              weight_decay=rl.weight_decay, grad_clip=rl.grad_clip)
    return HandUpdate(reference, clipped, norm, new)


def assert_update_matches(hand: HandUpdate, state_before, state_after, metrics, *, rl, grad_rtol=1e-4,
                          update_rtol=1e-3):
    """The compiled step's result equals the hand update: its gradient (the first Adam moment
    over 1 - b1, i.e. the clipped gradient), its global norm, and the params it wrote; a
    parameter's update is compared relative to the learning rate (AdamW's first step moves each
    weight by about lr), only where its gradient is not round-off of a cancellation (|g| above
    1e-3 of the leaf's largest), since there g / |g| is a coin flip in any precision."""
    assert float(metrics["skipped"]) == 0.0 and int(state_after.step) == int(state_before.step) + 1
    np.testing.assert_allclose(float(metrics["grad_norm"]), hand.grad_norm, rtol=1e-5)
    mu = flat(optax.tree_utils.tree_get(state_after.opt_state, "mu"))
    before, after = flat(state_before.params), flat(state_after.params)
    assert mu.keys() == hand.grads.keys() == after.keys()
    counts = np.zeros(2, np.int64)
    for name, g in hand.grads.items():
        scale = max(float(np.abs(g).max()), 1e-30)
        np.testing.assert_allclose(mu[name] / 0.1, g, atol=grad_rtol * scale, rtol=0, err_msg=name)
        checked = (np.abs(g) > 1e-3 * scale) | ((g == 0) & (mu[name] == 0))
        # float32 params: the written value is the update rounded to the parameter's spacing
        bound = update_rtol * rl.learning_rate + 2 * np.spacing(np.abs(before[name]).astype(np.float32))
        error = np.abs((after[name] - before[name]) - (hand.params[name] - before[name]))
        worst = np.max(np.where(checked, error - bound, -np.inf), initial=-np.inf)
        assert worst <= 0, f"{name}: update differs from the hand update by {worst:.3g} beyond its bound"
        counts += checked.sum(), checked.size
    # a few leaves have gradients that are zero up to round-off (the key bias: softmax ignores it)
    assert counts[0] > 0.5 * counts[1], f"only {counts[0]} of {counts[1]} updates were comparable"
