"""The scene study: the paper's ablation ladder (PAPER.md section 7) on the scene world, where the
perception ground truth is known (section 8), from one warm start, over several seeds.

    python -m vlcal_jax.study --config experiments/scene_study.py [--config.seeds=0,1,2 ...]
    results = study.run_study(config)   # what that command does

Stages (every one resumable: a rerun skips what is on disk):
1. shared/: the generated scenes, the tokenizer and ONE supervised warm start whose teacher
   responses are written in every rung's format (sft.formats), so every rung starts from the
   same weights.
2. runs/<rung>/seed<k>/: `loop.run` of the train config with the rung's overrides and seed k, its
   warm start and tokenizer linked from shared/ (the RL, the held-out evaluation, the export).
3. probes of each run's exported model on the held-out scenes:
   - the image-removed probe (PAPER.md section 7: 0.218 vs 0.834 stated confidence): the mean
     stated confidence with every image replaced by an empty canvas vs with the image;
   - S_vis vs perception: the VCE soft label of each greedy held-out response (section 4, the
     final policy scoring its own response) against whether its <vision> span is right (AUROC).
4. study.json (every run's figures), study.md (mean +- std per rung) and study.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from vlcal_jax.data import scenes
from vlcal_jax.data.example import Example
from vlcal_jax.eval import metrics as M
from vlcal_jax.training import data_setup, logs, loop, model_setup, storage, warm

log = logging.getLogger("vlcal_jax.study")

# The ladder of PAPER.md section 7, each rung one change on the one before (train-config overrides).
RUNGS = {
    "rlvr": {"rl.reward": "rlvr", "rl.mode": "plain", "rl.prompt": "plain_tiny", "rl.loss": "grpo"},
    "rlcr": {"rl.reward": "rlcr", "rl.mode": "rlcr", "rl.prompt": "rlcr_tiny", "rl.loss": "grpo"},
    "rlcr_decoupled": {"rl.reward": "vl_calibration", "rl.mode": "decoupled", "rl.prompt": "decoupled_tiny",
                       "rl.loss": "grpo", "rl.reward_weights.lambda_vis": 0.0},
    "vce": {"rl.reward": "vl_calibration", "rl.mode": "decoupled", "rl.prompt": "decoupled_tiny",
            "rl.loss": "grpo", "rl.reward_weights.lambda_vis": 0.4},
    "tar": {"rl.reward": "vl_calibration", "rl.mode": "decoupled", "rl.prompt": "decoupled_tiny",
            "rl.loss": "vl_calibration_paper", "rl.reward_weights.lambda_vis": 0.4},
}
LABELS = {"rlvr": "RLVR", "rlcr": "RLCR", "rlcr_decoupled": "+ decoupling", "vce": "+ VCE", "tar": "+ TAR"}
# the figures of a run, in the table's order: (key, column title)
COLUMNS = (("accuracy", "accuracy"), ("ece", "ECE"), ("auroc", "AUROC"), ("vision_auroc", "vision AUROC vs perception"),
           ("soft_label_auroc", "S_vis AUROC vs perception"), ("perception_accuracy", "perception right"),
           ("confidence_with_image", "confidence, image"), ("confidence_without_image", "confidence, no image"))


def rung_config(study: ml_collections.ConfigDict, rung: str, seed: int) -> ml_collections.ConfigDict:
    """The train config of one run: the study's base config, the rung's overrides, the seed."""
    if rung not in RUNGS:
        raise ValueError(f"unknown rung {rung!r}; the ladder is {list(RUNGS)}")
    c = ml_collections.ConfigDict(study.base.to_dict())  # a copy
    c.update_from_flattened_dict(RUNGS[rung])
    if rung in ("rlvr", "rlcr"):
        c.rl.reward_weights = ml_collections.ConfigDict()  # these rewards take no weights
    c.seed = int(seed)
    c.workdir = os.path.join(study.workdir, "runs", rung, f"seed{seed}")
    c.data.path = os.path.join(study.workdir, "shared", "data")
    c.eval.before_rl = False
    return c.lock()


def shared_stage(study: ml_collections.ConfigDict) -> str:
    """Writes (or finds) shared/: the scenes, the tokenizer and the one warm start; returns its path."""
    c = ml_collections.ConfigDict(study.base.to_dict())
    c.workdir = os.path.join(study.workdir, "shared")
    c.data.path = os.path.join(c.workdir, "data")
    c.sft.formats = tuple(f"{RUNGS[r]['rl.mode']}:{RUNGS[r]['rl.prompt']}" for r in ("rlvr", "rlcr", "tar"))
    c.lock()
    run_dir = storage.RunDir(c.workdir)
    data = data_setup.setup_data(c, run_dir)
    tokenizer, model_config, params, image_config = model_setup.setup_model(c, data, jax.random.key(c.seed), run_dir)
    writer = logs.MetricWriter(run_dir, enabled=True)
    loop.warm_stage(c, run_dir, model_config, params, tokenizer, image_config, data, writer)
    writer.close()
    return c.workdir


def _link_shared(shared: str, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    for name in ("tokenizer", "warm_start"):
        link = os.path.join(workdir, name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(shared, name)), link)


def _canvas_color() -> tuple:
    return scenes.render_scene(scenes.Scene(8, ())).getpixel((0, 0))


def blank_image(image: Image.Image) -> Image.Image:
    """The scene world's empty canvas, the size of `image`: the image removed, the question kept."""
    return Image.new("RGB", image.size, _canvas_color())


