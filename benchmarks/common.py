"""What the sampler benchmarks share: the mid-size random model on both sides (ours and HF torch),
image-prompt batches, interleaved timing, and the matmul floor of a decode step."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import hf_utils as H  # noqa: E402

from vlcal_jax import models  # noqa: E402

IMAGE, VIDEO, START, END = 31990, 31991, 31992, 31993
DESCRIPTION = "text 512x8L (8H/2KV, vocab 32000), vision 256x4L"


def hf_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [12, 10, 10],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16,
                           out_hidden_size=512, num_position_embeddings=256, deepstack_visual_indexes=[1, 2]),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
        tie_word_embeddings=False)


def models_pair(seed: int = 0):
    """(HF torch model, our config, our params) with the same random weights."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    hf = Qwen3VLForConditionalGeneration(hf_config()).eval()
    path = tempfile.mkdtemp()
    hf.save_pretrained(path)
    config, params = models.from_pretrained(path)
    return hf, config, params


def image_batch(config, prompts: int, grid=(1, 14, 14), seed: int = 0):
    """Processor-format arrays of `prompts` prompts of random text around one image of `grid`
    (a 224x224 image at patch 16 by default): (input_ids, attention_mask, pixel_values, grids)."""
    rng = np.random.default_rng(seed)
    ids, mask, pv, grids = H.make_batch(rng, [grid] * prompts, [[i] for i in range(prompts)],
                                        patch_dim=config.vision.patch_dim)
    for ours, theirs in ((H.IMAGE_TOKEN, IMAGE), (H.VISION_START, START), (H.VISION_END, END)):
        ids = np.where(ids == ours, theirs, ids)
    return ids, mask, pv, grids


def hf_inputs(ids, mask, pv, grids):
    import torch

    mm = (ids == IMAGE).astype(np.int64)
    return dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                pixel_values=torch.from_numpy(pv), image_grid_thw=torch.from_numpy(grids),
                mm_token_type_ids=torch.from_numpy(mm))


def race(fns: dict, repeats: int, settle: float = 0.2, warmups: dict | None = None) -> dict:
    """Best wall time of each fn over `repeats` rounds, the fns run back to back in every round
    (after one warm-up call each, which compiles: `warmups[name]` instead where given), so each
    sees the same background load on a shared machine. Each timed call starts `settle` s after
    the previous one ends, so torch's spinning OpenMP workers do not eat into the next measurement."""
    for name, fn in fns.items():
        (warmups or {}).get(name, fn)()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@functools.partial(jax.jit, static_argnums=(0, 3))
def _matmul_steps(config, params, x, steps: int):
    """`steps` decode steps' matmuls alone on x [rows, D]: every layer's q, k, v, o, gate, up and
    down projections and the LM head, with per-layer weights (what the unrolled decode reads)."""
    layers = [jax.tree.map(lambda a, i=i: a[i], params["text"]["layers"]) for i in range(config.text.num_hidden_layers)]
    head = params["lm_head"]["kernel"] if "lm_head" in params else params["text"]["embed"].T

    def step(_, h):
        for p in layers:
            a, m = p["attn"], p["mlp"]
            q, k, v = (h @ a[name]["kernel"] for name in ("q_proj", "k_proj", "v_proj"))
            o = q @ a["o_proj"]["kernel"]
            inner = (o @ m["gate_proj"]["kernel"]) * (o @ m["up_proj"]["kernel"])
            h = inner @ m["down_proj"]["kernel"] + 1e-3 * (k.mean() + v.mean())  # k, v stay live
        logits = h @ head
        return h + 1e-6 * logits[:, :1]

    return jax.lax.fori_loop(0, steps, step, x)


def matmul_floor(config, params, rows: int, steps: int = 32):
    """fn timing `steps` decode steps' matmuls alone for `rows` rows; divide its time by `steps`."""
    x = jnp.full((rows, config.text.hidden_size), 0.01, jnp.float32)
    return lambda: _matmul_steps(config, params, x, steps).block_until_ready()
