"""python -m vlcal_jax.fit: ahead-of-time compilation of the RL step for TPU slices (libtpu).

A tiny Qwen3-VL-architecture model (cpu_demo's, one layer) is compiled for a v4-8 and a v5e-8
in a subprocess; its numbers are checked against hand counts (parameters per chip, KV cache,
mesh), and a batch too large for a v5e-8 must exit 1 naming a micro-batch that fits (which
XLA then compiles within HBM). CI installs the `fit` extra; without libtpu the tests skip.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from vlcal_jax.fit import memory

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed: pip install -e ".[fit]" (vlcal_jax.fit compiles '
                                         "for TPU with it)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", os.path.join(ROOT, "experiments", "cpu_demo.py"),
        "--config.model.init.text.num_hidden_layers=1", "--config.model.init.vision.depth=1",
        "--config.data.length_buckets=(32,)", "--config.rl.max_new_tokens=16", "--config.rl.logprob_chunk=16",
        "--config.rl.prompts_per_step=8", "--config.rl.samples_per_prompt=2", "--config.model.compute_dtype=bfloat16"]


def _fit(tmp_path, *args):
    out = tmp_path / "fit.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1")
    proc = subprocess.run([sys.executable, "-m", "vlcal_jax.fit", *TINY, f"--json={out}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    records = json.loads(out.read_text()) if out.exists() else None
    return proc, records


def _param_count(tiny_init) -> int:
    """Hand count of the tiny model's parameters (configs.default_config().model.init, 1 layer each)."""
    t, v = tiny_init.text, tiny_init.vision
    d, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    layer = d * q + 2 * d * kv + q * d + 2 * t.head_dim + 3 * d * t.intermediate_size + 2 * d
    dv, wide = v.hidden_size, v.hidden_size * 4
    patch = 3 * 2 * v.patch_size**2
    block = 4 * dv + (3 * dv * dv + 3 * dv) + (dv * dv + dv) + (dv * v.intermediate_size + v.intermediate_size) \
        + (v.intermediate_size * dv + dv)
    merger = lambda norm: 2 * norm + wide * wide + wide + wide * d + d  # noqa: E731
    vision = patch * dv + dv + v.num_position_embeddings * dv + block + merger(dv) + merger(wide)
    return tiny_init.vocab_size * d + layer + d + vision  # tied head


