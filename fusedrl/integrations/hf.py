"""Hugging Face ``transformers`` causal LMs: fused RL losses and scoring without the logits.

The model's body (``model.base_model``: embeddings, decoder layers, final norm) runs as usual; its
last hidden state goes with ``lm_head.weight`` (tied or untied), the head's bias, the model's logit
scale, final-logit softcap, padded-vocabulary slice and per-vocabulary scale (:func:`lm_head_params`) and
the rollout temperature into :mod:`fusedrl`, so the ``[batch, seq, vocab]`` logits are never made.

The head is the model's own: on the first call for a model, :func:`hf_logprob_entropy` and
:func:`hf_fused_policy_loss` compare it with the model's own logits on a few positions
(:func:`check_lm_head`). A model whose head fusedrl does not reproduce raises :class:`UnsupportedHeadError`
rather than train on wrong log-probs.

Alignment (the convention of TRL and verl): the scored tokens are the last ``K`` tokens of
``input_ids`` (the completion / response), and every per-token tensor (``response_mask``,
``old_logp``, ``ref_logp``, per-token ``advantages``, the returned ``logp`` / ``entropy``) is
``[B, K]`` and aligned with ``input_ids[:, -K:]``. The hidden state at position ``t`` predicts
``input_ids[:, t + 1]``, so the head sees ``hidden[:, L-K-1 : L-1]``. ``K`` defaults to
``response_mask.shape[1]`` (or ``L - 1``: every next token, when scoring without a mask).

The model is always called through ``model(...)`` (and through any wrapper: DDP, FSDP1/FSDP2,
DeepSpeed, accelerate, PEFT), so gradient synchronisation and parameter gathering keep working: the
first call installs a small hook-in on the inner Hugging Face model's ``forward``
(``model(..., fusedrl_hidden_only=True)`` returns the body's output, the head check runs inside that
call; every other call is the original forward, so ``generate`` and ordinary logits are unchanged).

Only ``torch`` is imported here; ``transformers`` itself is never imported (duck typing).
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import types
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = [
    "LMHead",
    "UnsupportedHeadError",
    "check_lm_head",
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
_CHECK_KWARG = "fusedrl_check_head"


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


class UnsupportedHeadError(ValueError):
    """The model computes its logits in a way fusedrl's head does not reproduce.

    fusedrl's head is ``softcap(logit_scale * (h @ W.T + b) * row_scale) / T``, after any extra head layers it
    knows (see :func:`lm_head_params`). Models that do something else raise this error rather than return
    wrong log-probs."""


# Models with layers between the body's last hidden state and the vocabulary projection: name of the model class
# -> (the module applied to the hidden state first, the projection). They are the model's own modules, so running
# them in the hidden-only forward reproduces the model's head exactly.
_PRE_HEAD_LAYERS = {
    "ModernBertDecoderForCausalLM": ("lm_head", "decoder"),  # prediction head (dense, act, norm), then decoder
    "ElectraForCausalLM": ("generator_predictions", "generator_lm_head"),  # dense, act, norm
    "ClvpForCausalLM": ("final_norm", "lm_head"),  # the model's LayerNorm runs inside its head
}
# Models whose head cannot be expressed as fusedrl's head: name of the model class -> what is unsupported.
_UNSUPPORTED_HEADS = {
    "ChameleonForConditionalGeneration": "masks the image-token columns of its logits to finfo.min",
    "Gemma4AssistantForCausalLM": "is a drafter whose head projects through masked embeddings",
    "Gemma4UnifiedAssistantForCausalLM": "is a drafter whose head projects through masked embeddings",
    "ProphetNetForCausalLM": "predicts n-gram streams",
}
# Output layers with their own forward that still compute exactly h @ W.T (only in a higher precision).
_PLAIN_HEAD_CLASSES = ("ErgoLinearWithFP32Output",)  # Ergo: fp32 accumulation and output, autocast off
# Config fields that a model type carries but never applies to its logits.
_UNUSED_HEAD_FIELDS = {"mpt": ("logit_scale",)}
# Final-logit softcap, by config field: Gemma-2 family and most others / RecurrentGemma / xLSTM.
_SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def _class_entry(inner: nn.Module, table: dict):
    for cls in type(inner).__mro__:
        if cls.__name__ in table:
            return cls.__name__, table[cls.__name__]
    return None, None


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _number(cfg, name: str) -> Optional[float]:
    if cfg is None or name in _UNUSED_HEAD_FIELDS.get(getattr(cfg, "model_type", "") or "", ()):
        return None
    try:
        v = getattr(cfg, name, None)
    except Exception:  # some configs compute attributes and fail on partial configs
        return None
    return float(v) if _is_real(v) else None


def _check_supported(inner: nn.Module) -> None:
    name, why = _class_entry(inner, _UNSUPPORTED_HEADS)
    if name is not None:
        raise UnsupportedHeadError(
            f"{type(inner).__name__}: fusedrl cannot compute this model's log-probs from its hidden states: "
            f"{name} {why}"
        )


def _pre_head(inner: nn.Module) -> Optional[nn.Module]:
    """The model's own layers between its body and the vocabulary projection (None for most models)."""
    _, names = _class_entry(inner, _PRE_HEAD_LAYERS)
    if names is None:
        return None
    pre = getattr(inner, names[0], None)
    if not isinstance(pre, nn.Module):
        raise UnsupportedHeadError(f"{type(inner).__name__}: expected its head layers in .{names[0]}, found none")
    return pre


