"""Every shipped experiment config (each file in experiments/, each named variant) loads, is
locked against unknown keys, takes overrides through the CLI's own flag parsing, and builds its
model config and train step abstractly (shapes only, no weights)."""

import glob
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from vlcal_jax import models, processing
from vlcal_jax.rl import certainty, losses, rewards, rollout, step
from vlcal_jax.rl import format as rformat
from vlcal_jax.training import loop, model_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
# files whose get_config(name) picks a named variant, and the dict that names them
NAMED = {"ablations.py": "ABLATIONS", "baselines.py": "BASELINES"}
# study configs (python -m vlcal_jax.study): the train config every run starts from is their `base`
STUDIES = {"scene_study.py"}
# configs that train a released checkpoint (data.kind "records": no scene texts to fit a tokenizer
# on), and the checkpoint their docstring names; its config.json is written here when
# model.path does not exist on this machine
CHECKPOINTS = {"tpu_v4.py": "Qwen3-VL-4B-Instruct", "tpu_v5e.py": "Qwen3-VL-4B-Instruct",
               "tpu_v5p.py": "Qwen3-VL-4B-Instruct", "tpu_v5p_8b.py": "Qwen3-VL-8B-Instruct"}
# Qwen/Qwen3-VL-4B-Instruct's published config.json (transformers 4.57 layout), architecture fields
QWEN3_VL_4B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "image_token_id": 151655,
    "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "tie_word_embeddings": True,
    "text_config": {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
                    "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "rope_theta": 5000000,
                    "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                     "mrope_interleaved": True}, "attention_bias": False},
    "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                      "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
                      "out_hidden_size": 2560, "num_position_embeddings": 2304,
                      "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh"},
}
# Qwen/Qwen3-VL-8B-Instruct's: the 4B's with these text / vision widths and untied embeddings
QWEN3_VL_8B = {**QWEN3_VL_4B, "tie_word_embeddings": False,
               "text_config": {**QWEN3_VL_4B["text_config"], "hidden_size": 4096, "intermediate_size": 12288},
               "vision_config": {**QWEN3_VL_4B["vision_config"], "depth": 27, "hidden_size": 1152,
                                 "intermediate_size": 4304, "out_hidden_size": 4096,
                                 "deepstack_visual_indexes": [8, 16, 24]}}
CHECKPOINT_CONFIGS = {"Qwen3-VL-4B-Instruct": QWEN3_VL_4B, "Qwen3-VL-8B-Instruct": QWEN3_VL_8B}
# parameter counts of the released checkpoints (bounds)
PARAMETERS = {"Qwen3-VL-4B-Instruct": (4.0e9, 4.9e9), "Qwen3-VL-8B-Instruct": (8.0e9, 9.2e9)}


def load(file):
    spec = importlib.util.spec_from_file_location(file[:-3], os.path.join(EXPERIMENTS, file))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants() -> list[str]:
    """"file.py" or "file.py:name" for every config experiments/ ships."""
    out = []
    for path in sorted(glob.glob(os.path.join(EXPERIMENTS, "*.py"))):
        file = os.path.basename(path)
        if file in NAMED:
            out += [f"{file}:{name}" for name in getattr(load(file), NAMED[file])]
        else:
            out.append(file)
    return out


VARIANTS = variants()


def get_config(variant):
    file, _, name = variant.partition(":")
    module = load(file)
    config = module.get_config(name) if name else module.get_config()
    if file in STUDIES:
        assert config.is_locked and set(config) >= {"workdir", "rungs", "seeds", "base"}
        return config.base
    return config


def sub_dicts(config, prefix=""):
    """(dotted path, ConfigDict) for the config and every ConfigDict inside it."""
    yield prefix.rstrip("."), config
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from sub_dicts(value, f"{prefix}{key}.")


