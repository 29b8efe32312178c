"""The row math of sampling replay for one token chunk: the processed logits over the chunk's columns, each
row's kept set ``S`` (the target always in it), the row statistics over ``S`` (and over the full row when the
full-vocabulary entropy or the kept mass is wanted) and their gradient.

For a row with processed logits ``z`` (softcap, bias, temperature applied)::

    LSE_S = log sum_{v in S} e^{z_v},   logp = z_a - LSE_S,   p^S_v = e^{z_v - LSE_S} (v in S)
    H_S   = LSE_S - sum_{v in S} p^S_v z_v        (entropy_support="kept"; "full": the same over every v)
    du_v  = [g_lp (1[v = a] - p^S_v) - g_H p^H_v (z_v - LSE_H + H)] dz_v/du_v

where ``p^H``, ``LSE_H`` are the entropy's support (``S`` or the full row). Two layouts of the columns:

* the union ``U`` of the chunk's kept ids and targets (:func:`union_rows`): ``x_c W[U]^T``, ``|U|`` columns;
* each row's own kept ids and target (:func:`slot_rows`, CPU fp32 / fp64): sparse products, no union;
* the full vocabulary (:func:`full_rows`): ``x_c W^T``; ``S`` from explicit ids (a row with none keeps
  every column: no replay there) or from the recomputed truncation (:func:`fusedrl.replay.truncation.keep_mask`).

Under a vocabulary-parallel lm_head a rank sees the columns of its shard only: its kept ids, and the target
where it owns it (``tcol = -1`` elsewhere). :func:`row_partials` are then the shard's statistics (``lse`` over
its part of ``S``, the target logit or 0, the entropy of its part), merged across ranks as the core op's are.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Union

import torch

from .truncation import Truncation, keep_mask

Tensor = torch.Tensor
Temperature = Union[float, Tensor]

__all__ = ["Rows", "Partials", "Stats", "transform", "union_rows", "slot_rows", "slot_grads", "full_rows",
           "row_partials", "row_du", "compute_dtype", "local_ids", "single_merge", "merge_partials"]  # fmt: skip


class Rows(NamedTuple):
    """One chunk's logits over its columns and what the statistics need."""

    z: Tensor  # [R, C] processed logits (compute dtype)
    dzdu: Tensor  # [R, C] dz/du (softcap and temperature)
    kept: Tensor  # [R, C] bool: S (this shard's part)
    tcol: Tensor  # [R] each row's target column, -1 where this shard does not hold the target
    cols: Optional[Tensor]  # [C] the (shard-local) vocabulary rows of the columns (None: all, in order);
    #                        [R, C] per row on the slot layout (-1 unused)
    xc: Tensor  # [R, H] the chunk's rows (compute dtype)
    wc: Tensor  # [C, H] the columns' weight rows (compute dtype; empty on the slot layout)


class Partials(NamedTuple):
    """A shard's per-row statistics (``[R]``): over its part of ``S`` and, on full rows, over its whole row.
    ``lse`` is ``-inf`` (``ent`` 0) where the shard holds no column of the set."""

    lse: Tensor
    zt: Tensor  # the target's logit where this shard holds it, else 0
    ent: Optional[Tensor]
    lse_full: Optional[Tensor]
    ent_full: Optional[Tensor]


