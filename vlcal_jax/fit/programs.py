"""The RL step's device programs, lowered from abstract arrays and compiled for a mesh.

Nothing is allocated: parameters, optimizer state and batches are `jax.ShapeDtypeStruct`s with
the shardings the run gives them (parameters by `parallel.param_shardings`, optimizer moments
like their parameters, the update's rows over ("data", "fsdp") by `rl.step.batch_shardings`;
the sampler's and scoring's inputs are host arrays in the run, so XLA lays them out here too),
and each program is the function the run calls with the static arguments it passes:
    sampler  the sampler on one rollout chunk (rl_iteration's call): the static engine's one
             program (sampling.generate_from_inputs), or the continuous engine's prefill and
             decode segment (sampling.continuous), reported as the one with more live bytes
    score    rl.step.score on one micro-batch of responses
    update   the train step make_train_step compiles, over the whole batch in micro-batches
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vlcal_jax import models, parallel, sampling
from vlcal_jax.models import vision
from vlcal_jax.models.config import ModelConfig
from vlcal_jax.rl import step
from vlcal_jax.sampling import continuous


@dataclasses.dataclass(frozen=True)
class Sizes:
    """One RL step's shapes: `prompts` x `samples` responses of `response_len` tokens after
    prompts padded to `prompt_len`; `images_per_prompt` images of `patches` patches each;
    generate runs on `rollout_batch` prompts at a time with sampling engine `engine`
    (rl.rollout_engine; continuous: `decode_slots` slots, 0 = sampling.default_slots), score and
    update on `micro_batch` rows."""

    prompts: int
    samples: int
    prompt_len: int
    response_len: int
    images_per_prompt: int
    patches: int
    rollout_batch: int
    micro_batch: int
    engine: str = "static"
    decode_slots: int = 0

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    @property
    def slots(self) -> int:
        """Decode rows of one sampler call: the continuous engine's slots, the static engine's rows."""
        if self.engine == "static":
            return self.rollout_batch * self.samples
        return self.decode_slots or sampling.default_slots(self.rollout_batch * self.samples)

    @property
    def rollout_chunks(self) -> int:
        return self.prompts // self.rollout_batch

    @property
    def micro_batches(self) -> int:
        return self.rows // self.micro_batch

    def check(self) -> None:
        if self.prompts % self.rollout_batch:
            raise ValueError(f"rl.rollout_batch_size={self.rollout_batch} must divide rl.prompts_per_step="
                             f"{self.prompts}")
        if (self.micro_batch % self.samples and self.samples % self.micro_batch) or self.rows % self.micro_batch:
            raise ValueError(f"rl.micro_batch_size={self.micro_batch} must be a multiple or a divisor of "
                             f"rl.samples_per_prompt={self.samples} that divides the {self.rows} responses of a step")

    def images(self, rows: int) -> int:
        """Images of a batch of `rows` response rows: a part of a GRPO group carries its prompt's."""
        return max(rows // self.samples, 1) * self.images_per_prompt


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What XLA reports for one compiled program (bytes per chip), or why it refused it;
    `batch_bytes`: this chip's share of the batch argument where its sharding is fixed (the
    update's), known even when XLA refuses the program."""

    name: str
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    error: str = ""
    batch_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def live_bytes(self) -> int:
        """Arguments, outputs (less what is donated into them), temporaries and code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def shard_bytes(tree) -> int:
    """Bytes one device holds in HBM of a tree of sharded ShapeDtypeStructs (the largest shard;
    leaves placed in host memory count nothing)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if getattr(leaf.sharding, "memory_kind", None) in ("pinned_host", "unpinned_host"):
            continue
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def total_bytes(tree) -> int:
    return sum(int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _sharded(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _struct(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype))


class Setup:
    """The run's state as abstract sharded arrays on `mesh`: master params and optimizer state
    (`param_dtype`), and in the compute dtype the frozen reference model and the policy copy that
    rollouts and scoring read (training.loop.rl_iteration's model_setup.compute_params; the masters
    themselves when the dtypes agree)."""

    def __init__(self, config: ModelConfig, rl: step.RLConfig, mesh, param_dtype, *, eos_token_ids, pad_token_id,
                 shard_inputs: bool = False, offload_reference: bool = False):
        self.config, self.rl, self.mesh, self.shard_inputs = config, rl, mesh, shard_inputs
        self.offload_reference = offload_reference  # model.offload_reference: in HBM only while scoring
        self.eos_token_ids, self.pad_token_id = tuple(eos_token_ids), int(pad_token_id)
        abstract = jax.eval_shape(functools.partial(models.init_params, config, dtype=jnp.dtype(param_dtype)),
                                  jax.random.key(0))
        self.param_shardings = parallel.param_shardings(abstract, mesh)
        self.params = _sharded(abstract, self.param_shardings)
        compute = jax.tree.map(lambda x: _struct(x.shape, config.compute_dtype), abstract)
        self.ref_params = _sharded(compute, self.param_shardings)
        self.separate_policy = jnp.dtype(param_dtype) != config.compute_dtype
        self.policy = self.ref_params if self.separate_policy else self.params
        self.optimizer = step.make_optimizer(rl)
        self.replicated = parallel.replicated(mesh)
        opt_abstract = jax.eval_shape(self.optimizer.init, abstract)
        # as step.init_state places it: moments like their params, scalars replicated
        opt_shardings = optax.tree_map_params(self.optimizer, lambda _, sh: sh, opt_abstract, self.param_shardings,
                                              transform_non_params=lambda _: self.replicated)
        self.opt_state = _sharded(opt_abstract, opt_shardings)
        self.state = step.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated), self.params,
                                     self.opt_state)
        key = jax.eval_shape(lambda: jax.random.key(0))
        self.rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=self.replicated)

    @property
    def batch_shards(self) -> int:
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def inputs(self, rows: int, length: int, images: int, patches: int) -> models.ModelInputs:
        """ModelInputs of `rows` x `length` tokens and `images` padded images (see its docstring
        and vision.VisionInputs for the layout), without shardings."""
        vis = None
        if images:
            dim = self.config.vision.patch_dim
            vis = vision.VisionInputs(_struct((images, patches, dim), jnp.float32),
                                      _struct((images, patches, 2), jnp.int32),
                                      _struct((images, patches, 4), jnp.int32),
                                      _struct((images, patches, 4), jnp.float32),
                                      _struct((images, patches), jnp.bool_))
        tokens = _struct((rows, length), jnp.int32)
        return models.ModelInputs(tokens, tokens, _struct((3, rows, length), jnp.int32), _struct((rows,), jnp.int32),
                                  tokens, vis)

    def program_inputs(self, rows: int, length: int, images: int, patches: int) -> models.ModelInputs:
        """`inputs` for the sampler and scoring: as the run passes them, host arrays whose layout
        XLA chooses; with `shard_inputs`, rows over the batch axes (sampling.shard_inputs' layout)."""
        inputs = self.inputs(rows, length, images, patches)
        return _sharded(inputs, step.batch_shardings(inputs, self.mesh)) if self.shard_inputs else inputs

    def kv_cache_bytes(self, sizes: Sizes, decoded_only: bool = False) -> int:
        """This chip's KV cache in one sampler call, keys and values in the compute dtype, rows
        (padded to a multiple of the batch shards, as the engines pad them) over the batch axes and
        KV heads over "tensor" where they divide: the static engine's [L, rows, KV, Tp + M, hd];
        the continuous engine's slots [L, S, KV, Tp + M, hd] and, unless `decoded_only` (what a
        decode step reads), the prompts' prefilled [L, B, KV, Tp, hd]."""
        t = self.config.text
        tensor = self.mesh.shape["tensor"]
        heads = t.num_key_value_heads // tensor if t.num_key_value_heads % tensor == 0 else t.num_key_value_heads
        per_chip = lambda count: -(-count // self.batch_shards)  # noqa: E731
        tokens = per_chip(sizes.slots) * (sizes.prompt_len + sizes.response_len)
        if sizes.engine == "continuous" and not decoded_only:
            tokens += per_chip(sizes.rollout_batch) * sizes.prompt_len
        return 2 * t.num_hidden_layers * tokens * heads * t.head_dim * self.config.compute_dtype.itemsize


def _compile(name: str, mesh, lowered_fn, batch_bytes: int = 0) -> Compiled:
    """Lowers (under `mesh`, as the run traces it: the activation constraints apply) and
    compiles; XLA's refusal to fit a program in HBM comes back as `error`."""
    try:
        with parallel.use_mesh(mesh):
            lowered = lowered_fn()
        memory = lowered.compile().memory_analysis()
    except Exception as e:  # XlaRuntimeError (RESOURCE_EXHAUSTED ...) is not importable by a stable name
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text:
            raise
        return Compiled(name, error=text.strip().splitlines()[0][:400], batch_bytes=batch_bytes)
    return Compiled(name, memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
                    memory.temp_size_in_bytes, memory.generated_code_size_in_bytes, batch_bytes=batch_bytes)


def refused_bytes(error: str) -> float:
    """The size XLA says the program needed, from a RESOURCE_EXHAUSTED message ('... (43.74G)
    exceeds available HBM ...'), in bytes; inf when the message gives none."""
    found = re.findall(r"\(([\d.]+)([KMGT])\)", error)
    if not found:
        return float("inf")
    value, unit = found[0]
    return float(value) * 1024 ** "KMGT".index(unit) * 1024


def sampler(setup: Setup, sizes: Sizes) -> Compiled:
    prompts = sizes.rollout_batch
    inputs = setup.program_inputs(prompts, sizes.prompt_len, prompts * sizes.images_per_prompt, sizes.patches)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=setup.replicated)
    static = dict(max_new_tokens=sizes.response_len, n=sizes.samples, greedy=False, top_k=0,
                  eos_token_ids=setup.eos_token_ids, pad_token_id=setup.pad_token_id, use_top_p=False)
    if sizes.engine == "static":
        return _compile("sampler", setup.mesh, lambda: sampling.generate_from_inputs.lower(
            setup.config, setup.policy, inputs, setup.rng, scalar, scalar, **static))
    lowered = {}

    def prefill():
        lowered["prefill"] = continuous.prefill.lower(setup.config, setup.policy, inputs, setup.rng, scalar, scalar,
                                                      slots=sizes.slots, **static)
        return lowered["prefill"]

    first = _compile("sampler (prefill)", setup.mesh, prefill)
    if not first.ok:
        return first
    # the segment's arguments: what prefill returns, laid out as XLA placed them
    compiled = lowered["prefill"].compile()
    state = jax.tree.map(lambda info, sharding: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding),
                         lowered["prefill"].out_info, compiled.output_shardings)
    bound = continuous.schedule_steps(prompts, sizes.slots, sizes.samples, sizes.response_len, setup.batch_shards)
    second = _compile("sampler (decode segment)", setup.mesh, lambda: continuous.segment.lower(
        setup.config, setup.policy, *state, scalar, scalar,
        steps=min(continuous.DEFAULT_SEGMENT_STEPS, bound), real_rows=prompts * sizes.samples, **static))
    return second if not second.ok or second.live_bytes >= first.live_bytes else first


