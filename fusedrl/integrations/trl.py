"""TRL ``GRPOTrainer`` with fusedrl's loss: hidden states in, loss out, no ``[B, K, V]`` logits.

Three ways in (TRL is imported only when a trainer class is built, so this module imports without it):

* ``FusedGRPOTrainer`` - a drop-in subclass of ``trl.GRPOTrainer``::

      from fusedrl.integrations.trl import FusedGRPOTrainer
      trainer = FusedGRPOTrainer(model=model, reward_funcs=reward_fn, args=GRPOConfig(...),
                                 train_dataset=ds, fusedrl_entropy_coeff=0.001)

* ``FusedGRPOMixin`` - for an existing GRPOTrainer subclass: ``class My(FusedGRPOMixin, MyGRPOTrainer)``.
* ``fused_grpo_loss(trainer, model, inputs)`` - the loss itself, as a hook for a custom ``_compute_loss``.

What the trainer does differently: ``_compute_loss`` runs the model body once, takes the per-token
log-probs and entropies of the completion from :func:`fusedrl.linear_logprob_entropy` (lm_head weight,
bias, logit scale, final-logit softcap and ``args.temperature`` taken from the model / config) and the
loss from :func:`fusedrl.policy_loss` with a :class:`fusedrl.PolicyLossConfig` mapped from the
``GRPOConfig`` (:func:`grpo_policy_loss_config`); the old / reference log-probs of a rollout batch
are scored with the same fused op under ``no_grad``. Logged metrics keep TRL's names and meaning
(``entropy``, ``kl``, ``clip_ratio/*``, ``cispo_clip_ratio``, ``vespo/phi_seq_mean``, ``policy_loss``,
``entropy_coef``).

Every ``GRPOConfig`` option that shapes TRL 1.16's loss is mapped (tests/test_trl_parity.py compares loss,
gradients and metrics with TRL's own ``_compute_loss``):

===============================  =============================================================================
TRL                              fusedrl
===============================  =============================================================================
grpo / bnpo / dr_grpo / dapo     ``loss_mode="vanilla"`` without dual clip; aggregation: grpo
                                 ``seq-mean-token-mean`` over all ``B`` rows, bnpo local ``token-mean``, dr_grpo
                                 ``seq-mean-token-sum-norm`` with ``norm_len = max_completion_length``, dapo
                                 ``token-mean`` over TRL's ``num_items_in_batch / processes * GA /
                                 steps_per_generation``
luspo                            ``loss_mode="luspo"``, ``seq-mean-token-sum`` over all ``B`` rows
cispo                            ``loss_mode="cispo"``, ratio capped at ``epsilon_high`` itself (``clip_ratio_low=1``,
                                 ``clip_ratio_high=epsilon_high-1``, any value > 0: TRL's default 0.2 too); as dapo
sapo                             ``loss_mode="sapo"``, ``tau_pos/neg = sapo_temperature_pos/neg``; as grpo
vespo                            ``loss_mode="vespo"``, ``vespo_k/lambda_pos/neg``; as dapo
epsilon / epsilon_high, delta    ``clip_ratio_low`` / ``clip_ratio_high``, ``delta`` (INTELLECT-2 cap, any value)
importance_sampling_level        ``importance_sampling_level`` (TRL's sequence ratio, gradient through its mean)
beta, use_bias_correction_kl     ``kl_loss_coef``, ``kl_loss_type="k3"``, ``use_bias_correction_kl`` (TRL's default
                                 True: the k3 term times the differentiable importance ratio)
top_entropy_quantile             ``top_entropy_quantile`` (over all processes, as TRL's gather)
off_policy_mask_threshold        ``off_policy_mask_threshold`` with ``rollout_logp`` = vLLM's sampling log-probs
vllm_importance_sampling_*       trainer: TRL's own ``importance_sampling_ratio`` as ``rollout_is_weights`` (vespo
                                 folds it into its sequence weight); direct API: ``RolloutCorrection(rollout_is=
                                 "token"|"sequence", rollout_is_mode="truncate"|"mask", rollout_is_threshold=
                                 clip_max, rollout_is_threshold_lower=clip_min)`` with ``rollout_logp``
entropy_coef, use_adaptive_*     the bonus ``coef * mean(entropy)`` over the (80/20-masked) tokens, / GA, with
                                 TRL's adaptive controller; ``fusedrl_entropy_coeff`` overrides ``entropy_coef``
===============================  =============================================================================

Left to TRL's own loss (the trainer warns once, at construction where the configuration decides it;
``fusedrl_fallback="error"`` raises instead): :data:`TRL_FALLBACKS`. Written against and tested with TRL 1.16.

The KL term inside the trainer is TRL's own (k3 without clamps, aggregated by the loss head); the config
returned by :func:`grpo_policy_loss_config` for direct :func:`fusedrl.policy_loss` use has
``kl_loss_type="k3"``, verl's ``low_var_kl``, which clamps the per-token KL at 10 (TRL does not). One more
deviation, at extreme values only: fusedrl clamps log-ratios to [-20, 20] before exponentiating (TRL does not).

Precision: the vocabulary projection runs in the lm_head weight's dtype outside autocast (fp32 master
weights -> fp32 logits in registers / tiles), whereas TRL under ``bf16=True`` autocast projects in
bf16; with ``bf16=False`` both paths agree to float rounding (tests/test_trl_parity.py).
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Optional

import torch

from ..loss import PolicyLossConfig, RolloutCorrection, policy_loss
from . import hf

Tensor = torch.Tensor

__all__ = [
    "TRL_LOSS_TYPES",
    "TRL_FALLBACKS",
    "grpo_policy_loss_config",
    "vllm_rollout_correction",
    "fused_grpo_loss",
    "FusedGRPOMixin",
    "FusedGRPOTrainer",
    "FusedRLUnsupported",
    "make_fused_grpo_trainer_class",
]

#: TRL 1.16 loss types, all computed by fusedrl
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")
#: GRPOTrainer settings for which FusedGRPOTrainer uses TRL's own loss (warning once; the README names them)
TRL_FALLBACKS = (
    "MoE load-balancing auxiliary loss (router_aux_loss_coef on a Mixture-of-Experts model)",
    "multimodal inputs (pixel_values, image_grid_thw, ...)",
)
# loss types whose normaliser is TRL's token count of the accumulation window (no extra / GA)
_TOKEN_NORMALISED = ("dapo", "cispo", "vespo")
# loss types with TRL's clipped surrogate (delta applies, clip_ratio/* metrics)
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
    "num_images",
)


class FusedRLUnsupported(NotImplementedError):
    """A GRPOTrainer setting fusedrl's loss does not reproduce.

    ``reason`` names the setting (a noun phrase such as ``"loss_type='foo'"``); the message may add detail.
    """

    def __init__(self, reason: str, detail: Optional[str] = None):
        super().__init__(reason if detail is None else f"{reason}: {detail}")
        self.reason = reason


def _arg(trainer, name: str, default=None):
    args = getattr(trainer, "args", None)
    return getattr(args, name, default) if args is not None else default


def vllm_rollout_correction(
    mode: str = "sequence_mask", clip_min: Optional[float] = None, clip_max: Optional[float] = 3.0
) -> RolloutCorrection:
    """:class:`fusedrl.RolloutCorrection` for TRL's vLLM importance-sampling correction
    (``vllm_importance_sampling_mode``, ``vllm_importance_sampling_clip_min`` / ``_clip_max``)."""
    if mode not in _VLLM_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {_VLLM_IS_MODES}, got {mode!r}")
    level, how = mode.split("_")
    return RolloutCorrection(
        rollout_is=level,
        rollout_is_mode=how,
        rollout_is_threshold=math.inf if clip_max is None else float(clip_max),
        rollout_is_threshold_lower=None if clip_min is None else float(clip_min),
    )


def grpo_policy_loss_config(
    loss_type: str = "grpo",
    *,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    delta: Optional[float] = None,
    batch_size: Optional[int] = None,
    max_completion_length: Optional[int] = None,
    num_items: Optional[Any] = None,
    use_bias_correction_kl: bool = True,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: Optional[float] = None,
    vllm_importance_sampling_mode: Optional[str] = None,
    vllm_importance_sampling_clip_min: Optional[float] = None,
    vllm_importance_sampling_clip_max: Optional[float] = 3.0,
    stats_group=None,
) -> tuple[PolicyLossConfig, dict[str, Any]]:
    """Map TRL 1.16 ``GRPOConfig`` loss options onto a :class:`fusedrl.PolicyLossConfig` (names as TRL's).

    Args:
        loss_type: TRL's ``loss_type`` (one of :data:`TRL_LOSS_TYPES`).
        epsilon_low / epsilon_high: TRL's ``epsilon`` / ``epsilon_high`` (default: ``epsilon_low``; cispo: the
            absolute cap of the ratio).
        beta, use_bias_correction_kl: the k3 KL term and TRL's importance weighting of it (TRL default True).
        importance_sampling_level: ``"token"`` or ``"sequence"``. delta: INTELLECT-2's cap of the unclipped ratio.
        batch_size: ``B`` of the micro-batch (grpo / sapo / luspo: all rows count; dr_grpo: ``B * L_max``).
        max_completion_length: dr_grpo's length normaliser.
        num_items: dapo / cispo / vespo token normaliser (TRL: ``num_items_in_batch`` rescaled to one
            accumulation window).
        sapo_*, vespo_*: TRL's parameters of those losses. top_entropy_quantile, off_policy_mask_threshold: as TRL.
        vllm_importance_sampling_mode: None (no correction) or TRL's mode; with ``_clip_min`` / ``_clip_max``.
            The correction and OPSM need ``policy_loss(rollout_logp=<vLLM's sampling log-probs>)``.
        stats_group: process group of the entropy quantile (TRL: all processes).

    Returns:
        ``(config, normalisers)``: pass ``**normalisers`` to :func:`fusedrl.policy_loss` /
        :func:`fusedrl.fused_policy_loss`. The loss equals TRL's *before* its division by the
        gradient-accumulation steps (dapo / cispo / vespo: TRL's normaliser already includes it).
    """
    if loss_type not in TRL_LOSS_TYPES:
        raise FusedRLUnsupported(f"loss_type={loss_type!r}", f"TRL 1.16's loss types are {TRL_LOSS_TYPES}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    level = importance_sampling_level
    bias_kl = bool(use_bias_correction_kl) and beta != 0.0
    kw: dict[str, Any] = dict(
        clip_ratio_low=float(epsilon_low),
        clip_ratio_high=float(eps_high),
        clip_ratio_c=None,
        kl_loss_coef=float(beta),
        kl_loss_type="k3",
        use_bias_correction_kl=bias_kl,
        top_entropy_quantile=float(top_entropy_quantile),
        stats_group=stats_group,
        off_policy_mask_threshold=off_policy_mask_threshold,
    )
    if loss_type in _CLIPPED:
        kw.update(
            loss_mode="luspo" if loss_type == "luspo" else "vanilla",
            importance_sampling_level=level,
            delta=None if delta is None else float(delta),
        )
    elif loss_type == "cispo":
        if not eps_high > 0:
            raise ValueError(f"cispo's epsilon_high caps the ratio and must be > 0, got {eps_high}")
        # TRL: -sg(min(r, epsilon_high)) A logp  ==  fusedrl cispo with bounds [0, epsilon_high]
        kw.update(
            loss_mode="cispo",
            clip_ratio_low=1.0,
            clip_ratio_high=float(eps_high) - 1.0,
            importance_sampling_level=level,
        )
    elif loss_type == "sapo":
        kw.update(
            loss_mode="sapo",
            tau_pos=float(sapo_temperature_pos),
            tau_neg=float(sapo_temperature_neg),
            importance_sampling_level=level,
        )
    else:  # vespo: its sequence weight is built in; the level only reaches TRL's KL correction
        if level == "sequence" and bias_kl:
            raise ValueError(
                "vespo with importance_sampling_level='sequence': policy_loss's KL bias correction "
                "takes the token ratio for vespo (FusedGRPOTrainer computes TRL's KL itself)"
            )
        kw.update(
            loss_mode="vespo",
            vespo_k_pos=float(vespo_k_pos),
            vespo_lambda_pos=float(vespo_lambda_pos),
            vespo_k_neg=float(vespo_k_neg),
            vespo_lambda_neg=float(vespo_lambda_neg),
        )
    if vllm_importance_sampling_mode is not None:
        kw["rollout_correction"] = vllm_rollout_correction(
            vllm_importance_sampling_mode, vllm_importance_sampling_clip_min, vllm_importance_sampling_clip_max
        )
    norms: dict[str, Any] = {}
    if loss_type in ("grpo", "sapo"):
        kw["loss_agg_mode"] = "seq-mean-token-mean"
        if batch_size is not None:
            norms["global_num_seqs"] = int(batch_size)
    elif loss_type == "bnpo":
        kw["loss_agg_mode"] = "token-mean"
    elif loss_type == "dr_grpo":
        if batch_size is None or max_completion_length is None:
            raise ValueError("dr_grpo needs batch_size and max_completion_length")
        # TRL: sum(L m) / (B * max_completion_length) == seq-mean over B sequences of sum / L_max
        kw["loss_agg_mode"] = "seq-mean-token-sum-norm"
        norms["global_num_seqs"] = int(batch_size)
        norms["norm_len"] = int(max_completion_length)
    elif loss_type == "luspo":
        kw["loss_agg_mode"] = "seq-mean-token-sum"  # TRL: (L m).sum(-1).mean() over all rows
        if batch_size is not None:
            norms["global_num_seqs"] = int(batch_size)
    else:  # dapo, cispo, vespo
        kw["loss_agg_mode"] = "token-mean"
        if num_items is not None:
            norms["global_num_tokens"] = num_items
    return PolicyLossConfig(**kw), norms


# --------------------------------------------------------------------------------------------------
# the loss hook
# --------------------------------------------------------------------------------------------------
def _uses_vllm_is(trainer) -> bool:
    return bool(getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction", False))


def _unsupported_reason(trainer, inputs) -> Optional[str]:
    """The setting of this step that the fused loss does not reproduce (see :data:`TRL_FALLBACKS`), or None."""
    loss_type = getattr(trainer, "loss_type", _arg(trainer, "loss_type", "grpo"))
    if loss_type not in TRL_LOSS_TYPES:
        return f"loss_type={loss_type!r}"
    if getattr(trainer, "aux_loss_enabled", False):
        return TRL_FALLBACKS[0]
    for k in _MULTIMODAL_KEYS:
        if inputs.get(k) is not None:
            return f"{TRL_FALLBACKS[1]}: {k!r}"
    return None


def _static_unsupported_reason(trainer) -> Optional[str]:
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
    a = lambda name, default: _arg(trainer, name, default)  # noqa: E731
    return grpo_policy_loss_config(
        getattr(trainer, "loss_type", "grpo"),
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


def _ga_steps(trainer) -> int:
    return int(
        getattr(trainer, "current_gradient_accumulation_steps", None)
        or _arg(trainer, "gradient_accumulation_steps", 1)
        or 1
    )


def _autocast(trainer):
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
        c = _arg(trainer, "entropy_coef", 0.0)
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
    if loss_type in _TOKEN_NORMALISED:
        n = inputs.get("num_items_in_batch")
        if n is None:
            n = mask.sum()
        if not isinstance(n, torch.Tensor):
            n = torch.tensor(float(n), device=mask.device)
        acc = getattr(trainer, "accelerator", None)
        nproc = getattr(acc, "num_processes", 1) if acc is not None else 1
        n = n.to(torch.float32).clamp(min=1.0) / nproc
        if training:
            n = n * ga / (_arg(trainer, "steps_per_generation", None) or ga)
        num_items = n
    cfg, norms = _trainer_config(trainer, batch_size=B, num_items=num_items)

    temperature = float(getattr(trainer, "temperature", None) or _arg(trainer, "temperature", 1.0) or 1.0)
    with _autocast(trainer):
        logp, ent = hf.hf_logprob_entropy(
            model,
            input_ids,
            attention_mask,
            response_mask=mask,
            temperature=temperature,
            return_entropy=True,
            backend=backend,
        )

    advantages = inputs["advantages"]
    old = inputs.get("old_per_token_logps")
    old = logp.detach() if old is None else old
    is_w = _trl_is_weights(trainer, inputs, loss_type, mask)
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
    )
    beta = float(getattr(trainer, "beta", 0.0))
    kl = None
    if beta != 0.0:
        kl = _trl_kl(
            logp,
            old,
            inputs["ref_per_token_logps"],
            mask,
            bool(_arg(trainer, "use_bias_correction_kl", True)),
            getattr(trainer, "importance_sampling_level", "token"),
        )
        loss = loss + beta * _aggregate_like(kl, mask, cfg, norms)
    policy_part = loss.detach()
    if loss_type not in _TOKEN_NORMALISED:
        loss = loss / ga

    loss = _entropy_bonus(trainer, loss, ent, mask, cfg, training, ga, policy_part)
    _log_metrics(trainer, logp.detach(), old, advantages, mask, metrics, kl, cfg, loss_type, is_w, training)
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
        from ..loss.selection import entropy_keep  # the 80/20 selection of the policy term (one implementation)

        keep = entropy_keep(
            ent.detach().reshape(-1), (mask != 0).reshape(-1), cfg.top_entropy_quantile, cfg.stats_group
        )
        m = keep.reshape(mask.shape).to(ent.dtype)
    entropy_loss = (ent * m).sum() / m.sum().clamp(min=1.0) / ga
    if adaptive:
        target = float(_arg(trainer, "entropy_target", 0.2))
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
            lo, hi = float(_arg(trainer, "entropy_coef_min", 0.0)), float(_arg(trainer, "entropy_coef_max", 1.0))
            step = float(_arg(trainer, "entropy_coef_delta", 0.005))
            target = float(_arg(trainer, "entropy_target", 0.2))
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
    if loss_type not in _CLIPPED:
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


# --------------------------------------------------------------------------------------------------
# trainer classes
# --------------------------------------------------------------------------------------------------
class FusedGRPOMixin:
    """Mix into a ``trl.GRPOTrainer`` (sub)class: ``class T(FusedGRPOMixin, GRPOTrainer)``.

    Extra constructor keyword arguments:
        fusedrl_backend: fusedrl backend (``"auto"``).
        fusedrl_entropy_coeff: entropy bonus coefficient; overrides ``GRPOConfig.entropy_coef`` (it is
            written into the trainer's ``entropy_coef``, so TRL's own loss applies the same bonus on a
            fallback step).
        fusedrl_fallback: ``"warn"`` (default: use TRL's own loss for what :data:`TRL_FALLBACKS` lists,
            warning once) or ``"error"``.
        fusedrl_score: also score old / reference log-probs with fusedrl (default True).

    The configuration is checked when the trainer is built: a static setting the fused loss does not
    reproduce warns (or raises, with ``fusedrl_fallback="error"``) there, not at the first step.
    """

    def __init__(
        self,
        *args,
        fusedrl_backend: str = "auto",
        fusedrl_entropy_coeff: Optional[float] = None,
        fusedrl_fallback: str = "warn",
        fusedrl_score: bool = True,
        **kwargs,
    ):
        if fusedrl_fallback not in ("warn", "error"):
            raise ValueError(f"fusedrl_fallback must be 'warn' or 'error', got {fusedrl_fallback!r}")
        if fusedrl_entropy_coeff is not None and not (
            isinstance(fusedrl_entropy_coeff, (int, float)) and math.isfinite(fusedrl_entropy_coeff)
        ):
            raise ValueError(f"fusedrl_entropy_coeff must be a finite number, got {fusedrl_entropy_coeff!r}")
        self._fusedrl_backend = fusedrl_backend
        self._fusedrl_entropy_coeff = fusedrl_entropy_coeff
        self._fusedrl_fallback = fusedrl_fallback
        self._fusedrl_score = fusedrl_score
        self._fusedrl_warned = set()
        super().__init__(*args, **kwargs)
        if fusedrl_entropy_coeff is not None:
            self._fusedrl_take_entropy_coeff(float(fusedrl_entropy_coeff))
        reason = _static_unsupported_reason(self)
        if reason is not None:
            self._fusedrl_fall_back(reason, stacklevel=3)

    def _fusedrl_take_entropy_coeff(self, coeff: float) -> None:
        """Make ``fusedrl_entropy_coeff`` the trainer's ``entropy_coef``: the fused loss reads it there, and so
        does TRL's own loss when a step falls back (before, a fallback step raised: TRL would drop it)."""
        if hasattr(self, "entropy_coef") and hasattr(self, "_entropy_bonus_enabled"):
            self.entropy_coef = coeff
            self._entropy_bonus_enabled = coeff != 0.0 or bool(getattr(self, "use_adaptive_entropy", False))
            return
        # A GRPOTrainer without an entropy bonus of its own: a fallback step would drop the bonus.
        reason = _static_unsupported_reason(self)
        if coeff != 0.0 and reason is not None:
            raise ValueError(
                f"fusedrl_entropy_coeff={coeff} cannot be honoured: this configuration uses TRL's own loss "
                f"({reason}), and this TRL version's GRPOTrainer has no entropy bonus (entropy_coef) to hand it to"
            )

    def _fusedrl_fall_back(self, reason: str, stacklevel: int = 4) -> None:
        if self._fusedrl_fallback == "error":
            raise FusedRLUnsupported(
                reason, "fusedrl does not reproduce TRL's loss with this setting (fusedrl_fallback='error')"
            )
        if reason not in self._fusedrl_warned:
            self._fusedrl_warned.add(reason)
            warnings.warn(
                f"fusedrl: the fused loss does not cover {reason}; TRL's own loss is used for the steps that need it",
                stacklevel=stacklevel,
            )

    def _compute_loss(self, model, inputs):
        try:
            return fused_grpo_loss(self, model, inputs)
        except FusedRLUnsupported as e:
            self._fusedrl_fall_back(e.reason)
            if self._fusedrl_entropy_coeff and not hasattr(self, "_entropy_bonus_enabled"):
                raise ValueError(  # only for TRL versions without an entropy bonus of their own
                    f"fusedrl_entropy_coeff is set but this step needs TRL's own loss ({e.reason}), which has no "
                    "entropy bonus in this TRL version"
                ) from None
            return super()._compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, *args, **kwargs
    ):
        extra = any(v is not None and v is not False for v in kwargs.values()) or bool(args)
        if not self._fusedrl_score or extra:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, *args, **kwargs
            )
        batch_size = batch_size or input_ids.size(0)
        temperature = float(getattr(self, "temperature", 1.0) or 1.0)
        logps, ents = [], []
        for s in range(0, input_ids.size(0), batch_size):
            ids, am = input_ids[s : s + batch_size], attention_mask[s : s + batch_size]
            with _autocast(self):
                lp, en = hf.hf_logprob_entropy(
                    model,
                    ids,
                    am,
                    response_mask=am[:, -logits_to_keep:],
                    temperature=temperature,
                    return_entropy=compute_entropy,
                    backend=self._fusedrl_backend,
                )
            logps.append(lp)
            ents.append(en)
        logp = torch.cat(logps, 0)
        ent = torch.cat(ents, 0) if compute_entropy else None
        if _returns_aux_loss(type(self)):
            return logp, ent, None
        return logp, ent


