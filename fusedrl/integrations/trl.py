"""TRL ``GRPOTrainer`` with fusedrl's loss: hidden states in, loss out, no ``[B, K, V]`` logits.

Three ways in (TRL is imported only when a trainer class is built, so this module imports without it):

* ``FusedGRPOTrainer`` - a drop-in subclass of ``trl.GRPOTrainer``::

      from fusedrl.integrations.trl import FusedGRPOTrainer
      trainer = FusedGRPOTrainer(model=model, reward_funcs=reward_fn, args=GRPOConfig(...),
                                 train_dataset=ds, fusedrl_entropy_coeff=0.001)

* ``FusedGRPOMixin`` - for an existing GRPOTrainer subclass: ``class My(FusedGRPOMixin, MyGRPOTrainer)``.
* ``fused_grpo_loss(trainer, model, inputs)`` - the loss itself, as a hook for a custom ``_compute_loss``.

What the trainer does differently: ``_compute_loss`` runs the model body once, takes the per-token
log-probs and entropies of the completion from :func:`fusedrl.linear_logprob_entropy` (lm_head weight,
bias, logit scale, final-logit softcap and ``args.temperature`` taken from the model / config) and the
loss from :func:`fusedrl.policy_loss` with a :class:`fusedrl.PolicyLossConfig` mapped from the
``GRPOConfig`` (:func:`grpo_policy_loss_config`); the old / reference log-probs of a rollout batch
are scored with the same fused op under ``no_grad``. Logged metrics keep TRL's names and meaning
(``entropy``, ``kl``, ``clip_ratio/*``).

Mapping of TRL's ``loss_type`` (``epsilon`` / ``epsilon_high`` -> ``clip_ratio_low`` / ``_high``,
``delta`` -> dual clip ``clip_ratio_c``, ``beta`` -> ``kl_loss_coef`` with ``kl_loss_type="k3"``):

==========  ======================================================================================
grpo        ``seq-mean-token-mean``, ``global_num_seqs = B`` (empty completions count, as in TRL)
bnpo        ``token-mean`` over the local micro-batch
dr_grpo     ``seq-mean-token-sum-norm``, ``global_num_seqs = B``, ``norm_len = max_completion_length``
dapo        ``token-mean`` with ``global_num_tokens`` = TRL's normaliser (tokens of the accumulation window)
cispo       ``loss_mode="cispo"``, ratio clipped above at ``epsilon_high`` (no lower clip), as dapo
==========  ======================================================================================

``importance_sampling_level="sequence"`` maps onto ``loss_mode="gspo"`` (same values and gradients as
TRL's sequence-level ratio). Inside the trainer the KL term is added by this module with TRL's exact
estimator (k3 without verl's clamps) and, as TRL does by default (``use_bias_correction_kl``),
weighted by the differentiable importance ratio, aggregated like the policy term. The entropy bonus
``loss -= coef * mean_mask(entropy)`` (TRL's ``entropy_coef`` semantics: token mean, divided by the
accumulation steps) comes from ``GRPOConfig.entropy_coef`` or ``fusedrl_entropy_coeff`` (which
overrides it); its gradient flows through the same fused backward as the policy term.

Not covered (the trainer falls back to TRL's own loss for that step, warning once; pass
``fusedrl_fallback="error"`` to raise instead): loss types sapo / vespo / luspo, ``top_entropy_quantile
< 1``, ``off_policy_mask_threshold``, vLLM importance-sampling correction, adaptive entropy control,
MoE auxiliary loss, multimodal inputs. Written against and tested with TRL 1.16.

Precision: the vocabulary projection runs in the lm_head weight's dtype outside autocast (fp32 master
weights -> fp32 logits in registers / tiles), whereas TRL under ``bf16=True`` autocast projects in
bf16; with ``bf16=False`` both paths agree to float rounding (tests/test_integrations.py).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from ..loss import PolicyLossConfig, policy_loss
from . import hf

Tensor = torch.Tensor

__all__ = [
    "TRL_LOSS_TYPES",
    "grpo_policy_loss_config",
    "fused_grpo_loss",
    "FusedGRPOMixin",
    "FusedGRPOTrainer",
    "make_fused_grpo_trainer_class",
]

#: TRL loss types fusedrl computes itself
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images")


class FusedRLUnsupported(NotImplementedError):
    """A GRPOTrainer setting fusedrl's loss does not reproduce."""


def _arg(trainer, name: str, default=None):
    args = getattr(trainer, "args", None)
    return getattr(args, name, default) if args is not None else default


