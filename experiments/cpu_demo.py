"""The embedded default: a small Qwen3-VL-architecture model trained from scratch on generated
scenes, on any laptop CPU. Warm start (format + overconfident 5-10/10 confidences), then
VL-Calibration RL; prints calibration before/after (ECE and AUROC with bootstrap 95% intervals
over 500 held-out scenes) and writes plots.

    python -m vlcal_jax.train --config experiments/cpu_demo.py

At the end of the warm start the log says whether the model uses the images at all (its held-out
loss with the images blanked); see README, "What the demo shows".
"""

from vlcal_jax.configs import default_config


def get_config():
    c = default_config()
    c.workdir = "outputs/cpu_demo"
    c.data.num_examples = 6000
    c.data.test_fraction = 0.1  # 600 held-out scenes; the evaluation uses 500 of them
    # A world a model trained from scratch can learn to see in minutes (README, "What the demo
    # shows"): 1-3 squares in 4 colours at 1.6x size. On the earlier world (1-5 objects of three
    # shapes at 1x size) it never left the text prior; its vision tokens carried colour counts
    # linearly but not shapes, and 4 objects or faded colours again left the images unused.
    c.data.scene.update(image_size=64, max_objects=3, size_scale=1.6, shapes=("square",))
    c.data.min_pixels = 64 * 64
    c.data.max_pixels = 64 * 64
    c.data.length_buckets = (64,)  # one bucket: one compiled shape per stage
    # the model learns its format in the warm start; the instruction only names the format
    c.rl.prompt = "decoupled_tiny"
    # The warm start's image curriculum: 300 caption steps (the image alone, "Describe the image.",
    # answered by the scene's inventory), then 600 steps on teacher responses whose <vision> span
    # opens with that inventory, half of each batch kept as caption rows.
    c.sft.inventory = True
    c.sft.caption_steps = 300
    c.sft.caption_length = 40
    c.sft.caption_fraction = 0.5
    c.sft.steps = 600
    c.sft.batch_size = 32
    c.sft.learning_rate = 1e-3
    # an overconfident, uninformative teacher: 5-10 / 10 whatever the scene, so the warm-started
    # model states high confidences that do not track its errors
    c.sft.confidence_low = 5
    c.sft.confidence_high = 10
    c.rl.steps = 50
    c.rl.prompts_per_step = 8
    c.rl.samples_per_prompt = 8
    c.rl.max_new_tokens = 128  # the inventory lengthens the vision span
    c.rl.learning_rate = 5e-5
    # The paper's objective (TAR, every response token in the policy gradient). The released
    # run's top-20% perception filter (rl.loss="vl_calibration") keeps only the most
    # image-dependent tokens, which for a model trained from scratch excludes the confidence
    # tokens, so the stated confidences would never be updated.
    c.rl.loss = "vl_calibration_paper"
    c.rl.kl_coef = 1e-3
    c.rl.logprob_chunk = 128
    c.eval.size = 500
    c.eval.every = 25
    c.eval.batch_size = 100
    c.eval.temperature = 0.0  # greedy: a noise-free before/after comparison
    c.checkpoint.every = 25
    return c
