"""models.nnx: the flax.nnx view of Qwen3-VL vs the pure forward, transformers, nnx.split/merge,
nnx.jit, nnx.grad and an optax step through nnx.Optimizer (the step tunix's trainers run)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hf_utils as H
from test_models import TOL, assert_close_to_hf
from vlcal_jax import models
from vlcal_jax.models import qwen3_vl

GRIDS = [(1, 4, 4), (1, 6, 2)]
ROWS = [[0], [1], []]  # two image rows and a left-padded text row


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """An untied head (all three top-level keys: visual, text, lm_head), GQA 2:1, DeepStack; one
    ViT block and two decoder layers keep the gradient programs' compile times short."""
    cfg = H.tiny_hf_config(tie=False, kv_heads=2, layers=2, vision_depth=1, deepstack=(0,))
    model = H.make_hf_model(cfg, seed=21)
    path = str(tmp_path_factory.mktemp("nnx_hf"))
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def batch(hf_checkpoint):
    config = models.load_config(hf_checkpoint[1])
    return H.make_batch(np.random.default_rng(22), GRIDS, ROWS, patch_dim=config.vision.patch_dim)


def _nll(logits, input_ids, attention_mask):
    """Mean next-token NLL over the valid positions of [B, T] ids under logits [B, T, V]."""
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token = jnp.take_along_axis(logp, jnp.asarray(input_ids)[:, 1:, None], axis=-1)[..., 0]
    valid = jnp.asarray(attention_mask)[:, 1:] > 0
    return -jnp.sum(jnp.where(valid, token, 0.0)) / jnp.sum(valid)


def test_module_holds_our_params_and_its_logits_equal_forward_and_transformers(hf_checkpoint, batch):
    hf, path = hf_checkpoint
    module = models.nnx.Qwen3VL.from_pretrained(path)
    config, params = models.from_pretrained(path)
    leaves = jax.tree.leaves(nnx.state(module), is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves and all(type(v) is nnx.Param for v in leaves)
    chex.assert_trees_all_equal(module.to_params(), params)
    logits = module(*batch)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(models.forward(config, params, *batch)))
    assert_close_to_hf(logits, H.hf_logits(hf, *batch), batch[1])


def test_split_state_to_params_saves_a_checkpoint_transformers_reads(hf_checkpoint, batch, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    hf, path = hf_checkpoint
    graphdef, state = nnx.split(models.nnx.Qwen3VL.from_pretrained(path))
    # Edit a weight in the nnx state: the saved checkpoint can only have it from the state.
    kernel = state["text"]["layers"]["mlp"]["down_proj"]["kernel"]
    kernel[...] = kernel[...] + 0.05 * jax.random.normal(jax.random.key(0), kernel.shape)
    params = models.nnx.params_from_state(state)
    assert jax.tree.structure(params) == jax.tree.structure(models.from_pretrained(path)[1])
    merged = nnx.merge(graphdef, state)
    logits = np.asarray(merged(*batch))
    np.testing.assert_array_equal(logits, np.asarray(models.forward(merged.config, params, *batch)))

    out = str(tmp_path / "from_nnx")
    models.save_pretrained(merged.config, params, out)
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
    assert_close_to_hf(logits, H.hf_logits(reloaded, *batch), batch[1])
    original, valid = H.hf_logits(hf, *batch), batch[1].astype(bool)
    assert np.abs(logits - original)[valid].max() > 100 * TOL * np.abs(original[valid]).max()
    _, again = models.from_pretrained(out)
    chex.assert_trees_all_equal(again, params)


def test_nnx_jit_and_grad_equal_the_pure_forward_and_trace_once(hf_checkpoint, batch):
    config, params = models.from_pretrained(hf_checkpoint[1])
    module = models.nnx.Qwen3VL(config, params)
    # prepared inputs: the traced form (a processor batch's rotary positions are host-side)
    inputs = models.prepare_inputs(config, *batch)
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, x: m(x))(module, inputs)),
                                  np.asarray(models.apply_jit(config, params, inputs)))

    def nll(logits):
        return _nll(logits, inputs.input_ids, inputs.attention_mask)

    chex.clear_trace_counter()

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def nnx_value_and_grad(module, inputs):
        return nnx.value_and_grad(lambda m: nll(m(inputs)))(module)

    @jax.jit
    def pure_value_and_grad(params, inputs):
        return jax.value_and_grad(lambda p: nll(qwen3_vl.apply(config, p, inputs)))(params)

    other = jax.tree.map(lambda x: 1.01 * x, params)  # same shapes, other values: no new trace
    for p in (params, other):
        loss, grads = nnx_value_and_grad(models.nnx.Qwen3VL(config, p), inputs)
        expected_loss, expected = pure_value_and_grad(p, inputs)
        assert isinstance(grads, nnx.State)
        assert float(loss) == float(expected_loss)
        chex.assert_trees_all_equal(models.nnx.params_from_state(grads), expected)
    assert float(optax.tree.norm(expected)) > 0


def test_an_optax_step_through_nnx_optimizer_equals_the_pure_step(hf_checkpoint, batch):
    """The update of tunix's PeftTrainer._train_step (nnx.value_and_grad of a loss of the module,
    nnx.Optimizer(model, tx, wrt=nnx.Param).update, one nnx.jit donating the optimizer) applied to
    our module == the same optax transformation applied to our params pytree."""
    config, params = models.from_pretrained(hf_checkpoint[1])
    inputs = models.prepare_inputs(config, *batch)
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    module = models.nnx.Qwen3VL(config, params)
    optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)

    def loss_fn(model, inputs):
        return _nll(model(inputs), inputs.input_ids, inputs.attention_mask)

    @nnx.jit(donate_argnames=("optimizer",))
    def train_step(model, optimizer, inputs):
        loss, grads = nnx.value_and_grad(loss_fn)(model, inputs)
        optimizer.update(model, grads)
        return loss

    @jax.jit
    def pure_step(params, opt_state, inputs):
        loss, grads = jax.value_and_grad(
            lambda p: _nll(qwen3_vl.apply(config, p, inputs), inputs.input_ids, inputs.attention_mask))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    pure, opt_state = params, tx.init(params)
    for _ in range(2):
        loss = train_step(module, optimizer, inputs)
        pure, opt_state, expected = pure_step(pure, opt_state, inputs)
        assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    chex.assert_trees_all_close(module.to_params(), pure, rtol=1e-6, atol=1e-7)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), module.to_params(), params)
    assert min(jax.tree.leaves(moved)) > 0


def test_call_checks_prepared_inputs_and_refuses_extra_arguments(hf_checkpoint, batch):
    config, params = models.from_pretrained(hf_checkpoint[1])
    module = models.nnx.Qwen3VL(config, params)
    inputs = models.prepare_inputs(config, *batch)
    with pytest.raises(AssertionError, match=r"\[inputs.position_ids must be \[3, B, T\]"):
        module(inputs._replace(position_ids=inputs.position_ids[0]))
    with pytest.raises(ValueError, match="pass them alone"):
        module(inputs, batch[1])
    with pytest.raises(AssertionError, match=r"\[input_ids must be \[B, T\] int\]"):
        module(batch[0][0])
