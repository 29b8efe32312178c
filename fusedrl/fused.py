"""One-call fused RL policy loss: hidden states and lm_head weight in, scalar loss out.

Every argument is checked once, here, before a schedule is chosen (:func:`prepare`), so the one-pass
and recompute schedules accept, reject and compute the same things and raise the same errors. Then:

* one-pass (``fusedrl.onepass``): the loss's gradients formed in the forward, three GEMMs;
* recompute: :func:`fusedrl.linear_logprob_entropy` (vocabulary-scale work, logits never materialised)
  joined by autograd to the loss head (``fusedrl.loss``): four GEMMs, flat memory.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from . import onepass
from ._validate import as_number, check_scalar, check_temperature_kind, is_real, want_checks
from .backends import ALL_NAMES
from .loss import PolicyLossConfig
from .loss.config import Normaliser, check_normaliser_devices, with_normalisers
from .loss.entropy_control import ENTROPY_CONTROL_INPUTS, computes_entropy_change, reads_entropy
from .loss.heads import kernels_for
from .loss.inputs import Batch, check_cu_seqlens, check_mask_dtype, flatten_batch, require_tensor
from .loss.policy import check_optional_inputs, evaluate
from .loss.selection import group_all
from .ops import CoreCall, core_options, prepare_core, run_core, run_replay_core
from .replay import check_truncation
from .replay.kept import ENTROPY_SUPPORTS, replay_metrics, replay_metrics_off

__all__ = ["fused_policy_loss", "FusedPolicyLoss"]

Tensor = torch.Tensor


def check_schedule(schedule) -> str:
    if not isinstance(schedule, str) or schedule not in onepass.SCHEDULES:
        raise ValueError(f"schedule must be one of {onepass.SCHEDULES}, got {schedule!r}")
    return schedule


def check_budget(memory_budget_mb) -> Optional[float]:
    """``memory_budget_mb``: None (the default budget) or a positive number of MiB; ``inf`` is no limit.
    Python / numpy numbers and one-element tensors are numbers."""
    if memory_budget_mb is None:
        return None
    v = as_number("memory_budget_mb", memory_budget_mb)
    if not is_real(v) or math.isnan(v) or not v > 0:
        raise ValueError(f"memory_budget_mb must be a positive number of MiB (inf: no limit) or None, got {v!r}")
    return float(v)


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in ALL_NAMES:
        raise ValueError(f"backend must be one of {ALL_NAMES}, got {backend!r}")
    return backend


def check_flag(name: str, value) -> Optional[bool]:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool or None, got {type(value).__name__}")
    return value


def _per_token(name: str, value, targets: Tensor, cu_seqlens: Optional[Tensor], off: float):
    """Packed inputs with a per-sequence tensor ``[B]`` (temperature, top_k / top_p / min_p; ``cu_seqlens``
    already checked): one value per token (tokens after the last sequence get ``off``, the value that changes
    nothing). Everything else passes through (the core op checks and broadcasts it)."""
    if (
        not isinstance(value, Tensor)
        or cu_seqlens is None
        or value.dim() != 1
        or value.shape[0] != cu_seqlens.numel() - 1
        or value.shape[0] == targets.numel()
    ):
        return value
    if value.device != targets.device:
        raise ValueError(f"{name} is on {value.device} but targets is on {targets.device}")
    n = targets.numel()
    if value.shape[0] == 0:
        return torch.full((n,), off, dtype=value.dtype, device=value.device)
    pos = torch.arange(n, device=targets.device)
    ids = torch.searchsorted(cu_seqlens[1:].to(torch.long).contiguous(), pos, right=True)
    fill = torch.full((), off, dtype=value.dtype, device=value.device)
    return torch.where(ids < value.shape[0], value[ids.clamp(max=value.shape[0] - 1)], fill)


#: the value of each per-token parameter that changes nothing (padding tokens after the last sequence)
_OFF = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


class FusedCall(NamedTuple):
    """The checked arguments of one fused-loss call."""

    core: CoreCall  # hidden, weight, targets (0 at masked positions), bias, temperature, softcap, backend...
    batch: Batch  # old_logp, advantages, mask, cu_seqlens, side inputs, flattened
    cfg: PolicyLossConfig
    schedule: str
    budget_mb: Optional[float]
    want_entropy: bool
    side: dict[str, Tensor]  # the side inputs as given (per-token shape)
    old_logp: Tensor
    advantages: Tensor
    mask: Tensor
    cu_seqlens: Optional[Tensor]
    replay_asked: bool = False  # replay arguments were given (the replay metrics are reported even if all off)


def prepare(
    hidden, weight, targets, old_logp, advantages, mask, ref_logp, bias, cu_seqlens, temperature, softcap, config,
    backend, process_group, return_entropy, global_num_tokens, global_num_seqs, norm_len, check_inputs, schedule,
    memory_budget_mb, rollout_logp, rollout_is_weights, grad_filter_eps, deterministic, tp_reduce_dx, workspace_mb,
    entropy_side=None, replay_args=None,
) -> FusedCall:  # fmt: skip
    """Check every argument of :func:`fused_policy_loss` (errors name the argument the caller passed);
    ``entropy_side``: the entropy-control inputs by name (``old_entropy``, ``entropy_change``, ...);
    ``replay_args``: ``sampling_mask``, ``entropy_support``, ``top_k``, ``top_p``, ``min_p``."""
    cfg = with_normalisers(config, global_num_tokens, global_num_seqs, norm_len)
    schedule = check_schedule(schedule)
    budget = check_budget(memory_budget_mb)
    check_backend(backend)
    check_flag("return_entropy", return_entropy)
    check_flag("check_inputs", check_inputs)
    require_tensor("targets", targets)
    require_tensor("mask", mask)
    require_tensor("hidden", hidden)
    check_mask_dtype(mask)
    if tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"mask must have the shape of targets {tuple(targets.shape)}, got {tuple(mask.shape)}")
    if mask.device != targets.device:
        raise ValueError(f"mask is on {mask.device} but targets is on {targets.device}")
    check_normaliser_devices(cfg, targets.device, "targets")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] (padded) or [N, H] (packed), got shape {tuple(hidden.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got dtype {targets.dtype}")
    # padding ids (-100, a pad token beyond V, ...) at masked positions must not reach the core op
    targets = torch.where(mask != 0, targets, torch.zeros_like(targets))
    if cu_seqlens is not None:  # before a per-sequence [B] tensor is expanded over it
        per_seq = (temperature, *((replay_args or {}).get(k) for k in ("top_k", "top_p", "min_p")))
        expands = any(isinstance(v, Tensor) and v.dim() == 1 for v in per_seq)
        values = expands and want_checks(check_inputs, targets.device)
        check_cu_seqlens(cu_seqlens, tuple(targets.shape), targets.device, "targets", values)
    temperature = _per_token("temperature", temperature, targets, cu_seqlens, _OFF["temperature"])
    want_entropy = reads_entropy(cfg) or bool(return_entropy)
    replay = dict(replay_args or {}, need_entropy=want_entropy, valid=mask != 0)
    for k in ("top_k", "top_p", "min_p"):
        if replay.get(k) is not None:
            replay[k] = _per_token(k, replay[k], targets, cu_seqlens, _OFF[k])
    core = prepare_core(hidden, weight, targets, bias, temperature, softcap, backend, process_group, grad_filter_eps,
                        deterministic, check_inputs, tp_reduce_dx, workspace_mb, replay_args=replay)  # fmt: skip
    side = {"ref_logp": ref_logp, "rollout_logp": rollout_logp, "rollout_is_weights": rollout_is_weights}
    side.update({k: (entropy_side or {}).get(k) for k in ENTROPY_CONTROL_INPUTS})
    batch = flatten_batch("targets", tuple(targets.shape), core.device, old_logp, advantages, mask, cu_seqlens, side,
                          check_inputs)  # fmt: skip
    check_optional_inputs(cfg, set(batch.side), entropy_known=False)
    if core.replay is not None and computes_entropy_change(cfg, batch.side):
        raise ValueError(
            "sampling_mask / top_k / top_p / min_p: STEER's exact form (steer_exact) computes the entropy change over "
            "the full vocabulary in the pass; under sampling replay pass entropy_change= yourself"
        )
    given = {k: v for k, v in side.items() if v is not None}
    asked = any((replay_args or {}).get(k) is not None for k in ("sampling_mask", "top_k", "top_p", "min_p"))
    return FusedCall(core, batch, cfg, schedule, budget, want_entropy, given, old_logp, advantages, mask, cu_seqlens,
                     asked)  # fmt: skip


def _needs(core: CoreCall) -> tuple[bool, bool, bool]:
    """Which of dx, dW, db the loss's gradient reaches."""
    return tuple(t is not None and t.requires_grad for t in (core.hidden, core.weight, core.bias))


