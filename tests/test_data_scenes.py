"""The scene world: answers checked from the rendered pixels, perception scoring, CLI."""

import collections
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from vlcal_jax.data import RecordReader, read_examples
from vlcal_jax.data import scenes
from vlcal_jax.data.scenes import Fact, Scene, SceneConfig, SceneObject, SceneSample

# ---- an independent reading of the rendered image ---------------------------------------

_NAMED_RGB = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220),
              "yellow": (230, 190, 20), "purple": (140, 60, 190), "orange": (240, 130, 20)}


def _objects_in_pixels(image):
    """(colour, shape, size) of every blob of a pure palette colour, from pixels alone."""
    pixels = np.asarray(image).astype(int)
    found = []
    for color, rgb in _NAMED_RGB.items():
        mask = np.all(pixels == rgb, axis=-1)
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for blob in ndimage.find_objects(labels):
            region = labels[blob] > 0
            area = region.sum()
            fill = area / region.size
            half = region.shape[0] // 2
            top, bottom = region[:half].sum(), region[region.shape[0] - half:].sum()
            if fill > 0.9:
                shape, radius = "square", np.sqrt(area / 2.56)
            elif top < 0.7 * bottom:  # apex up: much less mass in the upper half
                shape, radius = "triangle", np.sqrt(area / 1.3)
            else:
                shape, radius = "circle", np.sqrt(area / np.pi)
            found.append((color, shape, "large" if radius > 6.5 else "small"))
    return found


_NOUN = r"(?:(small|large) )?(?:(red|green|blue|yellow|purple|orange) )?(circle|square|triangle|object)s?"


def _count(inventory, phrase):
    size, color, shape = re.fullmatch(_NOUN, phrase).groups()
    shape = None if shape == "object" else shape
    return sum((color in (None, c)) and (shape in (None, s)) and (size in (None, z))
               for c, s, z in inventory)


def _answer_from(inventory, question):
    """The answer to a generated question, by parsing its words and counting the blobs."""
    q = question.removeprefix("<image>")
    if m := re.fullmatch(rf"How many ({_NOUN}) and ({_NOUN}) are there in total, minus the ({_NOUN})\?", q):
        a, b, c = (_count(inventory, m.group(i)) for i in (1, 5, 9))
        return str(a + b - c)
    if m := re.fullmatch(rf"How many ({_NOUN}) and ({_NOUN}) are there in total\?", q):
        return str(_count(inventory, m.group(1)) + _count(inventory, m.group(5)))
    if m := re.fullmatch(rf"How many more ({_NOUN}) than ({_NOUN}) are there\?", q):
        return str(_count(inventory, m.group(1)) - _count(inventory, m.group(5)))
    if m := re.fullmatch(rf"How many ({_NOUN}) are there\?", q):
        return str(_count(inventory, m.group(1)))
    if m := re.fullmatch(rf"Is there an? ({_NOUN})\?", q):
        return "yes" if _count(inventory, m.group(1)) else "no"
    if m := re.fullmatch(rf"Are there more ({_NOUN}) than ({_NOUN})\?", q):
        return "yes" if _count(inventory, m.group(1)) > _count(inventory, m.group(5)) else "no"
    if m := re.fullmatch(r"What colour is the (?:(small|large) )?(circle|square|triangle)\?", q):
        size, shape = m.groups()
        (color,) = [c for c, s, z in inventory if s == shape and size in (None, z)]
        return color
    raise AssertionError(f"unrecognised question {q!r}")


def test_gold_answers_match_an_independent_count_of_the_rendered_pixels():
    config = SceneConfig(max_objects=7, max_clutter=8, colors=tuple(_NAMED_RGB))
    types = collections.Counter()
    for index in range(150):
        sample = scenes.generate_sample(index, seed=7, config=config)
        inventory = _objects_in_pixels(sample.image)
        truth = [(o.color, o.shape, o.size) for o in sample.scene.objects]
        assert sorted(inventory) == sorted(truth), sample.id
        assert _answer_from(inventory, sample.question) == sample.answer, (sample.id, sample.question)
        types[sample.question_type] += 1
    assert set(types) == set(scenes.PERCEPTION_TYPES + scenes.REASONING_TYPES)


