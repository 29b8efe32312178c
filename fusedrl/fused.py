"""One-call fused RL policy loss: hidden states and lm_head weight in, scalar loss out.

``fused_policy_loss`` = :func:`fusedrl.linear_logprob_entropy` (vocabulary-scale work, logits never
materialised) followed by :func:`fusedrl.policy_loss` (O(N) loss head). Autograd joins them: the
head's backward produces the per-token upstream gradients ``g_lp`` and ``g_H`` and the core op's
single vocabulary-scale backward consumes both, so entropy regularisation costs no extra pass.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .loss import Normaliser, PolicyLossConfig, policy_loss

__all__ = ["fused_policy_loss", "FusedPolicyLoss"]


def _core_op():
    """The core op, imported lazily (fusedrl.ops imports the backends)."""
    from .ops import linear_logprob_entropy

    return linear_logprob_entropy


def fused_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    softcap: Optional[float] = None,
    config: Optional[PolicyLossConfig] = None,
    backend: str = "auto",
    process_group=None,
    *,
    return_entropy: Optional[bool] = None,
    global_num_tokens: Normaliser = None,
    global_num_seqs: Normaliser = None,
    norm_len: Normaliser = None,
    check_inputs: Optional[bool] = None,
    schedule: str = "auto",
    memory_budget_mb: Optional[float] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    **core_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RL policy loss straight from the last hidden states, without materialising logits.

    Shapes (padded ``[B, T]`` or packed ``[N]`` with ``cu_seqlens``):

    * ``hidden``: ``[B, T, H]`` or ``[N, H]`` (bf16 / fp16 / fp32);
    * ``weight``: ``[V, H]`` lm_head weight (this rank's vocab shard under ``process_group``);
    * ``targets``: ``[B, T]`` / ``[N]`` int64 sampled token ids (values at masked positions are
      ignored and may be out of range, e.g. -100);
    * ``old_logp``, ``mask``, ``ref_logp``: ``[B, T]`` / ``[N]``;
    * ``advantages``: per token (``[B, T]`` / ``[N]``) or per sequence (``[B]``);
    * ``bias``: optional ``[V]``; ``cu_seqlens``: optional int32/int64 ``[B+1]``.

    ``temperature`` / ``softcap`` must be the rollout's sampling temperature and the model's logit
    softcap, so that ``logp`` is comparable with ``old_logp``. ``temperature`` may also be a tensor: per
    token (``[B, T]`` / ``[N]``) or per sequence (``[B]``, padded or packed), for rollouts sampled at
    different temperatures. ``backend`` and ``process_group`` go to
    the core op, as do extra keyword arguments (e.g. ``grad_filter_eps``, ``deterministic``).

    Entropy is computed when ``config.entropy_coeff > 0`` (it is then part of the loss, and its
    gradient flows through the same backward pass) and skipped otherwise, unless
    ``return_entropy=True`` asks for the ``entropy`` metric anyway.

    ``schedule`` (docs/one-pass.md): ``"one_pass"`` forms the gradients inside the forward, three
    ``N·H·V`` GEMMs in all (backward only scales the stored ``dx``, ``dW``, ``db``; they are held from
    forward to backward); ``"recompute"`` is the core op joined to the loss head by autograd (four GEMMs,
    flat memory); ``"auto"`` (default; ``FUSEDRL_SCHEDULE`` overrides) takes ``one_pass`` when gradients
    are needed and its workspace plus fp32 accumulators fit ``memory_budget_mb`` (default
    ``FUSEDRL_MEMORY_BUDGET_MB``, else 512 MiB on CPU, ``min(4 GiB, free/4)`` on a GPU), else
    ``recompute``. Vocab-parallel (``process_group``) and the ``reference`` backend always recompute.
    The choice is logged at DEBUG level on the ``fusedrl`` logger.

    ``rollout_logp`` (the inference engine's log-probs, ``[B, T]`` / ``[N]``) feeds the config's
    ``rollout_correction`` (TIS/MIS, rejection sampling, bypass mode) and OPSM; ``rollout_is_weights``
    are precomputed IS weights (verl hands them to the loss), as in :func:`fusedrl.policy_loss`.

    Returns ``(loss, metrics)`` exactly as :func:`fusedrl.policy_loss` on the core op's outputs.
    ``global_num_tokens`` / ``global_num_seqs`` / ``norm_len`` override the config's normalisers.
    ``check_inputs`` switches the host-syncing value checks of both parts (target range at valid
    positions, ``cu_seqlens`` monotonic and ending at <= N, 0/1 mask values); default: on for CPU
    tensors, ``FUSEDRL_CHECK_INPUTS=1`` elsewhere.
    """
    cfg = config if config is not None else PolicyLossConfig()
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(cfg).__name__}")
    want_entropy = cfg.entropy_coeff != 0 or cfg.top_entropy_quantile < 1 or bool(return_entropy)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.shape != mask.shape:
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if mask.device != targets.device:
        raise ValueError(f"mask is on {mask.device} but targets is on {targets.device}; all inputs must share a device")
    # padding ids (-100, pad token beyond V, ...) at masked positions must not reach the core op
    targets = torch.where(mask != 0, targets, torch.zeros_like(targets))
    temperature = _per_token_temperature(temperature, targets, cu_seqlens)
    sched = _one_pass_schedule(
        hidden,
        weight,
        bias,
        targets,
        cu_seqlens,
        temperature,
        softcap,
        cfg,
        backend,
        process_group,
        schedule,
        memory_budget_mb,
        global_num_tokens,
        global_num_seqs,
        norm_len,
        check_inputs,
    )
    if sched is not None:
        from . import onepass

        name, cfg, budget, checks, temperature, softcap = sched
        return onepass.one_pass_policy_loss(
            hidden,
            weight,
            targets,
            old_logp,
            advantages,
            mask,
            ref_logp,
            bias,
            cu_seqlens,
            temperature,
            softcap,
            cfg,
            name,
            budget,
            want_entropy,
            checks,
            rollout_logp,
            rollout_is_weights,
        )
    logp, entropy = _core_op()(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        return_entropy=want_entropy,
        backend=backend,
        process_group=process_group,
        check_inputs=check_inputs,
        **core_kwargs,
    )
    return policy_loss(
        logp,
        old_logp,
        advantages,
        mask,
        entropy=entropy,
        ref_logp=ref_logp,
        cu_seqlens=cu_seqlens,
        config=cfg,
        global_num_tokens=global_num_tokens,
        global_num_seqs=global_num_seqs,
        norm_len=norm_len,
        check_inputs=check_inputs,
        rollout_logp=rollout_logp,
        rollout_is_weights=rollout_is_weights,
    )


