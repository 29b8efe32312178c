"""Per-token values to a scalar: the KL estimators (verl ``kl_penalty``), the normalisers, and the
aggregation modes (verl ``agg_loss``)."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

from ..backends.base import LOG_RATIO_CLAMP
from .config import LOSS_AGG_MODES, Number, PolicyLossConfig, canonical_kl_type
from .inputs import Tokens


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference (verl ``kl_penalty``).

    ``k1 = logp - ref``, ``abs = |logp - ref|``, ``k2 = (logp - ref)^2 / 2``,
    ``k3 = clamp(exp(x) - x - 1, -10, 10)`` with ``x = clamp(ref - logp, -20, 20)``. A ``+`` suffix
    keeps the value and takes the gradient of ``k2`` (straight-through).
    """
    name = canonical_kl_type(kl_type)
    base = name.rstrip("+")
    diff = logp - ref_logp
    if base == "k1":
        kl = diff
    elif base == "abs":
        kl = diff.abs()
    elif base == "k2":
        kl = 0.5 * diff.square()
    else:
        x = (-diff).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)
    if name.endswith("+"):
        k2 = 0.5 * diff.square()
        kl = k2 - k2.detach() + kl.detach()
    return kl


def as_denominator(v: Union[Number, torch.Tensor], like: torch.Tensor) -> Union[float, torch.Tensor]:
    """A normaliser as a Python float (validated > 0 by the config) or a 0-dim tensor on ``like``'s
    device whose non-positive value is replaced by 1 (no NaN). Python numbers never become device
    tensors: no host-to-device copy. A tensor lies on ``like``'s device or the CPU (the entry points check
    it: ``config.check_normaliser_devices``)."""
    if not isinstance(v, torch.Tensor):
        return float(v)
    t = v.to(device=like.device, dtype=like.dtype).reshape(())
    return torch.where(t > 0, t, torch.ones_like(t))


class Denominators(NamedTuple):
    tokens: Union[float, torch.Tensor]
    seqs: Union[float, torch.Tensor]
    norm_len: Union[float, torch.Tensor]
    seq_tokens: torch.Tensor  # [B] valid tokens per sequence, clamped to >= 1


def denominators(tok: Tokens, cfg: PolicyLossConfig) -> Denominators:
    like = tok.logp
    seg = tok.seg
    per_seq = seg.seq_sum(tok.valid.to(like.dtype))
    tokens = as_denominator(cfg.global_num_tokens, like) if cfg.global_num_tokens is not None else tok.count()
    seqs = (
        as_denominator(cfg.global_num_seqs, like)
        if cfg.global_num_seqs is not None
        else (per_seq > 0).sum().to(like.dtype).clamp_min(1)
    )
    default_len = seg.default_norm_len(like)
    norm_len = as_denominator(cfg.norm_len if cfg.norm_len is not None else default_len, like)
    return Denominators(tokens, seqs, norm_len, per_seq.clamp_min(1))


def aggregate(values: torch.Tensor, tok: Tokens, den: Denominators, mode: str) -> torch.Tensor:
    """Reduce per-token ``values`` [N] over the valid tokens to a scalar (verl ``agg_loss``)."""
    masked = torch.where(tok.valid, values, torch.zeros_like(values))
    if mode == "token-mean":
        return masked.sum() / den.tokens
    if mode == "seq-mean-token-sum":
        return masked.sum() / den.seqs
    if mode == "seq-mean-token-mean":
        return (tok.seg.seq_sum(masked) / den.seq_tokens).sum() / den.seqs
    if mode == "seq-mean-token-sum-norm":  # Dr.GRPO: sequence sums over a constant length
        return masked.sum() / (den.seqs * den.norm_len)
    if mode == "token-sum":  # verl: no normaliser at all
        return masked.sum()
    raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")
