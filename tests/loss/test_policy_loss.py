"""policy_loss (fusedrl/loss/) against the eager oracle (fusedrl/loss/reference.py) and verl semantics."""

from __future__ import annotations

import math

import pytest
import torch

from fusedrl.loss import (
    KL_LOSS_TYPES,
    LOSS_AGG_MODES,
    LOSS_MODES,
    PolicyLossConfig,
    canonical_kl_type,
    policy_loss,
)
from fusedrl.loss.reference import reference_policy_loss
from fusedrl.loss.rollout import RolloutCorrection
from fusedrl.loss.selection import select_top_k

F64 = torch.float64


# --------------------------------------------------------------------------------------------------
# batch builders
# --------------------------------------------------------------------------------------------------


class Batch:
    """A padded batch with holes, an empty row, and garbage (NaN / inf) at every masked position."""

    def __init__(self, B=5, T=11, seed=0, dtype=F64, log_ratio_scale=0.3, per_seq_adv=False, empty_row=True):
        g = torch.Generator().manual_seed(seed)
        self.B, self.T = B, T
        # response lengths (one empty row), plus random holes inside the responses
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        if empty_row:
            lengths[1] = 0
        pos = torch.arange(T).expand(B, T)
        mask = (pos < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.15)
        self.lengths = lengths
        self.mask = mask
        logp = -torch.rand(B, T, generator=g, dtype=F64) * 4
        old = logp + log_ratio_scale * torch.randn(B, T, generator=g, dtype=F64)
        if per_seq_adv:
            adv = torch.randn(B, generator=g, dtype=F64) * 2
        else:
            adv = torch.randn(B, T, generator=g, dtype=F64) * 2
        ent = torch.rand(B, T, generator=g, dtype=F64) * 3
        ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
        bad = ~mask
        # padding garbage that must never leak
        logp = logp.masked_fill(bad, float("nan"))
        old = old.masked_fill(bad, float("-inf"))
        ent = ent.masked_fill(bad, float("inf"))
        ref = ref.masked_fill(bad, float("nan"))
        if not per_seq_adv:
            adv = adv.masked_fill(bad, float("nan"))
        self.logp = logp.to(dtype).requires_grad_()
        self.old = old.to(dtype)
        self.adv = adv.to(dtype)
        self.ent = ent.to(dtype).requires_grad_()
        self.ref = ref.to(dtype)

    def padded(self):
        return dict(
            logp=self.logp, old_logp=self.old, advantages=self.adv, mask=self.mask, entropy=self.ent, ref_logp=self.ref
        )

    def packed(self, tail=0):
        """Concatenate row i[:len_i] (len_i >= last valid position) into [N] + cu_seqlens; `tail`
        extra garbage tokens (mask 1) after cu_seqlens[-1] must be ignored."""
        lens = [int(self.lengths[i]) for i in range(self.B)]
        idx = torch.cat([torch.arange(i * self.T, i * self.T + n) for i, n in enumerate(lens)])
        self.packed_index = idx
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)

        def pk(x, fill=0.0):
            v = x.reshape(-1)[idx]
            if tail:
                v = torch.cat([v, torch.full((tail,), fill, dtype=v.dtype)])
            return v

        lp = pk(self.logp.detach(), 1.0).requires_grad_()
        ent = pk(self.ent.detach(), 1.0).requires_grad_()
        adv = self.adv if self.adv.dim() == 1 else pk(self.adv, 5.0)
        mask = pk(self.mask, True)
        return dict(
            logp=lp,
            old_logp=pk(self.old, -3.0),
            advantages=adv,
            mask=mask,
            entropy=ent,
            ref_logp=pk(self.ref, 0.5),
            cu_seqlens=cu,
        )


def cfg_for(mode, agg, **kw):
    base = dict(
        loss_mode=mode,
        loss_agg_mode=agg,
        entropy_coeff=0.01,
        kl_loss_coef=0.05,
        clip_cov_ratio=0.1,
        clip_cov_lb=0.2,
        kl_cov_ratio=0.1,
        generator=torch.Generator().manual_seed(123),
    )
    base.update(kw)
    return PolicyLossConfig(**base)


def run(fn, inputs, cfg, **kw):
    """loss, metrics and grads w.r.t. logp and entropy (generator re-seeded for each run)."""
    if cfg.generator is not None:
        cfg = cfg.replace(generator=torch.Generator().manual_seed(cfg.generator.initial_seed()))
    loss, metrics = fn(**inputs, config=cfg, **kw)
    wrt = [inputs["logp"], inputs["entropy"]]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    return loss, metrics, grads


