"""The loss modes: one function per mode, ``(tokens, config, ctx) -> PGTerms`` (per-token loss and
metrics), pure torch formulas; and :data:`MODES`, the registry by ``loss_mode`` name, with the sets that
say what each mode needs from a schedule (token-local, batch selection, whole sequences).

Semantics: verl's ``core_algos.py`` (``compute_policy_loss_vanilla``, ``_gspo``, ``_clip_cov``,
``_kl_cov``, ``_gpg``, ``_cispo``, ``_sapo``, ``_geo_mean``, ``_dppo_kl``, ``_dppo_tv``, ``_dro``,
``_bypass_mode``) and TRL's ``GRPOTrainer._compute_loss`` (``luspo``, ``vespo``, ``delta``, sequence-level
importance sampling); the entropy-control modes (``steer``, ``bapo``, ``rl_plus``) live in
``entropy_control``. docs/policy-losses.md and docs/entropy-control.md have every formula and difference.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..backends.base import LOG_RATIO_CLAMP
from .config import PolicyLossConfig
from .entropy_control import BATCH_STAT_MODES, loss_bapo, loss_rl_plus, loss_steer
from .inputs import Tokens
from .terms import (
    GSPO_LOG_RATIO_MAX,
    NO_CTX,
    Ctx,
    PGTerms,
    clamped_log_ratio,
    clipped_surrogate,
    delta_cap,
    dual_clip,
    is_ratio,
    ratio,
)

Tensor = torch.Tensor
ModeFn = Callable[[Tokens, PolicyLossConfig, Ctx], PGTerms]

#: DRO's penalty coefficient when dro_beta is None (the default of verl-compatible ports)
DRO_BETA_DEFAULT = 0.1


def loss_vanilla(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX, dual: bool = True) -> PGTerms:
    """PPO clipped surrogate with clip-higher and dual clip (verl ``compute_policy_loss_vanilla``); ``delta``
    caps the unclipped ratio (TRL / INTELLECT-2); ``importance_sampling_level="sequence"`` takes TRL's
    sequence ratio."""
    log_ratio = clamped_log_ratio(tok)
    r = torch.exp(log_ratio) if cfg.importance_sampling_level == "token" else is_ratio(tok, cfg, ctx.side)
    l1, l2, lc = clipped_surrogate(tok.adv, r, cfg, delta_cap(r, cfg))
    loss, lower = dual_clip(tok, lc, cfg.clip_ratio_c if dual else None)
    return PGTerms(loss, tok.masked_mean(l2 > l1), lower, tok.masked_mean(-log_ratio))


def loss_luspo(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    """TRL's LUSPO: the clipped surrogate without dual clip (its length scaling is the aggregation)."""
    return loss_vanilla(tok, cfg, ctx, dual=False)


