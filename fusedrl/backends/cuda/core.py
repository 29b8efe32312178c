"""`cuda` backend: the compiled extension ``fusedrl.extension()`` (csrc/), cuBLAS GEMMs on bounded
token x vocab chunks plus fused CUDA epilogues.

Forward: for each token chunk (``chunk_tokens``) and vocab chunk (``chunk_vocab``) cuBLAS writes the
fp32 logits chunk ``x_c w_v^T`` (fp32 accumulation, bf16/fp16/fp32 inputs) into a workspace buffer,
and one kernel applies bias / softcap / temperature and merges the chunk into running per-token
statistics (max M, S = sum e^(z-M), B' = sum (z-M) e^(z-M)), picking up the target logit on the way.
Only lse and entropy (8 bytes/token) are kept. ``return_entropy_change`` adds the entropy change's sums
S2 = sum e^(2(z-M)), B2 = sum (z-M) e^(2(z-M)) (the kernels' DH variant; ``fusedrl.backends.base``).
Backward recomputes each logits chunk, turns it into ``du = dz * dz/du`` in place (a 16-bit copy feeds
the GEMMs for 16-bit inputs), and accumulates ``dx += du w_v`` and ``dw_v += du^T x_c`` in fp32 (straight
into the outputs for fp32 inputs).

``temperature`` is a Python float > 0 or a per-token fp32 tensor ``[N]`` (one per row, on the rows'
device): ``z = softcap(u + b) / T_n``. The kernels take a per-row pointer (null: the scalar), indexed by
each token chunk's row offset; a constant vector gives the scalar path's bits.

All memory (outputs and one workspace buffer per call) is allocated here with torch, so the caching
allocator and stream semantics apply (``extension.py``: the compiled module, cuBLAS, devices).

Options (``**opts`` of forward / backward; ``workspace_mb`` is the public core-op argument, the others
are tuning knobs for direct calls):
  workspace_mb        budget of the chunk buffers (logits, du, chunk accumulator); default 1/8 of the
                      device's free memory, clamped to [32, 256] MiB (see default_budget)
  chunk_tokens        token chunk (default: min(N, 4096), shrunk to the budget)
  chunk_vocab         vocab chunk (default: min(V, 4096), shrunk to the budget)
  cublas_workspace_mb cuBLAS workspace (default 32 on sm_90+, 4 otherwise)
  order               backward loop order "vocab" | "token" | "auto" (default)
  lean_accumulation   16-bit inputs: accumulate the gradient that spans the outer loop directly in its
                      16-bit output (saves min(N,V)*H*4 bytes, one extra rounding per outer chunk). Off.
  overlap             (default True) run the memory-bound epilogue of chunk k on a side stream while the
                      caller's stream runs the next GEMM (double-buffered chunk buffers, same budget)
  grad_filter_eps     accepted and ignored: this backend is always exact.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..base import check_temperature, workspace_bytes
from ..device import usable_memory
from .extension import DTYPE_CODE, extension, ptr, require, stream

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------
def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


_MIB = 2**20
#: default chunk-buffer budget: this fraction of the device's free memory, clamped to
#: [BUDGET_MIN_MB, BUDGET_MAX_MB]. BUDGET_MAX_MB holds the largest default chunks (4096 x 4096:
#: fp32 logits + 16-bit du, double-buffered, + the [Vc, H] fp32 accumulator at H = 4096), whose
#: GEMMs fill about 4 waves of 132 SMs with 128 x 256 tiles; the old fixed 96 MiB halved them to
#: 2048 x 2048 (one wave) at the headline shape.
BUDGET_FREE_FRACTION = 1 / 8
BUDGET_MIN_MB = 32
BUDGET_MAX_MB = 256
#: budget when the free memory is unknown (no device: planning on the host)
BUDGET_UNKNOWN_MB = 96


def default_budget(free_bytes: Optional[int]) -> int:
    """Chunk-buffer budget in bytes from the device's free memory (None: unknown)."""
    if free_bytes is None:
        return BUDGET_UNKNOWN_MB * _MIB
    b = int(free_bytes * BUDGET_FREE_FRACTION)
    return max(BUDGET_MIN_MB * _MIB, min(BUDGET_MAX_MB * _MIB, b))


def _free_bytes(idx: int) -> Optional[int]:
    """Free device memory as torch can use it (the driver's free bytes plus torch's cached, unused ones),
    read once per process (``device.usable_memory``: the same plan, so the same bits, at every step)."""
    mem = usable_memory(torch.device("cuda", idx))
    return None if mem is None else mem[0]


