"""Image-processor settings: the fields of a checkpoint's `preprocessor_config.json`.

Qwen-VL checkpoints name `Qwen2VLImageProcessor(Fast)` as their image processor; Qwen3-VL
configures it with 16-pixel patches, 2x2 merging, mean/std 0.5 and 256^2..4096^2 pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# PIL.Image.Resampling.BICUBIC; the only filter Qwen-VL processors use.
BICUBIC = 3

# transformers' Qwen2VLImageProcessor class defaults: what HF uses for a key that a
# preprocessor_config.json leaves out.
_HF_CLASS_DEFAULTS = dict(
    patch_size=14,
    temporal_patch_size=2,
    merge_size=2,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 1280,
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
    rescale_factor=1 / 255,
    resample=BICUBIC,
)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """How images become patches; field names follow `preprocessor_config.json`.

    Defaults are Qwen3-VL's (Qwen3-VL-2B/4B/8B/30B-A3B-Instruct ship exactly these).
    min_pixels/max_pixels are HF's `size["shortest_edge"]`/`size["longest_edge"]`: bounds on
    height * width after resizing, not on an edge.
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = BICUBIC

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ImageProcessorConfig.{name} must be positive, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(
                f"ImageProcessorConfig: min_pixels={self.min_pixels} > max_pixels={self.max_pixels}; "
                "swap them or raise max_pixels")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(
                f"ImageProcessorConfig: image_mean/image_std need 3 values (RGB), got "
                f"{self.image_mean} / {self.image_std}")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @property
    def factor(self) -> int:
        """Resized height and width are multiples of this: patch_size * merge_size."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: 3 * temporal_patch_size * patch_size**2."""
        return 3 * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def qwen3_vl(cls, **overrides: Any) -> "ImageProcessorConfig":
        """Qwen3-VL's processor settings, with any field overridden by keyword."""
        return cls(**overrides)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ImageProcessorConfig":
        """Reads `preprocessor_config.json` from a checkpoint directory (or the file itself).

        Accepts `size: {shortest_edge, longest_edge}` (transformers >= 4.5x), the legacy
        `size: {min_pixels, max_pixels}` and top-level `min_pixels`/`max_pixels` (which win,
        as in transformers). Keys the file leaves out take HF's Qwen2VLImageProcessor class
        defaults, so the result matches what `AutoImageProcessor.from_pretrained` would do.
        """
        path = os.fspath(path)
        file = os.path.join(path, "preprocessor_config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"{file}: no preprocessor_config.json; copy it from the HF checkpoint "
                "(e.g. Qwen/Qwen3-VL-4B-Instruct) or use ImageProcessorConfig.qwen3_vl()")
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if raw.get(flag) is False:
                raise ValueError(f"{file}: {flag}=false is not supported; Qwen-VL models expect it on")
        fields = dict(_HF_CLASS_DEFAULTS)
        size = raw.get("size") or {}
        for key, field in (("shortest_edge", "min_pixels"), ("min_pixels", "min_pixels"),
                           ("longest_edge", "max_pixels"), ("max_pixels", "max_pixels")):
            if size.get(key) is not None:
                fields[field] = int(size[key])
        for key in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                    "rescale_factor", "resample"):
            if raw.get(key) is not None:
                fields[key] = raw[key]
        for key in ("image_mean", "image_std"):
            if raw.get(key) is not None:
                value = raw[key]
                fields[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
        if int(fields["resample"]) != BICUBIC:
            raise ValueError(f"{file}: resample={fields['resample']} is not supported; only 3 (bicubic)")
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `preprocessor_config.json` contents, in the layout Qwen3-VL checkpoints ship."""
        return {
            "image_processor_type": "Qwen2VLImageProcessorFast",
            "processor_class": "Qwen3VLProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
            "size": {"shortest_edge": int(self.min_pixels), "longest_edge": int(self.max_pixels)},
            "patch_size": int(self.patch_size),
            "temporal_patch_size": int(self.temporal_patch_size),
            "merge_size": int(self.merge_size),
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": float(self.rescale_factor),
            "resample": int(self.resample),
        }

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Writes `<path>/preprocessor_config.json` (creating the directory); returns the file.

        Both `ImageProcessorConfig.from_pretrained` and transformers'
        `Qwen2VLImageProcessor(Pil|Fast).from_pretrained` read it back to these settings.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        file = os.path.join(path, "preprocessor_config.json")
        with open(file, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(), f, indent=2)
        return file


def resolve_image_config(config: Any) -> ImageProcessorConfig:
    """An ImageProcessorConfig from itself or from a model config with a `vision` section.

    A model config loaded from a checkpoint carries its `preprocessor_config.json` settings
    (`config.image_processor`, set by `models.load_config` / `models.from_pretrained`), which
    are returned. Otherwise it gives patch_size, temporal_patch_size and spatial_merge_size
    (from `config.vision`), and the pixel bounds and normalisation are Qwen3-VL's defaults.
    """
    if isinstance(config, ImageProcessorConfig):
        return config
    if getattr(config, "image_processor", None) is not None:
        return config.image_processor
    vision = getattr(config, "vision", None)
    if vision is None:
        raise TypeError(
            f"expected an ImageProcessorConfig or a model config with `.vision`, got {type(config).__name__}; "
            "pass ImageProcessorConfig.from_pretrained(checkpoint_dir)")
    return ImageProcessorConfig.qwen3_vl(
        patch_size=int(vision.patch_size),
        temporal_patch_size=int(vision.temporal_patch_size),
        merge_size=int(vision.spatial_merge_size),
    )
