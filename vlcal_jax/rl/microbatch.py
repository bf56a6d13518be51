"""Host-side layout of an RLBatch for the micro-batched update: [N, ...] -> [K, N / K, ...].

A micro-batch holds whole GRPO groups (its size is a multiple of samples_per_prompt), and its
images travel with it: the batch's images are first laid out on a regular grid of
`images_per_prompt` slots per prompt (a prompt with fewer images gets zero padding images, which
the vision tower masks), so micro-batch k owns images [k * P_k, (k + 1) * P_k) and its rows'
image_index only needs an offset. Every leaf then gets a leading micro-batch axis
(position_ids: [K, 3, N / K, T]); the update scans over it (rl.step).
"""

from __future__ import annotations

import jax
import numpy as np

from vlcal_jax.models import qwen3_vl, vision

def check_size(rows: int, micro_batch_size: int, samples_per_prompt: int) -> int:
    """-> the number of micro-batches K; errors name the setting to change."""
    if micro_batch_size % samples_per_prompt:
        raise ValueError(f"rl.micro_batch_size={micro_batch_size} must be a multiple of rl.samples_per_prompt="
                         f"{samples_per_prompt}: a micro-batch holds whole GRPO groups")
    if rows % micro_batch_size:
        raise ValueError(f"rl.micro_batch_size={micro_batch_size} must divide the {rows} responses of a step "
                         f"(prompts_per_step x samples_per_prompt)")
    return rows // micro_batch_size


def _regular_images(inputs: qwen3_vl.ModelInputs, prompts: int, n: int, slots: int, image_token_id: int):
    """-> (vision with each prompt's images on its own `images_per_prompt` slots, the remapped
    image_index [N, T], images_per_prompt)."""
    vis = inputs.vision
    total = vis.pixel_values.shape[0]
    if total % prompts:
        raise ValueError(f"{total} image slots do not split evenly over {prompts} prompts; build prompt batches "
                         "with num_images = prompts x data.max_images_per_prompt")
    per_prompt = total // prompts
    index = np.asarray(inputs.image_index)
    pads = (np.asarray(inputs.input_ids) == image_token_id) & (np.asarray(inputs.attention_mask) > 0)
    new_index = index.copy()
    order = np.zeros(total, np.int64)  # new image slot -> old image
    valid = np.zeros(total, bool)
    for p in range(prompts):
        rows = slice(p * n, (p + 1) * n)
        block_index, block_pads = index[rows], pads[rows]
        used = np.unique(block_index[block_pads] // slots)
        if len(used) > per_prompt:
            raise ValueError(f"prompt {p} uses {len(used)} images, more than the {per_prompt} slots per prompt")
        block = new_index[rows]
        for j, old in enumerate(used):
            slot = p * per_prompt + j
            order[slot], valid[slot] = old, True
            hit = block_pads & (block_index // slots == old)
            block[hit] = slot * slots + block_index[hit] % slots
        new_index[rows] = block
    arrays = {}
    for name, leaf in vis._asdict().items():
        out = np.asarray(leaf)[order].copy()
        out[~valid] = 0
        arrays[name] = out
    return vision.VisionInputs(**arrays), new_index, per_prompt


def split(batch, micro_batch_size: int, samples_per_prompt: int, *, image_token_id: int, merge_unit: int):
    """An RLBatch of host arrays [N, ...] -> the same batch as K micro-batches [K, N / K, ...]."""
    rows = np.asarray(batch.response_mask).shape[0]
    k = check_size(rows, micro_batch_size, samples_per_prompt)
    inputs = batch.inputs
    prompts = rows // samples_per_prompt
    vis, image_index = inputs.vision, np.asarray(inputs.image_index)
    if vis is not None:
        vis, image_index, per_prompt = _regular_images(inputs, prompts, samples_per_prompt,
                                                       vis.pixel_values.shape[1] // merge_unit, image_token_id)
        slots_per_micro = (micro_batch_size // samples_per_prompt) * per_prompt * (
            vis.pixel_values.shape[1] // merge_unit)
        offsets = (np.arange(rows) // micro_batch_size) * slots_per_micro
        image_index = np.where(np.asarray(inputs.input_ids) == image_token_id, image_index - offsets[:, None], 0)
        vis = jax.tree.map(lambda x: x.reshape(k, -1, *x.shape[1:]), vis)

    def rows_first(x):
        x = np.asarray(x)
        return x.reshape(k, -1, *x.shape[1:])

    new_inputs = qwen3_vl.ModelInputs(
        input_ids=rows_first(inputs.input_ids), attention_mask=rows_first(inputs.attention_mask),
        position_ids=np.asarray(inputs.position_ids).reshape(3, k, -1, inputs.position_ids.shape[-1]).transpose(
            1, 0, 2, 3),
        next_position=rows_first(inputs.next_position), image_index=rows_first(image_index.astype(np.int32)),
        vision=vis)
    fields = {name: rows_first(value) for name, value in batch._asdict().items() if name != "inputs"}
    return type(batch)(inputs=new_inputs, **fields)