def _returns_aux_loss(cls) -> bool:
    """Whether this TRL version's ``_get_per_token_logps_and_entropies`` returns (logp, entropy, aux_loss)."""
    for base in cls.__mro__:
        if base is FusedGRPOMixin:
            continue
        fn = base.__dict__.get("_get_per_token_logps_and_entropies")
        if fn is not None:
            try:
                return "compute_aux_loss" in inspect.signature(fn).parameters
            except (TypeError, ValueError):  # pragma: no cover
                return False
    return False


_CLASS_CACHE: dict[Any, type] = {}


def make_fused_grpo_trainer_class(base=None) -> type:
    """``FusedGRPOMixin`` + ``base`` (default ``trl.GRPOTrainer``; imports TRL)."""
    if base is None:
        from trl import GRPOTrainer as base  # noqa: N813
    if base not in _CLASS_CACHE:
        _CLASS_CACHE[base] = type(
            "FusedGRPOTrainer",
            (FusedGRPOMixin, base),
            {
                "__doc__": f"``{base.__name__}`` whose loss (and old/ref scoring) runs on fusedrl; "
                "see fusedrl.integrations.trl.",
                "__module__": __name__,
            },
        )
    return _CLASS_CACHE[base]


def __getattr__(name):
    if name == "FusedGRPOTrainer":
        return make_fused_grpo_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
