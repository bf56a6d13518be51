"""Sampler throughput: vlcal_jax.sampling.generate vs HF transformers generate (torch, CPU), same weights.

    python benchmarks/bench_sampler.py [--prompts 8 --n 4 --new 128]

Mid-size config (text hidden 512, 8 layers, 8 heads / 2 KV heads, vocab 32000; vision depth 4,
hidden 256), one 224x224 image per prompt, temperature 1. Prints tokens/s of both and the ratio,
each side's prefill and per-step time, and the achieved GFLOP/s of both against two measured
float32 matmul rates: the machine's peak (a 2048^3 product) and the rate of one decode step's
weight matmuls alone ([rows, D] operands, the best a decode step can do). "Useful" FLOPs are the
same for both sides: the vision tower once per image, the prompt once per prompt, the matmuls
and attention of every generated token; the ratio ceiling is HF's time over the time those
FLOPs take at a given rate. The load average is printed because the machine may be shared.
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
import jax.numpy as jnp  # noqa: E402
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


def token_flops(config) -> int:
    """Matmul FLOPs of one token through the text decoder's projections (no attention, no head)."""
    tc = config.text
    q, kv = tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim
    d = tc.hidden_size
    return 2 * tc.num_hidden_layers * (d * (q + 2 * kv) + q * d + 3 * d * tc.intermediate_size)


def attention_flops(config, context: int) -> int:
    """QK^T and PV FLOPs of one query token over `context` keys, all layers."""
    tc = config.text
    return 4 * tc.num_hidden_layers * tc.num_attention_heads * tc.head_dim * context


def vision_flops(config, grids) -> int:
    vc, d = config.vision, config.text.hidden_size
    total = 0
    for t, h, w in grids:
        patches, dv = t * h * w, vc.hidden_size
        merged, wide = patches // vc.merge_unit, dv * vc.merge_unit
        total += 2 * patches * vc.patch_dim * dv
        total += vc.depth * (2 * patches * (4 * dv * dv + 2 * dv * vc.intermediate_size) + 4 * patches * patches * dv)
        total += (1 + len(vc.deepstack_visual_indexes)) * 2 * merged * (wide * wide + wide * d)
    return total


def useful_flops(config, prompt_lengths, grids, n: int, new: int) -> tuple[int, int]:
    """(total, decode-only) FLOPs: vision once per image, each prompt once, n * new tokens each."""
    head = 2 * config.text.hidden_size * config.text.vocab_size
    prefill = sum(length * token_flops(config) + sum(attention_flops(config, i + 1) for i in range(length)) + head
                  for length in prompt_lengths)
    decode = n * sum(token_flops(config) + head + attention_flops(config, length + step + 1)
                     for length in prompt_lengths for step in range(new - 1))
    return vision_flops(config, grids) + prefill + decode, decode


