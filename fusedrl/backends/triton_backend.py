"""`triton` backend: fused vocabulary projection + log-softmax statistics in Triton kernels.

Kernels first, launchers after. DESIGN.md sections 3-7 are the contract; this is how it is met.

Forward (``_fwd_kernel`` + ``_merge_kernel``)
    A 1-D grid of (token block x vocab split) programs, decoded with a grouped swizzle
    (BLOCK_GROUP token blocks per group, for L2 reuse of x and W tiles). A 1-D grid has no 65535
    limit, so N > 65535 is fine. A program walks its vocab split in BLOCK_V tiles. Each tile's
    logits ``x @ W^T`` are accumulated over H in BLOCK_H steps with ``tl.dot`` in fp32 (fp32
    inputs: see "fp32 inputs" below). Then bias, softcap (``c*tanh(u/c)``, tanh built from ``exp``
    because there is no libdevice, with a Taylor branch near 0) and 1/T are applied, and
    out-of-range columns are set to -inf (never 0). The per-token running max M,
    S = sum e^(z-M) and B' = sum (z-M) e^(z-M) are updated online and rescaled when M grows; the
    target logit is picked up on the way. Vocab splits keep many SMs busy when N is small. Their
    (M, S, B') partials ([splits, N] fp32) are merged by ``_merge_kernel`` into
    LSE = M + log S and H = log S - B'/S. Only LSE and H (8 bytes/token) survive, and no [N, V]
    tensor exists.

Backward, deterministic default (``_du_kernel`` + ``_gemm_kernel``)
    The vocabulary is walked in chunks of Vc columns. For each chunk, ``_du_kernel`` recomputes
    the logits tile by tile with the forward's helper and forms du = dz * dz/du in fp32
    (DESIGN.md section 3). It writes du into a bounded workspace [N, Vc] in the input dtype, which
    is the tensor-core operand precision of the gradient GEMMs, as in eager PyTorch and Cut
    Cross-Entropy. It also writes an int8 "tile matters" flag per (token block, vocab block) and
    fp32 per-token-block column sums for db. ``_gemm_kernel`` then computes
    ``dW[chunk] = du^T @ x``, complete over all tokens, so it is written once and cast at the
    store. In the same pass it computes ``dx += du @ W[chunk]``. The dx sum across chunks is
    carried in dx itself plus a bf16 residual buffer (hi + lo: at least 16 significant bits,
    well below the final rounding); fp32 inputs accumulate in dx directly. Both GEMMs skip
    du tiles whose flag is 0. That is gradient filtering: with ``grad_filter_eps`` > 0, a tile is
    skipped when ``max |dz|`` (entropy part included) is below eps for all its tokens and
    columns; db stays exact. The GEMM's K loop runs over a compacted list of each row block's
    live tiles (``_live_lists``: a small torch sort of the int8 flags), not over every tile with
    an ``if live:`` around the loads: a branch there turns off software pipelining (0 async
    copies on sm_90), while the list-driven loop keeps ``cp.async`` pipelining (launched with one
    more stage than the dense loop, because the tile-index load takes one: 3 operand buffers on
    sm_90 against the dense loop's 4). The same tiles
    are accumulated in the same order, so the result is bitwise the one of a skipping loop. Nothing is atomic and every reduction has a fixed order, so a given
    schedule is bitwise reproducible. GEMMs: forward + recompute + 2 gradient GEMMs = 4, the 4/3
    design point.

    Memory is planned against a budget (``memory_budget_mb``). Its default is sized from the
    device (``_default_budget``): a quarter of the free memory, capped at 4 GiB
    (FUSEDRL_TRITON_BUDGET_CAP_MB), never below the lean floor 128 MiB + 1 KiB/token (the DESIGN.md
    section 7 memory target, which is what CPU / interpreter runs use and what
    ``memory_budget_mb=128 + N/1024`` asks for). The budget covers the workspace and the
    2 bytes/elem dx residual; within it vocab chunks are as wide as possible, because the dx hi/lo
    accumulation reads and writes 8 bytes per dx element per chunk (at N = 12288, H = 4096 bf16:
    ~34 GB with the old 64 MiB chunks; one chunk and none at the default budget on an 80 GB GPU;
    6 chunks / ~13 GB at N = 65536), and the GEMM grids keep
    >= 2 waves. At the default budget the 4-GEMM schedule holds up to N = 65536 at H = 4096 and
    H = 8192 on an 80 GB GPU. When the budget is too small (large N*H at a lean budget), the plan
    switches to a lean schedule: the vocab pass then produces only dW/db, and a token-chunk pass
    (workspace [Nc, V]) recomputes the logits again to produce complete dx rows with no
    accumulator: 5 GEMMs, memory flat in N and V. ``_plan`` makes the choice.

Backward, ``deterministic=False`` (``_bwd_atomic_kernel``)
    One fully fused kernel per (token block, vocab block) tile, in the manner of Cut
    Cross-Entropy. It recomputes the tile, keeps du in registers, and adds ``du @ W_tile`` and
    ``du^T @ x_tile`` in BLOCK_D slices with fp32 ``atomic_add`` into fp32 [N, H] and [V, H]
    buffers, cast at the end. It also needs 4 GEMMs and has no du round trip through HBM. The
    costs: float atomics make it nondeterministic from run to run, the atomic read-modify-write
    traffic is (BLOCK_N + BLOCK_V) * H * 4 bytes per tile, and the fp32 dW buffer is 4*V*H bytes,
    which is not flat in V and breaks the memory target. It is opt-in. Which path is faster on a
    given GPU has to be benchmarked.

One-pass row epilogue (``_onepass_kernel``, ``onepass_epilogue``; docs/one-pass.md)
    For the one-pass fused loss (issue 13) the GEMMs come from cuBLAS through torch; this kernel
    is the row epilogue over an fp32 [Nc, V] logits workspace: one program per row (no tl.dot),
    pass 1 online (M, S, B') -> LSE, H, logp; the loss head (``triton_math``: clipped surrogate,
    gpg, cispo, unclipped, KL k1/abs/k2/k3 and straight-through, entropy bonus) -> g_lp, g_H;
    pass 2 du written in place (and optionally as bf16/fp16 for the next GEMMs). The head
    (``OnePassHead``) and the argument checks are ``_onepass.py``'s, shared with the cuda backend.

Temperature
    ``temperature`` is a float > 0 or a per-token tensor [N] (one per row, on the rows' device;
    ``_temp`` checks it): z = softcap(u + b) / T_n, dz/du = softcap'(u + b) / T_n. Every kernel
    takes the scalar 1/T and a pointer INV_TEMP to per-row 1/T, read iff the constexpr HAS_TEMP_VEC
    (``_row_inv_temp``: one [BLOCK_N] load per program), so the scalar path compiles to the code
    it had before. Row ids are global, so the token chunks of the backward read their own slice.
    The per-token 1/T is rounded once from fp64 per call, as the scalar's: an all-equal vector of
    an fp32-exact T reproduces the scalar path bit for bit.

fp32 inputs
    ``tl.dot`` on fp32 operands uses ``input_precision="tf32x3"`` by default: three tf32
    tensor-core products (hi*hi + hi*lo + lo*hi), about fp32 accuracy (relative error ~1e-6 per
    product against tf32's ~1e-3) at a fraction of the cost of the exact ``"ieee"`` path, which
    compiles to FMA loops (no tensor cores, register spills at the pinned tiles). ``"ieee"``
    stays available (``fp32_precision="ieee"`` or FUSEDRL_TRITON_FP32_PRECISION=ieee) and is
    what the interpreter computes (operands upcast, numpy fp32 matmul; the interpreter has no
    tf32). fp32 tiles are pinned separately (``_CONFIGS`` ``*_fp32``): 4-byte operands double
    the shared memory per pipeline stage.

Logits path (``logits_forward`` / ``logits_backward``)
    The same kernels run with IS_LOGITS=True: they load the logits tile instead of computing it.
    The backward writes dlogits tile by tile. In-place is safe because every tile is loaded by
    the program that overwrites it.

Portability
    Pointer args are UPPERCASE and constexprs are BLOCK_*/HAS_*/IS_*. All offsets are int64 and
    every load/store is masked (the interpreter has no bounds checks). Under TRITON_INTERPRET=1
    (CPU tests), ``IS_INTERPRET`` upcasts tl.dot operands to fp32 (bf16 tl.dot is broken in the
    interpreter) and only fp32 atomics are used. Block configs are pinned per family (Hopper;
    Ampere and others; interpreter) and input width. ``FUSEDRL_TRITON_AUTOTUNE=1`` autotunes a few
    configs per kernel (GPU only). Every pinned and autotune config is compiled for sm_90 and sm_80
    by tests/test_gpu_static.py (no GPU needed): shared memory within the limit, no spills in
    16-bit, tl.dot on wgmma / mma, async copies in the GEMM loops. Shared per-element math
    (transform, online statistics, dz, the loss head, the dot) lives once in ``triton_math.py``.
    Written for triton >= 3.6.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch

from ._device import launches_on_first_arg_device, usable_memory
from ._onepass import HEAD_MODES, KL_TYPES, OnePassHead, check_epilogue, check_temperature  # noqa: F401

try:  # triton is optional: the registry reports the import error as the unavailability reason
    import triton
    import triton.language as tl

    from . import triton_math as tm

    _TRITON_ERROR = ""
except Exception as _e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    tm = None
    _TRITON_ERROR = f"{type(_e).__name__}: {_e}"

Tensor = torch.Tensor

# Kernels are built as interpreted functions iff TRITON_INTERPRET=1 when this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_AUTOTUNE = os.environ.get("FUSEDRL_TRITON_AUTOTUNE", "0") == "1" and not _INTERPRET

_MIB = 2**20


# =====================================================================================
# Kernels
# =====================================================================================

if triton is not None:

    @triton.jit
    def _swizzle(pid, num_a, num_b, BLOCK_GROUP: tl.constexpr):
        """Map a 1-D program id onto (a, b) tiles, BLOCK_GROUP consecutive a-tiles per group (L2 reuse)."""
        in_group = BLOCK_GROUP * num_b
        group = pid // in_group
        first_a = group * BLOCK_GROUP
        size = tl.minimum(num_a - first_a, BLOCK_GROUP)
        pid_a = first_a + (pid % in_group) % size
        pid_b = (pid % in_group) // size
        return pid_a, pid_b

    @triton.jit
    def _row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC: tl.constexpr):
        """(1/T per row [BLOCK_N], the same as a [BLOCK_N, 1] column for tiles). Per-token
        temperature (HAS_TEMP_VEC): INV_TEMP[rows] (global row ids); else the scalar inv_temp twice,
        so that the scalar path compiles to exactly the code it had before."""
        if HAS_TEMP_VEC:
            inv_row = tl.load(INV_TEMP + rows, mask=row_mask, other=1.0)
            inv_tile = inv_row[:, None]
        else:
            inv_row = inv_temp
            inv_tile = inv_temp
        return inv_row, inv_tile

    @triton.jit
    def _logits_tile(
        X,
        W,
        BIAS,
        rows,
        cols,
        row_mask,
        col_mask,
        H,
        stride_xn,
        stride_wv,
        inv_temp,
        softcap,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        IS_LOGITS: tl.constexpr,
        IS_EVEN_H: tl.constexpr,
        IS_FP32: tl.constexpr,
        IS_IEEE: tl.constexpr,
        IS_INTERPRET: tl.constexpr,
    ):
        """z = softcap(x W^T + b) / T for a [BLOCK_N, BLOCK_V] tile (fp32) and t = tanh(u / c).

        inv_temp: the scalar 1/T or a [BLOCK_N, 1] column of per-row 1/T (``_row_inv_temp``).
        IS_LOGITS: X holds the logits [N, V] (row stride stride_xn) and the GEMM is skipped.
        Invalid rows/columns hold finite garbage (0-filled loads); callers mask them.
        """
        if IS_LOGITS:
            u = tl.load(
                X + rows[:, None] * stride_xn + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
            ).to(tl.float32)
        else:
            offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
            x_ptrs = X + rows[:, None] * stride_xn + offs_h[None, :]
            w_ptrs = W + cols[None, :] * stride_wv + offs_h[:, None]
            u = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for h0 in range(0, H, BLOCK_H):
                if IS_EVEN_H:
                    xt = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
                    wt = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
                else:
                    h_mask = (h0 + offs_h) < H
                    xt = tl.load(x_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
                    wt = tl.load(w_ptrs, mask=col_mask[None, :] & h_mask[:, None], other=0.0)
                u = tm.mma(xt, wt, u, IS_FP32, IS_IEEE, IS_INTERPRET)
                x_ptrs += BLOCK_H
                w_ptrs += BLOCK_H
            if HAS_BIAS:
                u += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        z, t = tm.transform(u, inv_temp, softcap, HAS_SOFTCAP)
        return z, t

    @triton.jit
    def _fwd_kernel(
        X,
        W,
        BIAS,
        TARGETS,
        INV_TEMP,
        LSE,
        ENT,
        ZT,
        PART_M,
        PART_S,
        PART_B,
        N,
        V,
        H,
        vocab_start,
        v_per_split,
        n_splits,
        stride_xn,
        stride_wv,
        inv_temp,
        softcap,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_GROUP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_ENTROPY: tl.constexpr,
        HAS_SPLITS: tl.constexpr,
        HAS_TEMP_VEC: tl.constexpr,
        IS_LOGITS: tl.constexpr,
        IS_EVEN_H: tl.constexpr,
        IS_FP32: tl.constexpr,
        IS_IEEE: tl.constexpr,
        IS_INTERPRET: tl.constexpr,
    ):
        """Online (M, S, B') and target logit over one vocab split for one token block
        (HAS_TEMP_VEC: per-token 1/T from INV_TEMP [N], else the scalar inv_temp)."""
        pid_n, pid_s = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, BLOCK_GROUP)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        _, inv_t = _row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC)
        tgt = tl.load(TARGETS + rows, mask=row_mask, other=-1).to(tl.int64) - vocab_start
        v_lo = pid_s.to(tl.int64) * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)

        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            col_mask = cols < v_hi
            z, t = _logits_tile(
                X,
                W,
                BIAS,
                rows,
                cols,
                row_mask,
                col_mask,
                H,
                stride_xn,
                stride_wv,
                inv_t,
                softcap,
                BLOCK_N,
                BLOCK_V,
                BLOCK_H,
                HAS_BIAS,
                HAS_SOFTCAP,
                IS_LOGITS,
                IS_EVEN_H,
                IS_FP32,
                IS_IEEE,
                IS_INTERPRET,
            )
            z = tl.where(col_mask[None, :], z, float("-inf"))  # never 0: 0 would corrupt LSE
            hit = (cols[None, :] == tgt[:, None]) & col_mask[None, :]
            zt += tl.sum(tl.where(hit, z, 0.0), axis=1)
            m, s, b = tm.online_update(m, s, b, z, HAS_ENTROPY)

        in_split = (tgt >= v_lo) & (tgt < v_hi)
        tl.store(ZT + rows, zt, mask=row_mask & in_split)  # exactly one program owns a token's zt
        if HAS_SPLITS:
            off = pid_s.to(tl.int64) * N + rows
            tl.store(PART_M + off, m, mask=row_mask)
            tl.store(PART_S + off, s, mask=row_mask)
            if HAS_ENTROPY:
                tl.store(PART_B + off, b, mask=row_mask)
        else:
            lse, ent = tm.finish_stats(m, s, b)
            tl.store(LSE + rows, lse, mask=row_mask)
            if HAS_ENTROPY:
                tl.store(ENT + rows, ent, mask=row_mask)

    @triton.jit
    def _merge_kernel(PART_M, PART_S, PART_B, LSE, ENT, N, n_splits, BLOCK_N: tl.constexpr, HAS_ENTROPY: tl.constexpr):
        """Merge the per-split (M, S, B') partials ([splits, N] fp32) into LSE and entropy."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        off = rows
        for _ in range(0, n_splits):
            ms = tl.load(PART_M + off, mask=row_mask, other=0.0)
            ss = tl.load(PART_S + off, mask=row_mask, other=1.0)
            m_new = tl.maximum(m, ms)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits of -inf logits stay NaN-free
            a_old = tl.exp(m - m_ref)
            a_new = tl.exp(ms - m_ref)
            if HAS_ENTROPY:
                bs = tl.load(PART_B + off, mask=row_mask, other=0.0)
                shift = (tl.where(s > 0, m, m_ref) - m_ref) * s
                b = a_old * (b + shift) + a_new * (bs + (tl.where(ss > 0, ms, m_ref) - m_ref) * ss)
            s = s * a_old + ss * a_new
            m = m_new
            off += N
        lse, ent = tm.finish_stats(m, s, b)
        tl.store(LSE + rows, lse, mask=row_mask)
        if HAS_ENTROPY:
            tl.store(ENT + rows, ent, mask=row_mask)

    @triton.jit
    def _du_tile(
        z,
        t,
        rows,
        cols,
        row_mask,
        col_mask,
        tgt,
        LSE,
        ENT,
        G_LP,
        G_H,
        inv_temp,
        HAS_SOFTCAP: tl.constexpr,
        HAS_ENTROPY: tl.constexpr,
    ):
        """(du, dz) of a tile (tm.dz_du) with the per-token LSE, H, g_lp, g_H loaded from memory
        (inv_temp: scalar or [BLOCK_N, 1])."""
        valid = row_mask[:, None] & col_mask[None, :]
        lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
        g_lp = tl.load(G_LP + rows, mask=row_mask, other=0.0)
        if HAS_ENTROPY:
            ent = tl.load(ENT + rows, mask=row_mask, other=0.0)
            g_h = tl.load(G_H + rows, mask=row_mask, other=0.0)
        else:
            ent = lse
            g_h = g_lp
        hit = (cols[None, :] == tgt[:, None]) & valid
        return tm.dz_du(z, t, hit, valid, lse, ent, g_lp, g_h, inv_temp, HAS_SOFTCAP, HAS_ENTROPY)

    @triton.jit
    def _du_kernel(
        X,
        W,
        BIAS,
        TARGETS,
        INV_TEMP,
        LSE,
        ENT,
        G_LP,
        G_H,
        DU,
        FLAGS,
        DB_PART,
        n0,
        n_rows,
        v0,
        n_cols,
        H,
        vocab_start,
        stride_xn,
        stride_wv,
        stride_du,
        stride_flag,
        inv_temp,
        softcap,
        filter_eps,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_GROUP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_ENTROPY: tl.constexpr,
        HAS_FILTER: tl.constexpr,
        HAS_DB: tl.constexpr,
        HAS_TEMP_VEC: tl.constexpr,
        IS_LOGITS: tl.constexpr,
        IS_EVEN_H: tl.constexpr,
        IS_FP32: tl.constexpr,
        IS_IEEE: tl.constexpr,
        IS_INTERPRET: tl.constexpr,
    ):
        """du for the chunk rows [n0, n0+n_rows) x cols [v0, v0+n_cols) -> DU[local row, local col].

        Per-row inputs (TARGETS, LSE, ..., INV_TEMP when HAS_TEMP_VEC) are indexed by the global row
        n0 + local row: a token chunk reads its own slice of the per-token temperatures.
        HAS_FILTER: FLAGS[token block, vocab block] = max|dz| >= eps (tile not stored when 0).
        HAS_DB: DB_PART[token block, local col] = sum over the block's rows of du (fp32).
        """
        pid_n, pid_v = _swizzle(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(n_cols, BLOCK_V), BLOCK_GROUP)
        lrows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        lcols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = lrows < n_rows
        col_mask = lcols < n_cols
        rows = n0 + lrows
        cols = v0 + lcols
        _, inv_t = _row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC)
        z, t = _logits_tile(
            X,
            W,
            BIAS,
            rows,
            cols,
            row_mask,
            col_mask,
            H,
            stride_xn,
            stride_wv,
            inv_t,
            softcap,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            HAS_BIAS,
            HAS_SOFTCAP,
            IS_LOGITS,
            IS_EVEN_H,
            IS_FP32,
            IS_IEEE,
            IS_INTERPRET,
        )
        tgt = tl.load(TARGETS + rows, mask=row_mask, other=-1).to(tl.int64) - vocab_start
        du, dz = _du_tile(
            z, t, rows, cols, row_mask, col_mask, tgt, LSE, ENT, G_LP, G_H, inv_t, HAS_SOFTCAP, HAS_ENTROPY
        )
        if HAS_DB:
            tl.store(DB_PART + pid_n.to(tl.int64) * stride_du + lcols, tl.sum(du, axis=0), mask=col_mask)
        out_mask = row_mask[:, None] & col_mask[None, :]
        if HAS_FILTER:
            adz = tl.abs(dz)
            dz_max = tl.max(tl.max(adz, axis=1), axis=0)
            tl.store(FLAGS + pid_n.to(tl.int64) * stride_flag + pid_v, (dz_max >= filter_eps).to(tl.int8))
            out_mask = out_mask & ((adz * 0.0 + dz_max) >= filter_eps)  # tile-wide (broadcast) keep
        tl.store(DU + lrows[:, None] * stride_du + lcols[None, :], du.to(DU.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _gemm_kernel(
        A,
        B,
        C,
        C_LO,
        LIVE,
        LIVE_CNT,
        M,
        K,
        D,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bd,
        stride_cm,
        stride_live,
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_FLAG_M: tl.constexpr,
        BLOCK_FLAG_K: tl.constexpr,
        BLOCK_GROUP: tl.constexpr,
        HAS_FLAGS: tl.constexpr,
        HAS_ACC: tl.constexpr,
        HAS_LO_IN: tl.constexpr,
        HAS_LO_OUT: tl.constexpr,
        IS_FP32: tl.constexpr,
        IS_IEEE: tl.constexpr,
        IS_INTERPRET: tl.constexpr,
    ):
        """C[M, D] (+)= A[M, K] @ B[K, D] with fp32 accumulation, cast at the store.

        HAS_FLAGS: A is block-sparse in (BLOCK_FLAG_M x BLOCK_FLAG_K) tiles (BLOCK_M | BLOCK_FLAG_M,
        BLOCK_K | BLOCK_FLAG_K). For flag row fm, LIVE[fm, :LIVE_CNT[fm]] lists its live K tiles in
        ascending order (``_live_lists``): the K loop runs over that list with no branch, so it is
        software-pipelined (async copies) like the dense loop, and it accumulates the same tiles in
        the same order as a loop that skips dead tiles (bitwise the same result).
        HAS_ACC: C += result. With HAS_LO_IN/OUT the running value is the unevaluated sum C + C_LO
        (C_LO bf16, the rounding residual of C): ~16+ significant bits carried across calls while
        C itself holds the correctly rounded value. C and C_LO are row-major with row stride
        stride_cm.
        """
        pid_m, pid_d = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(D, BLOCK_D), BLOCK_GROUP)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
        m_mask = offs_m < M
        d_mask = offs_d < D
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        if HAS_FLAGS:
            # BLOCK_FLAG_K // BLOCK_K K-steps per live flag tile
            frow = (pid_m.to(tl.int64) * BLOCK_M) // BLOCK_FLAG_M
            live_row = LIVE + frow * stride_live
            n_steps = tl.load(LIVE_CNT + frow) * (BLOCK_FLAG_K // BLOCK_K)
            for i in range(0, n_steps):
                tile = tl.load(live_row + i // (BLOCK_FLAG_K // BLOCK_K)).to(tl.int64)
                k0 = tile * BLOCK_FLAG_K + (i % (BLOCK_FLAG_K // BLOCK_K)) * BLOCK_K
                ks = k0 + offs_k
                k_mask = ks < K
                a = tl.load(
                    A + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                b = tl.load(
                    B + ks[:, None] * stride_bk + offs_d[None, :] * stride_bd,
                    mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                acc = tm.mma(a, b, acc, IS_FP32, IS_IEEE, IS_INTERPRET)
        else:
            a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
            b_ptrs = B + offs_k[:, None] * stride_bk + offs_d[None, :] * stride_bd
            for k0 in range(0, K, BLOCK_K):
                k_mask = (k0 + offs_k) < K
                a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_mask[:, None] & d_mask[None, :], other=0.0)
                acc = tm.mma(a, b, acc, IS_FP32, IS_IEEE, IS_INTERPRET)
                a_ptrs += BLOCK_K * stride_ak
                b_ptrs += BLOCK_K * stride_bk
        c_off = offs_m[:, None] * stride_cm + offs_d[None, :]
        c_mask = m_mask[:, None] & d_mask[None, :]
        if HAS_ACC:
            acc += tl.load(C + c_off, mask=c_mask, other=0.0).to(tl.float32)
            if HAS_LO_IN:
                acc += tl.load(C_LO + c_off, mask=c_mask, other=0.0).to(tl.float32)
        hi = acc.to(C.dtype.element_ty)
        tl.store(C + c_off, hi, mask=c_mask)
        if HAS_LO_OUT:
            tl.store(C_LO + c_off, (acc - hi.to(tl.float32)).to(C_LO.dtype.element_ty), mask=c_mask)

    @triton.jit
    def _bwd_atomic_kernel(
        X,
        W,
        BIAS,
        TARGETS,
        INV_TEMP,
        LSE,
        ENT,
        G_LP,
        G_H,
        DX,
        DW,
        DB,
        N,
        V,
        H,
        vocab_start,
        stride_xn,
        stride_wv,
        inv_temp,
        softcap,
        filter_eps,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_GROUP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_ENTROPY: tl.constexpr,
        HAS_FILTER: tl.constexpr,
        HAS_DX: tl.constexpr,
        HAS_DW: tl.constexpr,
        HAS_DB: tl.constexpr,
        HAS_TEMP_VEC: tl.constexpr,
        IS_EVEN_H: tl.constexpr,
        IS_FP32: tl.constexpr,
        IS_IEEE: tl.constexpr,
        IS_INTERPRET: tl.constexpr,
    ):
        """Fully fused, nondeterministic backward: one (token block, vocab block) tile per program,
        fp32 atomic_add of its dx / dW / db contributions (DX, DW, DB are fp32, H-contiguous)."""
        pid_n, pid_v = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), BLOCK_GROUP)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = rows < N
        col_mask = cols < V
        _, inv_t = _row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC)
        z, t = _logits_tile(
            X,
            W,
            BIAS,
            rows,
            cols,
            row_mask,
            col_mask,
            H,
            stride_xn,
            stride_wv,
            inv_t,
            softcap,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            HAS_BIAS,
            HAS_SOFTCAP,
            False,
            IS_EVEN_H,
            IS_FP32,
            IS_IEEE,
            IS_INTERPRET,
        )
        tgt = tl.load(TARGETS + rows, mask=row_mask, other=-1).to(tl.int64) - vocab_start
        du, dz = _du_tile(
            z, t, rows, cols, row_mask, col_mask, tgt, LSE, ENT, G_LP, G_H, inv_t, HAS_SOFTCAP, HAS_ENTROPY
        )
        if HAS_DB:
            tl.atomic_add(DB + cols, tl.sum(du, axis=0), mask=col_mask)
        if HAS_FILTER:
            live = tl.max(tl.max(tl.abs(dz), axis=1), axis=0) >= filter_eps
        else:
            live = True
        if live:
            # rounded to the operand dtype as on the GPU (the interpreter's mma upcasts it back): the
            # interpreter tests the 16-bit accuracy this path really has
            du_op = du.to(X.dtype.element_ty)
            offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
            for d0 in range(0, H, BLOCK_D):
                d_mask = (d0 + offs_d) < H
                if HAS_DX:
                    wt = tl.load(
                        W + cols[:, None] * stride_wv + (d0 + offs_d)[None, :],
                        mask=col_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    )
                    part = tm.mma(
                        du_op, wt, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), IS_FP32, IS_IEEE, IS_INTERPRET
                    )
                    tl.atomic_add(
                        DX + rows[:, None] * H + (d0 + offs_d)[None, :], part, mask=row_mask[:, None] & d_mask[None, :]
                    )
                if HAS_DW:
                    xt = tl.load(
                        X + rows[:, None] * stride_xn + (d0 + offs_d)[None, :],
                        mask=row_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    )
                    part_w = tm.mma(
                        tl.trans(du_op),
                        xt,
                        tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32),
                        IS_FP32,
                        IS_IEEE,
                        IS_INTERPRET,
                    )
                    tl.atomic_add(
                        DW + cols[:, None] * H + (d0 + offs_d)[None, :],
                        part_w,
                        mask=col_mask[:, None] & d_mask[None, :],
                    )

    # the head codes are runtime values: no recompilation per loss config (an int equal to 1 would
    # otherwise be specialised into a constant)
    @triton.jit(do_not_specialize=["mode", "dual", "kl_type", "kl_st"])
    def _onepass_kernel(
        U,
        TARGETS,
        BIAS,
        INV_TEMP,
        OLD,
        ADV,
        WEIGHT,
        REF,
        DU16,
        LOGP,
        ENT,
        LSE,
        G_LP,
        G_H,
        n_rows,
        V,
        stride_u,
        stride_du16,
        inv_temp,
        softcap,
        mode,
        clip_lo,
        clip_hi,
        clip_c,
        dual,
        ent_coef,
        kl_coef,
        kl_type,
        kl_st,
        BLOCK_N: tl.constexpr,
        BLOCK_V: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        HAS_SOFTCAP: tl.constexpr,
        HAS_ENTROPY: tl.constexpr,
        HAS_ENT_GRAD: tl.constexpr,
        HAS_KL: tl.constexpr,
        HAS_DU16: tl.constexpr,
        HAS_TEMP_VEC: tl.constexpr,
        IS_INTERPRET: tl.constexpr,
    ):
        """One-pass row epilogue (docs/one-pass.md) for BLOCK_N rows of the fp32 logits workspace U.

        Pass 1: online (M, S, B') over the row in BLOCK_V blocks -> LSE, H; the target logit by one
        load -> logp. Head: g_lp = w (coef + kl_coef dKL/dlogp), g_H = -w ent_coef (0 where w = 0,
        whose OLD / ADV / REF are never read). Pass 2: du written over U (and as DU16's dtype into
        DU16); rows with w = 0 get du = 0 without reading U. No tl.dot: the interpreter runs it as is.
        HAS_TEMP_VEC: the chunk's per-token 1/T from INV_TEMP [n_rows], else the scalar inv_temp.
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        inv_row, inv_t = _row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC)
        offs_v = tl.arange(0, BLOCK_V).to(tl.int64)
        u_rows = U + rows[:, None] * stride_u
        tgt = tl.load(TARGETS + rows, mask=row_mask, other=-1).to(tl.int64)

        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs_v
            col_mask = cols < V
            u = tl.load(u_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            if HAS_BIAS:
                u += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            z, t1 = tm.transform(u, inv_t, softcap, HAS_SOFTCAP)
            z = tl.where(col_mask[None, :], z, float("-inf"))  # never 0: 0 would corrupt LSE
            m, s, b = tm.online_update(m, s, b, z, HAS_ENTROPY)
        lse, ent = tm.finish_stats(m, s, b)
        # target logit: same transform of the same value as in the loop (0 for an out-of-range target,
        # as the fused forward)
        t_ok = row_mask & (tgt >= 0) & (tgt < V)
        ut = tl.load(U + rows * stride_u + tgt, mask=t_ok, other=0.0)
        if HAS_BIAS:
            ut += tl.load(BIAS + tgt, mask=t_ok, other=0.0).to(tl.float32)
        zt, tt = tm.transform(ut, inv_row, softcap, HAS_SOFTCAP)
        logp = tl.where(t_ok, zt, 0.0) - lse

        w = tl.load(WEIGHT + rows, mask=row_mask, other=0.0).to(tl.float32)
        live = row_mask & (w != 0.0)
        old = tl.load(OLD + rows, mask=live, other=0.0).to(tl.float32)
        adv = tl.load(ADV + rows, mask=live, other=0.0).to(tl.float32)
        coef = tm.head_coef(logp, old, adv, mode, clip_lo, clip_hi, clip_c, dual, IS_INTERPRET)
        if HAS_KL:
            ref = tl.load(REF + rows, mask=live, other=0.0).to(tl.float32)
            coef += kl_coef * tm.kl_grad(logp, ref, kl_type, kl_st, IS_INTERPRET)
        g_lp = tl.where(live, w * coef, 0.0)
        g_h = tl.where(live, -w * ent_coef, 0.0)
        tl.store(LOGP + rows, logp, mask=row_mask)
        tl.store(LSE + rows, lse, mask=row_mask)
        tl.store(G_LP + rows, g_lp, mask=row_mask)
        if HAS_ENTROPY:
            tl.store(ENT + rows, ent, mask=row_mask)
            tl.store(G_H + rows, g_h, mask=row_mask)

        du16_rows = DU16 + rows[:, None] * stride_du16
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs_v
            col_mask = cols < V
            valid = row_mask[:, None] & col_mask[None, :]
            u = tl.load(u_rows + cols[None, :], mask=valid & live[:, None], other=0.0)
            if HAS_BIAS:
                u += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            z, t = tm.transform(u, inv_t, softcap, HAS_SOFTCAP)
            hit = (cols[None, :] == tgt[:, None]) & valid
            du, dz = tm.dz_du(z, t, hit, valid, lse, ent, g_lp, g_h, inv_t, HAS_SOFTCAP, HAS_ENT_GRAD)
            du = tl.where(live[:, None], du, 0.0)
            tl.store(u_rows + cols[None, :], du, mask=valid)
            if HAS_DU16:
                tl.store(du16_rows + cols[None, :], du.to(DU16.dtype.element_ty), mask=valid)


# =====================================================================================
# Configs
# =====================================================================================

# fwd/du: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages); gemm: (BLOCK_M, BLOCK_K, BLOCK_D,
# num_warps, num_stages) - BLOCK_M and BLOCK_K must divide both du BLOCK_N and BLOCK_V (flag tiles);
# atomic: (BLOCK_N, BLOCK_V, BLOCK_H, BLOCK_D, num_warps, num_stages).
# epilogue: (BLOCK_N, BLOCK_V, num_warps, num_stages) of the one-pass row epilogue (no tl.dot; one
# row per program, 16 fp32 per thread per block: enough bytes in flight for a memory-bound pass).
# "<family>_fp32" entries override the 16-bit ones for fp32 inputs (4-byte operands: twice the shared
# memory per pipeline stage; tf32x3 needs more registers). Every entry is compiled for its arch by
# tests/test_gpu_static.py: 16-bit configs have no register spills at aligned shapes (the du
# kernel's [128, 128] epilogue needs 16 warps for that), and every config fits shared memory
# (fp32 spills a little at the pinned tiles: the gate reports it).
_CONFIGS = {
    "hopper": dict(
        fwd=(128, 128, 64, 8, 3),
        du=(128, 128, 64, 16, 3),
        gemm=(128, 64, 128, 8, 4),
        atomic=(128, 128, 64, 64, 8, 3),
        epilogue=(1, 4096, 8, 1),
        group=8,
    ),
    "hopper_fp32": dict(gemm=(128, 32, 128, 8, 4), du=(128, 128, 64, 8, 3), atomic=(128, 128, 32, 32, 8, 3)),
    "ampere": dict(
        fwd=(128, 128, 32, 8, 3),
        du=(128, 128, 32, 16, 3),
        gemm=(128, 32, 128, 8, 4),
        atomic=(64, 128, 32, 32, 8, 3),
        epilogue=(1, 4096, 8, 1),
        group=8,
    ),
    "ampere_fp32": dict(du=(128, 128, 32, 8, 3), atomic=(64, 64, 32, 32, 4, 3)),
    # interpreter: big blocks = few (sequentially run) programs; test shapes are tiny.
    "interpret": dict(
        fwd=(64, 256, 128, 1, 1),
        du=(64, 256, 128, 1, 1),
        gemm=(64, 64, 128, 1, 1),
        atomic=(64, 256, 128, 128, 1, 1),
        epilogue=(1, 1024, 1, 1),
        group=4,
    ),
}


def _family(device: torch.device) -> str:
    if _INTERPRET:
        return "interpret"
    p = torch.cuda.get_device_properties(device)
    # the hopper blocks need ~200 KiB of shared memory per block: consumer Blackwell (sm_120, ~99 KiB)
    # and other small-smem parts take the ampere ones (largest ~96 KiB), whatever the major version
    smem = getattr(p, "shared_memory_per_block_optin", 0) or (227 * 1024 if p.major == 9 or p.major == 10 else 0)
    return "hopper" if p.major >= 9 and smem >= 200 * 1024 else "ampere"


FP32_PRECISIONS = ("tf32x3", "ieee")


def _config(device: torch.device, opts: dict, dtype: Optional[torch.dtype] = None) -> dict:
    """Pinned block config for the device (and fp32 inputs when dtype is fp32); opts["triton_config"]
    (a dict) overrides entries (testing / tuning knob). cfg["fp32_precision"]: opts
    ``fp32_precision`` or FUSEDRL_TRITON_FP32_PRECISION, ``"tf32x3"`` (default) or ``"ieee"``."""
    fam = _family(device)
    cfg = dict(_CONFIGS[fam])
    if dtype == torch.float32:
        cfg.update(_CONFIGS.get(fam + "_fp32", {}))
    cfg.update(opts.get("triton_config") or {})
    prec = opts.get("fp32_precision") or os.environ.get("FUSEDRL_TRITON_FP32_PRECISION") or "tf32x3"
    if prec not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {prec!r}")
    cfg["fp32_precision"] = prec
    return cfg


def _is_ieee(x: Tensor, cfg: dict) -> bool:
    """IS_IEEE: exact fp32 tl.dot for fp32 inputs (always in the interpreter, which has no tf32)."""
    return x.dtype == torch.float32 and (cfg.get("fp32_precision") == "ieee" or _INTERPRET)


def _num_sms(device: torch.device) -> int:
    if _INTERPRET or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _device_facts(device: torch.device):
    """(SM count, free bytes, total bytes) of a CUDA device; (2, None, None) elsewhere (interpreter,
    CPU, meta). Free bytes: what torch can still use, read once per process (_device.usable_memory),
    so the plan is the same at every step. The planner's only view of the device: tests mock it."""
    mem = None if _INTERPRET else usable_memory(device)
    if mem is None:
        return 2, None, None
    return _num_sms(device), mem[0], mem[1]


#: default budget cap (FUSEDRL_TRITON_BUDGET_CAP_MB) and the share of free device memory it may take
_BUDGET_CAP_MB = 4096
_BUDGET_FREE_SHARE = 0.25


def _default_budget(n: int, free: Optional[int]) -> float:
    """Default backward memory budget in bytes (above inputs and grads).

    On a CUDA device: a quarter of the free memory, capped at 4 GiB (FUSEDRL_TRITON_BUDGET_CAP_MB),
    never below the lean floor 128 MiB + 1 KiB/token (DESIGN.md section 7). That keeps the 4-GEMM
    schedule with wide vocab chunks (few dx hi/lo accumulation passes, >= 2 waves per GEMM) up to
    N = 65536 tokens at H = 4096 / 8192 on an 80 GB GPU. Without device facts (CPU, interpreter):
    the lean floor.
    """
    floor = 128 * _MIB + 1024 * n
    if free is None:
        return float(floor)
    cap = float(os.environ.get("FUSEDRL_TRITON_BUDGET_CAP_MB", _BUDGET_CAP_MB)) * _MIB
    return float(max(floor, min(cap, _BUDGET_FREE_SHARE * free)))


# =====================================================================================
# Launchers
# =====================================================================================


def is_available(device: torch.device) -> tuple[bool, str]:
    if triton is None:
        return False, f"triton is not importable ({_TRITON_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, ""
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return False, "on CPU the triton backend needs TRITON_INTERPRET=1 (the triton interpreter)"
        if not _INTERPRET:
            return False, (
                "TRITON_INTERPRET=1 was set after fusedrl.backends.triton_backend was imported; "
                "set it before importing triton"
            )
        return True, ""
    return False, f"triton does not run on device type {device.type!r}"


def _check_dtype(t: Tensor) -> None:
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend supports float32/float16/bfloat16 inputs, got {t.dtype}")


class _Temp(NamedTuple):
    """A validated ``temperature`` as the kernels take it: the scalar 1/T (1.0 with per-token T) and
    the per-token 1/T (fp32 [N]) or None."""

    inv: float
    inv_vec: Optional[Tensor]


def _temp(temperature, n: int, device: torch.device, where: str) -> _Temp:
    """The backend contract's ``temperature`` (a float > 0, or one temperature per row: a 1-D real
    tensor of length ``n`` on ``device``; ValueError naming ``temperature`` otherwise) as a :class:`_Temp`.
    Per-token 1/T is formed once per call, rounded once from fp64, as the scalar path's Python
    ``1.0 / T`` is: an all-equal vector of an fp32-exact T gives the scalar path's bits."""
    if isinstance(temperature, _Temp):
        return temperature
    return _inv_temp(*check_temperature(temperature, n, device, f"triton backend {where}"))


def _inv_temp(t: float, vec: Optional[Tensor]) -> _Temp:
    """:class:`_Temp` of a checked ``(scalar T, per-token fp32 T or None)``."""
    if vec is None:
        return _Temp(1.0 / t, None)
    return _Temp(1.0, (1.0 / vec.double()).float())


def _cap(softcap: Optional[float]) -> float:
    return float(softcap) if softcap is not None else 1.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _launch_fwd(x, w, bias, targets, n, v, h, vocab_start, temperature, softcap, return_entropy, is_logits, opts):
    dev = x.device
    cfg = _config(dev, opts, x.dtype)
    bn, bv, bh, nw, ns = cfg["fwd"]
    tp = _temp(temperature, n, dev, "logits_forward" if is_logits else "forward")
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    zt = torch.zeros(n, dtype=torch.float32, device=dev)
    ent = torch.empty(n, dtype=torch.float32, device=dev) if return_entropy else None
    if n == 0:
        return lse, zt, ent
    ntb, nvb = _cdiv(n, bn), _cdiv(v, bv)
    splits = opts.get("vocab_splits")
    if not splits:  # enough programs for ~4 waves when N is small; 1 split once N fills the GPU
        splits = _cdiv(4 * _num_sms(dev), ntb)
    splits = max(1, min(int(splits), nvb))
    v_per = _cdiv(nvb, splits) * bv
    splits = _cdiv(v, v_per)
    if splits > 1:
        part = torch.empty(3, splits, n, dtype=torch.float32, device=dev)
        pm, ps, pb = part[0], part[1], part[2]
    else:
        pm = ps = pb = lse
    args = (
        x,
        w if w is not None else x,
        bias if bias is not None else lse,
        targets,
        tp.inv_vec if tp.inv_vec is not None else lse,
        lse,
        ent if ent is not None else lse,
        zt,
        pm,
        ps,
        pb,
        n,
        v,
        h,
        int(vocab_start),
        v_per,
        splits,
        x.stride(0),
        w.stride(0) if w is not None else 0,
        tp.inv,
        _cap(softcap),
    )
    meta = dict(
        BLOCK_GROUP=cfg["group"],
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_ENTROPY=bool(return_entropy),
        HAS_SPLITS=splits > 1,
        HAS_TEMP_VEC=tp.inv_vec is not None,
        IS_LOGITS=is_logits,
        IS_FP32=x.dtype == torch.float32,
        IS_IEEE=_is_ieee(x, cfg),
        IS_INTERPRET=_INTERPRET,
    )
    if _AUTOTUNE:
        grid = lambda META: (_cdiv(n, META["BLOCK_N"]) * splits,)  # noqa: E731
        _tuned("fwd", dev, x.dtype == torch.float32)[grid](*args, IS_EVEN_H=False, **meta)
    else:
        _fwd_kernel[(ntb * splits,)](
            *args, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, IS_EVEN_H=(h % bh == 0), num_warps=nw, num_stages=ns, **meta
        )
    if splits > 1:
        mb = 64 if _INTERPRET else 256
        _merge_kernel[(_cdiv(n, mb),)](
            pm, ps, pb, lse, ent if ent is not None else lse, n, splits, BLOCK_N=mb, HAS_ENTROPY=bool(return_entropy)
        )
    return lse, zt, ent


@launches_on_first_arg_device
def forward(x, w, targets, bias, temperature, softcap, return_entropy, vocab_start=0, **opts):
    """(lse, zt, ent|None) over the local vocabulary shard; see the module docstring."""
    _check_dtype(x)
    x, w, targets = x.contiguous(), w.contiguous(), targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, h = x.shape
    return _launch_fwd(
        x, w, bias, targets, n, w.shape[0], h, vocab_start, temperature, softcap, return_entropy, False, opts
    )


@launches_on_first_arg_device
def logits_forward(logits, targets, temperature, softcap, return_entropy, **opts):
    _check_dtype(logits)
    logits, targets = logits.contiguous(), targets.contiguous()
    n, v = logits.shape
    return _launch_fwd(logits, None, None, targets, n, v, 0, 0, temperature, softcap, return_entropy, True, opts)


def _launch_du(
    x,
    w,
    bias,
    targets,
    lse,
    ent,
    g_lp,
    g_H,
    du,
    flags,
    db_part,
    n0,
    n_rows,
    v0,
    n_cols,
    h,
    vocab_start,
    temperature,
    softcap,
    eps,
    is_logits,
    cfg,
):
    bn, bv, bh, nw, ns = cfg["du"]
    # per-token 1/T is indexed by global row (n0 + local row): the full [N] vector for every chunk
    tp = _temp(temperature, x.shape[0], x.device, "logits_backward" if is_logits else "backward")
    grid = (_cdiv(n_rows, bn) * _cdiv(n_cols, bv),)
    dummy = lse
    args = (
        x,
        w if w is not None else x,
        bias if bias is not None else dummy,
        targets,
        tp.inv_vec if tp.inv_vec is not None else dummy,
        lse,
        ent if ent is not None else dummy,
        g_lp,
        g_H if g_H is not None else dummy,
        du,
        flags if flags is not None else dummy,
        db_part if db_part is not None else dummy,
        n0,
        n_rows,
        v0,
        n_cols,
        h,
        int(vocab_start),
        x.stride(0),
        w.stride(0) if w is not None else 0,
        du.stride(0),
        flags.stride(0) if flags is not None else 0,
        tp.inv,
        _cap(softcap),
        float(eps),
    )
    meta = dict(
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_GROUP=cfg["group"],
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_ENTROPY=g_H is not None,
        HAS_FILTER=flags is not None,
        HAS_DB=db_part is not None,
        HAS_TEMP_VEC=tp.inv_vec is not None,
        IS_LOGITS=is_logits,
        IS_FP32=x.dtype == torch.float32,
        IS_IEEE=_is_ieee(x, cfg),
        IS_INTERPRET=_INTERPRET,
    )
    if _AUTOTUNE and not is_logits:
        _tuned("du", x.device, x.dtype == torch.float32)[grid](*args, IS_EVEN_H=False, **meta)
    else:
        _du_kernel[grid](
            *args, BLOCK_H=bh, IS_EVEN_H=(h % bh == 0) if not is_logits else True, num_warps=nw, num_stages=ns, **meta
        )


def _live_lists(flags: Tensor) -> tuple[Tensor, Tensor]:
    """(LIVE, LIVE_CNT) of a [flag rows, flag cols] int8 tile-flag view (any strides): per row, the
    indices of its live columns in ascending order first (int32, [rows, cols]), and their count."""
    live = flags != 0
    cnt = live.sum(1, dtype=torch.int32)
    idx = torch.sort((~live).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


def _launch_gemm(a, a_strides, b, c, live, flag_blocks, m, k, d, cfg, acc=False, lo=None, lo_in=False, lo_out=False):
    """c[:m, :d] (+)= A @ B, A given as (tensor, (stride_m, stride_k)); live: (LIVE, LIVE_CNT) of
    ``_live_lists`` (A block-sparse in flag_blocks tiles) or None (dense); see _gemm_kernel."""
    if m == 0 or d == 0:
        return
    bm, bk, bd, nw, ns = cfg["gemm"]
    meta = dict(
        BLOCK_M=bm,
        BLOCK_K=bk,
        BLOCK_FLAG_M=flag_blocks[0],
        BLOCK_FLAG_K=flag_blocks[1],
        BLOCK_GROUP=cfg["group"],
        HAS_FLAGS=live is not None,
        HAS_ACC=acc,
        HAS_LO_IN=lo_in,
        HAS_LO_OUT=lo_out,
        IS_FP32=a.dtype == torch.float32,
        IS_IEEE=_is_ieee(a, cfg),
        IS_INTERPRET=_INTERPRET,
    )
    idx, cnt = live if live is not None else (c, c)
    args = (
        a,
        b,
        c,
        lo if lo is not None else c,
        idx,
        cnt,
        m,
        k,
        d,
        a_strides[0],
        a_strides[1],
        b.stride(0),
        b.stride(1),
        c.stride(0),
        idx.stride(0) if live is not None else 0,
    )
    if _AUTOTUNE:
        grid = lambda META: (_cdiv(m, bm) * _cdiv(d, META["BLOCK_D"]),)  # noqa: E731
        _tuned("gemm", a.device, a.dtype == torch.float32)[grid](*args, **meta)
    else:
        # the list-driven (filtered) loop spends one pipeline stage on the tile-index load: one more
        # stage keeps as many operand buffers in flight (sm_90: 3 instead of 2 at the pinned 4)
        stages = ns + 1 if live is not None else ns
        _gemm_kernel[(_cdiv(m, bm) * _cdiv(d, bd),)](*args, BLOCK_D=bd, num_warps=nw, num_stages=stages, **meta)


def _zero_grads(x, w, bias, need_dx, need_dw, need_db):
    return (
        torch.zeros_like(x) if need_dx else None,
        torch.zeros_like(w) if need_dw else None,
        torch.zeros_like(bias) if need_db else None,
    )


@launches_on_first_arg_device
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
    """(dx, dw, db). opts: deterministic (True), grad_filter_eps (0.0 = exact),
    memory_budget_mb (default: from the free device memory, see _default_budget), workspace_mb
    (cap of the workspace; FUSEDRL_TRITON_WORKSPACE_MB), fp32_precision ("tf32x3" | "ieee"),
    min_vocab_chunk (1024), triton_config (dict overriding the pinned blocks; tuning/testing)."""
    _check_dtype(x)
    x, w, targets = x.contiguous(), w.contiguous(), targets.contiguous()
    bias = bias.contiguous() if bias is not None else None
    n, h = x.shape
    temperature = _temp(temperature, n, x.device, "backward")
    need_db = bool(need_db and bias is not None)
    if n == 0 or not (need_dx or need_dw or need_db):
        return _zero_grads(x, w, bias, need_dx, need_dw, need_db)
    lse = lse.float().contiguous()
    g_lp = g_lp.float().contiguous()
    if g_H is not None:
        g_H = g_H.float().contiguous()
        ent = ent.float().contiguous()
    eps = float(opts.get("grad_filter_eps") or 0.0)
    cfg = _config(x.device, opts, x.dtype)
    args = (
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
        vocab_start,
        need_dx,
        need_dw,
        need_db,
        eps,
        cfg,
        opts,
    )
    if opts.get("deterministic", True):
        return _backward_workspace(*args)
    return _backward_atomic(*args)


def _plan(n, h, v, x_dtype, need_dx, vocab_pass, cfg, opts, device):
    """Chunking of the deterministic backward under the memory budget (see the module docstring).

    Returns (vc, single, nc): vocab chunk width of the vocab pass (None if no vocab pass), whether
    dx is accumulated in that pass (`single`: 4 GEMMs), token chunk of the dx pass (None if none).
    Budget: opts memory_budget_mb, default :func:`_default_budget` (from the free device memory).
    The workspace is kept under opts workspace_mb / FUSEDRL_TRITON_WORKSPACE_MB when given (default:
    the budget on a CUDA device, 64 MiB elsewhere) unless a narrower one would leave the GEMMs with
    less than ~2 waves of programs. Within the budget the vocab chunks are as wide as possible: the
    dx hi/lo accumulation re-reads dx once per chunk.
    """
    bn, bv = cfg["du"][0], cfg["du"][1]
    bm, bd = cfg["gemm"][0], cfg["gemm"][2]
    esz = torch.empty((), dtype=x_dtype).element_size()
    n_sms, free, _ = _device_facts(device)
    budget = opts.get("memory_budget_mb")
    budget = _default_budget(n, free) if budget is None else float(budget) * _MIB
    ws_mb = opts.get("workspace_mb", os.environ.get("FUSEDRL_TRITON_WORKSPACE_MB"))
    ws_cap = float(ws_mb) * _MIB if ws_mb is not None else (budget if free is not None else 64.0 * _MIB)
    vc_min = int(opts.get("min_vocab_chunk", bv if _INTERPRET else 1024))
    n_pad, v_pad = _cdiv(n, bn) * bn, _cdiv(v, bv) * bv
    lo_bytes = 0 if x_dtype == torch.float32 else 2 * n * h  # bf16 residual of the dx accumulation
    want_rows = _cdiv(2 * n_sms, _cdiv(h, bd)) * bm  # GEMM M-extent for ~2 waves

    def chunk(limit, line_bytes, block, full):
        """widest multiple of `block` (>= block, <= full) whose lines of line_bytes fit `limit`."""
        limit = max(min(ws_cap, limit), min(limit, want_rows * line_bytes))
        return min(full, max(block, int(limit // line_bytes) // block * block))

    vc, single, nc = None, False, None
    if need_dx:  # can dx be accumulated across vocab chunks within the budget?
        if n_pad * v_pad * esz <= min(ws_cap, budget):
            vc, single = v_pad, True  # one chunk: dx complete in one GEMM, no accumulator
        else:
            vc = chunk(budget - lo_bytes, n_pad * esz, bv, v_pad)
            single = vc >= vc_min and lo_bytes + n_pad * vc * esz <= budget
        if not single:  # lean: token chunks of full vocabulary rows give complete dx rows
            vc = None
            nc = chunk(budget, v_pad * esz, bn, n_pad)
    if vocab_pass and vc is None:
        vc = chunk(budget, n_pad * esz, bv, v_pad)
    return vc, single, nc


def _backward_workspace(
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
    vocab_start,
    need_dx,
    need_dw,
    need_db,
    eps,
    cfg,
    opts,
):
    n, h = x.shape
    v = w.shape[0]
    dev = x.device
    bn, bv = cfg["du"][0], cfg["du"][1]
    bm, bk = cfg["gemm"][0], cfg["gemm"][1]
    assert bn % bm == 0 and bv % bm == 0 and bn % bk == 0 and bv % bk == 0, "gemm blocks must divide du blocks"
    filt = eps > 0.0
    vc, single, nc = _plan(n, h, v, x.dtype, need_dx, need_dw or need_db, cfg, opts, dev)
    vocab_pass = vc is not None

    dx = torch.empty_like(x) if need_dx else None
    dw = torch.empty_like(w) if need_dw else None
    db = torch.empty_like(bias) if need_db else None
    du_args = (x, w, bias, targets, lse, ent, g_lp, g_H)
    tail = (h, vocab_start, temperature, softcap, eps, False, cfg)

    # ---- vocab-chunk pass: dW / db complete per chunk; dx accumulated when `single` ----
    if vocab_pass:
        ntb = _cdiv(n, bn)
        nchunks = _cdiv(v, vc)
        ws = torch.empty(n, vc, dtype=x.dtype, device=dev)
        nvbc = _cdiv(vc, bv)
        flags = torch.empty(ntb, nvbc, dtype=torch.int8, device=dev) if filt else None
        db_part = torch.empty(ntb, vc, dtype=torch.float32, device=dev) if need_db else None
        use_lo = single and nchunks > 1 and x.dtype != torch.float32
        lo = torch.empty(n, h, dtype=torch.bfloat16, device=dev) if use_lo else None
        for ci in range(nchunks):
            v0 = ci * vc
            vcc = min(vc, v - v0)
            _launch_du(*du_args, ws, flags, db_part, 0, n, v0, vcc, *tail)
            if need_db:
                db[v0 : v0 + vcc] = db_part[:, :vcc].sum(0).to(db.dtype)
            # live-tile lists over this chunk's flag tiles (columns past vcc hold stale flags)
            f = flags[:, : _cdiv(vcc, bv)] if filt else None
            if need_dw:  # dW[chunk] = du^T @ x  (A = du^T: m = vocab, k = tokens); complete, cast once
                _launch_gemm(
                    ws,
                    (1, ws.stride(0)),
                    x,
                    dw[v0 : v0 + vcc],
                    _live_lists(f.t()) if filt else None,
                    (bv, bn),
                    vcc,
                    n,
                    h,
                    cfg,
                )
            if need_dx and single:  # dx (+)= du @ W[chunk]  (m = tokens, k = vocab)
                _launch_gemm(
                    ws,
                    (ws.stride(0), 1),
                    w[v0 : v0 + vcc],
                    dx,
                    _live_lists(f) if filt else None,
                    (bn, bv),
                    n,
                    vcc,
                    h,
                    cfg,
                    acc=ci > 0,
                    lo=lo,
                    lo_in=use_lo and ci > 0,
                    lo_out=use_lo and ci < nchunks - 1,
                )
        del ws, lo

    # ---- token-chunk pass (lean schedule): complete dx rows, no accumulator ----
    if need_dx and not single:
        nvb = _cdiv(v, bv)
        ws = torch.empty(nc, v, dtype=x.dtype, device=dev)
        flags = torch.empty(_cdiv(nc, bn), nvb, dtype=torch.int8, device=dev) if filt else None
        for n0 in range(0, n, nc):
            ncc = min(nc, n - n0)
            _launch_du(*du_args, ws, flags, None, n0, ncc, 0, v, *tail)
            live = _live_lists(flags[: _cdiv(ncc, bn)]) if filt else None
            _launch_gemm(ws, (ws.stride(0), 1), w, dx[n0 : n0 + ncc], live, (bn, bv), ncc, v, h, cfg)
    return dx, dw, db


def _backward_atomic(
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
    vocab_start,
    need_dx,
    need_dw,
    need_db,
    eps,
    cfg,
    opts,
):
    n, h = x.shape
    v = w.shape[0]
    dev = x.device
    bn, bv, bh, bd, nw, ns = cfg["atomic"]
    f32 = torch.float32
    dx = torch.zeros(n, h, dtype=f32, device=dev) if need_dx else None
    dw = torch.zeros(v, h, dtype=f32, device=dev) if need_dw else None
    db = torch.zeros(v, dtype=f32, device=dev) if need_db else None
    dummy = lse
    tp = _temp(temperature, n, dev, "backward")
    grid = (_cdiv(n, bn) * _cdiv(v, bv),)
    _bwd_atomic_kernel[grid](
        x,
        w,
        bias if bias is not None else dummy,
        targets,
        tp.inv_vec if tp.inv_vec is not None else dummy,
        lse,
        ent if ent is not None else dummy,
        g_lp,
        g_H if g_H is not None else dummy,
        dx if dx is not None else dummy,
        dw if dw is not None else dummy,
        db if db is not None else dummy,
        n,
        v,
        h,
        int(vocab_start),
        x.stride(0),
        w.stride(0),
        tp.inv,
        _cap(softcap),
        float(eps),
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_H=bh,
        BLOCK_D=bd,
        BLOCK_GROUP=cfg["group"],
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_ENTROPY=g_H is not None,
        HAS_FILTER=eps > 0.0,
        HAS_DX=need_dx,
        HAS_DW=need_dw,
        HAS_DB=need_db,
        HAS_TEMP_VEC=tp.inv_vec is not None,
        IS_EVEN_H=(h % bh == 0),
        IS_FP32=x.dtype == torch.float32,
        IS_IEEE=_is_ieee(x, cfg),
        IS_INTERPRET=_INTERPRET,
        num_warps=nw,
        num_stages=ns,
    )
    return (
        dx.to(x.dtype) if need_dx else None,
        dw.to(w.dtype) if need_dw else None,
        db.to(bias.dtype) if need_db else None,
    )


@launches_on_first_arg_device
def logits_backward(logits, targets, temperature, softcap, lse, ent, g_lp, g_H, inplace=False, **opts):
    """dlogits [N, V] in logits.dtype (written into `logits` when inplace=True)."""
    _check_dtype(logits)
    if inplace and not logits.is_contiguous():
        raise ValueError("logits_backward(inplace=True) needs contiguous logits")
    logits, targets = logits.contiguous(), targets.contiguous()
    n, v = logits.shape
    temperature = _temp(temperature, n, logits.device, "logits_backward")
    out = logits if inplace else torch.empty_like(logits)
    if n == 0:
        return out
    lse = lse.float().contiguous()
    g_lp = g_lp.float().contiguous()
    if g_H is not None:
        g_H = g_H.float().contiguous()
        ent = ent.float().contiguous()
    cfg = _config(logits.device, opts, logits.dtype)
    # each program loads its logits tile before storing dlogits to the same tile: safe in place
    _launch_du(
        logits,
        None,
        None,
        targets,
        lse,
        ent,
        g_lp,
        g_H,
        out,
        None,
        None,
        0,
        n,
        0,
        v,
        0,
        0,
        temperature,
        softcap,
        0.0,
        True,
        cfg,
    )
    return out


# =====================================================================================
# One-pass row epilogue (docs/one-pass.md; issue 13)
# =====================================================================================

# OnePassHead, HEAD_MODES, KL_TYPES and the argument checks are shared with the cuda backend
# (fusedrl/backends/_onepass.py); re-exported here (fusedrl/onepass.py builds ``kmod.OnePassHead``).


@launches_on_first_arg_device
def onepass_epilogue(
    u: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    head: OnePassHead,
    du16: Optional[Tensor] = None,
    **opts,
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor, Optional[Tensor]]:
    """One-pass row epilogue over a token chunk (docs/one-pass.md, "The row epilogue contract").

    Args:
        u: fp32 ``[Nc, V]`` workspace holding the raw logits ``x_c @ W^T`` (no bias), unit column
            stride (any row stride); overwritten with ``du = dL/du`` (fp32).
        targets: ``[Nc]`` integer ids in ``[0, V)`` (an id outside it reads as logit 0, no one-hot).
        bias: ``[V]`` or None, added to every row before ``z = softcap(u + b) / T``; a ``-inf`` entry
            masks a vocabulary column (``p = 0``, ``du = 0``).
        temperature: ``T``: a float > 0, or an fp32 ``[Nc]`` tensor on u's device holding the chunk's
            per-token temperatures (row n uses ``T_n``).
        softcap: softcap value, None = off.
        head: :class:`OnePassHead` (or any object with its fields).
        du16: optional ``[Nc, V]`` bf16 / fp16 buffer (unit column stride) that also receives ``du``.
        opts: ``triton_config`` (dict overriding the pinned ``epilogue`` block config).

    Returns:
        ``(logp, ent, lse, g_lp, g_H)``, fp32 ``[Nc]``; ``ent`` and ``g_H`` are None when neither
        ``head.need_ent`` nor ``head.ent_coef`` asks for the entropy. ``db`` (``du.sum(0)``) is the
        caller's: it needs a column reduction across rows.

    Bad arguments raise TypeError / ValueError naming them (``_onepass.check_epilogue``).
    """
    a = check_epilogue(u, targets, bias, temperature, softcap, head, du16, bias_dtype=None)  # upcast on load
    n, v = a.n, a.v
    dev = u.device
    tp = _inv_temp(a.temperature, a.temp_vec)
    f32 = dict(dtype=torch.float32, device=dev)
    logp, lse, g_lp = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    ent = torch.empty(n, **f32) if a.has_ent else None
    g_h = torch.empty(n, **f32) if a.has_ent else None
    if n == 0:
        return logp, ent, lse, g_lp, g_h
    cfg = _config(dev, opts)
    bn, bv, nw, ns = cfg["epilogue"]
    _onepass_kernel[(_cdiv(n, bn),)](
        u,
        a.targets,
        a.bias if a.bias is not None else u,
        tp.inv_vec if tp.inv_vec is not None else u,
        a.old,
        a.adv,
        a.weight,
        a.ref if a.ref is not None else u,
        du16 if du16 is not None else u,
        logp,
        ent if ent is not None else lse,
        lse,
        g_lp,
        g_h if g_h is not None else lse,
        n,
        v,
        u.stride(0),
        du16.stride(0) if du16 is not None else 0,
        tp.inv,
        _cap(a.softcap),
        a.mode,
        a.clip_lo,
        a.clip_hi,
        a.clip_c,
        int(a.dual),
        a.ent_coef,
        a.kl_coef,
        a.kl_type,
        int(a.kl_st),
        BLOCK_N=bn,
        BLOCK_V=bv,
        HAS_BIAS=a.bias is not None,
        HAS_SOFTCAP=a.softcap is not None,
        HAS_ENTROPY=a.has_ent,
        HAS_ENT_GRAD=a.ent_coef != 0.0,
        HAS_KL=a.kl_coef != 0.0,
        HAS_DU16=du16 is not None,
        HAS_TEMP_VEC=tp.inv_vec is not None,
        IS_INTERPRET=_INTERPRET,
        num_warps=nw,
        num_stages=ns,
    )
    return logp, ent, lse, g_lp, g_h


# =====================================================================================
# Autotuning (GPU only, FUSEDRL_TRITON_AUTOTUNE=1): a few configs per kernel, keyed on H / D.
# =====================================================================================

# Per (family, fp32 inputs?) lists; tests/test_gpu_static.py compiles every entry for its arch and
# fails on a config over the shared-memory limit or (16-bit) spilling registers. Removed by that
# gate: fwd 128x256x64 / 256x128x64 w8 and 128x128x32 w4 (16-bit spills on sm_90 and sm_80; fp32 over
# the shared-memory limit), du BLOCK_H 32/64/128 at 4 or 8 warps (16-bit spills), gemm BLOCK_D 256
# (w8 and w16) and 128 w4 (16-bit spills), every 16-warp config with a 256-wide tile (16 warps cap
# ptxas at 128 registers: spills), and every fp32 config with BLOCK_K / BLOCK_H 64 at 4 stages or
# 256-wide tiles (over the shared-memory limit).
# fwd: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages); du: (BLOCK_H, num_warps, num_stages) (BLOCK_N,
# BLOCK_V stay pinned: they are the flag tiles); gemm: (BLOCK_D, num_warps, num_stages) (BLOCK_M,
# BLOCK_K pinned).
_TUNE_CONFIGS = {
    "fwd": {
        ("hopper", False): [(128, 128, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4)],
        ("ampere", False): [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 4)],
        ("hopper", True): [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3)],
        ("ampere", True): [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 128, 32, 4, 4)],
    },
    "du": {
        ("hopper", False): [(64, 16, 3), (32, 16, 4), (128, 16, 2)],
        ("ampere", False): [(32, 16, 3), (32, 16, 4), (64, 16, 3)],
        ("hopper", True): [(64, 8, 3), (32, 8, 4)],
        ("ampere", True): [(32, 8, 3), (32, 8, 4)],
    },
    "gemm": {
        ("hopper", False): [(128, 8, 4), (64, 4, 5), (128, 8, 3)],
        ("ampere", False): [(128, 8, 4), (64, 4, 5), (128, 8, 3)],
        ("hopper", True): [(128, 8, 4), (64, 4, 4), (128, 8, 3)],
        ("ampere", True): [(128, 8, 4), (64, 4, 4), (128, 8, 3)],
    },
}
_TUNED: dict = {}


def _tuned(kernel: str, device: torch.device, is_fp32: bool):  # pragma: no cover - needs a GPU
    """The autotuned kernel for (kernel, device family, fp32 inputs), built on first use."""
    fam = _family(device)
    key = (kernel, fam, bool(is_fp32))
    if key not in _TUNED:
        cfgs = _TUNE_CONFIGS[kernel][(fam, bool(is_fp32))]
        if kernel == "fwd":
            configs = [
                triton.Config(dict(BLOCK_N=a, BLOCK_V=b, BLOCK_H=c), num_warps=w_, num_stages=s_)
                for (a, b, c, w_, s_) in cfgs
            ]
            _TUNED[key] = triton.autotune(configs=configs, key=["H", "IS_FP32"])(_fwd_kernel)
        elif kernel == "du":
            configs = [triton.Config(dict(BLOCK_H=c), num_warps=w_, num_stages=s_) for (c, w_, s_) in cfgs]
            _TUNED[key] = triton.autotune(configs=configs, key=["H", "IS_FP32"])(_du_kernel)
        else:
            configs = [triton.Config(dict(BLOCK_D=d), num_warps=w_, num_stages=s_) for (d, w_, s_) in cfgs]
            _TUNED[key] = triton.autotune(
                configs=configs, key=["D", "IS_FP32", "HAS_FLAGS"], restore_value=["C", "C_LO"]
            )(_gemm_kernel)
    return _TUNED[key]
