"""The paper's released run (PAPER.md section 6) on a TPU v5p-8 (4 chips, 95 GiB HBM each),
Qwen3-VL-4B-Instruct: the v4 recipe (float32 masters, bfloat16 compute, 256 prompts x 8 samples,
4096 + 4096 tokens, images up to 4 MP), which `python -m vlcal_jax.fit --config
experiments/tpu_v5p.py --topology v5p-8 --config.model.path=Qwen/Qwen3-VL-4B-Instruct` confirms
fits a v5p-8 with rollout chunks of 4 prompts and update micro-batches of 8 rows (README, "Does
it fit?"). Same flags as experiments/tpu_v4.py.
"""

from vlcal_jax.configs import default_config  # noqa: F401  (kept for `--config` discovery)


def get_config():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("tpu_v4", os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.workdir = os.environ.get("VLCAL_WORKDIR", "outputs/tpu_v5p_qwen3vl4b")
    return c
