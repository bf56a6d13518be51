"""Adapters of the math evaluation sets (PAPER.md section 7): DynaMath, Geometry3K,
MathVerse (and its vision-only version), MathVision, MathVista, WeMath."""

from __future__ import annotations

import ast
import json
import os
import re
from typing import Any, Iterator

from vlcal_jax.data._bench_common import (
    Benchmark,
    Context,
    Row,
    answer,
    first_image,
    image_at,
    json_rows,
    letter_of,
    letters,
    make_example,
    file_rows,
    text,
)
from vlcal_jax.data.example import as_text
from vlcal_jax.data.skips import BadRowError


# ---- DynaMath ---------------------------------------------------------------------------
def _dynamath_rows(ctx: Context) -> Iterator[Row]:
    """DynaMath/DynaMath_Sample on Hugging Face: one parquet per variant,
    `data/sample_variant{1..10}-*.parquet`, columns id, question (options written in it),
    image (file name), decoded_image ({bytes, path}), ground_truth, answer_type
    ("multiple choice" | "float" | "text"), subject, knowledge_level. Option
    `variants=(1, ..., 10)` picks variants (default all found)."""
    files = ctx.files("data/sample_variant*.parquet", "sample_variant*.parquet")
    variants = ctx.options.get("variants")
    for path in files:
        variant = int(re.search(r"sample_variant(\d+)", os.path.basename(path)).group(1))
        if variants is not None and variant not in variants:
            continue
        for where, record in file_rows([path]):
            if isinstance(record, dict):
                record["_variant"] = variant
            yield where, record


_DYNAMATH_TYPES = {"multiple choice": "multiple_choice", "float": "float", "text": "text"}


def _dynamath_example(record: dict[str, Any], ctx: Context):
    gold = answer(record, "ground_truth")
    answer_type = _DYNAMATH_TYPES.get(str(record.get("answer_type")), "free_form")
    if answer_type == "multiple_choice":
        gold = letters(gold)
    image = image_at(ctx, first_image(record, "decoded_image", "image"))
    return make_example(ctx, f"{record.get('id')}/v{record['_variant']}", text(record, "question"),
                        [image], gold, answer_type, category=str(record.get("subject") or ""),
                        meta={"variant": record["_variant"],
                              "knowledge_level": record.get("knowledge_level")})


DYNAMATH = Benchmark(
    "dynamath", "DynaMath", "https://huggingface.co/datasets/DynaMath/DynaMath_Sample",
    "data/sample_variant{1..10}-*.parquet", None, _dynamath_rows, _dynamath_example)


# ---- Geometry3K ---------------------------------------------------------------------------
def _geometry3k_rows(ctx: Context) -> Iterator[Row]:
    """Geometry3K as released with InterGPS (lupantech/InterGPS, data/geometry3k): one
    folder per problem, `{split}/{id}/data.json` + `{split}/{id}/img_diagram.png`;
    data.json has id, problem_text, choices (4), answer (a letter), problem_type_goal."""
    files = ctx.files(f"{ctx.split}/*/data.json", f"geometry3k/{ctx.split}/*/data.json")
    for path in sorted(files, key=lambda p: int(re.sub(r"\D", "", os.path.basename(
        os.path.dirname(p))) or 0)):
        try:
            with open(path, encoding="utf-8") as handle:
                record = json.load(handle)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            yield path, BadRowError("bad_record", str(error))
            continue
        record["_dir"] = os.path.dirname(path)
        yield path, record


def _geometry3k_example(record: dict[str, Any], ctx: Context):
    choices = [str(c) for c in record.get("choices") or []]
    image = image_at(ctx, os.path.join(record["_dir"], "img_diagram.png"))
    goal = record.get("problem_type_goal") or []
    return make_example(ctx, record.get("id", os.path.basename(record["_dir"])),
                        text(record, "problem_text"), [image], letters(answer(record, "answer")),
                        "multiple_choice", choices=choices, category=",".join(goal),
                        meta={"problem_type_graph": record.get("problem_type_graph")})


