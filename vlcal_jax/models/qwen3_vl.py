"""Qwen3-VL forward: host-side input preparation + one pure, jittable `apply`."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax import parallel
from vlcal_jax.models import text, vision
from vlcal_jax.models.config import ModelConfig
from vlcal_jax.models.positions import rope_index


class ModelInputs(NamedTuple):
    """Device inputs of one batch. input_ids/attention_mask [B, T], position_ids [3, B, T],
    next_position [B] (first generated position), image_index [B, T] (vision-output row of each
    image pad), vision: padded VisionInputs or None. Several rows may point at the same image
    (GRPO samples of one prompt), so the tower runs once per image."""

    input_ids: jax.Array
    attention_mask: jax.Array
    position_ids: jax.Array
    next_position: jax.Array
    image_index: jax.Array
    vision: vision.VisionInputs | None


def prepare_inputs(config: ModelConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   *, patch_bucket: int | None = None, num_images: int | None = None) -> ModelInputs:
    """Host-side: 3-D positions, vision metadata and patch padding for a processor-format batch.

    input_ids [B, T] with image pads expanded (left padding allowed), attention_mask [B, T],
    pixel_values [N_patches, patch_dim] of all images concatenated, image_grid_thw [N_images, 3].
    """
    input_ids = np.asarray(input_ids, dtype=np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pass pixel_values and image_grid_thw together (both or neither)")
    n_pads = int(((input_ids == config.image_token_id) & (mask > 0)).sum())
    vis = None
    if pixel_values is not None:
        grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
        expected = int((np.prod(grid, axis=-1) // config.vision.merge_unit).sum())
        if n_pads != expected:
            raise ValueError(
                f"input_ids hold {n_pads} <|image_pad|> tokens but image_grid_thw {grid.tolist()} gives "
                f"{expected} merged patches; build prompts with processing.render_prompt for these images"
            )
        vis = vision.prepare_vision_inputs(pixel_values, grid, config.vision, patch_bucket, num_images)
    elif n_pads:
        raise ValueError(f"input_ids hold {n_pads} <|image_pad|> tokens but no pixel_values were given")
    slots = 0 if vis is None else vis.pixel_values.shape[1] // config.vision.merge_unit
    positions, next_position, image_index = rope_index(input_ids, mask, image_grid_thw, config, slots)
    return ModelInputs(input_ids, mask, positions, next_position, image_index, vis)


def encode_images(config: ModelConfig, params, vis: vision.VisionInputs):
    """Vision tower: (image_embeds [I * P/m^2, D], deepstack [n_ds, I * P/m^2, D])."""
    return vision.vision_tower(config.vision, params["visual"], vis, config.compute_dtype, config.remat,
                              config.attention_impl, config.remat_offload)


def apply(config: ModelConfig, params, inputs: ModelInputs, *, return_hidden: bool = False, return_kv: bool = False):
    """Full forward (jittable). Returns logits float32 [B, T, V], or the final hidden states
    [B, T, D] with `return_hidden=True`; with `return_kv=True` also the per-layer (k, v)
    [L, B, KV, T, hd] for a prefill."""
    image_embeds = deepstack = None
    if inputs.vision is not None:
        image_embeds, deepstack = encode_images(config, params, inputs.vision)
    x, slots = text.embed_tokens(config, params, inputs.input_ids, inputs.image_index, image_embeds)
    cos, sin = text.mrope_cos_sin(inputs.position_ids, config.text)
    hidden, kv = text.decoder(config, params, x, cos, sin, inputs.attention_mask > 0, image_slots=slots,
                              deepstack=deepstack, return_kv=return_kv)
    out = hidden if return_hidden else logits_from_hidden(config, params, hidden)
    return (out, kv) if return_kv else out


def logits_from_hidden(config: ModelConfig, params, hidden):
    """hidden [..., D] -> logits float32 [..., V]."""
    kernel = text.lm_head_kernel(config, params)
    hidden = parallel.constrain(hidden, "batch", *[None] * (hidden.ndim - 1))
    logits = jnp.einsum("...d,dv->...v", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
    # rows over the batch axes, the vocabulary over "tensor": unpinned, XLA contracted the
    # fsdp-split hidden dim and all-reduced whole [B, T, V] logits onto every chip
    return parallel.constrain(logits, "batch", *[None] * (logits.ndim - 2), "tensor")


apply_jit = jax.jit(apply, static_argnums=(0,), static_argnames=("return_hidden", "return_kv"))


def forward(config: ModelConfig, params, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
            *, patch_bucket: int | None = None):
    """logits float32 [B, T, V] for a processor-format batch (see `prepare_inputs`).

    Compiles once per (batch, length, patch bucket) shape; pad lengths to buckets upstream.
    """
    check_batch(config, input_ids, attention_mask, pixel_values, image_grid_thw)
    inputs = prepare_inputs(config, input_ids, attention_mask, pixel_values, image_grid_thw,
                            patch_bucket=patch_bucket)
    return apply_jit(config, params, inputs)


def _expect(x, shape, dtype, what: str):
    chex.assert_shape(x, shape, custom_message=what)
    if dtype is not None:
        chex.assert_type(x, dtype, custom_message=what)


def check_batch(config: ModelConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
    """chex shape/dtype checks of a processor-format batch, with errors that name the argument:
    input_ids [B, T] int, attention_mask [B, T], pixel_values [N_patches, patch_dim] float,
    image_grid_thw [N_images, 3] int. Shapes only: free, and trace-time under jit."""
    arrays = [x if x is None or hasattr(x, "shape") else np.asarray(x)
              for x in (input_ids, attention_mask, pixel_values, image_grid_thw)]
    input_ids, attention_mask, pixel_values, image_grid_thw = arrays
    _expect(input_ids, (None, None), int, "input_ids must be [B, T] int")
    if attention_mask is not None:
        _expect(attention_mask, input_ids.shape, None, f"attention_mask must be [B, T] = {list(input_ids.shape)} "
                                                       "like input_ids")
    if pixel_values is not None:
        _expect(pixel_values, (None, config.vision.patch_dim), float,
                f"pixel_values must be [N_patches, patch_dim={config.vision.patch_dim}] float")
    if image_grid_thw is not None:
        _expect(image_grid_thw, (None, 3), int, "image_grid_thw must be [N_images, 3] int")


def check_inputs(config: ModelConfig, inputs: ModelInputs, name: str = "inputs"):
    """chex shape/dtype checks of prepared `ModelInputs` (see its docstring for the shapes), with
    errors that name the field. Shapes only: trace-time under jit, nothing is added to the program."""
    _expect(inputs.input_ids, (None, None), int, f"{name}.input_ids must be [B, T] int")
    batch, length = inputs.input_ids.shape
    _expect(inputs.attention_mask, (batch, length), None, f"{name}.attention_mask must be [B, T] = [{batch}, {length}]")
    _expect(inputs.position_ids, (3, batch, length), int, f"{name}.position_ids must be [3, B, T] = "
                                                          f"[3, {batch}, {length}] int")
    _expect(inputs.next_position, (batch,), int, f"{name}.next_position must be [B] = [{batch}] int")
    _expect(inputs.image_index, (batch, length), int, f"{name}.image_index must be [B, T] = [{batch}, {length}] int")
    vis = inputs.vision
    if vis is None:
        return
    dim = config.vision.patch_dim
    _expect(vis.pixel_values, (None, None, dim), float, f"{name}.vision.pixel_values must be [I, P, {dim}] float")
    images, patches = vis.pixel_values.shape[:2]
    for field, tail, dtype in (("rope_hw", (2,), int), ("interp_index", (4,), int), ("interp_weight", (4,), float),
                               ("patch_mask", (), None)):
        shape = (images, patches) + tail
        _expect(getattr(vis, field), shape, dtype, f"{name}.vision.{field} must be {list(shape)} "
                                                   "(I, P of pixel_values)")
