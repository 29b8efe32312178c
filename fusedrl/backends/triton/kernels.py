"""The triton backend's core kernels: the fused forward (online LSE / entropy over vocabulary splits) and
its merge, the backward's du kernel and list-driven GEMM (deterministic path), and the fully fused
fp32-atomic backward. Launchers are in ``core.py``; the design is in docs/backends.md ("triton").

Pointer arguments are UPPERCASE and constexprs BLOCK_*/HAS_*/IS_*; offsets are int64 and every
load / store is masked (the interpreter has no bounds checks). Shared per-element math lives in
``row_math.py``.
"""

from __future__ import annotations

from . import row_math as tm
from .runtime import tl, triton

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
    def row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC: tl.constexpr):
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

        inv_temp: the scalar 1/T or a [BLOCK_N, 1] column of per-row 1/T (``row_inv_temp``).
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
    def fwd_kernel(
        X,
        W,
        BIAS,
        TARGETS,
        INV_TEMP,
        LSE,
        ENT,
        ZT,
        SQ,
        PART_M,
        PART_S,
        PART_B,
        PART_S2,
        PART_B2,
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
        HAS_ENTROPY_CHANGE: tl.constexpr,
    ):
        """Online (M, S, B') and target logit over one vocab split for one token block
        (HAS_TEMP_VEC: per-token 1/T from INV_TEMP [N], else the scalar inv_temp). HAS_ENTROPY_CHANGE
        (with HAS_ENTROPY): also (S2, B2), finished into SQ [2, N] = (sum p^2, sum p^2 (log p + H))."""
        pid_n, pid_s = _swizzle(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, BLOCK_GROUP)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        _, inv_t = row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC)
        tgt = tl.load(TARGETS + rows, mask=row_mask, other=-1).to(tl.int64) - vocab_start
        v_lo = pid_s.to(tl.int64) * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)

        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
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
            if HAS_ENTROPY_CHANGE:
                m, s, b, s2, b2 = tm.online_update_sq(m, s, b, s2, b2, z, HAS_ENTROPY, HAS_ENTROPY_CHANGE)
            else:
                m, s, b = tm.online_update(m, s, b, z, HAS_ENTROPY)

        in_split = (tgt >= v_lo) & (tgt < v_hi)
        tl.store(ZT + rows, zt, mask=row_mask & in_split)  # exactly one program owns a token's zt
        if HAS_SPLITS:
            off = pid_s.to(tl.int64) * N + rows
            tl.store(PART_M + off, m, mask=row_mask)
            tl.store(PART_S + off, s, mask=row_mask)
            if HAS_ENTROPY:
                tl.store(PART_B + off, b, mask=row_mask)
            if HAS_ENTROPY_CHANGE:
                tl.store(PART_S2 + off, s2, mask=row_mask)
                tl.store(PART_B2 + off, b2, mask=row_mask)
        else:
            lse, ent = tm.finish_stats(m, s, b)
            tl.store(LSE + rows, lse, mask=row_mask)
            if HAS_ENTROPY:
                tl.store(ENT + rows, ent, mask=row_mask)
            if HAS_ENTROPY_CHANGE:
                q, c = tm.finish_sq(s, b, s2, b2)
                tl.store(SQ + rows, q, mask=row_mask)
                tl.store(SQ + N + rows, c, mask=row_mask)

    @triton.jit
    def merge_kernel(
        PART_M,
        PART_S,
        PART_B,
        PART_S2,
        PART_B2,
        LSE,
        ENT,
        SQ,
        N,
        n_splits,
        BLOCK_N: tl.constexpr,
        HAS_ENTROPY: tl.constexpr,
        HAS_ENTROPY_CHANGE: tl.constexpr,
    ):
        """Merge the per-split (M, S, B') partials ([splits, N] fp32) into LSE and entropy; with
        HAS_ENTROPY_CHANGE also the (S2, B2) partials into SQ [2, N] (as fwd_kernel)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        off = rows
        for _ in range(0, n_splits):
            ms = tl.load(PART_M + off, mask=row_mask, other=0.0)
            ss = tl.load(PART_S + off, mask=row_mask, other=1.0)
            bs = ss
            if HAS_ENTROPY:
                bs = tl.load(PART_B + off, mask=row_mask, other=0.0)
            if HAS_ENTROPY_CHANGE:
                s2s = tl.load(PART_S2 + off, mask=row_mask, other=0.0)
                b2s = tl.load(PART_B2 + off, mask=row_mask, other=0.0)
                m, s, b, s2, b2 = tm.merge_sq(m, s, b, s2, b2, ms, ss, bs, s2s, b2s, HAS_ENTROPY, True)
            else:
                m, s, b, _, _ = tm.merge_sq(m, s, b, s, s, ms, ss, bs, ss, ss, HAS_ENTROPY, False)
            off += N
        lse, ent = tm.finish_stats(m, s, b)
        tl.store(LSE + rows, lse, mask=row_mask)
        if HAS_ENTROPY:
            tl.store(ENT + rows, ent, mask=row_mask)
        if HAS_ENTROPY_CHANGE:
            q, c = tm.finish_sq(s, b, s2, b2)
            tl.store(SQ + rows, q, mask=row_mask)
            tl.store(SQ + N + rows, c, mask=row_mask)

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
    def du_kernel(
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
        _, inv_t = row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC)
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
    def gemm_kernel(
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
    def bwd_atomic_kernel(
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
        _, inv_t = row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC)
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
