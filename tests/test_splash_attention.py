"""models.splash: the Pallas TPU splash kernel behind the attention contract.

On CPU the kernels run in Pallas interpret mode and are checked, forward and (q, k, v)
gradients, against a dense float32 softmax written here from the contract. With libtpu the
forward + backward is compiled ahead of time for a TPU v4 slice (batch split over the devices
by shard_map) at the text tower's and the vision tower's real shapes, and its scratch memory
is checked against the dense [B, H, T, S] float32 scores it avoids.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlcal_jax.models import splash

# Both sides compute in float32 (CPU matmuls are exact float32 at HIGHEST) and differ only in
# summation order (the kernel's online softmax over 128-key blocks vs one dense row). Each
# output or gradient entry is a sum over S <= 384 terms, so its rounding error is about
# sqrt(S) * eps32 * |entry| ~ 20 * 1.2e-7 * |entry| ~ 2.4e-6 |entry|, with |entry| <= ~10 here.
# Observed: <= 4e-6 forward, <= 1.4e-5 for gradients of magnitude up to 11 (relative <= 2e-6).
# allclose checks |got - want| <= ATOL + RTOL |want|.
ATOL = RTOL = 2e-5


def dense_reference(q, k, v, scale, key_valid, causal):
    """-> (out [B, T, H, D], row_has_key [B, T]) straight from the contract, float32."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    groups = q.shape[2] // k.shape[1]
    k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)  # head h reads kv head h // groups
    scores = jnp.einsum("bthd,bhsd->bhts", q, k, precision="highest") * scale
    visible = key_valid[:, None, None, :]
    if causal:
        visible = visible & jnp.tril(jnp.ones(scores.shape[-2:], bool))
    visible = jnp.broadcast_to(visible, scores.shape)
    probs = jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1)
    return jnp.einsum("bhts,bhsd->bthd", probs, v, precision="highest"), visible.any(-1)[:, 0]


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    return (draw(batch, q_len, heads, head_dim), draw(batch, kv_heads, kv_len, head_dim),
            draw(batch, kv_heads, kv_len, head_dim), draw(batch, q_len, heads, head_dim))


def _check_against_reference(q, k, v, cot, key_valid, causal, scale):
    run = lambda q, k, v: splash.attention(q, k, v, scale, key_valid, causal=causal,  # noqa: E731
                                           block_q=128, block_kv=128, interpret=True)
    ref = lambda q, k, v: dense_reference(q, k, v, scale, key_valid, causal)[0]  # noqa: E731
    rows = dense_reference(q, k, v, scale, key_valid, causal)[1]
    weight = cot * rows[:, :, None, None]  # rows without a visible key are unspecified
    out, expected = jax.jit(run)(q, k, v), ref(q, k, v)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(np.asarray(out * rows[:, :, None, None]),
                               np.asarray(expected * rows[:, :, None, None]), atol=ATOL, rtol=RTOL)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * weight)  # noqa: E731
    grads = jax.jit(jax.grad(loss(run), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, got, exp in zip("qkv", grads, want):
        assert bool(jnp.isfinite(got).all()), name
        np.testing.assert_allclose(np.asarray(got), np.asarray(exp), atol=ATOL, rtol=RTOL, err_msg=f"d{name}")
    return out, rows


# 8 query heads on 2 kv heads: the grouping (h // 4, not h % 2) matters
HEADS = pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)], ids=["gqa4to1", "mha"])


@HEADS
def test_causal_left_padding_matches_dense(heads, kv_heads):
    """Text self-attention: rows left-padded by 0, 37 and 130 (more than a 128-block) tokens,
    the last also right-padded by 20, so queries without a visible key, padding keys and whole
    padding blocks all occur; T = 256 is two blocks each way."""
    q, k, v, cot = _inputs(0, 3, 256, 256, heads, kv_heads, 128)
    pos = np.arange(256)
    key_valid = jnp.asarray(np.stack([pos >= 0, pos >= 37, (pos >= 130) & (pos < 236)]))
    _, rows = _check_against_reference(q, k, v, cot, key_valid, causal=True, scale=128**-0.5)
    # a query before its row's first valid key has none; the right-padding queries do have some
    assert np.asarray(rows).sum(axis=1).tolist() == [256, 256 - 37, 256 - 130]


