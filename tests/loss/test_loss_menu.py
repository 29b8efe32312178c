"""The 2026 loss menu: SAPO, GMPO, DPPO, DRO, bypass, LUSPO, VESPO, INTELLECT-2 delta, TRL's
sequence-level ratio and bias-corrected KL, token-sum, rollout correction (IS / rejection / metrics),
entropy masking and OPSM.

Oracle: ``fusedrl/loss/reference.py`` (sequence-by-sequence Python, float64, written from verl's and TRL's
formulas). Values, gradients w.r.t. logp and entropy, and metrics are compared; every batch has holes,
an empty row and NaN / inf garbage at masked positions. Optional checks against verl (when importable)
and TRL's own static helpers (installed here).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fusedrl import RolloutCorrection
from fusedrl.loss import (
    LOSS_AGG_MODES,
    LOSS_MODES,
    PolicyLossConfig,
    TokenHead,
    head_kind,
    metric_names,
    policy_loss,
)
from fusedrl.loss.inputs import flatten_batch
from fusedrl.loss.modes import SELECTION_MODES, SEQUENCE_MODES, TOKEN_LOCAL_MODES
from fusedrl.loss.reference import reference_policy_loss, reference_quantile
from fusedrl.loss.rollout import RS_OPTIONS
from fusedrl.loss.token_head import kernel_head_codes

F64 = torch.float64
NEW_MODES = ("sapo", "geo_mean", "dppo_kl", "dppo_tv", "dro", "bypass_mode", "luspo", "vespo")


# --------------------------------------------------------------------------------------------------
# batch builder and comparison
# --------------------------------------------------------------------------------------------------


class Batch:
    """Padded [B, T] batch with holes, one empty row, per-token garbage at masked positions, and the
    rollout engine's log-probs (``old + noise``)."""

    def __init__(self, B=6, T=9, seed=0, dtype=F64, scale=0.3, ro_scale=0.25, per_seq_adv=False, empty_row=True):
        g = torch.Generator().manual_seed(seed)
        self.B, self.T = B, T
        lengths = torch.randint(2, T + 1, (B,), generator=g)
        if empty_row:
            lengths[1] = 0
        pos = torch.arange(T).expand(B, T)
        mask = (pos < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.15)
        self.lengths, self.mask = lengths, mask
        logp = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.05
        old = (logp + scale * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
        ro = (old + ro_scale * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
        adv = torch.randn(*((B,) if per_seq_adv else (B, T)), generator=g, dtype=F64) * 2
        ent = torch.rand(B, T, generator=g, dtype=F64) * 3
        ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
        bad = ~mask
        self.logp = logp.masked_fill(bad, float("nan")).to(dtype).requires_grad_()
        self.old = old.masked_fill(bad, float("-inf")).to(dtype)
        self.ro = ro.masked_fill(bad, float("inf")).to(dtype)
        self.adv = (adv if per_seq_adv else adv.masked_fill(bad, float("nan"))).to(dtype)
        self.ent = ent.masked_fill(bad, float("inf")).to(dtype).requires_grad_()
        self.ref = ref.masked_fill(bad, float("nan")).to(dtype)

    def padded(self, rollout=True):
        out = dict(
            logp=self.logp, old_logp=self.old, advantages=self.adv, mask=self.mask, entropy=self.ent, ref_logp=self.ref
        )
        if rollout:
            out["rollout_logp"] = self.ro
        return out

    def packed(self, rollout=True, tail=2):
        lens = [int(n) for n in self.lengths]
        idx = torch.cat([torch.arange(i * self.T, i * self.T + n) for i, n in enumerate(lens)])
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)

        def pk(x, fill):
            v = x.reshape(-1)[idx]
            return torch.cat([v, torch.full((tail,), fill, dtype=v.dtype)])

        out = dict(
            logp=pk(self.logp.detach(), 1.0).requires_grad_(),
            old_logp=pk(self.old, -3.0),
            advantages=self.adv if self.adv.dim() == 1 else pk(self.adv, 5.0),
            mask=pk(self.mask, True),
            entropy=pk(self.ent.detach(), 1.0).requires_grad_(),
            ref_logp=pk(self.ref, 0.5),
            cu_seqlens=cu,
        )
        if rollout:
            out["rollout_logp"] = pk(self.ro, -1.0)
        return out

    def inputs(self, layout, rollout=True):
        return self.padded(rollout) if layout == "padded" else self.packed(rollout)


def run(fn, inputs, cfg):
    """loss, metrics and grads w.r.t. logp and entropy (the generator re-seeded for each run)."""
    if cfg.generator is not None:
        cfg = cfg.replace(generator=torch.Generator().manual_seed(cfg.generator.initial_seed()))
    loss, metrics = fn(**inputs, config=cfg)
    wrt = [inputs["logp"], inputs["entropy"]]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return loss, metrics, [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def assert_same(a, b, atol=1e-10, rtol=1e-9, metric_atol=1e-6):
    la, ma, ga = a
    lb, mb, gb = b
    torch.testing.assert_close(la.detach().double(), lb.detach().double(), atol=atol, rtol=rtol)
    assert set(ma) == set(mb), sorted(set(ma) ^ set(mb))
    for k in ma:
        torch.testing.assert_close(ma[k].double(), mb[k].double(), atol=metric_atol, rtol=1e-5, msg=k)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.double(), y.double(), atol=atol, rtol=rtol)


def config(mode="vanilla", agg="seq-mean-token-mean", **kw):
    base = dict(
        loss_mode=mode,
        loss_agg_mode=agg,
        entropy_coeff=0.01,
        kl_loss_coef=0.05,
        clip_cov_ratio=0.2,
        clip_cov_lb=0.1,
        kl_cov_ratio=0.2,
        generator=torch.Generator().manual_seed(11),
    )
    base.update(kw)
    return PolicyLossConfig(**base)


def uses_rollout(cfg):
    return cfg.loss_mode != "bypass_mode" and (
        cfg.rollout_correction is not None or cfg.off_policy_mask_threshold is not None
    )


def check(cfg, layout="padded", seed=0, **batch_kw):
    b = Batch(seed=seed, **batch_kw)
    inputs = b.inputs(layout, rollout=uses_rollout(cfg))
    got = run(policy_loss, inputs, cfg)
    want = run(reference_policy_loss, inputs, cfg)
    assert_same(got, want)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[2])
    return got


# --------------------------------------------------------------------------------------------------
# the new loss modes and their options
# --------------------------------------------------------------------------------------------------

