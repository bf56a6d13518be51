"""Multi-host start-up: `jax.distributed.initialize` from flags, the environment or a TPU pod."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str | None = None,
               heartbeat_timeout_s: int | None = None, initialization_timeout_s: int | None = None) -> None:
    """Joins the job's processes. On a TPU pod all arguments are discovered automatically;
    on CPU/GPU clusters pass them (or set VLCAL_COORDINATOR, VLCAL_NUM_PROCESSES, VLCAL_PROCESS_ID).
    A single process with nothing configured (or already joined) is left alone.

    A process that dies (or hangs) stops sending heartbeats; after `heartbeat_timeout_s`
    (VLCAL_HEARTBEAT_TIMEOUT_S, default 100) the coordination service ends every other process
    with an error naming the lost task, instead of leaving them blocked in a collective.
    `initialization_timeout_s` (VLCAL_INIT_TIMEOUT_S, default 300) bounds the wait for all
    processes to join."""
    coordinator_address = coordinator_address or os.environ.get("VLCAL_COORDINATOR")
    if num_processes is None and "VLCAL_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["VLCAL_NUM_PROCESSES"])
    if process_id is None and "VLCAL_PROCESS_ID" in os.environ:
        process_id = int(os.environ["VLCAL_PROCESS_ID"])
    on_tpu_pod = "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
    if coordinator_address is None and not on_tpu_pod:
        return
    if jax.distributed.is_initialized():
        return
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = int(os.environ.get("VLCAL_HEARTBEAT_TIMEOUT_S", 100))
    if initialization_timeout_s is None:
        initialization_timeout_s = int(os.environ.get("VLCAL_INIT_TIMEOUT_S", 300))
    if cpu_collectives or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives or "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s,
                               initialization_timeout=initialization_timeout_s)
    log.info("process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
