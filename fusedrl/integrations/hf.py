"""Hugging Face ``transformers`` causal LMs: fused RL losses and scoring without the logits.

The model's body (``model.base_model``: embeddings, decoder layers, final norm) runs as usual; its
last hidden state goes with ``lm_head.weight`` (tied or untied), the head's bias, the model's logit
scale and final-logit softcap (Gemma-2) and the rollout temperature into :mod:`fusedrl`, so the
``[batch, seq, vocab]`` logits are never made.

Alignment (the convention of TRL and verl): the scored tokens are the last ``K`` tokens of
``input_ids`` (the completion / response), and every per-token tensor (``response_mask``,
``old_logp``, ``ref_logp``, per-token ``advantages``, the returned ``logp`` / ``entropy``) is
``[B, K]`` and aligned with ``input_ids[:, -K:]``. The hidden state at position ``t`` predicts
``input_ids[:, t + 1]``, so the head sees ``hidden[:, L-K-1 : L-1]``. ``K`` defaults to
``response_mask.shape[1]`` (or ``L - 1``: every next token, when scoring without a mask).

The model is always called through ``model(...)`` (and through any wrapper: DDP, FSDP1/FSDP2,
DeepSpeed, accelerate, PEFT), so gradient synchronisation and parameter gathering keep working: the
first call installs a small hook-in on the inner Hugging Face model's ``forward``
(``model(..., fusedrl_hidden_only=True)`` returns the body's output; every other call is the
original forward, so ``generate`` and ordinary logits are unchanged).

Only ``torch`` is imported here; ``transformers`` itself is never imported (duck typing).
"""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = [
    "LMHead",
    "unwrap_model",
    "get_lm_head",
    "lm_head_params",
    "last_hidden_state",
    "response_hidden_and_targets",
    "head_logprob_entropy",
    "hf_logprob_entropy",
    "hf_fused_policy_loss",
]

_PATCH_FLAG = "_fusedrl_hidden_forward"
_HIDDEN_KWARG = "fusedrl_hidden_only"


