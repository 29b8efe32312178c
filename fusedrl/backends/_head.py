"""Shared plumbing of the per-token policy-loss head kernels (``triton_head.py``, ``cuda_head.py``).

The kernels compute, per token and in fp32, exactly what ``fusedrl/loss.py`` computes with torch ops
(DESIGN.md section 2). This module holds what both kernel modules share, so each of them is only a
kernel, its launcher and its op:

* :func:`make_vanilla_op` registers a launcher as a ``torch.library.custom_op`` (opaque to
  ``torch.compile``, traceable with ``fullgraph=True``) with its fake implementation and autograd:
  the launcher also returns ``coef = dL/dlogp``, so the backward is one multiply.
* :func:`vanilla_terms_torch`: the torch formulas of the same op (fp64 inputs, no kernel available).
* :func:`head_kind`: which head ``FUSEDRL_HEAD`` selects for a device and compute dtype, and
  :func:`vanilla_pg` / :func:`cov_terms`, the drop-ins loss.py calls.

``FUSEDRL_HEAD`` (environment): ``torch`` (default) | ``triton`` | ``cuda`` | ``auto`` (on CUDA
devices: triton, else cuda, else torch; elsewhere torch). ``cuda`` runs the compiled head of
``fusedrl._C``: its CUDA kernels on CUDA tensors, and the same per-token C++ code as a host loop on
CPU tensors (that is how CI without a GPU tests it). Naming a head that is not available is an error.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch

Tensor = torch.Tensor

HEAD_ENV = "FUSEDRL_HEAD"
HEAD_MODES = ("torch", "triton", "cuda", "auto")

# log-ratio clamp (loss.py's _LOG_RATIO_CLAMP, verl's clamp(log_prob - old_log_prob, -20, 20))
LOG_RATIO_CLAMP = 20.0

VanillaOut = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def check_inputs(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Optional[Tensor]) -> None:
    """Same shapes and device for the per-token inputs; floating-point log-probs."""
    if not logp.is_floating_point():
        raise TypeError(f"logp must be a floating-point tensor, got {logp.dtype}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if t is None:
            continue
        if tuple(t.shape) != tuple(logp.shape):
            raise ValueError(f"{name} must have the shape of logp {tuple(logp.shape)}, got {tuple(t.shape)}")
        if t.device != logp.device:
            raise ValueError(f"{name} is on {t.device} but logp is on {logp.device}")


def flat_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Flat contiguous uint8 view of a mask (bool is reinterpreted, other dtypes compared with 0)."""
    if mask is None:
        return None
    m = mask.reshape(-1)
    m = m.view(torch.uint8) if m.dtype == torch.bool else (m != 0).view(torch.uint8)
    return m.contiguous()


def empty_vanilla_outputs(n: int, device: torch.device) -> VanillaOut:
    """Flat (loss, clipped u8, lower u8, neg_d, coef) buffers for ``n`` tokens."""
    f = lambda: torch.empty(n, dtype=torch.float32, device=device)  # noqa: E731
    u = lambda: torch.empty(n, dtype=torch.uint8, device=device)  # noqa: E731
    return f(), u(), u(), f(), f()


