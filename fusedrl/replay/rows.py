"""The row math of sampling replay for one token chunk: the processed logits over the chunk's columns, each
row's kept set ``S`` (the target always in it), the statistics over ``S`` (and over the full row when the
full-vocabulary entropy or the kept mass is wanted) and their gradient.

For a row with processed logits ``z`` (softcap, bias, temperature applied)::

    LSE_S = log sum_{v in S} e^{z_v},   logp = z_a - LSE_S,   p^S_v = e^{z_v - LSE_S} (v in S)
    H_S   = LSE_S - sum_{v in S} p^S_v z_v        (entropy_support="kept"; "full": the same over every v)
    du_v  = [g_lp (1[v = a] - p^S_v) - g_H p^H_v (z_v - LSE_H + H)] dz_v/du_v

where ``p^H``, ``LSE_H`` are the entropy's support (``S`` or the full row). Two layouts of the columns:

* the union ``U`` of the chunk's kept ids and targets (:func:`union_rows`): ``x_c W[U]^T``, ``|U|`` columns;
* the full vocabulary (:func:`full_rows`): ``x_c W^T``; ``S`` from explicit ids (a row with none keeps
  every column: no replay there) or from the recomputed truncation (:func:`fusedrl.replay.truncation.keep_mask`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from .truncation import Truncation, keep_mask

Tensor = torch.Tensor
Temperature = Union[float, Tensor]

__all__ = ["Rows", "Stats", "transform", "union_rows", "full_rows", "row_stats", "row_du", "compute_dtype"]


class Rows(NamedTuple):
    """One chunk's logits over its columns and what the statistics need."""

    z: Tensor  # [R, C] processed logits (compute dtype)
    dzdu: Tensor  # [R, C] dz/du (softcap and temperature)
    kept: Tensor  # [R, C] bool: S
    tcol: Tensor  # [R] each row's target column
    cols: Optional[Tensor]  # [C] the vocabulary ids of the columns (None: all of them, in order)
    xc: Tensor  # [R, H] the chunk's rows (compute dtype)
    wc: Tensor  # [C, H] the columns' weight rows (compute dtype)


class Stats(NamedTuple):
    """Per-row statistics (``[R]``, compute dtype)."""

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


def _logits(xc: Tensor, wc: Tensor, bc: Optional[Tensor], temperature: Temperature, softcap: Optional[float]):
    u = xc @ wc.t()
    if bc is not None:
        u = u + bc
    return transform(u, temperature, softcap)


def union_rows(xc, w, bias, tc, ids_c, temperature, softcap) -> Rows:
    """Rows over the union of the chunk's kept ids and targets (every row replayed). ``torch.unique`` reads
    the union's size on the host: one synchronisation per chunk on a GPU."""
    cdt = compute_dtype(xc)
    used = ids_c >= 0
    cols = torch.unique(torch.cat([ids_c[used], tc]))  # sorted
    kept = torch.zeros(ids_c.shape[0], cols.numel(), dtype=torch.bool, device=ids_c.device)
    pos = torch.searchsorted(cols, ids_c.clamp_min(0)).clamp_max(max(cols.numel() - 1, 0))
    kept.scatter_(1, pos, used)
    tcol = torch.searchsorted(cols, tc)
    kept.scatter_(1, tcol[:, None], True)
    wc = w.index_select(0, cols).to(cdt)
    xc = xc.to(cdt)
    z, dzdu = _logits(xc, wc, None if bias is None else bias.index_select(0, cols).to(cdt), temperature, softcap)
    return Rows(z, dzdu, kept, tcol, cols, xc, wc)


def full_rows(xc, w, bias, tc, ids_c: Optional[Tensor], trunc_c: Optional[Truncation], temperature, softcap,
              wc: Optional[Tensor] = None) -> Rows:  # fmt: skip
    """Rows over the full vocabulary; ``S`` from ``ids_c`` (``[R, K]``, -1 unused; a row without ids keeps
    everything) or ``trunc_c`` (recomputed), or everything (neither)."""
    cdt = compute_dtype(xc)
    xc = xc.to(cdt)
    wc = w.to(cdt) if wc is None else wc
    z, dzdu = _logits(xc, wc, None if bias is None else bias.to(cdt), temperature, softcap)
    r, v = z.shape
    tcol = tc.clamp(0, max(v - 1, 0))  # an out-of-range target (checks off) stays in bounds
    if trunc_c is not None:
        kept = keep_mask(z, trunc_c)
    elif ids_c is not None:
        used = ids_c >= 0
        kept = torch.zeros(r, v, dtype=torch.bool, device=z.device).scatter_(1, ids_c.clamp_min(0), used)
        kept |= ~used.any(-1, keepdim=True)  # no ids: no replay at that token
    else:
        kept = torch.ones(r, v, dtype=torch.bool, device=z.device)
    kept.scatter_(1, tcol[:, None], True)  # the target is always counted in S
    return Rows(z, dzdu, kept, tcol, None, xc, wc)


def _lse(z: Tensor, member: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    zm = z if member is None else z.masked_fill(~member, -math.inf)
    return zm, torch.logsumexp(zm, -1)


def _entropy(z: Tensor, zm: Tensor, lse: Tensor) -> Tensor:
    p = torch.exp(zm - lse[:, None])
    return lse - torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)  # a -inf logit never forms 0 * inf


def row_stats(rows: Rows, need_ent: bool, full_entropy: bool, need_full: bool) -> Stats:
    """The statistics of a chunk. ``full_entropy``: the entropy over the full row (full rows only);
    ``need_full``: also the full-row log-prob (the kept mass)."""
    z = rows.z
    zt = z.gather(1, rows.tcol[:, None]).squeeze(1)
    zm, lse = _lse(z, rows.kept)
    ent = lse_h = logp_full = None
    lse_f = None
    if rows.cols is None and (need_full or (need_ent and full_entropy)):
        zf, lse_f = _lse(z, None)
        logp_full = zt - lse_f
    if need_ent:
        if full_entropy and rows.cols is None:
            ent, lse_h = _entropy(z, zf, lse_f), lse_f
        else:
            ent, lse_h = _entropy(z, zm, lse), lse
    return Stats(zt - lse, lse, ent, lse_h, logp_full)


def row_du(rows: Rows, st: Stats, g_lp: Tensor, g_h: Optional[Tensor], full_entropy: bool) -> Tensor:
    """``du [R, C]``: the kept-set log-prob term (0 off S) plus the entropy term over its support."""
    z = rows.z
    zm = z.masked_fill(~rows.kept, -math.inf)
    p = torch.exp(zm - st.lse[:, None])
    dz = -g_lp[:, None] * p
    if g_h is not None and st.ent is not None:
        ph = torch.exp(z - st.lse_h[:, None]) if (full_entropy and rows.cols is None) else p
        shift = torch.where(ph > 0, z - st.lse_h[:, None] + st.ent[:, None], torch.zeros_like(z))
        dz = dz - g_h[:, None] * ph * shift
    dz = dz.scatter_add(1, rows.tcol[:, None], g_lp[:, None])
    return dz * rows.dzdu
