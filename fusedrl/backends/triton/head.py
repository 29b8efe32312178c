"""Triton per-token policy-loss head: the vanilla PPO terms of :func:`fusedrl.policy_loss` in one launch.

Kernel first, launcher and op after, in the style of the backend's other modules.

What it computes (verl ``compute_policy_loss_vanilla``), per token, in fp32,
exactly as ``fusedrl.loss.modes.loss_vanilla`` does on its cleaned inputs:

* ``d = logp - old_logp``, ``dc = clamp(d, -20, 20)``, ``r = exp(dc)``;
* ``L1 = -A r``, ``L2 = -A clamp(r, 1-low, 1+high)``, ``Lc = max(L1, L2)``;
* dual clip (``clip_c`` not None): ``L = min(Lc, -A c)`` where ``A < 0``, else ``Lc``;
* metric flags ``clipped = L2 > L1``, ``clipped_lower = (Lc > -A c) & (A < 0)`` (all False without
  dual clip) and ``neg_d = -dc`` (the clamped log-ratio, which is what the torch head's ``ppo_kl`` averages);
* ``coef = dL/dlogp``, the torch autograd derivative of the expression above, ties included:
  ``torch.maximum`` / ``torch.minimum`` send half the gradient to each side of a tie and
  ``torch.clamp`` passes the gradient on its closed interval, so
  ``coef = -A r [|d| <= 20] (w1 + w2 [1-low <= r <= 1+high]) wD`` with ``(w1, w2)`` = (1, 0), (0, 1)
  or (1/2, 1/2) as ``L1 >, <, == L2`` and ``wD`` = 1, 1/2, 0 as ``Lc <, ==, > -A c`` (``A < 0``).

The backward of the op is then one elementwise multiply ``dlogp = grad_L * coef`` instead of the
autograd graph of ~10 elementwise ops (and their saved tensors) that the torch path records.

Masked tokens (``mask == 0``) are never loaded: every output there is 0 / False and ``coef`` is 0,
so NaN/inf sitting in padding cannot leak. ``old_logp`` and ``advantages`` are constants (as in
the torch head, which detaches them): they get no gradient. ``neg_d`` and the flags are metrics: they are
not differentiable (the torch head detaches them too).

Numerics vs the torch path. ``L`` and ``neg_d`` are computed with the same fp32 operations in the same
order as the torch head; the one op that can differ is ``exp``. On CUDA the kernel uses libdevice
``exp`` (``__nv_expf``, what torch's CUDA ``exp`` compiles to) rather than Triton's approximate
``tl.exp``; in the interpreter ``tl.exp`` is numpy's, which differs from torch's CPU ``exp`` by 1 ulp
on some inputs. The gradient is ``grad_L * (-A r ...)`` instead of torch's ``(grad_L * -A) * r``:
at most ~1 ulp apart. The kernel computes in fp32 (inputs may be fp32/fp16/bf16 and are upcast on
load, as the torch head's ``.to(float32)``); fp64 inputs are served by a torch implementation of the same
formulas (:func:`fusedrl.backends.heads.vanilla_terms_torch`), so :func:`vanilla_token_terms` works for every dtype.

The per-token formulas are ``row_math.log_ratio`` / ``row_math.vanilla_terms``, shared with the
one-pass row epilogue (``onepass.py``) (each formula once per kernel language).

Portability: pointer args are UPPERCASE, constexprs BLOCK_*/HAS_*/IS_*, offsets int64, every
load/store masked (the interpreter has no bounds checks), NaN-propagating min/max like torch's.
``IS_INTERPRET`` selects ``tl.exp`` (the interpreter has no libdevice). Written for triton >= 3.6.

Used by ``fusedrl.loss.heads`` when ``backend="triton"`` (or ``auto`` resolving to it);
:mod:`fusedrl.backends.heads` holds the op registration and the torch fallback shared with the cuda head.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import heads
from ..device import on_device
from ..heads import empty_vanilla_outputs, flat_mask, make_vanilla_op
from . import row_math as tm
from .runtime import INTERPRET, cdiv, libdevice, tl, triton
from .runtime import is_available as backend_available

Tensor = torch.Tensor

#: tokens per program: small in the interpreter so tests cover several blocks and a ragged tail
BLOCK_N = 32 if INTERPRET else 1024
_NUM_WARPS = 4


# =====================================================================================
# Kernel
# =====================================================================================

if triton is not None:

    @triton.jit
    def _vanilla_fwd_kernel(
        LOGP,
        OLD,
        ADV,
        MASK,
        LOSS,
        CLIPPED,
        LOWER,
        NEG_D,
        COEF,
        n,
        clip_lo,
        clip_hi,
        clip_c,
        BLOCK_N: tl.constexpr,
        HAS_MASK: tl.constexpr,
        HAS_DUAL_CLIP: tl.constexpr,
        IS_INTERPRET: tl.constexpr,
    ):
        """Per-token vanilla PPO loss, metric flags and dL/dlogp for BLOCK_N tokens (module docstring)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        inb = offs < n
        if HAS_MASK:
            valid = inb & (tl.load(MASK + offs, mask=inb, other=0) != 0)
        else:
            valid = inb
        # masked tokens are never read: 0 stands in for them (the torch head's torch.where(valid, x, 0))
        lp = tl.load(LOGP + offs, mask=valid, other=0.0).to(tl.float32)
        old = tl.load(OLD + offs, mask=valid, other=0.0).to(tl.float32)
        adv = tl.load(ADV + offs, mask=valid, other=0.0).to(tl.float32)

        # the head formulas live once, in row_math (shared with the one-pass epilogue)
        d, dc, r, in_range = tm.log_ratio(lp, old, IS_INTERPRET)
        loss, coef, clipped, lower = tm.vanilla_terms(r, in_range, adv, clip_lo, clip_hi, clip_c, HAS_DUAL_CLIP)
        coef = tl.where(valid, coef, 0.0)

        tl.store(LOSS + offs, tl.where(valid, loss, 0.0), mask=inb)
        tl.store(CLIPPED + offs, (valid & clipped).to(tl.uint8), mask=inb)
        tl.store(LOWER + offs, (valid & lower).to(tl.uint8), mask=inb)
        tl.store(NEG_D + offs, tl.where(valid, -dc, 0.0), mask=inb)
        tl.store(COEF + offs, coef, mask=inb)


