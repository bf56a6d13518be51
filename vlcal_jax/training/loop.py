"""The run: every stage of an experiment, and the GRPO loop at its centre.

    summary = loop.run(config)   # what `python -m vlcal_jax.train --config ...` does

Stages: model + tokenizer (a HF Qwen3-VL directory, or a small model built from scratch),
data, optional supervised warm start, evaluation before RL, the GRPO loop (rollout -> VCE
scoring -> rewards -> one compiled update), periodic evaluation and orbax checkpoints, and
finally an HF-format export, plots and a summary. A SIGTERM checkpoints at the next step
boundary and exits with `Preemption.EXIT_CODE`; rerunning the same config resumes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np

from vlcal_jax import parallel
from vlcal_jax.parallel import multihost
from vlcal_jax.rl import grpo, rollout, step
from vlcal_jax.training import checkpoints, data_setup, evaluation, export, logs, model_setup, rollouts, storage, warm

log = logging.getLogger("vlcal_jax.train")


def rl_config(config: ml_collections.ConfigDict, image_config=None, tokenizer=None) -> step.RLConfig:
    """The update's RLConfig from `config.rl`; VCE perturbations are normalised with the statistics
    of the image processor that made the pixel values (`image_config`, default Qwen3-VL's).
    `tokenizer`: for rl.score_lr_scale != 1 and rl.score_level_split, whose digit tokens they treat."""
    r = config.rl
    stats = {} if image_config is None else dict(image_mean=tuple(image_config.image_mean),
                                                 image_std=tuple(image_config.image_std))
    expectation = bool(r.get("score_expectation", False))
    if expectation and r.confidence_entropy_bonus:
        raise ValueError("rl.score_expectation=True and rl.confidence_entropy_bonus > 0 do not combine: the bonus is "
                         "a sampled-token estimate on the very tokens whose term the expectation replaces; set one")
    if expectation and r.mode == "plain":
        raise ValueError("rl.score_expectation=True needs a format that states scores (rl.mode decoupled or rlcr)")
    if r.score_lr_scale != 1.0 or r.score_level_split or expectation:
        if tokenizer is None:
            raise ValueError("rl.score_lr_scale != 1, rl.score_level_split and rl.score_expectation need the "
                             "tokenizer (its digit tokens)")
        stats.update(score_token_ids=rollout.score_token_ids(tokenizer), score_lr_scale=float(r.score_lr_scale),
                     score_level_split=bool(r.score_level_split), score_expectation=expectation)
    return step.RLConfig(**stats,
        loss=r.loss, samples_per_prompt=r.samples_per_prompt, clip_low=r.clip_low, clip_high=r.clip_high,
        dual_clip=r.dual_clip, kl_coef=r.kl_coef, w_min=r.w_min, w_max=r.w_max, lambda_tar=r.lambda_tar,
        filter_top_p=r.filter_top_p, learning_rate=r.learning_rate, weight_decay=r.weight_decay,
        grad_clip=r.grad_clip, warmup_steps=r.warmup_steps, logprob_chunk=r.logprob_chunk, vce_kind=r.vce_kind,
        vce_prob=r.vce_prob, vce_noise_std=r.vce_noise_std, vce_grey=r.vce_grey, vce_k=r.vce_k,
        kl_clamp=r.kl_clamp, micro_batch_size=r.micro_batch_size, adam_mu_dtype=r.adam_mu_dtype,
        offload_pixels=r.offload_pixels, temperature=r.temperature)


POST_ANSWER_ADVANTAGES = ("shared", "reward_to_go")


def post_answer_advantages(kind: str, rewards: dict, tokens, lengths, tokenizer, mode: str, n: int, response_mask,
                           weight: float = 1.0):
    """The update's advantages: [N] for rl.post_answer_advantage="shared" (PAPER.md section 5:
    every token of response i gets A_i); [N, M] for "reward_to_go", where the tokens after the
    graded answer (analysis and confidences) get `grpo.after_answer_advantages` of the reward
    without its accuracy term, which they cannot change, and the tokens up to the answer keep A_i."""
    if kind not in POST_ANSWER_ADVANTAGES:
        raise ValueError(f"rl.post_answer_advantage={kind!r}; use one of {POST_ANSWER_ADVANTAGES}")
    advantages = np.asarray(rewards["advantage"], np.float32)
    if kind == "shared":
        return advantages
    after_mask = rollout.after_answer_mask(tokenizer, tokens, lengths, mode)
    after = grpo.after_answer_advantages(np.asarray(rewards["reward"] - rewards["accuracy_reward"], np.float32),
                                         np.asarray(rewards["accuracy"]) > 0, n) * weight
    return np.asarray(grpo.split_token_advantages(advantages, after, after_mask, response_mask), np.float32)


def score_expectation_batch(r, tokenizer, rewards: dict, examples, tokens, lengths, advantages, response_mask, n: int):
    """rl.score_expectation: the rewards of every response with each stated score rewritten as each
    digit (rollout.score_counterfactuals) -> (token advantages [N, M], score_positions [N, J],
    score_advantages [N, J, 10], counts [1, 2] of the sampled score tokens that are known digits and
    of all of them). The reward difference becomes an advantage difference as the token's own
    advantage was made: divided by the group's std (GRPO), or times rl.post_answer_weight after the
    answer (reward_to_go)."""
    positions, texts, counterfactual = rollout.score_counterfactuals(tokenizer, tokens, lengths, r.mode)
    labels = rewards.get("soft_label")
    extra = {} if labels is None else {"soft_label": np.asarray(labels, np.float64)}
    weights = dict(r.reward_weights)

    def reward_of(batch_texts):
        out = rollout.score_rewards(batch_texts, examples, n, reward=r.reward, **extra, **weights)
        return np.asarray(out["reward"], np.float64)

    base = reward_of(texts)
    delta = np.stack([np.stack([reward_of(texts_k) - base for texts_k in per_tag], -1)
                      for per_tag in counterfactual], 1)
    scale = np.repeat(np.asarray(grpo.group_scales(np.asarray(rewards["reward"], np.float32), n))[:, None],
                      positions.shape[1], 1)
    if r.post_answer_advantage == "reward_to_go":
        after = rollout.after_answer_mask(tokenizer, tokens, lengths, r.mode)
        at_score = np.take_along_axis(after, np.maximum(positions, 0), 1)
        scale = np.where(at_score, float(r.post_answer_weight), scale)
    token_adv = grpo.token_advantages(np.asarray(advantages, np.float32), np.asarray(response_mask) > 0)
    digits = "0123456789"
    score_adv, token_adv = grpo.score_expectation_advantages(
        token_adv, tokens, positions, delta, scale, rollout.score_token_ids(tokenizer), [d != "1" for d in digits])
    ids = np.asarray(rollout.score_token_ids(tokenizer))
    sampled = np.take_along_axis(np.asarray(tokens), np.maximum(positions, 0), 1)
    known = np.isin(sampled, ids[[d != "1" for d in digits]]) & (positions >= 0)
    counts = np.asarray([[known.sum(), (positions >= 0).sum()]], np.float64)
    return np.asarray(token_adv, np.float32), positions, np.asarray(score_adv, np.float32), counts


def _set_score_direction(ctx, state, seq, score_mask, num_response):
    """rl.score_level_split, at the first step whose sampled responses state a score: its direction
    is the mean final state (of the policy about to be updated) at the first tokens of those
    scores, over every process's rows. Until then the optimizer is the plain one."""
    total, count = step.score_state_sum(ctx.model_config, model_setup.compute_params(state.params, ctx.model_config),
                                        seq, np.asarray(score_mask), num_response)
    totals = multihost.allgather_rows(np.asarray(total, np.float64)[None])
    count = float(multihost.allgather_rows(np.asarray([float(count)])).sum())
    if count == 0:
        log.warning("rl.score_level_split: no sampled response of this step states a score, so there is no state "
                    "to split the digits' level along yet; the step is a plain one (the next step tries again)")
        return state
    direction = totals.sum(0) / count
    log.info("rl.score_level_split: the digits' level direction is the mean state at %d score tokens (norm %.3f)",
             int(count), float(np.linalg.norm(direction)))
    return step.set_score_direction(state, direction)


