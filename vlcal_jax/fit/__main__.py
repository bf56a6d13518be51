"""Does a run config fit a TPU slice? Compiles its programs for the slice on any CPU host.

    python -m vlcal_jax.fit --config experiments/tpu_v4.py --topology v4-8 \
        --config.model.path=Qwen/Qwen3-VL-4B-Instruct [--config.rl.micro_batch_size=16 ...]

`--config` and its overrides are the training CLI's. `--topology` takes one or more slices
(v4-8,v5e-16 ...; see vlcal_jax.fit.topology.SLICES). For each, the sampler (one rollout
chunk), scoring (one micro-batch) and the update are compiled ahead of time for the slice's
devices with the run's shapes and shardings (libtpu, no TPU and no weights needed), and it
prints what is live per chip during each program against HBM, then a roofline time per
program and per RL step with its MFU. Exit status 1 when something does not fit; the message
names the largest rl.micro_batch_size and rl.rollout_batch_size found to fit (a few more
compiles per program, --search_compiles; refusals come back in seconds, fits in minutes).
`--programs=update` (or any subset) compiles and reports only those programs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

# Compile-only: a TPU on this host (a TPU VM) is left to whatever runs on it; the slice's devices
# come from libtpu's topology description, not from the attached chips.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags

from vlcal_jax import parallel, train
from vlcal_jax.fit import memory, plan, programs, report, topology
from vlcal_jax.training import logs, loop

log = logging.getLogger("vlcal_jax.fit")

_TOPOLOGY = flags.DEFINE_list("topology", None, "TPU slices to compile for, e.g. v4-8 or v4-8,v5e-16")
_JSON = flags.DEFINE_string("json", "", "also write the tables to this file (bytes per chip, FLOPs, seconds)")
_SHARD_INPUTS = flags.DEFINE_bool("shard_inputs", False, "compile the sampler and scoring with their inputs' rows "
                                  "split over the batch axes (the run passes host arrays, laid out by XLA)")
_PROGRAMS = flags.DEFINE_list("programs", list(report.PROGRAMS), "the programs to compile (sampler, score, update); "
                               "a subset reports only those, e.g. --programs=update while sizing the update")
_COMPILES = flags.DEFINE_integer("search_compiles", 3, "when a size does not fit: compiles spent per program on "
                                                       "finding the largest one that does")


def _search(setup: programs.Setup, sizes: programs.Sizes, live: dict, hbm: int, compiles: int):
    """-> (rollout chunk that fits or None, micro-batch that fits or None, the Live of each
    program at those sizes, or at the smallest size tried where none fits)."""
    shards, best = setup.batch_shards, dict(live)
    chunk, rows = sizes.rollout_batch, sizes.micro_batch
    if not memory.fits(live["sampler"], hbm):
        seen = {}

        def sampler_bytes(prompts):
            seen[prompts] = memory.measure(setup, dataclasses.replace(sizes, rollout_batch=prompts), "sampler")
            return seen[prompts].total

        options = memory.candidates(sizes.prompts, 1, 1, shards, sizes.rollout_batch)
        chunk = memory.largest_fitting(sizes.rollout_batch, live["sampler"].total, options, sampler_bytes, hbm,
                                       compiles)
        if seen:
            best["sampler"] = seen[chunk if chunk is not None else min(seen, key=lambda s: seen[s].total)]
    if not (memory.fits(live["score"], hbm) and memory.fits(live["update"], hbm)):
        seen = {}

        def micro_bytes(size):
            trial = dataclasses.replace(sizes, micro_batch=size)
            seen[size] = {"score": memory.measure(setup, trial, "score")}
            if seen[size]["score"].total > hbm:
                return seen[size]["score"].total
            seen[size]["update"] = memory.measure(setup, trial, "update")
            return max(x.total for x in seen[size].values())

        options = memory.candidates(sizes.rows, sizes.samples, 1, shards, sizes.micro_batch)
        start = max(live["score"].total, live["update"].total)
        rows = memory.largest_fitting(sizes.micro_batch, start, options, micro_bytes, hbm, compiles)
        if seen:
            shown = rows if rows is not None else min(seen, key=lambda s: max(x.total for x in seen[s].values()))
            if "update" not in seen[shown]:  # skipped when scoring alone did not fit; shown all the same
                seen[shown]["update"] = memory.measure(setup, dataclasses.replace(sizes, micro_batch=shown), "update")
            best.update(seen[shown])
    return chunk, rows, best


def fit(config, name: str, compiles: int) -> dict:
    """Prints the tables for one slice; returns them as a record ("fits": whether the config fits)."""
    tpu = topology.get(name)
    mesh = parallel.make_mesh(**config.mesh, devices=topology.devices(tpu))
    model = plan.model(config)
    sizes = plan.sizes(config, model.config)
    plan.check_hosts(sizes, tpu.num_hosts)
    setup = programs.Setup(model.config, loop.rl_config(config, model.config.image_processor), mesh,
                           config.model.param_dtype, eos_token_ids=model.eos_token_ids,
                           pad_token_id=model.pad_token_id, shard_inputs=_SHARD_INPUTS.value,
                           offload_reference=config.model.offload_reference)
    hbm, gib = tpu.chip.hbm_bytes, topology.GIB
    chosen = [p for p in report.PROGRAMS if p in _PROGRAMS.value]
    unknown = sorted(set(_PROGRAMS.value) - set(report.PROGRAMS))
    if unknown or not chosen:
        raise app.UsageError(f"--programs={','.join(_PROGRAMS.value)}: expected some of {', '.join(report.PROGRAMS)}")
    live = {p: memory.measure(setup, sizes, p) for p in chosen}
    record = {"topology": tpu.name, "chips": tpu.num_chips, "hbm_bytes": hbm, "model": model.source,
              "shard_inputs": setup.shard_inputs, "programs": chosen,
              "param_dtype": config.model.param_dtype, "compute_dtype": model.config.dtype,
              "mesh": dict(mesh.shape), "sizes": dataclasses.asdict(sizes), "memory": report.memory_record(live),
              "time": report.time_record(setup, sizes, tpu), "fits": False, "fitting_sizes": None}
    print(report.header(tpu, setup, model.source, config.model.param_dtype, sizes))
    print(report.memory_table(live, hbm))
    print(report.time_table(setup, sizes, tpu))
    only = "" if len(chosen) == len(report.PROGRAMS) else f" ({', '.join(chosen)} only)"
    if all(memory.fits(x, hbm) for x in live.values()):
        print(f"fits {tpu.name}{only}: peak {max(x.total for x in live.values()) / gib:.2f} of {hbm / gib:.0f} GiB "
              "per chip\n", flush=True)
        record["fits"] = True
        return record
    if only:
        print(f"DOES NOT FIT {tpu.name}{only}; the search for sizes that fit compiles every program (drop "
              "--programs)\n", flush=True)
        return record
    resident = max(memory.Resident.of(setup).total(p) for p in report.PROGRAMS)
    if resident > hbm:
        print(f"DOES NOT FIT {tpu.name}: parameters, optimizer state, reference model and policy copy alone take "
              f"{resident / gib:.2f} of {hbm / gib:.0f} GiB per chip; no batch size fits. Use a slice with "
              "more chips (the state is split over mesh.fsdp).\n", flush=True)
        return record
    chunk, rows, best = _search(setup, sizes, live, hbm, compiles)
    tried = dataclasses.replace(sizes, rollout_batch=best["sampler"].sizes.rollout_batch,
                                micro_batch=best["score"].sizes.micro_batch)
    if chunk and rows or tried != sizes:
        print(f"\n{'largest sizes found that fit' if chunk and rows else 'best sizes tried'} ({tpu.name}):")
        print(report.header(tpu, setup, model.source, config.model.param_dtype, tried).splitlines()[-1])
        print(report.memory_table(best, hbm))
    if chunk and rows:
        found = dataclasses.replace(sizes, rollout_batch=chunk, micro_batch=rows)
        record["fitting_sizes"] = {"sizes": dataclasses.asdict(found), "memory": report.memory_record(best),
                                   "time": report.time_record(setup, found, tpu)}
        print(report.time_table(setup, found, tpu))
        print(f"DOES NOT FIT {tpu.name} as configured; these fit: --config.rl.micro_batch_size={rows} "
              f"--config.rl.rollout_batch_size={chunk}\n", flush=True)
        return record
    parts = [f"no rl.{flag} tried fits (best: {size})" for flag, size, ok in (
        ("rollout_batch_size", tried.rollout_batch, chunk), ("micro_batch_size", tried.micro_batch, rows)) if not ok]
    print(f"DOES NOT FIT {tpu.name}: {'; '.join(parts)} ({compiles} compiles per program searched)\n", flush=True)
    return record


def main(argv):
    del argv
    config = train._CONFIG.value
    if config is None or not _TOPOLOGY.value:
        raise app.UsageError("--config and --topology are required, e.g. --config experiments/tpu_v4.py "
                             "--topology v4-8")
    logs.setup_logging()
    records = []
    for name in _TOPOLOGY.value:
        try:
            records.append(fit(config, name, _COMPILES.value))
        except ValueError as e:  # a size the run itself would refuse on this slice (plan.check_hosts)
            print(f"CANNOT RUN on {name}: {e}\n", flush=True)
            records.append({"topology": name, "fits": False, "error": str(e)})
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=2)
    if not all(r["fits"] for r in records):
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
