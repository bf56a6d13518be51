"""Tokenizer glue: load a checkpoint's `tokenizer.json`, train a demo BPE, encode padded batches."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

from vlcal_jax.processing.chat_template import QWEN3_VL_CHAT_TEMPLATE

# Qwen2/2.5/3(-VL) pre-tokenisation: split on this regex, then map bytes to unicode.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen3-VL's added tokens in id order (151643..151668 in the real vocabulary) and whether
# each is "special" (removed by skip_special_tokens). <think>/</think> are plain added tokens.
QWEN3_VL_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> Any:
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: str | os.PathLike):
    """A checkpoint directory -> `transformers.PreTrainedTokenizerFast` built from its `tokenizer.json`.

    Special tokens (eos, pad, ...) and the chat template come from `tokenizer_config.json`
    (or `chat_template.jinja` / `chat_template.json`) when present. Without a pad token,
    `<|endoftext|>` (Qwen's pad) is used if the vocabulary has it.
    """
    from transformers import PreTrainedTokenizerFast

    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file} not found; copy tokenizer.json and tokenizer_config.json from the HF checkpoint "
            "(e.g. Qwen/Qwen3-VL-4B-Instruct) into that directory, or make a demo tokenizer with "
            "vlcal_jax.processing.train_demo_tokenizer")
    config: dict[str, Any] = {}
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    kwargs = {key: _token_text(config[key]) for key in _SPECIAL_KEYS if config.get(key) is not None}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, list) and extra:
        kwargs["extra_special_tokens"] = [_token_text(token) for token in extra]
    backend = Tokenizer.from_file(file)
    if "pad_token" not in kwargs and backend.token_to_id("<|endoftext|>") is not None:
        kwargs["pad_token"] = "<|endoftext|>"
    chat_template = config.get("chat_template")
    if chat_template is None and os.path.isfile(os.path.join(path, "chat_template.jinja")):
        with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
            chat_template = f.read()
    if chat_template is None and os.path.isfile(os.path.join(path, "chat_template.json")):
        with open(os.path.join(path, "chat_template.json"), encoding="utf-8") as f:
            chat_template = json.load(f).get("chat_template")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, chat_template=chat_template, name_or_path=path,
        model_max_length=config.get("model_max_length", 262144), clean_up_tokenization_spaces=False,
        **kwargs)


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Trains a small Qwen-style byte-level BPE offline; saves it and returns `load_tokenizer(out_dir)`.

    Same normaliser (NFC), pre-tokeniser (Qwen regex + byte level) and decoder as Qwen3-VL;
    the learned vocabulary has at most `vocab_size` entries (256 bytes + merges) and Qwen3-VL's
    26 added tokens follow it, as they follow the BPE ids in the real vocabulary. Writes
    `tokenizer.json` and `tokenizer_config.json` (eos `<|im_end|>`, pad `<|endoftext|>`, the
    Qwen3-VL chat template), loadable by `transformers.AutoTokenizer.from_pretrained(out_dir)`.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} is below the 256 byte symbols; use at least 256")
    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for content, special in QWEN3_VL_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": [content for content, special in QWEN3_VL_ADDED_TOKENS[1:14]],
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 262144,
        "split_special_tokens": False,
        "chat_template": QWEN3_VL_CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(tokenizer.token_to_id(content)): {
                "content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": special}
            for content, special in QWEN3_VL_ADDED_TOKENS},
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return load_tokenizer(out_dir)


def _token_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    if isinstance(tokenizer, Tokenizer):
        return [encoding.ids for encoding in tokenizer.encode_batch(prompts, add_special_tokens=False)]
    return tokenizer(prompts, add_special_tokens=False)["input_ids"]


def _pad_id(tokenizer: Any) -> int:
    if isinstance(tokenizer, Tokenizer):
        pad_id = tokenizer.token_to_id("<|endoftext|>")
    else:
        pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = '<|endoftext|>' (Qwen's pad)")
    return int(pad_id)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], pad_to_bucket: tuple[int, ...] | None = None,
                   left_pad: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Rendered prompts -> (input_ids int32 [B, L], attention_mask int32 [B, L]).

    No special tokens are added (the chat template already holds them). L is the longest
    prompt, rounded up to the smallest bucket in `pad_to_bucket` that fits, so the number of
    compiled shapes stays small. Padding (the tokenizer's pad id, mask 0) goes on the left
    by default, which decoding needs. `tokenizer` is a transformers tokenizer or a
    `tokenizers.Tokenizer`.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode_prompts got no prompts")
    ids = _token_ids(tokenizer, prompts)
    lengths = [len(row) for row in ids]
    length = max(lengths)
    if pad_to_bucket:
        fitting = [bucket for bucket in sorted(pad_to_bucket) if bucket >= length]
        if not fitting:
            too_long = [i for i, n in enumerate(lengths) if n > max(pad_to_bucket)]
            raise ValueError(
                f"prompts {too_long[:10]} have {[lengths[i] for i in too_long[:10]]} tokens, more than the "
                f"largest bucket {max(pad_to_bucket)}; add a larger bucket, shrink max_pixels or drop them")
        length = fitting[0]
    input_ids = np.full((len(ids), length), _pad_id(tokenizer), dtype=np.int32)
    attention_mask = np.zeros((len(ids), length), dtype=np.int32)
    for row, tokens in enumerate(ids):
        start = length - len(tokens) if left_pad else 0
        input_ids[row, start:start + len(tokens)] = tokens
        attention_mask[row, start:start + len(tokens)] = 1
    return input_ids, attention_mask


def char_span_to_token_mask(offsets: Any, span: tuple[int, int]) -> np.ndarray:
    """Token character offsets [T, 2] and a character span [start, end) -> bool mask [T].

    A token is in the mask when its characters overlap the span; a zero-width token (e.g.
    an added token with offsets (p, p)) counts when start <= p < end. Used to map the
    `<vision>...</vision>` span of a decoded response to its tokens.
    """
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    start, end = int(span[0]), int(span[1])
    token_start = offsets[:, 0]
    token_end = np.maximum(offsets[:, 1], token_start + 1)
    return (token_start < end) & (token_end > start)
