"""Plainly written transcriptions of the entropy-control methods, the test oracle of fusedrl.loss.entropy_control.

Independent of ``fusedrl.loss``: written from the authors' code (read, then transcribed in our own words), on
padded ``[B, T]`` float64 tensors with finite values everywhere (the authors' code multiplies by the mask, so
NaN padding would poison it), the authors' ``.item()`` host reads and Python loops kept where they have them:

* STEER: zz-haooo/STEER @ b31df71, ``verl/trainer/ppo/core_algos.py``: ``compute_token_weights``,
  ``compute_policy_loss_with_entropy`` (weights kept in float64 where the authors store float32);
* BAPO: WooooDyy/BAPO @ 7287044, ``recipe/bapo/policy_loss.py``: ``_compute_effective_advantage``,
  ``compute_policy_loss_bapo`` (the sequential bound search, one process);
* RL-PLUS: YihongDong/RL-PLUS @ eb4aa4d, ``rl_plus/verl/verl/recipe/rlplus_core_alg.py``:
  ``compute_token_on_off_policy_loss`` (strategy "RL-PLUS"; ``log_ratio_clamp`` optional: theirs has none);
* SSPO (arXiv 2511.04256, no public code): the segment ratio as a loop over rows and segments;
* EPO (WujiangXu/EPO @ 5b6fa98, ``generate_entropy_penalty``): the corridor as a hinge (ours: theirs has no
  gradient), added to verl's dual-clip PPO.

Aggregation (:func:`agg`) is fusedrl's documented one (docs/policy-losses.md): token-mean is verl's
``masked_mean``; the seq-mean modes count non-empty rows (verl's old ``agg_loss``, which the authors' repos
carry, counts every row and gives NaN for an empty row in seq-mean-token-mean).
"""

from __future__ import annotations

import math

import torch


def masked_mean(x, mask):
    """verl ``masked_mean``: ``sum(x m) / sum(m)``."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum()


def agg(loss_mat, mask, mode, num_tokens=None, num_seqs=None, norm_len=None):
    """fusedrl's aggregation of ``[B, T]`` per-token values over the valid tokens."""
    m = mask.to(loss_mat.dtype)
    vals = torch.where(mask, loss_mat, torch.zeros_like(loss_mat))
    per_seq_tokens = m.sum(-1)
    n_seq = num_seqs if num_seqs is not None else max(int((per_seq_tokens > 0).sum()), 1)
    if mode == "token-mean":
        return vals.sum() / (num_tokens if num_tokens is not None else max(int(m.sum()), 1))
    if mode == "token-sum":
        return vals.sum()
    if mode == "seq-mean-token-sum":
        return vals.sum() / n_seq
    if mode == "seq-mean-token-mean":
        return (vals.sum(-1) / per_seq_tokens.clamp(min=1)).sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        return vals.sum() / n_seq / (norm_len if norm_len is not None else loss_mat.shape[-1])
    raise ValueError(mode)


def ppo_dual_clip(old, logp, adv, mask, clip_low, clip_high, clip_c):
    """verl's dual-clip PPO per token: ``(pg_losses, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``."""
    neg_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = masked_mean(-neg_kl, mask)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(l1, l2)
    clipfrac = masked_mean(torch.gt(l2, l1).to(logp.dtype), mask)
    if clip_c is None:
        return c1, clipfrac, ppo_kl, torch.zeros((), dtype=logp.dtype)
    l3 = -adv * clip_c
    c2 = torch.min(l3, c1)
    lower = masked_mean((torch.gt(c1, l3) & (adv < 0)).to(logp.dtype), mask)
    return torch.where(adv < 0, c2, c1), clipfrac, ppo_kl, lower


# --------------------------------------------------------------------------------------------------
# STEER
# --------------------------------------------------------------------------------------------------


def steer_token_weights(adv, entropys, old_log_prob, log_prob, mask, w_min=0.8, w_max=1.2, linear=True, d_h=None):
    """STEER's token weights (``compute_token_weights``); ``d_h``: the exact form ``metric = -(A / p_old) dH``."""
    with torch.no_grad():
        old_prob = torch.clamp(torch.exp(old_log_prob), min=1e-8, max=1.0)
        if d_h is None:
            x = torch.clamp(torch.exp(log_prob), min=1e-8, max=1.0 - 1e-8)
            f_x = (x * (1 - x)) * (torch.log(x) + entropys)
            metric = (adv / old_prob) * f_x
        else:
            metric = -(adv / old_prob) * d_h
        if not torch.isfinite(metric).all():
            metric = torch.where(torch.isfinite(metric), metric, torch.zeros_like(metric))
        metric = torch.abs(metric)
        valid = mask.bool()
        weights = torch.zeros_like(metric)
        if valid.sum() == 0:
            return weights
        vm = metric[valid]
        lo, hi = vm.min(), vm.max()
        if linear:
            if hi > lo:
                scale = (w_max - w_min) / (hi - lo)
                vw = w_max - (vm - lo) * scale
            else:
                vw = torch.full_like(vm, (w_min + w_max) / 2)
            vw = torch.clamp(vw, min=w_min, max=w_max)
        else:
            k = -torch.log(torch.tensor(w_min, dtype=metric.dtype)) / torch.maximum(
                hi, torch.tensor(0.02, dtype=metric.dtype)
            )
            vw = torch.clamp(torch.exp(-k * vm), min=w_min, max=1.0)
        weights[valid] = vw
        return weights * mask.to(weights.dtype)


