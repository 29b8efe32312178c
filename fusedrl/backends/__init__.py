"""Backend registry: one module per backend, chosen by name.

Every backend module implements the same small contract (``is_available``, ``forward``,
``backward``, ``logits_forward``, ``logits_backward``); see fusedrl/backends/torch_backend.py for
the plainest implementation of it. ``reference`` is not in this registry: it is plain autograd over
materialised logits (fusedrl/reference.py) and is dispatched by fusedrl/ops.py directly.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Dict, List, Tuple

import torch

BACKENDS: Dict[str, str] = {
    "torch": "fusedrl.backends.torch_backend",
    "triton": "fusedrl.backends.triton_backend",
    "cuda": "fusedrl.backends.cuda_backend",
}
ALL_NAMES = ("auto", "reference") + tuple(BACKENDS)

# `auto` preference per device type, fastest first. On CUDA the fully fused Triton kernels come first
# (design expectation: no logits round-trip through HBM); the cuBLAS-chunked cuda backend next.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch")}
AUTO_DEFAULT = ("torch",)


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


_modules: Dict[str, ModuleType] = {}


def _load(name: str) -> Tuple[ModuleType | None, str]:
    if name in _modules:
        return _modules[name], ""
    try:
        mod = importlib.import_module(BACKENDS[name])
    except Exception as e:  # a missing optional dependency (triton, the compiled extension)
        return None, f"cannot import {BACKENDS[name]}: {type(e).__name__}: {e}"
    _modules[name] = mod
    return mod, ""


def availability(name: str, device: torch.device) -> Tuple[bool, str]:
    """(available, reason) for backend `name` on `device`."""
    if name == "reference":
        return True, ""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {ALL_NAMES}, got {name!r}")
    mod, why = _load(name)
    if mod is None:
        return False, why
    return mod.is_available(device)


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """Names of the registry backends that can run on `device` (``reference`` not included)."""
    device = torch.device(device)
    return [n for n in BACKENDS if availability(n, device)[0]]


@torch.compiler.assume_constant_result  # torch.compile: evaluated at trace time, not traced (imports, driver queries)
def resolve(name: str, device: torch.device) -> str:
    """Turn a requested backend name (or ``auto``) into a concrete available one."""
    if not isinstance(name, str) or name not in ALL_NAMES:
        raise ValueError(f"backend must be one of {ALL_NAMES}, got {name!r}")
    if name == "auto":
        env = os.environ.get("FUSEDRL_BACKEND", "").strip()
        if env and env != "auto":
            return resolve(env, device)
        for cand in AUTO_ORDER.get(device.type, AUTO_DEFAULT):
            if availability(cand, device)[0]:
                return cand
        return "torch"
    ok, why = availability(name, device)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} is not available on {device}: {why}")
    return name


def get_backend(name: str, device: torch.device | str = "cpu") -> ModuleType:
    """The module of a concrete backend (after :func:`resolve`)."""
    device = torch.device(device)
    name = resolve(name, device)
    if name == "reference":
        raise ValueError("the reference backend has no kernel module; use fusedrl.reference")
    return _modules[name] if name in _modules else _load(name)[0]
