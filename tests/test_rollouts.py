"""training.rollouts: chunked generation and micro-batched scoring == the same work in one call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_rl_pipeline import world  # noqa: F401  (the tiny scene-world model)
from vlcal_jax import sampling
from vlcal_jax.rl import rollout, step
from vlcal_jax.training import rollouts

N, NEW = 2, 12
IMAGES_PER_PROMPT = 2  # one used: every prompt's padding slot must move with it


def _encode(world, examples):
    _, tokenizer, config, _, image_config = world
    return rollout.encode_examples(examples, tokenizer, config, image_config, mode="decoupled_short",
                                   length_buckets=(192,),
                                   num_images=len(examples) * IMAGES_PER_PROMPT).inputs


def test_chunked_generation_equals_each_chunk_encoded_on_its_own(world):  # noqa: F811
    samples, tokenizer, config, params, _ = world
    examples = [s.to_example() for s in samples[:4]]
    eos = (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    rng = jax.random.key(5)
    out = rollouts.generate(config, params, _encode(world, examples), rng, prompts_per_chunk=2, samples=N,
                            max_new_tokens=NEW, temperature=1.0, top_p=1.0, eos_token_ids=eos,
                            pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, mode="decoupled")
    assert out.tokens.shape == (4 * N, NEW) and len(out.texts) == 4 * N
    for c in range(2):
        alone = sampling.generate_from_inputs(
            config, params, _encode(world, examples[2 * c:2 * c + 2]), jax.random.fold_in(rng, c), jnp.float32(1.0),
            jnp.float32(1.0), max_new_tokens=NEW, n=N, greedy=False, top_k=0, eos_token_ids=eos,
            pad_token_id=tokenizer.pad_token_id, use_top_p=False)
        rows = slice(2 * c * N, (2 * c + 2) * N)
        np.testing.assert_array_equal(out.tokens[rows], np.asarray(alone.tokens))
        np.testing.assert_array_equal(out.lengths[rows], np.asarray(alone.lengths))
    texts, mask, _ = rollout.decode_responses(tokenizer, out.tokens, out.lengths)
    assert texts == out.texts and (mask == out.vision_mask).all()
    with pytest.raises(ValueError, match="rl.rollout_batch_size=3 must divide 4"):
        rollouts.generate(config, params, _encode(world, examples), rng, prompts_per_chunk=3, samples=N,
                          max_new_tokens=NEW, temperature=1.0, top_p=1.0, eos_token_ids=eos,
                          pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, mode="decoupled")


def test_micro_batched_scoring_equals_one_call(world):  # noqa: F811
    samples, tokenizer, config, params, _ = world
    examples = [s.to_example() for s in samples[4:8]]
    prompts = _encode(world, examples)
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, config.text.vocab_size, size=(4 * N, NEW))
    lengths = rng.integers(NEW // 2, NEW + 1, size=4 * N)
    seq = rollout.expand_for_responses(prompts, tokens, lengths, N)
    # every patch blacked out (vce_prob 1): the perturbation is the same whatever the rng
    rl = step.RLConfig(samples_per_prompt=N, logprob_chunk=4, vce_prob=1.0)
    one = rollouts.score(config, params, params, seq, jax.random.key(0), rl=rl, num_response=NEW)
    response = np.arange(NEW)[None] < lengths[:, None]
    for size in (2, 1):  # whole groups of 2; half a group (each part with its prompt's image)
        micro = rollouts.score(config, params, params, seq, jax.random.key(0),
                               rl=step.RLConfig(**{**rl.__dict__, "micro_batch_size": size}), num_response=NEW)
        assert set(one) == set(micro)
        for key in one:
            np.testing.assert_allclose(micro[key][response], one[key][response], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{key} (micro-batches of {size})")
    # the image matters: scoring the rows of prompt 1 with prompt 0's image changes the clean log-probs
    assert np.abs(one["kl"][response]).max() > 1e-4
