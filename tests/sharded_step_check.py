"""Sharded == unsharded train step, on 8 simulated CPU devices (run by test_train_step.py).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step_check.py

Two updates (AdamW's second step reads the sharded optimizer state) on meshes
(data, fsdp, tensor) = 2x2x2, 1x8x1, 1x4x2 against the same step jitted on one device, in this
process. Exits non-zero on a mismatch; the last stdout line is a JSON summary.
"""

from __future__ import annotations

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

MESHES = ((2, 2, 2), (1, 8, 1), (1, 4, 2))
RTOL = 1e-5


def run(train_step, state, batches):
    """Steps through `batches` -> (host metrics per step, host final state, compiles after the
    first step, device final state)."""
    metrics, compiles = [], 0
    for i, batch in enumerate(batches):
        with U.CompileCounter() as counter:
            state, m = train_step(state, batch, jax.random.key(i))
            metrics.append(U.to_host(m))
        compiles += counter.count if i else 0
    return metrics, U.to_host(state), compiles, state


def metric_errors(ours, ref) -> dict[str, float]:
    """|a - b| / max(|b|, 1e-3) per metric (so metrics near 0 compare absolutely at 1e-8)."""
    return {k: abs(float(ours[k]) - float(ref[k])) / max(abs(float(ref[k])), 1e-3) for k in ref}


def main():
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), have "
                         f"{jax.device_count()}")
    start = time.perf_counter()
    config = U.tiny_config(tie=False, bias=True, deepstack=(0,), layers=2, depth=1)
    params = U.random_params(config)
    batches = [U.make_rl_batch(config, params, seed=s) for s in (0, 1)]
    rl = step.RLConfig(samples_per_prompt=2, kl_coef=0.1, logprob_chunk=4)
    # make_optimizer's structure (clip, AdamW) with a large eps: with eps=1e-8 the first Adam step is
    # lr * g / (|g| + 1e-8), whose slope lr / eps = 1e6 at |g| ~ eps turns the float reassociation of
    # sharded reductions (~1e-6 relative in the gradients) into 1e-4 differences in the params.
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3, weight_decay=1e-2))

    one = jax.devices()[0]
    ref_metrics, ref_state, _, _ = run(step.make_train_step(config, rl, optimizer),
                                       step.init_state(jax.device_put(params, one), optimizer), batches)
    assert all(float(m["skipped"]) == 0.0 for m in ref_metrics)
    moved = U.max_rel_diff(ref_state.params, params)
    assert moved > 1e-3, f"the reference update barely moved the params ({moved})"

    report = {"reference_param_change": moved, "setup_and_reference_s": round(time.perf_counter() - start, 1)}
    for shape in MESHES:
        begin = time.perf_counter()
        mesh = parallel.make_mesh(*shape)
        state = step.init_state(parallel.shard_params(params, mesh), optimizer)
        metrics, final, recompiles, device_state = run(step.make_train_step(config, rl, optimizer, mesh=mesh),
                                                       state, batches)
        name = "x".join(map(str, shape))
        q = device_state.params["text"]["layers"]["attn"]["q_proj"]["kernel"]
        expected = parallel.spec_for("text/layers/attn/q_proj/kernel", q.shape, mesh)
        assert q.sharding.spec == expected and expected != P(None, None, None), (name, q.sharding)
        mu = device_state.opt_state[1][0].mu["text"]["layers"]["attn"]["q_proj"]["kernel"]
        assert mu.sharding.is_equivalent_to(q.sharding, q.ndim), (name, mu.sharding)
        errors = {
            "metrics": max(max(metric_errors(m, r).values()) for m, r in zip(metrics, ref_metrics)),
            "worst_metric": max(((v, k) for m, r in zip(metrics, ref_metrics) for k, v in metric_errors(m, r).items()))[1],
            "params": U.max_rel_diff(final.params, ref_state.params),
            "updates": U.max_rel_diff(jax.tree.map(np.subtract, final.params, params),
                                      jax.tree.map(np.subtract, ref_state.params, params)),
            "opt_state": U.max_rel_diff(final.opt_state, ref_state.opt_state),
            "recompiles": recompiles,
            "seconds": round(time.perf_counter() - begin, 1),
        }
        report[name] = errors
        print(name, errors, flush=True)
        assert recompiles == 0, f"{name}: the second batch of the same shapes recompiled the step"
        for key in ("metrics", "params", "opt_state"):
            assert errors[key] <= RTOL, f"{name}: {key} differ by {errors[key]:.2e} relative (> {RTOL})"
        # the parameter changes alone (not diluted by the params' size) agree to 1e-4
        assert errors["updates"] <= 10 * RTOL, f"{name}: updates differ by {errors['updates']:.2e} relative"
    print(json.dumps(report))


if __name__ == "__main__":
    main()
