"""Kept-set log-probs and entropy over token chunks: the forward, the recomputing backward, and the autograd
Function of the core op (:class:`ReplayLogprob`). The one-pass schedule runs the same chunk loop with the
loss head's gradients formed in the forward (``fusedrl.onepass.replay``).

A :class:`Replay` says what each token keeps and which columns a chunk needs:

* the union path (``Replay.full`` False): explicit kept sets on every token and nothing over the full
  vocabulary wanted (``entropy_support="kept"`` or no entropy): per chunk ``x_c W[U]^T`` over the union ``U``
  of its kept ids and targets, ``dx_c = du W[U]``, ``dW`` / ``db`` scattered into the rows of ``U``;
* the full path: full logit rows per chunk; needed by a recomputed truncation (the kept set is not known
  before the row is), the full-vocabulary entropy, and tokens without a kept set.

Both recompute the logits in the backward (flat memory: ``O(N)`` saved per token).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from .masks import KeptSets
from .rows import Rows, Stats, compute_dtype, full_rows, row_du, row_stats, union_rows
from .truncation import Truncation

Tensor = torch.Tensor
Temperature = Union[float, Tensor]

__all__ = ["ENTROPY_SUPPORTS", "Replay", "make_replay", "replay_forward", "replay_backward", "chunk_rows",
           "chunk_stats", "ReplayLogprob"]  # fmt: skip

#: the supports of the returned (and regularised) entropy under replay
ENTROPY_SUPPORTS = ("full", "kept")
#: elements of fp32 temporaries per chunk (rows x columns): bounds the workspace of both paths
CHUNK_ELEMS = 2**24


class Replay(NamedTuple):
    """What the tokens keep: explicit ``kept`` sets or a recomputed ``trunc`` (one of them), the entropy's
    support, and whether the chunks take full rows (``full``) or the union of the kept ids."""

    kept: Optional[KeptSets]
    trunc: Optional[Truncation]
    entropy_support: str
    full: bool

    @property
    def full_entropy(self) -> bool:
        return self.entropy_support == "full"

    def rows(self, a: int, b: int) -> Replay:
        kept = None if self.kept is None else KeptSets(self.kept.ids[a:b], self.kept.counts[a:b])
        return self._replace(kept=kept, trunc=None if self.trunc is None else self.trunc.rows(a, b))

    def select(self, idx: Tensor) -> Replay:
        kept = None if self.kept is None else self.kept.select(idx)
        return self._replace(kept=kept, trunc=None if self.trunc is None else self.trunc.select(idx))

    def replayed(self) -> Tensor:
        """``[N]`` bool: the tokens normalised over a kept set (explicit ids, or an active truncation)."""
        if self.kept is not None:
            return self.kept.replay
        t = self.trunc
        on = [x for x in (t.top_k is not None and t.top_k > 0, t.top_p is not None and t.top_p < 1,
                          t.min_p is not None and t.min_p > 0) if x is not False]  # fmt: skip
        out = on[0]
        for x in on[1:]:
            out = out | x
        return out


def make_replay(kept: Optional[KeptSets], trunc: Optional[Truncation], entropy_support: str, need_ent: bool,
                vocab: int) -> Optional[Replay]:  # fmt: skip
    """The :class:`Replay` of checked inputs (None: no replay, also when no token's truncation is on). One host
    read: of the counts (whether every token has a kept set: the union path) or of the active truncation."""
    if kept is None and trunc is None:
        return None
    if kept is not None and trunc is not None:
        raise ValueError("sampling_mask and top_k / top_p / min_p exclude each other: give the captured masks or "
                         "the sampling parameters to recompute them, not both")  # fmt: skip
    if trunc is not None:
        if trunc.top_k is not None:  # k >= V keeps everything: off, like k <= 0
            trunc = trunc._replace(top_k=torch.where(trunc.top_k >= vocab, torch.zeros_like(trunc.top_k), trunc.top_k))
        probe = Replay(None, trunc, entropy_support, True)
        if not bool(probe.replayed().any()):
            return None
    full = trunc is not None or (need_ent and entropy_support == "full")
    if not full and kept.counts.numel():
        full = bool((kept.counts == 0).any())  # a token without a kept set needs its full row
    return Replay(kept, trunc, entropy_support, full)


def _rows_per_chunk(n: int, replay: Replay, v: int) -> int:
    if replay.full:
        return max(1, min(n, CHUNK_ELEMS // max(v, 1)))
    k = replay.kept.ids.shape[1]
    rows = int(math.sqrt(CHUNK_ELEMS / max(k, 1)))  # a union of `rows` sets of k ids: at most rows * k columns
    if rows * k > v:
        rows = CHUNK_ELEMS // max(v, 1)
    return max(1, min(n, rows))


def _temp_rows(temperature: Temperature, a: int, b: int, dtype):
    return temperature[a:b].to(dtype) if isinstance(temperature, Tensor) else temperature


def chunk_rows(x, w, bias, targets, replay: Replay, temperature, softcap, a: int, b: int) -> Rows:
    """The rows ``a:b`` over their columns (union or full)."""
    r = replay.rows(a, b)
    tr = _temp_rows(temperature, a, b, compute_dtype(x))
    if not replay.full:
        return union_rows(x[a:b], w, bias, targets[a:b], r.kept.ids, tr, softcap)
    ids = None if r.kept is None else r.kept.ids
    return full_rows(x[a:b], w, bias, targets[a:b], ids, r.trunc, tr, softcap)


def chunk_stats(rows: Rows, replay: Replay, need_ent: bool, need_full: bool) -> Stats:
    return row_stats(rows, need_ent, replay.full_entropy, need_full)


def replay_forward(x, w, bias, targets, replay: Replay, temperature, softcap, need_ent: bool,
                   need_full: bool = False) -> Stats:  # fmt: skip
    """Statistics of every token (``[N]``): log-prob over S, the LSEs, the entropy (``need_ent``), the full-row
    log-prob (``need_full``, full path only)."""
    cdt = compute_dtype(x)
    n, dev = x.shape[0], x.device

    def empty(on: bool):
        return torch.empty(n, dtype=cdt, device=dev) if on else None

    out = Stats(empty(True), empty(True), empty(need_ent), empty(need_ent), empty(need_full and replay.full))
    step = _rows_per_chunk(n, replay, w.shape[0])
    for a in range(0, n, step):
        b = min(n, a + step)
        st = chunk_stats(chunk_rows(x, w, bias, targets, replay, temperature, softcap, a, b), replay, need_ent,
                         need_full)  # fmt: skip
        for dst, src in zip(out, st):
            if dst is not None:
                dst[a:b] = src
    return out


def accumulate_grads(rows: Rows, du: Tensor, dx: Optional[Tensor], dw: Optional[Tensor], db: Optional[Tensor],
                     a: int, b: int) -> None:  # fmt: skip
    """``dx[a:b] = du W_cols``, ``dW[cols] += du^T x_c``, ``db[cols] += sum du``."""
    if dx is not None:
        dx[a:b] = du @ rows.wc
    if rows.cols is None:
        if dw is not None:
            dw.addmm_(du.t(), rows.xc)
        if db is not None:
            db += du.sum(0)
        return
    if dw is not None:
        dw.index_add_(0, rows.cols, du.t() @ rows.xc)
    if db is not None:
        db.index_add_(0, rows.cols, du.sum(0))


def replay_backward(x, w, bias, targets, replay: Replay, temperature, softcap, st: Stats, g_lp: Tensor,
                    g_h: Optional[Tensor], need_dx: bool, need_dw: bool, need_db: bool):  # fmt: skip
    """``(dx, dw, db)`` in the compute dtype (None where not asked), the logits recomputed per chunk."""
    cdt = compute_dtype(x)
    n, dev = x.shape[0], x.device
    dx = torch.zeros(x.shape, dtype=cdt, device=dev) if need_dx else None
    dw = torch.zeros(w.shape, dtype=cdt, device=dev) if need_dw else None
    db = torch.zeros(bias.shape, dtype=cdt, device=dev) if (need_db and bias is not None) else None
    step = _rows_per_chunk(n, replay, w.shape[0])
    for a in range(0, n, step):
        b = min(n, a + step)
        rows = chunk_rows(x, w, bias, targets, replay, temperature, softcap, a, b)
        sc = Stats(*(None if t is None else t[a:b] for t in st))
        du = row_du(rows, sc, g_lp[a:b], None if g_h is None else g_h[a:b], replay.full_entropy)
        accumulate_grads(rows, du, dx, dw, db, a, b)
    return dx, dw, db


class ReplayLogprob(torch.autograd.Function):
    """Kept-set log-prob / entropy: ``forward(x [N, H], w [V, H], bias [V] or None, targets [N], replay,
    temperature (float or [N]), softcap, need_ent) -> (logp [N], ent [N] or empty, logp_full [N] or empty)``
    in the compute dtype; ``logp_full`` (the full-row log-prob, full path only) is not differentiable."""

    @staticmethod
    def forward(ctx, x, w, bias, targets, replay, temperature, softcap, need_ent):
        st = replay_forward(x, w, bias, targets, replay, temperature, softcap, need_ent, need_full=True)
        t_vec = temperature if isinstance(temperature, Tensor) else None
        ctx.save_for_backward(x, w, bias, targets, t_vec, *(t if t is not None else None for t in st))
        ctx.args = (replay, None if t_vec is not None else temperature, softcap)
        empty = st.logp.new_empty(0)
        full = st.logp_full if st.logp_full is not None else empty
        ctx.mark_non_differentiable(full)
        return st.logp, st.ent if st.ent is not None else empty, full

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_full):
        x, w, bias, targets, t_vec, *saved = ctx.saved_tensors
        replay, t_float, softcap = ctx.args
        st = Stats(*saved)
        g_lp = torch.zeros_like(st.logp) if g_logp is None else g_logp.to(st.logp.dtype)
        g_h = None if (st.ent is None or g_ent is None) else g_ent.to(st.logp.dtype)
        need = ctx.needs_input_grad
        dx, dw, db = replay_backward(x, w, bias, targets, replay, t_vec if t_vec is not None else t_float, softcap,
                                     st, g_lp, g_h, need[0], need[1], need[2] and bias is not None)  # fmt: skip
        return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None)  # fmt: skip