GEOMETRY3K = Benchmark(
    "geometry3k", "Geometry3K", "https://github.com/lupantech/InterGPS (data/geometry3k)",
    "{train,val,test}/<id>/data.json and img_diagram.png", "test", _geometry3k_rows,
    _geometry3k_example)


# ---- MathVerse ---------------------------------------------------------------------------
def _mathverse_rows(ctx: Context) -> Iterator[Row]:
    """AI4Math/MathVerse: `testmini.json` (a list of records) with the images under the
    same directory (`images/...` as the record's `image` names them), or the parquet
    release (`testmini/*.parquet`, `image` a {bytes, path} dict). Fields: sample_index,
    problem_index, problem_version ("Text Dominant", "Text Lite", "Vision Intensive",
    "Vision Dominant", "Vision Only"), question (choices written in it; empty for Vision
    Only), image, answer (a letter for multi-choice), question_type ("multi-choice" |
    "free-form"), metadata {split, source, subject, subfield}, query_wo, query_cot."""
    try:
        (path,) = ctx.files(f"{ctx.split}.json")
        rows = json_rows(path)
    except FileNotFoundError:
        rows = file_rows(ctx.files(f"{ctx.split}/*.parquet", f"data/{ctx.split}-*.parquet"))
    only = ctx.options["versions"]
    for where, record in rows:
        if isinstance(record, dict) and (record.get("problem_version") in only) != ctx.options[
            "keep_versions"]:
            continue
        yield where, record


def _mathverse_example(record: dict[str, Any], ctx: Context):
    question = as_text(record.get("question"), "question") or ""
    if not question.strip():  # Vision Only: the question is in the image
        question = text(record, "query_wo")
    multi = record.get("question_type") == "multi-choice"
    gold = answer(record, "answer")
    metadata = record.get("metadata") or {}
    return make_example(ctx, record.get("sample_index"), question.strip(),
                        [image_at(ctx, first_image(record, "image"))],
                        letters(gold) if multi else gold,
                        "multiple_choice" if multi else "free_form",
                        category=str(metadata.get("subject") or ""),
                        meta={"problem_version": record.get("problem_version"),
                              "problem_index": record.get("problem_index"),
                              "subfield": metadata.get("subfield")})


_MATHVERSE_LAYOUT = "testmini.json and its images/ (or testmini/*.parquet)"
MATHVERSE = Benchmark(
    "mathverse", "MathVerse", "https://huggingface.co/datasets/AI4Math/MathVerse",
    _MATHVERSE_LAYOUT, "testmini", _mathverse_rows, _mathverse_example,
    {"versions": ("Vision Only",), "keep_versions": False})
MATHVERSE_VISION_ONLY = Benchmark(
    "mathverse_vision_only", "MathVerse (Vision Only)",
    "https://huggingface.co/datasets/AI4Math/MathVerse", _MATHVERSE_LAYOUT, "testmini",
    _mathverse_rows, _mathverse_example, {"versions": ("Vision Only",), "keep_versions": True})


# ---- MathVision ---------------------------------------------------------------------------
def _mathvision_rows(ctx: Context) -> Iterator[Row]:
    """MathLLMs/MathVision: `data/{test,testmini}-*.parquet` with id, question (with
    `<image1>` tags), options (list, empty for free-form), image (path), decoded_image
    ({bytes, path}), answer (a letter when there are options), solution, level, subject.
    The GitHub release's `data/{split}.jsonl` + `images/` is read too."""
    try:
        yield from file_rows(ctx.files(f"data/{ctx.split}-*.parquet", f"{ctx.split}-*.parquet"))
    except FileNotFoundError:
        yield from file_rows(ctx.files(f"data/{ctx.split}.jsonl", f"{ctx.split}.jsonl"))