def _response_inputs(setup: Setup, sizes: Sizes, rows: int) -> models.ModelInputs:
    images = sizes.images(rows)
    return setup.program_inputs(rows, sizes.prompt_len + sizes.response_len, images, sizes.patches)


def score(setup: Setup, sizes: Sizes) -> Compiled:
    inputs = _response_inputs(setup, sizes, sizes.micro_batch)
    return _compile("score", setup.mesh, lambda: step.score.lower(
        setup.config, setup.policy, setup.ref_params, inputs, setup.rng, rl=setup.rl, num_response=sizes.response_len))


def update_batch(setup: Setup, sizes: Sizes) -> step.RLBatch:
    """The step's RLBatch (fields as in its docstring): flat [N, ...] for the one-pass update, or
    as rl.microbatch.split lays it out for micro-batches, [K, N / K, ...] (position_ids
    [K, 3, N / K, T], each micro-batch's images with it), with make_train_step's shardings."""
    k, rows = sizes.micro_batches, sizes.micro_batch
    flat = k == 1
    lead = () if flat else (k,)
    images = sizes.images(rows)
    inputs = setup.inputs(rows, sizes.prompt_len + sizes.response_len, images, sizes.patches)
    inputs = jax.tree.map(lambda x: _struct(lead + x.shape, x.dtype), inputs)  # sharded below, as the step does
    if not flat and inputs.vision is not None:  # MicroBatchedStep.split ships pixels in the compute dtype
        vis = inputs.vision
        inputs = inputs._replace(vision=vis._replace(pixel_values=_struct(vis.pixel_values.shape,
                                                                          setup.config.compute_dtype)))
    per_token = _struct(lead + (rows, sizes.response_len), jnp.float32)
    batch = step.RLBatch(inputs, per_token, per_token, _struct(lead + (rows,), jnp.float32), per_token, per_token,
                         per_token, per_token, per_token, per_token)
    return _sharded(batch, step.batch_shardings(batch, setup.mesh, micro=not flat,
                                                host_pixels=not flat and setup.rl.offload_pixels))


