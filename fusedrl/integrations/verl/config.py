"""verl's actor config read as verl 0.9.1 reads it: the policy-loss modes, the normalisers of ``agg_loss``,
rollout correction, and the entropy-control modes' keys in their forks' names."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...loss import PolicyLossConfig, RolloutCorrection

Tensor = torch.Tensor

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
#: fusedrl's entropy-control modes, registered for verl as ``fusedrl_<mode>`` too; their per-token inputs come as extra
#: keyword arguments of the loss function (see :func:`make_verl_policy_loss`), which verl's stock actor does not pass
VERL_ENTROPY_MODES = ("steer", "bapo", "rl_plus")
VERL_MODES = VERL_LOSS_MODES + VERL_ENTROPY_MODES
# the loss_mode names of the methods' own verl forks (STEER registers "entropy_control")
_MODE_ALIASES = {"entropy_control": "steer"}
VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
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


def config_field(cfg, name: str, default=None):
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
    upper, lower, mode = _is_threshold(_get_verl(rc, "rollout_is_threshold", 2.0, None))
    return RolloutCorrection(
        rollout_is=config_field(rc, "rollout_is", None),
        rollout_is_threshold=upper,
        rollout_is_threshold_lower=lower,
        rollout_is_mode=mode,
        rollout_is_batch_normalize=bool(config_field(rc, "rollout_is_batch_normalize", False)),
        rollout_rs=config_field(rc, "rollout_rs", None),
        rollout_rs_threshold=config_field(rc, "rollout_rs_threshold", None),
        loss_type=config_field(rc, "loss_type", "ppo_clip"),
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

    The entropy-control modes read their forks' keys: steer (``loss_mode`` ``steer`` or STEER's
    ``entropy_control``) ``policy_loss.token_weight_min`` / ``token_weight_max`` / ``linear`` (defaults 0.8 / 1.2 /
    True, the authors' run scripts) and ``policy_loss.steer_entropy`` / ``steer_exact``; bapo the BAPO recipe's
    ``policy_loss.adv_ratio_target``, ``ratio_{lower,upper}_{start,max,step}``, ``eps``; rl_plus the RL-PLUS
    actor's ``loss_remove_clip`` (default True: the unclipped on-policy term of the published run) and
    ``policy_loss.rl_plus_gamma`` (0.5). ``policy_loss.importance_sampling_level: segment`` (SSPO) takes one ratio
    per segment of ``segment_ids``.
    """
    pl = config_field(config, "policy_loss")
    mode = loss_mode or config_field(pl, "loss_mode", "vanilla")
    if mode.startswith("fusedrl_"):
        mode = mode[len("fusedrl_") :]
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in VERL_MODES:
        raise ValueError(f"loss_mode must be one of {VERL_MODES}, got {mode!r}")
    agg = loss_agg_mode or config_field(config, "loss_agg_mode", "token-mean")
    if mode in ("sapo", "geo_mean"):  # verl aggregates these seq-mean-token-mean whatever loss_agg_mode says
        agg = "seq-mean-token-mean"
    clip = float(config_field(config, "clip_ratio", 0.2))
    kw: dict[str, Any] = dict(
        loss_mode=mode,
        loss_agg_mode=agg,
        clip_ratio_low=float(config_field(config, "clip_ratio_low", clip)),
        clip_ratio_high=float(config_field(config, "clip_ratio_high", clip)),
        clip_cov_ratio=float(_get_verl(pl, "clip_cov_ratio", 2e-4, 2e-4)),
        clip_cov_lb=float(_get_verl(pl, "clip_cov_lb", 1.0, 1.0)),
        clip_cov_ub=float(_get_verl(pl, "clip_cov_ub", 5.0, 5.0)),
        kl_cov_ratio=float(_get_verl(pl, "kl_cov_ratio", 2e-4, 2e-4)),
        ppo_kl_coef=float(_get_verl(pl, "ppo_kl_coef", 0.1, 1.0)),
    )
    if mode in ("vanilla", "bypass_mode", "steer", "bapo"):
        kw["clip_ratio_c"] = float(config_field(config, "clip_ratio_c", 3.0))
    elif mode in ("dppo_tv", "dppo_kl"):
        kw["clip_ratio_c"] = float(config_field(config, "clip_ratio_c", 20.0))
    if mode == "sapo":
        kw.update(
            tau_pos=float(config_field(config, "tau_pos", 1.0)), tau_neg=float(config_field(config, "tau_neg", 1.05))
        )
    if mode == "dro":
        beta = config_field(pl, "dro_beta", None)
        if beta is None or beta <= 0:
            raise ValueError("policy_loss.dro_beta must be a positive value when using DRO")
        kw["dro_beta"] = float(beta)
    if mode == "bypass_mode":
        rc = config_field(pl, "rollout_correction", None)
        if rc is None:
            raise ValueError(
                "rollout_correction config not found in policy_loss. When using "
                "loss_mode='bypass_mode', ensure rollout_correction config is passed."
            )
        kw["rollout_correction"] = rollout_correction_from_verl(rc)
    kw.update(_entropy_control_fields(mode, config, pl))
    if mode == "geo_mean":  # verl: torch.mean over the rows of the micro-batch, global_batch_info unused
        norms = {} if response_mask is None else {"global_num_seqs": max(int(response_mask.shape[0]), 1)}
    else:
        norms = verl_normalisers(config_field(config, "global_batch_info", {}), agg, response_mask)
    return PolicyLossConfig(**kw), norms


def _entropy_control_fields(mode: str, config, pl) -> dict[str, Any]:
    """The config fields of the entropy-control modes, read from their forks' verl keys."""
    kw: dict[str, Any] = {}
    if mode == "steer":
        kw.update(
            steer_lambda_min=float(config_field(pl, "token_weight_min", 0.8)),
            steer_lambda_max=float(config_field(pl, "token_weight_max", 1.2)),
            steer_weighting="linear" if bool(config_field(pl, "linear", True)) else "exp",
            steer_entropy=str(config_field(pl, "steer_entropy", "old")),
            steer_exact=bool(config_field(pl, "steer_exact", False)),
        )
    elif mode == "bapo":
        kw.update(
            bapo_adv_ratio_target=float(config_field(pl, "adv_ratio_target", 1.0)),
            bapo_ratio_lower_step=float(config_field(pl, "ratio_lower_step", 0.05)),
            bapo_ratio_upper_step=float(config_field(pl, "ratio_upper_step", 0.05)),
            bapo_eps=float(config_field(pl, "eps", 1e-8)),
        )
        for k in ("ratio_lower_start", "ratio_lower_max", "ratio_upper_start", "ratio_upper_max"):
            v = config_field(pl, k, None)
            kw["bapo_" + k] = None if v is None else float(v)
    elif mode == "rl_plus":
        kw.update(
            rl_plus_clip_on_policy=not bool(config_field(config, "loss_remove_clip", True)),
            rl_plus_gamma=float(config_field(pl, "rl_plus_gamma", 0.5)),
        )
    level = config_field(pl, "importance_sampling_level", None)
    if level is not None:
        kw["importance_sampling_level"] = str(level)
    return kw
