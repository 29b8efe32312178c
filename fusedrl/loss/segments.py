"""Sub-sequence segments (SSPO, arXiv 2511.04256): the segment of every token from per-token ``segment_ids``,
the segment-level importance ratio, and :func:`segment_ids_from_tokens` (split after sentence-ending tokens).

A segment is the set of tokens of one sequence that share an id. The map is built on the device with two
stable sorts (by id, then by sequence) and a cumulative sum: no host sync, any ids (not necessarily
contiguous or increasing), and segments never cross sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from ..backends.base import LOG_RATIO_CLAMP
from .inputs import Segments, Tokens

Tensor = torch.Tensor

__all__ = ["segment_map", "segment_ratio", "segment_ids_from_tokens"]


def token_sequence_ids(seg: Optional[Segments], n: int, device: torch.device) -> Tensor:
    """The sequence of each of the ``n`` flat tokens (int64 ``[N]``; one sequence when ``seg`` is None)."""
    if seg is None:
        return torch.zeros(n, dtype=torch.long, device=device)
    if seg.padded:
        return torch.arange(n, device=device, dtype=torch.long) // max(seg.T, 1)
    return seg.seq_ids


def segment_map(seg: Optional[Segments], segment_ids: Tensor) -> Segments:
    """A token -> segment map (a packed :class:`Segments` over ``N`` slots, segment ``k`` in slot ``k``)."""
    n = segment_ids.numel()
    ids = segment_ids.reshape(-1).long()
    seq = token_sequence_ids(seg, n, ids.device)
    if n == 0:
        return Segments(0, seq_ids=ids, lengths=ids)
    by_id = torch.sort(ids, stable=True).indices
    perm = by_id.index_select(0, torch.sort(seq.index_select(0, by_id), stable=True).indices)
    s_seq, s_id = seq.index_select(0, perm), ids.index_select(0, perm)
    new = torch.ones(n, dtype=torch.bool, device=ids.device)
    new[1:] = (s_seq[1:] != s_seq[:-1]) | (s_id[1:] != s_id[:-1])
    run = torch.cumsum(new.long(), 0) - 1  # dense segment index in sorted order
    dense = torch.empty_like(run).scatter_(0, perm, run)
    return Segments(n, seq_ids=dense, lengths=None)


def segment_ratio(tok: Tokens, segment_ids: Tensor) -> Tensor:
    """SSPO's per-token ratio ``sg(s_k) exp(logp_t - sg(logp_t))`` with ``s_k = exp(mean_{t in k}(logp - old))``
    over the valid tokens of segment ``k`` (log clamped to [-20, 20]): the value is the segment's ratio, the
    gradient the token's own (GSPO's token form), zero where the segment's mean log ratio is clamped, as the
    clamp of the token / sequence ratio. One segment per token is the token ratio, one per sequence TRL's
    sequence ratio (same values; same gradients under per-sequence advantages)."""
    smap = segment_map(tok.seg, segment_ids)
    n = smap.seq_sum(tok.valid.to(tok.logp.dtype)).clamp_min(1)
    mean = smap.expand(smap.seq_sum(tok.log_ratio.detach()) / n)
    inside = ((mean >= -LOG_RATIO_CLAMP) & (mean <= LOG_RATIO_CLAMP)).to(tok.logp.dtype)
    log_s = mean.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(log_s + inside * (tok.logp - tok.logp.detach()))


def segment_ids_from_tokens(
    token_ids: Tensor, mask: Tensor, boundary_token_ids: Union[Sequence[int], Tensor]
) -> Tensor:
    """Segment ids for SSPO (``importance_sampling_level="segment"``): a segment ends after each valid token
    whose id is in ``boundary_token_ids`` (sentence-ending tokens: ``.``, ``?``, ``!``, newline, ... of your
    tokenizer); the boundary token belongs to the segment it closes.

    Args:
        token_ids: ``[B, T]`` padded or ``[N]`` packed integer token ids.
        mask: same shape; non-zero marks a valid (response) token.
        boundary_token_ids: the sentence-ending token ids (a sequence of ints or an integer tensor).

    Returns:
        int64 ids of ``token_ids``'s shape: the number of boundary tokens before each token along the last
        dimension (the count runs on across packed sequences, which the loss keeps apart anyway), and -1 at
        masked positions.
    """
    if not isinstance(token_ids, Tensor) or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
        raise TypeError(f"token_ids must be an integer tensor, got {getattr(token_ids, 'dtype', type(token_ids))}")
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(token_ids.shape):
        raise ValueError(f"mask must be a tensor of token_ids' shape {tuple(token_ids.shape)}")
    if token_ids.dim() not in (1, 2):
        raise ValueError(f"token_ids must be [B, T] or packed [N], got shape {tuple(token_ids.shape)}")
    bounds = torch.as_tensor(boundary_token_ids, device=token_ids.device)
    if bounds.is_floating_point() or bounds.dtype == torch.bool:
        raise TypeError(f"boundary_token_ids must be integers, got {bounds.dtype}")
    valid = mask != 0
    ends = torch.isin(token_ids, bounds.reshape(-1).to(token_ids.dtype)) & valid
    count = torch.cumsum(ends.long(), dim=-1) - ends.long()
    return torch.where(valid, count, torch.full_like(count, -1))
