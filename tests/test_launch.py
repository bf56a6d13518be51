"""launch/*.sh against a fake gcloud: the exact commands of each step, and what the workers run.

The fake `gcloud` (first on PATH) appends its argv, one JSON list per line, to $FAKE_GCLOUD_LOG
and answers what the scripts parse: the queued resource's state ($FAKE_QR_STATES, one per
describe, the last repeated). $FAKE_GCLOUD_FAIL makes the call whose argv contains it exit 1, $FAKE_GCLOUD_HANG one hang.
`gcloud storage cp` copies into $FAKE_BUCKET, so the worker tests can read what was uploaded.
Nothing here reaches the network; the whole file runs in a few seconds.
"""

from __future__ import annotations

import json
import re
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD = os.path.join(ROOT, "launch", "tpu_pod.sh")

FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys, time
args = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(args) + "\\n")
fail = os.environ.get("FAKE_GCLOUD_FAIL")
if fail and any(fail in arg for arg in args):
    sys.exit(1)
hang = os.environ.get("FAKE_GCLOUD_HANG")
if hang and any(hang in arg for arg in args):
    time.sleep(30)
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    states = os.environ.get("FAKE_QR_STATES", "ACTIVE").split(",")
    calls = sum(1 for line in open(log) if '"describe"' in line)
    print(states[min(calls, len(states)) - 1])
if args[:2] == ["storage", "cp"]:
    src, dst = args[-2:]
    bucket = os.environ["FAKE_BUCKET"]
    if src.startswith("gs://"):  # a staged input: gs://b/models/m -> DST/m
        os.makedirs(os.path.join(dst, os.path.basename(src)))
    else:
        target = os.path.join(bucket, dst[len("gs://"):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(src, target)
"""

# records argv (and the trainer's VLCAL_ environment) and stands in for python3, uv, the venv's
# python and the trainer: `-m venv DIR` / `venv ... DIR` make DIR/bin/python, a copy of itself
FAKE_PROGRAM = """#!{python}
import json, os, shutil, signal, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_PROGRAM_LOG"], "a") as f:
    f.write(json.dumps([sys.argv[0]] + args) + "\\n")
if args[:1] == ["-c"] and "version_info" in args[1]:
    sys.exit(0 if os.environ.get("FAKE_MODERN") == "1" else 1)
if args[:2] == ["-m", "venv"] or args[:1] == ["venv"]:
    os.makedirs(os.path.join(args[-1], "bin"))
    shutil.copy(sys.argv[0], os.path.join(args[-1], "bin", "python"))
if args[:2] == ["-m", "vlcal_jax.train"]:
    env = {{k: v for k, v in os.environ.items() if k.startswith("VLCAL_")}}
    with open(os.environ["FAKE_PROGRAM_LOG"] + ".env", "w") as f:
        json.dump(env, f)
    signal.signal(signal.SIGTERM, lambda *_: (print("SIGTERM: checkpointed step 3", flush=True), sys.exit(143)))
    print("step 1", flush=True)
    print("a warning", file=sys.stderr, flush=True)
    deadline = time.time() + float(os.environ.get("FAKE_TRAIN_SECONDS", "0"))
    while time.time() < deadline:
        time.sleep(0.02)
    print("done", flush=True)
    sys.exit(int(os.environ.get("FAKE_TRAIN_STATUS", "0")))
"""


def write_program(path, text):
    with open(path, "w") as f:
        f.write(text.format(python=sys.executable))
    os.chmod(path, 0o755)


@pytest.fixture
def fake(tmp_path):
    """A clean environment with the fake gcloud first on PATH and an empty home."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_program(bin_dir / "gcloud", FAKE_GCLOUD)
    (tmp_path / "home").mkdir()
    (tmp_path / "bucket").mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path),
           "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"), "FAKE_BUCKET": str(tmp_path / "bucket"),
           "FAKE_PROGRAM_LOG": str(tmp_path / "program.log"), "POLL_INTERVAL": "0"}
    return tmp_path, env


def gcloud_calls(tmp_path) -> list[list[str]]:
    log = tmp_path / "gcloud.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def pod(env, *args, extra_env=None):
    return subprocess.run(["bash", POD, *args], env={**env, **(extra_env or {})}, capture_output=True,
                          text=True, timeout=60)


