"""Supervised warm start: teacher-forced cross-entropy on responses in the decoupled format.

A model trained from scratch (the CPU demo) first has to learn the output format of
PAPER.md section 2 before RL can calibrate it; real Qwen3-VL checkpoints skip this stage.
The teacher responses come with the generated scenes (optionally made overconfident, or
rewritten in a baseline's format); the step is one jit with donated state, like the RL
update; `warm_start` runs `config.sft.steps` of them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
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
from vlcal_jax.training import checkpoints, logs

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


def encode_responses(tokenizer, responses: Sequence[str], length: int, eos_id: int, pad_id: int, *,
                     knob: str | None = None):
    """Responses -> (tokens int32 [N, length] ending in EOS, lengths [N]); too long -> truncated,
    and with `knob` (the setting that sets `length`) the cut rows are named in a warning
    (`warn_truncated`)."""
    tokens = np.full((len(responses), length), pad_id, np.int32)
    lengths = np.zeros(len(responses), np.int32)
    cut = 0
    for i, response in enumerate(responses):
        full = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        cut += len(full) > length - 1
        ids = full[:length - 1] + [eos_id]
        tokens[i, :len(ids)] = ids
        lengths[i] = len(ids)
    if knob:
        warn_truncated(cut, len(responses), length, knob)
    return tokens, lengths


_WARNED_CUTS: set = set()


def warn_truncated(cut: int, total: int, length: int, knob: str) -> bool:
    """Logs, once per (knob, length) in a process, that `cut` of `total` warm-start responses are
    longer than `length` tokens and names the knob that lengthens them; -> whether it logged."""
    if not cut or (knob, length) in _WARNED_CUTS:
        return False
    _WARNED_CUTS.add((knob, length))
    log.warning("%d of %d warm-start responses in a batch are longer than %d tokens and are cut (their tail "
                "and end-of-turn are not learnt): raise %s", cut, total, length, knob)
    return True


def sft_batch(examples, responses, tokenizer, config: ModelConfig, image_config, *, response_length: int,
              length_buckets, patch_bucket=None, num_images=None, prompt="decoupled", knob=None):
    """(ModelInputs of prompt + response rows, response mask [N, M]); with several processes,
    this process's rows, padded like every other process's. `prompt`: the instruction mode, or
    one per example. `knob`: see encode_responses."""
    prompts = rollout.encode_examples(examples, tokenizer, config, image_config, mode=prompt,
                                      length_buckets=length_buckets,
                                      patch_bucket=patch_bucket, num_images=num_images,
                                      same_shapes_everywhere=multihost.multiprocess())
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens, lengths = encode_responses(tokenizer, responses, response_length, eos, tokenizer.pad_token_id,
                                       knob=knob)
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


CAPTION_PROMPT = "describe_tiny"


def uses_captions(config) -> bool:
    return bool(config.sft.caption_steps or config.sft.caption_fraction)


def scene_inventory(example) -> str:
    """Every object of a scene-world example's scene graph (its meta "scene"), grouped by colour
    and shape in reading order (bands of a quarter of the image, then left to right), as count
    sentences that score_perception parses and checks: "There is 1 red circle. There are 2 blue
    squares." Empty for an example without a scene graph."""
    scene = (example.meta or {}).get("scene")
    if scene is None:
        return ""
    scene = json.loads(scene) if isinstance(scene, str) else scene
    band = max(1, int(scene.get("image_size", 64)) // 4)
    groups: dict = {}
    for obj in sorted(scene["objects"], key=lambda o: (o["y"] // band, o["x"])):
        key = (obj["color"], obj["shape"])
        groups[key] = groups.get(key, 0) + 1
    return " ".join(f"There is 1 {color} {shape}." if n == 1 else f"There are {n} {color} {shape}s."
                    for (color, shape), n in groups.items())


def with_inventory(response: str, example) -> str:
    """A decoupled teacher response whose <vision> span starts with the scene's inventory."""
    inventory = scene_inventory(example)
    return response.replace("<vision>", f"<vision>{inventory} ", 1) if inventory else response


def caption_row(example):
    """(the example as the image alone, its caption response): the image placeholders without the
    question, answered by the inventory in a <vision> span."""
    from vlcal_jax.data.example import Example  # pylint: disable=import-outside-toplevel

    bare = Example(id=example.id, question="<image>" * max(1, len(example.images)), answer=example.answer,
                   choices=example.choices, answer_type=example.answer_type, category=example.category,
                   meta=example.meta, images=example.images)
    return bare, f"<vision>{scene_inventory(example)}</vision>"


def is_caption_row(example, fraction: float) -> bool:
    """Whether a warm-start row is kept as a caption row: a hash of its id (the same for the same
    row whatever the batch, the step or the process count) below `fraction`."""
    return fraction > 0 and zlib.crc32(f"caption:{example.id}".encode()) % 10000 < fraction * 10000


def pick_formats(examples, pairs) -> list[tuple[str, str]]:
    """One (mode, prompt) of `pairs` per example, by a hash of its id (the same for the same row
    whatever the batch, the step or the process count)."""
    if len(pairs) == 1:
        return [pairs[0]] * len(examples)
    return [pairs[zlib.crc32(str(ex.id).encode()) % len(pairs)] for ex in examples]


class Preempted(Exception):
    """A stop was requested during the warm start; its progress is checkpointed (Progress)."""

    def __init__(self, done: int, total: int, directory: str):
        super().__init__(f"warm start stopped after step {done} of {total}; progress in {directory}")
        self.done, self.total, self.directory = done, total, directory


class Progress:
    """Mid-warm-start checkpoints under `directory` (WORKDIR/warm_start_progress): the current
    stage's train state, the data position and the teacher's confidence rng, every `every`
    warm-start steps (0: never) and when `should_stop()` says so (a SIGTERM; then Preempted is
    raised after the save), so a stopped warm start resumes where it was and ends with the same
    weights, bit for bit. Steps are counted over both stages: 1..caption_steps are the caption
    stage, the rest the teacher stage. Removed (`clear`) once the finished warm start is saved."""

    def __init__(self, directory: str, every: int = 0, should_stop=lambda: False):
        self.directory, self.every, self.should_stop = directory, int(every), should_stop
        self.checkpointer = checkpoints.Checkpointer(directory, keep=1)

    def restore(self, template):
        """-> (state, done steps, extra) of the newest readable checkpoint, or None."""
        state, done, extra = self.checkpointer.restore_latest(template)
        return (state, done, extra) if extra is not None else None

    def after_step(self, done: int, total: int, state, data, rng, loss: float) -> None:
        stop = self.should_stop()
        if not (stop or self.every and done % self.every == 0 and done < total):
            return
        readers = multihost.allgather_json(data.sft_source.state())
        self.checkpointer.save(done, state, {"reader": readers[0], "readers": readers, "loss": loss,
                                             "rng": None if rng is None else json.dumps(rng.bit_generator.state)})
        if stop:
            self.checkpointer.wait()
            raise Preempted(done, total, self.directory)

    def clear(self) -> None:
        self.checkpointer.wait()
        for done in self.checkpointer.manager.all_steps():
            self.checkpointer.manager.delete(done)
        self.checkpointer.close()
        if "://" not in self.directory and os.path.isdir(self.directory) and not os.listdir(self.directory):
            os.rmdir(self.directory)  # a bucket has no empty directories to leave behind


def warm_start(config, model_config, params, tokenizer, image_config, data, writer, progress: Progress | None = None):
    """Runs config.sft.steps supervised steps on teacher responses; returns the new params.
    With several processes each reads and encodes its share of every batch. With `progress`,
    resumes from its newest checkpoint and checkpoints as it goes (Progress)."""
    s = config.sft
    if data.sft_source is None:
        raise ValueError("sft.steps > 0 needs teacher responses: they come with data.kind='scenes'")
    mesh = parallel.mesh_of(params)
    encode = functools.partial(_warm_batch, config, model_config, tokenizer, image_config, mesh)
    total = s.caption_steps + s.steps
    resumed, done, extra = None, 0, None
    if progress is not None:
        template = step.init_state(params, make_optimizer(s.learning_rate, max(s.steps, 1), s.weight_decay,
                                                          s.warmup_steps))
        found = progress.restore(template)
        if found is not None:
            resumed, done, extra = found
            readers = extra.get("readers") or [extra["reader"]]
            data.sft_source.restore(readers[jax.process_index()] if len(readers) == jax.process_count() else readers[0])
            log.info("warm start resumed after step %d of %d (%s)", done, total, progress.directory)
    if writer.enabled:  # metric rows after the resumed step (every warm-start row, without one) are redone
        logs.keep_metrics(writer.path, lambda row: not logs.is_sft_row(row) or (
            done > 0 and row["step"] <= done - total and "sft/heldout_loss" not in row))
    if s.caption_steps and done < s.caption_steps:  # the alignment stage: every row the image alone and its inventory
        def caption_batch():
            rows = [caption_row(ex) for ex in data.sft_source.take(data.sft_source.block)]
            return encode([ex for ex, _ in rows], [r for _, r in rows], [CAPTION_PROMPT] * len(rows),
                          response_length=s.caption_length)

        params, loss = _stage(config, model_config, params, writer, caption_batch, s.caption_steps,
                              s.caption_learning_rate, "caption_", first_step=1 - total, start=done, state=resumed,
                              after_step=progress and (lambda i, st, loss: progress.after_step(
                                  i, total, st, data, None, loss)))
        log.info("warm start, caption stage done: %d steps, final loss %.3f", s.caption_steps, loss)
        resumed, done = None, s.caption_steps
    elif resumed is not None and done == s.caption_steps:  # stopped right after the caption stage
        params, resumed = resumed.params, None
    pairs = formats(config)
    rng = np.random.default_rng(config.seed)
    if resumed is not None:
        rng.bit_generator.state = json.loads(extra["rng"])

    def teacher_batch():
        examples = data.sft_source.take(data.sft_source.block)
        responses = [ex.meta["teacher_response"] for ex in examples]
        if s.overconfident and multihost.multiprocess():
            responses = overconfident_teachers(responses, rng, s.confidence_low, s.confidence_high,
                                               tuple(s.confidence_values))
        elif s.overconfident:
            responses = [override_confidences(r, rng, s.confidence_low, s.confidence_high,
                                              tuple(s.confidence_values)) for r in responses]
        return encode(*teacher_rows(config, examples, responses, pairs))

    params, loss = _stage(config, model_config, params, writer, teacher_batch, s.steps, s.learning_rate, "",
                          first_step=1 - s.steps, start=done - s.caption_steps, state=resumed,
                          after_step=progress and (lambda i, st, loss: progress.after_step(
                              s.caption_steps + i, total, st, data, rng, loss)))
    log.info("warm start done: %d steps, final loss %.3f", s.steps, loss)
    if data.eval_examples and not multihost.multiprocess():
        gap = image_dependence(config, model_config, params, tokenizer, image_config, data.eval_examples)
        writer.write(0, {"sft/heldout_loss": gap["loss"], "sft/blank_image_loss": gap["blank_image_loss"]})
        log.info("held-out teacher loss %.4f, with the images blanked %.4f: the model %s", gap["loss"],
                 gap["blank_image_loss"], "uses the images" if gap["blank_image_loss"] > gap["loss"] + 1e-3 else
                 "IGNORES THE IMAGES (the loss does not change without them; train longer or make the scenes easier)")
    return params


def _stage(config, model_config, params, writer, next_batch, steps: int, learning_rate: float, prefix: str,
           first_step: int, start: int = 0, state=None, after_step=None):
    """`steps` supervised steps on `next_batch()` with a fresh AdamW and schedule; logs
    sft/sft_loss, sft/grad_norm, sft/skipped (prefix "") or sft/{prefix}loss, sft/{prefix}grad_norm,
    sft/{prefix}skipped at steps first_step.. (warm-start steps are logged at steps <= 0).
    From step `start` with `state` (a resumed stage's train state) when given; after_step(steps
    done, state, loss) after each step. -> (params, final loss)."""
    s = config.sft
    optimizer = make_optimizer(learning_rate, steps, s.weight_decay, s.warmup_steps)
    state = state if state is not None else step.init_state(params, optimizer)
    sft_step = make_sft_step(model_config, optimizer, chunk=config.rl.logprob_chunk)
    desc = f"warm start ({prefix.strip('_')}s)" if prefix else "warm start"
    bar = logs.progress(range(start, steps), total=steps, initial=start, desc=desc,
                        disable=jax.process_index() != 0)
    loss = float("nan")
    for i in bar:
        state, metrics = sft_step(state, *next_batch())
        if (i + 1) % config.log_every == 0 or i + 1 == steps:
            loss = float(metrics["sft_loss"])
            writer.write(first_step + i, {f"sft/{prefix or 'sft_'}loss": loss,
                                          f"sft/{prefix}grad_norm": float(metrics["grad_norm"]),
                                          f"sft/{prefix}skipped": float(metrics["skipped"])})
            bar.set_postfix(loss=f"{loss:.3f}")
        if after_step is not None:
            after_step(i + 1, state, loss)
    return jax.tree.map(lambda x: x, state.params), loss


def teacher_rows(config, examples, responses, pairs):
    """(examples, responses, prompt modes) of one warm-start batch after the teacher responses
    are drawn: the inventory added (sft.inventory), each row in its picked format, and the rows
    is_caption_row picks turned into caption rows."""
    if config.sft.inventory:
        responses = [with_inventory(r, ex) for r, ex in zip(responses, examples)]
    chosen = pick_formats(examples, pairs)
    rows, texts, prompts = [], [], []
    for ex, r, (mode, prompt) in zip(examples, responses, chosen):
        if is_caption_row(ex, config.sft.caption_fraction):
            ex, r = caption_row(ex)
            prompt = CAPTION_PROMPT
        else:
            r = convert_teacher(r, mode)
        rows.append(ex)
        texts.append(r)
        prompts.append(prompt)
    return rows, texts, prompts


def _warm_batch(config, model_config, tokenizer, image_config, mesh, examples, responses, prompts,
                response_length: int = 0):
    """The device batch (inputs, response mask) of warm-start rows, global across processes;
    responses padded (or cut) to `response_length` tokens (0: rl.max_new_tokens)."""
    knob = "sft.caption_length" if response_length else "rl.max_new_tokens"
    response_length = response_length or config.rl.max_new_tokens
    inputs, mask = sft_batch(examples, responses, tokenizer, model_config, image_config,
                             response_length=response_length, knob=knob,
                             length_buckets=tuple(config.data.length_buckets),
                             patch_bucket=config.data.patch_bucket or None,
                             num_images=len(examples) * config.data.max_images_per_prompt, prompt=prompts)
    if multihost.multiprocess():
        inputs = multihost.offset_image_index(inputs, model_config.image_token_id, model_config.vision.merge_unit,
                                              inputs.input_ids.shape[1] - response_length)
        inputs, mask = multihost.to_global((inputs, mask), mesh, what="warm-start batch")
    return inputs, mask


def blank_images(examples, color=None) -> list:
    """The examples with every image replaced by a plain canvas of its size, in `color` (an RGB
    triple), else the image's own top-left colour."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    from vlcal_jax.data.example import Example  # pylint: disable=import-outside-toplevel

    return [Example(id=ex.id, question=ex.question, answer=ex.answer, choices=ex.choices,
                    answer_type=ex.answer_type, category=ex.category, meta=ex.meta,
                    images=[Image.new("RGB", im.size, color or im.convert("RGB").getpixel((0, 0))) for im in ex.images])
            for ex in examples]


def image_dependence(config, model_config, params, tokenizer, image_config, examples, size: int = 32) -> dict:
    """How much the model's teacher-forced loss on held-out teacher responses rises when the images
    are blanked: {"loss", "blank_image_loss"} (mean NLL per response token). Equal: the model
    answers from the text alone (it does not look), whatever its training loss says."""
    examples = [ex for ex in examples if ex.meta and "teacher_response" in ex.meta][:size]
    if not examples:
        return {"loss": float("nan"), "blank_image_loss": float("nan")}
    pairs = pick_formats(examples, formats(config))
    responses = [with_inventory(ex.meta["teacher_response"], ex) if config.sft.inventory
                 else ex.meta["teacher_response"] for ex in examples]
    responses = [convert_teacher(r, mode) for r, (mode, _) in zip(responses, pairs)]
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
