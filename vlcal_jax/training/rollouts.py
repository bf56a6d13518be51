"""A step's rollouts in chunks of prompts and its scoring in micro-batches of rows.

The paper's step (256 prompts x 8 samples x 4096 tokens) fits neither one sampler call nor one
scoring call. `generate` runs `rl.rollout_batch_size` prompts per sampler call (every chunk
has the same shapes: one compiled program) and dispatches chunk i + 1 before the host decodes
chunk i, so the host's detokenising and span finding overlap the device's generation (JAX
dispatch is asynchronous; only reading a chunk's tokens waits for it). `score` runs
`rl.micro_batch_size` rows per call and concatenates the per-token statistics, so the soft
labels' batch statistics are still taken over the whole rollout batch (PAPER.md section 4).
Chunks hold whole prompts; their images travel with them (rl.microbatch). The continuous
engine dispatches its decode segments without waiting on them, so the overlap holds for it too.

Multi-process: the prompts are this process's; each sampler / scoring call takes the same
share of every process's prompts (chunk c = chunk c of each process, in process order) as one
global array (parallel.multihost.to_global), and only this process's rows come back (its
addressable shards), so decoding and grading stay on the host that owns the rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax import parallel, sampling
from vlcal_jax.parallel import multihost
from vlcal_jax.rl import microbatch, rollout, step


@dataclasses.dataclass
class Rollouts:
    """N = prompts * n responses: tokens [N, M], lengths [N], finished [N], texts [N],
    vision_mask bool [N, M] (tokens of the <vision> content), parsed responses [N]."""

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    texts: list
    vision_mask: np.ndarray
    parsed: list


def chunk_size(total: int, size: int, name: str, unit: int = 1) -> int:
    """`size` (0: all) checked to split `total` evenly; errors name the setting."""
    size = size or total
    if total % size or size % unit:
        raise ValueError(f"{name}={size} must divide {total} (and be a multiple of {unit})")
    return size


def generate(config, policy, prompt_inputs, rng, *, prompts_per_chunk: int, samples: int, max_new_tokens: int,
             temperature: float, top_p: float, eos_token_ids, pad_token_id: int, tokenizer, mode: str,
             engine: str = "continuous", slots: int = 0) -> Rollouts:
    """Samples `samples` responses per prompt, `prompts_per_chunk` prompts per sampler call, with
    sampling engine `engine` (sampling.ENGINES) and, for the continuous one, `slots` decode slots
    per call (0: sampling.default_slots; with several processes, of the call's global batch:
    every process's prompts of the chunk, each process's slots taking only its own)."""
    prompts = np.asarray(prompt_inputs.input_ids).shape[0]
    count = jax.process_count()
    size = chunk_size(prompts * count, prompts_per_chunk, "rl.rollout_batch_size", count) // count
    chunks = prompts // size
    if chunks > 1:
        prompt_inputs, per_prompt = microbatch.regular_images(
            prompt_inputs, prompts, 1, image_token_id=config.image_token_id, merge_unit=config.vision.merge_unit)

    mesh = parallel.mesh_of(policy)
    sample_fn = _under_mesh(sampling.sample, mesh)

    def dispatch(c):
        inputs = prompt_inputs if chunks == 1 else microbatch.take_prompts(
            prompt_inputs, c * size, (c + 1) * size, 1, per_prompt, merge_unit=config.vision.merge_unit)
        inputs = to_device(config, inputs, mesh, what="rollout prompts")
        key = rng if chunks == 1 else jax.random.fold_in(rng, c)
        return sample_fn(
            config, policy, inputs, key, jnp.float32(temperature), jnp.float32(top_p), max_new_tokens=max_new_tokens,
            n=samples, greedy=False, top_k=0, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
            use_top_p=top_p < 1.0, engine_name=engine, slots=slots)

    parts = []
    pending = dispatch(0)
    for c in range(chunks):
        following = dispatch(c + 1) if c + 1 < chunks else None  # queued before the host work below
        tokens, lengths = multihost.local_rows(pending.tokens), multihost.local_rows(pending.lengths)
        texts, vision_mask, parsed = rollout.decode_responses(tokenizer, tokens, lengths, mode=mode)
        parts.append((tokens, lengths, multihost.local_rows(pending.finished), texts, vision_mask, parsed))
        pending = following
    tokens, lengths, finished, texts, vision_mask, parsed = zip(*parts)
    return Rollouts(np.concatenate(tokens), np.concatenate(lengths), np.concatenate(finished),
                    [t for chunk in texts for t in chunk], np.concatenate(vision_mask),
                    [p for chunk in parsed for p in chunk])


def score(config, policy, ref_params, seq, rng, *, rl: step.RLConfig, num_response: int) -> dict[str, np.ndarray]:
    """step.score over micro-batches of rl.micro_batch_size rows -> per-token statistics [N, M] (host)."""
    rows = np.asarray(seq.input_ids).shape[0]
    count = jax.process_count()
    size = rl.micro_batch_size or rows * count
    if count > 1:  # every micro-batch takes an equal share of whole groups from every process
        chunk_size(rows * count, size, "rl.micro_batch_size", rl.samples_per_prompt * count)
    else:
        microbatch.check_size(rows, size, rl.samples_per_prompt)
    size //= count
    mesh = parallel.mesh_of(policy)
    score_fn = _under_mesh(step.score, mesh)
    prompt_length = np.asarray(seq.input_ids).shape[1] - num_response
    if size == rows:
        stats = score_fn(config, policy, ref_params, to_device(config, seq, mesh, prompt_length, "scoring rows"),
                         rng, rl=rl, num_response=num_response)
        return {k: multihost.local_rows(v) for k, v in stats.items()}
    n = rl.samples_per_prompt
    seq, per_prompt = microbatch.regular_images(seq, rows // n, n, image_token_id=config.image_token_id,
                                                merge_unit=config.vision.merge_unit)
    split = microbatch.parts_per_group(size, n)  # micro-batches per group (a part of a group each)
    seq = microbatch.split_groups(seq, rows // n, n, per_prompt, split, merge_unit=config.vision.merge_unit)
    group = n // split
    parts = []
    for i, start in enumerate(range(0, rows // group, size // group)):
        micro = microbatch.take_prompts(seq, start, start + size // group, group, per_prompt,
                                        merge_unit=config.vision.merge_unit)
        micro = to_device(config, micro, mesh, prompt_length, "scoring micro-batch")
        parts.append(score_fn(config, policy, ref_params, micro, jax.random.fold_in(rng, i), rl=rl,
                              num_response=num_response))
    return {k: np.concatenate([multihost.local_rows(p[k]) for p in parts]) for k in parts[0]}


def to_device(config, inputs, mesh, prompt_length=None, what: str = "batch"):
    """Host ModelInputs of this process's rows -> what the jitted call takes: the same host
    arrays with one process, a global array of every process's rows with several."""
    if not multihost.multiprocess():
        return inputs
    inputs = multihost.offset_image_index(inputs, config.image_token_id, config.vision.merge_unit, prompt_length)
    return multihost.to_global(inputs, mesh, what=what)


def _under_mesh(fn, mesh):
    """`fn` called under `parallel.use_mesh(mesh)`, the mesh the policy is sharded on: traced
    there, the sampler's and scoring's activations split over it (None: `fn` as it is)."""
    def call(*args, **kwargs):
        with parallel.use_mesh(mesh):
            return fn(*args, **kwargs)

    return call
