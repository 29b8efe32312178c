"""The one-pass schedule's GEMMs: 16-bit operands with fp32 output on CUDA (tensor cores, no upcast of
the weight), fp32 / fp64 everywhere else, with a per-kind fallback where this torch lacks the fast kind.

Two fast kinds, each probed once per process on the first CUDA call (a 16 x 16 GEMM, checked):

* ``mm``: ``torch.mm(a, b, out_dtype=torch.float32)`` (torch >= 2.8). Fallback: fp32 operands
  (``a.float() @ b.float()``: correct, fp32-GEMM speed, an fp32 copy of each operand).
* ``addmm``: ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` into the fp32 accumulator
  (torch >= 2.10; 2.8 and 2.9 refuse an fp32 ``acc`` with 16-bit operands, pytorch#154086, fixed by
  pytorch#167931). Fallback: ``mm`` with fp32 output into a scratch, slice by slice of ``acc``, then
  ``acc += scratch`` (16-bit tensor-core speed, one more pass over ``acc``); fp32 operands where ``mm``
  is missing too.

:func:`path` names the resulting path (``"fast"``, ``"mm"``, ``"upcast"``) for the planner's model. A
probe that fails warns once; a fast kind that fails later (other than by running out of memory) turns
itself off for the process and warns once.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch

Tensor = torch.Tensor

#: torch's out-of-memory exception (``torch.OutOfMemoryError`` from torch 2.5, ``torch.cuda``'s before)
OutOfMemoryError = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

#: probe results by kind: None until probed, then whether the fast kind runs (tests set them)
_OUT_DTYPE_OK: dict[str, Optional[bool]] = {"mm": None, "addmm": None}
_lock = threading.Lock()
# elements of the scratch addmm's fallback allocates when the caller gives none (64 MiB of fp32)
_SLICE_ELEMS = 16 * 2**20

_FALLBACK = {
    "mm": "fp32 operands (a.float() @ b.float(): correct, at fp32 GEMM speed)",
    "addmm": "torch.mm with fp32 output into a scratch, then acc += scratch (one more pass over the accumulator)",
}


def is_low(t: Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


def _warn(kind: str, why: str) -> None:
    warnings.warn(
        f"fusedrl one-pass: torch.{kind} with bf16/fp16 operands and fp32 output is unavailable in torch "
        f"{torch.__version__} ({why}); using {_FALLBACK[kind]}. docs/one-pass.md lists the torch versions.",
        UserWarning,
        stacklevel=3,
    )


def _try(kind: str, device: torch.device) -> tuple[bool, str]:
    """Run the fast ``kind`` on 16 x 16 bf16 operands; ``(ok, why not)``. Out of memory is raised."""
    a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    try:
        if kind == "mm":
            out = torch.empty(16, 16, dtype=torch.float32, device=device)
            torch.mm(a, a, out_dtype=torch.float32, out=out)
        else:
            out = torch.ones(16, 16, dtype=torch.float32, device=device)
            torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
    except OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return False, str(e).splitlines()[0] if str(e) else type(e).__name__
    if out.dtype != torch.float32 or tuple(out.shape) != (16, 16):
        return False, f"returned {out.dtype} {tuple(out.shape)}"
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    want = 16.0 if kind == "mm" else 17.0
    if not capturing and not bool((out == want).all()):  # one host read, once per process
        return False, "wrong values"
    return True, ""


def probe(kind: str, device: torch.device) -> bool:
    """Whether the fast ``kind`` (``"mm"`` / ``"addmm"``) runs here: probed once per process, warning once
    when it does not."""
    ok = _OUT_DTYPE_OK[kind]
    if ok is None:
        with _lock:
            ok = _OUT_DTYPE_OK[kind]
            if ok is None:
                ok, why = _try(kind, device)
                _OUT_DTYPE_OK[kind] = ok
                if not ok:
                    _warn(kind, why)
    return bool(ok)


def path(device: torch.device, dtype: torch.dtype) -> str:
    """The 16-bit GEMM path on ``device`` for inputs of ``dtype``: ``"fast"`` (both kinds), ``"mm"``
    (addmm through mm + add), ``"upcast"`` (fp32 operands: CPU, or torch < 2.8). fp32 / fp64 inputs:
    ``"fast"`` (their GEMMs need no out_dtype)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return "fast"
    if device.type != "cuda" or not probe("mm", device):
        return "upcast"
    return "fast" if probe("addmm", device) else "mm"