def get_lm_head(model: nn.Module) -> nn.Module:
    """The output projection (``model.get_output_embeddings()``, else ``model.lm_head``).

    For models with extra head layers (ModernBertDecoder, Electra, CLVP) this is the final vocabulary projection;
    the layers before it run with the body (:func:`last_hidden_state`)."""
    inner = unwrap_model(model)
    _check_supported(inner)
    head = None
    _, names = _class_entry(inner, _PRE_HEAD_LAYERS)
    if names is not None:
        head = getattr(inner, names[1], None)
    get = getattr(inner, "get_output_embeddings", None)
    if head is None and callable(get):
        head = get()
    if head is None:
        head = getattr(inner, "lm_head", None)
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(inner).__name__} has no lm_head / output embeddings with a weight")
    return head


def _full(t: Tensor) -> Tensor:
    # FSDP2 / tensor-parallel shards: gather once (differentiable)
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def _row_scale(inner: nn.Module, head: nn.Module) -> Optional[Tensor]:
    """A per-vocabulary multiplier the output layer applies to its logits, or None for a plain projection.

    Refuses output layers with their own ``forward`` that are not a known per-row scale (a PEFT adapter on the
    output layer, a quantised layer, a custom head): reading only their ``weight`` would give wrong logits."""
    fwd = getattr(type(head), "forward", None)
    if fwd is nn.Linear.forward or fwd is nn.Embedding.forward or type(head).__name__ in _PLAIN_HEAD_CLASSES:
        return None
    # Dory's DoryLMHead: an nn.Linear whose forward multiplies logit column v by logit_scale[v] * logit_scale_factor,
    # i.e. a scale of weight row v (exact: no bias).
    scale, factor = getattr(head, "logit_scale", None), getattr(head, "logit_scale_factor", None)
    rows = head.weight.shape[0]
    if (
        isinstance(head, nn.Linear)
        and getattr(head, "bias", None) is None
        and isinstance(scale, torch.Tensor)
        and tuple(scale.shape) == (rows,)
        and _is_real(factor)
    ):
        return _full(scale).float() * float(factor)
    raise UnsupportedHeadError(
        f"{type(inner).__name__}: its output layer is a {type(head).__module__}.{type(head).__name__}, which computes "
        f"the logits with its own forward; fusedrl reads only the weight and bias of a plain nn.Linear output layer "
        f"(leave the output layer out of PEFT's target_modules / modules_to_save, and do not quantise it)"
    )


def _logit_scale_from_config(cfg) -> float:
    """Multiplier the model applies to its logits before the softcap (1.0 for most models).

    Cohere (``logit_scale``), MuseSpark (``output_multiplier``), Falcon-H1 (``lm_head_multiplier``), Granite
    (divides by ``logits_scaling``; HyperCLOVAX multiplies), Inkling (divides the hidden state by
    ``logits_mup_width_multiplier``, the same as dividing the logits since its lm_head has no bias).
    """
    if cfg is None:
        return 1.0
    scale = 1.0
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        v = _number(cfg, name)
        if v is not None:
            scale = v
            break
    else:
        v = _number(cfg, "logits_scaling")
        if v:
            scale = v if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / v
    m = _number(cfg, "logits_mup_width_multiplier")
    if m:
        scale /= m
    return scale