# --------------------------------------------------------------------------------------------------
# model plumbing
# --------------------------------------------------------------------------------------------------
def unwrap_model(model: nn.Module) -> nn.Module:
    """The inner Hugging Face model: strips DDP / FSDP1 / DeepSpeed (``.module``), ``torch.compile``
    (``._orig_mod``) and PEFT (``get_base_model()``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            base = model.get_base_model()
            if base is model:
                break
            model = base
        else:
            break
    return model


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        try:
            return get()
        except Exception:  # pragma: no cover - exotic configs
            return cfg
    return cfg


def get_lm_head(model: nn.Module) -> nn.Module:
    """The output projection (``model.get_output_embeddings()``, else ``model.lm_head``)."""
    inner = unwrap_model(model)
    head = None
    get = getattr(inner, "get_output_embeddings", None)
    if callable(get):
        head = get()
    if head is None:
        head = getattr(inner, "lm_head", None)
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(inner).__name__} has no lm_head / output embeddings with a weight")
    return head


def _logit_scale_from_config(cfg) -> float:
    """Multiplier the model applies to its logits before the softcap (1.0 for most models).

    Cohere (``logit_scale``), Falcon-H1 (``lm_head_multiplier``), Granite (divides by ``logits_scaling``).
    """
    if cfg is None:
        return 1.0
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        v = getattr(cfg, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    v = getattr(cfg, "logits_scaling", None)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and v:
        return float(v) if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / float(v)
    return 1.0


@dataclass
class LMHead:
    """What the fused head needs from a model: ``z = softcap(scale * (h @ weight.T + bias)) / T``."""

    weight: Tensor
    bias: Optional[Tensor]
    softcap: Optional[float]
    logit_scale: float
    vocab_size: int


def lm_head_params(model: nn.Module, logit_scale: Optional[float] = None, softcap: Optional[float] = None) -> LMHead:
    """lm_head weight (tied or untied) and bias, the final-logit softcap (``config.final_logit_softcapping``,
    Gemma-2) and the logit scale of ``model``. ``logit_scale`` / ``softcap`` override the config.

    A DTensor weight (FSDP2) is gathered with ``full_tensor()`` (differentiable)."""
    inner = unwrap_model(model)
    head = get_lm_head(inner)
    weight, bias = head.weight, getattr(head, "bias", None)
    if not isinstance(bias, torch.Tensor):
        bias = None
    if type(weight).__name__ == "DTensor":  # FSDP2 shards; gather once (differentiable)
        weight = weight.full_tensor()
        if bias is not None and type(bias).__name__ == "DTensor":
            bias = bias.full_tensor()
    cfg = _text_config(inner)
    if softcap is None and cfg is not None:
        sc = getattr(cfg, "final_logit_softcapping", None)
        softcap = float(sc) if sc else None
    if logit_scale is None:
        logit_scale = _logit_scale_from_config(cfg)
    return LMHead(weight, bias, softcap, float(logit_scale), weight.shape[0])


def _body(inner: nn.Module) -> nn.Module:
    body = getattr(inner, "base_model", None)
    if not isinstance(body, nn.Module) or body is inner:
        get = getattr(inner, "get_decoder", None)
        body = get() if callable(get) else getattr(inner, "model", None)
    if not isinstance(body, nn.Module) or body is inner:
        raise ValueError(f"cannot find the body (base model) of {type(inner).__name__}")
    return body


_HEAD_ONLY_KWARGS = (
    "labels",
    "shift_labels",
    "num_items_in_batch",
    "logits_to_keep",
    "num_logits_to_keep",
    "return_dict",
    "fused_lm_head",
)


def _run_body(inner: nn.Module, *args, **kwargs):
    # wrappers (PEFT, ...) forward head-only arguments (labels=None, ...): the body takes none of them
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in _HEAD_ONLY_KWARGS}
    kwargs["use_cache"] = False
    return _body(inner)(*args, **kwargs)


def _install_hidden_forward(inner: nn.Module) -> None:
    """Let ``wrapper(..., fusedrl_hidden_only=True)`` return the body's output through any wrapper."""
    if getattr(inner, _PATCH_FLAG, False):
        return
    # The previous forward may itself be an instance-level patch (e.g. TRL's fused LM head). Keep it
    # unbound and call it with `self`, so a deepcopy of the model (whose bound methods are rebound to
    # the copy) still runs its own forward, not the original instance's.
    prev = inner.__dict__.get("forward")
    if prev is None:
        prev_fn = type(inner).forward
    elif isinstance(prev, types.MethodType) and prev.__self__ is inner:
        prev_fn = prev.__func__
    else:  # a plain callable stored on the instance: call it as it is
        prev_fn = lambda self, *a, **k: prev(*a, **k)  # noqa: E731

    @functools.wraps(type(inner).forward)  # keep the signature: `generate` validates kwargs against it
    def forward(self, *args, **kwargs):
        if kwargs.pop(_HIDDEN_KWARG, False):
            return _run_body(self, *args, **kwargs)
        return prev_fn(self, *args, **kwargs)

    inner.forward = types.MethodType(forward, inner)
    setattr(inner, _PATCH_FLAG, True)


def _hidden_of(out) -> Tensor:
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out[0] if isinstance(out, (tuple, list)) else out
    return h


def last_hidden_state(
    model: nn.Module, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, **model_kwargs
) -> Tensor:
    """Run the model's body (no lm_head, no logits) and return the last hidden state ``[B, L, H]``
    (after the final norm). Extra keyword arguments go to the body (``position_ids``,
    ``pixel_values``, ...).

    The call goes through ``model.__call__`` (and any wrapper: DDP, FSDP1/2 hooks, DeepSpeed, PEFT),
    with a small hook-in installed on the inner model's ``forward`` on first use."""
    inner = unwrap_model(model)
    if input_ids is not None:
        model_kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    _install_hidden_forward(inner)
    model_kwargs[_HIDDEN_KWARG] = True
    return _hidden_of(model(**model_kwargs))


