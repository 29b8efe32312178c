"""Sampling replay in the TRL trainer: with ``GRPOConfig`` sampling truncated (``top_p < 1``, ``top_k > 0`` or
``min_p``), vLLM returns log-probs normalised over the kept set (``logprobs_mode="processed_logprobs"``) while the
trainer normalises over the full vocabulary, so TRL's importance ratio carries the kept mass (TRL #6789: a mean
of 0.896 at ``top_p=0.8``). Here every log-prob the trainer computes, old, reference and current alike, is
normalised over the kept set (TRL #7269's semantics, with the lesson of its review: one support for all three):
the sampler's masks when the batch carries them (``inputs["sampling_mask"]``, either layout of
:func:`fusedrl.linear_logprob_entropy`), else the kept set recomputed from ``GRPOConfig``'s ``top_k`` /
``top_p`` / ``min_p`` with vLLM's rule (docs/replay.md)."""

from __future__ import annotations

from typing import Any, Optional

from ...replay.kept import ENTROPY_SUPPORTS
from .config import trainer_arg


def check_replay_options(replay, entropy_support) -> None:
    if not (replay is True or replay is False or replay == "auto"):
        raise ValueError(f"fusedrl_sampling_replay must be 'auto', True or False, got {replay!r}")
    if entropy_support not in ENTROPY_SUPPORTS:
        raise ValueError(f"fusedrl_entropy_support must be one of {ENTROPY_SUPPORTS}, got {entropy_support!r}")


def truncation_of(trainer) -> dict[str, Any]:
    """``GRPOConfig``'s truncation, the parameters that are on (TRL: ``top_k=0``, ``top_p=1``, ``min_p=None``
    are off)."""
    out: dict[str, Any] = {}
    k = trainer_arg(trainer, "top_k", None)
    p = trainer_arg(trainer, "top_p", None)
    m = trainer_arg(trainer, "min_p", None)
    if k is not None and int(k) > 0:
        out["top_k"] = int(k)
    if p is not None and float(p) < 1.0:
        out["top_p"] = float(p)
    if m is not None and float(m) > 0.0:
        out["min_p"] = float(m)
    return out


def replays(trainer) -> bool:
    """Whether the trainer's log-probs are normalised over the kept set: ``fusedrl_sampling_replay=True``, or
    ``"auto"`` (default) with vLLM generation and truncated sampling."""
    choice = getattr(trainer, "_fusedrl_sampling_replay", "auto")
    if choice is False:
        return False
    if choice is True:
        return True
    return bool(trainer_arg(trainer, "use_vllm", False)) and bool(truncation_of(trainer))


def replay_kwargs(trainer, inputs: Optional[dict] = None) -> dict[str, Any]:
    """The replay arguments of the fused op for this trainer (and batch): the batch's ``sampling_mask`` when
    it has one, else the recomputed truncation; ``{}`` without replay."""
    if not replays(trainer):
        return {}
    support = getattr(trainer, "_fusedrl_entropy_support", "full")
    mask = None if inputs is None else inputs.get("sampling_mask")
    kw: dict[str, Any] = {"sampling_mask": mask} if mask is not None else truncation_of(trainer)
    if support != "full":
        kw["entropy_support"] = support
    return kw
