"""RL policy-loss head: per-token log-probs in, scalar loss and metrics out.

The semantics follow verl's ``verl/trainer/ppo/core_algos.py`` (``compute_policy_loss_vanilla``,
``_gspo``, ``_clip_cov``, ``_kl_cov``, ``_gpg``, ``_cispo``, ``agg_loss``, ``kl_penalty``) so that the
numbers match what verl users already compare against; see DESIGN.md section 2 and the README for
the few places where fusedrl deliberately differs (everything stays on the device, no host sync).

Layout. Every input is flattened to ``N`` tokens plus a token->sequence map:

* padded: ``logp`` is ``[B, T]`` (``N = B*T``); a 1-D ``logp`` without ``cu_seqlens`` is one sequence;
* packed: ``logp`` is ``[N]`` and ``cu_seqlens`` (int32/int64 ``[B+1]``) gives sequence boundaries;
  tokens at positions ``>= cu_seqlens[-1]`` belong to no sequence and are ignored.

The head is O(N) elementwise/reduction torch ops (plus one small ``topk`` for the covariance modes),
runs on any device, and never synchronises with the host: counts such as the number of valid tokens
stay 0-dim tensors and the data-dependent ``k`` of the covariance modes is applied as a tensor
threshold (see :func:`_select_top_k`).

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
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch

from ._validate import want_checks

__all__ = [
    "PolicyLossConfig",
    "policy_loss",
    "LOSS_MODES",
    "LOSS_AGG_MODES",
    "KL_LOSS_TYPES",
    "canonical_kl_type",
    "kl_penalty",
]

Number = Union[int, float]
Normaliser = Union[int, float, torch.Tensor, None]

LOSS_MODES = ("vanilla", "gspo", "clip_cov", "kl_cov", "gpg", "cispo")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_KL_ALIASES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
#: accepted ``kl_loss_type`` names; a trailing ``+`` (e.g. ``"k3+"``, as in recent verl) keeps the
#: value of the estimator but takes the gradient of k2 (straight-through, unbiased KL gradient).
KL_LOSS_TYPES = tuple(_KL_ALIASES) + tuple(k + "+" for k in _KL_ALIASES if k not in ("mse", "k2"))

# log-ratio clamp used for every importance ratio (verl: clamp(log_prob - old_log_prob, -20, 20))
_LOG_RATIO_CLAMP = 20.0
_HEAD_ENV = "FUSEDRL_HEAD"  # per-token head kernels: fusedrl/backends/_head.py
# GSPO clamps the token-level log sequence ratio from above (verl: clamp(..., max=10.0))
_GSPO_LOG_RATIO_MAX = 10.0


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

    ========================  ============  ==========================================================
    field                     default       meaning
    ========================  ============  ==========================================================
    loss_mode                 "vanilla"     "vanilla" (PPO clip + dual clip), "gspo", "clip_cov",
                                            "kl_cov", "gpg", "cispo"
    clip_ratio_low/high       0.2 / 0.2     ratio clipped to [1-low, 1+high] (clip-higher = DAPO)
    clip_ratio_c              3.0           dual-clip bound for A<0 (must be > 1; None disables)
    loss_agg_mode             "token-mean"  "token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                                            "seq-mean-token-sum-norm"
    global_num_tokens         None          token-mean denominator (default: local valid tokens)
    global_num_seqs           None          seq-mean denominator (default: local non-empty sequences)
    norm_len                  None          seq-mean-token-sum-norm constant length (default: T
                                            for padded inputs, the longest sequence for packed)
    entropy_coeff             0.0           loss -= entropy_coeff * agg(entropy)
    kl_loss_coef              0.0           loss += kl_loss_coef * agg(kl(logp, ref_logp))
    kl_loss_type              "low_var_kl"  "kl"/"k1", "abs", "mse"/"k2", "low_var_kl"/"k3"
    clip_cov_ratio            2e-4          Clip-Cov: fraction of valid tokens to detach
    clip_cov_lb / clip_cov_ub 1.0 / 5.0     Clip-Cov: candidate window lb < cov < ub
    kl_cov_ratio              2e-4          KL-Cov: fraction of valid tokens to penalise
    ppo_kl_coef               1.0           KL-Cov: coefficient of |logp - old_logp|
    generator                 None          torch.Generator for Clip-Cov's random pick
    ========================  ============  ==========================================================

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

    def __post_init__(self) -> None:
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {self.loss_agg_mode!r}")
        if not isinstance(self.kl_loss_type, str):
            raise ValueError(f"kl_loss_type must be a string, got {self.kl_loss_type!r}")
        canonical_kl_type(self.kl_loss_type)  # raises ValueError naming kl_loss_type
        for name in ("clip_ratio_low", "clip_ratio_high", "entropy_coeff", "kl_loss_coef",
                     "clip_cov_ratio", "kl_cov_ratio", "ppo_kl_coef"):
            v = getattr(self, name)
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
                f"clip_cov_lb must be < clip_cov_ub, got clip_cov_lb={self.clip_cov_lb}, "
                f"clip_cov_ub={self.clip_cov_ub}")
        for name in ("global_num_tokens", "global_num_seqs", "norm_len"):
            _check_normaliser(name, getattr(self, name))
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")

    @property
    def kl_type(self) -> str:
        """Canonical KL estimator name: ``"k1" | "abs" | "k2" | "k3"`` (optionally ending in ``+``)."""
        return canonical_kl_type(self.kl_loss_type)

    def replace(self, **changes) -> "PolicyLossConfig":
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

    def __init__(self, num_seqs: int, seq_len: Optional[int] = None, seq_ids: Optional[torch.Tensor] = None,
                 lengths: Optional[torch.Tensor] = None):
        self.B = num_seqs
        self.T = seq_len          # padded layout when not None
        self.seq_ids = seq_ids    # packed layout: [N] int64 in [0, B-1] (clamped; see valid mask)
        self.lengths = lengths    # packed layout: [B] sequence lengths

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
        raise ValueError(f"mask must hold only 0 and 1 (or be bool; non-zero = valid token), found "
                         f"{mask[bad].reshape(-1)[0].item()}; per-token loss weights are not supported")


def _check_cu_seqlens_values(cu: torch.Tensor, n: int) -> None:
    """Host-syncing check (behind ``check_inputs``): 0 = cu[0] <= cu[1] <= ... <= cu[-1] <= N."""
    c = cu.long().cpu()
    if c[0].item() != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {c[0].item()}")
    dec = (c[1:] < c[:-1]).nonzero()
    if dec.numel():
        i = dec[0, 0].item()
        raise ValueError(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {c[i].item()} > "
                         f"cu_seqlens[{i + 1}] = {c[i + 1].item()}")
    if c[-1].item() > n:
        raise ValueError(f"cu_seqlens must end at <= N = {n} (the packed token count; tokens after "
                         f"cu_seqlens[-1] are ignored), got cu_seqlens[-1] = {c[-1].item()}")


def _flatten_inputs(logp, old_logp, advantages, mask, entropy, ref_logp, cu_seqlens, check_inputs=None):
    """Check shapes, build the segment map and return flat [N] views plus the per-token valid mask."""
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("entropy", entropy), ("ref_logp", ref_logp), ("cu_seqlens", cu_seqlens)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("entropy", entropy),
                    ("ref_logp", ref_logp)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _check_mask_dtype(mask)
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("mask", mask), ("entropy", entropy), ("ref_logp", ref_logp)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of logp {shape}, got {tuple(t.shape)}")
    device = logp.device
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask),
                    ("entropy", entropy), ("ref_logp", ref_logp), ("cu_seqlens", cu_seqlens)):
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
            raise ValueError(f"packed advantages must be [N]={n} (per token) or [B]={b} (per sequence), "
                             f"got {tuple(advantages.shape)}")
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
                raise ValueError(f"advantages must be [B, T] or [B] for logp of shape {shape}, "
                                 f"got {tuple(advantages.shape)}") from None
    valid = (mask != 0).reshape(-1)
    if in_seq is not None:
        valid = valid & in_seq
    flat = lambda x: None if x is None else x.reshape(-1)  # noqa: E731
    return seg, valid, flat(logp), flat(old_logp), adv.reshape(-1), flat(entropy), flat(ref_logp)


# --------------------------------------------------------------------------------------------------
# Per-token context shared by the loss modes
# --------------------------------------------------------------------------------------------------


class _Tokens(NamedTuple):
    """Flat, sanitised per-token tensors (zeros at masked positions) in the compute dtype."""

    valid: torch.Tensor      # [N] bool
    n_valid: torch.Tensor    # 0-dim int64 count of valid tokens
    logp: torch.Tensor       # [N] differentiable
    old_logp: torch.Tensor   # [N] detached
    adv: torch.Tensor        # [N] detached
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

    loss: torch.Tensor                                # [N] per-token loss (masked positions are ignored)
    clipfrac: torch.Tensor                            # 0-dim fp32
    clipfrac_lower: torch.Tensor                      # 0-dim fp32
    ppo_kl: torch.Tensor                              # 0-dim fp32
    cov_selected_frac: Optional[torch.Tensor] = None  # 0-dim fp32 (covariance modes)


def _ratio(tok: _Tokens) -> torch.Tensor:
    """Per-token importance ratio ``exp(clamp(logp - old_logp, -20, 20))``."""
    return torch.exp(tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))


def _clipped_surrogate(adv: torch.Tensor, ratio: torch.Tensor, cfg: PolicyLossConfig):
    """``L1 = -A r``, ``L2 = -A clip(r, 1-low, 1+high)`` and ``max(L1, L2)``."""
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    return l1, l2, torch.maximum(l1, l2)


def _covariance(tok: _Tokens, clip: Optional[Tuple[float, float, float, float]] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Detached ``(A - mean_m A) * (logp - mean_m logp)`` over the batch's valid tokens ([N]), and,
    when the cuda head serves it (``FUSEDRL_HEAD``), Clip-Cov's candidate mask from the same launch
    (``clip = (clip_low, clip_high, lb, ub)``); otherwise ``(cov, None)``."""
    with torch.no_grad():
        denom = tok.count()
        lp = tok.logp.detach()
        mean_a = tok.adv.sum() / denom        # masked positions hold 0
        mean_lp = lp.sum() / denom
        if os.environ.get(_HEAD_ENV, "torch") != "torch":
            from .backends import _head
            fused = _head.cov_terms(tok, mean_a, mean_lp, clip)
            if fused is not None:
                return fused
        return (tok.adv - mean_a) * (lp - mean_lp), None


