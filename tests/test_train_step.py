"""rl.step: sharded == one-device step, float64 gradient vs finite differences, zero-advantage and
non-finite steps, VCE scoring (K perturbations, a fresh mask per response), compile counts."""

import functools
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rl_utils as U
from vlcal_jax.models import qwen3_vl, text
from vlcal_jax.rl import certainty, grpo, perturb, step

PROMPTS, N, M = 4, 2, 8  # 8 rows: divides every mesh of the sharded check
SHARDED_SCRIPT = os.path.join(os.path.dirname(__file__), "sharded_step_check.py")
SHARDED_SEEDS = "0,1"


@pytest.fixture(scope="module", autouse=True)
def sharded_run(request):
    """Starts the 8-device check at module set-up (when its test is selected), so that it compiles
    while the tests below run."""
    if not any(item.name == "test_sharded_step_equals_one_device_step" for item in request.session.items):
        yield None
        return
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 " \
            "--xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    proc = subprocess.Popen([sys.executable, SHARDED_SCRIPT, "--seeds", SHARDED_SEEDS], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:  # the test was not reached
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def world():
    """Untied head and attention biases (every kind of parameter); old_logp = the current logp."""
    config = U.tiny_config(layers=2, depth=1, deepstack=(0,), tie=False, bias=True)
    params = U.random_params(config)
    return config, params, U.make_rl_batch(config, params, seed=0, ratio_noise=0.0)


def _equal_trees(a, b) -> bool:
    return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def no_kl_step(world):
    """make_optimizer's AdamW with weight decay 0, and no reference-KL term."""
    config, _, _ = world
    rl = step.RLConfig(samples_per_prompt=N, kl_coef=0.0, weight_decay=0.0, learning_rate=1e-2, logprob_chunk=4)
    optimizer = step.make_optimizer(rl)
    return optimizer, step.make_train_step(config, rl, optimizer)


def _fresh(params, optimizer):
    return step.init_state(jax.tree.map(jnp.asarray, params), optimizer)


def test_train_step_compiles_once_for_batches_of_equal_shapes(world, no_kl_step, monkeypatch):
    config, params, batch = world
    optimizer, train_step = no_kl_step
    other = U.make_rl_batch(config, params, seed=5)
    assert not np.array_equal(other.inputs.input_ids, batch.inputs.input_ids)
    state, metrics = train_step(_fresh(params, optimizer), batch, jax.random.key(0))
    # The step's body calls step.loss_fn only while jit traces it: from here on a trace raises.
    chex.clear_trace_counter()
    monkeypatch.setattr(step, "loss_fn", chex.assert_max_traces(step.loss_fn, n=0))
    with U.CompileCounter() as compiles:
        state, metrics = train_step(state, other, jax.random.key(1))
        assert int(state.step) == 2 and float(metrics["skipped"]) == 0.0
    assert compiles.count == 0


def test_train_step_input_errors_name_the_field(world, no_kl_step):
    """chex checks at the step's entry, at trace time: each bad batch fails before compiling."""
    config, params, batch = world
    optimizer, train_step = no_kl_step
    state = _fresh(params, optimizer)
    inputs = batch.inputs
    cases = [
        (batch._replace(old_logp=batch.old_logp[:, 1:]),
         rf"\[batch.old_logp must be \[N, M\] = \[{PROMPTS * N}, {M}\] like batch.response_mask\]"),
        (batch._replace(advantages=batch.advantages[:, None]),
         rf"\[batch.advantages must be \[N\] = \[{PROMPTS * N}\] or \[N, M\] = \[{PROMPTS * N}, {M}\]\]"),
        (batch._replace(token_kl=batch.token_kl.astype(np.int32)), r"\[batch.token_kl must be float\]"),
        (batch._replace(inputs=inputs._replace(image_index=inputs.image_index[:, 1:])),
         r"\[batch.inputs.image_index must be \[B, T\]"),
    ]
    with U.CompileCounter() as compiles:
        for bad, message in cases:
            with pytest.raises(AssertionError, match=message):
                train_step(state, bad, jax.random.key(0))
    assert compiles.count == 0


def test_equal_rewards_without_kl_leave_params_bit_identical(world, no_kl_step):
    config, params, _ = world
    optimizer, train_step = no_kl_step
    batch = U.make_rl_batch(config, params, seed=0, rewards=np.repeat([1.0, 0.0, 0.5, 1.7], N))
    assert not np.asarray(batch.advantages).any()
    state, metrics = train_step(_fresh(params, optimizer), batch, jax.random.key(0))
    assert int(state.step) == 1 and float(metrics["skipped"]) == 0.0
    assert float(metrics["grad_norm"]) == 0.0 and float(metrics["pg_loss"]) == 0.0
    assert _equal_trees(U.to_host(state.params), params)


def test_equal_rewards_with_kl_update_is_the_pure_kl_update(world):
    """Zero advantages: the update is that of kl_coef * mean k3(logp, ref_logp) alone. SGD (with
    make_optimizer's clipping) keeps the update proportional to the gradient, which Adam's first
    step (about lr * sign(g)) would hide."""
    config, params, _ = world
    kl_coef, lr = 0.5, 0.1
    batch = U.make_rl_batch(config, params, seed=2, ref_noise=0.5, rewards=np.repeat([0.0, 1.0, 0.3, 2.0], N))
    rl = step.RLConfig(samples_per_prompt=N, kl_coef=kl_coef, logprob_chunk=4)
    optimizer = optax.chain(optax.clip_by_global_norm(rl.grad_clip), optax.sgd(lr))
    state = _fresh(params, optimizer)
    train_step = U.fast_compile(step.make_train_step(config, rl, optimizer), state, batch, jax.random.key(0))
    state, metrics = train_step(state, batch, jax.random.key(0))
    assert float(metrics["pg_loss"]) == 0.0 and float(metrics["skipped"]) == 0.0

    response = jnp.asarray(batch.response_mask, jnp.float32)

    def pure_kl(p):
        logp = U.response_logprobs(config, p, batch.inputs, M)
        d = jnp.clip(batch.ref_logp - logp, -20.0, 20.0)
        return kl_coef * jnp.sum(jnp.clip(jnp.exp(d) - d - 1.0, -10.0, 10.0) * response) / jnp.sum(response)

    @functools.partial(jax.jit, compiler_options=U.FAST)
    def reference(p):
        loss, grads = jax.value_and_grad(pure_kl)(p)
        updates, _ = optimizer.update(grads, optimizer.init(p), p)
        return loss, optax.apply_updates(p, updates), optax.tree.norm(grads)

    loss, expected, grad_norm = reference(params)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(float(grad_norm), rel=1e-5)
    assert float(grad_norm) > 1e-3
    ours = jax.tree.map(np.subtract, U.to_host(state.params), params)
    theirs = jax.tree.map(np.subtract, U.to_host(expected), params)
    assert U.max_rel_diff(ours, theirs) < 1e-4


def test_non_finite_step_is_skipped_and_the_next_one_proceeds(world, no_kl_step):
    config, params, batch = world
    optimizer, train_step = no_kl_step
    bad = batch._replace(old_logp=np.where(batch.response_mask[:1] > 0, np.nan, batch.old_logp))
    state = _fresh(params, optimizer)
    opt_before = U.to_host(state.opt_state)
    state, metrics = train_step(state, bad, jax.random.key(0))
    assert float(metrics["skipped"]) == 1.0 and np.isnan(float(metrics["loss"]))
    assert int(state.step) == 0
    assert _equal_trees(U.to_host(state.params), params)
    assert _equal_trees(U.to_host(state.opt_state), opt_before)
    # the skipped step leaves no trace: the next step is the first step of a fresh state
    state, metrics = train_step(state, batch, jax.random.key(1))
    expected, _ = train_step(_fresh(params, optimizer), batch, jax.random.key(1))
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1
    assert _equal_trees(U.to_host(state), U.to_host(expected))
    assert U.max_rel_diff(U.to_host(state.params), params) > 1e-3


def test_nan_outside_the_filtered_tokens_is_caught_by_the_gradient_norm(world, no_kl_step):
    """A NaN old_logp on a token the perception filter drops leaves the loss finite (the token is
    masked out) but not its gradient (0 * NaN through the mask): the grad-norm check skips it."""
    config, params, batch = world
    optimizer, train_step = no_kl_step
    token_k3 = batch.token_k3.copy()
    token_k3[0, 0] = -1.0  # lowest k3 of row 0: never among the kept top 20%
    bad = batch._replace(token_k3=token_k3, old_logp=batch.old_logp.copy())
    bad.old_logp[0, 0] = np.nan
    state, metrics = train_step(_fresh(params, optimizer), bad, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["skipped"]) == 1.0 and int(state.step) == 0
    assert _equal_trees(U.to_host(state.params), params)


def test_loss_gradient_matches_central_differences_in_float64(world, monkeypatch):
    """float64 end to end. The model keeps norms, rotary, softmax, logits and the loss in float32
    (right for bfloat16, but it caps a float64 check at float32 round-off: finite differences
    then disagree by up to 30% on small vision gradients), so jnp.float32 is aliased to float64
    for this test. old_logp is the current logp up to float32 round-off (ratio 1 +- 1e-6, inside
    the clip range: the surrogate is smooth there) and ref_logp != logp, so both the policy and
    the KL terms have gradients."""
    config, params, batch = world
    monkeypatch.setattr(jnp, "float32", jnp.float64)
    with jax.enable_x64(True):
        config = config.replace(dtype="float64")
        params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        rl = step.RLConfig(samples_per_prompt=N, kl_coef=0.5, logprob_chunk=4)
        value_and_grad = jax.jit(jax.value_and_grad(lambda p, b: step.loss_fn(p, config, rl, b)[0]),
                                 compiler_options=U.FAST)
        loss, grads = value_and_grad(params, batch)
        assert np.asarray(loss).dtype == np.float64
        rng = np.random.default_rng(0)
        leaves = ("visual/patch_embed/kernel", "visual/pos_embed", "visual/blocks/norm1/scale",
                  "visual/blocks/attn/qkv/kernel", "visual/deepstack_mergers/fc2/kernel", "visual/merger/fc1/bias",
                  "text/embed", "text/layers/attn/k_proj/bias", "text/layers/attn/q_norm",
                  "text/layers/mlp/down_proj/kernel", "lm_head/kernel")
        h = 1e-4
        for name in leaves:
            keys = name.split("/")
            value, grad = params, grads
            for key in keys:
                value, grad = value[key], grad[key]
            direction = rng.standard_normal(value.shape)
            direction /= np.linalg.norm(direction)

            def at(offset, keys=keys):
                tree = jax.tree.map(lambda x: x, params)
                node = tree
                for key in keys[:-1]:
                    node = node[key]
                node[keys[-1]] = value + offset * direction
                return float(value_and_grad(tree, batch)[0])

            finite_difference = (at(h) - at(-h)) / (2 * h)
            analytic = float(np.sum(np.asarray(grad) * direction))
            assert abs(analytic) > 1e-9, name
            assert finite_difference == pytest.approx(analytic, rel=1e-6), name


@pytest.fixture(scope="module")
def scoring(world):
    """Weights of std 0.1 (not 0.02): a 0.02 model barely reads the image (KL ~ 1e-6 per token)."""
    config, _, _ = world
    params, ref_params = U.random_params(config, seed=3, std=0.1), U.random_params(config, seed=4, std=0.1)
    inputs, response_mask = U.rollout_inputs(config, prompts=PROMPTS, n=N, response_len=M, seed=0)
    rl = step.RLConfig(samples_per_prompt=N, vce_k=3, logprob_chunk=4)
    rng = jax.random.key(7)
    stats = step.score(config, params, ref_params, inputs, rng, rl=rl, num_response=M)
    return config, params, ref_params, inputs, response_mask, rl, rng, U.to_host(stats)


def test_score_k_perturbations_equal_a_loop_over_the_keys(scoring):
    config, params, _, inputs, response_mask, rl, rng, stats = scoring
    single = step.RLConfig(samples_per_prompt=N, vce_k=1, logprob_chunk=4)
    targets = inputs.input_ids[:, -M:]

    @functools.partial(jax.jit, compiler_options=U.FAST)
    def one_perturbation(params, inputs, key):
        """Statistics under one perturbed copy per response (the K = 1 computation, by hand)."""
        hidden = step.response_hidden(config, params, inputs, M)
        perturbed = step.perturbed_inputs(config, inputs, N, key, single)
        hidden_pert = step.response_hidden(config, params, perturbed, M)
        return certainty.chunked_token_stats(hidden, hidden_pert, text.lm_head_kernel(config, params), targets,
                                             chunk_size=4)

    loop = [U.to_host(one_perturbation(params, inputs, key)) for key in jax.random.split(rng, rl.vce_k)]
    valid = response_mask > 0
    for key in certainty.PERTURBED_KEYS:
        per_key = np.stack([s[key] for s in loop])
        assert not np.allclose(per_key[0][valid], per_key[1][valid]), f"{key}: the K masks are not independent"
        np.testing.assert_allclose(stats[key][valid], per_key.mean(0)[valid], rtol=1e-5, atol=1e-6, err_msg=key)
    for key in ("logp", "nll", "entropy"):
        np.testing.assert_allclose(stats[key][valid], loop[0][key][valid], rtol=1e-5, atol=1e-6, err_msg=key)
    assert (stats["kl"][valid] > 1e-4).mean() > 0.5


def _log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def test_temperature_scores_and_trains_the_sampling_distribution(scoring, world):
    """rl.temperature T: scoring's logp / entropy / ref_logp and the loss's logp are those of
    softmax(logits / T), re-derived here in NumPy from the model's full logits."""
    config, params, ref_params, inputs, response_mask, _, rng, at_one = scoring
    tempered = step.RLConfig(samples_per_prompt=N, vce_k=1, logprob_chunk=4, temperature=0.5)
    stats = U.to_host(step.score(config, params, ref_params, inputs, rng, rl=tempered, num_response=M))
    valid = response_mask > 0

    def reference(p, inputs=inputs):
        targets = np.asarray(inputs.input_ids[:, -M:])
        logits = np.asarray(qwen3_vl.apply(config, p, inputs), np.float64)[:, -M - 1:-1] / 0.5
        logp = _log_softmax(logits)
        return np.take_along_axis(logp, targets[..., None], -1)[..., 0], -(np.exp(logp) * logp).sum(-1)

    logp, entropy = reference(params)
    np.testing.assert_allclose(stats["logp"][valid], logp[valid], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["entropy"][valid], entropy[valid], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["ref_logp"][valid], reference(ref_params)[0][valid], rtol=1e-4, atol=1e-5)
    assert np.abs(stats["logp"] - at_one["logp"])[valid].max() > 1e-2  # T = 0.5 is not T = 1

    config, params, batch = world
    batch = batch._replace(old_logp=np.asarray(reference(params, batch.inputs)[0], np.float32))
    loss, _ = jax.jit(step.loss_fn, static_argnums=(1, 2))(params, config, tempered, batch)
    effective, pg_mask, _ = step.shaped_advantages(tempered, batch)
    expected, _ = grpo.policy_loss(jnp.asarray(batch.old_logp), batch.old_logp, batch.ref_logp, effective,
                                   batch.response_mask.astype(bool), pg_mask, clip_low=tempered.clip_low,
                                   clip_high=tempered.clip_high, dual_clip=tempered.dual_clip,
                                   kl_coef=tempered.kl_coef, kl_clamp=tempered.kl_clamp)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4)
    with pytest.raises(ValueError, match="rl.temperature"):
        step.RLConfig(temperature=0.0)


