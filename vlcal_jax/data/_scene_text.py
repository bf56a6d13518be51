"""The scene world's text: questions, the facts a vision span must state, teacher
responses in the decoupled format (PAPER.md section 2), and checking a vision span.

All generated text comes from a few templates over a small vocabulary (digits, colour,
size and shape words, "there are", "+ - = > <", "so yes/no"), so a small model trained
from scratch can learn it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from vlcal_jax.data._scene_world import PALETTE, SHAPES, Scene

PERCEPTION_TYPES = ("count", "exist", "color_of")
REASONING_TYPES = ("sum", "difference", "compare", "multi_step")
_STEPS = {"count": 0, "exist": 0, "color_of": 0, "sum": 1, "difference": 1, "compare": 1,
          "multi_step": 2}


@dataclasses.dataclass(frozen=True)
class Fact:
    """What a correct `<vision>` span must say: a count, or the colour of one object."""

    kind: str                 # "count" or "color"
    color: str | None = None  # for "color" facts, the colour the object has
    shape: str | None = None
    size: str | None = None
    value: int = 0            # the count (for "count" facts)

    def sentence(self) -> str:
        if self.kind == "color":
            return f"The {_noun_phrase(None, self.shape, self.size, 1)} is {self.color}."
        if self.value == 0:
            return f"There are no {_noun_phrase(self.color, self.shape, self.size, 2)}."
        verb = "is" if self.value == 1 else "are"
        return f"There {verb} {self.value} {_noun_phrase(self.color, self.shape, self.size, self.value)}."


@dataclasses.dataclass(frozen=True)
class Question:
    text: str
    answer: str
    answer_type: str
    question_type: str
    facts: tuple[Fact, ...]


def _noun_phrase(color, shape, size, count) -> str:
    noun = (shape or "object") + ("" if count == 1 else "s")
    return " ".join(w for w in (size, color, noun) if w)


def _count_fact(scene: Scene, color=None, shape=None, size=None) -> Fact:
    return Fact("count", color, shape, size, scene.count(color, shape, size))


def _descriptors(rng, scene: Scene, config, number: int) -> list[tuple[str | None, str | None]]:
    """`number` distinct, mutually disjoint (colour, shape) descriptors, mostly present ones."""
    family = rng.choice(["pair", "pair", "shape", "color"])
    if family == "shape" and len(config.shapes) >= number:
        pool = [(None, s) for s in config.shapes]
    elif family == "color" and len(config.colors) >= number:
        pool = [(c, None) for c in config.colors]
    else:
        pool = [(c, s) for c in config.colors for s in config.shapes]
    present = {d for d in pool if scene.count(*d) > 0}
    weights = np.array([3.0 if d in present else 1.0 for d in pool])
    picks = rng.choice(len(pool), size=number, replace=False, p=weights / weights.sum())
    return [pool[i] for i in picks]


def _phrase(descriptor, count=2) -> str:
    return _noun_phrase(descriptor[0], descriptor[1], None, count)


def make_question(rng: np.random.Generator, scene: Scene, config) -> Question:
    """Draws a question type from config.question_types and writes one about the scene."""
    qtype = config.question_types[rng.integers(len(config.question_types))]
    if qtype == "color_of":
        question = _color_of(rng, scene)
        if question is not None:
            return question
        qtype = "count"
    if qtype == "count":
        (d,) = _descriptors(rng, scene, config, 1)
        fact = _count_fact(scene, *d)
        return Question(f"How many {_phrase(d)} are there?", str(fact.value), "integer", qtype,
                        (fact,))
    if qtype == "exist":
        (d,) = _descriptors(rng, scene, config, 1)
        fact = _count_fact(scene, *d)
        answer = "yes" if fact.value > 0 else "no"
        phrase = _phrase(d, 1)
        article = "an" if phrase[0] in "aeiou" else "a"
        return Question(f"Is there {article} {phrase}?", answer, "yes_no", qtype, (fact,))
    first, second = (_count_fact(scene, *d) for d in _descriptors(rng, scene, config, 2))
    if qtype == "sum":
        text = (f"How many {_phrase((first.color, first.shape))} and "
                f"{_phrase((second.color, second.shape))} are there in total?")
        return Question(text, str(first.value + second.value), "integer", qtype, (first, second))
    if qtype == "difference":
        if first.value < second.value:
            first, second = second, first
        text = (f"How many more {_phrase((first.color, first.shape))} than "
                f"{_phrase((second.color, second.shape))} are there?")
        return Question(text, str(first.value - second.value), "integer", qtype, (first, second))
    if qtype == "compare":
        text = (f"Are there more {_phrase((first.color, first.shape))} than "
                f"{_phrase((second.color, second.shape))}?")
        answer = "yes" if first.value > second.value else "no"
        return Question(text, answer, "yes_no", qtype, (first, second))
    if qtype == "multi_step":
        facts = [_count_fact(scene, *d) for d in _descriptors(rng, scene, config, 3)]
        facts.sort(key=lambda f: -f.value)  # subtract the smallest, so the answer is not negative
        a, b, c = facts
        text = (f"How many {_phrase((a.color, a.shape))} and {_phrase((b.color, b.shape))} are "
                f"there in total, minus the {_phrase((c.color, c.shape))}?")
        return Question(text, str(a.value + b.value - c.value), "integer", qtype, (a, b, c))
    raise ValueError(f"unknown question type {qtype!r}")


def _color_of(rng, scene: Scene) -> Question | None:
    """"What colour is the [size] shape?" about an object its shape (and size) singles out."""
    candidates = []
    for obj in scene.objects:
        if scene.count(shape=obj.shape) == 1:
            candidates.append((obj, None))
        elif scene.count(shape=obj.shape, size=obj.size) == 1:
            candidates.append((obj, obj.size))
    if not candidates:
        return None
    obj, size = candidates[rng.integers(len(candidates))]
    fact = Fact("color", obj.color, obj.shape, size)
    text = f"What colour is the {_noun_phrase(None, obj.shape, size, 1)}?"
    return Question(text, obj.color, "text", "color_of", (fact,))


def answer_and_reasoning(question_type: str, facts: tuple[Fact, ...]) -> tuple[str, str]:
    """The answer the facts imply and the `<reasoning>` text that derives it."""
    values = [f.value for f in facts]
    if question_type == "color_of":
        return facts[0].color, f"So the colour is {facts[0].color}."
    if question_type == "count":
        return str(values[0]), f"The count is {values[0]}."
    if question_type == "exist":
        return ("yes", f"{values[0]} > 0, so yes.") if values[0] > 0 else ("no", "0 = 0, so no.")
    a, b = values[0], values[1]
    if question_type == "sum":
        return str(a + b), f"{a} + {b} = {a + b}."
    if question_type == "difference":
        return str(a - b), f"{a} - {b} = {a - b}."
    if question_type == "compare":
        sign = ">" if a > b else ("<" if a < b else "=")
        return ("yes" if a > b else "no"), f"{a} {sign} {b}, so {'yes' if a > b else 'no'}."
    if question_type == "multi_step":
        c = values[2]
        return str(a + b - c), f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}."
    raise ValueError(f"unknown question type {question_type!r}")


def reasoning_steps(question_type: str) -> int:
    return _STEPS[question_type]


def analysis_text(parts: dict[str, float], question_type: str) -> str:
    """Why the teacher is or is not sure, from the scene's difficulty parts."""
    issues = [text for key, text in (("crowding", "There are many objects."),
                                     ("smallness", "Some objects are small."),
                                     ("overlap", "Some objects overlap."),
                                     ("clutter", "The image is cluttered."),
                                     ("low_contrast", "The contrast is low."))
              if parts[key] >= 0.5]
    vision = " ".join(issues) if issues else "The objects are clear."
    steps = _STEPS[question_type]
    reasoning = ("No arithmetic is needed.", "The arithmetic has one step.",
                 "The arithmetic has two steps.")[steps]
    return f"{vision} {reasoning}"


