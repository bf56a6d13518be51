"""Qwen3-VL-4B-Instruct on a TPU v5e-16 (16 chips of 16 GiB, 4 hosts): the v4 recipe (float32
masters, bfloat16 compute, the memory savers of experiments/tpu_v4.py) with a smaller step. A v5e
chip holds 16 GiB for its share of the 71 GB of float32 masters and AdamW moments, and at the
paper's full step (4096 + 4096 tokens, 4 MP images, micro-batches of 2 rows per chip, which 4
hosts need) the update takes 17.5 GiB per chip on a v5e-16 (README, "Does it fit?"). So: 128
prompts x 8 samples per step, prompts up to 2048 tokens, responses up to the paper's 4096, images
up to 1 MP, micro-batches of 32 rows (whole groups from every host): 14.2 of 16 GiB per chip,
which `python -m vlcal_jax.fit --config experiments/tpu_v5e.py --topology v5e-16` checks. Same
flags as experiments/tpu_v4.py.
"""

import os

from vlcal_jax.configs import experiment_config


def get_config():
    c = experiment_config(os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
    c.workdir = os.environ.get("VLCAL_WORKDIR", "outputs/tpu_v5e_qwen3vl4b")
    c.rl.prompts_per_step = 128
    c.data.length_buckets = (1024, 2048)
    c.data.max_pixels = 1_048_576
    c.rl.micro_batch_size = 32
    c.eval.batch_size = 32
    return c
