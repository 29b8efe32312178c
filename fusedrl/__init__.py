"""fusedrl: RL policy losses for LLMs computed straight from hidden states and the lm_head weight.

Layers, each importing only the ones before it: :mod:`fusedrl.reference` (eager oracle) ->
:mod:`fusedrl.backends` (kernels + launchers, one package or module per backend) -> :mod:`fusedrl.replay`
(sampling replay: kept sets, the recomputed truncation, their chunk engine) -> :mod:`fusedrl.ops` (core
custom ops, autograd, public core ops) -> :mod:`fusedrl.loss` (the policy-loss head) ->
:mod:`fusedrl.onepass` and :mod:`fusedrl.fused` (the fused loss) -> :mod:`fusedrl.integrations`.
:mod:`fusedrl.control` holds the host-side entropy controllers (docs/entropy-control.md).
"""

from .backends import BackendUnavailable, available_backends
from .fused import FusedPolicyLoss, fused_policy_loss
from .loss import PolicyLossConfig, RolloutCorrection, policy_loss, segment_ids_from_tokens
from .ops import linear_logprob_entropy, logprob_entropy

__version__ = "0.1.0"

__all__ = [
    "linear_logprob_entropy",
    "logprob_entropy",
    "available_backends",
    "BackendUnavailable",
    "PolicyLossConfig",
    "RolloutCorrection",
    "policy_loss",
    "fused_policy_loss",
    "FusedPolicyLoss",
    "segment_ids_from_tokens",
]
