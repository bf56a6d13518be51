"""Grouped-query attention: a dense kernel for short sequences and a blockwise (flash-style) one
for long ones, both with written-out backward passes, behind one entry point.

    attention(q, k, v, scale, key_valid, causal=...) -> [B, T, H, D]

q [B, T, H, D]; k, v [B, KV, S, D] (head-major, the KV-cache layout) with H % KV == 0, query
head h reading kv head h // (H // KV) as HF groups them; key_valid bool [B, S] (False: a padding
key); causal (self-attention, S == T): key s is visible to query t when s <= t. Scores and
softmax are float32, matmuls run in the inputs' dtype and accumulate in float32. A query that
sees no key (a left-padding token, a padded vision patch) gets a finite average that callers
ignore.

Neither kernel saves the [B, H, T, S] probabilities for the backward pass: both save q, k, v,
the output and the softmax log-normaliser and recompute the probabilities, as flash attention
does. The blockwise kernel also never forms them in the forward: it walks [block_q, block_k]
tiles with an online softmax, skipping the tiles above the diagonal when causal, so its
temporaries are O(T * block) per head instead of O(T * S), which is what lets a 4096 + 4096
token row or a 16384-patch image (the paper's 4 MP limit) through the update.

On TPU (`impl="auto"` compiling for TPU, or `impl="splash"`) the Pallas splash kernel
(`models.splash`) takes the shapes it supports, inside a shard_map over the context mesh: rows
split over the batch axes when they divide them, else (non-causal, e.g. one 4 MP image per
micro-batch) the queries split over them against all keys. Everything else (decode steps,
lengths that are not multiples of 128, CPU and GPU) runs the kernels here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

NEG_INF = -1e30
# T * S above which `attention` switches to the blockwise kernel: 1024 x 1024 float32 scores
# are 4 MiB per head, a size where the dense kernel is still the faster one on CPU
DENSE_MAX_SCORES = 1 << 20
BLOCK = 512


def attention(q, k, v, scale, key_valid, *, causal: bool, impl: str = "xla", block_q: int | None = None,
              block_k: int | None = None):
    """Attention of q [B, T, H, D] over k, v [B, KV, S, D] (see the module docstring).

    `impl` (ModelConfig.attention_impl): "auto" / "splash" may hand the shapes to the splash
    kernel (see `_splash`); otherwise dense for T * S <= DENSE_MAX_SCORES unless block sizes are
    given, blockwise above."""
    length, keys = q.shape[1], k.shape[2]
    if causal and keys != length:
        raise ValueError(f"causal attention needs as many keys as queries, got T={length}, S={keys}")
    if impl != "xla":
        out = _splash(q, k, v, scale, key_valid, causal, impl)
        if out is not None:
            return out
    if block_q is None and block_k is None and length * keys <= DENSE_MAX_SCORES:
        mask = key_valid[:, None, :]
        if causal:
            mask = mask & jnp.tril(jnp.ones((length, length), bool))[None]
            return causal_attention(q, k, v, mask, scale, causal_blocks(length))
        return dense_attention(q, k, v, jnp.broadcast_to(mask, (q.shape[0], length, keys)), scale)
    return blockwise_attention(q, k, v, key_valid, scale, causal, min(block_q or BLOCK, length),
                               min(block_k or BLOCK, keys))


def _splash(q, k, v, scale, key_valid, causal: bool, impl: str):
    """The splash kernel's output when it takes these shapes under the context mesh, else None
    ("splash" raises instead): rows over the mesh's batch axes when they divide them; when they
    do not and the attention is not causal, queries over the batch axes, each device against
    every key; heads over "tensor" when the KV heads divide it."""
    from vlcal_jax.models import splash  # Pallas TPU: imported only when asked for

    if not splash.use_splash(impl, q.shape, k.shape):
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return splash.attention(q, k, v, scale, key_valid, causal=causal)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    shards = 1
    for a in batch_axes:
        shards *= mesh.shape[a]
    if q.shape[0] % shards == 0:
        return splash.sharded_attention(q, k, v, scale, key_valid, causal=causal)
    length = q.shape[1]
    if not causal and length % (shards * splash.LANES) == 0:
        heads = "tensor" if "tensor" in mesh.axis_names and k.shape[1] % mesh.shape["tensor"] == 0 else None
        q_spec, kv_spec = P(None, batch_axes, heads, None), P(None, heads, None, None)
        return jax.shard_map(lambda q, k, v, valid: splash.attention(q, k, v, scale, valid, causal=False),
                             mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P()), out_specs=q_spec,
                             check_vma=False)(q, k, v, key_valid)
    if impl == "splash":
        raise ValueError(f"attention_impl='splash': q {q.shape} (causal={causal}) does not split over the "
                         f"{shards} devices of the mesh's batch axes {batch_axes}; use attention_impl='auto'")
    return None


def _head_major(q, kv_heads):
    """[B, T, H, D] -> [B, KV, G, T, D] (query head h = kv * G + g, as HF groups them)."""
    batch, tq, heads, dim = q.shape
    return q.reshape(batch, tq, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)


def _token_major(x):
    """[B, KV, G, T, D] -> [B, T, H, D]."""
    batch, kv_heads, groups, tq, dim = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(batch, tq, kv_heads * groups, dim)


# ---------------------------------------------------------------------------------------------
# dense: one [B, KV, G, T, S] score array


def _scores(qh, k, mask, scale):
    """float32 [B, KV, G, T, S] scores with the mask added as 0 / NEG_INF."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", qh, k, preferred_element_type=jnp.float32) * scale
    return scores + jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]


