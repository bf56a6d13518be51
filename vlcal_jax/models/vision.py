"""Qwen3-VL vision tower: patch embedding, interpolated learned positions, 2-D rotary ViT,
patch merger and DeepStack mergers.

Everything that depends on the image grids (`image_grid_thw`, host data) is computed once on
the host by `prepare_vision_inputs` and passed as per-image rows padded to bucketed patch and
image counts, so the jitted tower compiles once per bucket instead of once per image size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vlcal_jax import parallel
from vlcal_jax.models import attention, layers
from vlcal_jax.models.config import VisionConfig

MIN_PATCH_BUCKET = 64


class VisionInputs(NamedTuple):
    """Vision-tower inputs, one row per image, padded to I images x P patches.

    pixel_values [I, P, C*Tp*Ps*Ps] float; rope_hw [I, P, 2] int32 (row, col of each patch);
    interp_index [I, P, 4] int32 / interp_weight [I, P, 4] float32 (bilinear taps into the
    learned position table); patch_mask [I, P] bool (False = padding). Images attend only
    within themselves, so batching images is exact and shards over the image axis.
    """

    pixel_values: jax.Array
    rope_hw: jax.Array
    interp_index: jax.Array
    interp_weight: jax.Array
    patch_mask: jax.Array


def patch_bucket(num_patches: int, merge_unit: int, minimum: int = MIN_PATCH_BUCKET) -> int:
    """Smallest bucket >= num_patches: powers of two, then multiples of 1/8 of the power."""
    size = max(minimum, merge_unit)
    while size < num_patches:
        size *= 2
    if size > 4 * minimum:
        step = size // 8
        size = int(math.ceil(num_patches / step) * step)
    return int(math.ceil(size / merge_unit) * merge_unit)


def image_bucket(num_images: int) -> int:
    """Images per batch are padded to a power of two (min 1)."""
    size = 1
    while size < num_images:
        size *= 2
    return size


def _axis_taps(index: np.ndarray, size: int, side: int):
    """Bilinear (align_corners=True) taps/weights along one axis, as transformers computes them."""
    index = index.astype(np.float32)
    src = index * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor[:, None].astype(np.int64) + offsets.astype(np.int64), 0, side - 1)
    dist = np.abs(src[:, None] - floor[:, None] - offsets)
    weights = np.maximum(np.float32(1) - dist, np.float32(0)).astype(np.float32)
    return taps, weights


def image_metadata(grid_thw, config: VisionConfig):
    """(rope_hw [n, 2], interp_index [n, 4], interp_weight [n, 4]) for one image of grid
    (t, h, w), n = t*h*w, in the processor's spatial-merge-block patch order."""
    t, h, w = (int(v) for v in grid_thw)
    merge = config.spatial_merge_size
    if h % merge or w % merge or min(t, h, w) < 1:
        raise ValueError(f"image grid {[t, h, w]}: h and w must be positive multiples of {merge}")
    side = int(round(config.num_position_embeddings**0.5))
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    rows = np.tile(r.reshape(shape).transpose(0, 2, 1, 3).reshape(-1), t)
    cols = np.tile(c.reshape(shape).transpose(0, 2, 1, 3).reshape(-1), t)
    h_taps, h_w = _axis_taps(rows, h, side)
    w_taps, w_w = _axis_taps(cols, w, side)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4).astype(np.int32)
    weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4).astype(np.float32)
    return np.stack([rows, cols], axis=-1).astype(np.int32), index, weight


def prepare_vision_inputs(pixel_values, image_grid_thw, config: VisionConfig, bucket: int | None = None,
                          num_images: int | None = None) -> VisionInputs:
    """Host-side: splits processor-format `pixel_values` [N_patches, patch_dim] (all images
    concatenated) into per-image rows padded to a patch bucket and an image-count bucket."""
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    counts = np.prod(grid, axis=-1)
    n = int(counts.sum())
    if pixel_values.ndim != 2 or pixel_values.shape != (n, config.patch_dim):
        raise ValueError(
            f"pixel_values has shape {pixel_values.shape}, but image_grid_thw {grid.tolist()} needs "
            f"({n}, {config.patch_dim}); pass the processor's pixel_values and image_grid_thw together"
        )
    largest = int(counts.max()) if len(counts) else config.merge_unit
    bucket = bucket or patch_bucket(largest, config.merge_unit)
    if bucket < largest or bucket % config.merge_unit:
        raise ValueError(f"patch bucket {bucket} must be >= {largest} patches and a multiple of {config.merge_unit}")
    images = num_images or image_bucket(len(grid))
    if images < len(grid):
        raise ValueError(f"image bucket {images} is smaller than the {len(grid)} images in the batch")
    out = VisionInputs(
        pixel_values=np.zeros((images, bucket, config.patch_dim), np.float32),
        rope_hw=np.zeros((images, bucket, 2), np.int32),
        interp_index=np.zeros((images, bucket, 4), np.int32),
        interp_weight=np.zeros((images, bucket, 4), np.float32),
        patch_mask=np.zeros((images, bucket), bool),
    )
    starts = np.concatenate([[0], np.cumsum(counts)])
    for i, g in enumerate(grid):
        m = int(counts[i])
        out.pixel_values[i, :m] = pixel_values[starts[i]:starts[i + 1]]
        out.rope_hw[i, :m], out.interp_index[i, :m], out.interp_weight[i, :m] = image_metadata(g, config)
        out.patch_mask[i, :m] = True
    return out


