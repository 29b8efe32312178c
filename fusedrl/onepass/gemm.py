"""The one-pass schedule's GEMMs: 16-bit operands with fp32 output on CUDA (tensor cores, no upcast of
the weight), fp32 / fp64 everywhere else, with a per-kind fallback where this torch lacks the fast kind."""

from __future__ import annotations

import logging
from typing import Optional

import torch

Tensor = torch.Tensor

log = logging.getLogger("fusedrl")


def is_low(t: Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


# torch.mm / torch.addmm with out_dtype (CUDA, torch >= 2.8): each flips off for the process on its first
# failure other than running out of memory (an OOM is the caller's, and would otherwise turn the fast GEMMs
# off for good and upcast W per chunk from then on)
_OUT_DTYPE_OK = {"mm": True, "addmm": True}


def _fp32_gemm_16bit(kind: str, fn, fallback):
    """Run ``fn`` (a 16-bit GEMM ``kind`` with fp32 output), or ``fallback`` (upcast operands: correct,
    slower) where this torch has no such ``out_dtype`` GEMM, warning once per kind."""
    if _OUT_DTYPE_OK[kind]:
        try:
            return fn()
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError) as e:
            _OUT_DTYPE_OK[kind] = False
            log.warning(
                "fusedrl: torch.%s with 16-bit operands and fp32 output is unavailable (%s); upcasting operands",
                kind,
                e,
            )
    return fallback()


def mm_f32(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = a @ b`` with ``out`` fp32 (fp64 for fp64 operands)."""
    if is_low(a):
        if a.is_cuda:
            return _fp32_gemm_16bit(
                "mm",
                lambda: torch.mm(a, b, out_dtype=torch.float32, out=out),
                lambda: torch.mm(a.float(), b.float(), out=out),
            )
        return torch.mm(a.float(), b.float(), out=out)  # CPU: no 16-bit -> fp32 GEMM
    return torch.mm(a, b, out=out)


def addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with an fp32 accumulator and operands of any float dtype."""
    if is_low(a):
        if a.is_cuda:
            _fp32_gemm_16bit(
                "addmm",
                lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc),
                lambda: acc.addmm_(a.float(), b.float()),
            )
            return
        a, b = a.float(), b.float()
    acc.addmm_(a, b)


def gemm_logits(xc: Tensor, w: Tensor, bias: Optional[Tensor], out: Tensor, scale: float) -> Tensor:
    """``out = (x_c @ W^T + b) * scale`` (scale folded into the small x operand when it is fp32/fp64)."""
    if scale != 1.0:
        xc = xc * scale
    if bias is not None and not is_low(xc):
        b = bias.to(out.dtype)  # a bias of another float dtype joins the GEMM in the compute dtype
        return torch.addmm(b * scale if scale != 1.0 else b, xc, w.t(), out=out)
    mm_f32(xc, w.t(), out)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out
