"""The triton backend's one-pass row epilogue (docs/one-pass.md): one program per row block over the fp32
logits workspace, no ``tl.dot``. Pass 1 is online ``(M, S, B')`` -> LSE, entropy, logp; the loss head
(``row_math``: clipped surrogate, gpg, cispo, unclipped, KL k1/abs/k2/k3 and straight-through, entropy
bonus) -> ``g_lp``, ``g_H``; pass 2 writes ``du`` in place and / or as bf16 / fp16 for the gradient GEMMs
(``store_du32=False``: the 16-bit copy alone, 4 bytes per element less where nothing reads the fp32 du).
The head and the argument checks are ``fusedrl.backends.base``'s, shared with the cuda backend.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..base import EpilogueHead, EpilogueOut, OnePassHead, check_epilogue, entropy_change, wants_dh
from ..device import launches_on_first_arg_device
from . import config as C
from . import kernels as K
from . import row_math as tm
from .core import cap_value, inv_temp
from .runtime import INTERPRET, cdiv, tl, triton

Tensor = torch.Tensor

if triton is not None:
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
        SQ,
        n_rows,
        V,
        V_LD,
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
        HAS_DU32: tl.constexpr,
        HAS_TEMP_VEC: tl.constexpr,
        IS_INTERPRET: tl.constexpr,
        HAS_ENTROPY_CHANGE: tl.constexpr,
    ):
        """One-pass row epilogue (docs/one-pass.md) for BLOCK_N rows of the fp32 logits workspace U.

        Pass 1: online (M, S, B') over the row in BLOCK_V blocks -> LSE, H; the target logit by one
        load -> logp. Head: g_lp = w (coef + kl_coef dKL/dlogp), g_H = -w ent_coef (0 where w = 0,
        whose OLD / ADV / REF are never read). Pass 2: du written over U (HAS_DU32) and / or as DU16's
        dtype into DU16 (HAS_DU16; at least one of the two); rows with w = 0 get du = 0 without reading
        U. No tl.dot: the interpreter runs it as is.
        HAS_TEMP_VEC: the chunk's per-token 1/T from INV_TEMP [n_rows], else the scalar inv_temp.
        V_LD >= V: the columns of each U row the loads may read (V rounded up to 16 where the row stride
        and the allocation leave room: the one-pass workspace), so the loads' mask is constant over
        16-column groups and they vectorise at any V; columns >= V are never used (-inf, du masked).
        HAS_ENTROPY_CHANGE (with HAS_ENTROPY): pass 1 also sums (S2, B2) -> SQ [2, n_rows] = (sum p^2,
        sum p^2 (log p + H)), the entropy change's row sums.
        """
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < n_rows
        inv_row, inv_t = K.row_inv_temp(INV_TEMP, rows, row_mask, inv_temp, HAS_TEMP_VEC)
        offs_v = tl.arange(0, BLOCK_V).to(tl.int64)
        u_rows = U + rows[:, None] * stride_u
        tgt = tl.load(TARGETS + rows, mask=row_mask, other=-1).to(tl.int64)

        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs_v
            col_mask = cols < V
            u = tl.load(u_rows + cols[None, :], mask=row_mask[:, None] & (cols < V_LD)[None, :], other=0.0)
            if HAS_BIAS:
                u += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            z, t1 = tm.transform(u, inv_t, softcap, HAS_SOFTCAP)
            z = tl.where(col_mask[None, :], z, float("-inf"))  # never 0: 0 would corrupt LSE
            if HAS_ENTROPY_CHANGE:
                m, s, b, s2, b2 = tm.online_update_sq(m, s, b, s2, b2, z, HAS_ENTROPY, HAS_ENTROPY_CHANGE)
            else:
                m, s, b = tm.online_update(m, s, b, z, HAS_ENTROPY)
        lse, ent = tm.finish_stats(m, s, b)
        if HAS_ENTROPY_CHANGE:
            q, c = tm.finish_sq(s, b, s2, b2)
            tl.store(SQ + rows, q, mask=row_mask)
            tl.store(SQ + n_rows + rows, c, mask=row_mask)
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
            u = tl.load(u_rows + cols[None, :], mask=(row_mask & live)[:, None] & (cols < V_LD)[None, :], other=0.0)
            if HAS_BIAS:
                u += tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
            z, t = tm.transform(u, inv_t, softcap, HAS_SOFTCAP)
            hit = (cols[None, :] == tgt[:, None]) & valid
            du, dz = tm.dz_du(z, t, hit, valid, lse, ent, g_lp, g_h, inv_t, HAS_SOFTCAP, HAS_ENT_GRAD)
            du = tl.where(live[:, None], du, 0.0)
            if HAS_DU32:
                tl.store(u_rows + cols[None, :], du, mask=valid)
            if HAS_DU16:
                tl.store(du16_rows + cols[None, :], du.to(DU16.dtype.element_ty), mask=valid)


def readable_cols(u: Tensor) -> int:
    """Columns of each row of ``u [N, V]`` a kernel may read: ``V`` rounded up to 16 where the row stride and
    ``u``'s allocation hold them (the one-pass workspace's padded rows), else ``V``."""
    n, v = u.shape
    vp = -(-v // 16) * 16
    if n == 0 or vp == v or u.stride(0) < vp:
        return v
    end = (u.storage_offset() + (n - 1) * u.stride(0) + vp) * u.element_size()
    return vp if end <= u.untyped_storage().nbytes() else v


@launches_on_first_arg_device
def onepass_epilogue(
    u: Tensor,
    targets: Tensor,
    bias: Optional[Tensor],
    temperature: Union[float, Tensor],
    softcap: Optional[float],
    head: Union[EpilogueHead, OnePassHead],
    du16: Optional[Tensor] = None,
    *,
    store_du32: bool = True,
    **opts,
) -> EpilogueOut:
    """One-pass row epilogue over a token chunk (docs/one-pass.md, "The row epilogue contract").

    Args:
        u: fp32 ``[Nc, V]`` workspace holding the raw logits ``x_c @ W^T`` (no bias), unit column
            stride (any row stride; a multiple of 16 elements lets the compiled kernel use 16-byte
            loads); overwritten with ``du = dL/du`` (fp32) when ``store_du32``.
        targets: ``[Nc]`` integer ids in ``[0, V)`` (an id outside it reads as logit 0, no one-hot).
        bias: ``[V]`` or None, added to every row before ``z = softcap(u + b) / T``; a ``-inf`` entry
            masks a vocabulary column (``p = 0``, ``du = 0``).
        temperature: ``T``: a float > 0, or an fp32 ``[Nc]`` tensor on u's device holding the chunk's
            per-token temperatures (row n uses ``T_n``).
        softcap: softcap value, None = off.
        head: an :class:`EpilogueHead` (its ``codes`` and ``need_dh`` are used) or an :class:`OnePassHead`.
        du16: optional ``[Nc, V]`` bf16 / fp16 buffer (unit column stride) that also receives ``du``.
        store_du32: write the fp32 ``du`` over ``u`` (default). False (needs ``du16``): ``du16`` alone
            receives it and ``u`` keeps the logits: the lean epilogue of 16-bit inputs without a bias
            gradient, 4 bytes per element less (the same ``du16`` bits either way).
        opts: ``triton_config`` (dict overriding the pinned ``epilogue`` block config); other options
            of the contract (scratch buffers, prescaling) do not apply to a kernel and are ignored.

    Returns:
        :class:`EpilogueOut` ``(logp, ent, lse, g_lp, g_H, du, dh)``, fp32 ``[Nc]``; ``du`` is the buffer
        holding du: ``u``, or ``du16`` when ``store_du32`` is False; ``ent`` and ``g_H``
        are None when neither ``head.need_ent`` nor ``head.ent_coef`` asks for the entropy (``ent`` is
        returned with ``need_dh`` too); ``dh`` the entropy change when ``head.need_dh``, else None. ``db``
        (``du.sum(0)``) is the caller's: it needs a column reduction across rows.

    Bad arguments raise TypeError / ValueError naming them (:func:`fusedrl.backends.base.check_epilogue`).
    """
    need_dh = wants_dh(head)
    if isinstance(head, EpilogueHead):
        if head.codes is None:
            raise ValueError("onepass_epilogue: the triton epilogue needs head.codes (a kernel formula set)")
        head = head.codes
    a = check_epilogue(u, targets, bias, temperature, softcap, head, du16, bias_dtype=None)  # upcast on load
    if not store_du32 and du16 is None:
        raise ValueError("onepass_epilogue: store_du32=False needs du16 (du must be written somewhere)")
    out_du = u if store_du32 else du16
    n, v = a.n, a.v
    dev = u.device
    tp = inv_temp(a.temperature, a.temp_vec)
    f32 = dict(dtype=torch.float32, device=dev)
    has_ent = a.has_ent or need_dh  # the entropy change needs H
    logp, lse, g_lp = torch.empty(n, **f32), torch.empty(n, **f32), torch.empty(n, **f32)
    ent = torch.empty(n, **f32) if has_ent else None
    g_h = torch.empty(n, **f32) if has_ent else None
    sq = torch.empty(2, n, **f32) if need_dh else None
    if n == 0:
        return EpilogueOut(logp, ent, lse, g_lp, g_h if a.has_ent else None, out_du, sq[0] if need_dh else None)
    cfg = C.block_config(dev, opts)
    bn, bv, nw, ns = cfg["epilogue"]
    _onepass_kernel[(cdiv(n, bn),)](
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
        sq if sq is not None else lse,
        n,
        v,
        readable_cols(u),
        u.stride(0),
        du16.stride(0) if du16 is not None else 0,
        tp.inv,
        cap_value(a.softcap),
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
        HAS_ENTROPY=has_ent,
        HAS_ENT_GRAD=a.ent_coef != 0.0,
        HAS_KL=a.kl_coef != 0.0,
        HAS_DU16=du16 is not None,
        HAS_DU32=bool(store_du32),
        HAS_TEMP_VEC=tp.inv_vec is not None,
        IS_INTERPRET=INTERPRET,
        HAS_ENTROPY_CHANGE=need_dh,
        num_warps=nw,
        num_stages=ns,
    )
    dh = entropy_change(logp, ent, sq) if need_dh else None
    return EpilogueOut(logp, ent, lse, g_lp, g_h if a.has_ent else None, out_du, dh)


def onepass_supports(head: EpilogueHead, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """The kernel computes the configs with a kernel formula set (``head.codes``), for 16-bit and fp32
    inputs (fp64 takes the torch epilogue)."""
    if head.codes is None:
        return False, "this loss config has no kernel formula set"
    if dtype == torch.float64:
        return False, "fp64 inputs take the torch epilogue"
    return True, ""
