"""The paper's released run (PAPER.md section 6) on a TPU v5p-8 (4 chips, 95 GiB HBM each),
Qwen3-VL-4B-Instruct: the v4 recipe (float32 masters, bfloat16 compute, 256 prompts x 8 samples,
4096 + 4096 tokens, images up to 4 MP), which `python -m vlcal_jax.fit --config
experiments/tpu_v5p.py --topology v5p-8 --config.model.path=Qwen/Qwen3-VL-4B-Instruct` confirms
fits a v5p-8 with rollout chunks of 4 prompts and update micro-batches of 8 rows (README, "Does
it fit?"). Same flags as experiments/tpu_v4.py.
"""

import os

from vlcal_jax.configs import experiment_config


def get_config():
    c = experiment_config(os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
    c.workdir = os.environ.get("VLCAL_WORKDIR", "outputs/tpu_v5p_qwen3vl4b")
    # 95 GiB per chip: the v4-8's memory savers are not needed; whole-group micro-batches of 8 rows
    # (fewer, larger matmuls), pixels and the remat stack on the chips, AdamW moments in float32
    # (what fit measured)
    c.rl.micro_batch_size = 8
    c.rl.offload_pixels = False
    c.model.remat_offload = False
    c.rl.adam_mu_dtype = ""
    return c
