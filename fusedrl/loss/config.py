"""``PolicyLossConfig``: the loss's hyper-parameters (verl's names and defaults), validated once.

Every field is checked in ``__post_init__`` (and again by :meth:`PolicyLossConfig.replace`); a bad
value raises ``ValueError`` naming the field. Numbers may be Python or numpy numbers or one-element
tensors (read once, on the host); they are stored as Python numbers, except the three normalisers,
which may stay 0-dim tensors (an all-reduced count on the device: no host sync).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .._validate import as_number, is_real
from .rollout import RolloutCorrection, as_rollout_correction

__all__ = [
    "PolicyLossConfig",
    "LOSS_MODES",
    "ENTROPY_CONTROL_MODES",
    "ALL_LOSS_MODES",
    "LOSS_AGG_MODES",
    "KL_LOSS_TYPES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "Normaliser",
    "canonical_kl_type",
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
#: the seed papers' entropy-control modes (docs/entropy-control.md): STEER, BAPO, RL-PLUS. Kept apart from
#: :data:`LOSS_MODES` (the verl / TRL menu); ``loss_mode`` accepts both (:data:`ALL_LOSS_MODES`)
ENTROPY_CONTROL_MODES = ("steer", "bapo", "rl_plus")
ALL_LOSS_MODES = LOSS_MODES + ENTROPY_CONTROL_MODES
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-sum")
#: TRL's ``importance_sampling_level``: the ratio of the ratio-based modes per token or per sequence
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "segment")
KL_ALIASES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
#: accepted ``kl_loss_type`` names; a trailing ``+`` (e.g. ``"k3+"``, as in recent verl) keeps the
#: value of the estimator but takes the gradient of k2 (straight-through, unbiased KL gradient).
KL_LOSS_TYPES = tuple(KL_ALIASES) + tuple(k + "+" for k in KL_ALIASES if k not in ("mse", "k2"))
#: modes that accept ``delta`` (INTELLECT-2 two-sided clip) and importance_sampling_level="sequence"
DELTA_MODES = ("vanilla", "gspo", "luspo", "bypass_mode")
SEQ_LEVEL_MODES = ("vanilla", "luspo", "cispo", "sapo")

# fields holding plain numbers (normalised to Python numbers; validated below)
_NUMBER_FIELDS = (
    "clip_ratio_low",
    "clip_ratio_high",
    "clip_ratio_c",
    "entropy_coeff",
    "kl_loss_coef",
    "clip_cov_ratio",
    "clip_cov_lb",
    "clip_cov_ub",
    "kl_cov_ratio",
    "ppo_kl_coef",
    "tau_pos",
    "tau_neg",
    "dro_beta",
    "delta",
    "top_entropy_quantile",
    "off_policy_mask_threshold",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "steer_lambda_min",
    "steer_lambda_max",
    "bapo_adv_ratio_target",
    "bapo_ratio_lower_start",
    "bapo_ratio_lower_max",
    "bapo_ratio_lower_step",
    "bapo_ratio_upper_start",
    "bapo_ratio_upper_max",
    "bapo_ratio_upper_step",
    "bapo_eps",
    "rl_plus_gamma",
    "entropy_corridor_coeff",
)
_NORMALISERS = ("global_num_tokens", "global_num_seqs", "norm_len")
#: the entropy-control fields (STEER, BAPO, RL-PLUS, EPO corridor); the one-pass op carries them in two lists
#: (:func:`entropy_control_args`)
ENTROPY_CONTROL_FIELDS = (
    "steer_weighting",
    "steer_lambda_min",
    "steer_lambda_max",
    "steer_entropy",
    "steer_exact",
    "bapo_adv_ratio_target",
    "bapo_ratio_lower_start",
    "bapo_ratio_lower_max",
    "bapo_ratio_lower_step",
    "bapo_ratio_upper_start",
    "bapo_ratio_upper_max",
    "bapo_ratio_upper_step",
    "bapo_eps",
    "rl_plus_clip_on_policy",
    "rl_plus_gamma",
    "entropy_corridor",
    "entropy_corridor_coeff",
)
STEER_WEIGHTINGS = ("linear", "exp")
STEER_ENTROPIES = ("old", "current")
#: the most candidate bounds BAPO evaluates per side (its grid is evaluated at once, on the device)
BAPO_MAX_GRID = 4096


def canonical_kl_type(name: str) -> str:
    """Map a verl KL name or alias to ``"k1" | "abs" | "k2" | "k3"`` (plus an optional ``"+"``)."""
    plus = isinstance(name, str) and name.endswith("+")
    base = name[:-1] if plus else name
    if not isinstance(name, str) or base not in KL_ALIASES or (plus and KL_ALIASES[base] == "k2"):
        raise ValueError(f"kl_loss_type must be one of {KL_LOSS_TYPES}, got {name!r}")
    return KL_ALIASES[base] + ("+" if plus else "")


def _finite(v) -> bool:
    return is_real(v) and not math.isnan(v) and not math.isinf(v)


def check_normaliser(name: str, v: Normaliser) -> Normaliser:
    """A normaliser: None, a positive finite number, or a one-element tensor (kept on its device: its
    value is not checked, that would need a host sync; :func:`check_normaliser_devices` checks the device
    against the tokens' at each call)."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must be a number or a 0-dim tensor, got shape {tuple(v.shape)}")
        if not (v.is_floating_point() or v.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
            raise ValueError(f"{name} must be a real tensor, got dtype {v.dtype}")
        return v
    v = as_number(name, v)
    if not _finite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number or a 0-dim tensor, got {v!r}")
    return v


def check_normaliser_devices(cfg: PolicyLossConfig, device: torch.device, anchor: str) -> None:
    """The config's normaliser tensors must lie on the tokens' ``device`` (that of the tensor named
    ``anchor``), or on the CPU (a 0-dim host count, copied to the device like a number): a meta normaliser
    (no value) only with meta tokens."""
    for name in _NORMALISERS:
        v = getattr(cfg, name)
        if isinstance(v, torch.Tensor) and v.device != device and v.device.type != "cpu":
            raise ValueError(f"{name} is on {v.device} but {anchor} is on {device}; pass it on {anchor}'s device "
                             "(or the CPU)")  # fmt: skip


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
    clip_cov_ratio              2e-4          Clip-Cov: fraction of valid tokens to detach (> 0)
    clip_cov_lb / clip_cov_ub   1.0 / 5.0     Clip-Cov: candidate window lb < cov < ub
    kl_cov_ratio                2e-4          KL-Cov: fraction of valid tokens to penalise (> 0)
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
    steer_weighting             "linear"      STEER: map of ``|Omega|`` to weights, "linear" or "exp"
    steer_lambda_min / _max     0.8 / 1.2     STEER: weight range (exp: ``[lambda_min, 1]``)
    steer_entropy               "old"         STEER: ``H`` of ``Omega`` from ``old_entropy=`` ("old", as
                                              the authors) or the current policy's entropy ("current")
    steer_exact                 False         STEER: ``Omega = -(A / p_old) dH`` from ``entropy_change=``
    bapo_adv_ratio_target       1.0           BAPO: target of ``P / N`` (positive / negative contribution)
    bapo_ratio_lower_start      None          BAPO: explicit lower ratio bound (None: 1 - clip_ratio_low)
    bapo_ratio_lower_max        None          BAPO: largest lower bound (None: the start, no search)
    bapo_ratio_lower_step       0.05          BAPO: lower-bound step
    bapo_ratio_upper_start      None          BAPO: explicit upper ratio bound (None: 1 + clip_ratio_high)
    bapo_ratio_upper_max        None          BAPO: largest upper bound (None: the start, no search)
    bapo_ratio_upper_step       0.05          BAPO: upper-bound step
    bapo_eps                    1e-8          BAPO: ``P / (N + eps)``
    rl_plus_clip_on_policy      False         RL-PLUS: clip the on-policy ratio (no dual clip)
    rl_plus_gamma               0.5           RL-PLUS: exponent of ``(1 - sg(p))`` on external tokens
    entropy_corridor            None          EPO: ``(kappa_l, kappa_r)``: penalise entropy outside
                                              ``[kappa_l H_ref, kappa_r H_ref]`` (``entropy_reference=``)
    entropy_corridor_coeff      0.001         EPO: coefficient of the corridor penalty
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
    steer        STEER: the dual-clip surrogate times detached token weights from ``|Omega|``
    bapo         BAPO: the dual-clip surrogate with ratio bounds searched per batch
    rl_plus      RL-PLUS: ``-A r`` on-policy, ``-rho A (1 - sg(p))^gamma`` on ``external_mask`` tokens
    ===========  ================================================================================

    ``importance_sampling_level="segment"`` (SSPO) takes one ratio per segment (``segment_ids=``), see
    docs/entropy-control.md with the three entropy-control modes and the EPO corridor.

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
    steer_weighting: str = "linear"
    steer_lambda_min: float = 0.8
    steer_lambda_max: float = 1.2
    steer_entropy: str = "old"
    steer_exact: bool = False
    bapo_adv_ratio_target: float = 1.0
    bapo_ratio_lower_start: Optional[float] = None
    bapo_ratio_lower_max: Optional[float] = None
    bapo_ratio_lower_step: float = 0.05
    bapo_ratio_upper_start: Optional[float] = None
    bapo_ratio_upper_max: Optional[float] = None
    bapo_ratio_upper_step: float = 0.05
    bapo_eps: float = 1e-8
    rl_plus_clip_on_policy: bool = False
    rl_plus_gamma: float = 0.5
    entropy_corridor: Optional[tuple[float, float]] = None
    entropy_corridor_coeff: float = 0.001

    def __post_init__(self) -> None:
        for name in _NUMBER_FIELDS:
            setattr(self, name, as_number(name, getattr(self, name)))
        for name in _NORMALISERS:
            setattr(self, name, check_normaliser(name, getattr(self, name)))
        for name in ("loss_mode", "loss_agg_mode", "importance_sampling_level"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.loss_mode not in ALL_LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {ALL_LOSS_MODES}, got {self.loss_mode!r}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        canonical_kl_type(self.kl_loss_type)  # raises ValueError naming kl_loss_type
        self._check_clip()
        self._check_selection()
        self._check_menu()
        self._check_entropy_control()

    def _check_clip(self) -> None:
        for name in ("clip_ratio_low", "clip_ratio_high", "entropy_coeff", "kl_loss_coef"):
            v = getattr(self, name)
            if name == "clip_ratio_high" and self.loss_mode == "cispo":
                if not _finite(v) or not v > -1:
                    raise ValueError(
                        f"clip_ratio_high must be a finite number > -1 for cispo (the cap is "
                        f"1 + clip_ratio_high), got {v!r}"
                    )
                continue
            if not _finite(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
        c = self.clip_ratio_c
        if c is not None and (not is_real(c) or math.isnan(c) or not c > 1.0):
            raise ValueError(f"clip_ratio_c must be > 1 (dual-clip lower bound) or None, got {c!r}")

    def _check_selection(self) -> None:
        """Clip-Cov / KL-Cov: verl asserts ``ratio > 0`` (a ratio of 0 would still pick one token)."""
        for name in ("clip_cov_ratio", "kl_cov_ratio"):
            v = getattr(self, name)
            if not _finite(v) or not 0 < v <= 1:
                raise ValueError(f"{name} must be a number in (0, 1] (the fraction of tokens selected), got {v!r}")
        if not _finite(self.ppo_kl_coef) or self.ppo_kl_coef < 0:
            raise ValueError(f"ppo_kl_coef must be a finite non-negative number, got {self.ppo_kl_coef!r}")
        for name in ("clip_cov_lb", "clip_cov_ub"):
            v = getattr(self, name)
            if not is_real(v) or math.isnan(v):
                raise ValueError(f"{name} must be a number, got {v!r}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(
                f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={self.clip_cov_lb}, clip_cov_ub={self.clip_cov_ub}"
            )
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")

    def _check_menu(self) -> None:
        """Fields of the 2026 loss menu (SAPO, DRO, delta, rollout correction, entropy masking, TRL's)."""
        for name in ("tau_pos", "tau_neg"):
            v = getattr(self, name)
            if not _finite(v) or not v > 0:
                raise ValueError(f"{name} must be a finite positive number, got {v!r}")
        if self.dro_beta is not None and (not _finite(self.dro_beta) or self.dro_beta < 0):
            raise ValueError(f"dro_beta must be a finite non-negative number or None, got {self.dro_beta!r}")
        if self.delta is not None:
            if not _finite(self.delta) or not self.delta > 0:
                raise ValueError(f"delta must be a finite positive number or None, got {self.delta!r}")
            if self.loss_mode not in DELTA_MODES:
                raise ValueError(
                    f"delta (two-sided clipping) applies to loss_mode {DELTA_MODES}, not {self.loss_mode!r}"
                )
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {self.importance_sampling_level!r}"
            )
        level = self.importance_sampling_level
        if level != "token" and self.loss_mode not in SEQ_LEVEL_MODES:
            raise ValueError(
                f"importance_sampling_level={level!r} applies to loss_mode {SEQ_LEVEL_MODES} "
                f"(gspo, geo_mean and vespo are sequence-level already), not {self.loss_mode!r}"
            )
        q = self.top_entropy_quantile
        if not is_real(q) or math.isnan(q) or not 0.0 <= q <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {q!r}")
        t = self.off_policy_mask_threshold
        if t is not None and not _finite(t):
            raise ValueError(f"off_policy_mask_threshold must be a finite number or None, got {t!r}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl must be a bool, got {self.use_bias_correction_kl!r}")
        for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
            if not _finite(getattr(self, name)):
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

    def _check_entropy_control(self) -> None:
        """STEER, BAPO, RL-PLUS and the EPO corridor (docs/entropy-control.md)."""
        for name, choices in (("steer_weighting", STEER_WEIGHTINGS), ("steer_entropy", STEER_ENTROPIES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("steer_exact", "rl_plus_clip_on_policy"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        lo, hi = self.steer_lambda_min, self.steer_lambda_max
        if not _finite(lo) or not _finite(hi) or not 0 <= lo <= hi:
            raise ValueError(
                f"steer_lambda_min / steer_lambda_max must be finite with 0 <= steer_lambda_min <= "
                f"steer_lambda_max, got {lo!r} / {hi!r}"
            )
        if self.steer_weighting == "exp" and not 0 < lo <= 1:
            raise ValueError(
                f"steer_lambda_min must be in (0, 1] for steer_weighting='exp' (k = -ln lambda_min), got {lo}"
            )
        for name in (
            "bapo_ratio_lower_start",
            "bapo_ratio_lower_max",
            "bapo_ratio_upper_start",
            "bapo_ratio_upper_max",
        ):
            v = getattr(self, name)
            if v is not None and not _finite(v):
                raise ValueError(f"{name} must be a finite number or None, got {v!r}")
        for name in ("bapo_ratio_lower_step", "bapo_ratio_upper_step", "bapo_eps", "rl_plus_gamma",
                     "entropy_corridor_coeff"):  # fmt: skip
            v = getattr(self, name)
            if not _finite(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
        t = self.bapo_adv_ratio_target
        if not is_real(t) or math.isnan(t) or t < 0:
            raise ValueError(f"bapo_adv_ratio_target must be a non-negative number, got {t!r}")
        if self.loss_mode == "bapo":
            lower, upper = bapo_grid(self)  # raises on an oversized grid
            if max(lower) > upper[0]:
                raise ValueError(
                    f"BAPO's lower ratio bounds must stay <= its upper ones: bapo_ratio_lower_start / _max reach "
                    f"{max(lower)} > bapo_ratio_upper_start {upper[0]}"
                )
        c = self.entropy_corridor
        if c is not None:
            if isinstance(c, (str, bytes)) or not hasattr(c, "__len__") or len(c) != 2:
                raise ValueError(f"entropy_corridor must be None or a pair (kappa_l, kappa_r), got {c!r}")
            c = tuple(as_number("entropy_corridor", x) for x in c)
            if not all(_finite(x) for x in c) or not 0 <= c[0] <= c[1]:
                raise ValueError(f"entropy_corridor must be finite with 0 <= kappa_l <= kappa_r, got {c!r}")
            self.entropy_corridor = (float(c[0]), float(c[1]))

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


_EC_STR_FIELDS = ("steer_weighting", "steer_entropy")
_EC_BOOL_FIELDS = ("steer_exact", "rl_plus_clip_on_policy")


def entropy_control_args(cfg: PolicyLossConfig) -> tuple[list[Optional[float]], list[str]]:
    """The entropy-control fields as ``(floats, strings)`` (the one-pass op's ``float?[]`` / ``str[]``
    arguments: bools as 0 / 1, the corridor as two numbers or two None); :func:`entropy_control_fields`
    inverts it."""
    floats: list[Optional[float]] = []
    for name in ENTROPY_CONTROL_FIELDS:
        v = getattr(cfg, name)
        if name in _EC_STR_FIELDS:
            continue
        if name == "entropy_corridor":
            floats.extend([None, None] if v is None else [float(v[0]), float(v[1])])
        else:
            floats.append(None if v is None else float(v))
    return floats, [getattr(cfg, n) for n in _EC_STR_FIELDS]


def entropy_control_fields(floats, strings) -> dict[str, Any]:
    """The entropy-control fields from :func:`entropy_control_args`' lists."""
    out: dict[str, Any] = dict(zip(_EC_STR_FIELDS, strings))
    it = iter(floats)
    for name in ENTROPY_CONTROL_FIELDS:
        if name in _EC_STR_FIELDS:
            continue
        if name == "entropy_corridor":
            lo, hi = next(it), next(it)
            out[name] = None if lo is None else (lo, hi)
        elif name in _EC_BOOL_FIELDS:
            out[name] = bool(next(it))
        else:
            out[name] = next(it)
    return out


def bapo_grid(cfg: PolicyLossConfig) -> tuple[list[float], list[float]]:
    """BAPO's candidate bounds (host floats), exactly as the authors' sequential search visits them: the
    lower bound from its start by ``min(cur + step, max)`` while ``cur < max`` (WooooDyy/BAPO
    ``compute_policy_loss_bapo``), then the upper bound likewise. Starts default to ``1 -+ clip_ratio``,
    maxima to the starts (no search)."""
    out = []
    for side, default in (("lower", 1.0 - cfg.clip_ratio_low), ("upper", 1.0 + cfg.clip_ratio_high)):
        start = getattr(cfg, f"bapo_ratio_{side}_start")
        cur = float(default if start is None else start)
        top = getattr(cfg, f"bapo_ratio_{side}_max")
        top = cur if top is None else float(top)
        step = float(getattr(cfg, f"bapo_ratio_{side}_step"))
        vals = [cur]
        while cur < top and step > 0:
            cur = min(cur + step, top)
            vals.append(cur)
            if len(vals) > BAPO_MAX_GRID:
                raise ValueError(
                    f"bapo_ratio_{side}_step={step} gives more than {BAPO_MAX_GRID} candidate {side} bounds "
                    f"between {vals[0]} and {top}"
                )
        out.append(vals)
    return out[0], out[1]


def bapo_state(cfg: PolicyLossConfig, step: int) -> tuple[float, float]:
    """The bounds ``(c_low, c_high)`` (host floats of :func:`bapo_grid`) of the search's state after ``step``
    steps: ``(lower_step, upper_0)`` while the lower bound moves, then ``(lower_last, upper_{step - nl + 1})``."""
    lower, upper = bapo_grid(cfg)
    if step < len(lower):
        return lower[step], upper[0]
    return lower[-1], upper[step - len(lower) + 1]


def with_normalisers(
    config: Optional[PolicyLossConfig],
    global_num_tokens: Normaliser = None,
    global_num_seqs: Normaliser = None,
    norm_len: Normaliser = None,
) -> PolicyLossConfig:
    """The config (default: ``PolicyLossConfig()``) with per-call normaliser overrides applied (validated)."""
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
