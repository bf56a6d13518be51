"""The sampler's entry points: `generate` (processor-format batches) and `sample` (prepared
ModelInputs, what the trainer and the evaluator call), each running one of two engines:

    "continuous"  sampling.continuous: S decode slots refilled as rows end (the default)
    "static"      sampling.engine: every row decodes until the batch's last one ends

Both return the same SampleOutput, rows in (prompt, sample) order, and for the same rng the
same responses (every (prompt, sample) draws from its own keys).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax import parallel
from vlcal_jax.models import qwen3_vl
from vlcal_jax.models.config import ModelConfig
from vlcal_jax.sampling import continuous, engine
from vlcal_jax.sampling.engine import DEFAULT_LENGTH_BUCKETS, SampleOutput, bucket_length, compile_count, left_pad

log = logging.getLogger(__name__)

ENGINES = ("continuous", "static")


def default_slots(rows: int) -> int:
    """The slot count of `slots=0`: one per row of the call (prompts x n), the static engine's KV
    memory and schedule. Fewer slots than rows hold less KV cache but, within one call, take more
    steps (measured and simulated: ~0.7-0.95x the static engine's steps per call at S = rows / 4
    to rows / 2 on RL-like lengths), which pays where a step's cost falls with its rows and
    loses where it does not (memory-bound TPU decode, small models). What turns slots into
    speed is more rows per call than the static engine could hold in the same memory: fewer
    slots and more prompts per call (benchmarks/bench_rollout.py: ~3x at equal KV memory)."""
    return max(1, rows)


def sample(config: ModelConfig, params, inputs: qwen3_vl.ModelInputs, rng, temperature, top_p, *,
           max_new_tokens: int, n: int, greedy: bool, top_k: int, eos_token_ids: tuple[int, ...], pad_token_id: int,
           use_top_p: bool = True, engine_name: str = "continuous", slots: int = 0,
           segment_steps: int = continuous.DEFAULT_SEGMENT_STEPS) -> SampleOutput:
    """n responses per prompt of prepared `inputs` with engine `engine_name` (ENGINES); `slots`
    (continuous: 0 = `default_slots`). Arguments as `engine.generate_from_inputs`; call under
    `parallel.use_mesh(mesh)` to split the rows over a mesh."""
    kwargs = dict(max_new_tokens=max_new_tokens, n=n, greedy=greedy, top_k=top_k, eos_token_ids=eos_token_ids,
                  pad_token_id=pad_token_id, use_top_p=use_top_p)
    if engine_name == "static":
        return engine.generate_from_inputs(config, params, inputs, rng, temperature, top_p, **kwargs)
    if engine_name != "continuous":
        raise ValueError(f"engine={engine_name!r}; choose one of {ENGINES}")
    rows = inputs.input_ids.shape[0] * n
    return continuous.generate_continuous(config, params, inputs, rng, temperature, top_p,
                                          slots=slots or default_slots(rows), segment_steps=segment_steps, **kwargs)


def generate(config: ModelConfig, params, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, n: int = 1,
             rng=None, eos_token_ids=(), pad_token_id: int = 0, length_buckets=DEFAULT_LENGTH_BUCKETS,
             patch_bucket: int | None = None, mesh=None, engine: str = "continuous", slots: int = 0,
             segment_steps: int = continuous.DEFAULT_SEGMENT_STEPS) -> SampleOutput:
    """Samples `n` continuations of each processor-format prompt (see models.prepare_inputs).

    temperature == 0 is greedy. With `mesh`, prompt rows are split over ("data", "fsdp") (params
    sharded by parallel.shard_params). Prompts are left-padded to a length bucket and patches to a
    patch bucket, so repeated calls with the same buckets reuse the compiled programs. `engine`
    and `slots` as `sample`.
    """
    if max_new_tokens < 1 or n < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and n={n} must be >= 1")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; choose one of {ENGINES}")
    qwen3_vl.check_batch(config, input_ids, attention_mask, pixel_values, image_grid_thw)
    mask = np.ones_like(np.asarray(input_ids)) if attention_mask is None else attention_mask
    length = bucket_length(np.asarray(input_ids).shape[1], length_buckets) if length_buckets else None
    if length:
        input_ids, mask = left_pad(input_ids, mask, length, pad_token_id)
    inputs = qwen3_vl.prepare_inputs(config, input_ids, mask, pixel_values, image_grid_thw, patch_bucket=patch_bucket)
    if mesh is not None:
        inputs = shard_inputs(inputs, mesh)
    rng = jax.random.key(0) if rng is None else rng
    before = compile_count()
    with parallel.use_mesh(mesh if mesh is not None else parallel.mesh_of(params)):
        out = sample(config, params, inputs, rng, jnp.float32(temperature or 1.0), jnp.float32(top_p),
                     max_new_tokens=max_new_tokens, n=n, greedy=temperature == 0, top_k=int(top_k),
                     eos_token_ids=tuple(int(e) for e in eos_token_ids), pad_token_id=pad_token_id,
                     use_top_p=top_p < 1.0, engine_name=engine, slots=slots, segment_steps=segment_steps)
    if compile_count() > before:
        log.info("compiled generate (%s): batch=%d length=%d patches=%s n=%d max_new_tokens=%d (%d programs)", engine,
                 inputs.input_ids.shape[0], inputs.input_ids.shape[1],
                 None if inputs.vision is None else inputs.vision.pixel_values.shape[0], n, max_new_tokens,
                 compile_count())
    return out


def shard_inputs(inputs: qwen3_vl.ModelInputs, mesh) -> qwen3_vl.ModelInputs:
    """Places prompt rows over ("data", "fsdp") where they divide evenly (position_ids carry the
    batch on axis 1); vision rows are split over images the same way; the rest is replicated."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    size = mesh.shape["data"] * mesh.shape["fsdp"]

    def place(path, leaf):
        axis = 1 if parallel.path_str(path).endswith("position_ids") else 0
        spec = [None] * np.ndim(leaf)
        if np.ndim(leaf) and np.shape(leaf)[axis] % size == 0:
            spec[axis] = parallel.BATCH
        return jax.device_put(leaf, NamedSharding(mesh, P(*spec)))

    return jax.tree_util.tree_map_with_path(place, inputs)
