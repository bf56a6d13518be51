"""Each evaluation-set adapter on a tiny fixture written in the set's release layout."""

import io
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlcal_jax.data.benchmarks import BENCHMARKS, iter_benchmark, load_benchmark


def _image(value, size=(8, 6), fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, 0, 255 - value)).save(buffer, format=fmt)
    return buffer.getvalue()


def _hf_image(value, path="x.png"):
    return {"bytes": _image(value), "path": path}


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def _parquet(path, columns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _json(path, data):
    _write(path, json.dumps(data).encode())


def _red(example, index=0):
    return example.images[index].getpixel((0, 0))[0]


def test_dynamath(tmp_path):
    for variant in (1, 2):
        _parquet(tmp_path / f"data/sample_variant{variant}-00000-of-00001.parquet", {
            "id": ["1", "2"],
            "question": ["Which is larger? Choices: (A) a (B) b", "What is the period?"],
            "image": ["DynaMath/1.png", "DynaMath/2.png"],
            "decoded_image": [_hf_image(10 * variant), _hf_image(20 * variant)],
            "ground_truth": ["B", "2.0944"],
            "answer_type": ["multiple choice", "float"],
            "subject": ["algebra", "graph theory"],
            "knowledge_level": ["high school", "undergraduate"],
        })
    examples = load_benchmark("dynamath", tmp_path)
    assert [e.id for e in examples] == ["dynamath/1/v1", "dynamath/2/v1", "dynamath/1/v2",
                                        "dynamath/2/v2"]
    assert [e.answer for e in examples] == ["B", "2.0944"] * 2
    assert [e.answer_type for e in examples] == ["multiple_choice", "float"] * 2
    assert examples[2].question == "<image>Which is larger? Choices: (A) a (B) b"
    assert _red(examples[3]) == 40 and examples[0].meta["variant"] == 1
    assert len(load_benchmark("dynamath", tmp_path, variants=(2,))) == 2


def test_geometry3k(tmp_path):
    for problem, gold in ((2401, "C"), (2402, "A")):
        _json(tmp_path / f"test/{problem}/data.json", {
            "id": problem, "problem_text": "Find x.", "choices": ["3", "4", "5", "6"],
            "answer": gold, "problem_type_graph": ["Triangle"], "problem_type_goal": ["Length"]})
        _write(tmp_path / f"test/{problem}/img_diagram.png", _image(problem % 256))
    examples = load_benchmark("geometry3k", tmp_path)
    assert [e.id for e in examples] == ["geometry3k/2401", "geometry3k/2402"]
    assert examples[0].question == "<image>Find x.\nChoices:\nA. 3\nB. 4\nC. 5\nD. 6"
    assert examples[0].answer == "C" and examples[0].choices == ["3", "4", "5", "6"]
    assert examples[1].category == "Length" and _red(examples[1]) == 2402 % 256


def _mathverse_fixture(root):
    def record(index, version, question, answer, qtype):
        return {"sample_index": str(index), "problem_index": "1", "problem_version": version,
                "question": question, "image": f"images_version_1-4/image_{index}.png",
                "answer": answer, "question_type": qtype,
                "metadata": {"split": "testmini", "source": "GeoQA", "subject": "plane geometry",
                             "subfield": "angle"},
                "query_wo": "According to the question shown in the image, answer it.",
                "query_cot": "..."}
    _json(root / "testmini.json", [
        record(1, "Text Dominant", "As shown, find the angle.\nChoices:\nA:30\nB:60", "B",
               "multi-choice"),
        record(2, "Vision Intensive", "Find the length.", "5", "free-form"),
        record(3, "Vision Only", "", "A", "multi-choice"),
    ])
    for index in (1, 2, 3):
        _write(root / f"images/images_version_1-4/image_{index}.png", _image(index))


def test_mathverse_and_its_vision_only_version(tmp_path):
    _mathverse_fixture(tmp_path)
    examples = load_benchmark("mathverse", tmp_path)
    assert [e.id for e in examples] == ["mathverse/1", "mathverse/2"]
    assert [e.answer_type for e in examples] == ["multiple_choice", "free_form"]
    assert examples[0].question.startswith("<image>As shown") and _red(examples[1]) == 2
    assert examples[0].category == "plane geometry"
    (only,) = load_benchmark("mathverse_vision_only", tmp_path)
    assert only.id == "mathverse_vision_only/3" and only.answer == "A"
    assert only.question == "<image>According to the question shown in the image, answer it."
    assert only.meta["problem_version"] == "Vision Only"


def test_mathvision(tmp_path):
    _parquet(tmp_path / "data/test-00000-of-00001.parquet", {
        "id": ["1", "2"],
        "question": ["<image1>\nWhich shape is next?", "How many cubes are there?"],
        "options": [["1", "2", "3", "4", "5"], []],
        "image": ["images/1.jpg", "images/2.jpg"],
        "decoded_image": [_hf_image(11), _hf_image(12)],
        "answer": ["C", "12"],
        "solution": [None, None],
        "level": [2, 3],
        "subject": ["metric geometry", "counting"],
    })
    first, second = load_benchmark("mathvision", tmp_path)
    assert first.question == "<image>\nWhich shape is next?\nChoices:\nA. 1\nB. 2\nC. 3\nD. 4\nE. 5"
    assert (first.answer, first.answer_type) == ("C", "multiple_choice")
    assert (second.answer, second.answer_type, second.choices) == ("12", "free_form", None)
    assert second.question == "<image>How many cubes are there?" and _red(second) == 12


def _mathvista_record(pid, choices, answer, question_type, answer_type, precision=None):
    return {"pid": pid, "question": f"Question {pid}?", "image": f"images/{pid}.jpg",
            "choices": choices, "unit": None, "precision": precision, "answer": answer,
            "question_type": question_type, "answer_type": answer_type,
            "metadata": {"category": "math-targeted-vqa", "task": "geometry problem solving",
                         "skills": ["algebraic reasoning"]},
            "query": "Hint: ..."}


def test_mathvista_parquet_and_json_layouts(tmp_path):
    records = [_mathvista_record("1", ["3", "4", "5"], "4", "multi_choice", "text"),
               _mathvista_record("2", None, "1.5", "free_form", "float", 1.0)]
    columns = {key: [r[key] for r in records] for key in records[0]}
    columns["decoded_image"] = [_hf_image(31), _hf_image(32)]
    _parquet(tmp_path / "hf/data/testmini-00000-of-00001.parquet", columns)
    first, second = load_benchmark("mathvista", tmp_path / "hf")
    assert first.question == "<image>Question 1?\nChoices:\nA. 3\nB. 4\nC. 5"
    assert (first.answer, first.answer_type, first.meta["answer_text"]) == ("B", "multiple_choice", "4")
    assert (second.answer, second.answer_type, second.meta["precision"]) == ("1.5", "float", 1.0)
    assert second.category == "math-targeted-vqa" and _red(second) == 32
    # The GitHub release: data/testmini.json keyed by pid, images in data/images/.
    _json(tmp_path / "gh/data/testmini.json", {r["pid"]: r for r in records})
    for pid in ("1", "2"):
        _write(tmp_path / f"gh/data/images/{pid}.jpg", _image(40 + int(pid), fmt="JPEG"))
    from_json = load_benchmark("mathvista", tmp_path / "gh")
    assert [(e.id, e.answer) for e in from_json] == [("mathvista/1", "B"), ("mathvista/2", "1.5")]
    assert from_json[0].images[0].size == (8, 6)


def test_wemath(tmp_path):
    _json(tmp_path / "testmini.json", [{
        "ID": "2steps_1", "split": "testmini", "knowledge concept": "Area of Circles",
        "question": "What is the area (  )?", "option": "A. 9cm; B. 10cm;C. 11cm; D. 12cm; E. No correct answer",
        "answer": "B", "image_path": "2steps/image/1-2.png", "key": "2steps_2",
        "question number": 1575, "knowledge concept description": "..."}])
    _write(tmp_path / "2steps/image/1-2.png", _image(7))
    (example,) = load_benchmark("wemath", tmp_path)
    assert example.choices == ["9cm", "10cm", "11cm", "12cm", "No correct answer"]
    assert example.question.endswith("B. 10cm\nC. 11cm\nD. 12cm\nE. No correct answer")
    assert (example.id, example.answer, example.category) == ("wemath/2steps_1", "B", "Area of Circles")


def test_logicvista(tmp_path):
    _parquet(tmp_path / "data/test-00000-of-00001.parquet", {
        "id": ["1", "2"], "question": ["Which two? A. x B. y C. z", "Which one? A. p B. q"],
        "answer": ["A, C", "B"], "reasoning": ["because", "so"],
        "image": [_hf_image(51), _hf_image(52)], "skill": [["inductive"], ["spatial"]],
        "broad_capability": ["x", "y"], "specific_capability": ["x", "y"]})
    first, second = load_benchmark("logicvista", tmp_path)
    assert (first.answer, second.answer) == ("A,C", "B")
    assert first.category == "inductive" and first.answer_type == "multiple_choice"
    assert first.question == "<image>Which two? A. x B. y C. z"


def test_clevr(tmp_path):
    questions = [{"image_index": i, "image_filename": f"CLEVR_val_{i:06d}.png",
                  "question": q, "answer": a, "question_index": i, "question_family_index": 3,
                  "split": "val", "program": []}
                 for i, (q, a) in enumerate([("How many cubes?", "3"), ("Is it metal?", "yes"),
                                             ("What shape is it?", "cube")])]
    _json(tmp_path / "questions/CLEVR_val_questions.json", {"info": {}, "questions": questions})
    for i in range(3):
        _write(tmp_path / f"images/val/CLEVR_val_{i:06d}.png", _image(60 + i))
    examples = load_benchmark("clevr", tmp_path)
    assert [e.answer_type for e in examples] == ["integer", "yes_no", "text"]
    assert [_red(e) for e in examples] == [60, 61, 62]
    assert [e.id for e in load_benchmark("clevr", tmp_path, shard_index=1, shard_count=2)] == ["clevr/1"]
    assert len(load_benchmark("clevr", tmp_path, limit=2)) == 2


def test_aokvqa(tmp_path):
    _json(tmp_path / "aokvqa_v1p0_val.json", [{
        "split": "val", "image_id": 139, "question_id": "22jbM6gDxdaMaunuzgrsBB",
        "question": "What is in the motorcyclist's mouth?",
        "choices": ["toothpick", "food", "popsicle stick", "cigarette"], "correct_choice_idx": 3,
        "direct_answers": ["cigarette"] * 10, "difficult_direct_answer": False,
        "rationales": ["He is smoking."]}])
    _write(tmp_path / "val2017/000000000139.jpg", _image(70, fmt="JPEG"))
    (example,) = load_benchmark("aokvqa", tmp_path)
    assert (example.answer, example.answer_type) == ("D", "multiple_choice")
    assert example.question.endswith("C. popsicle stick\nD. cigarette")
    assert example.meta["rationales"] == ["He is smoking."]


def test_mmk12(tmp_path):
    _parquet(tmp_path / "data/test-00000-of-00001.parquet", {
        "id": ["m1", "m2"], "subject": ["math", "physics"],
        "question": ["<image>Find y.", "Which force? A. f B. g"], "answer": ["\\boxed{5}", "B"],
        "image": [_hf_image(81), _hf_image(82)]})
    first, second = load_benchmark("mmk12", tmp_path)
    assert (first.answer, first.answer_type, first.question) == ("5", "integer", "<image>Find y.")
    assert (second.answer, second.answer_type, second.category) == ("B", "multiple_choice", "physics")


def test_mmmu_pro_standard_and_vision(tmp_path):
    row = {"id": "test_Art_1", "question": "Compare <image 2> with <image 1>.",
           "options": "['red', 'blue', '<image 3>']", "explanation": "", "img_type": "['Paintings']",
           "answer": "C", "topic_difficulty": "Medium", "subject": "Art"}
    for k in range(1, 8):
        row[f"image_{k}"] = _hf_image(90 + k) if k <= 3 else None
    _parquet(tmp_path / "standard (10 options)/test-00000-of-00001.parquet",
             {key: [value] for key, value in row.items()})
    (example,) = load_benchmark("mmmu_pro", tmp_path)
    assert example.question == ("Compare <image> with <image>.\nChoices:\nA. red\nB. blue\nC. <image>")
    assert [_red(example, i) for i in range(3)] == [92, 91, 93]
    assert example.answer == "C" and example.category == "Art"
    _parquet(tmp_path / "vision/test-00000-of-00001.parquet", {
        "id": ["test_Art_1"], "image": [_hf_image(99)], "options": ["['a', 'b']"],
        "answer": ["B"], "subject": ["Art"]})
    (vision,) = load_benchmark("mmmu_pro", tmp_path, subset="vision")
    assert vision.question.startswith("<image>Answer the multiple-choice question")
    assert vision.answer == "B" and vision.meta["choices"] == ["a", "b"] and _red(vision) == 99


def test_virl39k(tmp_path):
    _parquet(tmp_path / "39Krelease.parquet", {
        "question": ["<image>What is x?", "<image><image>Which is larger?"],
        "answer": ["\\boxed{60}", "\\boxed{B}"],
        "PassRate_32BTrained": [0.5, 0.25], "PassRate_7BTrained": [0.25, 0.0],
        "category": ["(GradeSchool) Geometric", "(College) Science"],
        "source": ["geoqa", "scienceqa"], "qid": ["q1", "q2"],
        "image": [["images/q1-0.jpg"], ["images/q2-0.jpg", "images/q2-1.jpg"]]})
    for name, value in (("q1-0", 1), ("q2-0", 2), ("q2-1", 3)):
        _write(tmp_path / f"images/{name}.jpg", _image(value * 50, fmt="JPEG"))
    first, second = load_benchmark("virl39k", tmp_path)
    assert (first.id, first.answer, first.answer_type) == ("virl39k/q1", "60", "integer")
    assert len(second.images) == 2 and second.answer == "B" and second.meta["source"] == "scienceqa"


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_a_missing_set_is_a_clear_error(tmp_path, name):
    benchmark = BENCHMARKS[name]
    with pytest.raises(FileNotFoundError) as missing:
        load_benchmark(name, tmp_path / "nowhere")
    message = str(missing.value)
    assert benchmark.title in message and benchmark.url in message and "nowhere" in message
    with pytest.raises(FileNotFoundError, match="no file matching"):
        load_benchmark(name, tmp_path)  # the directory is there, the release is not


def test_bad_rows_are_counted_and_a_set_without_usable_rows_fails(tmp_path, caplog):
    records = [_mathvista_record("1", ["3", "4"], "7", "multi_choice", "text"),  # not a choice
               _mathvista_record("2", None, "1.5", "free_form", "float"),
               _mathvista_record("3", None, "", "free_form", "float")]                # no answer
    columns = {key: [r[key] for r in records] for key in records[0]}
    columns["decoded_image"] = [_hf_image(1), {"bytes": b"broken", "path": None}, _hf_image(3)]
    _parquet(tmp_path / "data/testmini-00000-of-00001.parquet", columns)
    with caplog.at_level(logging.INFO, logger="vlcal_jax.data"):
        with pytest.raises(ValueError, match="no usable row.*bad_record=1, corrupt_image=1, missing_answer=1"):
            list(iter_benchmark("mathvista", tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    named = [w for w in warnings if w.startswith("skipping ")]
    assert len(named) == 3 and all("testmini-00000-of-00001.parquet row" in w for w in named)
    assert any("MathVista" in w and "3 rows skipped" in w for w in warnings)
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("mathvista2", tmp_path)