def test_perturbations_use_the_model_processor_normalisation():
    # A processor with CLIP statistics: blacked-out patches are the normalised value of pixel 0
    # per channel (not Qwen3-VL's -1), grey is pixel 128 and noise stays in the normalised [0, 255].
    # Under jit (as in `score`) the statistics are static, so they must be part of the cache key.
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    config = U.tiny_config()
    inputs, _ = U.rollout_inputs(config, prompts=2, n=N, response_len=M, seed=0)
    clip = dict(samples_per_prompt=N, image_mean=mean, image_std=std)
    per_channel = config.vision.patch_dim // 3

    def row(pixel):
        return np.repeat([(pixel / 255.0 - m) / s for m, s in zip(mean, std)], per_channel).astype(np.float32)

    for kind, value in (("blackout", 0.0), ("grey", 128.0)):
        rl = step.RLConfig(vce_kind=kind, vce_prob=1.0, **clip)
        out = np.asarray(step.perturbed_inputs(config, inputs, N, jax.random.key(0), rl).vision.pixel_values)
        np.testing.assert_allclose(out, np.broadcast_to(row(value), out.shape), rtol=1e-6, atol=1e-6, err_msg=kind)
    rl = step.RLConfig(vce_kind="noise", vce_noise_std=1e4, **clip)
    out = np.asarray(step.perturbed_inputs(config, inputs, N, jax.random.key(0), rl).vision.pixel_values)
    assert np.all(out >= row(0.0) - 1e-6) and np.all(out <= row(255.0) + 1e-6)
    assert np.isclose(out, row(0.0), atol=1e-6).mean() > 0.3  # the clip at pixel 0 is active
    jitted = jax.jit(step.perturbed_inputs, static_argnums=(0, 2, 4))
    qwen = np.asarray(jitted(config, inputs, N, jax.random.key(0), step.RLConfig(samples_per_prompt=N, vce_prob=1.0))
                      .vision.pixel_values)
    np.testing.assert_array_equal(qwen, np.full_like(qwen, -1.0))
    rl = step.RLConfig(vce_prob=1.0, **clip)
    out = np.asarray(jitted(config, inputs, N, jax.random.key(0), rl).vision.pixel_values)
    np.testing.assert_allclose(out, np.broadcast_to(row(0.0), out.shape), rtol=1e-6, atol=1e-6)