def update(setup: Setup, sizes: Sizes) -> Compiled:
    """The train step make_train_step builds: with rl.micro_batch_size, its micro-batched jit
    (MicroBatchedStep.jitted); for the whole batch in one pass, the same jit as its closure
    (state donated, state shardings in = out, batch rows over the batch axes, metrics replicated)."""
    batch = update_batch(setup, sizes)
    if sizes.micro_batches > 1:
        rl = dataclasses.replace(setup.rl, micro_batch_size=sizes.micro_batch)
        jitted = step.make_train_step(setup.config, rl, setup.optimizer, setup.mesh).jitted(setup.state, batch)
    else:
        state_shardings = jax.tree.map(lambda x: x.sharding, setup.state)
        rl = dataclasses.replace(setup.rl, micro_batch_size=0)
        jitted = jax.jit(functools.partial(step._step, setup.config, rl, setup.optimizer), donate_argnums=0,
                         in_shardings=(state_shardings, jax.tree.map(lambda x: x.sharding, batch), setup.replicated),
                         out_shardings=(state_shardings, setup.replicated))
    return _compile("update", setup.mesh, lambda: jitted.lower(setup.state, batch, setup.rng), shard_bytes(batch))


PROGRAMS = {"sampler": sampler, "score": score, "update": update}
