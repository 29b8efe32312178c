"""The check of the helper's head against the model's own logits on a few positions, at first use,
cached per model."""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Optional

import torch
from torch import nn

from .forward import head_logprob_entropy, hidden_forward, hidden_of, run_body
from .heads import LMHead, UnsupportedHeadError, get_lm_head, lm_head_params, unwrap_model

Tensor = torch.Tensor


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
                hidden = hidden_of(run_body(inner, input_ids=ids, attention_mask=self.am, **self.kw))
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
    hidden_forward(model, check.ids, check.am, check.kw, check)
    return float("nan") if check.diff is None else check.diff


def _check_input_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, L], got {_shape_of(input_ids)}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least one row of 2 tokens, got shape {tuple(input_ids.shape)}")


def pending_check(model, input_ids, attention_mask, model_kwargs, check_head, logit_scale, softcap):
    """The head check this call must run (None when done before, skipped, or the caller stated the head)."""
    if not isinstance(check_head, bool):
        raise ValueError(f"check_head must be a bool, got {check_head!r}")
    # an explicit logit_scale / softcap is the caller's statement of the head: nothing to check it against
    if not check_head or logit_scale is not None or softcap is not None or unwrap_model(model) in _HEAD_CHECKED:
        return None
    return _head_check(input_ids, attention_mask, model_kwargs, num_positions=4, max_rows=2)


def record_check(model: nn.Module, check: Optional[_HeadCheck]) -> None:
    if check is not None and check.diff is not None and check.diff == check.diff:  # nan: check again next time
        _HEAD_CHECKED[unwrap_model(model)] = check.diff