def _budget(idx: Optional[int] = None, opts: Optional[dict] = None) -> int:
    """Chunk-buffer budget: the ``workspace_mb`` option, else :func:`default_budget` of the free memory of
    device ``idx`` (96 MiB without a device)."""
    mb = (opts or {}).get("workspace_mb")
    if mb is not None:
        return workspace_bytes(float(mb))
    return default_budget(_free_bytes(idx) if idx is not None else None)


def _cublas_ws_bytes(idx: int, opts: Optional[dict] = None) -> int:
    mb = (opts or {}).get("cublas_workspace_mb")
    if mb:
        return int(float(mb) * 2**20)
    major = torch.cuda.get_device_capability(idx)[0]
    return (32 if major >= 9 else 4) * 2**20


def _chunk_bytes(
    nc: int,
    vc: int,
    h: int,
    es: int,
    backward: bool,
    order: int,
    need_dx: bool,
    need_dw: bool,
    lean: bool,
    overlap: bool = False,
) -> int:
    """Bytes of the chunk-sized buffers (what the budget bounds; full-size accumulators excluded)."""
    nbuf = 2 if overlap else 1
    b = nbuf * nc * vc * 4
    if backward and es != 4:
        b += nbuf * nc * vc * es
        if order == 0 and need_dw:  # vocab-outer: [Vc, H] fp32 dw accumulator
            b += vc * h * 4
        if order == 1 and need_dx:  # token-outer: [Nc, H] fp32 dx accumulator
            b += nc * h * 4
    return b