@needs_libtpu
def test_tiny_config_fits_v4_8_and_v5e_8(tmp_path):
    from vlcal_jax.configs import default_config

    proc, records = _fit(tmp_path, "--topology=v4-8,v5e-8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    init = default_config().model.init
    init.text.num_hidden_layers, init.vision.depth = 1, 1
    count = _param_count(init)
    for record, chips in zip(records, (4, 8)):
        assert record["fits"] and record["chips"] == chips and record["mesh"] == {"data": 1, "fsdp": chips,
                                                                                "tensor": 1}
        sampler = record["memory"]["sampler"]
        # float32 masters split over the chips, except what the partition rules keep whole: the patch
        # embedding and position table (over "tensor" only) and the norms and biases (< 3000 values);
        # the reference model and the policy copy in bfloat16: half of it
        whole = 3 * 2 * init.vision.patch_size**2 * init.vision.hidden_size \
            + init.vision.num_position_embeddings * init.vision.hidden_size
        split = (count - whole) * 4 / chips + whole * 4
        assert split - 3000 * 4 <= sampler["parameters"] <= split + 3000 * 4
        assert sampler["reference_model"] == sampler["policy_copy"] == sampler["parameters"] // 2
        assert 1.9 * sampler["parameters"] <= sampler["optimizer_state"] <= 2.1 * sampler["parameters"]
        # the continuous engine's [L, slots, KV heads, Tp + M, hd] and the prompts' [L, prompts, KV heads, Tp, hd]
        # keys and values in bfloat16: 16 slots (one per row) and 8 prompts, each split over the chips
        slots, prompts = 16 // chips, 8 // chips
        assert sampler["kv_cache"] == 2 * 1 * (slots * (32 + 16) + prompts * 32) * 2 * 32 * 2
        assert "continuous engine, 16 decode slots" in proc.stdout
        for program in ("sampler", "score", "update"):
            memory = record["memory"][program]
            assert memory["refused"] is None and 0 < memory["total"] < record["hbm_bytes"]
        assert record["time"]["step"]["seconds"] > 0 and 0 < record["time"]["step"]["mfu"] <= 1
        assert record["memory"]["update"]["policy_copy"] == 0  # dropped before the update
    for name, hbm in (("v4-8", 32), ("v5e-8", 16)):
        assert re.search(rf"^{name}: .* {hbm} GiB HBM", proc.stdout, re.M), proc.stdout
        assert f"fits {name}: peak" in proc.stdout
    for row in ("master parameters", "optimizer state", "reference model", "of which KV cache", "temporaries",
                "total live", "HBM", "RL step"):
        assert row in proc.stdout


@needs_libtpu
def test_too_large_a_micro_batch_exits_1_naming_one_that_fits(tmp_path):
    # 256 responses in one pass with a 2^22-token vocabulary: the [rows, chunk, V] float32 logits
    # of scoring and of the update, 1/8 of the rows per chip, need more than a v5e chip's 16 GiB
    proc, records = _fit(tmp_path, "--topology=v5e-8", "--config.rl.prompts_per_step=128",
                         "--config.model.init.vocab_size=4194304", "--config.data.max_images_per_prompt=0",
                         "--config.rl.rollout_engine=static")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = records[0]
    # the static engine: [L, rows, KV heads, Tp + M, hd] keys and values in bfloat16, 256 rows over 8 chips
    assert record["memory"]["sampler"]["kv_cache"] == 2 * 1 * 256 // 8 * 2 * (32 + 16) * 32 * 2
    assert not record["fits"] and record["memory"]["score"]["refused"], proc.stdout
    fitting = record["fitting_sizes"]
    assert fitting is not None, proc.stdout
    rows = fitting["sizes"]["micro_batch"]
    assert rows < 256 and 256 % rows == 0 and rows % 2 == 0
    assert f"--config.rl.micro_batch_size={rows}" in proc.stdout
    assert all(m["refused"] is None and m["total"] <= record["hbm_bytes"] for m in fitting["memory"].values())
    assert fitting["time"]["score"]["calls"] == 256 // rows


def test_micro_batch_candidates_hold_whole_groups_and_split_over_the_chips():
    # 2048 rows of groups of 8 on 16 chips: multiples of 16 that divide 2048, below 512
    assert memory.candidates(2048, 8, 1, 16, 512) == [256, 128, 64, 32, 16]
    # below a group: its divisors (a part of a group per micro-batch), those that split over the chips
    assert memory.candidates(2048, 8, 1, 4, 8) == [4]
    # 6 prompts on 4 chips: no count below 6 splits evenly, so all divisors are candidates
    assert memory.candidates(6, 1, 1, 4, 6) == [3, 2, 1]


@pytest.mark.parametrize("fixed, per_row, limit, expected", [(10, 2, 50, 16), (10, 2, 43, 16), (10, 2, 41, 8),
                                                              (10, 2, 270, 128), (10, 2, 20, None)])
def test_largest_fitting_finds_the_largest_size_under_the_limit(fixed, per_row, limit, expected):
    options = [128, 64, 32, 16, 8]
    measured = []

    def measure(size):
        measured.append(size)
        return fixed + per_row * size

    found = memory.largest_fitting(256, fixed + per_row * 256, options, measure, limit, compiles=4)
    assert found == expected, measured
    brute = max((s for s in options if fixed + per_row * s <= limit), default=None)
    assert found == brute
    assert len(measured) <= 3 and found in (None, *measured)


def test_largest_fitting_halves_when_xla_gives_no_size():
    refused = float("inf")
    found = memory.largest_fitting(256, refused, [128, 64, 32, 16, 8], lambda s: refused if s > 16 else s, 100, 4)
    assert found == 16


def test_offloaded_reference_counts_only_while_scoring():
    """model.offload_reference keeps the reference model in host memory except during scoring:
    fit counts its HBM in the score column only."""
    from vlcal_jax.fit import memory

    kept = memory.Resident(params=10, optimizer=20, reference=5, policy=3)
    offloaded = memory.Resident(params=10, optimizer=20, reference=5, policy=3, offload_reference=True)
    assert [kept.total(p) for p in ("sampler", "score", "update")] == [38, 38, 35]
    assert [offloaded.total(p) for p in ("sampler", "score", "update")] == [33, 38, 30]


@needs_libtpu
def test_topology_devices_leave_the_environment_as_it_was(monkeypatch):
    """fit.topology.devices sets libtpu's variables only while libtpu reads them: a leaked
    TPU_WORKER_HOSTNAMES made a later training run in the same process take itself for a TPU pod
    worker and call jax.distributed.initialize (a test suite that compiled for TPU in-process,
    then trained, failed that way)."""
    from vlcal_jax.fit import topology

    for name in ("TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_ACCELERATOR_TYPE", "ALLOW_MULTIPLE_LIBTPU_LOAD"):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    assert len(topology.devices(topology.get("v4-8"))) == 4
    assert dict(os.environ) == before


def test_multi_host_slices_refuse_sizes_the_trainer_would_refuse():
    """On H hosts every sampler call and micro-batch takes whole GRPO groups from every host: fit
    stops, naming the setting and a size that works, before compiling anything."""
    from vlcal_jax.fit import plan
    from vlcal_jax.fit.programs import Sizes

    sizes = Sizes(prompts=256, samples=8, prompt_len=4096, response_len=4096, images_per_prompt=1, patches=16384,
                  rollout_batch=4, micro_batch=8)
    plan.check_hosts(sizes, 1)  # one host: anything the single-process trainer takes
    with pytest.raises(ValueError, match=r"rl.micro_batch_size=8 must be a multiple of 32 .* --config.rl.micro_batch_size=32"):
        plan.check_hosts(sizes, 4)
    with pytest.raises(ValueError, match=r"rl.rollout_batch_size=4 must be a multiple of 8 .*--config.rl.rollout_batch_size=8"):
        plan.check_hosts(Sizes(**{**sizes.__dict__, "micro_batch": 64}), 8)
    plan.check_hosts(Sizes(**{**sizes.__dict__, "micro_batch": 64, "rollout_batch": 8}), 8)


def test_update_roofline_counts_fsdp_and_remat_offload_traffic():
    """The update's roofline time is the largest of compute, HBM, ICI (FSDP's gathers and
    reduce-scatters) and PCIe (remat offload) time, each re-derived here by hand."""
    from vlcal_jax.fit import costs, topology
    from vlcal_jax.models import presets

    config = presets.get("Qwen3-VL-4B-Instruct").replace(dtype="bfloat16", remat=True, remat_offload=True)
    t, v = config.text, config.vision
    # 2 rows per chip of 6144 tokens, one 4096-patch image per row: every layer input out and back, bf16
    host = costs.offload_bytes(config, rows_per_chip=2, length=6144, images_per_chip=2, patches=4096)
    assert host == 2 * 2 * (t.num_hidden_layers * 2 * 6144 * t.hidden_size + v.depth * 2 * 4096 * v.hidden_size)
    assert costs.offload_bytes(config.replace(remat_offload=False), rows_per_chip=2, length=6144,
                               images_per_chip=2, patches=4096) == 0
    assert costs.fsdp_bytes(8e9, 16e9, 4) == 0.75 * (2 * 8e9 + 16e9) and costs.fsdp_bytes(8e9, 16e9, 1) == 0
    chip = topology.CHIPS["v4"]
    kwargs = dict(rows=8, micro_batches=3, length=6144, response_len=4096, images=8, patches=4096,
                  weight_bytes=8e9, optimizer_bytes=5e10)
    plain = costs.update(config, chip, 4, **kwargs)
    assert plain.bound == "compute" and plain.time == pytest.approx(plain.hardware_flops / 4 / chip.peak_flops)
    slow_link = costs.update(config, chip, 4, **kwargs, host_bytes=1e12)  # 1 TB per micro-batch over PCIe
    assert slow_link.bound == "host" and slow_link.time == pytest.approx(3 * 1e12 / chip.host_bandwidth)
    assert slow_link.host_bytes_per_chip == 3e12
    gathers = costs.update(config, chip, 4, **kwargs, ici_bytes=1e13)
    assert gathers.bound == "ICI" and gathers.time == pytest.approx(3e13 / chip.ici_bandwidth)
    assert gathers.mfu(chip, 4) < plain.mfu(chip, 4) == pytest.approx(0.75)  # remat: 3 of 4 passes count


@needs_libtpu
def test_programs_flag_compiles_only_the_update(tmp_path):
    proc, records = _fit(tmp_path, "--topology=v4-8", "--programs=update")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = records[0]
    assert record["fits"] and record["programs"] == ["update"] and list(record["memory"]) == ["update"]
    assert "fits v4-8 (update only): peak" in proc.stdout
    assert "compiling sampler" not in proc.stderr and "compiling update" in proc.stderr
