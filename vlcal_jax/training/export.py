"""The HF-format model directory: what training exports and evaluation / prediction load.

One directory holds everything a model needs, in the files a Hugging Face Qwen3-VL
checkpoint (e.g. Qwen/Qwen3-VL-4B-Instruct) already ships, so a downloaded checkpoint and
one written by vlcal_jax are used the same way:

    config.json                     models.save_pretrained (transformers reads it too)
    model.safetensors               weights; or model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json                  tokenizer.save_pretrained (also writes chat_template.jinja)
    tokenizer_config.json           eos / pad tokens
    preprocessor_config.json        ImageProcessorConfig.save_pretrained
    vlcal_jax.json                  optional: {"prompt": the instruction the model was trained with}

    export_model_dir(config, params, tokenizer, image_config, out_dir)
    config, params, tokenizer, image_config = load_model_dir(path, dtype=jnp.bfloat16)
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vlcal_jax import models, processing
from vlcal_jax.models.config import ModelConfig

METADATA = "vlcal_jax.json"  # what vlcal_jax adds to the HF files: {"prompt": instruction name}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_FETCH = ("Download a checkpoint on a machine with internet access (e.g. `huggingface-cli download "
          "Qwen/Qwen3-VL-4B-Instruct --local-dir DIR`, which fetches config.json, model*.safetensors, "
          "tokenizer.json, tokenizer_config.json and preprocessor_config.json) and copy DIR here, or export a "
          "trained model with vlcal_jax.training.export.export_model_dir.")


class ModelDir(NamedTuple):
    """A loaded model directory; unpacks as (config, params, tokenizer, image_config)."""

    config: ModelConfig
    params: Any
    tokenizer: Any
    image_config: processing.ImageProcessorConfig


def missing_files(path: str | os.PathLike) -> list[str]:
    """The files of the model-directory format that `path` lacks (empty: it is complete)."""
    path = os.fspath(path)
    required = ("config.json", _WEIGHTS, "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
    missing = []
    for names in required:
        names = (names,) if isinstance(names, str) else names
        if not any(os.path.isfile(os.path.join(path, name)) for name in names):
            missing.append(" or ".join(names))
    return missing


def check_model_dir(path: str | os.PathLike) -> None:
    """Raises FileNotFoundError naming the directory, every missing file and how to get it."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory. {_FETCH}")
    missing = missing_files(path)
    if missing:
        raise FileNotFoundError(f"{path}: not a complete model directory; missing {', '.join(missing)}. {_FETCH}")


def check_compatible(config: ModelConfig, tokenizer, image_config: processing.ImageProcessorConfig,
                     source: str = "model") -> None:
    """Raises ValueError when the tokenizer or image settings do not fit the model config
    (a mismatch would silently give wrong image-token counts or out-of-range token ids)."""
    v = config.vision
    pairs = (("patch_size", image_config.patch_size, v.patch_size),
             ("temporal_patch_size", image_config.temporal_patch_size, v.temporal_patch_size),
             ("merge_size", image_config.merge_size, v.spatial_merge_size))
    problems = [f"preprocessor {name}={ours} but config.json vision {name}={theirs}"
                for name, ours, theirs in pairs if int(ours) != int(theirs)]
    if len(tokenizer) > config.text.vocab_size:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{config.text.vocab_size}")
    for name, token_id in (("<|image_pad|>", config.image_token_id), ("<|vision_start|>", config.vision_start_token_id),
                           ("<|vision_end|>", config.vision_end_token_id)):
        if tokenizer.convert_tokens_to_ids(name) != token_id:
            problems.append(f"the tokenizer maps {name} to {tokenizer.convert_tokens_to_ids(name)} but "
                            f"config.json says {token_id}")
    if problems:
        raise ValueError(f"{source}: tokenizer / preprocessor do not match the model: " + "; ".join(problems)
                         + ". Keep the files of one checkpoint together.")


def export_model_dir(config: ModelConfig, params, tokenizer, image_config: processing.ImageProcessorConfig,
                     out_dir: str | os.PathLike, *, prompt: str | None = None, dtype=None,
                     max_shard_bytes: int = 4 * 2**30) -> str:
    """Writes a complete model directory (see the module docstring); returns its path.

    `prompt`: the instruction the model was trained with (a key of processing.INSTRUCTIONS),
    recorded in vlcal_jax.json so evaluation and prediction prompt it the same way.
    `dtype` casts the saved weights (default: as they are); weights above `max_shard_bytes`
    are split into shards with an index, as transformers does.
    """
    out_dir = os.fspath(out_dir)
    check_compatible(config, tokenizer, image_config, source=out_dir)
    if prompt is not None and prompt not in processing.INSTRUCTIONS:
        raise ValueError(f"prompt={prompt!r}; choose one of {sorted(processing.INSTRUCTIONS)}")
    os.makedirs(out_dir, exist_ok=True)
    models.save_pretrained(config, params, out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype)
    tokenizer.save_pretrained(out_dir)
    image_config.save_pretrained(out_dir)
    if prompt is not None:
        with open(os.path.join(out_dir, METADATA), "w", encoding="utf-8") as f:
            json.dump({"prompt": prompt}, f, indent=2)
    return out_dir


def saved_prompt(path: str | os.PathLike) -> str | None:
    """The prompt (instruction name) recorded by `export_model_dir`, or None (e.g. a HF download)."""
    file = os.path.join(os.fspath(path), METADATA)
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f).get("prompt")


def resolve_dtype(name: str):
    """A parameter dtype from its name; "auto" is float32 on CPU and bfloat16 on TPU / GPU."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    try:
        return jnp.dtype(name)
    except TypeError as error:
        raise ValueError(f"dtype {name!r} is not a dtype name; use auto, float32 or bfloat16") from error


def load_model_dir(path: str | os.PathLike, dtype=jnp.float32, *, compute_dtype=None, sharding=None) -> ModelDir:
    """A model directory -> ModelDir(config, params, tokenizer, image_config).

    `dtype`, `compute_dtype` and `sharding` go to `models.from_pretrained`. Missing files
    are reported all at once, before any weight is read.
    """
    path = os.fspath(path)
    check_model_dir(path)
    tokenizer = processing.load_tokenizer(path)
    image_config = processing.ImageProcessorConfig.from_pretrained(path)
    config, params = models.from_pretrained(path, dtype=dtype, compute_dtype=compute_dtype, sharding=sharding)
    check_compatible(config, tokenizer, image_config, source=path)
    return ModelDir(config, params, tokenizer, image_config)
