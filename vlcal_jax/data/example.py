"""The host-side example every data source yields, and the helpers that build one.

An `Example` is what the rest of vlcal_jax consumes: the question in EasyR1 form (one
`<image>` placeholder per image, choices already written into the text), the decoded
images, the gold answer and how to grade it. Images become patches and the question
becomes tokens later, in `vlcal_jax.processing`.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

from vlcal_jax.data.skips import BadRowError

IMAGE_PLACEHOLDER = "<image>"

# How the answer is graded. "multiple_choice" golds are option letters ("A", or "A,C").
ANSWER_TYPES = ("multiple_choice", "integer", "float", "yes_no", "text", "list", "free_form")

_CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass
class Example:
    """One question about zero or more images, with its gold answer."""

    id: str
    question: str
    images: list[Image.Image]
    answer: str
    choices: list[str] | None = None
    answer_type: str = "free_form"
    category: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def choice_letter(index: int) -> str:
    """0 -> "A", 1 -> "B", ..."""
    return _CHOICE_LETTERS[index]


def format_choices(question: str, choices: Sequence[str]) -> str:
    """Appends the options to the question as "Choices:\\nA. ...\\nB. ...", one per line."""
    lines = [f"{choice_letter(i)}. {choice}" for i, choice in enumerate(choices)]
    return question.rstrip() + "\nChoices:\n" + "\n".join(lines)


def with_image_placeholders(question: str, num_images: int) -> str:
    """Returns the question with exactly one `<image>` per image, in EasyR1's convention.

    A question that names no image gets the placeholders prepended (how EasyR1 data lays
    out single-image rows). A question whose placeholder count differs from the number of
    images cannot be paired with them, and the row is rejected.
    """
    count = question.count(IMAGE_PLACEHOLDER)
    if count == num_images:
        return question
    if count == 0:
        return IMAGE_PLACEHOLDER * num_images + question
    raise BadRowError(
        "image_placeholder_mismatch",
        f"the question has {count} '<image>' placeholders but the row has {num_images} images")


def renumbered_placeholders(text: str, pattern: str) -> tuple[str, list[int]]:
    """Replaces numbered image tags (e.g. `<image 2>`, `<image2>`) with `<image>`.

    `pattern` is a regex with one group capturing the image number. Returns the new text
    and the image numbers in order of appearance, so the caller can order its images.
    """
    numbers = [int(m) for m in re.findall(pattern, text)]
    return re.sub(pattern, IMAGE_PLACEHOLDER, text), numbers


def as_text(value: Any, what: str) -> str | None:
    """A field as `str`: bytes are decoded as strict UTF-8; None stays None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRowError("undecodable_text", f"{what} is not UTF-8: {error}") from None
    if isinstance(value, float) and value != value:  # NaN from pandas-written parquet
        return None
    return str(value)


def decode_image(value: Any, image_dir: str | os.PathLike | None = None) -> Image.Image:
    """Decodes one image given in any of the forms the data files use.

    Forms: a path (absolute, or relative to `image_dir`); raw encoded bytes; a Hugging Face
    `{"bytes": ..., "path": ...}` dict (bytes first, path if bytes are empty); a decoded
    `[H, W, C]` or `[H, W]` uint8 array (TFDS); a PIL image. The result is RGB and fully
    loaded, so a truncated file fails here and not later in a batch.

    Raises BadRowError("missing_image") when no image is there and
    BadRowError("corrupt_image") when what is there does not decode.
    """
    if isinstance(value, Image.Image):
        return _loaded_rgb(value, "PIL image")
    if isinstance(value, np.ndarray):
        try:
            image = Image.fromarray(np.asarray(value, np.uint8).squeeze())
        except (TypeError, ValueError) as error:
            raise BadRowError("corrupt_image", f"array of shape {value.shape}: {error}") from None
        return _loaded_rgb(image, f"array of shape {value.shape}")
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(bytes(value["bytes"]), image_dir)
        if value.get("path"):
            return decode_image(str(value["path"]), image_dir)
        raise BadRowError("missing_image", "image dict has neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not value:
            raise BadRowError("missing_image", "empty image bytes")
        return _open_checked(io.BytesIO(bytes(value)), f"{len(value)} image bytes")
    if isinstance(value, (str, os.PathLike)):
        if not os.fspath(value):
            raise BadRowError("missing_image", "empty image path")
        path = os.path.join(image_dir, value) if image_dir is not None else os.fspath(value)
        if not os.path.isfile(path):
            raise BadRowError("missing_image", f"no image file at {path}")
        return _open_checked(path, path)
    if value is None:
        raise BadRowError("missing_image", "image is null")
    raise BadRowError("corrupt_image", f"unsupported image value of type {type(value).__name__}")


def decode_images(value: Any, image_dir: str | os.PathLike | None = None) -> list[Image.Image]:
    """Decodes a row's image field: None -> [], one image -> [it], a list -> each of them."""
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = list(value)
    if isinstance(value, (list, tuple)):
        return [decode_image(item, image_dir) for item in value]
    if isinstance(value, np.ndarray) and value.ndim == 4:  # TFDS Sequence(Image): [N, H, W, C]
        return [decode_image(item) for item in value]
    return [decode_image(value, image_dir)]


def _open_checked(source: Any, what: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            return _loaded_rgb(image, what)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise BadRowError("corrupt_image", f"{what} does not decode: {error}") from None


def _loaded_rgb(image: Image.Image, what: str) -> Image.Image:
    try:
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image.copy()
    except (OSError, ValueError) as error:
        raise BadRowError("corrupt_image", f"{what} does not decode: {error}") from None