def ssh(name, command, worker="all", zone="us-central2-b", project=None):
    scope = ["--zone", zone] + (["--project", project] if project else [])
    return ["compute", "tpus", "tpu-vm", "ssh", name, *scope, f"--worker={worker}", "--command", command]


# setup copies HEAD with git archive: the tests that reach it need this file in a git checkout
needs_git = pytest.mark.skipif(subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode != 0,
                               reason="not a git checkout")

V4 = ["--name", "pod", "--zone", "us-central2-b", "--accelerator-type", "v4-32"]
V4_DELETE = ["compute", "tpus", "tpu-vm", "delete", "pod", "--zone", "us-central2-b", "--quiet"]
BUCKET_INPUTS = ["--bucket", "my-bucket", "--run", "paper",
                 "--model-path", "gs://my-bucket/models/Qwen3-VL-4B-Instruct",
                 "--train-files", "gs://my-bucket/data/a.parquet,gs://my-bucket/data/b.parquet",
                 "--image-dir", "/mnt/disks/data"]
INPUT_ENV = ("VLCAL_MODEL_PATH=gs://my-bucket/models/Qwen3-VL-4B-Instruct "
             "VLCAL_TRAIN_FILES=gs://my-bucket/data/a.parquet,gs://my-bucket/data/b.parquet "
             "VLCAL_IMAGE_DIR=/mnt/disks/data")
TRAIN = ssh("pod", f"cd vlcal_jax && {INPUT_ENV} VLCAL_WORKDIR=gs://my-bucket/paper LOG_SYNC_SECONDS=300 "
                   "bash launch/train_worker.sh --config experiments/tpu_v4.py "
                   "--config.rl.steps=300 --config.rl.prompts_per_step=128")


def test_create_a_plain_slice_with_the_v4_runtime(fake):
    tmp_path, env = fake
    result = pod(env, "create", *V4, "--project", "proj", "--spot")
    assert result.returncode == 0, result.stderr
    assert gcloud_calls(tmp_path) == [
        ["compute", "tpus", "tpu-vm", "create", "pod", "--zone", "us-central2-b", "--project", "proj",
         "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base", "--spot"]]


def test_create_v5e_queues_a_resource_and_waits_until_it_is_active(fake):
    tmp_path, env = fake
    result = pod(env, "create", "--zone", "us-west4-a", "--accelerator-type", "v5e-16", "--spot",
                 extra_env={"FAKE_QR_STATES": "WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE"})
    assert result.returncode == 0, result.stderr
    describe = ["compute", "tpus", "queued-resources", "describe", "vlcal-v5e-16-qr", "--zone", "us-west4-a",
                "--format=value(state.state)"]
    assert gcloud_calls(tmp_path) == [
        ["compute", "tpus", "queued-resources", "create", "vlcal-v5e-16-qr", "--node-id", "vlcal-v5e-16",
         "--zone", "us-west4-a", "--accelerator-type", "v5litepod-16", "--runtime-version",
         "v2-alpha-tpuv5-lite", "--spot"]] + [describe] * 3
    assert "PROVISIONING" in result.stderr and "ACTIVE" in result.stderr


@pytest.mark.parametrize("accelerator, runtime", [("v5p-16", "v2-alpha-tpuv5"), ("v6e-16", "v2-alpha-tpuv6e")])
def test_runtime_defaults_per_family(fake, accelerator, runtime):
    tmp_path, env = fake
    assert pod(env, "create", "--name", "n", "--zone", "z", "--accelerator-type", accelerator).returncode == 0
    create = gcloud_calls(tmp_path)[0]
    assert create[2] == ("queued-resources" if accelerator.startswith("v6e") else "tpu-vm")
    assert create[create.index("--runtime-version" if "--runtime-version" in create else "--version") + 1] == runtime


