"""Normalised images <-> the flat patch rows that Qwen-VL vision towers take.

Row order (HF's Qwen2VLImageProcessor): for each image, merge windows in raster order,
inside a window its merge_size x merge_size patches in raster order. Column order:
(channel, temporal copy, patch row, patch column). A still image is repeated
temporal_patch_size times along the temporal axis.

Both functions accept NumPy or JAX arrays (they use the array's own namespace), so an image
perturbation can run on device between `patches_to_images` and `images_to_patches`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from vlcal_jax.processing.image_config import resolve_image_config


def _namespace(array: Any):
    if isinstance(array, np.ndarray):
        return np
    if hasattr(array, "__array_namespace__"):
        return array.__array_namespace__()
    return np


def patchify(image: Any, patch_size: int, temporal_patch_size: int, merge_size: int) -> Any:
    """One normalised image [C, H, W] -> patch rows [H/P * W/P, C*Tp*P*P].

    H and W must be multiples of patch_size * merge_size.
    """
    xp = _namespace(image)
    channels, height, width = image.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    m, p = merge_size, patch_size
    patches = image.reshape(channels, grid_h // m, m, p, grid_w // m, m, p)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
    patches = xp.broadcast_to(
        patches[:, :, :, :, :, None], (*patches.shape[:5], temporal_patch_size, p, p))
    return patches.reshape(grid_h * grid_w, channels * temporal_patch_size * p * p)


def images_to_patches(images: Sequence[Any], config: Any) -> tuple[Any, np.ndarray]:
    """Normalised images, each [C, H, W] -> (pixel_values [sum_patches, C*Tp*P*P], grid_thw int64 [n, 3]).

    The inverse of `patches_to_images`. Each H and W must be a multiple of
    patch_size * merge_size (true of every image `preprocess_images` produced).
    `config`: an ImageProcessorConfig or a model config with `.vision`.
    """
    cfg = resolve_image_config(config)
    rows, grids = [], []
    for index, image in enumerate(images):
        if len(image.shape) != 3:
            raise ValueError(f"images[{index}]: expected [C, H, W], got shape {tuple(image.shape)}")
        _, height, width = image.shape
        if height % cfg.factor or width % cfg.factor:
            raise ValueError(
                f"images[{index}]: height {height} and width {width} must be multiples of "
                f"patch_size * merge_size = {cfg.factor}; resize with smart_resize first")
        rows.append(patchify(image, cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size))
        grids.append((1, height // cfg.patch_size, width // cfg.patch_size))
    grid_thw = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    if not rows:
        return np.zeros((0, cfg.patch_dim), np.float32), grid_thw
    return _namespace(rows[0]).concatenate(rows, axis=0), grid_thw


def patches_to_images(pixel_values: Any, grid_thw: Any, config: Any) -> list[Any]:
    """(pixel_values [sum_patches, C*Tp*P*P], grid_thw [n, 3]) -> n images, each [C, H, W].

    Returns the normalised, resized images (the first temporal copy of each patch; for a
    still image all copies are equal). `grid_thw` must be concrete (NumPy or a list): it
    fixes the output shapes. Only images (grid_t == 1) are supported.
    """
    cfg = resolve_image_config(config)
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if pixel_values.shape[-1] % (tp * p * p):
        raise ValueError(
            f"pixel_values rows have {pixel_values.shape[-1]} values, not a multiple of "
            f"temporal_patch_size * patch_size**2 = {tp * p * p}; wrong config for these patches?")
    channels = pixel_values.shape[-1] // (tp * p * p)
    counts = grid_thw.prod(axis=1)
    if int(counts.sum()) != pixel_values.shape[0]:
        raise ValueError(
            f"grid_thw covers {int(counts.sum())} patches but pixel_values has {pixel_values.shape[0]} rows")
    images, start = [], 0
    for index, (grid_t, grid_h, grid_w) in enumerate(grid_thw.tolist()):
        if grid_t != 1:
            raise ValueError(f"grid_thw[{index}] has grid_t={grid_t}; only images (grid_t == 1) are supported")
        if grid_h % m or grid_w % m:
            raise ValueError(f"grid_thw[{index}] = {grid_thw[index].tolist()} is not a multiple of merge_size {m}")
        rows = pixel_values[start:start + grid_h * grid_w]
        start += grid_h * grid_w
        rows = rows.reshape(grid_h // m, grid_w // m, m, m, channels, tp, p, p)[:, :, :, :, :, 0]
        image = rows.transpose(4, 0, 2, 5, 1, 3, 6)  # [C, gh/m, m, P, gw/m, m, P]
        images.append(image.reshape(channels, grid_h * p, grid_w * p))
    return images
