"""`torch` backend: token x vocab tiled eager PyTorch with recompute in backward.

Runs on any device torch runs on (the CPU default). Forward walks the vocabulary in tiles and keeps
per-token running statistics (max M, S = sum e^(z-M), B = sum (z-M) e^(z-M)) so only LSE and entropy
(8 bytes/token) survive; backward recomputes each tile's logits and applies the core math (docs/design.md).
Asked for the entropy change (``return_entropy_change``), the forward also keeps S2 = sum e^(2(z-M)) and
B2 = sum (z-M) e^(2(z-M)) (``fusedrl.backends.base.entropy_change``).
The tile size comes from a memory budget (``workspace_mb``, default 64 MiB), not a count.
Logits are computed in fp32 (fp64 for fp64 inputs) from upcast tiles: a bf16 GEMM output would
round the logits themselves to bf16, which is the precision loss fusedrl exists to avoid.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .base import workspace_bytes

Tensor = torch.Tensor

# fp32 temporaries alive per tile element at the peak of the backward (z, t/p, dz).
_TEMPS_PER_ELEM = 3


def is_available(device: torch.device) -> tuple[bool, str]:
    """Everywhere torch itself can run on ``device`` (so not on CUDA when torch has no usable GPU)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    return True, ""


DEFAULT_WORKSPACE_MB = 64.0


