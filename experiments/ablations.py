"""The ablation ladder of PAPER.md section 7 on the scene world (CPU), as named configs:

    python -m vlcal_jax.train --config experiments/ablations.py:no_tar

"full" is the method, stated once in FULL on cpu_demo's model, data and schedule: the
VL-Calibration reward with R_vis from soft labels of the exact VCE estimators (full-vocabulary
KL and entropy, section 4) under patch blackout, and the paper's TAR with every response token
in the policy gradient (section 5). Each ablation changes exactly one field, one mechanism:

    no_tar        TAR removed: plain GRPO advantages                    rl.loss
    released_tar  TAR swapped for the released k3 / -log p weights      rl.loss
    no_r_vis      R_vis removed: decoupled confidences without visual   rl.reward_weights.lambda_vis
                  supervision
    released_vce  soft labels from the released sampled-token proxies   rl.soft_label_variant
    noise, grey   other VCE image perturbations (section 4 ablation)    rl.vce_kind

The released run's top-20% perception filter is not part of "full": on a model trained from
scratch it drops the confidence tokens from the gradient (see cpu_demo.py), so the stated
confidences would never be trained; `rl.loss="vl_calibration"` runs it.
"""

import importlib.util
import os

FULL = {
    "rl.reward": "vl_calibration",
    "rl.reward_weights.lambda_vis": 0.4,
    "rl.soft_label_variant": "paper",
    "rl.vce_kind": "blackout",
    "rl.loss": "vl_calibration_paper",
}

ABLATIONS = {
    "full": {},
    "no_tar": {"rl.loss": "grpo"},
    "released_tar": {"rl.loss": "vl_calibration_no_filter"},
    "no_r_vis": {"rl.reward_weights.lambda_vis": 0.0},
    "released_vce": {"rl.soft_label_variant": "released"},
    "noise": {"rl.vce_kind": "noise"},
    "grey": {"rl.vce_kind": "grey"},
}


def _cpu_demo():
    spec = importlib.util.spec_from_file_location("cpu_demo", os.path.join(os.path.dirname(__file__), "cpu_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(name: str = "full"):
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {sorted(ABLATIONS)}")
    c = _cpu_demo()
    c.workdir = f"outputs/ablation_{name}"
    c.update_from_flattened_dict(FULL)
    c.update_from_flattened_dict(ABLATIONS[name])
    return c