def test_every_response_of_a_prompt_gets_its_own_blackout_mask(scoring):
    config, _, _, inputs, _, _, _, _ = scoring
    rl = step.RLConfig(samples_per_prompt=N, vce_prob=0.5)
    out = step.perturbed_inputs(config, inputs, N, jax.random.key(3), rl)
    original = np.asarray(inputs.vision.pixel_values)
    copies = np.asarray(out.vision.pixel_values)
    images, patches, _ = original.shape
    assert copies.shape == (images * N,) + original.shape[1:]
    black = np.asarray(perturb.patch_blackout(original[0, :1], jax.random.key(0), prob=1.0))[0]
    masks = []
    for i, grid in enumerate(U.GRIDS[:PROMPTS]):
        count = int(np.prod(grid))
        for c in range(N):
            copy = copies[i * N + c, :count]
            kept = np.all(copy == original[i, :count], axis=-1)
            blacked = np.all(copy == black, axis=-1)
            assert np.all(kept | blacked), f"image {i} copy {c}: a row is neither the original nor black"
            assert kept.any() and blacked.any()
            masks.append(blacked)
        assert not np.array_equal(masks[-1], masks[-2]), f"image {i}: responses share a mask"
    for name in ("rope_hw", "interp_index", "interp_weight", "patch_mask"):
        np.testing.assert_array_equal(getattr(out.vision, name), np.repeat(getattr(inputs.vision, name), N, axis=0))
    # row r (prompt r // N) reads copy r % N of its prompt's image, at the same merged-patch slot
    slots = patches // config.vision.merge_unit
    pads = np.asarray(inputs.input_ids) == config.image_token_id
    rows = np.broadcast_to(np.arange(inputs.input_ids.shape[0])[:, None], pads.shape)
    old, new = np.asarray(inputs.image_index)[pads], np.asarray(out.image_index)[pads]
    np.testing.assert_array_equal(new // slots, (old // slots) * N + rows[pads] % N)
    np.testing.assert_array_equal(new % slots, old % slots)
    np.testing.assert_array_equal(old // slots, rows[pads] // N)


def test_score_without_perturbation_has_zero_kl_and_the_same_clean_stats(scoring):
    config, params, ref_params, inputs, response_mask, _, rng, stats = scoring
    rl = step.RLConfig(samples_per_prompt=N, vce_prob=0.0, logprob_chunk=4)
    score = U.fast_compile(step.score, config, params, ref_params, inputs, rng, rl=rl, num_response=M)
    clean = U.to_host(score(params, ref_params, inputs, rng))
    for key in ("kl", "kl_sample", "k3"):
        assert np.abs(clean[key]).max() < 1e-5, key
    np.testing.assert_allclose(clean["logq"], clean["logp"], atol=1e-5)
    valid = response_mask > 0
    for key in ("logp", "nll", "entropy", "ref_logp"):
        np.testing.assert_allclose(clean[key][valid], stats[key][valid], rtol=1e-5, atol=1e-6, err_msg=key)
    # the reference model is another model: its log-probs are not the policy's
    assert np.abs(clean["ref_logp"] - clean["logp"])[valid].max() > 1e-2


def test_score_compiles_once_for_batches_of_equal_shapes(scoring, monkeypatch):
    config, params, ref_params, _, _, rl, _, _ = scoring  # the fixture compiled score for these shapes
    other, _ = U.rollout_inputs(config, prompts=PROMPTS, n=N, response_len=M, seed=9)
    # score's body calls step.response_hidden only while jit traces it: a trace now raises.
    chex.clear_trace_counter()
    monkeypatch.setattr(step, "response_hidden", chex.assert_max_traces(step.response_hidden, n=0))
    with U.CompileCounter() as compiles:
        out = step.score(config, params, ref_params, other, jax.random.key(1), rl=rl, num_response=M)
        assert np.isfinite(np.asarray(out["kl"])).all()
    assert compiles.count == 0


def test_score_input_errors_name_the_argument(scoring):
    """chex checks at score's entry, at trace time."""
    config, params, ref_params, inputs, _, rl, rng, _ = scoring
    short_norm = {**ref_params, "text": {**ref_params["text"], "norm": ref_params["text"]["norm"][1:]}}
    cases = [
        ((params, ref_params, inputs._replace(input_ids=inputs.input_ids.astype(np.float32))),
         r"\[inputs.input_ids must be \[B, T\] int\]"),
        ((params, ref_params, inputs._replace(next_position=inputs.next_position[:1])),
         rf"\[inputs.next_position must be \[B\] = \[{PROMPTS * N}\] int\]"),
        ((params, short_norm, inputs), r"text/norm.*\[ref_params must have the tree and shapes of params\]"),
    ]
    with U.CompileCounter() as compiles:
        for args, message in cases:
            with pytest.raises(AssertionError, match=message):
                step.score(config, *args, rng, rl=rl, num_response=M)
    assert compiles.count == 0


def test_sharded_step_equals_one_device_step(sharded_run):
    """2x2x2, 1x8x1 and 1x4x2 meshes of 8 simulated devices vs one device, two seeds: every metric
    within a bound derived from float32 round-off of what it is computed from (the script's
    docstring says why each bound is what it is), params and optimizer state within 1e-5
    relative, no recompilation for a second batch, and no involuntary full rematerialization
    (a reshard XLA can only do by replicating the tensor on every chip)."""
    try:
        out, err = sharded_run.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        sharded_run.kill()
        pytest.fail("sharded_step_check.py did not finish in 600 s")
    assert sharded_run.returncode == 0, f"sharded_step_check.py failed:\n{out}\n{err[-4000:]}"
    report = json.loads(out.strip().splitlines()[-1])
    for seed in SHARDED_SEEDS.split(","):
        for mesh in ("2x2x2", "1x8x1", "1x4x2", "2x2x2/mb4") + (("2x2x2/mb4/off",) if seed == SHARDED_SEEDS.split(",")[0] else ()):
            r = report[f"seed{seed}/{mesh}"]
            assert r["metric_margin"] <= 1.0 and r["updates"] <= 1.0, r
            assert r["params"] <= 1e-5 and r["opt_state"] <= 1e-5 and r["recompiles"] == 0, r
    remat = [line for line in err.splitlines() if "Involuntary full rematerialization" in line]
    assert not remat, "the sharded step replicates a tensor to reshard it:\n" + "\n".join(remat[:3])


def test_score_lr_scale_multiplies_only_the_digit_rows_updates():
    rng = np.random.default_rng(0)
    v, d, ids = 12, 4, (3, 7)
    rows = np.isin(np.arange(v), ids)
    embed = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    untied = {"text": {"embed": embed}, "lm_head": {"kernel": jnp.asarray(rng.normal(size=(d, v)), jnp.float32)},
              "layer": {"w": jnp.asarray(rng.normal(size=(d, d)), jnp.float32)}}
    tied = {"text": {"embed": embed}, "layer": untied["layer"]}
    for params in (untied, tied):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        plain = step.make_optimizer(step.RLConfig(learning_rate=1e-3))
        scaled = step.make_optimizer(step.RLConfig(learning_rate=1e-3, score_token_ids=ids, score_lr_scale=50.0))
        s0, s1 = plain.init(params), scaled.init(params)
        for _ in range(2):  # the second step reads Adam's moments: they must be the unscaled ones
            u0, s0 = plain.update(grads, s0, params)
            u1, s1 = scaled.update(grads, s1, params)
        e0, e1 = np.asarray(u0["text"]["embed"]), np.asarray(u1["text"]["embed"])
        if "lm_head" in params:  # the output rows are the head's; the input embeddings keep their update
            k0, k1 = np.asarray(u0["lm_head"]["kernel"]), np.asarray(u1["lm_head"]["kernel"])
            np.testing.assert_allclose(k1[:, rows], 50.0 * k0[:, rows], rtol=1e-6)
            np.testing.assert_array_equal(k1[:, ~rows], k0[:, ~rows])
            np.testing.assert_array_equal(e1, e0)
        else:  # tied: the embedding's rows are the output rows
            np.testing.assert_allclose(e1[rows], 50.0 * e0[rows], rtol=1e-6)
            np.testing.assert_array_equal(e1[~rows], e0[~rows])
        np.testing.assert_array_equal(np.asarray(u1["layer"]["w"]), np.asarray(u0["layer"]["w"]))
    with pytest.raises(ValueError, match="score_token_ids"):
        step.RLConfig(score_lr_scale=2.0)


def _adam_steps(grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    """NumPy Adam's updates for a list of gradients (bias-corrected, no weight decay)."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps))
    return out


def test_split_score_level_matches_a_numpy_rederivation():
    """w_k = v_k + b_k mu / |mu|^2: v_k takes the plain optimizer's update of the gradient without its
    mu component (projected again), b_k Adam on g_k . mu / |mu|^2; everything else is untouched, and
    with the direction unset it is the plain optimizer."""
    rng = np.random.default_rng(1)
    v, d, ids, lr, scale = 12, 5, (2, 9), 1e-3, 20.0
    params = {"text": {"embed": jnp.asarray(rng.normal(size=(v, d)), jnp.float32)},
              "lm_head": {"kernel": jnp.asarray(rng.normal(size=(d, v)), jnp.float32)},
              "layer": {"w": jnp.asarray(rng.normal(size=(d, d)), jnp.float32)}}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(3)]
    rl = dict(learning_rate=lr, weight_decay=0.0, grad_clip=1e9, score_token_ids=ids, score_lr_scale=scale)
    split = step.make_optimizer(step.RLConfig(**rl, score_level_split=True))
    plain = step.make_optimizer(step.RLConfig(**rl))
    state = split.init(params)
    assert state.direction.shape == (d,) and not np.any(np.asarray(state.direction))
    unset, _ = split.update(grads[0], state, params)  # no direction yet: the plain optimizer
    same, _ = plain.update(grads[0], plain.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), unset, same)

    mu = rng.normal(size=d) + 4.0
    state = step.set_score_direction(step.TrainState(jnp.zeros((), jnp.int32), params, state), mu).opt_state
    unit = mu / np.linalg.norm(mu)
    projected = [jax.tree.map(lambda x: x, g) for g in grads]
    for g in projected:  # the plain optimizer sees the digit columns without their mu component
        k = np.array(g["lm_head"]["kernel"])
        k[:, list(ids)] -= np.outer(unit, unit @ k[:, list(ids)])
        g["lm_head"] = {"kernel": jnp.asarray(k)}
    plain_state = plain.init(params)
    level = [np.asarray(g["lm_head"]["kernel"])[:, list(ids)].T @ mu / (mu @ mu) for g in grads]
    level_updates = _adam_steps(level, lr * scale)
    for t in range(3):
        got, state = split.update(grads[t], state, params)
        ref, plain_state = plain.update(projected[t], plain_state, params)
        k_ref = np.asarray(ref["lm_head"]["kernel"])[:, list(ids)]
        k_ref = k_ref - np.outer(unit, unit @ k_ref) + np.outer(mu / (mu @ mu), level_updates[t])
        k_got = np.asarray(got["lm_head"]["kernel"])
        np.testing.assert_allclose(k_got[:, list(ids)], k_ref, rtol=1e-5, atol=1e-9)
        others = ~np.isin(np.arange(v), ids)
        np.testing.assert_array_equal(k_got[:, others], np.asarray(ref["lm_head"]["kernel"])[:, others])
        np.testing.assert_array_equal(np.asarray(got["text"]["embed"]), np.asarray(ref["text"]["embed"]))
        np.testing.assert_array_equal(np.asarray(got["layer"]["w"]), np.asarray(ref["layer"]["w"]))
        # at the state mu itself, a digit's logit moves by its level's update alone
        np.testing.assert_allclose(mu @ k_got[:, list(ids)], level_updates[t], rtol=1e-4)
    with pytest.raises(ValueError, match="score_level_split"):
        step.RLConfig(score_level_split=True)


def test_score_state_sum_is_the_masked_sum_of_the_states(scoring):
    config, params, _, inputs, _, _, _, _ = scoring
    m = M
    hidden = np.asarray(step.response_hidden(config, params, inputs, m), np.float64)
    mask = np.zeros(hidden.shape[:2], bool)
    mask[0, 1] = mask[-1, m - 1] = True
    total, count = step.score_state_sum(config, params, inputs, mask, m)
    np.testing.assert_allclose(np.asarray(total), hidden[0, 1] + hidden[-1, m - 1], rtol=1e-5, atol=1e-6)
    assert float(count) == 2.0


def test_score_token_ids_need_one_token_per_digit():
    from vlcal_jax.rl import rollout

    class Digits:
        def __init__(self, split):
            self.split = split

        def encode(self, text, add_special_tokens=False):
            return [100 + int(text)] + ([5] if self.split and text == "7" else [])

    assert rollout.score_token_ids(Digits(False)) == tuple(range(100, 110))
    with pytest.raises(ValueError, match="'7'"):
        rollout.score_token_ids(Digits(True))


def test_untie_head_keeps_the_logits_and_frees_the_output_rows():
    from vlcal_jax import parallel
    from vlcal_jax.training import model_setup

    config = U.tiny_config(layers=1, depth=1, deepstack=(0,), tie=True)
    params = jax.tree.map(jnp.asarray, U.random_params(config))
    inputs, _ = U.rollout_inputs(config, prompts=2, n=1, response_len=4)
    mesh = parallel.make_mesh()
    untied_config, untied = model_setup.untie_head(config, params, mesh)
    assert not untied_config.tie_word_embeddings and "lm_head" not in params
    np.testing.assert_array_equal(np.asarray(untied["lm_head"]["kernel"]), np.asarray(params["text"]["embed"]).T)
    before = qwen3_vl.apply(config, params, inputs)
    after = qwen3_vl.apply(untied_config, untied, inputs)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-6, atol=1e-6)
    assert model_setup.untie_head(untied_config, untied, mesh)[1] is untied  # already untied: unchanged