def format_response(vision: str, reasoning: str, answer: str, analysis: str,
                    vision_confidence: int, reasoning_confidence: int) -> str:
    """The decoupled response of PAPER.md section 2, on one line."""
    return (f"<think><vision>{vision}</vision><reasoning>{reasoning}</reasoning></think> "
            f"The answer is \\boxed{{{answer}}}. <analysis>{analysis}</analysis>"
            f"<confidence><vision_confidence>{vision_confidence}</vision_confidence>"
            f"<reasoning_confidence>{reasoning_confidence}</reasoning_confidence></confidence>")


# ---- reading a vision span back -------------------------------------------------------

_NUMBER_WORDS = {"no": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
                 "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_COLORS = "|".join(PALETTE)
_SHAPE_WORDS = "|".join(SHAPES + ("object", "shape"))
_NOUN = rf"(?:(small|large) )?(?:({_COLORS}) )?({_SHAPE_WORDS})s?\b"
_COUNT_RE = re.compile(rf"\b(\d+|{'|'.join(_NUMBER_WORDS)}) {_NOUN}")
_THERE_IS_A_RE = re.compile(rf"\bthere is an? {_NOUN}")
_COLOR_RE = re.compile(rf"\bthe (?:(small|large) )?({'|'.join(SHAPES)}) is ({_COLORS})\b")
_VISION_RE = re.compile(r"<\s*vision\s*>(.*?)<\s*/\s*vision\s*>", re.DOTALL | re.IGNORECASE)


def vision_span(response: str) -> str | None:
    """The text of the first `<vision>...</vision>` span, or None."""
    match = _VISION_RE.search(response)
    return match.group(1) if match else None


def parse_vision_statements(text: str) -> list[Fact]:
    """The counts and colours a vision span states, as Facts (value = stated count)."""
    text = re.sub(r"\s+", " ", text.lower())
    facts = []
    for match in _COUNT_RE.finditer(text):
        number, size, color, shape = match.groups()
        value = int(number) if number.isdigit() else _NUMBER_WORDS[number]
        facts.append(Fact("count", color, _shape_or_none(shape), size, value))
    for match in _THERE_IS_A_RE.finditer(text):
        size, color, shape = match.groups()
        facts.append(Fact("count", color, _shape_or_none(shape), size, 1))
    for match in _COLOR_RE.finditer(text):
        size, shape, color = match.groups()
        facts.append(Fact("color", color, shape, size))
    return facts


def _shape_or_none(word: str) -> str | None:
    return None if word in ("object", "shape") else word


def check_statement(scene: Scene, stated: Fact) -> bool:
    """Whether one stated fact is true of the scene."""
    if stated.kind == "count":
        return scene.count(stated.color, stated.shape, stated.size) == stated.value
    matches = [o for o in scene.objects
               if o.shape == stated.shape and (stated.size is None or o.size == stated.size)]
    return len(matches) == 1 and matches[0].color == stated.color


def same_subject(a: Fact, b: Fact) -> bool:
    """Whether two facts are about the same thing (the same count, or the same object)."""
    if a.kind != b.kind:
        return False
    if a.kind == "count":
        return (a.color, a.shape, a.size) == (b.color, b.shape, b.size)
    return (a.shape, a.size) == (b.shape, b.size)


def facts_to_json(facts) -> list[dict[str, Any]]:
    return [dataclasses.asdict(f) for f in facts]


def facts_from_json(data) -> tuple[Fact, ...]:
    return tuple(Fact(**f) for f in data)