def test_a_queued_resource_that_never_comes_up_fails_clearly_and_is_deleted(fake):
    tmp_path, env = fake
    result = pod(env, "all", "--name", "pod", "--zone", "us-west4-a", "--accelerator-type", "v4-8", "--queued",
                 "--bucket", "b", extra_env={"FAKE_QR_STATES": "WAITING_FOR_RESOURCES", "QUEUED_TIMEOUT": "0"})
    assert result.returncode != 0
    assert "pod-qr is not ACTIVE after 0s (state: WAITING_FOR_RESOURCES)" in result.stderr
    assert "--queued-timeout" in result.stderr
    calls = gcloud_calls(tmp_path)
    assert calls[0][:4] == ["compute", "tpus", "queued-resources", "create"]
    assert calls[-1] == ["compute", "tpus", "queued-resources", "delete", "pod-qr", "--zone", "us-west4-a",
                         "--force", "--quiet"]
    assert not any("ssh" in call for call in calls)


def test_a_failed_queued_resource_stops_the_wait(fake):
    tmp_path, env = fake
    result = pod(env, "create", "--name", "pod", "--zone", "z", "--accelerator-type", "v6e-16",
                 extra_env={"FAKE_QR_STATES": "PROVISIONING,FAILED"})
    assert result.returncode != 0 and "pod-qr is FAILED" in result.stderr
    assert len(gcloud_calls(tmp_path)) == 3  # create, two describes; `create` alone deletes nothing


@needs_git
def test_setup_copies_head_to_every_worker_and_installs_there(fake):
    tmp_path, env = fake
    result = pod(env, "setup", *V4)
    assert result.returncode == 0, result.stderr
    tarball = str(tmp_path / "vlcal_jax-pod.tar.gz")
    assert gcloud_calls(tmp_path) == [
        ["compute", "tpus", "tpu-vm", "scp", tarball, "pod:vlcal_jax.tar.gz", "--worker=all", "--zone", "us-central2-b"],
        ssh("pod", "rm -rf vlcal_jax && mkdir -p vlcal_jax && tar -xzf vlcal_jax.tar.gz -C vlcal_jax && rm vlcal_jax.tar.gz"),
        ssh("pod", "cd vlcal_jax && bash launch/setup_tpu_vm.sh")]
    with tarfile.open(tarball) as archive:  # HEAD, as git has it
        names = set(archive.getnames())
    assert {"setup.py", "launch/tpu_pod.sh", "launch/train_worker.sh", "vlcal_jax/train.py"} <= names


def test_setup_clones_a_repo_url_and_stages_bucket_inputs(fake):
    tmp_path, env = fake
    result = pod(env, "setup", *V4, *BUCKET_INPUTS, "--repo-url", "https://github.com/me/vlcal_jax.git",
                 "--ref", "v1.0", "--remote-dir", "code")
    assert result.returncode == 0, result.stderr
    assert gcloud_calls(tmp_path) == [
        ssh("pod", "rm -rf code && git clone https://github.com/me/vlcal_jax.git code && git -C code checkout v1.0"),
        ssh("pod", f"cd code && bash launch/setup_tpu_vm.sh && {INPUT_ENV} bash launch/stage_inputs.sh")]


def test_train_runs_the_same_command_on_every_worker_with_env_and_overrides(fake):
    tmp_path, env = fake
    result = pod(env, "train", *V4, *BUCKET_INPUTS, "--config.rl.steps=300", "--config.rl.prompts_per_step", "128")
    assert result.returncode == 0, result.stderr
    assert gcloud_calls(tmp_path) == [TRAIN]


def test_train_quotes_extra_environment_for_the_remote_shell(fake):
    tmp_path, env = fake
    result = pod(env, "train", "--name", "pod", "--zone", "z", "--project", "p", "--config", "experiments/tpu_v5e.py",
                 "--env", "XLA_FLAGS=--xla_a=1 --xla_b=2", "--log-sync", "60",
                 extra_env={"VLCAL_WORKDIR": "gs://b/runs/x/"})
    assert result.returncode == 0, result.stderr
    command = gcloud_calls(tmp_path)[0][-1]
    assert command == ("cd vlcal_jax && VLCAL_WORKDIR=gs://b/runs/x XLA_FLAGS='--xla_a=1 --xla_b=2' "
                       "LOG_SYNC_SECONDS=60 bash launch/train_worker.sh --config experiments/tpu_v5e.py")
    assert shlex.split(command)[4] == "XLA_FLAGS=--xla_a=1 --xla_b=2"


