"""The continuous engine on batches whose rows end at different steps and whose slots are refilled
many times: greedy tokens == HF generate, log-probs == the teacher-forced forward, and the
responses of a seed do not depend on the slot count, the segment length or the engine."""

import jax
import numpy as np
import pytest

from test_sampling import SPECIAL, _teacher_forced_logprobs, tiny  # noqa: F401  (the fixture)
from vlcal_jax import models, sampling

N, NEW = 3, 20
EOS = (5, 7, 9, 11, 13, 17) + SPECIAL  # frequent enough that most rows stop before the cap


def _rows_vary(out):
    lengths = np.asarray(out.lengths)
    assert len(set(lengths.tolist())) >= 4 and (lengths == NEW).any() and (lengths < NEW).any(), lengths


def _eos_for_different_stops(free):
    """A token of the free-running greedy rows [B, NEW] that two rows first emit at different
    steps and some row never emits: as EOS, rows stop at different steps and one runs to the cap."""
    for token in free[0, 1:]:
        stops = {list(row).index(token) if token in row else None for row in free}
        if None in stops and len(stops - {None}) >= 2:
            return int(token)
    raise AssertionError(f"no token of the greedy rows stops them at different steps: {free}")


def test_greedy_matches_hf_generate_when_rows_stop_at_different_steps(tiny):  # noqa: F811
    import torch

    model, config, params, (ids, mask, pv, grid) = tiny
    mm = torch.from_numpy((ids == config.image_token_id).astype(np.int64))
    hf_inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grid), mm_token_type_ids=mm,
                     max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        free = model.generate(**hf_inputs, min_new_tokens=NEW)[:, ids.shape[1]:].numpy()
        eos = _eos_for_different_stops(free)
        ref = model.generate(**hf_inputs, eos_token_id=eos)[:, ids.shape[1]:].numpy()
    stops = [list(r).index(eos) + 1 if eos in r else NEW for r in ref]
    assert len(set(stops)) >= 2 and NEW in stops, stops
    # 2 slots for 4 rows: rows 2 and 3 take the slot of the first rows to end, beside a row mid-way
    out = sampling.generate(config, params, ids, mask, pv, grid, max_new_tokens=NEW, temperature=0.0,
                            eos_token_ids=(eos,), slots=2)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    np.testing.assert_array_equal(lengths, stops)
    for row, stop in enumerate(stops):
        np.testing.assert_array_equal(tokens[row, :stop], ref[row, :stop], err_msg=f"row {row}")
        assert (tokens[row, stop:] == 0).all()
    np.testing.assert_array_equal(np.asarray(out.finished), np.asarray(stops) < NEW)


@pytest.fixture(scope="module")
def sampled(tiny):  # noqa: F811
    """Temperature 1, n = 3: 12 rows of many lengths through 2 slots, and the static engine."""
    _, config, params, batch = tiny
    kwargs = dict(max_new_tokens=NEW, temperature=1.0, n=N, rng=jax.random.key(3), eos_token_ids=EOS)
    static = sampling.generate(config, params, *batch, engine="static", **kwargs)
    two = sampling.generate(config, params, *batch, slots=2, **kwargs)
    return kwargs, static, two


def test_reported_logprobs_equal_teacher_forced_forward(tiny, sampled):  # noqa: F811
    _, config, params, batch = tiny
    _, _, out = sampled
    _rows_vary(out)
    lp, resp = _teacher_forced_logprobs(config, params, *batch, out, N)
    np.testing.assert_allclose(np.asarray(out.policy_logprobs)[resp], lp[resp], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.logprobs)[resp], lp[resp], atol=1e-4)  # T = 1, top_p = 1: the policy
    assert (np.asarray(out.policy_logprobs)[~resp] == 0).all() and (np.asarray(out.tokens)[~resp] == 0).all()


def test_responses_do_not_depend_on_slots_segments_or_engine(tiny, sampled):  # noqa: F811
    _, config, params, batch = tiny
    kwargs, static, two = sampled
    runs = {"slots=2": two,
            "slots=5, 3-step segments": sampling.generate(config, params, *batch, slots=5, segment_steps=3, **kwargs)}
    for name, out in runs.items():
        for field in ("tokens", "lengths", "finished"):
            np.testing.assert_array_equal(np.asarray(getattr(out, field)), np.asarray(getattr(static, field)),
                                          err_msg=f"{name}: {field}")
        for field in ("logprobs", "policy_logprobs"):
            np.testing.assert_allclose(np.asarray(getattr(out, field)), np.asarray(getattr(static, field)),
                                       atol=1e-5, err_msg=f"{name}: {field}")
    other = sampling.generate(config, params, *batch, slots=2, **(kwargs | {"rng": jax.random.key(4)}))
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(two.tokens))


def test_unknown_engine_and_bad_slot_counts_are_refused(tiny):  # noqa: F811
    _, config, params, (ids, mask, _, _) = tiny
    with pytest.raises(ValueError, match="engine='paged'; choose one of"):
        sampling.generate(config, params, ids[2:3], mask[2:3], max_new_tokens=2, engine="paged")
    inputs = models.prepare_inputs(config, ids[2:3], mask[2:3])
    with pytest.raises(ValueError, match="slots=-1 must be >= 1"):
        sampling.sample(config, params, inputs, jax.random.key(0), 1.0, 1.0, max_new_tokens=2, n=1, greedy=True,
                        top_k=0, eos_token_ids=(), pad_token_id=0, slots=-1)
    assert sampling.default_slots(12) == 12
