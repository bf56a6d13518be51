"""The ablation ladder of PAPER.md section 7 on the scene world (CPU), as named configs:

    python -m vlcal_jax.train --config experiments/ablations.py:no_tar

full: VL-Calibration as released (TAR + perception filter, exact VCE labels).
no_tar / no_filter: drop one mechanism. paper_tar: the paper's per-token TAR form.
released_vce: soft labels from the released sampled-token estimators.
noise / grey: other image perturbations for VCE (section 4 ablation).
no_vce: lambda_vis = 0 (decoupled confidences without visual supervision).
"""

import importlib.util
import os

ABLATIONS = {
    "full": {},
    "no_tar": dict(loss="vl_calibration_no_tar"),
    "no_filter": dict(loss="vl_calibration_no_filter"),
    "paper_tar": dict(loss="vl_calibration_paper"),
    "released_vce": dict(soft_label_variant="released"),
    "noise": dict(vce_kind="noise"),
    "grey": dict(vce_kind="grey"),
    "no_vce": dict(loss="grpo"),
}


def get_config(name: str = "full"):
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose one of {sorted(ABLATIONS)}")
    spec = importlib.util.spec_from_file_location("cpu_demo", os.path.join(os.path.dirname(__file__), "cpu_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.workdir = f"outputs/ablation_{name}"
    c.rl.update(ABLATIONS[name])
    if name == "no_vce":
        c.rl.reward_weights.lambda_vis = 0.0
    return c
