"""The loss's inputs: padded ``[B, T]`` or packed ``[N]`` per-token tensors flattened to ``N`` tokens plus
a token -> sequence map, checked once, with errors naming the argument the caller passed.

* padded: per-token tensors are ``[B, T]`` (``N = B*T``); a 1-D tensor without ``cu_seqlens`` is one
  sequence;
* packed: per-token tensors are ``[N]`` and ``cu_seqlens`` (int32/int64 ``[B+1]``) gives sequence
  boundaries; tokens at positions ``>= cu_seqlens[-1]`` belong to no sequence and are ignored.

``mask`` is read as a boolean (non-zero = valid). Values at masked positions are replaced by 0 with
``torch.where`` before any arithmetic (:func:`make_tokens`), so NaN / inf sitting in padding never
leak into the loss or its gradient, and masked positions receive exactly zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple, Optional, Union

import torch

from .._validate import want_checks

Tensor = torch.Tensor

#: the optional per-token inputs of the loss (shape of the anchor, e.g. ``logp``), by kind:
#: ``float`` (floating tensors), ``flag`` (bool / integer / floating, non-zero = set), ``ids`` (integers)
SIDE_INPUTS: dict[str, str] = {
    "entropy": "float",
    "ref_logp": "float",
    "rollout_logp": "float",
    "rollout_is_weights": "float",
    # entropy control (docs/entropy-control.md)
    "old_entropy": "float",  # STEER: the old policy's per-token entropy
    "entropy_change": "float",  # STEER exact: per-token entropy-change coefficient dH
    "external_mask": "flag",  # RL-PLUS: tokens of external demonstrations
    "behaviour_logp": "float",  # RL-PLUS: log-probs of the policy that wrote the external tokens
    "segment_ids": "ids",  # SSPO: equal ids inside one sequence form a segment
    "entropy_reference": "float",  # EPO: per-token reference entropy of the corridor
}


def clean_side(name: str, t: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """A side input as the loss reads it (detached, 0 at positions outside ``valid``): floats in the compute
    ``dtype``, flags as bool, ids as int64 (exact, whatever the compute dtype)."""
    kind = SIDE_INPUTS[name]
    t = t.detach()
    if kind == "flag":
        return valid & (t != 0)
    if kind == "ids":
        return torch.where(valid, t.long(), torch.zeros((), dtype=torch.long, device=t.device))
    return torch.where(valid, t.to(dtype), torch.zeros((), dtype=dtype, device=t.device))


class Segments:
    """Token -> sequence map of a flattened batch (all ops device-side, no host sync).

    Padded ``[B, T]`` inputs use reshapes; packed inputs use a sequence id per token computed from
    ``cu_seqlens`` with ``searchsorted`` and ``index_add`` (``index_put`` with accumulate on CUDA, which is
    deterministic there) for per-sequence sums.
    """

    def __init__(
        self,
        num_seqs: int,
        seq_len: Optional[int] = None,
        seq_ids: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
    ):
        self.B = num_seqs
        self.T = seq_len  # padded layout when not None
        self.seq_ids = seq_ids  # packed layout: [N] int64 in [0, B-1] (clamped; see the valid mask)
        self.lengths = lengths  # packed layout: [B] sequence lengths

    @property
    def padded(self) -> bool:
        return self.T is not None

    def seq_sum(self, x: Tensor) -> Tensor:
        """Per-sequence sum of a flat ``[N]`` tensor -> ``[B]``."""
        if self.padded:
            return x.reshape(self.B, self.T).sum(-1)
        if self.B == 0:
            return x[:0]  # empty, but still attached to x's graph
        if x.device.type == "cuda":
            # index_add uses float atomics on CUDA (run-to-run bit differences); index_put with
            # accumulate=True sorts the ids and sums each segment in a fixed order: deterministic
            return x.new_zeros(self.B).index_put((self.seq_ids,), x, accumulate=True)
        return x.new_zeros(self.B).index_add(0, self.seq_ids, x)

    def seq_max(self, x: Tensor) -> Tensor:
        """Per-sequence maximum of a flat ``[N]`` tensor -> ``[B]`` (``-inf`` for a sequence with no tokens;
        callers put ``-inf`` at the positions to ignore)."""
        if self.padded:
            if self.B * self.T == 0:
                return x.new_full((self.B,), -math.inf)
            return x.reshape(self.B, self.T).amax(-1)
        if self.B == 0:
            return x[:0]
        return x.new_full((self.B,), -math.inf).scatter_reduce(0, self.seq_ids, x, "amax", include_self=True)

    def expand(self, v: Tensor) -> Tensor:
        """Broadcast a per-sequence ``[B]`` tensor to the flat ``[N]`` tokens."""
        if self.padded:
            return v.reshape(self.B, 1).expand(self.B, self.T).reshape(-1)
        if self.B == 0:  # no sequence: zeros, still attached to v's graph (a loss that backward() accepts)
            zeros = v.new_zeros(self.seq_ids.shape)
            return zeros + v.sum() * 0 if v.requires_grad else zeros
        return v.index_select(0, self.seq_ids)

    def default_norm_len(self, like: Tensor) -> Union[int, Tensor]:
        """seq-mean-token-sum-norm's default divisor: T (padded) or the longest sequence (packed)."""
        if self.padded:
            return max(self.T, 1)
        if self.B == 0:
            return 1
        return self.lengths.max().to(like.dtype)

    def chunk(self, start: int, stop: int, seqs: Optional[tuple[int, int]]) -> Optional[Segments]:
        """The map of tokens ``[start, stop)`` holding the whole sequences ``seqs = (s0, s1)``."""
        if seqs is None:
            return None
        s0, s1 = seqs
        if self.padded:
            return Segments(s1 - s0, seq_len=self.T)
        return Segments(
            s1 - s0,
            seq_ids=(self.seq_ids[start:stop] - s0).clamp(0, max(s1 - s0 - 1, 0)),
            lengths=self.lengths[s0:s1],
        )


