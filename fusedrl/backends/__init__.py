"""Backend registry: one module per backend, chosen by name.

Every backend module implements the contract of :class:`fusedrl.backends.base.Backend` (core op
forward / backward, the same over given logits, the one-pass row epilogue); torch_backend.py is the
plainest implementation of it. ``reference`` is not in this registry: it is plain autograd over
materialised logits (fusedrl/reference.py) and is dispatched by fusedrl/ops.py directly.

``auto`` (see :func:`auto_order`): on CUDA, the first available backend of a per-architecture order.
That order comes from ``auto_table.json`` beside this file when it has a measured entry for the
device's compute capability (key ``"sm_90"``, ...), else from :data:`STATIC_AUTO_ORDER`, which is an
unmeasured order derived from reading the code. Elsewhere ``auto`` is ``torch``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from types import ModuleType
from typing import Optional

import torch

from .. import _config

BACKENDS: dict[str, str] = {
    "torch": "fusedrl.backends.torch_backend",
    "triton": "fusedrl.backends.triton",
    "cuda": "fusedrl.backends.cuda",
}
ALL_NAMES = ("auto", "reference") + tuple(BACKENDS)
#: the backends with per-token loss-head kernels, and their modules
HEADS: dict[str, str] = {
    "triton": "fusedrl.backends.triton.head",
    "cuda": "fusedrl.backends.cuda.head",
}

# `auto` on CUDA when no measurement exists for the device's architecture. UNMEASURED: no kernel of
# this package had run on a GPU when this order was chosen; it follows from the code:
#   1. cuda:   cuBLAS GEMMs (vendor-tuned tensor-core kernels, wgmma on sm_90) on bounded chunks plus
#              memory-bound CUDA epilogues overlapped on a side stream. Its extra cost over the
#              3-GEMM floor is one recompute GEMM and fp32 chunk traffic through L2/HBM.
#   2. triton: fully fused (no logits round-trip), but its GEMMs are Triton tl.dot with block configs
#              pinned by hand and never timed on a GPU; the AOT review found configs that spill or
#              exceed shared memory, a filtered path without software pipelining, and a lean 5-GEMM
#              backward at large N. Its upside (gradient filtering, no fp32 chunk) is unproven.
#   3. torch:  upcasts every tile to fp32 and runs fp32 GEMMs (no tensor cores unless TF32 is
#              allowed), about an order of magnitude below the bf16 rate: the portable fallback.
STATIC_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("cuda", "triton", "torch")}
AUTO_DEFAULT = ("torch",)
AUTO_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")
_ARCH_RE = re.compile(r"^sm_\d{2,3}[a-z]?$")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


_modules: dict[str, ModuleType] = {}


def _load(name: str) -> tuple[ModuleType | None, str]:
    if name in _modules:
        return _modules[name], ""
    try:
        mod = importlib.import_module(BACKENDS[name])
    except Exception as e:  # a missing optional dependency (triton, the compiled extension)
        return None, f"cannot import {BACKENDS[name]}: {type(e).__name__}: {e}"
    _modules[name] = mod
    return mod, ""


def head_module(name: str) -> ModuleType:
    """The loss-head kernel module of backend ``name`` (one of :data:`HEADS`). Import statements, not
    ``importlib``: ``torch.compile`` traces through them."""
    if name == "triton":
        from .triton import head
    elif name == "cuda":
        from .cuda import head
    else:
        raise ValueError(f"no loss-head kernels for backend {name!r} (those with kernels: {tuple(HEADS)})")
    return head


def availability(name: str, device: torch.device) -> tuple[bool, str]:
    """(available, reason) for backend `name` on `device`."""
    if name == "reference":
        return True, ""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {ALL_NAMES}, got {name!r}")
    mod, why = _load(name)
    if mod is None:
        return False, why
    return mod.is_available(device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the registry backends that can run on `device` (``reference`` not included)."""
    device = torch.device(device)
    return [n for n in BACKENDS if availability(n, device)[0]]


