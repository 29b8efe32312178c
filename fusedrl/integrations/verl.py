"""verl: fusedrl as verl policy losses and as verl's fused log-prob / entropy kernel.

Both parts import verl lazily: this module imports without verl installed.

1. Policy losses. :func:`register_verl_policy_losses` adds fusedrl's loss head to verl's registry
   (``verl.trainer.ppo.core_algos.register_policy_loss``) under ``fusedrl_vanilla``, ``fusedrl_gspo``,
   ``fusedrl_clip_cov``, ``fusedrl_kl_cov``, ``fusedrl_gpg`` and ``fusedrl_cispo`` (``override=True``
   also replaces verl's own ``vanilla`` ... entries). Select one with
   ``actor_rollout_ref.actor.policy_loss.loss_mode=fusedrl_vanilla``. The functions take verl's
   ``PolicyLossFn`` arguments and read the actor config like verl does (``clip_ratio[_low/_high/_c]``,
   ``policy_loss.clip_cov_*`` / ``kl_cov_ratio`` / ``ppo_kl_coef``, ``global_batch_info`` for the
   data-parallel normalisers), and return verl's metric names. Every device-side op is sync-free
   (Clip-Cov / KL-Cov stay on the device); only the returned metrics are turned into Python floats,
   as verl's own losses do. Calls fusedrl does not reproduce (``rollout_is_weights``, the
   ``token-sum`` aggregation) are handed to verl's original loss of the same mode.

2. Fused log-probs / entropy for the actor. verl's ``use_fused_kernels`` forward calls
   ``FusedLinearForPPO()(hidden_states, vocab_weights, input_ids, temperature)`` (torch backend) or
   ``linear_cross_entropy(hidden, weight, labels, temperature, reduction, dist_process_group)``
   (triton backend). :class:`FusedLinearForPPO`, :func:`fused_linear_for_ppo` and
   :func:`linear_cross_entropy` are drop-ins with those signatures, and :func:`patch_verl` installs
   them into verl so ``actor_rollout_ref.model.use_fused_kernels=True`` runs on fusedrl (any backend:
   both of verl's ``fused_kernel_options.impl_backend`` values are served).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..loss import PolicyLossConfig, policy_loss

Tensor = torch.Tensor

__all__ = [
    "FUSEDRL_VERL_LOSS_MODES",
    "policy_loss_config_from_verl",
    "make_verl_policy_loss",
    "register_verl_policy_losses",
    "fused_linear_for_ppo",
    "FusedLinearForPPO",
    "linear_cross_entropy",
    "patch_verl",
]

#: fusedrl loss modes exposed to verl (registered as ``fusedrl_<mode>``)
FUSEDRL_VERL_LOSS_MODES = ("vanilla", "gspo", "clip_cov", "kl_cov", "gpg", "cispo")
_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _get(cfg, name: str, default=None):
    """Field of a verl config (dataclass ``BaseConfig``, omegaconf ``DictConfig`` or dict)."""
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        v = cfg.get(name, default)
    else:
        try:
            v = getattr(cfg, name)
        except (AttributeError, KeyError):
            get = getattr(cfg, "get", None)
            v = get(name, default) if callable(get) else default
    return default if v is None else v


def policy_loss_config_from_verl(config, loss_mode: Optional[str] = None, loss_agg_mode: Optional[str] = None,
                                 response_mask: Optional[Tensor] = None) -> Tuple[PolicyLossConfig, Dict[str, Any]]:
    """:class:`fusedrl.PolicyLossConfig` + normalisers from a verl actor config.

    ``loss_mode`` / ``loss_agg_mode`` default to the config's (``policy_loss.loss_mode`` without a
    ``fusedrl_`` prefix; ``loss_agg_mode``). The normalisers reproduce verl's ``agg_loss`` with the
    config's ``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
    ``loss_scale_factor``): pass ``**normalisers`` to :func:`fusedrl.policy_loss`.
    """
    pl = _get(config, "policy_loss")
    mode = loss_mode or _get(pl, "loss_mode", "vanilla")
    if mode.startswith("fusedrl_"):
        mode = mode[len("fusedrl_"):]
    agg = loss_agg_mode or _get(config, "loss_agg_mode", "token-mean")
    clip = float(_get(config, "clip_ratio", 0.2))
    low = float(_get(config, "clip_ratio_low", clip))
    high = float(_get(config, "clip_ratio_high", clip))
    c = _get(config, "clip_ratio_c", 3.0)
    cfg = PolicyLossConfig(
        loss_mode=mode, clip_ratio_low=low, clip_ratio_high=high,
        clip_ratio_c=float(c) if mode == "vanilla" else 3.0, loss_agg_mode=agg,
        clip_cov_ratio=float(_get(pl, "clip_cov_ratio", 2e-4)), clip_cov_lb=float(_get(pl, "clip_cov_lb", 1.0)),
        clip_cov_ub=float(_get(pl, "clip_cov_ub", 5.0)), kl_cov_ratio=float(_get(pl, "kl_cov_ratio", 2e-4)),
        ppo_kl_coef=float(_get(pl, "ppo_kl_coef", 0.1)))
    info = _get(config, "global_batch_info", {}) or {}
    dp = info.get("dp_size") or 1
    norms: Dict[str, Any] = {}
    if info.get("batch_num_tokens") is not None:
        norms["global_num_tokens"] = info["batch_num_tokens"] / dp
    if info.get("global_batch_size") is not None:
        norms["global_num_seqs"] = info["global_batch_size"] / dp
    if info.get("loss_scale_factor") is not None:
        norms["norm_len"] = info["loss_scale_factor"]
    elif response_mask is not None and response_mask.dim() == 2:
        norms["norm_len"] = response_mask.shape[-1]
    return cfg, norms


def _as_float(t) -> float:
    return float(t.detach().item()) if isinstance(t, torch.Tensor) else float(t)


def make_verl_policy_loss(loss_mode: str, fallback: Optional[Callable] = None, *, metrics_as_float: bool = True):
    """A verl ``PolicyLossFn`` computing fusedrl's ``loss_mode``.

    ``fallback``: verl's own loss, used for what fusedrl does not reproduce (``rollout_is_weights``,
    ``token-sum``). ``metrics_as_float``: return Python floats (verl's convention; a host sync) or
    0-dim tensors.
    """
    if loss_mode not in FUSEDRL_VERL_LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {FUSEDRL_VERL_LOSS_MODES}, got {loss_mode!r}")

    def fusedrl_policy_loss(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                            loss_agg_mode: str = "token-mean", config=None,
                            rollout_is_weights: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Any]]:
        if rollout_is_weights is not None or loss_agg_mode not in _AGG_MODES:
            if fallback is None:
                what = "rollout_is_weights" if rollout_is_weights is not None else f"loss_agg_mode={loss_agg_mode!r}"
                raise NotImplementedError(f"fusedrl_{loss_mode}: {what} is not supported")
            return fallback(old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages,
                            response_mask=response_mask, loss_agg_mode=loss_agg_mode, config=config,
                            rollout_is_weights=rollout_is_weights)
        cfg, norms = policy_loss_config_from_verl(config, loss_mode, loss_agg_mode, response_mask)
        loss, m = policy_loss(log_prob, old_log_prob, advantages, response_mask, config=cfg, **norms)
        keys = [("actor/pg_clipfrac", "pg_clipfrac"), ("actor/ppo_kl", "ppo_kl"),
                ("actor/pg_clipfrac_lower", "pg_clipfrac_lower")]
        if "cov_selected_frac" in m:
            keys.append(("actor/cov_selected_frac", "cov_selected_frac"))
        conv = _as_float if metrics_as_float else (lambda t: t)
        return loss, {name: conv(m[key]) for name, key in keys if key in m}

    fusedrl_policy_loss.__name__ = f"fusedrl_policy_loss_{loss_mode}"
    fusedrl_policy_loss.__qualname__ = fusedrl_policy_loss.__name__
    return fusedrl_policy_loss


def register_verl_policy_losses(prefix: str = "fusedrl_", override: bool = False,
                                modes=FUSEDRL_VERL_LOSS_MODES) -> List[str]:
    """Register fusedrl's losses in verl's policy-loss registry; returns the registered names.

    Names are ``prefix + mode``; with ``override=True`` verl's own entries (``vanilla``, ``gspo``, ...)
    are replaced as well (their original functions stay the fallback). Needs verl (imported here).
    """
    try:
        from verl.trainer.ppo import core_algos
    except ImportError as e:  # pragma: no cover - exercised only without verl
        raise ImportError(f"register_verl_policy_losses needs verl (`pip install verl`): {e}") from e
    registry = getattr(core_algos, "POLICY_LOSS_REGISTRY", {})
    names = []
    for mode in modes:
        original = registry.get(mode)
        if getattr(original, "_fusedrl", False):
            original = getattr(original, "_fusedrl_fallback", None)
        fn = make_verl_policy_loss(mode, fallback=original)
        fn._fusedrl = True
        fn._fusedrl_fallback = original
        for name in ([prefix + mode] + ([mode] if override else [])):
            core_algos.register_policy_loss(name)(fn)
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# fused log-prob / entropy for verl's actor
# --------------------------------------------------------------------------------------------------
def fused_linear_for_ppo(hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor, temperature: float = 1.0,
                         *, backend: str = "auto", process_group=None, **core_kwargs) -> Tuple[Tensor, Tensor]:
    """verl's ``FusedLinearForPPO.forward`` contract on fusedrl: ``(log_probs, entropy)`` fp32, shaped like
    ``input_ids`` (labels, already rolled by verl). Labels < 0 (ignore index) give log-prob 0."""
    from ..ops import linear_logprob_entropy

    labels = input_ids.long()
    ignore = labels < 0
    targets = torch.where(ignore, torch.zeros_like(labels), labels)
    h = hidden_states if hidden_states.dtype == vocab_weights.dtype else hidden_states.to(vocab_weights.dtype)
    logp, ent = linear_logprob_entropy(h, vocab_weights, targets, temperature=float(temperature), backend=backend,
                                       process_group=process_group, **core_kwargs)
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

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
        return fused_linear_for_ppo(hidden_states, vocab_weights, input_ids, temperature, backend=self.backend)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None, *, backend: str = "auto"):
    """Drop-in for ``verl.utils.kernel.linear_cross_entropy.linear_cross_entropy``: ``(log_probs, entropy)``
    per token (``reduction="none"``) or their sum / mean. ``dist_process_group``: vocab-parallel group."""
    logp, ent = fused_linear_for_ppo(hidden, weight, labels, temperature, backend=backend,
                                     process_group=dist_process_group)
    red = reduction.lower()
    if red == "none":
        return logp, ent
    if red == "sum":
        return logp.sum(), ent.sum()
    if red == "mean":
        return logp.mean(), ent.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")


_ORIGINALS: Dict[str, Any] = {}


def patch_verl(backend: str = "auto", losses: bool = True, kernels: bool = True) -> Dict[str, Any]:
    """Route verl through fusedrl: its fused-kernel forward (``use_fused_kernels=True``, both the torch
    and triton ``impl_backend``) and, with ``losses``, register the ``fusedrl_*`` policy losses.
    Returns what was patched. Idempotent; :func:`unpatch_verl` restores verl's functions."""
    import functools

    done: Dict[str, Any] = {}
    if kernels:
        import importlib

        tf = importlib.import_module("verl.utils.experimental.torch_functional")
        _ORIGINALS.setdefault("FusedLinearForPPO", tf.FusedLinearForPPO)

        class _Patched(FusedLinearForPPO):
            def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
                super().__init__(chunk_size, impl_backend, backend=backend)

        _Patched.__name__ = _Patched.__qualname__ = "FusedLinearForPPO"
        tf.FusedLinearForPPO = _Patched
        done["verl.utils.experimental.torch_functional.FusedLinearForPPO"] = _Patched
        try:
            lce = importlib.import_module("verl.utils.kernel.linear_cross_entropy")
        except Exception:  # the triton kernel module may not import everywhere
            lce = None
        if lce is not None:
            _ORIGINALS.setdefault("linear_cross_entropy", lce.linear_cross_entropy)
            lce.linear_cross_entropy = functools.partial(linear_cross_entropy, backend=backend)
            done["verl.utils.kernel.linear_cross_entropy.linear_cross_entropy"] = lce.linear_cross_entropy
    if losses:
        done["policy_losses"] = register_verl_policy_losses()
    return done


def unpatch_verl() -> None:
    """Undo :func:`patch_verl`'s kernel patches (registered losses stay registered)."""
    import importlib

    if "FusedLinearForPPO" in _ORIGINALS:
        importlib.import_module("verl.utils.experimental.torch_functional").FusedLinearForPPO = \
            _ORIGINALS.pop("FusedLinearForPPO")
    if "linear_cross_entropy" in _ORIGINALS:
        importlib.import_module("verl.utils.kernel.linear_cross_entropy").linear_cross_entropy = \
            _ORIGINALS.pop("linear_cross_entropy")
