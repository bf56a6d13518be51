"""End to end on a tiny model: scenes -> prompts -> rollout -> VCE scoring -> rewards -> update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlcal_jax import models, processing, sampling
from vlcal_jax.data import scenes
from vlcal_jax.rl import rollout, step


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    samples = scenes.generate_samples(12, seed=3)
    texts = [s.question for s in samples] + [scenes.teacher_response(s) for s in samples]
    tokenizer = processing.train_demo_tokenizer(texts * 4, 400, tmp_path_factory.mktemp("tok"))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    config = models.ModelConfig(
        vision=models.VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                                   out_hidden_size=48, num_position_embeddings=64, deepstack_visual_indexes=(0,)),
        text=models.TextConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                               rope_theta=10000.0, mrope_section=(2, 2, 2)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    params = models.init_params(config, jax.random.key(0))
    image_config = processing.ImageProcessorConfig.qwen3_vl(patch_size=8, min_pixels=64 * 64, max_pixels=64 * 64)
    return samples, tokenizer, config, params, image_config


def test_vision_mask_covers_exactly_the_vision_span(world):
    samples, tokenizer, *_ = world
    text = scenes.teacher_response(samples[0])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded, offsets = rollout.decode_with_offsets(tokenizer, ids)
    assert decoded == text
    mask, parsed = rollout.vision_token_mask(decoded, offsets)
    covered = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert parsed.vision.strip() in covered
    assert "<vision>" not in covered.replace("</vision>", "") or covered.count("<vision>") == 0


def test_one_rl_step_end_to_end(world):
    samples, tokenizer, config, params, image_config = world
    n, new = 2, 24
    examples = [s.to_example() for s in samples[:3]]
    batch = rollout.encode_examples(examples, tokenizer, config, image_config)
    out = sampling.generate_from_inputs(config, params, batch.inputs, jax.random.key(1), jnp.float32(1.0),
                                        jnp.float32(1.0), max_new_tokens=new, n=n, greedy=False, top_k=0,
                                        eos_token_ids=(tokenizer.convert_tokens_to_ids("<|im_end|>"),),
                                        pad_token_id=tokenizer.pad_token_id, use_top_p=False)
    seq = rollout.expand_for_responses(batch.inputs, out.tokens, out.lengths, n)
    rl = step.RLConfig(samples_per_prompt=n, learning_rate=1e-3, logprob_chunk=8)
    stats = step.score(config, params, params, seq, jax.random.key(2), rl=rl, num_response=new)
    response_mask = np.asarray(seq.attention_mask)[:, -new:]
    # the old-policy log-probs of the scorer are the sampler's untempered log-probs
    np.testing.assert_allclose(np.asarray(stats["logp"])[response_mask > 0],
                               np.asarray(out.policy_logprobs)[response_mask > 0], atol=1e-4)
    # reference == policy here, so the reference log-probs are the same numbers
    np.testing.assert_allclose(np.asarray(stats["ref_logp"]), np.asarray(stats["logp"]), atol=1e-5)
    assert (np.asarray(stats["kl"])[response_mask > 0] >= 0).all()
    # a teacher response puts real tokens inside <vision>; use those for the reward side
    texts = [scenes.teacher_response(s) for s in samples[:3] for _ in range(n)]
    _, vision_mask, _ = rollout.decode_responses(tokenizer, out.tokens, out.lengths)
    kl, ent = rollout.response_vision_stats(stats, np.ones_like(vision_mask))
    rewards = rollout.score_rewards(texts, examples, n, vision_kl=kl, vision_entropy=ent)
    assert rewards["reward"].shape == (6,) and np.isfinite(rewards["advantage"]).all()
    adv = np.array([1.0, -1.0] * 3, np.float32)
    rl_batch = step.RLBatch(seq, response_mask, np.ones_like(response_mask), adv, stats["logp"], stats["ref_logp"],
                            stats["k3"], stats["nll"], stats["kl"], stats["entropy"])
    optimizer = step.make_optimizer(rl)
    before = jax.tree.map(np.asarray, params)
    state = step.init_state(jax.tree.map(jnp.copy, params), optimizer)
    train_step = step.make_train_step(config, rl, optimizer)
    new_state, metrics = train_step(state, rl_batch, jax.random.key(3))
    assert int(new_state.step) == 1 and float(metrics["skipped"]) == 0.0
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_state.params, before))
    assert max(moved) > 0
