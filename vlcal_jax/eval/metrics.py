"""Calibration and discrimination metrics: accuracy, Brier, AUROC, AURC, ECE (PAPER.md section 7).

Every function takes `confidence [N]` (stated probability that the answer is right) and
`correct [N]` (bool or 0/1) and returns a Python float. Host-side NumPy only.

`auroc` equals `sklearn.metrics.roc_auc_score(correct, confidence)` (ties included).
`ece` has two named binning conventions, explained in its docstring; `"paper"` reproduces
the released evaluation code and `"torchmetrics"` reproduces
`torchmetrics.functional.classification.binary_calibration_error` bit for bit.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

CONVENTIONS = ("paper", "torchmetrics")


def _as_inputs(confidence, correct, *, unit_interval: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Validates and converts to float64 arrays `confidence [N]`, `correct [N]` (0.0 / 1.0)."""
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct)
    if conf.ndim != 1 or corr.ndim != 1:
        raise ValueError(
            f"confidence and correct must be 1-D [N]; got shapes {conf.shape} and {corr.shape}: flatten them first"
        )
    if conf.shape != corr.shape:
        raise ValueError(f"confidence has {conf.shape[0]} entries but correct has {corr.shape[0]}; pass one per response")
    if conf.size == 0:
        raise ValueError("confidence and correct are empty; a metric needs at least one response")
    if not np.all(np.isfinite(conf)):
        bad = int(np.flatnonzero(~np.isfinite(conf))[0])
        raise ValueError(f"confidence[{bad}] = {conf[bad]} is not finite; drop responses without a confidence first")
    if unit_interval and (conf.min() < 0.0 or conf.max() > 1.0):
        bad = int(np.flatnonzero((conf < 0.0) | (conf > 1.0))[0])
        raise ValueError(f"confidence[{bad}] = {conf[bad]} is outside [0, 1]; divide verbalized 0..10 scores by 10")
    corr_f = corr.astype(np.float64)
    if not np.all((corr_f == 0.0) | (corr_f == 1.0)):
        bad = int(np.flatnonzero((corr_f != 0.0) & (corr_f != 1.0))[0])
        raise ValueError(f"correct[{bad}] = {corr[bad]!r} is not 0/1 or a bool")
    return conf, corr_f


def accuracy(correct) -> float:
    """Fraction of correct answers; `correct [N]`."""
    corr = np.asarray(correct)
    _, corr_f = _as_inputs(np.zeros(corr.shape), corr)
    return float(corr_f.mean())


def brier(confidence, correct) -> float:
    """Brier score mean((confidence - correct)^2); `confidence [N]`, `correct [N]`. Lower is better."""
    conf, corr = _as_inputs(confidence, correct)
    return float(np.mean((conf - corr) ** 2))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks [N] of `values [N]`, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group_of = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], values.size]
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group_of]
    return ranks


