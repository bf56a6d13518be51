"""TPU slices by their Cloud names (v4-8, v5e-16 ...): chip figures and compile-only devices.

`devices(name)` asks libtpu for the slice's devices without any TPU attached
(`jax.experimental.topologies.get_topology_desc`, as MaxText's train_compile.py does); programs
lowered onto a mesh of them compile for that slice on a CPU host.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip peak figures: bfloat16 FLOP/s, HBM bytes/s, HBM bytes; `ici_bandwidth`, the bytes/s
    one chip's share of a slice-wide all-reduce moves (Cloud TPU's all-reduce bandwidth per pod over
    its chips); `host_bandwidth`, the chip's PCIe link to its host, one direction."""

    name: str
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: int
    ici_bandwidth: float
    host_bandwidth: float


# Cloud TPU's system-architecture pages (docs.cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): peak
# bf16 compute, HBM, all-reduce bandwidth per pod / pod chips (v4 1.1 PB/s / 4096, v5e 51.2 TB/s /
# 256, v6e 102.4 TB/s / 256; v5p: half its 1200 GB/s bidirectional ICI, as v5e's and v6e's figures
# are of theirs). PCIe x16: v4 Gen3 (the TPU v4 paper), v6e Gen5 (its page); v5e and v5p are
# taken as Gen4, which their pages do not state.
CHIPS = {
    "v4": Chip("TPU v4", 275e12, 1.2e12, 32 * GIB, 1.1e15 / 4096, 15.75e9),
    "v5e": Chip("TPU v5e", 197e12, 0.82e12, 16 * GIB, 51.2e12 / 256, 31.5e9),
    "v5p": Chip("TPU v5p", 459e12, 2.76e12, 95 * GIB, 600e9, 31.5e9),
    "v6e": Chip("TPU v6e", 918e12, 1.64e12, 32 * GIB, 102.4e12 / 256, 63e9),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A slice: libtpu's topology name ("v4:2x2x1"), its chip config ("megacore": one device per
    chip for v4/v5p, whose two TensorCores then act as one) and chips per host."""

    name: str
    chip: Chip
    topology: str
    chip_config: str
    chips_per_host: tuple[int, int, int]

    @property
    def num_chips(self) -> int:
        dims = [int(d) for d in self.topology.split(":")[1].split("x")]
        total = 1
        for d in dims:
            total *= d
        return total

    @property
    def num_hosts(self) -> int:
        per_host = self.chips_per_host[0] * self.chips_per_host[1] * self.chips_per_host[2]
        return max(1, self.num_chips // per_host)


def _table() -> dict[str, Slice]:
    slices = {}
    cube = {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4"}
    for cores, shape in cube.items():  # v4 and v5p are named by TensorCores, two per chip
        slices[f"v4-{cores}"] = Slice(f"v4-{cores}", CHIPS["v4"], f"v4:{shape}", "megacore", (2, 2, 1))
        slices[f"v5p-{cores}"] = Slice(f"v5p-{cores}", CHIPS["v5p"], f"v5:{shape}", "megacore", (2, 2, 1))
    grid = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
    for chips, shape in grid.items():  # v5e and v6e are named by chips, one TensorCore each
        # the 8-chip slices are one VM of 8 chips; multi-host slices are VMs of 4 chips
        host = (1, 1, 1) if chips == 1 else (2, 4, 1) if chips == 8 else (2, 2, 1)
        for gen, prefix in (("v5e", "v5e"), ("v6e", "v6e")):
            slices[f"{gen}-{chips}"] = Slice(f"{gen}-{chips}", CHIPS[gen], f"{prefix}:{shape}", "default", host)
    return slices


SLICES = _table()


def get(name: str) -> Slice:
    if name not in SLICES:
        raise ValueError(f"unknown TPU topology {name!r}; known: {', '.join(SLICES)}")
    return SLICES[name]


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def devices(tpu: Slice) -> list:
    """The slice's devices, for compilation only (no TPU needed; libtpu must be installed)."""
    if not libtpu_available():
        raise SystemExit("vlcal_jax.fit compiles for TPU with libtpu, which is not installed: "
                         'pip install -e ".[fit]"')
    # without these, libtpu looks for the TPU VM it is not on and logs errors about it; compile-only:
    # no chip is opened, so the one-process-per-TPU-VM lock need not be held. They are set only
    # while libtpu reads them: left in the environment, TPU_WORKER_HOSTNAMES would make a later
    # parallel.initialize() in this process take it for a TPU pod worker
    quiet = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": tpu.name, "TPU_WORKER_HOSTNAMES": "localhost",
             "TPU_WORKER_ID": "0", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    added = [name for name in quiet if name not in os.environ]
    os.environ.update({name: quiet[name] for name in added})
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(topology_name=tpu.topology, platform="tpu",
                                            chip_config_name=tpu.chip_config, chips_per_host_bounds=tpu.chips_per_host,
                                            num_slices=1)
    finally:
        for name in added:
            os.environ.pop(name, None)
    found = list(desc.devices)
    if len(found) != tpu.num_chips:
        raise RuntimeError(f"libtpu gave {len(found)} devices for {tpu.name} ({tpu.topology}), expected "
                           f"{tpu.num_chips}")
    return found
