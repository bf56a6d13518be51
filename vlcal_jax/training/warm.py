"""Supervised warm start stage of the training CLI (see vlcal_jax.warmstart)."""

from __future__ import annotations

import logging

import jax
import numpy as np

from vlcal_jax import warmstart
from vlcal_jax.rl import step
from vlcal_jax.training import logs

log = logging.getLogger("vlcal_jax.train")


def warm_start(config, model_config, params, tokenizer, image_config, data, writer):
    """Runs config.sft.steps supervised steps on teacher responses; returns the new params."""
    s = config.sft
    if data.sft_source is None:
        raise ValueError("sft.steps > 0 needs teacher responses: they come with data.kind='scenes'")
    optimizer = warmstart.make_optimizer(s.learning_rate, s.steps, s.weight_decay, s.warmup_steps)
    state = step.init_state(params, optimizer)
    sft_step = warmstart.make_sft_step(model_config, optimizer, chunk=config.rl.logprob_chunk)
    rng = np.random.default_rng(config.seed)
    bar = logs.progress(range(s.steps), desc="warm start")
    for i in bar:
        examples = data.sft_source.take(s.batch_size)
        responses = [ex.meta["teacher_response"] for ex in examples]
        if s.overconfident:
            responses = [warmstart.override_confidences(r, rng, s.confidence_low, s.confidence_high)
                         for r in responses]
        responses = [warmstart.convert_teacher(r, config.rl.mode) for r in responses]
        inputs, mask = warmstart.sft_batch(
            examples, responses, tokenizer, model_config, image_config, response_length=config.rl.max_new_tokens,
            length_buckets=tuple(config.data.length_buckets), patch_bucket=config.data.patch_bucket or None,
            num_images=s.batch_size * config.data.max_images_per_prompt, prompt=config.rl.prompt)
        state, metrics = sft_step(state, inputs, mask)
        if (i + 1) % config.log_every == 0 or i + 1 == s.steps:
            metrics = {f"sft/{k}": float(v) for k, v in metrics.items()}
            writer.write(i + 1 - s.steps, metrics)  # warm-start steps are logged at steps <= 0
            bar.set_postfix(loss=f"{metrics['sft/sft_loss']:.3f}")
    log.info("warm start done: %d steps, final loss %.3f", s.steps, float(metrics["sft/sft_loss"]))
    return jax.tree.map(lambda x: x, state.params)