def assert_same(a, b, atol=1e-10, rtol=1e-9):
    la, ma, ga = a
    lb, mb, gb = b
    torch.testing.assert_close(la.detach().double(), lb.detach().double(), atol=atol, rtol=rtol)
    assert set(ma) == set(mb), (sorted(ma), sorted(mb))
    for k in ma:
        torch.testing.assert_close(ma[k].double(), mb[k].double(), atol=max(atol, 1e-6), rtol=1e-5, msg=k)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.double(), y.double(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------------
# parity with the oracle: every mode x aggregation x layout x advantage shape
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_seq_adv", [False, True], ids=["tok_adv", "seq_adv"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_parity_with_reference(mode, agg, layout, per_seq_adv):
    b = Batch(seed=10 * LOSS_MODES.index(mode) + LOSS_AGG_MODES.index(agg), per_seq_adv=per_seq_adv)
    inputs = b.padded() if layout == "padded" else b.packed(tail=3)
    cfg = cfg_for(mode, agg)
    got = run(policy_loss, inputs, cfg)
    want = run(reference_policy_loss, inputs, cfg)
    assert_same(got, want)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[2])
    if mode in ("clip_cov", "kl_cov"):
        assert got[1]["cov_selected_frac"] > 0  # the selection actually did something


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_parity_fp32_and_bf16_inputs(mode):
    for dtype, atol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-5)):
        b = Batch(seed=7, dtype=dtype)
        cfg = cfg_for(mode, "token-mean", clip_cov_ratio=1.0)  # deterministic pick: all candidates
        loss, metrics, grads = run(policy_loss, b.padded(), cfg)
        assert loss.dtype == torch.float32 and grads[0].dtype == dtype
        ref = run(reference_policy_loss, b.padded(), cfg)
        if mode not in ("clip_cov", "kl_cov"):  # selection may legitimately flip at fp32 near-ties
            torch.testing.assert_close(loss.double(), ref[0].detach(), atol=atol, rtol=1e-5)
            torch.testing.assert_close(grads[0].double(), ref[2][0].double(), atol=atol, rtol=1e-2)
        assert torch.isfinite(loss) and torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("kl_type", KL_LOSS_TYPES)
def test_kl_types(kl_type):
    b = Batch(seed=3)
    cfg = cfg_for("vanilla", "seq-mean-token-mean", kl_loss_type=kl_type, kl_loss_coef=0.3)
    assert_same(run(policy_loss, b.padded(), cfg), run(reference_policy_loss, b.padded(), cfg))


