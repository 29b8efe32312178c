"""verl: fusedrl as verl policy losses and as verl's fused log-prob / entropy kernel.

This module imports without verl installed. When verl is installed, importing it registers the policy losses
(below) in verl's registry, so ``VERL_USE_EXTERNAL_MODULES=fusedrl.integrations.verl`` in the environment of a
verl run is all its workers need: verl 0.9.1 imports the modules that variable lists at ``import verl``, in every
process. Registering imports only ``verl.trainer.ppo.core_algos`` (and what verl's package imports itself).

1. Policy losses. :func:`register_verl_policy_losses` adds fusedrl's loss head to verl's registry
   (``verl.trainer.ppo.core_algos.register_policy_loss``) for each of verl 0.9.1's twelve modes, as
   ``fusedrl_<mode>`` (``vanilla``, ``dppo_tv``, ``dppo_kl``, ``gspo``, ``sapo``, ``gpg``, ``clip_cov``,
   ``kl_cov``, ``geo_mean``, ``dro``, ``cispo``, ``bypass_mode``; ``override=True`` also replaces verl's own
   entries). Importing this module does it when verl is installed; registering again is harmless. Select one
   with ``actor_rollout_ref.actor.policy_loss.loss_mode=fusedrl_vanilla``. The functions
   take verl's ``PolicyLossFn`` arguments, read the actor config as verl does (``clip_ratio[_low/_high/_c]``,
   ``tau_pos/neg``, ``policy_loss.*`` including ``dro_beta`` and ``rollout_correction``, ``global_batch_info``
   for the data-parallel normalisers), honour ``rollout_is_weights`` and every ``loss_agg_mode``
   (``token-sum`` included), and return verl's metric names. Every device-side op is sync-free (Clip-Cov /
   KL-Cov, rollout correction stay on the device); only the returned metrics become Python floats, as
   verl's own losses do.

2. Fused log-probs / entropy for the actor. verl's ``use_fused_kernels`` forward calls
   ``FusedLinearForPPO()(hidden_states, vocab_weights, input_ids, temperature)`` (torch backend) or
   ``linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)``
   (triton backend, FSDP and Megatron). :class:`FusedLinearForPPO`, :func:`fused_linear_for_ppo` and
   :func:`linear_cross_entropy` are drop-ins with those signatures, and :func:`patch_verl` installs
   them into verl (Megatron's ``model_forward_fused`` / ``model_forward_1f1b_overlap`` included, which bind
   ``linear_cross_entropy`` at import) so ``actor_rollout_ref.model.use_fused_kernels=True`` runs on fusedrl
   (any backend: both of verl's ``fused_kernel_options.impl_backend`` values are served).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..loss import PolicyLossConfig, policy_loss

Tensor = torch.Tensor

__all__ = [
    "VERL_LOSS_MODES",
    "policy_loss_config_from_verl",
    "make_verl_policy_loss",
    "register_verl_policy_losses",
    "fused_linear_for_ppo",
    "FusedLinearForPPO",
    "linear_cross_entropy",
    "patch_verl",
]

#: verl 0.9.1's policy-loss registry, all served by fusedrl (registered as ``fusedrl_<mode>``)
VERL_LOSS_MODES = (
    "vanilla",
    "dppo_tv",
    "dppo_kl",
    "gspo",
    "sapo",
    "gpg",
    "clip_cov",
    "kl_cov",
    "geo_mean",
    "dro",
    "cispo",
    "bypass_mode",
)
_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# the metric keys each verl loss returns (fusedrl's metric -> verl's key), so dashboards see the same names
_CLIP3 = ("pg_clipfrac", "ppo_kl", "pg_clipfrac_lower")
_VERL_METRICS = {
    "vanilla": _CLIP3,
    "dppo_tv": _CLIP3,
    "dppo_kl": _CLIP3,
    "gspo": _CLIP3,
    "sapo": _CLIP3,
    "geo_mean": _CLIP3,
    "cispo": _CLIP3,
    "gpg": (),
    "clip_cov": ("pg_clipfrac", "ppo_kl"),
    "kl_cov": ("ppo_kl",),
    "dro": ("ppo_kl",),
}
_MISSING = object()


def _get_raw(cfg, name: str, missing=_MISSING):
    """Field of a verl config (dataclass ``BaseConfig``, omegaconf ``DictConfig`` or dict) as stored
    (``None`` kept); ``missing`` when the field is absent."""
    if cfg is None:
        return missing
    if isinstance(cfg, dict):
        return cfg.get(name, missing)
    try:
        return getattr(cfg, name)
    except (AttributeError, KeyError):
        get = getattr(cfg, "get", None)
        return get(name, missing) if callable(get) else missing


def _get(cfg, name: str, default=None):
    """Field of a verl config; ``default`` when it is absent or ``None``."""
    v = _get_raw(cfg, name, None)
    return default if v is None else v


def _get_verl(cfg, name: str, field_default, null_default):
    """A field read as verl reads it: ``null_default`` where the config holds ``None`` (verl's
    ``x if x is not None else ...`` in the loss), ``field_default`` (verl's dataclass default) where absent."""
    v = _get_raw(cfg, name)
    if v is _MISSING:
        return field_default
    return null_default if v is None else v


def verl_normalisers(global_batch_info, loss_agg_mode: str, response_mask: Optional[Tensor] = None) -> dict[str, Any]:
    """fusedrl normalisers reproducing verl's ``agg_loss(..., **global_batch_info)`` for ``loss_agg_mode``.

    verl multiplies each data-parallel rank's loss by ``dp_size`` over the global counts; fusedrl divides
    the counts by ``dp_size`` instead (same value; ``token-sum`` has no count: :func:`make_verl_policy_loss`
    multiplies its loss by ``dp_size``). As verl, ``dp_size > 1`` without the count the mode needs
    (``batch_num_tokens`` for token-mean, ``global_batch_size`` for the seq-mean modes) raises instead
    of normalising locally.
    """
    info = dict(global_batch_info or {})
    dp = int(info.get("dp_size") or 1)
    tokens, seqs = info.get("batch_num_tokens"), info.get("global_batch_size")
    if dp > 1 and loss_agg_mode == "token-mean" and tokens is None:
        raise ValueError(
            "global_batch_info: (global) batch_num_tokens is required when dp_size > 1 (verl's agg_loss raises too)"
        )
    if dp > 1 and loss_agg_mode.startswith("seq-mean") and seqs is None:
        raise ValueError(
            "global_batch_info: global_batch_size is required when dp_size > 1 (verl's agg_loss raises too)"
        )
    norms: dict[str, Any] = {}
    if tokens is not None:
        norms["global_num_tokens"] = tokens / dp
    if seqs is not None:
        norms["global_num_seqs"] = seqs / dp
    if info.get("loss_scale_factor") is not None:
        norms["norm_len"] = info["loss_scale_factor"]
    elif response_mask is not None and response_mask.dim() == 2:
        norms["norm_len"] = response_mask.shape[-1]
    return norms


def _is_threshold(spec):
    """verl's ``rollout_is_threshold`` syntax: a number or numeric string (TIS: truncate at that upper bound),
    or ``"lower_upper"`` (IcePop: weights outside ``[lower, upper]`` become 0). Returns
    ``(upper, lower, mode)`` for :class:`fusedrl.RolloutCorrection`."""
    if spec is None:
        return None, None, "truncate"
    if isinstance(spec, bool):
        raise ValueError("rollout_is_threshold must be a number or a threshold string, not a bool")
    if isinstance(spec, str):
        text = spec.strip()
        try:
            lo, hi = (float(x) for x in text.split("_", 1)) if "_" in text else (None, float(text))
        except ValueError:
            raise ValueError(f"invalid rollout_is_threshold {spec!r}") from None
    else:
        lo, hi = None, float(spec)
    if not hi > 0 or (lo is not None and not lo > 0):
        raise ValueError(f"rollout_is_threshold bounds must be positive, got {spec!r}")
    if lo is not None and lo > hi:
        raise ValueError(f"rollout_is_threshold lower bound must be <= upper bound, got {spec!r}")
    return hi, lo, "truncate" if lo is None else "mask"


def rollout_correction_from_verl(rc):
    """:class:`fusedrl.RolloutCorrection` from verl's ``RolloutCorrectionConfig`` (or a dict / DictConfig), with
    verl's threshold syntax (``rollout_is_threshold`` ``2.0`` truncates, ``"0.5_5.0"`` is IcePop); None passes
    through."""
    if rc is None:
        return None
    from ..loss import RolloutCorrection

    upper, lower, mode = _is_threshold(_get_verl(rc, "rollout_is_threshold", 2.0, None))
    return RolloutCorrection(
        rollout_is=_get(rc, "rollout_is", None),
        rollout_is_threshold=upper,
        rollout_is_threshold_lower=lower,
        rollout_is_mode=mode,
        rollout_is_batch_normalize=bool(_get(rc, "rollout_is_batch_normalize", False)),
        rollout_rs=_get(rc, "rollout_rs", None),
        rollout_rs_threshold=_get(rc, "rollout_rs_threshold", None),
        loss_type=_get(rc, "loss_type", "ppo_clip"),
    )


def policy_loss_config_from_verl(
    config, loss_mode: Optional[str] = None, loss_agg_mode: Optional[str] = None, response_mask: Optional[Tensor] = None
) -> tuple[PolicyLossConfig, dict[str, Any]]:
    """:class:`fusedrl.PolicyLossConfig` + normalisers from a verl actor config, read as verl 0.9.1 reads it.

    ``loss_mode`` / ``loss_agg_mode`` default to the config's (``policy_loss.loss_mode`` without a
    ``fusedrl_`` prefix; ``loss_agg_mode``). The normalisers reproduce verl's ``agg_loss`` with the
    config's ``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``loss_scale_factor``): pass ``**normalisers`` to :func:`fusedrl.policy_loss`. Mode specifics as in
    verl: sapo always aggregates seq-mean-token-mean over ``global_batch_info``, geo_mean the mean over the
    micro-batch's rows (empty ones included, no ``global_batch_info``); dppo_* read ``clip_ratio_low/high``
    as divergence thresholds and ``clip_ratio_c`` (default 20 where the config has none) as the ratio
    truncation; ``policy_loss.ppo_kl_coef: null`` means 1.0; dro needs ``policy_loss.dro_beta > 0``;
    bypass_mode reads ``policy_loss.rollout_correction``.
    """
    pl = _get(config, "policy_loss")
    mode = loss_mode or _get(pl, "loss_mode", "vanilla")
    if mode.startswith("fusedrl_"):
        mode = mode[len("fusedrl_") :]
    if mode not in VERL_LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {VERL_LOSS_MODES}, got {mode!r}")
    agg = loss_agg_mode or _get(config, "loss_agg_mode", "token-mean")
    if mode in ("sapo", "geo_mean"):  # verl aggregates these seq-mean-token-mean whatever loss_agg_mode says
        agg = "seq-mean-token-mean"
    clip = float(_get(config, "clip_ratio", 0.2))
    kw: dict[str, Any] = dict(
        loss_mode=mode,
        loss_agg_mode=agg,
        clip_ratio_low=float(_get(config, "clip_ratio_low", clip)),
        clip_ratio_high=float(_get(config, "clip_ratio_high", clip)),
        clip_cov_ratio=float(_get_verl(pl, "clip_cov_ratio", 2e-4, 2e-4)),
        clip_cov_lb=float(_get_verl(pl, "clip_cov_lb", 1.0, 1.0)),
        clip_cov_ub=float(_get_verl(pl, "clip_cov_ub", 5.0, 5.0)),
        kl_cov_ratio=float(_get_verl(pl, "kl_cov_ratio", 2e-4, 2e-4)),
        ppo_kl_coef=float(_get_verl(pl, "ppo_kl_coef", 0.1, 1.0)),
    )
    if mode in ("vanilla", "bypass_mode"):
        kw["clip_ratio_c"] = float(_get(config, "clip_ratio_c", 3.0))
    elif mode in ("dppo_tv", "dppo_kl"):
        kw["clip_ratio_c"] = float(_get(config, "clip_ratio_c", 20.0))
    if mode == "sapo":
        kw.update(tau_pos=float(_get(config, "tau_pos", 1.0)), tau_neg=float(_get(config, "tau_neg", 1.05)))
    if mode == "dro":
        beta = _get(pl, "dro_beta", None)
        if beta is None or beta <= 0:
            raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
        kw["dro_beta"] = float(beta)
    if mode == "bypass_mode":
        rc = _get(pl, "rollout_correction", None)
        if rc is None:
            raise ValueError(
                "rollout_correction config not found in policy_loss. When using "
                "loss_mode='bypass_mode', ensure rollout_correction config is passed."
            )
        kw["rollout_correction"] = rollout_correction_from_verl(rc)
    if mode == "geo_mean":  # verl: torch.mean over the rows of the micro-batch, global_batch_info unused
        norms = {} if response_mask is None else {"global_num_seqs": max(int(response_mask.shape[0]), 1)}
    else:
        norms = verl_normalisers(_get(config, "global_batch_info", {}), agg, response_mask)
    return PolicyLossConfig(**kw), norms


def _as_float(t) -> float:
    return float(t.detach().item()) if isinstance(t, torch.Tensor) else float(t)


def _verl_metric_keys(mode: str, cfg: PolicyLossConfig) -> tuple[str, ...]:
    if mode == "bypass_mode":
        return ("ppo_kl",) if cfg.rollout_correction.loss_type == "reinforce" else _CLIP3
    return _VERL_METRICS[mode]


def make_verl_policy_loss(loss_mode: str, fallback: Optional[Callable] = None, *, metrics_as_float: bool = True):
    """A verl ``PolicyLossFn`` computing verl's ``loss_mode`` with fusedrl.

    Everything verl passes is honoured: ``rollout_is_weights`` multiply the per-token policy loss (geo_mean:
    their per-sequence geometric mean; bypass_mode ignores them, as verl's) and every ``loss_agg_mode`` of verl
    is served. ``fallback`` is accepted for compatibility and unused (nothing is handed back to verl).
    ``metrics_as_float``: return Python floats (verl's convention; a host sync) or 0-dim tensors. The metric
    keys are verl's for the mode (``actor/...``, and bypass_mode's ``rollout_corr/...``), plus
    ``actor/cov_selected_frac`` for the covariance modes.
    """
    if loss_mode not in VERL_LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {VERL_LOSS_MODES}, got {loss_mode!r}")

    def fusedrl_policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        if loss_agg_mode not in _AGG_MODES:
            raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
        cfg, norms = policy_loss_config_from_verl(config, loss_mode, loss_agg_mode, response_mask)
        scale = None
        if cfg.loss_agg_mode == "token-sum":
            dp = int((_get(config, "global_batch_info", {}) or {}).get("dp_size") or 1)
            scale = dp if dp > 1 else None  # verl: masked_sum * dp_size
        extra: dict[str, Any] = {}
        if rollout_is_weights is not None and loss_mode != "bypass_mode":  # verl's bypass ignores them too
            extra["rollout_is_weights"] = rollout_is_weights
        loss, m = policy_loss(log_prob, old_log_prob, advantages, response_mask, config=cfg, **norms, **extra)
        if scale is not None:
            loss = loss * scale
        conv = _as_float if metrics_as_float else (lambda t: t)
        out = {f"actor/{k}": conv(m[k]) for k in _verl_metric_keys(loss_mode, cfg) if k in m}
        if "cov_selected_frac" in m:
            out["actor/cov_selected_frac"] = conv(m["cov_selected_frac"])
        for k, v in m.items():
            if k.startswith("rollout_corr/"):
                out[k] = conv(v)
        return loss, out

    fusedrl_policy_loss.__name__ = f"fusedrl_policy_loss_{loss_mode}"
    fusedrl_policy_loss.__qualname__ = fusedrl_policy_loss.__name__
    return fusedrl_policy_loss


def register_verl_policy_losses(prefix: str = "fusedrl_", override: bool = False, modes=VERL_LOSS_MODES) -> list[str]:
    """Register fusedrl's losses in verl's policy-loss registry; returns the registered names.

    Names are ``prefix + mode``; with ``override=True`` verl's own entries (``vanilla``, ``gspo``, ...)
    are replaced as well (the originals are kept on the new function as ``_fusedrl_original``). Needs
    verl (imported here: only ``verl.trainer.ppo.core_algos``). Calling it again re-registers the same names.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a str, got {prefix!r}")
    unknown = [m for m in modes if m not in VERL_LOSS_MODES]
    if isinstance(modes, str) or unknown:
        raise ValueError(f"modes must be a sequence of names from {VERL_LOSS_MODES}, got {modes!r}")
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as e:  # pragma: no cover - exercised only without verl
        raise ImportError(f"register_verl_policy_losses needs verl (`pip install verl`): {e}") from e
    registry = getattr(core_algos, "POLICY_LOSS_REGISTRY", {})
    names = []
    for mode in modes:
        original = registry.get(mode)
        if getattr(original, "_fusedrl", False):
            original = getattr(original, "_fusedrl_original", None)
        fn = make_verl_policy_loss(mode)
        fn._fusedrl = True
        fn._fusedrl_original = original
        for name in [prefix + mode] + ([mode] if override else []):
            core_algos.register_policy_loss(name)(fn)
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# fused log-prob / entropy for verl's actor
# --------------------------------------------------------------------------------------------------
def fused_linear_for_ppo(
    hidden_states: Tensor,
    vocab_weights: Tensor,
    input_ids: Tensor,
    temperature: float = 1.0,
    *,
    backend: str = "auto",
    process_group=None,
    **core_kwargs,
) -> tuple[Tensor, Tensor]:
    """verl's ``FusedLinearForPPO.forward`` contract on fusedrl: ``(log_probs, entropy)`` fp32, shaped like
    ``input_ids`` (labels, already rolled by verl). Labels < 0 (ignore index) give log-prob 0."""
    from ..ops import linear_logprob_entropy

    labels = input_ids.long()
    ignore = labels < 0
    targets = torch.where(ignore, torch.zeros_like(labels), labels)
    h = hidden_states if hidden_states.dtype == vocab_weights.dtype else hidden_states.to(vocab_weights.dtype)
    logp, ent = linear_logprob_entropy(
        h,
        vocab_weights,
        targets,
        temperature=float(temperature),
        backend=backend,
        process_group=process_group,
        **core_kwargs,
    )
    logp = torch.where(ignore, torch.zeros_like(logp), logp)
    return logp, ent


class FusedLinearForPPO(nn.Module):
    """Drop-in for ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` (``chunk_size`` and
    ``impl_backend`` are accepted and ignored; ``backend`` picks the fusedrl backend)."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", *, backend: str = "auto"):
        super().__init__()
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend
        self.backend = backend

    def forward(
        self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, backend=self.backend)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group=None,
    *,
    backend: str = "auto",
):
    """Drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``: ``(log_probs, entropy)``.

    As verl's kernel, ``hidden`` (``[..., H]``) and ``labels`` are flattened to ``N`` tokens (their leading
    shapes may differ, e.g. Megatron's ``[S, 1, H]`` hidden with ``[1, S]`` labels) and ``reduction="none"``
    returns fp32 ``[N]`` tensors; ``"sum"`` / ``"mean"`` reduce both. ``dist_process_group``: vocab-parallel group.
    """
    red = reduction.lower()
    if red not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if hidden.shape[:-1].numel() != labels.numel():
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} hold different numbers of tokens"
        )
    logp, ent = fused_linear_for_ppo(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels.reshape(-1),
        temperature,
        backend=backend,
        process_group=dist_process_group,
    )
    if red == "none":
        return logp, ent
    if red == "sum":
        return logp.sum(), ent.sum()
    return logp.mean(), ent.mean()


_ORIGINALS: dict[str, Any] = {}
#: verl modules that bind ``linear_cross_entropy`` by name at import (``from ... import linear_cross_entropy``):
#: Megatron's fused forwards. Those already imported get the name replaced; later imports bind fusedrl's.
_LCE_MODULE = "verl.utils.kernel.linear_cross_entropy"
_LCE_IMPORTERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")


def _import_optional(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except Exception:  # verl's triton kernel module does not import everywhere
        return None


def patch_verl(backend: str = "auto", losses: bool = True, kernels: bool = True) -> dict[str, Any]:
    """Route verl through fusedrl: its fused-kernel forward (``use_fused_kernels=True``, both the torch
    and triton ``impl_backend``, FSDP and Megatron) and, with ``losses``, register the ``fusedrl_*`` policy
    losses. Besides ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`` itself, the names that
    Megatron's ``model_forward_fused`` / ``model_forward_1f1b_overlap`` bound at import are replaced too.
    Returns what was patched. Idempotent; :func:`unpatch_verl` restores verl's functions."""
    import functools
    import importlib
    import sys

    done: dict[str, Any] = {}
    if kernels:
        tf = importlib.import_module("verl.utils.experimental.torch_functional")
        _ORIGINALS.setdefault("FusedLinearForPPO", tf.FusedLinearForPPO)

        class _Patched(FusedLinearForPPO):
            def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
                super().__init__(chunk_size, impl_backend, backend=backend)

        _Patched.__name__ = _Patched.__qualname__ = "FusedLinearForPPO"
        tf.FusedLinearForPPO = _Patched
        done["verl.utils.experimental.torch_functional.FusedLinearForPPO"] = _Patched
        fused_lce = functools.partial(linear_cross_entropy, backend=backend)
        fused_lce._fusedrl = True
        kernel = _import_optional(_LCE_MODULE)
        if kernel is not None:
            if not getattr(kernel.linear_cross_entropy, "_fusedrl", False):
                _ORIGINALS["linear_cross_entropy"] = kernel.linear_cross_entropy
            kernel.linear_cross_entropy = fused_lce  # modules imported from now on bind this
            done[f"{_LCE_MODULE}.linear_cross_entropy"] = fused_lce
        for name in _LCE_IMPORTERS:  # imported before: replace the name they bound (later imports bind ours)
            mod = sys.modules.get(name)
            if mod is not None and hasattr(mod, "linear_cross_entropy"):
                mod.linear_cross_entropy = fused_lce
                done[f"{name}.linear_cross_entropy"] = fused_lce
    if losses:
        done["policy_losses"] = register_verl_policy_losses()
    return done


def unpatch_verl() -> None:
    """Undo :func:`patch_verl`'s kernel patches (registered losses stay registered)."""
    import importlib
    import sys

    if "FusedLinearForPPO" in _ORIGINALS:
        importlib.import_module("verl.utils.experimental.torch_functional").FusedLinearForPPO = _ORIGINALS.pop(
            "FusedLinearForPPO"
        )
    original = _ORIGINALS.pop("linear_cross_entropy", None)
    if original is not None:
        for name in (_LCE_MODULE,) + _LCE_IMPORTERS:
            mod = sys.modules.get(name)
            if mod is not None and getattr(getattr(mod, "linear_cross_entropy", None), "_fusedrl", False):
                mod.linear_cross_entropy = original


def _register_when_verl_is_installed() -> None:
    """At import: register the losses if verl is installed (see the module docstring); nothing without verl."""
    import importlib.util
    import warnings

    try:
        installed = importlib.util.find_spec("verl") is not None
    except (ImportError, ValueError):  # a broken entry for verl in sys.modules
        installed = False
    if not installed:
        return
    try:
        register_verl_policy_losses()
    except Exception as e:  # e.g. verl without the packages core_algos imports: the rest of this module still works
        warnings.warn(
            f"fusedrl: verl is installed but its policy-loss registry did not import ({type(e).__name__}: {e}); "
            "the fusedrl_* policy losses are not registered",
            stacklevel=2,
        )


_register_when_verl_is_installed()