def test_train_needs_a_bucket_workdir(fake):
    tmp_path, env = fake
    result = pod(env, "train", *V4)
    assert result.returncode == 2 and "pass --bucket" in result.stderr and "VLCAL_WORKDIR" in result.stderr
    result = pod(env, "train", *V4, "--workdir", "/tmp/run")
    assert result.returncode == 2 and "not a gs:// URL" in result.stderr
    assert gcloud_calls(tmp_path) == []


def test_tail_follows_worker_0s_log(fake):
    tmp_path, env = fake
    assert pod(env, "tail", *V4, "--bucket", "gs://my-bucket", "--run", "paper").returncode == 0
    assert gcloud_calls(tmp_path) == [ssh("pod", "tail -n +1 -F vlcal_logs/paper/worker-0.log", worker="0")]


@needs_git
def test_all_creates_sets_up_trains_and_deletes(fake):
    tmp_path, env = fake
    result = pod(env, "all", *V4, *BUCKET_INPUTS, "--config.rl.steps=300", "--config.rl.prompts_per_step=128")
    assert result.returncode == 0, result.stderr
    calls = gcloud_calls(tmp_path)
    assert [call[:4] for call in calls] == [["compute", "tpus", "tpu-vm", c] for c in
                                            ("create", "scp", "ssh", "ssh", "ssh", "delete")]
    assert calls[-2:] == [TRAIN, V4_DELETE]


@needs_git
def test_a_failed_train_still_deletes_the_slice_unless_kept(fake):
    tmp_path, env = fake
    result = pod(env, "all", *V4, *BUCKET_INPUTS, extra_env={"FAKE_GCLOUD_FAIL": "train_worker.sh"})
    assert result.returncode == 1
    calls = gcloud_calls(tmp_path)
    assert "train_worker.sh" in calls[-2][-1] and calls[-1] == V4_DELETE
    assert "deleting pod" in result.stderr

    (tmp_path / "gcloud.log").unlink()
    result = pod(env, "all", *V4, *BUCKET_INPUTS, "--keep", extra_env={"FAKE_GCLOUD_FAIL": "train_worker.sh"})
    assert result.returncode == 1
    calls = gcloud_calls(tmp_path)
    assert "train_worker.sh" in calls[-1][-1] and not any("delete" in call for call in calls)
    assert "kept pod; delete it with: bash launch/tpu_pod.sh delete" in result.stderr


