"""The device side of one VL-Calibration RL step: scoring (VCE + reference) and the update.

`score` runs the teacher-forced passes of PAPER.md section 4 (clean image, K perturbed
images with a fresh mask per response, reference model) in one jit; `make_train_step`
builds the ONE compiled update of sections 5-6 (TAR weights and perception filter from
the per-token arrays, clipped surrogate + k3 reference KL, AdamW with global-norm clipping),
with donated state and explicit shardings when a mesh is given.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from vlcal_jax import parallel
from vlcal_jax.parallel import multihost
from vlcal_jax.parallel.sharding import PIXELS_PATH
from vlcal_jax.models import qwen3_vl, text
from vlcal_jax.models.config import ModelConfig
from vlcal_jax.rl import certainty, grpo, losses, perturb


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Hyper-parameters of the update and of VCE scoring (PAPER.md sections 4-6 defaults)."""

    loss: str = "vl_calibration"
    samples_per_prompt: int = 8
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    kl_coef: float = 1e-4
    kl_clamp: float = 10.0
    w_min: float = 0.9
    w_max: float = 1.1
    lambda_tar: float = 0.1
    filter_top_p: float = 0.2
    learning_rate: float = 1e-6
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    warmup_steps: int = 0
    adam_mu_dtype: str = ""  # AdamW's first moment: "" like the params; "bfloat16" halves it (not the second)
    logprob_chunk: int = 256
    # the rollouts' sampling temperature: every log-prob, entropy and KL of scoring and of the
    # loss is of pi_T = softmax(logits / T), the distribution the responses were drawn from
    # (verl/EasyR1 divide the logits by it the same way); 1.0 leaves the program unchanged
    temperature: float = 1.0
    vce_kind: str = "blackout"  # blackout | noise | grey (PAPER.md section 4 ablations)
    vce_prob: float = 0.8
    vce_noise_std: float = 189.0
    vce_grey: float = 128.0
    vce_k: int = 1
    # rows per micro-batch of the update (a multiple of samples_per_prompt dividing the batch);
    # 0: the whole batch in one pass. Gradients accumulate in float32 over a scan inside the one jit.
    micro_batch_size: int = 0
    # micro-batched update: the step's pixel_values wait in pinned host memory and each
    # micro-batch's images are copied to the device inside the scan (3.2 GiB per chip of a v4-8
    # for 256 prompts at 4 MP); without a mesh (one device) it changes nothing
    offload_pixels: bool = False
    # Normalisation of the image processor that made pixel_values (ImageProcessorConfig.image_mean
    # / image_std): the VCE perturbations' black, grey and noise bounds are pixels normalised with it.
    image_mean: tuple[float, ...] = perturb.QWEN3_VL_MEAN
    image_std: tuple[float, ...] = perturb.QWEN3_VL_STD
    # The output rows of these tokens (the score digits, rl.score_lr_scale) take updates this many
    # times larger than the optimizer's; with tied embeddings their input rows too. Not the paper's.
    score_token_ids: tuple[int, ...] = ()
    score_lr_scale: float = 1.0
    # True: the output rows of score_token_ids are optimised as a per-token level along the mean
    # state at the score tokens plus a part orthogonal to it (split_score_level). Not the paper's.
    score_level_split: bool = False
    # True: the batch carries score_positions / score_advantages (rl.score_expectation) and the first
    # token of each stated score takes the exact expectation over the digits (score_expectation_loss).
    score_expectation: bool = False

    def __post_init__(self):
        object.__setattr__(self, "score_token_ids", tuple(int(i) for i in self.score_token_ids))
        if self.score_lr_scale != 1.0 and not self.score_token_ids:
            raise ValueError(f"RLConfig.score_lr_scale={self.score_lr_scale} needs score_token_ids (the digit tokens)")
        if self.score_level_split and not self.score_token_ids:
            raise ValueError("RLConfig.score_level_split=True needs score_token_ids (the digit tokens)")
        if self.score_expectation and len(self.score_token_ids) != 10:
            raise ValueError("RLConfig.score_expectation=True needs score_token_ids, the ten digit tokens")
        if not self.temperature > 0:
            raise ValueError(f"RLConfig.temperature={self.temperature} must be > 0: it divides the logits of the "
                             "update (set rl.temperature to the rollouts' sampling temperature)")
        for name in ("image_mean", "image_std"):  # tuples of floats: RLConfig is a static jit argument
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"RLConfig.{name} needs 3 values (RGB), got {getattr(self, name)}")
            object.__setattr__(self, name, value)

    def loss_options(self) -> dict:
        return {"w_min": self.w_min, "w_max": self.w_max, "lambda_tar": self.lambda_tar,
                "filter_top_p": self.filter_top_p}