def rl_iteration(ctx, state, ref_params, examples, rng):
    """One GRPO step on `examples` (this process's prompts; with several processes the step's
    batch is every process's, in process order): returns (state, metrics dict). Metrics are
    over the whole step's batch, the same numbers on every process."""
    config, rl, r = ctx.model_config, ctx.rl, ctx.config.rl
    n, m = rl.samples_per_prompt, r.max_new_tokens
    k_sample, k_score, k_step = jax.random.split(rng, 3)
    prompts = rollout.encode_examples(examples, ctx.tokenizer, config, ctx.image_config, mode=r.prompt,
                                      length_buckets=tuple(ctx.config.data.length_buckets),
                                      patch_bucket=ctx.config.data.patch_bucket or None,
                                      num_images=len(examples) * ctx.config.data.max_images_per_prompt,
                                      same_shapes_everywhere=multihost.multiprocess())
    t0 = time.perf_counter()
    # rollouts and scoring read the policy in the compute dtype, cast once per step from the
    # float32 masters (what the update's matmuls see: the same rounding, so old_logp is on-policy)
    policy = model_setup.compute_params(state.params, config)
    out = rollouts.generate(config, policy, prompts.inputs, k_sample, prompts_per_chunk=r.rollout_batch_size,
                            samples=n, max_new_tokens=m, temperature=r.temperature, top_p=r.top_p,
                            eos_token_ids=ctx.eos_ids, pad_token_id=ctx.tokenizer.pad_token_id,
                            tokenizer=ctx.tokenizer, mode=r.mode, engine=r.rollout_engine, slots=r.decode_slots)
    tokens, lengths, texts, vision_mask = out.tokens, out.lengths, out.texts, out.vision_mask
    t1 = time.perf_counter()
    seq = rollout.expand_for_responses(prompts.inputs, tokens, lengths, n)
    offload = ctx.config.model.offload_reference
    ref = model_setup.to_memory(ref_params, "device") if offload else ref_params
    stats = rollouts.score(config, policy, ref, seq, k_score, rl=rl, num_response=m)
    del policy, ref
    t2 = time.perf_counter()
    kl, ent = rollout.response_vision_stats(stats, vision_mask, variant=r.soft_label_variant)
    labels = None
    if multihost.multiprocess() and r.reward == "vl_calibration":
        labels = rollout.global_soft_labels(texts, kl, ent)
    rewards = rollout.score_rewards(texts, examples, n, reward=r.reward, vision_kl=kl, vision_entropy=ent,
                                    soft_label=labels, **dict(r.reward_weights))
    response_mask = (np.arange(m)[None] < lengths[:, None]).astype(np.float32)
    advantages = post_answer_advantages(r.post_answer_advantage, rewards, tokens, lengths, ctx.tokenizer, r.mode, n,
                                        response_mask, weight=r.post_answer_weight)
    score_mask = rollout.confidence_token_mask(ctx.tokenizer, tokens, lengths, r.mode)
    if r.confidence_entropy_bonus:
        advantages = np.asarray(grpo.confidence_entropy_advantages(advantages, stats["nll"], score_mask, response_mask,
                                                                   r.confidence_entropy_bonus), np.float32)
    if step.score_direction_unset(state):
        state = _set_score_direction(ctx, state, seq, score_mask, m)
    expectation = {}
    if rl.score_expectation:
        advantages, positions, score_adv, known_counts = score_expectation_batch(
            r, ctx.tokenizer, rewards, examples, tokens, lengths, advantages, response_mask, n)
        expectation = dict(score_positions=positions, score_advantages=score_adv)
    batch = step.RLBatch(seq, response_mask, vision_mask.astype(np.float32), advantages,
                         stats["logp"], stats["ref_logp"], stats["k3"], stats["nll"], stats["kl"], stats["entropy"],
                         **expectation)
    state, update_metrics = ctx.train_step(state, batch, k_step)
    update_metrics = {k: float(v) for k, v in update_metrics.items()}
    t3 = time.perf_counter()
    metrics = {f"update/{k}": v for k, v in update_metrics.items()}
    if rl.score_expectation:
        known, total = multihost.allgather_rows(known_counts).sum(0)
        metrics["rollout/score_known_digit"] = float(known / max(total, 1.0))
    # per-response values of every process (small host arrays), so that the means below are over
    # the whole step's batch, in the order one process would have them
    rows = multihost.allgather_rows
    perception = evaluation.perception_correct(texts, examples, n, r.mode)
    rewards = {key: rows(np.asarray(value, np.float64)) for key, value in rewards.items()}
    for key, value in rewards.items():
        if np.isfinite(value).any():
            metrics[f"reward/{key}"] = float(np.nanmean(value))
    kl, ent = rows(kl), rows(ent)
    metrics["rollout/response_length"] = float(rows(lengths).mean())
    # mean log-prob of the sampled tokens under the policy (how sharp the sampling distribution is)
    logprob = np.sum(np.asarray(stats["logp"], np.float64) * response_mask, -1) / np.maximum(lengths, 1)
    metrics["rollout/logprob"] = float(rows(logprob).mean())
    # -log pi of the sampled first tokens of the stated scores: how spread the confidence policy is
    score_nll = rows(np.sum(np.where(score_mask, np.asarray(stats["nll"], np.float64), 0.0), -1))
    score_count = rows(np.sum(score_mask, -1).astype(np.float64))
    metrics["rollout/score_nll"] = float(score_nll.sum() / max(score_count.sum(), 1.0))
    metrics["rollout/finished"] = float(rows(out.finished).mean())
    metrics["rollout/has_vision_span"] = float(rows(vision_mask.any(-1)).mean())
    metrics["vce/vision_kl"] = float(np.nanmean(kl)) if np.isfinite(kl).any() else 0.0
    metrics["vce/vision_entropy"] = float(np.nanmean(ent)) if np.isfinite(ent).any() else 0.0
    metrics.update(evaluation.perception_summary(rows(perception), rewards))
    metrics.update({"time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/update_s": t3 - t2})
    return state, metrics


