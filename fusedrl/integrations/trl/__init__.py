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

Every ``GRPOConfig`` option that shapes TRL 1.16's loss is mapped (tests/integrations/test_trl_parity.py compares loss,
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

Entropy control (docs/entropy-control.md, docs/integrations.md): ``fusedrl_entropy_control={...}`` sets STEER /
BAPO / RL-PLUS / SSPO / EPO-corridor fields on the mapped config, ``fusedrl_segment_boundary_ids`` splits SSPO's
segments, ``fusedrl_entropy_history`` holds the corridor's reference; the per-token inputs come from the batch
(:func:`fusedrl.integrations.trl.entropy.entropy_control_side`).

Left to TRL's own loss (the trainer warns once, at construction where the configuration decides it;
``fusedrl_fallback="error"`` raises instead): :data:`TRL_FALLBACKS`. Written against and tested with TRL 1.16.

The KL term inside the trainer is TRL's own (k3 without clamps, aggregated by the loss head); the config
returned by :func:`grpo_policy_loss_config` for direct :func:`fusedrl.policy_loss` use has
``kl_loss_type="k3"``, verl's ``low_var_kl``, which clamps the per-token KL at 10 (TRL does not). One more
deviation, at extreme values only: fusedrl clamps log-ratios to [-20, 20] before exponentiating (TRL does not).

Precision: the vocabulary projection runs in the lm_head weight's dtype outside autocast (fp32 master
weights -> fp32 logits in registers / tiles), whereas TRL under ``bf16=True`` autocast projects in
bf16; with ``bf16=False`` both paths agree to float rounding (tests/integrations/test_trl_parity.py).
"""

from __future__ import annotations

from .config import (
    TRL_FALLBACKS,
    TRL_LOSS_TYPES,
    FusedRLUnsupported,
    grpo_policy_loss_config,
    vllm_rollout_correction,
)
from .loss import fused_grpo_loss
from .trainer import FusedGRPOMixin, make_fused_grpo_trainer_class

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


def __getattr__(name):
    if name == "FusedGRPOTrainer":  # built on first use: importing this package does not import TRL
        return make_fused_grpo_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
