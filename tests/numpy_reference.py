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
                clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=1e-4, kl_clamp=10.0):
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
            kl_sum += k3(logp[i, t], ref_logp[i, t], -kl_clamp, kl_clamp)
            kl_count += 1
    pg_loss = pg_sum / max(pg_count, 1)
    kl_loss = kl_sum / max(kl_count, 1)
    return pg_loss + kl_coef * kl_loss, pg_loss, kl_loss


# The mechanisms each registered loss name runs (PAPER.md section 5): the TAR form (None; "released":
# w_max - (w_max - w_min) S_t with S_t from k3 and -log p; "paper": 1 + lambda (1 - 2 S_t) with S_t
# from the exact KL and entropy) and whether the top-k3 perception filter restricts the PG mean.
LOSS_MECHANISMS = {
    "grpo": (None, False),
    "vl_calibration": ("released", True),
    "vl_calibration_paper": ("paper", False),
    "vl_calibration_no_tar": (None, True),
    "vl_calibration_no_filter": ("released", False),
}


def rl_objective(loss, logp, old_logp, ref_logp, advantages, response_mask, vision_mask, token_k3, token_nll,
                 token_kl, token_entropy, *, clip_low=0.2, clip_high=0.3, dual_clip=3.0, kl_coef=1e-4,
                 kl_clamp=10.0, w_min=0.9, w_max=1.1, lambda_tar=0.1, filter_top_p=0.2):
    """Sections 5-6 assembled for loss name `loss`: response advantages [N], everything else [N, T].

    The GRPO advantage of each response on its valid tokens, times the TAR factor on vision
    tokens with A < 0; the dual-clip surrogate averaged over the perception filter's tokens (or
    all valid tokens); plus kl_coef times the clamped k3 reference KL averaged over all valid
    tokens (the released `compute_policy_loss` + `compute_kl("low_var_kl")`, token-mean).
    Returns a dict: loss, pg_loss, ref_kl; token means over valid tokens of clipfrac_low
    (A < 0, r < 1 - clip_low), clipfrac_high (A > 0, r > 1 + clip_high), dual_clip_frac (A < 0,
    the -A c bound active), ratio_mean, ppo_kl (old - new log-prob); filter_keep_frac; the TAR
    factor's mean / min / max over the tokens it touches (1 if none) and their count tar_tokens;
    response_tokens; and grad_logp [N, T] = d loss / d logp (TAR and the filter read only the
    VCE statistics, so they are constants here).
    """
    tar, use_filter = LOSS_MECHANISMS[loss]
    logp, old_logp, ref_logp = (np.asarray(x, np.float64) for x in (logp, old_logp, ref_logp))
    valid = np.asarray(response_mask) > 0
    vision = np.asarray(vision_mask) > 0
    n, t_len = logp.shape
    adv = np.where(valid, np.asarray(advantages, np.float64)[:, None], 0.0)
    if tar == "released":
        factor = tar_weights_released(np.asarray(token_k3, np.float64), np.asarray(token_nll, np.float64), valid,
                                      vision, adv, w_min, w_max)
    elif tar == "paper":
        certainty = np.stack([token_certainty_row(np.asarray(token_kl[i], np.float64),
                                                  np.asarray(token_entropy[i], np.float64), valid[i])
                              for i in range(n)])
        factor = tar_weights_paper(certainty, vision & valid, adv, lambda_tar)
    else:
        factor = np.ones((n, t_len))
    keep = perception_mask(np.asarray(token_k3, np.float64), valid, filter_top_p) if use_filter else valid
    n_tok = int(valid.sum())
    n_pg = int((keep & valid).sum())
    sums = dict.fromkeys(("pg", "kl", "clip_low", "clip_high", "dual", "ratio", "ppo_kl"), 0.0)
    grad = np.zeros((n, t_len))
    for i in range(n):
        for t in range(t_len):
            if not valid[i, t]:
                continue
            a = adv[i, t] * factor[i, t]
            log_ratio = logp[i, t] - old_logp[i, t]
            r = math.exp(min(max(log_ratio, -20.0), 20.0))
            dr = r if abs(log_ratio) < 20.0 else 0.0
            unclipped, clipped = -a * r, -a * min(max(r, 1.0 - clip_low), 1.0 + clip_high)
            surrogate = max(unclipped, clipped)
            d_surrogate = -a * dr if unclipped >= clipped else 0.0
            dual_active = a < 0 and surrogate > -a * dual_clip
            if dual_active:
                surrogate, d_surrogate = -a * dual_clip, 0.0
            d = min(max(ref_logp[i, t] - logp[i, t], -20.0), 20.0)
            kl = math.exp(d) - d - 1.0
            d_kl = -(math.exp(d) - 1.0) if abs(ref_logp[i, t] - logp[i, t]) < 20.0 and abs(kl) < kl_clamp else 0.0
            sums["kl"] += min(max(kl, -kl_clamp), kl_clamp)
            grad[i, t] = kl_coef * d_kl / max(n_tok, 1)
            if keep[i, t]:
                sums["pg"] += surrogate
                grad[i, t] += d_surrogate / max(n_pg, 1)
            sums["clip_low"] += a < 0 and r < 1.0 - clip_low
            sums["clip_high"] += a > 0 and r > 1.0 + clip_high
            sums["dual"] += dual_active
            sums["ratio"] += r
            sums["ppo_kl"] += -log_ratio
    touched = valid & vision & (adv < 0)
    weights = factor[touched]
    out = {"pg_loss": sums["pg"] / max(n_pg, 1), "ref_kl": sums["kl"] / max(n_tok, 1)}
    out["loss"] = out["pg_loss"] + kl_coef * out["ref_kl"]
    for key, name in (("clip_low", "clipfrac_low"), ("clip_high", "clipfrac_high"), ("dual", "dual_clip_frac"),
                      ("ratio", "ratio_mean"), ("ppo_kl", "ppo_kl")):
        out[name] = sums[key] / max(n_tok, 1)
    out.update(filter_keep_frac=n_pg / max(n_tok, 1), tar_tokens=float(touched.sum()), response_tokens=float(n_tok),
               tar_weight_mean=weights.mean() if weights.size else 1.0,
               tar_weight_min=weights.min() if weights.size else 1.0,
               tar_weight_max=weights.max() if weights.size else 1.0, grad_logp=grad)
    return out


def adamw_first_step(params, grads, *, learning_rate, weight_decay, grad_clip, b1=0.9, b2=0.999, eps=1e-8):
    """Section 6 optimizer, first step from zero moments: the gradients clipped to global norm
    grad_clip, then AdamW (bias-corrected moments are g and g^2). Dicts of arrays by name ->
    (new params, clipped grads, global norm of the unclipped grads)."""
    norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in grads.values()))
    scale = grad_clip / norm if norm > grad_clip else 1.0
    clipped = {k: np.asarray(g, np.float64) * scale for k, g in grads.items()}
    new = {}
    for k, p in params.items():
        g = clipped[k]
        m_hat = (1 - b1) * g / (1 - b1)
        v_hat = (1 - b2) * g * g / (1 - b2)
        p = np.asarray(p, np.float64)
        new[k] = p - learning_rate * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p)
    return new, clipped, norm


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
