"""Sampling replay on the one-pass schedule: the chunk loop of :mod:`fusedrl.replay.kept` with the loss head's
gradients formed in the forward, so each chunk's logits (over the union of its kept ids, or full rows) are
computed once. docs/replay.md describes the paths.

By the head's kind (:func:`fusedrl.loss.head_kind`):

* ``token``: any chunking (the replay engine's, sized to its temporaries);
* ``selection`` (Clip-Cov / KL-Cov): the same loop with the unselected terms, then the picked tokens' rows again
  with their correction ``d(L_sel - L_unsel)/d logp`` as the upstream gradient (at most ``k_max`` rows);
* ``sequence``: the plan's chunks (whole sequences);
* ``batch``: the scoring forward, the head over the whole batch, then the recomputing backward.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..loss import TokenHead
from ..replay.kept import (
    Replay,
    accumulate_grads,
    chunk_bounds,
    chunk_rows,
    chunk_stats,
    replay_backward,
    replay_forward,
)
from ..replay.rows import Stats, compute_dtype, row_du
from .plan import Plan
from .run import Grads, selection_rows

Tensor = torch.Tensor

__all__ = ["run_replay"]


#: token rows whose chunks share one call of the loss head (its per-call cost is autograd's, not the rows')
GROUP_ROWS = 4096
#: elements kept between the chunks' statistics and their gradient within a group (logits and their
#: temporaries, and the union path's gathered weight rows)
GROUP_ELEMS = 2**23


def _groups(head: TokenHead, pln: Plan, n: int, replay: Replay, v: int, h: int):
    """Groups of chunks ``[(a, b, seqs), ...]`` sharing one head call: the plan's whole-sequence chunks one
    by one for the sequence kind; else the engine's chunks, consecutive ones together up to ``GROUP_ROWS``
    rows and ``GROUP_ELEMS`` logits."""
    if head.kind == "sequence":
        return [[(a, b, seqs)] for a, b, seqs in pln.chunks if b > a]
    groups, cur, rows, elems = [], [], 0, 0
    width = v if replay.full else None
    for a, b in chunk_bounds(n, replay, v):
        if width is not None:  # full rows
            e = 3 * (b - a) * width  # z, dz/du, p
        elif replay.slots:  # each row's own slots, no weight copy
            e = 3 * (b - a) * (replay.kept.ids.shape[1] + 1)
        else:  # the union's columns and its gathered weight rows
            cols = min(v, int(replay.kept.counts[a:b].sum()) + (b - a))
            e = 3 * (b - a) * cols + cols * h
        if cur and (rows + b - a > GROUP_ROWS or elems + e > GROUP_ELEMS):
            groups.append(cur)
            cur, rows, elems = [], 0, 0
        cur.append((a, b, None))
        rows, elems = rows + b - a, elems + e
    if cur:
        groups.append(cur)
    return groups


def run_replay(
    x: Tensor,
    w: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    head: TokenHead,
    pln: Plan,
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    replay: Replay,
    keys: Optional[Tensor],
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    want_entropy: bool,
) -> tuple[Grads, Tensor, Optional[Tensor]]:
    """The loss, metrics and gradients (compute dtype) of the fused loss on kept sets, the kept-set log-probs,
    and the full-row log-probs where the full path ran (None on the union path: the kept mass is not known
    there)."""
    n, v = x.shape[0], w.shape[0]
    cdt = compute_dtype(x)
    dev = x.device
    grads = need_dx or need_dw or need_db
    need_ent = want_entropy or head.entropy_has_grad or head.needs_entropy
    if head.kind in ("batch", "speculative") or not grads or (head.kind == "sequence" and not pln.chunks):
        st = replay_forward(x, w, bias, targets, replay, temperature, softcap, need_ent, need_full=True)
        loss, metrics, picked = head.evaluate(st.logp, st.ent, keys)
        dx = dw = db = None
        if grads:
            g_lp, g_h = head.grads(0, n, st.logp, st.ent, (0, head.seg.B))
            dx, dw, db = replay_backward(x, w, bias, targets, replay, temperature, softcap, st, g_lp.to(cdt),
                                         None if g_h is None else g_h.to(cdt), need_dx, need_dw, need_db)  # fmt: skip
        return Grads(loss, metrics, dx, dw, db), st.logp, st.logp_full
    logp = torch.empty(n, dtype=cdt, device=dev)
    ent = torch.empty(n, dtype=cdt, device=dev) if need_ent else None
    full = torch.empty(n, dtype=cdt, device=dev) if replay.full else None
    saved = [] if head.kind == "selection" else None  # the LSEs, for the picked rows' correction
    dx = torch.empty(n, x.shape[1], dtype=cdt, device=dev) if need_dx else None
    dw = torch.zeros(w.shape, dtype=cdt, device=dev) if need_dw else None
    db = torch.zeros(bias.shape, dtype=cdt, device=dev) if (need_db and bias is not None) else None
    for group in _groups(head, pln, n, replay, v, x.shape[1]):
        parts = []
        for a, b, _ in group:  # the chunks' logits and statistics, kept until the group's head call
            rows = chunk_rows(x, w, bias, targets, replay, temperature, softcap, a, b)
            st = chunk_stats(rows, replay, need_ent, need_full=full is not None)
            logp[a:b] = st.logp
            if ent is not None:
                ent[a:b] = st.ent
            if full is not None:
                full[a:b] = st.logp_full
            if saved is not None:
                saved.append(st)
            parts.append((a, b, rows, st))
        g0, g1, seqs = group[0][0], group[-1][1], group[0][2]
        g_lp, g_h = head.grads(g0, g1, logp[g0:g1], None if ent is None else ent[g0:g1], seqs)
        for a, b, rows, st in parts:
            gh = None if g_h is None else g_h[a - g0 : b - g0].to(cdt)
            du = row_du(rows, st, g_lp[a - g0 : b - g0].to(cdt), gh, replay.full_entropy)
            accumulate_grads(rows, du, dx, dw, db, a, b, w)
        del parts
    loss, metrics, picked = head.evaluate(logp, ent, keys)
    if picked is not None:
        _correct_selection(head, picked, x, w, bias, targets, replay, temperature, softcap, logp, ent, saved, dx, dw,
                           db)  # fmt: skip
    return Grads(loss, metrics, dx, dw, db), logp, full


def _correct_selection(head, picked, x, w, bias, targets, replay, temperature, softcap, logp, ent, saved, dx, dw, db):
    """Clip-Cov / KL-Cov: the picked tokens' rows again, upstream gradient ``d(L_sel - L_unsel)/d logp``."""
    fix = selection_rows(head, picked, logp)
    if fix is None:
        return
    idx, dg = fix[0], fix[1].to(logp.dtype)
    st = Stats(*(None if parts[0] is None else torch.cat(parts).index_select(0, idx) for parts in zip(*saved)))
    xs, ts = x.index_select(0, idx), targets.index_select(0, idx)
    tr = temperature.index_select(0, idx) if isinstance(temperature, Tensor) else temperature
    sub = replay.select(idx)
    cdx, cdw, cdb = replay_backward(xs, w, bias, ts, sub, tr, softcap, st, dg, None, dx is not None, dw is not None,
                                    db is not None)  # fmt: skip
    if dx is not None:
        dx.index_add_(0, idx, cdx)
    if dw is not None:
        dw += cdw
    if db is not None:
        db += cdb