MODE_CASES = {
    "sapo": dict(loss_mode="sapo"),
    "sapo_taus": dict(loss_mode="sapo", tau_pos=0.5, tau_neg=2.0),
    "sapo_seq": dict(loss_mode="sapo", importance_sampling_level="sequence"),
    "geo_mean": dict(loss_mode="geo_mean", clip_ratio_low=0.1, clip_ratio_high=0.3),
    "dppo_kl": dict(loss_mode="dppo_kl", clip_ratio_low=0.02, clip_ratio_high=0.05),
    "dppo_kl_c1.5": dict(loss_mode="dppo_kl", clip_ratio_low=0.05, clip_ratio_high=0.02, clip_ratio_c=1.5),
    "dppo_tv": dict(loss_mode="dppo_tv", clip_ratio_low=0.05, clip_ratio_high=0.1, clip_ratio_c=None),
    "dro": dict(loss_mode="dro", dro_beta=0.5),
    "dro_default": dict(loss_mode="dro"),
    "luspo_seq": dict(loss_mode="luspo", importance_sampling_level="sequence", loss_agg_mode="seq-mean-token-sum"),
    "luspo_delta": dict(loss_mode="luspo", importance_sampling_level="sequence", delta=1.1),
    "vespo": dict(loss_mode="vespo"),
    "vespo_params": dict(
        loss_mode="vespo", vespo_k_pos=1.5, vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=3.0
    ),
    "vanilla_delta": dict(loss_mode="vanilla", delta=1.05, clip_ratio_c=None),
    "vanilla_delta_dual": dict(loss_mode="vanilla", delta=1.15),
    "vanilla_seq": dict(loss_mode="vanilla", importance_sampling_level="sequence", clip_ratio_c=None),
    "vanilla_seq_delta": dict(loss_mode="vanilla", importance_sampling_level="sequence", delta=1.02, clip_ratio_c=None),
    "gspo_delta": dict(loss_mode="gspo", delta=1.05),
    "cispo_trl_cap": dict(loss_mode="cispo", clip_ratio_low=1.0, clip_ratio_high=-0.2),  # TRL eps_high = 0.8
    "cispo_seq": dict(loss_mode="cispo", importance_sampling_level="sequence", clip_ratio_low=1.0, clip_ratio_high=0.1),
    "bypass_ppo": dict(loss_mode="bypass_mode"),
    "bypass_reinforce": dict(
        loss_mode="bypass_mode",
        rollout_correction=RolloutCorrection(rollout_is="token", rollout_is_threshold=1.3, loss_type="reinforce"),
    ),
    "bypass_reinforce_seq": dict(
        loss_mode="bypass_mode",
        rollout_correction=RolloutCorrection(rollout_is="sequence", rollout_is_threshold=3.0, loss_type="reinforce"),
    ),
    "bypass_ppo_rs": dict(
        loss_mode="bypass_mode",
        rollout_correction=RolloutCorrection(
            rollout_is="token", rollout_rs="token_k1,seq_mean_k2", rollout_rs_threshold="0.8_1.25,0.02"
        ),
    ),
    "bypass_reinforce_all": dict(
        loss_mode="bypass_mode",
        rollout_correction=RolloutCorrection(
            rollout_is="sequence",
            rollout_is_batch_normalize=True,
            rollout_rs="seq_max_k3",
            rollout_rs_threshold=0.1,
            loss_type="reinforce",
        ),
    ),
    "kl_bias_token": dict(loss_mode="vanilla", use_bias_correction_kl=True, kl_loss_coef=0.3),
    "kl_bias_seq_k3plus": dict(
        loss_mode="vanilla",
        use_bias_correction_kl=True,
        kl_loss_coef=0.3,
        kl_loss_type="k3+",
        importance_sampling_level="sequence",
    ),
    "token_sum": dict(loss_mode="sapo", loss_agg_mode="token-sum"),
    "geo_mean_token_mean": dict(loss_mode="geo_mean", loss_agg_mode="token-mean"),
}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("case", list(MODE_CASES))
def test_mode_options_match_reference(case, layout):
    check(config(**MODE_CASES[case]), layout, seed=len(case))


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("mode", NEW_MODES)
def test_new_modes_every_aggregation_per_sequence_advantages(mode, agg):
    check(config(mode, agg), "packed", seed=LOSS_MODES.index(mode), per_seq_adv=True)


def test_hand_computed_values():
    """One token per case against the formulas written out by hand."""

    def one(cfg, d, a, lp=-1.0):
        logp = torch.tensor([[lp]], dtype=F64, requires_grad=True)
        loss, _ = policy_loss(logp, logp.detach() - d, torch.tensor([[a]], dtype=F64), torch.ones(1, 1), config=cfg)
        (g,) = torch.autograd.grad(loss, logp)
        return loss.item(), g.item()

    # SAPO on-policy: gate 2/tau, gradient exactly the policy gradient -A (sigmoid'(0) * 4 = 1)
    for tau_pos, a in ((1.0, 1.5), (0.5, 2.0)):
        loss, g = one(PolicyLossConfig(loss_mode="sapo", tau_pos=tau_pos), 0.0, a)
        assert loss == pytest.approx(-2 * a / tau_pos) and g == pytest.approx(-a)
    # DRO: -A logp + beta/2 d^2, gradient -A + beta d
    loss, g = one(PolicyLossConfig(loss_mode="dro", dro_beta=0.4), 0.5, 2.0, lp=-1.0)
    assert loss == pytest.approx(2.0 + 0.2 * 0.25) and g == pytest.approx(-2.0 + 0.4 * 0.5)
    # delta: A < 0, r = e^1 > delta = 1.5 -> loss -A * 1.5 (no gradient through the cap); dual clip off
    loss, g = one(PolicyLossConfig(delta=1.5, clip_ratio_c=None), 1.0, -1.0)
    assert loss == pytest.approx(1.5) and g == 0.0
    # TRL's cispo cap epsilon_high = 0.2: min(r, 0.2), no lower bound
    loss, g = one(PolicyLossConfig(loss_mode="cispo", clip_ratio_low=1.0, clip_ratio_high=-0.8), 0.0, 1.0)
    assert loss == pytest.approx(-0.2 * -1.0) and g == pytest.approx(-0.2)
    # DPPO-TV: inside the region the gradient is -A min(r, c); outside 0
    loss, g = one(PolicyLossConfig(loss_mode="dppo_tv", clip_ratio_high=0.5), math.log(2.0), 1.0, lp=-3.0)
    assert g == pytest.approx(-2.0)
    loss, g = one(PolicyLossConfig(loss_mode="dppo_tv", clip_ratio_high=0.01), math.log(2.0), 1.0, lp=-1.0)
    assert loss == 0.0 and g == 0.0
    # token-sum: no normaliser
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], dtype=F64)
    loss, _ = policy_loss(
        logp,
        logp,
        torch.ones(2, 2, dtype=F64),
        torch.tensor([[1, 1], [1, 0]]),
        config=PolicyLossConfig(loss_mode="gpg", loss_agg_mode="token-sum"),
    )
    assert loss.item() == pytest.approx(3.5)


def test_bias_corrected_kl_is_trl_term():
    """TRL: per_token_kl * coef_1 (differentiable ratio); on-policy the value is k3 and the gradient
    picks up k3 * dr/dlogp (exactly TRL's, where the ratio is 1)."""
    logp = torch.tensor([[-1.2, -0.4]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]], dtype=F64)
    m = torch.ones(1, 2, dtype=torch.bool)
    z = torch.zeros(1, 2, dtype=F64)
    cfg = PolicyLossConfig(loss_mode="gpg", kl_loss_coef=1.0, use_bias_correction_kl=True, loss_agg_mode="token-sum")
    loss, _ = policy_loss(logp, logp.detach(), z, m, ref_logp=ref, config=cfg)
    (g,) = torch.autograd.grad(loss, logp)
    lp = logp.detach()
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    torch.testing.assert_close(loss, k3.sum())
    torch.testing.assert_close(g, (1 - torch.exp(ref - lp)) + k3)


