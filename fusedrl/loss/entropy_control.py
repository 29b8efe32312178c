"""The seed papers' entropy-control methods as loss modes and terms (docs/entropy-control.md has every source,
formula and difference): STEER (token weights from the entropy-change estimate), BAPO (ratio bounds searched
per batch, all candidates at once on the device), RL-PLUS (external-demonstration tokens), and EPO's entropy
corridor (a hinge around a reference entropy, with a working gradient). SSPO's segment ratio is in
``segments``. Every statistic stays on the device (no host sync); with ``stats_group`` the batch statistics
of STEER and BAPO run over the group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch

from .config import PolicyLossConfig, bapo_grid
from .inputs import Tokens
from .selection import group_sum
from .terms import Ctx, PGTerms, clamped_log_ratio, clipped_surrogate, dual_clip

Tensor = torch.Tensor

#: the mode metrics each entropy-control mode adds (0-dim fp32), in order
MODE_METRICS = {
    "steer": ("steer/weight_mean", "steer/weight_min", "steer/weight_max"),
    "bapo": ("bapo/clip_low", "bapo/clip_high", "bapo/pos_neg_ratio", "bapo/search_steps"),
    "rl_plus": (
        "rl_plus/on_pg_loss",
        "rl_plus/off_pg_loss",
        "rl_plus/off_ratio_mean",
        "rl_plus/off_policy_prob",
        "rl_plus/on_policy_prob",
    ),
}
#: the metrics of the EPO corridor (when ``entropy_corridor`` is set)
CORRIDOR_METRICS = ("entropy_corridor/penalty", "entropy_corridor/frac_inside")
#: the modes whose token weights / bounds are statistics of the whole batch (head_kind "batch")
BATCH_STAT_MODES = ("steer", "bapo")
#: STEER's probability clamps (zz-haooo/STEER ``compute_token_weights``)
STEER_P_MIN = 1e-8
#: STEER's floor of the largest |Omega| in the exponential mapping
STEER_EXP_FLOOR = 0.02
#: RL-PLUS's epsilon of the behaviour-probability denominator
RL_PLUS_BEHAVIOUR_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# what a config reads
# --------------------------------------------------------------------------------------------------


def steer_entropy_source(cfg: PolicyLossConfig) -> Optional[str]:
    """Where STEER's ``H`` comes from: ``"old_entropy"``, ``"entropy"`` (current), or None (not STEER, or
    the exact form, whose ``dH`` holds it)."""
    if cfg.loss_mode != "steer" or cfg.steer_exact:
        return None
    return "old_entropy" if cfg.steer_entropy == "old" else "entropy"


def computes_entropy_change(cfg: PolicyLossConfig, given) -> bool:
    """The fused loss computes STEER's exact ``dH`` in its pass (``steer_exact`` without ``entropy_change``)."""
    return cfg.loss_mode == "steer" and cfg.steer_exact and "entropy_change" not in given


def reads_entropy(cfg: PolicyLossConfig) -> bool:
    """The loss reads the current policy's entropy: a bonus, the 80/20 mask, STEER's current ``H``, the corridor."""
    return (
        cfg.entropy_coeff != 0
        or cfg.top_entropy_quantile < 1
        or cfg.entropy_corridor is not None
        or steer_entropy_source(cfg) == "entropy"
    )


def entropy_has_grad(cfg: PolicyLossConfig) -> bool:
    """The loss differentiates the entropy (a bonus or the corridor; STEER reads it detached)."""
    return cfg.entropy_coeff != 0 or cfg.entropy_corridor is not None