def run(call: FusedCall) -> tuple[Tensor, dict[str, Tensor]]:
    """The fused loss on checked arguments: the one-pass schedule where it applies, else recompute."""
    core, cfg = call.core, call.cfg
    if core.replay is None and call.replay_asked:  # replay asked but off on every token: the same metric keys
        loss, metrics = run(call._replace(replay_asked=False))
        return loss, {**metrics, **replay_metrics_off(core.device)}
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (core.hidden, core.weight, core.bias)
    )
    family = onepass.choose(call.schedule, core.backend, core.process_group, need_grad)
    if core.replay is not None:
        return _run_replay(call, family)
    if family != "recompute":
        budget = onepass.budget_bytes(call.budget_mb, core.device)
        n, h, v = core.targets.numel(), core.hidden.shape[-1], core.weight.shape[0]
        takes = family == "one_pass" or onepass.auto_takes_one_pass(
            n, h, v, core.hidden.dtype, tuple(core.lead), call.cu_seqlens, cfg, budget, device=core.device,
            backend=core.backend, has_bias=core.bias is not None, need=_needs(core), want_entropy=call.want_entropy,
            temperature=core.temperature, softcap=core.softcap,
        )  # fmt: skip
        if family == "auto" and cfg.stats_group is not None:
            # the ranks' collectives must pair, and the schedules make different ones: auto's choice follows
            # each rank's tokens and free memory, so the group agrees (one pass only where every rank takes it)
            takes = group_all(takes, cfg.stats_group, core.device)
        if takes:
            return onepass.one_pass_policy_loss(
                core.hidden, core.weight, core.targets, call.old_logp, call.advantages, call.mask, core.bias,
                call.cu_seqlens, call.side, core.temperature, core.softcap, cfg, core.backend, budget,
                call.want_entropy, (core.grad_filter_eps, core.deterministic, core.workspace_mb),
            )  # fmt: skip
    batch = call.batch
    if computes_entropy_change(cfg, batch.side):  # STEER exact: dH of the current policy, from the same pass
        logp, ent, dh = run_core(core, call.want_entropy, return_entropy_change=True)
        batch = batch._replace(side={**batch.side, "entropy_change": dh.reshape(-1).detach()})
    else:
        logp, ent = run_core(core, call.want_entropy)
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    kernels = kernels_for(core.backend, core.device, cdt)
    loss, metrics, _ = evaluate(batch, logp.reshape(-1), None if ent is None else ent.reshape(-1), cfg, kernels)
    return loss, metrics