def grpo_policy_loss_config(
    loss_type: str = "grpo",
    *,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    beta: float = 0.0,
    importance_sampling_level: str = "token",
    delta: Optional[float] = None,
    batch_size: Optional[int] = None,
    max_completion_length: Optional[int] = None,
    num_items: Optional[Any] = None,
) -> Tuple[PolicyLossConfig, Dict[str, Any]]:
    """Map TRL GRPO hyper-parameters onto a :class:`fusedrl.PolicyLossConfig`.

    Args:
        loss_type: TRL's ``loss_type`` (one of :data:`TRL_LOSS_TYPES`).
        epsilon_low / epsilon_high: TRL's ``epsilon`` / ``epsilon_high`` (default: ``epsilon_low``).
        beta: KL coefficient (k3 estimator). importance_sampling_level: ``"token"`` or ``"sequence"``.
        delta: TRL's two-sided clipping bound (upper bound on the ratio for negative advantages).
        batch_size: ``B`` of the micro-batch (grpo: seq-mean denominator; dr_grpo: ``B * max_completion_length``).
        max_completion_length: dr_grpo's length normaliser.
        num_items: dapo / cispo token normaliser (TRL: ``num_items_in_batch`` rescaled to one accumulation window).

    Returns:
        ``(config, normalisers)``: pass ``**normalisers`` to :func:`fusedrl.policy_loss` /
        :func:`fusedrl.fused_policy_loss`. The loss equals TRL's *before* its division by the
        gradient-accumulation steps (dapo / cispo: TRL's normaliser already includes it).
    """
    if loss_type not in TRL_LOSS_TYPES:
        raise FusedRLUnsupported(f"TRL loss_type {loss_type!r} is not mapped; fusedrl covers {TRL_LOSS_TYPES}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    sequence = importance_sampling_level == "sequence"
    norms: Dict[str, Any] = {}
    kw: Dict[str, Any] = dict(clip_ratio_low=float(epsilon_low), clip_ratio_high=float(eps_high), clip_ratio_c=None,
                              kl_loss_coef=float(beta), kl_loss_type="k3")
    if loss_type == "cispo":
        if sequence:
            raise FusedRLUnsupported("cispo with importance_sampling_level='sequence' is not mapped")
        if eps_high < 1.0:
            raise FusedRLUnsupported(f"cispo's epsilon_high is an absolute ratio bound (>= 1), got {eps_high}")
        # TRL: -sg(min(r, epsilon_high)) A logp  ==  fusedrl cispo with bounds [0, epsilon_high]
        kw.update(loss_mode="cispo", clip_ratio_low=1.0, clip_ratio_high=float(eps_high) - 1.0)
    elif sequence:
        if delta is not None:
            raise FusedRLUnsupported(
                "delta (two-sided clipping) with importance_sampling_level='sequence' is not mapped")
        kw.update(loss_mode="gspo")
    else:
        kw.update(loss_mode="vanilla")
        if delta is not None:
            if not delta > 1.0 + eps_high:
                raise FusedRLUnsupported(f"delta must exceed 1 + epsilon_high to map onto a dual clip, got {delta}")
            kw.update(clip_ratio_c=float(delta))
    if loss_type == "grpo":
        kw["loss_agg_mode"] = "seq-mean-token-mean"
        if batch_size is not None:
            norms["global_num_seqs"] = int(batch_size)
    elif loss_type == "bnpo":
        kw["loss_agg_mode"] = "token-mean"
    elif loss_type == "dr_grpo":
        if batch_size is None or max_completion_length is None:
            raise ValueError("dr_grpo needs batch_size and max_completion_length")
        # TRL: sum(L m) / (B * max_completion_length) == seq-mean over B sequences of sum / L_max
        kw["loss_agg_mode"] = "seq-mean-token-sum-norm"
        norms["global_num_seqs"] = int(batch_size)
        norms["norm_len"] = int(max_completion_length)
    else:  # dapo, cispo
        kw["loss_agg_mode"] = "token-mean"
        if num_items is not None:
            norms["global_num_tokens"] = num_items
    return PolicyLossConfig(**kw), norms


# --------------------------------------------------------------------------------------------------
# the loss hook
# --------------------------------------------------------------------------------------------------
def _unsupported_reason(trainer, inputs) -> Optional[str]:
    loss_type = getattr(trainer, "loss_type", _arg(trainer, "loss_type", "grpo"))
    if loss_type not in TRL_LOSS_TYPES:
        return f"loss_type={loss_type!r}"
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        return "top_entropy_quantile < 1"
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        return "off_policy_mask_threshold"
    if getattr(trainer, "use_vllm", False) and getattr(trainer, "vllm_importance_sampling_correction", False):
        return "vLLM importance-sampling correction"
    if getattr(trainer, "use_adaptive_entropy", False):
        return "use_adaptive_entropy"
    if getattr(trainer, "aux_loss_enabled", False):
        return "MoE auxiliary loss"
    for k in _MULTIMODAL_KEYS:
        if inputs.get(k) is not None:
            return f"multimodal input {k!r}"
    return None


def _ga_steps(trainer) -> int:
    return int(getattr(trainer, "current_gradient_accumulation_steps", None)
               or _arg(trainer, "gradient_accumulation_steps", 1) or 1)


def _autocast(trainer):
    acc = getattr(trainer, "accelerator", None)
    if acc is not None and hasattr(acc, "autocast"):
        return acc.autocast()
    from contextlib import nullcontext
    return nullcontext()


def _entropy_coeff(trainer) -> float:
    c = getattr(trainer, "_fusedrl_entropy_coeff", None)
    if c is None:
        c = getattr(trainer, "entropy_coef", None)
        if c is None:
            c = _arg(trainer, "entropy_coef", 0.0)
    return float(c or 0.0)


def fused_grpo_loss(trainer, model, inputs: Dict[str, Any], *, backend: Optional[str] = None) -> Tensor:
    """TRL GRPOTrainer's loss computed with fusedrl (the body of ``_compute_loss``).

    ``trainer`` is a ``trl.GRPOTrainer`` (its ``loss_type``, ``epsilon_low/high``, ``beta``,
    ``importance_sampling_level``, ``temperature``, ``max_completion_length``, accumulation steps and
    ``_metrics`` are read); ``inputs`` is TRL's batch dict (``prompt_ids``, ``prompt_mask``,
    ``completion_ids``, ``completion_mask``, ``advantages`` [B] or [B, K], optional
    ``old_per_token_logps`` / ``ref_per_token_logps`` [B, K], ``num_items_in_batch``, ``tool_mask``).
    Raises :class:`FusedRLUnsupported` for settings it does not reproduce.
    """
    reason = _unsupported_reason(trainer, inputs)
    if reason is not None:
        raise FusedRLUnsupported(reason)
    backend = backend or getattr(trainer, "_fusedrl_backend", "auto")
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    mask = completion_mask if inputs.get("tool_mask") is None else completion_mask * inputs["tool_mask"]
    B = completion_ids.size(0)

    loss_type = getattr(trainer, "loss_type", "grpo")
    level = getattr(trainer, "importance_sampling_level", "token")
    beta = float(getattr(trainer, "beta", 0.0))
    training = bool(getattr(getattr(trainer, "model", model), "training", True))
    ga = _ga_steps(trainer) if training else 1

    num_items = None
    if loss_type in ("dapo", "cispo"):
        n = inputs.get("num_items_in_batch")
        if n is None:
            n = mask.sum()
        if not isinstance(n, torch.Tensor):
            n = torch.tensor(float(n), device=mask.device)
        acc = getattr(trainer, "accelerator", None)
        nproc = getattr(acc, "num_processes", 1) if acc is not None else 1
        n = n.to(torch.float32).clamp(min=1.0) / nproc
        if training:
            n = n * ga / (_arg(trainer, "steps_per_generation", None) or ga)
        num_items = n
    cfg, norms = grpo_policy_loss_config(
        loss_type, epsilon_low=getattr(trainer, "epsilon_low", 0.2),
        epsilon_high=getattr(trainer, "epsilon_high", None),
        beta=beta, importance_sampling_level=level, delta=_arg(trainer, "delta", None), batch_size=B,
        max_completion_length=getattr(trainer, "max_completion_length", None) or _arg(trainer, "max_completion_length"),
        num_items=num_items)

    temperature = float(getattr(trainer, "temperature", None) or _arg(trainer, "temperature", 1.0) or 1.0)
    with _autocast(trainer):
        logp, ent = hf.hf_logprob_entropy(model, input_ids, attention_mask, response_mask=mask, temperature=temperature,
                                          return_entropy=True, backend=backend)

    advantages = inputs["advantages"]
    old = inputs.get("old_per_token_logps")
    old = logp.detach() if old is None else old
    # KL to the reference: TRL's k3 estimator (unclamped), optionally weighted by the (differentiable)
    # importance ratio (use_bias_correction_kl), aggregated like the policy term.
    cfg = cfg.replace(kl_loss_coef=0.0)
    loss, metrics = policy_loss(logp, old, advantages, mask, entropy=ent, config=cfg, **norms)
    per_token_kl = None
    if beta != 0.0:
        ref = inputs["ref_per_token_logps"]
        d = ref - logp
        per_token_kl = torch.exp(d) - d - 1
        if _arg(trainer, "use_bias_correction_kl", False):
            per_token_kl = per_token_kl * torch.exp(_log_importance_weights(logp, old, mask, level))
        loss = loss + beta * _trl_aggregate(per_token_kl, mask, loss_type, norms)
    policy_part = loss.detach()
    if loss_type not in ("dapo", "cispo"):
        loss = loss / ga

    coef = _entropy_coeff(trainer)
    if coef != 0.0:
        m = mask.to(ent.dtype)
        loss = loss - coef * (ent * m).sum() / m.sum().clamp(min=1.0) / ga

    _log_metrics(trainer, logp.detach(), old, advantages, mask, ent.detach(),
                 None if per_token_kl is None else per_token_kl.detach(), level, loss_type,
                 policy_part if coef != 0.0 else None)
    return loss


def _log_importance_weights(logp, old, mask, level):
    """TRL's log importance weights: per token [B, K], or per sequence [B, 1] (masked mean)."""
    log_ratio = logp - old
    if level != "sequence":
        return log_ratio
    m = mask.to(log_ratio.dtype)
    return ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)