def test_every_file_is_covered():
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(EXPERIMENTS, "*.py")))
    assert {"ablations.py", "baselines.py", "cpu_demo.py", "tpu_v4.py", "tpu_v5e.py", "tpu_v5p.py",
            "tpu_v5p_8b.py"} <= set(files)
    for file in files:
        parameters = inspect.signature(load(file).get_config).parameters
        if file in NAMED:
            assert list(parameters) == ["name"] and parameters["name"].default in getattr(load(file), NAMED[file])
        else:
            assert not parameters, f"{file}: get_config takes arguments; add its variants to NAMED"


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_is_locked_against_unknown_keys(variant):
    config = get_config(variant)
    for path, sub in sub_dicts(config):
        assert sub.is_locked, f"{variant}: config.{path} is not locked"
        with pytest.raises((AttributeError, KeyError), match="stepz"):
            sub.stepz = 3
    with pytest.raises(KeyError, match="stepz"):
        config.update_from_flattened_dict({"rl.stepz": 3})
    # the names each config picks exist
    losses.get(config.rl.loss), rewards.get(config.rl.reward)
    assert config.rl.soft_label_variant in certainty.SOFT_LABEL_VARIANTS
    assert config.rl.prompt in processing.INSTRUCTIONS and config.rl.mode in rformat.MODES


def parse(argv):
    """The CLI's flag parsing (config_flags.DEFINE_config_file as train.py defines it) of argv."""
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "experiment config", flag_values=values, sys_argv=argv)
    values(argv)
    return holder.value


@pytest.mark.parametrize("variant", VARIANTS)
def test_cli_overrides_apply_and_unknown_ones_are_refused(variant):
    path = os.path.join(EXPERIMENTS, variant)
    prefix = "--config.base." if variant in STUDIES else "--config."  # a study's train config is its base
    config = parse(["train", f"--config={path}", f"{prefix}rl.steps=3", f"{prefix}data.seed=7"])
    config = config.base if variant in STUDIES else config
    assert config.rl.steps == 3 and config.data.seed == 7
    assert config.rl.loss == get_config(variant).rl.loss
    for bad in (f"{prefix}rl.stepz=3", f"{prefix}rl.reward_weights.lambda_acz=1", "--config.stepz=3"):
        with pytest.raises((AttributeError, KeyError, flags.Error), match="stepz|lambda_acz"):
            parse(["train", f"--config={path}", bad])


@pytest.fixture(scope="module")
def cli_typo(tmp_path_factory):
    """The real command line with a mistyped override, run where nothing may be written."""
    cwd = tmp_path_factory.mktemp("typo")
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "vlcal_jax.train", "--config",
                               os.path.join(EXPERIMENTS, "cpu_demo.py"), "--config.rl.stepz=3"], cwd=cwd,
                              capture_output=True, text=True, timeout=60, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    except subprocess.TimeoutExpired:
        done = None  # still running a minute later: the override was taken and the run started
    return done, time.monotonic() - start, cwd


def test_cli_refuses_an_unknown_override_before_running(cli_typo):
    done, seconds, cwd = cli_typo
    assert done is not None and done.returncode != 0, "the run started with --config.rl.stepz=3"
    assert seconds < 60, f"took {seconds:.0f} s: the run started"
    assert not os.listdir(cwd), f"the run wrote {os.listdir(cwd)}"
    output = done.stdout + done.stderr
    assert "stepz" in output and '"steps"' in output, output[-2000:]


def test_cli_error_names_the_full_key(cli_typo):
    """train.parse_flags reports the override by its full path, without a traceback."""
    done, _, _ = cli_typo
    assert done is not None
    output = done.stdout + done.stderr
    assert "rl.stepz" in output and "Traceback" not in output, output[-2000:]


