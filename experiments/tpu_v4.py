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
    # float32 master weights and AdamW state, bfloat16 compute (and a bfloat16 reference model):
    # bfloat16 masters round the paper's lr 1e-6 updates away (tests/test_microbatch.py)
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    # the backward pass's saved layer inputs (1.5 GiB per 8192-token row, 0.8 per 4 MP image) wait
    # in host memory: copied out and back over PCIe while the layers compute (fit counts it)
    c.model.remat_offload = True
    c.model.offload_reference = True  # the reference model's HBM is free during rollouts and the update
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
    # the paper's 2048 responses cannot go through one sampler call or one backward pass: 4 prompts
    # (32 responses) per generate call; scoring and the update in micro-batches of 4 rows (half a
    # GRPO group each: one row per chip on a v4-8). The update's pixels wait in host memory and
    # AdamW's first moment is bfloat16 (the second moment and the masters stay float32).
    # `python -m vlcal_jax.fit --config experiments/tpu_v4.py --topology v4-8` checks them (README,
    # "Does it fit?"). On a slice of H hosts every micro-batch takes whole groups from every host:
    # --config.rl.micro_batch_size=8*H (fit names it), e.g. 32 on a v4-32.
    c.rl.rollout_batch_size = 4
    c.rl.micro_batch_size = 4
    c.rl.offload_pixels = True
    c.rl.adam_mu_dtype = "bfloat16"
    c.eval.size = 500
    c.eval.every = 50
    c.eval.batch_size = 64
    c.checkpoint.every = 25
    return c