def entropy_control_inputs(cfg: PolicyLossConfig) -> dict[str, Optional[str]]:
    """The entropy-control side inputs of a config: name -> why it is needed (None: read if given)."""
    out: dict[str, Optional[str]] = {}
    if steer_entropy_source(cfg) == "old_entropy":
        out["old_entropy"] = "loss_mode='steer' with steer_entropy='old'"
    if cfg.loss_mode == "steer" and cfg.steer_exact:
        out["entropy_change"] = "loss_mode='steer' with steer_exact=True"
    if cfg.loss_mode == "rl_plus":
        out["external_mask"] = "loss_mode='rl_plus'"
        out["behaviour_logp"] = None
    if cfg.importance_sampling_level == "segment":
        out["segment_ids"] = "importance_sampling_level='segment'"
    if cfg.entropy_corridor is not None:
        out["entropy_reference"] = "entropy_corridor"
    return out


ENTROPY_CONTROL_INPUTS = ("old_entropy", "entropy_change", "external_mask", "behaviour_logp", "segment_ids",
                          "entropy_reference")  # fmt: skip


def check_entropy_control_inputs(cfg: PolicyLossConfig, given: set[str], entropy_known: bool) -> None:
    """ValueError naming the entropy-control input a config needs and lacks, or one given that nothing reads.
    ``entropy_known=False`` (the fused loss): the pass computes the entropy and, for ``steer_exact``, the
    entropy change (a given ``entropy_change`` is used instead)."""
    wants = entropy_control_inputs(cfg)
    if not entropy_known and "entropy_change" in wants:
        wants["entropy_change"] = None  # computed in the pass unless given
    for name in ENTROPY_CONTROL_INPUTS:
        if name in wants and wants[name] is not None and name not in given:
            raise ValueError(f"{wants[name]} needs {name} (pass {name}=...)")
        if name in given and name not in wants:
            raise ValueError(f"{name} is given but nothing reads it ({_reader(name)})")
    if entropy_known and "entropy" not in given:
        if steer_entropy_source(cfg) == "entropy":
            raise ValueError("steer_entropy='current' needs the per-token entropy (pass entropy=...)")
        if cfg.entropy_corridor is not None:
            raise ValueError("entropy_corridor needs the per-token entropy (pass entropy=...)")


def _reader(name: str) -> str:
    return {
        "old_entropy": "loss_mode='steer' with steer_entropy='old' and steer_exact=False reads it",
        "entropy_change": "loss_mode='steer' with steer_exact=True reads it",
        "external_mask": "loss_mode='rl_plus' reads it",
        "behaviour_logp": "loss_mode='rl_plus' reads it",
        "segment_ids": "importance_sampling_level='segment' reads it",
        "entropy_reference": "entropy_corridor reads it",
    }[name]


def metric_names_of(cfg: PolicyLossConfig) -> tuple[str, ...]:
    """The mode and corridor metrics of a config, in the order the loss returns them."""
    names = MODE_METRICS.get(cfg.loss_mode, ())
    if cfg.entropy_corridor is not None:
        names = names + CORRIDOR_METRICS
    return names


def _masked_extreme(tok: Tokens, x: Tensor, largest: bool) -> Tensor:
    """Min / max of ``x`` over the valid tokens (0 when there are none), detached fp32."""
    if x.numel() == 0:
        return tok.zero_metric()
    fill = torch.full_like(x, -math.inf if largest else math.inf)
    v = torch.where(tok.valid, x.detach(), fill)
    v = v.amax() if largest else v.amin()
    return torch.where(tok.n_valid > 0, v, torch.zeros_like(v)).float()


def _masked_mean_over(x: Tensor, where: Tensor) -> Tensor:
    """Mean of ``x`` over ``where`` (0 when empty), detached fp32."""
    x = x.detach()
    n = where.sum().clamp_min(1).to(x.dtype)
    return (torch.where(where, x, torch.zeros_like(x)).sum() / n).float()


# --------------------------------------------------------------------------------------------------
# STEER (arXiv 2510.10150; zz-haooo/STEER compute_token_weights, compute_policy_loss_with_entropy)
# --------------------------------------------------------------------------------------------------


