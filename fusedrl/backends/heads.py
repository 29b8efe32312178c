"""What the per-token loss-head kernels (``triton/head.py``, ``cuda/head.py``) share, so that each of them
is only a kernel, its launcher and its op:

* :func:`make_vanilla_op` registers a launcher as a ``torch.library.custom_op`` (opaque to
  ``torch.compile``, traceable with ``fullgraph=True``) with its fake implementation and autograd:
  the launcher also returns ``coef = dL/dlogp``, so the backward is one multiply;
* :func:`vanilla_terms_torch`: the torch formulas of the same op (fp64 inputs, no kernel available);

The kernels compute, per token and in fp32, what ``fusedrl.loss.modes`` computes with torch ops; which
one runs is decided above them (``fusedrl.loss.heads``, by ``backend=``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .base import LOG_RATIO_CLAMP

Tensor = torch.Tensor


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
    """The torch formulas of fusedrl/loss/ (autograd through them), with the op's masking conventions."""
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
