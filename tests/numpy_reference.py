"""Plain NumPy re-derivation of PAPER.md sections 4-6, written from the paper text.

Loops over responses and tokens, float64, no JAX: the reference the tests compare the JAX
implementation against. Kept deliberately literal; speed does not matter here.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

EPS = 1e-8


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def group_advantages(rewards, group_size):
    """Section 5: A_i = (R_i - mean_g) / (std_g + 1e-6), Bessel std, consecutive groups."""
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        if np.all(group == group[0]):
            continue  # all equal: advantage exactly 0
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        for j, r in enumerate(group):
            out[start + j] = (r - mean) / (std + 1e-6)
    return out


def soft_labels(kl, entropy, valid):
    """Section 4: sigmoid of the z-score (population std, over valid rows) of log KL - log H."""
    scores = {i: math.log(kl[i] + EPS) - math.log(entropy[i] + EPS) for i in range(len(kl)) if valid[i]}
    out = np.zeros(len(kl))
    if not scores:
        return out
    values = list(scores.values())
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    for i, s in scores.items():
        z = 0.0 if std < 1e-6 else (s - mean) / std
        out[i] = sigmoid(z)
    return out


def k3(logp, logq, low=0.0, high=10.0):
    """k3 = exp(d) - d - 1, d = clamp(logq - logp, -20, 20), clamped to [low, high]."""
    d = min(max(logq - logp, -20.0), 20.0)
    return min(max(math.exp(d) - d - 1.0, low), high)


def token_certainty_row(kl_row, ent_row, valid_row):
    """Section 5 within one response: sigmoid(z) of log(kl + eps) - log(ent + eps), unbiased std."""
    idx = [t for t in range(len(kl_row)) if valid_row[t]]
    out = np.full(len(kl_row), 0.5)
    if len(idx) < 2:
        return out
    s = {t: math.log(kl_row[t] + EPS) - math.log(ent_row[t] + EPS) for t in idx}
    mean = sum(s.values()) / len(idx)
    std = math.sqrt(sum((v - mean) ** 2 for v in s.values()) / (len(idx) - 1))
    for t in idx:
        out[t] = sigmoid(0.0 if std < 1e-6 else (s[t] - mean) / std)
    return out


def tar_weights_released(k3_tok, ent_tok, response_mask, vision_mask, adv, w_min=0.9, w_max=1.1):
    """Section 5 released form: w = w_max - (w_max - w_min) S_t on vision tokens with A < 0."""
    n, t_len = k3_tok.shape
    w = np.ones((n, t_len))
    for i in range(n):
        certainty = token_certainty_row(k3_tok[i], ent_tok[i], response_mask[i])
        for t in range(t_len):
            if response_mask[i, t] and vision_mask[i, t] and adv[i, t] < 0:
                w[i, t] = w_max - (w_max - w_min) * certainty[t]
    return w


def tar_weights_paper(certainty, vision_mask, adv, lam=0.1):
    """Section 5 paper form: factor 1 + lambda (1 - 2 S_t) on vision tokens with A < 0."""
    n, t_len = certainty.shape
    f = np.ones((n, t_len))
    for i in range(n):
        for t in range(t_len):
            if vision_mask[i, t] and adv[i, t] < 0:
                f[i, t] = 1.0 + lam * (1.0 - 2.0 * certainty[i, t])
    return f


def perception_mask(k3_tok, response_mask, top_p=0.2):
    """Section 5: per response keep the ceil(top_p * L) largest-k3 tokens (earlier wins ties)."""
    n, t_len = k3_tok.shape
    keep = np.zeros((n, t_len), bool)
    for i in range(n):
        idx = [t for t in range(t_len) if response_mask[i, t]]
        count = math.ceil(Fraction(str(top_p)) * len(idx))  # exact rational ceiling
        ranked = sorted(idx, key=lambda t: (-float(k3_tok[i, t]), t))
        for t in ranked[:count]:
            keep[i, t] = True
    return keep


def policy_loss(logp, old_logp, ref_logp, adv, response_mask, pg_mask=None,
                clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=1e-4):
    """Section 6: dual-clip PPO surrogate (token mean over pg_mask) + kl_coef * k3 ref KL."""
    if pg_mask is None:
        pg_mask = response_mask
    n, t_len = logp.shape
    pg_sum = pg_count = kl_sum = kl_count = 0.0
    for i in range(n):
        for t in range(t_len):
            if not response_mask[i, t]:
                continue
            a = adv[i, t]
            r = math.exp(min(max(logp[i, t] - old_logp[i, t], -20.0), 20.0))
            r_clip = min(max(r, 1.0 - clip_low), 1.0 + clip_high)
            loss = max(-a * r, -a * r_clip)
            if a < 0:
                loss = min(loss, -a * dual_clip)
            if pg_mask[i, t]:
                pg_sum += loss
                pg_count += 1
            kl_sum += k3(logp[i, t], ref_logp[i, t], -10.0, 10.0)
            kl_count += 1
    pg_loss = pg_sum / max(pg_count, 1)
    kl_loss = kl_sum / max(kl_count, 1)
    return pg_loss + kl_coef * kl_loss, pg_loss, kl_loss


def token_stats_from_logits(logits_clean, logits_pert, targets):
    """Section 4 per token: exact entropy and KL(p || q); sampled nll, kl_sample, k3."""
    b, t_len, _ = logits_clean.shape
    out = {key: np.zeros((b, t_len)) for key in ("logp", "nll", "entropy", "logq", "kl", "kl_sample", "k3")}
    for i in range(b):
        for t in range(t_len):
            lp = np.asarray(logits_clean[i, t], np.float64)
            lq = np.asarray(logits_pert[i, t], np.float64)
            p = np.exp(lp - lp.max())
            p /= p.sum()
            q = np.exp(lq - lq.max())
            q /= q.sum()
            o = targets[i, t]
            out["logp"][i, t] = math.log(p[o])
            out["nll"][i, t] = -math.log(p[o])
            out["entropy"][i, t] = -sum(pv * math.log(pv) for pv in p if pv > 0)
            out["logq"][i, t] = math.log(q[o])
            out["kl"][i, t] = sum(pv * (math.log(pv) - math.log(qv)) for pv, qv in zip(p, q) if pv > 0)
            log_ratio = min(max(math.log(p[o]) - math.log(q[o]), -20.0), 20.0)
            out["kl_sample"][i, t] = min(max(p[o] * log_ratio, 0.0), 10.0)
            out["k3"][i, t] = k3(math.log(p[o]), math.log(q[o]))
    return out


def patchify(image, merge_size, patch_size, temporal_patch_size):
    """HF Qwen2-VL processor layout for one [Tp*t, C, H, W] image -> [t*gh*gw, C*Tp*P*P].

    Written as explicit loops over (t, merge-window row, merge-window col, m, m) so that it
    does not share the reshape/transpose of the implementation.
    """
    frames, channels, height, width = image.shape
    m, p, tp = merge_size, patch_size, temporal_patch_size
    gt, gh, gw = frames // tp, height // p, width // p
    rows = []
    for ti in range(gt):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for mh in range(m):
                    for mw in range(m):
                        y, x = (bh * m + mh) * p, (bw * m + mw) * p
                        row = [image[ti * tp + k, c, y : y + p, x : x + p].reshape(-1)
                               for c in range(channels) for k in range(tp)]
                        rows.append(np.concatenate(row))
    return np.stack(rows)


def gaussian_blur_2d(image, sigma):
    """Separable Gaussian blur of [..., H, W], kernel truncated at ceil(3 sigma), edge replicate."""
    if sigma <= 0:
        return image.copy()
    half = math.ceil(3 * sigma)
    kernel = [math.exp(-0.5 * (k / sigma) ** 2) for k in range(-half, half + 1)]
    total = sum(kernel)
    kernel = [k / total for k in kernel]
    height, width = image.shape[-2:]
    tmp = np.zeros_like(image, dtype=np.float64)
    for y in range(height):
        for j, k in enumerate(range(-half, half + 1)):
            tmp[..., y, :] += kernel[j] * image[..., min(max(y + k, 0), height - 1), :]
    out = np.zeros_like(tmp)
    for x in range(width):
        for j, k in enumerate(range(-half, half + 1)):
            out[..., x] += kernel[j] * tmp[..., min(max(x + k, 0), width - 1)]
    return out
