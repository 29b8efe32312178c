"""The fused GRPO loss of a TRL trainer step: the model body once, the completion's log-probs and
entropies from the fused op, the loss from the fusedrl loss head, TRL's metrics under TRL's names."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ...loss import PolicyLossConfig, policy_loss
from .. import hf
from .config import (
    CLIPPED_LOSS_TYPES,
    MULTIMODAL_KEYS,
    TOKEN_NORMALISED_LOSS_TYPES,
    TRL_FALLBACKS,
    TRL_LOSS_TYPES,
    FusedRLUnsupported,
    grpo_policy_loss_config,
    trainer_arg,
)
from .entropy import apply_entropy_control, entropy_control_side, log_entropy_control_metrics
from .replay import replay_kwargs

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------
# the loss hook
# --------------------------------------------------------------------------------------------------
def _uses_vllm_is(trainer) -> bool:
    return bool(getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction", False))


def _unsupported_reason(trainer, inputs) -> Optional[str]:
    """The setting of this step that the fused loss does not reproduce (see :data:`TRL_FALLBACKS`), or None."""
    loss_type = getattr(trainer, "loss_type", trainer_arg(trainer, "loss_type", "grpo"))
    if loss_type not in TRL_LOSS_TYPES:
        return f"loss_type={loss_type!r}"
    if getattr(trainer, "aux_loss_enabled", False):
        return TRL_FALLBACKS[0]
    for k in MULTIMODAL_KEYS:
        if inputs.get(k) is not None:
            return f"{TRL_FALLBACKS[1]}: {k!r}"
    return None


def static_unsupported_reason(trainer) -> Optional[str]:
    """What the trainer's configuration alone sends to TRL's own loss (checked at construction)."""
    reason = _unsupported_reason(trainer, {})
    if reason is not None:
        return reason
    try:
        _trainer_config(trainer, batch_size=1, num_items=None)
    except FusedRLUnsupported as e:
        return e.reason
    return None


def _stats_group(trainer):
    """TRL gathers the entropy quantile over every process: the default group when distributed."""
    acc = getattr(trainer, "accelerator", None)
    if acc is None or getattr(acc, "num_processes", 1) <= 1:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


def _trainer_config(trainer, batch_size: int, num_items) -> tuple[PolicyLossConfig, dict[str, Any]]:
    """:func:`grpo_policy_loss_config` with the trainer's settings (``trainer`` attributes, then ``args``), for
    the policy term only: the trainer adds TRL's KL term itself (:func:`_trl_kl`) and hands TRL's own vLLM
    importance-sampling ratio to the loss as ``rollout_is_weights``."""
    a = lambda name, default: trainer_arg(trainer, name, default)  # noqa: E731
    loss_type = getattr(trainer, "loss_type", "grpo")
    cfg, norms = grpo_policy_loss_config(
        loss_type,
        epsilon_low=getattr(trainer, "epsilon_low", 0.2),
        epsilon_high=getattr(trainer, "epsilon_high", None),
        beta=0.0,
        importance_sampling_level=getattr(trainer, "importance_sampling_level", "token"),
        delta=a("delta", None),
        batch_size=batch_size,
        max_completion_length=getattr(trainer, "max_completion_length", None) or a("max_completion_length", None),
        num_items=num_items,
        use_bias_correction_kl=bool(a("use_bias_correction_kl", True)),
        sapo_temperature_pos=a("sapo_temperature_pos", 1.0),
        sapo_temperature_neg=a("sapo_temperature_neg", 1.05),
        vespo_k_pos=a("vespo_k_pos", 2.0),
        vespo_lambda_pos=a("vespo_lambda_pos", 3.0),
        vespo_k_neg=a("vespo_k_neg", 3.0),
        vespo_lambda_neg=a("vespo_lambda_neg", 2.0),
        top_entropy_quantile=float(getattr(trainer, "top_entropy_quantile", 1.0)),
        off_policy_mask_threshold=getattr(trainer, "off_policy_mask_threshold", None),
        stats_group=_stats_group(trainer),
    )
    return apply_entropy_control(cfg, trainer, loss_type), norms


def _ga_steps(trainer) -> int:
    return int(
        getattr(trainer, "current_gradient_accumulation_steps", None)
        or trainer_arg(trainer, "gradient_accumulation_steps", 1)
        or 1
    )


def autocast_for(trainer):
    acc = getattr(trainer, "accelerator", None)
    if acc is not None and hasattr(acc, "autocast"):
        return acc.autocast()
    from contextlib import nullcontext

    return nullcontext()


def _entropy_coeff(trainer) -> float:
    """The entropy bonus coefficient: the trainer's live ``entropy_coef`` (TRL keeps it there, adaptive
    control updates it; ``fusedrl_entropy_coeff`` is written into it), else the config's."""
    c = getattr(trainer, "entropy_coef", None)
    if c is None:
        c = getattr(trainer, "_fusedrl_entropy_coeff", None)
    if c is None:
        c = trainer_arg(trainer, "entropy_coef", 0.0)
    return float(c or 0.0)