def _mathvision_example(record: dict[str, Any], ctx: Context):
    options = [str(o) for o in record.get("options") or []]
    gold = answer(record, "answer")
    image = image_at(ctx, first_image(record, "decoded_image", "image"))
    return make_example(ctx, record.get("id"), text(record, "question"), [image],
                        letters(gold) if options else gold,
                        "multiple_choice" if options else "free_form", choices=options,
                        category=str(record.get("subject") or ""),
                        meta={"level": record.get("level")}, image_tag=r"<image\s*(\d+)>")


MATHVISION = Benchmark(
    "mathvision", "MathVision", "https://huggingface.co/datasets/MathLLMs/MathVision",
    "data/{test,testmini}-*.parquet", "test", _mathvision_rows, _mathvision_example)


# ---- MathVista ---------------------------------------------------------------------------
def _mathvista_rows(ctx: Context) -> Iterator[Row]:
    """AI4Math/MathVista: `data/testmini-*.parquet` with pid, question, image (path),
    decoded_image ({bytes, path}), choices (list or null), unit, precision, answer (the
    choice TEXT for multi_choice), question_type ("multi_choice" | "free_form"),
    answer_type ("integer" | "float" | "text" | "list"), metadata, query. The GitHub
    release's `data/testmini.json` ({pid: record}) + `data/images/` is read too."""
    try:
        yield from file_rows(ctx.files(f"data/{ctx.split}-*.parquet", f"{ctx.split}-*.parquet"))
    except FileNotFoundError:
        for path in ctx.files(f"data/{ctx.split}.json", f"{ctx.split}.json"):
            yield from json_rows(path)


def _mathvista_example(record: dict[str, Any], ctx: Context):
    choices = record.get("choices")
    if isinstance(choices, str):
        choices = ast.literal_eval(choices)
    choices = [str(c) for c in choices or []]
    gold = answer(record, "answer")
    multi = record.get("question_type") == "multi_choice" and choices
    answer_type = "multiple_choice" if multi else str(record.get("answer_type") or "free_form")
    image = image_at(ctx, first_image(record, "decoded_image", "image"), ("", "data"))
    metadata = record.get("metadata") or {}
    return make_example(ctx, record.get("pid", record.get("_key")), text(record, "question"),
                        [image], letter_of(choices, gold) if multi else gold, answer_type,
                        choices=choices if multi else None,
                        category=str(metadata.get("category") or ""),
                        meta={"answer_text": gold, "unit": record.get("unit"),
                              "precision": record.get("precision"),
                              "task": metadata.get("task"), "skills": metadata.get("skills")})


MATHVISTA = Benchmark(
    "mathvista", "MathVista", "https://huggingface.co/datasets/AI4Math/MathVista",
    "data/testmini-*.parquet (or data/testmini.json + data/images/)", "testmini",
    _mathvista_rows, _mathvista_example)


# ---- WeMath ---------------------------------------------------------------------------
def _wemath_rows(ctx: Context) -> Iterator[Row]:
    """We-Math/We-Math: `testmini.json`, a list of records with ID, split, "knowledge
    concept", question, option ("A. ...; B. ...; E. No correct answer"), answer (a letter),
    image_path (relative to the directory, or to its image/ or images/ folder), key,
    "question number"."""
    for path in ctx.files(f"{ctx.split}.json"):
        yield from json_rows(path)


def _wemath_example(record: dict[str, Any], ctx: Context):
    options = as_text(record.get("option"), "option") or ""
    choices = [re.sub(r"^[A-Z]\.\s*", "", part.strip())
               for part in re.split(r";\s*(?=[A-Z]\.)", options) if part.strip()]
    image = image_at(ctx, first_image(record, "image_path"), ("", "image", "images"))
    return make_example(ctx, record.get("ID"), text(record, "question"), [image],
                        letters(answer(record, "answer")), "multiple_choice", choices=choices,
                        category=str(record.get("knowledge concept") or ""),
                        meta={"key": record.get("key"),
                              "question_number": record.get("question number")})


WEMATH = Benchmark(
    "wemath", "WeMath", "https://huggingface.co/datasets/We-Math/We-Math",
    "testmini.json and the images its image_path names", "testmini", _wemath_rows,
    _wemath_example)
