"""Default experiment configuration (ml_collections); experiments/*.py start from it.

Every field is documented where it is set; PAPER.md section 6 gives the released run's values,
which are the defaults of `rl`.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections


def experiment_config(path: str, *args) -> ml_collections.ConfigDict:
    """`get_config(*args)` of the experiment file at `path`: how one experiment builds on another
    (`experiment_config(os.path.join(os.path.dirname(__file__), "tpu_v4.py"))`)."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "outputs/run"
    c.log_every = 1
    c.mesh = dict(data=1, fsdp=-1, tensor=1)  # -1: the remaining devices

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # HF Qwen3-VL directory (config.json, safetensors, tokenizer.json, preprocessor_config.json)
    c.model.param_dtype = "float32"  # master weights and optimizer state (keep float32: see README, precision)
    c.model.compute_dtype = "float32"  # matmuls and activations; the frozen reference model is stored in it
    c.model.remat = False
    # with remat: keep each layer's saved input in pinned host memory, not HBM (TPU/GPU; the same
    # values, one device-host copy each way per layer)
    c.model.remat_offload = False
    # attention kernel: "auto" (Pallas splash on TPU where the shapes allow, else the pure-JAX
    # dense / blockwise kernels), "xla" (always pure JAX), "splash" (always; interpret mode off TPU)
    c.model.attention_impl = "auto"
    # keep the frozen reference model in host memory (pinned_host) between scoring calls: its HBM
    # is free during rollouts and the update, for one host-to-device copy per RL step
    c.model.offload_reference = False
    # used only when model.path is empty: a small Qwen3-VL-architecture model trained from scratch
    c.model.init = ml_collections.ConfigDict(dict(
        vocab_size=600, tie_word_embeddings=True,
        text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, rope_theta=10000.0, mrope_section=(4, 6, 6)),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=8,
                    num_position_embeddings=64, deepstack_visual_indexes=(0,)),
    ))

    c.data = ml_collections.ConfigDict()
    c.data.kind = "scenes"  # scenes | records (EasyR1 parquet / JSONL)
    c.data.path = ""  # scenes: where the generated set lives (default workdir/data)
    c.data.seed = 0
    c.data.num_examples = 4000
    c.data.test_fraction = 0.1
    c.data.teacher_error_rate = 0.0
    # the generated world's knobs (data.scenes.SceneConfig, where each is documented)
    c.data.scene = ml_collections.ConfigDict(dict(
        image_size=64, min_objects=1, max_objects=6, shapes=("circle", "square", "triangle"),
        colors=("red", "green", "blue", "yellow"), size_scale=1.0, max_overlap=0.0, max_clutter=0,
        max_low_contrast=0.0, grid=0,
        question_types=("count", "exist", "color_of", "sum", "difference", "compare", "multi_step")))
    c.data.train_files = ()
    c.data.eval_files = ()
    c.data.eval_benchmark = ""  # a name from vlcal_jax.data.benchmarks
    c.data.eval_benchmark_dir = ""
    c.data.image_dir = ""
    c.data.prompt_key = "problem"
    c.data.answer_key = "answer"
    c.data.image_key = "images"
    c.data.id_key = ""
    c.data.choices_key = ""
    c.data.answer_type_key = ""
    c.data.category_key = ""
    c.data.min_pixels = 0  # 0: the processor's value
    c.data.max_pixels = 0
    c.data.length_buckets = (64, 128, 256, 512, 1024, 2048, 4096)
    c.data.patch_bucket = 0  # 0: derived from the largest image of each batch
    c.data.max_images_per_prompt = 1

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 0  # supervised warm start on teacher responses (scenes only)
    c.sft.batch_size = 32
    c.sft.learning_rate = 1e-3
    c.sft.weight_decay = 0.01
    c.sft.warmup_steps = 10
    c.sft.overconfident = True  # teacher states 9-10 / 10 regardless of correctness
    c.sft.confidence_low = 9
    c.sft.confidence_high = 10
    # non-empty: each confidence is drawn uniformly from these values instead (repeats weight a
    # value), still regardless of correctness
    c.sft.confidence_values = ()
    # response formats of the warm start as "mode:prompt" pairs (rl.mode, rl.prompt values); each
    # teacher response is written in one of them, picked by its example id, with that prompt's
    # instruction, so one warm start serves runs in every format (the scene study's ablation
    # ladder). Empty: rl.mode with rl.prompt only.
    c.sft.formats = ()
    # Making a model trained from scratch look at its images (README, "What the demo shows"): on
    # the full format alone it learns the text prior and its loss stops depending on the image.
    # inventory: the teacher's <vision> span starts with every object of the scene graph, as count
    # sentences score_perception reads ("There is 1 red circle. There are 2 blue squares.").
    c.sft.inventory = False
    # caption_steps: a first stage of that many steps in which every row is the image alone with a
    # "describe" instruction and the inventory as the whole response (a LLaVA-style alignment
    # stage), at caption_learning_rate with its own schedule; caption_fraction: the share of rows
    # of each later warm-start batch kept as such caption rows (picked by example id), so the next
    # stage does not unlearn it.
    c.sft.caption_steps = 0
    c.sft.caption_learning_rate = 2e-3
    c.sft.caption_fraction = 0.0
    # response tokens of a caption-stage row (an inventory is short; 0: rl.max_new_tokens, the
    # length every other warm-start row is padded to); one compiled shape either way
    c.sft.caption_length = 0
    # warm-start progress checkpoints (WORKDIR/warm_start_progress) every this many steps, and at a
    # SIGTERM: a stopped warm start resumes there, bit for bit (0: only at a SIGTERM)
    c.sft.checkpoint_every = 100

    c.rl = ml_collections.ConfigDict()
    c.rl.steps = 100
    c.rl.prompts_per_step = 256
    c.rl.samples_per_prompt = 8
    c.rl.max_new_tokens = 4096
    # the rollouts' sampling temperature; the update's log-probs, entropies and KLs are of the same
    # softmax(logits / T) (verl/EasyR1's actor divides the logits the same way)
    c.rl.temperature = 1.0
    c.rl.top_p = 1.0
    c.rl.mode = "decoupled"  # decoupled | rlcr | plain: the response format (parser)
    c.rl.prompt = "decoupled"  # the instruction: processing.INSTRUCTIONS (decoupled_short for tiny models)
    c.rl.reward = "vl_calibration"  # vl_calibration | rlcr | rlcr_vlm | rlvr | rlvr_easyr1
    c.rl.reward_weights = ml_collections.ConfigDict(dict(lambda_acc=1.0, lambda_cal=2.0, lambda_fmt=0.4,
                                                         lambda_vis=0.4))
    c.rl.soft_label_variant = "paper"  # paper (exact KL / entropy) | released (sampled-token proxies)
    c.rl.loss = "vl_calibration"  # see vlcal_jax.rl.losses.names()
    # "shared": every token of a response gets its GRPO advantage A_i (PAPER.md section 5).
    # "reward_to_go": the tokens after the graded answer (analysis, both confidences) get the
    # advantage of the reward without its accuracy term, which they cannot change, against the
    # mean of the same group's responses that are right (or wrong) like them, undivided
    # (grpo.after_answer_advantages); the tokens up to the answer keep A_i. Not the paper's.
    c.rl.post_answer_advantage = "shared"
    c.rl.post_answer_weight = 1.0  # "reward_to_go": the after-answer advantages are multiplied by this
    # > 0: a maximum-entropy bonus on the first token of each stated score, added to its advantage
    # (grpo.confidence_entropy_advantages): keeps the sampled confidences spread where plain GRPO +
    # Brier collapses them to one digit (README, "Keeping the spread": it did not make them rank on
    # the demo). Not the paper's objective.
    c.rl.confidence_entropy_bonus = 0.0
    # != 1: the output rows of the digit tokens "0".."9" take updates this many times larger (input
    # rows too when the embedding is tied), so that the stated scores can move within a short run;
    # the rest of the model keeps rl.learning_rate. Not the paper's.
    c.rl.score_lr_scale = 1.0
    # True: a model with tied embeddings gets, at the start of RL, an output projection of its own
    # (a copy of the embedding; the reference model too), so that rl.score_lr_scale moves the
    # digits' output rows without moving their input embeddings. Not the paper's.
    c.rl.untie_head = False
    # True: the digits' output rows are optimised as a level along the mean state at the score
    # tokens (taken at the first RL step) plus a part orthogonal to it, each with its own Adam
    # (step.split_score_level), so that an update can change how the stated score varies from
    # scene to scene without being swamped by its shared level. Use with rl.untie_head. Not the paper's.
    c.rl.score_level_split = False
    # True: at the first token of each stated score the sampled digit's policy-gradient term is
    # replaced by the exact expectation over the digits 0, 2..9 (each one's reward recomputed with the
    # score rewritten as that digit; "1" may open "10" and keeps its sampled term), which removes the
    # noise of sampling the digit (grpo.score_expectation_advantages). Not the paper's.
    c.rl.score_expectation = False
    c.rl.clip_low = 0.2
    c.rl.clip_high = 0.3
    c.rl.dual_clip = 3.0
    c.rl.kl_coef = 1e-4
    c.rl.w_min = 0.9
    c.rl.w_max = 1.1
    c.rl.lambda_tar = 0.1
    c.rl.filter_top_p = 0.2
    c.rl.learning_rate = 1e-6
    c.rl.weight_decay = 1e-2
    c.rl.grad_clip = 1.0
    c.rl.warmup_steps = 0
    # AdamW's first moment: "" stores it like the parameters; "bfloat16" halves it (2 GiB per chip
    # for Qwen3-VL-4B on a v4-8) while the second moment, the masters and the gradient sums stay float32
    c.rl.adam_mu_dtype = ""
    c.rl.logprob_chunk = 512
    # rows per micro-batch of the update (a multiple of samples_per_prompt that divides
    # prompts_per_step x samples_per_prompt); 0: the whole step's batch in one pass
    c.rl.micro_batch_size = 0
    # with micro-batches on a mesh: the step's pixel_values stay in pinned host memory and each
    # micro-batch's images are copied to the chips inside the compiled step (3.2 GiB of HBM per
    # chip for 256 prompts of 4 MP images on a v4-8)
    c.rl.offload_pixels = False
    # prompts per sampler call (divides prompts_per_step); 0: all prompts of the step in one call
    c.rl.rollout_batch_size = 0
    # the sampler: "continuous" (decode slots handed to the next waiting response as soon as a row
    # ends: a long-tailed batch decodes its rows, not padding behind its longest one) or "static"
    # (every row of a call decodes until the call's last one ends); both give the same responses
    c.rl.rollout_engine = "continuous"
    # decode slots of the continuous engine per sampler call (its KV cache holds this many rows of
    # prompt + max_new_tokens, besides the call's prompts; padded to a multiple of the mesh's batch
    # shards). 0: one per row of the call (rollout prompts x samples_per_prompt), the static
    # engine's memory and schedule. For long-tailed responses give a call more rows than slots:
    # raise rl.rollout_batch_size and set decode_slots to the rows the memory holds (README,
    # "Sampling memory"; benchmarks/bench_rollout.py measures ~3x at equal KV memory)
    c.rl.decode_slots = 0
    c.rl.vce_kind = "blackout"
    c.rl.vce_prob = 0.8
    c.rl.vce_k = 1
    c.rl.vce_noise_std = 189.0  # vce_kind="noise": Gaussian pixel noise std (0..255 scale), PAPER.md section 4
    c.rl.vce_grey = 128.0  # vce_kind="grey": the grey pixel value patches are set to
    c.rl.kl_clamp = 10.0  # the k3 reference-KL clamp, as in the released code

    c.eval = ml_collections.ConfigDict()
    c.eval.size = 500
    c.eval.every = 0
    c.eval.before_rl = True
    c.eval.batch_size = 64
    c.eval.temperature = 0.6
    c.eval.top_p = 0.95
    c.eval.engine = "continuous"  # the evaluator's sampler (see rl.rollout_engine)
    c.eval.decode_slots = 0  # 0: one per row of a batch (eval.batch_size)

    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=2))
    # Locked: a mistyped field (c.rl.stepz = 3 in an experiment, --config.rl.stepz=3) is an error,
    # not a new key. Experiments change values in place; a sub-dict replaced by a plain dict would
    # come back unlocked, so they update it (c.data.scene.update(...)) instead.
    return c.lock()
