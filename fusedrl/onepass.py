"""The one-pass schedule of the fused policy loss: gradients formed in the forward, three GEMMs.

DESIGN.md section 8 and docs/one-pass.md. For each token chunk of ``Nc`` rows::

    U    = x_c @ W^T              GEMM 1 (input dtype in, fp32 [Nc, V] workspace out)
    row epilogue: M, S, B -> LSE, H, logp; head -> g_lp, g_H; du in place
    dx_c = du @ W                 GEMM 2 (fp32 out)
    dW  += du^T @ x_c             GEMM 3 (fp32 accumulator)

The loss head (``fusedrl.loss.TokenHead``) fixes the normalisers up front, so a chunk's upstream
gradients follow from the chunk alone. After the last chunk the loss value and metrics are
``policy_loss``'s own, computed from the logp and entropy the pass produced; Clip-Cov / KL-Cov then
select on the device and correct only the ``k`` selected rows; backward only scales the stored
(fp32) ``dx``, ``dW``, ``db`` and rounds them once to the inputs' dtypes. Sequence-level losses (GSPO)
use chunks of whole sequences, or two passes (a scoring forward, then the backend's backward with the
head's gradients) when a sequence does not fit the workspace.

Layering: this is the fused-loss layer. It wraps the whole schedule in one ``torch.library``
custom op (opaque to ``torch.compile``, traceable with ``fullgraph=True``); the row epilogue comes
from the backend (a fused Triton / CUDA kernel where the backend has one for the loss mode, else the
torch epilogue of ``fusedrl/backends/torch_backend.py``, which runs on every device); GEMMs are
torch's (cuBLAS on CUDA, with 16-bit operands and fp32 output: tensor cores, no upcast).

Environment: ``FUSEDRL_MEMORY_BUDGET_MB`` (default budget of the schedule's extra memory: workspace
plus fp32 accumulators), ``FUSEDRL_ONEPASS_EPILOGUE`` = ``auto`` (default: the backend's fused kernel
when it has one for the mode) | ``torch`` | ``triton`` | ``cuda`` (force one; an unavailable one raises),
``FUSEDRL_SCHEDULE`` (default of ``schedule="auto"``'s choice: ``auto`` | ``one_pass`` | ``recompute``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import threading
import warnings
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch

from .backends import torch_backend
from .backends._device import usable_memory
from .backends._onepass import OnePassHead
from .loss import PolicyLossConfig, TokenHead, _random_keys, head_kind, kernel_head_ok, metric_names
from .ops import _split_temperature

Tensor = torch.Tensor

__all__ = ["SCHEDULES", "plan", "one_pass_policy_loss", "default_budget_bytes"]

log = logging.getLogger("fusedrl")

SCHEDULES = ("auto", "one_pass", "recompute")
BUDGET_ENV = "FUSEDRL_MEMORY_BUDGET_MB"
EPILOGUE_ENV = "FUSEDRL_ONEPASS_EPILOGUE"
SCHEDULE_ENV = "FUSEDRL_SCHEDULE"
_EPILOGUES = ("auto", "torch", "triton", "cuda")
_MIB = 2**20
_CPU_BUDGET = 512 * _MIB
_GPU_BUDGET_CAP = 4096 * _MIB
# auto takes one_pass only when a chunk holds at least this many rows (fewer starve the GEMMs)
_MIN_ROWS = 64
_KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
_TMP_COLS = torch_backend._B_BLOCK  # columns of the torch epilogue's block temporary
CACHE_ENV = "FUSEDRL_CPU_WORKSPACE_CACHE"
# kernel head codes (docs/one-pass.md) of the modes kernel_head_ok admits
_MODE_CODES = {"vanilla": 0, "clip_cov": 0, "gpg": 1, "cispo": 2, "kl_cov": 3}


# --------------------------------------------------------------------------------------------------
# Budget and plan
# --------------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result  # torch.compile: decided at trace time (env var, driver query)
def default_budget_bytes(device: torch.device) -> int:
    """The schedule's memory budget: ``FUSEDRL_MEMORY_BUDGET_MB``, else 512 MiB on CPU and
    ``min(4 GiB, free / 4)`` on a GPU (workspace plus the fp32 accumulators; gradients excluded), the free
    memory as read at the process's first call for the device."""
    env = os.environ.get(BUDGET_ENV, "").strip()
    if env:
        mb = float(env)
        if not mb > 0:
            raise ValueError(f"{BUDGET_ENV} must be a positive number of MiB, got {env!r}")
        return int(mb * _MIB)
    if device.type == "cuda":
        mem = usable_memory(device)  # read once per process: the same chunks (same bits) every step
        if mem is not None:
            return int(min(_GPU_BUDGET_CAP, mem[0] // 4))
    return _CPU_BUDGET


class Plan(NamedTuple):
    schedule: str  # "one_pass" | "two_pass" | "recompute"
    chunks: tuple[tuple[int, int, Optional[tuple[int, int]]], ...]  # (start, stop, whole sequences)
    reason: str


def _row_bytes(v: int, cdt_size: int, low_precision: bool) -> int:
    """Workspace bytes per chunk row: U and the scratch (compute dtype), a block temporary, the 16-bit
    GEMM operand."""
    return v * (2 * cdt_size + (2 if low_precision else 0)) + min(v, _TMP_COLS) * cdt_size


def _fixed_bytes(n: int, h: int, v: int, low_precision: bool) -> int:
    """fp32 accumulators: dW and dx (16-bit inputs: both held in fp32 until the backward, beyond the
    16-bit gradients themselves) and db."""
    return ((v + n) * h * 4 if low_precision else 0) + v * 4


def _sequence_chunks(rows: int, n: int, seq_len: Optional[int], cu: Optional[list[int]]):
    """Chunks of whole sequences with at most ``rows`` tokens each, or None when one does not fit."""
    if seq_len is not None:  # padded [B, T]
        if seq_len > rows:
            return None
        per = max(1, rows // seq_len) * seq_len
        b = n // max(seq_len, 1)
        return tuple(
            (s * seq_len, min(n, s * seq_len + per), (s, min(b, s + per // seq_len)))
            for s in range(0, b, per // seq_len)
        )
    out, s0 = [], 0
    nseq = len(cu) - 1
    while s0 < nseq:
        s1 = s0 + 1
        if cu[s1] - cu[s0] > rows:
            return None
        while s1 < nseq and cu[s1 + 1] - cu[s0] <= rows:
            s1 += 1
        out.append((cu[s0], cu[s1], (s0, s1)))
        s0 = s1
    if cu[-1] < n:  # tokens after the last sequence belong to none: a chunk of their own
        for a in range(cu[-1], n, rows):
            out.append((a, min(n, a + rows), (nseq, nseq)))
    if not out:
        out.append((0, n, (0, 0)))
    return tuple(out)


# fp16 has bf16's precision but not its range: the one-pass (and two-pass) schedules round du to fp16 in
# the forward, at loss scale 1, so the per-token weights of a mean over many tokens (1/N) push most of it
# below fp16's normal range before a GradScaler's scale can reach it (the backward only scales the
# stored gradients). The recompute schedule forms du in the backward, from the scaled upstream gradient.
_FP16_WHY = (
    "fp16 gradients formed in the forward would underflow before a GradScaler's loss scale reaches "
    "them; the recompute schedule forms them from the scaled upstream gradient"
)


def plan(
    n: int,
    h: int,
    v: int,
    x_dtype: torch.dtype,
    cfg: PolicyLossConfig,
    schedule: str,
    budget: int,
    seq_len: Optional[int] = None,
    cu_host: Optional[list[int]] = None,
) -> Plan:
    """Which schedule runs (``one_pass``, ``two_pass`` or, for ``schedule="auto"`` only, ``recompute``)
    and its token chunks, by the loss head's kind (:func:`fusedrl.loss.head_kind`): token-local and
    selection losses chunk freely; sequence-level losses take chunks of whole sequences (``seq_len`` of
    padded inputs, ``cu_host`` of packed ones), or two passes when one does not fit (``auto``: recompute);
    batch-statistic losses (entropy quantile) always take two passes. fp16 inputs: ``auto`` takes recompute
    (see ``_FP16_WHY``); an explicit ``one_pass`` runs and warns. Host arithmetic only."""
    if x_dtype == torch.float16:
        if schedule == "auto":
            return Plan("recompute", (), _FP16_WHY)
        warnings.warn(f"fusedrl: schedule='one_pass' with fp16 inputs: {_FP16_WHY}", UserWarning, stacklevel=2)
    low = x_dtype in (torch.float16, torch.bfloat16)
    csize = 8 if x_dtype == torch.float64 else 4
    per_row = _row_bytes(v, csize, low)
    room = budget - _fixed_bytes(n, h, v, low)
    rows = max(1, min(n, room // per_row)) if room > 0 else 1
    fits = room > 0 and rows >= min(n, _MIN_ROWS)
    if schedule == "auto" and not fits:
        return Plan(
            "recompute",
            (),
            f"workspace of {min(n, _MIN_ROWS)} rows + accumulators exceed the {budget / _MIB:.0f} MiB budget",
        )
    kind = head_kind(cfg)
    if kind == "batch":  # a statistic of the whole batch first (entropy quantile, ...): always two passes
        return Plan("two_pass", (), "the loss needs whole-batch statistics of logp / entropy first")
    if kind == "sequence":
        chunks = _sequence_chunks(rows, n, seq_len, cu_host)
        if chunks is None:
            if schedule == "auto":
                return Plan("recompute", (), "a sequence does not fit the workspace")
            return Plan("two_pass", (), "a sequence does not fit the workspace")
        return Plan("one_pass", chunks, f"{len(chunks)} chunk(s) of whole sequences")
    count = max(1, -(-n // rows))
    rows = max(1, -(-n // count))  # balanced: no small tail chunk
    chunks = tuple((a, min(n, a + rows), None) for a in range(0, max(n, 1), rows))
    return Plan("one_pass", chunks, f"{len(chunks)} chunk(s) of <= {rows} rows")


# --------------------------------------------------------------------------------------------------
# GEMMs: 16-bit operands with fp32 output on CUDA (tensor cores), plain otherwise
# --------------------------------------------------------------------------------------------------


def _low(t: Tensor) -> bool:
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


def _mm_f32(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = a @ b`` with ``out`` fp32 (fp64 for fp64 operands)."""
    if _low(a):
        if a.is_cuda:
            return _fp32_gemm_16bit(
                "mm",
                lambda: torch.mm(a, b, out_dtype=torch.float32, out=out),
                lambda: torch.mm(a.float(), b.float(), out=out),
            )
        return torch.mm(a.float(), b.float(), out=out)  # CPU: no 16-bit -> fp32 GEMM
    return torch.mm(a, b, out=out)


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with an fp32 accumulator and operands of any float dtype."""
    if _low(a):
        if a.is_cuda:
            _fp32_gemm_16bit(
                "addmm",
                lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc),
                lambda: acc.addmm_(a.float(), b.float()),
            )
            return
        a, b = a.float(), b.float()
    acc.addmm_(a, b)


# --------------------------------------------------------------------------------------------------
# Epilogue selection
# --------------------------------------------------------------------------------------------------


def _kernel_head_scalars(cfg: PolicyLossConfig) -> Optional[dict]:
    """The kernel formula set for the config, or None (the torch epilogue then serves it)."""
    if not kernel_head_ok(cfg):
        return None
    kl = cfg.kl_type
    return dict(
        mode=_MODE_CODES[cfg.loss_mode],
        clip_lo=1.0 - cfg.clip_ratio_low,
        clip_hi=1.0 + cfg.clip_ratio_high,
        clip_c=float(cfg.clip_ratio_c) if cfg.clip_ratio_c is not None else 1.0,
        dual=cfg.loss_mode == "vanilla" and cfg.clip_ratio_c is not None,
        ent_coef=float(cfg.entropy_coeff),
        kl_coef=float(cfg.kl_loss_coef),
        kl_type=_KL_CODES[kl.rstrip("+")],
        kl_st=kl.endswith("+"),
    )


def _kernel_epilogue(backend: str, device: torch.device, x_dtype: torch.dtype, cfg: PolicyLossConfig):
    """``(module, scalars)`` of the fused epilogue kernel to use, or ``(None, None)`` for the torch one."""
    want = os.environ.get(EPILOGUE_ENV, "auto").strip().lower() or "auto"
    if want not in _EPILOGUES:
        raise ValueError(f"{EPILOGUE_ENV} must be one of {_EPILOGUES}, got {want!r}")
    scalars = _kernel_head_scalars(cfg)
    if want == "torch" or x_dtype == torch.float64:
        return None, None
    kind = backend if want == "auto" else want
    if kind not in ("triton", "cuda"):
        return None, None
    from .backends import _load, availability

    mod, why = _load(kind)
    ok = mod is not None and hasattr(mod, "onepass_epilogue")
    if ok and kind == "cuda" and device.type == "cpu":
        ok = mod.extension() is not None  # the host loop of the CUDA epilogue math
    elif ok and device.type != "cpu":
        ok, why = availability(kind, device)
    if want != "auto":
        if not ok:
            raise RuntimeError(
                f"{EPILOGUE_ENV}={want} but that epilogue is not available on {device}: {why or 'no onepass_epilogue'}"
            )
        if scalars is None:
            raise RuntimeError(
                f"{EPILOGUE_ENV}={want}: this loss config (loss_mode {cfg.loss_mode!r} and its "
                f"options) has no kernel head"
            )
    if not ok or scalars is None:
        return None, None
    return mod, scalars


# --------------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------------


def _gemm_logits(xc: Tensor, w: Tensor, bias: Optional[Tensor], out: Tensor, scale: float) -> Tensor:
    """``out = (x_c @ W^T + b) * scale`` (scale folded into the small x operand when it is fp32/fp64)."""
    if scale != 1.0:
        xc = xc * scale
    if bias is not None and not _low(xc):
        return torch.addmm(bias * scale if scale != 1.0 else bias, xc, w.t(), out=out)
    _mm_f32(xc, w.t(), out)
    if bias is not None:
        out.add_(bias.to(out.dtype))
    return out


def _correct_selection(
    head: TokenHead,
    picked: Tensor,
    k_max: int,
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    softcap: Optional[float],
    logp: Tensor,
    lse: Tensor,
    dx: Optional[Tensor],
    dw32: Optional[Tensor],
    db32: Optional[Tensor],
) -> None:
    """Rank-k correction of Clip-Cov / KL-Cov: recompute the logit rows of the (at most k_max) picked
    tokens and add ``du_corr = dg (onehot - p) dz/du`` into dx, dW, db. No host sync: the k_max rows
    are the picked tokens plus unpicked filler whose correction is exactly 0."""
    n = picked.numel()
    k = min(k_max, n)
    if k == 0:
        return
    idx = torch.topk(picked.to(torch.float32), k, sorted=False).indices  # picked first, then filler
    dg = head.selection_delta(idx, logp[idx], picked[idx])
    cdt = lse.dtype
    xs = x.index_select(0, idx)
    u = torch.empty(k, w.shape[0], dtype=cdt, device=x.device)
    _gemm_logits(xs, w, bias, u, 1.0)
    # du_corr = dg (onehot - p) dz/du: the epilogue's du with g_lp = dg and no entropy term
    tr = temperature[idx].to(cdt) if isinstance(temperature, Tensor) else temperature
    st = torch_backend.onepass_stats(u, targets[idx], tr, softcap, False, torch.empty_like(u))
    st = st._replace(s=torch.exp(st.lse - st.m), log_s=st.lse - st.m)  # exactly the pass's LSE
    du = torch_backend.onepass_du(u, st, targets[idx], tr, softcap, dg.to(cdt), None)
    dug = du.to(x.dtype) if _low(x) else du
    if dx is not None:
        corr = torch.empty(k, x.shape[1], dtype=cdt, device=x.device)
        _mm_f32(dug, w, corr)
        dx.index_add_(0, idx, corr)
    if dw32 is not None:
        _addmm_f32_(dw32, dug.t(), xs)
    if db32 is not None:
        db32 += du.sum(0)


_tls = threading.local()


def release_workspace() -> None:
    """Free the CPU workspace the one-pass schedule keeps between calls (this thread's)."""
    _tls.__dict__.pop("buf", None)


def _buffers(device: torch.device, specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[Tensor]:
    """Uninitialised tensors of the given shapes. On CPU they are carved from one buffer kept between
    calls (per thread; ``FUSEDRL_CPU_WORKSPACE_CACHE=0`` turns this off, :func:`release_workspace` frees
    it): a fresh multi-GB allocation costs page faults worth about 10% of the GEMMs there. CUDA has
    torch's caching allocator."""
    if device.type != "cpu" or os.environ.get(CACHE_ENV, "1").strip() in ("0", "false", "off", "no"):
        return [torch.empty(shape, dtype=dt, device=device) for shape, dt in specs]
    sizes = [(math.prod(shape) * torch.empty((), dtype=dt).element_size() + 63) // 64 * 64 for shape, dt in specs]
    total = sum(sizes)
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.numel() < total:
        _tls.buf = None
        buf = _tls.buf = torch.empty(total, dtype=torch.uint8)
    out, off = [], 0
    for (shape, dt), size in zip(specs, sizes):
        nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        out.append(buf[off : off + nbytes].view(dt).view(shape))
        off += size
    return out


def _run(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    head: TokenHead,
    pln: Plan,
    temperature: float,
    softcap: Optional[float],
    backend: str,
    keys: Optional[Tensor],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    want_entropy: bool,
):
    """The one-pass loop. Returns ``(loss, metrics dict, dx, dW, db)`` (gradients None when not asked)."""
    n, h = x.shape
    v = w.shape[0]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    low = _low(x)
    grads = need_dx or need_dw or need_db
    need_ent = want_entropy or head.entropy_has_grad
    logp = torch.empty(n, dtype=cdt, device=dev)
    ent = torch.empty(n, dtype=cdt, device=dev) if need_ent else None
    lse_all = torch.empty(n, dtype=cdt, device=dev)
    # the gradients are formed and kept in the compute dtype (fp32 for 16-bit inputs) until the backward,
    # which scales them by the upstream gradient and rounds once to the input dtype (see _backward)
    dx = torch.empty(n, h, dtype=cdt, device=dev) if need_dx else None
    dw32 = None
    db32 = torch.zeros(v, dtype=cdt, device=dev) if (need_db and bias is not None) else None
    kmod, kscalars = _kernel_epilogue(backend, dev, x.dtype, head.cfg)
    rows = max(b - a for a, b, _ in pln.chunks) if pln.chunks else 0
    specs = [((rows, v), cdt)]
    if kmod is None:
        specs += [((rows, v), cdt), ((rows, min(v, _TMP_COLS)), cdt)]
    if low and grads:
        specs.append(((rows, v), x.dtype))
    bufs = _buffers(dev, specs)
    ws = bufs[0]
    scratch, tmp = (bufs[1], bufs[2]) if kmod is None else (None, None)
    du16 = bufs[-1] if (low and grads) else None
    # the torch epilogue takes 1/T folded into the small x operand; kernels apply T themselves
    per_token = isinstance(temperature, Tensor)
    fold = kmod is None and softcap is None and not low and not per_token and temperature != 1.0
    scale = 1.0 / temperature if fold else 1.0
    wt = head.weights.to(torch.float32)
    first = True
    for a, b, seqs in pln.chunks:
        nc = b - a
        if nc == 0:
            continue
        xc = x[a:b]
        u = _gemm_logits(xc, w, bias if kmod is None else None, ws[:nc], scale)
        tc = targets[a:b]
        tr = temperature[a:b].to(cdt) if per_token else temperature
        if kmod is not None:
            kh = OnePassHead(
                old=head.old[a:b].float(),
                adv=head.adv[a:b].float(),
                weight=wt[a:b],
                ref=None if head.ref is None else head.ref[a:b].float(),
                need_ent=need_ent,
                **kscalars,
            )
            lp_c, ent_c, lse_c, _, _ = kmod.onepass_epilogue(
                u, tc, bias, tr, softcap, kh, du16[:nc] if du16 is not None else None
            )
            du = u
            dug = du16[:nc] if du16 is not None else du
        else:
            st = torch_backend.onepass_stats(
                u,
                tc,
                tr,
                softcap,
                need_ent,
                scratch[:nc],
                tmp[:nc],
                is_scaled=scale != 1.0,
                may_have_neg_inf=bias is not None,
            )
            lse_c, ent_c = st.lse, st.ent
            lp_c = st.zt - st.lse
            du = dug = None
            if grads:
                g_lp, g_H = head.grads(a, b, lp_c, ent_c, seqs)
                du = torch_backend.onepass_du(
                    u, st, tc, tr, softcap, g_lp.to(cdt), None if g_H is None else g_H.to(cdt), tmp[:nc]
                )
                dug = du16[:nc].copy_(du) if du16 is not None else du
        logp[a:b] = lp_c
        lse_all[a:b] = lse_c
        if ent is not None:
            ent[a:b] = ent_c
        if dug is None:
            continue
        if need_dx:
            _mm_f32(dug, w, dx[a:b])
        if need_dw:
            if first:  # the first chunk writes the accumulator (no zero fill)
                dw32 = torch.empty(v, h, dtype=cdt, device=dev)
                _mm_f32(dug.t(), xc, dw32)
            else:
                _addmm_f32_(dw32, dug.t(), xc)
        if db32 is not None:
            db32 += du.sum(0)
        first = False
    del bufs, ws, scratch, tmp, du16
    if need_dw and dw32 is None:  # no token at all
        dw32 = torch.zeros(v, h, dtype=cdt, device=dev)
    loss, metrics, picked = head.evaluate(logp, ent, keys)
    if picked is not None and grads:
        _correct_selection(
            head,
            picked,
            head.selection_bound(),
            x,
            w,
            targets,
            bias,
            temperature,
            softcap,
            logp,
            lse_all,
            dx,
            dw32 if need_dw else None,
            db32,
        )
    return loss, metrics, dx, dw32 if need_dw else None, db32


def _run_two_pass(
    x, w, targets, bias, head: TokenHead, temperature, softcap, backend, keys, need_dx, need_dw, need_db, want_entropy
):
    """Sequences that do not fit the workspace: a scoring forward (one GEMM), the head's gradients over
    the whole batch, then the backend's recompute backward (three GEMMs), all inside the forward."""
    from .backends import get_backend

    mod = get_backend(backend, x.device)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    need_ent = want_entropy or head.entropy_has_grad
    lse, zt, ent = mod.forward(x, w, targets, bias, temperature, softcap, need_ent)
    logp = zt - lse
    loss, metrics, picked = head.evaluate(logp, ent, keys)
    dx = dw = db = None
    if need_dx or need_dw or need_db:
        segs = (0, head.seg.B)
        g_lp, g_H = head.grads(0, x.shape[0], logp, ent, segs)
        dx, dw, db = mod.backward(
            x,
            w,
            targets,
            bias,
            temperature,
            softcap,
            lse,
            ent if g_H is not None else None,
            g_lp.contiguous(),
            None if g_H is None else g_H.contiguous(),
            need_dx=need_dx,
            need_dw=need_dw,
            need_db=need_db,
        )
        # kept in the compute dtype like the one-pass gradients (_run): the op's outputs have one dtype
        dx, dw, db = (None if t is None else t.to(cdt) for t in (dx, dw, db))
    return loss, metrics, dx, dw, db


# --------------------------------------------------------------------------------------------------
# Custom op (torch.compile) and autograd: backward scales the stored gradients
# --------------------------------------------------------------------------------------------------


# process groups (``stats_group``) cross the op boundary by name; this process's groups by name
_GROUPS: dict = {}


@torch.compiler.assume_constant_result  # torch.compile: a trace-time constant (the config is static)
def _cfg_to_json(cfg: PolicyLossConfig) -> str:
    out = {}
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        if isinstance(val, (torch.Tensor, torch.Generator)):
            continue  # tensors travel as op arguments; the generator's draw is made before the op
        if dataclasses.is_dataclass(val):
            val = dataclasses.asdict(val)
        elif f.name == "stats_group" and val is not None:
            name = getattr(val, "group_name", None) or f"group-{id(val)}"
            _GROUPS[name] = val
            val = {"group": name}
        out[f.name] = val
    return json.dumps(out, sort_keys=True)


def _cfg_from_json(text: str, normalisers: Sequence[Optional[Tensor]] = (None, None, None)) -> PolicyLossConfig:
    kwargs = json.loads(text)
    if isinstance(kwargs.get("stats_group"), dict):
        kwargs["stats_group"] = _GROUPS[kwargs["stats_group"]["group"]]
    for name, t in zip(("global_num_tokens", "global_num_seqs", "norm_len"), normalisers):
        if t is not None:
            kwargs[name] = t
    return PolicyLossConfig(**kwargs)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _one_pass_impl(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    keys: Optional[Tensor],
    n_tok: Optional[Tensor],
    n_seq: Optional[Tensor],
    norm_len: Optional[Tensor],
    rollout_logp: Optional[Tensor],
    rollout_is_weights: Optional[Tensor],
    temperature: float,
    temp_vec: Optional[Tensor],
    softcap: Optional[float],
    cfg_json: str,
    backend: str,
    budget: int,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    want_entropy: bool,
    check_inputs: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = _cfg_from_json(cfg_json, (n_tok, n_seq, norm_len))
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    head = TokenHead(
        old_logp,
        advantages,
        mask,
        ref_logp,
        cu_seqlens,
        cfg,
        want_entropy,
        cdt,
        check_inputs,
        rollout_logp=rollout_logp,
        rollout_is_weights=rollout_is_weights,
    )
    n, h = x.shape
    seq_len = cu_host = None
    if head.kind == "sequence":
        if cu_seqlens is not None:
            cu_host = [int(c) for c in cu_seqlens.tolist()]  # one small host read (packed sequence modes)
        else:
            seq_len = head.seg.T
    pln = plan(n, h, w.shape[0], x.dtype, cfg, "one_pass", budget, seq_len, cu_host)
    log.debug("fusedrl fused_policy_loss: schedule %s (%s)", pln.schedule, pln.reason)
    if temp_vec is not None:
        temperature = temp_vec  # per-token temperatures (fp32 [N])
    want_entropy = want_entropy or head.needs_entropy
    args = (x, w, targets, bias, head, temperature, softcap, backend, keys, need_dx, need_dw, need_db, want_entropy)
    if pln.schedule == "two_pass":
        loss, metrics, dx, dw, db = _run_two_pass(*args)
    else:
        loss, metrics, dx, dw, db = _run(
            x, w, targets, bias, head, pln, temperature, softcap, backend, keys, need_dx, need_dw, need_db, want_entropy
        )
    names = metric_names(cfg, want_entropy, ref_logp is not None)
    mvec = torch.stack([metrics[k].float() for k in names])
    return (
        loss.detach(),
        mvec,
        dx if dx is not None else _empty(x),
        dw if dw is not None else _empty(w),
        db if db is not None else _empty(x if bias is None else bias),
    )


_one_pass_op = torch.library.custom_op("fusedrl::policy_loss_one_pass", mutates_args=())(_one_pass_impl)


@_one_pass_op.register_fake
def _(
    x,
    w,
    targets,
    bias,
    old_logp,
    advantages,
    mask,
    ref_logp,
    cu_seqlens,
    keys,
    n_tok,
    n_seq,
    norm_len,
    rollout_logp,
    rollout_is_weights,
    temperature,
    temp_vec,
    softcap,
    cfg_json,
    backend,
    budget,
    need_dx,
    need_dw,
    need_db,
    want_entropy,
    check_inputs,
):
    m = len(metric_names(_cfg_from_json(cfg_json), want_entropy, ref_logp is not None))
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        x.new_empty((), dtype=cdt),
        x.new_empty(m, dtype=torch.float32),
        x.new_empty(x.shape, dtype=cdt) if need_dx else _empty(x),
        w.new_empty(w.shape, dtype=cdt) if need_dw else _empty(w),
        bias.new_empty(bias.shape, dtype=cdt)
        if (need_db and bias is not None)
        else _empty(x if bias is None else bias),
    )


_ARGS = tuple(inspect.signature(_one_pass_impl).parameters)
_NEED = _ARGS.index("need_dx")


def _setup(ctx, inputs, output):
    _, _, dx, dw, db = output
    ctx.save_for_backward(dx, dw, db)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (inputs[0], inputs[1], inputs[3]))
    ctx.formed = inputs[_NEED : _NEED + 3]  # need_dx, need_dw, need_db: which gradients the forward formed
    ctx.mark_non_differentiable(output[1], dx, dw, db)


def _scaled(t: Tensor, g: Tensor, dtype: torch.dtype, unit: bool) -> Tensor:
    """``g * t`` in ``t``'s (compute) dtype, rounded once to ``dtype``. One pass: the product is computed in
    fp32 and written to the 16-bit output (``g.to(dtype) * t`` would round g: a 2^16 GradScaler scale is
    inf in fp16, and 1/3 is off by 0.2% in bf16, a bias on every gradient)."""
    if unit:
        return t if t.dtype == dtype else t.to(dtype)
    g = g.to(t.dtype)
    if t.dtype == dtype:
        return t * g
    if torch.compiler.is_compiling():
        return (t * g).to(dtype)  # fused by the compiler
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    return torch.mul(t, g, out=out)


def _backward(ctx, g_loss, g_metrics, g_dx, g_dw, g_db):
    """The gradients were formed in the forward (in the compute dtype): scale them by the incoming scalar
    gradient and round once to the inputs' dtypes."""
    # an upstream gradient of exactly 1 (loss.backward()) skips the multiply; the check is free on CPU only
    # (a GPU value check would synchronise, and the multiply there is cheap)
    unit = (
        type(g_loss) is torch.Tensor
        and not torch.compiler.is_compiling()
        and g_loss.device.type == "cpu"
        and bool(g_loss == 1)
    )  # traced backwards (fake / functional tensors) always multiply
    grads = []
    for t, dtype, formed, wanted in zip(
        ctx.saved_tensors, ctx.dtypes, ctx.formed, (ctx.needs_input_grad[i] for i in (0, 1, 3))
    ):
        grads.append(_scaled(t, g_loss, dtype, unit) if (formed and wanted) else None)
    gx, gw, gb = grads
    return (gx, gw, None, gb) + (None,) * (len(_ARGS) - 4)


_one_pass_op.register_autograd(_backward, setup_context=_setup)


def one_pass_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor],
    bias: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    temperature,
    softcap: Optional[float],
    cfg: PolicyLossConfig,
    backend: str,
    budget: int,
    want_entropy: bool,
    check_inputs: bool = False,
    rollout_logp: Optional[Tensor] = None,
    rollout_is_weights: Optional[Tensor] = None,
):
    """The one-pass (or two-pass) schedule as one differentiable call. Inputs are validated by the
    caller (``fused_policy_loss``); ``targets`` already hold 0 at masked positions. Returns
    ``(loss, metrics)`` as ``policy_loss``."""
    x = hidden.reshape(-1, hidden.shape[-1])
    grad_on = torch.is_grad_enabled()
    need_dx = grad_on and hidden.requires_grad
    need_dw = grad_on and weight.requires_grad
    need_db = grad_on and bias is not None and bias.requires_grad
    keys = None
    if cfg.loss_mode == "clip_cov":  # the same draw policy_loss makes (same generator -> same picks)
        keys = _random_keys(old_logp.reshape(-1), cfg.generator)
    norms = []
    for name in ("global_num_tokens", "global_num_seqs", "norm_len"):
        val = getattr(cfg, name)
        norms.append(val if isinstance(val, torch.Tensor) else None)
    loss, mvec, _, _, _ = _one_pass_op(
        x.contiguous(),
        weight.contiguous(),
        targets.reshape(-1).long().contiguous(),
        None if bias is None else bias.contiguous(),
        old_logp,
        advantages,
        mask,
        ref_logp,
        cu_seqlens,
        keys,
        norms[0],
        norms[1],
        norms[2],
        rollout_logp,
        rollout_is_weights,
        *_split_temperature(temperature),
        None if softcap is None else float(softcap),
        _cfg_to_json(cfg),
        backend,
        int(budget),
        need_dx,
        need_dw,
        need_db,
        bool(want_entropy),
        bool(check_inputs),
    )
    names = metric_names(cfg, want_entropy or cfg.top_entropy_quantile < 1, ref_logp is not None)
    return loss, {k: mvec[i] for i, k in enumerate(names)}


def auto_takes_one_pass(
    hidden: Tensor, weight: Tensor, targets: Tensor, cu_seqlens: Optional[Tensor], cfg: PolicyLossConfig, budget: int
) -> bool:
    """``schedule="auto"``: does the one-pass schedule fit (workspace, and whole sequences for sequence
    modes)? Packed sequence modes read ``cu_seqlens`` on the host (free when it lives on the CPU); under
    ``torch.compile`` they take the recompute schedule instead."""
    n, h, v = targets.numel(), hidden.shape[-1], weight.shape[0]
    seq_len = cu_host = None
    if head_kind(cfg) == "sequence":
        if cu_seqlens is None:
            seq_len = targets.shape[-1] if targets.dim() == 2 else n
        elif torch.compiler.is_compiling():
            return False
        else:
            cu_host = [int(c) for c in cu_seqlens.tolist()]
    pln = plan(n, h, v, hidden.dtype, cfg, "auto", budget, seq_len, cu_host)
    if pln.schedule == "recompute":
        log.debug("fusedrl fused_policy_loss: schedule recompute (%s)", pln.reason)
    return pln.schedule != "recompute"


def choose(schedule: str, cfg: PolicyLossConfig, backend: str, process_group, need_grad: bool) -> str:
    """The schedule family before sizing: ``recompute`` where the one-pass schedule does not apply."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "auto":
        env = os.environ.get(SCHEDULE_ENV, "").strip().lower()
        if env and env != "auto":
            if env not in SCHEDULES:
                raise ValueError(f"{SCHEDULE_ENV} must be one of {SCHEDULES}, got {env!r}")
            schedule = env
    if schedule == "recompute":
        return "recompute"
    why = None
    if process_group is not None:
        why = "vocab-parallel (process_group) runs the recompute schedule"
    elif backend == "reference":
        why = "the reference backend is eager autograd"
    if why is not None:
        if schedule == "one_pass":
            raise ValueError(f"schedule='one_pass' is not available here: {why}")
        return "recompute"
    if schedule == "auto" and not need_grad:
        return "recompute"  # forward only: the core op's scoring pass is already one GEMM
    return schedule
