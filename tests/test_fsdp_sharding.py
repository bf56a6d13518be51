"""FSDP splits the work, not only the weights: the compiled update and scoring on 8 simulated CPU
devices (mesh 1x8x1), read from XLA's own reports.

The test runs this file as a script in a subprocess (the device count is fixed when JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/test_fsdp_sharding.py

Each program is lowered as the run lowers it (vlcal_jax.fit.programs' shapes and shardings, traced
under the mesh) for one device and for eight, and compiled, not run:

* FLOPs: `cost_analysis()` of a partitioned program counts one device's work. Each device must do
  1/8 of the one-device program's FLOPs (within 10%). Both programs are the same (the micro-batch
  and layer scans, which cost_analysis counts once per loop body, are identical), so the ratio is
  exact for work that is split and 1 for work that is repeated on every chip.
* Collectives: no all-reduce / all-gather / all-to-all / reduce-scatter / collective-permute in the
  8-device HLO may move an activation-sized array. FSDP's legitimate traffic is parameter-shaped
  (weights gathered per layer, gradients reduced), so the bound sits between the largest parameter
  and the smallest whole-batch activation, and the script checks that the shapes leave a gap.
  One activation is gathered on purpose: the merged image features [I * P/m^2, D] (clean and
  perturbed), which `embed_tokens` and DeepStack read at any row's image_index (a row's image
  may sit on another chip); they are m^2 Dv / D times smaller than the vision activations here
  and ~1/50 of the text activations in Qwen3-VL-4B's update. Only those exact shapes are excused.

Without the activation constraints (the code before parallel.constrain) XLA replicated the
residual stream and the LM head: per-device FLOPs were ~the one-device total and the HLO held
all-reduces of whole [B, T, D] activations and [B, C, V] logits; both checks fail there.
The last stdout line is a JSON report.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

FLOP_RTOL = 0.10
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
# the HLO result type of a collective (its `-start` form returns a tuple with the operands)
COLLECTIVE_RE = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
SHAPE_RE = re.compile(r"\b(?:pred|s8|s16|s32|s64|u8|u32|bf16|f16|f32|f64)\[([0-9,]*)\]")


def collectives(hlo_text: str, devices: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(op, shape of the largest array it moves, the line) for every collective in compiled HLO
    text. Compiled HLO prints only result types: a reduce-scatter's input is its result times the
    group size, taken as all `devices` (exact for one group, as on the 1x8x1 mesh)."""
    found = []
    for line in hlo_text.splitlines():
        match = COLLECTIVE_RE.search(line)
        if match:
            shapes = [tuple(int(d) for d in dims.split(",") if d) for dims in SHAPE_RE.findall(match.group(1))]
            shape = max(shapes, key=math.prod, default=())
            if match.group(2) == "reduce-scatter" and shape:
                shape = (shape[0] * devices,) + shape[1:]
            found.append((match.group(2), shape, line.strip()[:300]))
    return found


def test_fsdp_splits_the_work():
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 " \
            "--xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["largest_param"] < report["bound"] < report["smallest_activation"], report
    for name, program in report["programs"].items():
        per_device = program["flops_8"] / (program["flops_1"] / 8)
        assert abs(per_device - 1) <= FLOP_RTOL, (
            f"{name}: each of 8 devices does {per_device:.2f} x 1/8 of the one-device FLOPs "
            f"({program['flops_8']:.3g} vs {program['flops_1']:.3g} on one device): work is repeated on every chip")
        assert not program["large_collectives"], (
            f"{name}: collectives over {report['bound']} elements (activation-sized; parameters are at most "
            f"{report['largest_param']}):\n" + "\n".join(map(str, program["large_collectives"])))


