"""The policy-loss head: per-token log-probs in, scalar loss and metrics out.

Semantics follow verl's ``core_algos.py`` and ``rollout_corr_helper.py`` and TRL's
``GRPOTrainer._compute_loss``, so that the numbers match what users already compare against
(docs/policy-losses.md lists every formula and the few deliberate differences: everything stays on the
device, no host sync).

Modules, in the order they build on each other: ``config`` (:class:`PolicyLossConfig`), ``rollout``
(:class:`RolloutCorrection`), ``inputs`` (flattening, checks), ``terms`` (ratios, what a mode returns),
``selection`` (Clip-Cov / KL-Cov / entropy-quantile picks), ``modes`` (the mode registry), ``aggregate``
(KL estimators, normalisers, aggregation), ``heads`` (torch formulas or a backend's kernels), ``policy``
(:func:`policy_loss`), ``token_head`` (the head per chunk, for the one-pass schedule); ``reference`` is a
plainly written oracle of all of it, for tests. ``segments`` (SSPO's segment ratio) and ``entropy_control``
(STEER, BAPO, RL-PLUS, the EPO corridor: docs/entropy-control.md) hold the entropy-control methods.
"""

from .aggregate import kl_penalty
from .config import (
    ALL_LOSS_MODES,
    ENTROPY_CONTROL_MODES,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_LOSS_TYPES,
    LOSS_AGG_MODES,
    LOSS_MODES,
    Normaliser,
    PolicyLossConfig,
    canonical_kl_type,
)
from .policy import metric_names, policy_loss
from .rollout import RolloutCorrection
from .segments import segment_ids_from_tokens
from .token_head import HEAD_KINDS, TokenHead, head_kind

__all__ = [
    "PolicyLossConfig",
    "RolloutCorrection",
    "policy_loss",
    "LOSS_MODES",
    "ENTROPY_CONTROL_MODES",
    "ALL_LOSS_MODES",
    "LOSS_AGG_MODES",
    "KL_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "HEAD_KINDS",
    "Normaliser",
    "TokenHead",
    "canonical_kl_type",
    "kl_penalty",
    "head_kind",
    "metric_names",
    "segment_ids_from_tokens",
]
