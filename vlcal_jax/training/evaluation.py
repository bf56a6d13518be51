"""Held-out evaluation during training, and perception metrics on scene-world rollouts."""

from __future__ import annotations

import logging

import numpy as np

from vlcal_jax.data import scenes
from vlcal_jax.eval import metrics as M

log = logging.getLogger("vlcal_jax.train")


def perception_metrics(texts, examples, n: int, rewards: dict) -> dict:
    """For scene-world prompts (ground truth known, PAPER.md section 8): how often the vision
    span is right, and how well the VCE soft label and the stated vision confidence rank it.

    texts [N] and every rewards array [N] are per response, N = len(examples) * n, the n
    responses of a prompt adjacent; only the responses to prompts with scene facts count."""
    row_examples = [ex for ex in examples for _ in range(n)]  # response i answers row_examples[i]
    rows = [i for i, ex in enumerate(row_examples) if "facts" in (ex.meta or {})]
    if not rows:
        return {}
    correct = np.array([scenes.score_perception(texts[i], row_examples[i]).correct for i in rows], float)
    out = {"perception/correct": float(correct.mean())}
    for key, name in (("soft_label", "perception/auroc_soft_label"),
                      ("vision_confidence", "perception/auroc_vision_confidence")):
        values = np.asarray(rewards.get(key, np.full(len(texts), np.nan)), float)[rows]
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
                          length_buckets=tuple(self.config.data.length_buckets),
                          out_dir=self.run_dir.local("eval", tag))
        self.run_dir.publish("eval", tag)
        overall = flatten_metrics(result.metrics["overall"])
        writer.write(step, {f"eval/{k}": v for k, v in overall.items()})
        log.info("eval %s: %s", tag, ", ".join(f"{k}={v:.3f}" for k, v in sorted(overall.items())
                                              if k in ("accuracy", "ece", "auroc", "mean_confidence")))
        return overall