def _opsm_rollout_logp(cfg: PolicyLossConfig, inputs, logp: Tensor) -> Optional[Tensor]:
    """OPSM's inference log-probs (TRL: ``sampling_per_token_logps``, default ``old_logp``). Tokens vLLM could
    not score carry NaN and give no OPSM evidence in TRL: they read ``logp`` itself (a zero KL term)."""
    sampling = inputs.get("sampling_per_token_logps")
    if sampling is None or cfg.off_policy_mask_threshold is None:
        return None
    return torch.where(torch.isnan(sampling), logp.detach().to(sampling.dtype), sampling)


def _trl_is_weights(trainer, inputs, loss_type: str, mask: Tensor) -> Optional[Tensor]:
    """TRL's vLLM importance-sampling ratio of the batch (``inputs["importance_sampling_ratio"]``, computed by TRL
    at generation from its mode and caps) as ``rollout_is_weights`` [B, K]: the policy term is multiplied by it
    (TRL: with ``use_vllm`` and ``vllm_importance_sampling_correction``); vespo folds it into its sequence
    weight whenever the batch has it, as TRL's ``get_gamma_weights``."""
    if loss_type == "vespo":
        ratio = inputs.get("importance_sampling_ratio")
    elif _uses_vllm_is(trainer):
        ratio = inputs["importance_sampling_ratio"]
    else:
        return None
    if ratio is None:
        return None
    return ratio.detach().expand(mask.shape)


def fused_grpo_loss(trainer, model, inputs: dict[str, Any], *, backend: Optional[str] = None) -> Tensor:
    """TRL GRPOTrainer's loss computed with fusedrl (the body of ``_compute_loss``).

    ``trainer`` is a ``trl.GRPOTrainer`` (its loss settings, ``temperature``, ``max_completion_length``,
    accumulation steps, entropy-bonus state and ``_metrics`` are read, and the adaptive entropy controller is
    advanced as TRL does); ``inputs`` is TRL's batch dict (``prompt_ids``, ``prompt_mask``, ``completion_ids``,
    ``completion_mask``, ``advantages`` [B] or [B, K], optional ``old_per_token_logps`` /
    ``ref_per_token_logps`` / ``sampling_per_token_logps`` [B, K], ``num_items_in_batch``, ``tool_mask``).
    Raises :class:`FusedRLUnsupported` for what :data:`TRL_FALLBACKS` lists.
    """
    reason = _unsupported_reason(trainer, inputs)
    if reason is not None:
        raise FusedRLUnsupported(reason)
    backend = backend or getattr(trainer, "_fusedrl_backend", "auto")
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
    B = completion_ids.size(0)

    loss_type = getattr(trainer, "loss_type", "grpo")
    training = bool(getattr(getattr(trainer, "model", model), "training", True))
    ga = _ga_steps(trainer) if training else 1

    num_items = None
    if loss_type in TOKEN_NORMALISED_LOSS_TYPES:
        n = inputs.get("num_items_in_batch")
        if n is None:
            n = mask.sum()
        if not isinstance(n, torch.Tensor):
            n = torch.tensor(float(n), device=mask.device)
        acc = getattr(trainer, "accelerator", None)
        nproc = getattr(acc, "num_processes", 1) if acc is not None else 1
        n = n.to(torch.float32).clamp(min=1.0) / nproc
        if training:
            n = n * ga / (trainer_arg(trainer, "steps_per_generation", None) or ga)
        num_items = n
    cfg, norms = _trainer_config(trainer, batch_size=B, num_items=num_items)

    temperature = float(getattr(trainer, "temperature", None) or trainer_arg(trainer, "temperature", 1.0) or 1.0)
    with autocast_for(trainer):
        logp, ent = hf.hf_logprob_entropy(
            model,
            input_ids,
            attention_mask,
            response_mask=mask,
            temperature=temperature,
            return_entropy=True,
            backend=backend,
            **replay_kwargs(trainer, inputs),
        )

    advantages = inputs["advantages"]
    old = inputs.get("old_per_token_logps")
    old = logp.detach() if old is None else old
    is_w = _trl_is_weights(trainer, inputs, loss_type, mask)
    side = entropy_control_side(trainer, cfg, inputs, ent, mask, training, _stats_group(trainer))
    loss, metrics = policy_loss(
        logp,
        old,
        advantages,
        mask,
        entropy=ent,
        config=cfg,
        rollout_logp=_opsm_rollout_logp(cfg, inputs, logp),
        rollout_is_weights=is_w,
        **norms,
        **side,
    )
    beta = float(getattr(trainer, "beta", 0.0))
    kl = None
    if beta != 0.0:
        kl = _trl_kl(
            logp,
            old,
            inputs["ref_per_token_logps"],
            mask,
            bool(trainer_arg(trainer, "use_bias_correction_kl", True)),
            getattr(trainer, "importance_sampling_level", "token"),
        )
        loss = loss + beta * _aggregate_like(kl, mask, cfg, norms)
    policy_part = loss.detach()
    if loss_type not in TOKEN_NORMALISED_LOSS_TYPES:
        loss = loss / ga

    loss = _entropy_bonus(trainer, loss, ent, mask, cfg, training, ga, policy_part)
    _log_metrics(trainer, logp.detach(), old, advantages, mask, metrics, kl, cfg, loss_type, is_w, training)
    log_entropy_control_metrics(trainer, metrics, cfg, "train" if training else "eval")
    return loss


