"""The one-pass loop (three GEMMs, the gradients formed in the forward), the rank-k selection correction
of Clip-Cov / KL-Cov, and the two-pass form (scoring forward, then the backend's recompute backward) for
losses that need the whole batch first. docs/one-pass.md describes the schedule.

Per token chunk of ``Nc`` rows::

    U    = x_c @ W^T              GEMM 1 (input dtype in, fp32 [Nc, V] workspace out)
    row epilogue: M, S, B -> LSE, H, logp; head -> g_lp, g_H; du
    dx_c = du @ W                 GEMM 2 (fp32 out)
    dW  += du^T @ x_c             GEMM 3 (fp32 accumulator; a deferred plan keeps du of every token instead,
                                  and the op's backward runs GEMM 3 once)

The row epilogue is the backend's (``Backend.onepass_epilogue``: a fused Triton / CUDA kernel where the
backend has one for the loss config, else the torch backend's, which serves every config on every
device).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional, Union

import torch

from .. import _config
from ..backends import get_backend, torch_backend
from ..backends.base import EpilogueHead, entropy_change
from ..loss import TokenHead
from .cost import du_row_stride, ws_row_stride
from .gemm import addmm_f32_, gemm_logits, is_low, mm_f32
from .plan import Plan

Tensor = torch.Tensor


class Grads(NamedTuple):
    """What a schedule run returns: the loss, metrics and the gradients it formed (compute dtype; a deferred
    run's ``dw`` is the 16-bit du of every token, ``plan.defers_dw``)."""

    loss: Tensor
    metrics: dict[str, Tensor]
    dx: Optional[Tensor]
    dw: Optional[Tensor]
    db: Optional[Tensor]


def epilogue_for(backend: str, device: torch.device, dtype: torch.dtype, head: EpilogueHead):
    """The backend module whose row epilogue runs: ``backend``'s when it computes this head on this
    device and dtype, else the torch backend's (every config, every device)."""
    if backend not in ("torch", "reference"):
        mod = get_backend(backend, device)
        if mod.onepass_supports(head, device, dtype)[0]:
            return mod
    return torch_backend


_tls = threading.local()


def release_workspace() -> None:
    """Free the CPU workspace the one-pass schedule keeps between calls (this thread's)."""
    _tls.__dict__.pop("buf", None)


def buffers(device: torch.device, specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[Tensor]:
    """Uninitialised tensors of the given shapes. On CPU they are carved from one buffer kept between
    calls (per thread; the environment can turn this off, :func:`release_workspace` frees it): a fresh
    multi-GB allocation costs page faults worth about 10% of the GEMMs there. CUDA has torch's caching
    allocator."""
    if device.type != "cpu" or not _config.get("cpu_workspace_cache"):
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


def selection_rows(head: TokenHead, picked: Tensor, logp: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """Clip-Cov / KL-Cov: the rows to correct and their log-prob gradient change, or None. No host sync: the
    ``head.selection_bound()`` rows are the picked tokens plus unpicked filler whose change is exactly 0."""
    k = min(head.selection_bound(), picked.numel())
    if k == 0:
        return None
    idx = torch.topk(picked.to(torch.float32), k, sorted=False).indices  # picked first, then filler
    return idx, head.selection_delta(idx, logp[idx], picked[idx])


def speculation_rows(head: TokenHead, logp: Tensor, metrics: dict[str, Tensor]) -> Optional[tuple[Tensor, Tensor]]:
    """The speculative head (BAPO): the tokens whose branch the searched bounds (the evaluation's, read from its
    metrics: no second collective) change against the pass's and their gradient change, or None. One host
    read: the search's state and those tokens."""
    picks, bounds = head.speculative_picks(logp, int(metrics["bapo/search_steps"].item()))
    idx = picks.nonzero().reshape(-1)
    return (idx, head.speculative_delta(idx, logp[idx], bounds)) if idx.numel() else None


def correct_rows(
    idx: Tensor,
    dg: Tensor,
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    cdt: torch.dtype,
    dx: Optional[Tensor],
    dw32: Optional[Tensor],
    db32: Optional[Tensor],
    du_rows: Optional[Tensor] = None,
) -> None:
    """Rank-k correction: recompute the logit rows of tokens ``idx`` (compute dtype ``cdt``) and add
    ``du_corr = dg (onehot - p) dz/du`` (a change ``dg`` of their log-prob gradients) into dx, dW, db, or
    into those tokens' rows of ``du_rows`` (a deferred run's du of every token, ``[N, V]`` 16-bit) in
    place of dW."""
    k = idx.numel()
    xs = x.index_select(0, idx)
    u = torch.empty(k, w.shape[0], dtype=cdt, device=x.device)
    gemm_logits(xs, w, bias, u, 1.0)
    # du_corr = dg (onehot - p) dz/du: the epilogue's du with g_lp = dg and no entropy term
    tr = temperature[idx].to(cdt) if isinstance(temperature, Tensor) else temperature
    st = torch_backend.onepass_stats(u, targets[idx], tr, softcap, False, torch.empty_like(u))
    st = st._replace(s=torch.exp(st.lse - st.m), log_s=st.lse - st.m)  # exactly the pass's LSE
    du = torch_backend.onepass_du(u, st, targets[idx], tr, softcap, dg.to(cdt), None)
    dug = du.to(x.dtype) if is_low(x) else du
    if dx is not None:
        corr = torch.empty(k, x.shape[1], dtype=cdt, device=x.device)
        mm_f32(dug, w, corr)
        dx.index_add_(0, idx, corr)
    if dw32 is not None:
        addmm_f32_(dw32, dug.t(), xs)
    if du_rows is not None:  # the rows' du + du_corr, summed in fp32 and rounded once more
        du_rows.index_copy_(0, idx, (du_rows.index_select(0, idx).to(cdt) + du).to(du_rows.dtype))
    if db32 is not None:
        db32 += du.sum(0)


def run_one_pass(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    head: TokenHead,
    pln: Plan,
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    backend: str,
    keys: Optional[Tensor],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    want_entropy: bool,
    *,
    timer: Optional[Callable[[str], None]] = None,
) -> Grads:
    """The one-pass loop over ``pln.chunks`` (gradients None when not asked). GEMM 3 runs once per
    ``pln.ring_rows`` rows of du (a ring of whole chunks; every chunk when it is no larger than one), or,
    for a deferred plan (``pln.deferred``, ``plan.defers_dw``), not here: ``Grads.dw`` is then the 16-bit
    du of every token (``[N, du_row_stride(V)]``, padded rows) and the op's backward forms dW from it.

    ``timer``: called with a stage's name (``gemm1``, ``epilogue``, ``gemm2``, ``db``, ``gemm3``,
    ``selection``) as the stage begins and with ``end`` after the last one (stage timing by the
    benchmark; None, the default, costs one comparison per stage)."""
    n, h = x.shape
    v = w.shape[0]
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device
    low = is_low(x)
    grads = need_dx or need_dw or need_db
    need_ent = want_entropy or head.entropy_has_grad
    speculative = head.kind == "speculative"  # BAPO: the surrogate in the pass, the clipped rows corrected after
    logp = torch.empty(n, dtype=cdt, device=dev)
    ent = torch.empty(n, dtype=cdt, device=dev) if need_ent else None
    # the gradients are formed and kept in the compute dtype (fp32 for 16-bit inputs) until the backward,
    # which scales them by the upstream gradient and rounds once to the input dtype (fusedrl.onepass.op)
    dx = torch.empty(n, h, dtype=cdt, device=dev) if need_dx else None
    dw32 = None
    db32 = torch.zeros(v, dtype=cdt, device=dev) if (need_db and bias is not None) else None
    # a kernel epilogue only where it computes this config (and gradients are formed: a forward alone
    # takes the torch statistics, which never differentiate the head)
    probe = EpilogueHead(head.kernel_codes(0, 0, need_ent) if grads else None, None, need_ent)
    emod = epilogue_for(backend, dev, x.dtype, probe)
    is_torch = emod is torch_backend
    rows = max(b - a for a, b, _ in pln.chunks) if pln.chunks else 0
    # deferred: the du of every token, returned (it outlives the call: not carved from the cached workspace)
    deferred = pln.deferred and need_dw and low
    du_all = torch.empty(n, du_row_stride(v), dtype=x.dtype, device=dev) if deferred else None
    if du_all is not None and du_all.shape[1] > v:
        du_all[:, v:].zero_()  # the rows' padding: returned by the op, so defined
    # the du ring: GEMM 3 over up to `ring` rows of du at once (16-bit: a ring of du16 chunks; fp32 / fp64:
    # the workspace itself, du staying where each chunk's logits were)
    grouped = need_dw and pln.ring_rows > rows and not deferred
    ring = pln.ring_rows if grouped else rows
    # the workspace's rows padded to 16 elements (any V): 16-byte aligned rows for the epilogues' vector loads;
    # the GEMMs write and read the row-strided view in place
    specs = [((rows if low else ring, ws_row_stride(v)), cdt)]
    if is_torch:
        specs += list((shape, cdt) for shape in torch_backend.onepass_scratch_shapes(rows, v))
    if low and grads and not deferred:
        specs.append(((ring, du_row_stride(v)), x.dtype))  # rows padded to 16 bytes (unaligned V)
    bufs = buffers(dev, specs)
    ws_flat = bufs[0]  # contiguous: the scratch of addmm's fallback in GEMM 3
    ws = ws_flat[:, :v]
    scratch = (bufs[1], bufs[2]) if is_torch else None
    ring16 = du_all[:, :v] if deferred else (bufs[-1][:, :v] if (low and grads) else None)
    du16 = None
    fill = g0 = 0  # rows of du in the ring, and the first token row they belong to

    def gemm3(dug: Tensor, xg: Tensor) -> None:
        nonlocal dw32
        if timer is not None:
            timer("gemm3")
        if dw32 is None:  # the first call writes the accumulator (no zero fill)
            dw32 = torch.empty(v, h, dtype=cdt, device=dev)
            mm_f32(dug.t(), xg, dw32)
        else:  # the workspace is free here: the scratch of addmm's mm + add_ fallback (its contiguous buffer)
            addmm_f32_(dw32, dug.t(), xg, tmp=ws_flat)

    # the torch epilogue takes 1/T folded into the small x operand; kernels apply T themselves
    per_token = isinstance(temperature, Tensor)
    fold = is_torch and softcap is None and not low and not per_token and temperature != 1.0
    scale = 1.0 / temperature if fold else 1.0
    # kernel epilogues store the fp32 du over U only where it is read: fp32 / fp64 inputs (GEMMs 2 and 3 read
    # it there) and the bias gradient's column sum; 16-bit inputs otherwise write du16 alone (4 bytes per
    # element less). db from du16 would round it; a column sum fused into the epilogue would need atomics
    # (nondeterministic) or per-block partials (as many bytes as the store it saves at one row per program)
    kernel_opts = {} if is_torch else dict(store_du32=not (low and ring16 is not None and db32 is None))
    for a, b, seqs in pln.chunks:
        nc = b - a
        if nc == 0:
            continue
        if grouped and fill and fill + nc > ring:  # the ring is full: GEMM 3 over its chunks
            gemm3(ring16[:fill] if low else ws[:fill], x[g0 : g0 + fill])
            fill = 0
        if fill == 0:
            g0 = a
        slot = slice(fill, fill + nc) if grouped else (slice(a, b) if deferred else slice(0, nc))
        du16 = ring16[slot] if ring16 is not None else None
        xc = x[a:b]
        if timer is not None:
            timer("gemm1")
        u = gemm_logits(xc, w, bias if is_torch else None, ws[:nc] if low else ws[slot], scale)
        if timer is not None:
            timer("epilogue")
        tc = targets[a:b]
        tr = temperature[a:b].to(cdt) if per_token else temperature

        def chunk_grads(lp, en, a=a, b=b, seqs=seqs):
            return head.grads(a, b, lp, en, seqs, speculative=speculative)

        ehead = EpilogueHead(
            None if is_torch else head.kernel_codes(a, b, need_ent), chunk_grads if grads else None, need_ent
        )
        opts = dict(scratch=(scratch[0][:nc], scratch[1][:nc]), prescaled=scale != 1.0) if is_torch else kernel_opts
        out = emod.onepass_epilogue(
            u,
            tc,
            None if is_torch else bias,
            tr,
            softcap,
            ehead,
            du16[:nc] if du16 is not None else None,
            **opts,
        )
        logp[a:b] = out.logp
        if ent is not None:
            ent[a:b] = out.ent
        if not grads:
            continue
        du = out.du  # the fp32 du (U, the torch epilogue's scratch), or du16 where a kernel stored it alone
        dug = du16[:nc] if du16 is not None else du
        if grouped and not low and du.data_ptr() != u.data_ptr():  # du in the torch epilogue's scratch
            dug = u.copy_(du)  # into its ring slot, before the next chunk's epilogue reuses the scratch
        if need_dx:
            if timer is not None:
                timer("gemm2")
            mm_f32(dug, w, dx[a:b])
        if db32 is not None:
            if timer is not None:
                timer("db")
            db32 += du.sum(0)
        if grouped:
            fill += nc
        elif need_dw and not deferred:
            gemm3(dug, xc)
    if grouped and fill:
        gemm3(ring16[:fill] if low else ws[:fill], x[g0 : g0 + fill])
    if timer is not None:
        timer("end")
    du_rows = ring16 if deferred else None
    del bufs, scratch, du16, ring16
    ws = ws_flat = None  # the buffers go before the evaluation and the selection correction
    if need_dw and dw32 is None and not deferred:  # no token at all
        dw32 = torch.zeros(v, h, dtype=cdt, device=dev)
    loss, metrics, picked = head.evaluate(logp, ent, keys)
    if grads and (picked is not None or speculative):
        if timer is not None:
            timer("selection")
        fix = selection_rows(head, picked, logp) if picked is not None else speculation_rows(head, logp, metrics)
        if fix is not None:
            correct_rows(*fix, x, w, targets, bias, temperature, softcap, cdt, dx, dw32 if need_dw else None, db32,
                         du_rows)  # fmt: skip
        if timer is not None:
            timer("end")
    return Grads(loss, metrics, dx, du_all if deferred else (dw32 if need_dw else None), db32)


def run_two_pass(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    head: TokenHead,
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    backend: str,
    keys: Optional[Tensor],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    want_entropy: bool,
    opts: dict,
) -> Grads:
    """Losses that need the whole batch first (and sequences that do not fit the workspace): a scoring
    forward (one GEMM), the head's gradients over the whole batch, then the backend's recompute backward
    (three GEMMs), all inside the forward."""
    mod = get_backend("torch" if backend == "reference" else backend, x.device)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    need_ent = want_entropy or head.entropy_has_grad
    dh = {"return_entropy_change": True} if head.needs_entropy_change else {}  # STEER exact: dH from this pass
    out = mod.forward(x, w, targets, bias, temperature, softcap, need_ent, **dh, **opts)
    lse, zt, ent = out[:3]
    logp = zt - lse
    if dh:
        head.provide("entropy_change", entropy_change(logp, ent, out[3]))
        ent = ent if need_ent else None  # computed for dH only
    loss, metrics, picked = head.evaluate(logp, ent, keys)
    dx = dw = db = None
    if need_dx or need_dw or need_db:
        g_lp, g_H = head.grads(0, x.shape[0], logp, ent, (0, head.seg.B))
        dx, dw, db = mod.backward(x, w, targets, bias, temperature, softcap, lse, ent if g_H is not None else None,
                                  g_lp.contiguous(), None if g_H is None else g_H.contiguous(), need_dx=need_dx,
                                  need_dw=need_dw, need_db=need_db, **opts)  # fmt: skip
        # kept in the compute dtype like the one-pass gradients: the op's outputs have one dtype
        dx, dw, db = (None if t is None else t.to(cdt) for t in (dx, dw, db))
        if picked is not None and head.kind == "selection":  # Clip-Cov / KL-Cov (the one-pass schedule's
            # out-of-memory fallback): the head gave the unselected terms, the rank-k correction the rest
            fix = selection_rows(head, picked, logp)
            if fix is not None:
                correct_rows(*fix, x, w, targets, bias, temperature, softcap, cdt, dx, dw, db)
    return Grads(loss, metrics, dx, dw, db)
