"""fusedrl's losses as verl ``PolicyLossFn``s, and their registration in verl's registry."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ...loss import PolicyLossConfig, policy_loss
from .config import VERL_AGG_MODES, VERL_LOSS_MODES, VERL_MODES, config_field, policy_loss_config_from_verl

Tensor = torch.Tensor

# the per-token inputs a loss function takes as keyword arguments: the forks' batch keys -> fusedrl's arguments
_SIDE_ALIASES = {"entropys": "old_entropy", "prefix_mask": "external_mask"}
_SIDE_INPUTS = ("old_entropy", "entropy", "entropy_change", "external_mask", "behaviour_logp", "segment_ids")

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
    "steer": _CLIP3,
    "bapo": _CLIP3,
    "rl_plus": ("pg_clipfrac", "ppo_kl"),
}
# fusedrl's mode metrics -> the keys the methods' forks log (each under actor/)
_MODE_METRIC_KEYS = {
    "steer/weight_mean": "token_weights_mean",
    "steer/weight_min": "token_weights_min",
    "steer/weight_max": "token_weights_max",
    "bapo/clip_low": "bapo/clip_low",
    "bapo/clip_high": "bapo/clip_high",
    "bapo/pos_neg_ratio": "bapo/pos_neg_ratio",
    "bapo/search_steps": "bapo/search_steps",
    "rl_plus/on_pg_loss": "on_pg_loss",
    "rl_plus/off_pg_loss": "off_pg_loss",
    "rl_plus/off_ratio_mean": "off_ratio_mean",
    "rl_plus/off_policy_prob": "off_policy_prob",
    "rl_plus/on_policy_prob": "on_policy_prob",
}


def _side_inputs(kwargs: dict[str, Any]) -> dict[str, Tensor]:
    """The per-token inputs passed to a verl loss function, under fusedrl's names (the forks' batch keys accepted:
    ``entropys`` is STEER's old entropy, ``prefix_mask`` RL-PLUS's external tokens, ``target_probs`` its behaviour
    probabilities)."""
    out: dict[str, Tensor] = {}
    for k, v in kwargs.items():
        if v is None:
            continue
        if k == "target_probs":
            name, v = "behaviour_logp", torch.log(v)
        else:
            name = _SIDE_ALIASES.get(k, k)
        if name not in _SIDE_INPUTS:
            known = _SIDE_INPUTS + tuple(_SIDE_ALIASES) + ("target_probs",)
            raise TypeError(f"unexpected keyword argument {k!r}: the per-token inputs are {known}")
        if name in out:
            raise TypeError(f"{k!r} and another alias of {name!r} were both given")
        out[name] = v
    return out


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
    ``actor/cov_selected_frac`` for the covariance modes and the forks' keys for the entropy-control modes
    (``actor/token_weights_mean``, ``actor/bapo/clip_low``, ``actor/off_pg_loss``, ...).

    Per-token inputs verl's stock actor does not pass are keyword arguments (a custom actor passes them):
    ``old_entropy`` (or STEER's batch key ``entropys``), ``entropy``, ``entropy_change``, ``external_mask`` (or
    RL-PLUS's ``prefix_mask``), ``behaviour_logp`` (or RL-PLUS's ``target_probs``, probabilities) and
    ``segment_ids``. A mode that needs one raises a ``ValueError`` naming it when it is missing.
    """
    if loss_mode not in VERL_MODES:
        raise ValueError(f"loss_mode must be one of {VERL_MODES}, got {loss_mode!r}")

    def fusedrl_policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: Optional[Tensor] = None,
        **per_token: Optional[Tensor],
    ) -> tuple[Tensor, dict[str, Any]]:
        if loss_agg_mode not in VERL_AGG_MODES:
            raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
        cfg, norms = policy_loss_config_from_verl(config, loss_mode, loss_agg_mode, response_mask)
        scale = None
        if cfg.loss_agg_mode == "token-sum":
            dp = int((config_field(config, "global_batch_info", {}) or {}).get("dp_size") or 1)
            scale = dp if dp > 1 else None  # verl: masked_sum * dp_size
        extra: dict[str, Any] = _side_inputs(per_token)
        if rollout_is_weights is not None and loss_mode != "bypass_mode":  # verl's bypass ignores them too
            extra["rollout_is_weights"] = rollout_is_weights
        loss, m = policy_loss(log_prob, old_log_prob, advantages, response_mask, config=cfg, **norms, **extra)
        if scale is not None:
            loss = loss * scale
        conv = _as_float if metrics_as_float else (lambda t: t)
        out = {f"actor/{k}": conv(m[k]) for k in _verl_metric_keys(loss_mode, cfg) if k in m}
        if "cov_selected_frac" in m:
            out["actor/cov_selected_frac"] = conv(m["cov_selected_frac"])
        for k, key in _MODE_METRIC_KEYS.items():
            if k in m:
                out["actor/" + key] = conv(m[k])
        for k, v in m.items():
            if k.startswith("rollout_corr/"):
                out[k] = conv(v)
        return loss, out

    fusedrl_policy_loss.__name__ = f"fusedrl_policy_loss_{loss_mode}"
    fusedrl_policy_loss.__qualname__ = fusedrl_policy_loss.__name__
    return fusedrl_policy_loss


def register_verl_policy_losses(prefix: str = "fusedrl_", override: bool = False, modes=VERL_MODES) -> list[str]:
    """Register fusedrl's losses in verl's policy-loss registry; returns the registered names.

    Names are ``prefix + mode``; with ``override=True`` verl's own entries (``vanilla``, ``gspo``, ...)
    are replaced as well (the originals are kept on the new function as ``_fusedrl_original``). Needs
    verl (imported here: only ``verl.trainer.ppo.core_algos``). Calling it again re-registers the same names.
    """
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a str, got {prefix!r}")
    unknown = [m for m in modes if m not in VERL_MODES]
    if isinstance(modes, str) or unknown:
        raise ValueError(f"modes must be a sequence of names from {VERL_MODES}, got {modes!r}")
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
        for name in [prefix + mode] + ([mode] if override and mode in VERL_LOSS_MODES else []):
            core_algos.register_policy_loss(name)(fn)
            names.append(name)
    return names
