"""Log-probs (and entropy) over each token's kept set S, at a cost that follows |S|.

For token n with processed logits ``z`` (softcap, bias, temperature applied) and kept set ``S_n`` (the
target always counted in it):

    LSE_S = log Σ_{v∈S} e^{z_v},   logp_S = z_a − LSE_S,   p^S_v = e^{z_v − LSE_S} (v ∈ S),
    H_S = LSE_S − Σ_{v∈S} p^S_v z_v

and the gradients reach the kept logits only:
``du_v = [g_lp (1[v = a] − p^S_v) − g_H p^S_v (z_v − LSE_S + H_S)] · dz_v/du_v`` for ``v ∈ S``, 0 elsewhere.

Two forms, both token-chunked with the logits recomputed in the backward (flat memory):

* explicit sets (:class:`KeptLogprob`): per chunk, the union ``U`` of the chunk's kept ids and targets,
  ``x_c · W[U]ᵀ`` (one GEMM over ``|U|`` columns instead of ``V``), the row statistics over each row's
  own members of ``U``, ``dx_c = du · W[U]`` and ``dW`` / ``db`` scattered into the rows of ``U``;
* recomputed truncation (:class:`TruncatedLogprob`): full logits rows per chunk (the kept set is not
  known before the row is), the vLLM keep mask (``fusedrl.replay.truncation``), then the same statistics.

The union needs its size on the host (``torch.unique``): one synchronisation per chunk on a GPU.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .truncation import Truncation, keep_mask

Tensor = torch.Tensor
Temperature = Union[float, Tensor]

__all__ = ["KeptLogprob", "TruncatedLogprob", "masked_stats", "masked_du", "transform"]

#: elements of fp32 temporaries per chunk (rows x columns): bounds the workspace of both forms
_CHUNK_ELEMS = 2**24


def transform(u: Tensor, temperature: Temperature, softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """``(z, dz/du)`` of raw logits ``u [R, C]``: ``z = softcap(u) / T`` (``T`` a float or per row)."""
    inv_t = (1.0 / temperature)[:, None] if isinstance(temperature, Tensor) else 1.0 / temperature
    if softcap is None:
        z = u * inv_t
        return z, (inv_t if isinstance(inv_t, Tensor) else torch.full_like(z[:, :1], inv_t)).expand_as(z)
    t = torch.tanh(u / softcap)
    return t * softcap * inv_t, (1.0 - t * t) * inv_t


def masked_stats(z: Tensor, member: Tensor, tcol: Tensor, need_ent: bool):
    """``(logp, ent or None, lse)`` ``[R]`` over the member columns of ``z [R, C]`` (``tcol``: each row's target
    column, a member). A member ``-inf`` logit contributes nothing and never forms ``0·inf``."""
    zm = z.masked_fill(~member, -math.inf)
    lse = torch.logsumexp(zm, -1)
    zt = z.gather(1, tcol[:, None]).squeeze(1)
    ent = None
    if need_ent:
        p = torch.exp(zm - lse[:, None])
        ent = lse - torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)
    return zt - lse, ent, lse


def masked_du(z, dzdu, member, tcol, lse, ent, g_lp, g_h) -> Tensor:
    """``du [R, C]`` of the kept-set log-prob (and entropy) terms, 0 off the members."""
    zm = z.masked_fill(~member, -math.inf)
    p = torch.exp(zm - lse[:, None])
    dz = -g_lp[:, None] * p
    if g_h is not None:
        shift = torch.where(p > 0, z - lse[:, None] + ent[:, None], torch.zeros_like(z))
        dz = dz - g_h[:, None] * p * shift
    dz = dz.scatter_add(1, tcol[:, None], g_lp[:, None])
    return dz * dzdu


def _chunks(n: int, cols: int):
    rows = max(1, min(n, _CHUNK_ELEMS // max(cols, 1)))
    return range(0, n, rows), rows


def _kept_rows(n: int, k: int, v: int) -> int:
    """Token rows per chunk of the explicit-set form: the union of ``rows`` sets of ``k`` ids has at most
    ``min(V, rows k)`` columns; keep ``rows * columns`` under the chunk budget."""
    rows = int(math.sqrt(_CHUNK_ELEMS / max(k, 1)))
    if rows * k > v:
        rows = _CHUNK_ELEMS // max(v, 1)
    return max(1, min(n, rows))


def _union(ids: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, member [R, |U|], target column [R])`` of a chunk's kept sets (target included)."""
    flat = torch.cat([ids[ids >= 0], targets])
    u = torch.unique(flat)  # sorted; its size is read on the host
    member = torch.zeros(ids.shape[0], u.numel(), dtype=torch.bool, device=ids.device)
    pos = torch.searchsorted(u, ids.clamp_min(0))
    member.scatter_(1, pos.clamp_max(max(u.numel() - 1, 0)), ids >= 0)
    tcol = torch.searchsorted(u, targets)
    member.scatter_(1, tcol[:, None], True)
    return u, member, tcol


