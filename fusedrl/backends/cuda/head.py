"""CUDA per-token policy-loss head: ``csrc/head.cu`` (kernels) and ``csrc/head_math.h`` (their math).

Launchers first, ops and public functions after, in the order of ``fusedrl.backends.triton.head``.

Two kernels of the compiled module ``fusedrl._C``, each one launch over the flat tokens:

* ``head_vanilla``: verl's vanilla PPO per token (ratio, clip-higher, dual clip), the metric flags
  and ``coef = dL/dlogp``, exactly the op of :func:`fusedrl.backends.triton.head.vanilla_token_terms`
  (same conventions, same autograd: ``dlogp = grad_L * coef``).
* ``head_cov``: the Clip-Cov / KL-Cov covariance statistic ``(A - mean_A)(logp - mean_logp)`` per
  token, and for Clip-Cov the candidate flag (valid, not PPO-clipped, ``lb < cov < ub``). The two
  means are 0-dim device tensors computed by torch exactly as fusedrl/loss/ computes them, and the kernel
  reads them on device: no host sync, and the statistic is bitwise the torch path's. The top-k /
  random selection over the candidates stays in torch, on device.

Both compute in fp32 (the head's compute dtype; other float inputs are upcast first). On CUDA
tensors the kernels run on the caller's current stream. On CPU tensors the same per-token C++
functions run as a host loop (``head_*_host``): that is what CI without a GPU checks, and it serves
``policy_loss(backend="cuda")`` on CPU tensors. Everything needs the extension built (``setup.py``, nvcc).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import heads
from .extension import extension
from .extension import is_available as _backend_available

Tensor = torch.Tensor


# =====================================================================================
# Availability and launchers
# =====================================================================================


def is_available(device: torch.device) -> tuple[bool, str]:
    """(available, reason): CUDA devices where the extension has a kernel image, and CPU (host loop)
    wherever the extension is built. cuBLAS is not needed by the head."""
    device = torch.device(device)
    C = extension()
    if C is None:
        return _backend_available(device)  # (False, "cuda backend not built: <reason>")
    if device.type == "cpu":
        return True, ""
    if device.type != "cuda":
        return False, f"the cuda head runs on CUDA devices (kernels) and CPU (host loop), not {device.type}"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok, why = C.device_check(idx)
    return bool(ok), why


def _f32(t: Tensor) -> Tensor:
    return t.reshape(-1).to(torch.float32).contiguous()


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _device_args(t: Tensor) -> tuple[int, int]:
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return idx, torch.cuda.current_stream(idx).cuda_stream


def _launch_vanilla(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    clip_low: float,
    clip_high: float,
    clip_c: Optional[float],
):
    """Flat (loss, clipped u8, lower u8, neg_d, coef) of ``head_vanilla`` over ``logp.numel()`` tokens."""
    C = extension()
    lp, old, adv = _f32(logp), _f32(old_logp), _f32(advantages)
    n = lp.numel()
    out = heads.empty_vanilla_outputs(n, lp.device)
    if n == 0:
        return out
    m = heads.flat_mask(mask)
    # Python floats become fp32 arguments: the rounding of torch.clamp / mul with a Python scalar on
    # an fp32 tensor (the scalar is cast to fp32 first).
    lo, hi = 1.0 - float(clip_low), 1.0 + float(clip_high)
    c = float(clip_c) if clip_c is not None else 1.0
    args = (_ptr(lp), _ptr(old), _ptr(adv), _ptr(m), n, lo, hi, c, clip_c is not None) + tuple(map(_ptr, out))
    if lp.is_cuda:
        C.head_vanilla(*_device_args(lp), *args)
    else:
        C.head_vanilla_host(*args)
    return out


def _launch_cov(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    means: Tensor,
    clip: Optional[list[float]],
) -> tuple[Tensor, Tensor]:
    """Flat (cov fp32, candidates u8) of ``head_cov``; candidates are all 0 without ``clip``."""
    C = extension()
    lp, old, adv = _f32(logp), _f32(old_logp), _f32(advantages)
    n = lp.numel()
    cov = torch.empty(n, dtype=torch.float32, device=lp.device)
    cand = (
        torch.zeros(n, dtype=torch.uint8, device=lp.device)
        if clip is None
        else torch.empty(n, dtype=torch.uint8, device=lp.device)
    )
    if n == 0:
        return cov, cand
    m = heads.flat_mask(mask)
    means = means.reshape(2).to(torch.float32).contiguous()
    low, high, lb, ub = clip if clip is not None else (0.0, 0.0, 0.0, 0.0)
    args = (
        _ptr(lp),
        _ptr(old),
        _ptr(adv),
        _ptr(m),
        _ptr(means),
        n,
        1.0 - float(low),
        1.0 + float(high),
        float(lb),
        float(ub),
        _ptr(cov),
        0 if clip is None else _ptr(cand),
    )
    if lp.is_cuda:
        C.head_cov(*_device_args(lp), *args)
    else:
        C.head_cov_host(*args)
    return cov, cand


# =====================================================================================
# Ops (torch.library custom ops: opaque to torch.compile, traceable with fullgraph=True)
# =====================================================================================

_vanilla_op = heads.make_vanilla_op("fusedrl::cuda_vanilla_token_terms", _launch_vanilla)


@torch.library.custom_op("fusedrl::cuda_cov_terms", mutates_args=())
def _cov_op(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    means: Tensor,
    clip: Optional[list[float]] = None,
) -> tuple[Tensor, Tensor]:
    cov, cand = _launch_cov(logp, old_logp, advantages, mask, means, clip)
    return cov.reshape(logp.shape), cand.view(torch.bool).reshape(logp.shape)


@_cov_op.register_fake
def _(logp, old_logp, advantages, mask, means, clip=None):
    return (
        torch.empty_like(logp, dtype=torch.float32, memory_format=torch.contiguous_format),
        torch.empty_like(logp, dtype=torch.bool, memory_format=torch.contiguous_format),
    )


# =====================================================================================
# Public functions
# =====================================================================================


def vanilla_token_terms(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    clip_low: float,
    clip_high: float,
    clip_c: Optional[float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token vanilla PPO terms ``(L, clipped, clipped_lower, neg_d)`` from one ``head_vanilla`` launch.

    Same contract as :func:`fusedrl.backends.triton.head.vanilla_token_terms`: ``logp`` any shape
    (fp32/fp16/bf16; fp64 and devices without the extension use the torch formulas), the only
    differentiable input; ``old_logp``, ``advantages``, ``mask`` of the same shape; masked tokens give
    0 / False and zero gradient; ``clip_c`` None disables the dual clip. Outputs in ``logp``'s shape.
    """
    return heads.vanilla_token_terms(
        _vanilla_op, is_available(logp.device)[0], logp, old_logp, advantages, mask, clip_low, clip_high, clip_c
    )


