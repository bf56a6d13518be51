"""Adapters of the logic, vision-dominant and multi-discipline evaluation sets
(PAPER.md section 7): LogicVista, CLEVR, A-OKVQA, MMK12, MMMU-Pro, ViRL-39K."""

from __future__ import annotations

import ast
import os
from typing import Any, Iterator

from vlcal_jax.data._bench_common import (
    Benchmark,
    Context,
    Row,
    answer,
    file_rows,
    first_image,
    image_at,
    infer_answer_type,
    json_rows,
    letters,
    make_example,
    text,
    unboxed,
)
from vlcal_jax.data.example import (
    choice_letter,
    decode_image,
    format_choices,
    renumbered_placeholders,
)
from vlcal_jax.data.skips import BadRowError


# ---- LogicVista ---------------------------------------------------------------------------
def _logicvista_rows(ctx: Context) -> Iterator[Row]:
    """lscpku/LogicVista on Hugging Face: `data/test-*.parquet` with id, question (options
    written in it), answer (a letter, or letters "A, C"), reasoning, image ({bytes, path}),
    skill, broad_capability, specific_capability. The GitHub release
    (Yijia-Xiao/LogicVista) `data/dataset.json` ({id: {imagename, question, answer,
    reasoning, skill}}) with `data/images/` is read too."""
    try:
        yield from file_rows(ctx.files(f"data/{ctx.split}-*.parquet", f"{ctx.split}-*.parquet"))
    except FileNotFoundError:
        for path in ctx.files("data/dataset.json", "dataset.json"):
            yield from json_rows(path)


def _logicvista_example(record: dict[str, Any], ctx: Context):
    image = record.get("image") or record.get("imagename")
    image = image_at(ctx, image if image else first_image(record, "image"),
                     ("", "images", "data/images"))
    skill = record.get("skill")
    skill = ",".join(skill) if isinstance(skill, (list, tuple)) else str(skill or "")
    return make_example(ctx, record.get("id", record.get("_key")), text(record, "question"),
                        [image], letters(answer(record, "answer")), "multiple_choice",
                        category=skill, meta={"reasoning": record.get("reasoning")})


LOGICVISTA = Benchmark(
    "logicvista", "LogicVista", "https://huggingface.co/datasets/lscpku/LogicVista",
    "data/test-*.parquet (or data/dataset.json + data/images/)", "test", _logicvista_rows,
    _logicvista_example)


# ---- CLEVR ---------------------------------------------------------------------------
def _clevr_rows(ctx: Context) -> Iterator[Row]:
    """CLEVR v1.0 (Johnson et al. 2017; cs.stanford.edu/people/jcjohns/clevr):
    `questions/CLEVR_{split}_questions.json` = {"info", "questions": [{image_index,
    image_filename, question, answer, question_family_index, program, split}]} and
    `images/{split}/CLEVR_{split}_000000.png`. The test split has no answers."""
    for path in ctx.files(f"questions/CLEVR_{ctx.split}_questions.json",
                          f"CLEVR_v1.0/questions/CLEVR_{ctx.split}_questions.json"):
        yield from json_rows(path, records_key="questions")


def _clevr_example(record: dict[str, Any], ctx: Context):
    gold = answer(record, "answer")
    filename = text(record, "image_filename", reason="missing_image")
    image = image_at(ctx, os.path.join(ctx.split, filename),
                     ("images", "CLEVR_v1.0/images"))
    answer_type = infer_answer_type(gold)
    return make_example(ctx, record.get("question_index"), text(record, "question"), [image],
                        gold, "text" if answer_type == "free_form" else answer_type,
                        category=f"family{record.get('question_family_index')}",
                        meta={"image_index": record.get("image_index")})


CLEVR = Benchmark(
    "clevr", "CLEVR", "https://cs.stanford.edu/people/jcjohns/clevr/ (CLEVR_v1.0.zip)",
    "questions/CLEVR_val_questions.json and images/val/", "val", _clevr_rows,
    _clevr_example)


# ---- A-OKVQA ---------------------------------------------------------------------------
def _aokvqa_rows(ctx: Context) -> Iterator[Row]:
    """A-OKVQA v1.0 (allenai/aokvqa): `aokvqa_v1p0_{split}.json`, a list of {split,
    image_id, question_id, question, choices, correct_choice_idx, direct_answers,
    difficult_direct_answer, rationales}; images are COCO 2017 ones,
    `{split}2017/{image_id:012d}.jpg` (also looked for under coco/ and images/). The
    test split has no answers."""
    for path in ctx.files(f"aokvqa_v1p0_{ctx.split}.json", f"aokvqa/aokvqa_v1p0_{ctx.split}.json"):
        yield from json_rows(path)


def _aokvqa_example(record: dict[str, Any], ctx: Context):
    choices = [str(c) for c in record.get("choices") or []]
    index = record.get("correct_choice_idx")
    if index is None or not 0 <= int(index) < len(choices):
        raise BadRowError("missing_answer", "no valid correct_choice_idx")
    filename = f"{ctx.split}2017/{int(record['image_id']):012d}.jpg"
    image = image_at(ctx, filename, ("", "coco", "images"))
    return make_example(ctx, record.get("question_id"), text(record, "question"), [image],
                        choice_letter(int(index)), "multiple_choice", choices=choices,
                        category="difficult" if record.get("difficult_direct_answer") else "",
                        meta={"direct_answers": record.get("direct_answers"),
                              "rationales": record.get("rationales")})