class Context:
    """Everything the loop needs that does not change between steps."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


class Preemption:
    """SIGTERM (TPU VM maintenance, spot preemption) -> a flag the loop reads at step boundaries."""

    EXIT_CODE = 143  # 128 + SIGTERM, what a supervisor expects from a terminated job

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True
        log.warning("SIGTERM received: checkpointing at the end of this step, then exiting")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _is_eval(row: dict) -> bool:
    return any(k.startswith("eval/") for k in row)


def warm_stage(config, run_dir, model_config, params, tokenizer, image_config, data, writer, preemption=None):
    """The supervised warm start, done once: restored from `workdir/warm_start` when a previous
    attempt finished it, else run and saved. An unfinished attempt resumes from its newest
    progress checkpoint (`workdir/warm_start_progress`, every `sft.checkpoint_every` steps and at
    a SIGTERM, which then exits 143 like the RL loop); its metric rows after that point are redone."""
    if not config.sft.steps:
        return params
    store = checkpoints.ParamsStore(run_dir.path("warm_start"))
    restored = store.restore(params)
    if restored is not None:
        log.info("warm start restored from %s (not recomputed)", run_dir.path("warm_start"))
        store.close()
        return restored
    requested = (lambda: any(multihost.allgather_json(preemption.requested))) if preemption else (lambda: False)
    progress = warm.Progress(run_dir.path("warm_start_progress"), config.sft.checkpoint_every, requested)
    try:
        params = warm.warm_start(config, model_config, params, tokenizer, image_config, data, writer, progress)
    except warm.Preempted as stopped:
        writer.close()
        log.warning("stopped by SIGTERM after warm-start step %d of %d; progress %s. Run the same command again "
                    "to resume.", stopped.done, stopped.total, stopped.directory)
        raise SystemExit(Preemption.EXIT_CODE) from None
    store.save(params)
    store.close()
    progress.clear()
    return params


def run(config: ml_collections.ConfigDict) -> dict:
    """Runs the whole experiment; returns the summary also written to workdir/summary.json.

    Resumable at any point: a rerun of the same command restores the warm start, the reference
    model, the newest train-state checkpoint, the data position and the rng, and continues as if
    it had never stopped (same metrics, bit for bit on CPU). Log handlers are the caller's
    (`logs.setup_logging`, which the CLI calls).

    Multi-process (the same command on every process, parallel.initialize): each process reads,
    encodes, decodes and grades its share of every batch (data.reader.BlockReader); device work
    runs on global arrays; process 0 alone writes logs, plots, the summary and the export;
    checkpoints are saved and restored by all processes together (every process's reader
    position in them), also on another process count."""
    parallel.initialize()
    with Preemption() as preemption:  # from the start: a SIGTERM during set-up ends at the first step
        return _run(config, preemption)


def _run(config: ml_collections.ConfigDict, preemption: Preemption) -> dict:
    run_dir = storage.RunDir(config.workdir)
    log.info("workdir: %s%s", run_dir.root, f" (local mirror {run_dir.local_root})" if run_dir.remote else "")
    main_process = jax.process_index() == 0
    if main_process:
        run_dir.write_text("config.json", config.to_json_best_effort(indent=2))
    mesh = parallel.make_mesh(**config.mesh)
    multihost.check_mesh(mesh)
    log.info("mesh %s on %d %s devices", dict(mesh.shape), jax.device_count(), jax.devices()[0].platform)
    rng = jax.random.key(config.seed)

    data = data_setup.setup_data(config, run_dir)
    tokenizer, model_config, params, image_config = model_setup.setup_model(config, data, rng, run_dir)
    params = parallel.shard_params(params, mesh)
    if run_dir.remote and main_process:  # the URL's log is the truth; a local mirror may be older or newer
        run_dir.reset_local("metrics.jsonl")
        run_dir.fetch("metrics.jsonl")
    writer = logs.MetricWriter(run_dir, enabled=main_process)
    summary: dict = {"workdir": run_dir.root}

    params = warm_stage(config, run_dir, model_config, params, tokenizer, image_config, data, writer, preemption)
    if config.rl.untie_head and model_config.tie_word_embeddings:
        model_config, params = model_setup.untie_head(model_config, params, mesh)
        log.info("rl.untie_head: the output projection is a copy of the embedding from here on, trained apart")
    ctx = Context(config=config, model_config=model_config, tokenizer=tokenizer, image_config=image_config,
                  rl=rl_config(config, image_config, tokenizer), eos_ids=tuple(model_setup.eos_ids(tokenizer)),
                  writer=writer)
    evaluator = evaluation.Evaluator(config, model_config, tokenizer, image_config, data.eval_examples, run_dir)

    # the reference model = the RL starting point, frozen, stored in the compute dtype
    ref_params = model_setup.compute_params(params, model_config, copy=True)
    if config.model.offload_reference:
        ref_params = model_setup.to_memory(ref_params, "pinned_host")
    optimizer = step.make_optimizer(ctx.rl)
    state = step.init_state(params, optimizer)
    ckpt = checkpoints.Checkpointer(run_dir.path("checkpoints"), keep=config.checkpoint.keep)
    state, start, extra = ckpt.restore_latest(state)
    steps = config.rl.steps
    if extra:
        readers = extra.get("readers") or [extra["reader"]]  # "reader" alone: a one-process checkpoint
        same_layout = len(readers) == jax.process_count()
        data.train_reader.restore(readers[jax.process_index()] if same_layout else readers[0])
        rng = jax.random.wrap_key_data(np.asarray(extra["rng"], np.uint32))
        log.info("resumed from step %d of %d (%s)", start, steps, run_dir.path("checkpoints"))
    # rows of steps this run is about to redo are dropped: the log reads as one uninterrupted run
    periodic_eval_at_start = bool(config.eval.every) and start % max(config.eval.every, 1) == 0 and start < steps
    dropped = main_process and logs.keep_metrics(writer.path, lambda row: (
        row["step"] < start or logs.is_sft_row(row)
        or row["step"] == start and start > 0 and (not _is_eval(row) or periodic_eval_at_start)))
    if dropped:
        log.info("dropped %d metric rows after step %d (they are redone)", dropped, start)
    ctx.train_step = step.make_train_step(model_config, ctx.rl, optimizer, mesh=mesh)

    if config.eval.before_rl:
        # process 0 decides (its disk has the run's files): evaluation is collective
        if multihost.allgather_json(start == 0 or not run_dir.fetch("before_rl.json"))[0]:
            summary["before_rl"] = evaluator.run(state.params, tag="before_rl", step=0, writer=writer)
            if main_process:
                run_dir.write_text("before_rl.json", json.dumps(summary["before_rl"], indent=2))
        elif os.path.exists(run_dir.local("before_rl.json")):
            with open(run_dir.local("before_rl.json"), encoding="utf-8") as f:
                summary["before_rl"] = json.load(f)

    def save(i):
        readers = multihost.allgather_json(data.train_reader.state())  # orbax writes the JSON once
        ckpt.save(i, state, {"reader": readers[0], "readers": readers,
                             "rng": np.asarray(jax.random.key_data(rng)).tolist()})
        writer.publish()

    progress = logs.progress(range(start, steps), total=steps, initial=start, desc="RL", disable=not main_process)
    try:
        for i in progress:
            rng, key = jax.random.split(rng)
            examples = data.train_reader.take(data.train_reader.block)
            state, metrics = rl_iteration(ctx, state, ref_params, examples, key)
            writer.write(i + 1, metrics)
            progress.set_postfix(reward=f"{metrics.get('reward/reward', 0):.3f}",
                                 acc=f"{metrics.get('reward/accuracy', 0):.2f}",
                                 conf=f"{metrics.get('reward/confidence', 0):.2f}")
            if config.eval.every and (i + 1) % config.eval.every == 0 and i + 1 < steps:
                evaluator.run(state.params, tag=f"step_{i + 1}", step=i + 1, writer=writer)
            stop = any(multihost.allgather_json(preemption.requested))  # a SIGTERM to any process stops all
            if config.checkpoint.every and (i + 1) % config.checkpoint.every == 0 or stop:
                save(i + 1)
            if stop and i + 1 < steps:
                ckpt.wait()
                writer.close()
                progress.close()
                log.warning("stopped by SIGTERM after step %d of %d; checkpoint %s. Run the same command "
                            "again to resume.", i + 1, steps, run_dir.path("checkpoints", str(i + 1)))
                raise SystemExit(Preemption.EXIT_CODE)
    finally:
        ckpt.wait()
    ckpt.close()
    summary["after_rl"] = evaluator.run(state.params, tag="after_rl", step=steps, writer=writer)
    final_params = multihost.fetch_all(state.params) if multihost.multiprocess() else state.params
    if not main_process:
        writer.close()
        return summary
    export.export_model_dir(model_config, final_params, tokenizer, image_config, run_dir.local("model"),
                            prompt=config.rl.prompt)
    run_dir.publish("model")
    summary["model_dir"] = run_dir.path("model")
    plots = logs.plot_training(run_dir.local_root, summary)
    for path in plots:
        run_dir.publish(os.path.basename(path))
    summary["plots"] = [run_dir.path(os.path.basename(p)) for p in plots]
    writer.close()
    run_dir.write_text("summary.json", json.dumps(summary, indent=2, default=float))
    logs.print_summary(summary)
    return summary
