"""The paper's released run (PAPER.md section 6) with Qwen3-VL-8B-Instruct on a TPU v5p-8
(4 chips, 95 GiB HBM each): the v4 recipe (float32 masters, bfloat16 compute, 256 prompts x 8
samples, 4096 + 4096 tokens, images up to 4 MP); `python -m vlcal_jax.fit --config
experiments/tpu_v5p_8b.py --topology v5p-8 --config.model.path=Qwen/Qwen3-VL-8B-Instruct` checks
the sizes (README, "Does it fit?").

    python -m vlcal_jax.train --config experiments/tpu_v5p_8b.py \\
        --config.model.path=/mnt/disks/models/Qwen3-VL-8B-Instruct \\
        --config.data.train_files=/mnt/disks/data/vl_calibration_12k.parquet \\
        --config.data.image_dir=/mnt/disks/data/images
"""

import os

from vlcal_jax.configs import experiment_config


def get_config():
    c = experiment_config(os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
    c.workdir = os.environ.get("VLCAL_WORKDIR", "outputs/tpu_v5p_qwen3vl8b")
    # 95 GiB per chip: the v4-8's memory savers are not needed; whole-group micro-batches of 8 rows
    # (fewer, larger matmuls), pixels on the chips, AdamW moments in float32 (what fit measured)
    c.rl.micro_batch_size = 8
    c.rl.offload_pixels = False
    c.model.remat_offload = False
    c.rl.adam_mu_dtype = ""
    return c
