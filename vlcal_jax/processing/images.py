"""Images -> (pixel_values, image_grid_thw), bit-for-bit what HF's Qwen2VLImageProcessorPil gives.

The HF PIL pipeline, which this reproduces step by step:
1. to RGB: a PIL image with an alpha band (or a `transparency` entry) is composited onto
   white, anything else goes through `Image.convert("RGB")`; a file path is opened as HF's
   `load_image` does (EXIF orientation applied, then `convert("RGB")`, which drops alpha);
   a uint8 array with 1 channel is repeated, with 4 channels alpha-blended onto white.
2. resize to `smart_resize(h, w)` with PIL bicubic on the uint8 RGB image (so the result is
   rounded and clipped to uint8 before any arithmetic);
3. rescale in float64 (x * 1/255), then cast to float32;
4. normalise in float32: (x - mean) / std;
5. patchify (see patches.py).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

from vlcal_jax.processing.image_config import resolve_image_config
from vlcal_jax.processing.patches import patchify

MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """(height, width) -> (resized_height, resized_width), both multiples of `factor`.

    The aspect ratio is kept as closely as possible and resized_height * resized_width is
    brought into [min_pixels, max_pixels] (Qwen2-VL's rule, same float arithmetic as HF).
    """
    if min(height, width) <= 0:
        raise ValueError(f"image has zero size ({width}x{height}); it cannot be resized")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, "
            f"got {max(height, width) / min(height, width)} ({width}x{height})")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_image_tokens(grid_thw: Any, merge_size: int) -> Any:
    """Number of `<|image_pad|>` tokens: grid_t * grid_h * grid_w // merge_size**2.

    grid_thw [3] -> int; [n, 3] -> int64 [n].
    """
    grid = np.asarray(grid_thw, dtype=np.int64)
    counts = grid.prod(axis=-1) // merge_size**2
    return int(counts) if grid.ndim == 1 else counts


def _describe(image: Any, index: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"images[{index}] ({os.fspath(image)})"
    if isinstance(image, dict) and image.get("path"):
        return f"images[{index}] ({image['path']})"
    return f"images[{index}]"


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    """HF `convert_to_rgb` for a PIL image: alpha composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """HF `convert_to_rgb` for a uint8 [H, W] or [H, W, C] array with C in (1, 3, 4)."""
    if array.dtype != np.uint8:
        raise ValueError(
            f"{name}: arrays must be uint8 [H, W, C] with values 0..255, got dtype {array.dtype}; "
            "convert with (x * 255).round().astype(np.uint8) or pass a PIL image")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: expected an [H, W, C] array with C in (1, 3, 4), got shape {array.shape}")
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def _open_file(source: Any, name: str) -> np.ndarray:
    """HF `load_image` for a file: open, apply EXIF orientation, `convert("RGB")`."""
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise ValueError(f"{name}: URLs are not fetched (nothing is downloaded at run time); "
                         "download the image and pass its local path")
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise FileNotFoundError(f"{name}: no such file; check the path or the data set's image folder")
    try:
        handle = source if isinstance(source, (str, os.PathLike)) else io.BytesIO(source)
        with PIL.Image.open(handle) as image:
            image = PIL.ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"{name}: not a readable image file ({error}); replace it with a PNG/JPEG "
            "or drop the example") from error


def load_rgb(image: Any, index: int = 0) -> np.ndarray:
    """One image (PIL, uint8 array, path, bytes, or {"bytes"|"path": ...}) -> uint8 RGB [H, W, 3].

    Raises ValueError naming `images[index]` for a zero-size image or an unreadable file.
    """
    name = _describe(image, index)
    if isinstance(image, dict):
        source = image.get("bytes") or image.get("path")
        if source is None:
            raise ValueError(f"{name}: a dict image needs a 'bytes' or 'path' entry, got keys {sorted(image)}")
        image = source
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"{name}: image has zero size ({image.width}x{image.height}); drop it")
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        if image.size == 0:
            raise ValueError(f"{name}: image has zero size (shape {image.shape}); drop it")
        return _array_to_rgb(image, name)
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        rgb = _open_file(image if not isinstance(image, memoryview) else bytes(image), name)
        if rgb.size == 0:
            raise ValueError(f"{name}: image has zero size (shape {rgb.shape}); drop it")
        return rgb
    raise TypeError(f"{name}: unsupported image type {type(image).__name__}; "
                    "pass a PIL image, a uint8 [H, W, C] array, a file path or encoded bytes")


def preprocess_images(images: Sequence[Any], config: Any) -> tuple[np.ndarray, np.ndarray]:
    """Images -> (pixel_values float32 [sum_patches, 3*Tp*P*P], image_grid_thw int64 [n_images, 3]).

    Identical to `Qwen2VLImageProcessorPil(...)(images)` configured like `config` (an
    ImageProcessorConfig, or a model config: one loaded from a checkpoint uses that
    checkpoint's preprocessor_config.json, any other Qwen3-VL's pixel bounds and
    normalisation; see `resolve_image_config`). Each image is a PIL image, a uint8 [H, W, C]
    array, a file path, encoded bytes or an EasyR1 {"bytes": ..., "path": ...} dict.
    """
    cfg = resolve_image_config(config)
    if isinstance(images, (str, os.PathLike, bytes, dict, np.ndarray, PIL.Image.Image)):
        images = [images]
    mean = np.asarray(cfg.image_mean, dtype=np.float32)
    std = np.asarray(cfg.image_std, dtype=np.float32)
    all_patches, grids = [], []
    for index, image in enumerate(images):
        rgb = load_rgb(image, index)
        height, width = rgb.shape[:2]
        if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
            raise ValueError(
                f"{_describe(image, index)}: aspect ratio {max(height, width) / min(height, width):.1f} "
                f"({width}x{height}) is over {MAX_ASPECT_RATIO}, which Qwen-VL processors reject; "
                "crop or pad the image")
        new_height, new_width = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
        resized = PIL.Image.fromarray(rgb).resize((new_width, new_height), resample=cfg.resample)
        pixels = (np.asarray(resized).astype(np.float64) * cfg.rescale_factor).astype(np.float32)
        pixels = (pixels - mean) / std
        all_patches.append(patchify(pixels.transpose(2, 0, 1), cfg.patch_size,
                                    cfg.temporal_patch_size, cfg.merge_size))
        grids.append((1, new_height // cfg.patch_size, new_width // cfg.patch_size))
    if not all_patches:
        return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    return np.concatenate(all_patches, axis=0), np.asarray(grids, dtype=np.int64)
