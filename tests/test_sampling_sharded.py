"""Sharded == unsharded sampling on 8 simulated CPU devices.

The test runs this file as a script in a subprocess (the device count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_sampling_sharded.py

Params placed by `parallel.shard_params` on meshes (data, fsdp, tensor) = 2x2x2 and 1x8x1, prompts
split over (data, fsdp) by `generate(..., mesh=mesh)`: the continuous engine's greedy and
temperature-1 tokens (and on 2x2x2 the static engine's) equal the one-device static engine's and
log-probs agree to 1e-5 (output placement is left to XLA). On 1x8x1 also 3 prompts (6 sample
rows), which the engines pad to 8 rows and slots to split their KV caches; and no collective of
the compiled decode segment moves a KV cache (each chip's slots take only its own prompts, whose
KV it prefilled). The last stdout line is a JSON summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

MESHES = ((2, 2, 2), (1, 8, 1))
PROMPTS, N, NEW, SLOTS = 8, 2, 12, 8  # 16 rows through 8 slots (1 per chip on 1x8x1)
GRIDS = ((1, 4, 4), (1, 4, 6), (1, 2, 4), (1, 6, 4), (1, 2, 2), (1, 4, 4), (1, 2, 6))
ROWS = ([0], [1], [], [2, 3], [4], [], [5], [6])
FEW = 3  # prompts ROWS[:3], images GRIDS[:2]: rows that do not divide the batch shards


def test_sharded_generate_equals_one_device():
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 " \
            "--xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"x".join(map(str, m)) for m in MESHES} | {"1x8x1/3prompts", "2x2x2/static"}, report
    assert report["1x8x1"]["cache_collectives"] == [], report["1x8x1"]


def _params(config, seed=0):
    """init_params' tree with NumPy draws: matrices N(0, 0.1) (peaked enough that greedy choices
    have clear margins), norm scales N(1, 0.1)."""
    import jax
    import numpy as np

    from vlcal_jax import models

    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))

    def one(path, leaf):
        name = str(getattr(path[-1], "key", ""))
        scale = 0.1 * rng.standard_normal(leaf.shape)
        is_norm = name in ("scale", "norm", "q_norm", "k_norm", "input_norm", "post_norm")
        return (1.0 + scale if is_norm else scale).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, shapes)


def main():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(__file__))
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import hf_utils as H
    from vlcal_jax import models, parallel, sampling

    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), have "
                         f"{jax.device_count()}")
    config = models.ModelConfig(
        vision=models.VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                                   out_hidden_size=64, num_position_embeddings=16, deepstack_visual_indexes=(0,)),
        text=models.TextConfig(vocab_size=H.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                               mrope_section=(2, 3, 3)),
        image_token_id=H.IMAGE_TOKEN, video_token_id=H.VIDEO_TOKEN, vision_start_token_id=H.VISION_START,
        vision_end_token_id=H.VISION_END, tie_word_embeddings=False)
    params = _params(config)
    batches = {"all": H.make_batch(np.random.default_rng(1), GRIDS, ROWS, patch_dim=config.vision.patch_dim),
               "few": H.make_batch(np.random.default_rng(2), GRIDS[:2], ROWS[:FEW], patch_dim=config.vision.patch_dim)}
    runs = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=1.0, rng=jax.random.key(7))}
    eos = (5, 7, 9, 11)  # rows end at different steps and slots are refilled

    def generate(p, mesh=None, batch="all", engine="continuous", names=tuple(runs)):
        return {name: sampling.generate(config, p, *batches[batch], max_new_tokens=NEW, n=N, mesh=mesh,
                                        eos_token_ids=eos, engine=engine, slots=SLOTS, **runs[name])
                for name in names}

    one = jax.device_put(params, jax.devices()[0])
    refs = {"all": generate(one, engine="static"), "few": generate(one, batch="few", engine="static")}
    assert len(set(np.asarray(refs["all"]["greedy"].tokens).ravel().tolist())) > 4, "degenerate greedy reference"
    assert len(set(np.asarray(refs["all"]["sampled"].lengths).tolist())) > 2, "rows should end at different steps"
    report = {}
    cases = [(m, "all", "continuous") for m in MESHES] + [((1, 8, 1), "few", "continuous"),
                                                         ((2, 2, 2), "all", "static")]
    for shape, batch, engine in cases:
        name = "x".join(map(str, shape)) + ("/3prompts" if batch == "few" else "") + \
            ("/static" if engine == "static" else "")
        mesh = parallel.make_mesh(*shape)
        sharded = parallel.shard_params(params, mesh)
        q = sharded["text"]["layers"]["attn"]["q_proj"]["kernel"]
        assert q.sharding.spec != P(None, None, None), (name, q.sharding)
        out = generate(sharded, mesh, batch, engine, names=("sampled",) if engine == "static" else tuple(runs))
        errors = {}
        for run, ours in out.items():
            theirs = refs[batch][run]
            assert np.asarray(ours.tokens).shape == (len(batches[batch][0]) * N, NEW), (name, run)
            np.testing.assert_array_equal(np.asarray(ours.tokens), np.asarray(theirs.tokens), err_msg=f"{name} {run}")
            np.testing.assert_array_equal(np.asarray(ours.lengths), np.asarray(theirs.lengths))
            for field in ("logprobs", "policy_logprobs"):
                diff = float(np.max(np.abs(np.asarray(getattr(ours, field)) - np.asarray(getattr(theirs, field)))))
                errors[f"{run}_{field}"] = diff
                assert diff <= 1e-5, f"{name} {run}: {field} differ by {diff:.2e}"
        report[name] = errors
        if name == "1x8x1":
            errors["cache_collectives"] = cache_collectives(config, sharded, mesh, batches[batch])
        print(name, errors, flush=True)
    print(json.dumps(report))


def cache_collectives(config, params, mesh, batch):
    """Collectives of the compiled decode segment whose result is shaped like a slot's or a
    prompt's KV cache ([..., Tp + M, hd] or [..., Tp, hd]); on one batch-split mesh there are none."""
    import jax

    from test_fsdp_sharding import collectives
    from vlcal_jax import models, sampling
    from vlcal_jax.sampling import continuous

    ids, mask = sampling.engine.left_pad(batch[0], batch[1], sampling.engine.bucket_length(batch[0].shape[1]), 0)
    inputs = sampling.shard_inputs(models.prepare_inputs(config, ids, mask, *batch[2:]), mesh)
    static = dict(max_new_tokens=NEW, n=N, greedy=False, top_k=0, eos_token_ids=(5,), pad_token_id=0, use_top_p=False)
    with jax.set_mesh(mesh):
        state = continuous.prefill(config, params, inputs, jax.random.key(0), 1.0, 1.0, slots=SLOTS, **static)
        hlo = continuous.segment.lower(config, params, *state, 1.0, 1.0, steps=4,
                                       real_rows=ids.shape[0] * N, **static).compile().as_text()
    cache = {(ids.shape[1] + NEW, config.text.head_dim), (ids.shape[1], config.text.head_dim)}
    return [line for _, shape, line in collectives(hlo, mesh.size) if len(shape) >= 3 and shape[-2:] in cache]


if __name__ == "__main__":
    main()
