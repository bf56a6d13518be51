"""Helpers for RL-step tests: tiny Qwen3-VL configs and host-side RLBatches built without a sampler."""

from __future__ import annotations

import functools

import jax
import numpy as np

import hf_utils as H
from vlcal_jax import models
from vlcal_jax.models import text
from vlcal_jax.rl import grpo, rollout, step

# XLA options for test-only compilations: LLVM's optimisation passes are most of a CPU compile
# (31 s -> 11 s for the train step on this 2-core machine) and these programs run for milliseconds.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Grids of the prompt images (t, h, w) in patches; all fit the minimum patch bucket.
GRIDS = ((1, 4, 4), (1, 4, 6), (1, 2, 4), (1, 6, 4))


def tiny_config(*, tie=True, bias=False, deepstack=(0,), dtype="float32", layers=2, depth=2, vocab=H.VOCAB):
    """A tiny Qwen3-VL whose matrix dimensions divide by 8 (so every partition rule can shard)."""
    return models.ModelConfig(
        vision=models.VisionConfig(depth=depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                                   out_hidden_size=64, num_position_embeddings=16,
                                   deepstack_visual_indexes=tuple(deepstack)),
        text=models.TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                               mrope_section=(2, 3, 3), attention_bias=bias),
        image_token_id=H.IMAGE_TOKEN, video_token_id=H.VIDEO_TOKEN, vision_start_token_id=H.VISION_START,
        vision_end_token_id=H.VISION_END, tie_word_embeddings=tie, dtype=dtype)


NORMS = ("scale", "norm", "q_norm", "k_norm", "input_norm", "post_norm")


def random_params(config, seed=0, dtype=np.float32, std=0.02):
    """A params pytree (numpy leaves) of init_params' structure: N(0, std) matrices, norm scales
    N(1, 0.1) and biases N(0, 0.1) (off 1 / 0, as hf_utils.make_hf_model does, so every tensor
    reaches the loss). NumPy draws: per-shape threefry kernels make jitted init slow on CPU."""
    shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)

    def one(path, leaf):
        name = str(getattr(path[-1], "key", ""))
        if name == "bias":
            value = 0.1 * rng.standard_normal(leaf.shape)
        elif name in NORMS:
            value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
        else:
            value = std * rng.standard_normal(leaf.shape)
        return value.astype(dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def rollout_inputs(config, *, prompts=4, n=2, response_len=8, prompt_len=20, seed=0):
    """Teacher-forcing rows for `prompts` one-image prompts (left-padded to prompt_len) x n random
    responses. Returns (inputs: ModelInputs of numpy arrays [prompts*n, Tp + M], response_mask [N, M]);
    the shapes depend only on the arguments, not on the seed."""
    rng = np.random.default_rng(seed)
    ids, mask, pixels, grids = H.make_batch(rng, list(GRIDS[:prompts]), [[i] for i in range(prompts)],
                                            patch_dim=config.vision.patch_dim, length=prompt_len)
    prompt_inputs = models.prepare_inputs(config, ids, mask, pixels, grids)
    tokens = rng.integers(1, 300, size=(prompts * n, response_len))
    lengths = rng.integers(response_len // 2, response_len + 1, size=prompts * n)
    lengths[0] = response_len
    inputs = rollout.expand_for_responses(prompt_inputs, tokens, lengths, n)
    return inputs, np.asarray(inputs.attention_mask)[:, -response_len:].astype(np.int32)


def response_logprobs(config, params, inputs, num_response):
    """log pi(o_t) [N, M] of the sampled response tokens (teacher-forced)."""
    hidden = step.response_hidden(config, params, inputs, num_response)
    targets = inputs.input_ids[:, -num_response:]
    return step.token_logprobs(hidden, text.lm_head_kernel(config, params), targets, num_response)


policy_logprobs = jax.jit(response_logprobs, static_argnums=(0, 3), compiler_options=FAST)


def make_rl_batch(config, params, *, prompts=4, n=2, response_len=8, prompt_len=20, seed=0, ratio_noise=0.1,
                  ref_noise=0.3, rewards=None):
    """An RLBatch (numpy leaves) with old/ref log-probs near the current policy's and random VCE stats.

    old_logp = logp + N(0, ratio_noise) (so some ratios leave the clip range), ref_logp =
    logp + N(0, ref_noise); advantages from GRPO on `rewards` [N] (random by default)."""
    rng = np.random.default_rng(seed + 1)
    inputs, response_mask = rollout_inputs(config, prompts=prompts, n=n, response_len=response_len,
                                           prompt_len=prompt_len, seed=seed)
    logp = np.asarray(policy_logprobs(config, params, inputs, response_len))
    rows, m = response_mask.shape
    vision_mask = response_mask * (np.arange(m)[None] < m // 2 + rng.integers(0, 2, size=(rows, 1)))
    if rewards is None:
        rewards = rng.integers(0, 2, size=rows).astype(np.float32) + rng.random(rows).astype(np.float32)
    advantages = np.asarray(grpo.group_advantages(np.asarray(rewards, np.float32), n))
    dtype = logp.dtype
    noise = lambda scale: (scale * rng.standard_normal(logp.shape)).astype(dtype)  # noqa: E731
    return step.RLBatch(
        inputs=inputs, response_mask=response_mask, vision_mask=vision_mask.astype(np.int32),
        advantages=advantages, old_logp=logp + noise(ratio_noise), ref_logp=logp + noise(ref_noise),
        token_k3=rng.exponential(0.5, logp.shape).astype(dtype), token_nll=-logp,
        token_kl=rng.exponential(0.5, logp.shape).astype(dtype),
        token_entropy=rng.exponential(2.0, logp.shape).astype(dtype))


def fast_compile(jitted, *args, **kwargs):
    """`jitted` compiled ahead of time for these arguments with the FAST options; call the result
    with the non-static arguments."""
    return jitted.lower(*args, **kwargs).compile(compiler_options=FAST)


class CompileCounter:
    """Counts XLA backend compilations (a jax.monitoring event) made inside `with counter:` blocks."""

    EVENT = "/jax/core/compile/backend_compile_duration"
    _registered: "CompileCounter | None" = None

    def __init__(self):
        self.count, self.active = 0, False
        if CompileCounter._registered is None:  # listeners cannot be removed one by one: register once
            jax.monitoring.register_event_duration_secs_listener(CompileCounter._dispatch)
        CompileCounter._registered = self

    @staticmethod
    def _dispatch(event, duration, **kwargs):
        counter = CompileCounter._registered
        if counter is not None and counter.active and event == CompileCounter.EVENT:
            counter.count += 1

    def __enter__(self):
        CompileCounter._registered = self
        self.count, self.active = 0, True
        return self

    def __exit__(self, *exc):
        self.active = False


def to_host(tree):
    return jax.tree.map(np.asarray, tree)


def rel_diffs(a, b) -> dict[str, float]:
    """Per leaf path: max|a - b| / max|b| (0 where both are 0)."""
    out = {}
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        err = float(np.abs(x - y).max()) if x.size else 0.0
        out[jax.tree_util.keystr(path)] = err / max(float(np.abs(y).max()), 1e-30) if err else 0.0
    return out


def max_rel_diff(a, b) -> float:
    """max over leaves of max|a - b| / max|b|."""
    return max(rel_diffs(a, b).values(), default=0.0)
