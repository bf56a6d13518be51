"""Pallas TPU splash attention behind the model's attention contract.

`attention(q, k, v, scale, key_valid, *, causal)` computes what `layers.attention` computes
(q [B, T, H, D], k/v [B, KV, S, D] head-major, key_valid bool [B, S]) with
`jax.experimental.pallas.ops.tpu.splash_attention`: a flash-attention kernel that never
materialises [T, S] scores in HBM (forward or backward; it brings its own VJP), skips the key
blocks a causal mask zeroes, and handles grouped-query attention natively (query head h reads
kv head h // (H // KV), the HF grouping).

Masking. Splash takes one static mask for every row of the batch (CausalMask or FullMask) and
per-row `SegmentIds`: query t may see key s only if their segment ids are equal. Keys get
segment id key_valid[b, s] (1 valid, 0 padding) and every query gets 1, so no query ever sees
a padding key, and a query sees exactly the keys the contract gives it (query validity is not
part of the contract: a right-padding query of a causal row does see the valid keys before it).
Giving padding queries segment 0 instead would make them see padding keys, a proper softmax
but not the contract's one. A query with no visible key (a left-padding query, or any query of
a row with no valid key) has every score at splash's finite mask value (-0.7 * float32 max):
it returns an average of the values of the key blocks it visits, finite as the contract asks,
and its backward is finite too (only ever multiplied by the zero cotangent callers give it).

Precision: q is multiplied by `scale` in float32 and cast back to q's dtype (splash does not
scale), one extra rounding of q in the compute dtype; scores, softmax and accumulators are
float32 inside the kernel, the output is in q's dtype.

Constraints (see `supported`): T and S multiples of 128 (the TPU lane width; splash's segment-id
masking and its block grid need block sizes that are multiples of 128 dividing the lengths), and
head_dim a multiple of 64 that Mosaic tiles (128 is the native lane width; 64, the Qwen3-VL
vision head, compiles too, see tests/test_splash_attention.py). Everything else (any B, H, KV
with H % KV == 0) is fine. The caller pads or falls back to the pure-JAX path otherwise.

Sharding: a Pallas call is opaque to XLA's SPMD partitioner, so under a mesh this must run
inside `shard_map` (see `sharded_attention`), each device on its share of the batch and heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from vlcal_jax.models.config import ATTENTION_IMPLS

LANES = 128  # TPU vector lane width: splash's block sizes must be multiples of it


def target_platform() -> str:
    """The platform being compiled for: the context mesh's (`jax.set_mesh`, also inside jit and
    for AOT topologies on a CPU host), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def use_splash(impl: str, q_shape, kv_shape, *, block_q: int = 512, block_kv: int = 512) -> bool:
    """Whether the model's attention should call this kernel: impl "splash" always (it raises
    on shapes it cannot take), "xla" never, "auto" when compiling for TPU and `supported`."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r}: expected one of {ATTENTION_IMPLS}")
    if impl == "auto":
        return target_platform() == "tpu" and supported(q_shape, kv_shape, block_q=block_q, block_kv=block_kv)
    return impl == "splash"


def _block(length: int, requested: int) -> int:
    """The largest multiple of LANES that is <= requested and divides length."""
    block = min(requested, length) // LANES * LANES
    while block > LANES and length % block:
        block -= LANES
    return block


def supported(q_shape, kv_shape, *, block_q: int = 512, block_kv: int = 512) -> bool:
    """Whether splash can run q [B, T, H, D] against k/v [B, KV, S, D] at these block sizes.

    Needs T, S multiples of 128 (then some block <= the requested one, a multiple of 128,
    divides each), H % KV == 0, requested blocks of at least 128, and D a multiple of 64: the
    model's 64 (vision) and 128 (text) are the head dims checked here in interpret mode and
    compiled for TPU v4. Splash itself pads D to 128 lanes (Mosaic compiled 32, 80, 96, 192
    and 256 for v4 too), so this bound can be relaxed once other sizes are checked on a TPU.
    """
    batch, q_len, heads, head_dim = q_shape
    kv_batch, kv_heads, kv_len, kv_head_dim = kv_shape
    return (batch == kv_batch and head_dim == kv_head_dim and heads % kv_heads == 0
            and q_len % LANES == 0 and kv_len % LANES == 0 and head_dim % 64 == 0
            and min(block_q, block_kv) >= LANES)


def _kernel(heads: int, q_len: int, kv_len: int, causal: bool, block_q: int, block_kv: int, interpret: bool):
    """The splash kernel for one (per-device, per-row) problem.

    Built afresh at each trace (its mask tables become constants of the traced computation);
    splash caches the numpy work behind them (`_process_mask` is an lru_cache). Caching the
    kernel here would keep arrays made inside a trace (tracers) or, made eagerly, arrays
    committed to devices a `jax.set_mesh` context may not have attached (AOT topologies)."""
    if causal:
        mask = splash.CausalMask((q_len, kv_len))
    else:
        mask = splash.FullMask((q_len, kv_len))
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                              block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                              block_q_dq=block_q, block_kv_dq=block_kv)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)


def attention(q, k, v, scale, key_valid, *, causal: bool, block_q: int = 512, block_kv: int = 512,
              interpret: bool | None = None):
    """Grouped-query attention with splash: q [B, T, H, D], k/v [B, KV, S, D] -> [B, T, H, D].

    key_valid bool [B, S] (False = padding key); causal only for self-attention (S == T): key s
    is visible to query t iff s <= t and key_valid[b, s]. Block sizes are upper bounds; each is
    lowered to the largest multiple of 128 dividing its sequence length. `interpret` runs the
    Pallas kernels in interpret mode (slow, any backend); None: when not compiling for TPU.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[2]
    if not supported(q.shape, k.shape, block_q=block_q, block_kv=block_kv):
        raise ValueError(f"splash attention does not support q {q.shape}, k/v {k.shape} with blocks "
                         f"({block_q}, {block_kv}); check splash.supported() and use layers.attention")
    if causal and kv_len != q_len:
        raise ValueError(f"causal splash attention is self-attention: T={q_len} but S={kv_len}")
    if interpret is None:
        interpret = target_platform() != "tpu"
    kernel = _kernel(heads, q_len, kv_len, causal, _block(q_len, block_q), _block(kv_len, block_kv), interpret)
    kv_ids = key_valid.astype(jnp.int32)
    q_ids = jnp.ones((batch, q_len), jnp.int32)
    q_scaled = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, H, T, D]
    out = jax.vmap(kernel)(q_scaled, k.astype(q.dtype), v.astype(q.dtype), splash.SegmentIds(q_ids, kv_ids))
    return out.transpose(0, 2, 1, 3)


