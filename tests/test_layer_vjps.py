"""The written-out VJPs (layers.matmul, layers.swiglu, layers.attention, layers.causal_attention,
rl.step.token_logprobs) against autodiff of a plain reference of the same math, in float64 (the
code keeps scores and log-softmax in float32, so jnp.float32 is aliased to float64 here, as in
the finite-difference test of the train step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlcal_jax.models import layers
from vlcal_jax.rl import step


def _reference_attention(q, k, v, mask, scale):
    batch, tq, heads, dim = q.shape
    groups = heads // k.shape[1]
    k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
    scores = jnp.einsum("bthd,bhsd->bhts", q, k) * scale
    scores = jnp.where(mask[:, None], scores, -1e30)
    return jnp.einsum("bhts,bhsd->bthd", jax.nn.softmax(scores, axis=-1), v)


def _grads(fn, args, cotangent):
    value, vjp = jax.vjp(fn, *args)
    return value, vjp(cotangent)


def _close(ours, ref, tol=1e-10):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        scale = max(1.0, float(np.max(np.abs(b))))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tol * scale)


@pytest.fixture(autouse=True)
def x64(monkeypatch):
    monkeypatch.setattr(jnp, "float32", jnp.float64)
    with jax.enable_x64(True):
        yield


def test_matmul_and_swiglu_vjps_equal_autodiff():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 5, 7)), rng.standard_normal((7, 3))
    g = rng.standard_normal((2, 5, 3))
    _close(_grads(layers.matmul, (x, w), g), _grads(lambda x, w: jnp.einsum("bti,io->bto", x, w), (x, w), g))
    a, b = rng.standard_normal((2, 3, 4)) * 3, rng.standard_normal((2, 3, 4))
    cot = rng.standard_normal((2, 3, 4))
    _close(_grads(layers.swiglu, (a, b), cot), _grads(lambda a, b: jax.nn.silu(a) * b, (a, b), cot))


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (6, 1)])
def test_attention_vjp_equals_autodiff_of_dense_softmax_attention(heads, kv_heads):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, t, s, d = 2, 6, 9, 8
    q, k, v = rng.standard_normal((b, t, heads, d)), rng.standard_normal((b, kv_heads, s, d)), \
        rng.standard_normal((b, kv_heads, s, d))
    mask = rng.random((b, t, s)) < 0.6
    mask[:, :, 0] = True
    cot = rng.standard_normal((b, t, heads, d))
    ours = _grads(lambda q, k, v: layers.attention(q, k, v, mask, 0.3), (q, k, v), cot)
    ref = _grads(lambda q, k, v: _reference_attention(q, k, v, mask, 0.3), (q, k, v), cot)
    _close(ours, ref)


@pytest.mark.parametrize("blocks", [2, 3, 8])
def test_causal_attention_blocks_equal_dense_on_every_attending_row(blocks):
    """Left padding makes the first rows of one sequence fully masked: those rows are excluded
    (callers ignore them), every other output and every gradient must match the dense result."""
    rng = np.random.default_rng(blocks)
    b, t, heads, kv_heads, d = 2, 13, 4, 2, 8
    q, k, v = rng.standard_normal((b, t, heads, d)), rng.standard_normal((b, kv_heads, t, d)), \
        rng.standard_normal((b, kv_heads, t, d))
    valid = np.ones((b, t), bool)
    valid[1, :4] = False  # left padding
    mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    attending = mask.any(-1)
    cot = rng.standard_normal((b, t, heads, d)) * attending[..., None, None]
    ours = _grads(lambda q, k, v: layers.causal_attention(q, k, v, mask, 0.3, blocks), (q, k, v), cot)
    ref = _grads(lambda q, k, v: _reference_attention(q, k, v, mask, 0.3), (q, k, v), cot)
    _close(np.asarray(ours[0]) * attending[..., None, None], np.asarray(ref[0]) * attending[..., None, None])
    _close(ours[1], ref[1])
    assert layers.causal_blocks(40) == 1 and layers.causal_blocks(512) == 8 and layers.causal_blocks(100_000) == 8


@pytest.mark.parametrize("chunk", [4, 5, 16])
def test_token_logprobs_vjp_equals_autodiff_of_log_softmax(chunk):
    rng = np.random.default_rng(chunk)
    n, m, d, vocab = 3, 11, 6, 50
    hidden, kernel = rng.standard_normal((n, m, d)), rng.standard_normal((d, vocab))
    targets = rng.integers(0, vocab, (n, m))
    cot = rng.standard_normal((n, m))

    def reference(h, w):
        logp = jax.nn.log_softmax(jnp.einsum("nmd,dv->nmv", h, w), axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    ours = _grads(lambda h, w: step.token_logprobs(h, w, targets, chunk), (hidden, kernel), cot)
    _close(ours, _grads(reference, (hidden, kernel), cot))
