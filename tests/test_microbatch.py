"""The micro-batched update (rl.micro_batch_size) == the one-shot update; its memory does not grow
with the number of micro-batches; float32 master weights under bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hf_utils as H
import rl_utils as U
from vlcal_jax import models
from vlcal_jax.rl import grpo, microbatch, rollout, step

N_SAMPLES, M = 2, 8
# prompt -> its images (indices into GRIDS): one without an image, one with two, so the micro-batch
# layout has to move images between slots (num_images = 4 prompts x 2 slots)
PROMPT_IMAGES = ([0], [], [1, 2], [3])


def mixed_batch(config, params, seed=0, prompt_images=PROMPT_IMAGES, images_per_prompt=2, n=N_SAMPLES):
    rng = np.random.default_rng(seed)
    grids = [U.GRIDS[i] for images in prompt_images for i in images]
    rows, k = [], 0
    for images in prompt_images:
        rows.append(list(range(k, k + len(images))))
        k += len(images)
    ids, mask, pixels, grid = H.make_batch(rng, grids, rows, patch_dim=config.vision.patch_dim, length=28)
    prompts = models.prepare_inputs(config, ids, mask, pixels, grid,
                                    num_images=len(prompt_images) * images_per_prompt)
    tokens = rng.integers(1, 300, size=(len(prompt_images) * n, M))
    lengths = rng.integers(M // 2, M + 1, size=len(prompt_images) * n)
    inputs = rollout.expand_for_responses(prompts, tokens, lengths, n)
    response = np.asarray(inputs.attention_mask)[:, -M:].astype(np.int32)
    logp = np.asarray(U.policy_logprobs(config, params, inputs, M))
    noise = lambda s: (s * rng.standard_normal(logp.shape)).astype(np.float32)  # noqa: E731
    rewards = rng.integers(0, 2, size=len(tokens)).astype(np.float32) + rng.random(len(tokens)).astype(np.float32)
    return step.RLBatch(inputs, response, (response * (np.arange(M)[None] < 5)).astype(np.int32),
                        np.asarray(grpo.group_advantages(rewards, n)), logp + noise(0.1), logp + noise(0.3),
                        rng.exponential(0.5, logp.shape).astype(np.float32), -logp,
                        rng.exponential(0.5, logp.shape).astype(np.float32),
                        rng.exponential(2.0, logp.shape).astype(np.float32))


@pytest.fixture(scope="module")
def world():
    config = U.tiny_config(layers=2, depth=1, deepstack=(0,), tie=False, bias=True)
    params = U.random_params(config)
    return config, params, mixed_batch(config, params)


# AdamW with a large eps: the first Adam step is ~ lr * sign(g) where |g| >> eps, so a 1e-7
# reassociation difference in a tiny gradient would otherwise become a full-size update difference
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3, weight_decay=1e-2))


def _run(config, rl, params, batch):
    state = step.init_state(jax.tree.map(jnp.asarray, params), OPTIMIZER)
    state, metrics = step.make_train_step(config, rl, OPTIMIZER)(state, batch, jax.random.key(0))
    return U.to_host(state.params), U.to_host(metrics)


@pytest.mark.parametrize("size", [4, 1])  # 1: each GRPO group of 2 split over 2 micro-batches
def test_split_puts_each_prompts_images_in_its_micro_batch(world, size):
    config, _, batch = world
    micro = microbatch.split(batch, size, N_SAMPLES, image_token_id=config.image_token_id,
                             merge_unit=config.vision.merge_unit)
    k_total = 8 // size
    assert micro.response_mask.shape == (k_total, size, M) and micro.inputs.position_ids.shape[:3] == (k_total, 3, size)
    # each micro-batch carries its own prompts' image slots (2 per prompt), whole or part of a group
    assert micro.inputs.vision.pixel_values.shape[1] == 2 * max(size // N_SAMPLES, 1)
    slots = micro.inputs.vision.pixel_values.shape[2] // config.vision.merge_unit
    flat_pixels = np.asarray(batch.inputs.vision.pixel_values)
    for k in range(k_total):
        for r in range(size):
            row = k * size + r
            pads = np.asarray(batch.inputs.input_ids[row]) == config.image_token_id
            old = np.asarray(batch.inputs.image_index[row])[pads]
            new = np.asarray(micro.inputs.image_index[k, r])[pads]
            # the same image and the same patch group within it, now in the micro-batch's own images
            np.testing.assert_array_equal(new % slots, old % slots)
            np.testing.assert_array_equal(micro.inputs.vision.pixel_values[k][new // slots], flat_pixels[old // slots])
            assert (new // slots < micro.inputs.vision.pixel_values.shape[1]).all()


@pytest.mark.parametrize("micro_batch_size", [1, 2, 8])  # 1: half a GRPO group; 2: one group; 8: one pass
def test_micro_batched_step_equals_the_one_shot_step(world, micro_batch_size):
    config, params, batch = world
    rl = step.RLConfig(samples_per_prompt=N_SAMPLES, kl_coef=0.1, logprob_chunk=4, loss="vl_calibration")
    ref_params, ref_metrics = _run(config, rl, params, batch)
    ours, metrics = _run(config, step.RLConfig(**{**rl.__dict__, "micro_batch_size": micro_batch_size}),
                         params, batch)
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert float(metrics["skipped"]) == 0.0 and U.max_rel_diff(ref_params, params) > 1e-3
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_micro_batch_size_errors_name_the_setting(world):
    config, params, batch = world
    for size, match in ((3, "multiple or a divisor of rl.samples_per_prompt"), (6, "must divide the 8 responses")):
        rl = step.RLConfig(samples_per_prompt=N_SAMPLES, micro_batch_size=size)
        with pytest.raises(ValueError, match=match):
            _run(config, rl, params, batch)


def test_peak_temporary_memory_does_not_grow_with_the_number_of_micro_batches(world):
    config, params, _ = world
    rl = step.RLConfig(samples_per_prompt=N_SAMPLES, logprob_chunk=4, micro_batch_size=2)
    state = step.init_state(jax.tree.map(jnp.asarray, params), OPTIMIZER)
    temps = {}
    for prompts in (2, 8):
        batch = mixed_batch(config, params, prompt_images=([0], [1]) * (prompts // 2), images_per_prompt=1)
        compiled = step.make_train_step(config, rl, OPTIMIZER).lower(state, batch, jax.random.key(0)).compile()
        temps[prompts] = compiled.memory_analysis().temp_size_in_bytes
    # 4x the micro-batches: the scan body is the same program; only [N, M] token arrays grow
    growth = temps[8] - temps[2]
    assert growth <= 64 * (8 - 2) * N_SAMPLES * M + 0.05 * temps[2], temps


def test_bfloat16_master_weights_lose_the_papers_updates():
    """The measurement of issue 11: at lr 1e-6 an AdamW update (~1e-6) is below bfloat16's spacing at
    |w| ~ 0.02 (~1.2e-4), so bfloat16 weights never move; float32 master weights do."""
    optimizer = optax.adamw(1e-6, weight_decay=0.0)
    for dtype, moves in ((jnp.bfloat16, False), (jnp.float32, True)):
        w = jnp.full((4,), 0.02, dtype)
        opt_state = optimizer.init(w)
        for _ in range(100):
            updates, opt_state = optimizer.update(jnp.ones_like(w), opt_state, w)
            w = optax.apply_updates(w, updates)
        assert bool(jnp.any(w != jnp.asarray(0.02, dtype))) == moves, (dtype, w)


def test_float32_master_weights_under_bfloat16_compute(world):
    """bf16 compute, f32 params and optimizer state, the paper's lr: every matrix moves, and the
    update is the float32 step's within bfloat16 round-off."""
    config, params, batch = world
    rl = step.RLConfig(samples_per_prompt=N_SAMPLES, logprob_chunk=4, learning_rate=1e-6)
    optimizer = step.make_optimizer(rl)
    results = {}
    for name, cfg, dtype in (("f32", config, jnp.float32), ("mixed", config.replace(dtype="bfloat16"), jnp.float32),
                             ("bf16_master", config.replace(dtype="bfloat16"), jnp.bfloat16)):
        state = step.init_state(jax.tree.map(lambda x: jnp.asarray(x, dtype), params), optimizer)
        assert all(x.dtype == dtype for x in jax.tree.leaves(state.opt_state[1][0].mu))
        state, metrics = step.make_train_step(cfg, rl, optimizer)(state, batch, jax.random.key(0))
        delta = jax.tree.map(lambda new, old: np.asarray(new, np.float64) - np.asarray(old, np.float64),
                             U.to_host(state.params), jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype)),
                                                                   params))
        results[name] = (delta, U.to_host(metrics))
    kernels = lambda d: [x for path, x in jax.tree_util.tree_flatten_with_path(d)[0]  # noqa: E731
                         if "kernel" in jax.tree_util.keystr(path)]
    # float32 masters: every kernel moves by ~lr; bfloat16 masters: (almost) nothing moves
    assert all(np.mean(np.abs(d) > 0) > 0.9 for d in kernels(results["mixed"][0]))
    assert np.mean([np.mean(np.abs(d) > 0) for d in kernels(results["bf16_master"][0])]) < 0.05
    # the mixed-precision step is the float32 step within bfloat16 round-off: Adam's first step
    # is ~ -lr * sign(g); a sign can flip only where a gradient is within round-off of 0
    for mixed, full in zip(kernels(results["mixed"][0]), kernels(results["f32"][0])):
        assert np.mean(np.abs(mixed - full) <= 0.05 * rl.learning_rate) > 0.9
    for key in ("loss", "pg_loss", "ratio_mean"):
        np.testing.assert_allclose(results["mixed"][1][key], results["f32"][1][key], rtol=3e-2, atol=3e-3,
                                   err_msg=key)


