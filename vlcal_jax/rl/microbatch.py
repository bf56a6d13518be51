"""Host-side layout of an RLBatch for the micro-batched update: [N, ...] -> [K, N / K, ...].

A micro-batch holds whole GRPO groups (its size a multiple of samples_per_prompt) or an equal
part of one (its size a divisor of samples_per_prompt: the advantages are computed over the whole
batch before the scan, so a group need not be differentiated in one piece), and its images
travel with it: the batch's images are first laid out on a regular grid of `images_per_prompt`
slots per prompt (a prompt with fewer images gets zero padding images, which the vision tower
masks), so micro-batch k owns images [k * P_k, (k + 1) * P_k) and its rows' image_index only
needs an offset. A group split over several micro-batches gives each part its own copy of the
prompt's images (`split_groups`; the vision tower runs once per part). Every leaf then gets a
leading micro-batch axis (position_ids: [K, 3, N / K, T]); the update scans over it (rl.step).
"""

from __future__ import annotations

import jax
import numpy as np

from vlcal_jax.models import qwen3_vl, vision

def check_size(rows: int, micro_batch_size: int, samples_per_prompt: int) -> int:
    """-> the number of micro-batches K; errors name the setting to change."""
    if micro_batch_size <= 0 or (micro_batch_size % samples_per_prompt and samples_per_prompt % micro_batch_size):
        raise ValueError(f"rl.micro_batch_size={micro_batch_size} must be a multiple or a divisor of "
                         f"rl.samples_per_prompt={samples_per_prompt}: a micro-batch holds whole GRPO groups "
                         "or an equal part of one")
    if rows % micro_batch_size:
        raise ValueError(f"rl.micro_batch_size={micro_batch_size} must divide the {rows} responses of a step "
                         f"(prompts_per_step x samples_per_prompt)")
    return rows // micro_batch_size


def regular_images(inputs: qwen3_vl.ModelInputs, prompts: int, rows_per_prompt: int, *, image_token_id: int,
                   merge_unit: int):
    """-> (inputs whose images sit on a regular grid of `images_per_prompt` slots per prompt, with
    image_index remapped; images_per_prompt). Rows of a prompt are adjacent (rows_per_prompt of
    them: 1 for prompt batches, samples_per_prompt for response rows)."""
    vis = inputs.vision
    if vis is None:
        return inputs, 0
    total, patches = vis.pixel_values.shape[:2]
    slots = patches // merge_unit
    if total % prompts:
        raise ValueError(f"{total} image slots do not split evenly over {prompts} prompts; build prompt batches "
                         "with num_images = prompts x data.max_images_per_prompt")
    per_prompt = total // prompts
    index = np.asarray(inputs.image_index)
    pads = (np.asarray(inputs.input_ids) == image_token_id) & (np.asarray(inputs.attention_mask) > 0)
    new_index = np.where(pads, index, 0)
    order = np.zeros(total, np.int64)  # new image slot -> old image
    valid = np.zeros(total, bool)
    for p in range(prompts):
        rows = slice(p * rows_per_prompt, (p + 1) * rows_per_prompt)
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
    return inputs._replace(image_index=new_index.astype(np.int32), vision=vision.VisionInputs(**arrays)), per_prompt


def parts_per_group(micro_batch_size: int, samples_per_prompt: int) -> int:
    """How many micro-batches share one GRPO group (1 when a micro-batch holds whole groups)."""
    return max(samples_per_prompt // micro_batch_size, 1)


def split_groups(inputs: qwen3_vl.ModelInputs, prompts: int, rows_per_prompt: int, images_per_prompt: int,
                 parts: int, *, merge_unit: int) -> qwen3_vl.ModelInputs:
    """Inputs laid out by `regular_images` -> the same rows seen as `prompts x parts` prompts of
    rows_per_prompt / parts consecutive rows each, every part with its own copy of its prompt's
    images (image_index shifted to the copy), for `take_prompts`."""
    vis = inputs.vision
    if parts == 1 or vis is None:
        return inputs
    slots = vis.pixel_values.shape[1] // merge_unit
    row = np.arange(prompts * rows_per_prompt)
    prompt, part = row // rows_per_prompt, row % rows_per_prompt // (rows_per_prompt // parts)
    # a row of part j of prompt p reads copy p * parts + j of the images where it read copy p
    shift = (prompt * (parts - 1) + part) * images_per_prompt * slots
    index = np.asarray(inputs.image_index) + shift[:, None]

    def copies(x):
        x = np.asarray(x)
        x = x.reshape(prompts, images_per_prompt, *x.shape[1:])
        return np.repeat(x, parts, axis=0).reshape(prompts * parts * images_per_prompt, *x.shape[2:])

    return inputs._replace(image_index=index.astype(np.int32), vision=jax.tree.map(copies, vis))


def take_prompts(inputs: qwen3_vl.ModelInputs, start: int, stop: int, rows_per_prompt: int, images_per_prompt: int,
                 *, merge_unit: int) -> qwen3_vl.ModelInputs:
    """Prompts [start, stop) of inputs laid out by `regular_images`: their rows, their images, and
    image_index relative to those images."""
    rows = slice(start * rows_per_prompt, stop * rows_per_prompt)
    vis = inputs.vision
    image_index = np.asarray(inputs.image_index)[rows]
    if vis is not None:
        slots = vis.pixel_values.shape[1] // merge_unit
        images = slice(start * images_per_prompt, stop * images_per_prompt)
        vis = jax.tree.map(lambda x: np.asarray(x)[images], vis)
        image_index = np.maximum(image_index - start * images_per_prompt * slots, 0)
    return qwen3_vl.ModelInputs(
        input_ids=np.asarray(inputs.input_ids)[rows], attention_mask=np.asarray(inputs.attention_mask)[rows],
        position_ids=np.asarray(inputs.position_ids)[:, rows], next_position=np.asarray(inputs.next_position)[rows],
        image_index=image_index.astype(np.int32), vision=vis)


def split(batch, micro_batch_size: int, samples_per_prompt: int, *, image_token_id: int, merge_unit: int):
    """An RLBatch of host arrays [N, ...] -> the same batch as K micro-batches [K, N / K, ...]."""
    rows = np.asarray(batch.response_mask).shape[0]
    k = check_size(rows, micro_batch_size, samples_per_prompt)
    prompts = rows // samples_per_prompt
    inputs, per_prompt = regular_images(batch.inputs, prompts, samples_per_prompt, image_token_id=image_token_id,
                                        merge_unit=merge_unit)
    parts = parts_per_group(micro_batch_size, samples_per_prompt)
    inputs = split_groups(inputs, prompts, samples_per_prompt, per_prompt, parts, merge_unit=merge_unit)
    group_rows = samples_per_prompt // parts
    step = micro_batch_size // group_rows
    parts = [take_prompts(inputs, p, p + step, group_rows, per_prompt, merge_unit=merge_unit)
             for p in range(0, prompts * (samples_per_prompt // group_rows), step)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *parts)

    def rows_first(x):
        x = np.asarray(x)
        return x.reshape(k, -1, *x.shape[1:])

    fields = {name: None if value is None else rows_first(value)
              for name, value in batch._asdict().items() if name != "inputs"}
    return type(batch)(inputs=stacked, **fields)
