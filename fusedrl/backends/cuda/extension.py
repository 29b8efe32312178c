"""The compiled extension ``fusedrl._C`` (csrc/): whether it was built and why not, cuBLAS loading, the
device check, and the small helpers every launcher of the ``cuda`` backend shares (pointers, streams,
dtype codes). The extension is torch-ABI independent: it receives ``data_ptr()`` integers, sizes, dtype
codes and ``torch.cuda.current_stream().cuda_stream``; cuBLAS is loaded at first use (dlopen, the
library torch already has loaded), so the module imports without a GPU.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import sys
import threading
from typing import Optional

import torch

from ... import _config

Tensor = torch.Tensor

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_info() -> dict:
    """What setup.py recorded about the extension build (empty dict when nothing was recorded)."""
    try:
        with open(os.path.join(_PKG_DIR, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


try:
    _C = importlib.import_module("fusedrl._C")  # the compiled extension (absent in a pure-Python install)

    NOT_BUILT = ""
except Exception as _e:  # ImportError, or an OSError from the dynamic loader
    _C = None
    _reason = build_info().get("reason") or f"fusedrl._C is not importable ({type(_e).__name__}: {_e})"
    NOT_BUILT = f"cuda backend not built: {_reason}"


def extension():
    """The compiled module ``fusedrl._C`` or None."""
    return _C


# ----------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------
lock = threading.Lock()
_device_ok: dict[int, tuple[bool, str]] = {}
_cublas_err: Optional[str] = None


def _cublas_candidates() -> list[str]:
    """Paths where a cuBLAS shared library may live (tried after the plain sonames)."""
    roots = list(dict.fromkeys(p for p in sys.path if p and os.path.isdir(p)))
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
    subs = ("nvidia/cu13/lib", "nvidia/cublas/lib", "nvidia/cu12/lib", "torch/lib")
    out: list[str] = []
    for r in roots:
        for s in subs:
            out += sorted(glob.glob(os.path.join(r, s, "libcublas.so*")), reverse=True)
    for home in (_config.get("cuda_home"), _config.get("cuda_path"), "/usr/local/cuda"):
        if home:
            for s in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
                out += sorted(glob.glob(os.path.join(home, s, "libcublas.so*")), reverse=True)
    return list(dict.fromkeys(out))


def _ensure_cublas() -> str:
    """'' once cuBLAS is loaded, else the reason it cannot be."""
    global _cublas_err
    if _C is None:
        return NOT_BUILT
    if _C.cublas_loaded():
        return ""
    if _cublas_err is None:
        try:  # makes torch load its own cuBLAS, which the extension then finds by soname
            torch.cuda.current_blas_handle()
        except Exception:
            pass
        why = _C.load_cublas(_cublas_candidates())
        _cublas_err = why
    return _cublas_err


def is_available(device: torch.device) -> tuple[bool, str]:
    device = torch.device(device)
    if _C is None:
        return False, NOT_BUILT
    if device.type != "cuda":
        return False, f"the cuda backend runs on CUDA devices only (got {device.type})"
    if getattr(torch.version, "hip", None):
        return False, "the cuda backend does not support ROCm/HIP builds of torch"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with lock:
        if idx not in _device_ok:
            ok, why = _C.device_check(idx)
            if ok:
                why = _ensure_cublas()
                ok = not why
            _device_ok[idx] = (bool(ok), why)
        return _device_ok[idx]


def require(device: torch.device) -> int:
    """The device index, or RuntimeError saying why the backend cannot run there."""
    ok, why = is_available(device)
    if not ok:
        raise RuntimeError(why if why.startswith("cuda backend") else f"cuda backend unavailable: {why}")
    return device.index if device.index is not None else torch.cuda.current_device()


def ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def stream(idx: int) -> int:
    return torch.cuda.current_stream(idx).cuda_stream