# --------------------------------------------------------------------------------------------------
# rollout correction: every option, chained rejection, both threshold forms
# --------------------------------------------------------------------------------------------------

RS_THRESHOLD = {
    "token_k1": "0.7_1.4",
    "token_k2": 0.02,
    "token_k3": 0.03,
    "seq_sum_k1": "0.5_1.5",
    "seq_sum_k2": 0.1,
    "seq_sum_k3": 0.1,
    "seq_mean_k1": 1.04,
    "seq_mean_k2": 0.03,
    "seq_mean_k3": 0.03,
    "seq_max_k2": 0.1,
    "seq_max_k3": 0.1,
}
RC_CASES = {
    "is_token": RolloutCorrection(rollout_is="token"),
    "is_token_thr1.1": RolloutCorrection(rollout_is="token", rollout_is_threshold=1.1),
    "is_sequence": RolloutCorrection(rollout_is="sequence", rollout_is_threshold=1.5),
    "is_token_normalize": RolloutCorrection(rollout_is="token", rollout_is_batch_normalize=True),
    "is_sequence_normalize": RolloutCorrection(
        rollout_is="sequence", rollout_is_threshold=3.0, rollout_is_batch_normalize=True
    ),
    "is_token_truncate_lower": RolloutCorrection(
        rollout_is="token", rollout_is_threshold=1.2, rollout_is_threshold_lower=0.9
    ),
    "is_token_mask": RolloutCorrection(
        rollout_is="token", rollout_is_threshold=1.25, rollout_is_threshold_lower=0.8, rollout_is_mode="mask"
    ),
    "is_sequence_mask": RolloutCorrection(rollout_is="sequence", rollout_is_threshold=1.5, rollout_is_mode="mask"),
    "is_sequence_mask_no_upper": RolloutCorrection(
        rollout_is="sequence", rollout_is_threshold=math.inf, rollout_is_threshold_lower=0.7, rollout_is_mode="mask"
    ),
    "is_off_rs_on": RolloutCorrection(
        rollout_is="token", rollout_is_threshold=None, rollout_rs="token_k2", rollout_rs_threshold=0.03
    ),
    "rs_chain_per_option": RolloutCorrection(
        rollout_rs="token_k1,seq_mean_k3,seq_max_k2", rollout_rs_threshold="0.6_1.6,0.02,0.15"
    ),
    "rs_chain_shared_k1": RolloutCorrection(rollout_rs="seq_sum_k1, token_k1", rollout_rs_threshold="1.15"),
    "rs_chain_shared_number": RolloutCorrection(rollout_rs="token_k2,seq_sum_k3,token_k2", rollout_rs_threshold=0.05),
    "is_and_rs": RolloutCorrection(
        rollout_is="sequence",
        rollout_is_threshold=2.0,
        rollout_is_batch_normalize=True,
        rollout_rs="token_k3,seq_mean_k1",
        rollout_rs_threshold="0.03,0.9_1.1",
    ),
    "metrics_only": RolloutCorrection(),
}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("case", list(RC_CASES))
def test_rollout_correction_matches_reference(case, layout):
    got = check(config(rollout_correction=RC_CASES[case]), layout, seed=3 + len(case))
    rc = RC_CASES[case]
    if rc.rollout_rs is not None:  # rejection did something and left something
        frac = got[1]["rollout_corr/rollout_rs_masked_fraction"].item()
        assert 0 < frac < 1, frac


@pytest.mark.parametrize("option", RS_OPTIONS)
def test_each_rejection_option(option):
    cfg = config(rollout_correction=RolloutCorrection(rollout_rs=option, rollout_rs_threshold=RS_THRESHOLD[option]))
    got = check(cfg, "packed", seed=RS_OPTIONS.index(option), ro_scale=0.3)
    assert 0 < got[1][f"rollout_corr/rollout_rs_{option}_masked_fraction"].item() < 1


@pytest.mark.parametrize("mode", ["geo_mean", "vespo", "sapo", "gspo", "kl_cov", "clip_cov", "dppo_tv"])
def test_rollout_is_weights_in_every_kind_of_mode(mode):
    """GMPO takes the geometric mean of the weights, VESPO folds them into its sequence weight (TRL),
    the others multiply the per-token loss (verl)."""
    rc = RolloutCorrection(
        rollout_is="token", rollout_is_threshold=1.3, rollout_rs="seq_mean_k2", rollout_rs_threshold=0.05
    )
    check(config(mode, rollout_correction=rc), "padded", seed=LOSS_MODES.index(mode))


def test_vespo_with_masked_is_weights():
    rc = RolloutCorrection(
        rollout_is="token", rollout_is_threshold=1.2, rollout_is_threshold_lower=0.85, rollout_is_mode="mask"
    )
    check(config("vespo", rollout_correction=rc), "packed", seed=2)


def test_rejection_removes_tokens_from_loss_and_denominators():
    """Rejected tokens behave as masked ones (verl modifies response_mask); IS weights multiply the loss."""
    b = Batch(seed=21)
    rc = RolloutCorrection(rollout_rs="token_k2", rollout_rs_threshold=0.02)
    inputs = b.padded()
    loss, m, g = run(policy_loss, inputs, config(rollout_correction=rc))
    lr = (b.old - b.ro).clamp(-20, 20)
    keep = b.mask & (0.5 * lr.square() <= 0.02)
    plain = dict(b.padded(rollout=False), mask=keep)
    loss2, m2, g2 = run(policy_loss, plain, config())
    torch.testing.assert_close(loss, loss2)
    for k in m2:
        torch.testing.assert_close(m[k], m2[k], msg=k)
    for x, y in zip(g, g2):
        torch.testing.assert_close(x, y)


def _is_batch(ratios):
    """One row per list of raw IS ratios (padded with masked tokens); ``old - rollout = log ratio``."""
    T = max(len(r) for r in ratios)
    lr = torch.zeros(len(ratios), T, dtype=F64)
    mask = torch.zeros(len(ratios), T, dtype=torch.bool)
    for i, r in enumerate(ratios):
        lr[i, : len(r)] = torch.tensor(r, dtype=F64).log()
        mask[i, : len(r)] = True
    ro = torch.full_like(lr, -2.0)
    return dict(
        logp=ro.clone(), old_logp=ro + lr, advantages=torch.ones(len(ratios), dtype=F64), mask=mask, rollout_logp=ro
    )