def without_images(examples: Sequence[Example]) -> list[Example]:
    """The examples with every image replaced by the scene world's empty canvas."""
    return warm.blank_images(examples, color=_canvas_color())


def stated_confidence(records) -> float | None:
    values = [r["confidence"] for r in records if r["confidence"] is not None]
    return float(np.mean(values)) if values else None


def soft_label_auroc(model, examples, records, config) -> float | None:
    """AUROC of the VCE soft label S_vis of each held-out response against its perception being
    right: the final policy scores its own greedy responses (reference = policy, PAPER.md
    section 4's perturbed forwards), S_vis z-scored over all of them."""
    from vlcal_jax.rl import certainty, rollout, step  # pylint: disable=import-outside-toplevel
    from vlcal_jax.training import warm  # pylint: disable=import-outside-toplevel

    rows = [i for i, r in enumerate(records) if r["perception_correct"] is not None]
    if not rows:
        return None
    m = config.rl.max_new_tokens
    rl = dataclasses.replace(loop.rl_config(config, model.image_config, model.tokenizer), samples_per_prompt=1,
                             micro_batch_size=0)
    eos = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    kls, entropies, has_vision = [], [], []
    size = config.eval.batch_size
    for start in range(0, len(rows), size):
        part = rows[start:start + size]
        chunk = [examples[i] for i in part] + [examples[part[-1]]] * (size - len(part))  # one shape
        texts = [records[i]["response"] for i in part] + [records[part[-1]]["response"]] * (size - len(part))
        prompts = rollout.encode_examples(chunk, model.tokenizer, model.config, model.image_config,
                                          mode=config.rl.prompt, length_buckets=tuple(config.data.length_buckets),
                                          num_images=len(chunk))
        tokens, lengths = warm.encode_responses(model.tokenizer, texts, m, eos, model.tokenizer.pad_token_id)
        _, vision_mask, parsed = rollout.decode_responses(model.tokenizer, tokens, lengths, mode="decoupled")
        seq = rollout.expand_for_responses(prompts.inputs, tokens, lengths, 1)
        stats = step.score(model.config, model.params, model.params, seq, jax.random.key(start), rl=rl,
                           num_response=m)
        kl, entropy = rollout.response_vision_stats(jax.device_get(stats), vision_mask,
                                                    variant=config.rl.soft_label_variant)
        kls.append(kl[:len(part)])
        entropies.append(entropy[:len(part)])
        has_vision.append(np.array([p.has_vision for p in parsed[:len(part)]]))
    labels = np.asarray(certainty.soft_labels(np.concatenate(kls), np.concatenate(entropies),
                                              np.concatenate(has_vision)), np.float64)
    correct = np.array([records[i]["perception_correct"] for i in rows], bool)
    ok = np.isfinite(labels)
    if ok.sum() < 2 or correct[ok].all() or not correct[ok].any():
        return None
    return float(M.auroc(labels[ok], correct[ok]))