def _cdt(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(temperature: Temperature, a: int, b: int, dtype):
    return temperature[a:b].to(dtype) if isinstance(temperature, Tensor) else temperature


class KeptLogprob(torch.autograd.Function):
    """Kept-set log-prob / entropy of explicit sets (every row has one), union per token chunk.

    ``forward(x [N, H], w [V, H], bias [V] or None, targets [N], ids [N, K] (-1 = unused), temperature,
    softcap, need_ent) -> (logp [N], ent [N] or empty, lse [N])`` in the compute dtype.
    """

    @staticmethod
    def forward(ctx, x, w, bias, targets, ids, temperature, softcap, need_ent):
        cdt = _cdt(x)
        n = x.shape[0]
        logp = torch.empty(n, dtype=cdt, device=x.device)
        lse = torch.empty(n, dtype=cdt, device=x.device)
        ent = torch.empty(n if need_ent else 0, dtype=cdt, device=x.device)
        rows = _kept_rows(n, ids.shape[1], w.shape[0])
        for a in range(0, n, rows):
            b = min(n, a + rows)
            z, _, member, tcol, _ = _kept_logits(x[a:b], w, bias, targets[a:b], ids[a:b], _rows(temperature, a, b, cdt),
                                                 softcap)  # fmt: skip
            lp, en, ls = masked_stats(z, member, tcol, need_ent)
            logp[a:b], lse[a:b] = lp, ls
            if need_ent:
                ent[a:b] = en
        ctx.save_for_backward(x, w, bias, targets, ids, lse, ent if need_ent else None,
                              temperature if isinstance(temperature, Tensor) else None)  # fmt: skip
        ctx.args = (None if isinstance(temperature, Tensor) else temperature, softcap, rows)
        ctx.mark_non_differentiable(lse)
        return logp, ent, lse

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_lse):
        x, w, bias, targets, ids, lse, ent, t_vec = ctx.saved_tensors
        t_float, softcap, rows = ctx.args
        temperature = t_vec if t_vec is not None else t_float
        need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        cdt = lse.dtype
        n = x.shape[0]
        dx = torch.zeros(x.shape, dtype=cdt, device=x.device) if need_dx else None
        dw = torch.zeros(w.shape, dtype=cdt, device=w.device) if need_dw else None
        db = torch.zeros(bias.shape, dtype=cdt, device=w.device) if (need_db and bias is not None) else None
        g_lp = torch.zeros_like(lse) if g_logp is None else g_logp.to(cdt)
        g_h = None if (ent is None or g_ent is None) else g_ent.to(cdt)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            z, dzdu, member, tcol, (u_ids, xc, wu) = _kept_logits(x[a:b], w, bias, targets[a:b], ids[a:b],
                                                                  _rows(temperature, a, b, cdt), softcap)  # fmt: skip
            du = masked_du(z, dzdu, member, tcol, lse[a:b], None if g_h is None else ent[a:b], g_lp[a:b],
                           None if g_h is None else g_h[a:b])  # fmt: skip
            if dx is not None:
                dx[a:b] = du @ wu
            if dw is not None:
                dw.index_add_(0, u_ids, du.t() @ xc)
            if db is not None:
                db.index_add_(0, u_ids, du.sum(0))
        return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None)  # fmt: skip


