"""Multi-controller data movement: process-local host rows <-> global arrays, small host gathers.

Every process of a multi-host job runs the same program. A batch's rows are split into
`process_count` contiguous blocks, process p holding block p (its devices hold those rows:
`make_mesh` orders devices process by process, `check_mesh` verifies it). Host arrays enter
the device as global arrays built from each process's block (`to_global`), and come back as
the block of this process (`local_rows`, read from the addressable shards: nothing crosses
hosts). Only small host values are gathered (`allgather_rows`, `allgather_json`): per-response
statistics for batch-wide reductions and metrics, reader states, eval results.

With one process every function is the identity (or a plain `np.asarray`), so the
single-process path is unchanged.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vlcal_jax.parallel.sharding import BATCH


def multiprocess() -> bool:
    return jax.process_count() > 1


def batch_shards(mesh) -> int:
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def check_mesh(mesh) -> None:
    """Raises unless each process's devices hold one contiguous block of rows of a batch split
    over ("data", "fsdp"), process p the p-th block (what `to_global` and `local_rows` assume)."""
    count = jax.process_count()
    if count == 1:
        return
    shards = batch_shards(mesh)
    if shards % count:
        raise ValueError(f"mesh {dict(mesh.shape)}: its {shards} batch shards (data x fsdp) do not split over "
                         f"{count} processes; give every process the same number of batch shards")
    sharding = NamedSharding(mesh, P(BATCH))
    for device, index in sharding.devices_indices_map((shards,)).items():
        row = index[0].start or 0
        if row * count // shards != device.process_index:
            raise ValueError(f"mesh {dict(mesh.shape)}: batch shard {row} is on device {device.id} of process "
                             f"{device.process_index}, not of process {row * count // shards}; the tensor axis "
                             "must divide each process's local device count")


def _batch_axis(path, micro: bool) -> int:
    from vlcal_jax.parallel.sharding import path_str

    return (1 if path_str(path).endswith("position_ids") else 0) + int(micro)


def to_global(tree, mesh, *, micro: bool = False, what: str = "batch", host_pixels: bool = False):
    """Host arrays of this process's rows -> global arrays whose batch axis (axis 0; axis 1 for
    position_ids; one further with `micro`, a leading micro-batch axis) is split over
    ("data", "fsdp"), the process's rows on its own devices (`host_pixels`: pixel_values in their
    pinned host memory, rl.offload_pixels). One process: `tree` unchanged."""
    count = jax.process_count()
    if count == 1:
        return tree
    shards = batch_shards(mesh)

    def one(path, leaf):
        leaf = np.asarray(leaf)
        axis = _batch_axis(path, micro)
        global_shape = list(leaf.shape)
        global_shape[axis] *= count
        if global_shape[axis] % shards:
            from vlcal_jax.parallel.sharding import path_str

            raise ValueError(f"{what}: {path_str(path)} has {global_shape[axis]} rows over {count} processes, "
                             f"which do not split over the mesh's {shards} batch shards; make the per-process "
                             f"batch a multiple of {shards // count} (prompts_per_step, eval.batch_size, "
                             "sft.batch_size, rollout_batch_size, micro_batch_size / samples_per_prompt)")
        spec = [None] * leaf.ndim
        spec[axis] = BATCH
        from vlcal_jax.parallel.sharding import PIXELS_PATH, path_str

        memory = "pinned_host" if host_pixels and path_str(path).endswith(PIXELS_PATH) else None
        return jax.make_array_from_process_local_data(NamedSharding(mesh, P(*spec), memory_kind=memory), leaf,
                                                      tuple(global_shape))

    return jax.tree_util.tree_map_with_path(one, tree)


def local_rows(x, axis: int = 0) -> np.ndarray:
    """This process's block of rows of a global array, read from its addressable shards (one
    process: the whole array as NumPy)."""
    count = jax.process_count()
    if count == 1 or not isinstance(x, jax.Array) or x.is_fully_addressable:
        x = np.asarray(x)
        if count == 1:
            return x
        n = x.shape[axis]
        p = jax.process_index()
        return np.take(x, np.arange(p * n // count, (p + 1) * n // count), axis=axis)
    n = x.shape[axis]
    p = jax.process_index()
    lo, hi = p * n // count, (p + 1) * n // count
    shape = list(x.shape)
    shape[axis] = hi - lo
    out = np.empty(shape, x.dtype)
    covered = np.zeros(hi - lo, bool)
    for shard in x.addressable_shards:
        start, stop, _ = shard.index[axis].indices(n)
        a, b = max(start, lo), min(stop, hi)
        if a >= b:
            continue
        data = np.asarray(shard.data)
        target = list(shard.index)
        target[axis] = slice(a - lo, b - lo)
        source = [slice(None)] * data.ndim
        source[axis] = slice(a - start, b - start)
        out[tuple(target)] = data[tuple(source)]
        covered[a - lo:b - lo] = True
    if not covered.all():
        raise ValueError(f"process {p} holds only some of its rows [{lo}, {hi}) of an array of shape {x.shape} "
                         f"sharded {x.sharding}; its rows must live on its own devices")
    return out


def allgather_rows(x) -> np.ndarray:
    """Small host arrays [n, ...] of every process (the same shape on each) -> [count * n, ...],
    process order = row order of the global batch."""
    x = np.asarray(x)
    if not multiprocess():
        return x
    from jax.experimental import multihost_utils

    # as raw bytes: the gather goes through jax arrays, which would round float64 to float32
    wire = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint8)
    out = np.asarray(multihost_utils.process_allgather(wire, tiled=True))
    return np.ascontiguousarray(out).view(x.dtype).reshape((-1,) + x.shape[1:])


def allgather_json(value) -> list:
    """Any JSON-able value of every process -> [value of process 0, value of process 1, ...]."""
    if not multiprocess():
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded[None], tiled=True))
    return [json.loads(bytes(row[:size]).decode("utf-8")) for row, size in zip(rows, sizes)]


def agree_max(*values: int) -> tuple[int, ...]:
    """The maximum over processes of each integer (shapes every process must use)."""
    if not multiprocess():
        return tuple(int(v) for v in values)
    gathered = allgather_rows(np.asarray([values], np.int64))
    return tuple(int(v) for v in gathered.max(axis=0))


def barrier(name: str) -> None:
    if multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def fetch_all(tree):
    """A pytree of global arrays -> NumPy arrays with every value, on every process (collective:
    every process must call it). For exports of the final weights, not for per-step data."""
    if not multiprocess():
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def offset_image_index(inputs, image_token_id: int, merge_unit: int, prompt_length: int | None = None,
                       micro: bool = False):
    """Local ModelInputs whose image_index counts this process's images -> indices into the
    global image array (process p's images follow those of processes 0 .. p-1, every process
    holding the same number). Only the image pads of the first `prompt_length` columns move
    (the prompt; responses carry no image rows). One process: unchanged."""
    if not multiprocess() or inputs.vision is None:
        return inputs
    pixels = np.asarray(inputs.vision.pixel_values)
    images, patches = pixels.shape[int(micro)], pixels.shape[int(micro) + 1]
    ids = np.asarray(inputs.input_ids)
    index = np.asarray(inputs.image_index)
    pads = ids == image_token_id
    if prompt_length is not None:
        pads &= np.arange(ids.shape[-1]) < prompt_length
    offset = jax.process_index() * images * (patches // merge_unit)
    return inputs._replace(image_index=np.where(pads, index + offset, index).astype(np.int32))
