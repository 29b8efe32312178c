"""The one-pass schedule of the fused policy loss: the loss's gradients formed in the forward, three
``N·H·V`` GEMMs in all (docs/one-pass.md).

Modules: ``plan`` (budget, schedule and chunks), ``gemm`` (the GEMM kinds), ``run`` (the chunk loop,
the selection correction, the two-pass form), ``op`` (the custom op and its autograd). :func:`choose`
and :func:`auto_takes_one_pass` are how ``fused_policy_loss`` decides between this schedule and the
recompute one.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import _config
from ..backends import availability, resolve
from ..backends.device import device_facts
from ..loss import PolicyLossConfig, head_kind
from ..loss.token_head import kernel_head_codes
from .cost import Model, Setting
from .gemm import path as gemm_path
from .op import one_pass_policy_loss
from .plan import Plan, budget_bytes, default_budget_bytes, plan
from .run import release_workspace

__all__ = [
    "SCHEDULES",
    "Model",
    "Plan",
    "Setting",
    "auto_setting",
    "plan",
    "choose",
    "auto_takes_one_pass",
    "budget_bytes",
    "default_budget_bytes",
    "one_pass_policy_loss",
    "release_workspace",
]

log = logging.getLogger("fusedrl")

SCHEDULES = ("auto", "one_pass", "recompute")


def choose(schedule: str, backend: str, process_group, need_grad: bool) -> str:
    """The schedule family before sizing: ``recompute`` where the one-pass schedule does not apply.
    ``schedule="auto"`` takes the environment's choice when it sets one (``fusedrl._config``)."""
    if schedule == "auto":
        env = _config.get("schedule")
        if env != "auto":
            schedule = env
    if schedule == "recompute":
        return "recompute"
    why = None
    if process_group is not None:
        why = "vocab-parallel (process_group) runs the recompute schedule"
    elif backend == "reference":
        why = "the reference backend is eager autograd"
    if why is not None:
        if schedule == "one_pass":
            raise ValueError(f"schedule='one_pass' is not available here: {why}")
        return "recompute"
    if schedule == "auto" and not need_grad:
        return "recompute"  # forward only: the core op's scoring pass is already one GEMM
    return schedule


def auto_setting(
    device: torch.device, dtype: torch.dtype, backend: str, cfg: PolicyLossConfig, has_bias: bool,
    need: tuple[bool, bool, bool], want_entropy: bool, temperature, softcap: Optional[float],
) -> Setting:  # fmt: skip
    """The planner's :class:`Setting` before the op runs (no batch yet): the kernel epilogue where the config
    has a kernel formula set and the backend serves it here, else the torch epilogue."""
    core = "torch" if backend == "reference" else resolve(backend, device)
    grads = any(need)
    epilogue = "torch"
    if (grads and core in ("triton", "cuda") and dtype != torch.float64 and kernel_head_codes(cfg) is not None
            and head_kind(cfg) in ("token", "selection") and availability(core, device)[0]):  # fmt: skip
        epilogue = core
    low = dtype in (torch.float16, torch.bfloat16)
    per_token = isinstance(temperature, torch.Tensor)
    transform = 3 if softcap is not None else (1 if per_token or (low and temperature != 1.0) else 0)
    return Setting(
        epilogue=epilogue, core=core, facts=device_facts(device), dx=need[0], dw=need[1], db=need[2] and has_bias,
        ent=want_entropy or cfg.entropy_coeff != 0, ent_grad=cfg.entropy_coeff != 0, bias=has_bias,
        transform=transform, gemm=gemm_path(device, dtype),
        tf32=dtype == torch.float32 and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest",
    )  # fmt: skip


def auto_takes_one_pass(
    n: int, h: int, v: int, dtype: torch.dtype, per_token_shape, cu_seqlens: Optional[torch.Tensor],
    cfg: PolicyLossConfig, budget: float, *, device: Optional[torch.device] = None, backend: str = "auto",
    has_bias: bool = False, need: tuple[bool, bool, bool] = (True, True, True), want_entropy: bool = False,
    temperature=1.0, softcap: Optional[float] = None,
) -> bool:  # fmt: skip
    """``schedule="auto"``: does the one-pass schedule fit (workspace, and whole sequences for sequence
    modes), and is it the faster by the cost model (``device`` given: its rates and the epilogue that
    would run; without it, or under ``torch.compile``, the torch epilogue at CPU rates)? Packed sequence
    modes read ``cu_seqlens`` on the host (free when it lives on the CPU); under ``torch.compile`` they take
    the recompute schedule instead."""
    seq_len = cu_host = None
    if head_kind(cfg) == "sequence":
        if cu_seqlens is None:
            seq_len = per_token_shape[-1] if len(per_token_shape) == 2 else n
        elif torch.compiler.is_compiling():
            return False
        else:
            cu_host = [int(c) for c in cu_seqlens.tolist()]
    setting = None
    if device is not None and not torch.compiler.is_compiling():  # the device facts are read under a lock
        setting = auto_setting(torch.device(device), dtype, backend, cfg, has_bias, need, want_entropy, temperature,
                               softcap)  # fmt: skip
    if torch.compiler.is_compiling():  # the planner runs eagerly while tracing: its answer is a constant
        return _auto_decision_traced(n, h, v, dtype, cfg, budget, seq_len)
    return _auto_decision(n, h, v, dtype, cfg, budget, seq_len, cu_host, setting)


def _auto_decision(n, h, v, dtype, cfg, budget, seq_len, cu_host=None, setting=None) -> bool:
    pln = plan(n, h, v, dtype, cfg, "auto", budget, seq_len, cu_host, setting)
    if pln.schedule == "recompute":
        log.debug("fusedrl fused_policy_loss: schedule recompute (%s)", pln.reason)
    return pln.schedule != "recompute"


_auto_decision_traced = torch.compiler.assume_constant_result(_auto_decision)
