"""Rollout correction: importance weights and rejection masks for the training / inference mismatch.

Semantics follow verl's ``verl/trainer/ppo/rollout_corr_helper.py``
(``compute_rollout_correction_and_rejection_mask``): importance-sampling (IS) weights
``pi_train / pi_rollout`` per token or per sequence, truncated from above; rejection sampling (RS) with
chained divergence filters; verl's metric names under ``rollout_corr/``. Everything runs on the device
with no host sync (counts stay tensors; max / min over an empty set are 0).

Layer: loss head. The loss package's config and composition import this module (never the other way
round); the few per-sequence reductions come in through the ``seg`` object (``seq_sum``, ``seq_max``,
``expand``).

Where verl reduces over "rows" (``mean over the batch dimension``), fusedrl reduces over the sequences
with at least one valid token: identical on batches without fully masked rows, and it also covers
packed inputs. Two options beyond verl express TRL's vLLM correction (``rollout_is_threshold_lower``,
``rollout_is_mode``); see :class:`RolloutCorrection`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .._validate import as_number, is_real
from ..backends.base import LOG_RATIO_CLAMP

__all__ = ["RolloutCorrection", "RS_OPTIONS", "ROLLOUT_IS_LEVELS", "ROLLOUT_LOSS_TYPES", "ROLLOUT_IS_MODES"]

#: log-ratio clamp of every exponentiation (verl's SAFETY_BOUND)
SAFETY_BOUND = LOG_RATIO_CLAMP
ROLLOUT_IS_LEVELS = ("token", "sequence")
ROLLOUT_IS_MODES = ("truncate", "mask")
ROLLOUT_LOSS_TYPES = ("ppo_clip", "reinforce")
#: verl's rejection-sampling options (``rollout_rs``, comma separated for a chain: every one must pass)
RS_OPTIONS = (
    "token_k1",
    "token_k2",
    "token_k3",
    "seq_sum_k1",
    "seq_sum_k2",
    "seq_sum_k3",
    "seq_mean_k1",
    "seq_mean_k2",
    "seq_mean_k3",
    "seq_max_k2",
    "seq_max_k3",
)
_TOKEN_RS = ("token_k1", "token_k2", "token_k3")
#: IS metrics: ``mean`` / ``max`` / ``min`` / ``std`` / ``eff_sample_size`` / ``seq_*`` of the applied weights (after
#: truncation or masking, before batch normalisation); ``ratio_fraction_*`` / ``seq_fraction_*`` of the raw ones
#: (verl's ``compute_is_metrics``; sequence level: ``max`` / ``min`` / ``ratio_fraction_*`` from the log ratio)
_IS_METRICS = (
    "rollout_is_mean",
    "rollout_is_max",
    "rollout_is_min",
    "rollout_is_std",
    "rollout_is_eff_sample_size",
    "rollout_is_ratio_fraction_high",
    "rollout_is_ratio_fraction_low",
    "rollout_is_seq_mean",
    "rollout_is_seq_std",
    "rollout_is_seq_max",
    "rollout_is_seq_min",
    "rollout_is_seq_max_deviation",
    "rollout_is_seq_fraction_high",
    "rollout_is_seq_fraction_low",
)
#: per rejection option (verl's ``compute_rs_metrics``; ``seq_fraction_low`` only for the k1 options)
_RS_OPTION_METRICS = (
    "mean",
    "max",
    "min",
    "fraction_high",
    "fraction_low",
    "std",
    "seq_mean",
    "seq_std",
    "seq_max",
    "seq_min",
    "seq_max_deviation",
    "seq_fraction_high",
    "seq_fraction_low",
    "masked_fraction",
    "seq_masked_fraction",
)
_OFFPOLICY_METRICS = (
    "kl",
    "k3_kl",
    "training_ppl",
    "training_log_ppl",
    "rollout_ppl",
    "rollout_log_ppl",
    "log_ppl_diff",
    "log_ppl_abs_diff",
    "log_ppl_diff_max",
    "log_ppl_diff_min",
    "ppl_ratio",
    "chi2_token",
    "chi2_seq",
)
PREFIX = "rollout_corr/"


class _RSSpec:
    """One parsed rejection option: ``keep = lower <= stat <= upper`` (k1: log bounds on ``-log ratio``)."""

    __slots__ = ("name", "lower", "upper")

    def __init__(self, name: str, lower: Optional[float], upper: float):
        self.name, self.lower, self.upper = name, lower, upper

    def __repr__(self) -> str:
        return f"_RSSpec({self.name!r}, {self.lower!r}, {self.upper!r})"


def _parse_rs(options: Optional[str], spec) -> tuple[_RSSpec, ...]:
    """verl's ``rollout_rs`` / ``rollout_rs_threshold`` syntax: options ``"token_k1,seq_mean_k3"``; one
    threshold shared by all options or one per option (``"0.5_2.0,0.1"``); k1 options take
    ``lower_upper`` ratio bounds (a single value ``u`` means ``1/u _ u``), the others one upper bound."""
    if options is None:
        if spec is not None:
            raise ValueError("rollout_rs_threshold is set but rollout_rs is None (no rejection option to apply)")
        return ()
    if not isinstance(options, str):
        raise ValueError(f"rollout_rs must be None or a comma separated string of {RS_OPTIONS}, got {options!r}")
    names: list[str] = []
    for opt in (o.strip() for o in options.split(",")):
        if not opt:
            continue
        if opt not in RS_OPTIONS:
            raise ValueError(f"rollout_rs: invalid option {opt!r}; options are {RS_OPTIONS}")
        if opt not in names:
            names.append(opt)
    if not names:
        raise ValueError(f"rollout_rs must name at least one option of {RS_OPTIONS}, got {options!r}")
    if spec is None:
        raise ValueError("rollout_rs_threshold must be given when rollout_rs is set")
    if is_real(spec):
        raw = [str(spec)]
    elif isinstance(spec, str):
        raw = [p.strip() for p in spec.split(",") if p.strip()]
    else:
        raise ValueError(f"rollout_rs_threshold must be a string or a number, got {spec!r}")
    if len(raw) not in (1, len(names)):
        raise ValueError(
            f"rollout_rs_threshold needs one threshold for all options or one per option "
            f"({len(names)} for {names}), got {spec!r}"
        )
    raw = raw * len(names) if len(raw) == 1 else raw
    out = []
    for name, s in zip(names, raw):
        try:
            if name.endswith("k1"):
                lo_s, hi_s = s.split("_", 1) if "_" in s else (None, s)
                hi = float(hi_s)
                lo = 1.0 / hi if lo_s is None else float(lo_s)
            else:
                if "_" in s:
                    raise ValueError(f"rollout_rs_threshold for {name!r} takes one upper bound, got {s!r}")
                lo, hi = None, float(s)
        except ValueError as exc:
            if "takes one upper bound" in str(exc):
                raise
            raise ValueError(f"rollout_rs_threshold: invalid number {s!r} for option {name!r}") from None
        if not hi > 0 or (lo is not None and not lo > 0) or math.isnan(hi):
            raise ValueError(f"rollout_rs_threshold for {name!r} must be positive, got {s!r}")
        if name.endswith("k1"):
            out.append(_RSSpec(name, math.log(lo), math.log(hi)))
        else:
            out.append(_RSSpec(name, None, hi))
    return tuple(out)


@dataclass
class RolloutCorrection:
    """Correction for the mismatch between the rollout engine and the trainer (verl ``rollout_correction``).

    ==========================  ===========  =====================================================
    field                       default      meaning
    ==========================  ===========  =====================================================
    rollout_is                  None         IS weights ``pi_train / pi_rollout`` per ``"token"`` or
                                             per ``"sequence"`` (product over the sequence); None: off
    rollout_is_threshold        2.0          upper bound ``C_max`` of the weights (None: IS off, as
                                             verl; ``math.inf``: no upper bound)
    rollout_is_batch_normalize  False        divide the weights by their mean (tokens, or sequences),
                                             over the local batch or ``stats_group``
    rollout_rs                  None         rejection options, e.g. ``"token_k1,seq_mean_k3"``
    rollout_rs_threshold        None         ``"0.5_2.0,0.1"``: per option (or one shared) threshold
    loss_type                   "ppo_clip"   ``loss_mode="bypass_mode"`` only: ``"ppo_clip"`` or
                                             ``"reinforce"``
    rollout_is_threshold_lower  None         fusedrl: lower bound ``C_min`` (TRL's
                                             ``vllm_importance_sampling_clip_min``)
    rollout_is_mode             "truncate"   fusedrl: ``"truncate"`` clamps the weights to
                                             ``[C_min, C_max]`` (verl: ``C_max`` only); ``"mask"``
                                             sets weights outside ``[C_min, C_max]`` to 0 (TRL MIS)
    ==========================  ===========  =====================================================

    Decoupled mode (any ``loss_mode`` but ``"bypass_mode"``; needs ``policy_loss(rollout_logp=...)``):
    the log ratio is ``old_logp - rollout_logp``; the detached IS weights multiply the per-token policy
    loss (GMPO takes their geometric mean per sequence, VESPO folds them into its sequence weight, as
    their hosts do); the rejection mask ANDs into ``mask`` (the rejected tokens leave the loss, its
    default denominators and every actor metric). Bypass mode (``loss_mode="bypass_mode"``): ``old_logp``
    *is* the rollout's and the log ratio is ``logp - old_logp`` (current policy, detached); ``"ppo_clip"``
    is the clipped surrogate on that ratio (IS weights only reported), ``"reinforce"`` is
    ``-A * w * logp`` with the IS weights ``w``.

    Rejection statistics (``lr = clamp(log ratio, -20, 20)``, ``k1 = -lr``, ``k2 = lr^2 / 2``,
    ``k3 = exp(lr) - 1 - lr``): ``token_k*`` per token, ``seq_sum_k*`` / ``seq_mean_k*`` / ``seq_max_k*``
    per sequence. k1 options keep ``log(lower) <= stat <= log(upper)`` (verl's convention: the bounds
    apply to ``pi_rollout / pi_train``); the others keep ``stat <= upper``.

    Mapping of TRL 1.16 ``GRPOConfig`` options (decoupled mode, ``rollout_logp`` = vLLM's
    ``sampling_per_token_logps``, ``old_logp`` = TRL's ``old_per_token_logps``):

    ==============================================  ======================================================
    TRL                                             RolloutCorrection
    ==============================================  ======================================================
    ``vllm_importance_sampling_mode="token_truncate"``  ``rollout_is="token"``, ``rollout_is_mode="truncate"``
    ``"sequence_truncate"``                         ``rollout_is="sequence"``, ``rollout_is_mode="truncate"``
    ``"token_mask"`` (MIS, IcePop-style)            ``rollout_is="token"``, ``rollout_is_mode="mask"``
    ``"sequence_mask"`` (TRL's default)             ``rollout_is="sequence"``, ``rollout_is_mode="mask"``
    ``vllm_importance_sampling_clip_max=C``         ``rollout_is_threshold=C`` (``None`` -> ``math.inf``)
    ``vllm_importance_sampling_clip_min=c``         ``rollout_is_threshold_lower=c``
    ``vllm_importance_sampling_correction=False``   ``rollout_correction=None``
    ``off_policy_mask_threshold=d`` (OPSM)          ``PolicyLossConfig(off_policy_mask_threshold=d)``
                                                    (not a RolloutCorrection field: it reads the current
                                                    policy, drops only A < 0 sequences, and keeps them in
                                                    the denominator)
    IcePop (mask tokens, ratio outside [a, b])      ``rollout_is="token"``, ``rollout_is_mode="mask"``,
                                                    ``rollout_is_threshold_lower=a``,
                                                    ``rollout_is_threshold=b`` (weights inside stay the
                                                    ratio, as TRL); verl-style hard rejection instead:
                                                    ``rollout_rs="token_k1"``, ``rollout_rs_threshold=
                                                    "{1/b}_{1/a}"`` (rejected tokens leave the denominator)
    ==============================================  ======================================================

    TRL exponentiates without the ``[-20, 20]`` clamp: results differ only where a log ratio exceeds 20.

    Metrics (:meth:`metric_names`) are verl 0.9.1's, with its values: IS statistics of the applied weights
    (truncated, or zeroed by ``"mask"``, before batch normalisation), bound fractions of the raw ratios,
    ``rollout_is_oob_ratio`` in ``"mask"`` mode; per rejection option its statistic's mean / max / min /
    std / fractions and per-sequence summary. Where verl would report NaN or divide by zero (no valid
    token; every IS weight zeroed: ``rollout_is_eff_sample_size``) the metric is 0.
    """

    rollout_is: Optional[str] = None
    rollout_is_threshold: Optional[float] = 2.0
    rollout_is_batch_normalize: bool = False
    rollout_rs: Optional[str] = None
    rollout_rs_threshold: Union[str, float, None] = None
    loss_type: str = "ppo_clip"
    rollout_is_threshold_lower: Optional[float] = None
    rollout_is_mode: str = "truncate"

    def __post_init__(self) -> None:
        for name in ("rollout_is_threshold", "rollout_is_threshold_lower", "rollout_rs_threshold"):
            if not isinstance(getattr(self, name), str):  # numpy numbers, one-element tensors: Python numbers
                setattr(self, name, as_number(name, getattr(self, name)))
        if self.rollout_is is not None and self.rollout_is not in ROLLOUT_IS_LEVELS:
            raise ValueError(f"rollout_is must be None or one of {ROLLOUT_IS_LEVELS}, got {self.rollout_is!r}")
        thr = self.rollout_is_threshold
        if thr is not None and (not is_real(thr) or math.isnan(thr) or not thr > 0):
            raise ValueError(
                f"rollout_is_threshold must be a positive number (math.inf: no upper bound) or None, got {thr!r}"
            )
        lo = self.rollout_is_threshold_lower
        if lo is not None:
            if not is_real(lo) or math.isnan(lo) or math.isinf(lo) or lo < 0:
                raise ValueError(f"rollout_is_threshold_lower must be a finite number >= 0 or None, got {lo!r}")
            if thr is not None and not lo < thr:
                raise ValueError(f"rollout_is_threshold_lower ({lo}) must be < rollout_is_threshold ({thr})")
        if not isinstance(self.rollout_is_batch_normalize, bool):
            raise ValueError(f"rollout_is_batch_normalize must be a bool, got {self.rollout_is_batch_normalize!r}")
        if self.loss_type not in ROLLOUT_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {ROLLOUT_LOSS_TYPES}, got {self.loss_type!r}")
        if self.rollout_is_mode not in ROLLOUT_IS_MODES:
            raise ValueError(f"rollout_is_mode must be one of {ROLLOUT_IS_MODES}, got {self.rollout_is_mode!r}")
        # parsed once; a plain attribute (not a dataclass field: asdict / replace stay the user's fields)
        self._rs = _parse_rs(self.rollout_rs, self.rollout_rs_threshold)

    @property
    def is_enabled(self) -> bool:
        """IS weights are computed (verl: ``rollout_is`` and ``rollout_is_threshold`` both set)."""
        return self.rollout_is is not None and self.rollout_is_threshold is not None

    @property
    def rs_specs(self) -> tuple[_RSSpec, ...]:
        return self._rs

    @property
    def token_level(self) -> bool:
        """Every weight and rejection decision depends on its own token only."""
        return (not self.is_enabled or self.rollout_is == "token") and all(s.name in _TOKEN_RS for s in self._rs)

    def metric_names(self) -> tuple[str, ...]:
        """The ``rollout_corr/...`` metric keys, in order."""
        names: list[str] = []
        if self.is_enabled:
            names += _IS_METRICS
            if self.rollout_is_mode == "mask":  # verl: IcePop's share of zeroed weights
                names.append("rollout_is_oob_ratio")
            if self.rollout_is_batch_normalize:
                names.append("rollout_is_batch_norm_factor")
        if self._rs:
            for s in self._rs:
                names += [
                    f"rollout_rs_{s.name}_{m}"
                    for m in _RS_OPTION_METRICS
                    if m != "seq_fraction_low" or s.name.endswith("k1")
                ]
            names += ["rollout_rs_masked_fraction", "rollout_rs_seq_masked_fraction"]
        names += _OFFPOLICY_METRICS
        return tuple(PREFIX + n for n in names)


def as_rollout_correction(value) -> Optional[RolloutCorrection]:
    """``RolloutCorrection``, a dict of its fields (a config that went through JSON), or None."""
    if value is None or isinstance(value, RolloutCorrection):
        return value
    if isinstance(value, dict):
        return RolloutCorrection(**value)
    raise ValueError(
        f"rollout_correction must be a fusedrl.RolloutCorrection (or a dict of its fields) or None, "
        f"got {type(value).__name__}"
    )


# --------------------------------------------------------------------------------------------------
# Computation (all tensors flat [N]; values at invalid positions are 0 and never read)
# --------------------------------------------------------------------------------------------------

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _where0(cond: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, x, torch.zeros_like(x))


def _mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``m`` (bool), 0 when empty."""
    n = m.sum()
    return _where0(m, x).sum() / n.clamp_min(1).to(x.dtype)


def _max(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return x.new_zeros(())
    v = torch.where(m, x, torch.full_like(x, -math.inf)).amax()
    return torch.where(m.any(), v, torch.zeros_like(v))


def _min(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return -_max(-x, m)


def _std(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation (``torch.std``: ``n - 1``) of ``x`` over ``m``, 0 for fewer than 2 values."""
    n = m.sum()
    d = _where0(m, x - _mean(x, m))
    var = d.square().sum() / (n - 1).clamp_min(1).to(x.dtype)
    return torch.where(n > 1, var.sqrt(), torch.zeros_like(var))


def _pop_std(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """verl's ``sqrt(E[x^2] - E[x]^2)`` over ``m`` (clamped at 0), 0 for fewer than 2 values. The means divide
    by ``count + 1e-8`` as verl's ``masked_mean``: the cancellation turns that epsilon into a visible std
    (``|x| sqrt(1e-8 / count)``, float64) when every value is equal, e.g. all truncated."""
    n = m.sum().to(x.dtype) + 1e-8
    var = (_where0(m, x.square()).sum() / n - (_where0(m, x).sum() / n).square()).clamp_min(0.0)
    return torch.where(m.sum() > 1, var.sqrt(), torch.zeros_like(var))


def _seq_summary(metrics: dict[str, torch.Tensor], p: str, x: torch.Tensor, m: torch.Tensor, centre: float) -> None:
    """``{p}seq_mean / seq_std / seq_max / seq_min / seq_max_deviation`` of per-sequence values ``x`` over ``m``
    (deviation: ``max |x - centre|``)."""
    metrics[p + "seq_mean"] = _mean(x, m)
    metrics[p + "seq_std"] = _std(x, m)
    metrics[p + "seq_max"] = _max(x, m)
    metrics[p + "seq_min"] = _min(x, m)
    metrics[p + "seq_max_deviation"] = _max((x - centre).abs(), m)


class RolloutTerms:
    """Result of :func:`rollout_terms`: detached IS weights (or None), the rejection keep-mask (or None)
    and the metrics (``{name: 0-dim tensor}``, empty when not asked)."""

    __slots__ = ("weights", "keep", "metrics")

    def __init__(self, weights, keep, metrics):
        self.weights, self.keep, self.metrics = weights, keep, metrics


def rollout_terms(
    rc: RolloutCorrection,
    train_lp: torch.Tensor,
    rollout_lp: torch.Tensor,
    valid: torch.Tensor,
    seg,
    with_metrics: bool,
    reduce: Optional[Reduce] = None,
) -> RolloutTerms:
    """IS weights, rejection mask and metrics from ``log ratio = train_lp - rollout_lp`` (detached, 0 at
    invalid positions). ``seg``: per-sequence reductions of the batch; ``reduce``: all-reduce (sum) of a
    small tensor over ``stats_group`` (batch normalisation), identity when None."""
    with torch.no_grad():
        dt = train_lp.dtype
        lr = _where0(valid, train_lp - rollout_lp)
        lr_c = lr.clamp(-SAFETY_BOUND, SAFETY_BOUND)
        vf = valid.to(dt)
        n_tok = seg.seq_sum(vf)  # [B] valid tokens per sequence
        seq_valid = n_tok > 0
        metrics: dict[str, torch.Tensor] = {}
        weights = keep = None
        if rc.is_enabled:
            weights = _is_weights(rc, lr, lr_c, valid, vf, n_tok, seq_valid, seg, metrics, with_metrics, reduce)
        if rc.rs_specs:
            keep = _rs_keep(rc, lr_c, valid, vf, n_tok, seq_valid, seg, metrics, with_metrics)
        if with_metrics:
            _offpolicy_metrics(train_lp, rollout_lp, lr, lr_c, valid, n_tok, seq_valid, seg, metrics)
            metrics = {name: metrics[name[len(PREFIX) :]].float() for name in rc.metric_names()}
        return RolloutTerms(weights, keep, metrics)


def _is_weights(rc, lr, lr_c, valid, vf, n_tok, seq_valid, seg, metrics, with_metrics, reduce):
    thr = float(rc.rollout_is_threshold)
    lower = rc.rollout_is_threshold_lower
    if rc.rollout_is == "token":
        log_w = lr_c
    else:  # product of the sequence's token ratios, clamped in log space
        log_seq = seg.seq_sum(lr)
        log_w = seg.expand(log_seq.clamp(-SAFETY_BOUND, SAFETY_BOUND))
    raw = _where0(valid, torch.exp(log_w))
    if rc.rollout_is_mode == "truncate":
        w = raw.clamp(min=lower, max=thr) if lower is not None else raw.clamp(max=thr)
    else:  # TRL's masked IS / verl's IcePop: weights outside [C_min, C_max] become 0
        out = raw > thr
        if lower is not None:
            out = out | (raw < lower)
        w = _where0(~out, raw)
    w = _where0(valid, w)
    if with_metrics:
        _is_metrics(rc, raw, w, log_seq if rc.rollout_is == "sequence" else None, valid, n_tok, seq_valid, seg, metrics)
    if rc.rollout_is_batch_normalize:
        if rc.rollout_is == "token":
            s = torch.stack([w.sum(), vf.sum()])
        else:
            seq_w = seg.seq_sum(w) / (n_tok + 1e-8)
            s = torch.stack([_where0(seq_valid, seq_w).sum(), seq_valid.to(w.dtype).sum()])
        if reduce is not None:
            s = reduce(s)
        mean = s[0] / s[1].clamp_min(1)
        factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
        w = w / factor
        if with_metrics:  # 0 for an empty batch, as every metric
            metrics["rollout_is_batch_norm_factor"] = torch.where(s[1] > 0, factor, torch.zeros_like(factor))
    return w


def _is_metrics(rc, raw, w, log_seq, valid, n_tok, seq_valid, seg, metrics):
    """verl's ``compute_is_metrics``: statistics of the applied weights ``w`` (IcePop's zeros included, before
    batch normalisation), bound fractions of the raw ones; ``log_seq``: the sequence log ratios (sequence
    level), else None."""
    thr = float(rc.rollout_is_threshold)
    lower = rc.rollout_is_threshold_lower
    lo_m = lower if lower is not None else 1.0 / thr  # verl's default lower bound of the fractions
    dt = raw.dtype
    metrics["rollout_is_mean"] = _mean(w, valid)
    if log_seq is None:
        metrics["rollout_is_max"] = _max(w, valid)
        metrics["rollout_is_min"] = _min(w, valid)
        metrics["rollout_is_ratio_fraction_high"] = _mean((raw > thr).to(dt), valid)
        metrics["rollout_is_ratio_fraction_low"] = _mean((raw < lo_m).to(dt), valid)
    else:  # verl: from the sequence log ratios (max / min unclamped but for exp's overflow)
        metrics["rollout_is_max"] = torch.where(
            seq_valid.any(), torch.exp(_max(log_seq, seq_valid).clamp(max=SAFETY_BOUND)), raw.new_zeros(())
        )
        metrics["rollout_is_min"] = torch.where(seq_valid.any(), torch.exp(_min(log_seq, seq_valid)), raw.new_zeros(()))
        metrics["rollout_is_ratio_fraction_high"] = _mean((log_seq > math.log(thr)).to(dt), seq_valid)
        low_log = math.log(lo_m) if lo_m > 0 else -math.inf
        metrics["rollout_is_ratio_fraction_low"] = _mean((log_seq < low_log).to(dt), seq_valid)
    # w already lies in [0, C_max] (verl clamps it there for std and ESS)
    metrics["rollout_is_std"] = _pop_std(w, valid)
    q = _mean((w / (_mean(w, valid) + 1e-8)).square(), valid)
    # no weight left (empty batch, or every one masked to 0): 0, where verl divides by 0
    metrics["rollout_is_eff_sample_size"] = torch.where(
        q > 0, 1.0 / torch.where(q > 0, q, torch.ones_like(q)), torch.zeros_like(q)
    )
    _seq_summary(metrics, "rollout_is_", seg.seq_sum(w) / (n_tok + 1e-8), seq_valid, 1.0)
    raw_seq = seg.seq_sum(raw) / (n_tok + 1e-8)  # raw per-sequence means: the truncated ones never exceed C_max
    metrics["rollout_is_seq_fraction_high"] = _mean((raw_seq > thr).to(dt), seq_valid)
    metrics["rollout_is_seq_fraction_low"] = _mean((raw_seq < lo_m).to(dt), seq_valid)
    if rc.rollout_is_mode == "mask":
        oob = raw > thr
        if lower is not None:
            oob = oob | (raw < lower)
        metrics["rollout_is_oob_ratio"] = _mean(oob.to(dt), valid)


def _rs_keep(rc, lr_c, valid, vf, n_tok, seq_valid, seg, metrics, with_metrics):
    stats = {"k1": -lr_c, "k2": 0.5 * lr_c.square(), "k3": torch.exp(lr_c) - 1.0 - lr_c}
    keep = torch.ones_like(valid)
    dt = lr_c.dtype
    for spec in rc.rs_specs:
        k = spec.name[-2:]
        tok = _where0(valid, stats[k])
        if spec.name in _TOKEN_RS:
            level_tok, seq_stat = tok, None
        else:
            if spec.name.startswith("seq_sum"):
                seq_stat = seg.seq_sum(tok)
            elif spec.name.startswith("seq_mean"):
                seq_stat = seg.seq_sum(tok) / (n_tok + 1e-8)
            else:
                seq_stat = seg.seq_max(torch.where(valid, tok, torch.full_like(tok, -math.inf)))
                seq_stat = _where0(seq_valid, seq_stat)
            level_tok = seg.expand(seq_stat)
        ok = level_tok <= spec.upper
        if spec.lower is not None:
            ok = ok & (level_tok >= spec.lower)
        keep = keep & ok
        if with_metrics:  # verl's compute_rs_metrics
            p = f"rollout_rs_{spec.name}_"
            is_k1 = spec.lower is not None
            metrics[p + "mean"] = _mean(level_tok, valid)
            if seq_stat is None:
                metrics[p + "max"] = _max(level_tok, valid)
                metrics[p + "min"] = _min(level_tok, valid)
                metrics[p + "fraction_high"] = _mean((level_tok > spec.upper).to(dt), valid)
                low = (level_tok < spec.lower).to(dt) if is_k1 else torch.zeros_like(level_tok)
                metrics[p + "fraction_low"] = _mean(low, valid)
                seq_vals = seg.seq_sum(tok) / (n_tok + 1e-8)  # a token option's per-sequence means
            else:
                metrics[p + "max"] = _max(seq_stat, seq_valid)
                metrics[p + "min"] = _min(seq_stat, seq_valid)
                metrics[p + "fraction_high"] = _mean((seq_stat > spec.upper).to(dt), seq_valid)
                low = (seq_stat < spec.lower).to(dt) if is_k1 else torch.zeros_like(seq_stat)
                metrics[p + "fraction_low"] = _mean(low, seq_valid)
                seq_vals = seq_stat
            # token-weighted, on the statistic clamped to the option's bounds (k2 / k3: [0, upper])
            clamped = level_tok.clamp(min=spec.lower if is_k1 else 0.0, max=spec.upper)
            metrics[p + "std"] = _pop_std(clamped, valid)
            _seq_summary(metrics, p, seq_vals, seq_valid, 0.0)
            metrics[p + "seq_fraction_high"] = _mean((seq_vals > spec.upper).to(dt), seq_valid)
            if is_k1:
                metrics[p + "seq_fraction_low"] = _mean((seq_vals < spec.lower).to(dt), seq_valid)
            metrics[p + "masked_fraction"] = _mean((~ok).to(dt), valid)
            rejected = seg.seq_sum(((~ok) & valid).to(dt)) > 0
            metrics[p + "seq_masked_fraction"] = _mean(rejected.to(dt), seq_valid)
    if with_metrics:
        metrics["rollout_rs_masked_fraction"] = _mean((~keep).to(dt), valid)
        rejected = seg.seq_sum(((~keep) & valid).to(dt)) > 0
        metrics["rollout_rs_seq_masked_fraction"] = _mean(rejected.to(dt), seq_valid)
    return keep


def _offpolicy_metrics(train_lp, rollout_lp, lr, lr_c, valid, n_tok, seq_valid, seg, metrics):
    """verl's ``compute_offpolicy_metrics`` (per-sequence quantities over the non-empty sequences)."""
    tr = _where0(valid, train_lp)
    ro = _where0(valid, rollout_lp)
    metrics["kl"] = _mean(ro - tr, valid)
    metrics["k3_kl"] = _mean(torch.exp(lr) - lr - 1.0, valid)
    mean_tr = seg.seq_sum(tr) / (n_tok + 1e-8)
    mean_ro = seg.seq_sum(ro) / (n_tok + 1e-8)
    metrics["training_ppl"] = _mean(torch.exp(-mean_tr), seq_valid)
    metrics["training_log_ppl"] = _mean(-mean_tr, seq_valid)
    metrics["rollout_ppl"] = _mean(torch.exp(-mean_ro), seq_valid)
    metrics["rollout_log_ppl"] = _mean(-mean_ro, seq_valid)
    diff = mean_ro - mean_tr
    metrics["log_ppl_diff"] = _mean(diff, seq_valid)
    metrics["log_ppl_abs_diff"] = _mean(diff.abs(), seq_valid)
    metrics["log_ppl_diff_max"] = _max(diff, seq_valid)
    metrics["log_ppl_diff_min"] = _min(diff, seq_valid)
    metrics["ppl_ratio"] = _mean(torch.exp(diff), seq_valid)
    any_tok = valid.any()
    chi2_t = _mean(torch.exp(lr_c).square(), valid) - 1.0
    metrics["chi2_token"] = torch.where(any_tok, chi2_t, torch.zeros_like(chi2_t))
    log_seq = seg.seq_sum(lr).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    chi2_s = _mean(torch.exp(2.0 * log_seq), seq_valid) - 1.0
    metrics["chi2_seq"] = torch.where(any_tok, chi2_s, torch.zeros_like(chi2_s))
