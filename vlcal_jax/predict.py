"""One image and a question -> the answer with its vision and reasoning confidence.

    python -m vlcal_jax.predict --model_path DIR --image photo.png --question "How many red circles?"

Prints the boxed answer, the stated vision and reasoning confidences (PAPER.md section 2,
0..1), their harmonic combination (section 3) and the full response. Greedy by default
(--temperature 0); --mode rlcr / plain for the baseline formats; --prompt picks the
instruction when it is not the one the model directory records (vlcal_jax.json).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

import PIL.Image

from vlcal_jax import cli, processing
from vlcal_jax.data import Example
from vlcal_jax.eval import evaluate as evaluation
from vlcal_jax.rl import format as rformat
from vlcal_jax.training import export


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """An RGB PIL image from a file; errors name the file and what to pass instead."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path}: no such file; pass the path of a PNG or JPEG image")
    return PIL.Image.fromarray(processing.load_rgb(path))


def predict(config, params, tokenizer, image_config, images: Sequence[Any], question: str, *,
            mode: str = "decoupled", prompt: str | None = None, temperature: float = 0.0, top_p: float = 1.0,
            max_new_tokens: int = evaluation.DEFAULT_MAX_NEW_TOKENS, seed: int = 0) -> dict[str, Any]:
    """-> {answer, vision_confidence, reasoning_confidence, confidence, format_ok, response,
    num_tokens, truncated}; confidences in [0, 1] or None when the response states none.

    `question` may mark image positions with `<image>`; without them the images come first.
    `mode` is the response format, `prompt` the instruction (see eval.evaluate.generate_responses).
    """
    if not question or not question.strip():
        raise ValueError("the question is empty; pass --question \"...\"")
    example = Example(id="input", question=question, images=list(images), answer="")
    generation, = evaluation.generate_responses(config, params, tokenizer, image_config, [example], mode=mode,
                                                prompt=prompt, batch_size=1, max_new_tokens=max_new_tokens,
                                                temperature=temperature, top_p=top_p, seed=seed)
    record, = evaluation.score_responses([example], [generation], mode=mode)
    keys = ("answer", "vision_confidence", "reasoning_confidence", "confidence", "format_ok", "response",
            "num_tokens", "truncated")
    return {key: record[key] for key in keys}


def format_prediction(prediction: dict[str, Any]) -> str:
    """The lines the CLI prints."""
    def number(value):
        return "missing" if value is None else f"{value:.3f}"

    return "\n".join([
        f"answer: {prediction['answer'] if prediction['answer'] is not None else 'missing'}",
        f"vision confidence: {number(prediction['vision_confidence'])}",
        f"reasoning confidence: {number(prediction['reasoning_confidence'])}",
        f"combined confidence: {number(prediction['confidence'])}",
        f"format ok: {prediction['format_ok']}",
        f"tokens: {prediction['num_tokens']}{' (truncated)' if prediction['truncated'] else ''}",
        "response:",
        prediction["response"],
    ])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlcal_jax.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help="HF-format model directory (vlcal_jax.training.export)")
    parser.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--mode", default="decoupled", choices=rformat.MODES, help="response format")
    parser.add_argument("--prompt", default=None,
                        help="instruction (processing.INSTRUCTIONS); default: the model directory's vlcal_jax.json, "
                             "else --mode")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--max_new_tokens", type=int, default=evaluation.DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on TPU/GPU), float32, ...")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    image = load_image(args.image)
    export.check_model_dir(args.model_path)
    prompt = args.prompt or export.saved_prompt(args.model_path)
    evaluation.check_settings(args.mode, prompt, 1, args.max_new_tokens, args.temperature, args.top_p)
    config, params, tokenizer, image_config = export.load_model_dir(args.model_path,
                                                                    dtype=export.resolve_dtype(args.dtype))
    prediction = predict(config, params, tokenizer, image_config, [image], args.question, mode=args.mode,
                         prompt=prompt, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(format_prediction(prediction))
    return prediction


if __name__ == "__main__":
    cli.run(main, log=False)