def _run_replay(call: FusedCall, family: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Sampling replay: the one-pass replay loop (``fusedrl.onepass.replay``) wherever the one-pass schedule may
    run (its chunks cost what the kept sets hold, so ``auto`` takes it whenever gradients are formed), else the
    core op on kept sets joined to the loss head by autograd. Both add ``replay_frac`` (and ``kept_mass`` where
    the full rows ran) to the metrics."""
    core, cfg = call.core, call.cfg
    if family != "recompute":
        return onepass.one_pass_policy_loss(
            core.hidden, core.weight, core.targets, call.old_logp, call.advantages, call.mask, core.bias,
            call.cu_seqlens, call.side, core.temperature, core.softcap, cfg, core.backend,
            onepass.budget_bytes(call.budget_mb, core.device), call.want_entropy,
            (core.grad_filter_eps, core.deterministic, core.workspace_mb), replay=core.replay,
        )  # fmt: skip
    logp, ent, full = run_replay_core(core, call.want_entropy)
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    kernels = kernels_for(core.backend, core.device, cdt)
    logp, ent = logp.reshape(-1), None if ent is None else ent.reshape(-1)
    loss, metrics, _ = evaluate(call.batch, logp, ent, cfg, kernels)
    return loss, {**metrics, **replay_metrics(core.replay, call.batch.valid, logp, full)}


def fused_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logp: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 1.0,
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
    rollout_logp: Optional[Tensor] = None,
    rollout_is_weights: Optional[Tensor] = None,
    grad_filter_eps: Optional[float] = None,
    deterministic: Optional[bool] = None,
    tp_reduce_dx: Optional[bool] = None,
    workspace_mb: Optional[float] = None,
    old_entropy: Optional[Tensor] = None,
    entropy_change: Optional[Tensor] = None,
    external_mask: Optional[Tensor] = None,
    behaviour_logp: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None,
    entropy_reference: Optional[Tensor] = None,
    sampling_mask=None,
    entropy_support: str = "full",
    top_k=None,
    top_p=None,
    min_p=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RL policy loss straight from the last hidden states, without materialising logits.

    Shapes (padded ``[B, T]`` or packed ``[N]`` with ``cu_seqlens``):

    * ``hidden``: ``[B, T, H]`` or ``[N, H]`` (bf16 / fp16 / fp32);
    * ``weight``: ``[V, H]`` lm_head weight (this rank's vocab shard under ``process_group``);
    * ``targets``: ``[B, T]`` / ``[N]`` integer sampled token ids (values at masked positions are
      ignored and may be out of range, e.g. -100);
    * ``old_logp``, ``mask``, ``ref_logp``, ``rollout_logp``, ``rollout_is_weights``: ``[B, T]`` / ``[N]``;
    * ``advantages``: per token (``[B, T]`` / ``[N]``) or per sequence (``[B]``);
    * ``bias``: optional ``[V]`` (any float dtype); ``cu_seqlens``: optional int32/int64 ``[B+1]``.

    ``temperature`` / ``softcap`` must be the rollout's sampling temperature and the model's logit
    softcap, so that ``logp`` is comparable with ``old_logp``. ``temperature`` may also be a tensor: per
    token (``[B, T]`` / ``[N]``) or per sequence (``[B]``, padded or packed), for rollouts sampled at
    different temperatures. ``backend`` picks the implementation of every layer (core op, loss-head
    kernels, one-pass epilogue); ``grad_filter_eps``, ``deterministic``, ``tp_reduce_dx``,
    ``workspace_mb`` and ``process_group`` are the core op's (:func:`fusedrl.linear_logprob_entropy`).

    Entropy is computed when ``config.entropy_coeff > 0`` (it is then part of the loss, and its
    gradient flows through the same backward pass) or the config reads it, and skipped otherwise,
    unless ``return_entropy=True`` asks for the ``entropy`` metric anyway.

    ``schedule`` (docs/one-pass.md): ``"one_pass"`` forms the gradients inside the forward, three
    ``N·H·V`` GEMMs in all (backward only scales the stored ``dx``, ``dW``, ``db``; they are held from
    forward to backward); ``"recompute"`` is the core op joined to the loss head by autograd (four GEMMs,
    flat memory); ``"auto"`` (default; the environment may override it) takes ``one_pass`` when gradients
    are needed and its workspace plus fp32 accumulators fit ``memory_budget_mb`` (MiB; ``inf`` = no limit;
    default 512 MiB on CPU, on a GPU ``min(4 GiB, usable/4)`` read at each call) and the cost model
    prices it below recompute, else ``recompute``. Vocab-parallel
    (``process_group``) and the ``reference`` backend always recompute. The choice is logged at DEBUG
    level on the ``fusedrl`` logger. Both schedules take the same arguments and raise the same errors;
    under ``torch.no_grad()`` / ``torch.inference_mode()`` both return the loss value.

    ``rollout_logp`` (the inference engine's log-probs) feeds the config's ``rollout_correction``
    (TIS/MIS, rejection sampling, bypass mode) and OPSM; ``rollout_is_weights`` are precomputed IS weights
    (verl hands them to the loss), as in :func:`fusedrl.policy_loss`. ``old_entropy``, ``entropy_change``,
    ``external_mask``, ``behaviour_logp``, ``segment_ids``, ``entropy_reference`` (``[B, T]`` / ``[N]``) are the
    entropy-control inputs of :func:`fusedrl.policy_loss` (docs/entropy-control.md); the current entropy that
    ``steer_entropy="current"`` and ``entropy_corridor`` read is computed in the pass.

    ``sampling_mask`` / ``top_k`` / ``top_p`` / ``min_p`` and ``entropy_support`` are sampling replay, as in
    :func:`fusedrl.linear_logprob_entropy` (docs/replay.md): the log-probs (and, with ``"kept"``, the entropy)
    over the sampler's kept set, the metrics ``replay_frac`` and, where the full rows ran, ``kept_mass``.

    Returns ``(loss, metrics)`` exactly as :func:`fusedrl.policy_loss` on the core op's outputs.
    ``global_num_tokens`` / ``global_num_seqs`` / ``norm_len`` override the config's normalisers.
    ``check_inputs`` switches the host-syncing value checks (target range at valid positions,
    ``cu_seqlens`` monotonic and ending at <= N, 0/1 mask values); default: on for CPU tensors, off
    elsewhere unless the environment turns them on. With them off, an out-of-range target never reads or
    writes out of bounds: its log-prob is a finite garbage value.
    """
    call = prepare(hidden, weight, targets, old_logp, advantages, mask, ref_logp, bias, cu_seqlens, temperature,
                   softcap, config, backend, process_group, return_entropy, global_num_tokens, global_num_seqs,
                   norm_len, check_inputs, schedule, memory_budget_mb, rollout_logp, rollout_is_weights,
                   grad_filter_eps, deterministic, tp_reduce_dx, workspace_mb,
                   dict(old_entropy=old_entropy, entropy_change=entropy_change, external_mask=external_mask,
                        behaviour_logp=behaviour_logp, segment_ids=segment_ids,
                        entropy_reference=entropy_reference),
                   dict(sampling_mask=sampling_mask, entropy_support=entropy_support, top_k=top_k, top_p=top_p,
                        min_p=min_p))  # fmt: skip
    return run(call)


class FusedPolicyLoss(nn.Module):
    """``nn.Module`` over :func:`fused_policy_loss` holding the loss configuration and options; every
    option is checked when the module is built, with the errors :func:`fused_policy_loss` raises.

    ``temperature`` may be a tensor (per token or per sequence, as :func:`fused_policy_loss` takes it): used
    by every call that passes no ``temperature`` of its own.

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
        temperature: Union[float, Tensor] = 1.0,
        softcap: Optional[float] = None,
        backend: str = "auto",
        process_group=None,
        return_entropy: Optional[bool] = None,
        schedule: str = "auto",
        memory_budget_mb: Optional[float] = None,
        check_inputs: Optional[bool] = None,
        grad_filter_eps: Optional[float] = None,
        deterministic: Optional[bool] = None,
        tp_reduce_dx: Optional[bool] = None,
        workspace_mb: Optional[float] = None,
        entropy_support: str = "full",
        top_k=None,
        top_p=None,
        min_p=None,
    ) -> None:
        super().__init__()
        self.config = with_normalisers(config)
        # fail at construction, not at the first training step
        # a tensor (per token / per sequence, as fused_policy_loss takes it) is kept as given (a plain attribute,
        # not a buffer: DDP must not broadcast one rank's rollout temperatures); its shape, device and values
        # are checked against the tokens at each call
        self.temperature = check_temperature_kind(temperature)
        self.softcap = check_scalar("softcap", softcap, allow_none=True)
        self.backend = check_backend(backend)
        self.process_group = process_group
        self.return_entropy = check_flag("return_entropy", return_entropy)
        self.schedule = check_schedule(schedule)
        self.memory_budget_mb = check_budget(memory_budget_mb)
        self.check_inputs = check_flag("check_inputs", check_inputs)
        core_options(grad_filter_eps, deterministic, workspace_mb)
        check_flag("tp_reduce_dx", tp_reduce_dx)
        if not isinstance(entropy_support, str) or entropy_support not in ENTROPY_SUPPORTS:
            raise ValueError(f"entropy_support must be one of {ENTROPY_SUPPORTS}, got {entropy_support!r}")
        self.options = dict(grad_filter_eps=grad_filter_eps, deterministic=deterministic, tp_reduce_dx=tp_reduce_dx,
                            workspace_mb=workspace_mb, entropy_support=entropy_support)  # fmt: skip
        self.truncation = dict(top_k=top_k, top_p=top_p, min_p=min_p)
        if not any(isinstance(v, Tensor) for v in self.truncation.values()):  # numbers: checked now
            check_truncation(top_k, top_p, min_p, (0,), torch.device("cpu"), True)

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        old_logp: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_logp: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
        rollout_logp: Optional[Tensor] = None,
        *,
        rollout_is_weights: Optional[Tensor] = None,
        global_num_tokens: Normaliser = None,
        global_num_seqs: Normaliser = None,
        norm_len: Normaliser = None,
        temperature: Union[float, Tensor, None] = None,
        old_entropy: Optional[Tensor] = None,
        entropy_change: Optional[Tensor] = None,
        external_mask: Optional[Tensor] = None,
        behaviour_logp: Optional[Tensor] = None,
        segment_ids: Optional[Tensor] = None,
        entropy_reference: Optional[Tensor] = None,
        sampling_mask=None,
        top_k=None,
        top_p=None,
        min_p=None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Same tensor arguments and shapes as :func:`fused_policy_loss`; the per-step normalisers, (e.g.
        per-token) ``temperature``, the sampler's ``sampling_mask`` and ``top_k`` / ``top_p`` / ``min_p`` (over
        the module's) may be given per call; a per-call ``sampling_mask`` replaces the module's truncation (the
        captured sets instead of recomputed ones)."""
        own = {} if sampling_mask is not None else self.truncation
        trunc = {k: (own.get(k) if v is None else v) for k, v in dict(top_k=top_k, top_p=top_p,
                                                                       min_p=min_p).items()}  # fmt: skip
        return fused_policy_loss(
            hidden, weight, targets, old_logp, advantages, mask, ref_logp, bias, cu_seqlens,
            self.temperature if temperature is None else temperature, self.softcap, self.config, self.backend,
            self.process_group, return_entropy=self.return_entropy, global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs, norm_len=norm_len, check_inputs=self.check_inputs,
            schedule=self.schedule, memory_budget_mb=self.memory_budget_mb, rollout_logp=rollout_logp,
            rollout_is_weights=rollout_is_weights, old_entropy=old_entropy, entropy_change=entropy_change,
            external_mask=external_mask, behaviour_logp=behaviour_logp, segment_ids=segment_ids,
            entropy_reference=entropy_reference, sampling_mask=sampling_mask, **trunc, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        t = self.temperature
        temp = f"<tensor of shape {tuple(t.shape)}>" if isinstance(t, Tensor) else t
        return (
            f"config={self.config}, temperature={temp}, softcap={self.softcap}, "
            f"backend={self.backend!r}, schedule={self.schedule!r}"
        )