def _num_to_select(tok: _Tokens, ratio: float) -> Tuple[torch.Tensor, int]:
    """``k = max(1, int(ratio * n_valid))`` as a device tensor, and a host upper bound of it."""
    n = tok.valid.numel()
    k_max = min(n, max(1, int(ratio * n)))
    # float64 so the floor matches Python's int(ratio * n) exactly (MPS has no float64)
    fdt = torch.float32 if tok.logp.device.type == "mps" else torch.float64
    k = torch.floor(tok.n_valid.to(fdt) * ratio).clamp(min=1, max=max(k_max, 1)).long()
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
    kth = top_vals.gather(0, (k - 1).reshape(1))                  # [1], the k-th largest value
    above = eligible & (k_eff > kth)
    tied = eligible & (k_eff == kth)
    need = k - above.sum()                                        # how many tied tokens to take
    return above | (tied & (torch.cumsum(tied.long(), 0) <= need))


# --------------------------------------------------------------------------------------------------
# Loss modes: one function each, returning per-token losses and metrics
# --------------------------------------------------------------------------------------------------


def _loss_vanilla(tok: _Tokens, cfg: PolicyLossConfig) -> _PG:
    """PPO clipped surrogate with clip-higher and dual clip (verl ``compute_policy_loss_vanilla``)."""
    if os.environ.get(_HEAD_ENV, "torch") != "torch":  # opt-in: one fused Triton / CUDA launch per pass
        from .backends import _head
        pg = _head.vanilla_pg(tok, cfg)
        if pg is not None:  # None: fp64, or no kernel here under FUSEDRL_HEAD=auto
            return pg
    log_ratio = tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    l1, l2, lc = _clipped_surrogate(tok.adv, torch.exp(log_ratio), cfg)
    clipfrac = tok.masked_mean(l2 > l1)
    if cfg.clip_ratio_c is None:
        loss, lower = lc, tok.zero_metric()
    else:
        l3 = -tok.adv * cfg.clip_ratio_c
        negative = tok.adv < 0
        loss = torch.where(negative, torch.minimum(l3, lc), lc)
        lower = tok.masked_mean((lc > l3) & negative)
    return _PG(loss, clipfrac, lower, tok.masked_mean(-log_ratio))


