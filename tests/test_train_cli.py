"""The training CLI end to end on a tiny config: outputs, determinism, resume, bad checkpoints."""

import importlib.util
import json
import os
import shutil
import signal

import fsspec
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fsspec.implementations.local import LocalFileSystem

from vlcal_jax.rl import step
from vlcal_jax.training import checkpoints, logs, loop, warm


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
    c.sft.caption_steps = 1  # the demo's image curriculum, one step of its caption stage
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


def recording_teacher(monkeypatch, texts: list):
    """Records every warm-start batch's teacher responses (after the confidence draws)."""
    real = warm.teacher_rows
    monkeypatch.setattr(warm, "teacher_rows", lambda config, examples, responses, pairs: (
        texts.append(list(responses)), real(config, examples, responses, pairs))[1])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("runs") / "a"
    with pytest.MonkeyPatch.context() as patch:
        recording_teacher(patch, FIRST_RUN_TEACHER)
        summary = loop.run(tiny_config(workdir))
    return workdir, summary


FIRST_RUN_TEACHER: list = []  # first_run's teacher batches


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
    loop.run(tiny_config(tmp_path / "b"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(rl_rows(tmp_path / "b")) == strip(rl_rows(workdir))


def test_reference_model_in_host_memory_changes_nothing(first_run, tmp_path, monkeypatch):
    """model.offload_reference: the frozen reference lives in pinned host memory and is copied to
    the device for each scoring pass; the metrics are the on-device run's, bit for bit."""
    from vlcal_jax.training import model_setup

    kinds = []
    real = model_setup.to_memory
    monkeypatch.setattr(model_setup, "to_memory", lambda tree, kind: kinds.append(kind) or real(tree, kind))
    config = tiny_config(tmp_path / "offload")
    config.model.offload_reference = True
    loop.run(config)
    assert kinds == ["pinned_host", "device", "device"]  # once at start, then once per RL step
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(rl_rows(tmp_path / "offload")) == strip(rl_rows(first_run[0]))


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
    loop.run(config)
    rows = rl_rows(resumed)
    # resumed from checkpoint 1: step 2 is redone (its old row replaced, with the same metrics), then 3
    assert [r["step"] for r in rows] == [1, 2, 3]
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(r) for r in rows[:2]] == [strip(r) for r in rl_rows(workdir)]


def test_calibration_levers_resume_bit_for_bit(first_run, tmp_path, monkeypatch):
    """rl.untie_head, rl.score_lr_scale, rl.confidence_entropy_bonus and rl.score_level_split (none
    the paper's) together: the split's direction is taken at the first step and kept in the
    checkpoint, so a run that redoes step 2 from checkpoint 1 repeats it bit for bit (a direction
    lost or taken again from step 2's rollouts would change it)."""
    from vlcal_jax.rl import rollout

    # the tiny model states no score in 16 tokens: let every response's first token stand for one
    real = rollout.confidence_token_mask
    monkeypatch.setattr(rollout, "confidence_token_mask", lambda tokenizer, tokens, lengths, mode="decoupled": (
        real(tokenizer, tokens, lengths, mode) | (np.arange(np.shape(tokens)[1])[None] == 0)))
    directions = []
    real_set = step.set_score_direction
    monkeypatch.setattr(step, "set_score_direction", lambda state, d: directions.append(np.asarray(d)) or
                        real_set(state, d))

    def levers(workdir):
        config = tiny_config(workdir)
        config.rl.post_answer_advantage = "reward_to_go"
        config.rl.untie_head = True
        config.rl.score_lr_scale = 200.0
        config.rl.confidence_entropy_bonus = 0.3
        config.rl.score_level_split = True
        return config

    workdir = tmp_path / "levers"
    workdir.mkdir()
    shutil.copytree(first_run[0] / "warm_start", workdir / "warm_start")
    loop.run(levers(workdir))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    rows = strip(rl_rows(workdir))
    assert rows != strip(rl_rows(first_run[0]))  # the levers change the update
    assert len(directions) == 1 and np.linalg.norm(directions[0]) > 0  # set once, at step 1
    shutil.rmtree(workdir / "checkpoints" / "2")
    loop.run(levers(workdir))
    assert len(directions) == 1  # restored with checkpoint 1, not taken again
    assert strip(rl_rows(workdir)) == rows


def test_score_expectation_runs_and_resumes_bit_for_bit(first_run, tmp_path, monkeypatch):
    """rl.score_expectation (not the paper's) through the loop: the batch carries the digits'
    advantages, the update changes, and a run that redoes step 2 from checkpoint 1 repeats it."""
    from vlcal_jax.rl import rollout

    # the tiny model states no score in 16 tokens: let every response's first token stand for one
    real = rollout.score_counterfactuals

    def first_token_scores(tokenizer, tokens, lengths, mode="decoupled"):
        positions, texts, counterfactual = real(tokenizer, tokens, lengths, mode)
        return np.where(positions < 0, 0, positions).astype(np.int32), texts, counterfactual

    monkeypatch.setattr(rollout, "score_counterfactuals", first_token_scores)

    def expectation(workdir):
        config = tiny_config(workdir)
        config.rl.post_answer_advantage = "reward_to_go"
        config.rl.score_expectation = True
        return config

    workdir = tmp_path / "expectation"
    workdir.mkdir()
    shutil.copytree(first_run[0] / "warm_start", workdir / "warm_start")
    loop.run(expectation(workdir))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    rows = strip(rl_rows(workdir))
    assert rows != strip(rl_rows(first_run[0]))
    assert all("update/score_expectation_loss" in r and 0 <= r["rollout/score_known_digit"] <= 1 for r in rows)
    shutil.rmtree(workdir / "checkpoints" / "2")
    loop.run(expectation(workdir))
    assert strip(rl_rows(workdir)) == rows
    config = expectation(tmp_path / "both")
    config.rl.confidence_entropy_bonus = 0.1
    with pytest.raises(ValueError, match="do not combine"):
        loop.rl_config(config)


@pytest.mark.parametrize("stop_after", [1, 2], ids=["end_of_caption_stage", "in_teacher_stage"])
def test_warm_start_stopped_by_sigterm_resumes_bit_for_bit(first_run, tmp_path, monkeypatch, stop_after):
    """A SIGTERM during the warm start (1 caption + 2 teacher steps here) checkpoints the step it
    arrived in and exits 143; the same command resumes from there, runs only the steps left, and
    the whole run equals an uninterrupted one: warm-start rows and RL metrics, bit for bit."""
    workdir = tmp_path / "stopped"
    calls, armed = [], [True]
    real = warm.make_sft_step

    def counting(*args, **kwargs):
        sft_step = real(*args, **kwargs)

        def counted(state, *batch):
            out = sft_step(state, *batch)
            calls.append(1)
            if armed[0] and len(calls) == stop_after:
                armed[0] = False
                os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler only sets a flag
            return out
        return counted

    monkeypatch.setattr(warm, "make_sft_step", counting)
    teacher = []
    recording_teacher(monkeypatch, teacher)
    config = tiny_config(workdir)
    config.sft.checkpoint_every = 0  # only the SIGTERM saves
    with pytest.raises(SystemExit) as stopped:
        loop.run(config)
    assert stopped.value.code == 143
    assert not os.path.exists(workdir / "warm_start") or not os.listdir(workdir / "warm_start")
    calls.clear()
    loop.run(config)
    assert len(calls) == 3 - stop_after  # resumed, not redone
    assert not os.path.exists(workdir / "warm_start_progress")  # removed once the warm start is saved
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    sft = lambda w: [r for r in logs.read_metrics(str(w)) if logs.is_sft_row(r)]  # noqa: E731
    assert strip(sft(workdir)) == strip(sft(first_run[0]))
    # the teacher's confidence draws continue where they were (its rng is in the checkpoint)
    assert teacher == FIRST_RUN_TEACHER and len(teacher) == 2
    assert strip(rl_rows(workdir)) == strip(rl_rows(first_run[0]))


@pytest.mark.parametrize("sft_steps", [2, 0], ids=["warm_start", "rl_checkpoint"])
def test_checkpoint_of_another_model_is_refused(first_run, tmp_path, sft_steps):
    workdir, _ = first_run
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    config = tiny_config(other)
    config.sft.steps = sft_steps
    config.model.init.text.intermediate_size = 256  # the checkpoints were written with 384
    with pytest.raises(checkpoints.IncompatibleCheckpoint, match="holds checkpoints of a different model"):
        loop.run(config)


class StandInBucket(LocalFileSystem):
    """gs:// served from a local directory (no bucket is reachable here): what gcsfs does for a
    real bucket, for every file the run writes through fsspec."""

    protocol = ("gs", "gcs")
    root_dir = ""

    def __init__(self, *args, **kwargs):
        kwargs.pop("finalize_on_close", None)
        super().__init__(*args, auto_mkdir=True, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(cls.root_dir, path[len(prefix):])
        return super()._strip_protocol(path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs://bucket/... -> tmp_path/bucket/... for fsspec (our writers, orbax's metadata through
    etils.epath) and, for orbax's arrays, which tensorstore writes to GCS natively, the
    CheckpointManager gets the URL (recorded: it must arrive untouched) and writes the stand-in."""
    from etils.epath import backend

    StandInBucket.root_dir = str(tmp_path / "gcs")
    saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
    for p in saved:
        fsspec.register_implementation(p, StandInBucket, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    seen = []
    real = ocp.CheckpointManager

    def manager(directory, *args, **kwargs):
        seen.append(str(directory))
        return real(str(directory).replace("gs://", StandInBucket.root_dir + "/"), *args, **kwargs)

    monkeypatch.setattr(checkpoints.ocp, "CheckpointManager", manager)
    monkeypatch.setenv("VLCAL_CACHE", str(tmp_path / "cache-machine-1"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "gcs" / "bucket", seen
    for p, cls in saved.items():
        if cls is None:
            importlib.import_module("fsspec.registry")._registry.pop(p, None)
        else:
            fsspec.register_implementation(p, cls, clobber=True)
    backend.fsspec_backend._get_filesystem.cache_clear()
    StandInBucket.clear_instance_cache()


def test_gs_workdir_is_written_through_and_resumes_on_another_machine(first_run, bucket, tmp_path, monkeypatch):
    root, seen = bucket
    config = tiny_config(tmp_path / "unused")
    config.workdir = "gs://bucket/run"
    summary = loop.run(config)
    run = root / "run"
    for name in ("config.json", "metrics.jsonl", "summary.json", "before_rl.json", "training_curves.png",
                 "tokenizer/tokenizer.json", "eval/before_rl/metrics.json", "eval/after_rl/metrics.json",
                 "model/config.json", "model/model.safetensors", "checkpoints/2", "warm_start"):
        assert (run / name).exists(), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tb"))
    assert summary["model_dir"] == "gs://bucket/run/model"
    assert all(p.startswith("gs://bucket/run/") for p in summary["plots"])
    assert seen and all(d.startswith("gs://bucket/run/") for d in seen), seen  # orbax got the URL as is
    assert not any("gs:" in name for name in os.listdir(tmp_path)), "a URL was turned into a local path"
    # the same metrics as the local run of this config
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(rl_rows(run)) == strip(rl_rows(first_run[0]))

    # another machine (an empty local cache) continues the run from the bucket alone
    monkeypatch.setenv("VLCAL_CACHE", str(tmp_path / "cache-machine-2"))
    config.rl.steps = 3
    loop.run(config)
    assert [r["step"] for r in rl_rows(run)] == [1, 2, 3]
