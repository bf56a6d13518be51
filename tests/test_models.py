"""Qwen3-VL port vs transformers (torch, CPU, float32): logits, checkpoints, compile counts, input checks."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_utils as H
from vlcal_jax import models
from vlcal_jax.models import attention, qwen3_vl

CONFIGS = {
    # untied, GQA 4:1, DeepStack on the first two ViT blocks
    "untied_gqa4": dict(tie=False, heads=4, kv_heads=1, deepstack=(0, 1)),
    # tied, MHA 1:1, DeepStack on later blocks (last one = final block)
    "tied_mha": dict(tie=True, heads=4, kv_heads=4, deepstack=(1, 2)),
    # untied, GQA 2:1, one DeepStack layer, larger position table, other rope split
    "untied_gqa2_ds1": dict(tie=False, heads=4, kv_heads=2, deepstack=(1,), pos_embeddings=36, mrope=(4, 2, 2)),
}
TOL = 1e-4


def assert_close_to_hf(ours, ref, mask):
    """max |ours - HF| over the valid tokens <= TOL * max |HF| (test_nnx uses it too)."""
    valid = np.asarray(mask).astype(bool)
    err = np.abs(np.asarray(ours) - ref)[valid].max()
    assert err <= TOL * np.abs(ref[valid]).max(), f"max |ours - HF| = {err}"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    cfg = H.tiny_hf_config(**CONFIGS[request.param])
    model = H.make_hf_model(cfg, seed=len(request.param))
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path)
    return model, path


@pytest.fixture(params=["dense", "blockwise"])
def attention_kernel(request):
    """Both attention kernels: "blockwise" sends every attention (vision tower, text decoder)
    through the flash-style tiles, 8 x 8, which these short rows and small images span several of.
    The module constants are read at trace time, so jax's caches are cleared around it."""
    if request.param == "dense":
        yield request.param
        return
    saved = attention.DENSE_MAX_SCORES, attention.BLOCK
    attention.DENSE_MAX_SCORES, attention.BLOCK = 0, 8
    jax.clear_caches()
    try:
        yield request.param
    finally:
        attention.DENSE_MAX_SCORES, attention.BLOCK = saved
        jax.clear_caches()


def test_logits_match_hf_with_images_padding_and_text_rows(hf_checkpoint, attention_kernel):
    model, path = hf_checkpoint
    config, params = models.from_pretrained(path)
    rng = np.random.default_rng(1)
    grids = [(1, 4, 6), (1, 8, 4), (1, 2, 2)]
    # row 0: one image; row 1: two images of different sizes; row 2: text only (left padded)
    ids, mask, pv, grid = H.make_batch(rng, grids, [[0], [1, 2], []], patch_dim=config.vision.patch_dim)
    assert (mask == 0).any(), "batch must contain left padding"
    ref = H.hf_logits(model, ids, mask, pv, grid)
    assert_close_to_hf(models.forward(config, params, ids, mask, pv, grid), ref, mask)


def test_text_only_batch_matches_hf(hf_checkpoint, attention_kernel):
    model, path = hf_checkpoint
    config, params = models.from_pretrained(path)
    ids = np.random.default_rng(2).integers(1, 300, size=(2, 9))
    mask = np.ones_like(ids)
    assert_close_to_hf(models.forward(config, params, ids, mask), H.hf_logits(model, ids, mask), mask)


def test_round_trip_ours_to_hf(tmp_path):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    cfg = H.tiny_hf_config(tie=False, kv_heads=2, deepstack=(0, 2))
    config = models.ModelConfig.from_hf_dict(cfg.to_dict())
    params = models.init_params(config, jax.random.key(3), std=0.05)
    out = str(tmp_path / "ours")
    models.save_pretrained(config, params, out)
    hf = Qwen3VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    rng = np.random.default_rng(4)
    grids = [(1, 4, 4), (1, 6, 2)]
    ids, mask, pv, grid = H.make_batch(rng, grids, [[0, 1], []], patch_dim=config.vision.patch_dim)
    assert_close_to_hf(models.forward(config, params, ids, mask, pv, grid), H.hf_logits(hf, ids, mask, pv, grid), mask)
    # and back: our loader reads what we wrote, bit for bit
    _, again = models.from_pretrained(out)
    chex.assert_trees_all_equal(params, again)