def _trl_kl(logp: Tensor, old: Tensor, ref: Tensor, mask: Tensor, bias_correction: bool, level: str) -> Tensor:
    """TRL's per-token KL term: k3 ``exp(ref - logp) - (ref - logp) - 1`` without clamps (fusedrl's ``"k3"`` is
    verl's ``low_var_kl``, clamped at 10, which TRL is not), times the differentiable importance ratio with
    ``use_bias_correction_kl`` (token, or the sequence's ``exp(mean)``)."""
    d = ref - logp
    kl = torch.exp(d) - d - 1
    if bias_correction:
        kl = kl * torch.exp(_log_importance_weights(logp, old, mask, level))
    return kl


def _aggregate_like(values: Tensor, mask: Tensor, cfg: PolicyLossConfig, norms: dict[str, Any]) -> Tensor:
    """``values`` [B, K] (differentiable) aggregated exactly as the policy term: :func:`fusedrl.policy_loss` in
    ``gpg`` mode with ``A = -1`` is ``agg(values)`` (one aggregation implementation, the loss head's)."""
    agg = PolicyLossConfig(loss_mode="gpg", loss_agg_mode=cfg.loss_agg_mode)
    out, _ = policy_loss(values, values.detach(), -torch.ones_like(values.detach()), mask, config=agg, **norms)
    return out


def _entropy_bonus(
    trainer,
    loss: Tensor,
    ent: Tensor,
    mask: Tensor,
    cfg: PolicyLossConfig,
    training: bool,
    ga: int,
    policy_part: Tensor,
) -> Tensor:
    """TRL's entropy bonus: ``coef * mean(entropy)`` over the tokens the policy term trains on (the 80/20 mask
    applied), divided by the accumulation steps, with TRL's adaptive controller (gate from the previous
    optimizer step, window statistics reduced and the coefficient updated at the step boundary)."""
    enabled = getattr(trainer, "_entropy_bonus_enabled", None)
    adaptive = bool(getattr(trainer, "use_adaptive_entropy", False))
    coef = _entropy_coeff(trainer)
    if enabled is None:
        enabled = coef != 0.0 or adaptive
    if not enabled:
        return loss
    m = mask.to(ent.dtype)
    if cfg.top_entropy_quantile < 1.0:
        from ...loss.selection import entropy_keep  # the 80/20 selection of the policy term (one implementation)

        keep = entropy_keep(
            ent.detach().reshape(-1), (mask != 0).reshape(-1), cfg.top_entropy_quantile, cfg.stats_group
        )
        m = keep.reshape(mask.shape).to(ent.dtype)
    entropy_loss = (ent * m).sum() / m.sum().clamp(min=1.0) / ga
    if adaptive:
        target = float(trainer_arg(trainer, "entropy_target", 0.2))
        apply = coef if getattr(trainer, "_last_world_entropy", math.inf) <= target else 0.0
    else:
        apply = coef
    loss = loss - apply * entropy_loss
    acc = getattr(trainer, "accelerator", None)
    store = getattr(trainer, "_metrics", None)
    mode = "train" if training else "eval"
    if store is not None and acc is not None:
        store[mode]["policy_loss"].append(acc.gather(policy_part).nanmean().item())
    sync = bool(getattr(acc, "sync_gradients", True)) if acc is not None else True
    if adaptive and training:
        stats = torch.stack([(ent * m).sum(), m.sum()]).detach()
        window = getattr(trainer, "_entropy_window_stats", None)
        trainer._entropy_window_stats = stats if window is None else window + stats
        if sync:
            tot = trainer._entropy_window_stats
            if acc is not None:
                tot = acc.reduce(tot, reduction="sum")
            world = (tot[0] / tot[1].clamp(min=1.0)).item()
            lo, hi = (
                float(trainer_arg(trainer, "entropy_coef_min", 0.0)),
                float(trainer_arg(trainer, "entropy_coef_max", 1.0)),
            )
            step = float(trainer_arg(trainer, "entropy_coef_delta", 0.005))
            target = float(trainer_arg(trainer, "entropy_target", 0.2))
            trainer.entropy_coef = min(coef + step, hi) if world <= target else max(coef - step, lo)
            trainer._last_world_entropy = world
            trainer._entropy_window_stats = None
    if store is not None and training and sync:
        store[mode]["entropy_coef"].append(trainer.entropy_coef if hasattr(trainer, "entropy_coef") else coef)
    return loss