@needs_git
def test_ctrl_c_during_training_deletes_the_slice(fake):
    tmp_path, env = fake
    # SIGINT as a terminal leaves it: pytest-xdist's workers ignore SIGINT, and a signal ignored when
    # bash starts can be neither trapped nor received by its children
    process = subprocess.Popen(["bash", POD, "all", *V4, "--bucket", "b"], start_new_session=True,
                               env={**env, "FAKE_GCLOUD_HANG": "train_worker.sh"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # generous deadlines: the suite runs on two workers, so this script may share its core
    deadline = time.time() + 120
    while not any("train_worker.sh" in call[-1] for call in gcloud_calls(tmp_path)) and time.time() < deadline:
        time.sleep(0.05)
    assert any("train_worker.sh" in call[-1] for call in gcloud_calls(tmp_path)), gcloud_calls(tmp_path)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends: the whole foreground process group
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "exit status 130: deleting pod" in stderr
    assert gcloud_calls(tmp_path)[-1] == V4_DELETE


def test_a_failed_create_deletes_nothing(fake):
    """The name may belong to a slice that already exists: never delete what this run did not make."""
    tmp_path, env = fake
    result = pod(env, "all", *V4, "--bucket", "b", extra_env={"FAKE_GCLOUD_FAIL": "create"})
    assert result.returncode == 1 and len(gcloud_calls(tmp_path)) == 1


def test_delete_a_queued_slice(fake):
    tmp_path, env = fake
    assert pod(env, "delete", "--name", "pod", "--zone", "z", "--accelerator-type", "v5e-16", "--project", "p").returncode == 0
    assert gcloud_calls(tmp_path) == [
        ["compute", "tpus", "queued-resources", "delete", "pod-qr", "--zone", "z", "--project", "p", "--force", "--quiet"]]


@needs_git
def test_dry_run_prints_what_a_real_run_calls_and_calls_nothing(fake):
    tmp_path, env = fake
    args = ["all", "--name", "pod", "--zone", "us-west4-a", "--accelerator-type", "v5e-16", *BUCKET_INPUTS,
            "--config", "experiments/tpu_v5e.py", "--config.rl.steps=300"]
    dry = pod(env, *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert gcloud_calls(tmp_path) == [] and not (tmp_path / "vlcal_jax-pod.tar.gz").exists()
    printed = [shlex.split(line) for line in dry.stdout.splitlines()]
    assert printed[2][:2] == ["git", "-C"] and printed[2][3:] == [
        "archive", "--format=tar.gz", "--output", str(tmp_path / "vlcal_jax-pod.tar.gz"), "HEAD"]
    real = pod(env, *args)
    assert real.returncode == 0, real.stderr
    assert [["gcloud", *call] for call in gcloud_calls(tmp_path)] == printed[:2] + printed[3:]
    assert printed[-1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]


@pytest.mark.parametrize("args, message", [
    (["create", "--name", "pod", "--accelerator-type", "v4-8"], "no zone: pass --zone (e.g. us-central2-b) or set ZONE"),
    (["create", "--name", "pod", "--zone", "z"], "no accelerator type: pass --accelerator-type (e.g. v4-32, v5e-16) or set ACCELERATOR_TYPE"),
    (["all", "--zone", "z", "--bucket", "b"], "no accelerator type: pass --accelerator-type"),
    (["create", "--zone", "z", "--accelerator-type", "v3-8"], "no default runtime version for accelerator type 'v3-8': pass --runtime-version"),
    (["train", "--zone", "z"], "no slice name: pass --name or set TPU_NAME"),
    (["launch"], "unknown sub-command 'launch'"),
    (["train", "--zone", "z", "--name", "n", "--bukcet", "b"], "unknown flag --bukcet"),
])
def test_missing_settings_fail_before_any_call_and_say_what_to_set(fake, args, message):
    tmp_path, env = fake
    result = pod(env, *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert gcloud_calls(tmp_path) == []


def test_settings_come_from_the_environment_too(fake):
    tmp_path, env = fake
    result = pod(env, "create", extra_env={"ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-8", "TPU_NAME": "pod",
                                           "PROJECT": "proj", "RUNTIME_VERSION": "v2-alpha-tpuv4"})
    assert result.returncode == 0, result.stderr
    assert gcloud_calls(tmp_path) == [["compute", "tpus", "tpu-vm", "create", "pod", "--zone", "us-central2-b",
                                       "--project", "proj", "--accelerator-type", "v4-8", "--version", "v2-alpha-tpuv4"]]


# --- what runs on each worker ---------------------------------------------------------------

@pytest.fixture
def worker(fake):
    tmp_path, env = fake
    write_program(tmp_path / "bin" / "python", FAKE_PROGRAM)
    env = {**env, "PYTHON": str(tmp_path / "bin" / "python"), "VLCAL_WORKDIR": "gs://b/runs/paper",
           "LOG_SYNC_SECONDS": "600"}
    return tmp_path, env


def run_worker(env, *args, **extra):
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "train_worker.sh"), *args], env={**env, **extra},
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("status", [0, 3])
def test_worker_logs_to_a_file_copied_to_the_bucket_whatever_the_exit_status(worker, status):
    tmp_path, env = worker
    result = run_worker(env, "--config", "experiments/tpu_v4.py", "--config.rl.steps=3", VLCAL_WORKER_ID="1",
                        VLCAL_MODEL_PATH="gs://b/models/m", VLCAL_TRAIN_FILES="gs://b/d/a.parquet,/mnt/b.parquet",
                        FAKE_TRAIN_STATUS=str(status))
    assert result.returncode == status, result.stderr
    assert result.stdout == ""  # only worker 0 streams its log
    home = tmp_path / "home"
    calls = [json.loads(line) for line in (tmp_path / "program.log").read_text().splitlines()]
    assert calls == [[str(tmp_path / "bin" / "python"), "-m", "vlcal_jax.train", "--config",
                      "experiments/tpu_v4.py", "--config.rl.steps=3"]]
    trainer_env = json.loads((tmp_path / "program.log.env").read_text())
    assert trainer_env["VLCAL_MODEL_PATH"] == f"{home}/vlcal_inputs/b/models/m"
    assert trainer_env["VLCAL_TRAIN_FILES"] == f"{home}/vlcal_inputs/b/d/a.parquet,/mnt/b.parquet"
    assert trainer_env["VLCAL_WORKDIR"] == "gs://b/runs/paper"
    log = home / "vlcal_logs" / "paper" / "worker-1.log"
    assert gcloud_calls(tmp_path) == [["storage", "cp", str(log), "gs://b/runs/paper/logs/worker-1.log"]]
    uploaded = (tmp_path / "bucket" / "b" / "runs" / "paper" / "logs" / "worker-1.log").read_text()
    assert uploaded == log.read_text()
    assert "step 1\n" in uploaded and "a warning\n" in uploaded and "done\n" in uploaded
    assert uploaded.rstrip().endswith(f"worker 1: exit status {status}")


def test_worker_0_streams_its_log_and_a_rerun_appends(worker):
    tmp_path, env = worker
    for _ in range(2):
        result = run_worker(env, "--config", "c.py", VLCAL_WORKER_ID="0")
        assert result.returncode == 0, result.stderr
    assert result.stdout.count("step 1\n") == 2  # the whole log, the first run's lines too
    assert (tmp_path / "home" / "vlcal_logs" / "paper" / "worker-0.log").read_text().count("exit status 0") == 2


def test_worker_copies_its_log_while_training(worker):
    tmp_path, env = worker
    result = run_worker(env, "--config", "c.py", VLCAL_WORKER_ID="2", LOG_SYNC_SECONDS="0.1", FAKE_TRAIN_SECONDS="0.8")
    assert result.returncode == 0, result.stderr
    assert len(gcloud_calls(tmp_path)) >= 3  # at least two periodic copies and the final one


def test_worker_passes_sigterm_to_the_trainer_and_still_copies_its_log(worker):
    """A preempted VM gets SIGTERM: the trainer checkpoints and exits 143, and the log is kept."""
    tmp_path, env = worker
    process = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "train_worker.sh"), "--config", "c.py"],
                               env={**env, "VLCAL_WORKER_ID": "3", "FAKE_TRAIN_SECONDS": "30"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    log = tmp_path / "home" / "vlcal_logs" / "paper" / "worker-3.log"
    deadline = time.time() + 120
    while not (log.exists() and "step 1" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert log.exists() and "step 1" in log.read_text()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 143
    uploaded = (tmp_path / "bucket" / "b" / "runs" / "paper" / "logs" / "worker-3.log").read_text()
    assert "SIGTERM: checkpointed step 3" in uploaded and "done" not in uploaded
    assert uploaded.rstrip().endswith("exit status 143")


def test_stage_inputs_copies_bucket_inputs_once(fake):
    tmp_path, env = fake
    env = {**env, "VLCAL_MODEL_PATH": "gs://b/models/m/", "VLCAL_TRAIN_FILES": "/mnt/a.parquet,gs://b/d/b.parquet",
           "VLCAL_IMAGE_DIR": "/mnt/images"}
    for _ in range(2):
        result = subprocess.run(["bash", os.path.join(ROOT, "launch", "stage_inputs.sh")], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    inputs = tmp_path / "home" / "vlcal_inputs" / "b"
    assert gcloud_calls(tmp_path) == [["storage", "cp", "-r", "gs://b/models/m", f"{inputs}/models/"],
                                      ["storage", "cp", "-r", "gs://b/d/b.parquet", f"{inputs}/d/"]]
    assert (inputs / "models" / "m").is_dir() and "already at" in result.stderr


def test_stage_inputs_copies_a_train_file_inside_the_image_dir_with_it(fake):
    tmp_path, env = fake
    env = {**env, "VLCAL_TRAIN_FILES": "gs://b/data/train.parquet", "VLCAL_IMAGE_DIR": "gs://b/data"}
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "stage_inputs.sh")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert gcloud_calls(tmp_path) == [["storage", "cp", "-r", "gs://b/data", f"{tmp_path}/home/vlcal_inputs/b/"]]


@pytest.mark.parametrize("modern", [True, False])
def test_setup_tpu_vm_makes_a_modern_venv_and_installs_the_tpu_extra(fake, modern):
    """python3 >= 3.11 makes the venv itself; an older one (Ubuntu 22.04's 3.10) gets one from uv."""
    tmp_path, env = fake
    write_program(tmp_path / "bin" / "python3", FAKE_PROGRAM)
    (tmp_path / "home" / ".local" / "bin").mkdir(parents=True)
    uv = tmp_path / "home" / ".local" / "bin" / "uv"
    write_program(uv, FAKE_PROGRAM)
    result = subprocess.run(["bash", os.path.join(ROOT, "launch", "setup_tpu_vm.sh")],
                            env={**env, "FAKE_MODERN": "1" if modern else "0"}, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    python3, venv = str(tmp_path / "bin" / "python3"), str(tmp_path / "home" / "vlcal_venv")
    calls = [json.loads(line) for line in (tmp_path / "program.log").read_text().splitlines()]
    make_venv = ([[python3, "-m", "venv", venv]] if modern else
                 [[python3, "-m", "pip", "install", "--user", "--quiet", "uv"],
                  [str(uv), "venv", "--seed", "--python", "3.12", venv]])
    assert [call[0] for call in calls[:1]] == [python3] and calls[0][1] == "-c"
    assert calls[1:] == make_venv + [
        [f"{venv}/bin/python", "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [f"{venv}/bin/python", "-m", "pip", "install", "--quiet", "-e", ".[tpu]"],
        [f"{venv}/bin/python", "-c", "import jax, vlcal_jax; print('vlcal_jax installed, jax', jax.__version__)"]]



def test_a_failed_log_copy_is_reported_and_keeps_the_trainers_status(worker):
    tmp_path, env = worker
    result = run_worker(env, "--config", "c.py", VLCAL_WORKER_ID="1", FAKE_GCLOUD_FAIL="gs://b/runs/paper/logs")
    assert result.returncode == 0
    assert "worker 1: could not copy" in result.stderr and "gs://b/runs/paper/logs/worker-1.log" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    scripts = sorted(os.path.join("launch", name) for name in os.listdir(os.path.join(ROOT, "launch"))
                     if name.endswith(".sh"))
    result = subprocess.run(["shellcheck", "-x", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def readme_pod_commands() -> list[str]:
    """The `bash launch/tpu_pod.sh all ...` commands of the README's bash blocks, joined lines."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith("bash launch/tpu_pod.sh all"):
                commands.append(command)
    return commands


@needs_git
def test_the_readmes_pod_commands_dry_run_to_what_it_describes(fake):
    """Each README pod command, typed as printed plus --dry-run: exit 0, nothing called, and the
    train line runs the README's config and overrides on every worker with the bucket workdir."""
    tmp_path, env = fake
    commands = readme_pod_commands()
    assert len(commands) == 2, commands  # the v4-32 and v5e-32 runs
    for command in commands:
        argv = shlex.split(command)
        dry = subprocess.run(argv + ["--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        assert gcloud_calls(tmp_path) == []
        printed = dry.stdout.splitlines()
        config = argv[argv.index("--config") + 1]
        overrides = " ".join(a for a in argv if a.startswith("--config."))
        run = argv[argv.index("--run") + 1]
        train = [line for line in printed if "train_worker.sh" in line]
        assert len(train) == 1 and "--worker=all" in train[0], printed
        assert f"bash launch/train_worker.sh --config {config} {overrides}".strip() in train[0], train
        assert f"VLCAL_WORKDIR=gs://my-bucket/{run}" in train[0], train
        accelerator = argv[argv.index("--accelerator-type") + 1]
        create = printed[0]
        assert ("queued-resources create" in create) == accelerator.startswith("v5e"), create
        assert "delete" in printed[-1], printed
