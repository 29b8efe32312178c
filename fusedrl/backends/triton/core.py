"""The triton backend's launchers: ``forward`` / ``backward`` over hidden states and weight, and the same
over given logits (the backend contract, :class:`fusedrl.backends.base.Backend`). Kernels are in
``kernels.py``; block configs and budgets in ``config.py``; docs/backends.md ("triton") explains the
schedule (vocabulary splits, the deterministic du + GEMM backward, gradient filtering, the atomic path).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..base import check_temperature
from ..device import launches_on_first_arg_device
from . import config as C
from . import kernels as K
from .runtime import AUTOTUNE, INTERPRET, MIB, cdiv

Tensor = torch.Tensor


def check_dtype(t: Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend supports float32/float16/bfloat16 inputs, got {t.dtype}")


class Temp(NamedTuple):
    """A validated ``temperature`` as the kernels take it: the scalar 1/T (1.0 with per-token T) and
    the per-token 1/T (fp32 [N]) or None."""

    inv: float
    inv_vec: Optional[Tensor]


def check_temp(temperature, n: int, device: torch.device, where: str) -> Temp:
    """The backend contract's ``temperature`` (a float > 0, or one temperature per row: a 1-D real
    tensor of length ``n`` on ``device``; ValueError naming ``temperature`` otherwise) as a :class:`Temp`.
    Per-token 1/T is formed once per call, rounded once from fp64, as the scalar path's Python
    ``1.0 / T`` is: an all-equal vector of an fp32-exact T gives the scalar path's bits."""
    if isinstance(temperature, Temp):
        return temperature
    return inv_temp(*check_temperature(temperature, n, device, f"triton backend {where}"))


def inv_temp(t: float, vec: Optional[Tensor]) -> Temp:
    """:class:`Temp` of a checked ``(scalar T, per-token fp32 T or None)``."""
    if vec is None:
        return Temp(1.0 / t, None)
    return Temp(1.0, (1.0 / vec.double()).float())


def cap_value(softcap: Optional[float]) -> float:
    return float(softcap) if softcap is not None else 1.0


def _launch_fwd(
    x, w, bias, targets, n, v, h, vocab_start, temperature, softcap, return_entropy, is_logits, opts, dh=False
):
    """(lse, zt, ent or None), and sq [2, N] appended with ``dh`` (the entropy change's sums; the
    entropy is then always computed)."""
    dev = x.device
    cfg = C.block_config(dev, opts, x.dtype)
    bn, bv, bh, nw, ns = cfg["fwd"]
    tp = check_temp(temperature, n, dev, "logits_forward" if is_logits else "forward")
    return_entropy = bool(return_entropy) or dh
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    zt = torch.zeros(n, dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev) if return_entropy else None
    sq = torch.empty(2, n, dtype=torch.float32, device=dev) if dh else None
    out = (lse, zt, ent, sq) if dh else (lse, zt, ent)
    if n == 0:
        return out
    ntb, nvb = cdiv(n, bn), cdiv(v, bv)
    splits = opts.get("vocab_splits")
    if not splits:  # enough programs for ~4 waves when N is small; 1 split once N fills the GPU
        splits = cdiv(4 * C.num_sms(dev), ntb)
    splits = max(1, min(int(splits), nvb))
    v_per = cdiv(nvb, splits) * bv
    splits = cdiv(v, v_per)
    if splits > 1:
        part = torch.empty(5 if dh else 3, splits, n, dtype=torch.float32, device=dev)
        pm, ps, pb = part[0], part[1], part[2]
        ps2, pb2 = (part[3], part[4]) if dh else (lse, lse)
    else:
        pm = ps = pb = ps2 = pb2 = lse
    args = (
        x,
        w if w is not None else x,
        bias if bias is not None else lse,
        targets,
        tp.inv_vec if tp.inv_vec is not None else lse,
        lse,
        ent if ent is not None else lse,
        zt,
        sq if sq is not None else lse,
        pm,
        ps,
        pb,
        ps2,
        pb2,
        n,
        v,
        h,
        int(vocab_start),
        v_per,
        splits,
        x.stride(0),
        w.stride(0) if w is not None else 0,
        tp.inv,
        cap_value(softcap),
    )
    meta = dict(
        BLOCK_GROUP=cfg["group"],
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_ENTROPY=bool(return_entropy),
        HAS_SPLITS=splits > 1,
        HAS_TEMP_VEC=tp.inv_vec is not None,
        IS_LOGITS=is_logits,
        IS_FP32=x.dtype == torch.float32,
        IS_IEEE=C.is_ieee(x, cfg),
        IS_INTERPRET=INTERPRET,
        HAS_ENTROPY_CHANGE=dh,
    )
    if AUTOTUNE:
        grid = lambda META: (cdiv(n, META["BLOCK_N"]) * splits,)  # noqa: E731
        C.tuned("fwd", dev, x.dtype == torch.float32)[grid](*args, IS_EVEN_H=False, **meta)
    else:
        K.fwd_kernel[(ntb * splits,)](
            *args, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, IS_EVEN_H=(h % bh == 0), num_warps=nw, num_stages=ns, **meta
        )
    if splits > 1:
        mb = 64 if INTERPRET else 256
        K.merge_kernel[(cdiv(n, mb),)](
            pm,
            ps,
            pb,
            ps2,
            pb2,
            lse,
            ent if ent is not None else lse,
            sq if sq is not None else lse,
            n,
            splits,
            BLOCK_N=mb,
            HAS_ENTROPY=bool(return_entropy),
            HAS_ENTROPY_CHANGE=dh,
        )
    return out


