"""A generated scene world whose perception ground truth is known (PAPER.md section 8).

Real benchmarks cannot say whether a model saw the image right; here every sample carries
its scene graph and the facts its `<vision>` span must state, so `score_perception` can
check a response's perception against the truth, and the vision confidence and the
visual certainty S_vis can be scored against it (AUROC).

    sample = generate_sample(index=0, seed=0, config=SceneConfig(max_clutter=5))
    sample.image, sample.question, sample.answer, sample.facts, sample.difficulty
    teacher_response(sample)            # decoupled-format text for a supervised warm start
    score_perception(response, sample)  # .correct: the vision span states the facts right

Command line (EasyR1 parquet + PNGs that RecordReader reads with image_dir=DIR):

    python -m vlcal_jax.data.scenes --out DIR --n 10000 [--seed 0 --image-size 64 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import zlib
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from vlcal_jax.data._scene_text import (
    PERCEPTION_TYPES,
    REASONING_TYPES,
    Fact,
    analysis_text,
    answer_and_reasoning,
    check_statement,
    facts_from_json,
    facts_to_json,
    format_response,
    make_question,
    parse_vision_statements,
    reasoning_steps,
    same_subject,
    vision_span,
)
from vlcal_jax.data._scene_world import (
    PALETTE,
    SHAPES,
    SIZES,
    Scene,
    SceneConfig,
    SceneObject,
    perception_difficulty,
    render_scene,
    sample_scene,
)
from vlcal_jax.data.example import IMAGE_PLACEHOLDER, Example

__all__ = [
    "PALETTE", "PERCEPTION_TYPES", "REASONING_TYPES", "SHAPES", "SIZES", "Fact",
    "PerceptionScore", "Scene", "SceneConfig", "SceneObject", "SceneSample",
    "generate_sample", "generate_samples", "render_scene", "score_perception",
    "teacher_response", "write_dataset",
]

logger = logging.getLogger("vlcal_jax.data")


@dataclasses.dataclass
class SceneSample:
    """One generated image and question with everything known about it."""

    id: str
    image: Image.Image
    question: str            # EasyR1 form: starts with "<image>"
    answer: str
    answer_type: str         # "integer", "yes_no" or "text"
    question_type: str       # one of PERCEPTION_TYPES + REASONING_TYPES
    scene: Scene
    facts: tuple[Fact, ...]  # what a correct <vision> span states
    difficulty: float        # in [0, 1]: 0.7 perception + 0.3 reasoning steps
    difficulty_parts: dict[str, float]

    @property
    def kind(self) -> str:
        return "perception" if self.question_type in PERCEPTION_TYPES else "reasoning"

    def to_example(self) -> Example:
        return Example(id=self.id, question=self.question, images=[self.image],
                       answer=self.answer, choices=None, answer_type=self.answer_type,
                       category=f"scenes/{self.kind}", meta=self.meta())

    def meta(self) -> dict[str, Any]:
        return {"question_type": self.question_type, "scene": self.scene.to_dict(),
                "facts": facts_to_json(self.facts), "difficulty": self.difficulty,
                "difficulty_parts": dict(self.difficulty_parts)}


def generate_sample(index: int, seed: int = 0, config: SceneConfig = SceneConfig()) -> SceneSample:
    """The `index`-th sample of the world seeded by `seed`: a pure function of both."""
    rng = np.random.default_rng([seed, index])
    scene = sample_scene(rng, config)
    question = make_question(rng, scene, config)
    parts = perception_difficulty(scene)
    parts["reasoning"] = reasoning_steps(question.question_type) / 2.0
    difficulty = 0.7 * parts["perception"] + 0.3 * parts["reasoning"]
    return SceneSample(id=f"scene-{seed}-{index:07d}", image=render_scene(scene),
                       question=IMAGE_PLACEHOLDER + question.text, answer=question.answer,
                       answer_type=question.answer_type, question_type=question.question_type,
                       scene=scene, facts=question.facts, difficulty=float(difficulty),
                       difficulty_parts=parts)


def generate_samples(n: int, seed: int = 0, config: SceneConfig = SceneConfig(),
                     start: int = 0) -> list[SceneSample]:
    return [generate_sample(i, seed, config) for i in range(start, start + n)]


def teacher_response(sample: SceneSample, *, vision_error: bool = False,
                     reasoning_error: bool = False) -> str:
    """A response in the decoupled format (PAPER.md section 2) for a supervised warm start.

    With no error it states the true facts, derives the gold answer, and gives a vision
    confidence that falls with the scene's perception difficulty. `vision_error` misreads
    one fact (a count off by one, or another colour) and carries it to the answer;
    `reasoning_error` gets the last arithmetic step or the yes/no conclusion wrong (no
    effect on colour questions). A part with an error gets a low confidence (2 to 4).
    """
    rng = np.random.default_rng([zlib.crc32(sample.id.encode()), int(vision_error),
                                 int(reasoning_error)])
    facts = list(sample.facts)
    if vision_error:
        which = int(rng.integers(len(facts)))
        facts[which] = _misread(facts[which], rng)
    answer, reasoning = answer_and_reasoning(sample.question_type, tuple(facts))
    applied_reasoning_error = reasoning_error and sample.question_type != "color_of"
    if applied_reasoning_error:
        answer, reasoning = _wrong_step(answer, reasoning)
    vision = " ".join(f.sentence() for f in facts)
    steps = reasoning_steps(sample.question_type)
    vision_confidence = int(np.clip(round(10 - 8 * sample.difficulty_parts["perception"]), 1, 10))
    reasoning_confidence = 10 - steps
    if vision_error:
        vision_confidence = int(rng.integers(2, 5))
    if applied_reasoning_error:
        reasoning_confidence = int(rng.integers(2, 5))
    return format_response(vision, reasoning, answer,
                           analysis_text(sample.difficulty_parts, sample.question_type),
                           vision_confidence, reasoning_confidence)


def _misread(fact: Fact, rng) -> Fact:
    if fact.kind == "color":
        others = [c for c in PALETTE if c != fact.color]
        return dataclasses.replace(fact, color=others[rng.integers(len(others))])
    delta = 1 if fact.value == 0 or rng.random() < 0.5 else -1
    return dataclasses.replace(fact, value=fact.value + delta)


def _wrong_step(answer: str, reasoning: str) -> tuple[str, str]:
    if answer in ("yes", "no"):
        flipped = "no" if answer == "yes" else "yes"
        return flipped, reasoning[: reasoning.rindex(answer)] + flipped + "."
    wrong = str(int(answer) + 1)
    head, _, tail = reasoning.rpartition(answer)
    return wrong, head + wrong + tail


@dataclasses.dataclass(frozen=True)
class PerceptionScore:
    """Whether a response's `<vision>` span describes the scene right.

    correct: the span exists, states every required fact correctly, and every count or
      colour it states (relevant or not) is true of the scene.
    """

    correct: bool
    has_vision: bool
    required: int                 # facts the span must state
    stated_right: int             # of those, stated and right
    missing: tuple[str, ...]      # required facts not stated (as the true sentence)
    wrong: tuple[str, ...]        # stated facts that are false (as stated)


def score_perception(response: str, sample: SceneSample | Example) -> PerceptionScore:
    """Checks the response's vision span against the sample's scene graph and facts.

    `sample` is a SceneSample, or an Example whose meta holds "scene" and "facts" (as
    `SceneSample.to_example` writes them, or as JSON strings read back from the parquet).
    """
    scene, required = _scene_and_facts(sample)
    span = vision_span(response)
    if span is None:
        return PerceptionScore(False, False, len(required), 0,
                               tuple(f.sentence() for f in required), ())
    stated = parse_vision_statements(span)
    wrong = tuple(f.sentence() for f in stated if not check_statement(scene, f))
    missing, right = [], 0
    for fact in required:
        about = [s for s in stated if same_subject(s, fact)]
        if not about:
            missing.append(fact.sentence())
        elif all(check_statement(scene, s) for s in about):
            right += 1
    correct = right == len(required) and not wrong
    return PerceptionScore(correct, True, len(required), right, tuple(missing), wrong)


def _scene_and_facts(sample) -> tuple[Scene, tuple[Fact, ...]]:
    if isinstance(sample, SceneSample):
        return sample.scene, sample.facts
    meta = sample.meta
    scene, facts = meta.get("scene"), meta.get("facts")
    if scene is None or facts is None:
        raise ValueError(f"example {sample.id}: meta has no 'scene'/'facts'; "
                         "score_perception needs a scene-world sample")
    scene = json.loads(scene) if isinstance(scene, str) else scene
    facts = json.loads(facts) if isinstance(facts, str) else facts
    return Scene.from_dict(scene), facts_from_json(facts)


def write_dataset(out_dir: str | os.PathLike, n: int, *, seed: int = 0,
                  config: SceneConfig = SceneConfig(), test_fraction: float = 0.1,
                  teacher_error_rate: float = 0.0) -> dict[str, Any]:
    """Writes `train.parquet`, `test.parquet` (EasyR1 schema) and `images/*.png`.

    Columns: problem, answer, images (paths relative to out_dir), id, answer_type,
    category, question_type, difficulty, difficulty_parts / facts / scene (JSON text),
    teacher_response, teacher_vision_correct, teacher_answer_correct. With
    teacher_error_rate > 0 each teacher response misreads the image, and independently
    errs in reasoning, with that probability (so a warm start also sees low confidences).
    Returns the summary also written to dataset_info.json.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    n_test = int(round(n * test_fraction))
    splits = {"train": range(0, n - n_test), "test": range(n - n_test, n)}
    error_rng = np.random.default_rng([seed, 2**31 - 1])
    for split, indices in splits.items():
        columns: dict[str, list] = {key: [] for key in (
            "id", "problem", "answer", "images", "answer_type", "category", "question_type",
            "difficulty", "difficulty_parts", "facts", "scene", "teacher_response",
            "teacher_vision_correct", "teacher_answer_correct")}
        for index in _progress(indices, split):
            sample = generate_sample(index, seed, config)
            relative = f"images/{sample.id}.png"
            sample.image.save(os.path.join(out_dir, relative))
            vision_error, reasoning_error = (error_rng.random(2) < teacher_error_rate).tolist()
            response = teacher_response(sample, vision_error=vision_error,
                                        reasoning_error=reasoning_error)
            meta = sample.meta()
            row = {"id": sample.id, "problem": sample.question, "answer": sample.answer,
                   "images": [relative], "answer_type": sample.answer_type,
                   "category": f"scenes/{sample.kind}", "question_type": sample.question_type,
                   "difficulty": sample.difficulty,
                   "difficulty_parts": json.dumps(meta["difficulty_parts"]),
                   "facts": json.dumps(meta["facts"]), "scene": json.dumps(meta["scene"]),
                   "teacher_response": response,
                   "teacher_vision_correct": score_perception(response, sample).correct,
                   "teacher_answer_correct": f"\\boxed{{{sample.answer}}}" in response}
            for key, value in row.items():
                columns[key].append(value)
        pq.write_table(pa.table(columns), os.path.join(out_dir, f"{split}.parquet"))
    info = {"generator": "vlcal_jax.data.scenes", "seed": seed, "n": n,
            "splits": {k: len(v) for k, v in splits.items()},
            "teacher_error_rate": teacher_error_rate,
            "config": dataclasses.asdict(config), "image_dir": ".",
            "reader": {"prompt_key": "problem", "answer_key": "answer", "image_key": "images",
                       "id_key": "id", "answer_type_key": "answer_type",
                       "category_key": "category"}}
    with open(os.path.join(out_dir, "dataset_info.json"), "w") as handle:
        json.dump(info, handle, indent=2)
    return info