def _loss_gspo(tok: _Tokens, cfg: PolicyLossConfig) -> _PG:
    """GSPO: sequence-level ratio ``s_i = exp(mean_t d)``, applied per token with a straight-through
    gradient (``log s_it = sg(log s_i) + logp - sg(logp)``, clamped at 10); no dual clip."""
    seg = tok.seg
    n_tok = seg.seq_sum(tok.valid.to(tok.logp.dtype)).clamp_min(1)
    log_seq_ratio = (seg.seq_sum(tok.log_ratio) / n_tok).detach()      # masked positions hold 0
    log_s = tok.logp - tok.logp.detach() + seg.expand(log_seq_ratio)  # verl's order (precision)
    s = torch.exp(log_s.clamp(max=_GSPO_LOG_RATIO_MAX))
    l1, l2, loss = _clipped_surrogate(tok.adv, s, cfg)
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
    with torch.no_grad():
        l1, l2, _ = _clipped_surrogate(tok.adv, _ratio(tok), cfg)
        cov, candidates = _covariance(tok, (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_cov_lb, cfg.clip_cov_ub))
        if candidates is None:
            candidates = tok.valid & ~(l2 > l1) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
        k, k_max = _num_to_select(tok, cfg.clip_cov_ratio)
        if keys is None:
            keys = _random_keys(tok.logp, cfg.generator)
        return _select_top_k(keys, candidates, k, k_max)


