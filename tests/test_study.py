"""The scene study (`python -m vlcal_jax.study`), one RL step per rung, as a user runs it from a
checkout; its aggregation and probes against hand-computed values."""

import json
import os

import numpy as np
from PIL import Image

from tests import test_readme_commands as readme
from vlcal_jax.training import study
from vlcal_jax.data import scenes

STUDY = "python -m vlcal_jax.study --config experiments/scene_study.py"
# the demo's model and world, shrunk (the overrides of the README demo test) to one RL step per rung;
# two rungs keep CI short: RLVR (plain format, no confidence) and + TAR (decoupled, R_vis, both probes)
RUNGS = ("rlvr", "tar")
TINY = ("--config.seeds=0, --config.rungs=rlvr,tar " + readme.SHORT.replace("--config.", "--config.base.")
        .replace("--config.base.rl.steps=4", "--config.base.rl.steps=1")
        .replace("--config.base.eval.every=2", "--config.base.eval.every=0")
        # the demo's warm-start image curriculum rides along (SHORT's one caption step, caption rows,
        # the inventory), here with a shorter caption length
        + " --config.base.sft.caption_length=24")


def test_study_smoke_runs_its_rungs_from_one_warm_start(tmp_path):
    cwd = readme.fresh_checkout(tmp_path)
    out = readme.run(f"{STUDY} {TINY}", cwd)
    root = os.path.join(cwd, "outputs", "scene_study")
    for name in ("study.json", "study.md", "study.png", "shared/warm_start", "shared/tokenizer/tokenizer.json"):
        assert os.path.exists(os.path.join(root, name)), name
    with open(os.path.join(root, "study.json"), encoding="utf-8") as f:
        result = json.load(f)
    assert sorted(result["runs"]) == sorted(f"{r}/seed0" for r in RUNGS)
    for rung in RUNGS:
        run_dir = os.path.join(root, "runs", rung, "seed0")
        # every rung restored the one warm start (linked, not recomputed)
        assert os.path.realpath(os.path.join(run_dir, "warm_start")) == os.path.realpath(
            os.path.join(root, "shared", "warm_start"))
        assert os.path.exists(os.path.join(run_dir, "model", "model.safetensors"))
        figures = result["runs"][f"{rung}/seed0"]
        assert 0.0 <= figures["accuracy"] <= 1.0 and 0.0 <= figures["accuracy_without_image"] <= 1.0
        if rung == "rlvr":  # no stated confidence in the plain format
            assert figures["confidence_with_image"] is None and figures.get("ece") is None
            assert figures.get("perception_accuracy") is None  # no <vision> span in that format: no figure
    assert "warm start restored" in out and "caption stage done: 1 steps" in out
    table = open(os.path.join(root, "study.md"), encoding="utf-8").read()
    assert all(study.LABELS[r] in table for r in RUNGS)
    if "tar/seed0" in result["runs"]:
        assert "soft_label_auroc" in result["runs"]["tar/seed0"]


def test_aggregate_and_table_are_mean_and_sample_std_over_seeds():
    results = {"rungs": ["rlcr", "tar"], "seeds": [0, 1, 2], "runs": {
        "rlcr/seed0": {"accuracy": 0.5, "ece": 0.2}, "rlcr/seed1": {"accuracy": 0.7, "ece": 0.1},
        "rlcr/seed2": {"accuracy": 0.6, "ece": None}, "tar/seed0": {"accuracy": 0.9}}}
    stats = study.aggregate(results)
    assert stats["rlcr"]["accuracy"] == (np.mean([0.5, 0.7, 0.6]), np.std([0.5, 0.7, 0.6], ddof=1), 3)
    assert stats["rlcr"]["ece"][:2] == (0.15000000000000002, np.std([0.2, 0.1], ddof=1))
    table = study.summary_table(results)
    assert "| RLCR | 3 | 0.600 ± 0.100 | 0.150 ± 0.071 |" in table
    assert "| + TAR | 1 | 0.900 | - |" in table


def test_blank_image_is_the_empty_canvas():
    sample = scenes.generate_sample(0, 0, scenes.SceneConfig(image_size=32))
    blank = study.blank_image(sample.image)
    assert blank.size == sample.image.size
    assert np.all(np.asarray(blank) == np.asarray(scenes.render_scene(scenes.Scene(32, ()))))
    assert not np.all(np.asarray(sample.image) == np.asarray(blank))
    assert isinstance(blank, Image.Image)


def test_rung_names_split_the_command_line_string_and_typos_fail_before_the_warm_start(tmp_path):
    assert study.rung_names("rlvr,tar") == ["rlvr", "tar"]
    assert study.rung_names(("rlvr,tar",)) == ["rlvr", "tar"]
    assert study.rung_names(("rlvr", " vce ")) == ["rlvr", "vce"]
    import ml_collections
    import pytest
    bad = ml_collections.ConfigDict({"rungs": ("rlvr,tra",), "seeds": (0,), "workdir": str(tmp_path), "base": {}})
    with pytest.raises(ValueError, match="unknown rung 'tra'"):
        study.run_study(bad)
