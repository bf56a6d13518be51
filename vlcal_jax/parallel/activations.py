"""Activation sharding: one-line constraints in model code, no-ops without a mesh in context.

Parameters and batches carry explicit shardings, but from there XLA's partitioner is free to
choose how activations are laid out, and for FSDP it chose badly: it replicated the residual
stream, the MLP and the LM head on every chip (an all-reduce of the [B, T, I] MLP activations and
full [B, T, V] logits per chip), so "fsdp" split the weights but not the work. Model code pins the
layout at a few points with `constrain(x, "batch", None, "tensor")`, naming *logical* dimensions:

    "batch"   the rows (or images), over the batch axes ("data", "fsdp")
    "tensor"  heads / the MLP inner dimension / the vocabulary, over "tensor"
    None      whole on every chip

The mesh comes from the context (`use_mesh`, i.e. `jax.set_mesh`, around the call that traces
the program), so the many single-device callers and tests compile the model unchanged.
"""

from __future__ import annotations

import contextlib
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from vlcal_jax.parallel.sharding import BATCH

LOGICAL = {"batch": BATCH, "tensor": ("tensor",)}


def _axis_sizes() -> dict[str, int]:
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(mesh.shape)


def axes(logical: str) -> tuple[str, ...]:
    """The context mesh's axes (of size > 1) that a `logical` dimension is split over."""
    sizes = _axis_sizes()
    return tuple(a for a in LOGICAL[logical] if sizes.get(a, 1) > 1)


def shards(logical: str) -> int:
    """How many pieces the context mesh splits a `logical` dimension into (1 without a mesh)."""
    sizes = _axis_sizes()
    return math.prod(sizes.get(axis, 1) for axis in LOGICAL[logical])


def divides(size: int, logical: str) -> bool:
    """Whether a dimension of `size` splits evenly over `logical`'s mesh axes."""
    return size % shards(logical) == 0


def constrain(x: jax.Array, *dims) -> jax.Array:
    """`x` with its layout pinned: one logical name (or None, or P.UNCONSTRAINED) per dimension of x.

    A no-op without a mesh in context. A logical name whose mesh axes do not divide its
    dimension leaves that dimension to XLA (P.UNCONSTRAINED) rather than forcing it whole, as
    `spec_for` drops such axes from parameter rules; None means whole on every chip.
    """
    sizes = _axis_sizes()
    if not sizes:
        return x
    if len(dims) != x.ndim:
        raise ValueError(f"constrain: {len(dims)} logical dims {dims} for an array of shape {x.shape}")
    spec = []
    for size, name in zip(x.shape, dims):
        if name is None or name is P.UNCONSTRAINED:
            spec.append(name)
            continue
        split = axes(name)
        if not split:
            spec.append(None)
        elif size % math.prod(sizes[a] for a in split):
            spec.append(P.UNCONSTRAINED)
        else:
            spec.append(split if len(split) > 1 else split[0])
    return jax.lax.with_sharding_constraint(x, P(*spec))


def mesh_of(tree):
    """The mesh of the first NamedSharding-placed leaf of `tree` (arrays or ShapeDtypeStructs),
    or None when it has none (host arrays, one device)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


@contextlib.contextmanager
def use_mesh(mesh):
    """`jax.set_mesh(mesh)` around a program's trace, so its `constrain` calls apply; nothing
    for `mesh=None`. Enter it outside `jax.jit` (where the program is called or lowered)."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh):
        yield
