"""Input checks shared by every public entry point.

Checks that need a host sync (target range on an accelerator) are behind ``check_inputs``: on by
default for CPU tensors (no sync cost there), off on accelerators unless the environment turns them
on (``fusedrl._config``).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from . import _config

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def is_real(x) -> bool:
    """A real number: Python int / float, numpy scalars (bool excluded)."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, torch.Tensor))


def host_value(name: str, t: torch.Tensor):
    """The Python number a one-element tensor holds (a host read); a meta tensor holds none."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (it holds no value); pass a number or a tensor with data")
    return t.item()


def as_number(name: str, value):
    """A Python number from a Python / numpy number or a one-element tensor (read on the host); other
    values are returned as they are (the caller's check names them). bool is not a number."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a number or a one-element real tensor, got shape {tuple(value.shape)}")
        return host_value(name, value)
    if is_real(value) and not isinstance(value, (int, float)):
        return value.item() if hasattr(value, "item") else float(value)  # numpy scalar -> Python number
    return value


def want_checks(check_inputs: Optional[bool], device: torch.device) -> bool:
    """Whether host-syncing value checks should run."""
    if torch.compiler.is_compiling():  # a data-dependent host check cannot be traced (fullgraph)
        return False
    if check_inputs is not None:
        return bool(check_inputs)
    return device.type == "cpu" or bool(_config.get("check_inputs"))


def require_tensor(name: str, t, *, float_ok: bool = True, int_ok: bool = False) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype in FLOAT_DTYPES and not float_ok:
        raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if t.dtype in INT_DTYPES and not int_ok:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dtype not in FLOAT_DTYPES + INT_DTYPES:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}")
    return t


def same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(f"{k} is on {v.device} but {items[0][0]} is on {dev}; all inputs must share a device")
    return dev


def check_scalar(name: str, value, *, allow_none: bool = False) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a positive float, got None")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = host_value(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real: numpy scalars too
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return value


Temperature = Union[float, torch.Tensor]


def check_temperature_kind(temperature) -> Temperature:
    """The checks of a temperature that need no tokens: a float (as :func:`check_scalar`; a 0-dim tensor is a
    scalar) or a floating-point tensor that does not require grad (its shape, device and values are checked
    against the tokens by :func:`check_temperature`)."""
    if not isinstance(temperature, torch.Tensor) or temperature.dim() == 0:
        return check_scalar("temperature", temperature)
    if not temperature.is_floating_point():
        raise TypeError(f"temperature must be a float or a floating-point tensor, got dtype {temperature.dtype}")
    if temperature.requires_grad:
        raise ValueError("temperature must not require grad (it is a sampling constant, not a parameter)")
    return temperature


def check_temperature(
    temperature, lead_shape, device: torch.device, checks: bool, dtype: torch.dtype = torch.float32
) -> Temperature:
    """A float (as :func:`check_scalar`), or per-token temperatures: a tensor of the tokens' leading shape
    ``lead_shape`` (``[N]``, ``[B, T]``, ...) or, for ``[B, T]`` tokens, per sequence ``[B]``. Returns a
    float or a contiguous ``[N]`` tensor on ``device`` in ``dtype`` (the compute dtype: fp32, fp64 for fp64
    inputs). Values must be finite and > 0 (checked with a
    host read when ``checks``). A 0-dim tensor is a scalar."""
    t = check_temperature_kind(temperature)
    if not isinstance(t, torch.Tensor):
        return t
    if t.device != device:
        raise ValueError(f"temperature is on {t.device} but the inputs are on {device}")
    lead = tuple(lead_shape)
    if tuple(t.shape) == lead:
        flat = t.reshape(-1)
    elif len(lead) == 2 and tuple(t.shape) == lead[:1]:  # per sequence of [B, T] tokens
        flat = t[:, None].expand(lead).reshape(-1)
    else:
        want = f"{lead} (per token)" + (f" or {lead[:1]} (per sequence)" if len(lead) == 2 else "")
        raise ValueError(f"temperature must be a float or a tensor of shape {want}, got shape {tuple(t.shape)}")
    flat = flat.to(dtype).contiguous()
    if checks and flat.numel():
        bad = ~(torch.isfinite(flat) & (flat > 0))
        if bool(bad.any()):
            raise ValueError(f"temperature must be finite and > 0 everywhere, found {flat[bad][0].item()}")
    return flat


def check_targets_range(targets: torch.Tensor, vocab: int, enabled: bool, what: str = "vocabulary size") -> None:
    if not enabled or targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"targets must lie in [0, {vocab}) ({what}); found {bad}")


def check_core(hidden, weight, targets, bias, temperature, softcap, check_inputs, vocab_total=None):
    """Validate the inputs of linear_logprob_entropy. Returns (temperature, softcap, device)."""
    require_tensor("hidden", hidden)
    require_tensor("weight", weight)
    require_tensor("targets", targets, float_ok=False, int_ok=True)
    if bias is not None:
        require_tensor("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., H]")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have a hidden size H >= 1, got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden has H={hidden.shape[-1]} but weight is [V, H]={tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has V=0 rows; the vocabulary must not be empty")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
    dev = same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    checks = want_checks(check_inputs, dev)
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    temperature = check_temperature(temperature, targets.shape, dev, checks, cdt)
    softcap = check_scalar("softcap", softcap, allow_none=True)
    check_targets_range(targets, vocab_total or weight.shape[0], checks)
    return temperature, softcap, dev


def check_logits(logits, targets, temperature, softcap, check_inputs):
    require_tensor("logits", logits)
    require_tensor("targets", targets, float_ok=False, int_ok=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits' leading shape {tuple(logits.shape[:-1])}"
        )
    dev = same_device(logits=logits, targets=targets)
    checks = want_checks(check_inputs, dev)
    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    temperature = check_temperature(temperature, targets.shape, dev, checks, cdt)
    softcap = check_scalar("softcap", softcap, allow_none=True)
    check_targets_range(targets, logits.shape[-1], checks)
    return temperature, softcap, dev
