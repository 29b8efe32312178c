"""What every loss mode shares: the per-mode result (:class:`PGTerms`), the extra per-token context a
mode may read (:class:`Ctx`), and the importance ratios and clipped surrogate in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Optional

import torch

from ..backends.base import LOG_RATIO_CLAMP
from .inputs import Tokens
from .segments import segment_ratio

Tensor = torch.Tensor

#: GSPO clamps the token-level log sequence ratio from above (verl: clamp(..., max=10.0))
GSPO_LOG_RATIO_MAX = 10.0


class PGTerms(NamedTuple):
    """What one loss mode returns: per-token loss and its metrics."""

    loss: Tensor  # [N] per-token loss (masked positions are ignored)
    clipfrac: Tensor  # 0-dim fp32
    clipfrac_lower: Tensor  # 0-dim fp32
    ppo_kl: Tensor  # 0-dim fp32
    cov_selected_frac: Optional[Tensor] = None  # 0-dim fp32 (covariance modes)
    extra: Optional[dict[str, Tensor]] = None  # mode-specific metrics (0-dim fp32), by name


class Ctx(NamedTuple):
    """What a mode may read besides the tokens: the rollout-correction IS weights (detached ``[N]``), the
    current entropy (``[N]``, 0 at masked positions, or None), and the optional per-token inputs of the
    call (clean: compute dtype, 0 at masked positions), by name."""

    is_w: Optional[Tensor] = None
    entropy: Optional[Tensor] = None
    side: Mapping[str, Tensor] = {}


NO_CTX = Ctx()


def ratio(tok: Tokens) -> Tensor:
    """Per-token importance ratio ``exp(clamp(logp - old_logp, -20, 20))``."""
    return torch.exp(tok.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def clamped_log_ratio(tok: Tokens) -> Tensor:
    return tok.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def seq_ratio(tok: Tokens) -> Tensor:
    """TRL's sequence-level ratio ``exp(mean_t(logp - old))`` of each token's sequence ([N]); the gradient
    flows through the mean to every valid token of the sequence. Log clamped to [-20, 20]."""
    seg = tok.seg
    n = seg.seq_sum(tok.valid.to(tok.logp.dtype)).clamp_min(1)
    log_s = (seg.seq_sum(tok.log_ratio) / n).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(seg.expand(log_s))


def is_ratio(tok: Tokens, cfg, side: Mapping[str, Tensor] = {}) -> Tensor:  # noqa: B006 (read only)
    """The importance ratio of the ratio-based modes at ``importance_sampling_level`` (``"segment"``: SSPO's,
    from ``side["segment_ids"]``)."""
    if cfg.importance_sampling_level == "sequence":
        return seq_ratio(tok)
    if cfg.importance_sampling_level == "segment":
        return segment_ratio(tok, side["segment_ids"])
    return ratio(tok)


def clipped_surrogate(adv: Tensor, r: Tensor, cfg, unclipped: Optional[Tensor] = None):
    """``L1 = -A r``, ``L2 = -A clip(r, 1-low, 1+high)`` and ``max(L1, L2)``; ``unclipped`` replaces ``r`` in
    ``L1`` (INTELLECT-2's ``min(r, delta)``)."""
    l1 = -adv * (r if unclipped is None else unclipped)
    l2 = -adv * r.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    return l1, l2, torch.maximum(l1, l2)


def dual_clip(tok: Tokens, lc: Tensor, clip_c: Optional[float]) -> tuple[Tensor, Tensor]:
    """verl's dual clip for A < 0: ``min(Lc, -A c)``, and the fraction of valid A < 0 tokens it bounds."""
    if clip_c is None:
        return lc, tok.zero_metric()
    l3 = -tok.adv * clip_c
    negative = tok.adv < 0
    return torch.where(negative, torch.minimum(l3, lc), lc), tok.masked_mean((lc > l3) & negative)


def delta_cap(r: Tensor, cfg) -> Optional[Tensor]:
    return None if cfg.delta is None else r.clamp(max=cfg.delta)