@HEADS
def test_noncausal_padded_keys_match_dense(heads, kv_heads):
    """Vision-like attention: head_dim 64, S = 384 keys of which 384, 200 and 129 are valid
    (padded patches at the end), and a fourth row with no valid key, which must stay finite.
    T = 256 != S checks the two lengths are not confused; scale 0.3 is not 1/sqrt(D)."""
    q, k, v, cot = _inputs(1, 4, 256, 384, heads, kv_heads, 64)
    key_valid = jnp.asarray(np.arange(384)[None] < np.array([[384], [200], [129], [0]]))
    out, rows = _check_against_reference(q, k, v, cot, key_valid, causal=False, scale=0.3)
    assert np.asarray(rows).tolist() == [[True] * 256] * 3 + [[False] * 256]
    assert bool(jnp.isfinite(out[3]).all())


def test_vmap_over_an_outer_batch_matches_per_slice():
    """The kernel vmaps (as over micro-batches): vmap over a leading axis == one call per slice."""
    q, k, v, _ = _inputs(2, 4, 128, 128, 2, 1, 128)
    key_valid = jnp.asarray(np.arange(128)[None] >= np.array([[0], [5], [64], [100]]))
    run = lambda q, k, v, valid: splash.attention(q, k, v, 0.1, valid, causal=True, interpret=True)  # noqa: E731
    split = lambda x: x.reshape(2, 2, *x.shape[1:])  # noqa: E731
    stacked = jax.vmap(run)(split(q), split(k), split(v), split(key_valid))
    for i in range(2):
        sl = slice(2 * i, 2 * i + 2)
        np.testing.assert_allclose(np.asarray(stacked[i]), np.asarray(run(q[sl], k[sl], v[sl], key_valid[sl])),
                                   atol=1e-6, rtol=1e-6)


def test_supported_and_block_choice():
    assert splash.supported((2, 4096, 32, 128), (2, 8, 4096, 128))
    assert splash.supported((1, 16384, 16, 64), (1, 16, 16384, 64))  # the vision tower at 4 MP
    assert not splash.supported((2, 4000, 32, 128), (2, 8, 4000, 128))  # length not a multiple of 128
    assert not splash.supported((2, 256, 32, 80), (2, 8, 256, 80))  # head_dim 80
    assert not splash.supported((2, 256, 6, 128), (2, 4, 256, 128))  # H % KV != 0
    assert splash._block(4096, 512) == 512
    assert splash._block(384, 512) == 384
    assert splash._block(640, 512) == 128  # 640 = 5 * 128: no 256..512 block divides it
    with pytest.raises(ValueError, match="supported"):
        splash.attention(*_inputs(0, 1, 100, 100, 2, 1, 128)[:3], 1.0, jnp.ones((1, 100), bool), causal=True)


def test_dispatch_off_tpu():
    """On this CPU host "auto" keeps the pure-JAX path; "splash" forces the kernel (which then
    runs in interpret mode); ModelConfig refuses an unknown name."""
    from vlcal_jax.models.config import ModelConfig

    text = ((2, 4096, 32, 128), (2, 8, 4096, 128))
    assert splash.target_platform() == "cpu"
    assert not splash.use_splash("auto", *text)
    assert splash.use_splash("splash", *text) and not splash.use_splash("xla", *text)
    with pytest.raises(ValueError, match="attention_impl"):
        splash.use_splash("flash", *text)
    assert ModelConfig().attention_impl == "auto"
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig(attention_impl="flash")


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed: pip install -e ".[fit]" to compile for TPU')