def test_bfloat16_first_moment_halves_it_and_keeps_the_update(world):
    """rl.adam_mu_dtype="bfloat16": AdamW's first moment is stored in bfloat16 (the second moment
    and the float32 masters are not), and the first update equals the default one within
    bfloat16's rounding of mu (Adam's first step moves each weight by ~lr * g / |g|)."""
    config, params, batch = world
    results = {}
    for mu in ("", "bfloat16"):
        rl = step.RLConfig(samples_per_prompt=N_SAMPLES, logprob_chunk=4, learning_rate=1e-3, adam_mu_dtype=mu)
        optimizer = step.make_optimizer(rl)
        state = step.init_state(jax.tree.map(jnp.asarray, params), optimizer)
        results[mu] = step.make_train_step(config, rl, optimizer)(state, batch, jax.random.key(0))[0]
    adam = results["bfloat16"].opt_state[1][0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(results[""].opt_state[1][0].mu)} == {jnp.dtype(jnp.float32)}
    moved = 0
    for a, b, p in zip(jax.tree.leaves(results[""].params), jax.tree.leaves(results["bfloat16"].params),
                       jax.tree.leaves(params)):
        a, b, p = (np.asarray(x, np.float64) for x in (a, b, p))
        moved += int(np.any(a != p))
        # |mu_bf16 - mu| <= 2^-8 |mu|: the update differs by at most that fraction of lr (+ float32 ulps)
        assert np.max(np.abs(a - b)) <= 2**-8 * 1e-3 * 1.01 + 4 * np.finfo(np.float32).eps * np.max(np.abs(p)), \
            np.max(np.abs(a - b))
    assert moved > 0
