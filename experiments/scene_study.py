"""The scene study (issue: does the label-free S_vis track real perception errors?): the paper's
ablation ladder RLVR -> RLCR -> + decoupling -> + VCE -> + TAR (PAPER.md section 7) trained on
the scene world from ONE warm start, over three seeds, with cpu_demo's world, model and schedule.

    python -m vlcal_jax.study --config experiments/scene_study.py

Writes outputs/scene_study/study.md (mean +- std per rung), study.png and study.json; each
run's own outputs are under outputs/scene_study/runs/<rung>/seed<k>/. See vlcal_jax/study.py.
"""

import os

import ml_collections

from vlcal_jax.configs import experiment_config
from vlcal_jax.training.study import RUNGS


def get_config():
    c = ml_collections.ConfigDict()
    c.workdir = "outputs/scene_study"
    c.rungs = tuple(RUNGS)
    c.seeds = (0, 1, 2)
    c.base = experiment_config(os.path.join(os.path.dirname(__file__), "cpu_demo.py"))
    return c.lock()
