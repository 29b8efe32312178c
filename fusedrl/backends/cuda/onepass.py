"""The ``cuda`` backend's one-pass row epilogue (docs/one-pass.md): ONE kernel over the fp32 logits
workspace (csrc/onepass.cu: a full wave of blocks, 16-byte vector loads where the rows are 16-byte
aligned), or its host loop on CPU tensors (csrc/host_lanes.cpp: the same C++ row functions in the same
order, which is how CI without a GPU tests it)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..base import EpilogueHead, EpilogueOut, OnePassHead, check_epilogue, entropy_change, wants_dh
from .extension import DTYPE_CODE, NOT_BUILT, extension, lock, ptr, stream

Tensor = torch.Tensor

_onepass_dev_ok: dict[int, tuple[bool, str]] = {}


def _onepass_device(t: Tensor) -> int:
    """Device index for the kernel (device check cached; cuBLAS is not needed by the epilogue)."""
    if not torch.cuda.is_available():
        raise RuntimeError("onepass_epilogue: torch.cuda.is_available() is False")
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    with lock:
        if idx not in _onepass_dev_ok:
            ok, why = extension().device_check(idx)
            _onepass_dev_ok[idx] = (bool(ok), why)
        ok, why = _onepass_dev_ok[idx]
    if not ok:
        raise RuntimeError(f"cuda backend unavailable: {why}")
    return idx


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
    """The one-pass row epilogue over one token chunk: ONE kernel (CUDA tensors, current stream) or its
    host loop (CPU tensors; the same C++ row functions).

    Args:
        u: fp32 ``[Nc, V]`` workspace holding the raw logits ``x_c @ W^T`` (bias not added); unit
            column stride, any row stride (16-byte aligned rows, a row stride divisible by 4, take the
            kernel's 16-byte vector path: another per-thread summation order, the same statistics to
            fp32 rounding). Overwritten with ``du`` (``dz * dz/du``) when ``store_du32``.
        targets: ``[Nc]`` int token ids in ``[0, V)`` (masked tokens carry any valid id, e.g. 0).
        bias: ``[V]`` or None, added to every row before the transform (``-inf`` masks a column).
        temperature: ``T`` of ``z = softcap(u + b) / T``: a float > 0, or an fp32 ``[Nc]`` tensor on u's
            device holding the chunk's per-token temperatures (row n uses ``T_n``).
        softcap: softcap value, None = off.
        head: an :class:`EpilogueHead` (its ``codes`` and ``need_dh`` are used) or an :class:`OnePassHead`.
        du16: optional ``[Nc, V]`` bf16 / fp16 buffer (unit column stride) that also receives ``du``,
            rounded once from the fp32 value (the operand of the two gradient GEMMs).
        store_du32: write the fp32 ``du`` over ``u`` (default). False (needs ``du16``): ``du16`` alone
            receives it and ``u`` keeps the logits (the lean epilogue of 16-bit inputs without a bias
            gradient: 4 bytes per element less; the same ``du16`` bits either way).
        opts: accepted and ignored (other backends' options).

    Returns:
        :class:`EpilogueOut` ``(logp, ent, lse, g_lp, g_H, du, dh)``, fp32 ``[Nc]``; ``du`` the buffer
        holding du (``u``, or ``du16`` when ``store_du32`` is False); ``ent`` is None when
        neither ``head.need_ent``, ``head.need_dh`` nor an entropy bonus asks for it. ``g_lp = w (coef +
        kl_coef dKL/dlogp)``, ``g_H = -w ent_coef``; ``dh`` the entropy change when ``head.need_dh``.
    """
    ext = extension()
    if ext is None:
        raise RuntimeError(NOT_BUILT)
    need_dh = wants_dh(head)
    if isinstance(head, EpilogueHead):
        if head.codes is None:
            raise ValueError("onepass_epilogue: the cuda epilogue needs head.codes (a kernel formula set)")
        head = head.codes
    a = check_epilogue(u, targets, bias, temperature, softcap, head, du16)
    if not store_du32 and du16 is None:
        raise ValueError("onepass_epilogue: store_du32=False needs du16 (du must be written somewhere)")
    out_du = u if store_du32 else du16
    nc, v = a.n, a.v
    dev = u.device
    if dev.type not in ("cpu", "cuda"):
        raise RuntimeError(f"onepass_epilogue runs on CUDA (kernel) and CPU (host loop), not {dev.type}")
    du16_code = DTYPE_CODE[du16.dtype] if du16 is not None else -1
    logp, lse, g_lp, g_H = (torch.empty(nc, dtype=torch.float32, device=dev) for _ in range(4))
    ent = torch.empty(nc, dtype=torch.float32, device=dev) if (a.has_ent or need_dh) else None
    sq = torch.empty(2, nc, dtype=torch.float32, device=dev) if need_dh else None
    if nc == 0:
        return EpilogueOut(logp, ent, lse, g_lp, g_H, out_du, sq[0] if need_dh else None)
    # Python floats become fp32 arguments: the rounding of torch ops with a Python scalar on fp32 tensors
    args = (
        u.data_ptr(),
        u.stride(0) if nc > 1 else -(-v // 4) * 4,  # one row: its stride is never used (4 | ld: vector path)
        nc,
        v,
        a.targets.data_ptr(),
        ptr(a.bias),
        a.temperature,
        ptr(a.temp_vec),
        a.softcap if a.softcap is not None else 0.0,
        a.old.data_ptr(),
        a.adv.data_ptr(),
        a.weight.data_ptr(),
        ptr(a.ref),
        a.mode,
        a.clip_lo,
        a.clip_hi,
        a.clip_c,
        a.dual,
        a.ent_coef,
        a.kl_coef,
        a.kl_type,
        a.kl_st,
        logp.data_ptr(),
        ptr(ent),
        lse.data_ptr(),
        g_lp.data_ptr(),
        g_H.data_ptr(),
        ptr(du16),
        (du16.stride(0) if nc > 1 else -(-v // 4) * 4) if du16 is not None else 0,
        du16_code,
        0 if sq is None else sq[0].data_ptr(),
        0 if sq is None else sq[1].data_ptr(),
        bool(store_du32),
    )
    if dev.type == "cuda":
        idx = _onepass_device(u)
        ext.onepass_epilogue(idx, stream(idx), *args)
    else:
        ext.onepass_epilogue_host(*args)
    dh = entropy_change(logp, ent, sq) if need_dh else None
    return EpilogueOut(logp, ent, lse, g_lp, g_H, out_du, dh)


def onepass_supports(head: EpilogueHead, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """The kernel computes the configs with a kernel formula set, for 16-bit and fp32 inputs; on CPU
    tensors its host loop runs when the extension is built."""
    if head.codes is None:
        return False, "this loss config has no kernel formula set"
    if dtype == torch.float64:
        return False, "fp64 inputs take the torch epilogue"
    if extension() is None:
        return False, NOT_BUILT
    return True, ""
