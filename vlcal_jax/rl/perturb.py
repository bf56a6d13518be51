"""Image perturbations I' for visual certainty estimation, in patch space (PAPER.md section 4).

They act on the processor's `pixel_values`, on device, jittable, deterministic for a given
rng. Layout (HF Qwen2-VL / Qwen3-VL image processor): float32 [num_patches, C*Tp*P*P], the
images concatenated; for an image with grid (t, gh, gw) its t*gh*gw rows are ordered
(t, gh//m, gw//m, m, m) (merge-window major: the m*m patches of one merge window are
adjacent) and each row is flattened as (C, Tp, P, P) (channel, temporal copy, patch row,
patch column). Values are normalised, x = (pixel / 255 - mean_c) / std_c.

The released code blacks out 14x14-pixel blocks of the PIL image; here a block is one
model patch (P = 16 for Qwen3-VL, 14 for Qwen2-VL), so the mask is aligned with what the
vision tower sees, and all Tp temporal copies of a patch are blacked out together.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

QWEN3_VL_MEAN = (0.5, 0.5, 0.5)
QWEN3_VL_STD = (0.5, 0.5, 0.5)

GridThw = Sequence[Sequence[int]]


def _per_channel(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def normalized_pixel(pixel: float, mean=QWEN3_VL_MEAN, std=QWEN3_VL_STD) -> np.ndarray:
    """The normalised value [C] of a 0..255 pixel value in every channel."""
    value = (pixel / 255.0 - np.asarray(mean, np.float64)) / np.asarray(std, np.float64)
    return value.astype(np.float32)


def _row(per_channel: np.ndarray | jax.Array, row_dim: int) -> jax.Array:
    """Expands a per-channel vector [C] to one patch row [C*Tp*P*P] (channel-major)."""
    num_channels = per_channel.shape[0]
    if row_dim % num_channels:
        raise ValueError(f"patch row of {row_dim} values does not split into {num_channels} channels")
    return jnp.repeat(jnp.asarray(per_channel, jnp.float32), row_dim // num_channels)


def patch_blackout(
    pixel_values: jax.Array,
    rng: jax.Array,
    prob: float = 0.8,
    mean=QWEN3_VL_MEAN,
    std=QWEN3_VL_STD,
    black_value: Sequence[float] | None = None,
) -> jax.Array:
    """Random patch masking: [num_patches, D] -> [num_patches, D] (section 4, the default I').

    Every patch row is independently replaced, with probability `prob`, by the black row:
    `black_value` per channel if given, else the normalised value of pixel 0 under the image
    processor's `mean`/`std` (defaults: Qwen3-VL's; `rl.step.perturbed_inputs` passes the model's).
    """
    black = normalized_pixel(0.0, mean, std) if black_value is None else _per_channel(black_value)
    drop = jax.random.bernoulli(rng, prob, (pixel_values.shape[0], 1))
    return jnp.where(drop, _row(black, pixel_values.shape[1])[None, :], pixel_values)


def gaussian_noise(
    pixel_values: jax.Array,
    rng: jax.Array,
    std_pixels: float = 189.0,
    mean=QWEN3_VL_MEAN,
    std=QWEN3_VL_STD,
    temporal_patch_size: int = 2,
) -> jax.Array:
    """Additive Gaussian noise of std `std_pixels` on the 0..255 scale (section 4 ablation).

    In normalised units the std is std_pixels / 255 / std_c; the result is clipped to the
    normalised image of [0, 255]. One noise image is shared by the Tp temporal copies of a
    patch, as noise added to the picture before patchifying would be. No uint8 rounding.
    """
    num_patches, row_dim = pixel_values.shape
    num_channels = len(mean)
    shape = (num_patches, num_channels, 1, row_dim // (num_channels * temporal_patch_size))
    noise = jax.random.normal(rng, shape, jnp.float32)
    noise = jnp.broadcast_to(noise, shape[:2] + (temporal_patch_size, shape[3])).reshape(num_patches, row_dim)
    scale = _row(np.float32(std_pixels) / np.float32(255.0) / _per_channel(std), row_dim)
    low = _row(normalized_pixel(0.0, mean, std), row_dim)
    high = _row(normalized_pixel(255.0, mean, std), row_dim)
    return jnp.clip(pixel_values + noise * scale, low, high)


def grey_mask(pixel_values: jax.Array, value: float = 128.0, mean=QWEN3_VL_MEAN, std=QWEN3_VL_STD) -> jax.Array:
    """Full mask: every pixel set to grey `value` (0..255) (section 4 ablation)."""
    row = _row(normalized_pixel(value, mean, std), pixel_values.shape[1])
    return jnp.broadcast_to(row, pixel_values.shape).astype(pixel_values.dtype)


def _image_sizes(grid_thw: GridThw, merge_size: int):
    sizes = []
    for t, gh, gw in grid_thw:
        if gh % merge_size or gw % merge_size:
            raise ValueError(f"image grid {(t, gh, gw)} is not a multiple of merge_size={merge_size}")
        sizes.append((int(t), int(gh), int(gw)))
    return sizes


def patches_to_images(
    pixel_values: jax.Array, grid_thw: GridThw, merge_size: int = 2, patch_size: int = 16, temporal_patch_size: int = 2
) -> list[jax.Array]:
    """Inverse of the processor's patchify: [num_patches, D] -> per image [t*Tp, C, H, W].

    `grid_thw` is host data (a static tuple of (t, gh, gw)); H = gh * P, W = gw * P.
    """
    m, p, tp = merge_size, patch_size, temporal_patch_size
    channels = pixel_values.shape[1] // (tp * p * p)
    sizes = _image_sizes(grid_thw, m)
    total = sum(t * gh * gw for t, gh, gw in sizes)
    if total != pixel_values.shape[0]:
        raise ValueError(f"grid_thw covers {total} patches but pixel_values has {pixel_values.shape[0]} rows")
    images, start = [], 0
    for t, gh, gw in sizes:
        rows = pixel_values[start : start + t * gh * gw]
        start += t * gh * gw
        x = rows.reshape(t, gh // m, gw // m, m, m, channels, tp, p, p)
        x = x.transpose(0, 6, 5, 1, 3, 7, 2, 4, 8)  # (t, Tp, C, gh/m, m, P, gw/m, m, P)
        images.append(x.reshape(t * tp, channels, gh * p, gw * p))
    return images


def images_to_patches(
    images: Sequence[jax.Array],
    grid_thw: GridThw,
    merge_size: int = 2,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
) -> jax.Array:
    """The processor's patchify: per image [t*Tp, C, H, W] -> [num_patches, C*Tp*P*P]."""
    m, p, tp = merge_size, patch_size, temporal_patch_size
    rows = []
    for image, (t, gh, gw) in zip(images, _image_sizes(grid_thw, m)):
        channels = image.shape[1]
        x = image.reshape(t, tp, channels, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, gh/m, gw/m, m, m, C, Tp, P, P)
        rows.append(x.reshape(t * gh * gw, channels * tp * p * p))
    return jnp.concatenate(rows, axis=0)


def gaussian_blur_matrix(size: int, sigma: float) -> np.ndarray:
    """[size, size] matrix of a 1-D Gaussian blur (std `sigma`) with edge-replicate borders.

    The kernel is truncated at ceil(3 sigma), the support of PIL's three box passes; sigma = 0
    gives the identity. Row i holds the weights of output pixel i.
    """
    if sigma <= 0:
        return np.eye(size, dtype=np.float32)
    half = int(math.ceil(3.0 * sigma))
    offsets = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    matrix = np.zeros((size, size), np.float64)
    for offset, weight in zip(offsets, kernel):
        np.add.at(matrix, (np.arange(size), np.clip(np.arange(size) + offset, 0, size - 1)), weight)
    return matrix.astype(np.float32)


def blur(
    pixel_values: jax.Array,
    grid_thw: GridThw,
    radius: float = 10.0,
    merge_size: int = 2,
    patch_size: int = 16,
    temporal_patch_size: int = 2,
) -> jax.Array:
    """Gaussian blur of every image (section 4 ablation): [num_patches, D] -> [num_patches, D].

    Rebuilds each image from its patches, blurs it separably with std `radius` pixels (the
    meaning of PIL's GaussianBlur radius), edge-replicate borders, and re-patchifies. The blur
    is linear with unit weight, so blurring the normalised values equals normalising the
    blurred pixels (no uint8 rounding). `grid_thw` must be a static tuple. The blur is two
    dense [H, H] / [W, W] matmuls per image (O(HW(H + W)) work): simple, exact at the
    borders and MXU-friendly, which is enough for an ablation.
    """
    images = patches_to_images(pixel_values, grid_thw, merge_size, patch_size, temporal_patch_size)
    blurred = []
    for image in images:
        rows = jnp.asarray(gaussian_blur_matrix(image.shape[2], radius))
        cols = jnp.asarray(gaussian_blur_matrix(image.shape[3], radius))
        blurred.append(
            jnp.einsum("hk,fckl,wl->fchw", rows, image, cols, precision=jax.lax.Precision.HIGHEST)
        )
    return images_to_patches(blurred, grid_thw, merge_size, patch_size, temporal_patch_size).astype(pixel_values.dtype)


PERTURBATIONS = {
    "blackout": patch_blackout,
    "noise": gaussian_noise,
    "blur": lambda pixel_values, rng, **kw: blur(pixel_values, **kw),
    "grey": lambda pixel_values, rng, **kw: grey_mask(pixel_values, **kw),
}


def _freeze(value):
    """Hashable copy of a perturbation option (lists and arrays become nested tuples)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@functools.partial(jax.jit, static_argnames=("k", "kind", "options"))
def _perturb_k(pixel_values, rng, k, kind, options):
    fn = functools.partial(PERTURBATIONS[kind], **dict(options))
    return jax.vmap(lambda key: fn(pixel_values, key))(jax.random.split(rng, k))


def perturb_k(pixel_values: jax.Array, rng: jax.Array, k: int, kind: str = "blackout", **kwargs) -> jax.Array:
    """K independent perturbations: [num_patches, D] -> [K, num_patches, D].

    `kind` is one of "blackout" (default, the paper's choice), "noise", "blur", "grey";
    `kwargs` go to that function (blur needs grid_thw) and are static (compiled in).
    Perturbation i uses jax.random.split(rng, k)[i], so the result is a pure function of
    (pixel_values, rng).
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; choose one of {sorted(PERTURBATIONS)}")
    options = tuple(sorted((name, _freeze(value)) for name, value in kwargs.items()))
    return _perturb_k(pixel_values, rng, k=k, kind=kind, options=options)
