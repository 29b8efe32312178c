"""verl: fusedrl as verl policy losses and as verl's fused log-prob / entropy kernel.

This module imports without verl installed. When verl is installed, importing it registers the policy losses
(below) in verl's registry, so ``VERL_USE_EXTERNAL_MODULES=fusedrl.integrations.verl`` in the environment of a
verl run is all its workers need: verl 0.9.1 imports the modules that variable lists at ``import verl``, in every
process. Registering imports only ``verl.trainer.ppo.core_algos`` (and what verl's package imports itself).

1. Policy losses. :func:`register_verl_policy_losses` adds fusedrl's loss head to verl's registry
   (``verl.trainer.ppo.core_algos.register_policy_loss``) for each of verl 0.9.1's twelve modes, as
   ``fusedrl_<mode>`` (``vanilla``, ``dppo_tv``, ``dppo_kl``, ``gspo``, ``sapo``, ``gpg``, ``clip_cov``,
   ``kl_cov``, ``geo_mean``, ``dro``, ``cispo``, ``bypass_mode``; ``override=True`` also replaces verl's own
   entries), and fusedrl's entropy-control modes ``fusedrl_steer``, ``fusedrl_bapo``, ``fusedrl_rl_plus``
   (their per-token inputs are keyword arguments of the loss function; bapo needs none). Importing this
   module does it when verl is installed; registering again is harmless. Select one
   with ``actor_rollout_ref.actor.policy_loss.loss_mode=fusedrl_vanilla``. The functions
   take verl's ``PolicyLossFn`` arguments, read the actor config as verl does (``clip_ratio[_low/_high/_c]``,
   ``tau_pos/neg``, ``policy_loss.*`` including ``dro_beta`` and ``rollout_correction``, ``global_batch_info``
   for the data-parallel normalisers), honour ``rollout_is_weights`` and every ``loss_agg_mode``
   (``token-sum`` included), and return verl's metric names. Every device-side op is sync-free (Clip-Cov /
   KL-Cov, rollout correction stay on the device); only the returned metrics become Python floats, as
   verl's own losses do.

2. Fused log-probs / entropy for the actor. verl's ``use_fused_kernels`` forward calls
   ``FusedLinearForPPO()(hidden_states, vocab_weights, input_ids, temperature)`` (torch backend) or
   ``linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)``
   (triton backend, FSDP and Megatron). :class:`FusedLinearForPPO`, :func:`fused_linear_for_ppo` and
   :func:`linear_cross_entropy` are drop-ins with those signatures, and :func:`patch_verl` installs
   them into verl (Megatron's ``model_forward_fused`` / ``model_forward_1f1b_overlap`` included, which bind
   ``linear_cross_entropy`` at import) so ``actor_rollout_ref.model.use_fused_kernels=True`` runs on fusedrl
   (any backend: both of verl's ``fused_kernel_options.impl_backend`` values are served).
"""

from __future__ import annotations

from .config import (
    VERL_ENTROPY_MODES,
    VERL_LOSS_MODES,
    policy_loss_config_from_verl,
    rollout_correction_from_verl,
    verl_normalisers,
)
from .kernels import (
    FusedLinearForPPO,
    fused_linear_for_ppo,
    linear_cross_entropy,
    patch_verl,
    sampling_replay,
    unpatch_verl,
)
from .losses import make_verl_policy_loss, register_verl_policy_losses

__all__ = [
    "VERL_LOSS_MODES",
    "VERL_ENTROPY_MODES",
    "verl_normalisers",
    "policy_loss_config_from_verl",
    "rollout_correction_from_verl",
    "make_verl_policy_loss",
    "register_verl_policy_losses",
    "fused_linear_for_ppo",
    "FusedLinearForPPO",
    "linear_cross_entropy",
    "patch_verl",
    "unpatch_verl",
    "sampling_replay",
]


def _register_when_verl_is_installed() -> None:
    """At import: register the losses if verl is installed (see the module docstring); nothing without verl."""
    import importlib.util
    import warnings

    try:
        installed = importlib.util.find_spec("verl") is not None
    except (ImportError, ValueError):  # a broken entry for verl in sys.modules
        installed = False
    if not installed:
        return
    try:
        register_verl_policy_losses()
    except Exception as e:  # e.g. verl without the packages core_algos imports: the rest of this module still works
        warnings.warn(
            f"fusedrl: verl is installed but its policy-loss registry did not import ({type(e).__name__}: {e}); "
            "the fusedrl_* policy losses are not registered",
            stacklevel=2,
        )


_register_when_verl_is_installed()
