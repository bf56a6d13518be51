"""The tables `python -m vlcal_jax.fit` prints: memory per chip per program, then time per step."""

from __future__ import annotations

import jax.numpy as jnp

from vlcal_jax.fit import costs, programs
from vlcal_jax.fit.memory import Live
from vlcal_jax.fit.programs import Setup, Sizes
from vlcal_jax.fit.topology import GIB, Slice

PROGRAMS = ("sampler", "score", "update")


def _gib(value: float) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def header(tpu: Slice, setup: Setup, source: str, param_dtype: str, sizes: Sizes) -> str:
    c, mesh = setup.config, setup.mesh
    count = programs.total_bytes(setup.params) / jnp.dtype(param_dtype).itemsize
    lines = [
        f"{tpu.name}: {tpu.num_chips} x {tpu.chip.name} ({tpu.num_hosts} host{'s' * (tpu.num_hosts > 1)}), "
        f"{tpu.chip.hbm_bytes / GIB:.0f} GiB HBM, {tpu.chip.peak_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{tpu.chip.hbm_bandwidth / 1e12:.2f} TB/s per chip",
        f"model: {source}, {count / 1e9:.2f}B parameters in {param_dtype}, compute {c.dtype}, "
        f"remat {'on' if c.remat else 'off'}; mesh {dict(mesh.shape)}; sampler and score inputs "
        f"{'split over the batch axes' if setup.shard_inputs else 'host arrays (laid out by XLA)'}",
        f"step: {sizes.prompts} prompts x {sizes.samples} samples = {sizes.rows} responses of {sizes.prompt_len} prompt"
        f" + {sizes.response_len} response tokens, {sizes.images_per_prompt} image(s) of {sizes.patches} patches"
        f" per prompt",
        f"sizes: rl.rollout_batch_size={sizes.rollout_batch} ({sizes.rollout_chunks} generate calls, {sizes.engine} "
        f"engine{f', {sizes.slots} decode slots' if sizes.engine == 'continuous' else ''}), "
        f"rl.micro_batch_size={sizes.micro_batch} ({sizes.micro_batches} micro-batches)",
    ]
    return "\n".join(lines)


def memory_table(live: dict[str, Live], hbm: int) -> str:
    """GiB per chip, one column per program; a program XLA refused shows its message."""
    rows = [("master parameters", lambda x: x.resident.params), ("optimizer state", lambda x: x.resident.optimizer),
            ("reference model", lambda x: x.resident.reference_during(x.program)),
            ("policy in compute dtype", lambda x: x.resident.policy_during(x.program)),
            ("batch, inputs, outputs", lambda x: x.other_io if x.compiled.ok or x.other_io else None),
            ("temporaries", lambda x: x.compiled.temp_bytes if x.compiled.ok else None),
            ("  of which KV cache", lambda x: x.kv_cache if x.program == "sampler" else None),
            ("program code", lambda x: x.compiled.code_bytes if x.compiled.ok else None),
            ("total live", lambda x: x.total)]
    names = [p for p in PROGRAMS if p in live]
    out = [f"{'memory per chip (GiB)':<26}" + "".join(f"{n:>10}" for n in names)]
    for label, get in rows:
        out.append(f"{label:<26}" + "".join(f"{_gib(get(live[n])):>10}" for n in names))
    out.append(f"{'HBM':<26}" + "".join(f"{_gib(hbm):>10}" for _ in names))
    out.append(f"{'fits':<26}" + "".join(f"{('yes' if live[n].compiled.ok and live[n].total <= hbm else 'NO'):>10}"
                                       for n in names))
    for n in names:
        if not live[n].compiled.ok:
            out.append(f"{n}: XLA refused it: {live[n].compiled.error}")
    return "\n".join(out)


