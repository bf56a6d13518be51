"""Architectures of released Qwen3-VL checkpoints, from their published `config.json`.

For tools that need only shapes (`python -m vlcal_jax.fit`): no download, no weights. A model
directory's own config.json (models.load_config) is the truth for any other checkpoint.
"""

from __future__ import annotations

import os

from vlcal_jax.models.config import ModelConfig, TextConfig, VisionConfig

# Qwen/Qwen3-VL-*-Instruct config.json values (text_config, vision_config); the fields left out
# (vocab 151936, 8 KV heads of 128, MRoPE (24, 20, 20), rope_theta 5e6, 16-pixel patches, 2x2
# merge, 2304 position embeddings, special token ids) are shared and are ModelConfig's defaults.
PRESETS: dict[str, ModelConfig] = {
    "Qwen3-VL-4B-Instruct": ModelConfig(
        text=TextConfig(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32),
        vision=VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                            deepstack_visual_indexes=(5, 11, 17)),
        tie_word_embeddings=True),
    "Qwen3-VL-8B-Instruct": ModelConfig(
        text=TextConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32),
        vision=VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                            deepstack_visual_indexes=(8, 16, 24)),
        tie_word_embeddings=False),
}


def preset_name(path: str) -> str | None:
    """The preset a model path or hub id names (`Qwen/Qwen3-VL-4B-Instruct`, `/disk/qwen3-vl-4b-instruct`),
    matched on its last component, case-insensitively; None when it names none."""
    last = os.path.basename(os.path.normpath(path)).lower() if path else ""
    return next((name for name in PRESETS if name.lower() == last), None)


def get(name: str) -> ModelConfig:
    """The preset config (compute dtype float32, remat off; `.replace(...)` them)."""
    found = preset_name(name)
    if found is None:
        raise ValueError(f"no architecture preset named {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[found]