def probe_run(config: ml_collections.ConfigDict) -> dict:
    """The run's held-out figures (its after-RL evaluation) and the two probes of its exported model."""
    from vlcal_jax.eval.evaluate import evaluate  # pylint: disable=import-outside-toplevel
    from vlcal_jax.training import export  # pylint: disable=import-outside-toplevel

    run_dir = storage.RunDir(config.workdir)
    with open(run_dir.local("summary.json"), encoding="utf-8") as f:
        after = json.load(f)["after_rl"]
    with open(run_dir.local("eval", "after_rl", "records.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    model = export.load_model_dir(run_dir.local("model"))
    data = data_setup.setup_data(config, run_dir)
    examples = data.eval_examples
    e = config.eval
    blank = evaluate(model.config, model.params, model.tokenizer, model.image_config, without_images(examples),
                     mode=config.rl.mode, prompt=config.rl.prompt, batch_size=e.batch_size,
                     max_new_tokens=config.rl.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                     seed=config.seed, length_buckets=tuple(config.data.length_buckets))
    out = {k: after.get(k) for k, _ in COLUMNS if k in after}
    out["confidence_with_image"] = stated_confidence(records)
    out["confidence_without_image"] = stated_confidence(blank.records)
    out["accuracy_without_image"] = blank.metrics["overall"]["accuracy"]
    out["soft_label_auroc"] = soft_label_auroc(model, examples, records, config) if config.rl.mode == "decoupled" else None
    return out


def rung_names(rungs) -> list[str]:
    """The rungs as a list of names. On the command line `--config.rungs=rlvr,tar` reaches the
    tuple field as one string 'rlvr,tar' (ml_collections splits numbers, not strings): split it."""
    names = [rungs] if isinstance(rungs, str) else list(rungs)
    return [n.strip() for name in names for n in name.split(",") if n.strip()]


def run_study(study: ml_collections.ConfigDict) -> dict:
    """Every stage (module docstring); returns what study.json holds."""
    rungs = rung_names(study.rungs)
    for rung in rungs:  # a typo fails here, before the shared warm start spends minutes
        if rung not in RUNGS:
            raise ValueError(f"unknown rung {rung!r} in --config.rungs; the ladder is {list(RUNGS)}")
    shared = shared_stage(study)
    results: dict = {"rungs": rungs, "seeds": list(study.seeds), "runs": {}}
    path = os.path.join(study.workdir, "study.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            results["runs"] = json.load(f).get("runs", {})
    for rung in rungs:
        for seed in study.seeds:
            name = f"{rung}/seed{seed}"
            if name in results["runs"]:
                continue
            config = rung_config(study, rung, seed)
            _link_shared(shared, config.workdir)
            log.info("study run %s", name)
            loop.run(config)
            results["runs"][name] = probe_run(config)
            with open(path, "w", encoding="utf-8") as f:  # after every run: a rerun resumes here
                json.dump(results, f, indent=2)
    results["table"] = summary_table(results)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(study.workdir, "study.md"), "w", encoding="utf-8") as f:
        f.write(results["table"])
    plot_study(results, os.path.join(study.workdir, "study.png"))
    print(results["table"], flush=True)
    return results


def aggregate(results: dict) -> dict:
    """{rung: {key: (mean, std, count)}} over the seeds (std with ddof=1; figures that are None
    for a run, such as RLVR's ECE, are left out)."""
    out = {}
    for rung in results["rungs"]:
        runs = [v for k, v in results["runs"].items() if k.split("/")[0] == rung]
        out[rung] = {}
        for key, _ in COLUMNS:
            values = np.array([r[key] for r in runs if r.get(key) is not None], np.float64)
            if values.size:
                std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
                out[rung][key] = (float(values.mean()), std, int(values.size))
    return out


def summary_table(results: dict) -> str:
    """Markdown: one row per rung, mean +- std over its seeds."""
    stats = aggregate(results)
    header = ["rung", "seeds"] + [title for _, title in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for rung in results["rungs"]:
        seeds = sum(k.split("/")[0] == rung for k in results["runs"])
        cells = [LABELS.get(rung, rung), str(seeds)]
        for key, _ in COLUMNS:
            if key in stats[rung]:
                mean, std, _ = stats[rung][key]
                cells.append(f"{mean:.3f} ± {std:.3f}" if np.isfinite(std) else f"{mean:.3f}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_study(results: dict, path: str) -> str:
    """Bars (mean, std error bars, each seed a dot) of ECE, AUROC, vision AUROC and S_vis AUROC per rung."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    stats = aggregate(results)
    panels = [("accuracy", "accuracy"), ("ece", "ECE (lower is better)"), ("auroc", "AUROC of the confidence"),
              ("vision_auroc", "vision confidence AUROC\nvs perception"),
              ("soft_label_auroc", "S_vis AUROC vs perception")]
    rungs = results["rungs"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for i, rung in enumerate(rungs):
            if key not in stats[rung]:
                continue
            mean, std, _ = stats[rung][key]
            ax.bar(i, mean, color="C0", alpha=0.6, yerr=0 if not np.isfinite(std) else std, capsize=3)
            seeds = [v[key] for k, v in results["runs"].items() if k.split("/")[0] == rung and v.get(key) is not None]
            ax.scatter(np.full(len(seeds), i), seeds, color="k", s=8, zorder=3)
        if key in ("auroc", "vision_auroc", "soft_label_auroc"):
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(rungs)))
        ax.set_xticklabels([LABELS.get(r, r) for r in rungs], rotation=40, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"Scene-world ablation ladder, {len(results['seeds'])} seeds (mean ± std; dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
