"""How the one-pass schedule runs a batch: its memory budget, which schedule (one pass, two passes, or
recompute for ``schedule="auto"``), the token chunks, the GEMM 3 group and whether GEMM 3 is deferred to
the backward, searched over the cost model of :mod:`fusedrl.onepass.cost` (docs/one-pass.md, "The
planner"). Host arithmetic only. ``auto`` takes the recompute schedule where the modeled one-pass time is
the larger.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple, Optional

import torch

from .. import _config
from ..backends.device import ARCH_FACTS, memory_now
from ..loss import PolicyLossConfig, head_kind
from .cost import (
    PER_TOKEN_BYTES,
    Model,
    Setting,
    du_row_stride,
    memory_parts,
    model,
    ws_row_stride,
)

MIB = 2**20
_CPU_BUDGET = 512 * MIB
_GPU_BUDGET_CAP = 4096 * MIB
# auto takes one_pass only when a chunk holds at least this many rows (fewer starve the GEMMs)
_MIN_ROWS = 64


def defers_dw(n: int, h: int, v: int, x_dtype: torch.dtype, kind: str, need_dw: bool, budget: float = math.inf,
              need_dx: bool = True) -> bool:  # fmt: skip
    """Whether the one-pass run defers GEMM 3 to the backward: it keeps the 16-bit du of every token (``N``
    rows of :func:`du_row_stride`) instead of the fp32 ``dW`` accumulator, when that takes no more bytes,
    and the backward forms ``dW = du^T @ (g·x)`` in one GEMM with the upstream gradient ``g`` folded into
    the small operand: no accumulator read-modify-write, no finish over ``dW``.

    bf16 inputs only (``g·x`` in fp16 overflows under a GradScaler's scale), heads that always run one pass
    (``kind`` token-level or selection: the two-pass form cannot give du rows), and a ``budget`` that holds
    the deferred run's least memory (du, dx32, 64-row workspace or the backward's ``g·x``; below it the
    accumulating plan's smaller buffers may still fit). A pure function of the op's arguments: its fake
    implementation and its autograd agree with the run on the output it returns."""
    if not (need_dw and x_dtype == torch.bfloat16 and kind in ("token", "selection")):
        return False
    du = n * du_row_stride(v) * 2
    least = du + (n * h * 4 if need_dx else 0) + n * PER_TOKEN_BYTES
    least += max(min(n, _MIN_ROWS) * ws_row_stride(v) * 4, n * h * 6)  # a 64-row workspace, or the backward's g·x
    return du <= v * h * 4 and least <= budget


# --------------------------------------------------------------------------------------------------
# The budget
# --------------------------------------------------------------------------------------------------


def _quantize(b: float) -> float:
    """Round a byte count down to a quarter octave (2^k·{1, 1.25, 1.5, 1.75}): a budget that follows free
    memory then changes the plan only when free memory moves by a step, not at every step."""
    if not b > 0 or math.isinf(b):
        return b
    k = 2.0 ** math.floor(math.log2(b))
    return k * math.floor(4 * b / k) / 4


@torch.compiler.assume_constant_result  # torch.compile: decided at trace time (environment, driver query)
def default_budget_bytes(device: torch.device) -> float:
    """The schedule's memory budget in bytes: the environment's (``fusedrl._config``) when set, else
    512 MiB on CPU and ``min(4 GiB, usable / 4)`` on a GPU, with ``usable`` read at this call
    (:func:`fusedrl.backends.device.memory_now`: driver free plus the cached bytes the allocator can
    hand out as one block; no device sync) and rounded down to a quarter octave. ``inf``: no limit.
    The budget bounds everything the schedule allocates beyond the gradients it returns."""
    mb = _config.get("memory_budget_mb")
    if mb is not None:
        return mb * MIB
    if device.type == "cuda":
        mem = memory_now(device)
        if mem is not None:
            return float(_quantize(min(_GPU_BUDGET_CAP, mem.usable / 4)))
    return float(_CPU_BUDGET)


def budget_bytes(memory_budget_mb, device: torch.device) -> float:
    """``memory_budget_mb`` (a positive number, ``inf`` = no limit, or None: the default) in bytes."""
    if memory_budget_mb is None:
        return default_budget_bytes(device)
    return float(memory_budget_mb) * MIB


# --------------------------------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------------------------------


class Plan(NamedTuple):
    schedule: str  # "one_pass" | "two_pass" | "recompute"
    chunks: tuple[tuple[int, int, Optional[tuple[int, int]]], ...]  # (start, stop, whole sequences)
    reason: str
    ring_rows: int = 0  # rows of du per GEMM 3 call (the ring); 0: one call per chunk
    model: Optional[Model] = None
    fits: bool = True  # False: an explicit one_pass over the budget (one row per chunk)
    deferred: bool = False  # GEMM 3 in the backward over the du of every token (defers_dw)


def _sequence_chunks(rows: int, n: int, seq_len: Optional[int], cu: Optional[tuple[int, ...]]):
    """Chunks of whole sequences with at most ``rows`` tokens each, or None when one does not fit."""
    if n == 0:  # no token (B = 0, T = 0 or an empty pack): one empty chunk of the whole batch
        return ((0, 0, None),)
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


def _counts(n: int) -> list[int]:
    """Candidate chunk counts: every count up to 32, then geometric steps of 1/8 to ``n``."""
    out, c = list(range(1, min(n, 32) + 1)), 32.0
    while c < n:
        c = min(float(n), math.ceil(c * 1.125))
        out.append(int(c))
    return out


def _memory_line(n, h, v, x_dtype, s, k_sel) -> tuple[int, int, int]:
    """``(A, B, C)`` with memory ``A + B·rows + C·ring_rows`` for ``ring_rows >= rows`` (every buffer of an
    accumulating run is linear in the two)."""

    def mem(r, ring):
        return sum(b for _, b in memory_parts(n, h, v, x_dtype, r, ring, s, k_sel))

    a = mem(0, 0)
    c = mem(0, 1) - a
    return a, mem(1, 1) - a - c, c


def _fits(n, h, v, x_dtype, rows, ring_rows, s, k_sel, budget, deferred=False) -> bool:
    return sum(b for _, b in memory_parts(n, h, v, x_dtype, rows, ring_rows, s, k_sel, deferred)) <= budget


#: plans whose modeled time is within this fraction of the fastest count as ties: the one with the
#: fewest bytes wins (a bigger workspace that buys microseconds is not worth the memory)
_TIE = 0.001


@functools.lru_cache(maxsize=256)
def _token_plan(n: int, h: int, v: int, x_dtype: torch.dtype, s: Setting, budget: float, k_sel: int,
                deferred: bool = False):  # fmt: skip
    """``(rows, ring_rows, Model)`` of least modeled time under ``budget`` for freely chunked tokens (ties
    within :data:`_TIE`: fewest bytes), or None when no chunking fits."""
    a, b, c = (0, 0, 0) if deferred else _memory_line(n, h, v, x_dtype, s, k_sel)
    found = []
    for count in _counts(n):
        rows = -(-n // count)
        count = -(-n // rows)
        if deferred:  # the ring is every token; memory is not linear in the rows (the backward's g·x counts
            # beyond the forward's buffers)
            if not _fits(n, h, v, x_dtype, rows, n, s, k_sel, budget, True):
                continue
            ring = n
        else:
            room = budget - a - b * rows
            if room < c * rows:
                continue
            g = 1
            if s.dw and count > 1 and c > 0:  # the largest ring that fits, then the smallest with as few GEMM 3 calls
                g = count if math.isinf(room) else min(count, int(room // (c * rows)))
                g = -(-count // -(-count // g))
            ring = g * rows
        chunk_rows = ((rows, n // rows), (n % rows, 1))
        found.append((rows, ring, model(n, h, v, x_dtype, chunk_rows, ring, s, k_sel, deferred)))
    if not found:
        return None
    # chunks below the GEMMs' minimum only where nothing larger fits (the roofline prices small GEMMs too
    # kindly for the fewest-bytes tie break)
    found = [f for f in found if f[0] >= min(n, _MIN_ROWS)] or found
    fastest = min(m.total_ms for _, _, m in found)
    return min((f for f in found if f[2].total_ms <= fastest * (1 + _TIE)), key=lambda f: (f[2].memory_bytes, -f[0]))


# fp16 has bf16's precision but not its range: the one-pass (and two-pass) schedules round du to fp16 in
# the forward, at loss scale 1, so the per-token weights of a mean over many tokens (1/N) push most of it
# below fp16's normal range before a GradScaler's scale can reach it (the backward only scales the
# stored gradients). The recompute schedule forms du in the backward, from the scaled upstream gradient.
_FP16_WHY = (
    "fp16 gradients formed in the forward would underflow before a GradScaler's loss scale reaches "
    "them; the recompute schedule forms them from the scaled upstream gradient"
)


def selection_rows(cfg: PolicyLossConfig, n: int) -> int:
    """Rows the Clip-Cov / KL-Cov correction recomputes (0 for other modes): a host bound, local tokens."""
    if cfg.loss_mode == "clip_cov":
        return min(n, max(1, int(cfg.clip_cov_ratio * n)))
    if cfg.loss_mode == "kl_cov":
        return min(n, max(1, int(cfg.kl_cov_ratio * n)))
    return 0


def plan(
    n: int,
    h: int,
    v: int,
    x_dtype: torch.dtype,
    cfg: PolicyLossConfig,
    schedule: str,
    budget: float,
    seq_len: Optional[int] = None,
    cu_host: Optional[list[int]] = None,
    setting: Optional[Setting] = None,
    defer: Optional[bool] = None,
) -> Plan:
    """Which schedule runs (``one_pass``, ``two_pass`` or, for ``schedule="auto"`` only, ``recompute``),
    its token chunks and its du ring, by the loss head's kind (:func:`fusedrl.loss.head_kind`) and the cost
    model (module docstring) under ``budget`` bytes:

    * token-local and selection losses: the chunk rows and ring (GEMM 3 group) of least modeled time
      that fit; ``auto`` takes recompute where that time exceeds the modeled recompute schedule's or
      a chunk would hold fewer than 64 rows;
    * sequence-level losses: chunks of whole sequences (``seq_len`` of padded inputs, ``cu_host`` of
      packed ones) as large as fit, or two passes when one does not fit (``auto``: recompute);
    * batch-statistic losses (entropy quantile): always two passes.

    fp16 inputs: ``auto`` takes recompute (see ``_FP16_WHY``); an explicit ``one_pass`` runs and warns.
    ``setting`` (:class:`Setting`): the run's epilogue, device and gradients (default: the torch epilogue
    with the CPU rates). Explicit ``one_pass`` runs even when nothing fits (one row per chunk). ``defer``:
    whether GEMM 3 is deferred to the backward (None: where :func:`defers_dw` says so; False: never, as
    sampling replay's loop; True: the retries of a deferred run, whose output is already decided)."""
    if x_dtype == torch.float16:
        if schedule == "auto":
            return Plan("recompute", (), _FP16_WHY)
        warnings.warn(f"fusedrl: schedule='one_pass' with fp16 inputs: {_FP16_WHY}", UserWarning, stacklevel=2)
    s = setting if setting is not None else Setting()
    kind = head_kind(cfg)
    k_sel = selection_rows(cfg, n) if kind == "selection" else 0
    if kind == "batch":  # a statistic of the whole batch first (entropy quantile, ...): always two passes
        return Plan("two_pass", (), "the loss needs whole-batch statistics of logp / entropy first")
    if kind == "speculative" and s.facts.name != ARCH_FACTS["cpu"].name:
        # BAPO's one pass reads the number of clipped tokens on the host: on a GPU the two passes (no sync)
        return Plan("two_pass", (), "BAPO's bound search: two passes on a GPU (the one-pass correction syncs)")
    low = x_dtype in (torch.float16, torch.bfloat16)
    if kind == "sequence":
        return _sequence_plan(n, h, v, x_dtype, s, budget, schedule, seq_len, cu_host, low)
    if defer is None:
        deferred = defers_dw(n, h, v, x_dtype, kind, s.dw, budget, s.dx)
    else:
        deferred = defer and defers_dw(n, h, v, x_dtype, kind, s.dw)
    found = _token_plan(n, h, v, x_dtype, s, float(budget), k_sel, deferred) if n > 0 else None
    if found is None or found[0] < min(n, _MIN_ROWS):
        if schedule == "auto":
            return Plan("recompute", (), f"workspace of {min(n, _MIN_ROWS)} rows + accumulators exceed the "
                                         f"{budget / MIB:.0f} MiB budget")  # fmt: skip
        if found is None:
            ring = n if deferred else 1
            m = model(n, h, v, x_dtype, ((1, n),), ring, s, k_sel, deferred) if n else None
            return Plan("one_pass", _even_chunks(n, 1), "over the budget: one row per chunk", ring, m, False, deferred)
    rows, ring, m = found
    if schedule == "auto" and m.total_ms > m.recompute_ms:
        return Plan("recompute", (), f"modeled one-pass {m.total_ms:.3g} ms > recompute {m.recompute_ms:.3g} ms")
    chunks = _even_chunks(n, rows)
    how = "GEMM 3 once in the backward" if deferred else f"GEMM 3 every {ring // rows}"
    return Plan("one_pass", chunks, f"{len(chunks)} chunk(s) of <= {rows} rows, {how}", ring, m, deferred=deferred)


def _even_chunks(n: int, rows: int) -> tuple[tuple[int, int, None], ...]:
    """Token chunks of ``rows`` rows (the last one shorter); one empty chunk when there is no token."""
    return tuple((a, min(n, a + rows), None) for a in range(0, n, rows)) or ((0, 0, None),)


def smallest(pln: Plan, n: int) -> Plan:
    """``pln`` (a deferred plan) with chunks of 64 rows: the last try after running out of memory, for runs
    whose output is the du of every token, which only the one-pass loop forms."""
    why = f"out of memory: chunks of {_MIN_ROWS} rows"
    return pln._replace(chunks=_even_chunks(n, _MIN_ROWS), reason=why, model=None, fits=False)


def _sequence_plan(n, h, v, x_dtype, s, budget, schedule, seq_len, cu_host, low) -> Plan:
    """Whole-sequence chunks, as many rows as fit (one GEMM 3 per chunk: the chunk is the ring)."""
    lo, hi = 0, max(n, 1)
    while lo < hi:  # the most rows per chunk that fit
        mid = (lo + hi + 1) // 2
        if _fits(n, h, v, x_dtype, mid, mid, s, 0, budget):
            lo = mid
        else:
            hi = mid - 1
    rows = lo
    if schedule == "auto" and rows < min(n, _MIN_ROWS):
        return Plan("recompute", (), f"workspace of {min(n, _MIN_ROWS)} rows + accumulators exceed the "
                                     f"{budget / MIB:.0f} MiB budget")  # fmt: skip
    chunks = _sequence_chunks(max(rows, 1), n, seq_len, None if cu_host is None else tuple(cu_host))
    if chunks is None or rows == 0:
        if schedule == "auto":
            return Plan("recompute", (), "a sequence does not fit the workspace")
        return Plan("two_pass", (), "a sequence does not fit the workspace")
    most = max(b - a for a, b, _ in chunks)
    m = model(n, h, v, x_dtype, tuple(b - a for a, b, _ in chunks), most, s)
    if schedule == "auto" and m.total_ms > m.recompute_ms:
        return Plan("recompute", (), f"modeled one-pass {m.total_ms:.3g} ms > recompute {m.recompute_ms:.3g} ms")
    return Plan("one_pass", chunks, f"{len(chunks)} chunk(s) of whole sequences", most, m)