def sharded_attention(q, k, v, scale, key_valid, *, causal: bool, mesh=None, batch_axes=("data", "fsdp"),
                      head_axis: str | None = "tensor", **kwargs):
    """`attention` under a device mesh, via shard_map: each device runs the kernel on its share
    of the batch (split over the `batch_axes` the mesh has) and, where KV divides by its size,
    of the heads (split over `head_axis`, as the column-parallel q/k/v projections leave them).

    `mesh` defaults to the context mesh (`jax.set_mesh`); with none, this is `attention`.
    A Pallas call cannot be partitioned by XLA's SPMD partitioner ("Mosaic kernels cannot be
    automatically partitioned"), hence the shard_map. The batch must divide by the product of
    the batch axes' sizes.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    call = functools.partial(attention, scale=scale, causal=causal, **kwargs)
    if mesh.empty:
        return call(q, k, v, key_valid=key_valid)
    batch = tuple(a for a in batch_axes if a in mesh.axis_names) or None
    heads = head_axis if head_axis in mesh.axis_names and k.shape[1] % mesh.shape[head_axis] == 0 else None
    q_spec = P(batch, None, heads, None)
    kv_spec = P(batch, heads, None, None)
    return jax.shard_map(lambda q, k, v, valid: call(q, k, v, key_valid=valid), mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, P(batch, None)), out_specs=q_spec,
                         check_vma=False)(q, k, v, key_valid)