def _budget_bytes(workspace_mb: Optional[float] = None) -> int:
    return workspace_bytes(workspace_mb or DEFAULT_WORKSPACE_MB)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tile_plan(n: int, v: int, elem_bytes: int = 4, workspace_mb: Optional[float] = None) -> tuple[int, int]:
    """(token tile, vocab tile) whose fp32 temporaries fit the workspace budget (``workspace_mb``)."""
    elems = max(1, _budget_bytes(workspace_mb) // (elem_bytes * _TEMPS_PER_ELEM))
    vt = min(v, 8192, elems)
    nt = max(1, min(n, elems // vt))
    if nt == n:  # few tokens: widen the vocab tile instead
        vt = max(1, min(v, elems // max(n, 1)))
    return max(nt, 1), max(vt, 1)


def _rows(temperature, n0: int, n1: int, dtype: torch.dtype):
    """The temperature of rows n0:n1: the float, or that slice of the per-token tensor (in ``dtype``)."""
    if isinstance(temperature, torch.Tensor):
        return temperature[n0:n1].to(dtype)
    return temperature


def _col(v):
    """A per-row value broadcast over a [rows, cols] tile (a float stays a float)."""
    return v[:, None] if isinstance(v, torch.Tensor) else v


def _logits_tile(xc: Tensor, wc: Tensor, bc: Optional[Tensor], temperature, softcap: Optional[float]):
    """z = softcap(x w^T + b) / T for one tile, with the scale folded into the small x tile and the
    bias into the GEMM (no extra passes over the [tokens, vocab] tile). Also returns tanh(u/c), which
    the softcap backward needs, or None. ``temperature``: a float or this tile's per-row tensor."""
    if isinstance(temperature, torch.Tensor):  # per-row T cannot fold into the (per-column) bias
        u = torch.addmm(bc, xc, wc.t()) if bc is not None else xc @ wc.t()
        if softcap is None:
            return u.div_(temperature[:, None]), None
        t = u.div_(softcap).tanh_()
        return t * (softcap / temperature)[:, None], t
    k = temperature if softcap is None else softcap
    xs = xc / k if k != 1.0 else xc
    if bc is not None:
        u = torch.addmm(bc / k if k != 1.0 else bc, xs, wc.t())
    else:
        u = xs @ wc.t()
    if softcap is None:
        return u, None
    t = u.tanh_()
    return t * (softcap / temperature), t


def _target_in_tile(targets: Tensor, lo: int, width: int) -> tuple[Tensor, Tensor]:
    local = targets - lo
    hit = (local >= 0) & (local < width)
    return local.clamp(0, max(width - 1, 0)), hit


def _tile_stats(z: Tensor, need_b: bool, need_dh: bool = False):
    """Per-row max m, S = sum e^(z-m), B = sum (z-m) e^(z-m) of one tile, and with ``need_dh`` (which
    needs ``need_b``) S2 = sum e^(2(z-m)), B2 = sum (z-m) e^(2(z-m)) (else None). Overwrites z with z - m
    (with (z - m) e when B is formed)."""
    m = z.amax(dim=1)
    # rows of -inf only (a masked vocabulary tile) keep m = -inf and S = 0; a +inf or NaN max (non-finite
    # inputs) is kept, so that row's statistics become NaN (propagated, never silently finite)
    m_safe = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    d = z.sub_(m_safe[:, None])
    e = torch.exp(d)
    s = e.sum(1)
    # torch's cascaded sum keeps fp32 accurate at V ~ 1e5 (a BLAS dot product here did not). In place:
    # bounding d at -1e4 (where e == 0 exactly) turns -inf * 0 (masked columns) into 0 without the
    # extra tile nan_to_num allocated; NaN (non-finite inputs) still propagates.
    b = d.clamp_(min=-1e4).mul_(e).sum(1) if need_b else None
    if not need_dh:
        return m, s, b, None, None
    # two more in-place passes over the tile's two buffers (no third one): (z - m) e -> (z - m) e^2, e -> e^2.
    # Cheaper than forming them in cache-sized row blocks on 2 cores: many small parallel regions cost more
    # than the two passes (measured: +~0.6 ms per 682 x 8192 tile, ~1% of the forward).
    b2 = d.mul_(e).sum(1)
    s2 = e.mul_(e).sum(1)
    return m, s, b, s2, b2


def _merge(M, S, B, m, s, b, S2=None, B2=None, s2=None, b2=None):
    """Merge running stats (M, S, B, and S2, B2 when given, relative to M) with a tile's (m, s, b, s2, b2
    relative to m). Returns (M, S, B, S2, B2)."""
    new = torch.maximum(M, m)
    # A part whose max is -inf (a tile of -inf logits: a masked vocabulary range) has S = B = 0; rescale
    # against a finite reference so exp(-inf - -inf) and -inf * 0 never form NaN.
    ref = torch.where(new == -torch.inf, torch.zeros_like(new), new)
    a_old = torch.exp(M - ref)
    a_new = torch.exp(m - ref)
    S_new = S * a_old + s * a_new
    B_new = None
    if B is not None:
        # sum (z - new) e^(z - new) = a (B + (M - new) S) for each part
        zero = torch.zeros_like(S)
        B_new = a_old * (B + torch.where(S > 0, (M - ref) * S, zero)) + a_new * (
            b + torch.where(s > 0, (m - ref) * s, zero)
        )
    return (new, S_new, B_new) + _merge_sq(M, m, ref, a_old, a_new, S2, B2, s2, b2)


def _merge_sq(M, m, ref, a_old, a_new, S2, B2, s2, b2):
    """The entropy change's sums merged like S and B, with the squared rescale factors:
    sum (z - new) e^(2(z - new)) = a^2 (B2 + (M - new) S2) for each part. (None, None) when not kept."""
    if S2 is None:
        return None, None
    zero = torch.zeros_like(S2)
    q_old, q_new = a_old * a_old, a_new * a_new
    S2n = S2 * q_old + s2 * q_new
    B2n = q_old * (B2 + torch.where(S2 > 0, (M - ref) * S2, zero)) + q_new * (
        b2 + torch.where(s2 > 0, (m - ref) * s2, zero)
    )
    return S2n, B2n


def _finish_sq(s: Tensor, b: Tensor, s2: Tensor, b2: Tensor) -> Tensor:
    """``[2, rows]``: sum p^2 = S2 / S^2 and sum p^2 (log p + H) = (B2 - S2 B / S) / S^2 (log p + H = d - B/S
    with d = z - M: no log S to cancel)."""
    inv = 1.0 / s
    return torch.stack(((s2 * inv) * inv, ((b2 - s2 * (b * inv)) * inv) * inv))


def forward(
    x, w, targets, bias, temperature, softcap, return_entropy, vocab_start=0, return_entropy_change=False, **opts
):
    """(lse, zt, ent or None), or (lse, zt, ent, sq) with ``return_entropy_change`` (the contract:
    :meth:`fusedrl.backends.base.Backend.forward`)."""
    n, v = x.shape[0], w.shape[0]
    cdt = _compute_dtype(x)
    dh = bool(return_entropy_change)
    return_entropy = bool(return_entropy) or dh  # the entropy change needs H (and B)
    lse = torch.empty(n, dtype=cdt, device=x.device)
    zt = torch.zeros(n, dtype=cdt, device=x.device)
    ent = torch.empty(n, dtype=cdt, device=x.device) if return_entropy else None
    sq = torch.empty(2, n, dtype=cdt, device=x.device) if dh else None
    nt, vt = tile_plan(n, v, workspace_mb=opts.get("workspace_mb"))
    zero = torch.zeros((), dtype=cdt, device=x.device)
    for n0 in range(0, n, nt):
        n1 = min(n, n0 + nt)
        xc = x[n0:n1].to(cdt)
        tgt = targets[n0:n1] - vocab_start
        run = None
        for v0 in range(0, v, vt):
            v1 = min(v, v0 + vt)
            bc = bias[v0:v1].to(cdt) if bias is not None else None
            z, _ = _logits_tile(xc, w[v0:v1].to(cdt), bc, _rows(temperature, n0, n1, cdt), softcap)
            loc, hit = _target_in_tile(tgt, v0, v1 - v0)
            zt[n0:n1] += torch.where(hit, z.gather(1, loc[:, None]).squeeze(1), zero)
            tile = _tile_stats(z, return_entropy, dh)
            run = tile if run is None else _merge(*run[:3], *tile[:3], *run[3:], *tile[3:])
            del z
        M, S, B, S2, B2 = run
        lse[n0:n1] = M + torch.log(S)
        if return_entropy:
            ent[n0:n1] = torch.log(S) - B / S
        if dh:
            sq[:, n0:n1] = _finish_sq(S, B, S2, B2)
    return (lse, zt, ent, sq) if dh else (lse, zt, ent)


def _du_tile(z, t, loc, hit, lse, ent, g_lp, g_H, temperature, softcap):
    """du = dz/du for one tile, formed in place over z (docs/design.md, the core math):
    du = p * (a + c (z - LSE)) + (g_lp / T) 1[j = target], a = -(g_lp + g_H H) / T, c = -g_H / T,
    times (1 - tanh^2) under softcap."""
    inv_t = 1.0 / temperature  # a float, or this tile's per-row tensor
    zl = z.sub_(lse[:, None])  # log p
    p = torch.exp(zl)
    if g_H is not None:
        # p == 0 exactly below log p = -1e4 (fp32 and fp64): bounding log p there changes nothing but keeps
        # -inf logits (a masked vocabulary) from forming 0 * (-inf) = NaN; NaN inputs still propagate.
        zl.clamp_(min=-1e4)
        a = (g_lp + g_H * ent).mul_(-inv_t)
        du = zl.mul_(((-inv_t) * g_H)[:, None]).add_(a[:, None]).mul_(p)
    else:
        du = p.mul_(((-inv_t) * g_lp)[:, None])
    # one-hot term without a host sync: rows whose target is outside this tile add 0
    du.scatter_add_(1, loc[:, None], torch.where(hit, g_lp * inv_t, torch.zeros_like(g_lp))[:, None])
    if softcap is not None:
        du.mul_(1.0 - t * t)
    return du


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
    n, h = x.shape
    v = w.shape[0]
    cdt = _compute_dtype(x)
    need_db = need_db and bias is not None
    lse, g_lp = lse.to(cdt), g_lp.to(cdt)
    if g_H is not None:
        g_H, ent = g_H.to(cdt), ent.to(cdt)
    dev = x.device
    nt, vt = tile_plan(n, v, workspace_mb=opts.get("workspace_mb"))
    # Keep the big fp32 accumulator on the smaller side: vocab-outer needs a full dx, token-outer a full dW.
    vocab_outer = n <= v
    dx = torch.zeros(n, h, dtype=cdt, device=dev) if need_dx else None
    dw = torch.zeros(v, h, dtype=cdt, device=dev) if need_dw else None
    db = torch.zeros(v, dtype=cdt, device=dev) if need_db else None
    tgt_all = targets - vocab_start
    outer = range(0, v, vt) if vocab_outer else range(0, n, nt)
    for o0 in outer:
        inner = range(0, n, nt) if vocab_outer else range(0, v, vt)
        for i0 in inner:
            (v0, n0) = (o0, i0) if vocab_outer else (i0, o0)
            v1, n1 = min(v, v0 + vt), min(n, n0 + nt)
            xc, wc = x[n0:n1].to(cdt), w[v0:v1].to(cdt)
            bc = bias[v0:v1].to(cdt) if bias is not None else None
            tr = _rows(temperature, n0, n1, cdt)
            z, t = _logits_tile(xc, wc, bc, tr, softcap)
            loc, hit = _target_in_tile(tgt_all[n0:n1], v0, v1 - v0)
            du = _du_tile(
                z,
                t,
                loc,
                hit,
                lse[n0:n1],
                None if g_H is None else ent[n0:n1],
                g_lp[n0:n1],
                None if g_H is None else g_H[n0:n1],
                tr,
                softcap,
            )
            if need_dx:
                dx[n0:n1].addmm_(du, wc)
            if need_dw:
                dw[v0:v1].addmm_(du.t(), xc)
            if need_db:
                db[v0:v1] += du.sum(0)
            del z, t, du
    return (
        dx.to(x.dtype) if need_dx else None,
        dw.to(w.dtype) if need_dw else None,
        db.to(bias.dtype) if need_db else None,
    )


def _logits_rows(logits: Tensor, n0: int, n1: int, temperature, softcap: Optional[float]):
    """z (a private fp32 copy, safe to overwrite) and tanh(u/c) or None for rows n0:n1 of given logits
    (``temperature``: a float or these rows' tensor)."""
    u = logits[n0:n1]
    if softcap is None:
        z = u.to(_compute_dtype(logits), copy=True)
        if isinstance(temperature, torch.Tensor):
            return z.div_(temperature[:, None]), None
        return (z.div_(temperature) if temperature != 1.0 else z), None
    t = torch.tanh(u.to(_compute_dtype(logits)) / softcap)
    return t * _col(softcap / temperature), t


def _rows_per_chunk(n: int, v: int, workspace_mb: Optional[float] = None) -> int:
    return max(1, min(n, _budget_bytes(workspace_mb) // (4 * _TEMPS_PER_ELEM * v)))


def logits_forward(logits, targets, temperature, softcap, return_entropy, return_entropy_change=False, **opts):
    """:func:`forward` over given logits ``[N, V]``."""
    n, v = logits.shape
    cdt = _compute_dtype(logits)
    dh = bool(return_entropy_change)
    return_entropy = bool(return_entropy) or dh
    lse = torch.empty(n, dtype=cdt, device=logits.device)
    zt = torch.empty(n, dtype=cdt, device=logits.device)
    ent = torch.empty(n, dtype=cdt, device=logits.device) if return_entropy else None
    sq = torch.empty(2, n, dtype=cdt, device=logits.device) if dh else None
    nt = _rows_per_chunk(n, v, opts.get("workspace_mb"))
    for n0 in range(0, n, nt):
        n1 = min(n, n0 + nt)
        z, _ = _logits_rows(logits, n0, n1, _rows(temperature, n0, n1, cdt), softcap)
        # out-of-range ids (possible only with check_inputs off) read as 0, never out of bounds
        loc, hit = _target_in_tile(targets[n0:n1], 0, v)
        zt[n0:n1] = torch.where(hit, z.gather(1, loc[:, None]).squeeze(1), torch.zeros((), dtype=cdt, device=z.device))
        m, s, b, s2, b2 = _tile_stats(z, return_entropy, dh)
        lse[n0:n1] = m + torch.log(s)
        if return_entropy:
            ent[n0:n1] = torch.log(s) - b / s
        if dh:
            sq[:, n0:n1] = _finish_sq(s, b, s2, b2)
    return (lse, zt, ent, sq) if dh else (lse, zt, ent)


def logits_backward(logits, targets, temperature, softcap, lse, ent, g_lp, g_H, inplace=False, **opts):
    n, v = logits.shape
    cdt = _compute_dtype(logits)
    out = logits if inplace else torch.empty_like(logits)
    nt = _rows_per_chunk(n, v, opts.get("workspace_mb"))
    lse, g_lp = lse.to(cdt), g_lp.to(cdt)
    if g_H is not None:
        g_H, ent = g_H.to(cdt), ent.to(cdt)
    for n0 in range(0, n, nt):
        n1 = min(n, n0 + nt)
        tr = _rows(temperature, n0, n1, cdt)
        z, t = _logits_rows(logits, n0, n1, tr, softcap)
        loc, hit = _target_in_tile(targets[n0:n1], 0, v)
        du = _du_tile(
            z,
            t,
            loc,
            hit,
            lse[n0:n1],
            None if g_H is None else ent[n0:n1],
            g_lp[n0:n1],
            None if g_H is None else g_H[n0:n1],
            tr,
            softcap,
        )
        out[n0:n1] = du
    return out


# --------------------------------------------------------------------------------------------------
# One-pass schedule row epilogue (fusedrl/onepass/run.py, docs/one-pass.md), in torch ops over a whole
# [rows, V] workspace: the generic epilogue of every backend (and the only one on CPU). It works in
# place on the workspace plus one scratch buffer of the same size: after `onepass_stats` the workspace
# holds d = z - M and the scratch e = exp(d), from which `onepass_du` forms du without another exp.
# --------------------------------------------------------------------------------------------------

_B_BLOCK = 8192  # columns per block of the entropy sum (bounds its temporary)


class RowStats(NamedTuple):
    lse: Tensor  # [rows]
    zt: Tensor  # [rows] target logit z_t
    ent: Optional[Tensor]
    m: Tensor  # [rows] finite row max (0 for an all -inf row)
    s: Tensor  # [rows] sum e^(z - m)
    log_s: Tensor  # [rows]
    e: Tensor  # [rows, V] e^(z - m) (the scratch buffer)
    sq: Optional[Tensor] = None  # [2, rows] the entropy change's sums (base.entropy_change), when asked


def onepass_stats(
    u: Tensor,
    targets: Tensor,
    temperature,
    softcap: Optional[float],
    need_ent: bool,
    scratch: Tensor,
    tmp: Optional[Tensor] = None,
    is_scaled: bool = False,
    may_have_neg_inf: bool = True,
    need_dh: bool = False,
) -> RowStats:
    """Row statistics of a workspace of raw logits ``u`` (bias included) for the one-pass schedule.

    ``u`` is overwritten with ``d = z - M`` (clamped at -1e4 when entropy is needed, so a -inf column
    never forms 0 * inf); ``scratch`` (same shape and dtype) receives ``e = exp(d)``; ``tmp`` (``[rows, <=
    8192]``, optional) holds the entropy sum's products block by block. ``is_scaled``: the caller already
    divided the GEMM operand by T (no softcap), so ``u`` is ``z``. ``targets`` in [0, V). ``temperature``:
    a float or a per-row ``[rows]`` tensor. ``need_dh``: also the entropy change's sums ``sq`` (and the
    entropy, which it needs).
    """
    need_ent = need_ent or need_dh
    if softcap is not None:
        u.div_(softcap).tanh_().mul_(_col(softcap / temperature))
    elif isinstance(temperature, torch.Tensor):
        u.div_(temperature[:, None])
    elif not is_scaled and temperature != 1.0:
        u.div_(temperature)
    # an out-of-range id (possible only with the value checks off) reads a target logit of 0, in bounds
    loc, hit = _target_in_tile(targets, 0, u.shape[1])
    zt = torch.where(hit, u.gather(1, loc[:, None]).squeeze(1), torch.zeros((), dtype=u.dtype, device=u.device))
    m = u.amax(dim=1)
    m = torch.where(m == -torch.inf, torch.zeros_like(m), m)
    u.sub_(m[:, None])
    e = torch.exp(u, out=scratch)
    s = e.sum(1)
    log_s = torch.log(s)
    lse = m + log_s
    ent = sq = None
    if need_ent:
        if may_have_neg_inf and softcap is None:  # softcapped logits are bounded: never -inf
            u.clamp_(min=-1e4)  # e == 0 exactly there: the clamp changes no product but -inf * 0
        b = torch.zeros_like(s)
        s2 = b2 = None
        if need_dh:
            s2, b2 = torch.zeros_like(s), torch.zeros_like(s)
        for c0, c1 in _col_blocks(u.shape[1], tmp):  # torch's cascaded sum keeps fp32 accurate at V ~ 1e5
            eb = e[:, c0:c1]
            prod = torch.mul(u[:, c0:c1], eb, out=None if tmp is None else tmp[:, : c1 - c0])
            b += prod.sum(1)
            if need_dh:  # d e -> d e^2 in the block temporary, then e^2 there (e itself is kept for du)
                b2 += prod.mul_(eb).sum(1)
                s2 += torch.mul(eb, eb, out=prod).sum(1)
        ent = log_s - b / s
        if need_dh:
            sq = _finish_sq(s, b, s2, b2)
    return RowStats(lse, zt, ent, m, s, log_s, e, sq)


def _col_blocks(v: int, tmp: Optional[Tensor]):
    width = tmp.shape[1] if tmp is not None else _B_BLOCK
    return [(c, min(v, c + width)) for c in range(0, v, width)]


def onepass_du(
    u: Tensor,
    st: RowStats,
    targets: Tensor,
    temperature,
    softcap: Optional[float],
    g_lp: Tensor,
    g_H: Optional[Tensor],
    tmp: Optional[Tensor] = None,
) -> Tensor:
    """du = dL/du over the workspace after :func:`onepass_stats` (docs/design.md, the core math), formed in place:
    ``p (a + c (z - LSE)) = e (alpha + beta d)`` with ``a = -(g_lp + g_H H)/T``, ``c = -g_H/T``, plus the
    one-hot term ``g_lp/T``, times ``1 - tanh^2`` under softcap. Returns the buffer holding du (``u`` when
    there is an entropy gradient, else the scratch ``e``)."""
    inv_t = 1.0 / temperature
    inv_s = 1.0 / st.s
    e = st.e
    onehot = g_lp * inv_t
    if softcap is not None:  # z = d + m = tanh(u/c) c/T  ->  1 - tanh^2 = 1 - (z T/c)^2
        k = temperature / softcap
        for c0, c1 in _col_blocks(u.shape[1], tmp):
            f = torch.add(u[:, c0:c1], st.m[:, None], out=None if tmp is None else tmp[:, : c1 - c0])
            e[:, c0:c1].mul_(f.mul_(_col(k)).square_().neg_().add_(1.0))
        onehot = onehot * (1.0 - (st.zt * k).square())
    if g_H is None:
        du = e.mul_((-inv_t * g_lp * inv_s)[:, None])
    else:
        c = -inv_t * g_H
        alpha = ((g_lp + g_H * st.ent).mul_(-inv_t) - c * st.log_s) * inv_s
        du = u.mul_((c * inv_s)[:, None]).add_(alpha[:, None]).mul_(e)
    loc, hit = _target_in_tile(targets, 0, u.shape[1])
    return du.scatter_add_(1, loc[:, None], torch.where(hit, onehot, torch.zeros_like(onehot))[:, None])


def onepass_scratch_shapes(rows: int, v: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The torch epilogue's scratch buffers beyond the workspace: ``e = exp(z - M)`` ``[rows, V]`` and the
    entropy sum's block temporary ``[rows, min(V, 8192)]`` (compute dtype)."""
    return (rows, v), (rows, min(v, _B_BLOCK))


def onepass_supports(head, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """The torch epilogue serves every head (it differentiates the loss formulas themselves)."""
    return (True, "") if head.grads is not None else (False, "no autograd head given")


def onepass_epilogue(
    u: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature,
    softcap: Optional[float],
    head,
    du16: Optional[Tensor] = None,
    *,
    scratch: Optional[tuple[Tensor, Tensor]] = None,
    prescaled: bool = False,
    may_have_neg_inf: bool = True,
):
    """The torch row epilogue (the contract: :meth:`fusedrl.backends.base.Backend.onepass_epilogue`).

    ``head.grads(logp, ent)`` gives the head's per-row gradients (autograd over the loss formulas);
    ``None`` skips the gradient (forward statistics only). ``head.need_dh``: ``EpilogueOut.dh`` too.
    ``scratch``: the buffers of :func:`onepass_scratch_shapes` (allocated when None). ``prescaled``: the
    schedule folded ``1/T`` into the GEMM operand (no softcap), so ``u`` already holds ``z``. Works in the
    compute dtype of ``u`` (fp64 stays fp64)."""
    from .base import EpilogueOut, entropy_change, wants_dh

    need_dh = wants_dh(head)
    if bias is not None:
        u.add_(bias.to(u.dtype))
    if scratch is None:
        a, b = onepass_scratch_shapes(u.shape[0], u.shape[1])
        scratch = (torch.empty(a, dtype=u.dtype, device=u.device), torch.empty(b, dtype=u.dtype, device=u.device))
    e_buf, tmp = scratch
    st = onepass_stats(
        u,
        targets,
        temperature,
        softcap,
        head.need_ent,
        e_buf,
        tmp,
        is_scaled=prescaled,
        may_have_neg_inf=may_have_neg_inf or bias is not None,
        need_dh=need_dh,
    )
    logp = st.zt - st.lse
    dh = entropy_change(logp, st.ent, st.sq) if need_dh else None
    if head.grads is None:
        return EpilogueOut(logp, st.ent, st.lse, None, None, None, dh)
    g_lp, g_H = head.grads(logp, st.ent if head.need_ent else None)
    cdt = u.dtype
    du = onepass_du(u, st, targets, temperature, softcap, g_lp.to(cdt), None if g_H is None else g_H.to(cdt), tmp)
    if du16 is not None:
        du16.copy_(du)
    return EpilogueOut(logp, st.ent, st.lse, g_lp, g_H, du, dh)