@launches_on_first_arg_device
def forward(
    x, w, targets, bias, temperature, softcap, return_entropy, vocab_start=0, return_entropy_change=False, **opts
):
    """(lse, zt, ent|None) over the local vocabulary shard, and the entropy change's sums ``sq [2, N]``
    appended with ``return_entropy_change`` (:meth:`fusedrl.backends.base.Backend.forward`); see the
    module docstring."""
    check_dtype(x)
    x, w, targets = x.contiguous(), w.contiguous(), targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, h = x.shape
    return _launch_fwd(
        x,
        w,
        bias,
        targets,
        n,
        w.shape[0],
        h,
        vocab_start,
        temperature,
        softcap,
        return_entropy,
        False,
        opts,
        bool(return_entropy_change),
    )


@launches_on_first_arg_device
def logits_forward(logits, targets, temperature, softcap, return_entropy, return_entropy_change=False, **opts):
    """:func:`forward` over given logits ``[N, V]``."""
    check_dtype(logits)
    logits, targets = logits.contiguous(), targets.contiguous()
    n, v = logits.shape
    dh = bool(return_entropy_change)
    return _launch_fwd(logits, None, None, targets, n, v, 0, 0, temperature, softcap, return_entropy, True, opts, dh)


def _launch_du(
    x,
    w,
    bias,
    targets,
    lse,
    ent,
    g_lp,
    g_H,
    du,
    flags,
    db_part,
    n0,
    n_rows,
    v0,
    n_cols,
    h,
    vocab_start,
    temperature,
    softcap,
    eps,
    is_logits,
    cfg,
):
    bn, bv, bh, nw, ns = cfg["du"]
    # per-token 1/T is indexed by global row (n0 + local row): the full [N] vector for every chunk
    tp = check_temp(temperature, x.shape[0], x.device, "logits_backward" if is_logits else "backward")
    grid = (cdiv(n_rows, bn) * cdiv(n_cols, bv),)
    dummy = lse
    args = (
        x,
        w if w is not None else x,
        bias if bias is not None else dummy,
        targets,
        tp.inv_vec if tp.inv_vec is not None else dummy,
        lse,
        ent if ent is not None else dummy,
        g_lp,
        g_H if g_H is not None else dummy,
        du,
        flags if flags is not None else dummy,
        db_part if db_part is not None else dummy,
        n0,
        n_rows,
        v0,
        n_cols,
        h,
        int(vocab_start),
        x.stride(0),
        w.stride(0) if w is not None else 0,
        du.stride(0),
        flags.stride(0) if flags is not None else 0,
        tp.inv,
        cap_value(softcap),
        float(eps),
    )
    meta = dict(
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_GROUP=cfg["group"],
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_ENTROPY=g_H is not None,
        HAS_FILTER=flags is not None,
        HAS_DB=db_part is not None,
        HAS_TEMP_VEC=tp.inv_vec is not None,
        IS_LOGITS=is_logits,
        IS_FP32=x.dtype == torch.float32,
        IS_IEEE=C.is_ieee(x, cfg),
        IS_INTERPRET=INTERPRET,
    )
    if AUTOTUNE and not is_logits:
        C.tuned("du", x.device, x.dtype == torch.float32)[grid](*args, IS_EVEN_H=False, **meta)
    else:
        K.du_kernel[grid](
            *args, BLOCK_H=bh, IS_EVEN_H=(h % bh == 0) if not is_logits else True, num_warps=nw, num_stages=ns, **meta
        )


