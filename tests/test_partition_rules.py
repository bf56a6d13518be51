"""parallel: regex partition rules cover Qwen3-VL params exactly, spec fitting, mesh construction,
activation constraints (logical dims -> the context mesh)."""

import re

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

import rl_utils as U
from vlcal_jax import models, parallel

TINY = {
    "tied_nobias_ds1": dict(tie=True, bias=False, deepstack=(0,)),
    "untied_bias_ds2": dict(tie=False, bias=True, deepstack=(0, 1)),
    "tied_bias_nods": dict(tie=True, bias=True, deepstack=()),
    "untied_nobias_nods": dict(tie=False, bias=False, deepstack=()),
}


def _released(name: str) -> models.ModelConfig:
    """Param shapes of the released Qwen3-VL-4B / 8B-Instruct checkpoints (their config.json)."""
    if name == "4b":
        vision = models.VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                                     out_hidden_size=2560, deepstack_visual_indexes=(5, 11, 17))
        text = models.TextConfig(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36)
        return models.ModelConfig(vision=vision, text=text, tie_word_embeddings=True)
    vision = models.VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                                 out_hidden_size=4096, deepstack_visual_indexes=(8, 16, 24))
    text = models.TextConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36)
    return models.ModelConfig(vision=vision, text=text, tie_word_embeddings=False)


def _shapes(config):
    """Abstract params (no arrays are materialised)."""
    return jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))


def _paths(tree) -> dict[str, tuple[int, ...]]:
    return {parallel.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def trees():
    configs = {k: U.tiny_config(**v) for k, v in TINY.items()}
    configs["4b"], configs["8b"] = _released("4b"), _released("8b")
    return {k: (c, _shapes(c)) for k, c in configs.items()}


def _mesh(data, fsdp, tensor):
    return AbstractMesh((data, fsdp, tensor), parallel.AXES)


def test_every_param_matches_exactly_one_rule_of_its_rank(trees):
    for name, (_, tree) in trees.items():
        for path, shape in _paths(tree).items():
            hits = [(pattern, spec) for pattern, spec in parallel.QWEN3_VL_RULES if re.search(pattern, path)]
            assert len(hits) == 1, f"{name}: {path} matches {len(hits)} rules: {[h[0] for h in hits]}"
            assert len(hits[0][1]) == len(shape), f"{name}: {path} {shape} vs rule {hits[0]}"


def test_no_rule_is_dead_and_each_config_leaves_only_its_missing_features(trees):
    dead_everywhere = set(parallel.unused_rules(trees["tied_nobias_ds1"][1]))
    for name, (config, tree) in trees.items():
        unused = set(parallel.unused_rules(tree))
        dead_everywhere &= unused
        expected = {pattern for pattern, _ in parallel.QWEN3_VL_RULES
                    if (config.tie_word_embeddings and pattern.startswith("^lm_head"))
                    or (not config.vision.deepstack_visual_indexes and "deepstack" in pattern)
                    or (not config.text.attention_bias and pattern.startswith("^text/layers/attn/")
                        and pattern.endswith("/bias$"))}
        assert unused == expected, f"{name}: unexpectedly unused {unused - expected}, used {expected - unused}"
    assert not dead_everywhere, f"rules matching no parameter of any config: {sorted(dead_everywhere)}"


def test_tiny_configs_keep_every_rule_axis_when_dimensions_divide(trees):
    mesh = _mesh(2, 4, 2)
    for name, (_, tree) in trees.items():
        if name in ("4b", "8b"):
            continue
        for path, shape in _paths(tree).items():
            rule = next(spec for pattern, spec in parallel.QWEN3_VL_RULES if re.search(pattern, path))
            assert parallel.spec_for(path, shape, mesh) == rule, path


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2), (2, 8, 4)])
def test_released_models_shard_every_large_matrix_over_fsdp(trees, shape):
    """ZeRO-3 memory: on these meshes no matrix of >= 4M parameters of 4B / 8B stays whole on fsdp."""
    mesh = _mesh(*shape)
    for name in ("4b", "8b"):
        for path, dims in _paths(trees[name][1]).items():
            if np.prod(dims) < 4 * 2**20:
                continue
            spec = parallel.spec_for(path, dims, mesh)
            axes = {a for entry in spec if entry is not None for a in np.atleast_1d(entry)}
            assert "fsdp" in axes, f"{name} {path} {dims} on mesh {shape}: {spec}"