def make_vanilla_op(qualname: str, launch: Callable[..., VanillaOut]):
    """Register ``launch(logp, old, adv, mask, clip_low, clip_high, clip_c) -> flat (loss, clipped u8,
    lower u8, neg_d, coef)`` as the custom op ``qualname`` returning ``(L, clipped, lower, neg_d, coef)``
    in ``logp``'s shape (bool flags), differentiable in ``logp`` only."""

    @torch.library.custom_op(qualname, mutates_args=())
    def op(
        logp: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Optional[Tensor],
        clip_low: float,
        clip_high: float,
        clip_c: Optional[float],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        loss, clipped, lower, neg_d, coef = launch(logp, old_logp, advantages, mask, clip_low, clip_high, clip_c)
        shape = logp.shape
        return (
            loss.reshape(shape),
            clipped.view(torch.bool).reshape(shape),
            lower.view(torch.bool).reshape(shape),
            neg_d.reshape(shape),
            coef.reshape(shape),
        )

    @op.register_fake
    def _(logp, old_logp, advantages, mask, clip_low, clip_high, clip_c):
        f = torch.empty_like(logp, dtype=torch.float32, memory_format=torch.contiguous_format)
        b = torch.empty_like(logp, dtype=torch.bool, memory_format=torch.contiguous_format)
        return f, b, torch.empty_like(b), torch.empty_like(f), torch.empty_like(f)

    def setup_context(ctx, inputs, output):
        ctx.logp_dtype = inputs[0].dtype
        ctx.save_for_backward(output[4])
        ctx.mark_non_differentiable(output[1], output[2], output[3], output[4])

    def backward(ctx, grad_loss, grad_clipped, grad_lower, grad_neg_d, grad_coef):
        (coef,) = ctx.saved_tensors
        dlogp = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            dlogp = (grad_loss * coef).to(ctx.logp_dtype)
        return dlogp, None, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op


def vanilla_terms_torch(logp, old_logp, advantages, mask, clip_low, clip_high, clip_c):
    """loss.py's torch formulas (autograd through them), with the op's masking conventions."""
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    valid = torch.ones(logp.shape, dtype=torch.bool, device=logp.device) if mask is None else mask != 0
    zero = torch.zeros(logp.shape, dtype=dtype, device=logp.device)
    lp = torch.where(valid, logp.to(dtype), zero)
    old = torch.where(valid, old_logp.detach().to(dtype), zero)
    adv = torch.where(valid, advantages.detach().to(dtype), zero)
    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    lc = torch.maximum(l1, l2)
    clipped = (l2 > l1) & valid
    if clip_c is None:
        loss, lower = lc, torch.zeros_like(valid)
    else:
        l3 = -adv * clip_c
        negative = adv < 0
        loss = torch.where(negative, torch.minimum(l3, lc), lc)
        lower = (lc > l3) & negative & valid
    loss = torch.where(valid, loss, zero)
    neg_d = torch.where(valid, -log_ratio.detach(), zero)
    return loss, clipped, lower, neg_d


def vanilla_token_terms(
    op,
    available: bool,
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    clip_low: float,
    clip_high: float,
    clip_c: Optional[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The public ``vanilla_token_terms`` of a head module: checks, then ``op`` (or the torch formulas
    for fp64 inputs / where the kernel is not available)."""
    check_inputs(logp, old_logp, advantages, mask)
    if logp.dtype == torch.float64 or not available:
        return vanilla_terms_torch(logp, old_logp, advantages, mask, clip_low, clip_high, clip_c)
    loss, clipped, lower, neg_d, _ = op(
        logp,
        old_logp.detach(),
        advantages.detach(),
        mask,
        float(clip_low),
        float(clip_high),
        None if clip_c is None else float(clip_c),
    )
    return loss, clipped, lower, neg_d


# --------------------------------------------------------------------------------------------------
# Selection and the drop-ins loss.py calls
# --------------------------------------------------------------------------------------------------


def _module(kind: str):
    if kind == "triton":
        from . import triton_head as m
    else:
        from . import cuda_head as m
    return m


@torch.compiler.assume_constant_result  # torch.compile: decided at trace time (env var, driver query)
def head_kind(device: torch.device, dtype: torch.dtype) -> str:
    """The head ``FUSEDRL_HEAD`` selects for ``(device, compute dtype)``: ``torch``, ``triton`` or ``cuda``.

    The kernels compute in fp32, so an fp64 compute dtype always keeps the torch path, and so do meta
    tensors (shape tracing). ``auto`` picks a kernel on CUDA devices only.
    """
    mode = os.environ.get(HEAD_ENV, "torch").strip().lower() or "torch"
    if mode not in HEAD_MODES:
        raise ValueError(f"{HEAD_ENV} must be one of {HEAD_MODES}, got {mode!r}")
    if mode == "torch" or dtype != torch.float32 or device.type == "meta":
        return "torch"
    if mode == "auto":
        if device.type != "cuda":
            return "torch"
        for kind in ("triton", "cuda"):
            if _module(kind).is_available(device)[0]:
                return kind
        return "torch"
    ok, why = _module(mode).is_available(device)
    if not ok:
        raise RuntimeError(f"{HEAD_ENV}={mode} but the {mode} head is not available on {device}: {why}")
    return mode


def vanilla_pg(tok, cfg):
    """Drop-in for loss.py's ``_loss_vanilla(tok, cfg)``: the same ``_PG`` from one kernel launch,
    or None when :func:`head_kind` says the torch path should run."""
    kind = head_kind(tok.logp.device, tok.logp.dtype)
    if kind == "torch":
        return None
    from ..loss import _PG  # lazy: loss.py imports this module lazily too

    loss, clipped, lower, neg_d = _module(kind).vanilla_token_terms(
        tok.logp, tok.old_logp, tok.adv, tok.valid, cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c
    )
    clipfrac_lower = tok.zero_metric() if cfg.clip_ratio_c is None else tok.masked_mean(lower)
    return _PG(loss, tok.masked_mean(clipped), clipfrac_lower, tok.masked_mean(neg_d))


def cov_terms(
    tok, mean_a: Tensor, mean_lp: Tensor, clip: Optional[tuple[float, float, float, float]]
) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """Drop-in for loss.py's covariance statistic: ``(cov, candidates)`` from one launch of the cuda
    head (``candidates`` only when ``clip = (clip_low, clip_high, lb, ub)`` is given, i.e. Clip-Cov),
    or None when the torch path should run. The triton head has no covariance kernel: under
    ``FUSEDRL_HEAD=auto`` the cuda head serves the covariance modes when it is available."""
    kind = head_kind(tok.logp.device, tok.logp.dtype)
    auto = os.environ.get(HEAD_ENV, "").strip().lower() == "auto"
    if kind != "cuda" and not (kind == "triton" and auto and _module("cuda").is_available(tok.logp.device)[0]):
        return None
    from . import cuda_head

    return cuda_head.cov_terms(tok.logp.detach(), tok.old_logp, tok.adv, tok.valid, mean_a, mean_lp, clip)
