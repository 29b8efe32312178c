"""Plain eager oracle for :func:`fusedrl.policy_loss` (tests only; never used on the hot path).

Written independently of the rest of ``fusedrl.loss``: it walks the batch sequence by sequence in
Python, computes in float64, takes every batch-level decision (covariance picks, entropy quantile,
rollout rejection) with Python lists and sorting, and freely calls ``.item()``; it follows verl's
``core_algos.py`` / ``rollout_corr_helper.py`` and TRL's ``GRPOTrainer._compute_loss`` term by term.
Batch-level statistics are over the sequences with at least one valid token (verl's "rows").
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import PolicyLossConfig, canonical_kl_type
from .rollout import RolloutCorrection

__all__ = ["reference_policy_loss", "reference_kl_penalty", "split_sequences", "reference_quantile"]


class _Seq:
    """The valid tokens of one sequence (float64 1-D tensors) and where they sit in the flat input."""

    def __init__(self, positions: list[int], length: int):
        self.positions = positions  # flat indices into logp.reshape(-1)
        self.length = length  # full length of the sequence (valid or not)
        self.logp = self.old = self.adv = self.ent = self.ref = self.ro = None

    def subset(self, keep: list[bool]) -> _Seq:
        """The same sequence restricted to the tokens flagged in ``keep``."""
        out = _Seq([p for p, k in zip(self.positions, keep) if k], self.length)
        idx = torch.tensor([j for j, k in enumerate(keep) if k], dtype=torch.long)
        for name in ("logp", "old", "adv", "ent", "ref", "ro"):
            v = getattr(self, name)
            setattr(out, name, None if v is None else v.index_select(0, idx.to(v.device)))
        return out


def split_sequences(
    logp, old_logp, advantages, mask, entropy=None, ref_logp=None, cu_seqlens=None, rollout_logp=None
) -> tuple[list[_Seq], int]:
    """Cut the batch into sequences. Returns (sequences, default norm_len)."""
    flat_mask = mask.reshape(-1)
    seqs: list[_Seq] = []
    per_seq_adv = False
    if cu_seqlens is not None:
        bounds = [int(v) for v in cu_seqlens.tolist()]
        b = len(bounds) - 1
        n = logp.numel()
        per_seq_adv = advantages.dim() == 1 and advantages.numel() == b and advantages.numel() != n
        for i in range(b):
            start, end = bounds[i], bounds[i + 1]
            pos = [p for p in range(start, end) if flat_mask[p].item() != 0]
            seqs.append(_Seq(pos, end - start))
        norm_len = max([s.length for s in seqs], default=1)
    else:
        rows = logp.reshape(1, -1) if logp.dim() == 1 else logp
        b, t = rows.shape
        per_seq_adv = logp.dim() == 2 and advantages.dim() == 1
        for i in range(b):
            pos = [i * t + j for j in range(t) if flat_mask[i * t + j].item() != 0]
            seqs.append(_Seq(pos, t))
        norm_len = t

    def take(x, pos):
        if x is None:
            return None
        idx = torch.tensor(pos, dtype=torch.long, device=x.device)
        return x.reshape(-1).to(torch.float64).index_select(0, idx)

    if not per_seq_adv:
        adv_full = advantages.broadcast_to(logp.shape)
    for i, s in enumerate(seqs):
        s.logp = take(logp, s.positions)
        s.old = take(old_logp, s.positions).detach()
        if per_seq_adv:
            s.adv = torch.full(
                (len(s.positions),), float(advantages[i].item()), dtype=torch.float64, device=logp.device
            )
        else:
            s.adv = take(adv_full, s.positions).detach()
        s.ent = take(entropy, s.positions)
        s.ref = take(ref_logp, s.positions)
        if s.ref is not None:
            s.ref = s.ref.detach()
        s.ro = take(rollout_logp, s.positions)
        if s.ro is not None:
            s.ro = s.ro.detach()
    return seqs, max(norm_len, 1)


def reference_kl_penalty(logp: torch.Tensor, ref: torch.Tensor, kl_type: str) -> torch.Tensor:
    """verl's ``kl_penalty`` written out, with the ``+`` straight-through variants."""
    name = canonical_kl_type(kl_type)
    straight_through = name.endswith("+")
    name = name.rstrip("+")
    if name == "k1":
        value = logp - ref
    elif name == "abs":
        value = torch.abs(logp - ref)
    elif name == "k2":
        value = 0.5 * (logp - ref) ** 2
    else:
        kl = torch.clamp(ref - logp, min=-20, max=20)
        value = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if straight_through:
        grad_part = 0.5 * (logp - ref) ** 2
        value = value.detach() + (grad_part - grad_part.detach())
    return value