def _kept_logits(xc, w, bias, tc, ids_c, temperature, softcap):
    cdt = _cdt(xc)
    u_ids, member, tcol = _union(ids_c, tc)
    wu = w.index_select(0, u_ids).to(cdt)
    xc = xc.to(cdt)
    u = xc @ wu.t()
    if bias is not None:
        u = u + bias.index_select(0, u_ids).to(cdt)
    z, dzdu = transform(u, temperature, softcap)
    return z, dzdu, member, tcol, (u_ids, xc, wu)


class TruncatedLogprob(torch.autograd.Function):
    """Kept-set log-prob / entropy of a recomputed truncation (full logits rows per token chunk).

    ``forward(x [N, H], w [V, H], bias, targets [N], trunc: Truncation, temperature, softcap, need_ent)
    -> (logp [N], ent [N] or empty, lse [N])``.
    """

    @staticmethod
    def forward(ctx, x, w, bias, targets, trunc, temperature, softcap, need_ent):
        cdt = _cdt(x)
        n, v = x.shape[0], w.shape[0]
        logp = torch.empty(n, dtype=cdt, device=x.device)
        lse = torch.empty(n, dtype=cdt, device=x.device)
        ent = torch.empty(n if need_ent else 0, dtype=cdt, device=x.device)
        starts, rows = _chunks(n, v)
        for a in starts:
            b = min(n, a + rows)
            z, _, member, tcol = _truncated_logits(x[a:b], w, bias, targets[a:b], trunc.rows(a, b),
                                                   _rows(temperature, a, b, cdt), softcap)  # fmt: skip
            lp, en, ls = masked_stats(z, member, tcol, need_ent)
            logp[a:b], lse[a:b] = lp, ls
            if need_ent:
                ent[a:b] = en
        ctx.save_for_backward(x, w, bias, targets, lse, ent if need_ent else None,
                              temperature if isinstance(temperature, Tensor) else None)  # fmt: skip
        ctx.args = (trunc, None if isinstance(temperature, Tensor) else temperature, softcap, rows)
        ctx.mark_non_differentiable(lse)
        return logp, ent, lse

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_lse):
        x, w, bias, targets, lse, ent, t_vec = ctx.saved_tensors
        trunc, t_float, softcap, rows = ctx.args
        temperature = t_vec if t_vec is not None else t_float
        need_dx, need_dw, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        cdt = lse.dtype
        n = x.shape[0]
        dx = torch.zeros(x.shape, dtype=cdt, device=x.device) if need_dx else None
        dw = torch.zeros(w.shape, dtype=cdt, device=w.device) if need_dw else None
        db = torch.zeros(bias.shape, dtype=cdt, device=w.device) if (need_db and bias is not None) else None
        g_lp = torch.zeros_like(lse) if g_logp is None else g_logp.to(cdt)
        g_h = None if (ent is None or g_ent is None) else g_ent.to(cdt)
        wc = w.to(cdt)
        for a in range(0, n, rows):
            b = min(n, a + rows)
            z, dzdu, member, tcol = _truncated_logits(x[a:b], w, bias, targets[a:b], trunc.rows(a, b),
                                                      _rows(temperature, a, b, cdt), softcap)  # fmt: skip
            du = masked_du(z, dzdu, member, tcol, lse[a:b], None if g_h is None else ent[a:b], g_lp[a:b],
                           None if g_h is None else g_h[a:b])  # fmt: skip
            if dx is not None:
                dx[a:b] = du @ wc
            if dw is not None:
                dw += du.t() @ x[a:b].to(cdt)
            if db is not None:
                db += du.sum(0)
        return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None)  # fmt: skip


def _truncated_logits(xc, w, bias, tc, trunc: Truncation, temperature, softcap):
    cdt = _cdt(xc)
    u = xc.to(cdt) @ w.to(cdt).t()
    if bias is not None:
        u = u + bias.to(cdt)
    z, dzdu = transform(u, temperature, softcap)
    member = keep_mask(z, trunc)
    tcol = tc.clamp(0, max(z.shape[1] - 1, 0))  # an out-of-range target (checks off) stays in bounds
    member.scatter_(1, tcol[:, None], True)  # the target is always counted in S
    return z, dzdu, member, tcol