def steer_omega(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx) -> Tensor:
    """``|Omega|`` per token (detached; 0 at masked positions and where Omega is not finite):
    ``Omega = (A / p_old) x (1 - x)(ln x + H)`` with ``x = clamp(exp(logp), 1e-8, 1 - 1e-8)``,
    ``p_old = clamp(exp(old_logp), 1e-8, 1)``; exact form ``Omega = -(A / p_old) dH``."""
    with torch.no_grad():
        p_old = torch.exp(tok.old_logp).clamp(STEER_P_MIN, 1.0)
        if cfg.steer_exact:
            om = -(tok.adv / p_old) * ctx.side["entropy_change"]
        else:
            x = torch.exp(tok.logp.detach()).clamp(STEER_P_MIN, 1.0 - STEER_P_MIN)
            h = ctx.side["old_entropy"] if cfg.steer_entropy == "old" else ctx.entropy.detach()
            om = (tok.adv / p_old) * (x * (1 - x) * (torch.log(x) + h))
        om = torch.where(torch.isfinite(om) & tok.valid, om, torch.zeros_like(om))
        return om.abs()


def steer_weights(tok: Tokens, m: Tensor, cfg: PolicyLossConfig) -> Tensor:
    """STEER's detached token weights from ``m = |Omega|``: min / max over the valid tokens of the batch (of
    ``stats_group``); "linear" maps ``[min, max]`` to ``[lambda_max, lambda_min]`` (the midpoint when
    ``max == min``), "exp" is ``clamp(exp(-k m), lambda_min, 1)`` with ``k = -ln(lambda_min) / max(max, 0.02)``.
    0 at masked positions."""
    lam_lo, lam_hi = cfg.steer_lambda_min, cfg.steer_lambda_max
    with torch.no_grad():
        if m.numel() == 0:
            return m.clone()
        lo = torch.where(tok.valid, m, torch.full_like(m, math.inf)).amin()
        hi = torch.where(tok.valid, m, torch.full_like(m, -math.inf)).amax()
        if cfg.stats_group is not None:  # one all-reduce (MAX) of (-min, max)
            ext = torch.stack([-lo, hi])
            torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.MAX, group=cfg.stats_group)
            lo, hi = -ext[0], ext[1]
        if cfg.steer_weighting == "linear":
            spread = hi > lo
            scale = (lam_hi - lam_lo) / torch.where(spread, hi - lo, torch.ones_like(hi))
            w = torch.where(spread, lam_hi - (m - lo) * scale, torch.full_like(m, (lam_lo + lam_hi) / 2))
            w = w.clamp(lam_lo, lam_hi)
        else:
            k = -math.log(lam_lo) / torch.clamp(hi, min=STEER_EXP_FLOOR)
            w = torch.exp(-k * m).clamp(lam_lo, 1.0)
        return torch.where(tok.valid, w, torch.zeros_like(w))


def loss_steer(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx) -> PGTerms:
    """STEER: verl's dual-clip PPO surrogate times the detached STEER weights (then ``loss_agg_mode``)."""
    log_ratio = clamped_log_ratio(tok)
    l1, l2, lc = clipped_surrogate(tok.adv, torch.exp(log_ratio), cfg)
    loss, lower = dual_clip(tok, lc, cfg.clip_ratio_c)
    w = steer_weights(tok, steer_omega(tok, cfg, ctx), cfg)
    extra = {
        "steer/weight_mean": tok.masked_mean(w),
        "steer/weight_min": _masked_extreme(tok, w, largest=False),
        "steer/weight_max": _masked_extreme(tok, w, largest=True),
    }
    return PGTerms(loss * w, tok.masked_mean(l2 > l1), lower, tok.masked_mean(-log_ratio), extra=extra)


# --------------------------------------------------------------------------------------------------
# BAPO (arXiv 2510.18927; WooooDyy/BAPO compute_policy_loss_bapo)
# --------------------------------------------------------------------------------------------------


def device_floats(vals: list[float], like: Tensor) -> Tensor:
    """Host floats on ``like``'s device without a synchronising copy (non-blocking from pageable memory)."""
    t = torch.tensor(vals, dtype=like.dtype)
    return t if like.device.type == "cpu" else t.to(like.device, non_blocking=True)