def _aot_temp_bytes(batch, length, heads, kv_heads, head_dim, causal):
    """Compile forward + backward for a TPU v4 2x2x1 slice (8 devices), the batch split over
    them via the context mesh; -> (per-device temp bytes, per-device dense float32 score bytes)."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices
    mesh = Mesh(np.array(devices), ("data",))
    split = NamedSharding(mesh, P("data"))

    def forward_backward(q, k, v, key_valid, cot):
        out, vjp = jax.vjp(lambda q, k, v: splash.sharded_attention(q, k, v, head_dim**-0.5, key_valid,
                                                                    causal=causal), q, k, v)
        return (out, *vjp(cot))

    arg = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=split)  # noqa: E731
    q = arg(batch, length, heads, head_dim)
    kv = arg(batch, kv_heads, length, head_dim)
    with jax.set_mesh(mesh):
        assert splash.target_platform() == "tpu" and splash.use_splash("auto", q.shape, kv.shape)
        compiled = jax.jit(forward_backward, out_shardings=split).lower(
            q, kv, kv, arg(batch, length, dtype=jnp.bool_), q).compile()
    assert 'custom_call_target="tpu_custom_call"' in compiled.as_text()  # Mosaic kernels, not interpret mode
    local_batch = batch // len(devices)
    return compiled.memory_analysis().temp_size_in_bytes, local_batch * heads * length * length * 4


@needs_libtpu
def test_text_attention_compiles_for_tpu_without_dense_scores():
    """Qwen3-VL-4B text attention at 4096 tokens (H=32, KV=8, D=128, bfloat16), causal, one row
    per device: 77 MB of scratch (mostly the kernel's [H, T, 128] float32 log-sum-exp output)
    against 2.1 GB of dense scores."""
    temp, dense = _aot_temp_bytes(8, 4096, 32, 8, 128, causal=True)
    assert temp < dense / 16, (temp, dense)


@needs_libtpu
def test_vision_attention_at_4mp_compiles_for_tpu():
    """The vision tower at the paper's 4 MP limit: 16384 patches, 16 heads of dim 64, no causal
    mask: head_dim 64 compiles; 0.60 GB of scratch against 17.2 GB of dense scores."""
    temp, dense = _aot_temp_bytes(8, 16384, 16, 16, 64, causal=False)
    assert temp < dense / 16, (temp, dense)


_SEQUENCE_SPLIT_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from vlcal_jax import parallel
from vlcal_jax.models import attention
rng = np.random.default_rng(0)
q = jnp.asarray(rng.normal(size=(1, 512, 4, 64)), jnp.float32)
k, v = (jnp.asarray(rng.normal(size=(1, 4, 384, 64)), jnp.float32) for _ in range(2))
valid = jnp.asarray(np.arange(384) < 300)[None]
cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
mesh = parallel.make_mesh(data=1, fsdp=4, tensor=1)
def grads(impl):
    def loss(q, k, v):
        return jnp.sum(attention.attention(q, k, v, 0.125, valid, causal=False, impl=impl) * cot)
    with jax.set_mesh(mesh):
        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        text = fn.lower(q, k, v).as_text()
        return fn(q, k, v), text
(ours, g_ours), text = grads("splash")
(ref, g_ref), _ = grads("xla")
assert "shard_map" in text or "sdy.manual_computation" in text, "the kernel did not run under a shard_map"
np.testing.assert_allclose(float(ours), float(ref), rtol=1e-5)
for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)
print("OK")
"""


def test_one_image_over_four_devices_splits_its_queries():
    """attention(impl="splash") under a 4-device mesh with a batch of one (one image per
    micro-batch, the update's case): the queries are split over the batch axes by shard_map,
    each device against all keys (interpret mode here), and value and q/k/v gradients equal the
    pure-JAX kernel's."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", _SEQUENCE_SPLIT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


@needs_libtpu
def test_model_dispatch_compiles_splash_for_tpu_and_falls_back_where_it_cannot():
    """attention.attention(impl="auto") under the v4-8 mesh `fit` builds ("data", "fsdp", "tensor"
    = 1 x 4 x 1): one 4096-patch image (non-causal, batch 1) runs splash with its queries split
    over the 4 chips; a causal row of batch 1 cannot split and compiles the blockwise kernel."""
    from vlcal_jax import parallel
    from vlcal_jax.fit import topology
    from vlcal_jax.models import attention

    mesh = parallel.make_mesh(data=1, fsdp=-1, tensor=1, devices=topology.devices(topology.get("v4-8")))

    def compiled_text(causal):
        q = jax.ShapeDtypeStruct((1, 4096, 16, 64), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((1, 16, 4096, 64), jnp.bfloat16)
        valid = jax.ShapeDtypeStruct((1, 4096), jnp.bool_)

        def forward_backward(q, k, v, key_valid):
            out, vjp = jax.vjp(lambda q, k, v: attention.attention(q, k, v, 0.125, key_valid, causal=causal,
                                                                   impl="auto"), q, k, v)
            return vjp(out)

        with jax.set_mesh(mesh):
            return jax.jit(forward_backward).lower(q, kv, kv, valid).compile().as_text()

    assert 'custom_call_target="tpu_custom_call"' in compiled_text(causal=False)
    assert 'custom_call_target="tpu_custom_call"' not in compiled_text(causal=True)
