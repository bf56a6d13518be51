"""Qwen3-VL-4B-Instruct on a TPU v5e slice (16 GiB HBM per chip): the v4 recipe with a smaller
rollout batch per step and full FSDP. Same flags as experiments/tpu_v4.py."""

import os

from vlcal_jax.configs import experiment_config


def get_config():
    c = experiment_config(os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
    c.workdir = os.environ.get("VLCAL_WORKDIR", "outputs/tpu_v5e_qwen3vl4b")
    c.rl.prompts_per_step = 128
    c.eval.batch_size = 32
    return c