def _clip_cov_terms(tok: _Tokens, cfg: PolicyLossConfig, picked: torch.Tensor) -> _PG:
    """Clip-Cov's per-token loss for a given pick: the clipped surrogate, 0 on picked tokens."""
    l1, l2, lc = _clipped_surrogate(tok.adv, _ratio(tok), cfg)
    loss = torch.where(picked, torch.zeros_like(lc), lc)
    frac = tok.masked_mean(picked)
    return _PG(loss, frac, tok.zero_metric(), tok.masked_mean(-tok.log_ratio), frac)


def _loss_kl_cov(tok: _Tokens, cfg: PolicyLossConfig) -> _PG:
    """KL-Cov: unclipped ``-A r`` plus ``ppo_kl_coef * |logp - old_logp|`` on the top
    ``max(1, int(ratio*n_valid))`` valid tokens by covariance (ties -> lower index). As verl,
    ``ppo_kl`` reports ``mean_m |d|`` and ``pg_clipfrac`` is 0."""
    return _kl_cov_terms(tok, cfg, _select_kl_cov(tok, cfg))


def _select_kl_cov(tok: _Tokens, cfg: PolicyLossConfig) -> torch.Tensor:
    """KL-Cov's pick: the top-k valid tokens by covariance (bool [N])."""
    with torch.no_grad():
        k, k_max = _num_to_select(tok, cfg.kl_cov_ratio)
        return _select_top_k(_covariance(tok)[0], tok.valid, k, k_max)


def _kl_cov_terms(tok: _Tokens, cfg: PolicyLossConfig, picked: torch.Tensor) -> _PG:
    """KL-Cov's per-token loss for a given pick."""
    loss = -tok.adv * _ratio(tok)
    abs_kl = tok.log_ratio.abs()
    loss = loss + torch.where(picked, cfg.ppo_kl_coef * abs_kl, torch.zeros_like(abs_kl))
    zero = tok.zero_metric()
    return _PG(loss, zero, zero, tok.masked_mean(abs_kl), tok.masked_mean(picked))


def _loss_gpg(tok: _Tokens, cfg: PolicyLossConfig) -> _PG:
    """GPG: plain policy gradient ``-A logp``."""
    zero = tok.zero_metric()
    ppo_kl = tok.masked_mean(-tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    return _PG(-tok.adv * tok.logp, zero, zero, ppo_kl)


def _loss_cispo(tok: _Tokens, cfg: PolicyLossConfig) -> _PG:
    """CISPO: ``-sg(clip(r, 1-low, 1+high)) * A * logp``; every token keeps its gradient."""
    log_ratio = tok.log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio).detach()
    clipped = ratio.clamp(1.0 - cfg.clip_ratio_low, 1.0 + cfg.clip_ratio_high)
    loss = -clipped * tok.adv * tok.logp
    return _PG(loss, tok.masked_mean(ratio != clipped), tok.zero_metric(), tok.masked_mean(-log_ratio))


