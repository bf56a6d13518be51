"""Does the model know when it is wrong? A linear probe on its hidden states at the confidence
tokens, beside the confidence it states (vlcal_jax.eval.probe).

    python -m vlcal_jax.probe --model_path outputs/cpu_demo/model --data_dir outputs/cpu_demo/data
    python -m vlcal_jax.probe --model_path outputs/cpu_demo/model --data_dir outputs/cpu_demo/data \
        --warm_start outputs/cpu_demo/warm_start --out eval_results/probe_before_rl

Answers --train scenes of the train split and --limit held-out scenes of the test split
greedily, fits a logistic regression (its L2 strength chosen by 5-fold cross-validation on
the training scenes) from the state that predicts the vision-confidence digit to whether the
answer is right and whether the <vision> span is right, and prints the held-out AUROCs with
bootstrap 95% intervals next to those of the stated confidences and of a confidence that
knows only the question type. Writes probe.json to --out. --warm_start probes the weights a
run saved in WORKDIR/warm_start (the model before RL) instead of --model_path's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Sequence

from vlcal_jax import cli
from vlcal_jax.eval import evaluate as evaluation
from vlcal_jax.eval import probe
from vlcal_jax.evaluate import load_examples
from vlcal_jax.training import checkpoints, export

log = logging.getLogger("vlcal_jax.probe")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlcal_jax.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help="HF-format model directory (a run's model/)")
    parser.add_argument("--data_dir", required=True,
                        help="a scene data set (train.parquet and test.parquet: a run's data/ or "
                             "`python -m vlcal_jax.data.scenes --out DIR`)")
    parser.add_argument("--warm_start", default=None,
                        help="a run's WORKDIR/warm_start: probe those weights (the model before RL), with "
                             "--model_path's architecture and tokenizer")
    parser.add_argument("--train", type=int, default=2000, help="training scenes the probe is fitted on")
    parser.add_argument("--limit", type=int, default=500, help="held-out scenes it is scored on")
    parser.add_argument("--out", default=os.path.join("eval_results", "probe"), help="output directory")
    parser.add_argument("--prompt", default=None,
                        help="instruction (processing.INSTRUCTIONS); default: the model directory's vlcal_jax.json")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    args = parser.parse_args(argv)
    for name in ("train", "limit", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    return args


def _answers(config, params, tokenizer, image_config, examples, args, prompt):
    generations = evaluation.generate_responses(config, params, tokenizer, image_config, examples, mode="decoupled",
                                                prompt=prompt, batch_size=args.batch_size,
                                                max_new_tokens=args.max_new_tokens, temperature=0.0)
    records = evaluation.score_responses(examples, generations, mode="decoupled")
    states, kept = probe.confidence_states(config, params, tokenizer, image_config, examples,
                                           [g.text for g in generations], prompt=prompt,
                                           max_tokens=args.max_new_tokens, batch_size=args.batch_size)
    if kept.sum() < 10:
        raise ValueError(f"{args.model_path}: only {int(kept.sum())} of {len(examples)} answers state both confidences "
                         "(<vision_confidence> and <reasoning_confidence>); the probe needs a model that answers in "
                         "the decoupled format, e.g. a run's WORKDIR/model")
    return [r for r, k in zip(records, kept) if k], states, int((~kept).sum())


def load_warm_start(directory: str, params):
    """`params` restored from a run's WORKDIR/warm_start (the model before RL), with a clear error
    when the directory is missing or holds no finished warm start."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--warm_start {directory}: no such directory; pass a run's WORKDIR/warm_start")
    store = checkpoints.ParamsStore(os.path.abspath(directory))
    try:
        restored = store.restore(params)
    finally:
        store.close()
    if restored is None:
        raise ValueError(f"--warm_start {directory}: no readable warm start there (an unfinished run's is "
                         "written only when its warm start ends)")
    return restored


def run(args: argparse.Namespace) -> dict[str, Any]:
    export.check_model_dir(args.model_path)
    prompt = args.prompt or export.saved_prompt(args.model_path) or "decoupled"
    train = load_examples("scenes", args.data_dir, split="train", limit=args.train)
    test = load_examples("scenes", args.data_dir, split="test", limit=args.limit)
    config, params, tokenizer, image_config = export.load_model_dir(args.model_path)
    if args.warm_start:
        params = load_warm_start(args.warm_start, params)
    train_records, train_x, train_missing = _answers(config, params, tokenizer, image_config, train, args, prompt)
    test_records, test_x, test_missing = _answers(config, params, tokenizer, image_config, test, args, prompt)
    log.info("%d training and %d held-out answers state both confidences (%d and %d left out)",
             len(train_records), len(test_records), train_missing, test_missing)
    width = train_x.shape[1] // len(probe.POSITIONS)
    vision = slice(0, width)
    right = lambda records: [r["correct"] for r in records]  # noqa: E731
    seen = lambda records: [bool(r["perception_correct"]) for r in records]  # noqa: E731
    by_type = evaluation.accuracy_by_question_type(test_records)
    report = {
        "answer_right": {
            "probe_vision_confidence_state": probe.probe_auroc(train_x[:, vision], right(train_records),
                                                               test_x[:, vision], right(test_records)),
            "probe_all_states": probe.probe_auroc(train_x, right(train_records), test_x, right(test_records)),
            "stated_confidence": probe.stated_auroc([r["confidence"] for r in test_records], right(test_records)),
            "question_type_ceiling": None if by_type is None else by_type["auroc_ceiling"],
        },
        "vision_span_right": {
            "probe_vision_confidence_state": probe.probe_auroc(train_x[:, vision], seen(train_records),
                                                               test_x[:, vision], seen(test_records)),
            "stated_vision_confidence": probe.stated_auroc([r["vision_confidence"] for r in test_records],
                                                           seen(test_records)),
        },
        "accuracy": float(sum(right(test_records)) / len(test_records)),
        "perception_accuracy": float(sum(seen(test_records)) / len(test_records)),
        "left_out": {"train": train_missing, "test": test_missing},
        "settings": {"model_path": os.path.abspath(args.model_path), "data_dir": os.path.abspath(args.data_dir),
                     "warm_start": args.warm_start and os.path.abspath(args.warm_start),
                     "train": args.train, "limit": args.limit, "prompt": prompt,
                     "max_new_tokens": args.max_new_tokens, "positions": list(probe.POSITIONS)},
    }
    return report


def table(report: dict[str, Any]) -> str:
    """The AUROCs as a markdown table."""
    def cell(entry):
        if entry is None:
            return "-"
        if isinstance(entry, float):
            return f"{entry:.3f}"
        low, high = entry["interval"]
        return f"{entry['auroc']:.3f} [{low:.3f}, {high:.3f}]"

    a, v = report["answer_right"], report["vision_span_right"]
    return "\n".join([
        "| held-out AUROC of ... | answer right | <vision> span right |",
        "|---|---|---|",
        f"| probe on the state at the vision-confidence digit | {cell(a['probe_vision_confidence_state'])} | "
        f"{cell(v['probe_vision_confidence_state'])} |",
        f"| probe on the states at both digits and the analysis | {cell(a['probe_all_states'])} | - |",
        f"| stated confidence (combined / vision) | {cell(a['stated_confidence'])} | "
        f"{cell(v['stated_vision_confidence'])} |",
        f"| question type only (ceiling) | {cell(a['question_type_ceiling'])} | - |",
        "",
        f"accuracy {report['accuracy']:.3f}, <vision> span right {report['perception_accuracy']:.3f}, "
        f"{a['stated_confidence']['n_test']} held-out answers",
    ])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "probe.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(table(report))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    cli.run(main)