def auroc(confidence, correct) -> float:
    """Area under the ROC curve of `confidence [N]` separating correct from wrong answers.

    Computed as the Mann-Whitney statistic with average ranks for ties, which equals
    `sklearn.metrics.roc_auc_score(correct, confidence)`. With only one class present the
    AUROC is undefined: returns nan and warns. `confidence` may be any real score.
    """
    conf, corr = _as_inputs(confidence, correct, unit_interval=False)
    n_pos = int(corr.sum())
    n_neg = corr.size - n_pos
    if n_pos == 0 or n_neg == 0:
        warnings.warn(
            f"auroc: all {corr.size} answers are {'correct' if n_neg == 0 else 'wrong'}; AUROC is undefined, returning nan",
            RuntimeWarning,
            stacklevel=2,
        )
        return float("nan")
    rank_sum = _average_ranks(conf)[corr == 1.0].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def risk_coverage(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """Selective-prediction curve: `coverage [N]` = k/N and `risk [N]` = error rate of the k most confident.

    Answers are accepted from most to least confident. Tied confidences have no order, so
    within a tie group the errors are spread evenly (the expected risk over every order of
    the tied answers); without ties this is the usual cumulative error rate.
    """
    conf, corr = _as_inputs(confidence, correct, unit_interval=False)
    n = conf.size
    order = np.argsort(-conf, kind="mergesort")
    conf_sorted, wrong_sorted = conf[order], 1.0 - corr[order]
    starts_group = np.r_[True, conf_sorted[1:] != conf_sorted[:-1]]
    group_of = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], n]
    cum_wrong = np.r_[0.0, np.cumsum(wrong_sorted)]
    wrong_before = cum_wrong[starts][group_of]
    group_rate = ((cum_wrong[ends] - cum_wrong[starts]) / (ends - starts))[group_of]
    k = np.arange(1, n + 1, dtype=np.float64)
    within = k - starts[group_of]
    risk = (wrong_before + within * group_rate) / k
    return k / n, risk


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve: mean of `risk_coverage` risks over k = 1..N. Lower is better."""
    _, risk = risk_coverage(confidence, correct)
    return float(risk.mean())


@dataclasses.dataclass(frozen=True)
class ReliabilityData:
    """Per-bin calibration statistics; B = n_bins ("paper") or n_bins + 1 ("torchmetrics").

    lower [B], upper [B]: bin edges; accuracy [B], confidence [B]: means over the bin (0 for
    an empty bin); count [B]: responses in the bin; n_total: N.
    """

    lower: np.ndarray
    upper: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    count: np.ndarray
    n_total: int
    convention: str


def _torch_linspace_float32(n_bins: int) -> np.ndarray:
    """Bit-exact `torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)` [n_bins + 1] (torch's CPU kernel).

    torch fills the first half as start + step * i and the second half as end - step * (steps - 1 - i),
    with float32 step = 1 / n_bins and a fused multiply-add; float64 evaluates that fma exactly.
    """
    steps = n_bins + 1
    i = np.arange(steps)
    step = float(np.float32(1.0) / np.float32(n_bins))
    return np.where(i < steps // 2, step * i, 1.0 - step * (steps - 1 - i)).astype(np.float32)


def _torch_float32_sum(values: np.ndarray) -> np.float32:
    """Bit-exact `torch.sum` of a small contiguous float32 vector on CPU.

    torch reduces 8-lane float32 vectors with 4 interleaved accumulators (ATen SumKernel
    `row_sum`/`multi_row_sum`), adds the scalar tail first and then the 8 lanes in order;
    rows shorter than one vector use the same 4-accumulator scheme on scalars.
    """
    values = np.asarray(values, dtype=np.float32)
    lanes = 8
    if values.size < lanes:
        return _row_sum([np.float32(v) for v in values])
    n_vec = values.size // lanes
    vec_total = _row_sum([values[i * lanes : (i + 1) * lanes] for i in range(n_vec)])
    total = np.float32(0.0)
    for v in values[n_vec * lanes :]:
        total = np.float32(total + v)
    for v in vec_total:
        total = np.float32(total + v)
    return total


def _row_sum(rows: list):
    """ATen `row_sum` with ilp factor 4 over `rows` (float32 scalars or equal-length float32 vectors)."""
    ilp = 4
    n_groups = len(rows) // ilp
    partial = _multi_row_sum([rows[g * ilp : (g + 1) * ilp] for g in range(n_groups)], ilp, rows[0])
    for row in rows[n_groups * ilp :]:
        partial[0] = np.float32(partial[0] + row) if np.ndim(row) == 0 else (partial[0] + row).astype(np.float32)
    for k in range(1, ilp):
        partial[0] = (partial[0] + partial[k]).astype(np.float32)
    return partial[0]


def _multi_row_sum(groups: list, ilp: int, like) -> list:
    """ATen `multi_row_sum`: 4-level cascade of `ilp` accumulators over `groups` (each `ilp` rows)."""
    levels = 4
    size = len(groups)
    ceil_log2 = 0 if size <= 1 else int(size - 1).bit_length()
    level_power = max(4, ceil_log2 // levels)
    level_step = 1 << level_power
    level_mask = level_step - 1
    zero = np.zeros_like(np.asarray(like, dtype=np.float32))
    acc = [[zero.copy() for _ in range(ilp)] for _ in range(levels)]
    i = 0
    while i + level_step <= size:
        for _ in range(level_step):
            for k in range(ilp):
                acc[0][k] = (acc[0][k] + groups[i][k]).astype(np.float32)
            i += 1
        for j in range(1, levels):
            for k in range(ilp):
                acc[j][k] = (acc[j][k] + acc[j - 1][k]).astype(np.float32)
                acc[j - 1][k] = zero.copy()
            if i & (level_mask << (j * level_power)):
                break
    for i in range(i, size):
        for k in range(ilp):
            acc[0][k] = (acc[0][k] + groups[i][k]).astype(np.float32)
    for j in range(1, levels):
        for k in range(ilp):
            acc[0][k] = (acc[0][k] + acc[j][k]).astype(np.float32)
    return acc[0]


def reliability_data(confidence, correct, n_bins: int = 10, convention: str = "paper") -> ReliabilityData:
    """Per-bin accuracy, mean confidence and count; `confidence [N]`, `correct [N]`; binning as in `ece`."""
    conf, corr = _as_inputs(confidence, correct)
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    n_bins = int(n_bins)
    if convention == "paper":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        # [lo, hi) bins, the last one closed: the index of the last edge <= x, with x = 1 kept in bin n_bins - 1.
        index = np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)
        accs, confs, counts = np.zeros(n_bins), np.zeros(n_bins), np.zeros(n_bins, dtype=np.int64)
        for b in range(n_bins):
            members = index == b
            counts[b] = int(members.sum())
            if counts[b]:
                confs[b] = np.mean(conf[members])
                accs[b] = np.mean(corr[members])
        return ReliabilityData(edges[:-1], edges[1:], accs, confs, counts, conf.size, convention)
    if convention == "torchmetrics":
        edges = _torch_linspace_float32(n_bins)
        conf32, corr32 = conf.astype(np.float32), corr.astype(np.float32)
        # torch.bucketize(right=True) - 1: bins [e_b, e_{b+1}) plus an extra bin holding exactly 1.0.
        index = np.searchsorted(edges, conf32, side="right") - 1
        counts = np.zeros(n_bins + 1, dtype=np.float32)
        conf_sum = np.zeros(n_bins + 1, dtype=np.float32)
        acc_sum = np.zeros(n_bins + 1, dtype=np.float32)
        np.add.at(counts, index, np.float32(1.0))
        np.add.at(conf_sum, index, conf32)
        np.add.at(acc_sum, index, corr32)
        with np.errstate(invalid="ignore", divide="ignore"):
            confs = np.nan_to_num(conf_sum / counts)
            accs = np.nan_to_num(acc_sum / counts)
        upper = np.r_[edges[1:], np.float32(1.0)]
        return ReliabilityData(edges, upper, accs, confs, counts.astype(np.int64), conf.size, convention)
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")


def ece(confidence, correct, n_bins: int = 10, convention: str = "paper") -> float:
    """Expected calibration error with `n_bins` equal-width bins; `confidence [N]`, `correct [N]`.

    ECE = sum_b (count_b / N) * |mean confidence_b - accuracy_b|.

    Verbalized confidences are k/10, and with 10 bins they sit exactly on bin edges, where
    floating point decides the bin:
    - "paper" (the released evaluation code): float64 edges `np.linspace(0, 1, 11)`, bins
      [lo, hi) with the last bin [0.9, 1.0] closed. linspace gives edges 0.30000000000000004,
      0.6000000000000001 and 0.7000000000000001, all above the float64 values of 0.3, 0.6
      and 0.7, so those confidences land in the bin BELOW ([0.2, 0.3) etc.; bins 3 and 7 stay
      empty); the other k/10 start their own bin, and 1.0 shares the last bin with 0.9.
      Accumulated in float64 exactly like the released loop. Confidences are taken as float64:
      a float32 0.3 is 0.30000001192... and would start bin 3, so pass float64 (Python) values.
    - "torchmetrics": `binary_calibration_error(torch.tensor(confidence, dtype=float32),
      target, n_bins=n_bins, norm="l1")`, reproduced bit for bit: float32 confidences, float32
      `torch.linspace` edges and `torch.bucketize(right=True)`. In float32 0.3, 0.6 and 0.7
      round to values >= their edges, so every k/10 starts its own bin; 1.0 goes to an extra
      (n_bins + 1)-th bin of its own instead of the last bin. Sums are float32 in torch's order.
      (torchmetrics would silently apply a sigmoid to confidences outside [0, 1]; here they
      raise instead.)
    """
    data = reliability_data(confidence, correct, n_bins, convention)
    if convention == "paper":
        total = 0.0
        for b in range(data.count.size):
            if data.count[b]:
                total += abs(data.confidence[b] - data.accuracy[b]) * int(data.count[b]) / data.n_total
        return float(total)
    counts = data.count.astype(np.float32)
    prop = counts / _torch_float32_sum(counts)
    terms = (np.abs(data.accuracy - data.confidence) * prop).astype(np.float32)
    return float(_torch_float32_sum(terms))



def bootstrap_intervals(confidence, correct, *, n_bins: int = 10, n_resamples: int = 1000,
                        level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the "paper" ECE and the AUROC over the examples.

    Resample r draws N indices with replacement: row r of
    `np.random.default_rng(seed).integers(0, N, size=(n_resamples, N))`. The metrics of
    every resample are computed at once from its per-example multiplicities (the same
    values `ece(conf[idx], corr[idx])` and `auroc(conf[idx], corr[idx])` give, up to float
    summation order). Returns {"ece": (low, high), "auroc": (low, high)}: the (1 - level) / 2
    and (1 + level) / 2 quantiles (numpy's linear interpolation) of the finite values;
    resamples with one class have no AUROC and are left out; (nan, nan) if none is left.
    """
    conf, corr = _as_inputs(confidence, correct)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = conf.size
    if n == 0:
        return {"ece": (float("nan"),) * 2, "auroc": (float("nan"),) * 2}
    indices = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    weights = np.bincount((indices + n * np.arange(n_resamples)[:, None]).ravel(),
                          minlength=n * n_resamples).reshape(n_resamples, n).astype(np.float64)
    # ECE: sum over bins of |sum of (confidence - correct) in the bin| / N, bins as in `ece`
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)
    gap = np.zeros((n, n_bins))
    gap[np.arange(n), index] = conf - corr
    eces = np.abs(weights @ gap).sum(axis=1) / n
    # AUROC: per distinct confidence value, the resample's weight of right and wrong answers;
    # each right answer scores the wrong ones below it, plus half of those tied with it
    values, inverse = np.unique(conf, return_inverse=True)
    right = np.zeros((n, values.size))
    right[np.arange(n), inverse] = corr
    wrong = np.zeros((n, values.size))
    wrong[np.arange(n), inverse] = 1.0 - corr
    pos, neg = weights @ right, weights @ wrong
    below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    defined = (n_pos > 0) & (n_neg > 0)
    aurocs = (pos * (below + 0.5 * neg)).sum(axis=1)[defined] / (n_pos * n_neg)[defined]
    q = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]

    def interval(x):
        return tuple(float(v) for v in np.quantile(x, q)) if x.size else (float("nan"),) * 2

    return {"ece": interval(eces), "auroc": interval(aurocs)}