def _softcap_from_config(cfg) -> Optional[float]:
    for name in _SOFTCAP_FIELDS:
        v = _number(cfg, name)
        if v:
            return v
    return None


@dataclass
class LMHead:
    """What the fused head needs from a model: ``z = softcap(scale * (h @ weight.T + bias) * row_scale) / T``.

    ``row_scale`` (``[vocab_size]`` or None) is a learned per-vocabulary multiplier (Dory), folded into the rows
    of ``weight``. ``weight`` / ``bias`` hold only the ``vocab_size`` columns the model's logits keep (Inkling
    slices its padded vocabulary to ``config.unpadded_vocab_size``)."""

    weight: Tensor
    bias: Optional[Tensor]
    softcap: Optional[float]
    logit_scale: float
    vocab_size: int
    row_scale: Optional[Tensor] = None


def lm_head_params(model: nn.Module, logit_scale: Optional[float] = None, softcap: Optional[float] = None) -> LMHead:
    """The model's output head as fusedrl computes it: lm_head weight (tied or untied) and bias, the logit scale,
    the final-logit softcap and a per-vocabulary scale, read from the model and its (text) config.

    Read from the config: ``logit_scale`` (Cohere), ``output_multiplier`` (MuseSpark), ``lm_head_multiplier``
    (Falcon-H1), ``logits_scaling`` (Granite, MiniCPM3, HyperCLOVAX), ``logits_mup_width_multiplier`` and
    ``unpadded_vocab_size`` (Inkling), and the softcap ``final_logit_softcapping`` (Gemma-2 and others),
    ``logits_soft_cap`` (RecurrentGemma) or ``output_logit_soft_cap`` (xLSTM). ``logit_scale`` / ``softcap``
    override the config. A DTensor weight (FSDP2) is gathered with ``full_tensor()`` (differentiable).

    Raises:
        UnsupportedHeadError: the model's head is one fusedrl cannot reproduce (Chameleon's image-token mask, a
            PEFT adapter or quantised layer as output layer, ...).
    """
    if logit_scale is not None and not (_is_real(logit_scale) and math.isfinite(logit_scale)):
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale!r}")
    if softcap is not None and not (_is_real(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive number, got {softcap!r}")
    inner = unwrap_model(model)
    head = get_lm_head(inner)
    weight, bias = _full(head.weight), getattr(head, "bias", None)
    bias = _full(bias) if isinstance(bias, torch.Tensor) else None
    row_scale = _row_scale(inner, head)
    cfg = _text_config(inner)
    if softcap is None:
        softcap = _softcap_from_config(cfg)
    if logit_scale is None:
        logit_scale = _logit_scale_from_config(cfg)
    keep = _number(cfg, "unpadded_vocab_size")
    if keep is not None and 0 < keep < weight.shape[0]:  # Inkling: logits[..., :unpadded_vocab_size]
        keep = int(keep)
        weight = weight[:keep]
        bias = None if bias is None else bias[:keep]
        row_scale = None if row_scale is None else row_scale[:keep]
    return LMHead(weight, bias, softcap, float(logit_scale), weight.shape[0], row_scale)


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


def _run_body(inner: nn.Module, *args, **kwargs):
    # wrappers (PEFT, ...) forward head-only arguments (labels=None, ...): the body takes none of them
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in _HEAD_ONLY_KWARGS}
    kwargs["use_cache"] = False
    out = _body(inner)(*args, **kwargs)
    pre = _pre_head(inner)
    # models with head layers before the projection: run them here, inside the wrapper's forward
    return out if pre is None else pre(_hidden_of(out))


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
    (after the final norm): the input of the vocabulary projection. For models with head layers before the
    projection (ModernBertDecoder's prediction head, Electra's generator predictions, CLVP's final norm) those
    layers have run too. Extra keyword arguments go to the body (``position_ids``, ``pixel_values``, ...).

    The call goes through ``model.__call__`` (and any wrapper: DDP, FSDP1/2 hooks, DeepSpeed, PEFT),
    with a small hook-in installed on the inner model's ``forward`` on first use."""
    return _hidden_forward(model, input_ids, attention_mask, model_kwargs)


def _hidden_forward(model, input_ids, attention_mask, model_kwargs: dict, check: Optional[_HeadCheck] = None):
    kwargs = dict(model_kwargs)
    if input_ids is not None:
        kwargs["input_ids"] = input_ids
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    _install_hidden_forward(unwrap_model(model))
    kwargs[_HIDDEN_KWARG] = True
    if check is not None:
        kwargs[_CHECK_KWARG] = check
    return _hidden_of(model(**kwargs))


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
    if head.row_scale is not None:  # column v of the logits times r[v] == row v of W (and b[v]) times r[v]
        r = head.row_scale.to(dt)
        w = w * r[:, None]
        b = None if b is None else b * r
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


# Models whose config-derived head matched their own logits (-> the largest difference seen). Weak keys: a model
# that is freed drops out; a copy of a model (e.g. a reference model) is checked on its own.
_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Model inputs sliced by row along with input_ids; any other tensor input makes the check use the whole batch.
_PER_ROW_KWARGS = ("position_ids", "token_type_ids")


def _describe(head: LMHead) -> str:
    z = "h @ W.T" + (" + b" if head.bias is not None else "")
    if head.logit_scale != 1.0:
        z = f"{head.logit_scale:.6g} * ({z})"
    if head.row_scale is not None:
        z = f"({z}) * row_scale"
    if head.softcap is not None:
        z = f"softcap({z}, {head.softcap:g})"
    return f"logits = {z}, W {tuple(head.weight.shape)}"


def _eps(dtypes, device: torch.device) -> float:
    """Relative precision of the least precise arithmetic the model's logits or fusedrl's head went through."""
    eps = max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)
    try:
        if torch.is_autocast_enabled(device.type):
            eps = max(eps, torch.finfo(torch.get_autocast_dtype(device.type)).eps)
    except (AttributeError, TypeError, RuntimeError):  # older torch: autocast queries without a device type
        pass
    if device.type == "cuda" and torch.float32 in dtypes:
        if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
            eps = max(eps, 2.0**-10)  # TF32 matmuls keep 10 mantissa bits
    return eps


def _entropy_of(lsm: Tensor) -> Tensor:
    p = lsm.exp()
    return -(p * lsm.masked_fill(p == 0, 0.0)).sum(-1)  # columns masked to -inf contribute 0, not nan


def _nesting(inner: nn.Module) -> str:
    """A hint when the projection sits inside a head module with layers of its own (BERT / RoBERTa-style heads)."""
    head = get_lm_head(inner)
    for name, mod in inner.named_modules():
        if mod is head and "." in name:
            parent = inner.get_submodule(name.rsplit(".", 1)[0])
            return f" Its output projection is .{name}, inside a {type(parent).__name__} with layers of its own."
    return ""


def _shape_of(x) -> str:
    return f"a tensor of shape {tuple(x.shape)} ({x.dtype})" if isinstance(x, torch.Tensor) else type(x).__name__


class _HeadCheck:
    """The head check on a few rows. It runs inside the inner model's forward (the hidden-only forward, called
    through the wrapper), where a wrapper such as FSDP has the parameters gathered, and the wrapper sees one call."""

    def __init__(self, input_ids: Tensor, attention_mask: Optional[Tensor], model_kwargs: dict, num_positions: int):
        self.ids, self.am, self.kw = input_ids, attention_mask, model_kwargs
        self.n = min(num_positions, input_ids.shape[1] - 1)
        self.diff: Optional[float] = None

    def __call__(self, inner: nn.Module, own_forward) -> None:
        n, ids = self.n, self.ids
        params = inspect.signature(type(inner).forward).parameters
        extra: dict[str, Any] = {}
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in params:
                extra[name] = n + 1  # positions L-n-1 .. L-1; the last one predicts past the input
                break
        if "use_cache" in params:
            extra["use_cache"] = False
        modes = [(m, m.training) for m in inner.modules()]
        try:
            inner.eval()  # dropout or router noise would make the two forwards differ
            with torch.no_grad():
                try:
                    out = own_forward(inner, input_ids=ids, attention_mask=self.am, **self.kw, **extra)
                except Exception as e:
                    raise RuntimeError(
                        f"{type(inner).__name__}: checking fusedrl's head needs the model's own logits, and its "
                        f"forward failed ({type(e).__name__}: {e}); pass check_head=False to skip the check"
                    ) from e
                logits = getattr(out, "logits", None)
                if logits is None:
                    logits = out[0]
                hidden = _hidden_of(_run_body(inner, input_ids=ids, attention_mask=self.am, **self.kw))
                self.diff = self._compare(inner, logits, hidden)
        finally:
            for m, training in modes:
                m.training = training

    def _compare(self, inner: nn.Module, logits: Tensor, hidden: Tensor) -> float:
        n, ids, cls = self.n, self.ids, type(inner).__name__
        head = lm_head_params(inner)
        if logits.dim() != 3 or logits.shape[0] != ids.shape[0] or logits.shape[1] < n + 1:
            raise UnsupportedHeadError(
                f"{cls}: its forward returned logits of shape {tuple(logits.shape)} for input_ids of shape "
                f"{tuple(ids.shape)}; fusedrl expects one row of logits per input position"
            )
        z = logits[:, -(n + 1) : -1]
        if z.shape[-1] != head.vocab_size:
            raise UnsupportedHeadError(
                f"{cls}: its logits have {z.shape[-1]} vocabulary columns, fusedrl's head has {head.vocab_size} "
                f"({_describe(head)})"
            )
        h = hidden[:, -(n + 1) : -1]
        if h.shape[-1] != head.weight.shape[-1]:
            raise UnsupportedHeadError(
                f"{cls}: its output projection takes {head.weight.shape[-1]} features but its body returns "
                f"{h.shape[-1]}: the model has head layers fusedrl does not run.{_nesting(inner)}"
            )
        lsm = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32).log_softmax(-1)
        top = lsm.argmax(-1)
        nxt = ids[:, ids.shape[1] - n :]
        nxt = torch.where((nxt >= 0) & (nxt < head.vocab_size), nxt, top)
        targets = torch.cat([nxt, top])  # the next tokens and the most likely ones
        ref_lp = lsm.repeat(2, 1, 1).gather(-1, targets[..., None]).squeeze(-1)
        ref_ent = _entropy_of(lsm).repeat(2, 1)
        lp, ent = head_logprob_entropy(torch.cat([h, h]), targets, head, backend="torch")
        ok = torch.isfinite(ref_lp) & torch.isfinite(ref_ent)
        if not bool(ok.any()):
            return float("nan")
        diff = torch.maximum((lp - ref_lp).abs(), (ent - ref_ent).abs())[ok].max()
        diff = float(diff) if bool(torch.isfinite(diff)) else float("inf")
        # the rounding of a logit is relative to its size: the columns that carry probability, and the targets
        live = torch.isfinite(z) & (lsm > -100)
        mag = 1.0 + max(float(z.abs().masked_fill(~live, 0).max()), float(ref_lp[ok].abs().max()))
        tol = (4 * _eps({logits.dtype, hidden.dtype, head.weight.dtype}, logits.device) + 1e-5) * mag
        if not diff <= tol:
            raise UnsupportedHeadError(
                f"{cls}: fusedrl's head does not reproduce this model's logits: log-probs / entropies differ by up "
                f"to {diff:.3g} (tolerance {tol:.3g}). fusedrl computes {_describe(head)}; the model's forward does "
                f"something else (a scale, softcap, mask or layer that fusedrl does not read from it)."
                f"{_nesting(inner)} If you know the head, pass logit_scale= / softcap=; check_head=False skips "
                f"this check."
            )
        return diff