def _num_scored(input_ids: Tensor, mask: Optional[Tensor], logits_to_keep: Optional[int]) -> int:
    L = input_ids.shape[1]
    if logits_to_keep is None:
        logits_to_keep = mask.shape[1] if mask is not None else L - 1
    k = int(logits_to_keep)
    if not 1 <= k <= L - 1:
        raise ValueError(
            f"can score 1..L-1={L - 1} trailing tokens of input_ids [B, L={L}], got {k} (the first token has no "
            f"prediction: a mask aligned with all of input_ids must drop its first column)"
        )
    if mask is not None and tuple(mask.shape) != (input_ids.shape[0], k):
        raise ValueError(
            f"response_mask must be [B, K]=({input_ids.shape[0]}, {k}) aligned with input_ids[:, -K:], "
            f"got {tuple(mask.shape)}"
        )
    return k


def response_hidden_and_targets(hidden: Tensor, input_ids: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """Shift: the hidden states that predict the last ``num_tokens`` tokens, and those tokens.

    ``hidden[:, L-K-1 : L-1]`` ([B, K, H]) and ``input_ids[:, L-K:]`` ([B, K])."""
    L = input_ids.shape[1]
    k = int(num_tokens)
    return hidden[:, L - k - 1 : L - 1], input_ids[:, L - k :]


def _head_inputs(h: Tensor, head: LMHead, head_dtype: Optional[torch.dtype]):
    dt = head_dtype or head.weight.dtype
    w = head.weight if head.weight.dtype == dt else head.weight.to(dt)
    b = head.bias
    if h.dtype != dt:
        h = h.to(dt)
    if head.logit_scale != 1.0:  # (h W^T + b) * s == (s h) W^T + s b
        h = h * head.logit_scale
        b = None if b is None else b * head.logit_scale
    return h, w, b


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except Exception:  # pragma: no cover - device types without autocast
        return nullcontext()


def head_logprob_entropy(
    hidden: Tensor,
    targets: Tensor,
    head: LMHead,
    *,
    temperature: Union[float, Tensor] = 1.0,
    return_entropy: bool = True,
    backend: str = "auto",
    head_dtype: Optional[torch.dtype] = None,
    **core_kwargs,
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`fusedrl.linear_logprob_entropy` with a model's :class:`LMHead` (scale, bias, softcap).
    Runs outside autocast, in ``head_dtype`` (default: the weight's dtype)."""
    from ..ops import linear_logprob_entropy

    with _no_autocast(hidden.device):
        h, w, b = _head_inputs(hidden, head, head_dtype)
        return linear_logprob_entropy(
            h,
            w,
            targets,
            bias=b,
            temperature=temperature,
            softcap=head.softcap,
            return_entropy=return_entropy,
            backend=backend,
            **core_kwargs,
        )


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
        model_kwargs: go to the model body (``position_ids``, ``pixel_values``, ...).

    Returns:
        ``(logp, entropy)``: fp32 ``[B, K]`` (``entropy`` None if not asked).
    """
    k = _num_scored(input_ids, response_mask, logits_to_keep)
    head = lm_head_params(model, logit_scale=logit_scale, softcap=softcap)
    hidden = last_hidden_state(model, input_ids, attention_mask, **model_kwargs)
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
        model_kwargs: go to the model body.

    Returns:
        ``(loss, metrics)`` as :func:`fusedrl.fused_policy_loss`.
    """
    from ..fused import fused_policy_loss

    rollout = {
        k: v for k, v in (("rollout_logp", rollout_logp), ("rollout_is_weights", rollout_is_weights)) if v is not None
    }  # passed only when given
    k = _num_scored(input_ids, response_mask, None)
    head = lm_head_params(model, logit_scale=logit_scale, softcap=softcap)
    hidden = last_hidden_state(model, input_ids, attention_mask, **model_kwargs)
    h, targets = response_hidden_and_targets(hidden, input_ids, k)
    with _no_autocast(h.device):
        h, w, b = _head_inputs(h, head, head_dtype)
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
            **(core_kwargs or {}),
        )
