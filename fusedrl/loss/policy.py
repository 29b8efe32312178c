"""``policy_loss``: per-token log-probs in, scalar loss and metrics out; and :func:`evaluate`, its body,
which the one-pass schedule calls on the log-probs it produced.

The head is O(N) elementwise / reduction torch ops (plus one small ``topk`` for the covariance modes and
one sort for the entropy quantile), runs on any device, and never synchronises with the host: counts
such as the number of valid tokens stay 0-dim tensors and the data-dependent ``k`` of the covariance
modes is applied as a tensor threshold. With ``stats_group`` the selection statistics are computed over
the group with torch.distributed collectives (one host read of the ranks' token counts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, Optional

import torch

from .aggregate import aggregate, denominators, kl_penalty
from .config import Normaliser, PolicyLossConfig, check_normaliser_devices, with_normalisers
from .entropy_control import check_entropy_control_inputs, corridor_metrics, corridor_penalty, metric_names_of
from .heads import TORCH, Kernels, kernels_for, vanilla_kernel_ok
from .inputs import Batch, Segments, Tokens, clean_side, compute_dtype, flatten_batch, make_tokens, require_tensor
from .modes import IS_INSIDE_MODES, MODES, SELECTION_TERMS
from .rollout import RolloutCorrection, as_rollout_correction, rollout_terms
from .selection import entropy_keep, group_sum, opsm_keep, select_clip_cov, select_kl_cov
from .terms import Ctx, PGTerms, is_ratio

Tensor = torch.Tensor

__all__ = ["policy_loss", "evaluate", "metric_names", "check_optional_inputs"]


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    entropy: Optional[Tensor] = None,
    ref_logp: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    config: Optional[PolicyLossConfig] = None,
    *,
    global_num_tokens: Normaliser = None,
    global_num_seqs: Normaliser = None,
    norm_len: Normaliser = None,
    check_inputs: Optional[bool] = None,
    rollout_logp: Optional[Tensor] = None,
    rollout_is_weights: Optional[Tensor] = None,
    backend: str = "auto",
    old_entropy: Optional[Tensor] = None,
    entropy_change: Optional[Tensor] = None,
    external_mask: Optional[Tensor] = None,
    behaviour_logp: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None,
    entropy_reference: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
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
            CPU tensors, off elsewhere unless the environment turns them on; never under ``torch.compile``.
        rollout_logp: the inference engine's log-probs of the sampled tokens (shape of ``logp``; not
            differentiated): required by ``config.rollout_correction`` (decoupled mode), read by
            ``off_policy_mask_threshold`` (default there: ``old_logp``); not allowed in bypass mode,
            where ``old_logp`` is the rollout's.
        rollout_is_weights: precomputed rollout IS weights (shape of ``logp``; detached), as verl's trainer
            hands them to its policy losses: used exactly as the weights of
            ``rollout_correction.rollout_is`` (which must then be off); not in bypass mode.
        backend: which implementation computes the per-token terms: ``"auto"`` (the backend ``auto``
            resolves to on ``logp``'s device: torch formulas on CPU), ``"torch"``, ``"triton"``, ``"cuda"``
            (their loss-head kernels, fp32; other configs and fp64 take the torch formulas).
        old_entropy, entropy_change, external_mask, behaviour_logp, segment_ids, entropy_reference: the
            per-token inputs of the entropy-control methods (shape of ``logp``, not differentiated;
            docs/entropy-control.md): STEER's old-policy entropy (``steer_entropy="old"``) or entropy-change
            coefficient ``dH`` (``steer_exact``), RL-PLUS's external-demonstration flags and optional behaviour
            log-probs, SSPO's segment ids (``importance_sampling_level="segment"``), EPO's reference entropy
            (``entropy_corridor``). A config that needs one raises ``ValueError`` naming it when it is missing;
            one that nothing reads raises too.

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
    cfg = with_normalisers(config, global_num_tokens, global_num_seqs, norm_len)
    require_tensor("logp", logp)
    if not logp.is_floating_point():
        raise TypeError(f"logp must be a floating-point tensor, got {logp.dtype}")
    check_normaliser_devices(cfg, logp.device, "logp")
    side = {"entropy": entropy, "ref_logp": ref_logp, "rollout_logp": rollout_logp,
            "rollout_is_weights": rollout_is_weights, "old_entropy": old_entropy, "entropy_change": entropy_change,
            "external_mask": external_mask, "behaviour_logp": behaviour_logp, "segment_ids": segment_ids,
            "entropy_reference": entropy_reference}  # fmt: skip
    batch = flatten_batch("logp", tuple(logp.shape), logp.device, old_logp, advantages, mask, cu_seqlens, side,
                          check_inputs)  # fmt: skip
    check_optional_inputs(cfg, set(batch.side))
    kernels = kernels_for(backend, logp.device, compute_dtype(logp))
    loss, metrics, _ = evaluate(batch, logp.reshape(-1), batch.side.get("entropy"), cfg, kernels)
    return loss, metrics


def check_optional_inputs(cfg: PolicyLossConfig, given: set[str], entropy_known: bool = True) -> None:
    """The optional per-token inputs a config needs (or must not get), as clear errors naming them.
    ``given``: the names of the inputs passed; ``entropy_known``: the caller passes the entropy itself
    (the fused loss computes it, so it never lacks it)."""
    if "rollout_is_weights" in given:
        if cfg.loss_mode == "bypass_mode":
            raise ValueError(
                "loss_mode='bypass_mode' computes its IS weights from the current policy: "
                "do not pass rollout_is_weights (verl's bypass ignores them too)"
            )
        if cfg.rollout_correction is not None and cfg.rollout_correction.is_enabled:
            raise ValueError(
                "rollout_is_weights and rollout_correction.rollout_is both give IS weights: pass one of them"
            )
    if entropy_known and "entropy" not in given:
        if cfg.entropy_coeff != 0:
            raise ValueError("entropy_coeff > 0 needs the per-token entropy (pass entropy=...)")
        if cfg.top_entropy_quantile < 1:
            raise ValueError("top_entropy_quantile < 1 needs the per-token entropy (pass entropy=...)")
    check_entropy_control_inputs(cfg, given, entropy_known)
    if cfg.kl_loss_coef != 0 and "ref_logp" not in given:
        raise ValueError("kl_loss_coef > 0 needs the reference log-probs (pass ref_logp=...)")
    has_rollout = "rollout_logp" in given
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


# --------------------------------------------------------------------------------------------------
# The composition: rollout stage, masks, the mode's terms, aggregation, entropy and KL terms
# --------------------------------------------------------------------------------------------------


class Rollout(NamedTuple):
    """The rollout stage of a batch: effective valid mask, IS weights, OPSM's sampling log-probs, metrics."""

    valid: Tensor
    is_w: Optional[Tensor]
    sampling: Tensor
    metrics: dict[str, Tensor]