def reference_quantile(values: list[float], q: float) -> float:
    """``torch.quantile(values, q)`` (linear interpolation) written out for Python floats (float64)."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + (1 if pos > lo else 0), len(v) - 1)
    w = pos - lo
    a, b = v[lo], v[hi]
    # torch.lerp's two branches (exact for w = 0 and w = 1)
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1 - w)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _log(x: float) -> float:
    """``torch.log`` on a Python float: -inf at 0, NaN below (log-probs > 0 are not real data anyway)."""
    return math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


# --------------------------------------------------------------------------------------------------
# rollout correction (verl rollout_corr_helper.py, TRL's vLLM IS modes), Python floats
# --------------------------------------------------------------------------------------------------


def _verl_std(vals: list[float]) -> float:
    """verl's ``sqrt(max(E[x^2] - E[x]^2, 0))``, each mean dividing by ``count + 1e-8``; 0 below 2 values."""
    n = len(vals) + 1e-8
    var = sum(v * v for v in vals) / n - (sum(vals) / n) ** 2
    return math.sqrt(max(var, 0.0)) if len(vals) > 1 else 0.0


def _seq_summary(metrics: dict[str, float], p: str, vals: list[float], centre: float) -> None:
    """Mean, sample std (n - 1), max, min and max |v - centre| of per-sequence values (0 when empty)."""
    n = len(vals)
    m = _mean(vals)
    metrics[p + "seq_mean"] = m
    metrics[p + "seq_std"] = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
    metrics[p + "seq_max"] = max(vals) if vals else 0.0
    metrics[p + "seq_min"] = min(vals) if vals else 0.0
    metrics[p + "seq_max_deviation"] = max(abs(v - centre) for v in vals) if vals else 0.0