def test_kl_aliases_and_k3_clamp():
    assert canonical_kl_type("kl") == canonical_kl_type("k1") == "k1"
    assert canonical_kl_type("mse") == "k2" and canonical_kl_type("low_var_kl") == "k3"
    assert canonical_kl_type("low_var_kl+") == "k3+"
    logp = torch.tensor([[-25.0, -1.0, -1.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -30.0]], dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    zero = torch.zeros(1, 3, dtype=F64)
    for name, expect in (
        ("k3", [10.0, 0.0, 29 - 1 + math.exp(-29)]),
        ("k1", [-24.0, 0.0, 29.0]),
        ("abs", [24.0, 0.0, 29.0]),
        ("k2", [288.0, 0.0, 420.5]),
    ):
        cfg = PolicyLossConfig(loss_mode="gpg", kl_loss_type=name, kl_loss_coef=1.0)
        _, m = policy_loss(logp, logp.detach(), zero, mask, ref_logp=ref, config=cfg)
        # k3: x = ref - logp = 24 -> exp(24) - 25 clamps to 10; x = -29 -> e^-29 + 28 clamps to 10
        expect_k = [min(max(v, -10), 10) for v in expect] if name == "k3" else expect
        assert m["kl"].item() == pytest.approx(sum(expect_k) / 3, rel=1e-6), name
    # straight-through variants: value of the estimator, gradient of k2
    logp2 = torch.tensor([[-1.5, -0.2]], dtype=F64, requires_grad=True)
    ref2 = torch.tensor([[-1.0, -1.0]], dtype=F64)
    m2 = torch.ones(1, 2, dtype=torch.bool)
    z2 = torch.zeros(1, 2, dtype=F64)
    loss_p, _ = policy_loss(
        logp2,
        logp2.detach(),
        z2,
        m2,
        ref_logp=ref2,
        config=PolicyLossConfig(loss_mode="gpg", kl_loss_type="k3+", kl_loss_coef=1.0),
    )
    loss_3, _ = policy_loss(
        logp2,
        logp2.detach(),
        z2,
        m2,
        ref_logp=ref2,
        config=PolicyLossConfig(loss_mode="gpg", kl_loss_type="k3", kl_loss_coef=1.0),
    )
    torch.testing.assert_close(loss_p, loss_3)
    (g,) = torch.autograd.grad(loss_p, logp2)
    torch.testing.assert_close(g, (logp2 - ref2).detach() / 2)


def test_dual_clip_disabled_and_clip_higher():
    b = Batch(seed=11, log_ratio_scale=0.8)
    for c in (None, 1.5, 10.0):
        cfg = cfg_for("vanilla", "token-mean", clip_ratio_c=c, clip_ratio_low=0.2, clip_ratio_high=0.28)
        assert_same(run(policy_loss, b.padded(), cfg), run(reference_policy_loss, b.padded(), cfg))
    _, m, _ = run(policy_loss, b.padded(), cfg_for("vanilla", "token-mean", clip_ratio_c=None))
    assert m["pg_clipfrac_lower"] == 0
    _, m, _ = run(policy_loss, b.padded(), cfg_for("vanilla", "token-mean", clip_ratio_c=1.5))
    assert m["pg_clipfrac_lower"] > 0 and m["pg_clipfrac"] > 0


def test_vanilla_hand_computed():
    """One token per case, checked against the PPO formulas written out by hand."""
    lo, hi, c = 0.2, 0.28, 3.0
    cfg = PolicyLossConfig(clip_ratio_low=lo, clip_ratio_high=hi, clip_ratio_c=c)
    cases = [  # (log ratio, advantage, expected loss, expected d loss / d logp)
        (math.log(1.1), 1.0, -1.1, -1.1),  # inside the trust region
        (math.log(1.5), 1.0, -(1 + hi), 0.0),  # clipped above (A > 0)
        (math.log(0.5), 1.0, -0.5, -0.5),  # A > 0, ratio low: unclipped branch is the max
        (math.log(0.5), -1.0, 1 - lo, 0.0),  # clipped below (A < 0)
        (math.log(5.0), -1.0, c * 1.0, 0.0),  # dual clip: min(5, 3) = 3
        (math.log(2.0), -1.0, 2.0, 2.0),  # A < 0, below the dual-clip bound
    ]
    for d, a, want, want_g in cases:
        logp = torch.tensor([[-1.0]], dtype=F64, requires_grad=True)
        old = logp.detach() - d
        loss, _ = policy_loss(logp, old, torch.tensor([[a]], dtype=F64), torch.ones(1, 1), config=cfg)
        (g,) = torch.autograd.grad(loss, logp)
        assert loss.item() == pytest.approx(want, rel=1e-9), (d, a)
        assert g.item() == pytest.approx(want_g, rel=1e-9, abs=1e-12), (d, a)


# --------------------------------------------------------------------------------------------------
# layouts and advantage shapes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_padded_equals_packed(mode, agg):
    b = Batch(seed=5)
    cfg = cfg_for(mode, agg, clip_cov_ratio=1.0, norm_len=b.T)  # every Clip-Cov candidate is picked
    pad = b.padded()
    pk = b.packed(tail=2)
    lp, mp, (gp, gep) = run(policy_loss, pad, cfg)
    lq, mq, (gq, geq) = run(policy_loss, pk, cfg)
    torch.testing.assert_close(lp, lq, atol=1e-12, rtol=1e-12)
    for k in mp:
        torch.testing.assert_close(mp[k], mq[k], atol=1e-6, rtol=1e-6, msg=k)
    n = len(b.packed_index)
    torch.testing.assert_close(gp.reshape(-1)[b.packed_index], gq[:n], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gep.reshape(-1)[b.packed_index], geq[:n], atol=1e-12, rtol=1e-12)
    assert (gq[n:] == 0).all() and (geq[n:] == 0).all()


def test_seq_mean_token_sum_norm_and_default_norm_len():
    """Dr.GRPO: sum of sequence sums / n_seq / norm_len; norm_len is T (padded) or the longest
    sequence (packed) by default."""
    b = Batch(seed=2)
    cfg = PolicyLossConfig(loss_mode="gpg", loss_agg_mode="seq-mean-token-sum-norm")
    valid = b.mask
    total = (-b.adv * b.logp).detach()[valid].sum().item()
    n_seq = int((valid.sum(1) > 0).sum())
    lp, _ = policy_loss(**b.padded(), config=cfg)
    assert lp.item() == pytest.approx(total / n_seq / b.T)
    lq, _ = policy_loss(**b.packed(), config=cfg)
    assert lq.item() == pytest.approx(total / n_seq / int(b.lengths.max()))
    lr, _ = policy_loss(**b.packed(), config=cfg.replace(norm_len=4096, global_num_seqs=64))
    assert lr.item() == pytest.approx(total / 64 / 4096)
    # == seq-mean-token-sum / norm_len
    ls, _ = policy_loss(**b.padded(), config=cfg.replace(loss_agg_mode="seq-mean-token-sum"))
    assert lp.item() == pytest.approx(ls.item() / b.T)


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_per_sequence_advantages(mode):
    b = Batch(seed=9, per_seq_adv=True)
    cfg = cfg_for(mode, "seq-mean-token-mean", clip_cov_ratio=1.0)
    per_seq = run(policy_loss, b.padded(), cfg)
    expanded = dict(b.padded(), advantages=b.adv[:, None].expand(b.B, b.T).contiguous())
    assert_same(per_seq, run(policy_loss, expanded, cfg), atol=1e-13)
    pk = b.packed()
    per_tok_packed = dict(pk, advantages=b.adv.repeat_interleave(b.lengths))
    assert_same(run(policy_loss, pk, cfg), run(policy_loss, per_tok_packed, cfg), atol=1e-13)


def test_one_dim_without_cu_seqlens_is_one_sequence():
    b = Batch(B=1, T=13, seed=4, empty_row=False)
    cfg = cfg_for("gspo", "seq-mean-token-mean")
    one = {k: (v.detach()[0].requires_grad_() if k in ("logp", "entropy") else v[0]) for k, v in b.padded().items()}
    assert_same(
        run(policy_loss, b.padded(), cfg),
        [*run(policy_loss, one, cfg)[:2], [g[None] for g in run(policy_loss, one, cfg)[2]]],
    )


def test_mask_dtypes():
    b = Batch(seed=6)
    cfg = cfg_for("vanilla", "token-mean")
    base = run(policy_loss, b.padded(), cfg)
    for dt in (torch.float32, torch.int64, torch.uint8):
        assert_same(base, run(policy_loss, dict(b.padded(), mask=b.mask.to(dt)), cfg), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# edge cases: empty rows, empty batch, single token, huge log ratios
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", ["seq-mean-token-sum", "seq-mean-token-mean"])
def test_empty_sequences_drop_out_of_seq_mean(agg):
    b = Batch(seed=12, empty_row=False)
    cfg = cfg_for("vanilla", agg)
    base, _, _ = run(policy_loss, b.padded(), cfg)
    more = {
        k: torch.cat([v.detach(), torch.full_like(v[:2], float("nan"))]) for k, v in b.padded().items() if k != "mask"
    }
    more["mask"] = torch.cat([b.mask, torch.zeros_like(b.mask[:2])])
    more["logp"].requires_grad_()
    more["entropy"].requires_grad_()
    with_empty, _, grads = run(policy_loss, more, cfg)
    torch.testing.assert_close(base, with_empty)
    assert (grads[0][-2:] == 0).all() and torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_all_masked_batch(mode, agg, layout):
    b = Batch(seed=1)
    b.mask = torch.zeros_like(b.mask)
    inputs = b.padded() if layout == "padded" else b.packed()
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    cfg = cfg_for(mode, agg)
    loss, metrics, grads = run(policy_loss, inputs, cfg)
    assert loss.item() == 0.0 and loss.dim() == 0
    for g in grads:
        assert (g == 0).all()
    for k, v in metrics.items():
        assert v.item() == 0.0, k
    ref_loss, ref_metrics = reference_policy_loss(**inputs, config=cfg.replace(generator=None))
    assert ref_loss.item() == 0.0


def test_all_masked_loss_is_attached_to_graph():
    logp = torch.full((2, 3), float("nan"), requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.requires_grad
    loss.backward()
    assert (logp.grad == 0).all()


def test_empty_tensors():
    for mode in LOSS_MODES:
        for agg in LOSS_AGG_MODES:
            logp = torch.zeros(0, requires_grad=True)
            cfg = cfg_for(mode, agg)
            loss, m = policy_loss(
                logp,
                torch.zeros(0),
                torch.zeros(0),
                torch.zeros(0, dtype=torch.bool),
                torch.zeros(0),
                torch.zeros(0),
                cu_seqlens=torch.zeros(1, dtype=torch.int64),
                config=cfg,
            )
            loss.backward()
            assert loss.item() == 0.0 and all(v.item() == 0.0 for v in m.values())
            loss2, _ = policy_loss(
                torch.zeros(0, 4, requires_grad=True),
                torch.zeros(0, 4),
                torch.zeros(0),
                torch.zeros(0, 4),
                config=cfg.replace(entropy_coeff=0, kl_loss_coef=0),
            )
            assert loss2.item() == 0.0


@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_single_valid_token(mode, agg):
    b = Batch(seed=21)
    i, j = b.mask.nonzero()[-1].tolist()  # a position holding real (non-garbage) values
    b.mask = torch.zeros_like(b.mask)
    b.mask[i, j] = True
    cfg = cfg_for(mode, agg)
    got = run(policy_loss, b.padded(), cfg)
    assert_same(got, run(reference_policy_loss, b.padded(), cfg))
    nz = got[2][0] != 0
    assert nz.sum() <= 1 and (not nz.any() or bool(nz[i, j]))
    assert torch.isfinite(got[0])


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_huge_log_ratio(mode):
    """|logp - old| = 30: ratios are clamped at exp(+-20); everything stays finite."""
    b = Batch(seed=8)
    sign = torch.where(torch.rand(b.B, b.T) > 0.5, 1.0, -1.0).to(F64)
    old = torch.where(b.mask, b.logp.detach() - 30 * sign, b.old)
    inputs = dict(b.padded(), old_logp=old)
    cfg = cfg_for(mode, "token-mean", clip_cov_lb=-1e9, clip_cov_ub=1e9)
    got = run(policy_loss, inputs, cfg)
    assert torch.isfinite(got[0]) and all(torch.isfinite(g).all() for g in got[2])
    assert all(torch.isfinite(v) for v in got[1].values())
    assert_same(got, run(reference_policy_loss, inputs, cfg), rtol=1e-9, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# covariance modes: which tokens get selected
# --------------------------------------------------------------------------------------------------


def _cov(adv, logp, mask):
    a, lp = adv[mask], logp[mask]
    cov = torch.zeros_like(adv)
    cov[mask] = (a - a.mean()) * (lp - lp.mean())
    return cov


def _clip_cov_case(seed=0, B=6, T=40):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.2
    logp = (-torch.rand(B, T, generator=g, dtype=F64) * 5).requires_grad_()
    adv = torch.randn(B, T, generator=g, dtype=F64) * 2
    # half the tokens far off-policy (some get PPO-clipped), half exactly on-policy
    shift = torch.where(torch.rand(B, T, generator=g) > 0.5, 0.0, 1.0).to(F64) * torch.randn(
        B, T, generator=g, dtype=F64
    )
    old = logp.detach() - shift
    return logp, old, adv, mask


def _clip_cov_picks(logp, old, adv, mask, cfg):
    loss, m = policy_loss(logp, old, adv, mask, config=cfg)
    (g,) = torch.autograd.grad(loss, logp)
    r = torch.exp(logp.detach() - old)
    l1, l2 = -adv * r, -adv * r.clamp(1 - cfg.clip_ratio_low, 1 + cfg.clip_ratio_high)
    clipped = l2 > l1
    picked = mask & ~clipped & (g == 0)  # an unclipped valid token has zero gradient only if detached
    return picked, clipped, m


def test_clip_cov_picks_exactly_k_from_candidates():
    logp, old, adv, mask = _clip_cov_case()
    cov = _cov(adv, logp.detach(), mask)
    n_valid = int(mask.sum())
    for ratio in (2e-4, 0.01, 0.03):
        cfg = PolicyLossConfig(loss_mode="clip_cov", clip_cov_ratio=ratio, generator=torch.Generator().manual_seed(5))
        picked, clipped, m = _clip_cov_picks(logp, old, adv, mask, cfg)
        candidates = mask & ~clipped & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
        k = max(1, int(ratio * n_valid))
        assert int(candidates.sum()) > k  # enough candidates in this case
        assert int(picked.sum()) == k
        assert not (picked & ~candidates).any()
        # metric counts every detached token: equal to k means no clipped / masked token was picked
        assert round(m["cov_selected_frac"].item() * n_valid) == k
        assert m["pg_clipfrac"].item() == pytest.approx(k / n_valid)  # verl reports the detached fraction


def test_clip_cov_fewer_candidates_than_k_takes_all():
    logp, old, adv, mask = _clip_cov_case(seed=3)
    cov = _cov(adv, logp.detach(), mask)
    cfg = PolicyLossConfig(loss_mode="clip_cov", clip_cov_ratio=0.9, generator=torch.Generator().manual_seed(0))
    picked, clipped, _ = _clip_cov_picks(logp, old, adv, mask, cfg)
    candidates = mask & ~clipped & (cov > 1) & (cov < 5)
    assert torch.equal(picked, candidates)


def test_clip_cov_same_seed_same_picks_and_uniform():
    logp, old, adv, mask = _clip_cov_case(seed=4)

    def picks(seed):
        cfg = PolicyLossConfig(loss_mode="clip_cov", clip_cov_ratio=0.01, generator=torch.Generator().manual_seed(seed))
        return _clip_cov_picks(logp, old, adv, mask, cfg)[0]

    assert torch.equal(picks(17), picks(17))
    assert not all(torch.equal(picks(17), picks(s)) for s in range(18, 22))
    # uniform among candidates: every candidate is picked sometimes, none far too often
    counts = torch.zeros_like(mask, dtype=torch.long)
    n = 150
    for s in range(n):
        counts += picks(s).long()
    cov = _cov(adv, logp.detach(), mask)
    r = torch.exp(logp.detach() - old)
    clipped = (-adv * r.clamp(0.8, 1.2)) > (-adv * r)
    cand = mask & ~clipped & (cov > 1) & (cov < 5)
    k = max(1, int(0.01 * int(mask.sum())))
    expect = n * k / int(cand.sum())
    assert (counts[~cand] == 0).all()
    assert counts[cand].min() >= 1 and counts[cand].max() <= 4 * expect


def _kl_cov_picks(logp, old, adv, mask, ratio):
    def grad(coef):
        cfg = PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=coef)
        loss, m = policy_loss(logp, old, adv, mask, config=cfg)
        return torch.autograd.grad(loss, logp)[0], m

    g1, m = grad(1.0)
    g0, _ = grad(0.0)
    return (g1 - g0).abs() > 0, m


def test_kl_cov_exact_top_k():
    g = torch.Generator().manual_seed(0)
    B, T = 8, 64
    mask = torch.rand(B, T, generator=g) > 0.3
    logp = (-torch.rand(B, T, generator=g, dtype=F64) * 5).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64)
    n_valid = int(mask.sum())
    for ratio in (2e-4, 2e-3, 0.02, 0.1):
        picked, m = _kl_cov_picks(logp, old, adv, mask, ratio)
        k = max(1, int(ratio * n_valid))
        cov = _cov(adv, logp.detach(), mask).masked_fill(~mask, -math.inf)
        want = torch.zeros(B * T, dtype=torch.bool)
        want[torch.topk(cov.reshape(-1), k).indices] = True
        assert torch.equal(picked.reshape(-1), want), ratio
        assert round(m["cov_selected_frac"].item() * n_valid) == k
        assert m["pg_clipfrac"] == 0


def test_kl_cov_ties_broken_by_lower_index():
    # 12 valid tokens; tokens 2, 5, 7, 9 share the largest covariance exactly
    adv = torch.tensor([[0.0, 0.1, 3.0, -0.2, 0.3, 3.0, 0.0, 3.0, 0.1, 3.0, -0.1, -0.3]], dtype=F64)
    logp = torch.tensor(
        [[-2.0, -2.1, -0.5, -2.2, -1.9, -0.5, -2.0, -0.5, -2.0, -0.5, -2.1, -1.8]], dtype=F64, requires_grad=True
    )
    old = logp.detach() - 0.05
    mask = torch.ones_like(adv, dtype=torch.bool)
    for ratio, want in ((0.1, [2]), (0.2, [2, 5]), (0.25, [2, 5, 7])):
        picked, _ = _kl_cov_picks(logp, old, adv, mask, ratio)
        assert picked.nonzero()[:, 1].tolist() == want, ratio
    # the same rule in the selection primitive, with ties straddling the k-th value
    key = torch.tensor([1.0, 5.0, 3.0, 5.0, 3.0, 3.0, 0.0])
    elig = torch.tensor([True, True, True, True, True, False, True])
    for k, want in ((1, [1]), (2, [1, 3]), (3, [1, 2, 3]), (4, [1, 2, 3, 4]), (5, [0, 1, 2, 3, 4])):
        sel = select_top_k(key, elig, torch.tensor(k), k_max=6)
        assert sel.nonzero()[:, 0].tolist() == want, k
    sel = select_top_k(key, torch.zeros(7, dtype=torch.bool), torch.tensor(3), k_max=3)
    assert not sel.any()


def test_clip_cov_ties_in_covariance():
    """Identical (A, logp) tokens have identical covariance: all are candidates and exactly k are picked."""
    adv = torch.tensor([[2.0] * 10 + [-1.0] * 10], dtype=F64)
    logp = torch.tensor([[-0.1] * 10 + [-3.0] * 10], dtype=F64, requires_grad=True)
    old = logp.detach()
    mask = torch.ones_like(adv, dtype=torch.bool)
    cov = _cov(adv, logp.detach(), mask)
    assert torch.unique(cov).numel() == 1 and 1 < cov[0, 0] < 5
    cfg = PolicyLossConfig(loss_mode="clip_cov", clip_cov_ratio=0.15, generator=torch.Generator().manual_seed(0))
    picked, _, _ = _clip_cov_picks(logp, old, adv, mask, cfg)
    assert int(picked.sum()) == 3


# --------------------------------------------------------------------------------------------------
# global normalisers: gradient accumulation == one big batch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("mode", ["vanilla", "gspo", "gpg", "cispo"])
def test_grad_accumulation_matches_big_batch(mode, agg, as_tensor):
    b = Batch(B=6, seed=13)
    cfg = cfg_for(mode, agg, norm_len=b.T)
    full, _, full_g = run(policy_loss, b.padded(), cfg)
    n_tok = int(b.mask.sum())
    n_seq = int((b.mask.sum(1) > 0).sum())
    conv = (lambda v: torch.tensor(v)) if as_tensor else (lambda v: v)
    total = 0.0
    grads = [torch.zeros_like(b.logp), torch.zeros_like(b.ent)]
    for rows in (slice(0, 2), slice(2, 6)):
        part = {k: v.detach()[rows] for k, v in b.padded().items()}
        part["logp"].requires_grad_()
        part["entropy"].requires_grad_()
        loss, _, g = run(policy_loss, part, cfg, global_num_tokens=conv(n_tok), global_num_seqs=conv(n_seq))
        total = total + loss
        grads[0][rows] += g[0]
        grads[1][rows] += g[1]
    torch.testing.assert_close(total, full, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads[0], full_g[0], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grads[1], full_g[1], atol=1e-12, rtol=1e-12)


def test_normalisers_in_config_and_call_agree():
    b = Batch(seed=14)
    cfg = cfg_for("vanilla", "token-mean")
    a = run(policy_loss, b.padded(), cfg.replace(global_num_tokens=100))
    c = run(policy_loss, b.padded(), cfg, global_num_tokens=torch.tensor(100.0))
    assert_same(a, c, atol=1e-14)
    assert_same(a, run(reference_policy_loss, b.padded(), cfg.replace(global_num_tokens=100)))


# --------------------------------------------------------------------------------------------------
# metrics, config validation, errors, no host sync
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_metrics_contract(mode):
    b = Batch(seed=15)
    cfg = cfg_for(mode, "token-mean", kl_loss_coef=0.0)
    inputs = b.padded()
    _, m = policy_loss(**inputs, config=cfg)
    keys = {"pg_loss", "pg_clipfrac", "pg_clipfrac_lower", "ppo_kl", "entropy", "kl"}
    if mode in ("clip_cov", "kl_cov"):
        keys.add("cov_selected_frac")
    if mode == "bypass_mode":  # verl's rollout_corr/ metrics (default RolloutCorrection: off-policy diagnostics)
        keys |= set(RolloutCorrection().metric_names())
    assert set(m) == keys
    for k, v in m.items():
        assert v.dtype == torch.float32 and v.dim() == 0 and not v.requires_grad, k
    _, m2 = policy_loss(
        inputs["logp"], inputs["old_logp"], inputs["advantages"], inputs["mask"], config=cfg.replace(entropy_coeff=0.0)
    )
    assert "entropy" not in m2 and "kl" not in m2
    valid = b.mask
    assert m["entropy"].item() == pytest.approx(b.ent.detach()[valid].mean().item(), rel=1e-6)


BAD_CONFIGS = [
    ("loss_mode", "ppo"),
    ("loss_agg_mode", "seq-sum"),
    ("kl_loss_type", "k4"),
    ("kl_loss_type", "k2+"),
    ("clip_ratio_c", 1.0),
    ("clip_ratio_c", 0.5),
    ("clip_ratio_low", -0.1),
    ("clip_ratio_high", -1.0),
    ("entropy_coeff", -0.01),
    ("kl_loss_coef", -1.0),
    ("clip_cov_ratio", -2e-4),
    ("kl_cov_ratio", -1.0),
    ("ppo_kl_coef", -1.0),
    ("clip_ratio_low", float("nan")),
    ("global_num_tokens", 0),
    ("global_num_seqs", -3),
    ("norm_len", 0.0),
    ("clip_cov_lb", 6.0),
    ("generator", 3),
]


@pytest.mark.parametrize("field,value", BAD_CONFIGS)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**{field: value})


def test_config_accepts_aliases_and_none():
    for t in ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "low_var_kl+", "k1+"):
        PolicyLossConfig(kl_loss_type=t)
    PolicyLossConfig(clip_ratio_c=None, clip_ratio_low=1.0, global_num_tokens=torch.tensor(5))
    with pytest.raises(ValueError, match="clip_ratio_high"):
        PolicyLossConfig().replace(clip_ratio_high=-1)


