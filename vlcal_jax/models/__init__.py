"""Pure-functional LVLMs: params are plain pytrees, `forward(config, params, ...)`."""

from vlcal_jax.models.checkpoint import from_pretrained, param_specs, save_pretrained
from vlcal_jax.models.config import ModelConfig, TextConfig, VisionConfig, load_config
from vlcal_jax.models.init import init_params
from vlcal_jax.models.qwen3_vl import ModelInputs, apply, apply_jit, forward, logits_from_hidden, prepare_inputs
from vlcal_jax.models.vision import VisionInputs, patch_bucket

__all__ = [
    "ModelConfig", "TextConfig", "VisionConfig", "ModelInputs", "VisionInputs", "apply", "apply_jit", "forward",
    "from_pretrained", "init_params", "load_config", "logits_from_hidden", "param_specs", "patch_bucket",
    "prepare_inputs", "save_pretrained",
]