class Batch(NamedTuple):
    """The checked, flattened inputs of one loss call (everything but the current log-probs)."""

    shape: tuple[int, ...]  # the per-token shape ([B, T] or [N])
    seg: Segments
    valid: Tensor  # [N] bool: mask & inside a sequence
    old_logp: Tensor  # [N]
    adv: Tensor  # [N] per token
    side: dict[str, Tensor]  # flat [N] optional per-token inputs (SIDE_INPUTS names)


def check_mask_dtype(mask: Tensor, name: str = "mask") -> None:
    """A mask may be bool, any integer dtype or any floating dtype (non-zero = valid)."""
    if mask.dtype == torch.bool or mask.is_floating_point():
        return
    try:
        torch.iinfo(mask.dtype)  # integer dtypes only
    except TypeError:
        raise TypeError(f"{name} must be a bool, integer or floating-point tensor, got {mask.dtype}") from None


def check_mask_values(mask: Tensor, name: str = "mask") -> None:
    """Host-syncing check (behind ``check_inputs``): a non-bool mask must hold only 0 and 1. The mask
    is read as a boolean, so a fractional (weighting) or NaN mask would be silently binarised."""
    if mask.dtype == torch.bool or mask.numel() == 0:
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"{name} must hold only 0 and 1 (or be bool; non-zero = valid token), found "
            f"{mask[bad].reshape(-1)[0].item()}; per-token loss weights are not supported"
        )


def check_cu_seqlens_values(cu: Tensor, n: int) -> None:
    """Host-syncing check (behind ``check_inputs``): 0 = cu[0] <= cu[1] <= ... <= cu[-1] <= N."""
    c = cu.long().cpu()
    if c[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {c[0].item()}")
    dec = (c[1:] < c[:-1]).nonzero()
    if dec.numel():
        i = dec[0, 0].item()
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {c[i].item()} > "
            f"cu_seqlens[{i + 1}] = {c[i + 1].item()}"
        )
    if c[-1].item() > n:
        raise ValueError(
            f"cu_seqlens must end at <= N = {n} (the packed token count; tokens after "
            f"cu_seqlens[-1] are ignored), got cu_seqlens[-1] = {c[-1].item()}"
        )


def check_cu_seqlens(
    cu_seqlens: Tensor, shape: tuple[int, ...], device: torch.device, anchor: str, values: bool = False
) -> None:
    """Packed boundaries: an int32/int64 ``[B+1]`` tensor on ``device`` for 1-D per-token tensors of ``shape``
    (that of the tensor named ``anchor``); ``values``: also the host-syncing value checks
    (:func:`check_cu_seqlens_values`)."""
    require_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {anchor} is on {device}")
    if len(shape) != 1:
        raise ValueError(f"with cu_seqlens, {anchor} must be packed 1-D [N], got shape {tuple(shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32/int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor [B+1], got shape {tuple(cu_seqlens.shape)}")
    if values:
        check_cu_seqlens_values(cu_seqlens, shape[0])


