"""experiments/*.py: the named configs change exactly what their names say."""

import importlib.util
import os

import pytest

from vlcal_jax.rl import losses, rewards

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flatten(config, prefix=""):
    """ConfigDict -> {"rl.loss": value, ...} over every leaf."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return out


def test_each_ablation_changes_exactly_the_one_field_it_names():
    ablations = load("ablations")
    full = flatten(ablations.get_config("full"))
    for field, value in ablations.FULL.items():
        assert full[field] == value, field
    seen = set()
    for name, changes in ablations.ABLATIONS.items():
        assert len(changes) == (name != "full"), f"{name} must change one mechanism, changes {sorted(changes)}"
        config = flatten(ablations.get_config(name))
        differing = {k for k in full.keys() | config.keys() if full.get(k) != config.get(k)} - {"workdir"}
        assert differing == set(changes), name
        assert all(config[k] == v for k, v in changes.items()), name
        assert config["workdir"] == f"outputs/ablation_{name}"
        losses.get(config["rl.loss"]), rewards.get(config["rl.reward"])
        seen.add(tuple(sorted(changes.items())))
    assert len(seen) == len(ablations.ABLATIONS)
    with pytest.raises(ValueError, match="unknown ablation"):
        ablations.get_config("no_such_thing")
