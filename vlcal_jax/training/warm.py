"""Supervised warm start: teacher-forced cross-entropy on responses in the decoupled format.

A model trained from scratch (the CPU demo) first has to learn the output format of
PAPER.md section 2 before RL can calibrate it; real Qwen3-VL checkpoints skip this stage.
The teacher responses come with the generated scenes (optionally made overconfident, or
rewritten in a baseline's format); the step is one jit with donated state, like the RL
update; `warm_start` runs `config.sft.steps` of them.
"""

from __future__ import annotations

import functools
import logging
import re
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlcal_jax import parallel, processing
from vlcal_jax.models import text
from vlcal_jax.parallel import multihost
from vlcal_jax.models.config import ModelConfig
from vlcal_jax.rl import rollout, step
from vlcal_jax.training import logs

log = logging.getLogger("vlcal_jax.train")

_CONF = re.compile(r"<(vision_confidence|reasoning_confidence)>\s*\d+(\.\d+)?\s*</\1>")


def override_confidences(response: str, rng: np.random.Generator, low: int = 9, high: int = 10,
                         values: Sequence[int] = ()) -> str:
    """Replaces both stated confidences with integers drawn regardless of correctness: uniformly
    from [low, high], or uniformly from `values` when given (repeat a value to weight it); an
    overconfident teacher, like the uncalibrated base models of PAPER.md section 7 (ECE ~0.4).
    One draw from `rng` per confidence either way."""
    choices = list(values) or list(range(low, high + 1))

    def draw(m):
        return f"<{m.group(1)}>{int(choices[rng.integers(len(choices))])}</{m.group(1)}>"

    return _CONF.sub(draw, response)


def convert_teacher(response: str, mode: str) -> str:
    """A decoupled-format teacher response rewritten in another response format (PAPER.md
    section 2 baselines): "rlcr" merges vision and reasoning into <think> and states one
    confidence (the harmonic mean of the two, rounded); "plain" keeps <think> and the answer."""
    if mode == "decoupled":
        return response
    vision = re.search(r"<vision>(.*?)</vision>", response, re.S)
    reasoning = re.search(r"<reasoning>(.*?)</reasoning>", response, re.S)
    boxed = re.search(r"</think>(.*?)<analysis>", response, re.S)
    if not (vision and reasoning and boxed):
        raise ValueError(f"teacher response is not in the decoupled format: {response[:200]!r}")
    think = f"<think>{vision.group(1).strip()} {reasoning.group(1).strip()}</think>{boxed.group(1).rstrip()}"
    if mode == "plain":
        return think
    if mode != "rlcr":
        raise ValueError(f"unknown response mode {mode!r}; use decoupled, rlcr or plain")
    analysis = re.search(r"<analysis>(.*?)</analysis>", response, re.S)
    scores = [float(m.group(2)) for m in re.finditer(r"<(vision_confidence|reasoning_confidence)>\s*([\d.]+)",
                                                       response)]
    v, r = (scores + [0.0, 0.0])[:2]
    combined = round(2 * v * r / (v + r)) if v + r > 0 else 0
    return f"{think} <analysis>{analysis.group(1).strip() if analysis else ''}</analysis><confidence>{combined}</confidence>"


def encode_responses(tokenizer, responses: Sequence[str], length: int, eos_id: int, pad_id: int):
    """Responses -> (tokens int32 [N, length] ending in EOS, lengths [N]); too long -> truncated."""
    tokens = np.full((len(responses), length), pad_id, np.int32)
    lengths = np.zeros(len(responses), np.int32)
    for i, response in enumerate(responses):
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])[:length - 1] + [eos_id]
        tokens[i, :len(ids)] = ids
        lengths[i] = len(ids)
    return tokens, lengths


def sft_batch(examples, responses, tokenizer, config: ModelConfig, image_config, *, response_length: int,
              length_buckets, patch_bucket=None, num_images=None, prompt="decoupled"):
    """(ModelInputs of prompt + response rows, response mask [N, M]); with several processes,
    this process's rows, padded like every other process's. `prompt`: the instruction mode, or
    one per example."""
    prompts = rollout.encode_examples(examples, tokenizer, config, image_config, mode=prompt,
                                      length_buckets=length_buckets,
                                      patch_bucket=patch_bucket, num_images=num_images,
                                      same_shapes_everywhere=multihost.multiprocess())
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens, lengths = encode_responses(tokenizer, responses, response_length, eos, tokenizer.pad_token_id)
    inputs = rollout.expand_for_responses(prompts.inputs, tokens, lengths, 1)
    return inputs, (np.arange(response_length)[None] < lengths[:, None]).astype(np.float32)


