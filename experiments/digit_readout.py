"""How RL changed the logits of the score digits "0".."9" at the vision-confidence digit: the part
shared by every scene (the stated level) against the part that varies from scene to scene (what
could rank). README, "Keeping the spread".

    python experiments/digit_readout.py --model_path RUN/model --warm_start RUN/warm_start \
        --data_dir outputs/cpu_demo/data

RUN/model is the model after RL (the demo's export); RUN/warm_start the weights before it. Both
read the after-RL model's greedy answers to the held-out scenes (teacher-forced), at the state
from which each states its vision confidence. Logits are centred over the ten digits (a shift
shared by all of them does not change the softmax); "level" is the range over digits of their
mean over scenes, "scene" the standard deviation over scenes, averaged over digits.
"""

import argparse
import json

import numpy as np

from vlcal_jax import probe as probe_cli
from vlcal_jax.eval import evaluate as evaluation
from vlcal_jax.eval import probe
from vlcal_jax.evaluate import load_examples
from vlcal_jax.models import text
from vlcal_jax.training import export


def digit_rows(config, params, ids):
    return np.asarray(text.lm_head_kernel(config, params)).T[ids]


def level_and_scene(logits):
    centred = logits - logits.mean(1, keepdims=True)
    level = centred.mean(0)
    return {"level": float(level.max() - level.min()), "scene": float(centred.std(0).mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", required=True)
    parser.add_argument("--warm_start", required=True)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--limit", type=int, default=500)
    args = parser.parse_args()
    examples = load_examples("scenes", args.data_dir, split="test", limit=args.limit)
    after_config, after, tokenizer, image_config = export.load_model_dir(args.model_path)
    before_config, before, _, _ = export.load_model_dir(args.model_path)
    if not before_config.tie_word_embeddings:  # an untied export (rl.untie_head): the warm start was tied
        from dataclasses import replace  # pylint: disable=import-outside-toplevel
        before_config = replace(before_config, tie_word_embeddings=True)
        before = {k: v for k, v in before.items() if k != "lm_head"}
    before = probe_cli._warm_start(args.warm_start, before)  # pylint: disable=protected-access
    prompt = export.saved_prompt(args.model_path) or "decoupled"
    responses = [g.text for g in evaluation.generate_responses(
        after_config, after, tokenizer, image_config, examples, mode="decoupled", prompt=prompt, batch_size=100,
        max_new_tokens=128, temperature=0.0)]
    width = after_config.text.hidden_size
    states = {}
    for name, (config, params) in {"before": (before_config, before), "after": (after_config, after)}.items():
        x, kept = probe.confidence_states(config, params, tokenizer, image_config, examples, responses, prompt=prompt,
                                          max_tokens=128)
        states[name] = x[:, :width]
    ids = [tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    w0, w1 = digit_rows(before_config, before, ids), digit_rows(after_config, after, ids)
    h0, h1 = states["before"], states["after"]
    report = {
        "answers": int(kept.sum()),
        "state_norm": float(np.linalg.norm(h0.mean(0))),
        "state_scene_spread": float(np.linalg.norm(h0.std(0))),
        "logits_before": level_and_scene(h0 @ w0.T),
        "logits_after": level_and_scene(h1 @ w1.T),
        "change_from_the_rows": level_and_scene(h0 @ (w1 - w0).T),
        "change_from_the_states": level_and_scene((h1 - h0) @ w1.T),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