def _trl_aggregate(per_token: Tensor, mask: Tensor, loss_type: str, norms: Dict[str, Any]) -> Tensor:
    """TRL's aggregation of a per-token term for ``loss_type`` (before the accumulation division)."""
    m = mask.to(per_token.dtype)
    total = (per_token * m)
    if loss_type == "grpo":
        return (total.sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return total.sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return total.sum() / (norms["global_num_seqs"] * norms["norm_len"])
    return total.sum() / norms.get("global_num_tokens", m.sum().clamp(min=1.0))


def _log_metrics(trainer, logp, old, advantages, mask, ent, per_token_kl, level, loss_type, policy_part):
    """TRL's logged metrics (same names, same definitions), from the detached per-token tensors."""
    store = getattr(trainer, "_metrics", None)
    acc = getattr(trainer, "accelerator", None)
    if store is None or acc is None:
        return
    mode = "train" if getattr(getattr(trainer, "model", None), "training", True) else "eval"
    m = mask.to(torch.float32)
    adv = advantages if advantages.dim() == 2 else advantages.unsqueeze(1)

    def global_mean(x, per_seq=False):
        if per_seq:
            s, c = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
        else:
            s, c = (x * m).sum(), m.sum()
        tot = acc.reduce(torch.stack([s.float(), c.float()]), reduction="sum")
        return (tot[0] / tot[1].clamp(min=1.0)).item()

    if policy_part is not None:  # the entropy bonus is on (TRL logs these two then)
        store[mode]["policy_loss"].append(acc.gather(policy_part).nanmean().item())
        if mode == "train" and getattr(acc, "sync_gradients", True):
            store[mode]["entropy_coef"].append(_entropy_coeff(trainer))
    if per_token_kl is not None:
        store[mode]["kl"].append(global_mean(per_token_kl))
    store[mode]["entropy"].append(global_mean(ent))
    ratio = torch.exp(_log_importance_weights(logp, old, mask, level))
    lo_eps = float(getattr(trainer, "epsilon_low", 0.2))
    hi_eps = getattr(trainer, "epsilon_high", None)
    hi_eps = lo_eps if hi_eps is None else float(hi_eps)
    per_seq = level == "sequence"
    if loss_type == "cispo":
        store[mode]["cispo_clip_ratio"].append(global_mean(((ratio > hi_eps) & (adv > 0)).float(), per_seq))
        return
    low = ((ratio < 1 - lo_eps) & (adv < 0)).float()
    high = ((ratio > 1 + hi_eps) & (adv > 0)).float()
    store[mode]["clip_ratio/low_mean"].append(global_mean(low, per_seq))
    store[mode]["clip_ratio/high_mean"].append(global_mean(high, per_seq))
    store[mode]["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high), per_seq))

    def seq_mean(x):
        if x.shape[1] == 1:
            return x.squeeze(1)
        return (x * m).sum(-1) / m.sum(-1)

    low_seq, high_seq = acc.gather(seq_mean(low)), acc.gather(seq_mean(high))
    finite_low, finite_high = low_seq[~torch.isnan(low_seq)], high_seq[~torch.isnan(high_seq)]
    store[mode]["clip_ratio/low_min"].append(finite_low.min().item() if finite_low.numel() else float("nan"))
    store[mode]["clip_ratio/high_max"].append(finite_high.max().item() if finite_high.numel() else float("nan"))


# --------------------------------------------------------------------------------------------------
# trainer classes
# --------------------------------------------------------------------------------------------------
class FusedGRPOMixin:
    """Mix into a ``trl.GRPOTrainer`` (sub)class: ``class T(FusedGRPOMixin, GRPOTrainer)``.

    Extra constructor keyword arguments:
        fusedrl_backend: fusedrl backend (``"auto"``).
        fusedrl_entropy_coeff: entropy bonus coefficient (overrides ``GRPOConfig.entropy_coef``).
        fusedrl_fallback: ``"warn"`` (default: use TRL's own loss for settings fusedrl does not
            reproduce, warning once) or ``"error"``.
        fusedrl_score: also score old / reference log-probs with fusedrl (default True).
    """

    def __init__(self, *args, fusedrl_backend: str = "auto", fusedrl_entropy_coeff: Optional[float] = None,
                 fusedrl_fallback: str = "warn", fusedrl_score: bool = True, **kwargs):
        if fusedrl_fallback not in ("warn", "error"):
            raise ValueError(f"fusedrl_fallback must be 'warn' or 'error', got {fusedrl_fallback!r}")
        self._fusedrl_backend = fusedrl_backend
        self._fusedrl_entropy_coeff = fusedrl_entropy_coeff
        self._fusedrl_fallback = fusedrl_fallback
        self._fusedrl_score = fusedrl_score
        self._fusedrl_warned = set()
        super().__init__(*args, **kwargs)

    def _fusedrl_fall_back(self, reason: str) -> None:
        if self._fusedrl_fallback == "error":
            raise FusedRLUnsupported(f"fusedrl does not reproduce TRL's loss with {reason}")
        if reason not in self._fusedrl_warned:
            self._fusedrl_warned.add(reason)
            warnings.warn(f"fusedrl: {reason} is not covered; using TRL's own loss for these steps", stacklevel=3)

    def _compute_loss(self, model, inputs):
        try:
            return fused_grpo_loss(self, model, inputs)
        except FusedRLUnsupported as e:
            self._fusedrl_fall_back(str(e))
            if self._fusedrl_entropy_coeff:
                raise FusedRLUnsupported(
                    f"fusedrl_entropy_coeff is set but the fused loss cannot run ({e}); TRL's loss would drop it"
                ) from None
            return super()._compute_loss(model, inputs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, *args, **kwargs):
        extra = any(v is not None and v is not False for v in kwargs.values()) or bool(args)
        if not self._fusedrl_score or extra:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, *args, **kwargs)
        batch_size = batch_size or input_ids.size(0)
        temperature = float(getattr(self, "temperature", 1.0) or 1.0)
        logps, ents = [], []
        for s in range(0, input_ids.size(0), batch_size):
            ids, am = input_ids[s:s + batch_size], attention_mask[s:s + batch_size]
            with _autocast(self):
                lp, en = hf.hf_logprob_entropy(model, ids, am, response_mask=am[:, -logits_to_keep:],
                                               temperature=temperature, return_entropy=compute_entropy,
                                               backend=self._fusedrl_backend)
            logps.append(lp)
            ents.append(en)
        logp = torch.cat(logps, 0)
        ent = torch.cat(ents, 0) if compute_entropy else None
        if _returns_aux_loss(type(self)):
            return logp, ent, None
        return logp, ent


def _returns_aux_loss(cls) -> bool:
    """Whether this TRL version's ``_get_per_token_logps_and_entropies`` returns (logp, entropy, aux_loss)."""
    for base in cls.__mro__:
        if base is FusedGRPOMixin:
            continue
        fn = base.__dict__.get("_get_per_token_logps_and_entropies")
        if fn is not None:
            try:
                return "compute_aux_loss" in inspect.signature(fn).parameters
            except (TypeError, ValueError):  # pragma: no cover
                return False
    return False


_CLASS_CACHE: Dict[Any, type] = {}


def make_fused_grpo_trainer_class(base=None) -> type:
    """``FusedGRPOMixin`` + ``base`` (default ``trl.GRPOTrainer``; imports TRL)."""
    if base is None:
        from trl import GRPOTrainer as base  # noqa: N813
    if base not in _CLASS_CACHE:
        _CLASS_CACHE[base] = type("FusedGRPOTrainer", (FusedGRPOMixin, base), {
            "__doc__": f"``{base.__name__}`` whose loss (and old/ref scoring) runs on fusedrl; "
                       "see fusedrl.integrations.trl.",
            "__module__": __name__,
        })
    return _CLASS_CACHE[base]


def __getattr__(name):
    if name == "FusedGRPOTrainer":
        return make_fused_grpo_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
