"""Host side of a rollout: examples -> prompt batch, responses -> texts, vision masks, rewards.

Everything numeric on the device lives in `sampling` and `rl.step`; this module only turns
data into padded arrays and model text into per-token masks and per-response rewards.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Sequence

import numpy as np

from vlcal_jax import models, processing
from vlcal_jax.models.config import ModelConfig
from vlcal_jax.rl import format as rformat
from vlcal_jax.rl import certainty, grpo, rewards


@dataclasses.dataclass
class PromptBatch:
    """B prompts ready for the device: `inputs` (ModelInputs, left-padded to a length bucket),
    and the examples they came from (gold answers, choices, scene ground truth)."""

    examples: list
    inputs: models.ModelInputs
    texts: list[str]


def encode_examples(examples: Sequence, tokenizer, config: ModelConfig, image_config, *, mode: str = "decoupled",
                    length_buckets: Sequence[int] = (64, 128, 256, 512, 1024, 2048, 4096),
                    patch_bucket: int | None = None, num_images: int | None = None,
                    same_shapes_everywhere: bool = False) -> PromptBatch:
    """Examples (question with `<image>` placeholders, PIL images) -> a PromptBatch. `mode`
    picks the instruction (processing.INSTRUCTIONS: decoupled, decoupled_short, rlcr, plain, ...),
    one for every example, or a sequence of them, one per example.

    `same_shapes_everywhere`: in a multi-process run, this process's share of a global batch,
    padded to the length, patch and image buckets of the largest share (every process must
    give the same shapes to make one global array); a no-op with one process."""
    batch = _encode_examples(examples, tokenizer, config, image_config, mode=mode, length_buckets=length_buckets,
                             patch_bucket=patch_bucket, num_images=num_images)
    if not same_shapes_everywhere:
        return batch
    from vlcal_jax.parallel import multihost

    vis = batch.inputs.vision
    mine = (batch.inputs.input_ids.shape[1],) + ((0, 0) if vis is None else vis.pixel_values.shape[:2][::-1])
    agreed = multihost.agree_max(*mine)
    if agreed == mine:
        return batch
    return _encode_examples(examples, tokenizer, config, image_config, mode=mode, length_buckets=(agreed[0],),
                            patch_bucket=agreed[1] or None, num_images=agreed[2] or None)


def _encode_examples(examples, tokenizer, config, image_config, *, mode, length_buckets, patch_bucket, num_images):
    """encode_examples for one set of buckets."""
    merge = config.vision.spatial_merge_size
    texts, all_images, grids = [], [], []
    modes = [mode] * len(examples) if isinstance(mode, str) else list(mode)
    if len(modes) != len(examples):
        raise ValueError(f"{len(modes)} prompt modes for {len(examples)} examples; give one mode, or one each")
    for ex, mode in zip(examples, modes):
        if ex.images:
            _, grid = processing.preprocess_images(list(ex.images), image_config)
        else:
            grid = np.zeros((0, 3), np.int64)
        messages = processing.build_chat(ex.question, len(ex.images), mode=mode)
        texts.append(processing.render_prompt(messages, grid, merge))
        all_images.extend(ex.images)
        grids.append(grid)
    ids, mask = processing.encode_prompts(tokenizer, texts, pad_to_bucket=tuple(length_buckets))
    pixel_values = grid = None
    if all_images:
        pixel_values, grid = processing.preprocess_images(all_images, image_config)
    inputs = models.prepare_inputs(config, ids, mask, pixel_values, grid, patch_bucket=patch_bucket,
                                   num_images=num_images)
    return PromptBatch(list(examples), inputs, texts)


def expand_for_responses(prompts: models.ModelInputs, tokens, lengths, n: int) -> models.ModelInputs:
    """Prompt rows [B, Tp] + responses [B*n, M] -> teacher-forcing rows [B*n, Tp + M]. Rows of a
    prompt are adjacent and share its images (image_index repeats, the tower runs once)."""
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths)
    m = tokens.shape[1]
    rep = functools.partial(np.repeat, repeats=n, axis=0)
    response_mask = (np.arange(m)[None] < lengths[:, None]).astype(np.int32)
    next_position = rep(np.asarray(prompts.next_position))
    response_pos = next_position[:, None] + np.arange(m)[None]
    positions = np.concatenate([np.repeat(np.asarray(prompts.position_ids), n, axis=1),
                                np.broadcast_to(response_pos[None], (3,) + response_pos.shape)], axis=2)
    return models.ModelInputs(
        input_ids=np.concatenate([rep(np.asarray(prompts.input_ids)), tokens], axis=1),
        attention_mask=np.concatenate([rep(np.asarray(prompts.attention_mask)), response_mask], axis=1),
        position_ids=positions.astype(np.int32),
        next_position=(next_position + m).astype(np.int32),
        image_index=np.concatenate([rep(np.asarray(prompts.image_index)), np.zeros_like(tokens)], axis=1),
        vision=prompts.vision,
    )


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode, used by byte-level BPE (Qwen's tokenizer)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes(tokenizer, ids: Sequence[int]) -> list[bytes]:
    """The exact bytes each token contributes to the decoded text (byte-level BPE)."""
    decoder = _byte_decoder()
    added = {int(k): v.content for k, v in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    pieces = tokenizer.convert_ids_to_tokens([int(i) for i in ids])
    out = []
    for token_id, piece in zip(ids, pieces):
        if int(token_id) in added or piece is None:
            out.append((added.get(int(token_id)) or "").encode("utf-8"))
        elif all(ch in decoder for ch in piece):
            out.append(bytes(decoder[ch] for ch in piece))
        else:
            out.append(piece.encode("utf-8"))
    return out


def decode_with_char_starts(data: bytes) -> tuple[str, np.ndarray]:
    """UTF-8 bytes -> (text, starts [len(text) + 1]): the text decoded with errors="replace" and
    the byte where each of its characters starts, then len(data).

    Every maximal invalid byte sequence becomes one U+FFFD (as errors="replace" decodes it), so
    a character's bytes are starts[i]:starts[i + 1] even after invalid bytes, which re-encoding
    the text cannot tell (U+FFFD re-encodes to 3 bytes whatever it replaced)."""
    pieces, starts, position = [], [], 0
    while True:
        try:
            valid, invalid = data[position:].decode("utf-8"), None
        except UnicodeDecodeError as error:
            valid = data[position : position + error.start].decode("utf-8")
            invalid = (position + error.start, position + error.end)
        for char in valid:
            starts.append(position)
            position += len(char.encode("utf-8"))
        pieces.append(valid)
        if invalid is None:
            break
        pieces.append("\ufffd")
        starts.append(invalid[0])
        position = invalid[1]
    starts.append(len(data))
    return "".join(pieces), np.asarray(starts, np.int64)


def decode_with_offsets(tokenizer, ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """Response ids [M] -> (text, offsets [M, 2]): each token's character range [start, end) in
    text (decoded with errors="replace"). A character whose bytes are split over several tokens
    lies in the range of each of them; a token without bytes gets an empty range."""
    pieces = token_bytes(tokenizer, ids)
    text, char_starts = decode_with_char_starts(b"".join(pieces))
    byte_ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    byte_starts = byte_ends - np.asarray([len(p) for p in pieces], np.int64)
    first = np.searchsorted(char_starts[1:], byte_starts, side="right")  # first char ending after the start
    stop = np.searchsorted(char_starts[:-1], byte_ends, side="left")  # chars starting before the end
    return text, np.stack([first, np.maximum(stop, first)], -1).astype(np.int64)


def vision_token_mask(text: str, offsets: np.ndarray, mode: str = "decoupled") -> tuple[np.ndarray, object]:
    """Tokens [M] whose characters (offsets [M, 2] from `decode_with_offsets`) overlap the
    `<vision>` content, and the parsed response. All False when there is no (or an empty) span."""
    parsed = rformat.parse_response(text, mode=mode)
    mask = np.zeros(len(offsets), bool)
    if parsed.vision_char_span is not None and len(offsets):
        mask = processing.char_span_to_token_mask(offsets, parsed.vision_char_span)
    return mask, parsed


def decode_responses(tokenizer, tokens, lengths, mode: str = "decoupled"):
    """-> (texts [N], vision_mask bool [N, M], parsed responses [N])."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    texts, masks, parsed = [], np.zeros(tokens.shape, bool), []
    for row in range(tokens.shape[0]):
        text, offsets = decode_with_offsets(tokenizer, tokens[row, :lengths[row]])
        mask, p = vision_token_mask(text, offsets, mode)
        masks[row, :lengths[row]] = mask
        texts.append(text)
        parsed.append(p)
    return texts, masks, parsed