def _live_lists(flags: Tensor) -> tuple[Tensor, Tensor]:
    """(LIVE, LIVE_CNT) of a [flag rows, flag cols] int8 tile-flag view (any strides): per row, the
    indices of its live columns in ascending order first (int32, [rows, cols]), and their count."""
    live = flags != 0
    cnt = live.sum(1, dtype=torch.int32)
    idx = torch.sort((~live).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


def _launch_gemm(a, a_strides, b, c, live, flag_blocks, m, k, d, cfg, acc=False, lo=None, lo_in=False, lo_out=False):
    """c[:m, :d] (+)= A @ B, A given as (tensor, (stride_m, stride_k)); live: (LIVE, LIVE_CNT) of
    ``_live_lists`` (A block-sparse in flag_blocks tiles) or None (dense); see K.gemm_kernel."""
    if m == 0 or d == 0:
        return
    bm, bk, bd, nw, ns = cfg["gemm"]
    meta = dict(
        BLOCK_M=bm,
        BLOCK_K=bk,
        BLOCK_FLAG_M=flag_blocks[0],
        BLOCK_FLAG_K=flag_blocks[1],
        BLOCK_GROUP=cfg["group"],
        HAS_FLAGS=live is not None,
        HAS_ACC=acc,
        HAS_LO_IN=lo_in,
        HAS_LO_OUT=lo_out,
        IS_FP32=a.dtype == torch.float32,
        IS_IEEE=C.is_ieee(a, cfg),
        IS_INTERPRET=INTERPRET,
    )
    idx, cnt = live if live is not None else (c, c)
    args = (
        a,
        b,
        c,
        lo if lo is not None else c,
        idx,
        cnt,
        m,
        k,
        d,
        a_strides[0],
        a_strides[1],
        b.stride(0),
        b.stride(1),
        c.stride(0),
        idx.stride(0) if live is not None else 0,
    )
    if AUTOTUNE:
        grid = lambda META: (cdiv(m, bm) * cdiv(d, META["BLOCK_D"]),)  # noqa: E731
        C.tuned("gemm", a.device, a.dtype == torch.float32)[grid](*args, **meta)
    else:
        # the list-driven (filtered) loop spends one pipeline stage on the tile-index load: one more
        # stage keeps as many operand buffers in flight (sm_90: 3 instead of 2 at the pinned 4)
        stages = ns + 1 if live is not None else ns
        K.gemm_kernel[(cdiv(m, bm) * cdiv(d, bd),)](*args, BLOCK_D=bd, num_warps=nw, num_stages=stages, **meta)


def _zero_grads(x, w, bias, need_dx, need_dw, need_db):
    return (
        torch.zeros_like(x) if need_dx else None,
        torch.zeros_like(w) if need_dw else None,
        torch.zeros_like(bias) if need_db else None,
    )


@launches_on_first_arg_device
def backward(
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
    vocab_start=0,
    need_dx=True,
    need_dw=True,
    need_db=True,
    **opts,
):
    """(dx, dw, db). opts: deterministic (True), grad_filter_eps (0.0 = exact),
    memory_budget_mb (default: from the free device memory, see default_budget), workspace_mb
    (cap of the workspace), fp32_precision ("tf32x3" | "ieee"),
    min_vocab_chunk (1024), triton_config (dict overriding the pinned blocks; tuning/testing)."""
    check_dtype(x)
    x, w, targets = x.contiguous(), w.contiguous(), targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, h = x.shape
    temperature = check_temp(temperature, n, x.device, "backward")
    need_db = bool(need_db and bias is not None)
    if n == 0 or not (need_dx or need_dw or need_db):
        return _zero_grads(x, w, bias, need_dx, need_dw, need_db)
    lse = lse.float().contiguous()
    g_lp = g_lp.float().contiguous()
    if g_H is not None:
        g_H = g_H.float().contiguous()
        ent = ent.float().contiguous()
    eps = float(opts.get("grad_filter_eps") or 0.0)
    cfg = C.block_config(x.device, opts, x.dtype)
    args = (
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
        vocab_start,
        need_dx,
        need_dw,
        need_db,
        eps,
        cfg,
        opts,
    )
    if opts.get("deterministic", True):
        return _backward_workspace(*args)
    return _backward_atomic(*args)


def _plan(n, h, v, x_dtype, need_dx, vocab_pass, cfg, opts, device):
    """Chunking of the deterministic backward under the memory budget (see the module docstring).

    Returns (vc, single, nc): vocab chunk width of the vocab pass (None if no vocab pass), whether
    dx is accumulated in that pass (`single`: 4 GEMMs), token chunk of the dx pass (None if none).
    Budget: opts memory_budget_mb, default :func:`default_budget` (from the free device memory).
    The workspace is kept under opts workspace_mb when given (default:
    the budget on a CUDA device, 64 MiB elsewhere) unless a narrower one would leave the GEMMs with
    less than ~2 waves of programs. Within the budget the vocab chunks are as wide as possible: the
    dx hi/lo accumulation re-reads dx once per chunk.
    """
    bn, bv = cfg["du"][0], cfg["du"][1]
    bm, bd = cfg["gemm"][0], cfg["gemm"][2]
    esz = torch.empty((), dtype=x_dtype).element_size()
    n_sms, free, _ = C.device_facts(device)
    budget = opts.get("memory_budget_mb")
    budget = C.default_budget(n, free, opts.get("budget_cap_mb")) if budget is None else float(budget) * MIB
    ws_mb = opts.get("workspace_mb")
    ws_cap = float(ws_mb) * MIB if ws_mb is not None else (budget if free is not None else 64.0 * MIB)
    vc_min = int(opts.get("min_vocab_chunk", bv if INTERPRET else 1024))
    n_pad, v_pad = cdiv(n, bn) * bn, cdiv(v, bv) * bv
    lo_bytes = 0 if x_dtype == torch.float32 else 2 * n * h  # bf16 residual of the dx accumulation
    want_rows = cdiv(2 * n_sms, cdiv(h, bd)) * bm  # GEMM M-extent for ~2 waves

    def chunk(limit, line_bytes, block, full):
        """widest multiple of `block` (>= block, <= full) whose lines of line_bytes fit `limit`."""
        limit = max(min(ws_cap, limit), min(limit, want_rows * line_bytes))
        return min(full, max(block, int(limit // line_bytes) // block * block))

    vc, single, nc = None, False, None
    if need_dx:  # can dx be accumulated across vocab chunks within the budget?
        if n_pad * v_pad * esz <= min(ws_cap, budget):
            vc, single = v_pad, True  # one chunk: dx complete in one GEMM, no accumulator
        else:
            vc = chunk(budget - lo_bytes, n_pad * esz, bv, v_pad)
            single = vc >= vc_min and lo_bytes + n_pad * vc * esz <= budget
        if not single:  # lean: token chunks of full vocabulary rows give complete dx rows
            vc = None
            nc = chunk(budget, v_pad * esz, bn, n_pad)
    if vocab_pass and vc is None:
        vc = chunk(budget, n_pad * esz, bv, v_pad)
    return vc, single, nc


def _backward_workspace(
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
    vocab_start,
    need_dx,
    need_dw,
    need_db,
    eps,
    cfg,
    opts,
):
    n, h = x.shape
    v = w.shape[0]
    dev = x.device
    bn, bv = cfg["du"][0], cfg["du"][1]
    bm, bk = cfg["gemm"][0], cfg["gemm"][1]
    assert bn % bm == 0 and bv % bm == 0 and bn % bk == 0 and bv % bk == 0, "gemm blocks must divide du blocks"
    filt = eps > 0.0
    vc, single, nc = _plan(n, h, v, x.dtype, need_dx, need_dw or need_db, cfg, opts, dev)
    vocab_pass = vc is not None

    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty_like(w) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    du_args = (x, w, bias, targets, lse, ent, g_lp, g_H)
    tail = (h, vocab_start, temperature, softcap, eps, False, cfg)

    # ---- vocab-chunk pass: dW / db complete per chunk; dx accumulated when `single` ----
    if vocab_pass:
        ntb = cdiv(n, bn)
        nchunks = cdiv(v, vc)
        ws = torch.empty(n, vc, dtype=x.dtype, device=dev)
        nvbc = cdiv(vc, bv)
        flags = torch.empty(ntb, nvbc, dtype=torch.int8, device=dev) if filt else None
        db_part = torch.empty(ntb, vc, dtype=torch.float32, device=dev) if need_db else None
        use_lo = single and nchunks > 1 and x.dtype != torch.float32
        lo = torch.empty(n, h, dtype=torch.bfloat16, device=dev) if use_lo else None
        for ci in range(nchunks):
            v0 = ci * vc
            vcc = min(vc, v - v0)
            _launch_du(*du_args, ws, flags, db_part, 0, n, v0, vcc, *tail)
            if need_db:
                db[v0 : v0 + vcc] = db_part[:, :vcc].sum(0).to(db.dtype)
            # live-tile lists over this chunk's flag tiles (columns past vcc hold stale flags)
            f = flags[:, : cdiv(vcc, bv)] if filt else None
            if need_dw:  # dW[chunk] = du^T @ x  (A = du^T: m = vocab, k = tokens); complete, cast once
                _launch_gemm(
                    ws,
                    (1, ws.stride(0)),
                    x,
                    dw[v0 : v0 + vcc],
                    _live_lists(f.t()) if filt else None,
                    (bv, bn),
                    vcc,
                    n,
                    h,
                    cfg,
                )
            if need_dx and single:  # dx (+)= du @ W[chunk]  (m = tokens, k = vocab)
                _launch_gemm(
                    ws,
                    (ws.stride(0), 1),
                    w[v0 : v0 + vcc],
                    dx,
                    _live_lists(f) if filt else None,
                    (bn, bv),
                    n,
                    vcc,
                    h,
                    cfg,
                    acc=ci > 0,
                    lo=lo,
                    lo_in=use_lo and ci > 0,
                    lo_out=use_lo and ci < nchunks - 1,
                )
        del ws, lo

    # ---- token-chunk pass (lean schedule): complete dx rows, no accumulator ----
    if need_dx and not single:
        nvb = cdiv(v, bv)
        ws = torch.empty(nc, v, dtype=x.dtype, device=dev)
        flags = torch.empty(cdiv(nc, bn), nvb, dtype=torch.int8, device=dev) if filt else None
        for n0 in range(0, n, nc):
            ncc = min(nc, n - n0)
            _launch_du(*du_args, ws, flags, None, n0, ncc, 0, v, *tail)
            live = _live_lists(flags[: cdiv(ncc, bn)]) if filt else None
            _launch_gemm(ws, (ws.stride(0), 1), w, dx[n0 : n0 + ncc], live, (bn, bv), ncc, v, h, cfg)
    return dx, dw, db


def _backward_atomic(
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
    vocab_start,
    need_dx,
    need_dw,
    need_db,
    eps,
    cfg,
    opts,
):
    n, h = x.shape
    v = w.shape[0]
    dev = x.device
    bn, bv, bh, bd, nw, ns = cfg["atomic"]
    f32 = torch.float32
    dx = torch.zeros(n, h, dtype=f32, device=dev) if need_dx else None
    dw = torch.zeros(v, h, dtype=f32, device=dev) if need_dw else None
    db = torch.zeros(v, dtype=f32, device=dev) if need_db else None
    dummy = lse
    tp = check_temp(temperature, n, dev, "backward")
    grid = (cdiv(n, bn) * cdiv(v, bv),)
    K.bwd_atomic_kernel[grid](
        x,
        w,
        bias if bias is not None else dummy,
        targets,
        tp.inv_vec if tp.inv_vec is not None else dummy,
        lse,
        ent if ent is not None else dummy,
        g_lp,
        g_H if g_H is not None else dummy,
        dx if dx is not None else dummy,
        dw if dw is not None else dummy,
        db if db is not None else dummy,
        n,
        v,
        h,
        int(vocab_start),
        x.stride(0),
        w.stride(0),
        tp.inv,
        cap_value(softcap),
        float(eps),
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_H=bh,
        BLOCK_D=bd,
        BLOCK_GROUP=cfg["group"],
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_ENTROPY=g_H is not None,
        HAS_FILTER=eps > 0.0,
        HAS_DX=need_dx,
        HAS_DW=need_dw,
        HAS_DB=need_db,
        HAS_TEMP_VEC=tp.inv_vec is not None,
        IS_EVEN_H=(h % bh == 0),
        IS_FP32=x.dtype == torch.float32,
        IS_IEEE=C.is_ieee(x, cfg),
        IS_INTERPRET=INTERPRET,
        num_warps=nw,
        num_stages=ns,
    )
    return (
        dx.to(x.dtype) if need_dx else None,
        dw.to(w.dtype) if need_dw else None,
        db.to(bias.dtype) if need_db else None,
    )


@launches_on_first_arg_device
def logits_backward(logits, targets, temperature, softcap, lse, ent, g_lp, g_H, inplace=False, **opts):
    """dlogits [N, V] in logits.dtype (written into `logits` when inplace=True)."""
    check_dtype(logits)
    if inplace and not logits.is_contiguous():
        raise ValueError("logits_backward(inplace=True) needs contiguous logits")
    logits, targets = logits.contiguous(), targets.contiguous()
    n, v = logits.shape
    temperature = check_temp(temperature, n, logits.device, "logits_backward")
    out = logits if inplace else torch.empty_like(logits)
    if n == 0:
        return out
    lse = lse.float().contiguous()
    g_lp = g_lp.float().contiguous()
    if g_H is not None:
        g_H = g_H.float().contiguous()
        ent = ent.float().contiguous()
    cfg = C.block_config(logits.device, opts, logits.dtype)
    # each program loads its logits tile before storing dlogits to the same tile: safe in place
    _launch_du(
        logits,
        None,
        None,
        targets,
        lse,
        ent,
        g_lp,
        g_H,
        out,
        None,
        None,
        0,
        n,
        0,
        v,
        0,
        0,
        temperature,
        softcap,
        0.0,
        True,
        cfg,
    )
    return out