_MODES: Dict[str, Callable[[_Tokens, PolicyLossConfig], _PG]] = {
    "vanilla": _loss_vanilla,
    "gspo": _loss_gspo,
    "clip_cov": _loss_clip_cov,
    "kl_cov": _loss_kl_cov,
    "gpg": _loss_gpg,
    "cispo": _loss_cispo,
}


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
    tokens = (_as_denominator(cfg.global_num_tokens, like) if cfg.global_num_tokens is not None
              else tok.count())
    seqs = (_as_denominator(cfg.global_num_seqs, like) if cfg.global_num_seqs is not None
            else (per_seq > 0).sum().to(like.dtype).clamp_min(1))
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
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
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

    Returns:
        ``(loss, metrics)``: ``loss`` is a 0-dim tensor
        ``agg(pg) - entropy_coeff * agg(entropy) + kl_loss_coef * agg(kl)`` where ``agg`` is
        ``loss_agg_mode`` with the configured normalisers; ``metrics`` maps ``pg_loss``,
        ``pg_clipfrac``, ``pg_clipfrac_lower``, ``ppo_kl`` (+ ``entropy`` when given, ``kl`` when
        ``ref_logp`` is given, ``cov_selected_frac`` for clip_cov / kl_cov) to detached 0-dim fp32
        tensors. ``entropy`` and ``kl`` metrics are plain means over the local valid tokens.

    Aggregation (``n_seq`` = ``global_num_seqs``, default: local sequences with at least one valid
    token; ``n_tok`` = ``global_num_tokens``, default: local valid tokens):

    * token-mean: ``sum(L m) / n_tok``;
    * seq-mean-token-sum: ``sum_i(sum_t L m) / n_seq``;
    * seq-mean-token-mean: ``sum_i(sum_t L m / sum_t m) / n_seq``;
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
    if cfg.entropy_coeff != 0 and entropy is None:
        raise ValueError("entropy_coeff > 0 needs the per-token entropy (pass entropy=...)")
    if cfg.kl_loss_coef != 0 and ref_logp is None:
        raise ValueError("kl_loss_coef > 0 needs the reference log-probs (pass ref_logp=...)")
    loss, metrics, _ = _evaluate(logp, old_logp, advantages, mask, entropy, ref_logp, cu_seqlens, cfg, check_inputs)
    return loss, metrics


def _with_normalisers(config: Optional[PolicyLossConfig], global_num_tokens: Normaliser = None,
                      global_num_seqs: Normaliser = None, norm_len: Normaliser = None) -> PolicyLossConfig:
    """The config (default: PolicyLossConfig()) with per-call normaliser overrides applied."""
    cfg = config if config is not None else PolicyLossConfig()
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(cfg).__name__}")
    overrides = {k: v for k, v in (("global_num_tokens", global_num_tokens),
                                   ("global_num_seqs", global_num_seqs), ("norm_len", norm_len)) if v is not None}
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _make_tokens(seg: Optional[_Segments], valid: torch.Tensor, lp: torch.Tensor, old: torch.Tensor,
                 adv: torch.Tensor) -> _Tokens:
    """Sanitised per-token context: values at masked positions become 0 (no NaN/inf from padding)."""
    dtype = lp.dtype
    zeros = torch.zeros(lp.shape, dtype=dtype, device=lp.device)
    clean = lambda x: torch.where(valid, x.to(dtype), zeros)  # noqa: E731
    lp = clean(lp)
    old = clean(old.detach())
    return _Tokens(valid=valid, n_valid=valid.sum(), logp=lp, old_logp=old, adv=clean(adv.detach()),
                   log_ratio=lp - old, seg=seg)


