"""The model, tokenizer and image processor: a HF Qwen3-VL directory, or a small model from scratch."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections

from vlcal_jax import models, parallel, processing
from vlcal_jax.parallel import multihost
from vlcal_jax.training import export, warm

log = logging.getLogger("vlcal_jax.train")

VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def eos_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    return [i for i in ids if i is not None and i >= 0]


def from_scratch_config(m: ml_collections.ConfigDict, tokenizer) -> models.ModelConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    v, t = m.init.vision, m.init.text
    return models.ModelConfig(
        vision=models.VisionConfig(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                   num_heads=v.num_heads, patch_size=v.patch_size, out_hidden_size=t.hidden_size,
                                   num_position_embeddings=v.num_position_embeddings,
                                   deepstack_visual_indexes=tuple(v.deepstack_visual_indexes)),
        text=models.TextConfig(vocab_size=len(tokenizer), hidden_size=t.hidden_size,
                               intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                               num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
                               head_dim=t.head_dim, rope_theta=t.rope_theta, mrope_section=tuple(t.mrope_section)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=m.init.tie_word_embeddings, dtype=m.compute_dtype, remat=m.remat,
        remat_offload=m.remat_offload, attention_impl=m.attention_impl)


def setup_model(config: ml_collections.ConfigDict, data, rng, run_dir):
    """-> (tokenizer, ModelConfig, params, ImageProcessorConfig). A model from scratch gets a
    tokenizer fitted once and kept in `workdir/tokenizer` (a resumed run reloads it)."""
    m, d = config.model, config.data
    pixels = {k: v for k, v in (("min_pixels", d.min_pixels), ("max_pixels", d.max_pixels)) if v}
    if m.path:
        model_config, params, tokenizer, image_config = export.load_model_dir(m.path, dtype=jnp.dtype(m.param_dtype))
        model_config = model_config.replace(dtype=m.compute_dtype, remat=m.remat, remat_offload=m.remat_offload,
                                            attention_impl=m.attention_impl)
        if pixels:
            image_config = dataclasses.replace(image_config, **pixels)
        return tokenizer, model_config.replace(image_processor=image_config), params, image_config
    # process 0 fits (or loads) the tokenizer first; the others then load it from a shared disk, or
    # fit the same one from the same texts on their own
    for fitting_turn in (True, False):
        if fitting_turn == (jax.process_index() == 0):
            tokenizer = _demo_tokenizer(config, data, run_dir)
        multihost.barrier("tokenizer" if fitting_turn else "tokenizer everywhere")
    model_config = from_scratch_config(m, tokenizer)
    params = models.init_params(model_config, rng, dtype=jnp.dtype(m.param_dtype))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    log.info("model from scratch: %.2fM parameters, vocab %d", n_params / 1e6, len(tokenizer))
    image_config = processing.ImageProcessorConfig.qwen3_vl(patch_size=m.init.vision.patch_size, **pixels)
    # the model config carries the image settings it is trained with (exported with it)
    return tokenizer, model_config.replace(image_processor=image_config), params, image_config


def _demo_tokenizer(config, data, run_dir):
    """The from-scratch model's tokenizer: loaded from `workdir/tokenizer`, else fitted there."""
    tok_dir = run_dir.local("tokenizer")
    if run_dir.fetch("tokenizer") and os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        return processing.load_tokenizer(tok_dir)
    if not data.teacher_texts:
        raise ValueError("training from scratch needs text to fit a tokenizer: use data.kind='scenes' "
                         "or set model.path to a Qwen3-VL checkpoint directory")
    # the instruction of every prompt is the most frequent text: weight it so it compresses well
    prompts = {config.rl.prompt} | {prompt for _, prompt in warm.formats(config)}
    if warm.uses_captions(config):
        prompts.add(warm.CAPTION_PROMPT)
    texts = list(data.teacher_texts) + [processing.INSTRUCTIONS[p] for p in sorted(prompts)] * 500
    tokenizer = processing.train_demo_tokenizer(texts, config.model.init.vocab_size, tok_dir)
    run_dir.publish("tokenizer")
    return tokenizer


def compute_params(params, model_config, copy: bool = False):
    """Floating parameters cast to the compute dtype (a new copy), for rollouts, scoring and the
    frozen reference model; the float32 masters themselves are only read by the update. When the
    dtypes agree the params are returned as they are (or copied, with `copy`)."""
    dtype = jnp.dtype(model_config.compute_dtype)

    def cast(x):
        if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return _cast(x, dtype)
        return jnp.copy(x) if copy else x

    return jax.tree.map(cast, params)


def to_memory(tree, kind: str):
    """`tree`'s arrays moved to memory `kind` ("pinned_host" or "device") of the devices they are
    on, with their shardings otherwise unchanged."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(kind)), tree)


@functools.partial(jax.jit, static_argnums=1)
def _cast(x, dtype):
    return x.astype(dtype)


def untie_head(model_config: models.ModelConfig, params, mesh):
    """(config, params) of a tied-embedding model with an output projection of its own: `lm_head/kernel`
    [D, V] = the embedding transposed (the same logits), sharded by the mesh's rules (rl.untie_head)."""
    if not model_config.tie_word_embeddings:
        return model_config, params
    params = dict(params)
    params["lm_head"] = {"kernel": jnp.array(params["text"]["embed"]).T}
    return dataclasses.replace(model_config, tie_word_embeddings=False), parallel.shard_params(params, mesh)
