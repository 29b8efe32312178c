"""Shared ``@triton.jit`` math of fusedrl's Triton kernels: each formula once.

Used by ``kernels.py`` (the fused forward / backward kernels), ``onepass.py`` (the one-pass row epilogue)
and ``head.py`` (the standalone vanilla PPO head). Every function works on tensors of any
shape (scalars, ``[BLOCK_N]`` rows, ``[BLOCK_N, BLOCK_V]`` tiles) unless it says otherwise.

Logit transform and softmax statistics (docs/design.md, the core math)
    :func:`tanh` (no libdevice: the interpreter has none), :func:`transform` (``z = softcap(u) / T``),
    :func:`online_update` / :func:`finish_stats` (per-row running ``M``, ``S = sum e^(z-M)``,
    ``B' = sum (z-M) e^(z-M)``; ``LSE = M + log S``, ``H = log S - B'/S``), :func:`online_update_sq` /
    :func:`finish_sq` (the same plus the entropy change's ``S2 = sum e^(2(z-M))``, ``B2 = sum (z-M)
    e^(2(z-M))``; ``sum p^2 = S2/S^2``, ``sum p^2 (log p + H) = (B2 - S2 B'/S)/S^2``) and :func:`dz_du`
    (``dz = g_lp (1[target] - p) - g_H p (z - LSE + H)``, ``du = dz dz/du``; a ``-inf`` logit has
    ``p = 0`` and ``du = 0``, never ``0 * inf``), and :func:`mma` (``tl.dot`` with fp32 accumulation:
    tf32x3 for fp32 operands unless IS_IEEE; operands upcast in the interpreter).

Per-token head (docs/one-pass.md "Head coefficients")
    :func:`log_ratio`, :func:`vanilla_terms` (clip-higher + dual clip with torch autograd's tie
    rules, as ``csrc/head_math.h`` ``vanilla_token``), :func:`head_coef` (modes 0 clipped surrogate,
    1 gpg, 2 cispo, 3 unclipped), :func:`kl_grad` (k1 / abs / k2 / k3 and straight-through).
    ``exp`` there is :func:`exp_accurate`: libdevice ``exp`` on GPUs (what torch's CUDA ``exp`` uses;
    ``tl.exp`` is ``ex2.approx``), numpy's in the interpreter. Min/max propagate NaN like torch's.

Mode and KL-type codes are runtime integers (one compiled variant serves every head config).
"""

from __future__ import annotations

from ..base import HEAD_MODES, KL_TYPES
from ..base import LOG_RATIO_CLAMP as _CLAMP
from .runtime import libdevice as _libdevice
from .runtime import tl, triton

#: head mode codes (the table in fusedrl.backends.base): clipped surrogate (vanilla / Clip-Cov
#: unselected), gpg, cispo, unclipped ``-A r`` (KL-Cov unselected)
MODE_CLIPPED, MODE_GPG, MODE_CISPO, MODE_UNCLIPPED = (HEAD_MODES[k] for k in ("clipped", "gpg", "cispo", "unclipped"))
#: KL estimator codes (the table in fusedrl.backends.base)
KL_K1, KL_ABS, KL_K2, KL_K3 = (KL_TYPES[k] for k in ("k1", "abs", "k2", "k3"))