def after_answer_mask(tokenizer, tokens, lengths, mode: str = "decoupled") -> np.ndarray:
    """Response tokens [N, M] that lie wholly after the graded answer (`ParsedResponse.answer_char_end`:
    the analysis, the confidences, the end of text): the tokens that cannot change whether the
    answer is right. All False for a response without a closed `\\boxed{}`."""
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    mask = np.zeros(tokens.shape, bool)
    for row in range(tokens.shape[0]):
        text, offsets = decode_with_offsets(tokenizer, tokens[row, :lengths[row]])
        end = rformat.parse_response(text, mode=mode).answer_char_end
        if end is not None and len(offsets):
            mask[row, :lengths[row]] = offsets[:, 0] >= end
    return mask


_SCORE_TAGS = {"decoupled": ("vision_confidence", "reasoning_confidence"), "rlcr": ("confidence",), "plain": ()}


def score_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids of the ten digit tokens "0".."9" with which a score is written; an error when the
    tokenizer does not write a digit as one token of its own (rl.score_lr_scale, rl.score_level_split
    and vlcal_jax.readout need one row per digit)."""
    ids = []
    for digit in "0123456789":
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"the tokenizer writes the digit {digit!r} as {encoded}, not one token; "
                             "rl.score_lr_scale, rl.score_level_split and vlcal_jax.readout need one token per digit")
        ids.append(int(encoded[0]))
    return tuple(ids)


def confidence_token_mask(tokenizer, tokens, lengths, mode: str = "decoupled") -> np.ndarray:
    """Response tokens [N, M] that hold the first character of a stated score (the content of
    `<vision_confidence>` and `<reasoning_confidence>`, or RLCR's `<confidence>`): the tokens
    that choose the confidence. Whitespace inside the tags is allowed, as the parser allows it."""
    if mode not in _SCORE_TAGS:
        raise ValueError(f"mode={mode!r}; use one of {sorted(_SCORE_TAGS)}")
    patterns = [re.compile(rf"<\s*{tag}\s*>\s*([^\s<])") for tag in _SCORE_TAGS[mode]]
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    mask = np.zeros(tokens.shape, bool)
    for row in range(tokens.shape[0]):
        if not patterns:
            break
        text, offsets = decode_with_offsets(tokenizer, tokens[row, :lengths[row]])
        for pattern in patterns:
            for match in pattern.finditer(text):
                start = match.start(1)
                mask[row, :lengths[row]] |= (offsets[:, 0] <= start) & (offsets[:, 1] > start)
    return mask


_SCORE_VALUE = re.compile(r"\d+(?:\.\d+)?|[^\s<]")


def score_counterfactuals(tokenizer, tokens, lengths, mode: str = "decoupled", digits: str = "0123456789"):
    """Each response rewritten with one of its stated scores replaced by each digit
    (rl.score_expectation): the rewards of these texts are what the response would have earned had
    it stated that digit there and closed the tag.

    tokens [N, M], lengths [N] -> (positions int32 [N, J]: the response token that holds the first
    character of score j, the first occurrence of each tag of `mode` (J = 2 for "decoupled", 1 for
    "rlcr"; -1 where the response states none); texts [N]: the responses as decoded here;
    counterfactual [J][len(digits)] lists of N texts: score j's whole number replaced by the digit,
    the response unchanged where it states no score j)."""
    if mode not in _SCORE_TAGS:
        raise ValueError(f"mode={mode!r}; use one of {sorted(_SCORE_TAGS)}")
    patterns = [re.compile(rf"<\s*{tag}\s*>\s*([^\s<])") for tag in _SCORE_TAGS[mode]]
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    positions = np.full((tokens.shape[0], len(patterns)), -1, np.int32)
    texts = []
    counterfactual = [[[] for _ in digits] for _ in patterns]
    for row in range(tokens.shape[0]):
        text, offsets = decode_with_offsets(tokenizer, tokens[row, :lengths[row]])
        texts.append(text)
        for j, pattern in enumerate(patterns):
            match = pattern.search(text)
            hit = None if match is None else np.flatnonzero((offsets[:, 0] <= match.start(1))
                                                            & (offsets[:, 1] > match.start(1)))
            if hit is None or not len(hit):
                for k in range(len(digits)):
                    counterfactual[j][k].append(text)
                continue
            positions[row, j] = hit[0]
            value = _SCORE_VALUE.match(text, match.start(1))
            for k, digit in enumerate(digits):
                counterfactual[j][k].append(text[:value.start()] + digit + text[value.end():])
    return positions, texts, counterfactual


def global_soft_labels(texts, vision_kl, vision_entropy) -> np.ndarray:
    """The soft labels S_vis [N] of this process's N responses, their z-score taken over every
    process's responses of the step (PAPER.md section 4: batch-wide statistics stay batch-wide);
    only the per-response statistics cross hosts. One process: `certainty.soft_labels` of the batch."""
    from vlcal_jax.parallel import multihost

    has_vision = np.array([rformat.parse_response(t, "decoupled").has_vision for t in texts], bool)
    kl, entropy = (multihost.allgather_rows(np.asarray(a, np.float64)) for a in (vision_kl, vision_entropy))
    labels = rewards.batch_soft_labels(kl, entropy, multihost.allgather_rows(has_vision))
    return multihost.local_rows(labels)


def response_vision_stats(token_stats: dict, vision_mask, variant: str = "paper") -> tuple[np.ndarray, np.ndarray]:
    """D_KL and H of PAPER.md section 4: each response's means over its vision-span tokens.

    token_stats: the [N, M] statistics of `step.score`; vision_mask [N, M] -> (kl [N],
    entropy [N]), NaN where a response has no vision token. variant "paper": the exact
    full-vocabulary KL(p || q) and entropy H(p); "released": the authors' sampled-token
    proxies p(o_t) clamp(log p - log q, -20, 20) and -log p(o_t) (certainty.SOFT_LABEL_VARIANTS).
    """
    if variant not in certainty.SOFT_LABEL_VARIANTS:
        raise ValueError(f"unknown soft-label variant {variant!r}; "
                         f"choose one of {sorted(certainty.SOFT_LABEL_VARIANTS)}")
    kl_key, h_key = certainty.SOFT_LABEL_VARIANTS[variant]
    mask = np.asarray(vision_mask, np.float64)
    count = mask.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        kl = (np.asarray(token_stats[kl_key], np.float64) * mask).sum(-1) / count
        h = (np.asarray(token_stats[h_key], np.float64) * mask).sum(-1) / count
    return np.where(count > 0, kl, np.nan), np.where(count > 0, h, np.nan)


def score_rewards(texts, examples, n: int, *, reward: str = "vl_calibration", vision_kl=None, vision_entropy=None,
                  soft_label=None, **weights) -> dict[str, np.ndarray]:
    """Rewards of N = len(examples) * n responses (PAPER.md section 3) and GRPO advantages
    (groups of n adjacent responses: whole groups only). `soft_label` [N]: batch-wide soft
    labels computed elsewhere (over every process's responses), for the rewards that use them."""
    golds = [ex.answer for ex in examples for _ in range(n)]
    choices = [ex.choices for ex in examples for _ in range(n)]
    extra = {} if soft_label is None else {"soft_label": soft_label}
    out = rewards.get(reward)(list(texts), golds, choices=choices, vision_kl=vision_kl,
                              vision_entropy=vision_entropy, **extra, **weights)
    out["advantage"] = np.asarray(grpo.group_advantages(np.asarray(out["reward"], np.float32), n))
    return out
