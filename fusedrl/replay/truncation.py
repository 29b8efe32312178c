"""Recomputed truncation: the kept set of top-k / top-p / min-p sampling, for when the engine's masks
were not captured. Semantics and order are vLLM's sampler (transcribed from vLLM 0.34.0: the min-p kernel
of the Model Runner V2 sampler, ``vllm/v1/worker/gpu/sample/min_p.py``, and the PyTorch reference of
``vllm/v1/sample/ops/topk_topp_sampler.py::apply_top_k_top_p_pytorch``):

1. temperature (already in the processed logits ``z`` this module gets),
2. min-p: drop ``z < max(z) + log(min_p)`` (strict; ``min_p = 0`` drops nothing),
3. top-k: sort ascending, drop ``z < z_(V-k)`` (strict: every logit tied with the k-th largest stays;
   ``k <= 0`` or ``k >= V`` drops nothing),
4. top-p over the survivors: ascending cumulative probability ``cum``, drop ``cum <= 1 - p`` (inclusive),
   the largest logit always stays.

vLLM's GPU sampler (its Triton kernel) keeps exactly ``k`` at a top-k tie and may break top-p ties
differently: masks the engine returns (``sampling_mask=``) are exact, a recomputed one matches the
PyTorch reference. Parameters are Python numbers or tensors like ``temperature``: per token (the tokens'
shape) or per sequence (``[B]`` of ``[B, T]`` tokens).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Union

import torch

Tensor = torch.Tensor
Param = Union[int, float, Tensor, None]

__all__ = ["Truncation", "check_truncation", "keep_mask"]


class Truncation(NamedTuple):
    """Per-token truncation parameters (``[N]`` tensors) or None where that truncation is off."""

    top_k: Optional[Tensor]  # int64 [N]; values <= 0 or >= V: off for that token
    top_p: Optional[Tensor]  # [N] in (0, 1]
    min_p: Optional[Tensor]  # [N] in [0, 1]

    def rows(self, a: int, b: int) -> Truncation:
        return Truncation(*(None if t is None else t[a:b] for t in self))

    def select(self, idx: Tensor) -> Truncation:
        return Truncation(*(None if t is None else t.index_select(0, idx) for t in self))


def _per_token(name: str, value, lead: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Optional[Tensor]:
    n = math.prod(lead)
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a number or a real tensor, got dtype {value.dtype}")
        if value.requires_grad:
            raise ValueError(f"{name} must not require grad")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the tokens are on {device}")
        if value.dim() == 0:
            return value.to(dtype).expand(n).contiguous()
        if tuple(value.shape) == tuple(lead):
            return value.reshape(-1).to(dtype).contiguous()
        if len(lead) == 2 and tuple(value.shape) == lead[:1]:
            return value[:, None].expand(lead).reshape(-1).to(dtype).contiguous()
        raise ValueError(
            f"{name} must be a number or a tensor of the tokens' shape {tuple(lead)}"
            + (f" or per sequence {tuple(lead[:1])}" if len(lead) == 2 else "")
            + f", got shape {tuple(value.shape)}"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    return torch.full((n,), float(value) if dtype.is_floating_point else int(value), dtype=dtype, device=device)


def check_truncation(top_k: Param, top_p: Param, min_p: Param, lead: tuple[int, ...], device: torch.device,
                     checks: bool) -> Optional[Truncation]:  # fmt: skip
    """The truncation parameters per token, checked (errors name the argument), or None when none is on.
    Value checks read the tensors on the host (behind ``checks``); numbers are always checked."""
    for name, v, lo, hi, lo_open in (("top_p", top_p, 0.0, 1.0, True), ("min_p", min_p, 0.0, 1.0, False)):
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            bad = math.isnan(v) or v > hi or (v <= lo if lo_open else v < lo)
            if bad:
                rng = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
                raise ValueError(f"{name} must be in {rng} or None, got {v!r}")
    if isinstance(top_k, float) or (isinstance(top_k, Tensor) and top_k.is_floating_point()):
        raise TypeError(f"top_k must be an integer or an integer tensor, got {top_k!r}")
    k = _per_token("top_k", top_k, lead, device, torch.int64)
    p = _per_token("top_p", top_p, lead, device, torch.float32)
    m = _per_token("min_p", min_p, lead, device, torch.float32)
    if checks:
        if p is not None and p.numel() and bool(((p <= 0) | (p > 1) | p.isnan()).any()):
            raise ValueError("top_p must be in (0, 1] everywhere")
        if m is not None and m.numel() and bool(((m < 0) | (m > 1) | m.isnan()).any()):
            raise ValueError("min_p must be in [0, 1] everywhere")
    if k is None and p is None and m is None:
        return None
    return Truncation(k, p, m)


def keep_mask(z: Tensor, trunc: Truncation) -> Tensor:
    """``[R, V]`` bool: the tokens vLLM's sampler keeps from the processed logits ``z [R, V]`` (temperature,
    softcap and bias applied; ``-inf`` columns are never kept) with this truncation (per-row parameters)."""
    r, v = z.shape
    zf = z.float()
    keep = torch.isfinite(zf) | (zf == math.inf)
    if trunc.min_p is not None:
        m = trunc.min_p.to(zf.dtype)[:, None]
        thr = zf.amax(-1, keepdim=True) + torch.log(m)  # log(0) = -inf: nothing dropped
        keep &= ~(zf < thr)
        zf = zf.masked_fill(~keep, -math.inf)
    if trunc.top_k is None and trunc.top_p is None:
        return keep
    srt, idx = zf.sort(-1)  # ascending, as vLLM's reference
    if trunc.top_k is not None:
        k = trunc.top_k.clone()
        k[(k <= 0) | (k > v)] = v
        kth = srt.gather(1, (v - k)[:, None])
        srt = srt.masked_fill(srt < kth, -math.inf)
    if trunc.top_p is not None:
        p = trunc.top_p.to(srt.dtype)[:, None]
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= 1 - p
        drop[:, -1] = False  # the largest logit always stays
        srt = srt.masked_fill(drop, -math.inf)
    kept_sorted = srt > -math.inf
    return keep & torch.zeros_like(keep).scatter_(1, idx, kept_sorted)
