"""RL policy-loss head: per-token log-probs in, scalar loss and metrics out.

The semantics follow verl's ``verl/trainer/ppo/core_algos.py`` (``compute_policy_loss_vanilla``,
``_gspo``, ``_clip_cov``, ``_kl_cov``, ``_gpg``, ``_cispo``, ``_sapo``, ``_geo_mean``, ``_dppo_kl``,
``_dppo_tv``, ``_dro``, ``_bypass_mode``, ``agg_loss``, ``kl_penalty``), verl's ``rollout_corr_helper.py``
(:mod:`fusedrl.rollout`) and TRL's ``GRPOTrainer._compute_loss`` (``luspo``, ``vespo``, ``delta``,
sequence-level importance sampling, ``top_entropy_quantile``, ``off_policy_mask_threshold``,
``use_bias_correction_kl``), so that the numbers match what users already compare against; see
DESIGN.md section 2 and the README for the few places where fusedrl deliberately differs (everything
stays on the device, no host sync).

Layout. Every input is flattened to ``N`` tokens plus a token->sequence map:

* padded: ``logp`` is ``[B, T]`` (``N = B*T``); a 1-D ``logp`` without ``cu_seqlens`` is one sequence;
* packed: ``logp`` is ``[N]`` and ``cu_seqlens`` (int32/int64 ``[B+1]``) gives sequence boundaries;
  tokens at positions ``>= cu_seqlens[-1]`` belong to no sequence and are ignored.

The head is O(N) elementwise/reduction torch ops (plus one small ``topk`` for the covariance modes and
one sort for the entropy quantile), runs on any device, and never synchronises with the host: counts
such as the number of valid tokens stay 0-dim tensors and the data-dependent ``k`` of the covariance
modes is applied as a tensor threshold (see :func:`_select_top_k`). With ``stats_group`` the selection
statistics are computed over the group with torch.distributed collectives (one host read of the
ranks' token counts, see :func:`_group_gather`).

Masked positions. ``mask`` is read as a boolean (non-zero = valid). Values at masked positions are
replaced by 0 with ``torch.where`` before any arithmetic, so NaN/inf sitting in padding can never
leak into the loss or its gradient (no ``0 * inf``), and masked positions receive exactly zero grad.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from ._validate import want_checks
from .rollout import RolloutCorrection, as_rollout_correction, rollout_terms

__all__ = [
    "PolicyLossConfig",
    "RolloutCorrection",
    "policy_loss",
    "LOSS_MODES",
    "LOSS_AGG_MODES",
    "KL_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "canonical_kl_type",
    "kl_penalty",
    "head_kind",
    "metric_names",
]

Number = Union[int, float]
Normaliser = Union[int, float, torch.Tensor, None]

LOSS_MODES = (
    "vanilla",
    "gspo",
    "clip_cov",
    "kl_cov",
    "gpg",
    "cispo",
    "sapo",
    "geo_mean",
    "dppo_kl",
    "dppo_tv",
    "dro",
    "bypass_mode",
    "luspo",
    "vespo",
)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum")
#: TRL's ``importance_sampling_level``: the ratio of the ratio-based modes per token or per sequence
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
_KL_ALIASES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
#: accepted ``kl_loss_type`` names; a trailing ``+`` (e.g. ``"k3+"``, as in recent verl) keeps the
#: value of the estimator but takes the gradient of k2 (straight-through, unbiased KL gradient).
KL_LOSS_TYPES = tuple(_KL_ALIASES) + tuple(k + "+" for k in _KL_ALIASES if k not in ("mse", "k2"))

# log-ratio clamp used for every importance ratio (verl: clamp(log_prob - old_log_prob, -20, 20))
_LOG_RATIO_CLAMP = 20.0
_HEAD_ENV = "FUSEDRL_HEAD"  # per-token head kernels: fusedrl/backends/_head.py
# GSPO clamps the token-level log sequence ratio from above (verl: clamp(..., max=10.0))
_GSPO_LOG_RATIO_MAX = 10.0
# DRO's penalty coefficient when dro_beta is None (the default of verl-compatible ports)
_DRO_BETA_DEFAULT = 0.1
# modes that accept `delta` (INTELLECT-2 two-sided clip) and importance_sampling_level="sequence"
_DELTA_MODES = ("vanilla", "gspo", "luspo", "bypass_mode")
_SEQ_LEVEL_MODES = ("vanilla", "luspo", "cispo", "sapo")


def canonical_kl_type(name: str) -> str:
    """Map a verl KL name or alias to ``"k1" | "abs" | "k2" | "k3"`` (plus an optional ``"+"``)."""
    plus = name.endswith("+")
    base = name[:-1] if plus else name
    if base not in _KL_ALIASES or (plus and _KL_ALIASES[base] == "k2"):
        raise ValueError(f"kl_loss_type must be one of {KL_LOSS_TYPES}, got {name!r}")
    return _KL_ALIASES[base] + ("+" if plus else "")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class PolicyLossConfig:
    """Hyper-parameters of :func:`policy_loss` (field names and defaults follow verl's actor config).

    ==========================  ============  ========================================================
    field                       default       meaning
    ==========================  ============  ========================================================
    loss_mode                   "vanilla"     see the table below
    clip_ratio_low/high         0.2 / 0.2     ratio clipped to [1-low, 1+high] (clip-higher = DAPO);
                                              dppo_*: divergence thresholds; cispo: ``high`` may be
                                              negative (> -1): TRL's cap ``epsilon_high = 1 + high``
    clip_ratio_c                3.0           dual-clip bound for A<0 (must be > 1; None disables);
                                              dppo_*: truncation of the IS ratio
    loss_agg_mode               "token-mean"  "token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                              "seq-mean-token-sum-norm", "token-sum"
    global_num_tokens           None          token-mean denominator (default: local valid tokens)
    global_num_seqs             None          seq-mean denominator (default: local non-empty sequences)
    norm_len                    None          seq-mean-token-sum-norm constant length (default: T
                                              for padded inputs, the longest sequence for packed)
    entropy_coeff               0.0           loss -= entropy_coeff * agg(entropy)
    kl_loss_coef                0.0           loss += kl_loss_coef * agg(kl(logp, ref_logp))
    kl_loss_type                "low_var_kl"  "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3" (+ "+")
    clip_cov_ratio              2e-4          Clip-Cov: fraction of valid tokens to detach
    clip_cov_lb / clip_cov_ub   1.0 / 5.0     Clip-Cov: candidate window lb < cov < ub
    kl_cov_ratio                2e-4          KL-Cov: fraction of valid tokens to penalise
    ppo_kl_coef                 1.0           KL-Cov: coefficient of |logp - old_logp|
    generator                   None          torch.Generator for Clip-Cov's random pick
    tau_pos / tau_neg           1.0 / 1.05    SAPO gate temperatures (A > 0 / A <= 0)
    dro_beta                    None          DRO quadratic penalty (None: 0.1)
    delta                       None          INTELLECT-2 two-sided clip: the unclipped ratio is capped
                                              at ``delta`` (vanilla, gspo, luspo, bypass ppo_clip)
    rollout_correction          None          :class:`fusedrl.RolloutCorrection` (needs ``rollout_logp``
                                              unless loss_mode="bypass_mode")
    top_entropy_quantile        1.0           train the policy term only on tokens whose entropy is at
                                              or above this quantile of the batch's (TRL, "80/20")
    stats_group                 None          torch.distributed group over which the selection
                                              statistics run (Cov means and top-k, entropy quantile,
                                              IS batch normalisation)
    importance_sampling_level   "token"       TRL: "sequence" uses ``exp(mean_t(logp - old))`` per
                                              sequence (vanilla, luspo, cispo, sapo)
    off_policy_mask_threshold   None          TRL / DeepSeek-V3.2 OPSM: drop the policy term of A < 0
                                              sequences whose mean ``rollout_logp - logp`` exceeds it
    use_bias_correction_kl      False         TRL: multiply the KL term by the importance ratio
                                              (TRL's default is True; its mapping sets it)
    vespo_k_pos / _lambda_pos   2.0 / 3.0     VESPO gamma weight for A >= 0
    vespo_k_neg / _lambda_neg   3.0 / 2.0     VESPO gamma weight for A < 0
    ==========================  ============  ========================================================

    Loss modes (``d = logp - old``, ``r = exp(clamp(d, -20, 20))``, per token unless noted):

    ===========  ================================================================================
    vanilla      PPO clip + dual clip (verl); with ``delta``: ``-A min(r, delta)`` as unclipped term
    gspo         GSPO sequence ratio, straight-through per token (verl), clamped at exp(10)
    clip_cov     Clip-Cov (verl)        kl_cov  KL-Cov (verl)        gpg  ``-A logp``
    cispo        ``-sg(clamp(r, 1-low, 1+high)) A logp`` (verl; TRL's ``epsilon_high`` cap with
                 ``clip_ratio_low=1, clip_ratio_high=epsilon_high-1``)
    sapo         ``-A sigmoid(tau (r - 1)) 4 / tau`` (tau_pos if A > 0 else tau_neg)
    geo_mean     GMPO: per sequence ``-mean(A) exp(mean_t clip_sign(d))`` placed on every token
                 (verl takes ``mean`` over rows: use seq-mean-token-mean, global_num_seqs = rows)
    dppo_kl/tv   DPPO: ``-A sg(min(r, clip_ratio_c)) logp`` on tokens inside the binary-KL / TV
                 trust region (clip_ratio_low/high are the divergence thresholds)
    dro          ``-A logp + dro_beta / 2 * d^2``
    bypass_mode  old_logp is the rollout's: rollout_correction.loss_type "ppo_clip" (vanilla on
                 ``logp - old``) or "reinforce" (``-A w logp``, ``w`` the IS weights)
    luspo        TRL LUSPO: the clipped surrogate without dual clip (TRL aggregates with
                 seq-mean-token-sum over rows; use importance_sampling_level="sequence")
    vespo        TRL VESPO: ``-sg(phi(w)) A logp``, ``phi(w) = e^l w^k e^(-l w)`` of the sequence
                 ratio ``w = exp(sum_t d)`` (token IS weights folded in)
    ===========  ================================================================================

    The sequence-level modes (gspo, geo_mean, vespo) are aggregated with the configured
    ``loss_agg_mode``, as every mode: verl forces seq-mean-token-mean for gspo, sapo and geo_mean.
    The three normalisers may be Python numbers or 0-dim tensors (e.g. an all-reduced token count);
    with them, the sum of micro-batch (and data-parallel rank) losses equals the loss of one big
    batch. Tensors are not value-checked (that would need a host sync).
    """

    loss_mode: str = "vanilla"
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    clip_ratio_c: Optional[float] = 3.0
    loss_agg_mode: str = "token-mean"
    global_num_tokens: Normaliser = None
    global_num_seqs: Normaliser = None
    norm_len: Normaliser = None
    entropy_coeff: float = 0.0
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4
    ppo_kl_coef: float = 1.0
    generator: Optional[torch.Generator] = None
    tau_pos: float = 1.0
    tau_neg: float = 1.05
    dro_beta: Optional[float] = None
    delta: Optional[float] = None
    rollout_correction: Optional[RolloutCorrection] = None
    top_entropy_quantile: float = 1.0
    stats_group: Optional[Any] = None
    importance_sampling_level: str = "token"
    off_policy_mask_threshold: Optional[float] = None
    use_bias_correction_kl: bool = False
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if not isinstance(self.kl_loss_type, str):
            raise ValueError(f"kl_loss_type must be a string, got {self.kl_loss_type!r}")
        canonical_kl_type(self.kl_loss_type)  # raises ValueError naming kl_loss_type
        for name in (
            "clip_ratio_low",
            "clip_ratio_high",
            "entropy_coeff",
            "kl_loss_coef",
            "clip_cov_ratio",
            "kl_cov_ratio",
            "ppo_kl_coef",
        ):
            v = getattr(self, name)
            if name == "clip_ratio_high" and self.loss_mode == "cispo":
                if not _is_real(v) or math.isnan(v) or math.isinf(v) or not v > -1:
                    raise ValueError(
                        f"clip_ratio_high must be a finite number > -1 for cispo (the cap is "
                        f"1 + clip_ratio_high), got {v!r}"
                    )
                continue
            if not _is_real(v) or math.isnan(v) or math.isinf(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
        if self.clip_ratio_c is not None:
            c = self.clip_ratio_c
            if not _is_real(c) or math.isnan(c) or not c > 1.0:
                raise ValueError(f"clip_ratio_c must be > 1 (dual-clip lower bound) or None, got {c!r}")
        for name in ("clip_cov_lb", "clip_cov_ub"):
            v = getattr(self, name)
            if not _is_real(v) or math.isnan(v):
                raise ValueError(f"{name} must be a number, got {v!r}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={self.clip_cov_lb}, clip_cov_ub={self.clip_cov_ub}"
            )
        for name in ("global_num_tokens", "global_num_seqs", "norm_len"):
            _check_normaliser(name, getattr(self, name))
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")
        self._check_menu()

    def _check_menu(self) -> None:
        """Fields of the 2026 loss menu (SAPO, DRO, delta, rollout correction, entropy masking, TRL's)."""
        finite = lambda v: _is_real(v) and not math.isnan(v) and not math.isinf(v)  # noqa: E731
        for name in ("tau_pos", "tau_neg"):
            v = getattr(self, name)
            if not finite(v) or not v > 0:
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        if self.dro_beta is not None and (not finite(self.dro_beta) or self.dro_beta < 0):
            raise ValueError(f"dro_beta must be a finite non-negative number or None, got {self.dro_beta!r}")
        if self.delta is not None:
            if not finite(self.delta) or not self.delta > 0:
                raise ValueError(f"delta must be a finite positive number or None, got {self.delta!r}")
            if self.loss_mode not in _DELTA_MODES:
                raise ValueError(
                    f"delta (two-sided clipping) applies to loss_mode {_DELTA_MODES}, not {self.loss_mode!r}"
                )
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        if self.importance_sampling_level == "sequence" and self.loss_mode not in _SEQ_LEVEL_MODES:
            raise ValueError(
                f"importance_sampling_level='sequence' applies to loss_mode {_SEQ_LEVEL_MODES} "
                f"(gspo, geo_mean and vespo are sequence-level already), not {self.loss_mode!r}"
            )
        q = self.top_entropy_quantile
        if not _is_real(q) or math.isnan(q) or not 0.0 <= q <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {q!r}")
        t = self.off_policy_mask_threshold
        if t is not None and not finite(t):
            raise ValueError(f"off_policy_mask_threshold must be a finite number or None, got {t!r}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if not finite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        self.rollout_correction = as_rollout_correction(self.rollout_correction)
        rc = self.rollout_correction
        if rc is not None and rc.rollout_is == "sequence" and self.loss_mode == "vespo":
            raise ValueError(
                "vespo folds token-level IS weights into its sequence weight (as TRL): "
                "rollout_correction.rollout_is must be 'token' or None"
            )
        g = self.stats_group
        if g is not None:
            dist = torch.distributed
            if not dist.is_available() or not isinstance(g, dist.ProcessGroup):
                raise ValueError(
                    f"stats_group must be a torch.distributed ProcessGroup or None, got {type(g).__name__}"
                )

    @property
    def kl_type(self) -> str:
        """Canonical KL estimator name: ``"k1" | "abs" | "k2" | "k3"`` (optionally ending in ``+``)."""
        return canonical_kl_type(self.kl_loss_type)

    @property
    def effective_rollout_correction(self) -> Optional[RolloutCorrection]:
        """The rollout correction in force: bypass_mode without one is plain PPO on the rollout's logp."""
        if self.rollout_correction is None and self.loss_mode == "bypass_mode":
            return RolloutCorrection()
        return self.rollout_correction

    def replace(self, **changes) -> PolicyLossConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_normaliser(name: str, v: Normaliser) -> None:
    if v is None:
        return
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(v.shape)}")
        return
    if not _is_real(v) or math.isnan(v) or math.isinf(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number or a 0-dim tensor, got {v!r}")


# --------------------------------------------------------------------------------------------------
# Layout: flatten padded / packed inputs to N tokens + a token -> sequence map
# --------------------------------------------------------------------------------------------------


class _Segments:
    """Token -> sequence map of a flattened batch (all ops device-side, no host sync).

    Padded ``[B, T]`` inputs use reshapes; packed inputs use a sequence id per token computed from
    ``cu_seqlens`` with ``searchsorted`` and ``index_add`` (``index_put`` with accumulate on CUDA, which is
    deterministic there) for per-sequence sums.
    """

    def __init__(
        self,
        num_seqs: int,
        seq_len: Optional[int] = None,
        seq_ids: Optional[torch.Tensor] = None,
        lengths: Optional[torch.Tensor] = None,
    ):
        self.B = num_seqs
        self.T = seq_len  # padded layout when not None
        self.seq_ids = seq_ids  # packed layout: [N] int64 in [0, B-1] (clamped; see valid mask)
        self.lengths = lengths  # packed layout: [B] sequence lengths

    @property
    def padded(self) -> bool:
        return self.T is not None

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sum of a flat ``[N]`` tensor -> ``[B]``."""
        if self.padded:
            return x.reshape(self.B, self.T).sum(-1)
        if self.B == 0:
            return x[:0]  # empty, but still attached to x's graph
        if x.device.type == "cuda":
            # index_add uses float atomics on CUDA (run-to-run bit differences); index_put with
            # accumulate=True sorts the ids and sums each segment in a fixed order: deterministic
            return x.new_zeros(self.B).index_put((self.seq_ids,), x, accumulate=True)
        return x.new_zeros(self.B).index_add(0, self.seq_ids, x)

    def seq_max(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence maximum of a flat ``[N]`` tensor -> ``[B]`` (``-inf`` for a sequence with no tokens;
        callers put ``-inf`` at the positions to ignore)."""
        if self.padded:
            if self.B * self.T == 0:
                return x.new_full((self.B,), -math.inf)
            return x.reshape(self.B, self.T).amax(-1)
        if self.B == 0:
            return x[:0]
        return x.new_full((self.B,), -math.inf).scatter_reduce(0, self.seq_ids, x, "amax", include_self=True)

    def expand(self, v: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-sequence ``[B]`` tensor to the flat ``[N]`` tokens."""
        if self.padded:
            return v.reshape(self.B, 1).expand(self.B, self.T).reshape(-1)
        if self.B == 0:
            return v.new_zeros(self.seq_ids.shape)
        return v.index_select(0, self.seq_ids)

    def default_norm_len(self, like: torch.Tensor) -> Union[int, torch.Tensor]:
        """seq-mean-token-sum-norm's default divisor: T (padded) or the longest sequence (packed)."""
        if self.padded:
            return max(self.T, 1)
        if self.B == 0:
            return 1
        return self.lengths.max().to(like.dtype)


def _check_mask_dtype(mask: torch.Tensor) -> None:
    """``mask`` may be bool, any integer dtype or any floating dtype (non-zero = valid)."""
    if mask.dtype == torch.bool or mask.is_floating_point():
        return
    try:
        torch.iinfo(mask.dtype)  # integer dtypes only
    except TypeError:
        raise TypeError(f"mask must be a bool, integer or floating-point tensor, got {mask.dtype}") from None


def _check_mask_values(mask: torch.Tensor) -> None:
    """Host-syncing check (behind ``check_inputs``): a non-bool mask must hold only 0 and 1. The mask
    is read as a boolean, so a fractional (weighting) or NaN mask would be silently binarised."""
    if mask.dtype == torch.bool or mask.numel() == 0:
        return
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"mask must hold only 0 and 1 (or be bool; non-zero = valid token), found "
            f"{mask[bad].reshape(-1)[0].item()}; per-token loss weights are not supported"
        )


def _check_cu_seqlens_values(cu: torch.Tensor, n: int) -> None:
    """Host-syncing check (behind ``check_inputs``): 0 = cu[0] <= cu[1] <= ... <= cu[-1] <= N."""
    c = cu.long().cpu()
    if c[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {c[0].item()}")
    dec = (c[1:] < c[:-1]).nonzero()
    if dec.numel():
        i = dec[0, 0].item()
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {c[i].item()} > "
            f"cu_seqlens[{i + 1}] = {c[i + 1].item()}"
        )
    if c[-1].item() > n:
        raise ValueError(
            f"cu_seqlens must end at <= N = {n} (the packed token count; tokens after "
            f"cu_seqlens[-1] are ignored), got cu_seqlens[-1] = {c[-1].item()}"
        )


def _flatten_inputs(
    logp,
    old_logp,
    advantages,
    mask,
    entropy,
    ref_logp,
    cu_seqlens,
    check_inputs=None,
    rollout_logp=None,
    rollout_is_weights=None,
):
    """Check shapes, build the segment map and return flat [N] views plus the per-token valid mask:
    ``(seg, valid, logp, old_logp, adv, entropy, ref_logp, rollout_logp, rollout_is_weights)``."""
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (
        ("entropy", entropy),
        ("ref_logp", ref_logp),
        ("cu_seqlens", cu_seqlens),
        ("rollout_logp", rollout_logp),
        ("rollout_is_weights", rollout_is_weights),
    ):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    for name, t in (
        ("logp", logp),
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("entropy", entropy),
        ("ref_logp", ref_logp),
        ("rollout_logp", rollout_logp),
        ("rollout_is_weights", rollout_is_weights),
    ):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _check_mask_dtype(mask)
    shape = tuple(logp.shape)
    for name, t in (
        ("old_logp", old_logp),
        ("mask", mask),
        ("entropy", entropy),
        ("ref_logp", ref_logp),
        ("rollout_logp", rollout_logp),
        ("rollout_is_weights", rollout_is_weights),
    ):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of logp {shape}, got {tuple(t.shape)}")
    device = logp.device
    for name, t in (
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("mask", mask),
        ("entropy", entropy),
        ("ref_logp", ref_logp),
        ("cu_seqlens", cu_seqlens),
        ("rollout_logp", rollout_logp),
        ("rollout_is_weights", rollout_is_weights),
    ):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but logp is on {device}")

    checks = want_checks(check_inputs, device)
    if checks:
        _check_mask_values(mask)
    if cu_seqlens is not None:
        if logp.dim() != 1:
            raise ValueError(f"with cu_seqlens, logp must be packed 1-D [N], got shape {shape}")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be an int32/int64 tensor, got {cu_seqlens.dtype}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be a 1-D tensor [B+1], got shape {tuple(cu_seqlens.shape)}")
        n, b = shape[0], cu_seqlens.numel() - 1
        # value checks need a host sync: on by default for CPU tensors only (see _validate.want_checks)
        if checks:
            _check_cu_seqlens_values(cu_seqlens, n)
        cu = cu_seqlens.long()
        pos = torch.arange(n, device=device, dtype=torch.long)
        raw_ids = torch.searchsorted(cu[1:].contiguous(), pos, right=True)  # == B for pos >= cu[-1]
        in_seq = raw_ids < b
        seg = _Segments(b, seq_ids=raw_ids.clamp(max=max(b - 1, 0)), lengths=cu[1:] - cu[:-1])
        if advantages.shape == torch.Size([n]):
            adv = advantages
        elif advantages.shape == torch.Size([b]):
            adv = seg.expand(advantages)
        else:
            raise ValueError(
                f"packed advantages must be [N]={n} (per token) or [B]={b} (per sequence), "
                f"got {tuple(advantages.shape)}"
            )
    else:
        if logp.dim() == 1:
            b, t = 1, shape[0]
        elif logp.dim() == 2:
            b, t = shape
        else:
            raise ValueError(f"logp must be [B, T] (padded) or [N] with cu_seqlens (packed), got shape {shape}")
        seg = _Segments(b, seq_len=t)
        in_seq = None
        if logp.dim() == 2 and advantages.dim() == 1:
            if advantages.shape[0] != b:
                raise ValueError(f"per-sequence advantages must be [B]={b}, got {tuple(advantages.shape)}")
            adv = seg.expand(advantages)
        else:
            try:
                adv = advantages.broadcast_to(shape)
            except RuntimeError:
                raise ValueError(
                    f"advantages must be [B, T] or [B] for logp of shape {shape}, got {tuple(advantages.shape)}"
                ) from None
    valid = (mask != 0).reshape(-1)
    if in_seq is not None:
        valid = valid & in_seq
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    return (
        seg,
        valid,
        flat(logp),
        flat(old_logp),
        adv.reshape(-1),
        flat(entropy),
        flat(ref_logp),
        flat(rollout_logp),
        flat(rollout_is_weights),
    )


# --------------------------------------------------------------------------------------------------
# Per-token context shared by the loss modes
# --------------------------------------------------------------------------------------------------


class _Tokens(NamedTuple):
    """Flat, sanitised per-token tensors (zeros at masked positions) in the compute dtype."""

    valid: torch.Tensor  # [N] bool
    n_valid: torch.Tensor  # 0-dim int64 count of valid tokens
    logp: torch.Tensor  # [N] differentiable
    old_logp: torch.Tensor  # [N] detached
    adv: torch.Tensor  # [N] detached
    log_ratio: torch.Tensor  # [N] logp - old_logp (raw, differentiable)
    seg: _Segments

    def masked_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``x`` over valid tokens (0 when there are none); detached fp32 metric."""
        x = x.detach().to(self.logp.dtype)
        return (torch.where(self.valid, x, torch.zeros_like(x)).sum() / self.count()).float()

    def count(self) -> torch.Tensor:
        """Valid-token count as a compute-dtype 0-dim tensor, at least 1 (a safe denominator)."""
        return self.n_valid.clamp_min(1).to(self.logp.dtype)

    def zero_metric(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float32, device=self.logp.device)


class _PG(NamedTuple):
    """What one loss mode returns: per-token loss and its metrics."""

    loss: torch.Tensor  # [N] per-token loss (masked positions are ignored)
    clipfrac: torch.Tensor  # 0-dim fp32
    clipfrac_lower: torch.Tensor  # 0-dim fp32
    ppo_kl: torch.Tensor  # 0-dim fp32
    cov_selected_frac: Optional[torch.Tensor] = None  # 0-dim fp32 (covariance modes)


def _ratio(tok: _Tokens) -> torch.Tensor:
    """Per-token importance ratio ``exp(clamp(logp - old_logp, -20, 20))``."""
    return torch.exp(tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def _seq_ratio(tok: _Tokens) -> torch.Tensor:
    """TRL's sequence-level ratio ``exp(mean_t(logp - old))`` of each token's sequence ([N]); the gradient
    flows through the mean to every valid token of the sequence. Log clamped to [-20, 20]."""
    seg = tok.seg
    n = seg.seq_sum(tok.valid.to(tok.logp.dtype)).clamp_min(1)
    log_s = (seg.seq_sum(tok.log_ratio) / n).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(seg.expand(log_s))


def _is_ratio(tok: _Tokens, cfg) -> torch.Tensor:
    """The importance ratio of the ratio-based modes at ``importance_sampling_level``."""
    if getattr(cfg, "importance_sampling_level", "token") == "sequence":
        return _seq_ratio(tok)
    return _ratio(tok)


def _clipped_surrogate(
    adv: torch.Tensor, ratio: torch.Tensor, cfg: PolicyLossConfig, unclipped: Optional[torch.Tensor] = None
):
    """``L1 = -A r``, ``L2 = -A clip(r, 1-low, 1+high)`` and ``max(L1, L2)``; ``unclipped`` replaces ``r`` in
    ``L1`` (INTELLECT-2's ``min(r, delta)``)."""
    l1 = -adv * (ratio if unclipped is None else unclipped)
    l2 = -adv * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    return l1, l2, torch.maximum(l1, l2)


def _delta_cap(ratio: torch.Tensor, cfg) -> Optional[torch.Tensor]:
    delta = getattr(cfg, "delta", None)
    return None if delta is None else ratio.clamp(max=delta)


# --------------------------------------------------------------------------------------------------
# Statistics over a process group (stats_group): torch.distributed collectives only
# --------------------------------------------------------------------------------------------------


def _group_sum(t: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) of a small detached tensor over ``group`` (identity without one)."""
    if group is None:
        return t
    out = t.detach().clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
    return out


def _group_gather(x: torch.Tensor, group, pad) -> tuple[torch.Tensor, int, int]:
    """``x`` [N] of every rank, each padded with ``pad`` to the longest, concatenated in rank order:
    ``(gathered [W * N_max], offset of this rank's values, total real length)``. The ranks' lengths are
    exchanged first; reading them is the one host sync of ``stats_group`` (shapes, not values)."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    n = x.numel()
    sizes = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=x.device), group=group)
    sizes = [int(s.item()) for s in sizes]
    n_max = max(sizes)
    padded = torch.cat([x.detach(), x.new_full((n_max - n,), pad)]) if n_max > n else x.detach().contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    rank = dist.get_rank(group)
    # positions past a rank's length hold `pad` and are never eligible
    return torch.cat(parts), rank * n_max, sum(sizes)


def _gather_pair(key: torch.Tensor, eligible: torch.Tensor, group):
    """Gather a key and its eligibility over the group (ineligible / padding = ``-inf``, False)."""
    keys, off, total = _group_gather(key.detach().where(eligible, torch.full_like(key, -math.inf)), group, -math.inf)
    elig, _, _ = _group_gather(eligible.to(torch.uint8), group, 0)
    return keys, elig.bool(), off, total


# --------------------------------------------------------------------------------------------------
# Batch-level selection: covariance (Clip-Cov, KL-Cov) and the entropy quantile
# --------------------------------------------------------------------------------------------------


def _covariance(
    tok: _Tokens, clip: Optional[tuple[float, float, float, float]] = None, group=None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Detached ``(A - mean_m A) * (logp - mean_m logp)`` over the batch's valid tokens ([N]), and,
    when the cuda head serves it (``FUSEDRL_HEAD``), Clip-Cov's candidate mask from the same launch
    (``clip = (clip_low, clip_high, lb, ub)``); otherwise ``(cov, None)``. With ``group`` the means run
    over the group's valid tokens."""
    with torch.no_grad():
        lp = tok.logp.detach()
        if group is None:
            denom = tok.count()
            mean_a = tok.adv.sum() / denom  # masked positions hold 0
            mean_lp = lp.sum() / denom
        else:
            s = _group_sum(torch.stack([tok.adv.sum(), lp.sum(), tok.n_valid.to(lp.dtype)]), group)
            mean_a, mean_lp = s[0] / s[2].clamp_min(1), s[1] / s[2].clamp_min(1)
        if os.environ.get(_HEAD_ENV, "torch") != "torch":
            from .backends import _head

            fused = _head.cov_terms(tok, mean_a, mean_lp, clip)
            if fused is not None:
                return fused
        return (tok.adv - mean_a) * (lp - mean_lp), None


def _num_to_select(
    tok: _Tokens, ratio: float, n: Optional[int] = None, n_valid: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, int]:
    """``k = max(1, int(ratio * n_valid))`` as a device tensor, and a host upper bound of it (``n``, ``n_valid``:
    the group's token and valid-token counts; default: the local ones)."""
    n = tok.valid.numel() if n is None else n
    n_valid = tok.n_valid if n_valid is None else n_valid
    k_max = min(n, max(1, int(ratio * n)))
    # float64 so the floor matches Python's int(ratio * n) exactly (MPS has no float64)
    fdt = torch.float32 if tok.logp.device.type == "mps" else torch.float64
    k = torch.floor(n_valid.to(fdt) * ratio).clamp(min=1, max=max(k_max, 1)).long()
    return k, k_max


def _select_top_k(key: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor, k_max: int) -> torch.Tensor:
    """Boolean mask of the ``min(k, #eligible)`` eligible tokens with the largest ``key``.

    ``k`` is a 0-dim device tensor (no host sync) bounded by the Python int ``k_max``. Ties at the
    k-th value are broken deterministically in favour of the lower flat index.
    """
    n = key.numel()
    if n == 0 or k_max == 0:
        return torch.zeros_like(eligible)
    neg_inf = torch.full_like(key, -math.inf)
    k_eff = key.detach().where(eligible, neg_inf)
    top_vals = torch.topk(k_eff, k_max, largest=True, sorted=True).values
    kth = top_vals.gather(0, (k - 1).reshape(1))  # [1], the k-th largest value
    above = eligible & (k_eff > kth)
    tied = eligible & (k_eff == kth)
    need = k - above.sum()  # how many tied tokens to take
    return above | (tied & (torch.cumsum(tied.long(), 0) <= need))


def _select(tok: _Tokens, key: torch.Tensor, eligible: torch.Tensor, ratio: float, group) -> torch.Tensor:
    """Top-k of ``key`` among ``eligible`` with ``k = max(1, int(ratio * n_valid))``, over the local batch or
    over ``group`` (then every rank selects on the gathered batch, in rank order, and keeps its part:
    exactly what one process selects on the concatenated batch)."""
    if group is None:
        k, k_max = _num_to_select(tok, ratio)
        return _select_top_k(key, eligible, k, k_max)
    n_valid = _group_sum(tok.n_valid.reshape(1), group).reshape(())
    keys, elig, off, total = _gather_pair(key, eligible, group)
    k, k_max = _num_to_select(tok, ratio, n=total, n_valid=n_valid)
    picked = _select_top_k(keys, elig, k, min(k_max, keys.numel()))
    return picked[off : off + key.numel()]


def _entropy_keep(ent: torch.Tensor, valid: torch.Tensor, q: float, group) -> torch.Tensor:
    """TRL's high-entropy mask: valid tokens whose entropy is ``>=`` the ``1 - top_entropy_quantile``
    quantile (``torch.quantile``, linear interpolation, bit for bit) of the valid entropies of the batch
    (or of ``group``). Sorted on the device; the count stays a tensor (no host sync)."""
    with torch.no_grad():
        qdt = torch.float64 if ent.dtype == torch.float64 else torch.float32
        vals = ent.detach().to(qdt)
        if vals.numel() == 0:
            return torch.zeros_like(valid)
        inf = torch.full_like(vals, math.inf)
        pool = torch.where(valid, vals, inf)
        if group is not None:
            pool, _, _ = _group_gather(pool, group, math.inf)
        srt = pool.sort().values
        n = (srt != math.inf).sum()  # entropies are finite: +inf marks masked / padding
        ranks = torch.tensor(1.0 - q, dtype=qdt, device=vals.device) * (n - 1).to(qdt)
        last = srt.numel() - 1
        below = ranks.to(torch.long).clamp(0, last)
        above = ranks.ceil().to(torch.long).clamp(0, last)
        # gather, not srt[below]: indexing with a 0-dim tensor reads it on the host
        thr = torch.lerp(srt.gather(0, below.reshape(1)), srt.gather(0, above.reshape(1)), ranks - below.to(qdt))
        return valid & (vals >= thr) & (n > 0)


def _opsm_keep(tok: _Tokens, sampling: torch.Tensor, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL ``get_off_policy_mask``): keep a token if its advantage
    is >= 0 or its sequence's mean ``sampling_logp - logp`` (detached) is <= ``threshold``."""
    with torch.no_grad():
        seg = tok.seg
        kl = torch.where(tok.valid, sampling - tok.logp.detach(), torch.zeros_like(sampling))
        n = seg.seq_sum(tok.valid.to(kl.dtype)).clamp_min(1)
        low_kl = seg.expand(seg.seq_sum(kl) / n) <= threshold
        return (tok.adv >= 0) | low_kl


# --------------------------------------------------------------------------------------------------
# Loss modes: one function each, returning per-token losses and metrics
# --------------------------------------------------------------------------------------------------


class _Ctx(NamedTuple):
    """What a mode may need besides the tokens: the rollout-correction IS weights (detached, [N])."""

    is_w: Optional[torch.Tensor] = None


_NO_CTX = _Ctx()


def _loss_vanilla(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX, dual: bool = True) -> _PG:
    """PPO clipped surrogate with clip-higher and dual clip (verl ``compute_policy_loss_vanilla``); ``delta``
    caps the unclipped ratio (TRL / INTELLECT-2); ``importance_sampling_level="sequence"`` takes TRL's
    sequence ratio."""
    extended = getattr(cfg, "delta", None) is not None or getattr(cfg, "importance_sampling_level", "token") != "token"
    if not extended and dual and os.environ.get(_HEAD_ENV, "torch") != "torch":  # opt-in fused Triton / CUDA launch
        from .backends import _head

        pg = _head.vanilla_pg(tok, cfg)
        if pg is not None:  # None: fp64, or no kernel here under FUSEDRL_HEAD=auto
            return pg
    log_ratio = tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    seq_level = getattr(cfg, "importance_sampling_level", "token") == "sequence"
    ratio = _seq_ratio(tok) if seq_level else torch.exp(log_ratio)
    l1, l2, lc = _clipped_surrogate(tok.adv, ratio, cfg, _delta_cap(ratio, cfg))
    clipfrac = tok.masked_mean(l2 > l1)
    if cfg.clip_ratio_c is None or not dual:
        loss, lower = lc, tok.zero_metric()
    else:
        l3 = -tok.adv * cfg.clip_ratio_c
        negative = tok.adv < 0
        loss = torch.where(negative, torch.minimum(l3, lc), lc)
        lower = tok.masked_mean((lc > l3) & negative)
    return _PG(loss, clipfrac, lower, tok.masked_mean(-log_ratio))


def _loss_luspo(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """TRL's LUSPO: the clipped surrogate without dual clip (its length scaling is the aggregation)."""
    return _loss_vanilla(tok, cfg, ctx, dual=False)


def _loss_gspo(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """GSPO: sequence-level ratio ``s_i = exp(mean_t d)``, applied per token with a straight-through
    gradient (``log s_it = sg(log s_i) + logp - sg(logp)``, clamped at 10); no dual clip; ``delta`` caps
    the unclipped ratio."""
    seg = tok.seg
    n_tok = seg.seq_sum(tok.valid.to(tok.logp.dtype)).clamp_min(1)
    log_seq_ratio = (seg.seq_sum(tok.log_ratio) / n_tok).detach()  # masked positions hold 0
    log_s = tok.logp - tok.logp.detach() + seg.expand(log_seq_ratio)  # verl's order (precision)
    s = torch.exp(log_s.clamp(max=_GSPO_LOG_RATIO_MAX))
    l1, l2, loss = _clipped_surrogate(tok.adv, s, cfg, _delta_cap(s, cfg))
    return _PG(loss, tok.masked_mean(l2 > l1), tok.zero_metric(), tok.masked_mean(-tok.log_ratio))


def _loss_clip_cov(tok: _Tokens, cfg: PolicyLossConfig, keys: Optional[torch.Tensor] = None) -> _PG:
    """Clip-Cov: detach ``max(1, int(ratio*n_valid))`` tokens drawn uniformly at random among the
    valid, not PPO-clipped tokens with ``lb < cov < ub`` (their loss term gets zero weight but they
    stay in the denominator). No dual clip. As verl, ``pg_clipfrac`` reports the detached fraction.
    ``keys``: the uniform random keys of the pick (default: drawn from ``config.generator``)."""
    picked = _select_clip_cov(tok, cfg, keys)
    return _clip_cov_terms(tok, cfg, picked)


def _select_clip_cov(tok: _Tokens, cfg: PolicyLossConfig, keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Clip-Cov's pick: a uniform random subset of the candidates (bool [N])."""
    group = getattr(cfg, "stats_group", None)
    with torch.no_grad():
        l1, l2, _ = _clipped_surrogate(tok.adv, _ratio(tok), cfg)
        cov, candidates = _covariance(
            tok, (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_cov_lb, cfg.clip_cov_ub), group
        )
        if candidates is None:
            candidates = tok.valid & ~(l2 > l1) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
        if keys is None:
            keys = _random_keys(tok.logp, cfg.generator)
        return _select(tok, keys, candidates, cfg.clip_cov_ratio, group)


def _clip_cov_terms(tok: _Tokens, cfg: PolicyLossConfig, picked: torch.Tensor) -> _PG:
    """Clip-Cov's per-token loss for a given pick: the clipped surrogate, 0 on picked tokens."""
    l1, l2, lc = _clipped_surrogate(tok.adv, _ratio(tok), cfg)
    loss = torch.where(picked, torch.zeros_like(lc), lc)
    frac = tok.masked_mean(picked)
    return _PG(loss, frac, tok.zero_metric(), tok.masked_mean(-tok.log_ratio), frac)


def _loss_kl_cov(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """KL-Cov: unclipped ``-A r`` plus ``ppo_kl_coef * |logp - old_logp|`` on the top
    ``max(1, int(ratio*n_valid))`` valid tokens by covariance (ties -> lower index). As verl,
    ``ppo_kl`` reports ``mean_m |d|`` and ``pg_clipfrac`` is 0."""
    return _kl_cov_terms(tok, cfg, _select_kl_cov(tok, cfg))


def _select_kl_cov(tok: _Tokens, cfg: PolicyLossConfig) -> torch.Tensor:
    """KL-Cov's pick: the top-k valid tokens by covariance (bool [N])."""
    group = getattr(cfg, "stats_group", None)
    with torch.no_grad():
        return _select(tok, _covariance(tok, None, group)[0], tok.valid, cfg.kl_cov_ratio, group)


def _kl_cov_terms(tok: _Tokens, cfg: PolicyLossConfig, picked: torch.Tensor) -> _PG:
    """KL-Cov's per-token loss for a given pick."""
    loss = -tok.adv * _ratio(tok)
    abs_kl = tok.log_ratio.abs()
    loss = loss + torch.where(picked, cfg.ppo_kl_coef * abs_kl, torch.zeros_like(abs_kl))
    zero = tok.zero_metric()
    return _PG(loss, zero, zero, tok.masked_mean(abs_kl), tok.masked_mean(picked))


def _loss_gpg(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """GPG: plain policy gradient ``-A logp``."""
    zero = tok.zero_metric()
    ppo_kl = tok.masked_mean(-tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    return _PG(-tok.adv * tok.logp, zero, zero, ppo_kl)


def _loss_cispo(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """CISPO: ``-sg(clip(r, 1-low, 1+high)) * A * logp``; every token keeps its gradient. A negative
    ``clip_ratio_high`` expresses TRL's cap ``epsilon_high < 1``."""
    log_ratio = tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if getattr(cfg, "importance_sampling_level", "token") == "sequence":
        ratio = _seq_ratio(tok).detach()
    else:
        ratio = torch.exp(log_ratio).detach()
    clipped = ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    loss = -clipped * tok.adv * tok.logp
    return _PG(loss, tok.masked_mean(ratio != clipped), tok.zero_metric(), tok.masked_mean(-log_ratio))


def _loss_sapo(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """SAPO: soft gate ``f(r) = sigmoid(tau (r - 1)) * 4 / tau`` (``tau_pos`` if A > 0 else ``tau_neg``),
    loss ``-f(r) A`` (verl ``compute_policy_loss_sapo``, TRL ``sapo``). No clip metrics (0)."""
    ratio = _is_ratio(tok, cfg)
    tau = torch.where(tok.adv > 0, torch.full_like(ratio, cfg.tau_pos), torch.full_like(ratio, cfg.tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    zero = tok.zero_metric()
    ppo_kl = tok.masked_mean(-tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    return _PG(-gate * tok.adv, zero, zero, ppo_kl)


def _loss_geo_mean(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """GMPO (verl ``compute_policy_loss_geo_mean``): per sequence ``L_i = -mean_t(A) * exp(mean_t d~)``
    with ``d~`` the log ratio clipped to ``[-low, high]`` on the side of the advantage's sign (unclamped
    otherwise), times the geometric mean of the rollout IS weights; ``L_i`` is placed on every token
    of the sequence (so seq-mean-token-mean aggregates it as verl's mean over rows)."""
    seg = tok.seg
    d = tok.log_ratio
    sgn = torch.sign(tok.adv)
    d_clamp = d.clamp(-cfg.clip_ratio_low, cfg.clip_ratio_high)
    d_min = sgn * torch.minimum(sgn * d, sgn * d_clamp)
    vf = tok.valid.to(d.dtype)
    n = seg.seq_sum(vf).clamp_min(1)
    ratio = torch.exp(seg.seq_sum(torch.where(tok.valid, d_min, torch.zeros_like(d_min))) / n)
    adv = seg.seq_sum(tok.adv) / n
    loss = -adv * ratio
    if ctx.is_w is not None:  # verl: the geometric mean of the token weights per sequence
        log_w = torch.where(tok.valid, torch.log(ctx.is_w + 1e-10), torch.zeros_like(ctx.is_w))
        loss = loss * torch.exp(seg.seq_sum(log_w) / n)
    clipped = (d != d_clamp).detach()
    return _PG(
        seg.expand(loss),
        tok.masked_mean(clipped & (tok.adv > 0)),
        tok.masked_mean(clipped & (tok.adv < 0)),
        tok.masked_mean(-d),
    )


def _dppo_valid(tok: _Tokens, cfg: PolicyLossConfig, binary_kl: bool) -> torch.Tensor:
    """DPPO's trust region (detached): TV ``|p - p_old|`` or binary KL within clip_ratio_low / high on the
    side the advantage pushes."""
    with torch.no_grad():
        lp, old = tok.logp.detach(), tok.old_logp
        prob, old_prob = torch.exp(lp), torch.exp(old)
        if binary_kl:
            bkl = old_prob * (old - lp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            pos = (bkl <= cfg.clip_ratio_high) | (prob <= old_prob)
            neg = (bkl <= cfg.clip_ratio_low) | (prob >= old_prob)
        else:
            pos = (prob - old_prob) <= cfg.clip_ratio_high
            neg = (prob - old_prob) >= -cfg.clip_ratio_low
        return torch.where(tok.adv > 0, pos, neg)


def _loss_dppo(tok: _Tokens, cfg: PolicyLossConfig, binary_kl: bool) -> _PG:
    """DPPO (verl ``compute_policy_loss_dppo_kl`` / ``_tv``): ``-A sg(min(r, clip_ratio_c)) logp`` on the
    tokens inside the divergence trust region, 0 outside. ``pg_clipfrac``: outside the region;
    ``pg_clipfrac_lower``: inside with ``r > clip_ratio_c``."""
    log_ratio = tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio).detach()
    trunc = ratio if cfg.clip_ratio_c is None else ratio.clamp(max=cfg.clip_ratio_c)
    inside = _dppo_valid(tok, cfg, binary_kl)
    loss = torch.where(inside, -tok.adv * trunc * tok.logp, torch.zeros_like(ratio))
    over = (ratio > cfg.clip_ratio_c) if cfg.clip_ratio_c is not None else torch.zeros_like(inside)
    return _PG(loss, tok.masked_mean(~inside), tok.masked_mean(over & inside), tok.masked_mean(-log_ratio))


def _loss_dppo_kl(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    return _loss_dppo(tok, cfg, binary_kl=True)


def _loss_dppo_tv(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    return _loss_dppo(tok, cfg, binary_kl=False)


def _loss_dro(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """DRO (Kimi / verl ``dro``): ``-A logp + dro_beta / 2 * (logp - old)^2`` (log ratio unclamped)."""
    beta = _DRO_BETA_DEFAULT if cfg.dro_beta is None else cfg.dro_beta
    d = tok.log_ratio
    zero = tok.zero_metric()
    return _PG(-tok.adv * tok.logp + 0.5 * beta * d.square(), zero, zero, tok.masked_mean(-d))


def _loss_bypass(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """verl bypass mode (old_logp is the rollout's): "ppo_clip" is the vanilla loss on ``logp - old``
    (IS weights reported, not applied); "reinforce" is ``-A w logp`` with the detached IS weights ``w``
    (1 when ``rollout_is`` is off); its ``ppo_kl`` is ``mean_m(old - logp)``."""
    rc = cfg.effective_rollout_correction
    if rc.loss_type == "ppo_clip":
        return _loss_vanilla(tok, cfg, ctx)
    loss = -tok.adv * tok.logp
    if ctx.is_w is not None:
        loss = loss * ctx.is_w
    zero = tok.zero_metric()
    return _PG(loss, zero, zero, tok.masked_mean(-tok.log_ratio))


def _loss_vespo(tok: _Tokens, cfg: PolicyLossConfig, ctx: _Ctx = _NO_CTX) -> _PG:
    """TRL's VESPO: ``-sg(phi) A logp`` with ``phi = exp(l + k log w - l w)`` of the sequence ratio
    ``log w = clamp(sum_t clamp(d, -20, 20) + sum_t log IS, log 1e-8, 20)`` (IS weights of the rollout
    correction, clamped to ``[log 1e-8, 20]`` in log space), ``(k, l)`` = ``(vespo_k_pos,
    vespo_lambda_pos)`` for A >= 0 else the ``_neg`` pair, ``l`` clamped at 1e-4."""
    seg = tok.seg
    lower = math.log(1e-8)
    with torch.no_grad():
        d = torch.where(
            tok.valid, tok.log_ratio.detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP), torch.zeros_like(tok.logp)
        )
        log_seq = seg.seq_sum(d)
        if ctx.is_w is not None:
            log_is = torch.where(tok.valid, torch.log(ctx.is_w).clamp(lower, _LOG_RATIO_CLAMP), torch.zeros_like(d))
            log_seq = log_seq + seg.seq_sum(log_is)
        log_w = seg.expand(log_seq.clamp(lower, _LOG_RATIO_CLAMP))
        nonneg = tok.adv >= 0
        k = torch.where(nonneg, torch.full_like(d, cfg.vespo_k_pos), torch.full_like(d, cfg.vespo_k_neg))
        lam = torch.where(
            nonneg, torch.full_like(d, cfg.vespo_lambda_pos), torch.full_like(d, cfg.vespo_lambda_neg)
        ).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    zero = tok.zero_metric()
    ppo_kl = tok.masked_mean(-tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    return _PG(-phi * tok.adv * tok.logp, zero, zero, ppo_kl)


_MODES: dict[str, Callable[..., _PG]] = {
    "vanilla": _loss_vanilla,
    "gspo": _loss_gspo,
    "clip_cov": _loss_clip_cov,
    "kl_cov": _loss_kl_cov,
    "gpg": _loss_gpg,
    "cispo": _loss_cispo,
    "sapo": _loss_sapo,
    "geo_mean": _loss_geo_mean,
    "dppo_kl": _loss_dppo_kl,
    "dppo_tv": _loss_dppo_tv,
    "dro": _loss_dro,
    "bypass_mode": _loss_bypass,
    "luspo": _loss_luspo,
    "vespo": _loss_vespo,
}
#: modes whose policy term takes the rollout IS weights themselves (the others are multiplied by them)
_IS_INSIDE_MODES = ("geo_mean", "vespo", "bypass_mode")


def _random_keys(like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``torch.rand(N)`` on ``like``'s device. A generator on another device draws there and copies
    (pass ``torch.Generator(device=...)`` matching the inputs to keep the head free of host syncs)."""
    n = like.numel()
    if generator is None or generator.device.type == like.device.type:
        return torch.rand(n, generator=generator, device=like.device, dtype=torch.float32)
    return torch.rand(n, generator=generator, device=generator.device, dtype=torch.float32).to(like.device)


# --------------------------------------------------------------------------------------------------
# KL penalty and aggregation
# --------------------------------------------------------------------------------------------------


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference (verl ``kl_penalty``).

    ``k1 = logp - ref``, ``abs = |logp - ref|``, ``k2 = (logp - ref)^2 / 2``,
    ``k3 = clamp(exp(x) - x - 1, -10, 10)`` with ``x = clamp(ref - logp, -20, 20)``. A ``+`` suffix
    keeps the value and takes the gradient of ``k2`` (straight-through).
    """
    name = canonical_kl_type(kl_type)
    base = name.rstrip("+")
    diff = logp - ref_logp
    if base == "k1":
        kl = diff
    elif base == "abs":
        kl = diff.abs()
    elif base == "k2":
        kl = 0.5 * diff.square()
    else:
        x = (-diff).clamp(-20.0, 20.0)
        kl = (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)
    if name.endswith("+"):
        k2 = 0.5 * diff.square()
        kl = k2 - k2.detach() + kl.detach()
    return kl


def _as_denominator(v: Union[Number, torch.Tensor], like: torch.Tensor) -> Union[float, torch.Tensor]:
    """A normaliser as a Python float (validated > 0 by the config) or a 0-dim tensor on ``like``'s
    device whose non-positive value is replaced by 1 (no NaN). Python numbers never become device
    tensors: no host-to-device copy."""
    if not isinstance(v, torch.Tensor):
        return float(v)
    t = v.to(device=like.device, dtype=like.dtype).reshape(())
    return torch.where(t > 0, t, torch.ones_like(t))


class _Denominators(NamedTuple):
    tokens: Union[float, torch.Tensor]
    seqs: Union[float, torch.Tensor]
    norm_len: Union[float, torch.Tensor]
    seq_tokens: torch.Tensor  # [B] valid tokens per sequence, clamped to >= 1


def _denominators(tok: _Tokens, cfg: PolicyLossConfig) -> _Denominators:
    like = tok.logp
    seg = tok.seg
    per_seq = seg.seq_sum(tok.valid.to(like.dtype))
    tokens = _as_denominator(cfg.global_num_tokens, like) if cfg.global_num_tokens is not None else tok.count()
    seqs = (
        _as_denominator(cfg.global_num_seqs, like)
        if cfg.global_num_seqs is not None
        else (per_seq > 0).sum().to(like.dtype).clamp_min(1)
    )
    default_len = seg.default_norm_len(like)
    norm_len = _as_denominator(cfg.norm_len if cfg.norm_len is not None else default_len, like)
    return _Denominators(tokens, seqs, norm_len, per_seq.clamp_min(1))


def _aggregate(values: torch.Tensor, tok: _Tokens, den: _Denominators, mode: str) -> torch.Tensor:
    """Reduce per-token ``values`` [N] over the valid tokens to a scalar (verl ``agg_loss``)."""
    masked = torch.where(tok.valid, values, torch.zeros_like(values))
    if mode == "token-mean":
        return masked.sum() / den.tokens
    if mode == "seq-mean-token-sum":
        return masked.sum() / den.seqs
    if mode == "seq-mean-token-mean":
        return (tok.seg.seq_sum(masked) / den.seq_tokens).sum() / den.seqs
    if mode == "seq-mean-token-sum-norm":  # Dr.GRPO: sequence sums over a constant length
        return masked.sum() / (den.seqs * den.norm_len)
    if mode == "token-sum":  # verl: no normaliser at all
        return masked.sum()
    raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config: Optional[PolicyLossConfig] = None,
    *,
    global_num_tokens: Normaliser = None,
    global_num_seqs: Normaliser = None,
    norm_len: Normaliser = None,
    check_inputs: Optional[bool] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RL policy loss from per-token log-probs (differentiable in ``logp`` and ``entropy``).

    Args:
        logp: ``[B, T]`` padded or ``[N]`` packed (with ``cu_seqlens``) log-probs of the sampled
            tokens under the current policy; any float dtype (computed in fp32, fp64 stays fp64).
        old_logp: same shape, log-probs under the behaviour (rollout) policy; not differentiated.
        advantages: per token (shape of ``logp``) or per sequence (``[B]``); not differentiated.
        mask: same shape as ``logp``; non-zero marks a valid (response) token.
        entropy: optional per-token entropy (shape of ``logp``); required if ``entropy_coeff > 0``.
        ref_logp: optional reference-policy log-probs; required if ``kl_loss_coef > 0``.
        cu_seqlens: int32/int64 ``[B+1]`` boundaries of packed sequences (``logp`` is then ``[N]``).
        config: :class:`PolicyLossConfig` (default: PPO with dual clip, token-mean).
        global_num_tokens, global_num_seqs, norm_len: override the config's normalisers for this
            call (numbers or 0-dim tensors, e.g. all-reduced counts of the whole global batch).
        check_inputs: run the value checks that need a host sync (``cu_seqlens`` starts at 0, is
            non-decreasing and ends at <= N; a non-bool ``mask`` holds only 0/1). Default: on for
            CPU tensors, ``FUSEDRL_CHECK_INPUTS=1`` elsewhere; never under ``torch.compile``.
        rollout_logp: the inference engine's log-probs of the sampled tokens (shape of ``logp``; not
            differentiated): required by ``config.rollout_correction`` (decoupled mode), read by
            ``off_policy_mask_threshold`` (default there: ``old_logp``); not allowed in bypass mode,
            where ``old_logp`` is the rollout's.
        rollout_is_weights: precomputed rollout IS weights (shape of ``logp``; detached), as verl's trainer
            hands them to its policy losses: used exactly as the weights of
            ``rollout_correction.rollout_is`` (which must then be off); not in bypass mode.

    Returns:
        ``(loss, metrics)``: ``loss`` is a 0-dim tensor
        ``agg(pg) - entropy_coeff * agg(entropy) + kl_loss_coef * agg(kl)`` where ``agg`` is
        ``loss_agg_mode`` with the configured normalisers; ``metrics`` maps ``pg_loss``,
        ``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl`` (+ ``entropy`` when given, ``kl`` when
        ``ref_logp`` is given, ``cov_selected_frac`` for clip_cov / kl_cov, and verl's
        ``rollout_corr/...`` metrics with a rollout correction or in bypass mode; see
        :func:`metric_names`) to detached 0-dim fp32 tensors. ``entropy`` and ``kl`` metrics are plain
        means over the local valid tokens.

    Per-token factors of the policy term (the token stays in the denominators): the rollout IS
    weights, the ``top_entropy_quantile`` mask and the OPSM mask. Rollout rejection sampling instead
    removes tokens from ``mask`` (loss, denominators and metrics). The KL term is multiplied by the
    importance ratio with ``use_bias_correction_kl`` (TRL) and by nothing else.

    Aggregation (``n_seq`` = ``global_num_seqs``, default: local sequences with at least one valid
    token; ``n_tok`` = ``global_num_tokens``, default: local valid tokens):

    * token-mean: ``sum(L m) / n_tok``;
    * seq-mean-token-sum: ``sum_i(sum_t L m) / n_seq``;
    * seq-mean-token-mean: ``sum_i(sum_t L m / sum_t m) / n_seq``;
    * token-sum: ``sum(L m)`` (no normaliser);
    * seq-mean-token-sum-norm (Dr.GRPO): ``sum_i(sum_t L m) / n_seq / norm_len``, i.e. the
      seq-mean-token-sum divided by a constant length, as current verl (``loss_scale_factor``) and
      TRL's ``dr_grpo`` (``/ (B * max_completion_length)``) do. ``norm_len`` defaults to ``T`` for
      padded inputs and to the longest sequence in ``cu_seqlens`` for packed inputs; pass the
      maximum response length to keep it constant across steps.

    With global counts, summing the losses of all micro-batches gives the gradient of one big batch
    (if your data-parallel wrapper *averages* gradients over W ranks, pass count / W).

    Never synchronises with the host and traces under ``torch.compile(fullgraph=True)``. Values at
    masked positions are never read (NaN/inf padding is harmless) and get exactly zero gradient; an
    all-masked batch gives ``loss == 0`` still attached to the graph (zero gradients, no NaN).

    Clip-Cov draws ``torch.rand(numel)`` (from ``config.generator`` if set) and detaches the
    candidates with the largest keys: a uniform random subset; picks depend on the layout and on
    the generator state (same layout + same seed -> same picks). KL-Cov and the Clip-Cov pick break
    ties in their key by the lower flat index (deterministic).
    """
    cfg = _with_normalisers(config, global_num_tokens, global_num_seqs, norm_len)
    _check_optional_inputs(
        cfg,
        entropy is not None,
        ref_logp is not None,
        rollout_logp is not None,
        has_is_weights=rollout_is_weights is not None,
    )
    loss, metrics, _ = _evaluate(
        logp,
        old_logp,
        advantages,
        mask,
        entropy,
        ref_logp,
        cu_seqlens,
        cfg,
        check_inputs,
        rollout_logp=rollout_logp,
        rollout_is_weights=rollout_is_weights,
    )
    return loss, metrics


def _check_optional_inputs(
    cfg: PolicyLossConfig,
    has_entropy: bool,
    has_ref: bool,
    has_rollout: bool,
    entropy_known: bool = True,
    has_is_weights: bool = False,
) -> None:
    """The optional inputs a config needs (or must not get), as clear errors."""
    if has_is_weights:
        if cfg.loss_mode == "bypass_mode":
            raise ValueError(
                "loss_mode='bypass_mode' computes its IS weights from the current policy: "
                "do not pass rollout_is_weights (verl's bypass ignores them too)"
            )
        if cfg.rollout_correction is not None and cfg.rollout_correction.is_enabled:
            raise ValueError(
                "rollout_is_weights and rollout_correction.rollout_is both give IS weights: pass one of them"
            )
    if cfg.entropy_coeff != 0 and entropy_known and not has_entropy:
        raise ValueError("entropy_coeff > 0 needs the per-token entropy (pass entropy=...)")
    if cfg.top_entropy_quantile < 1 and entropy_known and not has_entropy:
        raise ValueError("top_entropy_quantile < 1 needs the per-token entropy (pass entropy=...)")
    if cfg.kl_loss_coef != 0 and not has_ref:
        raise ValueError("kl_loss_coef > 0 needs the reference log-probs (pass ref_logp=...)")
    if cfg.loss_mode == "bypass_mode":
        if has_rollout:
            raise ValueError(
                "loss_mode='bypass_mode' reads the rollout's log-probs from old_logp: do not pass rollout_logp"
            )
    elif cfg.rollout_correction is not None and not has_rollout:
        raise ValueError(
            "rollout_correction needs the inference engine's log-probs (pass rollout_logp=...), "
            "or use loss_mode='bypass_mode' when old_logp is the rollout's"
        )
    elif has_rollout and cfg.rollout_correction is None and cfg.off_policy_mask_threshold is None:
        raise ValueError(
            "rollout_logp is given but nothing reads it: set rollout_correction and/or off_policy_mask_threshold"
        )


def _with_normalisers(
    config: Optional[PolicyLossConfig],
    global_num_tokens: Normaliser = None,
    global_num_seqs: Normaliser = None,
    norm_len: Normaliser = None,
) -> PolicyLossConfig:
    """The config (default: PolicyLossConfig()) with per-call normaliser overrides applied."""
    cfg = config if config is not None else PolicyLossConfig()
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(cfg).__name__}")
    overrides = {
        k: v
        for k, v in (
            ("global_num_tokens", global_num_tokens),
            ("global_num_seqs", global_num_seqs),
            ("norm_len", norm_len),
        )
        if v is not None
    }
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _make_tokens(
    seg: Optional[_Segments], valid: torch.Tensor, lp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor
) -> _Tokens:
    """Sanitised per-token context: values at masked positions become 0 (no NaN/inf from padding)."""
    dtype = lp.dtype
    zeros = torch.zeros(lp.shape, dtype=dtype, device=lp.device)
    clean = lambda x: torch.where(valid, x.to(dtype), zeros)  # noqa: E731
    lp = clean(lp)
    old = clean(old.detach())
    return _Tokens(
        valid=valid, n_valid=valid.sum(), logp=lp, old_logp=old, adv=clean(adv.detach()), log_ratio=lp - old, seg=seg
    )


def _pg_terms(
    tok: _Tokens, cfg: PolicyLossConfig, picked: Optional[torch.Tensor] = None, keys=None, ctx: _Ctx = _NO_CTX
) -> tuple[_PG, Optional[torch.Tensor]]:
    """The configured mode's per-token loss and metrics, and the covariance pick (or None). With
    ``picked`` given, the covariance modes skip their selection and use it."""
    if cfg.loss_mode == "clip_cov":
        picked = _select_clip_cov(tok, cfg, keys) if picked is None else picked
        return _clip_cov_terms(tok, cfg, picked), picked
    if cfg.loss_mode == "kl_cov":
        picked = _select_kl_cov(tok, cfg) if picked is None else picked
        return _kl_cov_terms(tok, cfg, picked), picked
    return _MODES[cfg.loss_mode](tok, cfg, ctx), None


def _pg_factors(
    loss: torch.Tensor, cfg: PolicyLossConfig, is_w: Optional[torch.Tensor], keep: Optional[torch.Tensor]
) -> torch.Tensor:
    """The per-token policy loss times the rollout IS weights (for the modes that do not take them
    themselves) and zeroed outside ``keep`` (entropy / OPSM masks)."""
    if is_w is not None and cfg.loss_mode not in _IS_INSIDE_MODES:
        loss = loss * is_w
    if keep is not None:
        loss = torch.where(keep, loss, torch.zeros_like(loss))
    return loss


def _and(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return b if a is None else (a if b is None else a & b)


class _Rollout(NamedTuple):
    """The rollout stage of a batch: effective valid mask, IS weights, OPSM's sampling log-probs, metrics."""

    valid: torch.Tensor
    is_w: Optional[torch.Tensor]
    sampling: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _rollout_stage(
    cfg: PolicyLossConfig,
    seg: _Segments,
    valid: torch.Tensor,
    lp: Optional[torch.Tensor],
    old: torch.Tensor,
    rollout: Optional[torch.Tensor],
    with_metrics: bool,
    is_weights: Optional[torch.Tensor] = None,
) -> _Rollout:
    """Rollout correction of the batch (verl ``compute_rollout_correction_and_rejection_mask``):
    decoupled from ``old - rollout`` or, in bypass mode, from ``logp - old`` (``lp`` detached; None: the
    current policy is not known yet). ``old`` / ``rollout`` are clean (0 at masked positions);
    ``is_weights``: precomputed IS weights (clean), used as the correction's own."""
    sampling = old if rollout is None else rollout
    rc = cfg.effective_rollout_correction
    if rc is None:
        return _Rollout(valid, is_weights, sampling, {})
    group = cfg.stats_group
    reduce = (lambda t: _group_sum(t, group)) if group is not None else None  # noqa: E731
    if cfg.loss_mode == "bypass_mode":
        if lp is None:
            return _Rollout(valid, None, sampling, {})
        terms = rollout_terms(rc, lp, old, valid, seg, with_metrics, reduce)
    else:
        if rollout is None:  # precomputed weights only (verl): nothing to reject or report
            return _Rollout(valid, is_weights, sampling, {})
        terms = rollout_terms(rc, old, rollout, valid, seg, with_metrics, reduce)
    keep = valid if terms.keep is None else valid & terms.keep
    return _Rollout(keep, terms.weights if is_weights is None else is_weights, sampling, terms.metrics)


def _kl_terms(tok: _Tokens, cfg: PolicyLossConfig, ref: torch.Tensor) -> torch.Tensor:
    """Per-token KL penalty, times the importance ratio with ``use_bias_correction_kl`` (TRL)."""
    kl = kl_penalty(tok.logp, ref, cfg.kl_loss_type)
    if cfg.use_bias_correction_kl:
        kl = kl * _is_ratio(tok, cfg)
    return kl


def _evaluate(
    logp,
    old_logp,
    advantages,
    mask,
    entropy,
    ref_logp,
    cu_seqlens,
    cfg: PolicyLossConfig,
    check_inputs: Optional[bool] = None,
    keys: Optional[torch.Tensor] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    picked: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
):
    """policy_loss's body: ``(loss, metrics, picked)``, ``picked`` being the covariance modes' selection
    (given: used instead of selecting)."""
    seg, valid0, lp, old, adv, ent, ref, ro, isw = _flatten_inputs(
        logp, old_logp, advantages, mask, entropy, ref_logp, cu_seqlens, check_inputs, rollout_logp, rollout_is_weights
    )
    dtype = _compute_dtype(logp)
    lp = lp.to(dtype)
    zeros = torch.zeros(lp.shape, dtype=dtype, device=lp.device)
    if cfg.effective_rollout_correction is None and isw is None and cfg.off_policy_mask_threshold is None:
        stage = _Rollout(valid0, None, zeros, {})  # the plain path: nothing to clean up front
    else:
        clean0 = lambda x: torch.where(valid0, x.detach().to(dtype), zeros)  # noqa: E731
        stage = _rollout_stage(
            cfg,
            seg,
            valid0,
            clean0(lp),
            clean0(old),
            None if ro is None else clean0(ro),
            with_metrics=True,
            is_weights=None if isw is None else clean0(isw),
        )
    valid = stage.valid
    tok = _make_tokens(seg, valid, lp, old, adv)
    clean = lambda x: torch.where(valid, x.to(dtype), torch.zeros_like(tok.logp))  # noqa: E731

    keep = None
    if cfg.top_entropy_quantile < 1:
        keep = _entropy_keep(clean(ent), valid, cfg.top_entropy_quantile, cfg.stats_group)
    if cfg.off_policy_mask_threshold is not None:
        keep = _and(keep, _opsm_keep(tok, torch.where(valid, stage.sampling, zeros), cfg.off_policy_mask_threshold))
    pg, picked = _pg_terms(tok, cfg, picked=picked, keys=keys, ctx=_Ctx(stage.is_w))
    den = _denominators(tok, cfg)
    pg_loss = _aggregate(_pg_factors(pg.loss, cfg, stage.is_w, keep), tok, den, cfg.loss_agg_mode)
    loss = pg_loss
    metrics = {
        "pg_loss": pg_loss.detach().float(),
        "pg_clipfrac": pg.clipfrac,
        "pg_clipfrac_lower": pg.clipfrac_lower,
        "ppo_kl": pg.ppo_kl,
    }
    if ent is not None:
        ent = clean(ent)
        metrics["entropy"] = tok.masked_mean(ent)
        if cfg.entropy_coeff != 0:
            loss = loss - cfg.entropy_coeff * _aggregate(ent, tok, den, cfg.loss_agg_mode)
    if ref is not None:
        kl = _kl_terms(tok, cfg, clean(ref.detach()))
        metrics["kl"] = tok.masked_mean(kl)
        if cfg.kl_loss_coef != 0:
            loss = loss + cfg.kl_loss_coef * _aggregate(kl, tok, den, cfg.loss_agg_mode)
    if pg.cov_selected_frac is not None:
        metrics["cov_selected_frac"] = pg.cov_selected_frac
    metrics.update(stage.metrics)
    return loss, metrics, picked


def metric_names(config: PolicyLossConfig, has_entropy: bool, has_ref: bool) -> tuple[str, ...]:
    """The keys of ``policy_loss``'s metrics dict, in order, for a config and the optional inputs."""
    names = ["pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"]
    if has_entropy:
        names.append("entropy")
    if has_ref:
        names.append("kl")
    if config.loss_mode in ("clip_cov", "kl_cov"):
        names.append("cov_selected_frac")
    rc = as_rollout_correction(getattr(config, "rollout_correction", None))
    if rc is None and config.loss_mode == "bypass_mode":
        rc = RolloutCorrection()
    if rc is not None:
        names.extend(rc.metric_names())
    return tuple(names)


# --------------------------------------------------------------------------------------------------
# The loss head as the one-pass schedule sees it (fusedrl/onepass.py)
# --------------------------------------------------------------------------------------------------

#: modes whose per-token gradient needs only the token itself (plus normalisers fixed up front)
TOKEN_LOCAL_MODES = ("vanilla", "gpg", "cispo", "sapo", "dppo_kl", "dppo_tv", "dro", "bypass_mode", "luspo")
#: batch-level selection: one pass with unselected coefficients, then a rank-k correction
SELECTION_MODES = ("clip_cov", "kl_cov")
#: a ratio per sequence: token chunks must hold whole sequences
SEQUENCE_MODES = ("gspo", "geo_mean", "vespo")
#: modes that need a statistic of the whole batch's logp / entropy before any gradient. No mode needs
#: one by itself: options do (``top_entropy_quantile < 1``; bypass mode with rejection sampling or IS
#: batch normalisation; selection modes with a sequence option). :func:`head_kind` classifies a config.
BATCH_MODES: tuple[str, ...] = ()
#: what :func:`head_kind` returns
HEAD_KINDS = ("token", "selection", "sequence", "batch")


def head_kind(cfg: PolicyLossConfig) -> str:
    """How the one-pass schedule can form this config's gradients:

    * ``"token"``: a token's upstream gradient needs the token only (normalisers, rollout IS weights and
      rejection of the decoupled mode are fixed up front from ``old_logp`` / ``rollout_logp``);
    * ``"selection"``: Clip-Cov / KL-Cov: one pass with the unselected coefficients, then the rank-k
      correction of the picked tokens;
    * ``"sequence"``: chunks must hold whole sequences (GSPO, GMPO, VESPO, TRL's sequence-level ratio,
      OPSM, sequence-level IS in bypass mode);
    * ``"batch"``: a statistic of the whole batch's logp / entropy comes first (entropy quantile, bypass
      rejection or IS batch normalisation, a selection mode with a sequence or batch option): the
      two-pass schedule (scoring forward, then :meth:`TokenHead.grads` over the whole batch).
    """
    mode = cfg.loss_mode
    batch = cfg.top_entropy_quantile < 1
    seq = (
        mode in SEQUENCE_MODES
        or cfg.importance_sampling_level == "sequence"
        or cfg.off_policy_mask_threshold is not None
    )
    if mode == "bypass_mode":
        rc = cfg.effective_rollout_correction
        uses_w = rc.is_enabled and rc.loss_type == "reinforce"
        if rc.rs_specs or (uses_w and rc.rollout_is_batch_normalize):
            batch = True  # the kept tokens (denominators) / the normaliser depend on the current policy
        elif uses_w and rc.rollout_is == "sequence":
            seq = True
    if mode in SELECTION_MODES:
        return "batch" if (batch or seq) else "selection"
    if batch:
        return "batch"
    return "sequence" if seq else "token"


def kernel_head_ok(cfg: PolicyLossConfig) -> bool:
    """Whether the fused one-pass epilogue kernels (Triton / CUDA, docs/one-pass.md head codes) compute
    this config: the modes they know, without any option of the 2026 loss menu."""
    return (
        cfg.loss_mode in ("vanilla", "clip_cov", "kl_cov", "gpg", "cispo")
        and cfg.delta is None
        and cfg.importance_sampling_level == "token"
        and cfg.rollout_correction is None
        and cfg.top_entropy_quantile >= 1
        and cfg.off_policy_mask_threshold is None
        and not cfg.use_bias_correction_kl
        and cfg.clip_ratio_high >= 0
    )


def _grad(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of the scalar ``fn(*args)`` w.r.t. ``args`` by autograd, also where the caller runs below
    the Autograd dispatch key (inside a ``torch.library.custom_op`` implementation, eager or compiled)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    for k in ("AutogradOther", "AutogradNestedTensor"):
        keys = keys | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, k))
    exclude = torch._C._dispatch_tls_local_exclude_set() - keys
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        leaves = [a.detach().requires_grad_(True) for a in args]
        out = fn(*leaves)
        return tuple(g.detach() for g in torch.autograd.grad(out, leaves, allow_unused=True, materialize_grads=True))


class TokenHead:
    """The policy-loss head for a schedule that learns ``logp`` and entropy chunk by chunk.

    Built once per batch from everything but the log-probs (which the schedule produces), it fixes
    the normalisers up front: the aggregation is then a weighted sum ``sum_t w_t L_t`` (``w`` from
    autograd through :func:`_aggregate` itself, so it is the aggregation's own formula), and the
    per-token upstream gradients of a chunk follow from that chunk alone (:meth:`grads`). The
    decoupled rollout correction (IS weights, rejection) depends on ``old_logp`` / ``rollout_logp`` only
    and is fixed up front as well. The formulas are this module's; nothing here is written twice.

    :attr:`kind` is :func:`head_kind` of the config: ``"sequence"`` chunks must hold whole sequences
    (or be the whole batch); ``"batch"`` gradients come from the whole batch at once (the two-pass
    schedule: call :meth:`evaluate` first, then ``grads(0, N, ...)``, which is the gradient of
    ``policy_loss`` itself with the same batch statistics and the same Clip-Cov keys).
    """

    def __init__(
        self,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_logp: Optional[torch.Tensor],
        cu_seqlens: Optional[torch.Tensor],
        cfg: PolicyLossConfig,
        need_entropy: bool,
        dtype: torch.dtype = torch.float32,
        check_inputs: Optional[bool] = None,
        rollout_logp: Optional[torch.Tensor] = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ):
        _check_optional_inputs(
            cfg,
            True,
            ref_logp is not None,
            rollout_logp is not None,
            entropy_known=False,
            has_is_weights=rollout_is_weights is not None,
        )
        self.cfg = cfg
        self.kind = head_kind(cfg)
        self.inputs = (old_logp, advantages, mask, ref_logp, cu_seqlens)
        self.rollout_in, self.is_weights_in = rollout_logp, rollout_is_weights
        seg, valid0, _, old, adv, _, ref, ro, isw = _flatten_inputs(
            old_logp,
            old_logp,
            advantages,
            mask,
            None,
            ref_logp,
            cu_seqlens,
            check_inputs,
            rollout_logp,
            rollout_is_weights,
        )
        self.dtype = dtype  # the compute dtype of the log-probs the schedule produces
        self.seg = seg
        self.old, self.adv = old.detach().to(self.dtype), adv.detach().to(self.dtype)
        self.ref = None if ref is None else ref.detach().to(self.dtype)
        zeros = torch.zeros(self.old.shape, dtype=self.dtype, device=self.old.device)
        clean0 = lambda x: torch.where(valid0, x.detach().to(self.dtype), zeros)  # noqa: E731
        stage = _rollout_stage(
            cfg,
            seg,
            valid0,
            None,
            clean0(old),
            None if ro is None else clean0(ro),
            with_metrics=False,
            is_weights=None if isw is None else clean0(isw),
        )
        self.valid0, self.valid, self.is_w, self.sampling = valid0, stage.valid, stage.is_w, stage.sampling
        self.need_entropy = bool(need_entropy)
        self._keys: Optional[torch.Tensor] = None
        self._picked: Optional[torch.Tensor] = None
        self._n_total: Optional[int] = None
        tok = _make_tokens(seg, self.valid, torch.zeros_like(self.old), self.old, self.adv)
        den = _denominators(tok, cfg)
        self.weights = _grad(lambda v: _aggregate(v, tok, den, cfg.loss_agg_mode), torch.zeros_like(self.old))[0]

    @property
    def entropy_has_grad(self) -> bool:
        return self.cfg.entropy_coeff != 0

    @property
    def needs_entropy(self) -> bool:
        """The head reads the entropy (its gradient term, or the entropy quantile mask)."""
        return self.cfg.entropy_coeff != 0 or self.cfg.top_entropy_quantile < 1

    def selection_bound(self) -> int:
        """Host bound on the number of tokens Clip-Cov / KL-Cov pick in this batch (the rank-k correction's
        ``k_max``): ``min(N, max(1, int(ratio * N_total)))`` with ``N_total`` the group's token count under
        ``stats_group`` (one all-reduce and host read, once) and the local ``N`` otherwise."""
        cfg = self.cfg
        ratio = cfg.clip_cov_ratio if cfg.loss_mode == "clip_cov" else cfg.kl_cov_ratio
        n = self.valid.numel()
        total = n
        if cfg.stats_group is not None:
            if self._n_total is None:
                t = torch.tensor([n], dtype=torch.int64, device=self.valid.device)
                self._n_total = int(_group_sum(t, cfg.stats_group).item())
            total = self._n_total
        return min(n, max(1, int(ratio * total)))

    def chunk_segments(self, start: int, stop: int, seqs: Optional[tuple[int, int]]) -> Optional[_Segments]:
        """Segments of tokens ``[start, stop)`` holding whole sequences ``seqs = (s0, s1)`` (sequence modes)."""
        if seqs is None:
            return None
        s0, s1 = seqs
        if self.seg.padded:
            return _Segments(s1 - s0, seq_len=self.seg.T)
        return _Segments(
            s1 - s0,
            seq_ids=(self.seg.seq_ids[start:stop] - s0).clamp(0, max(s1 - s0 - 1, 0)),
            lengths=self.seg.lengths[s0:s1],
        )

    def _objective(
        self,
        idx,
        lp: torch.Tensor,
        ent: Optional[torch.Tensor],
        seg: Optional[_Segments],
        picked: Optional[torch.Tensor],
        valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``sum_t w_t (pg_t - ent_coef H_t + kl_coef kl_t)`` over the tokens ``idx`` (a slice or indices)."""
        cfg = self.cfg
        valid = self.valid[idx] if valid is None else valid
        tok = _make_tokens(seg, valid, lp.to(self.dtype), self.old[idx], self.adv[idx])
        is_w = None if self.is_w is None else self.is_w[idx]
        keep = None
        if cfg.loss_mode == "bypass_mode":  # IS weights of the current policy (token- or sequence-local here)
            rc = cfg.effective_rollout_correction
            if rc.is_enabled and rc.loss_type == "reinforce":
                s = seg if seg is not None else _Segments(1, seq_len=valid.numel())
                is_w = rollout_terms(rc, tok.logp.detach(), tok.old_logp, valid, s, False).weights
        if cfg.off_policy_mask_threshold is not None:
            sampling = torch.where(valid, self.sampling[idx], torch.zeros_like(tok.logp))
            keep = _opsm_keep(tok, sampling, cfg.off_policy_mask_threshold)
        if picked is None and cfg.loss_mode in SELECTION_MODES:
            picked = torch.zeros_like(valid)
        pg, _ = _pg_terms(tok, cfg, picked=picked, ctx=_Ctx(is_w))
        per_tok = _pg_factors(pg.loss, cfg, is_w, keep)
        if cfg.entropy_coeff != 0 and ent is not None:
            per_tok = per_tok - cfg.entropy_coeff * ent.to(self.dtype)
        if cfg.kl_loss_coef != 0:
            per_tok = per_tok + cfg.kl_loss_coef * _kl_terms(tok, cfg, torch.where(valid, self.ref[idx], 0.0))
        w = self.weights[idx]
        return torch.where(valid, w * per_tok, torch.zeros_like(per_tok)).sum()

    def grads(
        self,
        start: int,
        stop: int,
        logp: torch.Tensor,
        entropy: Optional[torch.Tensor],
        seqs: Optional[tuple[int, int]] = None,
        picked: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(g_lp, g_H)``: d loss / d logp and d loss / d entropy for tokens ``[start, stop)`` (fp32/fp64;
        ``g_H`` None when the loss has no entropy term). Selection modes get their unselected terms.
        ``seqs``: the whole sequences the chunk holds (sequence kind; not needed for the whole batch).
        Batch kind: the whole batch only, the exact gradient of ``policy_loss`` (Clip-Cov: the pick
        ``picked``, default the one of the last :meth:`evaluate`)."""
        n = self.valid.numel()
        whole = start == 0 and stop == n
        lp = logp.detach().to(self.dtype)
        if self.kind == "batch":
            if not whole:
                raise ValueError(
                    f"this loss config needs a statistic of the whole batch (head_kind 'batch'): "
                    f"grads must cover tokens [0, {n}), got [{start}, {stop}) (two-pass schedule)"
                )
            return self._batch_grads(lp, entropy, picked)
        if self.kind == "sequence" and seqs is None:
            if not whole:
                raise ValueError(
                    f"this loss config has sequence-level terms (head_kind 'sequence'): chunks must "
                    f"hold whole sequences (pass seqs=) or the whole batch, got [{start}, {stop})"
                )
            seqs = (0, self.seg.B)
        idx, seg = slice(start, stop), self.chunk_segments(start, stop, seqs)
        if not self.entropy_has_grad:
            return _grad(lambda a: self._objective(idx, a, None, seg, None), lp)[0], None
        ent = entropy.detach().to(self.dtype)
        return _grad(lambda a, b: self._objective(idx, a, b, seg, None), lp, ent)

    def _batch_grads(self, lp: torch.Tensor, entropy: Optional[torch.Tensor], picked: Optional[torch.Tensor]):
        """The gradient of :func:`policy_loss` itself over the whole batch (same statistics, same pick)."""
        old, adv, mask, ref, cu = self.inputs
        shape = old.shape
        cfg = self.cfg
        picked = self._picked if picked is None else picked
        if cfg.loss_mode == "clip_cov" and picked is None:
            raise ValueError("Clip-Cov with a batch-level option: call evaluate() before grads() (same random pick)")
        if self.needs_entropy and entropy is None:
            raise ValueError("this loss config reads the entropy: pass entropy= (compute it in the forward)")
        ent = None if entropy is None else entropy.detach().to(self.dtype)

        def loss(a, b=ent):
            return _evaluate(
                a.reshape(shape),
                old,
                adv,
                mask,
                None if b is None else b.reshape(shape),
                ref,
                cu,
                cfg,
                check_inputs=False,
                rollout_logp=self.rollout_in,
                picked=picked,
                rollout_is_weights=self.is_weights_in,
            )[0]

        if not self.entropy_has_grad:
            return _grad(loss, lp)[0], None
        return _grad(loss, lp, ent)

    def evaluate(self, logp: torch.Tensor, entropy: Optional[torch.Tensor], keys: Optional[torch.Tensor] = None):
        """The exact ``policy_loss`` value, metrics and covariance pick for the whole batch (no grad)."""
        old, adv, mask, ref, cu = self.inputs
        shape = old.shape
        self._keys = keys
        with torch.no_grad():
            ent = None if entropy is None else entropy.reshape(shape)
            out = _evaluate(
                logp.reshape(shape),
                old,
                adv,
                mask,
                ent,
                ref,
                cu,
                self.cfg,
                check_inputs=False,
                keys=keys,
                rollout_logp=self.rollout_in,
                rollout_is_weights=self.is_weights_in,
            )
        self._picked = out[2]
        return out

    def selection_delta(self, idx: torch.Tensor, logp_sel: torch.Tensor, picked_sel: torch.Tensor) -> torch.Tensor:
        """Clip-Cov / KL-Cov: ``d(L_selected - L_unselected)/d logp`` for tokens ``idx`` whose pick flag is
        ``picked_sel`` (0 for tokens not picked): the correction the one-pass schedule applies to them."""
        valid = self.valid[idx] & picked_sel
        on, off = torch.ones_like(valid), torch.zeros_like(valid)
        delta = lambda a: (
            self._objective(idx, a, None, None, on, valid)  # noqa: E731
            - self._objective(idx, a, None, None, off, valid)
        )
        return _grad(delta, logp_sel.detach().to(self.dtype))[0]
