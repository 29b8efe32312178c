"""The sampler's kept sets (``sampling_mask=``) as one padded tensor, checked once.

Two layouts are accepted, the ones inference engines return:

* packed ``(ids, counts)``: ``ids`` int ``[sum(counts)]``, each token's kept ids concatenated (ascending
  within a token, as vLLM >= 0.28 compacts them; any order is accepted); ``counts`` int ``[N]`` or the
  per-token shape (``[B, T]``) with ``counts[n] = |S_n|``; a count of 0 means no replay at that position
  (the full vocabulary). This is the vLLM / prime-rl transport.
* padded ``[..., K]`` int with ``-1`` fill: row ``n`` keeps the non-negative ids of ``mask[n]``; a row of
  ``-1`` means no replay.

Both become ``ids [N, K]`` int64 (``-1`` where unused) and ``counts [N]`` int64. The packed layout needs
its width ``K = max(counts)`` on the host (one read of ``counts``, which engines hand over on the CPU).
With the value checks on (the CPU default), an id outside ``[0, V)`` or a repeated id in a row raises
``ValueError`` naming ``sampling_mask`` (so does a negative packed id); with them off such ids never read
out of bounds (an id outside the vocabulary is dropped, a repeat is counted once).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

Tensor = torch.Tensor
SamplingMask = Union[Tensor, tuple[Tensor, Tensor], list]

__all__ = ["KeptSets", "as_kept_sets"]


class KeptSets(NamedTuple):
    """Per-token kept ids, padded: ``ids [N, K]`` int64 (``-1`` = unused slot) and ``counts [N]`` int64
    (0 = no replay at that token: the full vocabulary)."""

    ids: Tensor
    counts: Tensor

    @property
    def replay(self) -> Tensor:
        """``[N]`` bool: the tokens whose log-prob is normalised over a kept set."""
        return self.counts > 0

    def select(self, rows: Tensor) -> KeptSets:
        return KeptSets(self.ids.index_select(0, rows), self.counts.index_select(0, rows))


def _int(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"sampling_mask: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"sampling_mask: {name} must be an integer tensor, got {t.dtype}")


def as_kept_sets(
    sampling_mask: SamplingMask,
    lead_shape: tuple[int, ...],
    vocab: int,
    device: torch.device,
    checks: bool,
) -> KeptSets:
    """Check ``sampling_mask`` against the tokens' per-token shape ``lead_shape`` and the vocabulary size,
    and return it padded (see the module docstring). Errors name ``sampling_mask``."""
    n = 1
    for s in lead_shape:
        n *= int(s)
    if isinstance(sampling_mask, (tuple, list)):
        if len(sampling_mask) != 2:
            raise ValueError(
                f"sampling_mask must be a padded [..., K] tensor or an (ids, counts) pair, got a sequence of "
                f"{len(sampling_mask)} items"
            )
        flat_ids, counts = sampling_mask
        _int("ids", flat_ids)
        _int("counts", counts)
        if flat_ids.dim() != 1:
            raise ValueError(f"sampling_mask: packed ids must be 1-D (concatenated), got shape {tuple(flat_ids.shape)}")
        if tuple(counts.shape) not in (tuple(lead_shape), (n,)):
            raise ValueError(
                f"sampling_mask: counts must have one entry per token, shape {tuple(lead_shape)} or [{n}], "
                f"got {tuple(counts.shape)}"
            )
        for name, t in (("ids", flat_ids), ("counts", counts)):
            if t.device.type == "meta" or (t.device != device and t.device.type != "cpu"):
                raise ValueError(f"sampling_mask: {name} is on {t.device} but the tokens are on {device}")
        counts = counts.reshape(-1).to(device=device, dtype=torch.int64)
        c_host = counts.cpu() if counts.device.type != "cpu" else counts
        if n and int(c_host.min()) < 0:
            raise ValueError("sampling_mask: counts must be >= 0")
        total = int(c_host.sum()) if n else 0
        if total != flat_ids.numel():
            raise ValueError(
                f"sampling_mask: ids must hold sum(counts) = {total} ids (one block per token), got {flat_ids.numel()}"
            )
        if checks and flat_ids.numel() and bool((flat_ids < 0).any()):  # -1 pads the padded layout only
            raise ValueError(f"sampling_mask: packed ids must be >= 0, found {int(flat_ids.min())}")
        k = max(int(c_host.max()) if n else 0, 1)
        ids = torch.full((n, k), -1, dtype=torch.int64, device=device)
        slot = torch.arange(k, device=device)[None, :] < counts[:, None]
        ids[slot] = flat_ids.to(device=device, dtype=torch.int64)  # row-major: the concatenation order
    else:
        mask = sampling_mask
        _int("mask", mask)
        if mask.device != device:
            raise ValueError(f"sampling_mask is on {mask.device} but the tokens are on {device}")
        if tuple(mask.shape[:-1]) != tuple(lead_shape) or mask.dim() != len(lead_shape) + 1:
            raise ValueError(
                f"sampling_mask must be [..., K] with the tokens' shape {tuple(lead_shape)} in front (or an "
                f"(ids, counts) pair), got shape {tuple(mask.shape)}"
            )
        ids = mask.reshape(n, mask.shape[-1]).to(torch.int64)
        if ids.shape[1] == 0:
            ids = torch.full((n, 1), -1, dtype=torch.int64, device=device)
        counts = (ids >= 0).sum(-1)
    if checks and ids.numel():
        _check_values(ids, vocab)
    # in bounds whatever the checks: ids past the vocabulary are dropped, negatives are unused slots
    ids = torch.where((ids >= 0) & (ids < vocab), ids, torch.full_like(ids, -1))
    counts = (ids >= 0).sum(-1)
    return KeptSets(ids.contiguous(), counts)


def _check_values(ids: Tensor, vocab: int) -> None:
    """Host-syncing checks (behind ``check_inputs``): ids in ``[0, V)`` and no id twice in a row."""
    used = ids >= 0
    if bool(((ids >= vocab) & used).any()):
        bad = ids[(ids >= vocab) & used][0].item()
        raise ValueError(f"sampling_mask: ids must lie in [0, {vocab}) (the vocabulary size); found {bad}")
    if bool((ids < -1).any()):
        raise ValueError(f"sampling_mask: ids must be >= 0 (-1 marks an unused slot); found {ids.min().item()}")
    srt = ids.sort(-1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(-1).nonzero()[0, 0])
        raise ValueError(f"sampling_mask: token {row} lists an id twice ({srt[row][1:][dup[row]][0].item()})")


def kept_target(kept: KeptSets, targets: Tensor) -> Tensor:
    """``[N]`` bool: whether each token's target is among its kept ids (it is counted in S either way)."""
    return (kept.ids == targets.reshape(-1, 1)).any(-1)


def replay_fraction(kept: KeptSets, valid: Optional[Tensor] = None) -> Tensor:
    """The fraction of (valid) tokens with a kept set, a 0-dim fp32 tensor (0 for no token)."""
    r = kept.replay
    if valid is not None:
        r = r & valid
        den = valid.sum()
    else:
        den = torch.tensor(r.numel(), device=r.device)
    return (r.sum().float() / den.clamp_min(1).float()).reshape(())
