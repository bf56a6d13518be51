"""VL-Calibration training CLI.

    python -m vlcal_jax.train --config experiments/cpu_demo.py [--config.rl.steps=20 ...]

Stages: model + tokenizer (a HF Qwen3-VL directory, or a small model built from scratch),
data, optional supervised warm start, evaluation before RL, the GRPO loop (rollout -> VCE
scoring -> rewards -> one compiled update), periodic evaluation and orbax checkpoints, and
finally an HF-format export, plots and a summary.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vlcal_jax import models, parallel, processing, sampling
from vlcal_jax.rl import rollout, step
from vlcal_jax.training import checkpoints, data_setup, evaluation, logs, model_setup, warm

log = logging.getLogger("vlcal_jax.train")

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/*.py)")


def rl_config(config: ml_collections.ConfigDict) -> step.RLConfig:
    r = config.rl
    return step.RLConfig(
        loss=r.loss, samples_per_prompt=r.samples_per_prompt, clip_low=r.clip_low, clip_high=r.clip_high,
        dual_clip=r.dual_clip, kl_coef=r.kl_coef, w_min=r.w_min, w_max=r.w_max, lambda_tar=r.lambda_tar,
        filter_top_p=r.filter_top_p, learning_rate=r.learning_rate, weight_decay=r.weight_decay,
        grad_clip=r.grad_clip, warmup_steps=r.warmup_steps, logprob_chunk=r.logprob_chunk, vce_kind=r.vce_kind,
        vce_prob=r.vce_prob, vce_k=r.vce_k)


def rl_iteration(ctx, state, ref_params, examples, rng):
    """One GRPO step on `examples` (the local prompts): returns (state, metrics dict)."""
    config, rl, r = ctx.model_config, ctx.rl, ctx.config.rl
    n, m = rl.samples_per_prompt, r.max_new_tokens
    k_sample, k_score, k_step = jax.random.split(rng, 3)
    prompts = rollout.encode_examples(examples, ctx.tokenizer, config, ctx.image_config, mode=r.prompt,
                                      length_buckets=tuple(ctx.config.data.length_buckets),
                                      patch_bucket=ctx.config.data.patch_bucket or None,
                                      num_images=len(examples) * ctx.config.data.max_images_per_prompt)
    t0 = time.perf_counter()
    out = sampling.generate_from_inputs(
        config, state.params, prompts.inputs, k_sample, jnp.float32(r.temperature), jnp.float32(r.top_p),
        max_new_tokens=m, n=n, greedy=False, top_k=0, eos_token_ids=ctx.eos_ids,
        pad_token_id=ctx.tokenizer.pad_token_id, use_top_p=r.top_p < 1.0)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    t1 = time.perf_counter()
    seq = rollout.expand_for_responses(prompts.inputs, tokens, lengths, n)
    stats = step.score(config, state.params, ref_params, seq, k_score, rl=rl, num_response=m)
    stats = {k: np.asarray(v) for k, v in stats.items()}
    t2 = time.perf_counter()
    texts, vision_mask, parsed = rollout.decode_responses(ctx.tokenizer, tokens, lengths, mode=r.mode)
    kl, ent = rollout.response_vision_stats(stats, vision_mask, variant=r.soft_label_variant)
    rewards = rollout.score_rewards(texts, examples, n, reward=r.reward, vision_kl=kl, vision_entropy=ent,
                                    **dict(r.reward_weights))
    response_mask = (np.arange(m)[None] < lengths[:, None]).astype(np.float32)
    batch = step.RLBatch(seq, response_mask, vision_mask.astype(np.float32), rewards["advantage"].astype(np.float32),
                         stats["logp"], stats["ref_logp"], stats["k3"], stats["nll"], stats["kl"], stats["entropy"])
    state, update_metrics = ctx.train_step(state, batch, k_step)
    update_metrics = {k: float(v) for k, v in update_metrics.items()}
    t3 = time.perf_counter()
    metrics = {f"update/{k}": v for k, v in update_metrics.items()}
    for key, value in rewards.items():
        value = np.asarray(value, np.float64)
        if value.dtype.kind in "fb" and np.isfinite(value).any():
            metrics[f"reward/{key}"] = float(np.nanmean(value))
    metrics["rollout/response_length"] = float(lengths.mean())
    metrics["rollout/finished"] = float(np.asarray(out.finished).mean())
    metrics["rollout/has_vision_span"] = float(vision_mask.any(-1).mean())
    metrics["vce/vision_kl"] = float(np.nanmean(kl)) if np.isfinite(kl).any() else 0.0
    metrics["vce/vision_entropy"] = float(np.nanmean(ent)) if np.isfinite(ent).any() else 0.0
    metrics.update(evaluation.perception_metrics(texts, examples, n, rewards))
    metrics.update({"time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2})
    return state, metrics


class Context:
    """Everything the loop needs that does not change between steps."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def run(config: ml_collections.ConfigDict) -> dict:
    """Runs the whole experiment; returns the summary also written to workdir/summary.json."""
    logs.setup_logging()
    parallel.initialize()
    if jax.process_count() > 1:
        raise SystemExit("vlcal_jax.train drives one controller process; multi-process (multi-host) "
                         "training is not wired yet: run on a single host (one TPU VM / GPU node) for now.")
    workdir = config.workdir
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    mesh = parallel.make_mesh(**config.mesh)
    log.info("mesh %s on %d %s devices", dict(mesh.shape), jax.device_count(), jax.devices()[0].platform)
    rng = jax.random.key(config.seed)

    data = data_setup.setup_data(config)
    tokenizer, model_config, params, image_config = model_setup.setup_model(config, data, rng)
    params = parallel.shard_params(params, mesh)
    writer = logs.MetricWriter(workdir, enabled=jax.process_index() == 0)
    eval_examples = data.eval_examples
    summary: dict = {"workdir": workdir}

    if config.sft.steps:
        params = warm.warm_start(config, model_config, params, tokenizer, image_config, data, writer)
    ctx = Context(config=config, model_config=model_config, tokenizer=tokenizer, image_config=image_config,
                  rl=rl_config(config), eos_ids=tuple(model_setup.eos_ids(tokenizer)), writer=writer)
    evaluator = evaluation.Evaluator(config, model_config, tokenizer, image_config, eval_examples, workdir)

    ref_params = jax.tree.map(jnp.copy, params)  # the reference model = the RL starting point
    optimizer = step.make_optimizer(ctx.rl)
    state = step.init_state(params, optimizer)
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep)
    state, start, extra = ckpt.restore_latest(state)
    if extra:
        data.train_reader.restore(extra["reader"])
        rng = jax.random.wrap_key_data(np.asarray(extra["rng"], np.uint32))
        log.info("resumed from step %d", start)
    ctx.train_step = step.make_train_step(model_config, ctx.rl, optimizer, mesh=mesh)

    if start == 0 and config.eval.before_rl:
        summary["before_rl"] = evaluator.run(state.params, tag="before_rl", step=0, writer=writer)
    steps = config.rl.steps
    progress = logs.progress(range(start, steps), total=steps, initial=start, desc="RL")
    for i in progress:
        rng, key = jax.random.split(rng)
        examples = data.train_reader.take(config.rl.prompts_per_step)
        state, metrics = rl_iteration(ctx, state, ref_params, examples, key)
        writer.write(i + 1, metrics)
        progress.set_postfix(reward=f"{metrics.get('reward/reward', 0):.3f}",
                             acc=f"{metrics.get('reward/accuracy', 0):.2f}",
                             conf=f"{metrics.get('reward/confidence', 0):.2f}")
        if config.eval.every and (i + 1) % config.eval.every == 0 and i + 1 < steps:
            evaluator.run(state.params, tag=f"step_{i + 1}", step=i + 1, writer=writer)
        if config.checkpoint.every and (i + 1) % config.checkpoint.every == 0:
            ckpt.save(i + 1, state, {"reader": data.train_reader.state(),
                                     "rng": np.asarray(jax.random.key_data(rng)).tolist()})
    summary["after_rl"] = evaluator.run(state.params, tag="after_rl", step=steps, writer=writer)
    export_dir = os.path.join(workdir, "model")
    model_setup.export(model_config, state.params, tokenizer, image_config, export_dir, prompt=config.rl.prompt)
    summary["model_dir"] = export_dir
    summary["plots"] = logs.plot_training(workdir, summary)
    writer.close()
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    logs.print_summary(summary)
    return summary


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config experiments/cpu_demo.py")
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