AOKVQA = Benchmark(
    "aokvqa", "A-OKVQA", "https://github.com/allenai/aokvqa (plus COCO 2017 images)",
    "aokvqa_v1p0_val.json and val2017/<image_id:012d>.jpg", "val", _aokvqa_rows,
    _aokvqa_example)


# ---- MMK12 ---------------------------------------------------------------------------
def _mmk12_rows(ctx: Context) -> Iterator[Row]:
    """FanqingM/MMK12 on Hugging Face: `data/{train,test}-*.parquet` with id, subject,
    question (options written in it for multiple choice), answer, image ({bytes, path})."""
    yield from file_rows(ctx.files(f"data/{ctx.split}-*.parquet", f"{ctx.split}-*.parquet"))


def _mmk12_example(record: dict[str, Any], ctx: Context):
    gold = unboxed(answer(record, "answer"))
    image = image_at(ctx, first_image(record, "image", "images"))
    return make_example(ctx, record.get("id"), text(record, "question"), [image], gold,
                        infer_answer_type(gold), category=str(record.get("subject") or ""))


MMK12 = Benchmark(
    "mmk12", "MMK12", "https://huggingface.co/datasets/FanqingM/MMK12",
    "data/test-*.parquet", "test", _mmk12_rows, _mmk12_example)


# ---- MMMU-Pro ---------------------------------------------------------------------------
def _mmmu_pro_rows(ctx: Context) -> Iterator[Row]:
    """MMMU/MMMU_Pro on Hugging Face, one folder per config: `standard (10 options)/`,
    `standard (4 options)/`, `vision/`, each `test-*.parquet`. Standard columns: id,
    question (with `<image 1>` tags), options (a Python-literal list, as a string),
    explanation, image_1 .. image_7 ({bytes, path} or null), img_type, answer (a letter),
    topic_difficulty, subject. Vision: id, image (question and options are in it),
    options, answer, subject. Option `subset` (default "standard (10 options)")."""
    subset = ctx.options.get("subset", "standard (10 options)")
    yield from file_rows(ctx.files(f"{subset}/{ctx.split}-*.parquet"))


_VISION_QUESTION = ("Answer the multiple-choice question shown in the image with the letter "
                    "of the correct option.")


def _mmmu_pro_example(record: dict[str, Any], ctx: Context):
    options = record.get("options") or "[]"
    try:
        choices = [str(c) for c in (ast.literal_eval(options) if isinstance(options, str) else options)]
    except (ValueError, SyntaxError) as error:
        raise BadRowError("bad_record", f"options are not a list literal: {error}") from None
    gold = letters(answer(record, "answer"))
    meta = {"subject": record.get("subject"), "img_type": record.get("img_type")}
    if record.get("image") is not None:  # the vision config: everything is in the image
        return make_example(ctx, record.get("id"), _VISION_QUESTION, [decode_image(record["image"])],
                            gold, "multiple_choice", category=str(record.get("subject") or ""),
                            meta={**meta, "choices": choices})
    # Images go in the order their tags appear in the question and the options.
    full, numbers = renumbered_placeholders(format_choices(text(record, "question"), choices),
                                            r"<image\s*(\d+)>")
    if not numbers:
        numbers = [k for k in range(1, 8) if record.get(f"image_{k}")]
    images = [decode_image(record.get(f"image_{k}")) for k in numbers]
    return make_example(ctx, record.get("id"), full, images, gold, "multiple_choice",
                        category=str(record.get("subject") or ""),
                        meta={**meta, "choices": choices})


MMMU_PRO = Benchmark(
    "mmmu_pro", "MMMU-Pro", "https://huggingface.co/datasets/MMMU/MMMU_Pro",
    "'standard (10 options)/test-*.parquet' (and 'vision/test-*.parquet')", "test",
    _mmmu_pro_rows, _mmmu_pro_example)


# ---- ViRL-39K ---------------------------------------------------------------------------
def _virl39k_rows(ctx: Context) -> Iterator[Row]:
    """TIGER-Lab/ViRL39K on Hugging Face: `39Krelease.parquet` with qid, question
    (starting with `<image>`), answer (often `\\boxed{...}`), image (a list of paths like
    `images/<qid>-0.jpg`, relative to the directory, from images.zip), category, source,
    PassRate_32BTrained, PassRate_7BTrained."""
    yield from file_rows(ctx.files("39Krelease.parquet", "*.parquet"))


def _virl39k_example(record: dict[str, Any], ctx: Context):
    gold = unboxed(answer(record, "answer"))
    paths = record.get("image")
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    images = [image_at(ctx, p) for p in paths]
    return make_example(ctx, record.get("qid"), text(record, "question"), images, gold,
                        infer_answer_type(gold), category=str(record.get("category") or ""),
                        meta={"source": record.get("source"),
                              "pass_rate_7b": record.get("PassRate_7BTrained"),
                              "pass_rate_32b": record.get("PassRate_32BTrained")})


VIRL39K = Benchmark(
    "virl39k", "ViRL-39K", "https://huggingface.co/datasets/TIGER-Lab/ViRL39K",
    "39Krelease.parquet and images/ (unzipped images.zip)", None, _virl39k_rows,
    _virl39k_example)