# =====================================================================================
# Launcher, op, wiring helpers
# =====================================================================================


def is_available(device: torch.device) -> tuple[bool, str]:
    """(available, reason): where the triton backend runs (CUDA, or CPU under the interpreter),
    plus libdevice on GPUs (the head uses libdevice ``exp`` to match torch's CUDA ``exp``)."""
    ok, why = backend_available(device)
    if ok and torch.device(device).type == "cuda" and libdevice is None and not INTERPRET:
        return False, "triton.language.extra.libdevice is not importable"
    return ok, why


def _launch(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    clip_low: float,
    clip_high: float,
    clip_c: Optional[float],
):
    """Flat fp32 outputs (loss, clipped u8, lower u8, neg_d, coef) of the kernel over logp.numel() tokens."""
    dev = logp.device
    lp = logp.reshape(-1).contiguous()
    old = old_logp.reshape(-1).contiguous()
    adv = advantages.reshape(-1).contiguous()
    n = lp.numel()
    loss, clipped, lower, neg_d, coef = empty_vanilla_outputs(n, dev)
    if n == 0:
        return loss, clipped, lower, neg_d, coef
    m = flat_mask(mask)
    # Python floats are fp32 kernel args: the same rounding as torch.clamp / mul with a Python
    # scalar on an fp32 tensor (the scalar is cast to fp32 first).
    lo, hi = float(1.0 - clip_low), float(1.0 + clip_high)
    c = float(clip_c) if clip_c is not None else 1.0
    grid = (cdiv(n, BLOCK_N),)
    with on_device(lp):
        _vanilla_fwd_kernel[grid](
            lp,
            old,
            adv,
            m if m is not None else lp,
            loss,
            clipped,
            lower,
            neg_d,
            coef,
            n,
            lo,
            hi,
            c,
            BLOCK_N=BLOCK_N,
            HAS_MASK=m is not None,
            HAS_DUAL_CLIP=clip_c is not None,
            IS_INTERPRET=INTERPRET,
            num_warps=_NUM_WARPS,
        )
    return loss, clipped, lower, neg_d, coef


# the op: torch.library.custom_op (opaque to torch.compile, traceable with fullgraph=True)
_vanilla_op = make_vanilla_op("fusedrl::vanilla_token_terms", _launch)


def vanilla_token_terms(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    clip_low: float,
    clip_high: float,
    clip_c: Optional[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token vanilla PPO terms ``(L, clipped, clipped_lower, neg_d)`` in one kernel launch.

    Args:
        logp: current-policy log-probs, any shape, fp32/fp16/bf16 (fp64: torch fallback, fp64 out);
            the only differentiable input: ``dlogp = grad_L * dL/dlogp`` (one multiply).
        old_logp, advantages: same shape as ``logp``; constants (no gradient).
        mask: same shape, non-zero = valid token (or None: all valid). Masked tokens give 0 / False
            and zero gradient whatever ``logp`` / ``old_logp`` / ``advantages`` hold there.
        clip_low, clip_high: ratio clipped to ``[1-clip_low, 1+clip_high]``.
        clip_c: dual-clip bound for ``A < 0`` or None (disabled: ``clipped_lower`` all False).

    Returns:
        ``L`` (fp32; fp64 for fp64 ``logp``), ``clipped`` and ``clipped_lower`` (bool) and
        ``neg_d = -clamp(logp - old_logp, -20, 20)`` (same dtype as ``L``), all of ``logp``'s shape.
    """
    return heads.vanilla_token_terms(
        _vanilla_op, is_available(logp.device)[0], logp, old_logp, advantages, mask, clip_low, clip_high, clip_c
    )