def require_tensor(name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        what = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {what}, got {type(t).__name__}")


def _check_kind(name: str, t: Tensor, kind: str) -> None:
    if kind == "float" and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if kind == "flag":
        check_mask_dtype(t, name)
    if kind == "ids" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def flatten_batch(
    anchor: str,
    shape: tuple[int, ...],
    device: torch.device,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cu_seqlens: Optional[Tensor],
    side: Mapping[str, Optional[Tensor]],
    check_inputs: Optional[bool] = None,
) -> Batch:
    """Check the loss inputs against the per-token ``shape`` and ``device`` of the tensor named ``anchor``
    (``logp`` for :func:`policy_loss`, ``targets`` for the fused loss), build the sequence map, and
    return them flattened. Errors name the argument and the anchor."""
    require_tensor("old_logp", old_logp)
    require_tensor("advantages", advantages)
    require_tensor("mask", mask)
    require_tensor("cu_seqlens", cu_seqlens, optional=True)
    for name, t in side.items():
        require_tensor(name, t, optional=True)
    for name, t in (("old_logp", old_logp), ("advantages", advantages)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    check_mask_dtype(mask)
    for name, t in side.items():
        if t is not None:
            _check_kind(name, t, SIDE_INPUTS[name])
    shape = tuple(shape)
    for name, t in (("old_logp", old_logp), ("mask", mask), *side.items()):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of {anchor} {shape}, got {tuple(t.shape)}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask), ("cu_seqlens", cu_seqlens),
                    *side.items()):  # fmt: skip
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but {anchor} is on {device}")

    checks = want_checks(check_inputs, device)
    if checks:
        check_mask_values(mask)
    if cu_seqlens is not None:
        # value checks need a host sync: on by default for CPU tensors only
        check_cu_seqlens(cu_seqlens, shape, device, anchor, values=checks)
        n, b = shape[0], cu_seqlens.numel() - 1
        cu = cu_seqlens.long()
        pos = torch.arange(n, device=device, dtype=torch.long)
        raw_ids = torch.searchsorted(cu[1:].contiguous(), pos, right=True)  # == B for pos >= cu[-1]
        in_seq = raw_ids < b
        seg = Segments(b, seq_ids=raw_ids.clamp(max=max(b - 1, 0)), lengths=cu[1:] - cu[:-1])
        if advantages.shape == torch.Size([n]):
            adv = advantages
        elif advantages.shape == torch.Size([b]):
            adv = seg.expand(advantages)
        else:
            raise ValueError(
                f"packed advantages must be [N]={n} (per token) or [B]={b} (per sequence), "
                f"got {tuple(advantages.shape)}"
            )
    else:
        if len(shape) == 1:
            b, t = 1, shape[0]
        elif len(shape) == 2:
            b, t = shape
        else:
            raise ValueError(f"{anchor} must be [B, T] (padded) or [N] with cu_seqlens (packed), got shape {shape}")
        seg = Segments(b, seq_len=t)
        in_seq = None
        if len(shape) == 2 and advantages.dim() == 1:
            if advantages.shape[0] != b:
                raise ValueError(f"per-sequence advantages must be [B]={b}, got {tuple(advantages.shape)}")
            adv = seg.expand(advantages)
        else:
            try:
                adv = advantages.broadcast_to(shape)
            except RuntimeError:
                raise ValueError(
                    f"advantages must be [B, T] or [B] for {anchor} of shape {shape}, got {tuple(advantages.shape)}"
                ) from None
    valid = (mask != 0).reshape(-1)
    if in_seq is not None:
        valid = valid & in_seq
    flat = {k: v.reshape(-1) for k, v in side.items() if v is not None}
    return Batch(shape, seg, valid, old_logp.reshape(-1), adv.reshape(-1), flat)


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp64 stays fp64; every other float dtype computes in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class Tokens(NamedTuple):
    """Flat, sanitised per-token tensors (zeros at masked positions) in the compute dtype."""

    valid: Tensor  # [N] bool
    n_valid: Tensor  # 0-dim int64 count of valid tokens
    logp: Tensor  # [N] differentiable
    old_logp: Tensor  # [N] detached
    adv: Tensor  # [N] detached
    log_ratio: Tensor  # [N] logp - old_logp (raw, differentiable)
    seg: Optional[Segments]

    def masked_mean(self, x: Tensor) -> Tensor:
        """Mean of ``x`` over valid tokens (0 when there are none); detached fp32 metric."""
        x = x.detach().to(self.logp.dtype)
        return (torch.where(self.valid, x, torch.zeros_like(x)).sum() / self.count()).float()

    def count(self) -> Tensor:
        """Valid-token count as a compute-dtype 0-dim tensor, at least 1 (a safe denominator)."""
        return self.n_valid.clamp_min(1).to(self.logp.dtype)

    def zero_metric(self) -> Tensor:
        return torch.zeros((), dtype=torch.float32, device=self.logp.device)

    def clean(self, x: Tensor) -> Tensor:
        """``x`` in the compute dtype with 0 at masked positions."""
        return torch.where(self.valid, x.to(self.logp.dtype), torch.zeros_like(self.logp))


def make_tokens(seg: Optional[Segments], valid: Tensor, lp: Tensor, old: Tensor, adv: Tensor) -> Tokens:
    """Sanitised per-token context: values at masked positions become 0 (no NaN/inf from padding)."""
    dtype = lp.dtype
    zeros = torch.zeros(lp.shape, dtype=dtype, device=lp.device)

    def clean(x: Tensor) -> Tensor:
        return torch.where(valid, x.to(dtype), zeros)

    lp = clean(lp)
    old = clean(old.detach())
    return Tokens(
        valid=valid, n_valid=valid.sum(), logp=lp, old_logp=old, adv=clean(adv.detach()), log_ratio=lp - old, seg=seg
    )
