"""The public entry points: per-token log-probs and entropy, and the fused policy loss, of a Hugging Face
causal LM's completions."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

from ...fused import fused_policy_loss
from .check import pending_check, record_check
from .forward import (
    head_inputs,
    head_logprob_entropy,
    hidden_forward,
    no_autocast,
    num_scored,
    response_hidden_and_targets,
)
from .heads import lm_head_params

Tensor = torch.Tensor


def _replay_kwargs(sampling_mask, entropy_support, top_k, top_p, min_p) -> dict[str, Any]:
    """The replay arguments that were given (none: the core op's defaults)."""
    kw = dict(sampling_mask=sampling_mask, top_k=top_k, top_p=top_p, min_p=min_p)
    kw = {k: v for k, v in kw.items() if v is not None}
    if entropy_support != "full":
        kw["entropy_support"] = entropy_support
    return kw


def hf_logprob_entropy(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    response_mask: Optional[Tensor] = None,
    logits_to_keep: Optional[int] = None,
    temperature: Union[float, Tensor] = 1.0,
    return_entropy: bool = True,
    backend: str = "auto",
    logit_scale: Optional[float] = None,
    softcap: Optional[float] = None,
    head_dtype: Optional[torch.dtype] = None,
    core_kwargs: Optional[dict[str, Any]] = None,
    check_head: bool = True,
    sampling_mask=None,
    entropy_support: str = "full",
    top_k=None,
    top_p=None,
    min_p=None,
    **model_kwargs,
) -> tuple[Tensor, Optional[Tensor]]:
    """Per-token log-probs and entropies of the last ``K`` tokens of ``input_ids`` under ``model``.

    Call under ``torch.no_grad()`` to score old / reference log-probs (forward only, nothing saved);
    with grad enabled the outputs are differentiable w.r.t. the model.

    Args:
        model: a Hugging Face causal LM (possibly wrapped by DDP / FSDP / PEFT / accelerate).
        input_ids: ``[B, L]`` prompt + response token ids. attention_mask: ``[B, L]`` or None.
        response_mask: optional ``[B, K]`` (aligned with ``input_ids[:, -K:]``); positions where it is 0
            return 0 and their ids are never looked up. ``logits_to_keep``: ``K`` (default: the mask's
            width, else ``L - 1``).
        temperature: the rollout's sampling temperature: a float, or a tensor per token (``[B, K]``, aligned with
            the scored tokens) or per sequence (``[B]``). logit_scale / softcap: override the config's.
        head_dtype: dtype of the head computation (default: the lm_head weight's).
        core_kwargs: extra keyword arguments of :func:`fusedrl.linear_logprob_entropy`.
        check_head: on the first call for a model, check fusedrl's head against the model's own logits on a few
            positions (:func:`check_lm_head`; skipped when ``logit_scale`` or ``softcap`` is given).
        sampling_mask, entropy_support, top_k, top_p, min_p: sampling replay (docs/replay.md), per scored token
            (``[B, K, ...]``, aligned like ``response_mask``), as in :func:`fusedrl.linear_logprob_entropy`.
        model_kwargs: go to the model body (``position_ids``, ``pixel_values``, ...).

    Returns:
        ``(logp, entropy)``: fp32 ``[B, K]`` (``entropy`` None if not asked).

    Raises:
        UnsupportedHeadError: the model's head is one fusedrl cannot reproduce.
    """
    k = num_scored(input_ids, response_mask, logits_to_keep)
    head = lm_head_params(model, logit_scale=logit_scale, softcap=softcap)
    check = pending_check(model, input_ids, attention_mask, model_kwargs, check_head, logit_scale, softcap)
    hidden = hidden_forward(model, input_ids, attention_mask, model_kwargs, check)
    record_check(model, check)
    h, targets = response_hidden_and_targets(hidden, input_ids, k)
    if response_mask is not None:
        targets = torch.where(response_mask != 0, targets, torch.zeros_like(targets))
    logp, ent = head_logprob_entropy(
        h,
        targets,
        head,
        temperature=temperature,
        return_entropy=return_entropy,
        backend=backend,
        head_dtype=head_dtype,
        **_replay_kwargs(sampling_mask, entropy_support, top_k, top_p, min_p),
        **(core_kwargs or {}),
    )
    if response_mask is not None:
        keep = response_mask != 0
        logp = torch.where(keep, logp, torch.zeros_like(logp))
        ent = None if ent is None else torch.where(keep, ent, torch.zeros_like(ent))
    return logp, ent


def hf_fused_policy_loss(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor],
    response_mask: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    ref_logp: Optional[Tensor] = None,
    *,
    temperature: Union[float, Tensor] = 1.0,
    config=None,
    backend: str = "auto",
    logit_scale: Optional[float] = None,
    softcap: Optional[float] = None,
    head_dtype: Optional[torch.dtype] = None,
    return_entropy: Optional[bool] = None,
    global_num_tokens=None,
    global_num_seqs=None,
    norm_len=None,
    rollout_logp: Optional[Tensor] = None,
    rollout_is_weights: Optional[Tensor] = None,
    core_kwargs: Optional[dict[str, Any]] = None,
    check_head: bool = True,
    sampling_mask=None,
    entropy_support: str = "full",
    top_k=None,
    top_p=None,
    min_p=None,
    **model_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """RL policy loss of a Hugging Face causal LM, straight from its last hidden state.

    Runs the body, shifts (hidden at ``t`` predicts ``input_ids[t+1]``), and calls
    :func:`fusedrl.fused_policy_loss` with the model's lm_head weight / bias / softcap / logit scale.

    Args:
        input_ids: ``[B, L]`` prompt + response. attention_mask: ``[B, L]`` (or None).
        response_mask: ``[B, K]`` 1 on the response tokens to train on, aligned with ``input_ids[:, -K:]``.
        old_logp, ref_logp: ``[B, K]`` behaviour-policy / reference log-probs (same alignment).
        advantages: ``[B]`` per sequence or ``[B, K]`` per token.
        temperature: the rollout's sampling temperature (float, or per token ``[B, K]`` / per sequence ``[B]``).
        config: :class:`fusedrl.PolicyLossConfig`.
        global_num_tokens / global_num_seqs / norm_len: normalisers for this step (see PolicyLossConfig).
        rollout_logp: ``[B, K]`` the inference engine's log-probs (``config.rollout_correction``, OPSM).
        rollout_is_weights: ``[B, K]`` precomputed rollout IS weights (verl's), detached.
        return_entropy: compute entropy (metric) even when ``config.entropy_coeff == 0``.
        core_kwargs: extra keyword arguments of the core op (``grad_filter_eps``, ...).
        check_head: as in :func:`hf_logprob_entropy`.
        sampling_mask, entropy_support, top_k, top_p, min_p: sampling replay, as in :func:`hf_logprob_entropy`.
        model_kwargs: go to the model body.

    Returns:
        ``(loss, metrics)`` as :func:`fusedrl.fused_policy_loss`.

    Raises:
        UnsupportedHeadError: the model's head is one fusedrl cannot reproduce.
    """

    rollout = {
        k: v for k, v in (("rollout_logp", rollout_logp), ("rollout_is_weights", rollout_is_weights)) if v is not None
    }  # passed only when given
    k = num_scored(input_ids, response_mask, None)
    head = lm_head_params(model, logit_scale=logit_scale, softcap=softcap)
    check = pending_check(model, input_ids, attention_mask, model_kwargs, check_head, logit_scale, softcap)
    hidden = hidden_forward(model, input_ids, attention_mask, model_kwargs, check)
    record_check(model, check)
    h, targets = response_hidden_and_targets(hidden, input_ids, k)
    with no_autocast(h.device):
        h, w, b = head_inputs(h, head, head_dtype)
        return fused_policy_loss(
            h,
            w,
            targets,
            old_logp,
            advantages,
            response_mask,
            ref_logp=ref_logp,
            bias=b,
            temperature=temperature,
            softcap=head.softcap,
            config=config,
            backend=backend,
            return_entropy=return_entropy,
            global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs,
            norm_len=norm_len,
            **rollout,
            **_replay_kwargs(sampling_mask, entropy_support, top_k, top_p, min_p),
            **(core_kwargs or {}),
        )