def _head_check(
    input_ids: Tensor, attention_mask: Optional[Tensor], model_kwargs: dict, num_positions: int, max_rows: int
) -> _HeadCheck:
    """A check on the first ``max_rows`` rows (all rows when a model input cannot be sliced with them)."""
    B = input_ids.shape[0]
    per_row = all(
        not isinstance(v, torch.Tensor) or (k in _PER_ROW_KWARGS and v.shape[:1] == (B,))
        for k, v in model_kwargs.items()
    )
    r = min(B, max_rows) if per_row else B
    kw = {k: (v[:r] if isinstance(v, torch.Tensor) else v) for k, v in model_kwargs.items()} if r < B else model_kwargs
    am = None if attention_mask is None else attention_mask[:r]
    return _HeadCheck(input_ids[:r], am, kw, num_positions)


def check_lm_head(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    *,
    num_positions: int = 4,
    max_rows: int = 2,
    **model_kwargs,
) -> float:
    """Check fusedrl's head for ``model`` (:func:`lm_head_params`) against the model's own logits.

    Runs the model's own forward (in eval mode, under ``no_grad``) on the first ``max_rows`` rows of ``input_ids``,
    keeping the logits of the last ``num_positions`` positions (``logits_to_keep`` where the forward takes it), and
    the body on the same rows; both run inside one call of ``model`` (through any wrapper). The log-probs (of the
    next token and of the most likely one) and the entropies of ``log_softmax(logits)`` must match fusedrl's head
    within a tolerance scaled for the precision involved (dtypes, autocast, TF32). :func:`hf_logprob_entropy` and
    :func:`hf_fused_policy_loss` run this check on their first call for a model (``check_head=True``).

    Args:
        model: a Hugging Face causal LM, possibly wrapped. input_ids: ``[B, L]`` token ids, ``L >= 2``.
        attention_mask: ``[B, L]`` or None. model_kwargs: further model inputs (``position_ids``, ...). With tensor
            inputs other than ``position_ids`` / ``token_type_ids`` the check runs on all ``B`` rows.

    Returns:
        The largest absolute difference found (nan when the model's own log-probs were not finite anywhere).

    Raises:
        UnsupportedHeadError: the model's head is not one fusedrl reproduces (its logits differ in shape or value).
    """
    _check_input_ids(input_ids)
    for name, v in (("num_positions", num_positions), ("max_rows", max_rows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    lm_head_params(model)  # refuses unsupported heads before running anything
    check = _head_check(input_ids, attention_mask, model_kwargs, num_positions, max_rows)
    _hidden_forward(model, check.ids, check.am, check.kw, check)
    return float("nan") if check.diff is None else check.diff


def _check_input_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, L], got {_shape_of(input_ids)}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least one row of 2 tokens, got shape {tuple(input_ids.shape)}")


def _pending_check(model, input_ids, attention_mask, model_kwargs, check_head, logit_scale, softcap):
    """The head check this call must run (None when done before, skipped, or the caller stated the head)."""
    if not isinstance(check_head, bool):
        raise ValueError(f"check_head must be a bool, got {check_head!r}")
    # an explicit logit_scale / softcap is the caller's statement of the head: nothing to check it against
    if not check_head or logit_scale is not None or softcap is not None or unwrap_model(model) in _HEAD_CHECKED:
        return None
    return _head_check(input_ids, attention_mask, model_kwargs, num_positions=4, max_rows=2)


def _record_check(model: nn.Module, check: Optional[_HeadCheck]) -> None:
    if check is not None and check.diff is not None and check.diff == check.diff:  # nan: check again next time
        _HEAD_CHECKED[unwrap_model(model)] = check.diff


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
        model_kwargs: go to the model body (``position_ids``, ``pixel_values``, ...).

    Returns:
        ``(logp, entropy)``: fp32 ``[B, K]`` (``entropy`` None if not asked).

    Raises:
        UnsupportedHeadError: the model's head is one fusedrl cannot reproduce.
    """
    k = _num_scored(input_ids, response_mask, logits_to_keep)
    head = lm_head_params(model, logit_scale=logit_scale, softcap=softcap)
    check = _pending_check(model, input_ids, attention_mask, model_kwargs, check_head, logit_scale, softcap)
    hidden = _hidden_forward(model, input_ids, attention_mask, model_kwargs, check)
    _record_check(model, check)
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
    check_head: bool = True,
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
        model_kwargs: go to the model body.

    Returns:
        ``(loss, metrics)`` as :func:`fusedrl.fused_policy_loss`.

    Raises:
        UnsupportedHeadError: the model's head is one fusedrl cannot reproduce.
    """
    from ..fused import fused_policy_loss

    rollout = {
        k: v for k, v in (("rollout_logp", rollout_logp), ("rollout_is_weights", rollout_is_weights)) if v is not None
    }  # passed only when given
    k = _num_scored(input_ids, response_mask, None)
    head = lm_head_params(model, logit_scale=logit_scale, softcap=softcap)
    check = _pending_check(model, input_ids, attention_mask, model_kwargs, check_head, logit_scale, softcap)
    hidden = _hidden_forward(model, input_ids, attention_mask, model_kwargs, check)
    _record_check(model, check)
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
