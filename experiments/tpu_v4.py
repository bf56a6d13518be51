"""The paper's released run (PAPER.md section 6) on a TPU v4 pod slice, Qwen3-VL-4B-Instruct.

    python -m vlcal_jax.train --config experiments/tpu_v4.py \
        --config.model.path=/mnt/disks/models/Qwen3-VL-4B-Instruct \
        --config.data.train_files=/mnt/disks/data/vl_calibration_12k.parquet \
        --config.data.image_dir=/mnt/disks/data/images

launch/tpu_pod.sh runs this on every worker. Model and data must already be on local disk or
a mounted bucket (nothing is downloaded at run time).
"""

import os

from vlcal_jax.configs import default_config


def get_config():
    c = default_config()
    c.workdir = os.environ.get("VLCAL_WORKDIR", "outputs/tpu_v4_qwen3vl4b")
    c.model.path = os.environ.get("VLCAL_MODEL_PATH", "")
    c.model.param_dtype = "bfloat16"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.data.kind = "records"
    c.data.train_files = tuple(f for f in os.environ.get("VLCAL_TRAIN_FILES", "").split(",") if f)
    c.data.image_dir = os.environ.get("VLCAL_IMAGE_DIR", "")
    c.data.min_pixels = 262_144
    c.data.max_pixels = 4_194_304
    c.data.length_buckets = (1024, 2048, 4096)
    c.rl.steps = 300
    c.rl.prompts_per_step = 256
    c.rl.samples_per_prompt = 8
    c.rl.max_new_tokens = 4096
    c.eval.size = 500
    c.eval.every = 50
    c.eval.batch_size = 64
    c.checkpoint.every = 25
    return c
