"""The assembled RL objective against the independent reference: `rl.step.loss_fn` and the
compiled `step.make_train_step` on random RLBatches, for every registered loss and for default
and non-default clip / KL / TAR / filter settings, equal numpy_reference.rl_objective (and its
hand-computed update) from the same raw arrays (PAPER.md sections 5-6)."""

import dataclasses

import jax
import numpy as np
import pytest

import numpy_reference as ref
import rl_utils as U
import update_reference as R
from vlcal_jax.rl import losses, step

N_PER_PROMPT = 4
# Every number differs from its default, and from the others where a swap could go unseen
# (clip_low vs clip_high, w_min / w_max vs lambda_tar); dual_clip and kl_clamp are low enough
# that the batch below hits both bounds.
NON_DEFAULT = dict(clip_low=0.12, clip_high=0.21, dual_clip=1.6, kl_coef=0.05, kl_clamp=0.5, w_min=0.55, w_max=1.7,
                   lambda_tar=0.35, filter_top_p=0.45)
SETTINGS = {"defaults": {}, "non_default": NON_DEFAULT}
METRICS = ("loss", "pg_loss", "ref_kl", "clipfrac_low", "clipfrac_high", "dual_clip_frac", "ratio_mean", "ppo_kl",
           "filter_keep_frac", "tar_weight_mean", "tar_weight_min", "tar_weight_max", "tar_tokens",
           "response_tokens")


@pytest.fixture(scope="module")
def world():
    config = U.tiny_config(layers=1, depth=1)
    params = U.random_params(config, seed=5)
    # old log-probs far enough from the policy's that ratios leave [1 - c_low, 1 + c_high] and
    # pass the dual-clip bound; reference log-probs far enough that k3 passes kl_clamp
    batch = U.make_rl_batch(config, params, prompts=2, n=N_PER_PROMPT, response_len=12, seed=7, ratio_noise=0.6,
                            ref_noise=1.0)
    vision = np.asarray(batch.vision_mask).copy()
    vision[1] = 0  # one response without a vision span
    batch = batch._replace(vision_mask=vision)
    vjp = R.logits_and_vjp(config, params, batch.inputs, 12)
    logits, _ = vjp(params, np.zeros((8, 12), np.float32))
    logp = R.token_logp(logits, batch.inputs.input_ids, 12)
    return config, params, batch, vjp, logp


def rl_config(name, settings, **extra):
    return step.RLConfig(loss=name, samples_per_prompt=N_PER_PROMPT, logprob_chunk=5, **settings, **extra)


@pytest.fixture(scope="module")
def all_losses(world):
    """loss_fn of every registered loss, in one compiled program whose numeric settings are traced
    arguments (one compile for all settings; the fields reach loss_fn as RLConfig attributes)."""
    config, params, batch, _, _ = world

    def run(p, settings):
        return {name: step.loss_fn(p, config, rl_config(name, settings), batch) for name in losses.names()}

    settings = {k: np.float32(v) for k, v in NON_DEFAULT.items()}
    compiled = jax.jit(run).lower(params, settings).compile(compiler_options=U.FAST)
    defaults = step.RLConfig()
    return {label: compiled(params, {k: np.float32(values.get(k, getattr(defaults, k))) for k in NON_DEFAULT})
            for label, values in SETTINGS.items()}


def test_the_batch_reaches_every_branch(world):
    """Clipping on both sides, the dual clip, the KL clamp and TAR all occur under the
    non-default settings (else the comparisons below could not see them wired wrong)."""
    *_, batch, _, logp = world
    out = R.objective(rl_config("vl_calibration", NON_DEFAULT), logp, batch)
    for key in ("clipfrac_low", "clipfrac_high", "dual_clip_frac"):
        assert out[key] > 0, key
    assert out["tar_tokens"] > 0 and out["tar_weight_min"] < out["tar_weight_max"]
    assert 0 < out["filter_keep_frac"] < 1
    kl = np.exp(np.asarray(batch.ref_logp) - logp) - (np.asarray(batch.ref_logp) - logp) - 1
    assert (kl[np.asarray(batch.response_mask) > 0] > NON_DEFAULT["kl_clamp"]).any()
    assert set(ref.LOSS_MECHANISMS) == set(losses.names()), "a registered loss has no reference"


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("name", losses.names())
def test_loss_fn_equals_the_reference(world, all_losses, name, settings):
    *_, batch, _, logp = world
    loss, metrics = all_losses[settings][name]
    expected = R.objective(rl_config(name, SETTINGS[settings]), logp, batch)
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=0, atol=1e-6)
    for key in METRICS:
        np.testing.assert_allclose(float(metrics[key]), expected[key], rtol=0, atol=1e-6, err_msg=key)


def test_losses_differ_where_their_mechanisms_do(all_losses):
    """The comparisons above are not vacuous: every loss gives a different value here."""
    values = [float(all_losses["non_default"][name][0]) for name in losses.names()]
    assert len({round(v, 5) for v in values}) == len(values), values


def test_compiled_step_equals_the_hand_update(world):
    """make_train_step with non-default settings (filter + released TAR, a gradient clip that
    binds, lr and weight decay off their defaults) == numpy_reference's objective, its gradient
    pulled back through the model, and AdamW's first step by hand."""
    config, params, batch, vjp, _ = world
    rl = rl_config("vl_calibration", NON_DEFAULT, learning_rate=1e-3, weight_decay=0.3, grad_clip=0.05)
    hand = R.hand_update(config, rl, params, batch, vjp)
    assert hand.grad_norm > rl.grad_clip, "the clip must bind for this test to check it"
    optimizer = step.make_optimizer(rl)
    state = step.init_state(jax.tree.map(np.array, params), optimizer)
    before = U.to_host(state)
    train_step = U.fast_compile(step.make_train_step(config, rl, optimizer), state, batch, jax.random.key(0))
    after, metrics = train_step(state, batch, jax.random.key(0))
    for key in METRICS:
        np.testing.assert_allclose(float(metrics[key]), hand.reference[key], rtol=0, atol=1e-6, err_msg=key)
    R.assert_update_matches(hand, before, U.to_host(after), metrics, rl=rl)


def test_the_reference_reads_every_setting(world):
    """Each setting changes the reference loss of some registered loss on this batch, so the
    comparisons above would see one dropped or swapped on its way into loss_fn."""
    *_, batch, _, logp = world
    for key in R.OBJECTIVE_KEYS:
        def loss(name, scale):
            rl = rl_config(name, NON_DEFAULT)
            return R.objective(dataclasses.replace(rl, **{key: getattr(rl, key) * scale}), logp, batch)["loss"]
        assert any(loss(name, 0.8) != loss(name, 1.0) for name in losses.names()), key
