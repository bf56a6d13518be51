"""HF Qwen3-VL safetensors <-> vlcal_jax params pytree.

Params are nested dicts; per-layer weights are stacked on a leading layer axis (the decoder and
ViT run under `lax.scan`). Linear kernels are stored [in, out] (HF stores [out, in]); the 3-D
patch convolution becomes one [C*Tp*P*P, D] matmul over the processor's flattened patches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax.models import safetensors_io
from vlcal_jax.models.config import ModelConfig, load_config


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One params leaf: its path, HF name template ({i} = layer), layer count (0 = unstacked),
    and how an HF tensor becomes ours ("t" transpose, "conv" flatten+transpose, "" as is)."""

    path: tuple[str, ...]
    hf_name: str
    layers: int
    transform: str = ""


def _to_ours(array: np.ndarray, transform: str) -> np.ndarray:
    if transform == "t":
        return array.T
    if transform == "conv":
        return array.reshape(array.shape[0], -1).T
    return array


def _to_hf(array: np.ndarray, transform: str, hf_shape: tuple[int, ...]) -> np.ndarray:
    if transform in ("t", "conv"):
        return np.ascontiguousarray(array.T).reshape(hf_shape)
    return array


def param_specs(config: ModelConfig) -> list[ParamSpec]:
    """Every parameter of the model, in a fixed order."""
    v, t = config.vision, config.text
    specs = [
        ParamSpec(("visual", "patch_embed", "kernel"), "model.visual.patch_embed.proj.weight", 0, "conv"),
        ParamSpec(("visual", "patch_embed", "bias"), "model.visual.patch_embed.proj.bias", 0),
        ParamSpec(("visual", "pos_embed"), "model.visual.pos_embed.weight", 0),
    ]
    block = "model.visual.blocks.{i}."
    for ours, hf in (("norm1", "norm1"), ("norm2", "norm2")):
        specs += [ParamSpec(("visual", "blocks", ours, "scale"), block + hf + ".weight", v.depth),
                  ParamSpec(("visual", "blocks", ours, "bias"), block + hf + ".bias", v.depth)]
    for ours, hf in (("attn", "qkv"), ("attn", "proj"), ("mlp", "fc1"), ("mlp", "fc2")):
        name = block + (f"attn.{hf}" if ours == "attn" else f"mlp.linear_{hf}")
        specs += [ParamSpec(("visual", "blocks", ours, hf, "kernel"), name + ".weight", v.depth, "t"),
                  ParamSpec(("visual", "blocks", ours, hf, "bias"), name + ".bias", v.depth)]
    n_ds = len(v.deepstack_visual_indexes)
    for prefix, path, count in (("model.visual.merger.", ("visual", "merger"), 0),
                                ("model.visual.deepstack_merger_list.{i}.", ("visual", "deepstack_mergers"), n_ds)):
        if path[-1] == "deepstack_mergers" and not n_ds:
            continue
        specs += [ParamSpec(path + ("norm", "scale"), prefix + "norm.weight", count),
                  ParamSpec(path + ("norm", "bias"), prefix + "norm.bias", count)]
        for fc in ("fc1", "fc2"):
            specs += [ParamSpec(path + (fc, "kernel"), prefix + f"linear_{fc}.weight", count, "t"),
                      ParamSpec(path + (fc, "bias"), prefix + f"linear_{fc}.bias", count)]
    specs.append(ParamSpec(("text", "embed"), "model.language_model.embed_tokens.weight", 0))
    layer = "model.language_model.layers.{i}."
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        specs.append(ParamSpec(("text", "layers", "attn", proj, "kernel"), layer + f"self_attn.{proj}.weight",
                               t.num_hidden_layers, "t"))
        if t.attention_bias:
            specs.append(ParamSpec(("text", "layers", "attn", proj, "bias"), layer + f"self_attn.{proj}.bias",
                                   t.num_hidden_layers))
    for norm in ("q_norm", "k_norm"):
        specs.append(ParamSpec(("text", "layers", "attn", norm), layer + f"self_attn.{norm}.weight",
                               t.num_hidden_layers))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        specs.append(ParamSpec(("text", "layers", "mlp", proj, "kernel"), layer + f"mlp.{proj}.weight",
                               t.num_hidden_layers, "t"))
    specs += [ParamSpec(("text", "layers", "input_norm"), layer + "input_layernorm.weight", t.num_hidden_layers),
              ParamSpec(("text", "layers", "post_norm"), layer + "post_attention_layernorm.weight",
                        t.num_hidden_layers),
              ParamSpec(("text", "norm"), "model.language_model.norm.weight", 0)]
    if not config.tie_word_embeddings:
        specs.append(ParamSpec(("lm_head", "kernel"), "lm_head.weight", 0, "t"))
    return specs


