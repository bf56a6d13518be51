"""Device mesh ("data", "fsdp", "tensor") and regex partition rules for Qwen3-VL params.

The mesh uses `AxisType.Auto` on purpose: parameters and batches carry explicit
`NamedSharding`s, the compiled steps get explicit in/out shardings, and XLA's SPMD
partitioner propagates the rest through the model (the jit-with-shardings style that
replaced pjit), guided by a few activation constraints (parallel.activations: left alone,
it replicated the activations, so every chip did all of the work).
"""

from __future__ import annotations

import logging
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Path regex -> spec. Stacked per-layer params have a leading (unsharded) layer axis.
# Column-parallel projections split their output over "tensor", row-parallel ones their input;
# the other matrix dimension is split over "fsdp" (ZeRO-3 style: gathered per layer in the scan).
QWEN3_VL_RULES: tuple[tuple[str, P], ...] = (
    # the input dim is the pixel-patch dim (3*2*16*16): splitting it over "fsdp" made the kernel
    # gradient x^T g reshard the batch-split pixel_values by replicating them on every chip
    # (XLA's "involuntary full rematerialization"); the matrix is small (1536 x 1024 in Qwen3-VL)
    (r"^visual/patch_embed/kernel$", P(None, "tensor")),
    (r"^visual/patch_embed/bias$", P("tensor")),
    (r"^visual/pos_embed$", P(None, "tensor")),
    (r"^visual/blocks/(norm1|norm2)/(scale|bias)$", P(None, None)),
    (r"^visual/blocks/(attn/qkv|mlp/fc1)/kernel$", P(None, "fsdp", "tensor")),
    (r"^visual/blocks/(attn/qkv|mlp/fc1)/bias$", P(None, "tensor")),
    (r"^visual/blocks/(attn/proj|mlp/fc2)/kernel$", P(None, "tensor", "fsdp")),
    (r"^visual/blocks/(attn/proj|mlp/fc2)/bias$", P(None, None)),
    (r"^visual/merger/norm/(scale|bias)$", P(None)),
    (r"^visual/merger/fc1/kernel$", P("fsdp", "tensor")),
    (r"^visual/merger/fc1/bias$", P("tensor")),
    (r"^visual/merger/fc2/kernel$", P("tensor", "fsdp")),
    (r"^visual/merger/fc2/bias$", P(None)),
    (r"^visual/deepstack_mergers/norm/(scale|bias)$", P(None, None)),
    (r"^visual/deepstack_mergers/fc1/kernel$", P(None, "fsdp", "tensor")),
    (r"^visual/deepstack_mergers/fc1/bias$", P(None, "tensor")),
    (r"^visual/deepstack_mergers/fc2/kernel$", P(None, "tensor", "fsdp")),
    (r"^visual/deepstack_mergers/fc2/bias$", P(None, None)),
    (r"^text/embed$", P("tensor", "fsdp")),
    (r"^text/layers/attn/(q_proj|k_proj|v_proj)/kernel$", P(None, "fsdp", "tensor")),
    (r"^text/layers/attn/(q_proj|k_proj|v_proj)/bias$", P(None, "tensor")),
    (r"^text/layers/attn/o_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"^text/layers/attn/o_proj/bias$", P(None, None)),
    (r"^text/layers/attn/(q_norm|k_norm)$", P(None, None)),
    (r"^text/layers/mlp/(gate_proj|up_proj)/kernel$", P(None, "fsdp", "tensor")),
    (r"^text/layers/mlp/down_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"^text/layers/(input_norm|post_norm)$", P(None, None)),
    (r"^text/norm$", P(None)),
    (r"^lm_head/kernel$", P("fsdp", "tensor")),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """Mesh over all (or the given) devices; one axis may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one axis may be -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, shape))} needs {int(np.prod(shape))} devices, have {len(devices)}")
    if jax.process_count() > 1:
        # process by process, so that each process's devices hold one contiguous block of the
        # batch rows (parallel.multihost: each process feeds and reads only its own rows)
        devices = sorted(devices, key=lambda d: (d.process_index, d.id))
        return Mesh(np.asarray(devices, object).reshape(shape), AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh(tuple(shape), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# path_str of a batch's pixel_values (ModelInputs.vision.pixel_values), the leaf rl.offload_pixels
# keeps in host memory
PIXELS_PATH = ".vision/.pixel_values"


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules=QWEN3_VL_RULES) -> P:
    """The rule spec for one param; axes that do not divide the dimension are dropped."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            if len(spec) != len(shape):
                raise ValueError(f"rule {pattern!r} has rank {len(spec)} but {path} has shape {shape}")
            fitted = []
            for dim, axis in zip(shape, spec):
                size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
                fitted.append(axis if dim % size == 0 else None)
            return P(*fitted)
    raise ValueError(f"no partition rule matches parameter {path} {shape}; add one to the rules table")


def param_shardings(params, mesh: Mesh, rules=QWEN3_VL_RULES):
    """A NamedSharding for every leaf of `params` (or of a matching abstract tree)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, spec_for(path_str(path), tuple(leaf.shape), mesh, rules)), params)


def unused_rules(params, rules=QWEN3_VL_RULES) -> list[str]:
    """Rules that match no parameter of `params` (dead rules)."""
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [pattern for pattern, _ in rules if not any(re.search(pattern, p) for p in paths)]


def shard_params(params, mesh: Mesh, rules=QWEN3_VL_RULES):
    return jax.device_put(params, param_shardings(params, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Split the batch axis over ("data", "fsdp"), replicate the rest."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