def _dense_fwd(q, k, v, mask, scale):
    qh = _head_major(q, k.shape[1])
    scores = _scores(qh, k, mask, scale)
    top = jnp.max(scores, axis=-1, keepdims=True)
    unnorm = jnp.exp(scores - top)
    total = jnp.sum(unnorm, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", (unnorm / total).astype(v.dtype), v)
    return _token_major(out), (qh, k, v, mask, out, top + jnp.log(total))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def dense_attention(q, k, v, mask, scale):
    """Attention with an explicit mask bool [B, T, S] (True = attend); shapes as `attention`.

    The backward recomputes the probabilities with one extra q k^T instead of saving them: under
    a layer scan that keeps the T x S arrays out of the saved residuals (two [L, B, H, T, S]
    float32 stacks under autodiff)."""
    return _dense_fwd(q, k, v, mask, scale)[0]


def _dense_bwd(scale, residuals, d_out):
    qh, k, v, mask, out, lse = residuals
    d_out = _head_major(d_out, k.shape[1])
    probs = jnp.exp(_scores(qh, k, mask, scale) - lse)
    d_v = jnp.einsum("bkgts,bkgtd->bksd", probs.astype(d_out.dtype), d_out)
    d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_scores = (probs * (d_probs - delta) * scale).astype(qh.dtype)
    d_q = jnp.einsum("bkgts,bksd->bkgtd", d_scores, k)
    d_k = jnp.einsum("bkgts,bkgtd->bksd", d_scores, qh)
    return _token_major(d_q), d_k, d_v, None


dense_attention.defvjp(_dense_fwd, _dense_bwd)


def causal_blocks(length: int, min_block: int = 64, max_blocks: int = 8) -> int:
    """How many query blocks `causal_attention` splits a length-`length` self-attention into."""
    return max(1, min(max_blocks, length // min_block))


def causal_attention(q, k, v, mask, scale, num_blocks: int):
    """`dense_attention` for self-attention whose mask is causal (mask[:, t, s] is False for s > t):
    query block i attends only to keys [0, end of block i], so the key blocks above the diagonal,
    fully masked, are never computed (forward or backward). With b blocks that is (b + 1) / 2b of
    the dense scores and probabilities."""
    length = q.shape[1]
    if num_blocks <= 1 or k.shape[2] != length:
        return dense_attention(q, k, v, mask, scale)
    bounds = [length * i // num_blocks for i in range(num_blocks + 1)]
    outs = [dense_attention(q[:, lo:hi], k[:, :, :hi], v[:, :, :hi], mask[:, lo:hi, :hi], scale)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    return jnp.concatenate(outs, axis=1)


# ---------------------------------------------------------------------------------------------
# blockwise: [block_q, block_k] tiles, online softmax


class _Tiles:
    """Static tiling of a [T queries] x [S keys] attention into blocks (T, S padded up)."""

    def __init__(self, length: int, keys: int, block_q: int, block_k: int, causal: bool):
        self.bq, self.bk, self.causal = block_q, block_k, causal
        self.nq, self.nk = -(-length // block_q), -(-keys // block_k)
        self.length, self.keys = length, keys

    def key_blocks_for(self, i):
        """Key blocks query block i needs: all, or those up to its last query when causal."""
        if not self.causal:
            return self.nk
        return jnp.minimum(self.nk, ((i + 1) * self.bq - 1) // self.bk + 1)

    def first_query_block(self, j):
        """The first query block that sees key block j (0 unless causal)."""
        return (j * self.bk) // self.bq if self.causal else 0

    def bias(self, key_valid, i, j):
        """float32 [B, 1, 1, bq, bk] mask bias of tile (i, j): 0 where visible, NEG_INF elsewhere."""
        valid = jax.lax.dynamic_slice_in_dim(key_valid, j * self.bk, self.bk, axis=1)[:, None, :]
        if self.causal:
            rows = i * self.bq + jnp.arange(self.bq)
            cols = j * self.bk + jnp.arange(self.bk)
            valid = valid & (cols[None, :] <= rows[:, None])[None]
        return jnp.where(valid, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]


def _pad(x, axis, size):
    extra = size - x.shape[axis]
    if not extra:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, extra)
    return jnp.pad(x, pad)


def _tile(x, axis, index, size):
    return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis=axis)


def _tile_scores(tiles, qi, kj, key_valid, i, j, scale):
    s = jnp.einsum("bkgtd,bksd->bkgts", qi, kj, preferred_element_type=jnp.float32) * scale
    return s + tiles.bias(key_valid, i, j)


def _blockwise_forward(qh, k, v, key_valid, scale, tiles: _Tiles):
    """qh [B, KV, G, Tp, D], k/v [B, KV, Sp, D] (padded to whole tiles) -> (out [B, KV, G, Tp, D]
    in v's dtype, lse float32 [B, KV, G, Tp])."""

    def query_block(i):
        qi = _tile(qh, 3, i, tiles.bq)

        def key_block(j, carry):
            acc, top, total = carry
            s = _tile_scores(tiles, qi, _tile(k, 2, j, tiles.bk), key_valid, i, j, scale)
            new_top = jnp.maximum(top, jnp.max(s, axis=-1))
            p = jnp.exp(s - new_top[..., None])
            rescale = jnp.exp(top - new_top)
            pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), _tile(v, 2, j, tiles.bk),
                            preferred_element_type=jnp.float32)
            return acc * rescale[..., None] + pv, new_top, total * rescale + jnp.sum(p, axis=-1)

        shape = qi.shape[:-1]
        init = (jnp.zeros(qi.shape[:-1] + (v.shape[-1],), jnp.float32), jnp.full(shape, NEG_INF, jnp.float32),
                jnp.zeros(shape, jnp.float32))
        acc, top, total = jax.lax.fori_loop(0, tiles.key_blocks_for(i), key_block, init)
        return (acc / total[..., None]).astype(v.dtype), top + jnp.log(total)

    out, lse = jax.lax.map(query_block, jnp.arange(tiles.nq))  # [nq, B, KV, G, bq, ...]
    return _untile(out, 3), _untile(lse, 3)


def _untile(x, axis):
    """[n, ..., block at `axis` - 1 of the tail, ...] -> the n blocks concatenated along `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2:])


def _blockwise_prepare(q, k, v, key_valid, tiles: _Tiles):
    qh = _pad(_head_major(q, k.shape[1]), 3, tiles.nq * tiles.bq)
    keys = tiles.nk * tiles.bk
    return qh, _pad(k, 2, keys), _pad(v, 2, keys), _pad(key_valid, 1, keys)


def _blockwise_fwd(q, k, v, key_valid, scale, causal, block_q, block_k):
    tiles = _Tiles(q.shape[1], k.shape[2], block_q, block_k, causal)
    qh, kp, vp, valid = _blockwise_prepare(q, k, v, key_valid, tiles)
    out, lse = _blockwise_forward(qh, kp, vp, valid, scale, tiles)
    return _token_major(out[:, :, :, :tiles.length]), (q, k, v, key_valid, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def blockwise_attention(q, k, v, key_valid, scale, causal: bool, block_q: int, block_k: int):
    """`attention` over [block_q, block_k] tiles (flash-style; see the module docstring)."""
    return _blockwise_fwd(q, k, v, key_valid, scale, causal, block_q, block_k)[0]


def _blockwise_bwd(scale, causal, block_q, block_k, residuals, d_out):
    q, k, v, key_valid, out, lse = residuals
    tiles = _Tiles(q.shape[1], k.shape[2], block_q, block_k, causal)
    qh, kp, vp, valid = _blockwise_prepare(q, k, v, key_valid, tiles)
    do = _pad(_head_major(d_out, k.shape[1]), 3, tiles.nq * tiles.bq)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, KV, G, Tp]

    def tile_grads(i, j):
        """(probs, d_scores) of tile (i, j), float32 [B, KV, G, bq, bk]."""
        qi, doi = _tile(qh, 3, i, tiles.bq), _tile(do, 3, i, tiles.bq)
        probs = jnp.exp(_tile_scores(tiles, qi, _tile(kp, 2, j, tiles.bk), valid, i, j, scale)
                        - _tile(lse, 3, i, tiles.bq)[..., None])
        d_probs = jnp.einsum("bkgtd,bksd->bkgts", doi, _tile(vp, 2, j, tiles.bk), preferred_element_type=jnp.float32)
        return probs, probs * (d_probs - _tile(delta, 3, i, tiles.bq)[..., None]) * scale

    def dq_block(i):  # d q_i = sum over visible key blocks j of dS_ij k_j
        def body(j, acc):
            _, d_scores = tile_grads(i, j)
            return acc + jnp.einsum("bkgts,bksd->bkgtd", d_scores.astype(kp.dtype), _tile(kp, 2, j, tiles.bk),
                                    preferred_element_type=jnp.float32)

        init = jnp.zeros(qh.shape[:3] + (tiles.bq, qh.shape[-1]), jnp.float32)
        return jax.lax.fori_loop(0, tiles.key_blocks_for(i), body, init).astype(q.dtype)

    def dkv_block(j):  # d k_j, d v_j: sums over the query blocks that see key block j
        def body(i, acc):
            d_k, d_v = acc
            probs, d_scores = tile_grads(i, j)
            doi, qi = _tile(do, 3, i, tiles.bq), _tile(qh, 3, i, tiles.bq)
            d_v = d_v + jnp.einsum("bkgts,bkgtd->bksd", probs.astype(doi.dtype), doi,
                                   preferred_element_type=jnp.float32)
            d_k = d_k + jnp.einsum("bkgts,bkgtd->bksd", d_scores.astype(qi.dtype), qi,
                                   preferred_element_type=jnp.float32)
            return d_k, d_v

        zeros = jnp.zeros(kp.shape[:2] + (tiles.bk, kp.shape[-1]), jnp.float32)
        d_k, d_v = jax.lax.fori_loop(tiles.first_query_block(j), tiles.nq, body, (zeros, zeros))
        return d_k.astype(k.dtype), d_v.astype(v.dtype)

    d_q = _untile(jax.lax.map(dq_block, jnp.arange(tiles.nq)), 3)[:, :, :, :tiles.length]
    d_k, d_v = jax.lax.map(dkv_block, jnp.arange(tiles.nk))
    d_k, d_v = _untile(d_k, 2)[:, :, :tiles.keys], _untile(d_v, 2)[:, :, :tiles.keys]
    return _token_major(d_q), d_k, d_v, None


blockwise_attention.defvjp(_blockwise_fwd, _blockwise_bwd)