def bapo_sums(tok: Tokens, r: Tensor, cfg: PolicyLossConfig) -> tuple[Tensor, Tensor]:
    """BAPO's search statistics of these tokens (no collective): ``P`` per upper bound
    (``sum_{A>0} min(r, c_high) A``) and ``N`` per lower bound (``sum_{A<0} max(r, c_low) |A|``). Sums:
    the tokens' share adds up across chunks and ranks."""
    lower, upper = bapo_grid(cfg)
    with torch.no_grad():
        lo, hi = device_floats(lower, tok.logp), device_floats(upper, tok.logp)
        rr, a = r.detach(), tok.adv
        zero = torch.zeros_like(a)
        pos_a = torch.where(tok.valid & (a > 0), a, zero)
        neg_a = torch.where(tok.valid & (a < 0), -a, zero)
        p = (torch.minimum(rr[None, :], hi[:, None]) * pos_a[None, :]).sum(-1)
        n = (torch.maximum(rr[None, :], lo[:, None]) * neg_a[None, :]).sum(-1)
        return p, n


def bapo_pick(p: Tensor, n: Tensor, cfg: PolicyLossConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The state at which the authors' sequential search stops, from the sums of :func:`bapo_sums`: lower bound
    first, then upper; the first state with ``P / (N + eps) >= target`` (``inf`` when ``N <= 0``), else the
    last. ``(c_low, c_high, P / N, steps)`` as 0-dim tensors on the sums' device, ``steps`` the state's index
    (int64; its bounds as host floats: :func:`fusedrl.loss.config.bapo_state`)."""
    lower, upper = bapo_grid(cfg)
    with torch.no_grad():
        lo, hi = device_floats(lower, p), device_floats(upper, p)
        nl, nu = len(lower), len(upper)
        # the visited states: (lower_i, upper_0) for every i, then (lower_last, upper_j) for j >= 1
        p_s = torch.cat([p[:1].expand(nl), p[1:]])
        n_s = torch.cat([n, n[-1:].expand(nu - 1)])
        lo_s = torch.cat([lo, lo[-1:].expand(nu - 1)])
        hi_s = torch.cat([hi[:1].expand(nl), hi[1:]])
        rho = torch.where(n_s <= 0, torch.full_like(p_s, math.inf), p_s / (n_s + cfg.bapo_eps))
        met = ~(rho < cfg.bapo_adv_ratio_target)  # NaN stops the search too, as the authors' `while rho < t`
        met = torch.cat([met[:-1], torch.ones_like(met[-1:])])  # the last state when none meets the target
        idx = torch.argmax(met.to(rho.dtype)).reshape(1)  # the first state meeting it
        pick = lambda v: v.gather(0, idx).reshape(())  # noqa: E731
        return pick(lo_s), pick(hi_s), pick(rho), idx.reshape(())


def bapo_bounds(tok: Tokens, r: Tensor, cfg: PolicyLossConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BAPO's ratio bounds ``(c_low, c_high, P / N, steps)`` as 0-dim device tensors: every candidate of the
    search evaluated at once (:func:`bapo_sums`), one all-reduce of both vectors over ``stats_group``, then the
    state the sequential search stops at (:func:`bapo_pick`)."""
    p, n = bapo_sums(tok, r, cfg)
    if cfg.stats_group is not None:
        with torch.no_grad():
            both = group_sum(torch.cat([p, n]), cfg.stats_group)
        p, n = both[: p.numel()], both[p.numel() :]
    return bapo_pick(p, n, cfg)


def loss_bapo(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx) -> PGTerms:
    """BAPO: the dual-clip surrogate with the searched explicit ratio bounds ``clamp(r, c_low, c_high)``."""
    log_ratio = clamped_log_ratio(tok)
    r = torch.exp(log_ratio)
    c_lo, c_hi, rho, steps = bapo_bounds(tok, r, cfg)
    l1 = -tok.adv * r
    l2 = -tok.adv * torch.clamp(r, min=c_lo, max=c_hi)
    loss, lower = dual_clip(tok, torch.maximum(l1, l2), cfg.clip_ratio_c)
    extra = {"bapo/clip_low": c_lo.float(), "bapo/clip_high": c_hi.float(), "bapo/pos_neg_ratio": rho.float(),
             "bapo/search_steps": steps.float()}  # fmt: skip
    return PGTerms(loss, tok.masked_mean(l2 > l1), lower, tok.masked_mean(-log_ratio), extra=extra)


# --------------------------------------------------------------------------------------------------
# RL-PLUS (arXiv 2508.00222; YihongDong/RL-PLUS compute_token_on_off_policy_loss)
# --------------------------------------------------------------------------------------------------


def loss_rl_plus(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx) -> PGTerms:
    """RL-PLUS: on-policy tokens ``-A r`` (``rl_plus_clip_on_policy``: ``max(-A r, -A clip(r, 1-low, 1+high))``,
    no dual clip); external tokens (``external_mask``) ``-rho A (1 - sg(p))^gamma`` with
    ``rho = 2p / (p_old + (p_old + 1) / 2)``, or ``p / (exp(behaviour_logp) + 1e-6)``."""
    side: Mapping[str, Tensor] = ctx.side
    ext = side["external_mask"] & tok.valid
    on = tok.valid & ~ext
    d = tok.log_ratio
    r = torch.exp(d.clamp(-20.0, 20.0))
    l_on = -tok.adv * r
    zero = tok.zero_metric()
    clipfrac = zero
    if cfg.rl_plus_clip_on_policy:
        l2 = -tok.adv * r.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
        clipfrac = tok.masked_mean(l2 > l_on)
        l_on = torch.maximum(l_on, l2)
    p = torch.exp(tok.logp)
    p_old = torch.exp(tok.old_logp)
    beh = side.get("behaviour_logp")
    if beh is not None:
        rho = p / (torch.exp(beh) + RL_PLUS_BEHAVIOUR_EPS)
    else:
        rho = 2 * p / (p_old + 0.5 * (p_old + 1))
    a_exp = tok.adv * (1 - p.detach()).clamp_min(0) ** cfg.rl_plus_gamma
    l_off = -rho * a_exp
    extra = {
        "rl_plus/on_pg_loss": _masked_mean_over(l_on, on),
        "rl_plus/off_pg_loss": _masked_mean_over(l_off, ext),
        "rl_plus/off_ratio_mean": _masked_mean_over(rho, ext),
        "rl_plus/off_policy_prob": _masked_mean_over(p, ext),
        "rl_plus/on_policy_prob": _masked_mean_over(p_old, on),
    }
    return PGTerms(torch.where(ext, l_off, l_on), clipfrac, zero, tok.masked_mean(-d), extra=extra)


# --------------------------------------------------------------------------------------------------
# EPO's entropy corridor (arXiv 2509.22576; WujiangXu/EPO generate_entropy_penalty, with a gradient)
# --------------------------------------------------------------------------------------------------


def corridor_penalty(ent: Tensor, ref: Tensor, cfg: PolicyLossConfig) -> Tensor:
    """``relu(kappa_l H_ref - H) + relu(H - kappa_r H_ref)`` per token (differentiable in ``H``)."""
    k_lo, k_hi = cfg.entropy_corridor
    return torch.relu(k_lo * ref - ent) + torch.relu(ent - k_hi * ref)


def corridor_metrics(tok: Tokens, ent: Tensor, ref: Tensor, pen: Tensor, cfg: PolicyLossConfig) -> dict[str, Tensor]:
    k_lo, k_hi = cfg.entropy_corridor
    h = ent.detach()
    inside = (h > k_lo * ref) & (h < k_hi * ref)  # EPO's open interval
    return {"entropy_corridor/penalty": tok.masked_mean(pen), "entropy_corridor/frac_inside": tok.masked_mean(inside)}