def rollout_stage(
    cfg: PolicyLossConfig,
    seg: Segments,
    valid: Tensor,
    lp: Optional[Tensor],
    old: Tensor,
    rollout: Optional[Tensor],
    with_metrics: bool,
    is_weights: Optional[Tensor] = None,
) -> Rollout:
    """Rollout correction of the batch (verl ``compute_rollout_correction_and_rejection_mask``):
    decoupled from ``old - rollout`` or, in bypass mode, from ``logp - old`` (``lp`` detached; None: the
    current policy is not known yet). ``old`` / ``rollout`` are clean (0 at masked positions);
    ``is_weights``: precomputed IS weights (clean), used as the correction's own."""
    sampling = old if rollout is None else rollout
    rc = cfg.effective_rollout_correction
    if rc is None:
        return Rollout(valid, is_weights, sampling, {})
    group = cfg.stats_group

    def reduce(t: Tensor) -> Tensor:
        return group_sum(t, group)

    red = reduce if group is not None else None
    if cfg.loss_mode == "bypass_mode":
        if lp is None:
            return Rollout(valid, None, sampling, {})
        terms = rollout_terms(rc, lp, old, valid, seg, with_metrics, red)
    else:
        if rollout is None:  # precomputed weights only (verl): nothing to reject or report
            return Rollout(valid, is_weights, sampling, {})
        terms = rollout_terms(rc, old, rollout, valid, seg, with_metrics, red)
    keep = valid if terms.keep is None else valid & terms.keep
    return Rollout(keep, terms.weights if is_weights is None else is_weights, sampling, terms.metrics)


def needs_rollout_stage(cfg: PolicyLossConfig, side: dict[str, Tensor]) -> bool:
    return (
        cfg.effective_rollout_correction is not None
        or "rollout_is_weights" in side
        or cfg.off_policy_mask_threshold is not None
    )


def pg_terms(
    tok: Tokens,
    cfg: PolicyLossConfig,
    ctx: Ctx,
    kernels: Kernels = TORCH,
    picked: Optional[Tensor] = None,
    keys: Optional[Tensor] = None,
) -> tuple[PGTerms, Optional[Tensor]]:
    """The configured mode's per-token loss and metrics, and the covariance pick (or None). With
    ``picked`` given, the covariance modes skip their selection and use it."""
    mode = cfg.loss_mode
    if mode == "clip_cov":
        picked = select_clip_cov(tok, cfg, keys, kernels.covariance) if picked is None else picked
    elif mode == "kl_cov":
        picked = select_kl_cov(tok, cfg, kernels.covariance) if picked is None else picked
    if mode in SELECTION_TERMS:
        return SELECTION_TERMS[mode](tok, cfg, picked), picked
    if kernels.vanilla is not None and vanilla_kernel_ok(cfg):
        return kernels.vanilla(tok, cfg), None
    return MODES[mode](tok, cfg, ctx), None


def pg_factors(loss: Tensor, cfg: PolicyLossConfig, is_w: Optional[Tensor], keep: Optional[Tensor]) -> Tensor:
    """The per-token policy loss times the rollout IS weights (for the modes that do not take them
    themselves) and zeroed outside ``keep`` (entropy / OPSM masks)."""
    if is_w is not None and cfg.loss_mode not in IS_INSIDE_MODES:
        loss = loss * is_w
    if keep is not None:
        loss = torch.where(keep, loss, torch.zeros_like(loss))
    return loss