def step_costs(setup: Setup, sizes: Sizes, tpu: Slice) -> dict[str, tuple[int, costs.Cost]]:
    """program -> (calls per RL step, Cost of one call)."""
    c, chip, chips = setup.config, tpu.chip, tpu.num_chips
    weights = programs.total_bytes(setup.ref_params)
    text_weights = programs.total_bytes({k: v for k, v in setup.ref_params.items() if k != "visual"})
    images = sizes.images_per_prompt
    sampler = costs.sampler(c, chip, chips, prompts=sizes.rollout_batch, samples=sizes.samples,
                            prompt_len=sizes.prompt_len, new_tokens=sizes.response_len,
                            images=sizes.rollout_batch * images, patches=sizes.patches, weight_bytes=weights,
                            text_weight_bytes=text_weights,
                            kv_bytes_per_chip=setup.kv_cache_bytes(sizes, decoded_only=True), decode_rows=sizes.slots)
    micro_images = sizes.images(sizes.micro_batch)
    length = sizes.prompt_len + sizes.response_len
    score = costs.score(c, chip, chips, rows=sizes.micro_batch, samples=sizes.samples, length=length,
                        response_len=sizes.response_len, images=micro_images, patches=sizes.patches,
                        vce_k=setup.rl.vce_k, weight_bytes=weights)
    shards = setup.batch_shards
    per_chip = lambda count: -(-count // shards)  # noqa: E731
    host = costs.offload_bytes(c, rows_per_chip=per_chip(sizes.micro_batch), length=length,
                               images_per_chip=per_chip(micro_images), patches=sizes.patches)
    if setup.rl.offload_pixels and sizes.micro_batches > 1:  # the micro-batch's pixels come in from host memory
        host += per_chip(micro_images) * sizes.patches * c.vision.patch_dim * c.compute_dtype.itemsize
    ici = costs.fsdp_bytes(weights, programs.total_bytes(setup.params), setup.mesh.shape["fsdp"])
    update = costs.update(c, chip, chips, rows=sizes.micro_batch, micro_batches=sizes.micro_batches, length=length,
                          response_len=sizes.response_len, images=micro_images, patches=sizes.patches,
                          weight_bytes=weights, optimizer_bytes=7 * programs.shard_bytes(setup.params),
                          ici_bytes=ici, host_bytes=host)
    return {"sampler": (sizes.rollout_chunks, sampler), "score": (sizes.micro_batches, score), "update": (1, update)}


def memory_record(live: dict[str, Live]) -> dict:
    """The memory table as bytes per chip: program -> row -> bytes (None where not known)."""
    return {name: {"parameters": x.resident.params, "optimizer_state": x.resident.optimizer,
                   "reference_model": x.resident.reference_during(x.program),
                   "policy_copy": x.resident.policy_during(x.program),
                   "other_io": x.other_io if x.compiled.ok or x.other_io else None,
                   "temporaries": x.compiled.temp_bytes if x.compiled.ok else None, "kv_cache": x.kv_cache,
                   "code": x.compiled.code_bytes if x.compiled.ok else None, "total": x.total,
                   "refused": x.compiled.error or None} for name, x in live.items()}


def time_record(setup: Setup, sizes: Sizes, tpu: Slice) -> dict:
    """The time table: program -> calls per step, FLOPs and seconds per call, MFU; and the step."""
    chip, chips = tpu.chip, tpu.num_chips
    out, flops, seconds = {}, 0.0, 0.0
    for name, (calls, cost) in step_costs(setup, sizes, tpu).items():
        out[name] = {"calls": calls, "model_flops": cost.model_flops, "hardware_flops": cost.hardware_flops,
                     "bytes_per_chip": cost.bytes_per_chip, "ici_bytes_per_chip": cost.ici_bytes_per_chip,
                     "host_bytes_per_chip": cost.host_bytes_per_chip, "bound": cost.bound, "seconds": cost.time,
                     "mfu": cost.mfu(chip, chips)}
        flops += calls * cost.model_flops
        seconds += calls * cost.time
    out["step"] = {"model_flops": flops, "seconds": seconds,
                   "mfu": flops / (seconds * chip.peak_flops * chips) if seconds else 0.0}
    return out


def time_table(setup: Setup, sizes: Sizes, tpu: Slice) -> str:
    record = time_record(setup, sizes, tpu)
    labels = {"sampler": f"sampler ({sizes.rollout_batch} prompts)", "score": f"score ({sizes.micro_batch} rows)",
              "update": f"update ({sizes.micro_batches} x {sizes.micro_batch} rows)"}
    out = [f"{'roofline: time >=, MFU <=':<32}{'calls':>7}{'PFLOP/call':>12}{'s/call':>10}{'s/step':>10}"
           f"{'MFU':>7}  bound"]
    for name in PROGRAMS:
        r = record[name]
        out.append(f"{labels[name]:<32}{r['calls']:>7}{r['model_flops'] / 1e15:>12.2f}{r['seconds']:>10.2f}"
                   f"{r['calls'] * r['seconds']:>10.1f}{r['mfu']:>7.2f}  {r['bound']}")
    r = record["step"]
    out.append(f"{'RL step':<32}{'':>7}{r['model_flops'] / 1e15:>12.2f}{'':>10}{r['seconds']:>10.1f}{r['mfu']:>7.2f}")
    return "\n".join(out)
