"""How a TRL ``GRPOConfig`` maps onto :class:`fusedrl.PolicyLossConfig` (the table in the package
docstring), and the settings left to TRL's own loss."""

from __future__ import annotations

import math
from typing import Any, Optional

from ...loss import PolicyLossConfig, RolloutCorrection

#: TRL 1.16 loss types, all computed by fusedrl
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo")
#: GRPOTrainer settings for which FusedGRPOTrainer uses TRL's own loss (warning once; the README names them)
TRL_FALLBACKS = (
    "MoE load-balancing auxiliary loss (router_aux_loss_coef on a Mixture-of-Experts model)",
    "multimodal inputs (pixel_values, image_grid_thw, ...)",
)
# loss types whose normaliser is TRL's token count of the accumulation window (no extra / GA)
TOKEN_NORMALISED_LOSS_TYPES = ("dapo", "cispo", "vespo")
# loss types with TRL's clipped surrogate (delta applies, clip_ratio/* metrics)
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")

MULTIMODAL_KEYS = (
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


def trainer_arg(trainer, name: str, default=None):
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
    if loss_type in CLIPPED_LOSS_TYPES:
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