class Stats(NamedTuple):
    """Merged per-row statistics (``[R]``, compute dtype)."""

    logp: Tensor  # over S
    lse: Tensor  # LSE_S
    ent: Optional[Tensor]  # over the entropy's support
    lse_h: Optional[Tensor]  # LSE of the entropy's support
    logp_full: Optional[Tensor]  # over the full row (full rows only): the kept mass is exp(logp_full - logp)


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def transform(u: Tensor, temperature: Temperature, softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """``(z, dz/du)`` of raw logits ``u [R, C]``: ``z = softcap(u) / T`` (``T`` a float or per row)."""
    inv_t = (1.0 / temperature)[:, None] if isinstance(temperature, Tensor) else 1.0 / temperature
    if softcap is None:
        z = u * inv_t
        return z, (inv_t if isinstance(inv_t, Tensor) else torch.full_like(z[:, :1], inv_t)).expand_as(z)
    t = torch.tanh(u / softcap)
    return t * softcap * inv_t, (1.0 - t * t) * inv_t


def local_ids(ids: Tensor, start: int, size: int) -> Tensor:
    """Global vocabulary ids -> this shard's rows (``-1`` outside ``[start, start + size)``)."""
    loc = ids - start
    return torch.where((ids >= 0) & (loc >= 0) & (loc < size), loc, torch.full_like(loc, -1))


def _logits(xc: Tensor, wc: Tensor, bc: Optional[Tensor], temperature: Temperature, softcap: Optional[float]):
    u = xc @ wc.t()
    if bc is not None:
        u = u + bc
    return transform(u, temperature, softcap)


def member_mask(cols: Tensor, used: Tensor, width: int) -> Tensor:
    """``[R, width]`` bool, True at ``cols[r, j]`` where ``used[r, j]``. Unused slots go to a spare column: a
    scatter of their ``False`` onto a real column would overwrite a kept id at the same place."""
    out = torch.zeros(cols.shape[0], width + 1, dtype=torch.bool, device=cols.device)
    out.scatter_(1, torch.where(used, cols, torch.full_like(cols, width)), True)
    return out[:, :width]


def union_rows(xc, w, bias, tc, ids_c, temperature, softcap) -> Rows:
    """Rows over the union of the chunk's kept ids and targets (shard-local ids; ``-1`` unused / not held).
    ``torch.unique`` reads the union's size on the host: one synchronisation per chunk on a GPU."""
    cdt = compute_dtype(xc)
    used = ids_c >= 0
    cols = torch.unique(torch.cat([ids_c[used], tc[tc >= 0]]))  # sorted
    c = cols.numel()
    members = torch.cat([ids_c, tc[:, None]], 1)  # the target is always counted in S
    pos = torch.searchsorted(cols, members.clamp_min(0)).clamp_max(max(c - 1, 0))
    kept = member_mask(pos, members >= 0, c)  # a vocabulary shard may hold none of the chunk's ids (c = 0)
    tcol = torch.where(tc >= 0, pos[:, -1], -1)
    wc = w.index_select(0, cols).to(cdt)
    xc = xc.to(cdt)
    z, dzdu = _logits(xc, wc, None if bias is None else bias.index_select(0, cols).to(cdt), temperature, softcap)
    return Rows(z, dzdu, kept, tcol, cols, xc, wc)


def slot_rows(xc, w, bias, tc, ids_c, temperature, softcap) -> Rows:
    """Rows over each row's own kept ids and target (shard-local; ``-1`` unused / not held), ascending with the
    unused slots last: column ``j`` of row ``r`` is vocabulary row ``cols[r, j]``. The logits are a sampled
    product (SDDMM over the rows' ids, no gathered copy of ``W``); :func:`slot_grads` forms ``dx`` / ``dW`` as
    sparse-dense products. fp32 / fp64 on CPU (torch's sparse kernels)."""
    cdt = compute_dtype(xc)
    tgt = torch.where((tc[:, None] == ids_c).any(-1), torch.full_like(tc, -1), tc)  # the target once
    slots = torch.cat([ids_c, tgt[:, None]], 1)
    big = torch.iinfo(slots.dtype).max
    slots = torch.where(slots >= 0, slots, big).sort(-1).values
    kept = slots != big
    slots = torch.where(kept, slots, -1)
    tcol = torch.where(tc >= 0, (slots == tc[:, None]).to(torch.int8).argmax(-1), -1)
    xc = xc.to(cdt)
    pattern = _csr(kept, slots, torch.zeros(int(kept.sum()), dtype=cdt, device=xc.device), w.shape[0])
    u = torch.zeros(slots.shape, dtype=cdt, device=xc.device)
    if kept.any():
        u[kept] = torch.sparse.sampled_addmm(pattern, xc, w.to(cdt).t(), beta=0.0).values()
    if bias is not None:
        u = u + torch.where(kept, bias.to(cdt)[slots.clamp_min(0)], torch.zeros_like(u))
    z, dzdu = transform(u, temperature, softcap)
    return Rows(z, dzdu, kept, tcol, slots, xc, xc.new_empty(0, xc.shape[1]))


def _csr(kept: Tensor, slots: Tensor, values: Tensor, width: int) -> Tensor:
    """The ``[R, width]`` CSR tensor with ``values`` at the used slots (row-major: ascending within a row)."""
    crow = torch.zeros(kept.shape[0] + 1, dtype=torch.int64, device=kept.device)
    crow[1:] = kept.sum(-1).cumsum(0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the products used here are tested
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, slots[kept], values, (kept.shape[0], width), check_invariants=False)


def slot_grads(rows: Rows, du: Tensor, w: Tensor, dw: Optional[Tensor],
               need_dx: bool) -> tuple[Optional[Tensor], Tensor, Tensor]:  # fmt: skip
    """A slot chunk's ``(dx_c = du W [R, H] or None, the used columns, their du)``; ``dW += du^T x_c`` in place
    (when ``dw`` is given), both as sparse-dense products over the used slots."""
    vals = du[rows.kept]
    g = _csr(rows.kept, rows.cols, vals, w.shape[0])
    if dw is not None:
        dw.addmm_(g.t(), rows.xc)
    return (g @ w.to(du.dtype) if need_dx else None), rows.cols[rows.kept], vals


def full_rows(xc, w, bias, tc, ids_c: Optional[Tensor], trunc_c: Optional[Truncation], temperature, softcap,
              replayed: Optional[Tensor] = None) -> Rows:  # fmt: skip
    """Rows over the (shard's) full vocabulary; ``S`` from ``ids_c`` (``[R, K]``, -1 unused; ``replayed``
    ``[R]`` says which rows have a set: the others keep everything) or ``trunc_c`` (recomputed), or everything.
    ``tc``: shard-local targets, -1 where not held."""
    cdt = compute_dtype(xc)
    xc = xc.to(cdt)
    wc = w.to(cdt)
    z, dzdu = _logits(xc, wc, None if bias is None else bias.to(cdt), temperature, softcap)
    r, v = z.shape
    tcol = torch.where(tc >= 0, tc.clamp(0, max(v - 1, 0)), -1)
    if trunc_c is not None:
        kept = keep_mask(z, trunc_c)
    elif ids_c is not None:
        used = ids_c >= 0
        kept = member_mask(ids_c.clamp(0, max(v - 1, 0)), used, v)
        kept |= ~(used.any(-1) if replayed is None else replayed)[:, None]  # no set: no replay at that token
    else:
        kept = torch.ones(r, v, dtype=torch.bool, device=z.device)
    if v:  # the target is always counted in S
        kept.scatter_(1, tcol.clamp_min(0)[:, None], (tcol >= 0)[:, None] | kept.gather(1, tcol.clamp_min(0)[:, None]))
    return Rows(z, dzdu, kept, tcol, None, xc, wc)


def _lse_ent(z: Tensor, member: Optional[Tensor], need_ent: bool) -> tuple[Tensor, Optional[Tensor]]:
    """LSE over the members (``-inf`` for none) and the entropy of their softmax (0 for none)."""
    zm = z if member is None else z.masked_fill(~member, -math.inf)
    lse = torch.logsumexp(zm, -1) if z.shape[1] else z.new_full((z.shape[0],), -math.inf)
    if not need_ent:
        return lse, None
    finite = torch.isfinite(lse)
    p = torch.exp(zm - torch.where(finite, lse, torch.zeros_like(lse))[:, None])
    ent = lse - torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)  # a -inf logit never forms 0 * inf
    return lse, torch.where(finite, ent, torch.zeros_like(ent))


