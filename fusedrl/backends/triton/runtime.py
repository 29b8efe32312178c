"""Triton's presence and mode, decided once at import: the kernels are built as interpreted functions
iff Triton's interpreter switch (``TRITON_INTERPRET=1``, read through ``fusedrl._config``) is on when
this module is imported; the tests set it before anything imports triton."""

from __future__ import annotations

import torch

from ... import _config

try:  # triton is optional: the registry reports the import error as the unavailability reason
    import triton
    import triton.language as tl

    TRITON_ERROR = ""
except Exception as _e:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    TRITON_ERROR = f"{type(_e).__name__}: {_e}"

try:
    from triton.language.extra import libdevice
except Exception:  # pragma: no cover - depends on the install
    libdevice = None

INTERPRET = bool(_config.get("triton_interpret"))
AUTOTUNE = bool(_config.get("triton_autotune")) and not INTERPRET
MIB = 2**20


def is_available(device: torch.device) -> tuple[bool, str]:
    """The triton backend runs on CUDA devices, and on CPU tensors in the interpreter."""
    if triton is None:
        return False, f"triton is not importable ({TRITON_ERROR})"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        return True, ""
    if device.type == "cpu":
        if not INTERPRET:
            why = "is not set" if not _config.get("triton_interpret") else "was set after triton was imported"
            return False, f"on CPU the triton backend needs the Triton interpreter (TRITON_INTERPRET=1 {why})"
        return True, ""
    return False, f"triton does not run on device type {device.type!r}"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
