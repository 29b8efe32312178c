"""Block configs, memory budget and autotuning of the triton backend, per GPU family and input width.

Every pinned and autotune config is compiled for sm_90 and sm_80 by the AOT gate (tests/gpu_static): no
config exceeds shared memory, and 16-bit configs do not spill at aligned shapes.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _config
from ..device import usable_memory
from . import kernels
from .runtime import INTERPRET, MIB, triton

Tensor = torch.Tensor

# =====================================================================================
# Configs
# =====================================================================================

# fwd/du: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages); gemm: (BLOCK_M, BLOCK_K, BLOCK_D,
# num_warps, num_stages) - BLOCK_M and BLOCK_K must divide both du BLOCK_N and BLOCK_V (flag tiles);
# atomic: (BLOCK_N, BLOCK_V, BLOCK_H, BLOCK_D, num_warps, num_stages).
# epilogue: (BLOCK_N, BLOCK_V, num_warps, num_stages) of the one-pass row epilogue (no tl.dot; one
# row per program, 16 fp32 per thread per block: enough bytes in flight for a memory-bound pass).
# "<family>_fp32" entries override the 16-bit ones for fp32 inputs (4-byte operands: twice the shared
# memory per pipeline stage; tf32x3 needs more registers). Every entry is compiled for its arch by
# tests/gpu_static/test_gpu_static.py: 16-bit configs have no register spills at aligned shapes (the du
# kernel's [128, 128] epilogue needs 16 warps for that), and every config fits shared memory
# (fp32 spills a little at the pinned tiles: the gate reports it).
CONFIGS = {
    "hopper": dict(
        fwd=(128, 128, 64, 8, 3),
        du=(128, 128, 64, 16, 3),
        gemm=(128, 64, 128, 8, 4),
        atomic=(128, 128, 64, 64, 8, 3),
        epilogue=(1, 4096, 8, 1),
        group=8,
    ),
    "hopper_fp32": dict(gemm=(128, 32, 128, 8, 4), du=(128, 128, 64, 8, 3), atomic=(128, 128, 32, 32, 8, 3)),
    "ampere": dict(
        fwd=(128, 128, 32, 8, 3),
        du=(128, 128, 32, 16, 3),
        gemm=(128, 32, 128, 8, 4),
        atomic=(64, 128, 32, 32, 8, 3),
        epilogue=(1, 4096, 8, 1),
        group=8,
    ),
    "ampere_fp32": dict(du=(128, 128, 32, 8, 3), atomic=(64, 64, 32, 32, 4, 3)),
    # interpreter: big blocks = few (sequentially run) programs; test shapes are tiny.
    "interpret": dict(
        fwd=(64, 256, 128, 1, 1),
        du=(64, 256, 128, 1, 1),
        gemm=(64, 64, 128, 1, 1),
        atomic=(64, 256, 128, 128, 1, 1),
        epilogue=(1, 1024, 1, 1),
        group=4,
    ),
}


def family(device: torch.device) -> str:
    if INTERPRET:
        return "interpret"
    p = torch.cuda.get_device_properties(device)
    # the hopper blocks need ~200 KiB of shared memory per block: consumer Blackwell (sm_120, ~99 KiB)
    # and other small-smem parts take the ampere ones (largest ~96 KiB), whatever the major version
    smem = getattr(p, "shared_memory_per_block_optin", 0) or (227 * 1024 if p.major == 9 or p.major == 10 else 0)
    return "hopper" if p.major >= 9 and smem >= 200 * 1024 else "ampere"


FP32_PRECISIONS = ("tf32x3", "ieee")


def block_config(device: torch.device, opts: dict, dtype: Optional[torch.dtype] = None) -> dict:
    """Pinned block config for the device (and fp32 inputs when dtype is fp32); opts["triton_config"]
    (a dict) overrides entries (testing / tuning knob). cfg["fp32_precision"]: opts
    ``fp32_precision`` option or the environment (``fusedrl._config``), ``"tf32x3"`` (default) or ``"ieee"``."""
    fam = family(device)
    cfg = dict(CONFIGS[fam])
    if dtype == torch.float32:
        cfg.update(CONFIGS.get(fam + "_fp32", {}))
    cfg.update(opts.get("triton_config") or {})
    prec = opts.get("fp32_precision") or _config.get("triton_fp32_precision")
    if prec not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {prec!r}")
    cfg["fp32_precision"] = prec
    return cfg


def is_ieee(x: Tensor, cfg: dict) -> bool:
    """IS_IEEE: exact fp32 tl.dot for fp32 inputs (always in the interpreter, which has no tf32)."""
    return x.dtype == torch.float32 and (cfg.get("fp32_precision") == "ieee" or INTERPRET)


def num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_facts(device: torch.device):
    """(SM count, free bytes, total bytes) of a CUDA device; (2, None, None) elsewhere (interpreter,
    CPU, meta). Free bytes: what torch can still use, read once per process (_device.usable_memory),
    so the plan is the same at every step. The planner's only view of the device: tests mock it."""
    mem = None if INTERPRET else usable_memory(device)
    if mem is None:
        return 2, None, None
    return num_sms(device), mem[0], mem[1]


