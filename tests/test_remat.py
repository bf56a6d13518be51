"""Remat and its host offload change where the backward pass's residuals live, not what it computes:
gradients of the whole model (vision tower, DeepStack, decoder, LM head) with remat, and with the
layer inputs offloaded to pinned host memory, equal the plain backward pass; the offloaded program
really places them on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rl_utils as U
from vlcal_jax import models


def _loss_and_grads(config, params, inputs, cotangent):
    def loss(p):
        return jnp.sum(models.apply(config, p, inputs) * cotangent)

    return jax.jit(jax.value_and_grad(loss), compiler_options=U.FAST)(params)


@pytest.fixture(scope="module")
def problem():
    config = U.tiny_config(layers=3, depth=3, deepstack=(0, 1))
    params = jax.tree.map(jnp.asarray, U.random_params(config, seed=3, std=0.1))
    inputs, _ = U.rollout_inputs(config, prompts=2, n=2, response_len=6, prompt_len=20)
    inputs = jax.tree.map(jnp.asarray, inputs)
    shape = jax.eval_shape(lambda: models.apply(config, params, inputs)).shape
    cotangent = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    return config, params, inputs, cotangent


def test_remat_and_offloaded_remat_give_the_plain_gradients(problem):
    config, params, inputs, cotangent = problem
    plain = _loss_and_grads(config, params, inputs, cotangent)
    remat = _loss_and_grads(config.replace(remat=True), params, inputs, cotangent)
    offload = _loss_and_grads(config.replace(remat=True, remat_offload=True), params, inputs, cotangent)
    flat = [jax.tree.leaves(x) for x in (plain, remat, offload)]
    assert len(flat[0]) > 10
    for ref, a, b in zip(*flat):
        scale = max(1.0, float(jnp.max(jnp.abs(ref))))
        # a recomputed forward pass is the same float32 arithmetic; XLA may fuse it differently
        np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=0, atol=1e-5 * scale)
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))  # offloading moves bytes, not values


def test_offloaded_remat_moves_the_layer_inputs_to_host(problem):
    """One device -> host copy per layer scan (three vision scans split at the DeepStack layers,
    one decoder scan); the CPU backend then compiles them as copies within the same RAM, while on
    TPU they are HBM -> host DMAs (fit's compiles show the HBM they free)."""
    config, params, inputs, cotangent = problem

    def host_puts(cfg):
        def loss(p):
            return jnp.sum(models.apply(cfg, p, inputs) * cotangent)
        return str(jax.make_jaxpr(jax.grad(loss))(params)).count("MemorySpace.Host")

    assert host_puts(config.replace(remat=True, remat_offload=True)) == 4
    assert host_puts(config.replace(remat=True)) == 0


def test_offload_without_remat_is_a_clear_error():
    with pytest.raises(ValueError, match="remat=True"):
        U.tiny_config().replace(remat_offload=True)
