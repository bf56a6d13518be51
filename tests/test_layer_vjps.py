"""The written-out VJPs (layers.matmul, layers.swiglu, the dense, causal-block and blockwise
attention kernels of models.attention, rl.step.token_logprobs) against autodiff of a plain reference of the same math, in float64 (the
code keeps scores and log-softmax in float32, so jnp.float32 is aliased to float64 here, as in
the finite-difference test of the train step)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlcal_jax.models import attention, layers
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
    ours = _grads(lambda q, k, v: attention.dense_attention(q, k, v, mask, 0.3), (q, k, v), cot)
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
    ours = _grads(lambda q, k, v: attention.causal_attention(q, k, v, mask, 0.3, blocks), (q, k, v), cot)
    ref = _grads(lambda q, k, v: _reference_attention(q, k, v, mask, 0.3), (q, k, v), cot)
    _close(np.asarray(ours[0]) * attending[..., None, None], np.asarray(ref[0]) * attending[..., None, None])
    _close(ours[1], ref[1])
    assert attention.causal_blocks(40) == 1 and attention.causal_blocks(512) == 8 and attention.causal_blocks(100_000) == 8


def _attention_case(seed, causal, heads, kv_heads, t, s):
    """Random q, k, v, key validity (left padding when causal, padded keys at the end otherwise,
    one row with no valid key at all when not causal) and a cotangent that is zero on the query
    rows that see no key (callers ignore those rows)."""
    rng = np.random.default_rng(seed)
    b, d = 3, 8
    q, k, v = rng.standard_normal((b, t, heads, d)), rng.standard_normal((b, kv_heads, s, d)), \
        rng.standard_normal((b, kv_heads, s, d))
    valid = np.ones((b, s), bool)
    if causal:
        valid[1, :4], valid[2, :s - 2] = False, False  # left padding, one row almost all padding
        mask = np.tril(np.ones((t, s), bool))[None] & valid[:, None, :]
    else:
        valid[1, s - 5:], valid[2] = False, False  # padded patches; an all-padding image
        mask = np.broadcast_to(valid[:, None, :], (b, t, s))
    seen = mask.any(-1)
    cot = rng.standard_normal((b, t, heads, d)) * seen[..., None, None]
    return (q, k, v), valid, mask, seen, cot


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block_q,block_k,heads,kv_heads", [(4, 4, 4, 2), (5, 3, 3, 3), (16, 16, 4, 2), (3, 7, 3, 3)])
def test_blockwise_attention_equals_dense_softmax_attention(causal, block_q, block_k, heads, kv_heads):
    """Tiles that divide the lengths and tiles that do not (the padded tail), square and not
    (the causal tile skip's bounds), GQA and plain multi-head: outputs on every row that sees a
    key and all three gradients equal autodiff of dense softmax attention (float64)."""
    t = 13
    args, valid, mask, seen, cot = _attention_case(block_q * 10 + block_k, causal, heads, kv_heads, t, t if causal else 11)
    ours = _grads(lambda q, k, v: attention.attention(q, k, v, 0.3, valid, causal=causal, block_q=block_q,
                                                      block_k=block_k), args, cot)
    ref = _grads(lambda q, k, v: _reference_attention(q, k, v, mask, 0.3), args, cot)
    keep = seen[..., None, None]
    _close(np.asarray(ours[0]) * keep, np.asarray(ref[0]) * keep)
    assert np.all(np.isfinite(np.asarray(ours[0])))
    _close(ours[1], ref[1])


def test_attention_dispatch_dense_below_the_limit_blockwise_above(monkeypatch):
    """Without block sizes, `attention` is dense up to DENSE_MAX_SCORES scores per head and
    blockwise above; both give the dense result."""
    args, valid, mask, seen, cot = _attention_case(0, True, 4, 2, 13, 13)
    calls = []
    real = attention.blockwise_attention
    monkeypatch.setattr(attention, "blockwise_attention", lambda *a: calls.append(a[5:]) or real(*a))
    ref = _reference_attention(*args, mask, 0.3)
    for limit, expect in ((13 * 13, []), (13 * 13 - 1, [(True, 13, 13)])):
        monkeypatch.setattr(attention, "DENSE_MAX_SCORES", limit)
        calls.clear()
        out = attention.attention(*args, 0.3, valid, causal=True)
        assert calls == expect
        _close(np.asarray(out) * seen[..., None, None], np.asarray(ref) * seen[..., None, None])
    with pytest.raises(ValueError, match="causal attention needs as many keys"):
        attention.attention(args[0], args[1][:, :, :5], args[2][:, :, :5], 0.3, valid[:, :5], causal=True)


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
