"""What a run config asks of the device: the model's shapes and one RL step's sizes."""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from vlcal_jax.fit.programs import Sizes
from vlcal_jax.models import config as model_config_lib
from vlcal_jax.models import presets, vision
from vlcal_jax.processing.image_config import ImageProcessorConfig
from vlcal_jax.training import model_setup

# Qwen3 tokenizer ids: <|im_end|> and <|endoftext|> end a response, <|endoftext|> pads
QWEN3_EOS = (151645, 151643)
QWEN3_PAD = 151643


@dataclasses.dataclass(frozen=True)
class Model:
    """The model's config (compute dtype and remat applied), where its shapes came from, and the
    token ids the sampler is compiled with."""

    config: model_config_lib.ModelConfig
    source: str
    eos_token_ids: tuple[int, ...]
    pad_token_id: int


class _InitVocab:
    """Stands in for the tokenizer a from-scratch run fits (model_setup.from_scratch_config reads
    only its size and the vision token ids): `model.init.vocab_size` ids, vision tokens last."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.size - 1 - model_setup.VISION_TOKENS.index(token)


def model(config: ml_collections.ConfigDict) -> Model:
    """`config.model.path`: a directory (or config.json) -> its config.json; a name or hub id
    ending in a preset's name (Qwen/Qwen3-VL-4B-Instruct) -> the preset; empty -> the
    from-scratch architecture `config.model.init`. No weights are read."""
    m = config.model
    path = m.path
    file = path if path.endswith(".json") else os.path.join(path, "config.json")
    if path and os.path.isfile(file):
        found, source, eos, pad = model_config_lib.load_config(path), file, QWEN3_EOS, QWEN3_PAD
    elif path and presets.preset_name(path):
        name = presets.preset_name(path)
        found, source, eos, pad = presets.get(name), f"preset {name}", QWEN3_EOS, QWEN3_PAD
    elif path:
        raise ValueError(f"config.model.path={path!r}: no config.json there and no architecture preset of that "
                         f"name ({', '.join(presets.PRESETS)}); pass a Qwen3-VL directory or a preset name")
    else:
        vocab = _InitVocab(m.init.vocab_size)
        found = model_setup.from_scratch_config(m, vocab)
        source = "config.model.init (from scratch)"
        eos, pad = (vocab.size - len(model_setup.VISION_TOKENS) - 1,), 0
    return Model(found.replace(dtype=m.compute_dtype, remat=m.remat, remat_offload=m.remat_offload,
                               attention_impl=m.attention_impl), source, eos, pad)


def patches_per_image(config: ml_collections.ConfigDict, model_config: model_config_lib.ModelConfig) -> int:
    """The patch bucket of a batch holding an image at `data.max_pixels` (the processor's limit
    when 0): `data.patch_bucket` if set, else vision.patch_bucket of max_pixels / patch_size^2."""
    if config.data.patch_bucket:
        return int(config.data.patch_bucket)
    processor = model_config.image_processor or ImageProcessorConfig()
    max_pixels = config.data.max_pixels or processor.max_pixels
    v = model_config.vision
    return vision.patch_bucket(max_pixels // v.patch_size**2, v.merge_unit)


def check_hosts(sizes: Sizes, hosts: int) -> None:
    """The multi-controller trainer's rules for a slice of `hosts` TPU VMs (every process gives
    whole GRPO groups to every sampler call and micro-batch); errors name the setting."""
    if hosts == 1:
        return
    rules = (("rl.prompts_per_step", sizes.prompts, hosts), ("rl.rollout_batch_size", sizes.rollout_batch, hosts),
             ("rl.micro_batch_size", sizes.micro_batch, hosts * sizes.samples))
    for name, value, unit in rules:
        if value % unit:
            raise ValueError(f"{name}={value} must be a multiple of {unit} on a slice of {hosts} hosts (each host "
                             f"gives whole GRPO groups to every call); e.g. --config.{name}={unit * -(-value // unit)}")


def sizes(config: ml_collections.ConfigDict, model_config: model_config_lib.ModelConfig) -> Sizes:
    """One step at the config's largest shapes: prompts padded to the largest length bucket,
    `rl.max_new_tokens` response tokens, `data.max_images_per_prompt` images per prompt at
    `data.max_pixels`. `rl.rollout_batch_size` / `rl.micro_batch_size` of 0 mean the whole step."""
    r = config.rl
    rows = r.prompts_per_step * r.samples_per_prompt
    found = Sizes(prompts=r.prompts_per_step, samples=r.samples_per_prompt,
                  prompt_len=max(config.data.length_buckets), response_len=r.max_new_tokens,
                  images_per_prompt=config.data.max_images_per_prompt,
                  patches=patches_per_image(config, model_config),
                  rollout_batch=r.get("rollout_batch_size", 0) or r.prompts_per_step,
                  micro_batch=r.get("micro_batch_size", 0) or rows, engine=r.get("rollout_engine", "continuous"),
                  decode_slots=r.get("decode_slots", 0))
    found.check()
    return found