def cov_terms(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Optional[Tensor],
    mean_a: Tensor,
    mean_lp: Tensor,
    clip: Optional[tuple[float, float, float, float]] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Covariance statistic per token, and Clip-Cov candidates, from one ``head_cov`` launch.

    Args:
        logp, old_logp, advantages: same shape, any (no gradient flows: the statistic is detached).
        mask: same shape, non-zero = valid, or None (all valid). Masked tokens read as 0.
        mean_a, mean_lp: 0-dim tensors on the same device, the masked means of A and logp.
        clip: ``(clip_low, clip_high, lb, ub)`` to also get Clip-Cov's candidate mask
            ``valid & ~(L2 > L1) & (lb < cov < ub)``; None for KL-Cov.

    Returns:
        ``cov`` (fp32, ``logp``'s shape) and ``candidates`` (bool) or None when ``clip`` is None.
    """
    heads.check_inputs(logp, old_logp, advantages, mask)
    ok, why = is_available(logp.device)
    if not ok:
        raise RuntimeError(f"cuda head unavailable on {logp.device}: {why}")
    means = torch.stack([mean_a.detach().reshape(()), mean_lp.detach().reshape(())]).to(torch.float32)
    clip_l = None if clip is None else [float(v) for v in clip]
    cov, cand = _cov_op(logp.detach(), old_logp.detach(), advantages.detach(), mask, means, clip_l)
    return cov, (cand if clip is not None else None)