def test_sharded_checkpoints_load_both_ways(tmp_path):
    cfg = H.tiny_hf_config(tie=True)
    model = H.make_hf_model(cfg, seed=5)
    hf_dir = str(tmp_path / "hf_sharded")
    model.save_pretrained(hf_dir, max_shard_size="50KB")
    assert os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json"))
    config, params = models.from_pretrained(hf_dir)
    rng = np.random.default_rng(6)
    ids, mask, pv, grid = H.make_batch(rng, [(1, 4, 4)], [[0]], patch_dim=config.vision.patch_dim)
    ref = H.hf_logits(model, ids, mask, pv, grid)
    assert_close_to_hf(models.forward(config, params, ids, mask, pv, grid), ref, mask)

    ours_dir = str(tmp_path / "ours_sharded")
    models.save_pretrained(config, params, ours_dir, max_shard_bytes=40_000)
    with open(os.path.join(ours_dir, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    _, again = models.from_pretrained(ours_dir)
    chex.assert_trees_all_equal(params, again)


def test_forward_compiles_once_per_bucket(monkeypatch):
    cfg = H.tiny_hf_config()
    config = models.ModelConfig.from_hf_dict(cfg.to_dict())
    params = models.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(7)
    # Different image sizes, same padded length and same patch bucket -> one compilation.
    a = H.make_batch(rng, [(1, 4, 6)], [[0], []], patch_dim=config.vision.patch_dim, length=24)
    b = H.make_batch(rng, [(1, 2, 8)], [[], [0]], patch_dim=config.vision.patch_dim, length=24)
    traces = []

    def apply(*args, **kwargs):
        traces.append(1)
        return qwen3_vl.apply(*args, **kwargs)

    # forward's jit, rebuilt around a chex trace limit: a second trace (= compilation) raises
    chex.clear_trace_counter()
    monkeypatch.setattr(qwen3_vl, "apply_jit", jax.jit(chex.assert_max_traces(apply, n=1), static_argnums=(0,)))
    models.forward(config, params, *a).block_until_ready()
    models.forward(config, params, *b).block_until_ready()
    assert len(traces) == 1


def test_bad_checkpoint_errors_name_the_problem(tmp_path):
    cfg = H.tiny_hf_config()
    model = H.make_hf_model(cfg)
    path = str(tmp_path / "ckpt")
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    hf["text_config"]["num_hidden_layers"] = 4  # checkpoint has 3 layers
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match=r"Missing \(\d+\).*layers\.3\."):
        models.from_pretrained(path)
    hf["model_type"], hf["architectures"] = "llava", ["LlavaForConditionalGeneration"]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    with pytest.raises(ValueError, match="Qwen3-VL"):
        models.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="Download"):
        models.from_pretrained(str(tmp_path / "nowhere"))


def test_image_pad_count_mismatch_is_a_clear_error():
    config = models.ModelConfig.from_hf_dict(H.tiny_hf_config().to_dict())
    rng = np.random.default_rng(8)
    ids, mask, pv, grid = H.make_batch(rng, [(1, 4, 4)], [[0]], patch_dim=config.vision.patch_dim)
    with pytest.raises(ValueError, match="image_pad"):
        models.prepare_inputs(config, ids, mask, pv, np.array([[1, 4, 8]]))


def test_bfloat16_params_run_and_stay_close(hf_checkpoint):
    model, path = hf_checkpoint
    config, params = models.from_pretrained(path, dtype=jnp.bfloat16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params))
    rng = np.random.default_rng(9)
    ids, mask, pv, grid = H.make_batch(rng, [(1, 4, 4)], [[0]], patch_dim=config.vision.patch_dim)
    ours = np.asarray(models.forward(config, params, ids, mask, pv, grid))
    ref = H.hf_logits(model, ids, mask, pv, grid)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 0.05 * np.abs(ref).max()


def test_forward_input_shape_errors_name_the_argument():
    """chex checks at forward's entry: they fail before the params are read (None here)."""
    config = models.ModelConfig.from_hf_dict(H.tiny_hf_config().to_dict())
    rng = np.random.default_rng(10)
    ids, mask, pv, grid = H.make_batch(rng, [(1, 4, 4)], [[0]], patch_dim=config.vision.patch_dim)
    dim = config.vision.patch_dim
    cases = [
        (r"shape \(\d+,\) but .*\[input_ids must be \[B, T\] int\]", (ids[0], mask[0], pv, grid)),
        (r"type float32 but .*\[input_ids must be \[B, T\] int\]", (ids.astype(np.float32), mask, pv, grid)),
        (r"\[attention_mask must be \[B, T\] = \[1, \d+\] like input_ids\]", (ids, mask[:, 1:], pv, grid)),
        (rf"\[pixel_values must be \[N_patches, patch_dim={dim}\] float\]", (ids, mask, pv[:, 1:], grid)),
        (r"\[image_grid_thw must be \[N_images, 3\] int\]", (ids, mask, pv, grid[0])),
    ]
    for message, args in cases:
        with pytest.raises(AssertionError, match=message):
            models.forward(config, None, *args)
