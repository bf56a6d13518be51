"""Sampler log-probs off temperature 1 and top_p 1, against transformers' teacher-forced logits.

At temperature 0.7 and top_p 0.9 the reported `logprobs` are those of the distribution the token
was drawn from (logits / T, cut to the nucleus, renormalised) and `policy_logprobs` those of the
untempered policy; at T = 1, top_p = 1 (tests/test_sampling.py) the two coincide.
"""

import jax
import numpy as np
import pytest

import hf_utils as H
from vlcal_jax import models, sampling

GRIDS = [(1, 4, 6), (1, 8, 4), (1, 2, 2), (1, 4, 4)]
ROWS = [[0], [1, 2], [], [3]]
TEMPERATURE, TOP_P, N = 0.7, 0.9, 2
# the image / video / vision-start / vision-end ids stop a row: as the last token they are never
# an input of the logits compared below, so the teacher-forced batch can blank them
SPECIAL = (H.IMAGE_TOKEN, H.VIDEO_TOKEN, H.VISION_START, H.VISION_END)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    cfg = H.tiny_hf_config(tie=False, kv_heads=2, layers=2, deepstack=(0,), vision_depth=2)
    model = H.make_hf_model(cfg, seed=21)
    path = str(tmp_path_factory.mktemp("tempered"))
    model.save_pretrained(path)
    config, params = models.from_pretrained(path)
    ids, mask, pv, grid = H.make_batch(np.random.default_rng(22), GRIDS, ROWS, patch_dim=config.vision.patch_dim)
    out = sampling.generate(config, params, ids, mask, pv, grid, max_new_tokens=12, temperature=TEMPERATURE,
                            top_p=TOP_P, n=N, rng=jax.random.key(23), eos_token_ids=(5, 7, 9) + SPECIAL)
    out = jax.tree.map(np.asarray, out)
    # teacher forcing through transformers: prompt rows repeated n times, their images with them
    tokens = np.where(np.isin(out.tokens, SPECIAL), H.PAD, out.tokens)
    valid = np.arange(tokens.shape[1])[None] < out.lengths[:, None]
    rows = np.repeat(np.arange(len(ROWS)), N)
    starts = np.concatenate([[0], np.cumsum([np.prod(g) for g in GRIDS])])
    images = [i for r in rows for i in ROWS[r]]
    pv_rows = np.concatenate([pv[starts[i]:starts[i + 1]] for i in images])
    logits = H.hf_logits(model, np.concatenate([ids[rows], tokens], 1),
                         np.concatenate([mask[rows], valid.astype(mask.dtype)], 1), pv_rows, grid[images])
    logits = logits[:, ids.shape[1] - 1:-1].astype(np.float64)  # position t - 1 predicts response token t
    return out, valid, logits


def log_softmax(x):
    top = x.max(-1, keepdims=True)
    return x - top - np.log(np.exp(x - top).sum(-1, keepdims=True))


def nucleus_logprob(logits, token):
    """log q(token) of softmax(logits / T) restricted to its top-p nucleus (tokens whose strictly
    more probable mass is below top_p), or None when a token sits on the nucleus boundary."""
    scaled = logits / TEMPERATURE
    probs = np.exp(log_softmax(scaled))
    above = np.array([probs[probs > p].sum() for p in probs])
    if np.abs(above - TOP_P).min() < 1e-4:
        return None
    keep = above < TOP_P
    assert keep[token], "the sampler drew a token outside the nucleus"
    return log_softmax(np.where(keep, scaled, -np.inf))[token]


def test_policy_logprobs_are_the_untempered_forward(sampled):
    out, valid, logits = sampled
    expected = np.take_along_axis(log_softmax(logits), out.tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.policy_logprobs[valid], expected[valid], atol=1e-4)
    assert (out.policy_logprobs[~valid] == 0).all()


def test_reported_logprobs_are_the_tempered_nucleus_distribution(sampled):
    out, valid, logits = sampled
    compared, moved = 0, 0
    for row, t in zip(*np.nonzero(valid)):
        expected = nucleus_logprob(logits[row, t], out.tokens[row, t])
        if expected is None:
            continue
        np.testing.assert_allclose(out.logprobs[row, t], expected, atol=1e-4, err_msg=f"row {row} token {t}")
        compared += 1
        moved += abs(expected - out.policy_logprobs[row, t]) > 1e-2
    assert compared >= 0.9 * valid.sum() and compared >= 30, (compared, valid.sum())
    assert moved >= 0.5 * compared, "temperature and top_p barely change these log-probs: the test would not see them"