def plan(
    n: int,
    h: int,
    v: int,
    es: int,
    backward: bool = False,
    order: int = 0,
    need_dx: bool = True,
    need_dw: bool = True,
    lean: bool = False,
    opts: Optional[dict] = None,
    overlap: bool = False,
    budget: Optional[int] = None,
) -> tuple[int, int]:
    """(chunk_tokens, chunk_vocab) for a chunk-buffer ``budget`` in bytes (default :func:`_budget`).

    Starts at min(N, 4096) x min(V, 4096) and halves the larger side until the chunk buffers fit, so
    the plan (and the memory) is flat in V. The vocab chunk is a multiple of 8 (aligned rows for cuBLAS).
    """
    opts = opts or {}
    nc_user = opts.get("chunk_tokens")
    vc_user = opts.get("chunk_vocab")
    nc = max(1, min(n, int(nc_user) if nc_user else 4096))
    vc = _round_up(max(1, min(v, int(vc_user) if vc_user else 4096)), 8)
    if nc_user and vc_user:
        return nc, vc
    budget = _budget(None, opts) if budget is None else int(budget)
    while _chunk_bytes(nc, vc, h, es, backward, order, need_dx, need_dw, lean, overlap) > budget:
        can_v = not vc_user and vc > 256
        can_n = not nc_user and nc > 64
        if can_v and (vc >= nc or not can_n):
            vc = _round_up(vc // 2, 8)
        elif can_n:
            nc = (nc + 1) // 2
        else:
            break
    return nc, vc


def _order(n: int, v: int, opts: dict) -> int:
    o = str(opts.get("order") or "auto").lower()
    if o in ("vocab", "vocab_outer", "0"):
        return 0
    if o in ("token", "token_outer", "1"):
        return 1
    if o != "auto":
        raise ValueError(f"cuda backend: order must be 'vocab', 'token' or 'auto', got {o!r}")
    # the cross-loop fp32 accumulator is [N, H] (vocab-outer) or [V, H] (token-outer): keep the smaller
    return 0 if n <= v else 1


def _overlap(opts: dict) -> bool:
    v = opts.get("overlap")
    return True if v is None else bool(v)


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _fallback():
    from fusedrl.backends import torch_backend

    return torch_backend


def _tf32(dtype: torch.dtype) -> bool:
    """TF32 for the fp32 GEMMs, as torch's own matmul setting says (16-bit inputs: never asked)."""
    if dtype != torch.float32:
        return False
    m = torch.backends.cuda.matmul
    try:
        return bool(m.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses the legacy flag once the fp32_precision API was used
        p = m.fp32_precision
        if p == "none":  # "none" inherits: cuda backend, then the global setting
            p = getattr(torch.backends.cuda, "fp32_precision", "none")
        if p == "none":
            p = getattr(torch.backends, "fp32_precision", "ieee")
        return p == "tf32"


# ----------------------------------------------------------------------------------------------
# backend contract
# ----------------------------------------------------------------------------------------------
def forward(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    return_entropy: bool,
    vocab_start: int = 0,
    return_entropy_change: bool = False,
    **opts,
):
    """(lse, zt, ent or None), or (lse, zt, ent, sq) with ``return_entropy_change``
    (:meth:`fusedrl.backends.base.Backend.forward`)."""
    t_scalar, t_rows = check_temperature(temperature, x.shape[0], x.device, "cuda backend forward")
    idx = require(x.device)
    dh = bool(return_entropy_change)
    if x.dtype not in DTYPE_CODE:  # fp64: no cuBLAS fp32-accumulating path worth having; be exact
        return _fallback().forward(
            x, w, targets, bias, temperature, softcap, return_entropy, vocab_start=vocab_start,
            return_entropy_change=dh, **opts
        )  # fmt: skip
    n, h = x.shape
    v = w.shape[0]
    dev = x.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    zt = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev) if (return_entropy or dh) else None
    sq = torch.empty(2, n, dtype=torch.float32, device=dev) if dh else None
    out = (lse, zt, ent, sq) if dh else (lse, zt, ent)
    if n == 0:
        return out
    x = x.detach().contiguous()
    w = w.detach().to(x.dtype).contiguous()
    tg = targets.detach().to(torch.int64).contiguous()
    b = _f32(bias)
    es = x.element_size()
    overlap = _overlap(opts)
    nc, vc = plan(n, h, v, es, backward=False, opts=opts, overlap=overlap, budget=_budget(idx, opts))
    cws = _cublas_ws_bytes(idx, opts)
    ws = torch.empty(extension().fwd_workspace_bytes(nc, vc, cws, overlap, dh), dtype=torch.uint8, device=dev)
    extension().linear_forward(
        idx,
        stream(idx),
        x.data_ptr(),
        w.data_ptr(),
        ptr(b),
        tg.data_ptr(),
        n,
        h,
        v,
        DTYPE_CODE[x.dtype],
        int(vocab_start),
        t_scalar,
        ptr(t_rows),
        float(softcap) if softcap is not None else 0.0,
        lse.data_ptr(),
        zt.data_ptr(),
        ptr(ent),
        ws.data_ptr(),
        ws.numel(),
        nc,
        vc,
        cws,
        _tf32(x.dtype),
        overlap,
        *_sq_ptrs(sq),
    )
    return out


def _sq_ptrs(sq: Optional[Tensor]) -> tuple[int, int]:
    """The kernels' (P2, P2H) pointers of the entropy change's sums ``sq [2, N]`` (0, 0: not asked)."""
    return (0, 0) if sq is None else (sq[0].data_ptr(), sq[1].data_ptr())


def backward(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    lse: Tensor,
    ent: Optional[Tensor],
    g_lp: Optional[Tensor],
    g_H: Optional[Tensor],
    vocab_start: int = 0,
    need_dx: bool = True,
    need_dw: bool = True,
    need_db: bool = True,
    **opts,
):
    t_scalar, t_rows = check_temperature(temperature, x.shape[0], x.device, "cuda backend backward")
    idx = require(x.device)
    if x.dtype not in DTYPE_CODE:
        return _fallback().backward(
            x,
            w,
            targets,
            bias,
            temperature,
            softcap,
            lse,
            ent,
            g_lp,
            g_H,
            vocab_start=vocab_start,
            need_dx=need_dx,
            need_dw=need_dw,
            need_db=need_db,
            **opts,
        )
    if g_H is not None and ent is None:
        raise ValueError("cuda backend: g_H needs the entropy `ent`")
    n, h = x.shape
    v = w.shape[0]
    dev = x.device
    need_db = bool(need_db) and bias is not None
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None
    # the kernels write dW in x's dtype (w is cast to it below): allocate it so, cast back at the end
    w_dtype = w.dtype
    dw = torch.empty(w.shape, dtype=x.dtype, device=dev) if need_dw else None
    db32 = torch.empty(v, dtype=torch.float32, device=dev) if need_db else None
    if n == 0 or (g_lp is None and g_H is None):
        for t in (dx, dw, db32):
            if t is not None:
                t.zero_()
        return dx, (dw.to(w_dtype) if need_dw else None), (db32.to(bias.dtype) if need_db else None)
    if not (need_dx or need_dw or need_db):
        return None, None, None
    x = x.detach().contiguous()
    w = w.detach().to(x.dtype).contiguous()
    tg = targets.detach().to(torch.int64).contiguous()
    b = _f32(bias)
    lse32, ent32, glp32, gh32 = _f32(lse), _f32(ent), _f32(g_lp), _f32(g_H)
    es = x.element_size()
    order = _order(n, v, opts)
    lean = bool(opts.get("lean_accumulation", False))
    overlap = _overlap(opts)
    nc, vc = plan(
        n,
        h,
        v,
        es,
        backward=True,
        order=order,
        need_dx=need_dx,
        need_dw=need_dw,
        lean=lean,
        opts=opts,
        overlap=overlap,
        budget=_budget(idx, opts),
    )
    cws = _cublas_ws_bytes(idx, opts)
    code = DTYPE_CODE[x.dtype]
    nbytes = extension().bwd_workspace_bytes(n, h, v, nc, vc, code, order, lean, need_dx, need_dw, cws, overlap)
    ws = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    extension().linear_backward(
        idx,
        stream(idx),
        x.data_ptr(),
        w.data_ptr(),
        ptr(b),
        tg.data_ptr(),
        n,
        h,
        v,
        DTYPE_CODE[x.dtype],
        int(vocab_start),
        t_scalar,
        ptr(t_rows),
        float(softcap) if softcap is not None else 0.0,
        lse32.data_ptr(),
        ptr(ent32),
        ptr(glp32),
        ptr(gh32),
        ptr(dx),
        ptr(dw),
        ptr(db32),
        ws.data_ptr(),
        ws.numel(),
        nc,
        vc,
        order,
        lean,
        cws,
        _tf32(x.dtype),
        overlap,
    )
    db = None
    if need_db:
        db = db32 if bias.dtype == torch.float32 else db32.to(bias.dtype)
    return dx, (dw.to(w_dtype) if need_dw else None), db


def logits_forward(
    logits: Tensor,
    targets: Tensor,
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    return_entropy: bool,
    return_entropy_change: bool = False,
    **opts,
):
    """:func:`forward` over given logits ``[N, V]`` (one row per block, no GEMM)."""
    t_scalar, t_rows = check_temperature(temperature, logits.shape[0], logits.device, "cuda backend logits_forward")
    idx = require(logits.device)
    dh = bool(return_entropy_change)
    if logits.dtype not in DTYPE_CODE:
        extra = {"return_entropy_change": True} if dh else {}
        return _fallback().logits_forward(logits, targets, temperature, softcap, return_entropy, **extra)
    n, v = logits.shape
    dev = logits.device
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    zt = torch.empty(n, dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev) if (return_entropy or dh) else None
    sq = torch.empty(2, n, dtype=torch.float32, device=dev) if dh else None
    out = (lse, zt, ent, sq) if dh else (lse, zt, ent)
    if n == 0:
        return out
    lg = logits.detach().contiguous()
    tg = targets.detach().to(torch.int64).contiguous()
    extension().logits_forward(
        idx,
        stream(idx),
        lg.data_ptr(),
        n,
        v,
        DTYPE_CODE[lg.dtype],
        t_scalar,
        ptr(t_rows),
        float(softcap) if softcap is not None else 0.0,
        tg.data_ptr(),
        lse.data_ptr(),
        zt.data_ptr(),
        ptr(ent),
        *_sq_ptrs(sq),
    )
    return out


def logits_backward(
    logits: Tensor,
    targets: Tensor,
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    lse: Tensor,
    ent: Optional[Tensor],
    g_lp: Optional[Tensor],
    g_H: Optional[Tensor],
    inplace: bool = False,
):
    t_scalar, t_rows = check_temperature(temperature, logits.shape[0], logits.device, "cuda backend logits_backward")
    idx = require(logits.device)
    if logits.dtype not in DTYPE_CODE:
        return _fallback().logits_backward(logits, targets, temperature, softcap, lse, ent, g_lp, g_H, inplace=inplace)
    if g_H is not None and ent is None:
        raise ValueError("cuda backend: g_H needs the entropy `ent`")
    n, v = logits.shape
    src = logits.detach()
    contiguous = src.is_contiguous()
    if not contiguous:
        src = src.contiguous()
    out = src if (inplace and contiguous) or not contiguous else torch.empty_like(src)
    if n > 0:
        tg = targets.detach().to(torch.int64).contiguous()
        lse32, ent32, glp32, gh32 = _f32(lse), _f32(ent), _f32(g_lp), _f32(g_H)
        extension().logits_backward(
            idx,
            stream(idx),
            src.data_ptr(),
            out.data_ptr(),
            n,
            v,
            DTYPE_CODE[src.dtype],
            t_scalar,
            ptr(t_rows),
            float(softcap) if softcap is not None else 0.0,
            tg.data_ptr(),
            lse32.data_ptr(),
            ptr(ent32),
            ptr(glp32),
            ptr(gh32),
        )
    if inplace and not contiguous:
        logits.copy_(out)
        return logits
    return out