def test_generation_is_deterministic_from_the_seed():
    config = SceneConfig(max_clutter=5, max_overlap=0.4, max_low_contrast=0.5)
    a, b = scenes.generate_sample(3, 1, config), scenes.generate_sample(3, 1, config)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.question, a.answer, a.facts, a.scene) == (b.question, b.answer, b.facts, b.scene)
    assert scenes.teacher_response(a, vision_error=True) == scenes.teacher_response(b, vision_error=True)
    others = [scenes.generate_sample(3, seed, config) for seed in (2, 3, 4)]
    assert any(o.scene != a.scene for o in others)


def test_difficulty_knobs():
    easy = scenes.generate_samples(40, 0, SceneConfig(max_objects=2))
    hard = scenes.generate_samples(40, 0, SceneConfig(
        min_objects=5, max_objects=8, size_scale=0.7, max_overlap=0.5, max_clutter=15,
        max_low_contrast=0.7))
    assert np.mean([s.difficulty for s in hard]) > np.mean([s.difficulty for s in easy]) + 0.15
    assert max(s.scene.overlap for s in hard) > 0 and max(s.scene.overlap for s in easy) == 0
    assert all(s.scene.clutter == () for s in easy) and any(s.scene.clutter for s in hard)
    faded = [o for s in hard for o in s.scene.objects if s.scene.low_contrast > 0.3]
    assert faded and all(o.rgb != _NAMED_RGB[o.color] for o in faded)
    assert np.mean([o.radius for s in hard for o in s.scene.objects]) < np.mean(
        [o.radius for s in easy for o in s.scene.objects])
    for s in easy + hard:
        assert 0.0 <= s.difficulty <= 1.0


def _hand_scene():
    red = [SceneObject("circle", "red", "small", 10 + 12 * i, 10, 4, _NAMED_RGB["red"])
           for i in range(3)]
    blue = [SceneObject("square", "blue", "large", 12 + 20 * i, 40, 8, _NAMED_RGB["blue"])
            for i in range(2)]
    green = [SceneObject("triangle", "green", "large", 52, 12, 8, _NAMED_RGB["green"])]
    scene = Scene(image_size=64, objects=tuple(red + blue + green))
    facts = (Fact("count", "red", "circle", None, 3), Fact("count", "blue", "square", None, 2))
    return SceneSample(id="hand", image=scenes.render_scene(scene),
                       question="<image>How many red circles and blue squares are there in total?",
                       answer="5", answer_type="integer", question_type="sum", scene=scene,
                       facts=facts, difficulty=0.2,
                       difficulty_parts={"perception": 0.1, "reasoning": 0.5})


@pytest.mark.parametrize("span, correct", [
    ("There are 3 red circles and 2 blue squares.", True),
    ("I see three red circles and two Blue Squares, nothing else.", True),
    ("There are 3 red circles. There are 2 blue squares. There is 1 green triangle.", True),
    ("There are 4 red circles and 2 blue squares.", False),      # a wrong count
    ("There are 3 red circles.", False),                          # a fact left out
    ("There are 3 red circles and no blue squares.", False),
    ("There are 3 red circles and 2 blue squares. There is a yellow circle.", False),
    ("There are 3 red circles, 3 red circles and 2 blue squares. 4 red circles.", False),
    ("The picture shows some shapes.", False),
])
def test_score_perception_on_hand_written_spans(span, correct):
    sample = _hand_scene()
    response = f"<think><vision>{span}</vision><reasoning>3 + 2 = 5.</reasoning></think> \\boxed{{5}}"
    score = scenes.score_perception(response, sample)
    assert score.has_vision and score.correct is correct
    assert score.required == 2