def _log_importance_weights(logp, old, mask, level):
    """TRL's log importance weights: per token [B, K], or per sequence [B, 1] (masked mean)."""
    log_ratio = logp - old
    if level != "sequence":
        return log_ratio
    m = mask.to(log_ratio.dtype)
    return ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def _vespo_log_w(logp, old, mask, is_w: Optional[Tensor]) -> Tensor:
    """TRL's VESPO log sequence weight [B, 1] (``get_gamma_weights``), for its ``vespo/phi_seq_mean`` metric only:
    the loss takes phi inside :mod:`fusedrl.loss`, which does not report it."""
    lower = math.log(1e-8)
    m = mask.to(logp.dtype)
    log_w = ((logp - old).clamp(-20.0, 20.0) * m).sum(-1, keepdim=True)
    if is_w is not None:
        log_w = log_w + torch.log(is_w).clamp(lower, 20.0).sum(-1, keepdim=True)
    return log_w.clamp(lower, 20.0)


def _log_metrics(trainer, logp, old, advantages, mask, metrics, kl, cfg, loss_type, is_w, training):
    """TRL's logged metrics (same names, same definitions): ``kl`` / ``entropy`` from :func:`fusedrl.policy_loss`'s
    local means made global over the processes, the clip ratios from the detached per-token tensors."""
    store = getattr(trainer, "_metrics", None)
    acc = getattr(trainer, "accelerator", None)
    if store is None or acc is None:
        return
    mode = "train" if training else "eval"
    m = mask.to(torch.float32)
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)
    level = cfg.importance_sampling_level

    def global_mean(x):
        if x.dim() == 0:  # a local masked mean: weight it by the local token count
            s, c = x.float() * m.sum(), m.sum()
        elif x.shape[1] == 1:  # one value per sequence
            s, c = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            s, c = (x * m).sum(), m.sum()
        tot = acc.reduce(torch.stack([s.float(), c.float()]), reduction="sum")
        return (tot[0] / tot[1].clamp(min=1.0)).item()

    if kl is not None:
        store[mode]["kl"].append(global_mean(kl.detach()))
    store[mode]["entropy"].append(global_mean(metrics["entropy"]))
    coef_1 = torch.exp(_log_importance_weights(logp, old, mask, level))
    if loss_type == "cispo":
        cap = 1.0 + cfg.clip_ratio_high
        store[mode]["cispo_clip_ratio"].append(global_mean(((coef_1 > cap) & (adv > 0)).float()))
        return
    if loss_type == "vespo":
        log_w = _vespo_log_w(logp, old, mask, is_w)
        nonneg = adv[:, :1] >= 0
        k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
        lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        store[mode]["vespo/phi_seq_mean"].append(global_mean(phi))
        return
    if loss_type not in CLIPPED_LOSS_TYPES:
        return
    if cfg.delta is not None:  # TRL reports on the delta-capped ratio
        coef_1 = coef_1.clamp(max=cfg.delta)
    lo_eps, hi_eps = cfg.clip_ratio_low, cfg.clip_ratio_high
    low = ((coef_1 < 1 - lo_eps) & (adv < 0)).float()
    high = ((coef_1 > 1 + hi_eps) & (adv > 0)).float()
    store[mode]["clip_ratio/low_mean"].append(global_mean(low))
    store[mode]["clip_ratio/high_mean"].append(global_mean(high))
    store[mode]["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))

    def seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * m).sum(-1) / m.sum(-1)

    low_seq, high_seq = acc.gather(seq_mean(low)), acc.gather(seq_mean(high))
    finite_low, finite_high = low_seq[~torch.isnan(low_seq)], high_seq[~torch.isnan(high_seq)]
    store[mode]["clip_ratio/low_min"].append(finite_low.min().item() if finite_low.numel() else float("nan"))
    store[mode]["clip_ratio/high_max"].append(finite_high.max().item() if finite_high.numel() else float("nan"))
