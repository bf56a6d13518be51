"""Chat prompts: the output-format instructions (PAPER.md section 2) and Qwen3-VL rendering.

`build_chat` makes HF-style messages (what `apply_chat_template` takes); `render_prompt`
turns them into the exact text the Qwen3-VL-Instruct chat template produces, with each
image's `<|image_pad|>` already repeated once per merged patch, ready to tokenise.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from vlcal_jax.processing.images import num_image_tokens

IMAGE_PLACEHOLDER = "<image>"  # EasyR1 / ViRL-39K marks image positions in `problem` with it
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"

# PAPER.md section 2: perception inside <vision>, deduction inside <reasoning>, both inside
# <think>; then \boxed{}, <analysis>, and the two 0..10 scores inside <confidence>.
DECOUPLED_INSTRUCTION = (
    "You FIRST look at the image and think about the problem as an internal monologue, then give "
    "the final answer, then analyze how sure you are. The thinking MUST BE enclosed within "
    "<think> </think> tags and has two parts: what you see in the image, enclosed within "
    "<vision> </vision> tags, followed by your logical deduction from it, enclosed within "
    "<reasoning> </reasoning> tags. After </think>, the final answer MUST BE put in \\boxed{}. "
    "Then explain whether you are sure of your visual perception and of your reasoning, "
    "enclosed within <analysis> </analysis> tags. Finally, rate your confidence in your visual "
    "perception within <vision_confidence> </vision_confidence> tags and your confidence in "
    "your reasoning within <reasoning_confidence> </reasoning_confidence> tags, each a number "
    "from 0 to 10, both enclosed within <confidence> </confidence> tags. Use this format:\n"
    "<think>\n<vision> ... </vision>\n<reasoning> ... </reasoning>\n</think>\n"
    "\\boxed{...}\n<analysis> ... </analysis>\n<confidence>\n"
    "<vision_confidence> ... </vision_confidence>\n"
    "<reasoning_confidence> ... </reasoning_confidence>\n</confidence>"
)

# RLCR baseline: the same layout with one holistic 0..10 score.
RLCR_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue, then give the final "
    "answer, then analyze how sure you are. The reasoning process MUST BE enclosed within "
    "<think> </think> tags. After </think>, the final answer MUST BE put in \\boxed{}. Then "
    "explain whether you are sure of your answer, enclosed within <analysis> </analysis> tags. "
    "Finally, rate your confidence that the answer is correct as a number from 0 to 10, "
    "enclosed within <confidence> </confidence> tags. Use this format:\n"
    "<think> ... </think>\n\\boxed{...}\n<analysis> ... </analysis>\n<confidence> ... </confidence>"
)

# Plain RLVR baseline: EasyR1's math format prompt.
PLAIN_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The "
    "final answer MUST BE put in \\boxed{}."
)

# A compact decoupled instruction for small models trained from scratch (the CPU demo), whose
# prompts would otherwise be mostly instruction: same format, a few dozen tokens.
DECOUPLED_SHORT_INSTRUCTION = (
    "Answer as <think><vision>what you see</vision><reasoning>your deduction</reasoning></think> "
    "\\boxed{answer} <analysis>how sure you are</analysis><confidence><vision_confidence>0-10"
    "</vision_confidence><reasoning_confidence>0-10</reasoning_confidence></confidence>"
)

# Format selectors for models trained from scratch on one world (the CPU demo and the scene
# study): such a model learns a format from its warm start, not from reading an instruction, so
# the instruction only has to say which format; a few tokens keep prompts inside one short bucket.
DECOUPLED_TINY_INSTRUCTION = "Answer, then rate vision and reasoning confidence."
RLCR_TINY_INSTRUCTION = "Answer, then rate confidence."
PLAIN_TINY_INSTRUCTION = "Answer."
# the warm start's caption rows (sft.caption_steps / caption_fraction): the image alone, described
DESCRIBE_TINY_INSTRUCTION = "Describe the image."

INSTRUCTIONS = {"decoupled": DECOUPLED_INSTRUCTION, "decoupled_short": DECOUPLED_SHORT_INSTRUCTION,
                "rlcr": RLCR_INSTRUCTION, "plain": PLAIN_INSTRUCTION,
                "decoupled_tiny": DECOUPLED_TINY_INSTRUCTION, "rlcr_tiny": RLCR_TINY_INSTRUCTION,
                "plain_tiny": PLAIN_TINY_INSTRUCTION, "describe_tiny": DESCRIBE_TINY_INSTRUCTION}


def format_question(question: str, mode: str = "decoupled") -> str:
    """The user text: the question, a space, then the instruction of `mode` (EasyR1's layout)."""
    if mode not in INSTRUCTIONS:
        raise ValueError(f"unknown prompt mode {mode!r}; choose one of {sorted(INSTRUCTIONS)}")
    return f"{question.strip()} {INSTRUCTIONS[mode]}"


def build_chat(question: str, num_images: int, mode: str = "decoupled",
               system: str | None = None) -> list[dict[str, Any]]:
    """Question (+ instruction of `mode`) and `num_images` images -> HF chat messages.

    `<image>` placeholders in the question mark where the images go (their count must equal
    num_images); without placeholders the images come first. Qwen3-VL has no default system
    message, so there is none unless `system` is given.
    """
    text = format_question(question, mode)
    num_placeholders = text.count(IMAGE_PLACEHOLDER)
    content: list[dict[str, Any]] = []
    if num_placeholders:
        if num_placeholders != num_images:
            raise ValueError(
                f"question has {num_placeholders} {IMAGE_PLACEHOLDER} placeholders but {num_images} "
                f"images were given: {question[:80]!r}; fix the data row or pass the matching images")
        for index, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if index:
                content.append({"type": "image"})
            if piece:
                content.append({"type": "text", "text": piece})
    else:
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": content}]


def _is_image(item: dict[str, Any]) -> bool:
    return item.get("type") == "image" or "image" in item or "image_url" in item


def _image_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if message.get("role") != "user" or isinstance(content, str) or not content:
        return []
    return [item for item in content if _is_image(item)]


def _render_content(content: Any, role: str, token_counts: Iterator[int]) -> str:
    """Text of one message; in user messages each image becomes its expanded pad run."""
    if isinstance(content, str):
        return content
    pieces = []
    for item in content:
        if role == "user" and _is_image(item):
            pieces.append(VISION_START + IMAGE_PAD * next(token_counts) + VISION_END)
        elif role == "user" and (item.get("type") == "video" or "video" in item):
            raise ValueError("video content is not supported; pass images")
        elif "text" in item:
            pieces.append(item["text"])
    return "".join(pieces)


def render_prompt(messages: Sequence[dict[str, Any]], grid_thw_list: Any, merge_size: int,
                  add_generation_prompt: bool = True) -> str:
    """Messages -> the Qwen3-VL-Instruct chat-template text, image pads expanded.

    grid_thw_list: [n_images, 3], one row per image in message order; image i becomes
    `<|vision_start|>` + `<|image_pad|>` * (t*h*w // merge_size**2) + `<|vision_end|>`.
    Supports system (first message only), user and assistant messages with string or
    [{"type": "text"|"image", ...}] content, as the template does.
    """
    grids = np.asarray(grid_thw_list, dtype=np.int64).reshape(-1, 3)
    num_images = sum(len(_image_items(message)) for message in messages)
    if num_images != len(grids):
        raise ValueError(
            f"the messages hold {num_images} images but {len(grids)} grids were given; "
            "pass one image_grid_thw row per image")
    token_counts = iter(num_image_tokens(grids, merge_size).tolist())
    parts = []
    for position, message in enumerate(messages):
        role = message.get("role")
        if role == "system" and position != 0:
            raise ValueError(f"messages[{position}]: a system message must come first")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{position}]: role {role!r} is not supported (system, user, assistant)")
        text = _render_content(message.get("content", ""), role, token_counts)
        parts.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