#: default budget cap (``budget_cap_mb`` option) and the share of free device memory it may take
_BUDGET_CAP_MB = 4096
_BUDGET_FREE_SHARE = 0.25


def default_budget(n: int, free: Optional[int], cap_mb: Optional[float] = None) -> float:
    """Default backward memory budget in bytes (above inputs and grads).

    On a CUDA device: a quarter of the free memory, capped at 4 GiB (``cap_mb``),
    never below the lean floor 128 MiB + 1 KiB/token (the memory target of docs/design.md). That keeps the 4-GEMM
    schedule with wide vocab chunks (few dx hi/lo accumulation passes, >= 2 waves per GEMM) up to
    N = 65536 tokens at H = 4096 / 8192 on an 80 GB GPU. Without device facts (CPU, interpreter):
    the lean floor.
    """
    floor = 128 * MIB + 1024 * n
    if free is None:
        return float(floor)
    cap = float(cap_mb or _BUDGET_CAP_MB) * MIB
    return float(max(floor, min(cap, _BUDGET_FREE_SHARE * free)))


# =====================================================================================
# Autotuning (GPU only, switched on by the environment): a few configs per kernel, keyed on H / D.
# =====================================================================================

# Per (family, fp32 inputs?) lists; tests/gpu_static/test_gpu_static.py compiles every entry for its arch and
# fails on a config over the shared-memory limit or (16-bit) spilling registers. Removed by that
# gate: fwd 128x256x64 / 256x128x64 w8 and 128x128x32 w4 (16-bit spills on sm_90 and sm_80; fp32 over
# the shared-memory limit), du BLOCK_H 32/64/128 at 4 or 8 warps (16-bit spills), gemm BLOCK_D 256
# (w8 and w16) and 128 w4 (16-bit spills), every 16-warp config with a 256-wide tile (16 warps cap
# ptxas at 128 registers: spills), and every fp32 config with BLOCK_K / BLOCK_H 64 at 4 stages or
# 256-wide tiles (over the shared-memory limit).
# fwd: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages); du: (BLOCK_H, num_warps, num_stages) (BLOCK_N,
# BLOCK_V stay pinned: they are the flag tiles); gemm: (BLOCK_D, num_warps, num_stages) (BLOCK_M,
# BLOCK_K pinned).
TUNE_CONFIGS = {
    "fwd": {
        ("hopper", False): [(128, 128, 64, 8, 3), (64, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 32, 8, 4)],
        ("ampere", False): [(128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 4)],
        ("hopper", True): [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 3)],
        ("ampere", True): [(128, 128, 32, 8, 3), (64, 128, 32, 4, 3), (64, 128, 32, 4, 4)],
    },
    "du": {
        ("hopper", False): [(64, 16, 3), (32, 16, 4), (128, 16, 2)],
        ("ampere", False): [(32, 16, 3), (32, 16, 4), (64, 16, 3)],
        ("hopper", True): [(64, 8, 3), (32, 8, 4)],
        ("ampere", True): [(32, 8, 3), (32, 8, 4)],
    },
    "gemm": {
        ("hopper", False): [(128, 8, 4), (64, 4, 5), (128, 8, 3)],
        ("ampere", False): [(128, 8, 4), (64, 4, 5), (128, 8, 3)],
        ("hopper", True): [(128, 8, 4), (64, 4, 4), (128, 8, 3)],
        ("ampere", True): [(128, 8, 4), (64, 4, 4), (128, 8, 3)],
    },
}
_TUNED: dict = {}


def tuned(kernel: str, device: torch.device, is_fp32: bool):  # pragma: no cover - needs a GPU
    """The autotuned kernel for (kernel, device family, fp32 inputs), built on first use."""
    fam = family(device)
    key = (kernel, fam, bool(is_fp32))
    if key not in _TUNED:
        cfgs = TUNE_CONFIGS[kernel][(fam, bool(is_fp32))]
        if kernel == "fwd":
            configs = [
                triton.Config(dict(BLOCK_N=a, BLOCK_V=b, BLOCK_H=c), num_warps=w_, num_stages=s_)
                for (a, b, c, w_, s_) in cfgs
            ]
            _TUNED[key] = triton.autotune(configs=configs, key=["H", "IS_FP32"])(kernels.fwd_kernel)
        elif kernel == "du":
            configs = [triton.Config(dict(BLOCK_H=c), num_warps=w_, num_stages=s_) for (c, w_, s_) in cfgs]
            _TUNED[key] = triton.autotune(configs=configs, key=["H", "IS_FP32"])(kernels.du_kernel)
        else:
            configs = [triton.Config(dict(BLOCK_D=d), num_warps=w_, num_stages=s_) for (d, w_, s_) in cfgs]
            _TUNED[key] = triton.autotune(
                configs=configs, key=["D", "IS_FP32", "HAS_FLAGS"], restore_value=["C", "C_LO"]
            )(kernels.gemm_kernel)
    return _TUNED[key]
