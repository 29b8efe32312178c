"""Batch-level token selection, on the device with no host sync: covariance top-k (Clip-Cov, KL-Cov),
the entropy quantile (TRL's 80/20), DeepSeek-V3.2's off-policy sequence mask; and the statistics over a
``stats_group`` (torch.distributed collectives) that make a selection DP-global."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .inputs import Tokens
from .terms import clipped_surrogate, ratio

Tensor = torch.Tensor

#: a covariance kernel: ``(tok, mean_a, mean_lp, clip) -> (cov, candidates or None)`` (see :func:`covariance`)
CovKernel = Callable[
    [Tokens, Tensor, Tensor, Optional[tuple[float, float, float, float]]], tuple[Tensor, Optional[Tensor]]
]


# --------------------------------------------------------------------------------------------------
# Statistics over a process group (stats_group)
# --------------------------------------------------------------------------------------------------


def group_sum(t: Tensor, group) -> Tensor:
    """All-reduce (sum) of a small detached tensor over ``group`` (identity without one)."""
    if group is None:
        return t
    out = t.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
    return out


def group_all(flag: bool, group, device: torch.device) -> bool:
    """True when ``flag`` holds on every rank of ``group`` (one all-reduce of an int on ``device``, the one of
    the group's tensors, and a host read)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(t.item())


def group_gather(x: Tensor, group, pad) -> tuple[Tensor, int, int]:
    """``x`` [N] of every rank, each padded with ``pad`` to the longest, concatenated in rank order:
    ``(gathered [W * N_max], offset of this rank's values, total real length)``. The ranks' lengths are
    exchanged first; reading them is the one host sync of ``stats_group`` (shapes, not values)."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    n = x.numel()
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=x.device), group=group)
    sizes = [int(s.item()) for s in sizes]
    n_max = max(sizes)
    padded = torch.cat([x.detach(), x.new_full((n_max - n,), pad)]) if n_max > n else x.detach().contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    # positions past a rank's length hold `pad` and are never eligible
    return torch.cat(parts), rank * n_max, sum(sizes)


def _gather_pair(key: Tensor, eligible: Tensor, group):
    """Gather a key and its eligibility over the group (ineligible / padding = ``-inf``, False)."""
    keys, off, total = group_gather(key.detach().where(eligible, torch.full_like(key, -math.inf)), group, -math.inf)
    elig, _, _ = group_gather(eligible.to(torch.uint8), group, 0)
    return keys, elig.bool(), off, total


# --------------------------------------------------------------------------------------------------
# Covariance selection (Clip-Cov, KL-Cov)
# --------------------------------------------------------------------------------------------------


def covariance(
    tok: Tokens,
    clip: Optional[tuple[float, float, float, float]] = None,
    group=None,
    kernel: Optional[CovKernel] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Detached ``(A - mean_m A) * (logp - mean_m logp)`` over the batch's valid tokens ([N]), and Clip-Cov's
    candidate mask when ``kernel`` (a loss-head kernel, see ``fusedrl.loss.heads``) computes both in one
    launch (``clip = (clip_low, clip_high, lb, ub)``); otherwise ``(cov, None)``. With ``group`` the means
    run over the group's valid tokens."""
    with torch.no_grad():
        lp = tok.logp.detach()
        if group is None:
            denom = tok.count()
            mean_a = tok.adv.sum() / denom  # masked positions hold 0
            mean_lp = lp.sum() / denom
        else:
            s = group_sum(torch.stack([tok.adv.sum(), lp.sum(), tok.n_valid.to(lp.dtype)]), group)
            mean_a, mean_lp = s[0] / s[2].clamp_min(1), s[1] / s[2].clamp_min(1)
        if kernel is not None:
            return kernel(tok, mean_a, mean_lp, clip)
        return (tok.adv - mean_a) * (lp - mean_lp), None


def num_to_select(
    tok: Tokens, frac: float, n: Optional[int] = None, n_valid: Optional[Tensor] = None
) -> tuple[Tensor, int]:
    """``k = max(1, int(frac * n_valid))`` as a device tensor, and a host upper bound of it (``n``, ``n_valid``:
    the group's token and valid-token counts; default: the local ones)."""
    n = tok.valid.numel() if n is None else n
    n_valid = tok.n_valid if n_valid is None else n_valid
    k_max = min(n, max(1, int(frac * n)))
    # float64 so the floor matches Python's int(frac * n) exactly (MPS has no float64)
    fdt = torch.float32 if tok.logp.device.type == "mps" else torch.float64
    k = torch.floor(n_valid.to(fdt) * frac).clamp(min=1, max=max(k_max, 1)).long()
    return k, k_max


def select_top_k(key: Tensor, eligible: Tensor, k: Tensor, k_max: int) -> Tensor:
    """Boolean mask of the ``min(k, #eligible)`` eligible tokens with the largest ``key``.

    ``k`` is a 0-dim device tensor (no host sync) bounded by the Python int ``k_max``. Ties at the
    k-th value are broken deterministically in favour of the lower flat index.
    """
    n = key.numel()
    if n == 0 or k_max == 0:
        return torch.zeros_like(eligible)
    neg_inf = torch.full_like(key, -math.inf)
    k_eff = key.detach().where(eligible, neg_inf)
    top_vals = torch.topk(k_eff, k_max, largest=True, sorted=True).values
    kth = top_vals.gather(0, (k - 1).reshape(1))  # [1], the k-th largest value
    above = eligible & (k_eff > kth)
    tied = eligible & (k_eff == kth)
    need = k - above.sum()  # how many tied tokens to take
    return above | (tied & (torch.cumsum(tied.long(), 0) <= need))


def select(tok: Tokens, key: Tensor, eligible: Tensor, frac: float, group) -> Tensor:
    """Top-k of ``key`` among ``eligible`` with ``k = max(1, int(frac * n_valid))``, over the local batch or
    over ``group`` (then every rank selects on the gathered batch, in rank order, and keeps its part:
    exactly what one process selects on the concatenated batch)."""
    if group is None:
        k, k_max = num_to_select(tok, frac)
        return select_top_k(key, eligible, k, k_max)
    n_valid = group_sum(tok.n_valid.reshape(1), group).reshape(())
    keys, elig, off, total = _gather_pair(key, eligible, group)
    k, k_max = num_to_select(tok, frac, n=total, n_valid=n_valid)
    picked = select_top_k(keys, elig, k, min(k_max, keys.numel()))
    return picked[off : off + key.numel()]


def random_keys(like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``torch.rand(N)`` on ``like``'s device. A generator on another device draws there and copies
    (pass ``torch.Generator(device=...)`` matching the inputs to keep the head free of host syncs)."""
    n = like.numel()
    if generator is None or generator.device.type == like.device.type:
        return torch.rand(n, generator=generator, device=like.device, dtype=torch.float32)
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32).to(like.device)


def select_clip_cov(tok: Tokens, cfg, keys: Optional[Tensor] = None, kernel: Optional[CovKernel] = None) -> Tensor:
    """Clip-Cov's pick: ``max(1, int(ratio*n_valid))`` tokens drawn uniformly at random (the largest random
    ``keys``, default drawn from ``config.generator``) among the valid, not PPO-clipped tokens with
    ``lb < cov < ub`` (bool [N])."""
    group = cfg.stats_group
    with torch.no_grad():
        l1, l2, _ = clipped_surrogate(tok.adv, ratio(tok), cfg)
        clip = (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_cov_lb, cfg.clip_cov_ub)
        cov, candidates = covariance(tok, clip, group, kernel)
        if candidates is None:
            candidates = tok.valid & ~(l2 > l1) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
        if keys is None:
            keys = random_keys(tok.logp, cfg.generator)
        return select(tok, keys, candidates, cfg.clip_cov_ratio, group)


def select_kl_cov(tok: Tokens, cfg, kernel: Optional[CovKernel] = None) -> Tensor:
    """KL-Cov's pick: the top ``max(1, int(ratio*n_valid))`` valid tokens by covariance (bool [N])."""
    group = cfg.stats_group
    with torch.no_grad():
        return select(tok, covariance(tok, None, group, kernel)[0], tok.valid, cfg.kl_cov_ratio, group)


# --------------------------------------------------------------------------------------------------
# Entropy quantile and the off-policy sequence mask
# --------------------------------------------------------------------------------------------------


def entropy_keep(ent: Tensor, valid: Tensor, q: float, group) -> Tensor:
    """TRL's high-entropy mask: valid tokens whose entropy is ``>=`` the ``1 - top_entropy_quantile``
    quantile (``torch.quantile``, linear interpolation, bit for bit) of the valid entropies of the batch
    (or of ``group``). Sorted on the device; the count stays a tensor (no host sync)."""
    with torch.no_grad():
        qdt = torch.float64 if ent.dtype == torch.float64 else torch.float32
        vals = ent.detach().to(qdt)
        if vals.numel() == 0:
            return torch.zeros_like(valid)
        inf = torch.full_like(vals, math.inf)
        pool = torch.where(valid, vals, inf)
        if group is not None:
            pool, _, _ = group_gather(pool, group, math.inf)
        srt = pool.sort().values
        n = (srt != math.inf).sum()  # entropies are finite: +inf marks masked / padding
        ranks = torch.tensor(1.0 - q, dtype=qdt, device=vals.device) * (n - 1).to(qdt)
        last = srt.numel() - 1
        below = ranks.to(torch.long).clamp(0, last)
        above = ranks.ceil().to(torch.long).clamp(0, last)
        # gather, not srt[below]: indexing with a 0-dim tensor reads it on the host
        thr = torch.lerp(srt.gather(0, below.reshape(1)), srt.gather(0, above.reshape(1)), ranks - below.to(qdt))
        return valid & (vals >= thr) & (n > 0)


def opsm_keep(tok: Tokens, sampling: Tensor, threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL ``get_off_policy_mask``): keep a token if its advantage
    is >= 0 or its sequence's mean ``sampling_logp - logp`` (detached) is <= ``threshold``."""
    with torch.no_grad():
        seg = tok.seg
        kl = torch.where(tok.valid, sampling - tok.logp.detach(), torch.zeros_like(sampling))
        n = seg.seq_sum(tok.valid.to(kl.dtype)).clamp_min(1)
        low_kl = seg.expand(seg.seq_sum(kl) / n) <= threshold
        return (tok.adv >= 0) | low_kl
