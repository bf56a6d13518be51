"""Rollout engines: greedy parity with HF generate, log-probs, sampling distribution, EOS, compiles,
input checks. `sampling.generate` runs the continuous engine (its default) unless a test names
the static one; tests/test_sampling_continuous.py checks what is particular to slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import hf_utils as H
from vlcal_jax import models, sampling

GRIDS = [(1, 4, 6), (1, 8, 4), (1, 2, 2), (1, 4, 4)]
ROWS = [[0], [1, 2], [], [3]]
SPECIAL = (H.IMAGE_TOKEN, H.VIDEO_TOKEN, H.VISION_START, H.VISION_END)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = H.tiny_hf_config(tie=False, kv_heads=2, deepstack=(0, 1))
    model = H.make_hf_model(cfg, seed=11)
    path = str(tmp_path_factory.mktemp("sampler"))
    model.save_pretrained(path)
    config, params = models.from_pretrained(path)
    batch = H.make_batch(np.random.default_rng(12), GRIDS, ROWS, patch_dim=config.vision.patch_dim)
    return model, config, params, batch


def test_greedy_matches_hf_generate(tiny):
    import torch

    model, config, params, (ids, mask, pv, grid) = tiny
    new = 40
    out = sampling.generate(config, params, ids, mask, pv, grid, max_new_tokens=new, temperature=0.0)
    mm = (ids == config.image_token_id).astype(np.int64)
    with torch.no_grad():
        ref = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid),
                             mm_token_type_ids=torch.from_numpy(mm), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref[:, ids.shape[1]:].numpy())
    assert np.all(np.asarray(out.lengths) == new) and not np.asarray(out.finished).any()


def _teacher_forced_logprobs(config, params, ids, mask, pv, grid, out, n):
    ids_p, mask_p = sampling.engine.left_pad(ids, mask, sampling.engine.bucket_length(ids.shape[1]), 0)
    ids_p, mask_p = np.repeat(ids_p, n, axis=0), np.repeat(mask_p, n, axis=0)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    resp_mask = np.arange(tokens.shape[1])[None] < lengths[:, None]
    # the image / vision ids stop a row (SPECIAL): as its last token never an input of the logits compared
    full_ids = np.concatenate([ids_p, np.where(np.isin(tokens, SPECIAL), 0, tokens)], axis=1)
    full_mask = np.concatenate([mask_p, resp_mask.astype(mask_p.dtype)], axis=1)
    # images repeat with their prompts (rows of one prompt are adjacent)
    per_row = [[i for i in r] for r in ROWS]
    order = [i for r in per_row for _ in range(n) for i in r]
    starts = np.concatenate([[0], np.cumsum([np.prod(g) for g in GRIDS])])
    pv_rep = np.concatenate([pv[starts[i]:starts[i + 1]] for i in order])
    logits = np.asarray(models.forward(config, params, full_ids, full_mask, pv_rep, grid[order]))
    logp = jax.nn.log_softmax(jnp.asarray(logits), axis=-1)
    t0 = ids_p.shape[1]
    lp = np.take_along_axis(np.asarray(logp[:, t0 - 1:-1]), tokens[..., None], axis=-1)[..., 0]
    return lp, resp_mask


def test_reported_logprobs_equal_teacher_forced_forward(tiny):
    _, config, params, (ids, mask, pv, grid) = tiny
    n = 2
    out = sampling.generate(config, params, ids, mask, pv, grid, max_new_tokens=12, temperature=1.0, n=n,
                            rng=jax.random.key(3), eos_token_ids=(5, 7, 9) + SPECIAL)
    lp, resp = _teacher_forced_logprobs(config, params, ids, mask, pv, grid, out, n)
    np.testing.assert_allclose(np.asarray(out.policy_logprobs)[resp], lp[resp], atol=1e-4)
    # at temperature 1 and top_p 1 the sampling distribution is the policy
    np.testing.assert_allclose(np.asarray(out.logprobs)[resp], lp[resp], atol=1e-4)


def test_first_token_frequencies_match_softmax(tiny):
    _, config, params, (ids, mask, pv, grid) = tiny
    draws, temperature = 4096, 0.5
    one = (ids[2:3], mask[2:3])  # text-only prompt
    out = sampling.generate(config, params, *one, max_new_tokens=1, temperature=temperature, n=draws,
                            rng=jax.random.key(0))
    logits = np.asarray(models.forward(config, params, *one))[0, -1].astype(np.float64)
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=probs.size)
    # pool cells with small expected counts so the chi-square approximation holds
    order = np.argsort(probs)
    expected, observed = probs[order] * draws, counts[order]
    groups = np.cumsum(expected) // 10
    exp_g = np.bincount(groups.astype(int), weights=expected)
    obs_g = np.bincount(groups.astype(int), weights=observed)
    keep = exp_g > 0
    p_value = stats.chisquare(obs_g[keep], exp_g[keep] * obs_g.sum() / exp_g[keep].sum()).pvalue
    assert p_value > 1e-3, p_value


def test_top_p_never_leaves_the_nucleus_and_top_k_limits(tiny):
    _, config, params, (ids, mask, pv, grid) = tiny
    one = (ids[2:3], mask[2:3])
    logits = np.asarray(models.forward(config, params, *one))[0, -1].astype(np.float64) / 0.3
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    mass_before = np.cumsum(probs[order]) - probs[order]
    nucleus = set(order[mass_before < 0.6].tolist())
    out = sampling.generate(config, params, *one, max_new_tokens=1, temperature=0.3, top_p=0.6, n=2000,
                            rng=jax.random.key(1))
    assert set(np.asarray(out.tokens)[:, 0].tolist()) <= nucleus
    out = sampling.generate(config, params, *one, max_new_tokens=1, temperature=1.0, top_k=3, n=500,
                            rng=jax.random.key(2))
    assert set(np.asarray(out.tokens)[:, 0].tolist()) <= set(np.argsort(-logits)[:3].tolist())


def test_eos_stops_rows_pads_after_and_unstopped_rows_run_to_the_cap(tiny):
    _, config, params, (ids, mask, pv, grid) = tiny
    new = 16
    free = np.asarray(sampling.generate(config, params, ids, mask, pv, grid, max_new_tokens=new,
                                        temperature=0.0).tokens)
    eos = int(free[0, 5])
    first = {b: (list(free[b]).index(eos) if eos in free[b] else None) for b in range(len(free))}
    out = sampling.generate(config, params, ids, mask, pv, grid, max_new_tokens=new, temperature=0.0,
                            eos_token_ids=(eos,), pad_token_id=0)
    tokens, lengths, finished = map(np.asarray, (out.tokens, out.lengths, out.finished))
    assert first[0] is not None and first[0] <= 5
    for b, stop in first.items():
        if stop is None:
            assert lengths[b] == new and not finished[b]
            np.testing.assert_array_equal(tokens[b], free[b])
        else:
            assert lengths[b] == stop + 1 and finished[b]
            np.testing.assert_array_equal(tokens[b, :stop + 1], free[b, :stop + 1])
            assert (tokens[b, stop + 1:] == 0).all()
            assert (np.asarray(out.policy_logprobs)[b, stop + 1:] == 0).all()
    assert any(s is None for s in first.values()), "test needs one row that never stops"


@pytest.mark.parametrize("engine, programs", [("static", 1), ("continuous", 2)])
def test_same_buckets_compile_nothing_new(tiny, engine, programs):
    """The static engine is one program; the continuous one a prefill and a decode segment."""
    _, config, params, (ids, mask, pv, grid) = tiny
    kwargs = dict(max_new_tokens=4, temperature=1.0, n=2, rng=jax.random.key(4), engine=engine)  # no other test's
    start = sampling.compile_count()
    sampling.generate(config, params, ids, mask, pv, grid, **kwargs)
    before = sampling.compile_count()
    assert before == start + programs, "new programs must be counted"
    # other image sizes with the same patch bucket, shorter prompts in the same length bucket
    batch = H.make_batch(np.random.default_rng(13), [(1, 6, 4), (1, 4, 6), (1, 2, 2), (1, 4, 4)], ROWS,
                         patch_dim=config.vision.patch_dim)
    sampling.generate(config, params, *batch, **kwargs)
    sampling.generate(config, params, *batch, **(kwargs | {"rng": jax.random.key(5)}))
    assert sampling.compile_count() == before


def test_sampling_is_deterministic_per_rng(tiny):
    _, config, params, (ids, mask, pv, grid) = tiny
    kwargs = dict(max_new_tokens=6, temperature=1.0, top_p=0.9, n=2)
    a = sampling.generate(config, params, ids, mask, pv, grid, rng=jax.random.key(9), **kwargs)
    b = sampling.generate(config, params, ids, mask, pv, grid, rng=jax.random.key(9), **kwargs)
    c = sampling.generate(config, params, ids, mask, pv, grid, rng=jax.random.key(10), **kwargs)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


def test_input_shape_errors_name_the_argument(tiny):
    """chex checks at generate's entry (host arrays) and generate_from_inputs' (at trace time)."""
    _, config, params, (ids, mask, pv, grid) = tiny
    kwargs = dict(max_new_tokens=2, temperature=0.0)
    with pytest.raises(AssertionError, match=r"\[input_ids must be \[B, T\] int\]"):
        sampling.generate(config, params, ids[0], mask[0], **kwargs)
    with pytest.raises(AssertionError, match=r"\[attention_mask must be \[B, T\]"):
        sampling.generate(config, params, ids, mask[:2], pv, grid, **kwargs)
    with pytest.raises(AssertionError, match=r"\[pixel_values must be \[N_patches, patch_dim=\d+\] float\]"):
        sampling.generate(config, params, ids, mask, pv.reshape(-1, 2, pv.shape[1]), grid, **kwargs)
    inputs = models.prepare_inputs(config, ids, mask, pv, grid)
    static = dict(max_new_tokens=2, n=1, greedy=True, top_k=0, eos_token_ids=(), pad_token_id=0)
    before = sampling.compile_count()
    bad_positions = inputs._replace(position_ids=inputs.position_ids[0])
    bad_mask = inputs._replace(vision=inputs.vision._replace(patch_mask=inputs.vision.patch_mask[:, :8]))
    for bad, message in ((bad_positions, r"inputs.position_ids must be \[3, B, T\]"),
                         (bad_mask, r"inputs.vision.patch_mask must be \[\d+, \d+\]")):
        with pytest.raises(AssertionError, match=message):
            sampling.generate_from_inputs(config, params, bad, jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0),
                                          **static)
    assert sampling.compile_count() == before  # each failed at its trace: nothing compiled