def row_partials(rows: Rows, need_ent: bool, full_entropy: bool, need_full: bool) -> Partials:
    """The chunk's (shard's) statistics. ``full_entropy``: the entropy over the full row (full rows only);
    ``need_full``: the full row's LSE too (the kept mass)."""
    z = rows.z
    held = rows.tcol >= 0
    zt = z.gather(1, rows.tcol.clamp_min(0)[:, None]).squeeze(1) if z.shape[1] else z.new_zeros(z.shape[0])
    zt = torch.where(held, zt, torch.zeros_like(zt))
    full_h = need_ent and full_entropy and rows.cols is None
    lse, ent = _lse_ent(z, rows.kept, need_ent and not full_h)
    lse_f = ent_f = None
    if rows.cols is None and (need_full or full_h):
        lse_f, ent_f = _lse_ent(z, None, full_h)
    return Partials(lse, zt, ent, lse_f, ent_f)


def single_merge(lse: Tensor, zt: Tensor, ent: Optional[Tensor]):
    """One shard holds everything: ``(LSE, logp, H)``."""
    return lse, zt - lse, ent


def merge_partials(p: Partials, full_entropy: bool, merge=single_merge) -> Stats:
    """:class:`Stats` from the partials (``merge``: across the vocabulary shards, ``(lse, zt, ent) -> (LSE,
    logp, H)`` as the core op merges)."""
    lse, logp, ent = merge(p.lse, p.zt, None if full_entropy else p.ent)
    lse_h = lse if p.ent is not None else None
    logp_full = None
    if p.lse_full is not None:
        lse_f, logp_full, ent_f = merge(p.lse_full, p.zt, p.ent_full)
        if full_entropy and p.ent_full is not None:
            ent, lse_h = ent_f, lse_f
    return Stats(logp, lse, ent, lse_h, logp_full)


def row_du(rows: Rows, st: Stats, g_lp: Tensor, g_h: Optional[Tensor], full_entropy: bool) -> Tensor:
    """``du [R, C]``: the kept-set log-prob term (0 off S) plus the entropy term over its support, with the
    merged statistics ``st``."""
    z = rows.z
    zm = z.masked_fill(~rows.kept, -math.inf)
    p = torch.exp(zm - st.lse[:, None])
    dz = -g_lp[:, None] * p
    if g_h is not None and st.ent is not None:
        ph = torch.exp(z - st.lse_h[:, None]) if (full_entropy and rows.cols is None) else p
        shift = torch.where(ph > 0, z - st.lse_h[:, None] + st.ent[:, None], torch.zeros_like(z))
        dz = dz - g_h[:, None] * ph * shift
    if z.shape[1]:
        held = rows.tcol >= 0
        dz = dz.scatter_add(
            1, rows.tcol.clamp_min(0)[:, None], torch.where(held, g_lp, torch.zeros_like(g_lp))[:, None]
        )
    return dz * rows.dzdu
