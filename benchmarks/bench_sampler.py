"""Sampler throughput: vlcal_jax.sampling.generate vs HF transformers generate (torch, CPU), same weights.

    python benchmarks/bench_sampler.py [--prompts 8 --n 4 --new 128]

Mid-size config (text hidden 512, 8 layers, 8 heads / 2 KV heads, vocab 32000; vision depth 4,
hidden 256), one 224x224 image per prompt, temperature 1. Prints tokens/s of both, the ratio,
and our decode bytes/s (weights + KV cache read per step) against measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import hf_utils as H  # noqa: E402

from vlcal_jax import models, sampling  # noqa: E402


def hf_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [12, 10, 10],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16,
                           out_hidden_size=512, num_position_embeddings=256, deepstack_visual_indexes=[1, 2]),
        image_token_id=31990, video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993,
        tie_word_embeddings=False)


def copy_bandwidth() -> float:
    """Bytes/s of a large float32 copy (read + write counted), best of 5."""
    a = np.ones(64 * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.manual_seed(0)
    cfg = hf_config()
    from transformers import Qwen3VLForConditionalGeneration

    hf = Qwen3VLForConditionalGeneration(cfg).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    config, params = models.from_pretrained(path)
    grid = (1, 14, 14)  # a 224x224 image at patch 16
    rng = np.random.default_rng(0)
    batch = H.make_batch(rng, [grid] * args.prompts, [[i] for i in range(args.prompts)],
                         patch_dim=config.vision.patch_dim)
    batch = (np.where(batch[0] == H.IMAGE_TOKEN, cfg.image_token_id, batch[0]),) + batch[1:]
    batch = (np.where(batch[0] == H.VISION_START, cfg.vision_start_token_id, batch[0]),) + batch[1:]
    batch = (np.where(batch[0] == H.VISION_END, cfg.vision_end_token_id, batch[0]),) + batch[1:]
    ids, mask, pv, grids = batch
    total_tokens = args.prompts * args.n * args.new

    kwargs = dict(max_new_tokens=args.new, temperature=1.0, top_p=1.0, n=args.n)
    out = sampling.generate(config, params, ids, mask, pv, grids, rng=jax.random.key(0), **kwargs)
    out.tokens.block_until_ready()  # compile
    ours = float("inf")
    for r in range(args.repeats):
        t = time.perf_counter()
        out = sampling.generate(config, params, ids, mask, pv, grids, rng=jax.random.key(r + 1), **kwargs)
        out.tokens.block_until_ready()
        ours = min(ours, time.perf_counter() - t)
    ours_tps = total_tokens / ours

    mm = (ids == cfg.image_token_id).astype(np.int64)
    torch.set_num_threads(os.cpu_count())
    hf_kwargs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grids),
                     mm_token_type_ids=torch.from_numpy(mm), max_new_tokens=args.new, min_new_tokens=args.new,
                     do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=args.n)
    with torch.no_grad():
        hf.generate(**(hf_kwargs | {"max_new_tokens": 2, "min_new_tokens": 2}))  # warm-up
        theirs = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            hf.generate(**hf_kwargs)
            theirs = min(theirs, time.perf_counter() - t)
    hf_tps = total_tokens / theirs

    tc = config.text
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params["text"])) + \
        (0 if config.tie_word_embeddings else params["lm_head"]["kernel"].nbytes)
    rows = args.prompts * args.n
    prompt_len = sampling.engine.bucket_length(ids.shape[1])
    per_token_cache = 2 * tc.num_hidden_layers * tc.num_key_value_heads * tc.head_dim * 4
    cache_bytes = sum(rows * (prompt_len + args.new) * per_token_cache for _ in range(args.new))
    achieved = (args.new * weight_bytes + cache_bytes) / ours
    bandwidth = copy_bandwidth()
    print(f"config: text 512x8L (8H/2KV, vocab 32000), vision 256x4L; {args.prompts} prompts x n={args.n}, "
          f"{args.new} new tokens, one 224x224 image each; jax {jax.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores")
    print(f"vlcal_jax: {ours:.2f} s  {ours_tps:,.0f} tokens/s")
    print(f"HF generate: {theirs:.2f} s  {hf_tps:,.0f} tokens/s")
    print(f"ratio (ours / HF): {ours_tps / hf_tps:.2f}x")
    print(f"decode memory traffic: {achieved / 1e9:.2f} GB/s of {bandwidth / 1e9:.2f} GB/s measured copy bandwidth "
          f"({100 * achieved / bandwidth:.0f}%)")


if __name__ == "__main__":
    main()
