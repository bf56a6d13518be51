"""Shared pure layers: norms, activations, rotary helpers, attention.

Norms and softmax always run in float32; matmuls run in the compute dtype of their input.
`attention` is the single place a TPU/GPU kernel (splash / flash attention) would be swapped in:
it sees plain [B, T, H, D] arrays and a boolean mask, nothing model-specific.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@jax.custom_vjp
def matmul(x, kernel):
    """x [..., D_in] @ kernel [D_in, D_out] with the backward written out.

    The kernel gradient is one [D_in, D_out] contraction over all leading axes with x as the
    left operand. Autodiff's transpose rule produces the same product as (g^T x)^T, for which
    XLA:CPU writes g (often the widest activation, e.g. the [tokens, 3 * hidden] MLP gate)
    transposed through a slow strided loop fusion; this form measured 2x faster for a whole
    MLP's forward + backward and is a plain dot on every backend."""
    return jnp.einsum("...i,io->...o", x, kernel)


def _matmul_fwd(x, kernel):
    return matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, g):
    x, kernel = residuals
    d_x = jnp.einsum("...o,io->...i", g, kernel)
    d_kernel = jnp.einsum("ni,no->io", x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
    return d_x, d_kernel


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def linear(x, kernel, bias=None):
    """x [..., D_in] @ kernel [D_in, D_out] (+ bias) in x's dtype."""
    y = matmul(x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def rms_norm(x, scale, eps):
    """RMSNorm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * x32).astype(x.dtype)


def layer_norm(x, scale, bias, eps):
    """LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unsupported activation {name!r}")


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) * up, the Qwen3 MLP's gated activation.

    Its VJP is written out so the backward reads only the two saved pre-activations (autodiff
    of silu saves and re-reads sigmoid and product intermediates, which under a layer scan XLA:CPU
    gathers in slow transposing loop fusions); the math is identical."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, g):
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    return g * up * (sig * (1 + gate * (1 - sig))), g * (gate * sig)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x, cos, sin):
    """Rotary embedding of x [..., H, D] with cos/sin [..., D] broadcast over heads, in float32."""
    x32 = x.astype(jnp.float32)
    cos = cos[..., None, :].astype(jnp.float32)
    sin = sin[..., None, :].astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def _head_major(q, kv_heads):
    """[B, T, H, D] -> [B, KV, G, T, D] (query head h = kv * G + g, as HF groups them)."""
    batch, tq, heads, dim = q.shape
    return q.reshape(batch, tq, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)


def _token_major(x):
    """[B, KV, G, T, D] -> [B, T, H, D]."""
    batch, kv_heads, groups, tq, dim = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(batch, tq, kv_heads * groups, dim)


def _scores(qh, k, mask, scale):
    """float32 [B, KV, G, T, S] scores with the mask added as 0 / NEG_INF."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", qh, k, preferred_element_type=jnp.float32) * scale
    return scores + jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)[:, None, None]


def _attention_fwd(q, k, v, mask, scale):
    qh = _head_major(q, k.shape[1])
    scores = _scores(qh, k, mask, scale)
    top = jnp.max(scores, axis=-1, keepdims=True)
    unnorm = jnp.exp(scores - top)
    total = jnp.sum(unnorm, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bksd->bkgtd", (unnorm / total).astype(v.dtype), v)
    return _token_major(out), (qh, k, v, mask, out, top + jnp.log(total))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, k, v, mask, scale):
    """Grouped-query attention.

    q [B, T, H, D]; k/v [B, KV, S, D] (head-major, the KV-cache layout, which keeps each
    head's keys contiguous for decoding) with H % KV == 0; mask bool [B, T, S] (True = attend).
    Returns [B, T, H, D]. Scores and softmax are float32; a fully masked query row gives a
    uniform average (as HF's finfo.min masking does) and is ignored by callers.

    The backward is written out the way flash attention's is: the forward saves q, k, v, the
    output and the softmax log-normaliser (not the [B, H, T, S] probabilities) and the backward
    recomputes the probabilities with one extra q k^T. Under a layer scan this keeps the T x T
    arrays out of the saved residuals (two [L, B, H, T, S] float32 stacks under autodiff).
    """
    return _attention_fwd(q, k, v, mask, scale)[0]


def _attention_bwd(scale, residuals, d_out):
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


attention.defvjp(_attention_fwd, _attention_bwd)


def causal_blocks(length: int, min_block: int = 64, max_blocks: int = 8) -> int:
    """How many query blocks `causal_attention` splits a length-`length` self-attention into."""
    return max(1, min(max_blocks, length // min_block))


def causal_attention(q, k, v, mask, scale, num_blocks: int):
    """`attention` for self-attention whose mask is causal (mask[:, t, s] is False for s > t, as
    `qwen3_vl.causal_mask` builds it): query block i attends only to keys [0, end of block i], so
    the key blocks above the diagonal, fully masked, are never computed (forward or backward).
    With b blocks that is (b + 1) / 2b of the dense scores and probabilities."""
    length = q.shape[1]
    if num_blocks <= 1 or k.shape[2] != length:
        return attention(q, k, v, mask, scale)
    bounds = [length * i // num_blocks for i in range(num_blocks + 1)]
    outs = [attention(q[:, lo:hi], k[:, :, :hi], v[:, :, :hi], mask[:, lo:hi, :hi], scale)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
    return jnp.concatenate(outs, axis=1)