def sft_loss(params, config: ModelConfig, inputs, response_mask, chunk: int):
    """Mean negative log-likelihood of the response tokens."""
    m = response_mask.shape[1]
    hidden = step.response_hidden(config, params, inputs, m)
    logp = step.token_logprobs(hidden, text.lm_head_kernel(config, params), inputs.input_ids[:, -m:], min(chunk, m))
    return -jnp.sum(logp * response_mask) / jnp.maximum(jnp.sum(response_mask), 1.0)


def make_optimizer(learning_rate: float, steps: int, weight_decay: float = 0.01, warmup: int = 10):
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup, max(steps - 1, 1)),
                                                  max(steps, 2), end_value=0.1 * learning_rate)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def make_sft_step(config: ModelConfig, optimizer, chunk: int = 256):
    """`sft_step(state, inputs, response_mask) -> (state, metrics)`; one jit, state donated."""

    def sft_step(state: step.TrainState, inputs, response_mask):
        loss, grads = jax.value_and_grad(sft_loss)(state.params, config, inputs, response_mask, chunk)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        new_state = step.TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state))
        return new_state, {"sft_loss": loss, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.float32)}

    return jax.jit(sft_step, donate_argnums=0)


def overconfident_teachers(responses, rng: np.random.Generator, low: int, high: int,
                           values: Sequence[int] = ()) -> list[str]:
    """override_confidences of this process's share of a batch, drawing from `rng` what one
    process holding the whole batch would draw for these rows (the draws of the processes
    before this one are skipped, those after it too), so the teacher does not depend on the
    process count."""
    counts = multihost.allgather_json(sum(len(_CONF.findall(r)) for r in responses))
    p = jax.process_index()
    n = len(values) or high - low + 1
    for _ in range(sum(counts[:p])):
        rng.integers(n)
    out = [override_confidences(r, rng, low, high, values) for r in responses]
    for _ in range(sum(counts[p + 1:])):
        rng.integers(n)
    return out


def formats(config) -> list[tuple[str, str]]:
    """The warm start's (mode, prompt) pairs: config.sft.formats, else (rl.mode, rl.prompt)."""
    pairs = []
    for item in config.sft.formats or (f"{config.rl.mode}:{config.rl.prompt}",):
        mode, _, prompt = item.partition(":")
        if mode not in ("decoupled", "rlcr", "plain") or prompt not in processing.INSTRUCTIONS:
            raise ValueError(f"sft.formats entry {item!r}: use 'mode:prompt' with mode decoupled, rlcr or plain "
                             f"and prompt one of {sorted(processing.INSTRUCTIONS)}")
        pairs.append((mode, prompt))
    return pairs


def pick_formats(examples, pairs) -> list[tuple[str, str]]:
    """One (mode, prompt) of `pairs` per example, by a hash of its id (the same for the same row
    whatever the batch, the step or the process count)."""
    if len(pairs) == 1:
        return [pairs[0]] * len(examples)
    return [pairs[zlib.crc32(str(ex.id).encode()) % len(pairs)] for ex in examples]