def _per_token_temperature(temperature, targets: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """Packed inputs with per-sequence temperatures ``[B]``: one per token (tokens after the last
    sequence get 1.0). Everything else passes through (the core op checks and broadcasts it)."""
    if (
        not isinstance(temperature, torch.Tensor)
        or cu_seqlens is None
        or temperature.dim() != 1
        or temperature.shape[0] != cu_seqlens.numel() - 1
        or temperature.shape[0] == targets.numel()
    ):
        return temperature
    n = targets.numel()
    if temperature.shape[0] == 0:
        return torch.ones(n, dtype=temperature.dtype, device=temperature.device)
    pos = torch.arange(n, device=targets.device)
    ids = torch.searchsorted(cu_seqlens[1:].to(torch.long).contiguous(), pos, right=True)
    t = temperature.to(targets.device)
    return torch.where(
        ids < t.shape[0], t[ids.clamp(max=t.shape[0] - 1)], torch.ones((), dtype=t.dtype, device=t.device)
    )


def _one_pass_schedule(
    hidden,
    weight,
    bias,
    targets,
    cu_seqlens,
    temperature,
    softcap,
    cfg,
    backend,
    process_group,
    schedule,
    memory_budget_mb,
    global_num_tokens,
    global_num_seqs,
    norm_len,
    check_inputs,
):
    """``(backend, config, budget bytes, checks, temperature, softcap)`` (validated: the temperature a float or
    per-token fp32 ``[N]``) when the one-pass schedule (or its two-pass form) runs, None for the recompute
    schedule. Validates the core op's inputs as the core op would."""
    from . import onepass
    from ._validate import check_core, want_checks
    from .backends import ALL_NAMES, resolve
    from .loss import _with_normalisers

    if not isinstance(schedule, str) or schedule not in onepass.SCHEDULES:
        raise ValueError(f"schedule must be one of {onepass.SCHEDULES}, got {schedule!r}")
    if memory_budget_mb is not None and not (
        isinstance(memory_budget_mb, (int, float)) and not isinstance(memory_budget_mb, bool) and memory_budget_mb > 0
    ):
        raise ValueError(f"memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
    if not isinstance(backend, str) or backend not in ALL_NAMES:
        raise ValueError(f"backend must be one of {ALL_NAMES}, got {backend!r}")
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None  # the core op raises the clear error
    need_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    name = backend if backend in ("reference",) else None
    if name is None and schedule != "recompute" and process_group is None:
        name = resolve(backend, hidden.device)
    family = onepass.choose(schedule, cfg, name or backend, process_group, need_grad)
    if family == "recompute":
        return None
    temperature, softcap, dev = check_core(hidden, weight, targets, bias, temperature, softcap, check_inputs)
    cfg = _with_normalisers(cfg, global_num_tokens, global_num_seqs, norm_len)
    budget = int(memory_budget_mb * 2**20) if memory_budget_mb is not None else onepass.default_budget_bytes(dev)
    if family == "auto" and not onepass.auto_takes_one_pass(hidden, weight, targets, cu_seqlens, cfg, budget):
        return None
    return name, cfg, budget, want_checks(check_inputs, dev), temperature, softcap


class FusedPolicyLoss(nn.Module):
    """``nn.Module`` over :func:`fused_policy_loss` holding the loss configuration.

    Example::

        loss_fn = FusedPolicyLoss(PolicyLossConfig(loss_mode="vanilla", clip_ratio_high=0.28),
                                  temperature=1.0)
        loss, metrics = loss_fn(hidden, model.lm_head.weight, targets, old_logp, adv, mask)
        loss.backward()
    """

    def __init__(
        self,
        config: Optional[PolicyLossConfig] = None,
        *,
        temperature: float = 1.0,
        softcap: Optional[float] = None,
        backend: str = "auto",
        process_group=None,
        return_entropy: Optional[bool] = None,
        schedule: str = "auto",
        memory_budget_mb: Optional[float] = None,
        **core_kwargs,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else PolicyLossConfig()
        if not isinstance(self.config, PolicyLossConfig):
            raise TypeError(f"config must be a PolicyLossConfig, got {type(self.config).__name__}")
        from ._validate import check_scalar
        from .backends import ALL_NAMES

        # fail at construction, not at the first training step
        self.temperature = check_scalar("temperature", temperature)
        self.softcap = check_scalar("softcap", softcap, allow_none=True)
        if not isinstance(backend, str) or backend not in ALL_NAMES:
            raise ValueError(f"backend must be one of {ALL_NAMES}, got {backend!r}")
        self.backend = backend
        self.process_group = process_group
        self.return_entropy = return_entropy
        from .onepass import SCHEDULES

        if not isinstance(schedule, str) or schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if memory_budget_mb is not None and not (
            isinstance(memory_budget_mb, (int, float))
            and not isinstance(memory_budget_mb, bool)
            and memory_budget_mb > 0
        ):
            raise ValueError(f"memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
        self.schedule = schedule
        self.memory_budget_mb = memory_budget_mb
        self.core_kwargs = core_kwargs

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_logp: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        rollout_logp: Optional[torch.Tensor] = None,
        **overrides,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same tensor arguments and shapes as :func:`fused_policy_loss`; ``overrides`` may carry the
        per-step normalisers (``global_num_tokens``, ``global_num_seqs``, ``norm_len``) or core-op
        keyword arguments."""
        kwargs = dict(self.core_kwargs)
        kwargs.update(overrides)
        kwargs.setdefault("temperature", self.temperature)
        kwargs.setdefault("softcap", self.softcap)
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("process_group", self.process_group)
        kwargs.setdefault("return_entropy", self.return_entropy)
        kwargs.setdefault("config", self.config)
        kwargs.setdefault("schedule", self.schedule)
        kwargs.setdefault("memory_budget_mb", self.memory_budget_mb)
        return fused_policy_loss(
            hidden,
            weight,
            targets,
            old_logp,
            advantages,
            mask,
            ref_logp=ref_logp,
            bias=bias,
            cu_seqlens=cu_seqlens,
            rollout_logp=rollout_logp,
            **kwargs,
        )

    def extra_repr(self) -> str:
        return (
            f"config={self.config}, temperature={self.temperature}, softcap={self.softcap}, "
            f"backend={self.backend!r}, schedule={self.schedule!r}"
        )
