"""Helpers for parity tests: tiny random HF Qwen3-VL models and processor-format batches."""

from __future__ import annotations

import numpy as np

VOCAB = 320
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 310, 311, 312, 313
PAD = 0


def tiny_hf_config(*, tie=False, heads=4, kv_heads=1, layers=3, deepstack=(0, 1), vision_depth=3,
                   patch=8, hidden=64, head_dim=16, mrope=(2, 3, 3), pos_embeddings=16, seed_theta=10000.0):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         rope_parameters={"rope_type": "default", "rope_theta": seed_theta,
                                          "mrope_section": list(mrope), "mrope_interleaved": True}),
        vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                           out_hidden_size=hidden, num_position_embeddings=pos_embeddings,
                           deepstack_visual_indexes=list(deepstack)),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=tie)


def make_hf_model(config, seed=0):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so parity covers every tensor.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_batch(rng, grids, rows, *, patch_dim, merge=2, length=None):
    """rows: list of lists of image indices per row (in order). Returns processor-format arrays.

    Each row: random text, then per image <vision_start> pads <vision_end> + text; left-padded.
    """
    seqs = []
    for images in rows:
        seq = list(rng.integers(1, 300, size=rng.integers(2, 6)))
        for i in images:
            t, h, w = grids[i]
            seq += [VISION_START] + [IMAGE_TOKEN] * (t * h * w // merge**2) + [VISION_END]
            seq += list(rng.integers(1, 300, size=rng.integers(1, 5)))
        seqs.append(seq)
    length = length or max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), length), PAD, np.int64)
    mask = np.zeros((len(seqs), length), np.int64)
    for b, s in enumerate(seqs):
        input_ids[b, length - len(s):] = s
        mask[b, length - len(s):] = 1
    n_patches = sum(int(np.prod(g)) for g in grids)
    pixel_values = rng.standard_normal((n_patches, patch_dim)).astype(np.float32)
    return input_ids, mask, pixel_values, np.asarray(grids, np.int64)


def hf_logits(model, input_ids, mask, pixel_values=None, grid=None):
    import torch

    kwargs = {}
    if pixel_values is not None:
        mm = (input_ids == model.config.image_token_id).astype(np.int64)
        kwargs = dict(pixel_values=torch.from_numpy(pixel_values), image_grid_thw=torch.from_numpy(grid),
                      mm_token_type_ids=torch.from_numpy(mm))
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask), **kwargs)
    return out.logits.float().numpy()
