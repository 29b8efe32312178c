"""The loss head as a schedule that learns ``logp`` and entropy chunk by chunk sees it (the one-pass
schedule, ``fusedrl.onepass``): :func:`head_kind` classifies a config, :class:`TokenHead` gives a
chunk's per-token upstream gradients ``(g_lp, g_H)`` from the chunk alone, by autograd over the loss's
own formulas (``fusedrl.loss.modes``: each formula lives once)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import torch

from ..backends.base import KL_TYPES, LOSS_MODE_HEADS, OnePassHead
from .aggregate import aggregate, denominators
from .config import PolicyLossConfig, bapo_grid, bapo_state
from .entropy_control import (
    bapo_pick,
    bapo_sums,
    computes_entropy_change,
    corridor_penalty,
    device_floats,
    entropy_has_grad,
    reads_entropy,
)
from .inputs import Batch, Segments, clean_side, make_tokens
from .modes import ENTROPY_BATCH_MODES, SELECTION_MODES, SEQUENCE_MODES
from .policy import check_optional_inputs, evaluate, kl_terms, pg_factors, pg_terms, rollout_stage
from .rollout import rollout_terms
from .selection import group_sum, opsm_keep
from .terms import Ctx, clamped_log_ratio

Tensor = torch.Tensor

#: what :func:`head_kind` returns
HEAD_KINDS = ("token", "selection", "speculative", "sequence", "batch")


def head_kind(cfg: PolicyLossConfig) -> str:
    """How the one-pass schedule can form this config's gradients:

    * ``"token"``: a token's upstream gradient needs the token only (normalisers, rollout IS weights and
      rejection of the decoupled mode are fixed up front from ``old_logp`` / ``rollout_logp``);
    * ``"selection"``: Clip-Cov / KL-Cov: one pass with the unselected coefficients, then the rank-k
      correction of the picked tokens;
    * ``"sequence"``: chunks must hold whole sequences (GSPO, GMPO, VESPO, TRL's sequence-level ratio,
      OPSM, sequence-level IS in bypass mode);
    * ``"batch"``: a statistic of the whole batch's logp / entropy comes first (entropy quantile, bypass
      rejection or IS batch normalisation, a selection mode with a sequence or batch option, STEER's weight
      range): the two-pass schedule (scoring forward, then :meth:`TokenHead.grads` over the whole batch);
    * ``"speculative"``: BAPO (token-level): its bounds are a statistic of the whole batch, but they only
      move tokens between a constant branch and ``-A r``. One pass in which each chunk takes the bounds the
      search picks on the tokens seen so far (its own included; :func:`speculative_config`), then the
      searched bounds of the whole batch and a rank-k correction of the tokens whose branch they change.

    TRL's sequence ratio and SSPO's segment ratio (segments lie inside sequences) are ``"sequence"``; RL-PLUS
    and the EPO corridor are token-local.
    """
    mode = cfg.loss_mode
    batch = cfg.top_entropy_quantile < 1 or mode in ENTROPY_BATCH_MODES
    seq = (
        mode in SEQUENCE_MODES or cfg.importance_sampling_level != "token" or cfg.off_policy_mask_threshold is not None
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
    if mode == "bapo" and not seq and cfg.top_entropy_quantile >= 1:
        return "speculative"
    if batch:
        return "batch"
    return "sequence" if seq else "token"


def speculative_config(cfg: PolicyLossConfig, bounds: Optional[tuple[float, float]] = None) -> PolicyLossConfig:
    """BAPO with fixed ratio bounds (a search of one state; no collective): ``bounds``, or the first state of
    its search (the lower and upper starts). The one-pass schedule's pass takes, per chunk, the bounds the
    search picks on the tokens seen so far. The searched bounds only move a token between the clipped branch
    (constant) and the unclipped one (``-A r``), so the pass is exact for every token whose branch the search
    does not change; the correction fixes the others."""
    if bounds is None:
        lower, upper = bapo_grid(cfg)
        bounds = (lower[0], upper[0])
    lo, hi = (float(b) for b in bounds)
    return replace(cfg, bapo_ratio_lower_start=lo, bapo_ratio_lower_max=lo, bapo_ratio_upper_start=hi,
                   bapo_ratio_upper_max=hi, stats_group=None)  # fmt: skip


def kernel_head_codes(cfg: PolicyLossConfig) -> Optional[dict]:
    """The kernel formula set (:class:`fusedrl.backends.base.OnePassHead` scalars) of the config, or None
    when the kernels do not express it (the modes they know, without any option of the 2026 loss menu)."""
    ok = (
        cfg.loss_mode in LOSS_MODE_HEADS
        and cfg.delta is None
        and cfg.importance_sampling_level == "token"
        and cfg.rollout_correction is None
        and cfg.top_entropy_quantile >= 1
        and cfg.off_policy_mask_threshold is None
        and not cfg.use_bias_correction_kl
        and cfg.clip_ratio_high >= 0
        and cfg.entropy_corridor is None
    )
    if not ok:
        return None
    kl = cfg.kl_type
    return dict(
        mode=LOSS_MODE_HEADS[cfg.loss_mode],
        clip_lo=1.0 - cfg.clip_ratio_low,
        clip_hi=1.0 + cfg.clip_ratio_high,
        clip_c=float(cfg.clip_ratio_c) if cfg.clip_ratio_c is not None else 1.0,
        dual=cfg.loss_mode == "vanilla" and cfg.clip_ratio_c is not None,
        ent_coef=float(cfg.entropy_coeff),
        kl_coef=float(cfg.kl_loss_coef),
        kl_type=KL_TYPES[kl.rstrip("+")],
        kl_st=kl.endswith("+"),
    )


def autograd_grads(fn: Callable[..., Tensor], *args: Tensor) -> tuple[Tensor, ...]:
    """Gradients of the scalar ``fn(*args)`` w.r.t. ``args`` by autograd, also where the caller runs below
    the Autograd dispatch key (inside a ``torch.library.custom_op`` implementation, eager or compiled)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
    for k in ("AutogradOther", "AutogradNestedTensor"):
        keys = keys | torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, k))
    exclude = torch._C._dispatch_tls_local_exclude_set() - keys
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        leaves = [a.detach().requires_grad_(True) for a in args]
        out = fn(*leaves)
        if not out.requires_grad:  # independent of the arguments (e.g. tokens outside every sequence): zero
            return tuple(torch.zeros_like(a) for a in leaves)
        return tuple(g.detach() for g in torch.autograd.grad(out, leaves, allow_unused=True, materialize_grads=True))