def _pg_terms(tok: _Tokens, cfg: PolicyLossConfig, picked: Optional[torch.Tensor] = None, keys=None
              ) -> Tuple[_PG, Optional[torch.Tensor]]:
    """The configured mode's per-token loss and metrics, and the covariance pick (or None). With
    ``picked`` given, the covariance modes skip their selection and use it."""
    if cfg.loss_mode == "clip_cov":
        picked = _select_clip_cov(tok, cfg, keys) if picked is None else picked
        return _clip_cov_terms(tok, cfg, picked), picked
    if cfg.loss_mode == "kl_cov":
        picked = _select_kl_cov(tok, cfg) if picked is None else picked
        return _kl_cov_terms(tok, cfg, picked), picked
    return _MODES[cfg.loss_mode](tok, cfg), None


def _evaluate(logp, old_logp, advantages, mask, entropy, ref_logp, cu_seqlens, cfg: PolicyLossConfig,
              check_inputs: Optional[bool] = None, keys: Optional[torch.Tensor] = None):
    """policy_loss's body: ``(loss, metrics, picked)``, ``picked`` being the covariance modes' selection."""
    seg, valid, lp, old, adv, ent, ref = _flatten_inputs(
        logp, old_logp, advantages, mask, entropy, ref_logp, cu_seqlens, check_inputs)
    dtype = _compute_dtype(logp)
    tok = _make_tokens(seg, valid, lp.to(dtype), old, adv)
    clean = lambda x: torch.where(valid, x.to(dtype), torch.zeros_like(tok.logp))  # noqa: E731

    pg, picked = _pg_terms(tok, cfg, keys=keys)
    den = _denominators(tok, cfg)
    pg_loss = _aggregate(pg.loss, tok, den, cfg.loss_agg_mode)
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
        kl = kl_penalty(tok.logp, clean(ref.detach()), cfg.kl_loss_type)
        metrics["kl"] = tok.masked_mean(kl)
        if cfg.kl_loss_coef != 0:
            loss = loss + cfg.kl_loss_coef * _aggregate(kl, tok, den, cfg.loss_agg_mode)
    if pg.cov_selected_frac is not None:
        metrics["cov_selected_frac"] = pg.cov_selected_frac
    return loss, metrics, picked


def metric_names(config: PolicyLossConfig, has_entropy: bool, has_ref: bool) -> Tuple[str, ...]:
    """The keys of ``policy_loss``'s metrics dict, in order, for a config and the optional inputs."""
    names = ["pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"]
    if has_entropy:
        names.append("entropy")
    if has_ref:
        names.append("kl")
    if config.loss_mode in ("clip_cov", "kl_cov"):
        names.append("cov_selected_frac")
    return tuple(names)


# --------------------------------------------------------------------------------------------------
# The loss head as the one-pass schedule sees it (fusedrl/onepass.py)
# --------------------------------------------------------------------------------------------------

#: modes whose per-token gradient needs only the token itself (plus normalisers fixed up front)
TOKEN_LOCAL_MODES = ("vanilla", "gpg", "cispo")
#: batch-level selection: one pass with unselected coefficients, then a rank-k correction
SELECTION_MODES = ("clip_cov", "kl_cov")
#: a ratio per sequence: token chunks must hold whole sequences
SEQUENCE_MODES = ("gspo",)


