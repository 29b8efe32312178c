"""Plain eager oracle for :func:`fusedrl.policy_loss` (tests only; never used on the hot path).

Written independently of ``fusedrl/loss.py``: it walks the batch sequence by sequence in Python,
gathers each sequence's valid tokens, computes in float64, selects covariance tokens with Python
sorting, and freely calls ``.item()``. It follows verl's ``core_algos.py`` formulas term by term.
Gradients come from torch autograd through the float64 computation.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .loss import PolicyLossConfig, canonical_kl_type

__all__ = ["reference_policy_loss", "reference_kl_penalty", "split_sequences"]


class _Seq:
    """The valid tokens of one sequence (float64 1-D tensors) and where they sit in the flat input."""

    def __init__(self, positions: List[int], length: int):
        self.positions = positions  # flat indices into logp.reshape(-1)
        self.length = length        # full length of the sequence (valid or not)
        self.logp = self.old = self.adv = self.ent = self.ref = None


def split_sequences(logp, old_logp, advantages, mask, entropy=None, ref_logp=None, cu_seqlens=None
                    ) -> Tuple[List[_Seq], int]:
    """Cut the batch into sequences. Returns (sequences, default norm_len)."""
    flat_mask = mask.reshape(-1)
    seqs: List[_Seq] = []
    per_seq_adv = False
    if cu_seqlens is not None:
        bounds = [int(v) for v in cu_seqlens.tolist()]
        b = len(bounds) - 1
        n = logp.numel()
        per_seq_adv = advantages.dim() == 1 and advantages.numel() == b and advantages.numel() != n
        for i in range(b):
            start, end = bounds[i], bounds[i + 1]
            pos = [p for p in range(start, end) if flat_mask[p].item() != 0]
            seqs.append(_Seq(pos, end - start))
        norm_len = max([s.length for s in seqs], default=1)
    else:
        rows = logp.reshape(1, -1) if logp.dim() == 1 else logp
        b, t = rows.shape
        per_seq_adv = logp.dim() == 2 and advantages.dim() == 1
        for i in range(b):
            pos = [i * t + j for j in range(t) if flat_mask[i * t + j].item() != 0]
            seqs.append(_Seq(pos, t))
        norm_len = t

    def take(x, pos):
        if x is None:
            return None
        idx = torch.tensor(pos, dtype=torch.long, device=x.device)
        return x.reshape(-1).to(torch.float64).index_select(0, idx)

    if not per_seq_adv:
        adv_full = advantages.broadcast_to(logp.shape)
    for i, s in enumerate(seqs):
        s.logp = take(logp, s.positions)
        s.old = take(old_logp, s.positions).detach()
        if per_seq_adv:
            s.adv = torch.full((len(s.positions),), float(advantages[i].item()), dtype=torch.float64,
                               device=logp.device)
        else:
            s.adv = take(adv_full, s.positions).detach()
        s.ent = take(entropy, s.positions)
        s.ref = take(ref_logp, s.positions)
        if s.ref is not None:
            s.ref = s.ref.detach()
    return seqs, max(norm_len, 1)


def reference_kl_penalty(logp: torch.Tensor, ref: torch.Tensor, kl_type: str) -> torch.Tensor:
    """verl's ``kl_penalty`` written out, with the ``+`` straight-through variants."""
    name = canonical_kl_type(kl_type)
    straight_through = name.endswith("+")
    name = name.rstrip("+")
    if name == "k1":
        value = logp - ref
    elif name == "abs":
        value = torch.abs(logp - ref)
    elif name == "k2":
        value = 0.5 * (logp - ref) ** 2
    else:
        kl = torch.clamp(ref - logp, min=-20, max=20)
        value = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if straight_through:
        grad_part = 0.5 * (logp - ref) ** 2
        value = value.detach() + (grad_part - grad_part.detach())
    return value