def test_spec_for_drops_axes_that_do_not_divide():
    mesh = _mesh(2, 4, 2)
    assert parallel.spec_for("text/embed", (320, 64), mesh) == P("tensor", "fsdp")
    assert parallel.spec_for("text/embed", (321, 64), mesh) == P(None, "fsdp")
    assert parallel.spec_for("text/embed", (320, 66), mesh) == P("tensor", None)
    assert parallel.spec_for("text/layers/attn/q_proj/kernel", (3, 64, 12), _mesh(1, 8, 8)) == P(None, "fsdp", None)
    # a spec entry naming several mesh axes needs the product of their sizes to divide
    rules = ((r"^w$", P(("fsdp", "tensor"), None)),)
    assert parallel.spec_for("w", (16, 3), mesh, rules) == P(("fsdp", "tensor"), None)
    assert parallel.spec_for("w", (12, 3), mesh, rules) == P(None, None)


def test_spec_for_errors_name_the_parameter():
    mesh = _mesh(1, 2, 1)
    with pytest.raises(ValueError, match="no partition rule matches parameter text/extra"):
        parallel.spec_for("text/extra", (4, 4), mesh)
    with pytest.raises(ValueError, match=r"rank 2 but text/embed has shape \(4, 4, 4\)"):
        parallel.spec_for("text/embed", (4, 4, 4), mesh)


def test_make_mesh_shapes_and_errors():
    device = jax.devices()[0]
    mesh = parallel.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": len(jax.devices()), "tensor": 1}
    assert tuple(mesh.axis_names) == parallel.AXES
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        parallel.make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="3 devices cannot be split into mesh"):
        parallel.make_mesh(2, -1, 1, devices=[device] * 3)
    with pytest.raises(ValueError, match="needs 4 devices, have 1"):
        parallel.make_mesh(2, 2, 1, devices=[device])


def test_shard_params_places_every_leaf_with_its_rule_spec():
    config = U.tiny_config(tie=False, bias=True)
    params = U.random_params(config)
    mesh = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    sharded = parallel.shard_params(params, mesh)
    for (path, leaf), (_, value) in zip(jax.tree_util.tree_flatten_with_path(sharded)[0],
                                        jax.tree_util.tree_flatten_with_path(params)[0]):
        assert leaf.sharding.spec == parallel.spec_for(parallel.path_str(path), leaf.shape, mesh)
        np.testing.assert_array_equal(np.asarray(leaf), value)


def test_constrain_is_a_no_op_without_a_mesh():
    x = np.zeros((16, 3, 6), np.float32)
    assert parallel.constrain(x, "batch", None, "tensor") is x
    assert parallel.shards("batch") == parallel.shards("tensor") == 1


@pytest.mark.parametrize("shape, spec", [
    ((16, 3, 6), P(("data", "fsdp"), None, "tensor")),
    # 6 rows do not split 8 ways, 5 columns not 2 ways: left to XLA, not forced whole
    ((6, 3, 5), P(P.UNCONSTRAINED, None, P.UNCONSTRAINED)),
])
def test_constrain_maps_logical_dims_to_the_context_mesh(shape, spec):
    mesh = AbstractMesh((2, 4, 2), parallel.AXES, axis_types=(AxisType.Auto,) * 3)
    with jax.sharding.use_abstract_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda x: parallel.constrain(x, "batch", None, "tensor"))(np.zeros(shape, np.float32))
        assert parallel.shards("batch") == 8 and parallel.shards("tensor") == 2
    (eqn,) = jaxpr.eqns
    assert eqn.primitive.name == "sharding_constraint" and eqn.params["sharding"].spec == spec


def test_constrain_drops_mesh_axes_of_size_one():
    mesh = AbstractMesh((1, 8, 1), parallel.AXES, axis_types=(AxisType.Auto,) * 3)
    with jax.sharding.use_abstract_mesh(mesh):
        jaxpr = jax.make_jaxpr(lambda x: parallel.constrain(x, "batch", "tensor"))(np.zeros((8, 5), np.float32))
    assert jaxpr.eqns[0].params["sharding"].spec == P("fsdp", None)
