"""Sampling replay in the TRL trainer: with ``GRPOConfig`` sampling truncated (``top_p < 1``, ``top_k > 0`` or
``min_p``), vLLM returns log-probs normalised over the kept set (``logprobs_mode="processed_logprobs"``) while the
trainer normalises over the full vocabulary, so TRL's importance ratio carries the kept mass (TRL #6789: a mean
of 0.896 at ``top_p=0.8``). Here every log-prob the trainer computes, old, reference and current alike, is
normalised over the kept set (TRL #7269's semantics, with the lesson of its review: one support for all three):
the sampler's masks when the generation returns them (a ``rollout_func``'s ``"sampling_mask"``: per completion,
per token, the kept ids; the trainer scores old and reference log-probs on them and hands them to the loss as
``inputs["sampling_mask"]``, padded ``[B, T, K]``), else the kept set recomputed from ``GRPOConfig``'s ``top_k`` /
``top_p`` / ``min_p`` with vLLM's rule (docs/replay.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from ...replay.kept import ENTROPY_SUPPORTS
from .config import trainer_arg

Tensor = torch.Tensor


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
    """Whether the trainer recomputes kept sets when the batch carries no masks: ``fusedrl_sampling_replay=True``,
    or ``"auto"`` (default) with vLLM generation and truncated sampling."""
    choice = getattr(trainer, "_fusedrl_sampling_replay", "auto")
    if choice is False:
        return False
    if choice is True:
        return True
    return bool(trainer_arg(trainer, "use_vllm", False)) and bool(truncation_of(trainer))


def replay_kwargs(trainer, inputs: Optional[dict] = None) -> dict[str, Any]:
    """The replay arguments of the fused op for this trainer (and batch): the batch's ``sampling_mask`` when it
    has one (unless ``fusedrl_sampling_replay=False``), else the recomputed truncation; ``{}`` without replay."""
    if getattr(trainer, "_fusedrl_sampling_replay", "auto") is False:
        return {}
    mask = None if inputs is None else inputs.get("sampling_mask")
    if mask is not None:
        kw: dict[str, Any] = {"sampling_mask": mask}
    elif replays(trainer):
        kw = truncation_of(trainer)
    else:
        return {}
    support = getattr(trainer, "_fusedrl_entropy_support", "full")
    if support != "full":
        kw["entropy_support"] = support
    return kw


def padded_rollout_masks(masks: Sequence[Sequence[Sequence[int]]], length: int, device) -> Tensor:
    """A generation's kept sets, ``masks[b][t]`` the ids kept at completion token ``t`` of completion ``b`` (vLLM's
    ``CompletionOutput.sampling_mask.token_ids``, returned by a ``rollout_func`` under the key ``"sampling_mask"``),
    as the padded ``[B, length, K]`` int64 layout aligned with TRL's right-padded completions (``-1`` fill; padding
    positions and tokens without a set get a row of ``-1``: no replay)."""
    if not isinstance(masks, (list, tuple)):
        raise TypeError(f"sampling_mask from the rollout must be a list (per completion) of lists (per token) of ids, "
                        f"got {type(masks).__name__}")  # fmt: skip
    k = max([len(ids) for comp in masks for ids in comp] + [1])
    out = torch.full((len(masks), length, k), -1, dtype=torch.int64)
    for b, comp in enumerate(masks):
        if len(comp) > length:
            raise ValueError(f"sampling_mask from the rollout: completion {b} has {len(comp)} kept sets for "
                             f"{length} completion positions")  # fmt: skip
        for t, ids in enumerate(comp):
            if len(ids):
                out[b, t, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.int64)
    return out.to(device)
