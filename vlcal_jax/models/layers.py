"""Shared pure layers: norms, activations, rotary helpers.

Norms and softmax always run in float32; matmuls run in the compute dtype of their input.
Attention has its own module, `models.attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

LAYER_INPUT = "layer_input"  # the name `rematerialized` gives each scanned layer's input


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


def rematerialized(body, remat: bool, offload: bool = False):
    """A layer-scan body `(h, xs) -> (h, ys)`, recomputed in the backward pass when `remat`.

    Under remat the backward pass keeps only each layer's input h: the scan stacks them, one
    [B, T, D] per layer (for Qwen3-VL-4B at 6144 tokens, 1 GiB per row in bfloat16). With
    `offload` that stack lives in pinned host memory instead of HBM: each layer's input is copied
    out in the forward pass and back in the backward pass (PCIe traffic XLA overlaps with the
    layer's compute); the values, hence gradients, are the same."""
    if not remat:
        return body
    if not offload:
        return jax.checkpoint(body)
    policy = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[LAYER_INPUT], offload_src="device",
        offload_dst="pinned_host")

    def named(h, xs):
        return body(checkpoint_name(h, LAYER_INPUT), xs)

    return jax.checkpoint(named, policy=policy)


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


def apply_rotary(x, cos, sin, dtype=None):
    """Rotary embedding of x [..., H, D] with cos/sin [..., D] broadcast over heads, computed in
    `dtype`: HF's Qwen3-VL rotates the vision tower's q/k in float32 and the text model's in the
    activations' dtype (cos/sin cast to it), which in bfloat16 also halves the [B, T, H, hd]
    temporaries its backward pass keeps. None: float32 (looked up per call, so a test that aliases
    jnp.float32 to float64 gets float64)."""
    dtype = jnp.float32 if dtype is None else dtype
    xd = x.astype(dtype)
    cos = cos[..., None, :].astype(dtype)
    sin = sin[..., None, :].astype(dtype)
    return (xd * cos + rotate_half(xd) * sin).astype(x.dtype)