def loss_gspo(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    """GSPO: sequence-level ratio ``s_i = exp(mean_t d)``, applied per token with a straight-through
    gradient (``log s_it = sg(log s_i) + logp - sg(logp)``, clamped at 10); no dual clip; ``delta`` caps
    the unclipped ratio."""
    seg = tok.seg
    n_tok = seg.seq_sum(tok.valid.to(tok.logp.dtype)).clamp_min(1)
    log_seq_ratio = (seg.seq_sum(tok.log_ratio) / n_tok).detach()  # masked positions hold 0
    log_s = tok.logp - tok.logp.detach() + seg.expand(log_seq_ratio)  # verl's order (precision)
    s = torch.exp(log_s.clamp(max=GSPO_LOG_RATIO_MAX))
    l1, l2, loss = clipped_surrogate(tok.adv, s, cfg, delta_cap(s, cfg))
    return PGTerms(loss, tok.masked_mean(l2 > l1), tok.zero_metric(), tok.masked_mean(-tok.log_ratio))


def clip_cov_terms(tok: Tokens, cfg: PolicyLossConfig, picked: torch.Tensor) -> PGTerms:
    """Clip-Cov's per-token loss for a given pick: the clipped surrogate, 0 on picked tokens."""
    l1, l2, lc = clipped_surrogate(tok.adv, ratio(tok), cfg)
    loss = torch.where(picked, torch.zeros_like(lc), lc)
    frac = tok.masked_mean(picked)
    return PGTerms(loss, frac, tok.zero_metric(), tok.masked_mean(-tok.log_ratio), frac)


def kl_cov_terms(tok: Tokens, cfg: PolicyLossConfig, picked: torch.Tensor) -> PGTerms:
    """KL-Cov's per-token loss for a given pick."""
    loss = -tok.adv * ratio(tok)
    abs_kl = tok.log_ratio.abs()
    loss = loss + torch.where(picked, cfg.ppo_kl_coef * abs_kl, torch.zeros_like(abs_kl))
    zero = tok.zero_metric()
    return PGTerms(loss, zero, zero, tok.masked_mean(abs_kl), tok.masked_mean(picked))


def loss_gpg(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    """GPG: plain policy gradient ``-A logp``."""
    zero = tok.zero_metric()
    ppo_kl = tok.masked_mean(-tok.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return PGTerms(-tok.adv * tok.logp, zero, zero, ppo_kl)


def loss_cispo(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    """CISPO: ``-sg(clip(r, 1-low, 1+high)) * A * logp``; every token keeps its gradient. A negative
    ``clip_ratio_high`` expresses TRL's cap ``epsilon_high < 1``."""
    log_ratio = tok.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if cfg.importance_sampling_level == "token":
        ratio = torch.exp(log_ratio).detach()
    else:
        ratio = is_ratio(tok, cfg, ctx.side).detach()
    clipped = ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    loss = -clipped * tok.adv * tok.logp
    return PGTerms(loss, tok.masked_mean(ratio != clipped), tok.zero_metric(), tok.masked_mean(-log_ratio))


def loss_sapo(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    """SAPO: soft gate ``f(r) = sigmoid(tau (r - 1)) * 4 / tau`` (``tau_pos`` if A > 0 else ``tau_neg``),
    loss ``-f(r) A`` (verl ``compute_policy_loss_sapo``, TRL ``sapo``). No clip metrics (0)."""
    ratio = is_ratio(tok, cfg, ctx.side)
    tau = torch.where(tok.adv > 0, torch.full_like(ratio, cfg.tau_pos), torch.full_like(ratio, cfg.tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    zero = tok.zero_metric()
    ppo_kl = tok.masked_mean(-tok.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return PGTerms(-gate * tok.adv, zero, zero, ppo_kl)


def loss_geo_mean(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    """GMPO (verl ``compute_policy_loss_geo_mean``): per sequence ``L_i = -mean_t(A) * exp(mean_t d~)``
    with ``d~`` the log ratio clipped to ``[-low, high]`` on the side of the advantage's sign (unclamped
    otherwise), times the geometric mean of the rollout IS weights; ``L_i`` is placed on every token
    of the sequence (so seq-mean-token-mean aggregates it as verl's mean over rows)."""
    seg = tok.seg
    d = tok.log_ratio
    sgn = torch.sign(tok.adv)
    d_clamp = d.clamp(-cfg.clip_ratio_low, cfg.clip_ratio_high)
    d_min = sgn * torch.minimum(sgn * d, sgn * d_clamp)
    vf = tok.valid.to(d.dtype)
    n = seg.seq_sum(vf).clamp_min(1)
    ratio = torch.exp(seg.seq_sum(torch.where(tok.valid, d_min, torch.zeros_like(d_min))) / n)
    adv = seg.seq_sum(tok.adv) / n
    loss = -adv * ratio
    if ctx.is_w is not None:  # verl: the geometric mean of the token weights per sequence
        log_w = torch.where(tok.valid, torch.log(ctx.is_w + 1e-10), torch.zeros_like(ctx.is_w))
        loss = loss * torch.exp(seg.seq_sum(log_w) / n)
    clipped = (d != d_clamp).detach()
    return PGTerms(
        seg.expand(loss),
        tok.masked_mean(clipped & (tok.adv > 0)),
        tok.masked_mean(clipped & (tok.adv < 0)),
        tok.masked_mean(-d),
    )


def dppo_valid(tok: Tokens, cfg: PolicyLossConfig, binary_kl: bool) -> torch.Tensor:
    """DPPO's trust region (detached): TV ``|p - p_old|`` or binary KL within clip_ratio_low / high on the
    side the advantage pushes."""
    with torch.no_grad():
        lp, old = tok.logp.detach(), tok.old_logp
        prob, old_prob = torch.exp(lp), torch.exp(old)
        if binary_kl:
            bkl = old_prob * (old - lp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            pos = (bkl <= cfg.clip_ratio_high) | (prob <= old_prob)
            neg = (bkl <= cfg.clip_ratio_low) | (prob >= old_prob)
        else:
            pos = (prob - old_prob) <= cfg.clip_ratio_high
            neg = (prob - old_prob) >= -cfg.clip_ratio_low
        return torch.where(tok.adv > 0, pos, neg)


def loss_dppo(tok: Tokens, cfg: PolicyLossConfig, binary_kl: bool) -> PGTerms:
    """DPPO (verl ``compute_policy_loss_dppo_kl`` / ``_tv``): ``-A sg(min(r, clip_ratio_c)) logp`` on the
    tokens inside the divergence trust region, 0 outside. ``pg_clipfrac``: outside the region;
    ``pg_clipfrac_lower``: inside with ``r > clip_ratio_c``."""
    log_ratio = tok.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio).detach()
    trunc = ratio if cfg.clip_ratio_c is None else ratio.clamp(max=cfg.clip_ratio_c)
    inside = dppo_valid(tok, cfg, binary_kl)
    loss = torch.where(inside, -tok.adv * trunc * tok.logp, torch.zeros_like(ratio))
    over = (ratio > cfg.clip_ratio_c) if cfg.clip_ratio_c is not None else torch.zeros_like(inside)
    return PGTerms(loss, tok.masked_mean(~inside), tok.masked_mean(over & inside), tok.masked_mean(-log_ratio))


def loss_dppo_kl(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    return loss_dppo(tok, cfg, binary_kl=True)


def loss_dppo_tv(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    return loss_dppo(tok, cfg, binary_kl=False)


def loss_dro(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    """DRO (Kimi / verl ``dro``): ``-A logp + dro_beta / 2 * (logp - old)^2`` (log ratio unclamped)."""
    beta = DRO_BETA_DEFAULT if cfg.dro_beta is None else cfg.dro_beta
    d = tok.log_ratio
    zero = tok.zero_metric()
    return PGTerms(-tok.adv * tok.logp + 0.5 * beta * d.square(), zero, zero, tok.masked_mean(-d))


def loss_bypass(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    """verl bypass mode (old_logp is the rollout's): "ppo_clip" is the vanilla loss on ``logp - old``
    (IS weights reported, not applied); "reinforce" is ``-A w logp`` with the detached IS weights ``w``
    (1 when ``rollout_is`` is off); its ``ppo_kl`` is ``mean_m(old - logp)``."""
    rc = cfg.effective_rollout_correction
    if rc.loss_type == "ppo_clip":
        return loss_vanilla(tok, cfg, ctx)
    loss = -tok.adv * tok.logp
    if ctx.is_w is not None:
        loss = loss * ctx.is_w
    zero = tok.zero_metric()
    return PGTerms(loss, zero, zero, tok.masked_mean(-tok.log_ratio))


def loss_vespo(tok: Tokens, cfg: PolicyLossConfig, ctx: Ctx = NO_CTX) -> PGTerms:
    """TRL's VESPO: ``-sg(phi) A logp`` with ``phi = exp(l + k log w - l w)`` of the sequence ratio
    ``log w = clamp(sum_t clamp(d, -20, 20) + sum_t log IS, log 1e-8, 20)`` (IS weights of the rollout
    correction, clamped to ``[log 1e-8, 20]`` in log space), ``(k, l)`` = ``(vespo_k_pos,
    vespo_lambda_pos)`` for A >= 0 else the ``_neg`` pair, ``l`` clamped at 1e-4."""
    seg = tok.seg
    lower = math.log(1e-8)
    with torch.no_grad():
        d = torch.where(
            tok.valid, tok.log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), torch.zeros_like(tok.logp)
        )
        log_seq = seg.seq_sum(d)
        if ctx.is_w is not None:
            log_is = torch.where(tok.valid, torch.log(ctx.is_w).clamp(lower, LOG_RATIO_CLAMP), torch.zeros_like(d))
            log_seq = log_seq + seg.seq_sum(log_is)
        log_w = seg.expand(log_seq.clamp(lower, LOG_RATIO_CLAMP))
        nonneg = tok.adv >= 0
        k = torch.where(nonneg, torch.full_like(d, cfg.vespo_k_pos), torch.full_like(d, cfg.vespo_k_neg))
        lam = torch.where(
            nonneg, torch.full_like(d, cfg.vespo_lambda_pos), torch.full_like(d, cfg.vespo_lambda_neg)
        ).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    zero = tok.zero_metric()
    ppo_kl = tok.masked_mean(-tok.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return PGTerms(-phi * tok.adv * tok.logp, zero, zero, ppo_kl)


MODES: dict[str, ModeFn] = {
    "vanilla": loss_vanilla,
    "gspo": loss_gspo,
    "gpg": loss_gpg,
    "cispo": loss_cispo,
    "sapo": loss_sapo,
    "geo_mean": loss_geo_mean,
    "dppo_kl": loss_dppo_kl,
    "dppo_tv": loss_dppo_tv,
    "dro": loss_dro,
    "bypass_mode": loss_bypass,
    "luspo": loss_luspo,
    "vespo": loss_vespo,
    # entropy control (fusedrl.loss.entropy_control, docs/entropy-control.md)
    "steer": loss_steer,
    "bapo": loss_bapo,
    "rl_plus": loss_rl_plus,
}
#: batch-level selection: the loss of a token depends on a pick over the batch (terms given the pick)
SELECTION_TERMS: dict[str, Callable[[Tokens, PolicyLossConfig, Tensor], PGTerms]] = {
    "clip_cov": clip_cov_terms,
    "kl_cov": kl_cov_terms,
}
#: modes whose policy term takes the rollout IS weights themselves (the others are multiplied by them)
IS_INSIDE_MODES = ("geo_mean", "vespo", "bypass_mode")
#: modes whose per-token gradient needs only the token itself (plus normalisers fixed up front)
TOKEN_LOCAL_MODES = ("vanilla", "gpg", "cispo", "sapo", "dppo_kl", "dppo_tv", "dro", "bypass_mode", "luspo")
#: batch-level selection: one pass with unselected coefficients, then a rank-k correction
SELECTION_MODES = tuple(SELECTION_TERMS)
#: a ratio per sequence: token chunks must hold whole sequences
SEQUENCE_MODES = ("gspo", "geo_mean", "vespo")
#: the entropy-control modes (``ENTROPY_CONTROL_MODES``) by what they need from a schedule: token-local, or a
#: statistic of the whole batch (STEER's weight range, BAPO's bound search: head_kind "batch")
ENTROPY_TOKEN_MODES = ("rl_plus",)
ENTROPY_BATCH_MODES = BATCH_STAT_MODES
