"""The README's commands, typed as printed, in a fresh working directory; exact resume after SIGKILL.

Every `python -m vlcal_jax...` line of the README's Quick start runs here literally, from a
temporary directory laid out like a fresh clone (experiments/ copied in), so relative paths
(the demo's default workdir `outputs/cpu_demo`, the predict/evaluate paths into it) resolve
the way they do for a new user. The demo gets `--config.*` overrides that only make it short.
A README command this file does not run fails `test_every_readme_command_is_run_here`.

The uninterrupted README run is also the reference of the resume test: the same command is
started again in another directory, SIGKILLed right after a checkpoint lands, restarted,
SIGTERMed (preemption: it must checkpoint at the next step boundary and exit 143 with a
message saying how to resume), restarted again, and every metric of every step, and the
final summary, must equal the uninterrupted run's bit for bit (all but wall times).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DEMO = "python -m vlcal_jax.train --config experiments/cpu_demo.py"
WORKDIR = os.path.join("outputs", "cpu_demo")
# only shorten the demo: tiny model, few scenes, 4 RL steps, a checkpoint and an eval every 2
SHORT = ("--config.data.num_examples=48 --config.model.init.text.num_hidden_layers=1 "
         "--config.model.init.vision.depth=1 --config.sft.steps=2 --config.sft.caption_steps=1 "
         "--config.sft.batch_size=4 "
         "--config.rl.steps=4 --config.rl.prompts_per_step=2 --config.rl.samples_per_prompt=2 "
         "--config.rl.max_new_tokens=16 --config.rl.logprob_chunk=16 --config.eval.size=4 "
         "--config.eval.batch_size=4 --config.eval.every=2 --config.checkpoint.every=2")
TIMEOUT = 600


def readme_commands() -> list[str]:
    """The `python -m vlcal_jax...` lines of the ```bash blocks of the README's "Quick start"
    (what anyone runs on a laptop; the TPU section needs a TPU VM, a checkpoint and data)."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    text = text[text.index("## Quick start"):]
    text = text[:text.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line.startswith("python -m vlcal_jax")]


def fresh_checkout(path) -> str:
    """A directory laid out like a clone's root, for commands with relative paths."""
    os.makedirs(path, exist_ok=True)
    shutil.copytree(os.path.join(ROOT, "experiments"), os.path.join(path, "experiments"))
    return str(path)


def env():
    out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **conftest.subprocess_cache_env())
    out.pop("XLA_FLAGS", None)
    return out


def start(command: str, cwd: str) -> subprocess.Popen:
    args = shlex.split(command)
    assert args[0] == "python"
    return subprocess.Popen([sys.executable, *args[1:]], cwd=cwd, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run(command: str, cwd: str) -> str:
    proc = start(command, cwd)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{out[-6000:]}"
    return out


def metric_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if not k.startswith("time/") and not k.endswith("_seconds")} for r in rows]


def summary_metrics(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    return {k: summary[k] for k in ("before_rl", "after_rl")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's demo command, shortened, in a fresh checkout: -> (cwd, its output)."""
    cwd = fresh_checkout(tmp_path_factory.mktemp("readme"))
    out = run(f"{DEMO} {SHORT}", cwd)
    return cwd, out


def test_every_readme_command_is_run_here():
    commands = readme_commands()
    assert DEMO in commands, "the README no longer shows the demo command"
    unrun = [c for c in commands if c != DEMO and c not in FOLLOW_UPS]
    assert not unrun, f"README commands no test runs (add them to FOLLOW_UPS or a test): {unrun}"


# the README's commands after the demo, run on its outputs (a test checks each is in the README)
FOLLOW_UPS = [c for c in readme_commands() if c != DEMO]


def test_demo_runs_as_printed(demo):
    cwd, out = demo
    workdir = os.path.join(cwd, WORKDIR)
    assert f"workdir: {workdir}" in out
    for name in ("summary.json", "config.json", "metrics.jsonl", "before_rl.json", "training_curves.png",
                 "eval_curves.png", "model/config.json", "model/model.safetensors", "tokenizer/tokenizer.json",
                 "eval/before_rl/metrics.json", "eval/step_2/metrics.json", "eval/after_rl/metrics.json",
                 "checkpoints/4", "warm_start"):
        assert os.path.exists(os.path.join(workdir, name)), name
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert {"accuracy", "ece"} <= set(summary["before_rl"]) and {"accuracy", "ece"} <= set(summary["after_rl"])
    assert summary["model_dir"] == os.path.join(workdir, "model")
    rows = [r for r in metric_rows(workdir) if "reward/reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "PyTorch was not found" not in out


@pytest.mark.parametrize("command", FOLLOW_UPS)
def test_readme_follow_up_commands_run_as_printed(demo, command):
    cwd, _ = demo
    out = run(command, cwd)
    assert out.strip(), command


def test_sigkill_and_sigterm_resume_equal_an_uninterrupted_run(demo, tmp_path):
    ref_cwd, _ = demo
    cwd = fresh_checkout(tmp_path / "resumed")
    workdir = os.path.join(cwd, WORKDIR)
    command = f"{DEMO} {SHORT}"

    # 1. SIGKILL as soon as the step-2 checkpoint is final (orbax renames it into place when done)
    proc = start(command, cwd)
    checkpoint = os.path.join(workdir, "checkpoints", "2")
    deadline = time.monotonic() + TIMEOUT
    while not os.path.isdir(checkpoint) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()[-4000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)

    # 2. restart; SIGTERM once it has resumed: it finishes that step, checkpoints it, exits 143
    proc = start(command, cwd)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "resumed from step" in line:
            assert "warm start restored" in "".join(lines), "the resumed run redid the warm start"
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=TIMEOUT)[0]
    assert proc.returncode == 143, f"SIGTERM: exit {proc.returncode}, expected 143:\n{out[-4000:]}"
    match = re.search(r"stopped by SIGTERM after step (\d+) of 4; checkpoint (\S+)\. Run the same command", out)
    assert match, out[-4000:]
    assert int(match.group(1)) == 3 and os.path.isdir(match.group(2))

    # 3. restart to the end
    out = run(command, cwd)
    assert "resumed from step 3 of 4" in out and "warm start restored" in out

    assert metric_rows(workdir) == metric_rows(os.path.join(ref_cwd, WORKDIR))
    assert summary_metrics(workdir) == summary_metrics(os.path.join(ref_cwd, WORKDIR))
