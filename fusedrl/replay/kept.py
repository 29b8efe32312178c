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

from typing import Callable, NamedTuple, Optional, Union

import torch

from .masks import KeptSets, as_kept_sets
from .rows import (
    Partials,
    Rows,
    Stats,
    compute_dtype,
    full_rows,
    local_ids,
    merge_partials,
    row_du,
    row_partials,
    single_merge,
    slot_grads,
    slot_rows,
    union_rows,
)
from .truncation import Truncation, check_truncation

Tensor = torch.Tensor
Temperature = Union[float, Tensor]

__all__ = [
    "ENTROPY_SUPPORTS",
    "Replay",
    "check_replay",
    "make_replay",
    "slot_layout_for",
    "replay_forward",
    "replay_backward",
    "chunk_rows",
    "chunk_stats",
    "rows_per_chunk",
    "chunk_bounds",
    "accumulate_grads",
    "Shard",
    "REPLAY_METRICS",
    "replay_to_args",
    "replay_from_args",
    "replay_metric_names",
    "replay_metrics",
    "replay_metrics_off",
    "ReplayLogprob",
]

#: the supports of the returned (and regularised) entropy under replay
ENTROPY_SUPPORTS = ("full", "kept")
#: elements of fp32 temporaries per chunk (rows x columns): bounds the workspace of both paths
CHUNK_ELEMS = 2**24
#: kept ids per chunk of the union path: its GEMMs have at most this many columns
UNION_COLS = 512
#: slots (rows x the padded kept width) per chunk of the slot layout
SLOT_ELEMS = 2**21


class Replay(NamedTuple):
    """What the tokens keep: explicit ``kept`` sets or a recomputed ``trunc`` (one of them), the entropy's
    support, and whether the chunks take full rows (``full``) or the union of the kept ids."""

    kept: Optional[KeptSets]
    trunc: Optional[Truncation]
    entropy_support: str
    full: bool
    slots: bool = False  # the union path on the slot layout (each row's own ids; sparse products)

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


def check_replay(
    sampling_mask,
    top_k,
    top_p,
    min_p,
    entropy_support,
    lead: tuple[int, ...],
    vocab: int,
    device: torch.device,
    checks: bool,
) -> tuple[Optional[KeptSets], Optional[Truncation], str]:
    """Check the replay arguments of the core op and the fused loss (errors name the argument):
    ``(kept sets or None, truncation or None, entropy support)``."""
    if not isinstance(entropy_support, str) or entropy_support not in ENTROPY_SUPPORTS:
        raise ValueError(f"entropy_support must be one of {ENTROPY_SUPPORTS}, got {entropy_support!r}")
    kept = None if sampling_mask is None else as_kept_sets(sampling_mask, lead, vocab, device, checks)
    trunc = check_truncation(top_k, top_p, min_p, lead, device, checks)
    return kept, trunc, entropy_support


def slot_layout_for(weight: Tensor) -> bool:
    """Whether the union path runs on the slot layout for this weight: on CPU in fp32 / fp64, where torch's
    sparse kernels (SDDMM, CSR x dense) cost what the kept ids hold and gathering ``W[U]`` does not (a union
    grows with the chunk's rows). Elsewhere (CUDA, 16-bit) the union path gathers."""
    return weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)


def make_replay(kept: Optional[KeptSets], trunc: Optional[Truncation], entropy_support: str, need_ent: bool,
                vocab: int, valid: Optional[Tensor] = None, slots: bool = False) -> Optional[Replay]:  # fmt: skip
    """The :class:`Replay` of checked inputs (None: no replay, also when no token's truncation is on). One host
    read: of the counts (whether every token has a kept set: the union path) or of the active truncation.
    ``slots``: the union path on the slot layout (:func:`slot_layout_for`)."""
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
    if not full and kept.counts.numel():  # a (valid) token without a kept set needs its full row
        empty = kept.counts == 0
        full = bool((empty if valid is None else empty & valid.reshape(-1)).any())
    return Replay(kept, trunc, entropy_support, full, slots and not full)


