"""Shared pieces of the evaluation-set adapters: finding files, rows, images, answers."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Callable, Iterator

from vlcal_jax.data.example import (
    IMAGE_PLACEHOLDER,
    Example,
    as_text,
    choice_letter,
    decode_image,
    decode_images,
    format_choices,
    renumbered_placeholders,
    with_image_placeholders,
)
from vlcal_jax.data.skips import BadRowError
from vlcal_jax.data.sources import FileRows

Row = tuple[str, "dict[str, Any] | BadRowError"]  # (where, record or why it is unreadable)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One evaluation set: where it is published, how it lies on disk, how to read it."""

    name: str
    title: str
    url: str
    layout: str                # what the directory must hold, for error messages
    default_split: str | None
    rows: Callable[["Context"], Iterator[Row]]
    convert: Callable[[dict[str, Any], "Context"], Example]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # adapter options


@dataclasses.dataclass(frozen=True)
class Context:
    benchmark: Benchmark
    root: str
    split: str | None
    options: dict[str, Any]

    def missing(self, what: str) -> FileNotFoundError:
        b = self.benchmark
        return FileNotFoundError(
            f"{b.title} ({b.name}): {what} under {self.root}. It is published at {b.url}; "
            f"download it and put it at {self.root} so that it holds {b.layout}")

    def files(self, *patterns: str) -> list[str]:
        """Files matching the first of the glob patterns (relative to root) that matches any."""
        for pattern in patterns:
            found = sorted(glob.glob(os.path.join(glob.escape(self.root), pattern)))
            if found:
                return found
        raise self.missing(f"no file matching {' or '.join(patterns)}")


def file_rows(files: list[str]) -> Iterator[Row]:
    """Rows of parquet / JSONL files."""
    rows = FileRows(files)
    for index in range(len(rows)):
        try:
            yield rows.where(index), rows.row(index)
        except BadRowError as error:
            yield rows.where(index), error


def json_rows(path: str, records_key: str | None = None) -> Iterator[Row]:
    """Rows of a JSON file holding a list of records, a {id: record} dict, or {key: list}."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if records_key is not None:
        data = data[records_key]
    if isinstance(data, dict):
        data = [{"_key": key, **value} if isinstance(value, dict) else value
                for key, value in data.items()]
    for index, record in enumerate(data):
        where = f"{path} record {index}"
        if isinstance(record, dict):
            yield where, record
        else:
            yield where, BadRowError("bad_record", f"a JSON {type(record).__name__}, not an object")


def image_at(ctx: Context, value: Any, subdirs: tuple[str, ...] = ("", "images")):
    """Decodes an image; a relative path is looked up under root/<subdir> for each subdir."""
    if isinstance(value, str) and not os.path.isabs(value):
        candidates = [os.path.join(ctx.root, subdir, value) for subdir in subdirs]
        value = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    return decode_image(value)


def first_image(record: dict[str, Any], *keys: str):
    """The first non-empty value among the keys (e.g. decoded_image before image)."""
    for key in keys:
        value = record.get(key)
        if value is not None and value != "" and value != {}:
            return value
    raise BadRowError("missing_image", f"no image in {keys}")


def text(record: dict[str, Any], key: str, reason: str = "missing_prompt") -> str:
    value = as_text(record.get(key), key)
    if value is None or not value.strip():
        raise BadRowError(reason, f"no {key!r}")
    return value.strip()


def answer(record: dict[str, Any], key: str) -> str:
    return text(record, key, reason="missing_answer")


def unboxed(value: str) -> str:
    """`\\boxed{x}` -> `x` when the whole answer is one box (ViRL-39K writes them so)."""
    match = re.fullmatch(r"\s*\\boxed\{(.*)\}\s*", value, re.DOTALL)
    return match.group(1).strip() if match else value


def infer_answer_type(gold: str) -> str:
    if re.fullmatch(r"[A-J](\s*,\s*[A-J])*", gold):
        return "multiple_choice"
    if re.fullmatch(r"[-+]?\d+", gold):
        return "integer"
    if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)", gold):
        return "float"
    if gold.lower() in ("yes", "no"):
        return "yes_no"
    return "free_form"


def letters(gold: str) -> str:
    """"A, C" / "(A)" / "a" -> "A,C" / "A" / "A"."""
    found = re.findall(r"\b([A-Za-z])\b", gold)
    if not found:
        raise BadRowError("missing_answer", f"answer {gold!r} names no option letter")
    return ",".join(letter.upper() for letter in found)


def letter_of(choices: list[str], gold: str) -> str:
    """The letter of the choice equal to the gold text (MathVista stores the text)."""
    stripped = [str(c).strip() for c in choices]
    if gold.strip() in stripped:
        return choice_letter(stripped.index(gold.strip()))
    if re.fullmatch(r"[A-Z]", gold.strip()) and ord(gold.strip()) - 65 < len(choices):
        return gold.strip()
    raise BadRowError("bad_record", f"answer {gold!r} is none of the choices {choices}")


def make_example(ctx: Context, key: Any, question: str, images: list, gold: str,
                 answer_type: str, *, choices: list[str] | None = None, category: str = "",
                 meta: dict[str, Any] | None = None, image_tag: str | None = None) -> Example:
    """The common schema: choices written into the question, one `<image>` per image.

    `image_tag`: a regex with one group (the image number) for sets that number their
    image tags (`<image1>`, `<image 2>`); such tags become `<image>`.
    """
    if choices:
        question = format_choices(question, choices)
    if image_tag is not None:
        question, _ = renumbered_placeholders(question, image_tag)
    question = with_image_placeholders(question, len(images))
    return Example(id=f"{ctx.benchmark.name}/{key}", question=question, images=images,
                   answer=gold, choices=list(choices) if choices else None,
                   answer_type=answer_type, category=category,
                   meta={"benchmark": ctx.benchmark.name, "split": ctx.split, **(meta or {})})


__all__ = [
    "IMAGE_PLACEHOLDER", "Benchmark", "Context", "answer", "decode_images", "first_image",
    "image_at", "infer_answer_type", "json_rows", "letter_of", "letters", "make_example",
    "file_rows", "text", "unboxed", "renumbered_placeholders",
]
