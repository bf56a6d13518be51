"""The evaluation loop: examples -> responses -> graded records -> calibration metrics and reports.

    result = evaluate(config, params, tokenizer, image_config, examples, out_dir="eval/")
    print(result.table())

Generation follows the validation setting of PAPER.md section 6 (temperature 0.6, top_p
0.95, one response per question; temperature 0 is greedy). Examples go to the device in
batches of `batch_size`, the last one padded with copies of its final example, and prompts
are left-padded to a few length buckets, so a whole evaluation compiles a handful of
programs. The device samples batch k+1 while the host decodes and grades batch k.
With several processes (a multi-host run) each process encodes and decodes its share of
every batch (the batch is one global array); the responses are then gathered, so every
process returns the same list, in example order, and `evaluate` grades every P-th response
on each of the P processes and gathers the records.

Each response becomes a record (`score_responses`): the parsed answer graded against the
gold one, the two stated confidences (PAPER.md section 2), their harmonic combination
Phi (section 3) and, for scene-world examples, whether the `<vision>` span states the
scene's facts right (section 8). `summarize` turns records into metrics, overall and per
category (see `group_metrics` for the keys).

Missing confidences: a response whose confidence block does not parse has no confidence;
its record holds None, the metrics count it under "missing", and ECE / AUROC / Brier /
AURC score it as confidence 0 (a model that states nothing claims nothing). Accuracy
counts every response, an unparseable one as wrong.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlcal_jax import parallel, processing, sampling
from vlcal_jax.data import scenes
from vlcal_jax.eval import metrics as m
from vlcal_jax.eval import plots
from vlcal_jax.parallel import multihost
from vlcal_jax.rl import format as rformat
from vlcal_jax.rl import rewards, rollout
from vlcal_jax.rl.grading import grade_answer

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 4096  # PAPER.md section 6: max response length
DEFAULT_LENGTH_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
N_BINS = 10  # PAPER.md section 7: ECE over 10 equal-width bins
OVERALL = "overall"


@dataclasses.dataclass(frozen=True)
class Generation:
    """One response: its text (without the end-of-sequence token), token count (EOS included)
    and whether it ended with EOS before `max_new_tokens` (False: truncated)."""

    text: str
    num_tokens: int
    finished: bool


def eos_token_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end a response: the tokenizer's eos plus Qwen's `<|im_end|>` and
    `<|endoftext|>` (Qwen3-VL-Instruct's generation_config stops on both)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    ids.discard(None)
    if not ids:
        raise ValueError("the tokenizer has no eos token and no <|im_end|>; "
                         "load it with the checkpoint's tokenizer_config.json")
    return tuple(sorted(int(i) for i in ids))


def check_settings(mode: str, prompt: str | None, batch_size: int, max_new_tokens: int, temperature: float,
                    top_p: float) -> None:
    """Raises ValueError for a setting `generate_responses` cannot use (before any work is done)."""
    if mode not in rformat.MODES:
        raise ValueError(f"mode={mode!r}; choose one of {rformat.MODES}")
    if (prompt or mode) not in processing.INSTRUCTIONS:
        raise ValueError(f"prompt={prompt!r}; choose one of {sorted(processing.INSTRUCTIONS)}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="ex", disable=None, dynamic_ncols=True)


def generate_responses(config, params, tokenizer, image_config, examples: Sequence, *, mode: str = "decoupled",
                       prompt: str | None = None, batch_size: int = 8,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float = 0.6, top_p: float = 0.95,
                       seed: int = 0, length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
                       engine: str = "continuous", slots: int = 0) -> list[Generation]:
    """One response per example, in example order (see the module docstring for batching).

    `mode` is the response format (rl.format.MODES); `prompt` names the instruction the
    model was trained with (a key of processing.INSTRUCTIONS, default: `mode`). `engine` and
    `slots`: the sampler (sampling.sample; slots per batch, 0: sampling.default_slots).

    Batch k samples with `jax.random.fold_in(jax.random.key(seed), k)`, so a result depends
    only on the seed, the batch size and the example order.
    """
    check_settings(mode, prompt, batch_size, max_new_tokens, temperature, top_p)
    if engine not in sampling.ENGINES or slots < 0:
        raise ValueError(f"engine={engine!r}, slots={slots}: the engine is one of {sampling.ENGINES}, slots >= 0")
    examples = list(examples)
    if not examples:
        raise ValueError("no examples to evaluate")
    eos, pad = eos_token_ids(tokenizer), tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token = '<|endoftext|>' (Qwen's pad)")
    key = jax.random.key(seed)
    bar = _progress(len(examples), "evaluate") if jax.process_index() == 0 else None
    count, p = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the {count} processes")
    share = batch_size // count
    mesh = parallel.mesh_of(params)
    out: list[list[Generation]] = []  # this process's responses, batch by batch

    def collect(real: int, sample: sampling.SampleOutput) -> None:
        finished = multihost.local_rows(sample.finished)[:real]
        lengths = multihost.local_rows(sample.lengths)[:real]
        tokens = multihost.local_rows(sample.tokens)[:real]
        texts, _, _ = rollout.decode_responses(tokenizer, tokens, lengths - finished, mode)
        out.append([Generation(t, int(n), bool(f)) for t, n, f in zip(texts, lengths, finished)])
        if bar is not None:
            bar.update(real * count)

    pending = None
    for index, start in enumerate(range(0, len(examples), batch_size)):
        chunk = examples[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        try:
            batch = rollout.encode_examples(padded[p * share:(p + 1) * share], tokenizer, config, image_config,
                                            mode=prompt or mode, length_buckets=tuple(length_buckets),
                                            same_shapes_everywhere=count > 1)
        except ValueError as error:
            raise ValueError(f"examples {[ex.id for ex in chunk]}: {error}") from error
        inputs = batch.inputs
        if count > 1:
            inputs = multihost.offset_image_index(inputs, config.image_token_id, config.vision.merge_unit)
            inputs = multihost.to_global(inputs, mesh, what="evaluation batch")
        with parallel.use_mesh(mesh):  # rows split over the mesh the params are on
            sample = sampling.sample(
                config, params, inputs, jax.random.fold_in(key, index), jnp.float32(temperature or 1.0),
                jnp.float32(top_p), max_new_tokens=int(max_new_tokens), n=1, greedy=temperature == 0, top_k=0,
                eos_token_ids=eos, pad_token_id=int(pad), use_top_p=top_p < 1.0, engine_name=engine, slots=slots)
        if pending is not None:
            collect(*pending)
        pending = (min(max(len(chunk) - p * share, 0), share), sample)
    collect(*pending)
    if bar is not None:
        bar.close()
    if count == 1:
        return [g for part in out for g in part]
    gathered = multihost.allgather_json([[dataclasses.astuple(g) for g in part] for part in out])
    return [Generation(*g) for b in range(len(out)) for part in gathered for g in part[b]]


def has_scene_facts(example) -> bool:
    """Whether the example carries the scene graph and facts that `score_perception` checks."""
    meta = getattr(example, "meta", None) or {}
    return meta.get("scene") is not None and meta.get("facts") is not None


def _combined(parsed: rformat.ParsedResponse) -> float | None:
    if parsed.mode == "rlcr":
        return parsed.confidence
    if parsed.mode != "decoupled" or parsed.vision_confidence is None or parsed.reasoning_confidence is None:
        return None
    return float(rewards.harmonic_confidence(parsed.vision_confidence, parsed.reasoning_confidence))


def score_responses(examples: Sequence, responses: Sequence[str | Generation], *,
                    mode: str = "decoupled") -> list[dict[str, Any]]:
    """Examples and their responses -> one JSON-ready record each.

    Keys: id, category, question, gold, answer (last `\\boxed{}` or None), correct,
    vision_confidence, reasoning_confidence (0..1 or None), confidence (Phi for
    "decoupled", the single score for "rlcr", None when missing or for "plain"),
    format_ok, perception_correct (None unless the example carries scene facts and `mode` is
    "decoupled", the format with a `<vision>` span),
    perception_missing / perception_wrong (facts not stated / stated wrong), response,
    num_tokens and truncated (None when given plain strings), difficulty (the scene world's
    difficulty score in [0, 1], None for other data), question_type (the example's
    `question_type` field: the scene world's question type, MathVista's multi_choice / free_form;
    None when the data has none).
    """
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses; pass one response each")
    records = []
    for example, response in zip(examples, responses):
        generation = response if isinstance(response, Generation) else Generation(str(response), 0, True)
        text = generation.text
        parsed = rformat.parse_response(text, mode=mode)
        # only the decoupled format states a <vision> span to score; elsewhere perception is unknown, not wrong
        scored = mode == "decoupled" and has_scene_facts(example)
        perception = scenes.score_perception(text, example) if scored else None
        records.append({
            "id": example.id,
            "category": example.category or "",
            "question": example.question,
            "gold": example.answer,
            "answer": parsed.answer,
            "correct": bool(parsed.answer is not None and grade_answer(parsed.answer, example.answer,
                                                                       example.choices)),
            "vision_confidence": parsed.vision_confidence,
            "reasoning_confidence": parsed.reasoning_confidence,
            "confidence": _combined(parsed),
            "format_ok": bool(parsed.format_ok),
            "perception_correct": None if perception is None else bool(perception.correct),
            "perception_missing": None if perception is None else list(perception.missing),
            "perception_wrong": None if perception is None else list(perception.wrong),
            "difficulty": _difficulty(example),
            "question_type": (example.meta or {}).get("question_type"),
            "response": text,
            "num_tokens": generation.num_tokens if isinstance(response, Generation) else None,
            "truncated": (not generation.finished) if isinstance(response, Generation) else None,
        })
    return records


def _difficulty(example) -> float | None:
    value = (example.meta or {}).get("difficulty")
    return None if value is None else float(value)


def accuracy_by_difficulty(records: Sequence[dict[str, Any]], parts: int = 5) -> dict[str, Any] | None:
    """Accuracy per fifth (`parts`) of the records ranked by the scene world's difficulty score
    (ties broken by id, so the split is fixed), easiest first: {"accuracy": [...], "gap": easiest
    - hardest}; None without difficulty scores or with fewer records than parts."""
    scored = [r for r in records if r.get("difficulty") is not None]
    if len(scored) < parts:
        return None
    ranked = sorted(scored, key=lambda r: (r["difficulty"], r["id"]))
    accuracy = [float(np.mean([r["correct"] for r in chunk])) for chunk in np.array_split(np.array(ranked), parts)]
    return {"accuracy": accuracy, "gap": accuracy[0] - accuracy[-1]}


def accuracy_by_question_type(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Accuracy per question type (the records' `question_type`: the scene world's count, exist,
    sum, ...), and the ranking a confidence could reach
    knowing nothing but the question type: "auroc_ceiling", the AUROC against correctness of each
    record's question-type accuracy measured on the other half of the records (two folds by
    id order, so a record never scores with its own outcome). A stated confidence that ranks
    errors better than this uses more than the question (its own perception, the scene); one
    below it has not learnt even which questions are hard. None without question types, or
    when every answer is right or every one wrong."""
    typed = sorted((r for r in records if r.get("question_type")), key=lambda r: r["id"])
    correct = np.array([r["correct"] for r in typed], bool)
    if len(typed) < 2 or correct.all() or not correct.any():
        return None
    types = [r["question_type"] for r in typed]
    fold = np.arange(len(typed)) % 2
    score = np.empty(len(typed))
    for f in (0, 1):
        other = {t: [] for t in types}
        for t, c, k in zip(types, correct, fold):
            if k != f:
                other[t].append(c)
        prior = float(correct[fold != f].mean())
        for i in np.flatnonzero(fold == f):
            score[i] = float(np.mean(other[types[i]])) if other[types[i]] else prior
    accuracy = {t: float(np.mean([c for u, c in zip(types, correct) if u == t])) for t in sorted(set(types))}
    return {"accuracy": accuracy, "auroc_ceiling": float(m.auroc(score, correct))}


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def _missing_as_zero(values) -> np.ndarray:
    return np.array([0.0 if v is None else v for v in values], np.float64)


