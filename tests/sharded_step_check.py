"""Sharded == unsharded train step, on 8 simulated CPU devices (run by test_train_step.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step_check.py \
        [--seeds 0,1] [--meshes 2x2x2,1x8x1,1x4x2,2x2x2/mb4]

Two updates per seed (AdamW's second step reads the sharded optimizer state; the first batch is
on-policy, old_logp == logp, as in training, the second off-policy) on meshes (data, fsdp,
tensor) against the same step jitted on one device, in this process. Exits non-zero on a
mismatch; the last stdout line is a JSON summary whose "margin" entries are the largest
error / bound ratio seen (1 = at the bound).

Why each bound is what it is
----------------------------
Sharding changes only the association of float32 reductions (matmul contractions split over
"fsdp"/"tensor", the log-softmax over the vocabulary, token sums split over rows), so every
quantity differs from the one-device value by round-off propagated from where it is computed:

* Sampled-token log-probs: a few ulps of their magnitude. The budget is
  delta = LOGP_ULPS * eps32 * max|logp| per token (checked directly on the post-step policy).
* Metrics that are token means of functions of logp (ppo_kl, ratio_mean, ref_kl, pg_loss,
  loss) get an absolute bound: first-order sensitivity to logp times delta, computed from the
  batch (|d ratio| = r delta, |d k3| = |e^(ref-logp) - 1| delta, |d pg| = |A| r delta), plus a
  few ulps of the value itself. ppo_kl = mean(old_logp - logp) is a difference of nearly equal
  log-probs: on an on-policy step it is round-off around 0, so a relative bound there is
  noise (the CI failure this replaced: 1.05e-05 "relative" on a value of ~1e-8).
* Clip fractions are counts: they may differ only by tokens whose log-ratio lies within delta
  of a clip boundary (computed from the batch; usually none, so they must be equal).
* Everything computed from the batch alone (TAR weights, filter fraction, token counts,
  skipped) or from a sum of many same-sign terms (grad_norm) is relative, METRIC_RTOL.
* Parameters and optimizer state stay tight: STATE_RTOL of each leaf's largest magnitude, and
  the parameter *changes* (not diluted by the params' size) UPDATE_RTOL of the largest change,
  plus PARAM_ULPS ulps of the parameter (a change far smaller than its parameter carries the
  parameter's own float32 rounding: seed 4 moved a norm scale near 1 by ~1e-3, where one ulp
  is 1e-4 of the change). "updates" in the report is that error / bound ratio.

Measured with --seeds 0,1,2,3,4,5 on meshes 2x2x2,1x8x1,1x4x2,2x4x1 (24 runs of two steps):
the largest error / bound ratio of any metric was 0.083 (the post-step log-probs; ~1.3 ulps
against a 16-ulp budget), of the parameter changes 0.16, params 3.3e-6 and optimizer state
4.0e-6 relative (bound 1e-5), and ppo_kl differed by at most 1.0e-7 absolute. So the bounds
hold with a 6-12x margin rather than by luck, while a real sharding bug (a wrong reduction, a
dropped shard) moves these quantities by orders of magnitude more. CI runs seeds 0 and 1 on
the first three meshes and on 2x2x2 with the update in two micro-batches ("2x2x2/mb4": the
micro-batched sharded step against the one-shot one-device step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rl_utils as U  # noqa: E402
from vlcal_jax import parallel  # noqa: E402
from vlcal_jax.rl import step  # noqa: E402

MESHES = ("2x2x2", "1x8x1", "1x4x2", "2x2x2/mb4", "2x2x2/mb4/off")
EPS32 = float(np.finfo(np.float32).eps)
LOGP_ULPS = 16  # per-token log-prob budget, in ulps of max|logp|
VALUE_ULPS = 64  # round-off of a metric's own reduction, in ulps of its magnitude
METRIC_RTOL = 1e-5
STATE_RTOL = 1e-5
UPDATE_RTOL = 1e-4
PARAM_ULPS = 8  # rounding of a parameter over two AdamW steps, in ulps of its magnitude
LOGP_METRICS = ("ppo_kl", "ratio_mean", "ref_kl", "pg_loss", "loss")
COUNT_METRICS = ("clipfrac_low", "clipfrac_high", "dual_clip_frac")


def run(train_step, state, batches):
    """Steps through `batches` -> (host metrics per step, host params before each step, host final
    state, compiles after the first step, device final state)."""
    metrics, before, compiles = [], [], 0
    for i, batch in enumerate(batches):
        before.append(U.to_host(state.params))
        with U.CompileCounter() as counter:
            state, m = train_step(state, batch, jax.random.key(i))
            metrics.append(U.to_host(m))
        compiles += counter.count if i else 0
    return metrics, before, U.to_host(state), compiles, state


def metric_bounds(batch, logp, rl: step.RLConfig, ref_metrics: dict) -> dict[str, float]:
    """Absolute bound per metric for one step, from the batch and the one-device log-probs [N, M]
    of the params the step started from (see the module docstring)."""
    resp = np.asarray(batch.response_mask, bool)
    logp = np.asarray(logp, np.float64)
    old, ref = np.asarray(batch.old_logp, np.float64), np.asarray(batch.ref_logp, np.float64)
    adv = np.abs(np.asarray(batch.advantages, np.float64))[:, None] * np.ones_like(logp)
    delta = LOGP_ULPS * EPS32 * float(np.abs(logp[resp]).max())
    log_ratio = logp - old
    ratio = np.exp(np.clip(log_ratio, -20, 20))
    r_max = float(ratio[resp].max()) * np.exp(delta)
    k3_slope = float(np.abs(np.exp(np.clip(ref - logp, -20, 20)) - 1.0)[resp].max())
    pg = max(float(adv[resp].max()) * r_max, 1e-30) * delta
    sensitivity = {"ppo_kl": delta, "ratio_mean": r_max * delta, "ref_kl": k3_slope * delta, "pg_loss": pg,
                   "loss": pg + rl.kl_coef * k3_slope * delta}
    near = lambda x, b: np.abs(x - np.log(b)) <= 2 * delta  # noqa: E731
    boundary = resp & (near(log_ratio, 1 - rl.clip_low) | near(log_ratio, 1 + rl.clip_high))
    dual = resp & (np.abs(ratio - rl.dual_clip) <= 2 * r_max * delta)
    flips = {"clipfrac_low": boundary, "clipfrac_high": boundary, "dual_clip_frac": boundary | dual}
    bounds = {}
    for key, value in ref_metrics.items():
        magnitude = abs(float(value))
        if key in sensitivity:
            bounds[key] = sensitivity[key] + VALUE_ULPS * EPS32 * magnitude
        elif key in COUNT_METRICS:
            bounds[key] = flips[key].sum() / max(resp.sum(), 1) + VALUE_ULPS * EPS32 * magnitude
        else:
            bounds[key] = METRIC_RTOL * max(magnitude, 1e-30)
    bounds["logp"] = delta
    return bounds


def update_margin(ours, ref, start) -> float:
    """max over leaves of |d_ours - d_ref| / (UPDATE_RTOL max|d_ref| + PARAM_ULPS ulps of max|p|),
    d = final - start: a change much smaller than its parameter (a norm scale near 1 moved by 1e-4)
    carries the float32 rounding of the parameter itself, a few ulps of |p|, not of |d|."""
    worst = 0.0
    for a, b, p0 in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), jax.tree.leaves(start)):
        a, b, p0 = (np.asarray(x, np.float64) for x in (a, b, p0))
        if not a.size:
            continue
        err = float(np.abs((a - p0) - (b - p0)).max())
        bound = UPDATE_RTOL * float(np.abs(b - p0).max()) + PARAM_ULPS * EPS32 * float(np.abs(b).max())
        worst = max(worst, err / bound if err else 0.0)
    return worst


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--meshes", default=",".join(MESHES))
    args = parser.parse_args()
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), have "
                         f"{jax.device_count()}")
    # "2x2x2/mb4": that mesh with the update micro-batched (rl.micro_batch_size=4: 2 micro-batches)
    # "2x2x2/mb4/off": micro-batched with the pixels in host memory (rl.offload_pixels)
    meshes = [(tuple(int(s) for s in m.split("/")[0].split("x")),
               int(m.split("/mb")[1].split("/")[0]) if "/mb" in m else 0, m.endswith("/off"))
              for m in args.meshes.split(",")]
    config = U.tiny_config(tie=False, bias=True, deepstack=(0,), layers=2, depth=1)
    rl = step.RLConfig(samples_per_prompt=2, kl_coef=0.1, logprob_chunk=4)
    # make_optimizer's structure (clip, AdamW) with a large eps: with eps=1e-8 the first Adam step is
    # lr * g / (|g| + 1e-8), whose slope lr / eps = 1e6 at |g| ~ eps turns the float reassociation of
    # sharded reductions (~1e-6 relative in the gradients) into 1e-4 differences in the params.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3, weight_decay=1e-2))
    one = jax.devices()[0]
    report, margins = {}, {}
    seeds = [int(s) for s in args.seeds.split(",")]
    first_seed = seeds[0]
    for seed in seeds:
        start = time.perf_counter()
        params = U.random_params(config, seed=seed)
        # on-policy first (old_logp = logp: ppo_kl is round-off around 0), then off-policy
        batches = [U.make_rl_batch(config, params, seed=2 * seed, ratio_noise=0.0),
                   U.make_rl_batch(config, params, seed=2 * seed + 1, ratio_noise=0.1)]
        ref_metrics, ref_before, ref_state, _, _ = run(
            step.make_train_step(config, rl, optimizer), step.init_state(jax.device_put(params, one), optimizer),
            batches)
        assert all(float(m["skipped"]) == 0.0 for m in ref_metrics)
        moved = U.max_rel_diff(ref_state.params, params)
        assert moved > 1e-3, f"the reference update barely moved the params ({moved})"
        m_resp = batches[0].response_mask.shape[1]
        bounds = [metric_bounds(b, U.policy_logprobs(config, p, b.inputs, m_resp), rl, m)
                  for b, p, m in zip(batches, ref_before, ref_metrics)]
        final_logp = np.asarray(U.policy_logprobs(config, ref_state.params, batches[1].inputs, m_resp))
        report[f"seed{seed}"] = {"reference_param_change": moved, "setup_and_reference_s":
                                 round(time.perf_counter() - start, 1)}
        for shape, micro, offload in meshes:
            if offload and seed != first_seed:  # host-memory pixels: the same numbers, checked once
                continue
            begin = time.perf_counter()
            mesh = parallel.make_mesh(*shape)
            state = step.init_state(parallel.shard_params(params, mesh), optimizer)
            rl_mesh = dataclasses.replace(rl, micro_batch_size=micro, offload_pixels=offload)
            train_step = step.make_train_step(config, rl_mesh, optimizer, mesh=mesh)
            if offload:  # the pixels really enter the compiled step in host memory
                lowered = train_step.lower(state, batches[0], jax.random.key(0)).as_text()
                assert 'memory_kind = "pinned_host"' in lowered, "rl.offload_pixels: no host-memory input"
            metrics, _, final, recompiles, device_state = run(train_step, state, batches)
            name = f"seed{seed}/" + "x".join(map(str, shape)) + (f"/mb{micro}" if micro else "") + ("/off" * offload)
            q = device_state.params["text"]["layers"]["attn"]["q_proj"]["kernel"]
            expected = parallel.spec_for("text/layers/attn/q_proj/kernel", q.shape, mesh)
            assert q.sharding.spec == expected and expected != P(None, None, None), (name, q.sharding)
            mu = device_state.opt_state[1][0].mu["text"]["layers"]["attn"]["q_proj"]["kernel"]
            assert mu.sharding.is_equivalent_to(q.sharding, q.ndim), (name, mu.sharding)
            # the post-step policy's log-probs, evaluated on one device from the sharded run's params
            logp = np.asarray(U.policy_logprobs(config, final.params, batches[1].inputs, m_resp))
            ratios = {"logp": float(np.abs(logp - final_logp).max()) / bounds[1]["logp"]}
            for i, (ours, ref) in enumerate(zip(metrics, ref_metrics)):
                for key in ref:
                    err = abs(float(ours[key]) - float(ref[key]))
                    ratios[f"step{i + 1}/{key}"] = err / bounds[i][key] if err else 0.0
            worst = max(ratios, key=ratios.get)
            errors = {
                "metric_margin": ratios[worst], "worst_metric": worst,
                "ppo_kl_abs_err": [abs(float(o["ppo_kl"]) - float(r["ppo_kl"])) for o, r in zip(metrics, ref_metrics)],
                "params": U.max_rel_diff(final.params, ref_state.params),
                "updates": update_margin(final.params, ref_state.params, params),
                "opt_state": U.max_rel_diff(final.opt_state, ref_state.opt_state),
                "recompiles": recompiles,
                "seconds": round(time.perf_counter() - begin, 1),
            }
            report[name] = errors
            for key, value in ratios.items():
                margins[key] = max(margins.get(key, 0.0), value)
            print(name, errors, flush=True)
            assert recompiles == 0, f"{name}: the second batch of the same shapes recompiled the step"
            bad = {k: v for k, v in ratios.items() if v > 1.0}
            assert not bad, f"{name}: over their bounds (error / bound): {bad}"
            for key, tol in (("params", STATE_RTOL), ("opt_state", STATE_RTOL), ("updates", 1.0)):
                assert errors[key] <= tol, f"{name}: {key} differ by {errors[key]:.2e} relative (> {tol})"
    report["margin"] = dict(sorted(margins.items(), key=lambda kv: -kv[1]))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