def test_collective_parser():
    hlo = """
  %all-reduce.1 = f32[16,192,64]{2,1,0} all-reduce(f32[16,192,64]{2,1,0} %x), channel_id=1, to_apply=%add
  %ag = (bf16[2,64]{1,0}, bf16[16,64]{1,0}) all-gather-start(bf16[2,64]{1,0} %p), dimensions={0}
  %rs = f32[8]{0} reduce-scatter(f32[64]{0} %g), dimensions={0}
  %not = f32[16,192,64]{2,1,0} add(f32[16,192,64]{2,1,0} %a, f32[16,192,64]{2,1,0} %b)
"""
    assert [(op, shape) for op, shape, _ in collectives(hlo, 8)] == [("all-reduce", (16, 192, 64)),
                                                                  ("all-gather", (16, 64)), ("reduce-scatter", (64,))]


def main():
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(__file__))
    import jax

    import rl_utils as U
    from vlcal_jax import models, parallel
    from vlcal_jax.fit import programs
    from vlcal_jax.rl import step

    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), have "
                         f"{jax.device_count()}")
    config = U.tiny_config(layers=2, depth=2, deepstack=(0,))
    # 16 prompts x 2 samples, updated in 2 micro-batches of 16 rows (8 images each, one per device);
    # 256-patch images and 192-token rows make every activation several times the largest parameter
    sizes = programs.Sizes(prompts=16, samples=2, prompt_len=128, response_len=64, images_per_prompt=1, patches=256,
                           rollout_batch=16, micro_batch=16)
    rl = step.RLConfig(samples_per_prompt=2, logprob_chunk=32)
    v, t = config.vision, config.text
    rows, length = sizes.micro_batch, sizes.prompt_len + sizes.response_len
    images = rows // sizes.samples
    activations = {"vision [I, P, Dv]": images * sizes.patches * v.hidden_size,
                   "text [B, T, D]": rows * length * t.hidden_size,
                   "logits [B, C, V]": rows * rl.logprob_chunk * t.vocab_size}
    abstract = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))
    largest_param = max(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    smallest_activation = min(activations.values())
    bound = smallest_activation // 2
    slots = sizes.patches // v.merge_unit
    image_features = {(images * slots, t.hidden_size), (images * sizes.samples * slots, t.hidden_size)}

    def activation_sized(op, shape):
        excused = op == "all-gather" and tuple(d for d in shape if d != 1)[-2:] in image_features
        return math.prod(shape) > bound and not excused

    def lowered(mesh, name):
        setup = programs.Setup(config, rl, mesh, "float32", eos_token_ids=(1,), pad_token_id=0)
        with jax.set_mesh(mesh):  # as the run traces them (parallel.use_mesh)
            if name == "score":
                inputs = setup.program_inputs(rows, length, images, sizes.patches)
                return step.score.lower(config, setup.policy, setup.ref_params, inputs, setup.rng, rl=rl,
                                        num_response=sizes.response_len)
            batch = programs.update_batch(setup, sizes)
            micro_rl = step.RLConfig(samples_per_prompt=2, logprob_chunk=32, micro_batch_size=sizes.micro_batch)
            jitted = step.make_train_step(config, micro_rl, setup.optimizer, mesh).jitted(setup.state, batch)
            return jitted.lower(setup.state, batch, setup.rng)

    one, eight = parallel.make_mesh(1, 1, 1, devices=jax.devices()[:1]), parallel.make_mesh(1, 8, 1)
    report = {"largest_param": largest_param, "smallest_activation": smallest_activation, "bound": bound,
              "activations": activations, "programs": {}}
    for name in ("update", "score"):
        compiled = {n: lowered(mesh, name).compile() for n, mesh in (("1", one), ("8", eight))}
        large = [c for c in collectives(compiled["8"].as_text(), 8) if activation_sized(*c[:2])]
        report["programs"][name] = {f"flops_{n}": float(c.cost_analysis()["flops"]) for n, c in compiled.items()}
        report["programs"][name]["large_collectives"] = large
        print(name, {k: v for k, v in report["programs"][name].items() if k != "large_collectives"},
              f"{len(large)} activation-sized collectives", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