def _progress(indices: Sequence[int], split: str):
    try:
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    except ImportError:
        return indices
    return tqdm(indices, desc=f"scenes {split}", unit="img", leave=False, mininterval=2.0)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m vlcal_jax.data.scenes",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, required=True, help="number of samples (all splits)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--teacher-error-rate", type=float, default=0.0)
    defaults = SceneConfig()
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--min-objects", type=int, default=defaults.min_objects)
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects)
    parser.add_argument("--size-scale", type=float, default=defaults.size_scale)
    parser.add_argument("--max-overlap", type=float, default=defaults.max_overlap)
    parser.add_argument("--max-clutter", type=int, default=defaults.max_clutter)
    parser.add_argument("--max-low-contrast", type=float, default=defaults.max_low_contrast)
    parser.add_argument("--colors", default=",".join(defaults.colors))
    parser.add_argument("--shapes", default=",".join(defaults.shapes))
    parser.add_argument("--question-types", default=",".join(defaults.question_types))
    args = parser.parse_args(argv)
    config = SceneConfig(
        image_size=args.image_size, min_objects=args.min_objects, max_objects=args.max_objects,
        size_scale=args.size_scale, max_overlap=args.max_overlap, max_clutter=args.max_clutter,
        max_low_contrast=args.max_low_contrast, colors=tuple(args.colors.split(",")),
        shapes=tuple(args.shapes.split(",")),
        question_types=tuple(args.question_types.split(",")))
    info = write_dataset(args.out, args.n, seed=args.seed, config=config,
                         test_fraction=args.test_fraction,
                         teacher_error_rate=args.teacher_error_rate)
    print(f"wrote {info['splits']} scene samples to {args.out}")
    return info


if __name__ == "__main__":
    main()