def test_score_perception_details_and_other_inputs():
    sample = _hand_scene()
    score = scenes.score_perception("<vision>There are 4 red circles.</vision>", sample)
    assert score.wrong == ("There are 4 red circles.",)
    assert score.missing == ("There are 2 blue squares.",) and score.stated_right == 0
    assert not scenes.score_perception("<think>no span</think>", sample).has_vision
    spaced = "< vision >There are 3 red circles and 2 blue squares.< / vision >"
    assert scenes.score_perception(spaced, sample).correct
    colour = SceneSample(**{**sample.__dict__, "facts": (Fact("color", "green", "triangle"),)})
    assert scenes.score_perception("<vision>The triangle is green.</vision>", colour).correct
    assert not scenes.score_perception("<vision>The triangle is red.</vision>", colour).correct
    assert not scenes.score_perception("<vision>The large circle is red.</vision>", sample).correct
    # An Example carries the scene in meta, as dicts or (read back from parquet) JSON text.
    example = sample.to_example()
    right = "<vision>There are 3 red circles and 2 blue squares.</vision>"
    assert scenes.score_perception(right, example).correct
    example.meta = {k: json.dumps(v) for k, v in example.meta.items()}
    assert scenes.score_perception(right, example).correct


_FORMAT = re.compile(
    r"<think><vision>(?P<vision>.+)</vision><reasoning>.+</reasoning></think>.*"
    r"\\boxed\{(?P<answer>[^{}]+)\}.*<analysis>.+</analysis><confidence>"
    r"<vision_confidence>(?P<v>\d+)</vision_confidence>"
    r"<reasoning_confidence>(?P<r>\d+)</reasoning_confidence></confidence>$")


def test_teacher_responses_follow_the_decoupled_format():
    config = SceneConfig(max_clutter=4, max_overlap=0.3, max_low_contrast=0.4)
    for sample in scenes.generate_samples(40, 2, config):
        good = _FORMAT.fullmatch(scenes.teacher_response(sample))
        assert good and good["answer"] == sample.answer
        assert scenes.score_perception(good.string, sample).correct
        assert 1 <= int(good["v"]) <= 10 and 8 <= int(good["r"]) <= 10
        misread = _FORMAT.fullmatch(scenes.teacher_response(sample, vision_error=True))
        assert misread and not scenes.score_perception(misread.string, sample).correct
        assert int(misread["v"]) <= 4
        confused = _FORMAT.fullmatch(scenes.teacher_response(sample, reasoning_error=True))
        assert confused and scenes.score_perception(confused.string, sample).correct
        if sample.question_type != "color_of":
            assert confused["answer"] != sample.answer and int(confused["r"]) <= 4
    vocabulary = set()
    for sample in scenes.generate_samples(200, 3, config):
        text = scenes.teacher_response(sample, vision_error=sample.difficulty > 0.3)
        vocabulary |= set(re.findall(r"[a-z]+", re.sub(r"<[^>]+>", " ", text.lower())))
    assert len(vocabulary) < 60, sorted(vocabulary)


def test_cli_writes_a_data_set_the_reader_reads(tmp_path):
    info = scenes.main(["--out", str(tmp_path), "--n", "20", "--seed", "4", "--image-size", "48",
                        "--max-clutter", "3", "--teacher-error-rate", "0.5"])
    assert info["splits"] == {"train": 18, "test": 2}
    reader = RecordReader(tmp_path / "train.parquet", image_dir=tmp_path, id_key="id",
                          answer_type_key="answer_type", category_key="category",
                          process_index=0, process_count=1, num_epochs=1, shuffle=False)
    examples = list(reader)
    assert len(examples) == 18 and reader.skipped.total == 0
    config = SceneConfig(image_size=48, max_clutter=3)
    for index, example in enumerate(examples):
        sample = scenes.generate_sample(index, 4, config)
        assert (example.id, example.question, example.answer) == (sample.id, sample.question, sample.answer)
        assert np.array_equal(np.asarray(example.images[0]), np.asarray(sample.image))
        response = example.meta["teacher_response"]
        assert scenes.score_perception(response, example).correct == example.meta["teacher_vision_correct"]
    assert not all(e.meta["teacher_vision_correct"] for e in examples)
    (test,) = [read_examples(tmp_path / "test.parquet", image_dir=tmp_path, id_key="id")]
    assert [e.id for e in test] == ["scene-4-0000018", "scene-4-0000019"]


def test_module_runs_as_a_script(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlcal_jax.data.scenes", "--out", str(tmp_path),
                             "--n", "3"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "train.parquet").exists() and len(list((tmp_path / "images").iterdir())) == 3