def best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak() -> float:
    """FLOP/s of a float32 2048^3 product in JAX (all cores)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048), np.float32))
    product = jax.jit(lambda x: x @ x)
    return 2 * 2048**3 / best_time(lambda: product(a).block_until_ready(), 5)


def decode_matmul_rate(config, rows: int) -> float:
    """FLOP/s of one decode step's weight matmuls alone ([rows, D] times each layer's fused
    qkv, o, gate/up and down kernels, then the [V, D] head), repeated in one program."""
    tc = config.text
    d, q, kv, inner = (tc.hidden_size, tc.num_attention_heads * tc.head_dim, tc.num_key_value_heads * tc.head_dim,
                       tc.intermediate_size)
    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(0.02 * rng.standard_normal(shape, np.float32))

    kernels = [(normal(d, q + 2 * kv), normal(q, d), normal(d, 2 * inner), normal(inner, d))
               for _ in range(tc.num_hidden_layers)]
    head, x, repeats = normal(tc.vocab_size, d), normal(rows, d), 10

    @jax.jit
    def steps(x, kernels, head):
        def step(_, h):
            for qkv, o, gate_up, down in kernels:
                h = h + (h @ qkv)[:, :q] @ o
                h = h + (h @ gate_up)[:, :inner] @ down
            return h + jnp.einsum("nd,vd->nv", h, head)[:, :d] * 1e-3
        return jax.lax.fori_loop(0, repeats, step, x)

    flops = repeats * (rows * token_flops(config) + 2 * rows * d * tc.vocab_size)
    return flops / best_time(lambda: steps(x, kernels, head).block_until_ready(), 3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()

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
    for ours, theirs in ((H.IMAGE_TOKEN, cfg.image_token_id), (H.VISION_START, cfg.vision_start_token_id),
                         (H.VISION_END, cfg.vision_end_token_id)):
        batch = (np.where(batch[0] == ours, theirs, batch[0]),) + batch[1:]
    ids, mask, pv, grids = batch
    rows = args.prompts * args.n
    total_tokens = rows * args.new

    def ours(new, seed):
        return sampling.generate(config, params, ids, mask, pv, grids, rng=jax.random.key(seed), max_new_tokens=new,
                                 temperature=1.0, top_p=1.0, n=args.n).tokens.block_until_ready()

    ours(1, 0)
    ours_first = best_time(lambda: ours(1, 1), args.repeats)
    ours_total = best_time(lambda: ours(args.new, 2), args.repeats)

    mm = (ids == cfg.image_token_id).astype(np.int64)
    torch.set_num_threads(os.cpu_count())
    hf_kwargs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grids),
                     mm_token_type_ids=torch.from_numpy(mm), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                     num_return_sequences=args.n)

    def theirs(new):
        with torch.no_grad():
            hf.generate(**hf_kwargs, max_new_tokens=new, min_new_tokens=new)

    theirs(2)  # warm-up
    hf_first = best_time(lambda: theirs(1), args.repeats)
    hf_total = best_time(lambda: theirs(args.new), args.repeats)

    peak = matmul_peak()
    decode_rate = decode_matmul_rate(config, rows)
    flops, decode = useful_flops(config, mask.sum(axis=1).tolist(), [tuple(g) for g in grids], args.n, args.new)
    load_after = os.getloadavg()

    def line(name, first, total):
        step = (total - first) / (args.new - 1)
        return (f"{name:12s} {total:6.2f} s  {total_tokens / total:7,.0f} tokens/s  prefill+first token "
                f"{first * 1e3:5.0f} ms  {step * 1e3:6.1f} ms/step  {flops / total / 1e9:5.1f} GFLOP/s overall, "
                f"{decode / (args.new - 1) / step / 1e9:5.1f} GFLOP/s decoding")

    floor_peak, floor_decode = flops / peak, flops / decode_rate
    ratio = hf_total / ours_total
    print(f"config: text 512x8L (8H/2KV, vocab 32000), vision 256x4L; {args.prompts} prompts x n={args.n}, "
          f"{args.new} new tokens, one 224x224 image each; jax {jax.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"useful work: {flops / 1e9:.1f} GFLOP ({decode / (args.new - 1) / 1e9:.2f} GFLOP per decode step of "
          f"{rows} rows)")
    print(f"float32 matmul: peak {peak / 1e9:.0f} GFLOP/s (2048^3); decode-step weight matmuls alone "
          f"{decode_rate / 1e9:.0f} GFLOP/s")
    print(line("vlcal_jax:", ours_first, ours_total))
    print(line("HF generate:", hf_first, hf_total))
    print(f"ratio (ours / HF): {ratio:.2f}x")
    print(f"ratio ceiling: {hf_total / floor_peak:.1f}x if all useful FLOPs ran at the matmul peak "
          f"({floor_peak:.2f} s), {hf_total / floor_decode:.1f}x at the decode-shape matmul rate "
          f"({floor_decode:.2f} s); ours runs at {100 * floor_peak / ours_total:.0f}% of peak and "
          f"{100 * floor_decode / ours_total:.0f}% of the decode-shape rate")


if __name__ == "__main__":
    main()