def test_is_metrics_use_the_applied_weights():
    """verl's compute_is_metrics, by hand: mean / max / min / std / ESS / seq_* of the applied weights (IcePop:
    zeroed outside [0.8, 2]), ratio_fraction_* / seq_fraction_* / oob_ratio of the raw ones."""
    rc = RolloutCorrection(
        rollout_is="token", rollout_is_threshold=2.0, rollout_is_threshold_lower=0.8, rollout_is_mode="mask"
    )
    _, m = policy_loss(**_is_batch([[0.5, 1.0, 1.5, 3.0], [0.25, 1.0]]), config=PolicyLossConfig(rollout_correction=rc))
    m = {
        k[len("rollout_corr/rollout_is_") :]: v.item() for k, v in m.items() if k.startswith("rollout_corr/rollout_is")
    }
    w = [0.0, 1.0, 1.5, 0.0, 0.0, 1.0]
    mw = sum(w) / 6
    seq = [2.5 / 4, 1.0 / 2]
    want = dict(
        mean=mw,
        max=1.5,
        min=0.0,
        std=math.sqrt(sum(x * x for x in w) / 6 - mw * mw),
        eff_sample_size=mw * mw / (sum(x * x for x in w) / 6),
        ratio_fraction_high=1 / 6,
        ratio_fraction_low=2 / 6,
        seq_mean=sum(seq) / 2,
        seq_std=abs(seq[0] - seq[1]) / math.sqrt(2),
        seq_max=seq[0],
        seq_min=seq[1],
        seq_max_deviation=0.5,
        seq_fraction_high=0.0,
        seq_fraction_low=0.5,
        oob_ratio=3 / 6,
    )
    assert set(m) == set(want)
    for k, v in want.items():
        assert m[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    # every weight zeroed: ESS 0 (verl divides by 0), nothing NaN
    _, m = policy_loss(**_is_batch([[3.0, 0.5], [4.0]]), config=PolicyLossConfig(rollout_correction=rc))
    assert m["rollout_corr/rollout_is_eff_sample_size"].item() == 0.0
    assert m["rollout_corr/rollout_is_mean"].item() == 0.0 and m["rollout_corr/rollout_is_oob_ratio"].item() == 1.0
    assert all(math.isfinite(v.item()) for v in m.values())


def test_rs_metric_names_follow_verl():
    """Per option: verl's std and seq_* metrics; seq_fraction_low only for the k1 options."""
    names = RolloutCorrection(rollout_rs="token_k1,seq_max_k2", rollout_rs_threshold="0.5_2.0,0.1").metric_names()
    for opt, k1 in (("token_k1", True), ("seq_max_k2", False)):
        p = f"rollout_corr/rollout_rs_{opt}_"
        for m in ("std", "seq_mean", "seq_std", "seq_max", "seq_min", "seq_max_deviation", "seq_fraction_high"):
            assert p + m in names
        assert (p + "seq_fraction_low" in names) == k1
    assert "rollout_corr/rollout_is_oob_ratio" not in RolloutCorrection(rollout_is="token").metric_names()


def test_threshold_syntax():
    from fusedrl.loss.rollout import _parse_rs

    specs = _parse_rs("token_k1,seq_mean_k3", "0.5_2.0,0.1")
    assert [(s.name, s.lower, s.upper) for s in specs] == [
        ("token_k1", math.log(0.5), math.log(2.0)),
        ("seq_mean_k3", None, 0.1),
    ]
    specs = _parse_rs("seq_sum_k1,token_k2", 4.0)  # one shared threshold; a lone k1 value u means 1/u_u
    assert (specs[0].lower, specs[0].upper) == (math.log(0.25), math.log(4.0)) and specs[1].upper == 4.0
    assert [s.name for s in _parse_rs(" token_k2 , token_k2,seq_max_k3 ", "1")] == ["token_k2", "seq_max_k3"]


# --------------------------------------------------------------------------------------------------
# entropy masking (TRL top_entropy_quantile) and OPSM
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.0, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("mode", ["vanilla", "gspo", "kl_cov", "geo_mean"])
def test_entropy_masking_matches_reference(mode, q):
    got = check(config(mode, top_entropy_quantile=q), "packed", seed=int(q * 10))
    assert torch.isfinite(got[0])


def test_entropy_mask_is_trls():
    """TRL's get_high_entropy_mask: entropies >= torch.quantile(valid entropies, 1 - rho) (fp32, bit for bit)."""
    from fusedrl.loss.selection import entropy_keep

    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        n = int(torch.randint(1, 80, (1,), generator=g))
        ent = torch.rand(n, generator=g) * 4
        if trial % 3 == 0:
            ent = ent.round()  # ties
        valid = torch.rand(n, generator=g) > 0.3
        rho = [0.0, 0.2, 0.37, 0.8, 1.0][trial % 5]
        mine = entropy_keep(ent, valid, rho, None)
        if valid.any():
            thr = torch.quantile(ent[valid].float(), 1 - rho)
            want = (ent * valid.float() >= thr) & valid
        else:
            want = torch.zeros_like(valid)
        assert torch.equal(mine, want), (trial, rho)
    assert reference_quantile([3.0, 1.0, 2.0], 0.25) == torch.quantile(torch.tensor([3.0, 1.0, 2.0], dtype=F64), 0.25)


def test_entropy_mask_keeps_denominators_and_kl():
    """The mask zeroes the policy term only: tokens stay in the denominators, KL / entropy terms untouched."""
    b = Batch(seed=5)
    cfg = config("gpg", "token-mean", top_entropy_quantile=0.3, entropy_coeff=0.0, kl_loss_coef=0.0)
    inputs = b.padded(rollout=False)
    loss, _, _ = run(policy_loss, inputs, cfg)
    ent = b.ent.detach()
    thr = torch.quantile(ent[b.mask], 0.7)
    keep = b.mask & (ent >= thr)
    want = (-b.adv * b.logp.detach())[keep].sum() / b.mask.sum()
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("threshold", [-0.05, 0.0, 0.05])
@pytest.mark.parametrize("with_rollout", [True, False])
def test_opsm_matches_reference(threshold, with_rollout):
    cfg = config("vanilla", off_policy_mask_threshold=threshold)
    b = Batch(seed=8, ro_scale=0.3)
    inputs = b.packed(rollout=with_rollout)
    assert_same(run(policy_loss, inputs, cfg), run(reference_policy_loss, inputs, cfg))


def test_opsm_is_trls():
    """Against TRL's own GRPOTrainer.get_off_policy_mask (static) on a [B, T] batch."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    from fusedrl.loss.inputs import Segments, make_tokens
    from fusedrl.loss.selection import opsm_keep

    b = Batch(seed=4, ro_scale=0.4, per_seq_adv=True, empty_row=False)
    lp = torch.where(b.mask, b.logp.detach(), 0.0)
    ro = torch.where(b.mask, b.ro, 0.0)
    for thr in (0.0, 0.02, 0.1):
        want = grpo.GRPOTrainer.get_off_policy_mask(b.adv[:, None], lp, ro, b.mask.double(), thr)
        tok = make_tokens(
            Segments(b.B, seq_len=b.T),
            b.mask.reshape(-1),
            lp.reshape(-1),
            b.old.reshape(-1),
            b.adv[:, None].expand(b.B, b.T).reshape(-1),
        )
        got = opsm_keep(tok, ro.reshape(-1), thr).reshape(b.B, b.T)
        assert torch.equal(got[b.mask], want.bool().expand(b.B, b.T)[b.mask]), thr


def test_vespo_phi_is_trls():
    """VESPO's sequence weight against TRL's GRPOTrainer.get_gamma_weights (static), with token IS ratios."""
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    b = Batch(seed=6, per_seq_adv=True, empty_row=False, scale=0.1)
    rc = RolloutCorrection(rollout_is="token", rollout_is_threshold=1.5)
    cfg = PolicyLossConfig(loss_mode="vespo", rollout_correction=rc, loss_agg_mode="token-sum")
    inputs = b.padded()
    loss, _ = policy_loss(
        inputs["logp"],
        inputs["old_logp"],
        inputs["advantages"],
        inputs["mask"],
        config=cfg,
        rollout_logp=inputs["rollout_logp"],
    )
    (g,) = torch.autograd.grad(loss, inputs["logp"])
    m = b.mask.double()
    lr = torch.where(b.mask, b.logp.detach() - b.old, 0.0)
    is_ratio = torch.where(b.mask, torch.exp(b.old - b.ro).clamp(max=1.5), 1.0)
    phi = grpo.GRPOTrainer.get_gamma_weights(b.adv[:, None], lr, m, is_ratio)
    # d loss / d logp = -phi * A on valid tokens
    torch.testing.assert_close(g[b.mask], (-phi * b.adv[:, None]).expand(b.B, b.T)[b.mask])


# --------------------------------------------------------------------------------------------------
# masked rows, all-masked, empty, huge ratios, metric names, no host sync
# --------------------------------------------------------------------------------------------------

EDGE_CONFIGS = {
    **{m: dict(loss_mode=m) for m in NEW_MODES},
    "rc_all": dict(rollout_correction=RC_CASES["is_and_rs"]),
    "rc_mask": dict(loss_mode="sapo", rollout_correction=RC_CASES["is_token_mask"]),
    "bypass_all": MODE_CASES["bypass_reinforce_all"],
    "entropy_opsm": dict(loss_mode="gspo", top_entropy_quantile=0.2, off_policy_mask_threshold=0.01),
    "seq_level_bias_kl": MODE_CASES["kl_bias_seq_k3plus"],
    "vespo_rc": dict(loss_mode="vespo", rollout_correction=RolloutCorrection(rollout_is="token")),
}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", list(EDGE_CONFIGS))
def test_all_masked_batch(name, layout):
    b = Batch(seed=1)
    b.mask = torch.zeros_like(b.mask)
    cfg = config(**EDGE_CONFIGS[name])
    inputs = b.inputs(layout, rollout=uses_rollout(cfg))
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    loss, metrics, grads = run(policy_loss, inputs, cfg)
    assert loss.item() == 0.0 and loss.requires_grad
    assert all((g == 0).all() for g in grads)
    for k, v in metrics.items():
        assert v.item() == 0.0, k
    ref_loss, ref_metrics = reference_policy_loss(**inputs, config=cfg.replace(generator=None))
    assert ref_loss.item() == 0.0 and all(v.item() == 0.0 for v in ref_metrics.values())


@pytest.mark.parametrize("name", list(EDGE_CONFIGS))
def test_empty_tensors_and_empty_sequences(name):
    cfg = config(**EDGE_CONFIGS[name])
    ro = torch.zeros(0) if uses_rollout(cfg) else None
    logp = torch.zeros(0, requires_grad=True)
    loss, m = policy_loss(
        logp,
        torch.zeros(0),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.bool),
        torch.zeros(0),
        torch.zeros(0),
        cu_seqlens=torch.zeros(1, dtype=torch.int64),
        config=cfg,
        rollout_logp=ro,
    )
    loss.backward()
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in m.values())
    # empty sequences in the middle of a packed batch drop out of everything
    b = Batch(seed=2, empty_row=False)
    pk = b.packed(rollout=uses_rollout(cfg))
    cu = pk["cu_seqlens"]
    pk["cu_seqlens"] = torch.cat([cu[:2], cu[1:2], cu[1:2], cu[2:]])
    assert_same(run(policy_loss, pk, cfg), run(reference_policy_loss, pk, cfg))


@pytest.mark.parametrize("name", list(EDGE_CONFIGS))
def test_huge_log_ratios(name):
    """|logp - old| = 30 and |old - rollout| = 30: finite, and equal to the reference."""
    b = Batch(seed=8)
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(b.B, b.T, generator=g) > 0.5, 1.0, -1.0).to(F64)
    b.old = torch.where(b.mask, b.logp.detach() - 30 * sign, b.old)
    far = torch.arange(b.T).expand(b.B, b.T) % 2 == 0  # half the tokens: |old - rollout| = 30 (rejected, if asked)
    b.ro = torch.where(b.mask & far, b.old + 30 * sign.flip(0), b.ro)
    cfg = config(**EDGE_CONFIGS[name])
    inputs = b.padded(rollout=uses_rollout(cfg))
    got = run(policy_loss, inputs, cfg)
    assert torch.isfinite(got[0]) and all(torch.isfinite(x).all() for x in got[2])
    assert all(torch.isfinite(v) for v in got[1].values())
    assert_same(got, run(reference_policy_loss, inputs, cfg), atol=1e-6, rtol=1e-9, metric_atol=1e-4)


@pytest.mark.parametrize("name", list(EDGE_CONFIGS))
def test_metric_names_list_the_keys_in_order(name):
    cfg = config(**EDGE_CONFIGS[name])
    b = Batch(seed=3)
    for has_ent, has_ref in ((True, True), (False, False)):
        inputs = b.padded(rollout=uses_rollout(cfg))
        if not has_ent:
            inputs.pop("entropy")
            cfg2 = cfg.replace(entropy_coeff=0.0, top_entropy_quantile=1.0)
        else:
            cfg2 = cfg
        if not has_ref:
            inputs.pop("ref_logp")
            cfg2 = cfg2.replace(kl_loss_coef=0.0)
        _, m = policy_loss(**inputs, config=cfg2)
        assert list(m) == list(metric_names(cfg2, has_ent, has_ref))


@pytest.mark.parametrize("name", list(EDGE_CONFIGS) + ["clip_cov_entropy", "kl_cov_group_free"])
def test_no_host_sync_meta(name):
    """On the meta device any .item() / bool(tensor) / .tolist() raises: the head never syncs."""
    kw = {
        "clip_cov_entropy": dict(loss_mode="clip_cov", top_entropy_quantile=0.3),
        "kl_cov_group_free": dict(loss_mode="kl_cov", rollout_correction=RC_CASES["rs_chain_per_option"]),
    }
    cfg = config(**(EDGE_CONFIGS.get(name) or kw[name]), generator=None)
    for packed in (False, True):
        shape = (23,) if packed else (4, 6)
        meta = lambda: torch.randn(shape, device="meta")  # noqa: E731, B023
        lp = torch.randn(shape, device="meta", requires_grad=True)
        ent = torch.randn(shape, device="meta", requires_grad=True)
        cu = torch.tensor([0, 5, 12, 20], device="meta", dtype=torch.int32) if packed else None
        adv = torch.randn(3 if packed else 4, device="meta")
        loss, metrics = policy_loss(
            lp,
            meta(),
            adv,
            torch.ones(shape, device="meta", dtype=torch.bool),
            ent,
            meta(),
            cu_seqlens=cu,
            config=cfg,
            rollout_logp=meta() if uses_rollout(cfg) else None,
        )
        loss.backward()
        assert lp.grad is not None and loss.shape == ()


@pytest.mark.gpu
def test_no_host_sync_cuda_menu():
    b = Batch(seed=0, dtype=torch.float32)
    cfg = config(
        "gspo",
        top_entropy_quantile=0.2,
        off_policy_mask_threshold=0.01,
        rollout_correction=RC_CASES["is_and_rs"],
        generator=None,
    )
    inputs = {k: (v.detach().cuda().requires_grad_(k in ("logp", "entropy"))) for k, v in b.packed().items()}
    policy_loss(**inputs, config=cfg)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = policy_loss(**inputs, config=cfg, check_inputs=False)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = run(policy_loss, b.packed(), cfg)
    torch.testing.assert_close(loss.detach().cpu(), cpu[0].detach(), atol=1e-5, rtol=1e-5)


def test_fp32_and_bf16_inputs():
    cfg = config("sapo", rollout_correction=RC_CASES["is_token"], top_entropy_quantile=0.5)
    for dtype in (torch.float32, torch.bfloat16):
        b = Batch(seed=7, dtype=dtype)
        got = run(policy_loss, b.padded(), cfg)
        assert got[0].dtype == torch.float32 and got[2][0].dtype == dtype
        want = run(reference_policy_loss, b.padded(), cfg)
        torch.testing.assert_close(got[0].double(), want[0].detach().double(), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[2][0].double(), want[2][0].double(), atol=2e-5, rtol=1e-2)


# --------------------------------------------------------------------------------------------------
# TokenHead: the head as the one-pass schedule sees it
# --------------------------------------------------------------------------------------------------

HEAD_CASES = {  # name: (config kwargs, expected head_kind)
    **{m: (dict(loss_mode=m), "sequence" if m in SEQUENCE_MODES else "token") for m in NEW_MODES},
    "decoupled_rc": (dict(rollout_correction=RC_CASES["is_and_rs"]), "token"),
    "decoupled_rc_cispo_cap": (
        dict(
            loss_mode="cispo", clip_ratio_low=1.0, clip_ratio_high=-0.5, rollout_correction=RC_CASES["is_sequence_mask"]
        ),
        "token",
    ),
    "kl_cov_rc": (dict(loss_mode="kl_cov", rollout_correction=RC_CASES["rs_chain_per_option"]), "selection"),
    "clip_cov_rc": (dict(loss_mode="clip_cov", rollout_correction=RC_CASES["is_token_normalize"]), "selection"),
    "vanilla_seq_delta": (MODE_CASES["vanilla_seq_delta"], "sequence"),
    "opsm": (dict(off_policy_mask_threshold=0.01), "sequence"),
    "bias_kl_seq": (MODE_CASES["kl_bias_seq_k3plus"], "sequence"),
    "bypass_reinforce": (MODE_CASES["bypass_reinforce"], "token"),
    "bypass_reinforce_seq": (MODE_CASES["bypass_reinforce_seq"], "sequence"),
    "bypass_rs": (MODE_CASES["bypass_ppo_rs"], "batch"),
    "bypass_all": (MODE_CASES["bypass_reinforce_all"], "batch"),
    "entropy_mask": (dict(top_entropy_quantile=0.3), "batch"),
    "kl_cov_entropy": (dict(loss_mode="kl_cov", top_entropy_quantile=0.3), "batch"),
    "clip_cov_opsm": (dict(loss_mode="clip_cov", off_policy_mask_threshold=0.01), "batch"),
    "vespo_rc_entropy": (
        dict(loss_mode="vespo", rollout_correction=RC_CASES["is_token"], entropy_coeff=0.0, top_entropy_quantile=0.5),
        "batch",
    ),
}


def make_head(
    old, adv, mask, ref, cu, cfg, need_entropy, dtype, check_inputs=None, rollout_logp=None, rollout_is_weights=None
):
    """A TokenHead from the loss inputs (everything but the log-probs), flattened as the one-pass op does."""
    side = {"ref_logp": ref, "rollout_logp": rollout_logp, "rollout_is_weights": rollout_is_weights}
    batch = flatten_batch("old_logp", tuple(old.shape), old.device, old, adv, mask, cu, side, check_inputs)
    return TokenHead(batch, cfg, need_entropy, dtype)


def _chunks(head, n, kind, seg_len):
    """Token chunks as a schedule would cut them: ragged for token / selection, whole rows for sequence."""
    if kind == "batch":
        return [(0, n, None)]
    if kind == "sequence":
        rows = head.seg.B
        return [(a * seg_len, min(rows, a + 2) * seg_len, (a, min(rows, a + 2))) for a in range(0, rows, 2)]
    return [(a, min(n, a + 7), None) for a in range(0, n, 7)]


def _check_head(cfg, b, inputs, kind):
    """Chunked TokenHead gradients (+ the selection correction, as the one-pass schedule applies it) equal
    autograd through policy_loss; evaluate() equals policy_loss."""
    loss, metrics, (g_lp, g_ent) = run(policy_loss, inputs, cfg)
    head = make_head(
        inputs["old_logp"],
        inputs["advantages"],
        inputs["mask"],
        inputs["ref_logp"],
        None,
        cfg.replace(generator=None),
        True,
        F64,
        rollout_logp=inputs.get("rollout_logp"),
        rollout_is_weights=inputs.get("rollout_is_weights"),
    )
    assert head.kind == kind
    lp = torch.where(b.mask, b.logp.detach(), 0.0).reshape(-1)
    ent = torch.where(b.mask, b.ent.detach(), 0.0).reshape(-1)
    keys = torch.rand(lp.numel(), generator=torch.Generator().manual_seed(cfg.generator.initial_seed()))
    h_loss, h_metrics, picked = head.evaluate(lp, ent, keys if cfg.loss_mode == "clip_cov" else None)
    torch.testing.assert_close(h_loss, loss.detach())
    assert list(h_metrics) == list(metrics)
    n = lp.numel()
    glp = torch.zeros(n, dtype=F64)
    gh = torch.zeros(n, dtype=F64)
    for a, c, seqs in _chunks(head, n, kind, b.T):
        g1, g2 = head.grads(a, c, lp[a:c], ent[a:c], seqs)
        glp[a:c] = g1
        if g2 is not None:
            gh[a:c] = g2
    if kind == "selection":
        idx = picked.nonzero().reshape(-1)
        glp[idx] += head.selection_delta(idx, lp[idx], picked[idx])
    valid = b.mask.reshape(-1)
    torch.testing.assert_close(glp[valid], g_lp.reshape(-1)[valid], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gh[valid], g_ent.reshape(-1)[valid], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", list(HEAD_CASES))
def test_token_head_grads_equal_policy_loss(name):
    kw, kind = HEAD_CASES[name]
    cfg = config(**kw)
    assert head_kind(cfg) == kind
    b = Batch(seed=len(name))
    _check_head(cfg, b, b.padded(rollout=uses_rollout(cfg)), kind)


def test_token_head_refuses_wrong_chunks():
    b = Batch(seed=2)
    for kw, msg in (
        (dict(off_policy_mask_threshold=0.0), "whole sequences"),
        (dict(top_entropy_quantile=0.5), "whole batch"),
    ):
        cfg = config(**kw)
        inputs = b.padded(rollout=False)
        head = make_head(
            inputs["old_logp"], inputs["advantages"], inputs["mask"], inputs["ref_logp"], None, cfg, True, F64
        )
        lp = torch.where(b.mask, b.logp.detach(), 0.0).reshape(-1)
        with pytest.raises(ValueError, match=msg):
            head.grads(0, 5, lp[:5], lp[:5])
    cfg = config(rollout_correction=RolloutCorrection(rollout_is="token"))
    with pytest.raises(ValueError, match="rollout_logp"):
        make_head(b.old, b.adv, b.mask, b.ref, None, cfg, True, F64)
    head = make_head(b.old, b.adv, b.mask, b.ref, None, config(entropy_coeff=0.0, top_entropy_quantile=0.5), False, F64)
    assert head.needs_entropy and not head.entropy_has_grad


def test_mode_classification_is_complete():
    # (the batch-level modes, BATCH_MODES, were an empty set; batch needs come from options: head_kind "batch")
    assert set(TOKEN_LOCAL_MODES) | set(SEQUENCE_MODES) | set(SELECTION_MODES) == set(LOSS_MODES)
    assert not (set(TOKEN_LOCAL_MODES) & set(SEQUENCE_MODES))
    for mode in LOSS_MODES:
        kind = head_kind(PolicyLossConfig(loss_mode=mode))
        assert kind == ("selection" if mode in SELECTION_MODES else "sequence" if mode in SEQUENCE_MODES else "token")
    assert kernel_head_ok(PolicyLossConfig()) and not kernel_head_ok(PolicyLossConfig(delta=2.0))
    assert not kernel_head_ok(PolicyLossConfig(loss_mode="cispo", clip_ratio_high=-0.5))
    assert not kernel_head_ok(PolicyLossConfig(loss_mode="sapo"))


def kernel_head_ok(cfg):
    """The fused epilogue kernels compute this config (they have a formula set for it)."""
    return kernel_head_codes(cfg) is not None


# --------------------------------------------------------------------------------------------------
# configuration: validation, JSON round trip (the one-pass op's transport), input errors
# --------------------------------------------------------------------------------------------------

BAD = [
    (dict(tau_pos=0.0), "tau_pos"),
    (dict(tau_neg=float("inf")), "tau_neg"),
    (dict(dro_beta=-1.0), "dro_beta"),
    (dict(delta=0.0), "delta"),
    (dict(delta=2.0, loss_mode="sapo"), "delta"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(importance_sampling_level="sequence", loss_mode="gspo"), "importance_sampling_level"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(top_entropy_quantile=-0.1), "top_entropy_quantile"),
    (dict(off_policy_mask_threshold=float("nan")), "off_policy_mask_threshold"),
    (dict(use_bias_correction_kl=1), "use_bias_correction_kl"),
    (dict(vespo_k_pos=float("nan")), "vespo_k_pos"),
    (dict(stats_group="world"), "stats_group"),
    (dict(rollout_correction="token"), "rollout_correction"),
    (dict(loss_mode="cispo", clip_ratio_high=-1.0), "clip_ratio_high"),
    (dict(loss_mode="vanilla", clip_ratio_high=-0.1), "clip_ratio_high"),
    (dict(loss_mode="vespo", rollout_correction=RolloutCorrection(rollout_is="sequence")), "vespo"),
]


@pytest.mark.parametrize("kw,field", BAD)
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**kw)


BAD_RC = [
    (dict(rollout_is="tok"), "rollout_is"),
    (dict(rollout_is_threshold=0.0), "rollout_is_threshold"),
    (dict(rollout_is_threshold=float("nan")), "rollout_is_threshold"),
    (dict(rollout_is_threshold_lower=3.0), "rollout_is_threshold_lower"),
    (dict(rollout_is_batch_normalize=1), "rollout_is_batch_normalize"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(rollout_is_mode="clip"), "rollout_is_mode"),
    (dict(rollout_rs="token_k4", rollout_rs_threshold=1.0), "token_k4"),
    (dict(rollout_rs="token_k1"), "rollout_rs_threshold"),
    (dict(rollout_rs_threshold=1.0), "rollout_rs"),
    (dict(rollout_rs="token_k1,token_k2", rollout_rs_threshold="1,2,3"), "rollout_rs_threshold"),
    (dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_0.2"), "one upper bound"),
    (dict(rollout_rs="token_k2", rollout_rs_threshold="abc"), "invalid number"),
    (dict(rollout_rs="token_k1", rollout_rs_threshold="-1_2"), "positive"),
    (dict(rollout_rs=",", rollout_rs_threshold=1.0), "at least one"),
]


@pytest.mark.parametrize("kw,match", BAD_RC)
def test_rollout_correction_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RolloutCorrection(**kw)


def test_json_round_trip_and_metric_names():
    """The one-pass op sends the config as JSON: a RolloutCorrection travels as a dict of its fields."""
    rc = RC_CASES["is_and_rs"]
    cfg = PolicyLossConfig(loss_mode="sapo", rollout_correction=rc, top_entropy_quantile=0.2, delta=None)
    blob = {
        f.name: (
            dataclasses.asdict(getattr(cfg, f.name))
            if dataclasses.is_dataclass(getattr(cfg, f.name))
            else getattr(cfg, f.name)
        )
        for f in dataclasses.fields(cfg)
        if f.name != "generator"
    }
    back = PolicyLossConfig(**json.loads(json.dumps(blob)))
    assert back == cfg and back.rollout_correction == rc
    names = metric_names(cfg, True, False)
    assert names[:5] == ("pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "entropy")
    assert "rollout_corr/rollout_is_batch_norm_factor" in names and "rollout_corr/chi2_seq" in names
    assert "rollout_corr/rollout_rs_seq_mean_k1_masked_fraction" in names


def test_input_errors():
    b = Batch(seed=0)
    inputs = b.padded()
    with pytest.raises(ValueError, match="rollout_logp"):
        policy_loss(**dict(inputs, rollout_logp=None), config=config(rollout_correction=RolloutCorrection()))
    with pytest.raises(ValueError, match="bypass_mode"):
        policy_loss(**inputs, config=config("bypass_mode"))
    with pytest.raises(ValueError, match="nothing reads it"):
        policy_loss(**inputs, config=config())
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(
            **dict(b.padded(rollout=False), entropy=None), config=config(top_entropy_quantile=0.5, entropy_coeff=0.0)
        )
    with pytest.raises(ValueError, match="rollout_logp must have the shape"):
        policy_loss(**dict(inputs, rollout_logp=b.ro[:, :3]), config=config(rollout_correction=RolloutCorrection()))


# --------------------------------------------------------------------------------------------------
# verl itself, when installed (skipped cleanly otherwise)
# --------------------------------------------------------------------------------------------------


def _verl_batch():
    g = torch.Generator().manual_seed(31)
    B, T = 6, 40
    lengths = torch.randint(5, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    lp = -torch.rand(B, T, generator=g, dtype=F64) * 3
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    ro = (old + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    adv = (torch.randn(B, 1, generator=g, dtype=F64) * 2).expand(B, T).contiguous()
    return lp, old, ro, adv, mask


def test_rollout_correction_against_verl_if_installed():
    """rollout_corr_helper.compute_rollout_correction_and_rejection_mask feeding verl's vanilla loss."""
    helper = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from omegaconf import OmegaConf

    lp, old, ro, adv, mask = _verl_batch()
    m = mask.double()
    vcfg = OmegaConf.create(
        dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0, global_batch_info={})
    )
    for name in ("is_token", "is_sequence", "is_token_normalize", "rs_chain_per_option", "is_and_rs"):
        rc = RC_CASES[name]
        w_proto, new_mask, vmetrics = helper.compute_rollout_correction_and_rejection_mask(
            old,
            ro,
            m,
            rc.rollout_is,
            rc.rollout_is_threshold,
            rc.rollout_is_batch_normalize,
            rc.rollout_rs,
            rc.rollout_rs_threshold,
        )
        w = None if w_proto is None else w_proto.batch["rollout_is_weights"]
        lp_v = lp.clone().requires_grad_()
        try:
            want, _ = core_algos.compute_policy_loss_vanilla(
                old_log_prob=old,
                log_prob=lp_v,
                advantages=adv,
                response_mask=new_mask,
                loss_agg_mode="token-mean",
                config=vcfg,
                rollout_is_weights=w,
            )
        except (AssertionError, TypeError, AttributeError) as exc:
            pytest.skip(f"this verl version wants another config: {exc}")
        (g_v,) = torch.autograd.grad(want, lp_v)
        lp_f = lp.clone().requires_grad_()
        got, metrics = policy_loss(
            lp_f, old, adv, mask, config=PolicyLossConfig(rollout_correction=rc), rollout_logp=ro
        )
        (g_f,) = torch.autograd.grad(got, lp_f)
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(g_f, g_v, atol=1e-8, rtol=1e-6, msg=name)
        for key, value in vmetrics.items():
            if key in metrics:
                assert metrics[key].item() == pytest.approx(float(value), rel=1e-4, abs=1e-5), (name, key)