def warm_start(config, model_config, params, tokenizer, image_config, data, writer):
    """Runs config.sft.steps supervised steps on teacher responses; returns the new params.
    With several processes each reads and encodes its share of every batch."""
    s = config.sft
    if data.sft_source is None:
        raise ValueError("sft.steps > 0 needs teacher responses: they come with data.kind='scenes'")
    optimizer = make_optimizer(s.learning_rate, s.steps, s.weight_decay, s.warmup_steps)
    state = step.init_state(params, optimizer)
    sft_step = make_sft_step(model_config, optimizer, chunk=config.rl.logprob_chunk)
    pairs = formats(config)
    rng = np.random.default_rng(config.seed)
    bar = logs.progress(range(s.steps), desc="warm start", disable=jax.process_index() != 0)
    mesh = parallel.mesh_of(params)
    for i in bar:
        examples = data.sft_source.take(data.sft_source.block)
        responses = [ex.meta["teacher_response"] for ex in examples]
        if s.overconfident and multihost.multiprocess():
            responses = overconfident_teachers(responses, rng, s.confidence_low, s.confidence_high,
                                               tuple(s.confidence_values))
        elif s.overconfident:
            responses = [override_confidences(r, rng, s.confidence_low, s.confidence_high,
                                              tuple(s.confidence_values)) for r in responses]
        chosen = pick_formats(examples, pairs)
        responses = [convert_teacher(r, mode) for r, (mode, _) in zip(responses, chosen)]
        inputs, mask = sft_batch(examples, responses, tokenizer, model_config, image_config,
                                 response_length=config.rl.max_new_tokens,
                                 length_buckets=tuple(config.data.length_buckets),
                                 patch_bucket=config.data.patch_bucket or None,
                                 num_images=len(examples) * config.data.max_images_per_prompt,
                                 prompt=[prompt for _, prompt in chosen])
        if multihost.multiprocess():
            inputs = multihost.offset_image_index(inputs, model_config.image_token_id, model_config.vision.merge_unit,
                                                  inputs.input_ids.shape[1] - config.rl.max_new_tokens)
            inputs, mask = multihost.to_global((inputs, mask), mesh, what="warm-start batch")
        state, metrics = sft_step(state, inputs, mask)
        if (i + 1) % config.log_every == 0 or i + 1 == s.steps:
            metrics = {f"sft/{k}": float(v) for k, v in metrics.items()}
            writer.write(i + 1 - s.steps, metrics)  # warm-start steps are logged at steps <= 0
            bar.set_postfix(loss=f"{metrics['sft/sft_loss']:.3f}")
    log.info("warm start done: %d steps, final loss %.3f", s.steps, float(metrics["sft/sft_loss"]))
    if data.eval_examples and not multihost.multiprocess():
        gap = image_dependence(config, model_config, state.params, tokenizer, image_config, data.eval_examples)
        writer.write(0, {"sft/heldout_loss": gap["loss"], "sft/blank_image_loss": gap["blank_image_loss"]})
        log.info("held-out teacher loss %.4f, with the images blanked %.4f: the model %s", gap["loss"],
                 gap["blank_image_loss"], "uses the images" if gap["blank_image_loss"] > gap["loss"] + 1e-3 else
                 "IGNORES THE IMAGES (the loss does not change without them; train longer or make the scenes easier)")
    return jax.tree.map(lambda x: x, state.params)


def blank_images(examples) -> list:
    """The examples with every image replaced by a plain canvas of its size and top-left colour."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    from vlcal_jax.data.example import Example  # pylint: disable=import-outside-toplevel

    return [Example(id=ex.id, question=ex.question, answer=ex.answer, choices=ex.choices,
                    answer_type=ex.answer_type, category=ex.category, meta=ex.meta,
                    images=[Image.new("RGB", im.size, im.convert("RGB").getpixel((0, 0))) for im in ex.images])
            for ex in examples]


def image_dependence(config, model_config, params, tokenizer, image_config, examples, size: int = 32) -> dict:
    """How much the model's teacher-forced loss on held-out teacher responses rises when the images
    are blanked: {"loss", "blank_image_loss"} (mean NLL per response token). Equal: the model
    answers from the text alone (it does not look), whatever its training loss says."""
    examples = [ex for ex in examples if ex.meta and "teacher_response" in ex.meta][:size]
    if not examples:
        return {"loss": float("nan"), "blank_image_loss": float("nan")}
    pairs = pick_formats(examples, formats(config))
    responses = [convert_teacher(ex.meta["teacher_response"], mode) for ex, (mode, _) in zip(examples, pairs)]
    out = {}
    for key, batch in (("loss", examples), ("blank_image_loss", blank_images(examples))):
        inputs, mask = sft_batch(batch, responses, tokenizer, model_config, image_config,
                                 response_length=config.rl.max_new_tokens,
                                 length_buckets=tuple(config.data.length_buckets),
                                 patch_bucket=config.data.patch_bucket or None,
                                 num_images=len(batch) * config.data.max_images_per_prompt,
                                 prompt=[prompt for _, prompt in pairs])
        out[key] = float(jax.jit(sft_loss, static_argnums=(1, 4))(params, model_config, inputs, mask,
                                                                  min(config.rl.logprob_chunk, config.rl.max_new_tokens)))
    return out