if triton is not None:
    #: verl's log-ratio clamp (fusedrl.backends.base.LOG_RATIO_CLAMP) as a compile-time constant
    LOG_RATIO_CLAMP = tl.constexpr(_CLAMP)
    # ---------------------------------------------------------------------------------------------
    # Logit transform and softmax statistics
    # ---------------------------------------------------------------------------------------------

    @triton.jit
    def tanh(y):
        """tanh without libdevice: odd Taylor series near 0, (1 - e^-2|y|) / (1 + e^-2|y|) elsewhere."""
        a = tl.abs(y)
        e = tl.exp(-2.0 * a)  # in (0, 1]: never overflows, -> 0 for large |y| (tanh -> +-1)
        big = (1.0 - e) / (1.0 + e)
        y2 = a * a
        poly = 1.0 + y2 * (
            -1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0 + y2 * (-1382.0 / 155925.0))))
        )
        t = tl.where(a < 0.25, a * poly, big)
        return tl.where(y < 0, -t, t)

    @triton.jit
    def transform(u, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
        """(z, t): z = softcap(u) / T with softcap(u) = c tanh(u / c); t = tanh(u / c) (u without softcap).

        inv_temp: the scalar 1/T, or per-row 1/T broadcastable against u (a [rows, 1] column for a tile).
        """
        if HAS_SOFTCAP:
            t = tanh(u / softcap)
            z = t * (softcap * inv_temp)
        else:
            t = u
            z = u * inv_temp
        return z, t

    @triton.jit
    def online_update(m, s, b, z, HAS_ENTROPY: tl.constexpr):
        """Fold a [rows, cols] tile of logits z (masked columns -inf) into the running (M, S, B')."""
        m_new, s, b, _, _ = online_update_sq(m, s, b, s, b, z, HAS_ENTROPY, False)
        return m_new, s, b

    @triton.jit
    def online_update_sq(m, s, b, s2, b2, z, HAS_ENTROPY: tl.constexpr, HAS_ENTROPY_CHANGE: tl.constexpr):
        """:func:`online_update` and, with HAS_ENTROPY_CHANGE (needs HAS_ENTROPY), the entropy change's
        running S2 = sum e^(2(z-M)) and B2 = sum (z-M) e^(2(z-M)), rescaled by alpha^2 when M grows
        (s2, b2 are returned unchanged without it)."""
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # rescale against a finite reference: a tile of -inf logits (masked vocabulary) keeps m = -inf
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)  # 0 on the first tile (m = -inf)
        zc = z - m_ref[:, None]
        e = tl.exp(zc)  # 0 on -inf columns
        if HAS_ENTROPY:
            # B' relative to the new max: alpha * (B' + (m - m_new) S) + sum (z - m_new) e
            # (NaN-free: -inf * 0 never formed, even in a discarded where branch)
            shift = (tl.where(s > 0, m, m_ref) - m_ref) * s
            b = alpha * (b + shift) + tl.sum(tl.where(e > 0, zc, 0.0) * e, axis=1)
            if HAS_ENTROPY_CHANGE:
                # (z - M) e^2 as its own product: reusing (z - M) e here spills on sm_80 (the AOT gate)
                a2 = alpha * alpha
                shift2 = (tl.where(s2 > 0, m, m_ref) - m_ref) * s2
                e2 = e * e
                b2 = a2 * (b2 + shift2) + tl.sum(tl.where(e > 0, zc, 0.0) * e2, axis=1)
                s2 = s2 * a2 + tl.sum(e2, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        return m_new, s, b, s2, b2

    @triton.jit
    def merge_sq(m, s, b, s2, b2, ms, ss, bs, s2s, b2s, HAS_ENTROPY: tl.constexpr, HAS_ENTROPY_CHANGE: tl.constexpr):
        """Merge running statistics (m, s, b, s2, b2) with a part's (ms, ss, bs, s2s, b2s) ([rows]; vocab
        splits); s2, b2 / b are returned unchanged without HAS_ENTROPY_CHANGE / HAS_ENTROPY."""
        m_new = tl.maximum(m, ms)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # splits of -inf logits stay NaN-free
        a_old = tl.exp(m - m_ref)
        a_new = tl.exp(ms - m_ref)
        if HAS_ENTROPY:
            shift = (tl.where(s > 0, m, m_ref) - m_ref) * s
            b = a_old * (b + shift) + a_new * (bs + (tl.where(ss > 0, ms, m_ref) - m_ref) * ss)
            if HAS_ENTROPY_CHANGE:
                q_old = a_old * a_old
                q_new = a_new * a_new
                shift2 = (tl.where(s2 > 0, m, m_ref) - m_ref) * s2
                b2 = q_old * (b2 + shift2) + q_new * (b2s + (tl.where(s2s > 0, ms, m_ref) - m_ref) * s2s)
                s2 = s2 * q_old + s2s * q_new
        s = s * a_old + ss * a_new
        return m_new, s, b, s2, b2

    @triton.jit
    def finish_stats(m, s, b):
        """(LSE, H) from the running statistics: LSE = M + log S, H = log S - B'/S."""
        log_s = tl.log(s)
        return m + log_s, log_s - b / s

    @triton.jit
    def finish_sq(s, b, s2, b2):
        """The entropy change's row sums (sum p^2, sum p^2 (log p + H)) = (S2/S^2, (B2 - S2 B'/S)/S^2):
        log p + H = (z - M) - B'/S, no log S to cancel (fusedrl.backends.base.entropy_change)."""
        inv = 1.0 / s
        return (s2 * inv) * inv, ((b2 - s2 * (b * inv)) * inv) * inv

    @triton.jit
    def dz_du(z, t, hit, valid, lse, ent, g_lp, g_h, inv_temp, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr):
        """(du, dz) of a [rows, cols] tile; lse, ent, g_lp, g_h are [rows] (ent, g_h read iff HAS_ENTROPY);
        inv_temp the scalar 1/T or a [rows, 1] column of per-row 1/T.

        dz = g_lp (1[target] - p) - g_H p (z - LSE + H), du = dz / T (* (1 - t^2) with softcap);
        0 outside `valid`.
        """
        zl = z - lse[:, None]  # log p
        p = tl.where(valid, tl.exp(zl), 0.0)
        dz = g_lp[:, None] * (tl.where(hit, 1.0, 0.0) - p)
        if HAS_ENTROPY:
            # p = 0 where z = -inf (masked vocabulary): the term is 0, never 0 * -inf
            dz -= g_h[:, None] * p * (tl.where(p > 0, zl, 0.0) + ent[:, None])
        dz = tl.where(valid, dz, 0.0)
        du = dz * inv_temp
        if HAS_SOFTCAP:
            du = du * (1.0 - t * t)
        return du, dz

    @triton.jit
    def mma(a, b, acc, IS_FP32: tl.constexpr, IS_IEEE: tl.constexpr, IS_INTERPRET: tl.constexpr):
        """acc + a @ b in fp32 on tensor cores. fp32 operands: tf32x3 (3 tf32 products, about fp32
        accuracy) unless IS_IEEE (exact fp32 FMA loop: no tensor cores, several times slower).
        Interpreter: operands upcast to fp32 (its bf16 tl.dot is broken), plain fp32 numpy matmul."""
        if IS_INTERPRET:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        elif IS_FP32:
            if IS_IEEE:
                out = tl.dot(a, b, acc, input_precision="ieee")
            else:
                out = tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            out = tl.dot(a, b, acc)
        return out

    # ---------------------------------------------------------------------------------------------
    # Per-token head
    # ---------------------------------------------------------------------------------------------

    @triton.jit
    def exp_accurate(x, IS_INTERPRET: tl.constexpr):
        """exp matching torch: libdevice __nv_expf on GPUs, numpy's exp in the interpreter."""
        if IS_INTERPRET:
            r = tl.exp(x)
        else:
            r = _libdevice.exp(x)
        return r

    @triton.jit
    def clamp_nan(x, lo, hi):
        """torch.clamp(x, lo, hi) = min(max(x, lo), hi) with NaN propagation."""
        return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def log_ratio(lp, old, IS_INTERPRET: tl.constexpr):
        """(d, dc, r, in_range): d = logp - old, dc = clamp(d, -20, 20), r = exp(dc), -20 <= d <= 20."""
        d = lp - old
        dc = clamp_nan(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        r = exp_accurate(dc, IS_INTERPRET)
        return d, dc, r, (d >= -LOG_RATIO_CLAMP) & (d <= LOG_RATIO_CLAMP)

    @triton.jit
    def vanilla_terms(r, in_range, adv, clip_lo, clip_hi, clip_c, dual):
        """Clipped surrogate with clip-higher and (``dual`` != 0) dual clip for A < 0.

        Returns (loss, coef, clipped, lower): L1 = -A r, L2 = -A clamp(r, lo, hi), Lc = max(L1, L2),
        L = min(Lc, -A c) for A < 0 under dual clip; clipped = L2 > L1, lower = (Lc > -A c) & (A < 0)
        (dual only); coef = dL/dlogp with torch autograd's tie rules: maximum / minimum send half the
        gradient to each side of a tie, clamp passes it on its closed interval, and the log-ratio
        clamp on [-20, 20].
        """
        rc = clamp_nan(r, clip_lo, clip_hi)
        neg_a = -adv
        l1 = neg_a * r
        l2 = neg_a * rc
        lc = tl.maximum(l1, l2, propagate_nan=tl.PropagateNan.ALL)
        clipped = l2 > l1
        half_tie = tl.where(l1 == l2, 0.5, 0.0)
        w1 = tl.where(l1 > l2, 1.0, half_tie)
        w2 = tl.where(l2 > l1, 1.0, half_tie)
        w = w1 + tl.where((r >= clip_lo) & (r <= clip_hi), w2, 0.0)
        l3 = neg_a * clip_c
        negative = (adv < 0) & (dual != 0)
        loss = tl.where(negative, tl.minimum(l3, lc, propagate_nan=tl.PropagateNan.ALL), lc)
        lower = (lc > l3) & negative
        w = w * tl.where(negative, tl.where(lc < l3, 1.0, tl.where(lc == l3, 0.5, 0.0)), 1.0)
        coef = tl.where(in_range, (neg_a * r) * w, 0.0)
        return loss, coef, clipped, lower

    @triton.jit
    def head_coef(lp, old, adv, mode, clip_lo, clip_hi, clip_c, dual, IS_INTERPRET: tl.constexpr):
        """dL/dlogp of the token-local policy loss ``mode`` (0 clipped, 1 gpg, 2 cispo, 3 unclipped)."""
        d, dc, r, in_range = log_ratio(lp, old, IS_INTERPRET)
        _, c_clip, _, _ = vanilla_terms(r, in_range, adv, clip_lo, clip_hi, clip_c, dual)
        c_gpg = -adv
        c_cispo = -clamp_nan(r, clip_lo, clip_hi) * adv  # sg(clamp(r)): no ratio gradient
        c_unclip = tl.where(in_range, -adv * r, 0.0)
        return tl.where(mode == 0, c_clip, tl.where(mode == 1, c_gpg, tl.where(mode == 2, c_cispo, c_unclip)))

    @triton.jit
    def kl_grad(lp, ref, kl_type, kl_st, IS_INTERPRET: tl.constexpr):
        """d KL(logp, ref) / dlogp for kl_type 0 k1, 1 abs, 2 k2, 3 k3; kl_st != 0: straight-through
        (value of the estimator, gradient of k2: delta)."""
        delta = lp - ref
        g_abs = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0))
        x = clamp_nan(-delta, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        ex = exp_accurate(x, IS_INTERPRET)
        v = ex - x - 1.0
        inside = (-delta >= -LOG_RATIO_CLAMP) & (-delta <= LOG_RATIO_CLAMP) & (v >= -10.0) & (v <= 10.0)
        g_k3 = tl.where(inside, 1.0 - ex, 0.0)
        g = tl.where(kl_type == 0, 1.0, tl.where(kl_type == 1, g_abs, tl.where(kl_type == 2, delta, g_k3)))
        return tl.where(kl_st != 0, delta, g)