def _mean(values: List[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def reference_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config: Optional[PolicyLossConfig] = None,
    *,
    global_num_tokens=None,
    global_num_seqs=None,
    norm_len=None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Same contract as :func:`fusedrl.policy_loss`; float64 loss, float32 metrics.

    Clip-Cov draws ``torch.rand(logp.numel(), generator=config.generator)`` on logp's device (the
    same draw fusedrl makes) and detaches the candidates carrying the largest keys; KL-Cov takes
    the largest covariances; both break ties by the lower flat index.
    """
    cfg = config if config is not None else PolicyLossConfig()
    gnt = global_num_tokens if global_num_tokens is not None else cfg.global_num_tokens
    gns = global_num_seqs if global_num_seqs is not None else cfg.global_num_seqs
    nlen = norm_len if norm_len is not None else cfg.norm_len
    seqs, default_norm_len = split_sequences(logp, old_logp, advantages, mask, entropy, ref_logp, cu_seqlens)
    tokens = [(si, j) for si, s in enumerate(seqs) for j in range(len(s.positions))]
    n_valid = len(tokens)
    low, high = 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high
    mode = cfg.loss_mode

    clipfrac, clipfrac_lower, ppo_kl, selected_frac = 0.0, 0.0, 0.0, None
    per_seq_losses: List[torch.Tensor] = []

    # quantities over the whole batch of valid tokens
    if n_valid:
        all_adv = torch.cat([s.adv for s in seqs])
        all_lp = torch.cat([s.logp.detach() for s in seqs])
        all_d = torch.cat([s.logp.detach() - s.old for s in seqs])
    else:
        all_adv = all_lp = all_d = torch.zeros(0, dtype=torch.float64)

    if mode in ("clip_cov", "kl_cov"):
        cov = ((all_adv - all_adv.mean()) * (all_lp - all_lp.mean())).tolist() if n_valid else []
        ratio_cfg = cfg.clip_cov_ratio if mode == "clip_cov" else cfg.kl_cov_ratio
        k = max(1, int(ratio_cfg * n_valid))
        flat_pos = [seqs[si].positions[j] for si, j in tokens]
        if mode == "kl_cov":
            order = sorted(range(n_valid), key=lambda i: (-cov[i], flat_pos[i]))
            chosen = set(order[:k]) if n_valid else set()
        else:
            keys = torch.rand(logp.numel(), generator=cfg.generator, device=logp.device,
                              dtype=torch.float32).tolist()
            ratio_all = torch.exp(torch.clamp(all_d, -20, 20)).tolist()
            adv_all = all_adv.tolist()
            candidates = []
            for i in range(n_valid):
                l1 = -adv_all[i] * ratio_all[i]
                l2 = -adv_all[i] * min(max(ratio_all[i], low), high)
                if not l2 > l1 and cfg.clip_cov_lb < cov[i] < cfg.clip_cov_ub:
                    candidates.append(i)
            candidates.sort(key=lambda i: (-keys[flat_pos[i]], flat_pos[i]))
            chosen = set(candidates[:k])
        selected_frac = len(chosen) / n_valid if n_valid else 0.0
        # per sequence: which local token indices are selected
        chosen_local = [set() for _ in seqs]
        for i in chosen:
            si, j = tokens[i]
            chosen_local[si].add(j)

    clipped_count = lower_count = 0
    for si, s in enumerate(seqs):
        if not s.positions:
            per_seq_losses.append(torch.zeros((), dtype=torch.float64, device=logp.device))
            continue
        d = s.logp - s.old
        if mode == "vanilla":
            r = torch.exp(torch.clamp(d, -20.0, 20.0))
            pg1 = -s.adv * r
            pg2 = -s.adv * torch.clamp(r, low, high)
            clip1 = torch.maximum(pg1, pg2)
            clipped_count += int((pg2 > pg1).sum().item())
            if cfg.clip_ratio_c is not None:
                pg3 = -s.adv * cfg.clip_ratio_c
                clip2 = torch.minimum(pg3, clip1)
                lower_count += int(((clip1 > pg3) & (s.adv < 0)).sum().item())
                token_loss = torch.where(s.adv < 0, clip2, clip1)
            else:
                token_loss = clip1
        elif mode == "gspo":
            seq_log_ratio = (d.sum() / len(s.positions)).detach()
            log_ratio_tok = torch.clamp(s.logp - s.logp.detach() + seq_log_ratio, max=10.0)
            r = torch.exp(log_ratio_tok)
            pg1 = -s.adv * r
            pg2 = -s.adv * torch.clamp(r, low, high)
            clipped_count += int((pg2 > pg1).sum().item())
            token_loss = torch.maximum(pg1, pg2)
        elif mode == "clip_cov":
            r = torch.exp(torch.clamp(d, -20.0, 20.0))
            pg1 = -s.adv * r
            pg2 = -s.adv * torch.clamp(r, low, high)
            corr = torch.ones_like(pg1)
            for j in chosen_local[si]:
                corr[j] = 0.0
            token_loss = torch.maximum(pg1, pg2) * corr
        elif mode == "kl_cov":
            r = torch.exp(torch.clamp(d, -20.0, 20.0))
            pieces = []
            for j in range(len(s.positions)):
                term = -s.adv[j] * r[j]
                if j in chosen_local[si]:
                    term = term + cfg.ppo_kl_coef * torch.abs(d[j])
                pieces.append(term)
            token_loss = torch.stack(pieces)
        elif mode == "gpg":
            token_loss = -s.adv * s.logp
        elif mode == "cispo":
            r = torch.exp(torch.clamp(d, -20.0, 20.0)).detach()
            rc = torch.clamp(r, low, high)
            clipped_count += int((r != rc).sum().item())
            token_loss = -rc * s.adv * s.logp
        else:
            raise ValueError(mode)
        per_seq_losses.append(token_loss)

    if n_valid:
        if mode in ("vanilla", "gspo", "cispo"):
            clipfrac = clipped_count / n_valid
        if mode == "vanilla":
            clipfrac_lower = lower_count / n_valid
        if mode == "clip_cov":
            clipfrac = selected_frac
        if mode == "kl_cov":
            ppo_kl = all_d.abs().mean().item()
        elif mode in ("gspo", "clip_cov"):
            ppo_kl = (-all_d).mean().item()
        else:
            ppo_kl = (-torch.clamp(all_d, -20, 20)).mean().item()

    def aggregate(seq_values: List[torch.Tensor]) -> torch.Tensor:
        """verl agg_loss over per-sequence token-loss vectors, with fusedrl's normalisers."""
        lengths = [len(s.positions) for s in seqs]
        sums = [v.sum() for v in seq_values]
        total = sum(sums, torch.zeros((), dtype=torch.float64, device=logp.device))

        def denom(user, local):
            if user is None:
                return max(local, 1)
            value = float(user.item()) if isinstance(user, torch.Tensor) else float(user)
            return value if value > 0 else 1.0

        n_seqs_nonempty = sum(1 for n in lengths if n > 0)
        agg = cfg.loss_agg_mode
        if agg == "token-mean":
            return total / denom(gnt, n_valid)
        if agg == "seq-mean-token-sum":
            return total / denom(gns, n_seqs_nonempty)
        if agg == "seq-mean-token-mean":
            acc = torch.zeros((), dtype=torch.float64, device=logp.device)
            for ssum, n in zip(sums, lengths):
                if n > 0:
                    acc = acc + ssum / n
            return acc / denom(gns, n_seqs_nonempty)
        if agg == "seq-mean-token-sum-norm":
            per_seq_mean = total / denom(gns, n_seqs_nonempty)
            return per_seq_mean / denom(nlen, default_norm_len)
        raise ValueError(agg)

    pg_loss = aggregate(per_seq_losses)
    loss = pg_loss
    f32 = lambda v: torch.tensor(float(v), dtype=torch.float32)  # noqa: E731
    metrics = {"pg_loss": f32(pg_loss.item()), "pg_clipfrac": f32(clipfrac),
               "pg_clipfrac_lower": f32(clipfrac_lower), "ppo_kl": f32(ppo_kl)}
    if entropy is not None:
        metrics["entropy"] = f32(_mean([v for s in seqs for v in s.ent.tolist()]))
        if cfg.entropy_coeff != 0:
            loss = loss - cfg.entropy_coeff * aggregate([s.ent for s in seqs])
    if ref_logp is not None:
        kls = [reference_kl_penalty(s.logp, s.ref, cfg.kl_loss_type) for s in seqs]
        metrics["kl"] = f32(_mean([v for k in kls for v in k.tolist()]))
        if cfg.kl_loss_coef != 0:
            loss = loss + cfg.kl_loss_coef * aggregate(kls)
    if selected_frac is not None:
        metrics["cov_selected_frac"] = f32(selected_frac)
    return loss, metrics
