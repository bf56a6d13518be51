"""Held-out evaluation during training, and perception metrics on scene-world rollouts."""

from __future__ import annotations

import logging

import numpy as np

from vlcal_jax.data import scenes
from vlcal_jax.eval import metrics as M

log = logging.getLogger("vlcal_jax.train")


def perception_metrics(texts, examples, n: int, rewards: dict, mode: str = "decoupled") -> dict:
    """For scene-world prompts (ground truth known, PAPER.md section 8): how often the vision
    span is right, and how well the VCE soft label and the stated vision confidence rank it.

    texts [N] and every rewards array [N] are per response, N = len(examples) * n, the n
    responses of a prompt adjacent; only the responses to prompts with scene facts count, and
    only in the decoupled format (rlcr and plain responses have no <vision> span: {})."""
    return perception_summary(perception_correct(texts, examples, n, mode), rewards)


def perception_correct(texts, examples, n: int, mode: str = "decoupled") -> np.ndarray:
    """Whether each response's vision span is right [N] (1 / 0); NaN for prompts without scene
    facts, and for every response of a format without a <vision> span (mode rlcr or plain), as
    in evaluate.score_responses: unknown, not wrong."""
    row_examples = [ex for ex in examples for _ in range(n)]  # response i answers row_examples[i]
    scored = mode == "decoupled"
    return np.array([float(scenes.score_perception(text, ex).correct) if scored and "facts" in (ex.meta or {})
                     else np.nan for text, ex in zip(texts, row_examples)], float)


def perception_summary(correct, rewards: dict) -> dict:
    """perception_metrics from `perception_correct` [N] and the rewards [N] (of the whole batch)."""
    rows = np.flatnonzero(np.isfinite(correct))
    if not len(rows):
        return {}
    correct = np.asarray(correct, float)[rows]
    out = {"perception/correct": float(correct.mean())}
    for key, name in (("soft_label", "perception/auroc_soft_label"),
                      ("vision_confidence", "perception/auroc_vision_confidence")):
        values = np.asarray(rewards[key], float)[rows] if key in rewards else np.full(len(rows), np.nan)
        ok = np.isfinite(values)
        if ok.sum() > 1 and 0 < correct[ok].mean() < 1:
            out[name] = float(M.auroc(values[ok], correct[ok]))
    return out


def flatten_metrics(group: dict) -> dict:
    """evaluate()'s nested overall metrics -> flat scalars: accuracy, ece, auroc, brier,
    mean_confidence (combined confidence), vision_* (vs perception), reasoning_*."""
    out = {}
    for key, value in group.items():
        if isinstance(value, dict):
            prefix = "" if key == "confidence" else f"{key}_"
            out.update({f"{prefix}{k}": float(v) for k, v in value.items() if v is not None and np.isscalar(v)})
        elif value is not None and np.isscalar(value):
            out[key] = float(value)
    return out


class Evaluator:
    """Greedy/low-temperature evaluation of the current params on the held-out examples."""

    def __init__(self, config, model_config, tokenizer, image_config, examples, run_dir):
        self.config, self.model_config = config, model_config
        self.tokenizer, self.image_config = tokenizer, image_config
        self.examples, self.run_dir = examples, run_dir

    def run(self, params, *, tag: str, step: int, writer) -> dict:
        if not self.examples:
            return {}
        from vlcal_jax.eval.evaluate import evaluate

        e = self.config.eval
        result = evaluate(self.model_config, params, self.tokenizer, self.image_config, self.examples,
                          mode=self.config.rl.mode, prompt=self.config.rl.prompt, batch_size=e.batch_size,
                          max_new_tokens=self.config.rl.max_new_tokens, temperature=e.temperature,
                          top_p=e.top_p, seed=self.config.seed,
                          length_buckets=tuple(self.config.data.length_buckets), engine=e.engine,
                          slots=e.decode_slots,
                          out_dir=self.run_dir.local("eval", tag) if writer.enabled else None)
        if writer.enabled:  # process 0 writes; every process evaluates its share (eval.evaluate)
            self.run_dir.publish("eval", tag)
        overall = flatten_metrics(result.metrics["overall"])
        writer.write(step, {f"eval/{k}": v for k, v in overall.items()})
        log.info("eval %s: %s", tag, ", ".join(f"{k}={v:.3f}" for k, v in sorted(overall.items())
                                              if k in ("accuracy", "ece", "auroc", "mean_confidence")))
        return overall
