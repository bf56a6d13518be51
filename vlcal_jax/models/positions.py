"""3-D multimodal rotary position ids (what HF's `get_rope_index` computes), on the host.

Text tokens advance all three axes together; the merged patches of an image get
(t, row, col) offsets from the position where the image starts, and the text after an image
resumes at start + max(h, w) / merge. Left padding is skipped (pad positions get 0).
"""

from __future__ import annotations

import numpy as np

from vlcal_jax.models.config import ModelConfig


def rope_index(input_ids, attention_mask, image_grid_thw, config: ModelConfig, slots_per_image: int = 0):
    """input_ids/attention_mask [B, T], image_grid_thw [N, 3] or None.

    Returns (position_ids int32 [3, B, T], next_position int32 [B], image_index int32 [B, T]):
    `next_position[b]` is the position of the first generated token of row b (max position + 1,
    the same for all 3 axes); `image_index` points each image pad at its row of the vision
    tower output (image i, merged patch j -> i * slots_per_image + j; 0 elsewhere).
    Images are consumed in row-major order over the batch, as the processor concatenates them.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    merge = config.vision.spatial_merge_size
    positions = np.zeros((3, batch, length), np.int64)
    next_position = np.zeros((batch,), np.int64)
    image_index = np.zeros((batch, length), np.int64)
    image = 0
    for b in range(batch):
        valid = np.flatnonzero(mask[b])
        tokens = input_ids[b, valid]
        is_image = tokens == config.image_token_id
        pos = np.zeros((3, len(tokens)), np.int64)
        current = 0
        i = 0
        while i < len(tokens):
            if not is_image[i]:
                j = i
                while j < len(tokens) and not is_image[j]:
                    j += 1
                pos[:, i:j] = current + np.arange(j - i)
                current += j - i
                i = j
                continue
            if image >= len(grids):
                raise ValueError(
                    f"row {b} has more <|image_pad|> runs than image_grid_thw has images ({len(grids)}); "
                    "pass one grid per image in the batch, in order"
                )
            t, h, w = (int(v) for v in grids[image])
            count = t * (h // merge) * (w // merge)
            if i + count > len(tokens) or not is_image[i:i + count].all():
                raise ValueError(
                    f"row {b}: image {image} with grid {[t, h, w]} needs {count} consecutive <|image_pad|> "
                    "tokens; the prompt has a different number (expand the image pad per merged patch)"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij")
            pos[0, i:i + count] = tt.reshape(-1) + current
            pos[1, i:i + count] = hh.reshape(-1) + current
            pos[2, i:i + count] = ww.reshape(-1) + current
            image_index[b, valid[i:i + count]] = image * slots_per_image + np.arange(count)
            current += max(h, w) // merge
            image += 1
            i += count
        positions[:, b, valid] = pos
        next_position[b] = (pos.max() + 1) if len(tokens) else 0
    if image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images but the prompts hold {image} image pad runs")
    return positions.astype(np.int32), next_position.astype(np.int32), image_index.astype(np.int32)