class ShapeTokenizer:
    """What from_scratch_config reads of the demo tokenizer: its length and the vision token ids
    (byte-level BPE of model.init.vocab_size entries, then Qwen3-VL's 26 added tokens)."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __len__(self):
        return self.vocab_size + 26

    def convert_tokens_to_ids(self, token):
        return self.vocab_size + model_setup.VISION_TOKENS.index(token)


def model_config_of(variant, config, tmp_path):
    """The ModelConfig the run would build: from model.path's config.json (the documented
    checkpoint's, written here, when that path does not exist), else the from-scratch model."""
    m = config.model
    file = variant.partition(":")[0]
    if config.data.kind == "records":
        assert file in CHECKPOINTS, f"{variant} trains a checkpoint: name it in CHECKPOINTS"
        if not (m.path and os.path.exists(os.path.join(m.path, "config.json"))):
            path = tmp_path / CHECKPOINTS[file]
            path.mkdir()
            (path / "config.json").write_text(json.dumps(CHECKPOINT_CONFIGS[CHECKPOINTS[file]]))
            config.model.path = str(path)
        return models.load_config(m.path).replace(dtype=m.compute_dtype, remat=m.remat)
    model_config = model_setup.from_scratch_config(m, ShapeTokenizer(m.init.vocab_size))
    model_config.validate(variant)
    return model_config


def rollout_batch(model_config, rl, prompts, prompt_len=32, response_len=16):
    """A small host RLBatch of zeros with one 4 x 4-patch image per prompt, for the shapes."""
    rows = prompts * rl.samples_per_prompt
    grid = np.array([[1, 4, 4]] * prompts)
    image = [model_config.vision_start_token_id] + [model_config.image_token_id] * 4 + \
        [model_config.vision_end_token_id]
    ids = np.ones((prompts, prompt_len), np.int32)
    ids[:, -len(image) - 2:-2] = image
    pixels = np.zeros((prompts * 16, model_config.vision.patch_dim), np.float32)
    prompt_inputs = models.prepare_inputs(model_config, ids, np.ones_like(ids), pixels, grid)
    tokens = np.ones((rows, response_len), np.int32)
    seq = rollout.expand_for_responses(prompt_inputs, tokens, np.full(rows, response_len), rl.samples_per_prompt)
    zeros = np.zeros((rows, response_len), np.float32)
    return step.RLBatch(seq, zeros + 1, zeros, np.zeros(rows, np.float32), *(zeros,) * 6)


_BUILT = {}


@pytest.mark.parametrize("variant", VARIANTS)
def test_builds_its_model_and_train_step_abstractly(variant, tmp_path):
    config = get_config(variant)
    model_config = model_config_of(variant, config, tmp_path)
    rl = loop.rl_config(config)
    assert rl.loss == config.rl.loss and rl.vce_kind == config.rl.vce_kind
    key = (model_config, rl, config.model.param_dtype)
    if key not in _BUILT:  # variants differing only outside the model and the update trace once
        dtype = jnp.dtype(config.model.param_dtype)
        params = jax.eval_shape(lambda: models.init_params(model_config, jax.random.key(0), dtype=dtype))
        optimizer = step.make_optimizer(rl)
        state = jax.eval_shape(lambda p: step.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
        prompts = max(2, 2 * rl.micro_batch_size // rl.samples_per_prompt)
        batch = rollout_batch(model_config, rl, prompts)
        rng = jax.random.key(0)
        train_step = step.make_train_step(model_config, rl, optimizer)
        if isinstance(train_step, step.MicroBatchedStep):  # splits the host batch before its jit
            new_state = jax.eval_shape(train_step.jitted(state, train_step.split(batch)), state,
                                       train_step.split(batch), rng)[0]
        else:
            new_state = jax.eval_shape(train_step, state, batch, rng)[0]
        assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                                     state)
        stats = jax.eval_shape(lambda p, i, k: step.score(model_config, p, p, i, k, rl=rl, num_response=16),
                               params, batch.inputs, rng)
        assert stats["k3"].shape == batch.response_mask.shape
        _BUILT[key] = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    if variant.startswith("tpu_"):
        low, high = PARAMETERS[CHECKPOINTS[variant.partition(":")[0]]]
        assert low < _BUILT[key] < high, _BUILT[key]
