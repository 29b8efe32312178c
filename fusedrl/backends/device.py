"""Device facts shared by the kernel launchers and planners (triton, cuda, the one-pass driver).

* :func:`on_device`: launches go to the tensors' device, not whichever one is current (Triton and the
  CUDA runtime launch on the current device: an lm_head on ``cuda:1`` under ``device_map="auto"``
  would otherwise run on ``cuda:0``'s stream against ``cuda:1`` memory).
* :func:`usable_memory`: the memory torch can still use on a device (driver free bytes plus torch's
  cached, unallocated ones) and the total, read ONCE per process and device, at first use. The core
  backends' default workspace budgets are sized from it, so their chunk plans (and the bits of every
  result) are the same at every step of a run.
* :func:`memory_now`: the same question asked per call, without a device sync (a driver query and the
  caching allocator's host-side counters), counting only the cached bytes the allocator can hand out as
  one block: all of them with expandable segments, else the fully free segments (the allocator releases
  those and retries when a ``cudaMalloc`` fails), never the free pieces of split segments; capped by
  ``torch.cuda.set_per_process_memory_fraction``. The one-pass schedule's default budget follows it.
* :func:`device_facts`: the per-architecture rates of the one-pass cost model (GEMM TFLOP/s, HBM TB/s,
  launch overhead), looked up once per device.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from contextlib import AbstractContextManager
from typing import Callable, NamedTuple, Optional, TypeVar

import torch

_lock = threading.Lock()
_memory: dict[int, Optional[tuple[int, int]]] = {}


def on_device(t: torch.Tensor) -> AbstractContextManager:
    """``torch.cuda.device(t.device)`` for a CUDA tensor, a no-op otherwise."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


F = TypeVar("F", bound=Callable)


def launches_on_first_arg_device(fn: F) -> F:
    """Decorator: run ``fn(t, ...)`` with ``t``'s CUDA device current (see :func:`on_device`)."""

    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        with on_device(t):
            return fn(t, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def usable_memory(device: torch.device) -> Optional[tuple[int, int]]:
    """(bytes torch can still use, total bytes) of a CUDA device, as read at this process's first call
    for the device; None when it cannot be read (no driver, not a CUDA device)."""
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        if idx not in _memory:
            try:
                free, total = torch.cuda.mem_get_info(idx)
                cached = torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx)
                _memory[idx] = (int(free) + max(0, int(cached)), int(total))
            except Exception:  # no driver / device: planners treat the memory as unknown
                _memory[idx] = None
        return _memory[idx]


def forget_memory_readings() -> None:
    """Drop the cached readings (tests; or after the process's memory use changed for good)."""
    with _lock:
        _memory.clear()


# --------------------------------------------------------------------------------------------------
# Memory now (per call) and the allocator's settings
# --------------------------------------------------------------------------------------------------


def allocator_expandable() -> bool:
    """Whether torch's CUDA caching allocator runs with ``expandable_segments`` (its cached bytes can then
    be mapped into one block of any size). False when this torch cannot say (conservative)."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    settings = ""
    if get is not None:
        try:
            settings = str(get())
        except Exception:  # not initialised / another accelerator: unknown
            settings = ""
    return "expandable_segments:true" in settings.replace(" ", "").lower()


class MemoryNow(NamedTuple):
    """What one allocation may get on a CUDA device now (bytes), and the device's total."""

    usable: int  # driver free + the cached bytes the allocator can hand out as one block, capped by the fraction
    total: int
    driver_free: int
    cached_usable: int


_last_now: dict[int, Optional[MemoryNow]] = {}


def memory_now(device: torch.device) -> Optional[MemoryNow]:
    """:class:`MemoryNow` of a CUDA device, read now (no device sync: a driver query and the caching
    allocator's host counters); None when it cannot be read (no driver, not a CUDA device). While a
    CUDA graph is being captured the previous reading is returned (no driver call inside a capture: the
    captured plan is the warm-up call's)."""
    if device.type != "cuda":
        return None
    try:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if torch.cuda.is_current_stream_capturing():
            return _last_now.get(idx)
        free, total = (int(v) for v in torch.cuda.mem_get_info(idx))
        stats = torch.cuda.memory_stats(idx)
    except Exception:
        return None
    now = memory_from_counters(free, total, stats, allocator_expandable(), memory_fraction(idx))
    _last_now[idx] = now
    return now


def memory_fraction(idx: int) -> float:
    """``torch.cuda.get_per_process_memory_fraction`` where this torch has it, else 1."""
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get is None:
        return 1.0
    try:
        return float(get(idx))
    except Exception:
        return 1.0


