"""Pure-functional LVLMs: params are plain pytrees, `forward(config, params, ...)`."""

from vlcal_jax.models.checkpoint import from_pretrained, param_specs, save_pretrained
from vlcal_jax.models.config import ModelConfig, TextConfig, VisionConfig, load_config
from vlcal_jax.models.init import init_params
from vlcal_jax.models.qwen3_vl import (ModelInputs, apply, apply_jit, check_batch, check_inputs, forward,
                                       logits_from_hidden, prepare_inputs)
from vlcal_jax.models.vision import VisionInputs, patch_bucket

__all__ = [
    "ModelConfig", "TextConfig", "VisionConfig", "ModelInputs", "VisionInputs", "apply", "apply_jit", "check_batch",
    "check_inputs", "forward", "from_pretrained", "init_params", "load_config", "logits_from_hidden", "nnx",
    "param_specs", "patch_bucket", "prepare_inputs", "save_pretrained",
]


def __getattr__(name):
    # models.nnx (the flax.nnx view) imports flax, 0.5 s: only for the code that uses it.
    if name == "nnx":
        import importlib

        return importlib.import_module("vlcal_jax.models.nnx")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
