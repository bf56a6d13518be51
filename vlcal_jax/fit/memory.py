"""What is live on one chip while each program runs, and the largest sizes that fit in HBM.

A program's own arguments, outputs and temporaries are what XLA reports for it; the run's
other state stays resident in HBM beside it: the float32 masters, the optimizer state and
the reference model throughout, and the compute-dtype policy copy during rollouts and
scoring (training.loop.rl_iteration drops it before the update, whose donated state is aliased
into its outputs).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

from vlcal_jax.fit import programs
from vlcal_jax.fit.programs import Compiled, Setup, Sizes

log = logging.getLogger("vlcal_jax.fit")


@dataclasses.dataclass(frozen=True)
class Resident:
    """Bytes per chip of the state that lives across programs; `policy` is the compute-dtype copy
    of the masters that rollouts and scoring read (0 when the dtypes agree: they read the masters)."""

    params: int
    optimizer: int
    reference: int
    policy: int
    offload_reference: bool = False

    @classmethod
    def of(cls, setup: Setup) -> "Resident":
        return cls(programs.shard_bytes(setup.params), programs.shard_bytes((setup.state.step, setup.opt_state)),
                   programs.shard_bytes(setup.ref_params),
                   programs.shard_bytes(setup.policy) if setup.separate_policy else 0, setup.offload_reference)

    def policy_during(self, program: str) -> int:
        return 0 if program == "update" else self.policy  # dropped before the update

    def reference_during(self, program: str) -> int:
        """model.offload_reference keeps it in host memory except while scoring."""
        return self.reference if program == "score" or not self.offload_reference else 0

    def total(self, program: str) -> int:
        return self.params + self.optimizer + self.reference_during(program) + self.policy_during(program)

    def in_arguments(self, program: str) -> int:
        """The part of it that is the program's own arguments."""
        policy = self.policy or self.params
        return {"sampler": policy, "score": policy + self.reference, "update": self.params + self.optimizer}[program]


@dataclasses.dataclass(frozen=True)
class Live:
    """One program's bytes per chip, split as the report prints them."""

    program: str
    sizes: Sizes
    resident: Resident
    compiled: Compiled
    kv_cache: int = 0

    @property
    def other_io(self) -> int:
        """Inputs and outputs besides the resident state (batch, tokens, metrics); of a program XLA
        refused, the part known without it (the update's batch)."""
        c = self.compiled
        if not c.ok:
            return c.batch_bytes
        return c.argument_bytes + c.output_bytes - c.alias_bytes - self.resident.in_arguments(self.program)

    @property
    def total(self) -> float:
        resident = self.resident.total(self.program)
        if not self.compiled.ok:
            return resident + self.other_io + programs.refused_bytes(self.compiled.error)
        return resident + self.other_io + self.compiled.temp_bytes + self.compiled.code_bytes


def measure(setup: Setup, sizes: Sizes, program: str) -> Live:
    size = f"{sizes.rollout_batch} prompts" if program == "sampler" else f"{sizes.micro_batch} rows"
    log.info("compiling %s (%s)", program, size)
    compiled = programs.PROGRAMS[program](setup, sizes)
    kv = setup.kv_cache_bytes(sizes) if program == "sampler" else 0
    live = Live(program, sizes, Resident.of(setup), compiled, kv)
    log.info("%s: %s", program, f"{live.total / 2**30:.2f} GiB live per chip" if compiled.ok else compiled.error)
    return live


def fits(live: Live, hbm: int) -> bool:
    return live.compiled.ok and live.total <= hbm


def candidates(total: int, multiple: int, rows_per_unit: int, shards: int, below: int) -> list[int]:
    """Sizes < `below` that divide `total` and are multiples or divisors of `multiple`, largest
    first; those whose rows (size x `rows_per_unit`) split evenly over the `shards` batch devices,
    if any do."""
    sizes = [s for s in range(1, below) if total % s == 0 and (s % multiple == 0 or multiple % s == 0)]
    even = [s for s in sizes if s * rows_per_unit % shards == 0]
    return sorted(even or sizes, reverse=True)


def largest_fitting(start: int, start_bytes: float, options: list[int], measure_bytes: Callable[[int], float],
                    limit: int, compiles: int) -> int | None:
    """The largest of `options` (sizes below `start`, which does not fit) whose bytes fit in
    `limit`, in at most `compiles` measurements: halve until a size fits, predicting instead,
    once two sizes are measured, from the line through the two nearest the limit (bytes are
    close to linear in the size), and check each prediction by measuring it."""
    seen = {start: start_bytes}
    best, smallest_failing = None, start
    for _ in range(compiles):
        pool = [s for s in options if s < smallest_failing and (best is None or s > best)]
        if not pool:
            break
        guess = next((s for s in pool if s <= smallest_failing // 2), pool[-1])
        finite = sorted(s for s, b in seen.items() if b != float("inf"))
        # the bracket when one size fits, else the two smallest (all fail; nearest the limit)
        pair = [best, smallest_failing] if best is not None and smallest_failing in finite else finite[:2]
        if len(pair) == 2 and seen[pair[1]] > seen[pair[0]]:
            (s1, b1), (s2, b2) = ((s, seen[s]) for s in pair)
            predicted = s1 + (limit - b1) * (s2 - s1) / (b2 - b1)
            if best is not None and predicted < pool[-1]:
                break  # the line says nothing larger than `best` fits
            guess = next((s for s in pool if s <= predicted), pool[-1])
        seen[guess] = measure_bytes(guess)
        if seen[guess] <= limit:
            best = guess
        else:
            smallest_failing = guess
    return best