class TokenHead:
    """The policy-loss head for a schedule that learns ``logp`` and entropy chunk by chunk.

    Built once per batch from everything but the log-probs (which the schedule produces), it fixes
    the normalisers up front: the aggregation is then a weighted sum ``sum_t w_t L_t`` (``w`` from
    autograd through :func:`fusedrl.loss.aggregate.aggregate` itself, so it is the aggregation's own
    formula), and the per-token upstream gradients of a chunk follow from that chunk alone
    (:meth:`grads`). The decoupled rollout correction (IS weights, rejection) depends on ``old_logp`` /
    ``rollout_logp`` only and is fixed up front as well.

    :attr:`kind` is :func:`head_kind` of the config: ``"sequence"`` chunks must hold whole sequences
    (or be the whole batch); ``"batch"`` gradients come from the whole batch at once (the two-pass
    schedule: call :meth:`evaluate` first, then ``grads(0, N, ...)``, which is the gradient of
    ``policy_loss`` itself with the same batch statistics and the same Clip-Cov keys).
    """

    def __init__(self, batch: Batch, cfg: PolicyLossConfig, need_entropy: bool, dtype: torch.dtype = torch.float32):
        check_optional_inputs(cfg, set(batch.side), entropy_known=False)
        self.batch = batch
        self.cfg = cfg
        self.kind = head_kind(cfg)
        # the speculative pass (BAPO): the search's sums over the chunks seen so far, and each chunk's
        # (start, stop, bounds) in the order the pass took them
        self._spec_sums: Optional[tuple[Tensor, Tensor]] = None
        self._spec_chunks: list[tuple[int, int, tuple[float, float]]] = []
        self.dtype = dtype  # the compute dtype of the log-probs the schedule produces
        self.seg = batch.seg
        valid0 = batch.valid
        self.old, self.adv = batch.old_logp.detach().to(dtype), batch.adv.detach().to(dtype)
        zeros = torch.zeros(self.old.shape, dtype=dtype, device=self.old.device)

        def clean0(x: Tensor) -> Tensor:
            return torch.where(valid0, x.detach().to(dtype), zeros)

        self.side = {k: clean_side(k, v, valid0, dtype) for k, v in batch.side.items()}
        ro, isw = self.side.get("rollout_logp"), self.side.get("rollout_is_weights")
        stage = rollout_stage(cfg, self.seg, valid0, None, clean0(batch.old_logp), ro, with_metrics=False,
                              is_weights=isw)  # fmt: skip
        self.valid0, self.valid, self.is_w, self.sampling = valid0, stage.valid, stage.is_w, stage.sampling
        self.ref = self.side.get("ref_logp")
        self.need_entropy = bool(need_entropy)
        self._picked: Optional[Tensor] = None
        self._n_total: Optional[int] = None
        self._weights: Optional[Tensor] = None

    @property
    def weights(self) -> Tensor:
        """``[N]`` aggregation weights ``d loss / d L_t`` (formed when a gradient is first needed: a forward
        alone, e.g. under ``torch.inference_mode``, never differentiates)."""
        if self._weights is None:
            cfg = self.cfg
            tok = make_tokens(self.seg, self.valid, torch.zeros_like(self.old), self.old, self.adv)
            den = denominators(tok, cfg)
            zero = torch.zeros_like(self.old)
            self._weights = autograd_grads(lambda v: aggregate(v, tok, den, cfg.loss_agg_mode), zero)[0]
        return self._weights

    @property
    def needs_entropy_change(self) -> bool:
        """STEER's exact form without a given ``entropy_change``: the schedule computes ``dH`` in its pass and
        hands it over with :meth:`provide` before :meth:`evaluate` / :meth:`grads`."""
        return computes_entropy_change(self.cfg, self.batch.side)

    def provide(self, name: str, values: Tensor) -> None:
        """A per-token side input ``[N]`` the schedule computed in its pass (``entropy_change``)."""
        values = values.detach().reshape(-1)
        self.batch = self.batch._replace(side={**self.batch.side, name: values})
        self.side[name] = clean_side(name, values, self.valid0, self.dtype)

    @property
    def entropy_has_grad(self) -> bool:
        """The loss differentiates the entropy (a bonus, the EPO corridor)."""
        return entropy_has_grad(self.cfg)

    @property
    def needs_entropy(self) -> bool:
        """The head reads the entropy (its gradient terms, the entropy quantile mask, STEER's current ``H``)."""
        return reads_entropy(self.cfg)

    def kernel_codes(self, start: int, stop: int, need_ent: bool) -> Optional[OnePassHead]:
        """The chunk's head as the kernels' formula set, or None when the config has none."""
        codes = kernel_head_codes(self.cfg)
        if codes is None or self.kind not in ("token", "selection"):
            return None
        ref = None if self.ref is None else self.ref[start:stop].float()
        return OnePassHead(old=self.old[start:stop].float(), adv=self.adv[start:stop].float(),
                           weight=self.weights[start:stop].float(), ref=ref, need_ent=need_ent, **codes)  # fmt: skip

    def selection_bound(self) -> int:
        """Host bound on the number of tokens Clip-Cov / KL-Cov pick in this batch (the rank-k correction's
        ``k_max``): ``min(N, max(1, int(ratio * N_total)))`` with ``N_total`` the group's token count under
        ``stats_group`` (one all-reduce and host read, once) and the local ``N`` otherwise."""
        cfg = self.cfg
        frac = cfg.clip_cov_ratio if cfg.loss_mode == "clip_cov" else cfg.kl_cov_ratio
        n = self.valid.numel()
        total = n
        if cfg.stats_group is not None:
            if self._n_total is None:
                t = torch.tensor([n], dtype=torch.int64, device=self.valid.device)
                self._n_total = int(group_sum(t, cfg.stats_group).item())
            total = self._n_total
        return min(n, max(1, int(frac * total)))

    def _objective(
        self,
        idx,
        lp: Tensor,
        ent: Optional[Tensor],
        seg: Optional[Segments],
        picked: Optional[Tensor],
        valid: Optional[Tensor] = None,
        cfg: Optional[PolicyLossConfig] = None,
    ) -> Tensor:
        """``sum_t w_t (pg_t - ent_coef H_t + kl_coef kl_t)`` over the tokens ``idx`` (a slice or indices);
        ``cfg``: another config's terms (the speculative surrogate) with this head's weights."""
        cfg = self.cfg if cfg is None else cfg
        valid = self.valid[idx] if valid is None else valid
        tok = make_tokens(seg, valid, lp.to(self.dtype), self.old[idx], self.adv[idx])
        is_w = None if self.is_w is None else self.is_w[idx]
        keep = None
        if cfg.loss_mode == "bypass_mode":  # IS weights of the current policy (token- or sequence-local here)
            rc = cfg.effective_rollout_correction
            if rc.is_enabled and rc.loss_type == "reinforce":
                s = seg if seg is not None else Segments(1, seq_len=valid.numel())
                is_w = rollout_terms(rc, tok.logp.detach(), tok.old_logp, valid, s, False).weights
        if cfg.off_policy_mask_threshold is not None:
            sampling = torch.where(valid, self.sampling[idx], torch.zeros_like(tok.logp))
            keep = opsm_keep(tok, sampling, cfg.off_policy_mask_threshold)
        if picked is None and cfg.loss_mode in SELECTION_MODES:
            picked = torch.zeros_like(valid)
        ent_c = None if ent is None else tok.clean(ent)
        side = {k: v[idx] for k, v in self.side.items()}
        pg, _ = pg_terms(tok, cfg, Ctx(is_w, ent_c, side), picked=picked)
        per_tok = pg_factors(pg.loss, cfg, is_w, keep)
        if cfg.entropy_coeff != 0 and ent is not None:
            per_tok = per_tok - cfg.entropy_coeff * ent.to(self.dtype)
        if cfg.entropy_corridor is not None and ent is not None:
            ref_h = torch.where(valid, side["entropy_reference"], 0.0)
            per_tok = per_tok + cfg.entropy_corridor_coeff * corridor_penalty(ent_c, ref_h, cfg)
        if cfg.kl_loss_coef != 0:
            ref = torch.where(valid, self.ref[idx], 0.0)
            per_tok = per_tok + cfg.kl_loss_coef * kl_terms(tok, cfg, ref, side)
        w = self.weights[idx]
        return torch.where(valid, w * per_tok, torch.zeros_like(per_tok)).sum()

    def grads(
        self,
        start: int,
        stop: int,
        logp: Tensor,
        entropy: Optional[Tensor],
        seqs: Optional[tuple[int, int]] = None,
        picked: Optional[Tensor] = None,
        speculative: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``(g_lp, g_H)``: d loss / d logp and d loss / d entropy for tokens ``[start, stop)`` (fp32/fp64;
        ``g_H`` None when the loss has no entropy term). Selection modes get their unselected terms.
        ``seqs``: the whole sequences the chunk holds (sequence kind; not needed for the whole batch).
        Batch kind: the whole batch only, the exact gradient of ``policy_loss`` (Clip-Cov: the pick
        ``picked``, default the one of the last :meth:`evaluate`). Speculative kind: the same, or with
        ``speculative`` the surrogate's gradient of any chunk (:func:`speculative_config`)."""
        n = self.valid.numel()
        whole = start == 0 and stop == n
        lp = logp.detach().to(self.dtype)
        speculate = speculative and self.kind == "speculative"
        if self.kind in ("batch", "speculative") and not speculate:
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
        idx, seg = slice(start, stop), self.seg.chunk(start, stop, seqs)
        # the speculative pass: the terms of BAPO at the chunk's own bounds, with this head's weights
        spec = speculative_config(self.cfg, self._speculate(lp, start, stop, seg)) if speculate else None
        if not self.entropy_has_grad:
            ent = None if entropy is None else entropy.detach().to(self.dtype)
            return autograd_grads(lambda a: self._objective(idx, a, ent, seg, None, cfg=spec), lp)[0], None
        ent = entropy.detach().to(self.dtype)
        return autograd_grads(lambda a, b: self._objective(idx, a, b, seg, None, cfg=spec), lp, ent)

    def _batch_grads(self, lp: Tensor, entropy: Optional[Tensor], picked: Optional[Tensor]):
        """The gradient of :func:`policy_loss` itself over the whole batch (same statistics, same pick)."""
        cfg = self.cfg
        picked = self._picked if picked is None else picked
        if cfg.loss_mode == "clip_cov" and picked is None:
            raise ValueError("Clip-Cov with a batch-level option: call evaluate() before grads() (same random pick)")
        if self.needs_entropy and entropy is None:
            raise ValueError("this loss config reads the entropy: pass entropy= (compute it in the forward)")
        ent = None if entropy is None else entropy.detach().to(self.dtype)

        def loss(a, b=ent):
            return evaluate(self.batch, a, b, cfg, picked=picked)[0]

        if not self.entropy_has_grad:
            return autograd_grads(loss, lp)[0], None
        return autograd_grads(loss, lp, ent)

    def evaluate(self, logp: Tensor, entropy: Optional[Tensor], keys: Optional[Tensor] = None):
        """The exact ``policy_loss`` value, metrics and covariance pick for the whole batch (no grad)."""
        with torch.no_grad():
            out = evaluate(self.batch, logp, entropy, self.cfg, keys=keys)
        self._picked = out[2]
        return out

    def _speculate(self, lp: Tensor, start: int, stop: int, seg: Optional[Segments]) -> tuple[float, float]:
        """The bounds BAPO's search picks on the tokens of the pass so far, this chunk ``[start, stop)`` included
        (host floats; the local tokens only, the group's come with the correction). A pass restarting at
        token 0 starts over."""
        if start == 0:
            self._spec_sums, self._spec_chunks = None, []
        idx = slice(start, stop)
        tok = make_tokens(seg, self.valid[idx], lp, self.old[idx], self.adv[idx])
        p, n = bapo_sums(tok, torch.exp(clamped_log_ratio(tok)), self.cfg)
        if self._spec_sums is not None:
            p, n = p + self._spec_sums[0], n + self._spec_sums[1]
        self._spec_sums = (p, n)
        bounds = bapo_state(self.cfg, int(bapo_pick(p, n, self.cfg)[3].item()))  # the grid's own floats
        self._spec_chunks.append((start, stop, bounds))
        return bounds

    def _pass_bounds(self) -> list[tuple[int, int, tuple[float, float]]]:
        """The pass's chunks and bounds; every token the pass did not see takes the first state of the search."""
        if self._spec_chunks:
            return self._spec_chunks
        lower, upper = bapo_grid(self.cfg)
        return [(0, self.valid.numel(), (lower[0], upper[0]))]

    def speculative_picks(self, logp: Tensor, steps: int) -> tuple[Tensor, tuple[float, float]]:
        """``([N] bool, bounds)``: the whole batch's bounds (the search's state after ``steps`` steps, as
        :meth:`evaluate` found it over the group: its ``bapo/search_steps`` metric; no collective here) and the
        tokens whose policy gradient they change against the bounds the pass took for them."""
        lp = logp.detach().to(self.dtype)
        tok = make_tokens(self.seg, self.valid, lp, self.old, self.adv)
        r = torch.exp(clamped_log_ratio(tok))
        bounds = bapo_state(self.cfg, steps)
        # host floats into the compute dtype as the loss's search does (beyond fp32's range: inf)
        lo, hi = device_floats(list(bounds), r)
        lower, upper = bapo_grid(self.cfg)
        lo0, hi0 = (t.expand_as(r).clone() for t in device_floats([lower[0], upper[0]], r))
        for a, b, pb in self._pass_bounds():
            lo0[a:b], hi0[a:b] = device_floats(list(pb), r)
        l1 = -self.adv * r

        def branch(c_lo, c_hi):
            # the gradient's class under max(l1, l2): l2 > l1 clipped (0), l1 > l2 or equal values of one
            # r (-A r), a tie of a clamped value with -A r (half of it, as torch splits a tie)
            c = torch.clamp(r, min=c_lo, max=c_hi)
            l2 = -self.adv * c
            return (l2 > l1).to(torch.int8) + 2 * ((l2 == l1) & (c != r)).to(torch.int8)

        return self.valid & (branch(lo, hi) != branch(lo0, hi0)), bounds

    def speculative_delta(self, idx: Tensor, logp_sel: Tensor, bounds: tuple[float, float]) -> Tensor:
        """``d(L_exact - L_pass)/d logp`` for tokens ``idx`` (ascending): the policy term under the searched
        ``bounds`` minus the one under the bounds the pass took for them (entropy and KL terms are the same in
        both)."""

        def pg_only(c: PolicyLossConfig) -> PolicyLossConfig:
            return replace(c, entropy_coeff=0.0, kl_loss_coef=0.0, entropy_corridor=None)

        exact = pg_only(speculative_config(self.cfg, bounds))
        lp = logp_sel.detach().to(self.dtype)
        out = torch.zeros_like(lp)
        # one autograd call per run of chunks that took the same bounds (usually a few)
        runs: list[list] = []
        for a, b, pb in self._pass_bounds():
            if runs and runs[-1][2] == pb and runs[-1][1] == a:
                runs[-1][1] = b
            else:
                runs.append([a, b, pb])
        cuts = torch.searchsorted(idx, torch.tensor([r[0] for r in runs] + [runs[-1][1]], device=idx.device))
        cuts = cuts.tolist()
        for (_, _, pb), s, e in zip(runs, cuts[:-1], cuts[1:]):
            if s == e:
                continue
            sel, spec = idx[s:e], pg_only(speculative_config(self.cfg, pb))
            valid = self.valid[sel]

            def delta(a, sel=sel, spec=spec, valid=valid):
                return self._objective(sel, a, None, None, None, valid, cfg=exact) - self._objective(
                    sel, a, None, None, None, valid, cfg=spec
                )

            out[s:e] = autograd_grads(delta, lp[s:e])[0]
        return out

    def selection_delta(self, idx: Tensor, logp_sel: Tensor, picked_sel: Tensor) -> Tensor:
        """Clip-Cov / KL-Cov: ``d(L_selected - L_unselected)/d logp`` for tokens ``idx`` whose pick flag is
        ``picked_sel`` (0 for tokens not picked): the correction the one-pass schedule applies to them."""
        valid = self.valid[idx] & picked_sel
        on, off = torch.ones_like(valid), torch.zeros_like(valid)

        def delta(a):
            return self._objective(idx, a, None, None, on, valid) - self._objective(idx, a, None, None, off, valid)

        return autograd_grads(delta, logp_sel.detach().to(self.dtype))[0]