def calibration_metrics(confidence: Sequence[float | None], correct: Sequence[bool],
                        n_bins: int = N_BINS) -> dict[str, Any]:
    """ECE (paper bins), AUROC, Brier, AURC and the mean of `confidence [N]` against `correct [N]`.

    None confidences count under "missing" and score as 0. AUROC is None when every
    answer is right or every one wrong (undefined).
    """
    missing = sum(c is None for c in confidence)
    conf = _missing_as_zero(confidence)
    corr = np.asarray(correct, bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        area = m.auroc(conf, corr)
    intervals = m.bootstrap_intervals(conf, corr, n_bins=n_bins)
    ece_ci, auroc_ci = intervals["ece"], intervals["auroc"]
    return {"n": int(conf.size), "missing": int(missing), "mean_confidence": float(conf.mean()),
            "ece": m.ece(conf, corr, n_bins, "paper"), "auroc": _finite_or_none(area),
            "brier": m.brier(conf, corr), "aurc": m.aurc(conf, corr),
            # percentile bootstrap 95% intervals over the examples (1000 resamples, seed 0)
            # how many of the reliability diagram's bins hold >= 10% of the answers (1: a collapse)
            "bins_over_10pct": int(np.sum(m.reliability_data(conf, corr, n_bins, "paper").count >= 0.1 * conf.size)),
            "ece_low": _finite_or_none(ece_ci[0]), "ece_high": _finite_or_none(ece_ci[1]),
            "auroc_low": _finite_or_none(auroc_ci[0]), "auroc_high": _finite_or_none(auroc_ci[1])}


def group_metrics(records: Sequence[dict[str, Any]], mode: str = "decoupled") -> dict[str, Any]:
    """Metrics of one group of records.

    n, accuracy, format_rate, missing_confidence, truncated (count; None if unknown),
    mean_tokens, perception_accuracy (None without scene facts), by_difficulty
    (`accuracy_by_difficulty`, None without scene difficulty scores), by_question_type
    (`accuracy_by_question_type`, None without question types), and calibration blocks
    (`calibration_metrics`, None where they do not apply):
      confidence: Phi (or the RLCR score) vs answer correctness; the paper's metric.
      vision: vision confidence vs perception correctness (scene-world records only).
      reasoning: reasoning confidence vs answer correctness.
      reasoning_given_perception: the same over the records whose perception was right.
    """
    records = list(records)
    if not records:
        raise ValueError("group_metrics got no records")
    correct = [r["correct"] for r in records]
    tokens = [r["num_tokens"] for r in records if r.get("num_tokens") is not None]
    truncated = [r["truncated"] for r in records if r.get("truncated") is not None]
    seen = [r for r in records if r["perception_correct"] is not None]
    out: dict[str, Any] = {
        "n": len(records),
        "accuracy": m.accuracy(correct),
        "format_rate": float(np.mean([r["format_ok"] for r in records])),
        "missing_confidence": None if mode == "plain" else sum(r["confidence"] is None for r in records),
        "truncated": int(sum(truncated)) if truncated else None,
        "mean_tokens": float(np.mean(tokens)) if tokens else None,
        "perception_accuracy": float(np.mean([r["perception_correct"] for r in seen])) if seen else None,
        "by_difficulty": accuracy_by_difficulty(records),
        "by_question_type": accuracy_by_question_type(records),
        "confidence": None, "vision": None, "reasoning": None, "reasoning_given_perception": None,
    }
    if mode != "plain":
        out["confidence"] = calibration_metrics([r["confidence"] for r in records], correct)
    if mode == "decoupled":
        out["reasoning"] = calibration_metrics([r["reasoning_confidence"] for r in records], correct)
        if seen:
            out["vision"] = calibration_metrics([r["vision_confidence"] for r in seen],
                                                [r["perception_correct"] for r in seen])
            right = [r for r in seen if r["perception_correct"]]
            if right:
                out["reasoning_given_perception"] = calibration_metrics(
                    [r["reasoning_confidence"] for r in right], [r["correct"] for r in right])
    return out


def summarize(records: Sequence[dict[str, Any]], mode: str = "decoupled") -> dict[str, Any]:
    """{"overall": group_metrics(all), "categories": {category: group_metrics(its records)}}."""
    by_category: dict[str, list] = {}
    for record in records:
        by_category.setdefault(record["category"], []).append(record)
    return {OVERALL: group_metrics(records, mode),
            "categories": {c: group_metrics(rs, mode) for c, rs in sorted(by_category.items())}}


def _cell(block: dict | None, key: str) -> str:
    value = None if block is None else block.get(key)
    return "-" if value is None else f"{value:.3f}"


def metrics_table(summary: dict[str, Any]) -> str:
    """A markdown table: one row per category, then the overall row."""
    header = ["category", "n", "acc", "format", "ECE", "AUROC", "Brier", "vis ECE", "vis AUROC", "perc acc",
              "reas ECE", "reas AUROC", "no conf"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    rows = list(summary["categories"].items()) if len(summary["categories"]) > 1 else []
    for name, group in rows + [(f"**{OVERALL}**", summary[OVERALL])]:
        cells = [name or "(none)", str(group["n"]), f"{group['accuracy']:.3f}", f"{group['format_rate']:.3f}",
                 _cell(group["confidence"], "ece"), _cell(group["confidence"], "auroc"),
                 _cell(group["confidence"], "brier"), _cell(group["vision"], "ece"), _cell(group["vision"], "auroc"),
                 _cell(group, "perception_accuracy"), _cell(group["reasoning"], "ece"),
                 _cell(group["reasoning"], "auroc"),
                 "-" if group["missing_confidence"] is None else str(group["missing_confidence"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class EvalResult:
    """records: `score_responses` output; metrics: `summarize` output; settings: how it ran."""

    records: list[dict[str, Any]]
    metrics: dict[str, Any]
    settings: dict[str, Any]

    def table(self) -> str:
        return metrics_table(self.metrics)

    def save(self, out_dir: str | os.PathLike) -> dict[str, str]:
        """Writes records.jsonl, metrics.json ({"settings", "metrics"}), table.md and
        reliability_{confidence,vision,reasoning}.png (those that apply); returns name -> path."""
        out_dir = os.fspath(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        paths = {name: os.path.join(out_dir, name) for name in ("records.jsonl", "metrics.json", "table.md")}
        with open(paths["records.jsonl"], "w", encoding="utf-8") as f:
            for record in self.records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        with open(paths["metrics.json"], "w", encoding="utf-8") as f:
            json.dump({"settings": self.settings, "metrics": self.metrics}, f, indent=2)
        with open(paths["table.md"], "w", encoding="utf-8") as f:
            f.write(self.table())
        for name, (confidence, correct, title) in self._diagrams().items():
            paths[name] = os.path.join(out_dir, name)
            plots.reliability_diagram(confidence, correct, paths[name], N_BINS, title=title)
        return paths

    def _diagrams(self) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
        overall, records = self.metrics[OVERALL], self.records
        zero = _missing_as_zero
        out = {}
        if overall["confidence"] is not None:
            out["reliability_confidence.png"] = (zero(r["confidence"] for r in records),
                                                 np.array([r["correct"] for r in records]),
                                                 "Combined confidence vs answer")
        if overall["vision"] is not None:
            seen = [r for r in records if r["perception_correct"] is not None]
            out["reliability_vision.png"] = (zero(r["vision_confidence"] for r in seen),
                                             np.array([r["perception_correct"] for r in seen]),
                                             "Vision confidence vs perception")
        if overall["reasoning"] is not None:
            out["reliability_reasoning.png"] = (zero(r["reasoning_confidence"] for r in records),
                                                np.array([r["correct"] for r in records]),
                                                "Reasoning confidence vs answer")
        return out


def evaluate(config, params, tokenizer, image_config, examples: Sequence, *, mode: str = "decoupled",
             prompt: str | None = None, batch_size: int = 8, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             temperature: float = 0.6, top_p: float = 0.95, seed: int = 0,
             length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
             out_dir: str | os.PathLike | None = None, engine: str = "continuous", slots: int = 0) -> EvalResult:
    """Generates one response per example, grades it and computes the metrics (module docstring).

    `mode`: the response format ("decoupled", "rlcr" or "plain"); `prompt`: the instruction
    (processing.INSTRUCTIONS, default `mode`); `engine`, `slots`: the sampler (see
    `generate_responses`). With `out_dir`, also writes the files of `EvalResult.save` there.
    """
    examples = list(examples)
    compiled = sampling.compile_count()
    started = time.perf_counter()
    generations = generate_responses(config, params, tokenizer, image_config, examples, mode=mode,
                                     prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, seed=seed, length_buckets=length_buckets,
                                     engine=engine, slots=slots)
    seconds = time.perf_counter() - started
    if multihost.multiprocess():  # each process grades every count-th response; the records are gathered
        count, p = jax.process_count(), jax.process_index()
        parts = multihost.allgather_json(score_responses(examples[p::count], generations[p::count], mode=mode))
        records = [None] * len(examples)
        for q, part in enumerate(parts):
            records[q::count] = part
    else:
        records = score_responses(examples, generations, mode=mode)
    total_tokens = int(sum(g.num_tokens for g in generations))
    settings = {"mode": mode, "prompt": prompt or mode, "n_examples": len(examples), "batch_size": batch_size,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "engine": engine, "decode_slots": slots,
                "n_bins": N_BINS, "ece_convention": "paper", "missing_confidence_as": 0.0,
                "generation_seconds": round(seconds, 3), "generated_tokens": total_tokens,
                "tokens_per_second": round(total_tokens / max(seconds, 1e-9), 1),
                "compiled_programs": sampling.compile_count() - compiled}
    log.info("evaluated %d examples in %.1f s (%d tokens, %d new compiled programs)", len(examples), seconds,
             total_tokens, settings["compiled_programs"])
    result = EvalResult(records, summarize(records, mode), settings)
    if out_dir is not None:
        result.save(out_dir)
    return result
