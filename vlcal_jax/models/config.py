"""Frozen model configuration built from (and written back to) a HF Qwen3-VL `config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from vlcal_jax.processing.image_config import ImageProcessorConfig

ARCHITECTURE = "Qwen3VLForConditionalGeneration"
MODEL_TYPE = "qwen3_vl"
ATTENTION_IMPLS = ("auto", "xla", "splash")  # ModelConfig.attention_impl; models.splash dispatches on it


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Qwen3-VL vision tower (ViT with 2-D rotary, patch merger and DeepStack mergers)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 2560
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values`: C * Tp * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Qwen3 decoder with interleaved multimodal rotary embeddings (MRoPE)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    attention_bias: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Whole-model config. `dtype` is the compute dtype; params keep the dtype they are loaded in.

    `image_processor`: the image settings the checkpoint's `preprocessor_config.json` gives
    (pixel bounds, normalisation), so `processing.preprocess_images(images, config)` matches
    its HF processor; None means Qwen3-VL's processor defaults. It is host-side metadata, not
    part of the model's identity: equality and the hash (hence jit caches) ignore it, since
    the network computes the same function whatever processor made its pixel values.
    """

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = True
    dtype: str = "float32"
    remat: bool = False  # recompute each layer in the backward pass (activation memory O(1 layer))
    # with remat: the layer inputs the backward pass keeps (one [B, T, D] per layer) wait in pinned
    # host memory instead of HBM (layers.rematerialized)
    remat_offload: bool = False
    # attention kernel: "xla" (pure JAX), "splash" (Pallas TPU, models/splash.py), "auto" (splash
    # when compiling for TPU and splash.supported(shapes), else xla)
    attention_impl: str = "auto"
    image_processor: ImageProcessorConfig | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.remat_offload and not self.remat:
            raise ValueError("remat_offload=True offloads what remat keeps: set remat=True too "
                             "(--config.model.remat=True)")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **kwargs) -> "ModelConfig":
        return dataclasses.replace(self, **kwargs)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, dtype: str = "float32", source: str = "config",
                     remat: bool = False) -> "ModelConfig":
        """Builds the config from a HF `config.json` dict (transformers 4.57+ and 5.x layouts)."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type != MODEL_TYPE and ARCHITECTURE not in archs:
            raise ValueError(
                f"{source}: model_type={model_type!r}, architectures={archs!r}; vlcal_jax.models loads "
                f"dense Qwen3-VL checkpoints ({ARCHITECTURE}, model_type 'qwen3_vl'). "
                "Point --config.model_path at a Qwen3-VL-*-Instruct directory."
            )
        tc = dict(hf.get("text_config") or {})
        vc = dict(hf.get("vision_config") or {})
        if not tc or not vc:
            raise ValueError(f"{source}: needs both 'text_config' and 'vision_config' sections")
        rope = dict(tc.get("rope_parameters") or tc.get("rope_scaling") or {})
        rope_theta = rope.get("rope_theta", tc.get("rope_theta", TextConfig.rope_theta))
        if rope.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"{source}: text rope_type {rope.get('rope_type')!r} is not supported (only 'default')")
        if rope.get("mrope_interleaved") is False:
            raise ValueError(f"{source}: mrope_interleaved=False is Qwen2.5-VL-style MRoPE; Qwen3-VL interleaves")
        vrope = dict(vc.get("rope_parameters") or {})
        n_heads = tc.get("num_attention_heads", TextConfig.num_attention_heads)
        text = TextConfig(
            vocab_size=tc["vocab_size"],
            hidden_size=tc["hidden_size"],
            intermediate_size=tc["intermediate_size"],
            num_hidden_layers=tc["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=tc.get("num_key_value_heads") or n_heads,
            head_dim=tc.get("head_dim") or tc["hidden_size"] // n_heads,
            hidden_act=tc.get("hidden_act", "silu"),
            max_position_embeddings=tc.get("max_position_embeddings", TextConfig.max_position_embeddings),
            rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            mrope_section=tuple(rope.get("mrope_section", TextConfig.mrope_section)),
            attention_bias=bool(tc.get("attention_bias", False)),
        )
        vision = VisionConfig(
            depth=vc.get("depth", VisionConfig.depth),
            hidden_size=vc.get("hidden_size", VisionConfig.hidden_size),
            intermediate_size=vc.get("intermediate_size", VisionConfig.intermediate_size),
            num_heads=vc.get("num_heads", VisionConfig.num_heads),
            in_channels=vc.get("in_channels", 3),
            patch_size=vc.get("patch_size", VisionConfig.patch_size),
            temporal_patch_size=vc.get("temporal_patch_size", 2),
            spatial_merge_size=vc.get("spatial_merge_size", 2),
            out_hidden_size=vc.get("out_hidden_size", text.hidden_size),
            num_position_embeddings=vc.get("num_position_embeddings", VisionConfig.num_position_embeddings),
            deepstack_visual_indexes=tuple(vc.get("deepstack_visual_indexes", VisionConfig.deepstack_visual_indexes)),
            hidden_act=vc.get("hidden_act", "gelu_pytorch_tanh"),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        # transformers 4.57 put tie_word_embeddings in text_config, 5.x at the top level.
        tie = hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
        config = cls(
            vision=vision,
            text=text,
            image_token_id=hf.get("image_token_id", cls.image_token_id),
            video_token_id=hf.get("video_token_id", cls.video_token_id),
            vision_start_token_id=hf.get("vision_start_token_id", cls.vision_start_token_id),
            vision_end_token_id=hf.get("vision_end_token_id", cls.vision_end_token_id),
            tie_word_embeddings=bool(tie),
            dtype=str(jnp.dtype(dtype)),
            remat=remat,
        )
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        t, v = self.text, self.vision
        problems = []
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(f"num_attention_heads={t.num_attention_heads} not a multiple of num_key_value_heads")
        if 2 * sum(t.mrope_section) != t.head_dim:
            problems.append(f"2*sum(mrope_section)={2 * sum(t.mrope_section)} != head_dim={t.head_dim}")
        if v.out_hidden_size != t.hidden_size:
            problems.append(f"vision out_hidden_size={v.out_hidden_size} != text hidden_size={t.hidden_size}")
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            problems.append(f"vision head_dim={v.hidden_size}/{v.num_heads} must be an integer divisible by 4")
        side = int(round(v.num_position_embeddings**0.5))
        if side * side != v.num_position_embeddings:
            problems.append(f"num_position_embeddings={v.num_position_embeddings} is not a square")
        if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
            problems.append(f"deepstack_visual_indexes={v.deepstack_visual_indexes} outside [0, depth={v.depth})")
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            problems.append("more DeepStack mergers than text layers")
        if list(v.deepstack_visual_indexes) != sorted(set(v.deepstack_visual_indexes)):
            problems.append("deepstack_visual_indexes must be strictly increasing")
        if self.image_processor is not None:
            processor = self.image_processor
            for name, ours, theirs in (("patch_size", processor.patch_size, v.patch_size),
                                       ("temporal_patch_size", processor.temporal_patch_size, v.temporal_patch_size),
                                       ("merge_size", processor.merge_size, v.spatial_merge_size)):
                if int(ours) != int(theirs):
                    problems.append(f"preprocessor_config.json {name}={ours} but vision {name}={theirs}")
        if problems:
            raise ValueError(f"{source}: inconsistent Qwen3-VL config: " + "; ".join(problems))

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` that `transformers.Qwen3VLForConditionalGeneration` reads (5.x layout)."""
        t, v = self.text, self.vision
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": {
                "model_type": "qwen3_vl_text",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim,
                "hidden_act": t.hidden_act,
                "max_position_embeddings": t.max_position_embeddings,
                "rms_norm_eps": t.rms_norm_eps,
                "attention_bias": t.attention_bias,
                "tie_word_embeddings": self.tie_word_embeddings,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": t.rope_theta,
                    "mrope_section": list(t.mrope_section),
                    "mrope_interleaved": True,
                },
            },
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                "depth": v.depth,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_channels": v.in_channels,
                "patch_size": v.patch_size,
                "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "out_hidden_size": v.out_hidden_size,
                "num_position_embeddings": v.num_position_embeddings,
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
                "hidden_act": v.hidden_act,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }


def load_config(path: str, *, dtype: str = "float32") -> ModelConfig:
    """Reads `<path>/config.json` (or a config.json path) into a ModelConfig, with the image
    settings of the `preprocessor_config.json` next to it when there is one."""
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(
            f"{file} not found. Download a Qwen3-VL checkpoint (e.g. Qwen/Qwen3-VL-4B-Instruct: config.json, "
            "*.safetensors, tokenizer.json, preprocessor_config.json) to a local directory and pass that path."
        )
    with open(file, encoding="utf-8") as f:
        hf = json.load(f)
    processor_file = os.path.join(os.path.dirname(file), "preprocessor_config.json")
    config = ModelConfig.from_hf_dict(hf, dtype=dtype, source=file)
    if os.path.isfile(processor_file):
        config = config.replace(image_processor=ImageProcessorConfig.from_pretrained(processor_file))
        config.validate(f"{file} with {processor_file}")
    return config