def kl_terms(tok: Tokens, cfg: PolicyLossConfig, ref: Tensor, side: Mapping[str, Tensor]) -> Tensor:
    """Per-token KL penalty, times the importance ratio with ``use_bias_correction_kl`` (TRL)."""
    kl = kl_penalty(tok.logp, ref, cfg.kl_loss_type)
    if cfg.use_bias_correction_kl:
        kl = kl * is_ratio(tok, cfg, side)
    return kl


def _and(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    return b if a is None else (a if b is None else a & b)


def evaluate(
    batch: Batch,
    logp: Tensor,
    entropy: Optional[Tensor],
    cfg: PolicyLossConfig,
    kernels: Kernels = TORCH,
    keys: Optional[Tensor] = None,
    picked: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Tensor], Optional[Tensor]]:
    """policy_loss's body on a flattened batch and flat ``logp`` / ``entropy`` ``[N]``:
    ``(loss, metrics, picked)``, ``picked`` being the covariance modes' selection (given: used instead of
    selecting; ``keys``: Clip-Cov's random keys)."""
    seg, valid0, side = batch.seg, batch.valid, batch.side
    dtype = compute_dtype(logp)
    lp = logp.to(dtype)
    zeros = torch.zeros(lp.shape, dtype=dtype, device=lp.device)

    def clean0(x: Tensor) -> Tensor:
        return torch.where(valid0, x.detach().to(dtype), zeros)

    if needs_rollout_stage(cfg, side):
        ro, isw = side.get("rollout_logp"), side.get("rollout_is_weights")
        stage = rollout_stage(cfg, seg, valid0, clean0(lp), clean0(batch.old_logp), None if ro is None else clean0(ro),
                              with_metrics=True, is_weights=None if isw is None else clean0(isw))  # fmt: skip
    else:
        stage = Rollout(valid0, None, zeros, {})  # the plain path: nothing to clean up front
    valid = stage.valid
    tok = make_tokens(seg, valid, lp, batch.old_logp, batch.adv)
    ent = None if entropy is None else tok.clean(entropy)

    keep = None
    if cfg.top_entropy_quantile < 1:
        keep = entropy_keep(ent, valid, cfg.top_entropy_quantile, cfg.stats_group)
    if cfg.off_policy_mask_threshold is not None:
        keep = _and(keep, opsm_keep(tok, torch.where(valid, stage.sampling, zeros), cfg.off_policy_mask_threshold))
    ctx = Ctx(stage.is_w, ent, {k: clean_side(k, v, valid, dtype) for k, v in side.items() if k != "entropy"})
    pg, picked = pg_terms(tok, cfg, ctx, kernels, picked=picked, keys=keys)
    den = denominators(tok, cfg)
    pg_loss = aggregate(pg_factors(pg.loss, cfg, stage.is_w, keep), tok, den, cfg.loss_agg_mode)
    loss = pg_loss
    metrics = {
        "pg_loss": pg_loss.detach().float(),
        "pg_clipfrac": pg.clipfrac,
        "pg_clipfrac_lower": pg.clipfrac_lower,
        "ppo_kl": pg.ppo_kl,
    }
    if ent is not None:
        metrics["entropy"] = tok.masked_mean(ent)
        if cfg.entropy_coeff != 0:
            loss = loss - cfg.entropy_coeff * aggregate(ent, tok, den, cfg.loss_agg_mode)
    ref = side.get("ref_logp")
    if ref is not None:
        kl = kl_terms(tok, cfg, tok.clean(ref.detach()), ctx.side)
        metrics["kl"] = tok.masked_mean(kl)
        if cfg.kl_loss_coef != 0:
            loss = loss + cfg.kl_loss_coef * aggregate(kl, tok, den, cfg.loss_agg_mode)
    if pg.cov_selected_frac is not None:
        metrics["cov_selected_frac"] = pg.cov_selected_frac
    if pg.extra:
        metrics.update(pg.extra)
    if cfg.entropy_corridor is not None:
        ref_h = ctx.side["entropy_reference"]
        pen = corridor_penalty(ent, ref_h, cfg)
        loss = loss + cfg.entropy_corridor_coeff * aggregate(pen, tok, den, cfg.loss_agg_mode)
        metrics.update(corridor_metrics(tok, ent, ref_h, pen, cfg))
    metrics.update(stage.metrics)
    return loss, metrics, picked


def metric_names(config: PolicyLossConfig, has_entropy: bool, has_ref: bool) -> tuple[str, ...]:
    """The keys of ``policy_loss``'s metrics dict, in order, for a config and the optional inputs."""
    names = ["pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl"]
    if has_entropy:
        names.append("entropy")
    if has_ref:
        names.append("kl")
    if config.loss_mode in SELECTION_TERMS:
        names.append("cov_selected_frac")
    names.extend(metric_names_of(config))
    rc = as_rollout_correction(config.rollout_correction)
    if rc is None and config.loss_mode == "bypass_mode":
        rc = RolloutCorrection()
    if rc is not None:
        names.extend(rc.metric_names())
    return tuple(names)