def steer_loss(old, logp, adv, mask, entropys, clip_low=0.2, clip_high=0.2, clip_c=3.0, mode="token-mean",
               w_min=0.8, w_max=1.2, linear=True, d_h=None, **norms):  # fmt: skip
    """``compute_policy_loss_with_entropy``: the dual-clip surrogate times the weights, aggregated."""
    w = steer_token_weights(adv, entropys, old, logp, mask, w_min, w_max, linear, d_h)
    pg, clipfrac, ppo_kl, lower = ppo_dual_clip(old, logp, adv, mask, clip_low, clip_high, clip_c)
    loss = agg(pg * w, mask, mode, **norms)
    valid = mask.bool()
    if valid.any():
        wm, wn, wx = w[valid].mean(), w[valid].min(), w[valid].max()
    else:
        wm = wn = wx = torch.zeros((), dtype=logp.dtype)
    metrics = dict(pg_clipfrac=clipfrac, ppo_kl=ppo_kl, pg_clipfrac_lower=lower)
    metrics.update({"steer/weight_mean": wm, "steer/weight_min": wn, "steer/weight_max": wx})
    return loss, metrics, w


# --------------------------------------------------------------------------------------------------
# BAPO
# --------------------------------------------------------------------------------------------------


def bapo_contribution_ratio(ratio, adv, mask, clip_low, clip_high, eps):
    """``_compute_effective_advantage``: ``P / (N + eps)`` (``inf`` when ``N <= 0``) with clamped ratios."""
    clip_min, clip_max = ratio.new_tensor(float(clip_low)), ratio.new_tensor(float(clip_high))
    eff_ratio = torch.where(adv >= 0, torch.minimum(ratio, clip_max), torch.maximum(ratio, clip_min))
    eff_adv = eff_ratio * adv * mask.to(ratio.dtype)
    pos = eff_adv.clamp(min=0).sum()
    neg = (-eff_adv.clamp(max=0)).sum()
    if torch.all(neg <= 0):
        return torch.tensor(math.inf, dtype=ratio.dtype)
    return pos / (neg + eps)


def bapo_search(old, logp, adv, mask, low_start, low_max, low_step, high_start, high_max, high_step, target, eps):
    """The authors' sequential bound search: ``(clip_low, clip_high, pos_neg_ratio)`` as Python floats."""
    ratio = torch.exp(torch.clamp(logp.detach() - old, min=-20.0, max=20.0))
    lo, hi = low_start, high_start
    lo_max = low_max if low_max is not None else lo
    hi_max = high_max if high_max is not None else hi
    low_step, high_step, target = max(low_step, 0.0), max(high_step, 0.0), max(target, 0.0)
    rho = bapo_contribution_ratio(ratio, adv, mask, lo, hi, eps)
    while rho.item() < target and lo < lo_max and low_step > 0:
        lo = min(lo + low_step, lo_max)
        rho = bapo_contribution_ratio(ratio, adv, mask, lo, hi, eps)
        if rho.item() >= target:
            break
    while rho.item() < target and hi < hi_max and high_step > 0:
        hi = min(hi + high_step, hi_max)
        rho = bapo_contribution_ratio(ratio, adv, mask, lo, hi, eps)
        if rho.item() >= target:
            break
    return lo, hi, rho.item()


def bapo_loss(old, logp, adv, mask, low_start, low_max, low_step, high_start, high_max, high_step, target=1.0,
              eps=1e-8, clip_c=3.0, mode="token-mean", **norms):  # fmt: skip
    """``compute_policy_loss_bapo``: the loss with the searched explicit bounds, and its metrics."""
    lo, hi, rho = bapo_search(old, logp, adv, mask, low_start, low_max, low_step, high_start, high_max, high_step,
                              target, eps)  # fmt: skip
    neg_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, lo, hi)
    c1 = torch.maximum(l1, l2)
    clipfrac = masked_mean(torch.gt(l2, l1).to(logp.dtype), mask)
    l3 = -adv * clip_c
    c2 = torch.min(l3, c1)
    lower = masked_mean((torch.gt(c1, l3) & (adv < 0)).to(logp.dtype), mask)
    pg = torch.where(adv < 0, c2, c1)
    metrics = {"pg_clipfrac": clipfrac, "ppo_kl": masked_mean(-neg_kl, mask), "pg_clipfrac_lower": lower,
               "bapo/clip_low": lo, "bapo/clip_high": hi, "bapo/pos_neg_ratio": rho}  # fmt: skip
    return agg(pg, mask, mode, **norms), metrics


# --------------------------------------------------------------------------------------------------
# RL-PLUS
# --------------------------------------------------------------------------------------------------