def _grad(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> Tuple[torch.Tensor, ...]:
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
    formulas are this module's; nothing here is written twice.
    """

    def __init__(self, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 ref_logp: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], cfg: PolicyLossConfig,
                 need_entropy: bool, dtype: torch.dtype = torch.float32, check_inputs: Optional[bool] = None):
        if cfg.kl_loss_coef != 0 and ref_logp is None:
            raise ValueError("kl_loss_coef > 0 needs the reference log-probs (pass ref_logp=...)")
        self.cfg = cfg
        self.inputs = (old_logp, advantages, mask, ref_logp, cu_seqlens)
        seg, valid, _, old, adv, _, ref = _flatten_inputs(
            old_logp, old_logp, advantages, mask, None, ref_logp, cu_seqlens, check_inputs)
        self.dtype = dtype  # the compute dtype of the log-probs the schedule produces
        self.seg, self.valid = seg, valid
        self.old, self.adv = old.detach().to(self.dtype), adv.detach().to(self.dtype)
        self.ref = None if ref is None else ref.detach().to(self.dtype)
        self.need_entropy = bool(need_entropy)
        tok = _make_tokens(seg, valid, torch.zeros_like(self.old), self.old, self.adv)
        den = _denominators(tok, cfg)
        self.weights = _grad(lambda v: _aggregate(v, tok, den, cfg.loss_agg_mode), torch.zeros_like(self.old))[0]

    @property
    def entropy_has_grad(self) -> bool:
        return self.cfg.entropy_coeff != 0

    def chunk_segments(self, start: int, stop: int, seqs: Optional[Tuple[int, int]]) -> Optional[_Segments]:
        """Segments of tokens ``[start, stop)`` holding whole sequences ``seqs = (s0, s1)`` (sequence modes)."""
        if seqs is None:
            return None
        s0, s1 = seqs
        if self.seg.padded:
            return _Segments(s1 - s0, seq_len=self.seg.T)
        return _Segments(s1 - s0, seq_ids=(self.seg.seq_ids[start:stop] - s0).clamp(0, max(s1 - s0 - 1, 0)),
                         lengths=self.seg.lengths[s0:s1])

    def _objective(self, idx, lp: torch.Tensor, ent: Optional[torch.Tensor], seg: Optional[_Segments],
                   picked: Optional[torch.Tensor], valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``sum_t w_t (pg_t - ent_coef H_t + kl_coef kl_t)`` over the tokens ``idx`` (a slice or indices)."""
        cfg = self.cfg
        valid = self.valid[idx] if valid is None else valid
        tok = _make_tokens(seg, valid, lp.to(self.dtype), self.old[idx], self.adv[idx])
        if picked is None and cfg.loss_mode in SELECTION_MODES:
            picked = torch.zeros_like(valid)
        pg, _ = _pg_terms(tok, cfg, picked=picked)
        per_tok = pg.loss
        if cfg.entropy_coeff != 0 and ent is not None:
            per_tok = per_tok - cfg.entropy_coeff * ent.to(self.dtype)
        if cfg.kl_loss_coef != 0:
            per_tok = per_tok + cfg.kl_loss_coef * kl_penalty(tok.logp, torch.where(valid, self.ref[idx], 0.0),
                                                              cfg.kl_loss_type)
        w = self.weights[idx]
        return torch.where(valid, w * per_tok, torch.zeros_like(per_tok)).sum()

    def grads(self, start: int, stop: int, logp: torch.Tensor, entropy: Optional[torch.Tensor],
              seqs: Optional[Tuple[int, int]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(g_lp, g_H)``: d loss / d logp and d loss / d entropy for tokens ``[start, stop)`` (fp32/fp64;
        ``g_H`` None when the loss has no entropy term). Selection modes get their unselected terms.
        ``seqs``: the whole sequences the chunk holds (sequence modes)."""
        idx, seg = slice(start, stop), self.chunk_segments(start, stop, seqs)
        lp = logp.detach().to(self.dtype)
        if not self.entropy_has_grad:
            return _grad(lambda a: self._objective(idx, a, None, seg, None), lp)[0], None
        ent = entropy.detach().to(self.dtype)
        return _grad(lambda a, b: self._objective(idx, a, b, seg, None), lp, ent)

    def evaluate(self, logp: torch.Tensor, entropy: Optional[torch.Tensor], keys: Optional[torch.Tensor] = None):
        """The exact ``policy_loss`` value, metrics and covariance pick for the whole batch (no grad)."""
        old, adv, mask, ref, cu = self.inputs
        shape = old.shape
        with torch.no_grad():
            ent = None if entropy is None else entropy.reshape(shape)
            return _evaluate(logp.reshape(shape), old, adv, mask, ent, ref, cu, self.cfg, check_inputs=False,
                             keys=keys)

    def selection_delta(self, idx: torch.Tensor, logp_sel: torch.Tensor, picked_sel: torch.Tensor) -> torch.Tensor:
        """Clip-Cov / KL-Cov: ``d(L_selected - L_unselected)/d logp`` for tokens ``idx`` whose pick flag is
        ``picked_sel`` (0 for tokens not picked): the correction the one-pass schedule applies to them."""
        valid = self.valid[idx] & picked_sel
        on, off = torch.ones_like(valid), torch.zeros_like(valid)
        delta = lambda a: (self._objective(idx, a, None, None, on, valid)  # noqa: E731
                           - self._objective(idx, a, None, None, off, valid))
        return _grad(delta, logp_sel.detach().to(self.dtype))[0]
