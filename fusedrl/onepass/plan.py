"""How the one-pass schedule runs a batch: its memory budget, which schedule (one pass, two passes, or
recompute for ``schedule="auto"``) and the token chunks. Host arithmetic only."""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch

from .. import _config
from ..backends import torch_backend
from ..backends.device import usable_memory
from ..loss import PolicyLossConfig, head_kind

MIB = 2**20
_CPU_BUDGET = 512 * MIB
_GPU_BUDGET_CAP = 4096 * MIB
# auto takes one_pass only when a chunk holds at least this many rows (fewer starve the GEMMs)
_MIN_ROWS = 64


@torch.compiler.assume_constant_result  # torch.compile: decided at trace time (environment, driver query)
def default_budget_bytes(device: torch.device) -> float:
    """The schedule's memory budget in bytes: the environment's (``fusedrl._config``) when set, else
    512 MiB on CPU and ``min(4 GiB, free / 4)`` on a GPU (workspace plus the fp32 accumulators; gradients
    excluded), the free memory as read at the process's first call for the device. ``inf``: no limit."""
    mb = _config.get("memory_budget_mb")
    if mb is not None:
        return mb * MIB
    if device.type == "cuda":
        mem = usable_memory(device)  # read once per process: the same chunks (same bits) every step
        if mem is not None:
            return float(min(_GPU_BUDGET_CAP, mem[0] // 4))
    return float(_CPU_BUDGET)


def budget_bytes(memory_budget_mb, device: torch.device) -> float:
    """``memory_budget_mb`` (a positive number, ``inf`` = no limit, or None: the default) in bytes."""
    if memory_budget_mb is None:
        return default_budget_bytes(device)
    return float(memory_budget_mb) * MIB


class Plan(NamedTuple):
    schedule: str  # "one_pass" | "two_pass" | "recompute"
    chunks: tuple[tuple[int, int, Optional[tuple[int, int]]], ...]  # (start, stop, whole sequences)
    reason: str


def _row_bytes(v: int, cdt_size: int, low_precision: bool) -> int:
    """Workspace bytes per chunk row: U and the scratch (compute dtype), a block temporary, the 16-bit
    GEMM operand."""
    tmp_cols = torch_backend.onepass_scratch_shapes(1, v)[1][1]
    return v * (2 * cdt_size + (2 if low_precision else 0)) + tmp_cols * cdt_size


def _fixed_bytes(n: int, h: int, v: int, low_precision: bool) -> int:
    """fp32 accumulators: dW and dx (16-bit inputs: both held in fp32 until the backward, beyond the
    16-bit gradients themselves) and db."""
    return ((v + n) * h * 4 if low_precision else 0) + v * 4


def _sequence_chunks(rows: int, n: int, seq_len: Optional[int], cu: Optional[list[int]]):
    """Chunks of whole sequences with at most ``rows`` tokens each, or None when one does not fit."""
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


# fp16 has bf16's precision but not its range: the one-pass (and two-pass) schedules round du to fp16 in
# the forward, at loss scale 1, so the per-token weights of a mean over many tokens (1/N) push most of it
# below fp16's normal range before a GradScaler's scale can reach it (the backward only scales the
# stored gradients). The recompute schedule forms du in the backward, from the scaled upstream gradient.
_FP16_WHY = (
    "fp16 gradients formed in the forward would underflow before a GradScaler's loss scale reaches "
    "them; the recompute schedule forms them from the scaled upstream gradient"
)


def plan(
    n: int,
    h: int,
    v: int,
    x_dtype: torch.dtype,
    cfg: PolicyLossConfig,
    schedule: str,
    budget: int,
    seq_len: Optional[int] = None,
    cu_host: Optional[list[int]] = None,
) -> Plan:
    """Which schedule runs (``one_pass``, ``two_pass`` or, for ``schedule="auto"`` only, ``recompute``)
    and its token chunks, by the loss head's kind (:func:`fusedrl.loss.head_kind`): token-local and
    selection losses chunk freely; sequence-level losses take chunks of whole sequences (``seq_len`` of
    padded inputs, ``cu_host`` of packed ones), or two passes when one does not fit (``auto``: recompute);
    batch-statistic losses (entropy quantile) always take two passes. fp16 inputs: ``auto`` takes recompute
    (see ``_FP16_WHY``); an explicit ``one_pass`` runs and warns. Host arithmetic only."""
    if x_dtype == torch.float16:
        if schedule == "auto":
            return Plan("recompute", (), _FP16_WHY)
        warnings.warn(f"fusedrl: schedule='one_pass' with fp16 inputs: {_FP16_WHY}", UserWarning, stacklevel=2)
    low = x_dtype in (torch.float16, torch.bfloat16)
    csize = 8 if x_dtype == torch.float64 else 4
    per_row = _row_bytes(v, csize, low)
    room = budget - _fixed_bytes(n, h, v, low)
    rows = max(1, min(n, int(room // per_row))) if room > 0 else 1
    fits = room > 0 and rows >= min(n, _MIN_ROWS)
    if schedule == "auto" and not fits:
        return Plan(
            "recompute",
            (),
            f"workspace of {min(n, _MIN_ROWS)} rows + accumulators exceed the {budget / MIB:.0f} MiB budget",
        )
    kind = head_kind(cfg)
    if kind == "batch":  # a statistic of the whole batch first (entropy quantile, ...): always two passes
        return Plan("two_pass", (), "the loss needs whole-batch statistics of logp / entropy first")
    if kind == "sequence":
        chunks = _sequence_chunks(rows, n, seq_len, cu_host)
        if chunks is None:
            if schedule == "auto":
                return Plan("recompute", (), "a sequence does not fit the workspace")
            return Plan("two_pass", (), "a sequence does not fit the workspace")
        return Plan("one_pass", chunks, f"{len(chunks)} chunk(s) of whole sequences")
    count = max(1, -(-n // rows))
    rows = max(1, -(-n // count))  # balanced: no small tail chunk
    chunks = tuple((a, min(n, a + rows), None) for a in range(0, max(n, 1), rows))
    return Plan("one_pass", chunks, f"{len(chunks)} chunk(s) of <= {rows} rows")