def memory_from_counters(free: int, total: int, stats: dict, expandable: bool, fraction: float = 1.0) -> MemoryNow:
    """:class:`MemoryNow` from a driver reading and the allocator's counters (``torch.cuda.memory_stats``
    keys): cached-but-unallocated bytes count whole with expandable segments; otherwise only those of
    fully free segments (``reserved - allocated - inactive_split``), which the allocator frees and
    re-allocates as one block when ``cudaMalloc`` fails; free pieces of split segments never count. A
    per-process memory fraction caps the result at ``fraction * total - allocated``."""
    reserved = int(stats.get("reserved_bytes.all.current", 0))
    allocated = int(stats.get("allocated_bytes.all.current", 0))
    split = int(stats.get("inactive_split_bytes.all.current", 0))
    cached = max(0, reserved - allocated)
    usable_cached = cached if expandable else max(0, cached - split)
    usable = free + usable_cached
    if fraction < 1.0:
        usable = min(usable, max(0, int(fraction * total) - allocated))
    return MemoryNow(int(usable), int(total), int(free), int(usable_cached))


# --------------------------------------------------------------------------------------------------
# Per-architecture rates of the one-pass cost model (fusedrl.onepass.cost; docs/one-pass.md)
# --------------------------------------------------------------------------------------------------


class DeviceFacts(NamedTuple):
    """Rates the one-pass cost model charges. GEMM rates are achieved (cuBLAS at LM shapes), not peak;
    ``hbm`` is the memory bandwidth streaming kernels are charged at (TB/s); ``launch_us`` the gap per
    kernel (a GPU kept busy hides the host's launch cost). ``bench/onepass_model.py --calibrate``
    (bench/gpu_check.sh) measures them on a GPU."""

    name: str
    gemm16: float  # TFLOP/s: bf16 / fp16 operands, fp32 accumulation and output
    gemm32: float  # TFLOP/s: fp32 operands without TF32
    gemm_tf32: float  # TFLOP/s: fp32 operands with TF32 allowed
    gemm64: float  # TFLOP/s: fp64
    hbm: float  # TB/s
    launch_us: float


#: the model's constants by architecture key (``device_facts``). The sm_90 row is the review's H100 SXM
#: figures (cuBLAS ~700 TFLOP/s bf16, 3.35 TB/s); the others are vendor figures scaled the same way,
#: uncalibrated until a GPU run measures them (bench/gpu_check.sh writes the measured ones).
ARCH_FACTS: dict[str, DeviceFacts] = {
    "sm_80": DeviceFacts("A100 SXM", 280.0, 18.0, 140.0, 18.0, 2.0, 2.0),
    "sm_90": DeviceFacts("H100 SXM", 700.0, 50.0, 350.0, 50.0, 3.35, 2.0),
    "sm_90-pcie": DeviceFacts("H100 PCIe", 500.0, 40.0, 250.0, 40.0, 2.0, 2.0),
    "sm_90-h200": DeviceFacts("H200", 700.0, 50.0, 350.0, 50.0, 4.8, 2.0),
    "sm_100": DeviceFacts("B200", 1500.0, 70.0, 750.0, 35.0, 8.0, 2.0),
    "cuda": DeviceFacts("CUDA (unknown arch)", 280.0, 18.0, 140.0, 18.0, 2.0, 2.0),
    "cpu": DeviceFacts("CPU", 0.2, 0.2, 0.2, 0.1, 0.02, 10.0),
}

_facts: dict[tuple[str, Optional[int]], DeviceFacts] = {}


def facts_key(major: int, minor: int, name: str) -> str:
    """The :data:`ARCH_FACTS` key of a CUDA device from its compute capability and name."""
    if (major, minor) == (9, 0):
        if "H200" in name:
            return "sm_90-h200"
        if "PCIe" in name or "PCIE" in name:
            return "sm_90-pcie"
        return "sm_90"
    key = f"sm_{major}{minor}"
    if key in ARCH_FACTS:
        return key
    return "sm_100" if major == 10 else "cuda"


def device_facts(device: torch.device) -> DeviceFacts:
    """The cost model's rates for ``device`` (looked up once per device; CPU and other devices: the
    ``"cpu"`` row)."""
    idx = device.index if device.type == "cuda" else None
    key = (device.type, idx)
    with _lock:
        if key not in _facts:
            facts = ARCH_FACTS["cpu"]
            if device.type == "cuda":
                try:
                    i = idx if idx is not None else torch.cuda.current_device()
                    p = torch.cuda.get_device_properties(i)
                    facts = ARCH_FACTS[facts_key(p.major, p.minor, p.name)]
                except Exception:
                    facts = ARCH_FACTS["cuda"]
            _facts[key] = facts
        return _facts[key]
