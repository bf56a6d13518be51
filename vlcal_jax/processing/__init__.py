"""Images -> patches + grid (HF-identical), chat prompts, tokenizer glue."""

from vlcal_jax.processing.chat_template import QWEN3_VL_CHAT_TEMPLATE
from vlcal_jax.processing.image_config import ImageProcessorConfig, resolve_image_config
from vlcal_jax.processing.images import load_rgb, num_image_tokens, preprocess_images, smart_resize
from vlcal_jax.processing.patches import images_to_patches, patches_to_images
from vlcal_jax.processing.prompts import (
    DECOUPLED_INSTRUCTION,
    INSTRUCTIONS,
    PLAIN_INSTRUCTION,
    RLCR_INSTRUCTION,
    build_chat,
    format_question,
    render_prompt,
)
from vlcal_jax.processing.tokenizer import (
    QWEN3_VL_ADDED_TOKENS,
    char_span_to_token_mask,
    encode_prompts,
    load_tokenizer,
    train_demo_tokenizer,
)

__all__ = [
    "DECOUPLED_INSTRUCTION",
    "INSTRUCTIONS",
    "ImageProcessorConfig",
    "PLAIN_INSTRUCTION",
    "QWEN3_VL_ADDED_TOKENS",
    "QWEN3_VL_CHAT_TEMPLATE",
    "RLCR_INSTRUCTION",
    "build_chat",
    "char_span_to_token_mask",
    "encode_prompts",
    "format_question",
    "images_to_patches",
    "load_rgb",
    "load_tokenizer",
    "num_image_tokens",
    "patches_to_images",
    "preprocess_images",
    "render_prompt",
    "resolve_image_config",
    "smart_resize",
    "train_demo_tokenizer",
]
