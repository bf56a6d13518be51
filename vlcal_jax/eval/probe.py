"""What a model knows about its own errors: a linear probe on its hidden states at the
confidence tokens, set beside the confidence it states there.

RL can only change what the model says after `<vision_confidence>`; whether a better
confidence is within reach of the same forward pass is a separate question. The probe
answers it the way Kadavath et al. (2022, "Language models (mostly) know what they know")
do: the final hidden state [D] that predicts the stated digit, read by a logistic regression
fitted on the model's own greedy answers to training scenes and scored (AUROC) on held-out
ones. A probe far above the stated confidence's AUROC says the information is there and the
verbalised confidence has not learnt to use it; a probe near it says the model does not know.

Responses are teacher-forced from their re-tokenised text (what generate_responses returns),
so a state is the one the model would have at that point of the text.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax.eval import evaluate as evaluation
from vlcal_jax.eval import metrics as m
from vlcal_jax.rl import rollout, step

# the tags after which a response states its confidences, and its analysis of why (PAPER.md
# section 2): the state at each is the one that predicts the token right after the tag
POSITIONS = ("vision_confidence", "reasoning_confidence", "analysis")
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def token_positions(text: str, offsets: Sequence[tuple[int, int]], max_tokens: int) -> list[int] | None:
    """The index, among the response's tokens, of the first token that reaches past each tag of
    POSITIONS (from the tokenizer's character `offsets`; where the tag's ">" merged with the next
    word, the token holding both), or None when a tag is missing or that token lies beyond the
    first `max_tokens`."""
    found = []
    for name in POSITIONS:
        start = text.find(f"<{name}>")
        if start < 0:
            return None
        end = start + len(name) + 2
        index = next((i for i, (_, stop) in enumerate(offsets) if stop > end), None)
        if index is None or index >= max_tokens:
            return None
        found.append(index)
    return found


@functools.partial(jax.jit, static_argnums=(0, 3))
def _states(config, params, inputs, num_response, positions):
    """positions [B, P] -> the states [B, P * D] that predict those response tokens."""
    hidden = step.response_hidden(config, params, inputs, num_response)  # [B, M, D]
    picked = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, P, D]
    return picked.reshape(positions.shape[0], -1).astype(jnp.float32)


def confidence_states(config, params, tokenizer, image_config, examples: Sequence, responses: Sequence[str], *,
                      prompt: str, max_tokens: int, batch_size: int = 100):
    """Hidden states at the confidence tags of each (example, response) -> (states
    [N_kept, len(POSITIONS) * D] float32, kept [N] bool). A response without every tag (or
    with one past `max_tokens`) is left out; `kept` says which. Batches are padded to
    `batch_size` rows (the last with copies of its first), so one shape compiles once."""
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses; pass one response each")
    states, kept = [], np.zeros(len(examples), bool)
    for start in range(0, len(examples), batch_size):
        chunk = list(range(start, min(start + batch_size, len(examples))))
        tokens = np.zeros((batch_size, max_tokens), np.int32)
        lengths = np.ones(batch_size, np.int32)
        positions = np.zeros((batch_size, len(POSITIONS)), np.int32)
        for row, i in enumerate(chunk):
            encoded = tokenizer(responses[i], add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded["input_ids"][:max_tokens]
            found = token_positions(responses[i], encoded["offset_mapping"], max_tokens)
            tokens[row, :len(ids)], lengths[row] = ids, max(len(ids), 1)
            if found is not None:
                positions[row], kept[i] = found, True
        rows = [examples[i] for i in chunk]
        rows += [rows[0]] * (batch_size - len(rows))
        prompts = rollout.encode_examples(rows, tokenizer, config, image_config, mode=prompt)
        inputs = rollout.expand_for_responses(prompts.inputs, tokens, lengths, 1)
        out = np.asarray(_states(config, params, inputs, max_tokens, jnp.asarray(positions)))
        states.append(out[:len(chunk)][kept[chunk]])
    return np.concatenate(states), kept


@functools.partial(jax.jit, static_argnums=(3,))
def fit_logistic(features, labels, c, iterations: int = 30):
    """L2-regularised logistic regression by Newton's method: features [N, F], labels [N] in
    {0, 1}, c > 0 -> (weights [F], bias). Minimises 0.5 |w|^2 + c * sum of log-losses, the bias
    unpenalised: sklearn's LogisticRegression(C=c) objective (fit standardised features)."""
    x = jnp.concatenate([features, jnp.ones((features.shape[0], 1), features.dtype)], axis=1)
    y = labels.astype(x.dtype)
    penalty = jnp.ones(x.shape[1], x.dtype).at[-1].set(0.0)

    def newton(_, theta):
        p = jax.nn.sigmoid(x @ theta)
        gradient = c * x.T @ (p - y) + penalty * theta
        hessian = c * (x.T * (p * (1 - p))) @ x + jnp.diag(penalty + 1e-6)
        return theta - jnp.linalg.solve(hessian, gradient)

    theta = jax.lax.fori_loop(0, iterations, newton, jnp.zeros(x.shape[1], x.dtype))
    return theta[:-1], theta[-1]


def _scores(train_x, train_y, test_x, c):
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    weights, bias = fit_logistic(jnp.asarray((train_x - mean) / std), jnp.asarray(train_y), jnp.float32(c))
    return np.asarray(jax.nn.sigmoid(jnp.asarray((test_x - mean) / std) @ weights + bias), np.float64)


def choose_c(features, labels, *, grid: Sequence[float] = C_GRID, folds: int = 5, seed: int = 0) -> float:
    """The c of `grid` with the best mean cross-validated AUROC on (features [N, F], labels [N])
    alone: the held-out set never picks its own regularisation."""
    order = np.random.default_rng(seed).permutation(len(labels))
    fold = np.empty(len(labels), int)
    fold[order] = np.arange(len(labels)) % folds
    best, best_auroc = grid[0], -np.inf
    for c in grid:
        aurocs = []
        for k in range(folds):
            held = fold == k
            if labels[held].min() == labels[held].max() or labels[~held].min() == labels[~held].max():
                continue
            aurocs.append(m.auroc(_scores(features[~held], labels[~held], features[held], c), labels[held]))
        if aurocs and np.mean(aurocs) > best_auroc:
            best, best_auroc = c, float(np.mean(aurocs))
    return best


def probe_auroc(train_x, train_y, test_x, test_y, *, grid: Sequence[float] = C_GRID) -> dict[str, Any]:
    """Fits on the training states (c chosen by cross-validation on them) and scores the
    held-out ones: {"auroc", "interval" (bootstrap 95%), "c", "n_train", "n_test"}."""
    train_y, test_y = np.asarray(train_y, int), np.asarray(test_y, int)
    for name, labels in (("training", train_y), ("held-out", test_y)):
        if labels.min() == labels.max():
            raise ValueError(f"every {name} label is {labels[0]}: a probe needs right and wrong answers in both sets")
    c = choose_c(train_x, train_y, grid=grid)
    scores = _scores(train_x, train_y, test_x, c)
    return {"auroc": m.auroc(scores, test_y), "interval": m.bootstrap_intervals(scores, test_y)["auroc"],
            "c": c, "n_train": int(len(train_y)), "n_test": int(len(test_y))}


def stated_auroc(confidence, labels) -> dict[str, Any]:
    """The stated confidence's AUROC (a missing one counts as 0, as in every evaluation) with its
    bootstrap interval, from evaluate.calibration_metrics."""
    block = evaluation.calibration_metrics(confidence, labels)
    return {"auroc": block["auroc"], "interval": (block["auroc_low"], block["auroc_high"]), "n_test": block["n"]}