def test_new_modes_against_verl_if_installed():
    """sapo, geo_mean, dppo_kl, dppo_tv, dro, bypass_mode vs core_algos.get_policy_loss_fn."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    try:
        from verl.workers.config import ActorConfig

        actor = ActorConfig(
            strategy="fsdp",
            ppo_mini_batch_size=4,
            ppo_micro_batch_size_per_gpu=1,
            rollout_n=1,
            clip_ratio=0.2,
            clip_ratio_low=0.2,
            clip_ratio_high=0.28,
            clip_ratio_c=3.0,
        )
    except Exception as exc:  # noqa: BLE001 - the constructor differs between verl versions
        pytest.skip(f"cannot build this verl version's ActorConfig here: {exc}")
    lp, old, _, adv, mask = _verl_batch()
    m = mask.double()
    compared = 0
    for mode, agg in (
        ("sapo", "seq-mean-token-mean"),
        ("geo_mean", "seq-mean-token-mean"),
        ("dppo_kl", "token-mean"),
        ("dppo_tv", "token-mean"),
        ("dro", "token-mean"),
        ("bypass_mode", "token-mean"),
    ):
        try:
            fn = core_algos.get_policy_loss_fn(mode)
        except ValueError:
            continue
        lp_v = lp.clone().requires_grad_()
        try:
            want, vmetrics = fn(
                old_log_prob=old, log_prob=lp_v, advantages=adv, response_mask=m, loss_agg_mode=agg, config=actor
            )
        except (AssertionError, TypeError, AttributeError, KeyError, ValueError):
            continue
        (g_v,) = torch.autograd.grad(want, lp_v)
        ours = PolicyLossConfig(
            loss_mode=mode,
            loss_agg_mode=agg,
            clip_ratio_high=0.28,
            dro_beta=getattr(actor, "dro_beta", None),
            tau_pos=getattr(actor, "tau_pos", 1.0),
            tau_neg=getattr(actor, "tau_neg", 1.05),
            global_num_seqs=mask.shape[0] if mode == "geo_mean" else None,
        )
        lp_f = lp.clone().requires_grad_()
        got, metrics = policy_loss(lp_f, old, adv, mask, config=ours)
        (g_f,) = torch.autograd.grad(got, lp_f)
        torch.testing.assert_close(got, want.detach(), atol=1e-6, rtol=1e-5, msg=mode)
        torch.testing.assert_close(g_f, g_v, atol=1e-8, rtol=1e-5, msg=mode)
        for key, value in (vmetrics or {}).items():
            name = key.split("/", 1)[-1] if key.startswith("actor/") else key
            if name in metrics:
                assert metrics[name].item() == pytest.approx(float(value), rel=1e-4, abs=1e-5), (mode, key)
        compared += 1
    if compared == 0:
        pytest.skip("no new mode of this verl version could be called here")


# --------------------------------------------------------------------------------------------------
# verl's precomputed rollout_is_weights (what verl's trainer hands to its policy losses)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vanilla", "geo_mean", "vespo", "gspo", "kl_cov", "dppo_kl", "sapo"])
def test_precomputed_is_weights(mode):
    """``rollout_is_weights=`` equals the correction computing the same weights itself (and the oracle)."""
    b = Batch(seed=LOSS_MODES.index(mode))
    rc = RolloutCorrection(rollout_is="token", rollout_is_threshold=1.3)
    lr = torch.where(b.mask, b.old - b.ro, 0.0)
    w = torch.where(b.mask, torch.exp(lr.clamp(-20, 20)).clamp(max=1.3), 0.0)
    own = run(policy_loss, b.padded(), config(mode, rollout_correction=rc))
    given_inputs = dict(b.padded(rollout=False), rollout_is_weights=w.masked_fill(~b.mask, float("nan")))
    given = run(policy_loss, given_inputs, config(mode))
    oracle = run(reference_policy_loss, given_inputs, config(mode))
    assert_same(given, oracle)
    torch.testing.assert_close(given[0], own[0], atol=1e-12, rtol=1e-10)
    for x, y in zip(given[2], own[2]):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)
    # with rejection sampling from the correction, the weights from the argument
    rs = RolloutCorrection(rollout_rs="token_k2", rollout_rs_threshold=0.02)
    both = dict(b.padded(), rollout_is_weights=w)
    assert_same(
        run(policy_loss, both, config(mode, rollout_correction=rs)),
        run(reference_policy_loss, both, config(mode, rollout_correction=rs)),
    )
    cfg = config(mode, rollout_correction=rs)
    _check_head(cfg, b, both, head_kind(cfg))


def test_precomputed_is_weights_errors():
    b = Batch(seed=0)
    w = torch.ones_like(b.old)
    with pytest.raises(ValueError, match="bypass_mode"):
        policy_loss(**dict(b.padded(rollout=False), rollout_is_weights=w), config=config("bypass_mode"))
    with pytest.raises(ValueError, match="pass one of them"):
        policy_loss(**dict(b.padded(), rollout_is_weights=w), config=config(rollout_correction=RC_CASES["is_token"]))
    with pytest.raises(ValueError, match="rollout_is_weights must have the shape"):
        policy_loss(**dict(b.padded(rollout=False), rollout_is_weights=w[:, :2]), config=config())