# --------------------------------------------------------------------------------------------------
# `auto`: measured table per architecture, else the static order
# --------------------------------------------------------------------------------------------------
def arch_key(device: torch.device) -> Optional[str]:
    """``"sm_<major><minor>"`` of a CUDA device (``"sm_90"`` on H100/H200), None elsewhere or when the
    driver cannot be asked."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        major, minor = torch.cuda.get_device_capability(device)
    except Exception:  # no driver / no such device: auto then falls back to the static order
        return None
    return f"sm_{int(major)}{int(minor)}"


def validate_table_entry(arch: str, entry) -> str:
    """'' when ``entry`` is a usable table entry for ``arch``, else what is wrong with it."""
    if not isinstance(arch, str) or not _ARCH_RE.match(arch):
        return f"key {arch!r} is not a compute capability like 'sm_90'"
    if not isinstance(entry, dict):
        return f"{arch}: entry must be an object, got {type(entry).__name__}"
    order = entry.get("order")
    if not isinstance(order, list) or not order or not all(isinstance(n, str) for n in order):
        return f"{arch}: 'order' must be a non-empty list of backend names"
    bad = [n for n in order if n not in BACKENDS]
    if bad:
        return f"{arch}: unknown backend(s) {bad} in 'order' (known: {list(BACKENDS)})"
    if len(set(order)) != len(order):
        return f"{arch}: 'order' repeats a backend"
    if not isinstance(entry.get("source"), str) or not entry["source"].strip():
        return f"{arch}: 'source' (where the measurement came from) is required"
    return ""


_tables: dict[tuple[str, float], tuple[dict[str, dict], str]] = {}


def auto_table_path() -> Optional[str]:
    """The table file ``auto`` reads: the one named in the environment (``fusedrl._config``; None when it
    says off), else the committed ``auto_table.json``."""
    env = _config.get("auto_table")
    if env is not None and env.lower() in ("off", "none", "0", "false"):
        return None
    return env or AUTO_TABLE_PATH


def load_auto_table(path: Optional[str] = None) -> tuple[dict[str, dict], str]:
    """(entries by arch, problems) of a table file; cached per (path, mtime). A missing, unreadable or
    malformed file gives no entries and the reason, never an exception (``auto`` must not fail)."""
    path = auto_table_path() if path is None else path
    if path is None:
        return {}, "the environment disables the table"
    try:
        key = (path, os.path.getmtime(path))
    except OSError:
        return {}, f"no table at {path}"
    if key in _tables:
        return _tables[key]
    entries: dict[str, dict] = {}
    problems: list[str] = []
    try:
        with open(path) as f:
            data = json.load(f)
        raw = data.get("entries", {}) if isinstance(data, dict) else None
        if not isinstance(raw, dict):
            raise ValueError("top level must be an object with an 'entries' object")
        for arch, entry in raw.items():
            why = validate_table_entry(arch, entry)
            if why:
                problems.append(why)
            else:
                entries[arch] = entry
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        entries, problems = {}, [f"cannot read {path}: {type(e).__name__}: {e}"]
    _tables[key] = (entries, "; ".join(problems))
    return _tables[key]


_auto_cache: dict[tuple, tuple[tuple[str, ...], str]] = {}


def clear_auto_cache() -> None:
    """Forget cached ``auto`` orders and tables (tests; after editing the table in a live process)."""
    _auto_cache.clear()
    _tables.clear()


def auto_order(device: torch.device) -> tuple[tuple[str, ...], str]:
    """(candidate order, where it comes from) for ``auto`` on ``device``.

    CUDA: the measured order of the table entry for the device's ``sm_XY`` when there is one (backends
    it does not list follow in static order), else :data:`STATIC_AUTO_ORDER` ``["cuda"]``, which is
    unmeasured. Other devices: ``("torch",)``. Cached per (device, table file).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return STATIC_AUTO_ORDER.get(device.type, AUTO_DEFAULT), f"static default for {device.type}"
    path = auto_table_path()
    idx = device.index
    if idx is None:
        try:
            idx = torch.cuda.current_device()
        except Exception:
            idx = None
    ck = (device.type, idx, path)
    hit = _auto_cache.get(ck)
    if hit is not None:
        return hit
    static = STATIC_AUTO_ORDER["cuda"]
    arch = arch_key(device)
    entries, problems = load_auto_table(path)
    entry = entries.get(arch) if arch else None
    if entry is not None:
        order = tuple(entry["order"]) + tuple(n for n in static if n not in entry["order"])
        src = f"measured ({arch}): {entry['source']}"
    else:
        order = static
        src = (
            f"unmeasured static order (no measured entry for {arch or 'this device'} in "
            f"{path or 'no table'}{'; ' + problems if problems else ''})"
        )
    _auto_cache[ck] = (order, src)
    return order, src


def auto_choice(device: torch.device | str) -> dict:
    """What ``auto`` resolves to on ``device`` and why (for logs and reports): arch, order, source,
    the environment's override, each candidate's availability, and the choice."""
    device = torch.device(device)
    order, src = auto_order(device)
    try:
        env = _config.get("backend")
    except ValueError as e:
        env = f"error: {e}"
    cands = []
    choice = None
    for n in order:
        ok, why = availability(n, device)
        cands.append({"backend": n, "available": bool(ok), "reason": why})
        if ok and choice is None:
            choice = n
    try:
        resolved = resolve("auto", device)
    except (ValueError, BackendUnavailable) as e:  # a bad environment override: report it, do not raise
        resolved = f"error: {e}"
    return {
        "device": str(device),
        "arch": arch_key(device),
        "order": list(order),
        "source": src,
        "measured": src.startswith("measured"),
        "env_override": env or None,
        "candidates": cands,
        "first_available": choice or "torch",
        "choice": resolved,
    }


@torch.compiler.assume_constant_result  # torch.compile: evaluated at trace time, not traced (imports, driver queries)
def resolve(name: str, device: torch.device) -> str:
    """Turn a requested backend name (or ``auto``) into a concrete available one.

    ``auto``: the environment's override when set (``fusedrl._config``; checked like an explicit name,
    errors name the variable), else the first available backend of :func:`auto_order` (measured table
    entry for the device's arch, else the unmeasured static order), else ``torch``.
    """
    if not isinstance(name, str) or name not in ALL_NAMES:
        raise ValueError(f"backend must be one of {ALL_NAMES}, got {name!r}")
    if name == "auto":
        env = _config.get("backend")
        if env is not None and env != "auto":
            try:
                return resolve(env, device)
            except BackendUnavailable as e:
                raise BackendUnavailable(f"environment variable {_config.name('backend')}={env!r}: {e}") from None
        for cand in auto_order(device)[0]:
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
