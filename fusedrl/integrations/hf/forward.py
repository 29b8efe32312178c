"""The model's body without its head, through any wrapper: a hook-in on the inner model's ``forward``
returns the last hidden state; then the fused head on the response positions."""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext
from typing import Callable, Optional, Union

import torch
from torch import nn

from ...ops import linear_logprob_entropy
from .heads import LMHead, pre_head, unwrap_model

Tensor = torch.Tensor


_PATCH_FLAG = "_fusedrl_hidden_forward"
_HIDDEN_KWARG = "fusedrl_hidden_only"
_CHECK_KWARG = "fusedrl_check_head"


def _body(inner: nn.Module) -> nn.Module:
    # base_model, else get_decoder(), else .model: some classes return themselves from the first two (Llama-4's
    # causal LM declares base_model_prefix "language_model" but keeps its body in .model)
    get_decoder = getattr(inner, "get_decoder", None)
    finders = (
        lambda: getattr(inner, "base_model", None),
        lambda: get_decoder() if callable(get_decoder) else None,
        lambda: getattr(inner, "model", None),
    )
    for find in finders:
        body = find()
        if isinstance(body, nn.Module) and body is not inner:
            return body
    raise ValueError(f"cannot find the body (base model) of {type(inner).__name__}")


_HEAD_ONLY_KWARGS = (
    "labels",
    "shift_labels",
    "num_items_in_batch",
    "logits_to_keep",
    "num_logits_to_keep",
    "return_dict",
    "fused_lm_head",
)


def run_body(inner: nn.Module, *args, **kwargs):
    # wrappers (PEFT, ...) forward head-only arguments (labels=None, ...): the body takes none of them
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in _HEAD_ONLY_KWARGS}
    kwargs["use_cache"] = False
    out = _body(inner)(*args, **kwargs)
    pre = pre_head(inner)
    # models with head layers before the projection: run them here, inside the wrapper's forward
    return out if pre is None else pre(hidden_of(out))


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
        check = kwargs.pop(_CHECK_KWARG, None)
        if kwargs.pop(_HIDDEN_KWARG, False):
            if check is not None:  # the head check, inside the wrapper's call (see _HeadCheck)
                check(self, prev_fn)
            return run_body(self, *args, **kwargs)
        return prev_fn(self, *args, **kwargs)

    inner.forward = types.MethodType(forward, inner)
    setattr(inner, _PATCH_FLAG, True)


def hidden_of(out) -> Tensor:
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = out[0] if isinstance(out, (tuple, list)) else out
    return h


def last_hidden_state(
    model: nn.Module, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, **model_kwargs
) -> Tensor:
    """Run the model's body (no lm_head, no logits) and return the last hidden state ``[B, L, H]``
    (after the final norm): the input of the vocabulary projection. For models with head layers before the
    projection (ModernBertDecoder's prediction head, Electra's generator predictions, CLVP's final norm) those
    layers have run too. Extra keyword arguments go to the body (``position_ids``, ``pixel_values``, ...).

    The call goes through ``model.__call__`` (and any wrapper: DDP, FSDP1/2 hooks, DeepSpeed, PEFT),
    with a small hook-in installed on the inner model's ``forward`` on first use."""
    return hidden_forward(model, input_ids, attention_mask, model_kwargs)


def hidden_forward(model, input_ids, attention_mask, model_kwargs: dict, check: Optional[Callable] = None):
    kwargs = dict(model_kwargs)
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    _install_hidden_forward(unwrap_model(model))
    kwargs[_HIDDEN_KWARG] = True
    if check is not None:
        kwargs[_CHECK_KWARG] = check
    return hidden_of(model(**kwargs))


def num_scored(input_ids: Tensor, mask: Optional[Tensor], logits_to_keep: Optional[int]) -> int:
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


def head_inputs(h: Tensor, head: LMHead, head_dtype: Optional[torch.dtype]):
    dt = head_dtype or head.weight.dtype
    w = head.weight if head.weight.dtype == dt else head.weight.to(dt)
    b = head.bias
    if h.dtype != dt:
        h = h.to(dt)
    if head.logit_scale != 1.0:  # (h W^T + b) * s == (s h) W^T + s b
        h = h * head.logit_scale
        b = None if b is None else b * head.logit_scale
    if head.row_scale is not None:  # column v of the logits times r[v] == row v of W (and b[v]) times r[v]
        r = head.row_scale.to(dt)
        w = w * r[:, None]
        b = None if b is None else b * r
    return h, w, b


def no_autocast(device: torch.device):
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

    with no_autocast(hidden.device):
        h, w, b = head_inputs(hidden, head, head_dtype)
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
