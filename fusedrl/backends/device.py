"""Device facts shared by the kernel launchers and planners (triton, cuda, the one-pass driver).

* :func:`on_device`: launches go to the tensors' device, not whichever one is current (Triton and the
  CUDA runtime launch on the current device: an lm_head on ``cuda:1`` under ``device_map="auto"``
  would otherwise run on ``cuda:0``'s stream against ``cuda:1`` memory).
* :func:`usable_memory`: the memory torch can still use on a device (driver free bytes plus torch's
  cached, unallocated ones) and the total, read ONCE per process and device, at first use. Default
  budgets are sized from it, so the chunk plans, and with them the bits of every result, are the same
  at every step of a run: a budget re-read per call would follow the allocator's cache and change
  the vocabulary chunking (and dx's summation order) from step to step. An explicit budget
  (``memory_budget_mb``, ``workspace_mb``, or the environment) also pins the plan across runs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from contextlib import AbstractContextManager
from typing import Callable, Optional, TypeVar

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
