"""The trainer's RL step on a real CLI run that cannot silently do nothing.

One tiny `loop.run` (warm start long enough that the sampled responses open and close
`<vision>` spans, then one GRPO step) with spies on what `rl_iteration` builds: the sampler's
tokens, the VCE statistics, the rewards it scores and the RLBatch it updates on. Each array is
checked against a re-derivation from the one before it: texts decoded from the sampled tokens,
vision masks from those texts (exactly the tokens overlapping the `<vision>` content), rewards
from the texts, advantages from the rewards, and the update by hand from the batch.
"""

import dataclasses
import importlib.util
import math
import os
import re

import jax
import numpy as np
import pytest

import numpy_reference as ref
import update_reference as R
from vlcal_jax import sampling
from vlcal_jax.rl import rewards, rollout, step
from vlcal_jax.training import logs, loop

N_PER_PROMPT = 4
# The `<vision>` content as PAPER.md section 2 defines it: whitespace around `<`, `>`, `/` does
# not count, the first opening tag and the first closing tag after it, empty content = no span.
VISION = re.compile(r"<\s*vision\s*>\s*(.*?)\s*<\s*/\s*vision\s*>", re.DOTALL)


def tiny_config(workdir):
    spec = importlib.util.spec_from_file_location(
        "cpu_demo", os.path.join(os.path.dirname(__file__), "..", "experiments", "cpu_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.workdir = str(workdir)
    c.data.num_examples = 40
    c.data.path = str(workdir.parent / "scenes")
    c.model.init.text.num_hidden_layers = 2  # with 1, DeepStack's features reach no loss (a layer above them)
    c.model.init.vision.depth = 1
    # long enough that most samples state a vision span (TAR and R_vis then have tokens to act on)
    c.sft.steps = 100
    # the demo's image curriculum off and its earlier world: every warm-start row in the full format
    # with short vision spans, so that 40-token samples end with their confidences (rewards differ)
    c.sft.caption_steps = 0
    c.sft.caption_fraction = 0.0
    c.sft.inventory = False
    c.data.scene.update(max_objects=5, size_scale=1.0, shapes=("circle", "square", "triangle"))
    c.sft.batch_size = 8
    c.sft.warmup_steps = 2
    c.rl.steps = 1
    c.rl.prompts_per_step = 2
    c.rl.samples_per_prompt = N_PER_PROMPT
    c.rl.max_new_tokens = 40
    c.rl.logprob_chunk = 16
    c.rl.lambda_tar = 0.3  # off its default: rl_config must carry it
    c.eval.size = 4
    c.eval.every = 0
    c.eval.before_rl = False
    c.eval.batch_size = 4
    c.checkpoint.every = 0
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run's outputs and what its one rl_iteration built (host copies)."""
    seen = {"inside": False}
    real = {"rl_iteration": loop.rl_iteration, "generate": sampling.sample, "score": step.score,
            "score_rewards": rollout.score_rewards, "make_train_step": step.make_train_step}

    def rl_iteration(ctx, state, ref_params, examples, rng):
        seen.update(inside=True, ctx=ctx, examples=list(examples), ref_params=R.flat(ref_params))
        try:
            state, metrics = real["rl_iteration"](ctx, state, ref_params, examples, rng)
        finally:
            seen["inside"] = False
        seen["metrics"] = metrics
        return state, metrics

    def generate(*args, **kwargs):
        out = real["generate"](*args, **kwargs)
        if seen["inside"]:  # one call per rollout chunk; the evaluator samples too, outside
            seen.setdefault("samples", []).append(jax.tree.map(np.asarray, out))
        return out

    def score(*args, **kwargs):
        stats = real["score"](*args, **kwargs)
        seen["stats"] = {k: np.asarray(v) for k, v in stats.items()}
        return stats

    def score_rewards(texts, examples, n, **kwargs):
        out = real["score_rewards"](texts, examples, n, **kwargs)
        seen["scored"] = dict(texts=list(texts), n=n, kwargs=kwargs, out={k: np.asarray(v) for k, v in out.items()})
        return out

    def make_train_step(*args, **kwargs):
        compiled = real["make_train_step"](*args, **kwargs)

        def train_step(state, batch, rng):
            before, host_batch = jax.tree.map(np.array, state), jax.tree.map(np.array, batch)
            after, metrics = compiled(state, batch, rng)
            seen["update"] = (before, host_batch, jax.tree.map(np.array, after), jax.tree.map(np.asarray, metrics))
            return after, metrics

        return train_step

    workdir = tmp_path_factory.mktemp("integration") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "rl_iteration", rl_iteration)
        mp.setattr(sampling, "sample", generate)
        mp.setattr(step, "score", score)
        mp.setattr(rollout, "score_rewards", score_rewards)
        mp.setattr(step, "make_train_step", make_train_step)
        loop.run(tiny_config(workdir))
    for key in ("samples", "stats", "scored", "update", "metrics"):
        assert key in seen, f"rl_iteration did not reach {key}"
    seen["sample"] = jax.tree.map(lambda *chunks: np.concatenate(chunks), *seen["samples"])
    return workdir, seen


def rl_rows(workdir):
    return [r for r in logs.read_metrics(str(workdir)) if "update/loss" in r]


def gpt2_byte_symbols() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's bytes_to_unicode), inverted."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def response_bytes(tokenizer, sample):
    """Per response: the tokenizer's own decoded text and the bytes of each of its tokens."""
    symbols = gpt2_byte_symbols()
    out = []
    for ids, length in zip(sample.tokens, sample.lengths):
        ids = [int(i) for i in ids[:length]]
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces = [bytes(symbols[ch] for ch in piece) for piece in tokenizer.convert_ids_to_tokens(ids)]
        assert b"".join(pieces).decode("utf-8", errors="replace") == text
        out.append((text, pieces))
    return out


# The same on the response's bytes (tags and the whitespace next to them are ASCII; an invalid
# byte sequence then needs no character bookkeeping): [\t-\r\x1c-\x20] is what str's \s matches
# below 0x80.
VISION_BYTES = re.compile(rb"<[\t-\r\x1c-\x20]*vision[\t-\r\x1c-\x20]*>[\t-\r\x1c-\x20]*(.*?)[\t-\r\x1c-\x20]*"
                          rb"<[\t-\r\x1c-\x20]*/[\t-\r\x1c-\x20]*vision[\t-\r\x1c-\x20]*>", re.DOTALL)


def expected_vision_mask(tokenizer, sample):
    """[N, M]: the tokens with a byte inside the `<vision>` content, nothing else."""
    mask = np.zeros(sample.tokens.shape, bool)
    for row, (text, pieces) in enumerate(response_bytes(tokenizer, sample)):
        match = VISION_BYTES.search(b"".join(pieces))
        if match is None or not match.group(1):
            assert VISION.search(text) is None or not VISION.search(text).group(1)
            continue
        start, end = match.span(1)
        ends = np.cumsum([len(p) for p in pieces])
        for t, (a, b) in enumerate(zip(ends - [len(p) for p in pieces], ends)):
            mask[row, t] = a < end and max(b, a + 1) > start
    return mask


def test_cli_run_trains(run):
    """No skipped update, a finite loss, parameters that moved, and responses with vision spans."""
    workdir, seen = run
    (row,) = rl_rows(workdir)
    assert row["update/skipped"] == 0.0 and math.isfinite(row["update/loss"])
    assert row["update/grad_norm"] > 0 and row["update/response_tokens"] > 0
    assert row["rollout/has_vision_span"] > 0, "the warm start must make the sampler write vision spans"
    assert row["update/tar_tokens"] > 0, "TAR touched no token: nothing of the method was exercised"
    before, _, after, _ = seen["update"]
    still = [name for name, b in R.flat(before.params).items() if np.array_equal(R.flat(after.params)[name], b)]
    assert not still, f"parameters that did not change: {still}"


def test_rl_config_carries_every_configured_field(run):
    _, seen = run
    config, rl = seen["ctx"].config.rl, seen["ctx"].rl
    shared = [f.name for f in dataclasses.fields(step.RLConfig) if f.name in config]
    assert {"loss", "clip_low", "kl_coef", "lambda_tar", "filter_top_p", "vce_kind", "kl_clamp"} <= set(shared)
    for name in shared:
        assert getattr(rl, name) == config[name], name
    assert rl.loss == "vl_calibration_paper" != step.RLConfig.loss


def test_rewards_come_from_the_sampled_texts(run):
    _, seen = run
    ctx, sample, scored = seen["ctx"], seen["sample"], seen["scored"]
    texts = [text for text, _ in response_bytes(ctx.tokenizer, sample)]
    assert scored["texts"] == texts and scored["n"] == N_PER_PROMPT
    assert len(texts) == len(seen["examples"]) * N_PER_PROMPT
    # the VCE means over the vision tokens of those texts (PAPER.md section 4, exact variant)
    mask = expected_vision_mask(ctx.tokenizer, sample)
    count = mask.sum(-1)
    with np.errstate(invalid="ignore"):
        kl = np.where(count > 0, (seen["stats"]["kl"] * mask).sum(-1) / count, np.nan)
        ent = np.where(count > 0, (seen["stats"]["entropy"] * mask).sum(-1) / count, np.nan)
    np.testing.assert_allclose(scored["kwargs"]["vision_kl"], kl, rtol=1e-6)
    np.testing.assert_allclose(scored["kwargs"]["vision_entropy"], ent, rtol=1e-6)
    c = ctx.config.rl
    golds = [ex.answer for ex in seen["examples"] for _ in range(N_PER_PROMPT)]
    choices = [ex.choices for ex in seen["examples"] for _ in range(N_PER_PROMPT)]
    expected = rewards.get(c.reward)(texts, golds, choices=choices, vision_kl=kl, vision_entropy=ent,
                                     **dict(c.reward_weights))
    np.testing.assert_allclose(scored["out"]["reward"], expected["reward"], rtol=1e-6)
    assert np.isclose(seen["metrics"]["reward/reward"], np.mean(expected["reward"]))
    assert len(set(np.round(expected["reward"], 6))) > 1, "all rewards equal: the advantages would all be 0"


def test_vision_masks_are_exactly_the_span_tokens(run):
    _, seen = run
    mask = expected_vision_mask(seen["ctx"].tokenizer, seen["sample"])
    _, batch, _, _ = seen["update"]
    assert mask.any(-1).sum() >= 2, "too few responses with a vision span to test the mask"
    assert mask.sum() < (np.asarray(batch.response_mask) > 0).sum() / 2, "the spans must not cover the responses"
    np.testing.assert_array_equal(np.asarray(batch.vision_mask) > 0, mask)


def test_advantages_follow_from_the_rewards(run):
    _, seen = run
    _, batch, _, _ = seen["update"]
    reward = seen["scored"]["out"]["reward"]
    np.testing.assert_allclose(batch.advantages, ref.group_advantages(reward, N_PER_PROMPT), rtol=0, atol=1e-5)
    assert np.abs(batch.advantages).max() > 0.1


def test_batch_is_the_rollout(run):
    """The RLBatch holds the sampled rows, their lengths, and the scorer's per-token statistics."""
    _, seen = run
    _, batch, _, _ = seen["update"]
    sample, stats = seen["sample"], seen["stats"]
    m = sample.tokens.shape[1]
    np.testing.assert_array_equal(np.asarray(batch.inputs.input_ids)[:, -m:], sample.tokens)
    np.testing.assert_array_equal(batch.response_mask, np.arange(m)[None] < sample.lengths[:, None])
    for field, key in (("old_logp", "logp"), ("ref_logp", "ref_logp"), ("token_k3", "k3"), ("token_nll", "nll"),
                       ("token_kl", "kl"), ("token_entropy", "entropy")):
        np.testing.assert_array_equal(getattr(batch, field), stats[key], err_msg=field)


def test_update_equals_the_hand_update(run):
    """By hand under the settings as configured (config.rl), not as the trainer read them."""
    _, seen = run
    ctx = seen["ctx"]
    before, batch, after, metrics = seen["update"]
    configured = {f.name: ctx.config.rl[f.name] for f in dataclasses.fields(step.RLConfig) if f.name in ctx.config.rl}
    rl = dataclasses.replace(step.RLConfig(), **configured)
    hand = R.hand_update(ctx.model_config, rl, before.params, batch)
    for key in ("loss", "pg_loss", "ref_kl", "tar_tokens", "tar_weight_mean", "filter_keep_frac"):
        np.testing.assert_allclose(float(metrics[key]), hand.reference[key], rtol=0, atol=1e-6, err_msg=key)
    R.assert_update_matches(hand, before, after, metrics, rl=rl)