def _rs_options(rc: RolloutCorrection) -> list[tuple[str, Optional[float], float]]:
    """(option, lower log bound or None, upper bound) from verl's string syntax."""
    names: list[str] = []
    for o in rc.rollout_rs.split(","):
        o = o.strip()
        if o and o not in names:
            names.append(o)
    spec = rc.rollout_rs_threshold
    parts = [str(spec)] if not isinstance(spec, str) else [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1:
        parts = parts * len(names)
    out = []
    for name, p in zip(names, parts):
        if name.endswith("k1"):
            if "_" in p:
                lo, hi = (float(x) for x in p.split("_"))
            else:
                hi = float(p)
                lo = 1.0 / hi
            out.append((name, math.log(lo), math.log(hi)))
        else:
            out.append((name, None, float(p)))
    return out


def _rollout_reference(
    rc: RolloutCorrection,
    seqs: list[_Seq],
    train: list[list[float]],
    roll: list[list[float]],
    metrics: dict[str, float],
) -> tuple[Optional[list[list[float]]], list[list[bool]]]:
    """IS weights and keep flags per sequence and token; metrics (without prefix) into ``metrics``."""
    lrs = [[a - b for a, b in zip(t, r)] for t, r in zip(train, roll)]
    nonempty = [i for i, lr in enumerate(lrs) if lr]
    all_tok = [x for lr in lrs for x in lr]
    n_tok = len(all_tok)
    weights = None
    if rc.rollout_is is not None and rc.rollout_is_threshold is not None:
        thr = float(rc.rollout_is_threshold)
        lower = rc.rollout_is_threshold_lower
        lo_m = lower if lower is not None else 1.0 / thr
        if rc.rollout_is == "token":
            raw = [[math.exp(_clamp(x, -20, 20)) for x in lr] for lr in lrs]
        else:
            sums = [sum(lr) for lr in lrs]
            raw = [[math.exp(_clamp(sums[i], -20, 20))] * len(lr) for i, lr in enumerate(lrs)]
        weights = []
        for r in raw:
            ws = []
            for x in r:
                if rc.rollout_is_mode == "truncate":
                    w = min(x, thr)
                    if lower is not None:
                        w = max(w, lower)
                else:
                    w = 0.0 if (x > thr or (lower is not None and x < lower)) else x
                ws.append(w)
            weights.append(ws)
        # verl's compute_is_metrics: the applied weights (before batch normalisation), bound fractions of the raw
        flat = [x for r in raw for x in r]
        flat_w = [w for ws in weights for w in ws]
        if flat:
            metrics["rollout_is_mean"] = _mean(flat_w)
            if rc.rollout_is == "token":
                metrics["rollout_is_max"], metrics["rollout_is_min"] = max(flat_w), min(flat_w)
                metrics["rollout_is_ratio_fraction_high"] = _mean([float(x > thr) for x in flat])
                metrics["rollout_is_ratio_fraction_low"] = _mean([float(x < lo_m) for x in flat])
            else:
                ss = [sums[i] for i in nonempty]
                metrics["rollout_is_max"] = math.exp(min(max(ss), 20.0))
                metrics["rollout_is_min"] = math.exp(min(ss))
                metrics["rollout_is_ratio_fraction_high"] = _mean([float(x > math.log(thr)) for x in ss])
                low_log = math.log(lo_m) if lo_m > 0 else -math.inf
                metrics["rollout_is_ratio_fraction_low"] = _mean([float(x < low_log) for x in ss])
            cl = [_clamp(w, 0.0, thr) for w in flat_w]
            metrics["rollout_is_std"] = _verl_std(cl)
            mc = _mean(cl)
            q = _mean([(c / (mc + 1e-8)) ** 2 for c in cl])
            metrics["rollout_is_eff_sample_size"] = 1.0 / q if q > 0 else 0.0  # verl: 1 / 0 when no weight is left
            sm = [sum(weights[i]) / (len(weights[i]) + 1e-8) for i in nonempty]
            _seq_summary(metrics, "rollout_is_", sm, 1.0)
            rsm = [sum(raw[i]) / (len(raw[i]) + 1e-8) for i in nonempty]
            metrics["rollout_is_seq_fraction_high"] = _mean([float(x > thr) for x in rsm])
            metrics["rollout_is_seq_fraction_low"] = _mean([float(x < lo_m) for x in rsm])
            if rc.rollout_is_mode == "mask":
                metrics["rollout_is_oob_ratio"] = _mean(
                    [float(x > thr or (lower is not None and x < lower)) for x in flat]
                )
        else:
            for k in (
                "mean",
                "max",
                "min",
                "ratio_fraction_high",
                "ratio_fraction_low",
                "std",
                "eff_sample_size",
                "seq_mean",
                "seq_std",
                "seq_max",
                "seq_min",
                "seq_max_deviation",
                "seq_fraction_high",
                "seq_fraction_low",
            ) + (("oob_ratio",) if rc.rollout_is_mode == "mask" else ()):
                metrics["rollout_is_" + k] = 0.0
        if rc.rollout_is_batch_normalize:
            if rc.rollout_is == "token":
                pool = [w for ws in weights for w in ws]
            else:
                pool = [sum(weights[i]) / (len(weights[i]) + 1e-8) for i in nonempty]
            mean = _mean(pool)
            factor = mean if mean > 1e-8 else 1.0
            weights = [[w / factor for w in ws] for ws in weights]
            metrics["rollout_is_batch_norm_factor"] = factor if pool else 0.0
    keep = [[True] * len(lr) for lr in lrs]
    if rc.rollout_rs is not None:

        def stat(x, k):
            x = _clamp(x, -20, 20)
            return {"k1": -x, "k2": 0.5 * x * x, "k3": math.exp(x) - 1 - x}[k]

        for name, lower, upper in _rs_options(rc):
            k = name[-2:]
            tok_stats = [[stat(x, k) for x in lr] for lr in lrs]
            if name.startswith("token"):
                level = tok_stats
                seq_stats = None
            else:
                seq_stats = []
                for ts in tok_stats:
                    if name.startswith("seq_sum"):
                        seq_stats.append(sum(ts))
                    elif name.startswith("seq_mean"):
                        seq_stats.append(sum(ts) / (len(ts) + 1e-8))
                    else:
                        seq_stats.append(max(ts) if ts else 0.0)
                level = [[seq_stats[i]] * len(ts) for i, ts in enumerate(tok_stats)]
            ok = [[(v <= upper) and (lower is None or v >= lower) for v in row] for row in level]
            keep = [[a and b for a, b in zip(ka, kb)] for ka, kb in zip(keep, ok)]
            p = f"rollout_rs_{name}_"
            flat = [v for row in level for v in row]
            metrics[p + "mean"] = _mean(flat)
            pool = flat if seq_stats is None else [seq_stats[i] for i in nonempty]
            metrics[p + "max"] = max(pool) if pool else 0.0
            metrics[p + "min"] = min(pool) if pool else 0.0
            metrics[p + "fraction_high"] = _mean([float(v > upper) for v in pool])
            metrics[p + "fraction_low"] = _mean([float(lower is not None and v < lower) for v in pool])
            lo_c = lower if lower is not None else 0.0
            metrics[p + "std"] = _verl_std([_clamp(v, lo_c, upper) for v in flat])
            sv = (
                [sum(tok_stats[i]) / (len(tok_stats[i]) + 1e-8) for i in nonempty]
                if seq_stats is None
                else [seq_stats[i] for i in nonempty]
            )
            _seq_summary(metrics, p, sv, 0.0)
            metrics[p + "seq_fraction_high"] = _mean([float(v > upper) for v in sv])
            if lower is not None:
                metrics[p + "seq_fraction_low"] = _mean([float(v < lower) for v in sv])
            metrics[p + "masked_fraction"] = _mean([float(not o) for row in ok for o in row])
            metrics[p + "seq_masked_fraction"] = _mean([float(not all(ok[i])) for i in nonempty])
        metrics["rollout_rs_masked_fraction"] = _mean([float(not o) for row in keep for o in row])
        metrics["rollout_rs_seq_masked_fraction"] = _mean([float(not all(keep[i])) for i in nonempty])
    # off-policy diagnostics (verl compute_offpolicy_metrics)
    if n_tok:
        metrics["kl"] = _mean([b - a for t, r in zip(train, roll) for a, b in zip(t, r)])
        metrics["k3_kl"] = _mean([math.exp(x) - x - 1 for x in all_tok])
        mt = [sum(train[i]) / (len(train[i]) + 1e-8) for i in nonempty]
        mr = [sum(roll[i]) / (len(roll[i]) + 1e-8) for i in nonempty]
        metrics["training_ppl"] = _mean([math.exp(-x) for x in mt])
        metrics["training_log_ppl"] = _mean([-x for x in mt])
        metrics["rollout_ppl"] = _mean([math.exp(-x) for x in mr])
        metrics["rollout_log_ppl"] = _mean([-x for x in mr])
        diff = [b - a for a, b in zip(mt, mr)]
        metrics["log_ppl_diff"] = _mean(diff)
        metrics["log_ppl_abs_diff"] = _mean([abs(x) for x in diff])
        metrics["log_ppl_diff_max"], metrics["log_ppl_diff_min"] = max(diff), min(diff)
        metrics["ppl_ratio"] = _mean([math.exp(x) for x in diff])
        metrics["chi2_token"] = _mean([math.exp(_clamp(x, -20, 20)) ** 2 for x in all_tok]) - 1.0
        metrics["chi2_seq"] = _mean([math.exp(2 * _clamp(sum(lrs[i]), -20, 20)) for i in nonempty]) - 1.0
    else:
        for k in (
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
        ):
            metrics[k] = 0.0
    return weights, keep


# --------------------------------------------------------------------------------------------------
# the loss
# --------------------------------------------------------------------------------------------------


def reference_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    entropy: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config: Optional[PolicyLossConfig] = None,
    *,
    global_num_tokens=None,
    global_num_seqs=None,
    norm_len=None,
    rollout_logp: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same contract as :func:`fusedrl.policy_loss`; float64 loss, float32 metrics.

    Clip-Cov draws ``torch.rand(logp.numel(), generator=config.generator)`` on logp's device (the
    same draw fusedrl makes) and detaches the candidates carrying the largest keys; KL-Cov takes
    the largest covariances; both break ties by the lower flat index.
    """
    cfg = config if config is not None else PolicyLossConfig()
    gnt = global_num_tokens if global_num_tokens is not None else cfg.global_num_tokens
    gns = global_num_seqs if global_num_seqs is not None else cfg.global_num_seqs
    nlen = norm_len if norm_len is not None else cfg.norm_len
    seqs, default_norm_len = split_sequences(
        logp, old_logp, advantages, mask, entropy, ref_logp, cu_seqlens, rollout_logp
    )
    given_w = None
    if rollout_is_weights is not None:  # verl's precomputed weights, per sequence and valid token
        flat_w = rollout_is_weights.reshape(-1).tolist()
        given_w = [[float(flat_w[p]) for p in s.positions] for s in seqs]
    mode = cfg.loss_mode
    low, high = 1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high
    seq_level = cfg.importance_sampling_level == "sequence"
    f32 = lambda v: torch.tensor(float(v), dtype=torch.float32)  # noqa: E731

    # ---- rollout correction: IS weights and rejection, decided on the original valid tokens
    rc = cfg.rollout_correction
    if rc is None and mode == "bypass_mode":
        rc = RolloutCorrection()
    rc_metrics: dict[str, float] = {}
    is_w: Optional[list[list[float]]] = given_w
    if rc is not None and rollout_logp is None and mode != "bypass_mode":
        rc = None  # precomputed weights only: nothing to reject or report
    if rc is not None:
        if mode == "bypass_mode":
            train = [s.logp.detach().tolist() for s in seqs]
            roll = [s.old.tolist() for s in seqs]
        else:
            train = [s.old.tolist() for s in seqs]
            roll = [s.ro.tolist() for s in seqs]
        rc_w, keep = _rollout_reference(rc, seqs, train, roll, rc_metrics)
        is_w = rc_w if given_w is None else given_w
        seqs = [s.subset(k) for s, k in zip(seqs, keep)]
        if is_w is not None:
            is_w = [[w for w, k in zip(ws, kk) if k] for ws, kk in zip(is_w, keep)]

    tokens = [(si, j) for si, s in enumerate(seqs) for j in range(len(s.positions))]
    n_valid = len(tokens)
    clipfrac, clipfrac_lower, ppo_kl, selected_frac = 0.0, 0.0, 0.0, None
    per_seq_losses: list[torch.Tensor] = []

    # ---- per-token factors of the policy term: entropy quantile mask (TRL), OPSM (TRL / DeepSeek-V3.2)
    pg_keep = [[True] * len(s.positions) for s in seqs]
    if cfg.top_entropy_quantile < 1:
        pool = [v for s in seqs for v in s.ent.detach().tolist()]
        if pool:
            thr = reference_quantile(pool, 1.0 - cfg.top_entropy_quantile)
            pg_keep = [[k and e >= thr for k, e in zip(kk, s.ent.detach().tolist())] for kk, s in zip(pg_keep, seqs)]
    if cfg.off_policy_mask_threshold is not None:
        for si, s in enumerate(seqs):
            if not s.positions:
                continue
            sampling = (s.ro if s.ro is not None else s.old).tolist()
            mean_kl = _mean([a - b for a, b in zip(sampling, s.logp.detach().tolist())])
            low_kl = mean_kl <= cfg.off_policy_mask_threshold
            pg_keep[si] = [k and (a >= 0 or low_kl) for k, a in zip(pg_keep[si], s.adv.tolist())]

    # quantities over the whole batch of valid tokens
    if n_valid:
        all_adv = torch.cat([s.adv for s in seqs])
        all_lp = torch.cat([s.logp.detach() for s in seqs])
        all_d = torch.cat([s.logp.detach() - s.old for s in seqs])
    else:
        all_adv = all_lp = all_d = torch.zeros(0, dtype=torch.float64)

    if mode in ("clip_cov", "kl_cov"):
        cov = ((all_adv - all_adv.mean()) * (all_lp - all_lp.mean())).tolist() if n_valid else []
        ratio_cfg = cfg.clip_cov_ratio if mode == "clip_cov" else cfg.kl_cov_ratio
        k = max(1, int(ratio_cfg * n_valid))
        flat_pos = [seqs[si].positions[j] for si, j in tokens]
        if mode == "kl_cov":
            order = sorted(range(n_valid), key=lambda i: (-cov[i], flat_pos[i]))
            chosen = set(order[:k]) if n_valid else set()
        else:
            keys = torch.rand(logp.numel(), generator=cfg.generator, device=logp.device, dtype=torch.float32).tolist()
            ratio_all = torch.exp(torch.clamp(all_d, -20, 20)).tolist()
            adv_all = all_adv.tolist()
            candidates = []
            for i in range(n_valid):
                l1 = -adv_all[i] * ratio_all[i]
                l2 = -adv_all[i] * min(max(ratio_all[i], low), high)
                if not l2 > l1 and cfg.clip_cov_lb < cov[i] < cfg.clip_cov_ub:
                    candidates.append(i)
            candidates.sort(key=lambda i: (-keys[flat_pos[i]], flat_pos[i]))
            chosen = set(candidates[:k])
        selected_frac = len(chosen) / n_valid if n_valid else 0.0
        # per sequence: which local token indices are selected
        chosen_local = [set() for _ in seqs]
        for i in chosen:
            si, j = tokens[i]
            chosen_local[si].add(j)

    def ratio_of(s):
        """The importance ratio of the ratio-based modes (TRL's importance_sampling_level)."""
        d = s.logp - s.old
        if seq_level:
            return torch.exp(torch.clamp(d.sum() / len(s.positions), -20.0, 20.0)).expand(len(s.positions))
        return torch.exp(torch.clamp(d, -20.0, 20.0))

    rc_loss_type = rc.loss_type if rc is not None else "ppo_clip"
    anchor = logp.reshape(-1)[:0].sum().to(torch.float64)  # 0, attached to logp's graph (zero gradient)
    clipped_count = lower_count = 0
    for si, s in enumerate(seqs):
        n = len(s.positions)
        if not n:
            per_seq_losses.append(anchor)
            continue
        d = s.logp - s.old
        if mode in ("vanilla", "luspo") or (mode == "bypass_mode" and rc_loss_type == "ppo_clip"):
            r = ratio_of(s)
            r1 = torch.clamp(r, max=cfg.delta) if cfg.delta is not None else r
            pg1 = -s.adv * r1
            pg2 = -s.adv * torch.clamp(r, low, high)
            clip1 = torch.maximum(pg1, pg2)
            clipped_count += int((pg2 > pg1).sum().item())
            if cfg.clip_ratio_c is not None and mode != "luspo":
                pg3 = -s.adv * cfg.clip_ratio_c
                clip2 = torch.minimum(pg3, clip1)
                lower_count += int(((clip1 > pg3) & (s.adv < 0)).sum().item())
                token_loss = torch.where(s.adv < 0, clip2, clip1)
            else:
                token_loss = clip1
        elif mode == "bypass_mode":  # reinforce
            token_loss = -s.adv * s.logp
            if is_w is not None:
                token_loss = token_loss * torch.tensor(is_w[si], dtype=torch.float64)
        elif mode == "gspo":
            seq_log_ratio = (d.sum() / n).detach()
            log_ratio_tok = torch.clamp(s.logp - s.logp.detach() + seq_log_ratio, max=10.0)
            r = torch.exp(log_ratio_tok)
            r1 = torch.clamp(r, max=cfg.delta) if cfg.delta is not None else r
            pg1 = -s.adv * r1
            pg2 = -s.adv * torch.clamp(r, low, high)
            clipped_count += int((pg2 > pg1).sum().item())
            token_loss = torch.maximum(pg1, pg2)
        elif mode == "clip_cov":
            r = torch.exp(torch.clamp(d, -20.0, 20.0))
            pg1 = -s.adv * r
            pg2 = -s.adv * torch.clamp(r, low, high)
            corr = torch.ones_like(pg1)
            for j in chosen_local[si]:
                corr[j] = 0.0
            token_loss = torch.maximum(pg1, pg2) * corr
        elif mode == "kl_cov":
            r = torch.exp(torch.clamp(d, -20.0, 20.0))
            pieces = []
            for j in range(n):
                term = -s.adv[j] * r[j]
                if j in chosen_local[si]:
                    term = term + cfg.ppo_kl_coef * torch.abs(d[j])
                pieces.append(term)
            token_loss = torch.stack(pieces)
        elif mode == "gpg":
            token_loss = -s.adv * s.logp
        elif mode == "cispo":
            r = ratio_of(s).detach()
            rc_ = torch.clamp(r, low, high)
            clipped_count += int((r != rc_).sum().item())
            token_loss = -rc_ * s.adv * s.logp
        elif mode == "sapo":
            r = ratio_of(s)
            pieces = []
            for j in range(n):
                tau = cfg.tau_pos if s.adv[j].item() > 0 else cfg.tau_neg
                pieces.append(-torch.sigmoid(tau * (r[j] - 1.0)) * (4.0 / tau) * s.adv[j])
            token_loss = torch.stack(pieces)
        elif mode == "geo_mean":
            pieces = []
            for j in range(n):
                a = s.adv[j].item()
                dj = d[j]
                if a > 0:  # the ratio may not rise above 1 + high for a positive advantage
                    pieces.append(torch.where(dj > cfg.clip_ratio_high, dj.detach() * 0 + cfg.clip_ratio_high, dj))
                elif a < 0:  # nor fall below 1 - low for a negative one
                    pieces.append(torch.where(dj < -cfg.clip_ratio_low, dj.detach() * 0 - cfg.clip_ratio_low, dj))
                else:
                    pieces.append(dj * 0)
                if dj.item() > cfg.clip_ratio_high or dj.item() < -cfg.clip_ratio_low:
                    if a > 0:
                        clipped_count += 1
                    elif a < 0:
                        lower_count += 1
            seq_loss = -(s.adv.sum() / n) * torch.exp(torch.stack(pieces).sum() / n)
            if is_w is not None:
                seq_loss = seq_loss * math.exp(sum(math.log(w + 1e-10) for w in is_w[si]) / n)
            token_loss = seq_loss.expand(n)
        elif mode in ("dppo_kl", "dppo_tv"):
            pieces = []
            for j in range(n):
                lp, ol, a = s.logp[j].item(), s.old[j].item(), s.adv[j].item()
                p, po = math.exp(lp), math.exp(ol)
                if mode == "dppo_tv":
                    inside = (p - po <= cfg.clip_ratio_high) if a > 0 else (p - po >= -cfg.clip_ratio_low)
                else:
                    bkl = po * (ol - lp) + (1 - po) * _log((1.0 - po + 1e-8) / (1.0 - p + 1e-8))
                    if a > 0:
                        inside = bkl <= cfg.clip_ratio_high or p <= po
                    else:
                        inside = bkl <= cfg.clip_ratio_low or p >= po
                r = math.exp(_clamp(lp - ol, -20, 20))
                trunc = r if cfg.clip_ratio_c is None else min(r, cfg.clip_ratio_c)
                pieces.append(-a * trunc * s.logp[j] if inside else s.logp[j] * 0)
                clipped_count += int(not inside)
                lower_count += int(inside and cfg.clip_ratio_c is not None and r > cfg.clip_ratio_c)
            token_loss = torch.stack(pieces)
        elif mode == "dro":
            beta = 0.1 if cfg.dro_beta is None else cfg.dro_beta
            token_loss = -s.adv * s.logp + 0.5 * beta * d**2
        elif mode == "vespo":
            lo = math.log(1e-8)
            lw = sum(_clamp(x, -20, 20) for x in d.detach().tolist())
            if is_w is not None:
                lw += sum(lo if w <= 0 else _clamp(math.log(w), lo, 20) for w in is_w[si])
            lw = _clamp(lw, lo, 20)
            pieces = []
            for j in range(n):
                a = s.adv[j].item()
                kk, lam = (cfg.vespo_k_pos, cfg.vespo_lambda_pos) if a >= 0 else (cfg.vespo_k_neg, cfg.vespo_lambda_neg)
                lam = max(lam, 1e-4)
                phi = math.exp(lam + kk * lw - lam * math.exp(lw))
                pieces.append(-phi * a * s.logp[j])
            token_loss = torch.stack(pieces)
        else:
            raise ValueError(mode)
        # per-token factors: rollout IS weights (modes that do not take them themselves), masks
        if is_w is not None and mode not in ("geo_mean", "vespo", "bypass_mode"):
            token_loss = token_loss * torch.tensor(is_w[si], dtype=torch.float64)
        if not all(pg_keep[si]):
            token_loss = token_loss * torch.tensor([float(k) for k in pg_keep[si]], dtype=torch.float64)
        per_seq_losses.append(token_loss)

    if n_valid:
        if mode in ("vanilla", "gspo", "cispo", "luspo", "dppo_kl", "dppo_tv", "geo_mean") or (
            mode == "bypass_mode" and rc_loss_type == "ppo_clip"
        ):
            clipfrac = clipped_count / n_valid
        if mode in ("vanilla", "dppo_kl", "dppo_tv", "geo_mean") or (
            mode == "bypass_mode" and rc_loss_type == "ppo_clip"
        ):
            clipfrac_lower = lower_count / n_valid
        if mode == "clip_cov":
            clipfrac = selected_frac
        if mode == "kl_cov":
            ppo_kl = all_d.abs().mean().item()
        elif mode in ("gspo", "clip_cov", "geo_mean", "dro") or (mode == "bypass_mode" and rc_loss_type == "reinforce"):
            ppo_kl = (-all_d).mean().item()
        else:
            ppo_kl = (-torch.clamp(all_d, -20, 20)).mean().item()

    def aggregate(seq_values: list[torch.Tensor]) -> torch.Tensor:
        """verl agg_loss over per-sequence token-loss vectors, with fusedrl's normalisers."""
        lengths = [len(s.positions) for s in seqs]
        sums = [v.sum() for v in seq_values]
        total = sum(sums, torch.zeros((), dtype=torch.float64, device=logp.device) + anchor)

        def denom(user, local):
            if user is None:
                return max(local, 1)
            value = float(user.item()) if isinstance(user, torch.Tensor) else float(user)
            return value if value > 0 else 1.0

        n_seqs_nonempty = sum(1 for n in lengths if n > 0)
        agg = cfg.loss_agg_mode
        if agg == "token-mean":
            return total / denom(gnt, n_valid)
        if agg == "token-sum":
            return total
        if agg == "seq-mean-token-sum":
            return total / denom(gns, n_seqs_nonempty)
        if agg == "seq-mean-token-mean":
            acc = torch.zeros((), dtype=torch.float64, device=logp.device) + anchor
            for ssum, n in zip(sums, lengths):
                if n > 0:
                    acc = acc + ssum / n
            return acc / denom(gns, n_seqs_nonempty)
        if agg == "seq-mean-token-sum-norm":
            per_seq_mean = total / denom(gns, n_seqs_nonempty)
            return per_seq_mean / denom(nlen, default_norm_len)
        raise ValueError(agg)

    pg_loss = aggregate(per_seq_losses)
    loss = pg_loss
    metrics = {
        "pg_loss": f32(pg_loss.item()),
        "pg_clipfrac": f32(clipfrac),
        "pg_clipfrac_lower": f32(clipfrac_lower),
        "ppo_kl": f32(ppo_kl),
    }
    if entropy is not None:
        metrics["entropy"] = f32(_mean([v for s in seqs for v in s.ent.tolist()]))
        if cfg.entropy_coeff != 0:
            loss = loss - cfg.entropy_coeff * aggregate([s.ent for s in seqs])
    if ref_logp is not None:
        kls = []
        for s in seqs:
            kl = reference_kl_penalty(s.logp, s.ref, cfg.kl_loss_type)
            if cfg.use_bias_correction_kl and s.positions:  # TRL: times the (differentiable) importance ratio
                kl = kl * ratio_of(s)
            kls.append(kl)
        metrics["kl"] = f32(_mean([v for k in kls for v in k.tolist()]))
        if cfg.kl_loss_coef != 0:
            loss = loss + cfg.kl_loss_coef * aggregate(kls)
    if selected_frac is not None:
        metrics["cov_selected_frac"] = f32(selected_frac)
    for k, v in rc_metrics.items():
        metrics["rollout_corr/" + k] = f32(v)
    return loss, metrics