def _fp32_gemm_16bit(kind: str, fn, fallback):
    """Run ``fn`` (the fast ``kind``), or ``fallback`` where it is off; a failure of ``fn`` other than
    running out of memory (an OOM is the caller's to handle, and must not turn the fast path off for good)
    turns the kind off for the process, warning once."""
    if _OUT_DTYPE_OK[kind]:
        try:
            return fn()
        except OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError) as e:
            _OUT_DTYPE_OK[kind] = False
            _warn(kind, str(e).splitlines()[0] if str(e) else type(e).__name__)
    return fallback()


def mm_f32(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = a @ b`` with ``out`` fp32 (fp64 for fp64 operands)."""
    if is_low(a):
        if a.is_cuda and probe("mm", a.device):
            return _fp32_gemm_16bit(
                "mm",
                lambda: torch.mm(a, b, out_dtype=torch.float32, out=out),
                lambda: torch.mm(a.float(), b.float(), out=out),
            )
        return torch.mm(a.float(), b.float(), out=out)  # CPU / torch < 2.8: no 16-bit -> fp32 GEMM
    return torch.mm(a, b, out=out)


def _addmm_by_mm(acc: Tensor, a: Tensor, b: Tensor, tmp: Optional[Tensor]) -> None:
    """``acc += a @ b`` as fp32-output mm into ``tmp`` (any contiguous fp32 buffer; allocated when None),
    slice of ``acc``'s rows by slice, then an add: 16-bit GEMM speed without addmm's out_dtype."""
    if not probe("mm", a.device):
        acc.addmm_(a.float(), b.float())
        return
    m, n = acc.shape
    if tmp is None or tmp.dtype != torch.float32 or not tmp.is_contiguous() or tmp.numel() < n:
        tmp = torch.empty(min(m * n, max(n, _SLICE_ELEMS)), dtype=torch.float32, device=acc.device)
    flat = tmp.reshape(-1)
    step = max(1, flat.numel() // max(n, 1))
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        part = flat[: (r1 - r0) * n].view(r1 - r0, n)
        mm_f32(a[r0:r1], b, part)
        acc[r0:r1].add_(part)


def addmm_f32_(acc: Tensor, a: Tensor, b: Tensor, tmp: Optional[Tensor] = None) -> None:
    """``acc += a @ b`` with an fp32 accumulator and operands of any float dtype. ``tmp``: an fp32 buffer
    the 16-bit fallback may use as scratch (the one-pass workspace, free when GEMM 3 runs)."""
    if is_low(a):
        if a.is_cuda:
            if probe("addmm", a.device):
                _fp32_gemm_16bit(
                    "addmm",
                    lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc),
                    lambda: _addmm_by_mm(acc, a, b, tmp),
                )
            else:
                _addmm_by_mm(acc, a, b, tmp)
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


def dw_from_du(du: Tensor, x: Tensor, g: Optional[Tensor]) -> Tensor:
    """A deferred GEMM 3 (``fusedrl.onepass.plan.defers_dw``): ``dW = du^T @ (g·x)`` as one 16-bit GEMM
    over every token, ``du`` ``[N, V]`` and ``x`` ``[N, H]`` 16-bit, the output ``[V, H]`` in their dtype
    (a plain bf16 matmul: fp32 accumulation, under torch's ``allow_bf16_reduced_precision_reduction`` on
    CUDA like any bf16 GEMM). The upstream gradient ``g`` (a 0-dim tensor; None: 1) scales the small
    operand in fp32, rounded to bf16 once per element (exact for a power of two; rounding ``g`` itself
    would be a bias on every gradient); no host read."""
    xg = x if g is None else (x.float() * g.float()).to(x.dtype)
    return torch.mm(du.t(), xg)