def rl_plus_loss(old, logp, adv, mask, prefix_mask, cliprange=0.2, loss_remove_clip=True, gamma=0.5,
                 target_probs=None, log_ratio_clamp=None, mode="token-mean", **norms):  # fmt: skip
    """``compute_token_on_off_policy_loss`` with ``off_policy_strategy="RL-PLUS"`` (``clip_upper_bound=1``, no
    off-policy clamps); ``gamma`` replaces their hard-coded 0.5; ``target_probs``: their behaviour-probs form.
    The on/off combination is a select (theirs multiplies, NaN-prone with inf); one aggregation of all tokens."""
    d = logp - old
    ppo_kl = masked_mean(-d, mask)
    d_r = d if log_ratio_clamp is None else torch.clamp(d, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(d_r)
    on = -adv * ratio
    if not loss_remove_clip:
        on2 = -adv * torch.clamp(ratio, 1.0 - cliprange, max(1.0, 1.0 + cliprange))
        on_clipfrac = masked_mean(torch.gt(on2, on).to(logp.dtype), mask)
        on = torch.max(on, on2)
    else:
        on_clipfrac = torch.zeros((), dtype=logp.dtype)
    on_mask = (~prefix_mask) & mask
    off_mask = prefix_mask & mask
    if target_probs is None:
        omega = 0.5 * (torch.exp(old) + 1)
        off_ratio = 2 * torch.exp(logp) / (torch.exp(old) + omega)
    else:
        off_ratio = torch.exp(logp) / (target_probs + 1e-6)
    exp_adv = adv * (1 - torch.exp(logp.detach())) ** gamma
    off = -off_ratio * exp_adv
    pg = torch.where(prefix_mask, off, on)

    def mean_or_zero(x, m):
        return masked_mean(x.detach(), m) if m.any() else torch.zeros((), dtype=logp.dtype)

    metrics = {
        "pg_clipfrac": on_clipfrac,
        "ppo_kl": ppo_kl,
        "pg_clipfrac_lower": torch.zeros((), dtype=logp.dtype),
        "rl_plus/on_pg_loss": mean_or_zero(on, on_mask),
        "rl_plus/off_pg_loss": mean_or_zero(off, off_mask),
        "rl_plus/off_ratio_mean": mean_or_zero(off_ratio, off_mask),
        "rl_plus/off_policy_prob": mean_or_zero(torch.exp(logp), off_mask),
        "rl_plus/on_policy_prob": mean_or_zero(torch.exp(old), on_mask),
    }
    return agg(pg, mask, mode, **norms), metrics


# --------------------------------------------------------------------------------------------------
# SSPO segment ratio and the EPO corridor
# --------------------------------------------------------------------------------------------------


def segment_ratio(old, logp, mask, segment_ids):
    """Per token ``sg(s_k) exp(logp - sg(logp))``, ``s_k = exp(clamp(mean over the valid tokens of segment k of
    (logp - old), -20, 20))``, gradient gated off where the mean is clamped; row by row, segment by segment."""
    B, T = logp.shape
    out_rows = []
    for b in range(B):
        row = []
        for t in range(T):
            if not mask[b, t]:
                row.append(torch.ones((), dtype=logp.dtype))
                continue
            same = [u for u in range(T) if mask[b, u] and segment_ids[b, u] == segment_ids[b, t]]
            mean = sum((logp[b, u] - old[b, u]).detach() for u in same) / len(same)
            inside = 1.0 if -20.0 <= float(mean) <= 20.0 else 0.0
            row.append(torch.exp(mean.clamp(-20.0, 20.0) + inside * (logp[b, t] - logp[b, t].detach())))
        out_rows.append(torch.stack(row))
    return torch.stack(out_rows)


def clipped_with_ratio(ratio, adv, clip_low, clip_high):
    """TRL's / verl's clipped surrogate on a given ratio (no dual clip)."""
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))


def corridor_loss(old, logp, adv, mask, entropy, reference, kappa_l, kappa_r, coeff, clip_low=0.2, clip_high=0.2,
                  clip_c=3.0, mode="token-mean", **norms):  # fmt: skip
    """Dual-clip PPO plus ``coeff * agg(relu(kappa_l ref - H) + relu(H - kappa_r ref))``."""
    pg, clipfrac, ppo_kl, lower = ppo_dual_clip(old, logp, adv, mask, clip_low, clip_high, clip_c)
    pen = torch.relu(kappa_l * reference - entropy) + torch.relu(entropy - kappa_r * reference)
    loss = agg(pg, mask, mode, **norms) + coeff * agg(pen, mask, mode, **norms)
    inside = (entropy > kappa_l * reference) & (entropy < kappa_r * reference)
    metrics = {"pg_clipfrac": clipfrac, "ppo_kl": ppo_kl, "pg_clipfrac_lower": lower,
               "entropy_corridor/penalty": masked_mean(pen.detach(), mask),
               "entropy_corridor/frac_inside": masked_mean(inside.to(logp.dtype), mask)}  # fmt: skip
    return loss, metrics
