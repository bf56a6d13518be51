"""The warm start's teacher: confidences drawn regardless of correctness (uniform range or a
weighted list), several response formats per warm start, and prompts with one mode per example."""

import collections
import re

import numpy as np
import pytest

from test_rl_pipeline import world  # noqa: F401  (the tiny scene-world model)
from vlcal_jax.configs import default_config
from vlcal_jax.data import scenes
from vlcal_jax.rl import rollout
from vlcal_jax.training import warm

RESPONSE = scenes.teacher_response(scenes.generate_sample(3, 0, scenes.SceneConfig()))


def _stated(text):
    return [int(v) for v in re.findall(r"_confidence>(\d+)<", text)]


def test_confidences_from_a_range_or_a_weighted_list_one_draw_each():
    ranged = [_stated(warm.override_confidences(RESPONSE, np.random.default_rng(1), 5, 10)) for _ in range(1)]
    rng, same = np.random.default_rng(1), np.random.default_rng(1)
    assert _stated(warm.override_confidences(RESPONSE, rng, 5, 10)) == [int(5 + same.integers(6)) for _ in range(2)]
    assert ranged[0] == _stated(warm.override_confidences(RESPONSE, np.random.default_rng(1), 5, 10))
    values = (3, 9, 9, 9)
    draws = collections.Counter(v for seed in range(300) for v in _stated(
        warm.override_confidences(RESPONSE, np.random.default_rng(seed), 5, 10, values)))
    assert set(draws) == {3, 9} and 2.2 < draws[9] / draws[3] < 4.0  # 9 weighted three to one
    rng = np.random.default_rng(0)
    warm.override_confidences(RESPONSE, rng, values=values)
    reference = np.random.default_rng(0)
    reference.integers(4), reference.integers(4)
    assert rng.integers(1000) == reference.integers(1000)  # exactly one draw per confidence


def test_formats_are_picked_by_example_id_and_checked():
    c = default_config()
    assert warm.formats(c) == [("decoupled", "decoupled")]
    c.sft.formats = ("plain:plain_tiny", "rlcr:rlcr_tiny", "decoupled:decoupled_tiny")
    pairs = warm.formats(c)
    examples = [scenes.generate_sample(i, 0, scenes.SceneConfig()).to_example() for i in range(60)]
    picked = warm.pick_formats(examples, pairs)
    assert picked == warm.pick_formats(list(reversed(examples)), pairs)[::-1]  # by id, not by position
    assert set(picked) == set(pairs)
    c.sft.formats = ("rlcr:nonsense",)
    with pytest.raises(ValueError, match="sft.formats entry 'rlcr:nonsense'"):
        warm.formats(c)


def test_one_prompt_mode_per_example_equals_each_example_encoded_alone(world):  # noqa: F811
    samples, tokenizer, config, _, image_config = world
    examples = [s.to_example() for s in samples[:3]]
    modes = ["decoupled_short", "rlcr", "plain"]
    kwargs = dict(length_buckets=(512,), num_images=1)
    mixed = rollout.encode_examples(examples, tokenizer, config, image_config, mode=modes, **dict(kwargs, num_images=3))
    for i, (example, mode) in enumerate(zip(examples, modes)):
        alone = rollout.encode_examples([example], tokenizer, config, image_config, mode=mode, **kwargs)
        assert mixed.texts[i] == alone.texts[0]
        np.testing.assert_array_equal(np.asarray(mixed.inputs.input_ids[i]), np.asarray(alone.inputs.input_ids[0]))
    with pytest.raises(ValueError, match="2 prompt modes for 3 examples"):
        rollout.encode_examples(examples, tokenizer, config, image_config, mode=modes[:2], **kwargs)