def test_input_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(x, x, x, x, config=PolicyLossConfig(entropy_coeff=0.1))
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, x, x, config=PolicyLossConfig(kl_loss_coef=0.1))
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(x, torch.zeros(3, 2), x, x)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match="cu_seqlens"):
        policy_loss(torch.zeros(5), torch.zeros(5), torch.zeros(5), torch.ones(5), cu_seqlens=torch.tensor([0, 3, 2]))
    with pytest.raises(ValueError, match="packed advantages"):
        policy_loss(torch.zeros(5), torch.zeros(5), torch.zeros(4), torch.ones(5), cu_seqlens=torch.tensor([0, 3, 5]))


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_no_host_sync_meta(mode):
    """On the meta device any .item() / bool(tensor) / .tolist() raises: the head never syncs."""
    for agg in LOSS_AGG_MODES:
        for packed in (False, True):
            shape = (23,) if packed else (4, 6)
            lp = torch.randn(shape, device="meta", requires_grad=True)
            ent = torch.randn(shape, device="meta", requires_grad=True)
            cu = torch.tensor([0, 5, 12, 20], device="meta", dtype=torch.int32) if packed else None
            adv = torch.randn(3 if packed else 4, device="meta")
            cfg = PolicyLossConfig(
                loss_mode=mode,
                loss_agg_mode=agg,
                entropy_coeff=0.1,
                kl_loss_coef=0.1,
                global_num_tokens=torch.tensor(7.0, device="meta") if agg == "token-mean" else None,
            )
            loss, metrics = policy_loss(
                lp,
                torch.randn(shape, device="meta"),
                adv,
                torch.ones(shape, device="meta", dtype=torch.bool),
                ent,
                torch.randn(shape, device="meta"),
                cu_seqlens=cu,
                config=cfg,
            )
            loss.backward()
            assert lp.grad is not None and loss.shape == ()


