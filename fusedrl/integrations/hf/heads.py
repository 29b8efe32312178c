"""Which lm_head a Hugging Face model has and what it computes: the projection weight and bias, the logit
scale, the final softcap, the padded-vocabulary slice, a per-vocabulary scale, the layers before the
projection, and the heads fusedrl refuses (:class:`UnsupportedHeadError`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

Tensor = torch.Tensor


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


def pre_head(inner: nn.Module) -> Optional[nn.Module]:
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
