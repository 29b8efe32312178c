"""Sampling replay: log-probs over the sampler's kept set (``sampling_mask=``, or a recomputed top-k /
top-p / min-p truncation), fused, at a cost that follows the kept set. ``masks`` (the two layouts, checked),
``truncation`` (vLLM's keep rule), ``kept`` (the kept-set log-probs and their gradients)."""

from .kept import KeptLogprob, TruncatedLogprob
from .masks import KeptSets, as_kept_sets
from .truncation import Truncation, check_truncation, keep_mask

__all__ = ["KeptSets", "as_kept_sets", "Truncation", "check_truncation", "keep_mask", "KeptLogprob",
           "TruncatedLogprob"]  # fmt: skip
