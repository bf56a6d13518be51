"""Qwen3-VL vision tower: patch embedding, interpolated learned positions, 2-D rotary ViT,
patch merger and DeepStack mergers.

Everything that depends on the image grids (`image_grid_thw`, host data) is computed once on
the host by `vision_metadata` and passed as arrays padded to a bucketed patch count, so the
jitted tower compiles once per bucket instead of once per image size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax.models import layers
from vlcal_jax.models.config import VisionConfig

MIN_PATCH_BUCKET = 64


class VisionInputs(NamedTuple):
    """Vision-tower inputs, padded to P patches (a bucket) with `segment_ids == -1` for padding.

    pixel_values [P, C*Tp*Ps*Ps] float, rope_hw [P, 2] int32 (row, col of each patch),
    interp_index [P, 4] int32 / interp_weight [P, 4] float32 (bilinear taps into the learned
    position table), segment_ids [P] int32 (image index; patches attend within their image).
    """

    pixel_values: jax.Array
    rope_hw: jax.Array
    interp_index: jax.Array
    interp_weight: jax.Array
    segment_ids: jax.Array


def patch_bucket(num_patches: int, merge_unit: int, minimum: int = MIN_PATCH_BUCKET) -> int:
    """Smallest bucket >= num_patches: powers of two, then multiples of 1/4 of the next power."""
    size = max(minimum, merge_unit)
    while size < num_patches:
        size *= 2
    if size > 4 * minimum:
        step = size // 8
        size = int(math.ceil(num_patches / step) * step)
    return int(math.ceil(size / merge_unit) * merge_unit)


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int):
    """Bilinear (align_corners=True) taps/weights along one axis, as transformers computes them."""
    index = index.astype(np.float32)
    size = size.astype(np.float32)
    src = index * np.float32(side - 1) / np.maximum(size - 1, np.float32(1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor[:, None].astype(np.int64) + offsets.astype(np.int64), 0, side - 1)
    dist = np.abs(src[:, None] - floor[:, None] - offsets)
    weights = np.maximum(np.float32(1) - dist, np.float32(0)).astype(np.float32)
    return taps, weights


def vision_metadata(grid_thw: np.ndarray, config: VisionConfig):
    """Per-patch (row, col), interpolation taps/weights and image ids, in the processor's
    spatial-merge-block patch order. grid_thw [N, 3] -> arrays of length sum(t*h*w)."""
    merge = config.spatial_merge_size
    side = int(round(config.num_position_embeddings**0.5))
    rows, cols, segs, heights, widths = [], [], [], [], []
    for image, (t, h, w) in enumerate(np.asarray(grid_thw, dtype=np.int64).tolist()):
        if h % merge or w % merge or min(t, h, w) < 1:
            raise ValueError(f"image_grid_thw[{image}]={[t, h, w]}: h and w must be positive multiples of {merge}")
        r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        r = np.tile(r.reshape(shape).transpose(0, 2, 1, 3).reshape(-1), t)
        c = np.tile(c.reshape(shape).transpose(0, 2, 1, 3).reshape(-1), t)
        rows.append(r)
        cols.append(c)
        segs.append(np.full(r.shape, image, np.int32))
        heights.append(np.full(r.shape, h))
        widths.append(np.full(r.shape, w))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    heights, widths = np.concatenate(heights), np.concatenate(widths)
    h_taps, h_w = _axis_taps(rows, heights, side)
    w_taps, w_w = _axis_taps(cols, widths, side)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4).astype(np.int32)
    weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4).astype(np.float32)
    rope_hw = np.stack([rows, cols], axis=-1).astype(np.int32)
    return rope_hw, index, weight, np.concatenate(segs)


def prepare_vision_inputs(pixel_values, image_grid_thw, config: VisionConfig, bucket: int | None = None):
    """Host-side: validates and pads `pixel_values` [N_patches, patch_dim] to a patch bucket."""
    pixel_values = np.asarray(pixel_values, dtype=np.float32)
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    n = int(np.prod(grid, axis=-1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape != (n, config.patch_dim):
        raise ValueError(
            f"pixel_values has shape {pixel_values.shape}, but image_grid_thw {grid.tolist()} needs "
            f"({n}, {config.patch_dim}); pass the processor's pixel_values and image_grid_thw together"
        )
    bucket = bucket or patch_bucket(n, config.merge_unit)
    if bucket < n or bucket % config.merge_unit:
        raise ValueError(f"patch bucket {bucket} must be >= {n} patches and a multiple of {config.merge_unit}")
    rope_hw, index, weight, segs = vision_metadata(grid, config)
    pad = bucket - n
    return VisionInputs(
        pixel_values=np.pad(pixel_values, ((0, pad), (0, 0))),
        rope_hw=np.pad(rope_hw, ((0, pad), (0, 0))),
        interp_index=np.pad(index, ((0, pad), (0, 0))),
        interp_weight=np.pad(weight, ((0, pad), (0, 0))),
        segment_ids=np.pad(segs, (0, pad), constant_values=-1),
    )


def _rotary(rope_hw, config: VisionConfig):
    """cos/sin [P, head_dim]: axial rope, the same frequencies for rows and columns."""
    quarter = config.head_dim // 2
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs = rope_hw.astype(jnp.float32)[..., None] * inv_freq  # [P, 2, hd/4]
    freqs = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)
    freqs = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(freqs), jnp.sin(freqs)


def _block(config: VisionConfig, p, x, cos, sin, mask):
    heads, dim = config.num_heads, config.head_dim
    h = layers.layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"], config.layer_norm_eps)
    qkv = layers.linear(h, p["attn"]["qkv"]["kernel"], p["attn"]["qkv"]["bias"]).reshape(-1, 3, heads, dim)
    q = layers.apply_rotary(qkv[:, 0], cos, sin)
    k = layers.apply_rotary(qkv[:, 1], cos, sin)
    attn = layers.attention(q[None], k[None], qkv[None, :, 2], mask[None], dim**-0.5)[0]
    x = x + layers.linear(attn.reshape(x.shape), p["attn"]["proj"]["kernel"], p["attn"]["proj"]["bias"])
    h = layers.layer_norm(x, p["norm2"]["scale"], p["norm2"]["bias"], config.layer_norm_eps)
    act = layers.activation(config.hidden_act)
    h = layers.linear(act(layers.linear(h, p["mlp"]["fc1"]["kernel"], p["mlp"]["fc1"]["bias"])),
                      p["mlp"]["fc2"]["kernel"], p["mlp"]["fc2"]["bias"])
    return x + h


def _merger(config: VisionConfig, p, x, postshuffle: bool):
    """[P, Dv] -> [P / merge_unit, out_hidden]: norm, 2x2 shuffle, MLP with exact GELU."""
    width = config.hidden_size * config.merge_unit
    if postshuffle:
        x = layers.layer_norm(x.reshape(-1, width), p["norm"]["scale"], p["norm"]["bias"], config.layer_norm_eps)
    else:
        x = layers.layer_norm(x, p["norm"]["scale"], p["norm"]["bias"], config.layer_norm_eps).reshape(-1, width)
    x = jax.nn.gelu(layers.linear(x, p["fc1"]["kernel"], p["fc1"]["bias"]), approximate=False)
    return layers.linear(x, p["fc2"]["kernel"], p["fc2"]["bias"])


def _slice_layers(tree, start, stop):
    return jax.tree.map(lambda a: a[start:stop], tree)


def vision_tower(config: VisionConfig, params, inputs: VisionInputs, dtype=jnp.float32):
    """Runs the tower. Returns (image_embeds [P/m^2, D_text], deepstack [n_ds, P/m^2, D_text])."""
    x = layers.linear(inputs.pixel_values.astype(dtype), params["patch_embed"]["kernel"],
                      params["patch_embed"]["bias"])
    pos = params["pos_embed"].astype(dtype)[inputs.interp_index]  # [P, 4, Dv]
    x = x + jnp.sum(pos * inputs.interp_weight[..., None].astype(dtype), axis=1)
    cos, sin = _rotary(inputs.rope_hw, config)
    seg = inputs.segment_ids
    mask = seg[:, None] == seg[None, :]

    def body(h, p):
        return _block(config, p, h, cos, sin, mask), None

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
    deepstack = jnp.stack(deepstack) if deepstack else jnp.zeros((0,) + embeds.shape, embeds.dtype)
    return embeds, deepstack
