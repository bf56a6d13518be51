"""The training CLI end to end on a tiny config: outputs, determinism, resume, bad checkpoints."""

import importlib.util
import json
import os
import shutil

import pytest

from vlcal_jax import train
from vlcal_jax.training import logs


def tiny_config(workdir):
    spec = importlib.util.spec_from_file_location(
        "cpu_demo", os.path.join(os.path.dirname(__file__), "..", "experiments", "cpu_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.workdir = str(workdir)
    c.data.num_examples = 40
    c.data.path = str(workdir.parent / "scenes")  # shared by every run of this module
    c.model.init.text.num_hidden_layers = 1
    c.model.init.vision.depth = 1
    c.sft.steps = 2
    c.sft.batch_size = 4
    c.rl.steps = 2
    c.rl.prompts_per_step = 2
    c.rl.samples_per_prompt = 2
    c.rl.max_new_tokens = 16
    c.rl.logprob_chunk = 16
    c.eval.size = 4
    c.eval.every = 0
    c.eval.batch_size = 4
    c.checkpoint.every = 1
    return c


def rl_rows(workdir):
    return [r for r in logs.read_metrics(str(workdir)) if "reward/reward" in r]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "a"
    summary = train.run(tiny_config(workdir))
    return workdir, summary


def test_run_writes_everything(first_run):
    workdir, summary = first_run
    for name in ("metrics.jsonl", "summary.json", "config.json", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json", "model/preprocessor_config.json", "training_curves.png"):
        assert os.path.exists(workdir / name), name
    assert os.listdir(workdir / "tb")
    assert {"accuracy", "ece"} <= set(summary["after_rl"])
    rows = rl_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("update/loss", "update/grad_norm", "reward/reward", "vce/vision_kl", "time/rollout_s"):
        assert key in rows[0], key
    with open(workdir / "summary.json") as f:
        assert json.load(f)["model_dir"].endswith("model")


def test_same_seed_same_metrics_bit_for_bit(first_run, tmp_path):
    workdir, _ = first_run
    train.run(tiny_config(tmp_path / "b"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(rl_rows(tmp_path / "b")) == strip(rl_rows(workdir))


def test_resume_continues_and_skips_a_corrupt_checkpoint(first_run, tmp_path):
    workdir, _ = first_run
    resumed = tmp_path / "c"
    shutil.copytree(workdir, resumed)
    # corrupt the newest checkpoint: the run must fall back to the one before it
    newest = resumed / "checkpoints" / "2"
    for root, _, files in os.walk(newest):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    config = tiny_config(resumed)
    config.rl.steps = 3
    config.eval.before_rl = False
    train.run(config)
    steps = [r["step"] for r in rl_rows(resumed)]
    # steps 1-2 from the first run, then 2 again (resumed from checkpoint 1) and 3
    assert steps == [1, 2, 2, 3]