def rows_per_chunk(n: int, replay: Replay, v: int) -> int:
    """Token rows per chunk of the full path (``[rows, V]`` temporaries under :data:`CHUNK_ELEMS`)."""
    return max(1, min(n, CHUNK_ELEMS // max(v, 1)))


def chunk_bounds(n: int, replay: Replay, v: int) -> list[tuple[int, int]]:
    """``(a, b)`` token ranges of the chunk loop. Full path: fixed rows. Union path: consecutive tokens whose
    kept sets (target included) hold at most :data:`UNION_COLS` ids in all, so the union, and with it the
    GEMM's columns, follows ``K`` (one host read of the counts; the same ranges on every vocabulary shard)."""
    if replay.full:
        step = rows_per_chunk(n, replay, v)
        return [(a, min(n, a + step)) for a in range(0, n, step)]
    if replay.slots:  # rows x (padded width + the target) within SLOT_ELEMS: no host read
        step = max(1, SLOT_ELEMS // (replay.kept.ids.shape[1] + 1))
        return [(a, min(n, a + step)) for a in range(0, n, step)]
    ends = torch.cumsum((replay.kept.counts + 1).cpu(), 0)
    bounds, a = [], 0
    cap = CHUNK_ELEMS // max(min(v, UNION_COLS), 1)
    while a < n:  # each chunk ends at the last token whose running total stays within UNION_COLS
        base = int(ends[a - 1]) if a else 0
        b = int(torch.searchsorted(ends, base + UNION_COLS, right=True))
        b = min(n, max(b, a + 1), a + cap)
        bounds.append((a, b))
        a = b
    return bounds


def replay_to_args(replay: Optional[Replay]) -> tuple[list[Optional[Tensor]], Optional[str]]:
    """A replay as five optional tensors and one string (a custom op's arguments; ``([None] * 5, None)`` for
    none: a fixed length keeps the op's autograd structure)."""
    if replay is None:
        return [None] * 5, None
    k, t = replay.kept, replay.trunc
    tensors = [None if k is None else k.ids, None if k is None else k.counts]
    tensors += [None, None, None] if t is None else list(t)
    path = "full" if replay.full else ("slots" if replay.slots else "union")
    return tensors, f"{replay.entropy_support}:{path}"


def replay_from_args(tensors: list[Optional[Tensor]], mode: Optional[str]) -> Optional[Replay]:
    """The inverse of :func:`replay_to_args`."""
    if mode is None:
        return None
    support, path = mode.split(":")
    kept = None if tensors[0] is None else KeptSets(tensors[0], tensors[1])
    trunc = None if all(t is None for t in tensors[2:]) else Truncation(*tensors[2:])
    return Replay(kept, trunc, support, path == "full", path == "slots")


#: the metrics replay adds to the fused loss's: ``kept_mass`` only where the full path ran
REPLAY_METRICS = ("replay_frac", "kept_mass")


def replay_metric_names(replay: Replay) -> tuple[str, ...]:
    return REPLAY_METRICS if replay.full else REPLAY_METRICS[:1]


def replay_metrics(replay: Replay, valid: Tensor, logp: Tensor, logp_full: Optional[Tensor]) -> dict[str, Tensor]:
    """``replay_frac``: the fraction of valid tokens normalised over a kept set; ``kept_mass``: the mean over
    those of ``sum_{v in S} p_v`` under the full distribution, ``exp(logp_full - logp)`` (1 when none), known
    only where the full path ran. 0-dim fp32, no host sync."""
    on = replay.replayed().reshape(-1) & valid.reshape(-1)
    n = on.sum()
    out = {"replay_frac": (n.float() / valid.sum().clamp_min(1).float()).reshape(())}
    if replay.full:
        mass = torch.exp(logp_full.detach().reshape(-1) - logp.detach().reshape(-1)).clamp(max=1.0)
        tot = torch.where(on, mass, torch.zeros_like(mass)).sum()
        out["kept_mass"] = torch.where(n > 0, tot / n.clamp_min(1), torch.ones_like(tot)).float().reshape(())
    return out


def replay_metrics_off(device: torch.device) -> dict[str, Tensor]:
    """The replay metrics when replay was asked for but no token has a set (every truncation off): no token
    replayed, the full vocabulary kept."""
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return {"replay_frac": zero, "kept_mass": zero + 1.0}


class Shard(NamedTuple):
    """This rank's part of a vocabulary-parallel lm_head: its first global row, the merge of the shards' row
    statistics ``(lse, zt, ent) -> (LSE, logp, H)`` (a collective) and the reduction of the partial ``dx``
    (None: return it partial)."""

    start: int
    merge: Callable[[Tensor, Tensor, Optional[Tensor]], tuple[Tensor, Tensor, Optional[Tensor]]]
    reduce_dx: Optional[Callable[[Tensor], None]]


def _temp_rows(temperature: Temperature, a: int, b: int, dtype):
    return temperature[a:b].to(dtype) if isinstance(temperature, Tensor) else temperature


def chunk_rows(x, w, bias, targets, replay: Replay, temperature, softcap, a: int, b: int,
               shard: Optional[Shard] = None) -> Rows:  # fmt: skip
    """The rows ``a:b`` over their columns (union or full; this shard's under a vocabulary-parallel head)."""
    r = replay.rows(a, b)
    tr = _temp_rows(temperature, a, b, compute_dtype(x))
    v = w.shape[0]
    start = 0 if shard is None else shard.start
    tc = local_ids(targets[a:b], start, v)  # -1 where not held; an out-of-range target (checks off) nowhere
    ids = None if r.kept is None else r.kept.ids
    if shard is not None:
        ids = None if ids is None else local_ids(ids, shard.start, v)
    if replay.slots:
        return slot_rows(x[a:b], w, bias, tc, ids, tr, softcap)
    if not replay.full:
        return union_rows(x[a:b], w, bias, tc, ids, tr, softcap)
    replayed = None if r.kept is None else r.kept.replay
    return full_rows(x[a:b], w, bias, tc, ids, r.trunc, tr, softcap, replayed)


def chunk_partials(rows: Rows, replay: Replay, need_ent: bool, need_full: bool) -> Partials:
    return row_partials(rows, need_ent, replay.full_entropy, need_full)


def chunk_stats(rows: Rows, replay: Replay, need_ent: bool, need_full: bool) -> Stats:
    """One chunk's merged statistics (one shard: the one-pass loop)."""
    return merge_partials(chunk_partials(rows, replay, need_ent, need_full), replay.full_entropy)


def replay_forward(x, w, bias, targets, replay: Replay, temperature, softcap, need_ent: bool,
                   need_full: bool = False, shard: Optional[Shard] = None) -> Stats:  # fmt: skip
    """Statistics of every token (``[N]``): log-prob over S, the LSEs, the entropy (``need_ent``), the full-row
    log-prob (``need_full``, full path only); merged across the shards (one collective) under ``shard``."""
    n = x.shape[0]
    parts = []
    for a, b in chunk_bounds(n, replay, w.shape[0]):
        rows = chunk_rows(x, w, bias, targets, replay, temperature, softcap, a, b, shard)
        parts.append(chunk_partials(rows, replay, need_ent, need_full and replay.full))
    if not parts:

        def e():  # distinct tensors: autograd marks the full-row log-prob alone non-differentiable
            return torch.empty(0, dtype=compute_dtype(x), device=x.device)

        return Stats(e(), e(), e() if need_ent else None, e() if need_ent else None,
                     e() if need_full and replay.full else None)  # fmt: skip
    cat = Partials(*(None if p[0] is None else torch.cat(p) for p in zip(*parts)))
    return merge_partials(cat, replay.full_entropy, single_merge if shard is None else shard.merge)


def accumulate_grads(rows: Rows, du: Tensor, dx: Optional[Tensor], dw: Optional[Tensor], db: Optional[Tensor],
                     a: int, b: int, w: Tensor) -> None:  # fmt: skip
    """``dx[a:b] = du W_cols``, ``dW[cols] += du^T x_c``, ``db[cols] += sum du`` (``w``: the weight, read by the
    slot layout's sparse products)."""
    if rows.cols is not None and rows.cols.dim() == 2:  # the slot layout
        if dx is None and dw is None and db is None:
            return
        gx, cols, vals = slot_grads(rows, du, w, dw, dx is not None)
        if dx is not None:
            dx[a:b] = gx
        if db is not None:
            db.index_add_(0, cols, vals)
        return
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
                    g_h: Optional[Tensor], need_dx: bool, need_dw: bool, need_db: bool,
                    shard: Optional[Shard] = None):  # fmt: skip
    """``(dx, dw, db)`` in the compute dtype (None where not asked), the logits recomputed per chunk with the
    merged statistics ``st``; under ``shard`` ``dx`` is reduced across the shards (or left partial)."""
    cdt = compute_dtype(x)
    n, dev = x.shape[0], x.device
    dx = torch.zeros(x.shape, dtype=cdt, device=dev) if need_dx else None
    dw = torch.zeros(w.shape, dtype=cdt, device=dev) if need_dw else None
    db = torch.zeros(bias.shape, dtype=cdt, device=dev) if (need_db and bias is not None) else None
    for a, b in chunk_bounds(n, replay, w.shape[0]):
        rows = chunk_rows(x, w, bias, targets, replay, temperature, softcap, a, b, shard)
        sc = Stats(*(None if t is None else t[a:b] for t in st))
        du = row_du(rows, sc, g_lp[a:b], None if g_h is None else g_h[a:b], replay.full_entropy)
        accumulate_grads(rows, du, dx, dw, db, a, b, w)
    if dx is not None and shard is not None and shard.reduce_dx is not None:
        shard.reduce_dx(dx)
    return dx, dw, db


class ReplayLogprob(torch.autograd.Function):
    """Kept-set log-prob / entropy: ``forward(x [N, H], w [V, H], bias [V] or None, targets [N], replay,
    temperature (float or [N]), softcap, need_ent, shard) -> (logp [N], ent [N] or empty, logp_full [N] or
    empty)`` in the compute dtype; ``logp_full`` (the full-row log-prob, full path only) is not differentiable.
    ``shard``: this rank's :class:`Shard` of a vocabulary-parallel ``w`` (None: the whole vocabulary)."""

    @staticmethod
    def forward(ctx, x, w, bias, targets, replay, temperature, softcap, need_ent, shard=None):
        st = replay_forward(x, w, bias, targets, replay, temperature, softcap, need_ent, True, shard)
        t_vec = temperature if isinstance(temperature, Tensor) else None
        ctx.save_for_backward(x, w, bias, targets, t_vec, *st)
        ctx.args = (replay, None if t_vec is not None else temperature, softcap, shard)
        empty = st.logp.new_empty(0)
        full = st.logp_full if st.logp_full is not None else empty
        ctx.mark_non_differentiable(full)
        return st.logp, st.ent if st.ent is not None else empty, full

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_full):
        x, w, bias, targets, t_vec, *saved = ctx.saved_tensors
        replay, t_float, softcap, shard = ctx.args
        st = Stats(*saved)
        g_lp = torch.zeros_like(st.logp) if g_logp is None else g_logp.to(st.logp.dtype)
        g_h = None if (st.ent is None or g_ent is None) else g_ent.to(st.logp.dtype)
        need = ctx.needs_input_grad
        dx, dw, db = replay_backward(x, w, bias, targets, replay, t_vec if t_vec is not None else t_float, softcap,
                                     st, g_lp, g_h, need[0], need[1], need[2] and bias is not None,
                                     shard)  # fmt: skip
        return (None if dx is None else dx.to(x.dtype), None if dw is None else dw.to(w.dtype),
                None if db is None else db.to(bias.dtype), None, None, None, None, None, None)  # fmt: skip
