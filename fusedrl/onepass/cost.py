"""The one-pass schedule's cost model (docs/one-pass.md, "The planner"): what a run costs in time and
memory for given chunks and GEMM 3 group, on a device's rates. Host arithmetic only; the planner
(:mod:`fusedrl.onepass.plan`) searches it.

The model, per token chunk of ``Nc`` rows (``K = g·Nc`` rows of du per GEMM 3 call, a ring of ``g``
chunks' du)::

    GEMM 1   max(2·Nc·H·V / R, bytes / BW)     bytes: W, x_c, the fp32 workspace U written
    epilogue Nc·V·e / (eta·BW)                  e: the epilogue's bytes per element (EPILOGUES below)
    GEMM 2   max(2·Nc·V·H / R, bytes / BW)     du, W read; dx_c written
    GEMM 3   max(2·K·V·H / R, bytes / BW)      per group: du ring, x read; dW32 written, + read after the first
    db       Nc·V·4 / BW                        the bias gradient's column sum (only with a bias gradient)
    finish   dW32, dx32 read, 16-bit written   the backward's scale-and-round (16-bit inputs)

Deferred GEMM 3 (``plan.defers_dw``: bf16 inputs whose du of every token is no larger than the fp32 dW
accumulator): the ring holds all ``N`` rows, and GEMM 3 runs once, in the backward, with ``K = N`` and the
upstream gradient folded into ``x``; the finish then covers dx alone.

plus a launch overhead per kernel, with ``R`` and ``BW`` the device's (:func:`fusedrl.backends.device.
device_facts`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..backends import torch_backend
from ..backends.device import ARCH_FACTS, DeviceFacts

#: 16-bit du rows are padded to this many elements (16 bytes): cuBLAS's tensor-core kernels want aligned
#: leading dimensions, and an odd V would leave every row of du 2-byte aligned
DU_ALIGN = 8
#: rows of the fp32 (fp64) workspace U are padded to this many elements (64 bytes in fp32) for any V: every
#: row starts 16-byte aligned, so the kernel epilogues read it with 16-byte vector loads (the CUDA kernel's
#: float4 path needs ``ld % 4 == 0``; Triton's JIT hints a row stride divisible by 16), and GEMM 1 writes it
#: with an aligned leading dimension (cuBLAS and CPU BLAS write a row-strided ``out`` in place)
WS_ALIGN = 16
# per-token bytes the schedule holds besides the [N, V]-scale buffers (logp, lse, entropy, the head's
# per-token vectors, chunk outputs): a bound, not a census
PER_TOKEN_BYTES = 96


def du_row_stride(v: int) -> int:
    """Row stride (elements) of the 16-bit du ring: ``V`` rounded up to :data:`DU_ALIGN`."""
    return -(-v // DU_ALIGN) * DU_ALIGN


def ws_row_stride(v: int) -> int:
    """Row stride (elements) of the fp32 / fp64 workspace U: ``V`` rounded up to :data:`WS_ALIGN`."""
    return -(-v // WS_ALIGN) * WS_ALIGN


# --------------------------------------------------------------------------------------------------
# What the run looks like to the model
# --------------------------------------------------------------------------------------------------


class Setting(NamedTuple):
    """Everything but the shapes that the cost and memory of a run depend on (hashable: plans are cached).

    ``epilogue``: the row epilogue that runs (``fusedrl.onepass.run.epilogue_for``: ``"torch"``,
    ``"triton"``, ``"cuda"``); ``core``: the backend the recompute schedule would run; ``gemm``: the
    16-bit GEMM path of this torch (``fusedrl.onepass.gemm.path``: ``"fast"`` = mm and addmm with fp32
    output, ``"mm"`` = addmm as mm + add, ``"upcast"`` = fp32 operands, as on CPU); ``du32``: whether a
    kernel epilogue stores the fp32 du always (True) or only where the run reads it (False: a bias
    gradient, fp32 inputs); None: as :data:`EPILOGUES` says of the kernel."""

    epilogue: str = "torch"
    core: str = "torch"
    facts: DeviceFacts = ARCH_FACTS["cpu"]
    dx: bool = True
    dw: bool = True
    db: bool = False
    ent: bool = False  # the entropy is computed
    ent_grad: bool = False  # ... and has a gradient (entropy bonus)
    bias: bool = False
    transform: int = 0  # extra elementwise passes of the torch epilogue: 1 per-token / unfolded T, 3 softcap
    gemm: str = "fast"
    tf32: bool = False
    du32: Optional[bool] = None

    @property
    def grads(self) -> bool:
        return self.dx or self.dw or self.db


class EpilogueCost(NamedTuple):
    """A row epilogue's cost: ``efficiency`` of the HBM bandwidth it reaches, kernel ``launches`` per chunk
    (the torch epilogue: its ops and the head's autograd), whether it keeps a scratch of its own, and
    (kernels) whether it writes the fp32 du over U even where nothing reads it."""

    efficiency: float
    launches: int
    torch_scratch: bool
    stores_du32: bool = False


#: the row epilogues the model knows, by backend name. The kernel epilogues (Triton, CUDA) work in the fp32
#: workspace and the 16-bit du copy alone: two reads of U (statistics, then du), du16 written, and the fp32
#: du written over U only where the run reads it (``stores_du32=False``: fp32 inputs, whose GEMMs read du
#: there, and a bias gradient, whose column sum reads it; ``fusedrl.onepass.run`` passes ``store_du32``).
#: The torch epilogue's scratch is ``torch_backend.onepass_scratch_shapes``. ``efficiency`` 1 until a GPU
#: run measures it (bench/onepass_model.py --calibrate).
EPILOGUES: dict[str, EpilogueCost] = {
    "torch": EpilogueCost(1.0, 60, True),
    "triton": EpilogueCost(1.0, 8, False, stores_du32=False),
    "cuda": EpilogueCost(1.0, 8, False, stores_du32=False),
}


def epilogue_bytes_per_element(s: Setting, csize: int, low: bool, ring: bool) -> float:
    """HBM bytes the row epilogue moves per element of the ``[Nc, V]`` workspace (compute dtype of
    ``csize`` bytes). Torch: one count per pass of ``torch_backend.onepass_stats`` / ``onepass_du``;
    kernels: two reads of U, the fp32 du where stored, the 16-bit copy."""
    c = csize
    if s.epilogue != "torch":  # fp32 workspace
        b = 4.0  # pass 1 reads U
        if s.grads:
            ep = EPILOGUES.get(s.epilogue, EPILOGUES["triton"])
            du32 = (ep.stores_du32 if s.du32 is None else s.du32) or not low or s.db
            b += 4 + (4 if du32 else 0) + (2 if low else 0)  # pass 2 reads U, writes du (fp32, 16-bit)
        return b
    b = (2 * c if s.bias else 0) + 2 * c * s.transform  # bias add, temperature / softcap
    b += c + 2 * c + 2 * c + c  # amax, sub_, exp -> scratch, sum
    if s.ent:
        b += (2 * c if s.transform < 3 else 0) + 4 * c  # clamp_, products (read u, e; write, sum a block)
    if s.grads:
        b += 13 * c if s.transform >= 3 else 0  # softcap's 1 - tanh^2 by blocks
        b += 7 * c if s.ent_grad else 2 * c  # du = (c d + alpha) e in u, else e *= const
        if low:
            b += c + 2  # the 16-bit copy
        elif ring and not s.ent_grad:
            b += 2 * c  # du lives in the scratch: copied into its ring slot
    return b


# the recompute schedule per core backend: (GEMM rate relative to the 16-bit cuBLAS rate; None: fp32 GEMMs
# from upcast tiles), extra bytes per [N, V] element (forward + backward). Uncalibrated until a GPU run.
RECOMPUTE: dict[str, tuple[Optional[float], float]] = {
    "torch": (None, 0.0),  # the torch backend: its epilogue's bytes twice plus the recomputed logits
    "triton": (0.75, 4.0),  # logits stay on chip; du written once for the gradient GEMMs
    "cuda": (1.0, 22.0),  # cuBLAS chunks: logits written and read in the forward, again with du in the backward
}


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class Model(NamedTuple):
    """Modeled milliseconds by term, the three-GEMM floor, bytes by buffer and the recompute estimate."""

    terms: tuple[tuple[str, float], ...]
    memory: tuple[tuple[str, int], ...]
    floor_ms: float
    recompute_ms: float

    @property
    def total_ms(self) -> float:
        return sum(t for _, t in self.terms)

    @property
    def memory_bytes(self) -> int:
        return sum(b for _, b in self.memory)

    def as_dict(self) -> dict:
        return dict(
            terms_ms=dict(self.terms),
            total_ms=self.total_ms,
            floor_ms=self.floor_ms,
            x_floor=self.total_ms / self.floor_ms if self.floor_ms else None,
            recompute_ms=self.recompute_ms,
            memory=dict(self.memory),
            memory_bytes=self.memory_bytes,
        )


def _rate(x_dtype: torch.dtype, s: Setting) -> float:
    """TFLOP/s of the schedule's GEMMs for inputs of ``x_dtype``."""
    f = s.facts
    if x_dtype == torch.float64:
        return f.gemm64
    fp32 = f.gemm_tf32 if s.tf32 else f.gemm32
    if x_dtype in (torch.float16, torch.bfloat16) and s.gemm != "upcast":
        return f.gemm16
    return fp32


def gemm_ms(flops: float, nbytes: float, tflops: float, facts: DeviceFacts) -> float:
    """One GEMM call: roofline (flops at ``tflops`` or bytes at the bandwidth, the larger) plus a launch."""
    return max(flops / (tflops * 1e9), nbytes / (facts.hbm * 1e9)) + facts.launch_us * 1e-3


def memory_parts(n: int, h: int, v: int, x_dtype: torch.dtype, rows: int, ring_rows: int, s: Setting,
                 k_sel: int = 0, deferred: bool = False) -> tuple[tuple[str, int], ...]:  # fmt: skip
    """Bytes the one-pass run allocates beyond the gradients it returns, by buffer (``deferred``: the du of
    every token instead of the dW accumulator, :func:`defers_dw`)."""
    low = x_dtype in (torch.float16, torch.bfloat16)
    c = 8 if x_dtype == torch.float64 else 4
    if deferred:
        ring_rows = n
    parts = [
        # 16-bit inputs: gradients held in fp32 until the backward (deferred: dW formed there)
        ("dw32", v * h * 4 if (low and s.dw and not deferred) else 0),
        ("dx32", n * h * 4 if (low and s.dx) else 0),
        ("db", v * c if s.db else 0),
        ("per_token", n * PER_TOKEN_BYTES),
        # fp32 inputs: the ring is U itself; rows padded to WS_ALIGN elements
        ("workspace", (rows if (low or not s.dw) else ring_rows) * ws_row_stride(v) * c),
    ]
    if EPILOGUES.get(s.epilogue, EPILOGUES["torch"]).torch_scratch:
        parts.append(("scratch", sum(a * b for a, b in torch_backend.onepass_scratch_shapes(rows, v)) * c))
    parts.append(("du_ring", ring_rows * du_row_stride(v) * 2 if (low and s.grads) else 0))
    if low and s.gemm == "upcast" and s.grads:  # fp32 copies of W and of the largest du operand
        widest = ring_rows if (s.dw and not deferred) else rows  # deferred: GEMM 3 is a plain bf16 mm
        parts.append(("gemm_upcast", v * h * 4 + max(rows, widest) * (v + h) * 4))
    if k_sel:
        parts.append(("selection", k_sel * (v * (3 * c + 2) + 2 * h * c)))
    if deferred:  # the backward's g·x (fp32, then 16-bit) lives after the forward's transient buffers are
        # gone: only what it takes beyond them counts, so the sum is the larger of the two peaks
        gone = sum(b for k, b in parts if k in _TRANSIENT)
        parts.append(("scaled_x", max(0, n * h * 6 - gone)))
    return tuple(parts)


#: buffers of the forward pass only (freed before the backward)
_TRANSIENT = ("workspace", "scratch", "gemm_upcast", "selection")


def _runs(chunk_rows) -> tuple[tuple[int, int], ...]:
    """Chunk sizes as ``(rows, repeat)`` runs (empty chunks dropped); given runs pass through."""
    out: list[list[int]] = []
    for r in chunk_rows:
        r, times = r if isinstance(r, tuple) else (r, 1)
        if r <= 0 or times <= 0:
            continue
        if out and out[-1][0] == r:
            out[-1][1] += times
        else:
            out.append([r, times])
    return tuple((r, k) for r, k in out)


def _groups(runs, ring_rows: int) -> tuple[tuple[int, int], ...]:
    """GEMM 3 calls as ``(K rows, repeat)`` runs: chunks fill the ring in order, a call when the next chunk
    does not fit (``fusedrl.onepass.run``'s rule)."""
    out: list[list[int]] = []

    def emit(k, times=1):
        if out and out[-1][0] == k:
            out[-1][1] += times
        elif times:
            out.append([k, times])

    fill = 0
    for r, times in runs:
        cap = max(ring_rows, r)
        if fill:
            take = max(0, min(times, (cap - fill) // r))
            fill += take * r
            times -= take
            if times:
                emit(fill)
                fill = 0
        if times:
            q = cap // r
            emit(q * r, (times - 1) // q)
            fill = (times - (times - 1) // q * q) * r
    if fill:
        emit(fill)
    return tuple((k, n) for k, n in out)


def model(n: int, h: int, v: int, x_dtype: torch.dtype, chunk_rows: tuple[int, ...], ring_rows: int, s: Setting,
          k_sel: int = 0, deferred: bool = False) -> Model:  # fmt: skip
    """The modeled time of a one-pass run over chunks of ``chunk_rows`` rows with a du ring of ``ring_rows``
    (GEMM 3 once per filled ring; ``deferred``: once in the backward over all rows, :func:`defers_dw`), and
    of the recompute schedule on the same shapes."""
    low = x_dtype in (torch.float16, torch.bfloat16)
    c = 8 if x_dtype == torch.float64 else 4
    s_in = x_dtype.itemsize
    s_du = 2 if low else c
    f = s.facts
    rate = _rate(x_dtype, s)
    bw = f.hbm * 1e9  # bytes per ms
    launch = f.launch_us * 1e-3
    ep = EPILOGUES.get(s.epilogue, EPILOGUES["torch"])
    ring = ring_rows > max((r if isinstance(r, int) else r[0] for r in chunk_rows), default=0)
    e_bytes = epilogue_bytes_per_element(s, c, low, ring)
    upcast = low and s.gemm == "upcast"
    t = dict(gemm1=0.0, epilogue=0.0, gemm2=0.0, gemm3=0.0, db=0.0, gemm_fallback=0.0, finish=0.0, selection=0.0)
    wbytes = v * h * s_in
    runs = _runs(chunk_rows)
    # a ring no larger than the largest chunk: one GEMM 3 per chunk (the run groups only when asked to)
    groups = _groups(runs, ring_rows) if ring_rows > max((r for r, _ in runs), default=0) else runs
    for r, times in runs:
        t["gemm1"] += times * gemm_ms(2 * r * h * v, wbytes + r * h * s_in + r * v * c, rate, f)
        t["epilogue"] += times * (r * v * e_bytes / (ep.efficiency * bw) + ep.launches * launch)
        if upcast:
            t["gemm_fallback"] += times * (v * h * 6 * (2 if s.dx else 1) + r * v * 6) / bw
        if s.dx:
            t["gemm2"] += times * gemm_ms(2 * r * v * h, r * v * s_du + wbytes + r * h * c, rate, f)
        if s.db:
            t["db"] += times * (r * v * c / bw + 2 * launch)
    if s.dw and deferred:  # the backward: g·x (fp32, then 16-bit: two passes), one GEMM with K = N, dW 16-bit
        t["gemm3"] = gemm_ms(2 * n * v * h, n * v * 2 + n * h * 2 + v * h * 2, rate, f) + n * h * 12 / bw + 2 * launch
    elif s.dw:
        acc = v * h * (4 if low else c)
        first = True
        for k, times in groups:
            later = times - (1 if first else 0)  # the first call writes the accumulator, later ones read it too
            one = gemm_ms(2 * k * v * h, k * v * s_du + k * h * s_in + acc, rate, f)
            t["gemm3"] += one * (times - later) + later * gemm_ms(
                2 * k * v * h, k * v * s_du + k * h * s_in + 2 * acc, rate, f
            )
            if low and s.gemm == "mm":  # addmm as mm into the workspace by slices, then add_
                t["gemm_fallback"] += later * acc * 3 / bw
            if upcast:
                t["gemm_fallback"] += times * k * (v + h) * 6 / bw
            first = False
    if s.grads:  # the backward: scale by the upstream gradient and round once (16-bit), or scale (fp32 / fp64)
        per = 6 if low else 2 * c
        dw_elems = v * h if (s.dw and not deferred) else 0
        t["finish"] = (dw_elems + (n * h if s.dx else 0) + (v if s.db else 0)) * per / bw + 3 * launch
    if k_sel and s.grads:
        t["selection"] = 3 * 2 * k_sel * h * v / (rate * 1e9) + k_sel * v * 10 * c / bw + 40 * launch
    rows = max((r for r, _ in runs), default=0)
    mem = memory_parts(n, h, v, x_dtype, rows, ring_rows, s, k_sel, deferred)
    floor = 3 * 2 * n * h * v / ((f.gemm16 if low else rate) * 1e9)  # the three GEMMs at the inputs' best rate
    return Model(tuple(t.items()), mem, floor, recompute_ms(n, h, v, x_dtype, s))


def recompute_ms(n: int, h: int, v: int, x_dtype: torch.dtype, s: Setting) -> float:
    """Modeled time of the recompute schedule (4 GEMMs and the core backend's own traffic)."""
    low = x_dtype in (torch.float16, torch.bfloat16)
    c = 8 if x_dtype == torch.float64 else 4
    f = s.facts
    factor, extra = RECOMPUTE.get(s.core, RECOMPUTE["torch"])
    if factor is None or not low:  # fp32 GEMMs from upcast tiles (the torch backend), or fp32 / fp64 inputs
        rate = _rate(torch.float32 if x_dtype != torch.float64 else x_dtype, s)
        if factor is not None:
            rate *= factor
    else:
        rate = f.gemm16 * factor
    if s.core == "torch" or s.core not in RECOMPUTE:  # the statistics in the forward, again with du in the backward
        plain = s._replace(epilogue="torch")
        stats = epilogue_bytes_per_element(plain._replace(dx=False, dw=False, db=False), c, False, False)
        extra = stats + epilogue_bytes_per_element(plain, c, False, False) + 2 * c  # + the recomputed logits
    flops = 4 * 2 * n * h * v if s.grads else 2 * n * h * v
    # kernels: the loss head's forward and backward over [N] vectors, plus the core op's tile loop (the torch
    # backend: ~40 ops per token x vocab tile, forward and backward; kernel backends: a few per chunk)
    if s.core == "torch" or s.core not in RECOMPUTE:
        nt, vt = torch_backend.tile_plan(n, v)
        tiles = 40 * -(-n // nt) * -(-v // vt)
    else:
        tiles = 8 * -(-n // 4096) * -(-v // 4096)
    return flops / (rate * 1e9) + n * v * extra / (f.hbm * 1e9) + (60 + tiles) * f.launch_us * 1e-3
