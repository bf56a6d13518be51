"""Where RL moved the logits of the score digits "0".."9": the level shared by every scene (what a
constant confidence states) against the part that varies from scene to scene (what could rank).

    python -m vlcal_jax.readout --model_path RUN/model --warm_start RUN/warm_start --data_dir SCENES

RUN/model is a run's model after RL (its export), RUN/warm_start its weights before RL. Both models
read the after-RL model's greedy answers to the held-out scenes (teacher-forced), at the state
from which each answer states its vision confidence. The ten digits' logits there are centred over
the digits (a shift shared by all ten does not change the softmax) and split into the level (the
range over digits of their mean over scenes) and the scene part (their standard deviation over
scenes, averaged over digits). RL's change of the logits is split the same way into the part from
the digits' rows (the state before RL times the rows' change) and the part from the state (the
state's change times the rows after RL). README, "Where the updates go".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any, Sequence

import numpy as np

from vlcal_jax import cli
from vlcal_jax import probe as probe_cli
from vlcal_jax.eval import evaluate as evaluation
from vlcal_jax.eval import probe
from vlcal_jax.evaluate import load_examples
from vlcal_jax.models import text
from vlcal_jax.rl import rollout
from vlcal_jax.training import export

MAX_NEW_TOKENS = 128
log = logging.getLogger("vlcal_jax.readout")


def level_and_scene(logits) -> dict[str, float]:
    """Logits [N, 10] -> {"level": range over digits of the scene-mean centred logits, "scene": their
    standard deviation over the N scenes, averaged over digits}."""
    logits = np.asarray(logits, np.float64)
    centred = logits - logits.mean(1, keepdims=True)
    level = centred.mean(0)
    return {"level": float(level.max() - level.min()), "scene": float(centred.std(0).mean())}


def decompose(before_states, after_states, before_rows, after_rows) -> dict[str, dict[str, float]]:
    """States [N, D] and digit rows [10, D] before and after RL -> level_and_scene of the logits
    before, after, of the change from the rows (h0 dW) and from the states (dh W1); the two
    changes add up to the whole change."""
    h0, h1, w0, w1 = (np.asarray(x, np.float64) for x in (before_states, after_states, before_rows, after_rows))
    return {"logits_before": level_and_scene(h0 @ w0.T), "logits_after": level_and_scene(h1 @ w1.T),
            "change_from_the_rows": level_and_scene(h0 @ (w1 - w0).T),
            "change_from_the_states": level_and_scene((h1 - h0) @ w1.T)}


def _warm_start(directory: str, config, params):
    """(config, params) before RL. An export of rl.untie_head has an output projection that its
    warm start, a tied model, lacks: the warm start is then read without it."""
    try:
        return config, probe_cli.load_warm_start(directory, params)
    except (ValueError, KeyError, TypeError) as error:
        if "lm_head" not in params:
            raise
        tied = {k: v for k, v in params.items() if k != "lm_head"}
        log.info("warm start read as a tied model (%s)", type(error).__name__)
        return (dataclasses.replace(config, tie_word_embeddings=True),
                probe_cli.load_warm_start(directory, tied))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True, help="the model after RL (a run's WORKDIR/model)")
    parser.add_argument("--warm_start", required=True, help="the weights before RL (the run's WORKDIR/warm_start)")
    parser.add_argument("--data_dir", required=True, help="the generated scenes (the run's WORKDIR/data)")
    parser.add_argument("--limit", type=int, default=500, help="held-out scenes read")
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    export.check_model_dir(args.model_path)
    examples = load_examples("scenes", args.data_dir, split="test", limit=args.limit)
    after_config, after, tokenizer, image_config = export.load_model_dir(args.model_path)
    before_config, before = _warm_start(args.warm_start, after_config, after)
    prompt = export.saved_prompt(args.model_path) or "decoupled"
    responses = [g.text for g in evaluation.generate_responses(
        after_config, after, tokenizer, image_config, examples, mode="decoupled", prompt=prompt,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=0.0)]
    width = after_config.text.hidden_size
    states = []
    for config, params in ((before_config, before), (after_config, after)):
        x, kept = probe.confidence_states(config, params, tokenizer, image_config, examples, responses, prompt=prompt,
                                          max_tokens=args.max_new_tokens, batch_size=args.batch_size)
        states.append(x[:, :width])
    if int(kept.sum()) < 2:
        raise ValueError(f"{args.model_path}: {int(kept.sum())} of {len(examples)} answers state both confidences; "
                         "the readout needs a model that answers in the decoupled format")
    ids = list(rollout.score_token_ids(tokenizer))
    rows = [np.asarray(text.lm_head_kernel(c, p)).T[ids] for c, p in ((before_config, before), (after_config, after))]
    return {"answers": int(kept.sum()), "state_norm": float(np.linalg.norm(states[0].mean(0))),
            "state_scene_spread": float(np.linalg.norm(states[0].std(0))), **decompose(*states, *rows)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    report = run(parse_args(argv))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    cli.run(main)