def _hf_names(spec: ParamSpec) -> list[str]:
    return [spec.hf_name.format(i=i) for i in range(spec.layers)] if spec.layers else [spec.hf_name]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def from_pretrained(path: str, dtype=jnp.float32, *, compute_dtype=None,
                    sharding: Callable[[tuple[str, ...], tuple[int, ...]], jax.sharding.Sharding] | None = None):
    """Loads a HF Qwen3-VL checkpoint directory -> (ModelConfig, params).

    The config carries the directory's `preprocessor_config.json` settings (`image_processor`),
    so `processing.preprocess_images(images, config)` matches the checkpoint's HF processor.

    `dtype` is the parameter dtype; `compute_dtype` (default: `dtype`) goes into the config.
    Tensors are read one at a time from memory-mapped files. With `sharding(path, shape)`
    each process materialises only its addressable shards (`jax.make_array_from_callback`).
    """
    dtype = jnp.dtype(dtype)
    config = load_config(path, dtype=str(jnp.dtype(compute_dtype or dtype)))
    tensors = safetensors_io.open_checkpoint(path)
    specs = param_specs(config)
    expected = {name for spec in specs for name in _hf_names(spec)}
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected - ignorable)
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match its Qwen3-VL config.json. "
            f"Missing ({len(missing)}): {missing[:20]}{' ...' if len(missing) > 20 else ''}. "
            f"Unexpected ({len(unexpected)}): {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}. "
            "Check that config.json and the safetensors files come from the same model."
        )
    params: dict = {}
    for spec in specs:
        names = _hf_names(spec)

        def read(i, spec=spec, names=names):
            array = _to_ours(tensors[names[i]].get(names[i]), spec.transform)
            return np.asarray(array, dtype=dtype)

        first = read(0)
        shape = ((spec.layers,) if spec.layers else ()) + first.shape
        if sharding is None:
            if spec.layers:
                host = np.empty(shape, dtype)
                host[0] = first
                for i in range(1, spec.layers):
                    host[i] = read(i)
            else:
                host = first
            value = jnp.asarray(host)
            del host
        else:
            def callback(index, spec=spec, read=read):
                if not spec.layers:
                    return read(0)[index]
                rows = range(*index[0].indices(spec.layers))
                return np.stack([read(i)[index[1:]] for i in rows])

            value = jax.make_array_from_callback(shape, sharding(spec.path, shape), callback)
        _set(params, spec.path, value)
    return config, params


def save_pretrained(config: ModelConfig, params, path: str, *, max_shard_bytes: int = 4 * 2**30,
                    dtype=None) -> None:
    """Writes `config.json` and safetensors (sharded with an index above `max_shard_bytes`) that
    `transformers.Qwen3VLForConditionalGeneration.from_pretrained` loads, and the
    `preprocessor_config.json` of `config.image_processor` when the config carries one."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_hf_dict() | {"dtype": str(jnp.dtype(dtype or _leaf_dtype(params)))}, f, indent=2)
    if config.image_processor is not None:
        config.image_processor.save_pretrained(path)
    entries = []
    for spec in param_specs(config):
        value = _get(params, spec.path)
        for i, name in enumerate(_hf_names(spec)):
            entries.append((name, spec, value if not spec.layers else None, i))
    total = sum(int(np.prod(_get(params, s.path).shape[1 if s.layers else 0:])) * _itemsize(params, s, dtype)
                for _, s, _, _ in entries)
    n_shards = max(1, math.ceil(total / max_shard_bytes))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = int(np.prod(_get(params, entry[1].path).shape[1 if entry[1].layers else 0:])) * \
            _itemsize(params, entry[1], dtype)
        if shards[-1] and size + nbytes > max_shard_bytes and n_shards > 1:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes

    def materialise(entry):
        name, spec, value, i = entry
        array = np.asarray(jax.device_get(_get(params, spec.path)[i] if spec.layers else value))
        if dtype is not None:
            array = array.astype(jnp.dtype(dtype))
        hf_shape = array.shape[::-1] if spec.transform == "t" else None
        if spec.transform == "conv":
            v = config.vision
            hf_shape = (array.shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
        return name, _to_hf(array, spec.transform, hf_shape)

    if len(shards) == 1:
        safetensors_io.save_file((materialise(e) for e in shards[0]), os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors_io.save_file((materialise(e) for e in shard), os.path.join(path, file))
        weight_map.update({e[0]: file for e in shard})
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _leaf_dtype(params):
    return jax.tree.leaves(params)[0].dtype


def _itemsize(params, spec, dtype):
    return jnp.dtype(dtype or _get(params, spec.path).dtype).itemsize