def test_torch_compile_fullgraph():
    """No graph breaks: the head traces as one graph (packed KL-Cov: segments, top-k threshold;
    aot_eager keeps the test fast)."""
    b = Batch(seed=16, dtype=torch.float32)
    cfg = cfg_for("kl_cov", "seq-mean-token-mean", generator=None)
    inputs = b.packed(tail=1)
    fn = torch.compile(lambda kw: policy_loss(**kw, config=cfg), backend="aot_eager", fullgraph=True)
    got = fn(inputs)[0]
    want = policy_loss(**inputs, config=cfg)[0]
    torch.testing.assert_close(got, want)
    g1 = torch.autograd.grad(got, inputs["logp"])[0]
    g2 = torch.autograd.grad(want, inputs["logp"])[0]
    torch.testing.assert_close(g1, g2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_no_host_sync_cuda(mode):
    b = Batch(seed=0, dtype=torch.float32)
    inputs = {k: (v.detach().cuda().requires_grad_(k in ("logp", "entropy"))) for k, v in b.packed().items()}
    cfg = cfg_for(mode, "seq-mean-token-mean", generator=torch.Generator(device="cuda").manual_seed(0))
    policy_loss(**inputs, config=cfg)  # warm-up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, m = policy_loss(**inputs, config=cfg.replace(generator=torch.Generator(device="cuda").manual_seed(0)))
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = run(policy_loss, b.packed(), cfg.replace(generator=None, clip_cov_ratio=1.0))
    gpu = run(policy_loss, inputs, cfg.replace(generator=None, clip_cov_ratio=1.0))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# verl itself, when installed
# --------------------------------------------------------------------------------------------------


def _verl_configs(ratio):
    """verl configs: an OmegaConf dict (vanilla, gpg, clip_cov, kl_cov) and, when this verl version
    can build one here, an ActorConfig (gspo and cispo insist on it)."""
    from omegaconf import OmegaConf

    clip = dict(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    dict_cfg = OmegaConf.create(
        dict(
            clip,
            clip_ratio_c=3.0,
            global_batch_info={},
            policy_loss=dict(
                kl_cov_ratio=ratio, clip_cov_ratio=ratio, ppo_kl_coef=1.0, clip_cov_lb=1.0, clip_cov_ub=5.0
            ),
        )
    )
    try:
        from verl.workers.config import ActorConfig

        actor_cfg = ActorConfig(
            strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=1, rollout_n=1, **clip
        )
    except Exception:  # older / newer verl: constructor differs
        actor_cfg = None
    return dict_cfg, actor_cfg


def test_against_verl_if_installed():
    """Loss values, gradients and metrics against verl's own core_algos (when verl is importable)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

    g = torch.Generator().manual_seed(30)
    B, T = 6, 50
    lengths = torch.randint(5, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    lp = -torch.rand(B, T, generator=g) * 4
    old = lp + 0.5 * torch.randn(B, T, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, generator=g)
    adv = (torch.randn(B, 1, generator=g) * 2).expand(B, T).contiguous()
    m = mask.float()

    for agg in LOSS_AGG_MODES:  # agg_loss through gpg on a unit advantage: per-token loss = -logp
        want = core_algos.agg_loss(loss_mat=-lp, loss_mask=m, loss_agg_mode=agg)
        got, _ = policy_loss(
            lp, old, torch.ones_like(adv), mask, config=PolicyLossConfig(loss_mode="gpg", loss_agg_mode=agg)
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for kl_type in ("kl", "abs", "mse", "low_var_kl"):
        want = core_algos.kl_penalty(lp, ref, kl_type)
        _, metrics = policy_loss(lp, old, adv, mask, ref_logp=ref, config=PolicyLossConfig(kl_loss_type=kl_type))
        torch.testing.assert_close(metrics["kl"], (want * m).sum() / m.sum(), atol=1e-5, rtol=1e-5)

    compared = 0
    # clip_cov with ratio 1 picks every candidate, so verl's randperm does not matter
    for mode, ratio in (
        ("vanilla", 0.05),
        ("gspo", 0.05),
        ("cispo", 0.05),
        ("gpg", 0.05),
        ("kl_cov", 0.05),
        ("kl_cov", 2e-4),
        ("clip_cov", 1.0),
    ):
        dict_cfg, actor_cfg = _verl_configs(ratio)
        cfg = actor_cfg if mode in ("gspo", "cispo") else dict_cfg
        if cfg is None:
            continue
        for agg in LOSS_AGG_MODES:
            lp_v = lp.clone().requires_grad_()
            fn = getattr(core_algos, f"compute_policy_loss_{mode}")
            try:
                out = fn(
                    old_log_prob=old, log_prob=lp_v, advantages=adv, response_mask=m, loss_agg_mode=agg, config=cfg
                )
            except (AssertionError, TypeError, AttributeError):  # this verl version wants another config
                continue
            (g_v,) = torch.autograd.grad(out[0], lp_v)
            lp_f = lp.clone().requires_grad_()
            ours = PolicyLossConfig(
                loss_mode=mode, loss_agg_mode=agg, clip_ratio_high=0.28, kl_cov_ratio=ratio, clip_cov_ratio=ratio
            )
            got, metrics = policy_loss(lp_f, old, adv, mask, config=ours)
            (g_f,) = torch.autograd.grad(got, lp_f)
            msg = f"{mode} {agg}"
            torch.testing.assert_close(got, out[0].detach(), atol=1e-5, rtol=1e-5, msg=msg)
            torch.testing.assert_close(g_f, g_v, atol=1e-6, rtol=1e-5, msg=msg)
            if isinstance(out[1], dict):  # verl >= 0.5 returns a metrics dict
                for key, value in out[1].items():
                    name = key.split("/")[-1]
                    assert metrics[name].item() == pytest.approx(float(value), abs=1e-5), (msg, name)
            compared += 1
    assert compared >= 4 * 4
