"""Qwen3-VL-4B-Instruct on a TPU v5e slice (16 GiB HBM per chip): the v4 recipe with a smaller
rollout batch per step and full FSDP. Same flags as experiments/tpu_v4.py."""

from vlcal_jax.configs import default_config  # noqa: F401  (kept for `--config` discovery)


def get_config():
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("tpu_v4", os.path.join(os.path.dirname(__file__), "tpu_v4.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.workdir = os.environ.get("VLCAL_WORKDIR", "outputs/tpu_v5e_qwen3vl4b")
    c.rl.prompts_per_step = 128
    c.eval.batch_size = 32
    return c
