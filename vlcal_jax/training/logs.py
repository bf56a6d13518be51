"""Metric logging (JSONL + TensorBoard), progress bars, training plots and the final summary."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import numpy as np

log = logging.getLogger("vlcal_jax.train")


def setup_logging(level: int = logging.INFO) -> None:
    """One stderr handler: absl's when running under absl.app (the CLI), else ours."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    under_absl = absl_logging.get_absl_handler() in root.handlers
    if not under_absl:
        # absl.logging.log() before flags are parsed (orbax's vlog on import) calls logging.basicConfig():
        # that bare handler would print each message a second time, next to ours
        for handler in list(root.handlers):
            if type(handler) is logging.StreamHandler and getattr(handler.formatter, "_fmt", None) == logging.BASIC_FORMAT:
                root.removeHandler(handler)
    if not under_absl and not any(getattr(h, "_vlcal", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._vlcal = True
        root.addHandler(handler)
    root.setLevel(level)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class MetricWriter:
    """Scalars to `metrics.jsonl` and TensorBoard event files under `tb/` of a RunDir.

    For a remote run (gs://) both are written to the local mirror and published to the URL at
    most every `publish_every_s` seconds, at every checkpoint (`publish`) and at `close`."""

    def __init__(self, run, enabled: bool = True, publish_every_s: float = 60.0):
        self.run, self.enabled, self.publish_every_s = run, enabled, publish_every_s
        self.path = run.local("metrics.jsonl")
        self._tb, self._published = None, time.monotonic()
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(run.local("tb"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if np.isscalar(v) and np.isfinite(float(v))}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": int(step), **clean}) + "\n")
        for key, value in clean.items():
            self._tb.add_scalar(key, value, step)
        self._tb.flush()
        if self.run.remote and time.monotonic() - self._published > self.publish_every_s:
            self.publish()

    def publish(self) -> None:
        if self.enabled and self.run.remote:
            self._tb.flush()
            self.run.publish("metrics.jsonl")
            self.run.publish("tb")
            self._published = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self.publish()
            self._tb.close()


def is_sft_row(row: dict) -> bool:
    """Whether a metric row is the warm start's (its keys under sft/)."""
    return any(k.startswith("sft/") for k in row)


def keep_metrics(path: str, keep) -> int:
    """Rewrites the JSONL metric log with only the rows for which `keep(row)` is true (a resumed
    run drops what it is about to redo); returns the number of rows dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in rows if keep(r)]
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)
    return len(rows) - len(kept)


def progress(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, dynamic_ncols=True, file=sys.stderr, **kwargs)


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_training(workdir: str, summary: dict) -> list[str]:
    """Training curves (reward, accuracy, stated confidence, eval ECE/AUROC) as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(workdir) if "reward/reward" in r]
    evals = [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
    paths = []
    if rows:
        steps = [r["step"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, keys, title in (
                (axes[0], ("reward/reward",), "reward"),
                (axes[1], ("reward/accuracy", "reward/confidence"), "accuracy vs stated confidence (train rollouts)"),
                (axes[2], ("reward/vision_confidence", "reward/soft_label", "perception/correct"),
                 "vision confidence vs VCE soft label and perception truth")):
            for key in keys:
                values = [r.get(key, np.nan) for r in rows]
                if np.isfinite(values).any():
                    ax.plot(steps, values, label=key)
            ax.set_title(title)
            ax.set_xlabel("RL step")
            ax.legend()
        fig.tight_layout()
        path = os.path.join(workdir, "training_curves.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [r["step"] for r in evals]
        for key in ("eval/accuracy", "eval/ece", "eval/auroc"):
            values = [r.get(key, np.nan) for r in evals]
            if np.isfinite(values).any():
                ax.plot(steps, values, marker="o", label=key)
        ax.set_xlabel("RL step")
        ax.set_title("held-out calibration")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(workdir, "eval_curves.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def print_summary(summary: dict) -> None:
    before, after = summary.get("before_rl") or {}, summary.get("after_rl") or {}
    keys = [k for k in ("accuracy", "format_rate", "ece", "auroc", "brier", "mean_confidence", "bins_over_10pct",
                        "by_question_type_auroc_ceiling", "by_difficulty_gap", "perception_accuracy", "vision_ece",
                        "vision_auroc", "vision_mean_confidence", "reasoning_ece", "reasoning_auroc")
            if k in after or k in before]
    def cell(group, key):
        value = group.get(key, float("nan"))
        low, high = group.get(f"{key}_low"), group.get(f"{key}_high")
        interval = f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""
        return f"{value:.0f}" if key.endswith("bins_over_10pct") else f"{value:.3f}{interval}"

    lines = ["", f"{'metric':24s} {'before RL':>22s} {'after RL':>22s}",
             "(ECE and AUROC with their bootstrap 95% intervals over the evaluation examples)"]
    for key in keys:
        lines.append(f"{key:24s} {cell(before, key):>22s} {cell(after, key):>22s}")
    lines.append(f"model: {summary.get('model_dir')}")
    lines += [f"plot: {p}" for p in summary.get("plots", [])]
    print("\n".join(lines), flush=True)
