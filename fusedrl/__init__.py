"""fusedrl: RL policy losses for LLMs computed straight from hidden states and the lm_head weight.

Layers: :mod:`fusedrl.reference` (eager oracle) -> :mod:`fusedrl.backends` (one module per backend:
kernels + launchers) -> :mod:`fusedrl.ops` (custom ops, autograd, public core ops) ->
:mod:`fusedrl.loss` (policy-loss head) -> :mod:`fusedrl.fused` (one-call fused loss, nn.Module).
"""

from .backends import BackendUnavailable, available_backends
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
]

try:  # the loss head lands in its own modules
    from .fused import FusedPolicyLoss, fused_policy_loss
    from .loss import PolicyLossConfig, policy_loss
    from .rollout import RolloutCorrection
except ImportError:  # pragma: no cover - only while the package is being assembled
    pass
