"""Baselines of PAPER.md sections 3 and 7 on the scene world (CPU): pick one with --config.name.

    python -m vlcal_jax.train --config experiments/baselines.py:rlcr
    python -m vlcal_jax.train --config experiments/baselines.py:rlvr

rlvr: accuracy reward only, plain format. rlcr: one holistic confidence (Damani et al. 2025).
rlcr_vlm: the authors' VLM variant of RLCR. The model and data are those of cpu_demo.
"""

import importlib.util
import os

import ml_collections


def _cpu_demo():
    spec = importlib.util.spec_from_file_location("cpu_demo", os.path.join(os.path.dirname(__file__), "cpu_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


BASELINES = {
    "rlvr": dict(reward="rlvr", mode="plain", prompt="plain", loss="grpo"),
    "rlcr": dict(reward="rlcr", mode="rlcr", prompt="rlcr", loss="grpo"),
    "rlcr_vlm": dict(reward="rlcr_vlm", mode="rlcr", prompt="rlcr", loss="grpo"),
}


def get_config(name: str = "rlcr"):
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    c = _cpu_demo()
    c.workdir = f"outputs/baseline_{name}"
    c.rl.update(BASELINES[name])
    c.rl.reward_weights = ml_collections.ConfigDict().lock()  # these rewards take no weights
    return c
