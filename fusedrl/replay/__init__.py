"""Sampling replay: log-probs over the sampler's kept set (``sampling_mask=``, or a recomputed top-k /
top-p / min-p truncation), fused, at a cost that follows the kept set. ``masks`` (the two layouts, checked),
``truncation`` (vLLM's keep rule), ``rows`` (one chunk's row math), ``kept`` (the chunk loops and the autograd
Function of the core op)."""

from .kept import ENTROPY_SUPPORTS, Replay, ReplayLogprob, check_replay, make_replay, replay_backward, replay_forward
from .masks import KeptSets, as_kept_sets, replay_fraction
from .truncation import Truncation, check_truncation, keep_mask

__all__ = [
    "ENTROPY_SUPPORTS",
    "KeptSets",
    "Replay",
    "ReplayLogprob",
    "Truncation",
    "as_kept_sets",
    "check_replay",
    "check_truncation",
    "keep_mask",
    "make_replay",
    "replay_backward",
    "replay_forward",
    "replay_fraction",
]
