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
from ..loss import PolicyLossConfig, head_kind
from .op import one_pass_policy_loss
from .plan import Plan, budget_bytes, default_budget_bytes, plan
from .run import release_workspace

__all__ = [
    "SCHEDULES",
    "Plan",
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


def auto_takes_one_pass(
    n: int, h: int, v: int, dtype: torch.dtype, per_token_shape, cu_seqlens: Optional[torch.Tensor],
    cfg: PolicyLossConfig, budget: float,
) -> bool:  # fmt: skip
    """``schedule="auto"``: does the one-pass schedule fit (workspace, and whole sequences for sequence
    modes)? Packed sequence modes read ``cu_seqlens`` on the host (free when it lives on the CPU); under
    ``torch.compile`` they take the recompute schedule instead."""
    seq_len = cu_host = None
    if head_kind(cfg) == "sequence":
        if cu_seqlens is None:
            seq_len = per_token_shape[-1] if len(per_token_shape) == 2 else n
        elif torch.compiler.is_compiling():
            return False
        else:
            cu_host = [int(c) for c in cu_seqlens.tolist()]
    pln = plan(n, h, v, dtype, cfg, "auto", budget, seq_len, cu_host)
    if pln.schedule == "recompute":
        log.debug("fusedrl fused_policy_loss: schedule recompute (%s)", pln.reason)
    return pln.schedule != "recompute"