class TrainState(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: optax.OptState


class RLBatch(NamedTuple):
    """One update batch of N = prompts * n responses of M tokens (rows of a prompt adjacent).

    inputs: prompt + response rows [N, Tp + M] (vision once per prompt, shared via image_index);
    response_mask/vision_mask [N, M]; advantages [N] (or [N, M] per token: rl.post_answer_advantage);
    old_logp/ref_logp [N, M]; token_k3,
    token_nll, token_kl, token_entropy [N, M] (VCE per-token statistics from `score`);
    score_positions [N, J] int32 and score_advantages [N, J, 10] (rl.score_expectation,
    grpo.score_expectation_advantages; None without it).
    """

    inputs: qwen3_vl.ModelInputs
    response_mask: jax.Array
    vision_mask: jax.Array
    advantages: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array
    token_k3: jax.Array
    token_nll: jax.Array
    token_kl: jax.Array
    token_entropy: jax.Array
    score_positions: jax.Array | None = None
    score_advantages: jax.Array | None = None


def response_hidden(config: ModelConfig, params, inputs: qwen3_vl.ModelInputs, num_response: int):
    """Final hidden states [N, M, D] that predict the last `num_response` tokens of each row."""
    hidden = qwen3_vl.apply(config, params, inputs, return_hidden=True)
    length = hidden.shape[1]
    return hidden[:, length - num_response - 1:length - 1]


def tempered(hidden, rl: RLConfig):
    """hidden / T: logits of pi_T, since the head is linear (unchanged at T = 1)."""
    return hidden if rl.temperature == 1.0 else hidden * jnp.asarray(1.0 / rl.temperature, hidden.dtype)


def _head_logits(hidden, kernel):
    """[N, C, D] -> float32 [N, C, V], the rows kept over the batch axes (see qwen3_vl.logits_from_hidden)."""
    hidden = parallel.constrain(hidden, "batch", None, None)
    logits = jnp.einsum("ncd,dv->ncv", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return parallel.constrain(logits, "batch", None, "tensor")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def token_logprobs(hidden, kernel, targets, chunk_size: int):
    """log pi(target) [N, M] from hidden [N, M, D], the [D, V] head and int targets [N, M].

    Chunked over M: neither the forward nor the backward holds [N, M, V] logits. The VJP is
    written out (logits recomputed per chunk, d logits = g * (onehot - softmax), then the two
    head matmuls), which is what autodiff of a rematerialised log_softmax computes, minus the
    broadcasts, pads and transposed copies it adds around the [N, chunk, V] array."""
    return _token_logprobs_fwd(hidden, kernel, targets, chunk_size)[0]


def _token_logprobs_fwd(hidden, kernel, targets, chunk_size):
    def one(args):
        h, t = args
        logits = _head_logits(h, kernel)
        top = jnp.max(logits, axis=-1)
        lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
        return jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - lse, lse

    m = hidden.shape[1]
    logp, lse = jax.lax.map(one, (certainty.to_chunks(hidden, chunk_size), certainty.to_chunks(targets, chunk_size)))
    return certainty.from_chunks(logp, m), (hidden, kernel, targets, certainty.from_chunks(lse, m))


def _token_logprobs_bwd(chunk_size, residuals, g):
    hidden, kernel, targets, lse = residuals

    def one(d_kernel, args):
        h, t, lse_c, g_c = args
        logits = _head_logits(h, kernel)
        onehot = jnp.arange(logits.shape[-1]) == t[..., None]
        d_logits = (g_c[..., None] * (onehot - jnp.exp(logits - lse_c[..., None]))).astype(h.dtype)
        d_h = jnp.einsum("ncv,dv->ncd", d_logits, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
        d_kernel = d_kernel + jnp.einsum("ncd,ncv->dv", h, d_logits, preferred_element_type=jnp.float32)
        return d_kernel, d_h.astype(hidden.dtype)

    xs = tuple(certainty.to_chunks(x, chunk_size) for x in (hidden, targets, lse, g.astype(jnp.float32)))
    d_kernel, d_hidden = jax.lax.scan(one, jnp.zeros(kernel.shape, jnp.float32), xs)
    return certainty.from_chunks(d_hidden, hidden.shape[1]), d_kernel.astype(kernel.dtype), None


token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def perturbed_inputs(config: ModelConfig, inputs: qwen3_vl.ModelInputs, n: int, rng, rl: RLConfig):
    """Inputs whose images are perturbed independently for every response (PAPER.md section 4:
    a fresh mask per response): each prompt image is repeated n times and row r reads copy r % n.
    Black, grey and the noise bounds are pixel values normalised with `rl.image_mean` /
    `rl.image_std`, the statistics of the image processor that made `pixel_values`."""
    vis = inputs.vision
    images, patches, dim = vis.pixel_values.shape
    slots = patches // config.vision.merge_unit
    rep = functools.partial(jnp.repeat, repeats=n, axis=0)
    flat = rep(vis.pixel_values).reshape(images * n * patches, dim)
    stats = dict(mean=rl.image_mean, std=rl.image_std)
    if rl.vce_kind == "blackout":
        flat = perturb.patch_blackout(flat, rng, prob=rl.vce_prob, **stats)
    elif rl.vce_kind == "noise":
        flat = perturb.gaussian_noise(flat, rng, std_pixels=rl.vce_noise_std,
                                      temporal_patch_size=config.vision.temporal_patch_size, **stats)
    elif rl.vce_kind == "grey":
        flat = perturb.grey_mask(flat, value=rl.vce_grey, **stats)
    else:
        raise ValueError(f"vce_kind={rl.vce_kind!r}: the RL scorer supports blackout, noise, grey "
                         "(blur needs static image grids; use rl.perturb.blur offline)")
    copy = (jnp.arange(inputs.input_ids.shape[0]) % n)[:, None]
    index = inputs.image_index
    new_index = ((index // slots) * n + copy) * slots + index % slots
    new_vis = vis._replace(pixel_values=flat.reshape(images * n, patches, dim), rope_hw=rep(vis.rope_hw),
                           interp_index=rep(vis.interp_index), interp_weight=rep(vis.interp_weight),
                           patch_mask=rep(vis.patch_mask))
    return inputs._replace(image_index=new_index, vision=new_vis)


@functools.partial(jax.jit, static_argnames=("config", "rl", "num_response"))
def score(config: ModelConfig, params, ref_params, inputs: qwen3_vl.ModelInputs, rng, *, rl: RLConfig,
          num_response: int) -> dict:
    """Per-token statistics [N, M] of the sampled responses under the old policy (clean and
    K perturbed images) and the reference model: logp, nll, entropy, kl (exact full-vocabulary
    KL, soft-label variant "paper"), kl_sample (the released sampled proxy, variant
    "released"), k3 (averaged over K), ref_logp. Rows without images get zero perturbation
    statistics."""
    qwen3_vl.check_inputs(config, inputs)
    chex.assert_trees_all_equal_shapes(params, ref_params, custom_message="ref_params must have the tree and "
                                                                          "shapes of params")
    targets = inputs.input_ids[:, -num_response:]
    kernel = text.lm_head_kernel(config, params)
    hidden = tempered(response_hidden(config, params, inputs, num_response), rl)
    if inputs.vision is not None:
        keys = jax.random.split(rng, rl.vce_k)
        hidden_pert = jax.vmap(lambda key: tempered(response_hidden(
            config, params, perturbed_inputs(config, inputs, rl.samples_per_prompt, key, rl), num_response), rl))(keys)
    else:
        hidden_pert = hidden[None]
    stats = certainty.chunked_token_stats(hidden, hidden_pert, kernel.astype(hidden.dtype), targets,
                                          chunk_size=min(rl.logprob_chunk, num_response))
    stats = certainty.mean_over_perturbations(stats)
    ref_hidden = tempered(response_hidden(config, ref_params, inputs, num_response), rl)
    stats["ref_logp"] = token_logprobs(ref_hidden, text.lm_head_kernel(config, ref_params), targets,
                                       min(rl.logprob_chunk, num_response))
    return stats


def shaped_advantages(rl: RLConfig, batch: RLBatch):
    """The loss registry's token advantages over the whole batch (TAR weights, perception filter:
    batch-wide statistics, so computed once, before any micro-batching) -> (effective [N, M],
    pg_mask [N, M], metrics)."""
    response = batch.response_mask.astype(bool)
    token_stats = {"k3": batch.token_k3, "nll": batch.token_nll, "kl": batch.token_kl,
                   "entropy": batch.token_entropy}
    advantages = grpo.token_advantages(batch.advantages, response)
    return losses.get(rl.loss)(token_stats, advantages, response, batch.vision_mask, rl.loss_options())


def score_expectation_loss(hidden, kernel, positions, score_advantages, digit_ids):
    """-sum over the stated scores' first tokens of sum_k pi(digit k | prefix) score_advantages_k
    (rl.score_expectation, not divided by a token count): hidden [N, M, D] (tempered), the [D, V]
    head, positions [N, J] (-1: none), score_advantages [N, J, K], digit_ids [K]. Its gradient is
    the exact expectation over the digits of the policy-gradient term the sampled digit would have
    had (grpo.score_expectation_advantages); the full-vocabulary softmax at J tokens per row."""
    at = jnp.maximum(positions, 0)
    h = jnp.take_along_axis(hidden, at[..., None], axis=1)
    logp = jax.nn.log_softmax(_head_logits(h, kernel), axis=-1)
    p = jnp.exp(logp[..., jnp.asarray(digit_ids, jnp.int32)])
    return -jnp.sum(jnp.where((positions >= 0)[..., None], p * score_advantages.astype(jnp.float32), 0.0))


def micro_loss(params, config: ModelConfig, rl: RLConfig, batch: RLBatch, effective, pg_mask,
               num_tokens=None, num_pg_tokens=None):
    """The clipped surrogate + reference KL of `batch`'s rows (PAPER.md section 6), normalised by
    the global token counts (the whole batch's, not this micro-batch's) -> (loss, metrics). With
    rl.score_expectation, plus score_expectation_loss over the same policy-gradient token count."""
    num_response = batch.response_mask.shape[1]
    targets = batch.inputs.input_ids[:, -num_response:]
    hidden = tempered(response_hidden(config, params, batch.inputs, num_response), rl)
    kernel = text.lm_head_kernel(config, params)
    logp = token_logprobs(hidden, kernel, targets, min(rl.logprob_chunk, num_response))
    loss, metrics = grpo.policy_loss(logp, batch.old_logp, batch.ref_logp, effective, batch.response_mask.astype(bool),
                                     pg_mask, clip_low=rl.clip_low, clip_high=rl.clip_high, dual_clip=rl.dual_clip,
                                     kl_coef=rl.kl_coef, kl_clamp=rl.kl_clamp, num_tokens=num_tokens,
                                     num_pg_tokens=num_pg_tokens)
    if rl.score_expectation:
        if batch.score_positions is None:
            raise ValueError("RLConfig.score_expectation=True needs batch.score_positions and "
                             "batch.score_advantages (grpo.score_expectation_advantages)")
        if num_pg_tokens is None:
            num_pg_tokens = jnp.sum(pg_mask.astype(bool) & batch.response_mask.astype(bool))
        count = jnp.maximum(jnp.asarray(num_pg_tokens, jnp.float32), 1.0)
        expected = score_expectation_loss(hidden, kernel, batch.score_positions, batch.score_advantages,
                                          rl.score_token_ids) / count
        loss = loss + expected
        metrics = {**metrics, "loss": loss, "score_expectation_loss": expected}
    return loss, metrics


def loss_fn(params, config: ModelConfig, rl: RLConfig, batch: RLBatch):
    """The VL-Calibration objective of PAPER.md sections 5-6 -> (loss, metrics)."""
    effective, pg_mask, prep_metrics = shaped_advantages(rl, batch)
    loss, metrics = micro_loss(params, config, rl, batch, effective, pg_mask)
    metrics = {**metrics, **{k: v for k, v in prep_metrics.items() if k != "filter_keep_frac"}}
    metrics["response_tokens"] = jnp.sum(batch.response_mask.astype(bool)).astype(jnp.float32)
    return loss, metrics


def make_optimizer(rl: RLConfig) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (PAPER.md section 6: lr 1e-6, wd 1e-2, clip 1.0); with
    rl.score_lr_scale != 1 the digits' output rows take scaled updates (scale_token_rows), and with
    rl.score_level_split their level and their orthogonal part are optimised apart (split_score_level)."""
    schedule = (optax.linear_schedule(0.0, rl.learning_rate, rl.warmup_steps) if rl.warmup_steps
                else rl.learning_rate)
    optimizer = optax.chain(optax.clip_by_global_norm(rl.grad_clip),
                            optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=rl.weight_decay,
                                        mu_dtype=jnp.dtype(rl.adam_mu_dtype) if rl.adam_mu_dtype else None))
    if rl.score_lr_scale != 1.0:
        optimizer = optax.chain(optimizer, scale_token_rows(rl.score_token_ids, rl.score_lr_scale))
    if rl.score_level_split:
        optimizer = split_score_level(optimizer, rl.score_token_ids, rl.learning_rate * rl.score_lr_scale)
    return optimizer


def _output_rows(tree, ids):
    """The output rows [K, D] of tokens `ids` in a params-shaped tree: columns of
    `lm_head/kernel` [D, V], or rows of `text/embed` [V, D] when there is no head (tied)."""
    if "lm_head" in tree:
        return tree["lm_head"]["kernel"][:, ids].T
    return tree["text"]["embed"][ids]


def _with_output_rows(tree, ids, rows):
    if "lm_head" in tree:
        kernel = tree["lm_head"]["kernel"]
        return {**tree, "lm_head": {**tree["lm_head"], "kernel": kernel.at[:, ids].set(rows.T.astype(kernel.dtype))}}
    embed = tree["text"]["embed"]
    return {**tree, "text": {**tree["text"], "embed": embed.at[ids].set(rows.astype(embed.dtype))}}


def scale_token_rows(token_ids: tuple[int, ...], scale: float) -> optax.GradientTransformation:
    """Multiplies the updates of the output rows of `token_ids` by `scale`: columns of
    `lm_head/kernel` [D, V], or, when the embedding is tied (no `lm_head`), rows of `text/embed`
    [V, D] (which are also the tokens' input embeddings). Every other update passes unchanged."""
    ids = jnp.asarray(token_ids, jnp.int32)

    def update(updates, state, params=None):
        del params
        return _with_output_rows(updates, ids, _output_rows(updates, ids) * scale), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ScoreLevelState(NamedTuple):
    """split_score_level's state: the direction (zeros until set_score_direction), the Adam state
    of the K levels, and the wrapped optimizer's state."""
    direction: jax.Array  # [D] float32
    level: optax.OptState
    inner: optax.OptState


def split_score_level(inner: optax.GradientTransformation, token_ids: tuple[int, ...],
                      level_learning_rate: float) -> optax.GradientTransformation:
    """Optimises the output rows w_k of `token_ids` (the score digits) in the coordinates
    w_k = v_k + b_k mu / |mu|^2, v_k orthogonal to mu, where mu is the mean final state at the
    score tokens (ScoreLevelState.direction). At a state h = mu + delta the logit is
    w_k . h = b_k + v_k . delta (+ b_k mu.delta / |mu|^2): b_k is the level the digit has at
    every scene, v_k how it varies from scene to scene. In the plain coordinates both move
    together and the level dominates (|mu| is 10 times the scene-to-scene spread at the demo's
    warm start, README "Where the updates go"), so a policy gradient that should rank the
    scenes only shifts the level. Here v_k takes `inner`'s update of the gradient with its mu
    component removed (then projected orthogonal to mu again, which also drops weight decay's
    mu component), and b_k a separate Adam step (`level_learning_rate`) on dL/db_k =
    g_k . mu / |mu|^2. Every other parameter takes `inner`'s update unchanged. With a zero
    direction (before set_score_direction) this is `inner` itself. Not the paper's."""
    ids = jnp.asarray(token_ids, jnp.int32)
    level_opt = optax.adam(level_learning_rate, b1=0.9, b2=0.999, eps=1e-8)

    def init(params):
        # optax.tree_map_params (init_state) inits with one placeholder object for the params
        width = _output_rows(params, ids).shape[1] if isinstance(params, dict) else 0
        return ScoreLevelState(jnp.zeros((width,), jnp.float32), level_opt.init(jnp.zeros((len(token_ids),),
                                                                                           jnp.float32)),
                               inner.init(params))

    def update(grads, state, params=None):
        mu = state.direction.astype(jnp.float32)
        mu2 = jnp.sum(mu * mu)
        on = mu2 > 0
        unit = mu * jax.lax.rsqrt(jnp.where(on, mu2, 1.0))
        rows = _output_rows(grads, ids).astype(jnp.float32)
        level_grad = jnp.where(on, rows @ mu / jnp.where(on, mu2, 1.0), 0.0)
        grads = _with_output_rows(grads, ids, rows - jnp.outer(rows @ unit, unit))
        updates, inner_state = inner.update(grads, state.inner, params)
        level_update, level_state = level_opt.update(level_grad, state.level)
        rows = _output_rows(updates, ids).astype(jnp.float32)
        rows = rows - jnp.outer(rows @ unit, unit) + jnp.outer(level_update, mu / jnp.where(on, mu2, 1.0))
        return _with_output_rows(updates, ids, rows), ScoreLevelState(state.direction, level_state, inner_state)

    return optax.GradientTransformation(init, update)


def score_direction_unset(state: TrainState) -> bool:
    """True when `state` has a split_score_level optimizer whose direction is still zero."""
    opt = state.opt_state
    return isinstance(opt, ScoreLevelState) and not bool(jnp.any(opt.direction != 0))


def set_score_direction(state: TrainState, direction) -> TrainState:
    """`state` with split_score_level's direction set to `direction` [D] (kept on the old one's devices)."""
    old = state.opt_state.direction
    new = jax.device_put(jnp.asarray(direction, jnp.float32).reshape(old.shape), old.sharding)
    return state._replace(opt_state=state.opt_state._replace(direction=new))


@functools.partial(jax.jit, static_argnums=(0, 4))
def score_state_sum(config: ModelConfig, params, inputs: qwen3_vl.ModelInputs, score_mask, num_response: int):
    """(sum [D] float32 of the final states that predict the tokens of `score_mask` [N, M], their
    number): the mean state at the score tokens, split_score_level's direction."""
    hidden = response_hidden(config, params, inputs, num_response).astype(jnp.float32)
    mask = jnp.asarray(score_mask, jnp.float32)
    return jnp.einsum("nm,nmd->d", mask, hidden), jnp.sum(mask)


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """Step counter and optimizer state on the params' devices: moments sharded like their params,
    scalars replicated. The shardings are explicit because the init's outputs do not depend on the
    params' values, so a plain `jit(optimizer.init)` prunes its inputs and puts everything on
    device 0, which a mesh-sharded train step cannot take (and which would not fit at scale).
    Host or uncommitted params are committed to their device: the train step returns committed
    arrays, and a first call on uncommitted ones would make the second call compile again."""
    default = SingleDeviceSharding(jax.devices()[0])
    params = jax.tree.map(lambda x: x if isinstance(x, jax.Array) and x.committed else
                          jax.device_put(x, x.sharding if isinstance(x, jax.Array) else default), params)
    leaves = jax.tree.leaves(params)
    first = leaves[0].sharding if leaves else default
    scalar = NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding) else first
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, jax.eval_shape(optimizer.init, params), param_sh,
                                   transform_non_params=lambda _: scalar)
    init = jax.jit(lambda p: (jnp.zeros((), jnp.int32), optimizer.init(p)), out_shardings=(scalar, opt_sh))
    step, opt_state = init(params)
    return TrainState(step, params, opt_state)


def check_batch(config: ModelConfig, batch: RLBatch):
    """chex shape/dtype checks of an RLBatch (see its docstring), naming the bad field; shapes
    only, so they run once at trace time and add nothing to the compiled step."""
    qwen3_vl.check_inputs(config, batch.inputs, "batch.inputs")
    chex.assert_rank(batch.response_mask, 2, custom_message="batch.response_mask must be [N, M]")
    rows, m = batch.response_mask.shape
    chex.assert_shape(batch.inputs.input_ids, (rows, None), custom_message=f"batch.inputs.input_ids must be "
                                                                          f"[N, Tp + M] with N = {rows}")
    if batch.advantages.ndim == 2:  # per token (rl.post_answer_advantage="reward_to_go")
        chex.assert_shape(batch.advantages, (rows, m), custom_message=f"batch.advantages must be [N] = [{rows}] "
                                                                      f"or [N, M] = [{rows}, {m}]")
    else:
        chex.assert_shape(batch.advantages, (rows,), custom_message=f"batch.advantages must be [N] = [{rows}] "
                                                                    f"or [N, M] = [{rows}, {m}]")
    for name in ("vision_mask", "old_logp", "ref_logp", "token_k3", "token_nll", "token_kl", "token_entropy"):
        message = f"batch.{name} must be [N, M] = [{rows}, {m}] like batch.response_mask"
        chex.assert_shape(getattr(batch, name), (rows, m), custom_message=message)
        if name != "vision_mask":
            chex.assert_type(getattr(batch, name), float, custom_message=f"batch.{name} must be float")
    if (batch.score_positions is None) != (batch.score_advantages is None):
        raise ValueError("batch.score_positions and batch.score_advantages go together (rl.score_expectation)")
    if batch.score_positions is not None:
        chex.assert_shape(batch.score_positions, (rows, None), custom_message=f"batch.score_positions must be "
                                                                             f"[N, J] with N = {rows}")
        j = batch.score_positions.shape[1]
        chex.assert_shape(batch.score_advantages, (rows, j, 10), custom_message=f"batch.score_advantages must be "
                                                                               f"[N, J, 10] = [{rows}, {j}, 10]")


def _apply_gradients(optimizer, state: TrainState, loss, metrics, grads):
    """One optimizer update; a non-finite loss or gradient leaves the state as it was (skipped)."""
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    new_state = TrainState(state.step + finite.astype(jnp.int32), keep(params, state.params),
                           keep(opt_state, state.opt_state))
    metrics = {**metrics, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.float32)}
    return new_state, metrics


def _step(config: ModelConfig, rl: RLConfig, optimizer, state: TrainState, batch: RLBatch, rng):
    del rng  # the update is deterministic; kept in the signature for stochastic variants
    check_batch(config, batch)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, config, rl, batch)
    return _apply_gradients(optimizer, state, loss, metrics, grads)


# policy_loss metrics already divided by the global token counts; the others are token means
# of the micro-batch, accumulated weighted by its token count
_GLOBALLY_NORMALISED = ("loss", "pg_loss", "ref_kl", "score_expectation_loss")


def _micro_step(config: ModelConfig, rl: RLConfig, optimizer, state: TrainState, batch: RLBatch, rng,
                pixels_to=None):
    """The update over K micro-batches (`batch` leaves [K, N / K, ...], see rl.microbatch): the
    token advantages from the whole batch, then a scan accumulating float32 gradients and
    token-weighted metrics, then ONE optimizer step; equal to `_step` on the flat batch up to
    float32 summation order. `pixels_to`: the device sharding each micro-batch's pixel_values are
    copied to (they arrive in host memory, rl.offload_pixels)."""
    del rng
    k = batch.response_mask.shape[0]
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch._replace(inputs=None))
    effective, pg_mask, prep_metrics = shaped_advantages(rl, flat)
    response = flat.response_mask.astype(bool)
    num_tokens = jnp.sum(response).astype(jnp.float32)
    num_pg_tokens = jnp.sum(pg_mask.astype(bool) & response).astype(jnp.float32)
    per_micro = jax.tree.map(lambda x: x.reshape((k, -1) + x.shape[1:]), (effective, pg_mask))
    # Each micro-batch is differentiated at the compute-dtype copy of the masters (what the
    # sampler and scoring ran): a matmul's weight gradient is a compute-dtype value either way,
    # so for bfloat16 compute this holds every micro-batch's gradients in bfloat16 (half of a
    # float32 tree per chip) and gathers bfloat16 weights; they are summed over micro-batches in
    # float32. With compute == param dtype it is the masters themselves.
    policy = jax.tree.map(lambda p: p.astype(config.compute_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                          state.params)

    def body(carry, xs):
        grads, sums = carry
        micro, (eff, pg) = xs
        micro = _pixels_to_device(micro, pixels_to)
        check_batch(config, micro)
        (loss, metrics), g = jax.value_and_grad(micro_loss, has_aux=True)(
            policy, config, rl, micro, eff, pg, num_tokens, num_pg_tokens)
        local = jnp.sum(micro.response_mask.astype(jnp.float32))
        metrics = {**metrics, "loss": loss}
        grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
        sums = {key: sums[key] + (metrics[key] if key in _GLOBALLY_NORMALISED else metrics[key] * local)
                for key in sums}
        return (grads, sums), None

    first, first_eff = jax.tree.map(lambda x: x[0], (batch, per_micro))
    keys = jax.eval_shape(lambda m, e: micro_loss(state.params, config, rl, m, *e, num_tokens, num_pg_tokens),
                          _pixels_to_device(first, pixels_to), first_eff)[1].keys()
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (grads, sums), _ = jax.lax.scan(body, (zeros, {key: jnp.zeros((), jnp.float32) for key in keys}),
                                    (batch, per_micro))
    metrics = {key: value if key in _GLOBALLY_NORMALISED else value / jnp.maximum(num_tokens, 1.0)
               for key, value in sums.items()}
    metrics.update({k2: v for k2, v in prep_metrics.items() if k2 != "filter_keep_frac"})
    metrics["response_tokens"] = num_tokens
    return _apply_gradients(optimizer, state, metrics["loss"], metrics, grads)


def _pixels_to_device(micro: RLBatch, sharding) -> RLBatch:
    """One micro-batch with its pixel_values copied to the chips (from host memory), or as it is."""
    if sharding is None:
        return micro
    vis = micro.inputs.vision
    vis = vis._replace(pixel_values=jax.device_put(vis.pixel_values, sharding))
    return micro._replace(inputs=micro.inputs._replace(vision=vis))


def batch_shardings(batch, mesh, micro: bool = False, host_pixels: bool = False):
    """Rows split over ("data", "fsdp") where they divide evenly; position_ids carry the batch
    on axis 1; vision arrays split over images, or over patches where the images do not divide
    and one batch axis is used (one image in a micro-batch of 8 rows: as the vision tower splits
    it, see models.vision._split); anything else is replicated. `micro`: leaves have a leading
    micro-batch axis (rl.microbatch.split), which stays whole. `host_pixels`: pixel_values in
    pinned host memory (rl.offload_pixels), split the same way."""
    size = mesh.shape["data"] * mesh.shape["fsdp"]
    patches_split = min(mesh.shape["data"], mesh.shape["fsdp"]) == 1

    def one(path, leaf):
        name = parallel.path_str(path)
        axis = (1 if name.endswith("position_ids") else 0) + int(micro)
        if ".vision/" in name and patches_split and leaf.ndim > axis + 1 and leaf.shape[axis] % size:
            axis += 1
        spec = [None] * leaf.ndim
        if leaf.ndim > axis and leaf.shape[axis] % size == 0:
            spec[axis] = parallel.BATCH
        if host_pixels and name.endswith(PIXELS_PATH):
            return NamedSharding(mesh, P(*spec), memory_kind="pinned_host")
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(one, batch)


def _pixel_device_sharding(shardings):
    """The device sharding of one micro-batch's pixel_values, from the micro-batched batch's
    shardings (batch_shardings(..., micro=True, host_pixels=True))."""
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    sharding = next(s for path, s in flat if parallel.path_str(path).endswith(PIXELS_PATH))
    return NamedSharding(sharding.mesh, P(*sharding.spec[1:]), memory_kind="device")


class MicroBatchedStep:
    """`train_step(state, batch, rng) -> (state, metrics)` for rl.micro_batch_size > 0: the flat
    host RLBatch is laid out as micro-batches (rl.microbatch.split) and the ONE jitted step scans
    them. `split(batch)` and `jitted(batch)` expose the pieces (ahead-of-time compilation)."""

    def __init__(self, config: ModelConfig, rl: RLConfig, optimizer, mesh=None):
        self.config, self.rl, self.mesh = config, rl, mesh
        self._body = functools.partial(_micro_step, config, rl, optimizer)
        self._compiled = {}
        count = jax.process_count()
        if count > 1 and rl.micro_batch_size % (count * rl.samples_per_prompt):
            raise ValueError(f"rl.micro_batch_size={rl.micro_batch_size} must be a multiple of samples_per_prompt x "
                             f"processes = {rl.samples_per_prompt * count}: each process gives whole groups to "
                             "every micro-batch")
        # with several processes the batch is this process's rows; micro-batch k takes its share
        # of every process's rows (parallel.multihost.to_global)
        self._local_size = rl.micro_batch_size // count

    def split(self, batch: RLBatch) -> RLBatch:
        from vlcal_jax.rl import microbatch

        micro = microbatch.split(jax.tree.map(np.asarray, batch), self._local_size,
                                 self.rl.samples_per_prompt, image_token_id=self.config.image_token_id,
                                 merge_unit=self.config.vision.merge_unit)
        vis = micro.inputs.vision
        if vis is None:
            return micro
        # pixels travel in the compute dtype, which the vision tower casts them to first thing:
        # bfloat16 halves the batch and changes nothing
        vis = vis._replace(pixel_values=vis.pixel_values.astype(self.config.compute_dtype))
        micro = micro._replace(inputs=micro.inputs._replace(vision=vis))
        if multihost.multiprocess():
            micro = global_batch(self.config, micro, self.mesh, micro=True,
                                 host_pixels=self.rl.offload_pixels and vis is not None)
        return micro

    def jitted(self, state, micro_batches):
        """The jit for this (micro-batched) batch's shapes, with shardings on a mesh."""
        key = jax.tree.structure(micro_batches), tuple(x.shape for x in jax.tree.leaves(micro_batches))
        if key not in self._compiled:
            if self.mesh is None:
                self._compiled[key] = jax.jit(self._body, donate_argnums=0)
            else:
                state_sh = jax.tree.map(lambda x: x.sharding, state)
                host = self.rl.offload_pixels and micro_batches.inputs.vision is not None
                batch_sh = batch_shardings(micro_batches, self.mesh, micro=True, host_pixels=host)
                body = functools.partial(self._body, pixels_to=_pixel_device_sharding(batch_sh)) if host else self._body
                self._compiled[key] = jax.jit(
                    body, donate_argnums=0,
                    in_shardings=(state_sh, batch_sh, parallel.replicated(self.mesh)),
                    out_shardings=(state_sh, parallel.replicated(self.mesh)))
        return self._compiled[key]

    def lower(self, state, batch, rng):
        micro = self.split(batch)
        with parallel.use_mesh(self.mesh):
            return self.jitted(state, micro).lower(state, micro, rng)

    def __call__(self, state, batch, rng):
        micro = self.split(batch)
        with parallel.use_mesh(self.mesh):  # the model's activation constraints apply under the mesh
            return self.jitted(state, micro)(state, micro, rng)


def global_batch(config: ModelConfig, batch: RLBatch, mesh, micro: bool = False, host_pixels: bool = False) -> RLBatch:
    """This process's host RLBatch (flat, or micro-batched [K, N_local / K, ...]) -> the global
    batch of every process's rows (parallel.multihost.to_global)."""
    prompt_length = batch.inputs.input_ids.shape[-1] - batch.response_mask.shape[-1]
    inputs = multihost.offset_image_index(batch.inputs, config.image_token_id, config.vision.merge_unit,
                                          prompt_length, micro=micro)
    return multihost.to_global(batch._replace(inputs=inputs), mesh, micro=micro, what="update batch",
                               host_pixels=host_pixels)


def make_train_step(config: ModelConfig, rl: RLConfig, optimizer: optax.GradientTransformation, mesh=None):
    """`train_step(state, batch, rng) -> (state, metrics)`: one jit, state donated. With a mesh,
    the step is compiled with explicit in/out shardings (state as it is sharded, batch rows
    over ("data", "fsdp"), metrics replicated) and traced under the mesh, so the model's
    activations are split like the batch (parallel.constrain). With rl.micro_batch_size > 0 the
    update scans micro-batches inside that one jit (MicroBatchedStep)."""
    if rl.micro_batch_size:
        return MicroBatchedStep(config, rl, optimizer, mesh)
    step = functools.partial(_step, config, rl, optimizer)
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    compiled = {}

    def train_step(state, batch, rng):
        if multihost.multiprocess():
            batch = global_batch(config, batch, mesh)
        key = jax.tree.structure(batch), tuple(x.shape for x in jax.tree.leaves(batch))
        if key not in compiled:
            state_sh = jax.tree.map(lambda x: x.sharding, state)
            compiled[key] = jax.jit(step, donate_argnums=0,
                                    in_shardings=(state_sh, batch_shardings(batch, mesh), parallel.replicated(mesh)),
                                    out_shardings=(state_sh, parallel.replicated(mesh)))
        with parallel.use_mesh(mesh):  # the model's activation constraints apply under the mesh
            return compiled[key](state, batch, rng)

    return train_step