def _rotary(rope_hw, config: VisionConfig):
    """cos/sin [..., P, head_dim]: axial rope, the same frequencies for rows and columns."""
    quarter = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs = rope_hw.astype(jnp.float32)[..., None] * inv_freq  # [..., P, 2, hd/4]
    freqs = jnp.concatenate([freqs[..., 0, :], freqs[..., 1, :]], axis=-1)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def _split(images: int):
    """Logical dims of the [I, P] axes: images over the batch axes, or the patches when the image
    count does not split over them (one image in a micro-batch of 8 rows on 8 chips). Patches split
    over both "data" and "fsdp" would meet weights split over "fsdp" alone in the backward, a
    reshard XLA can only do by replicating; there the layout is left to XLA."""
    if parallel.divides(images, "batch"):
        return "batch", None
    return (None, "batch") if len(parallel.axes("batch")) <= 1 else (P.UNCONSTRAINED, P.UNCONSTRAINED)


def _block(config: VisionConfig, p, x, cos, sin, patch_valid, attention_impl: str = "xla"):
    """x [I, P, Dv], patch_valid bool [I, P]: each image attends within itself, to its real patches."""
    heads, dim = config.num_heads, config.head_dim
    split = _split(x.shape[0])
    x = parallel.constrain(x, *split, None)
    h = layers.layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"], config.layer_norm_eps)
    qkv = layers.linear(h, p["attn"]["qkv"]["kernel"], p["attn"]["qkv"]["bias"])
    qkv = parallel.constrain(qkv.reshape(x.shape[:2] + (3, heads, dim)), *split, None, "tensor", None)
    q = layers.apply_rotary(qkv[:, :, 0], cos, sin)
    k = layers.apply_rotary(qkv[:, :, 1], cos, sin).swapaxes(1, 2)
    v = qkv[:, :, 2].swapaxes(1, 2)
    attn = attention.attention(q, k, v, dim**-0.5, patch_valid, causal=False, impl=attention_impl)
    x = x + layers.linear(attn.reshape(x.shape), p["attn"]["proj"]["kernel"], p["attn"]["proj"]["bias"])
    h = layers.layer_norm(x, p["norm2"]["scale"], p["norm2"]["bias"], config.layer_norm_eps)
    act = layers.activation(config.hidden_act)
    inner = parallel.constrain(layers.linear(h, p["mlp"]["fc1"]["kernel"], p["mlp"]["fc1"]["bias"]), *split, "tensor")
    h = layers.linear(act(inner), p["mlp"]["fc2"]["kernel"], p["mlp"]["fc2"]["bias"])
    return x + h


def _merger(config: VisionConfig, p, x, postshuffle: bool):
    """[I, P, Dv] -> [I, P / merge_unit, out_hidden]: norm, 2x2 shuffle, MLP with exact GELU."""
    width = config.hidden_size * config.merge_unit
    shape = (x.shape[0], x.shape[1] // config.merge_unit, width)
    if postshuffle:
        x = layers.layer_norm(x.reshape(shape), p["norm"]["scale"], p["norm"]["bias"], config.layer_norm_eps)
    else:
        x = layers.layer_norm(x, p["norm"]["scale"], p["norm"]["bias"], config.layer_norm_eps).reshape(shape)
    split = _split(x.shape[0])
    x = jax.nn.gelu(parallel.constrain(layers.linear(x, p["fc1"]["kernel"], p["fc1"]["bias"]), *split, "tensor"),
                    approximate=False)
    return parallel.constrain(layers.linear(x, p["fc2"]["kernel"], p["fc2"]["bias"]), *split, None)


def _slice_layers(tree, start, stop):
    return jax.tree.map(lambda a: a[start:stop], tree)


def vision_tower(config: VisionConfig, params, inputs: VisionInputs, dtype=jnp.float32, remat: bool = False,
                 attention_impl: str = "xla", remat_offload: bool = False):
    """Runs the tower. Returns (image_embeds [I * P/m^2, D_text], deepstack [n_ds, I * P/m^2, D_text]):
    image i's j-th merged token is row i * P/m^2 + j."""
    x = layers.linear(inputs.pixel_values.astype(dtype), params["patch_embed"]["kernel"],
                      params["patch_embed"]["bias"])
    x = parallel.constrain(x, *_split(x.shape[0]), None)  # the pixel rows split as the batch is
    pos = params["pos_embed"].astype(dtype)[inputs.interp_index]  # [I, P, 4, Dv]
    x = x + jnp.sum(pos * inputs.interp_weight[..., None].astype(dtype), axis=2)
    cos, sin = _rotary(inputs.rope_hw, config)
    def body(h, p):
        return _block(config, p, h, cos, sin, inputs.patch_mask, attention_impl), None

    body = layers.rematerialized(body, remat, remat_offload)

    deepstack = []
    start = 0
    for i, layer in enumerate(config.deepstack_visual_indexes):
        x, _ = jax.lax.scan(body, x, _slice_layers(params["blocks"], start, layer + 1))
        start = layer + 1
        ds_params = jax.tree.map(lambda a, i=i: a[i], params["deepstack_mergers"])
        deepstack.append(_merger(config, ds_params, x, postshuffle=True))
    if start < config.depth:
        x, _ = jax.lax.scan(body, x, _slice_layers(params["blocks"], start, config.depth))
    embeds = _merger(config, params["merger"], x, postshuffle=False)
    flat = (embeds.shape[0] * embeds.shape[1], embeds.shape[2])
    embeds = embeds.reshape(flat)
    deepstack = jnp.stack([d.reshape(flat) for d in deepstack]) if deepstack else jnp.zeros((0,) + flat, embeds.dtype)
    return embeds, deepstack
