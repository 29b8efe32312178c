"""The entropy-control methods of policy_loss against plainly written transcriptions of the authors' code
(tests/_entropy_transcriptions.py), in float64: STEER (both weightings, old / current entropy, the exact
form), BAPO (the bound search of the sequential loop), RL-PLUS, SSPO's segment ratio (and its reductions to
the sequence and token levels), EPO's entropy corridor. Values, gradients w.r.t. logp (and entropy where it
enters) and metrics; masked rows, empty sequences, NaN padding, |logp - old| = 30; input errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from _entropy_transcriptions import (
    agg,
    bapo_loss,
    bapo_search,
    clipped_with_ratio,
    corridor_loss,
    rl_plus_loss,
    segment_ratio,
    steer_loss,
)

import fusedrl
from fusedrl.loss import (
    ALL_LOSS_MODES,
    ENTROPY_CONTROL_MODES,
    LOSS_AGG_MODES,
    PolicyLossConfig,
    head_kind,
    metric_names,
    policy_loss,
)
from fusedrl.loss.config import bapo_grid, bapo_state
from fusedrl.loss.token_head import kernel_head_codes

F64 = torch.float64
ATOL, RTOL = 1e-10, 1e-9


# --------------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------------


def make(B=5, T=9, seed=0, scale=0.3, per_seq_adv=False, empty_row=True, huge=False):
    """A padded batch with holes and (optionally) an empty row; finite values everywhere (the transcriptions
    multiply by the mask); ``huge``: |logp - old| = 30 on some valid tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    if empty_row:
        lengths[1] = 0
    mask = (torch.arange(T)[None] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.15)
    logp = -torch.rand(B, T, generator=g, dtype=F64) * 3 - 0.02
    old = (logp + scale * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3)
    if huge:
        flip = torch.rand(B, T, generator=g) > 0.6
        old = torch.where(flip, logp + 30.0 * torch.sign(torch.randn(B, T, generator=g, dtype=F64)), old)
    adv = torch.randn(B, generator=g, dtype=F64)[:, None].expand(B, T).clone() if per_seq_adv else None
    if adv is None:
        adv = torch.randn(B, T, generator=g, dtype=F64) * 2
    return dict(
        logp=logp,
        old=old,
        adv=adv,
        mask=mask,
        ent=torch.rand(B, T, generator=g, dtype=F64) * 3,
        old_ent=torch.rand(B, T, generator=g, dtype=F64) * 3,
        ext=torch.rand(B, T, generator=g) > 0.5,
        href=torch.rand(B, T, generator=g, dtype=F64) * 2 + 0.2,
        dh=torch.randn(B, T, generator=g, dtype=F64) * 0.3,
        seg=torch.randint(0, 3, (B, T), generator=g).cumsum(-1) // 2,
        beh=(old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-1e-3),
    )


def with_garbage(x: torch.Tensor, mask: torch.Tensor, fill=float("nan")) -> torch.Tensor:
    return x.masked_fill(~mask, fill)


def ours(d, cfg, garbage=True, **side):
    """policy_loss on the batch (NaN / inf garbage at masked positions): (loss, metrics, d/dlogp, d/dentropy)."""
    m = d["mask"]
    g = (lambda x, f=float("nan"): with_garbage(x, m, f)) if garbage else (lambda x, f=None: x)
    logp = g(d["logp"]).requires_grad_()
    ent = g(d["ent"], float("inf")).requires_grad_()
    kw = {k: (g(v) if v.is_floating_point() else v) for k, v in side.items()}
    loss, metrics = policy_loss(logp, g(d["old"], float("-inf")), g(d["adv"]), m, entropy=ent, config=cfg, **kw)
    gl, ge = torch.autograd.grad(loss, [logp, ent], allow_unused=True)
    return loss, metrics, gl, torch.zeros_like(ent) if ge is None else ge


def theirs(fn, d, **kw):
    """A transcription on leaves: (loss, metrics, d/dlogp, d/dentropy)."""
    logp = d["logp"].clone().requires_grad_()
    ent = d["ent"].clone().requires_grad_()
    out = fn(logp, ent)
    loss, metrics = out[0], out[1]
    gl, ge = torch.autograd.grad(loss, [logp, ent], allow_unused=True)
    gl = torch.where(d["mask"], gl, torch.zeros_like(gl))
    return loss, metrics, gl, torch.zeros_like(ent) if ge is None else ge


def assert_parity(a, b, keys=None):
    la, ma, gla, gea = a
    lb, mb, glb, geb = b
    torch.testing.assert_close(la.detach(), lb.detach().to(la.dtype), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(gla, glb, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(gea, geb, atol=ATOL, rtol=RTOL)
    for k in keys if keys is not None else mb:
        want = torch.as_tensor(mb[k], dtype=torch.float64)
        torch.testing.assert_close(ma[k].double(), want, atol=1e-6, rtol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------------
# STEER
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("weighting", ["linear", "exp"])
@pytest.mark.parametrize("source", ["old", "current"])
def test_steer_matches_transcription(source, weighting, agg_mode):
    d = make(seed=3 + LOSS_AGG_MODES.index(agg_mode))
    lam = (0.8, 1.2) if weighting == "linear" else (0.7, 1.0)
    cfg = PolicyLossConfig(loss_mode="steer", steer_weighting=weighting, steer_entropy=source,
                           steer_lambda_min=lam[0], steer_lambda_max=lam[1], clip_ratio_high=0.28,
                           clip_ratio_c=10.0, loss_agg_mode=agg_mode)  # fmt: skip
    side = {"old_entropy": d["old_ent"]} if source == "old" else {}
    got = ours(d, cfg, **side)
    h = d["old_ent"] if source == "old" else d["ent"]
    want = theirs(
        lambda lp, ent: steer_loss(d["old"], lp, d["adv"], d["mask"], h, 0.2, 0.28, 10.0, agg_mode, lam[0], lam[1],
                                   weighting == "linear"),
        d,
    )  # fmt: skip
    assert_parity(got, want)
    assert got[1]["steer/weight_min"] >= lam[0] - 1e-12 and got[1]["steer/weight_max"] <= lam[1] + 1e-12


def test_steer_exact_form_and_its_reduction():
    d = make(seed=8)
    cfg = PolicyLossConfig(loss_mode="steer", steer_exact=True)
    got = ours(d, cfg, entropy_change=d["dh"])
    want = theirs(lambda lp, ent: steer_loss(d["old"], lp, d["adv"], d["mask"], None, d_h=d["dh"]), d)
    assert_parity(got, want)
    # dH with only the sampled token's term of sum_v p_v^2 (log p_v + H) is -x (1 - x)(ln x + H): the authors' Omega
    x = torch.exp(d["logp"]).clamp(1e-8, 1 - 1e-8)
    dh_sampled = -x * (1 - x) * (torch.log(x) + d["old_ent"])
    exact = ours(d, cfg, entropy_change=dh_sampled)
    authors = ours(d, PolicyLossConfig(loss_mode="steer"), old_entropy=d["old_ent"])
    assert_parity(exact, authors)


def test_entropy_change_coefficient_is_the_derivative_of_the_entropy():
    """The closed form of docs/entropy-control.md: ``dH = -[p_a (log p_a + H) - sum_v p_v^2 (log p_v + H)]`` is
    ``d/d eta H(softmax(z + eta grad_z log p_a))`` at ``eta = 0`` (a policy-gradient step on the sampled token)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 11, generator=g, dtype=F64) * 2
    a = torch.randint(0, 11, (6,), generator=g)
    p = torch.softmax(z, -1)
    logp = torch.log_softmax(z, -1)
    h = -(p * logp).sum(-1)
    pa, lpa = p.gather(-1, a[:, None])[:, 0], logp.gather(-1, a[:, None])[:, 0]
    closed = -(pa * (lpa + h) - (p * p * (logp + h[:, None])).sum(-1))
    direction = torch.nn.functional.one_hot(a, 11).to(F64) - p  # grad_z log p_a

    def entropy_at(eta):
        q = torch.softmax(z + eta[:, None] * direction, -1)
        return -(q * torch.log(q)).sum(-1)

    _, numeric = torch.func.jvp(entropy_at, (torch.zeros(6, dtype=F64),), (torch.ones(6, dtype=F64),))
    torch.testing.assert_close(closed, numeric, atol=1e-12, rtol=1e-10)


def test_steer_edge_cases():
    # all advantages 0: every |Omega| equal -> the midpoint (linear) / 1 (exp); non-finite Omega -> 0 -> lam_max
    d = make(seed=9)
    d["adv"] = torch.zeros_like(d["adv"])
    _, m, _, _ = ours(d, PolicyLossConfig(loss_mode="steer"), old_entropy=d["old_ent"])
    assert m["steer/weight_min"] == m["steer/weight_max"] == pytest.approx(1.0)
    _, m, _, _ = ours(d, PolicyLossConfig(loss_mode="steer", steer_weighting="exp"), old_entropy=d["old_ent"])
    assert m["steer/weight_min"] == pytest.approx(1.0)
    d = make(seed=10)
    d["old_ent"][0, 0] = float("inf")  # a valid token with a non-finite Omega
    assert d["mask"][0, 0]
    want = theirs(lambda lp, ent: steer_loss(d["old"], lp, d["adv"], d["mask"], d["old_ent"]), d)
    assert_parity(ours(d, PolicyLossConfig(loss_mode="steer"), garbage=False, old_entropy=d["old_ent"]), want)


# --------------------------------------------------------------------------------------------------
# BAPO
# --------------------------------------------------------------------------------------------------

BAPO_GRIDS = {
    "yaml": dict(bapo_ratio_lower_start=0.6, bapo_ratio_lower_max=0.8, bapo_ratio_upper_start=1.2,
                 bapo_ratio_upper_max=2.0),
    "script": dict(bapo_adv_ratio_target=0.5, bapo_ratio_lower_start=0.8, bapo_ratio_lower_max=0.95,
                   bapo_ratio_upper_max=2.0, bapo_ratio_upper_step=0.1),
    "upper_only": dict(bapo_ratio_upper_max=3.0, bapo_ratio_upper_step=0.3),
    "defaults": dict(),
}  # fmt: skip


def _bapo_args(cfg):
    return (1.0 - cfg.clip_ratio_low if cfg.bapo_ratio_lower_start is None else cfg.bapo_ratio_lower_start,
            cfg.bapo_ratio_lower_max, cfg.bapo_ratio_lower_step,
            1.0 + cfg.clip_ratio_high if cfg.bapo_ratio_upper_start is None else cfg.bapo_ratio_upper_start,
            cfg.bapo_ratio_upper_max, cfg.bapo_ratio_upper_step)  # fmt: skip


@pytest.mark.parametrize("grid", sorted(BAPO_GRIDS))
@pytest.mark.parametrize("case", ["random", "all_pos", "all_neg", "ratio_one", "huge"])
def test_bapo_bounds_equal_the_sequential_search(case, grid):
    for seed in range(6):
        d = make(seed=100 + seed, scale=0.4, huge=case == "huge")
        if case == "all_pos":
            d["adv"] = d["adv"].abs()
        elif case == "all_neg":
            d["adv"] = -d["adv"].abs() - 0.01
        elif case == "ratio_one":
            d["old"] = d["logp"].clone()
        for target in (0.0, 0.5, 0.7, 1.0, 1.5, 4.0):
            cfg = PolicyLossConfig(loss_mode="bapo", **{**BAPO_GRIDS[grid], "bapo_adv_ratio_target": target})
            lo, hi, rho = bapo_search(d["old"], d["logp"], d["adv"], d["mask"], *_bapo_args(cfg), target, cfg.bapo_eps)
            _, m, _, _ = ours(d, cfg)
            assert m["bapo/clip_low"].item() == pytest.approx(lo, abs=1e-6), (seed, target)
            assert m["bapo/clip_high"].item() == pytest.approx(hi, abs=1e-6), (seed, target)
            if math.isinf(rho):
                assert math.isinf(m["bapo/pos_neg_ratio"].item())
            else:
                assert m["bapo/pos_neg_ratio"].item() == pytest.approx(rho, rel=1e-6)
            lower, upper = bapo_grid(cfg)
            assert lo in lower and hi in upper
            assert bapo_state(cfg, int(m["bapo/search_steps"].item())) == (lo, hi)  # the state the loop stopped at


def test_bapo_stops_where_the_target_is_first_met():
    """Targets between two consecutive states' P / N: the search stops in the middle of the upper grid."""
    from _entropy_transcriptions import bapo_contribution_ratio

    stops = set()
    for seed in range(8):
        d = make(seed=200 + seed, scale=0.6)
        grid = BAPO_GRIDS["yaml"]
        ratio = torch.exp(torch.clamp(d["logp"] - d["old"], -20.0, 20.0))
        upper = bapo_grid(PolicyLossConfig(loss_mode="bapo", **grid))[1]
        rhos = [bapo_contribution_ratio(ratio, d["adv"], d["mask"], 0.8, h, 1e-8).item() for h in upper]
        for j in range(1, len(upper) - 1):
            if rhos[j] > rhos[j - 1]:
                target = (rhos[j - 1] + rhos[j]) / 2
                if target <= bapo_contribution_ratio(ratio, d["adv"], d["mask"], 0.6, 1.2, 1e-8).item():
                    continue  # met before the lower loop ends
                cfg = PolicyLossConfig(loss_mode="bapo", bapo_adv_ratio_target=target, **grid)
                lo, hi, _ = bapo_search(d["old"], d["logp"], d["adv"], d["mask"], *_bapo_args(cfg), target, 1e-8)
                assert hi == upper[j]
                _, m, _, _ = ours(d, cfg)
                assert (m["bapo/clip_low"].item(), m["bapo/clip_high"].item()) == pytest.approx((lo, hi), abs=1e-6)
                stops.add(j)
    assert len(stops) >= 3


@pytest.mark.parametrize("agg_mode", LOSS_AGG_MODES)
def test_bapo_matches_transcription(agg_mode):
    for seed, target in ((1, 1.0), (2, 0.6), (3, 5.0)):
        d = make(seed=seed + 10 * LOSS_AGG_MODES.index(agg_mode), scale=0.5)
        cfg = PolicyLossConfig(loss_mode="bapo", bapo_adv_ratio_target=target, loss_agg_mode=agg_mode,
                               **BAPO_GRIDS["yaml"])  # fmt: skip
        args = (d["old"], d["adv"], d["mask"], _bapo_args(cfg), target)

        def transcription(lp, ent, a=args):
            old, adv, mask, bounds, t = a
            return bapo_loss(old, lp, adv, mask, *bounds, t, mode=agg_mode)

        assert_parity(ours(d, cfg), theirs(transcription, d))


def test_bapo_grid_accumulates_like_the_loop():
    cfg = PolicyLossConfig(loss_mode="bapo", **BAPO_GRIDS["script"])
    lower, upper = bapo_grid(cfg)
    assert lower[0] == 0.8 and lower[-1] == 0.95 and len(lower) == 4
    assert upper[0] == 1.2 and upper[-1] == 2.0 and len(upper) == 9
    assert bapo_grid(PolicyLossConfig(loss_mode="bapo")) == ([0.8], [1.2])  # maxima default to the starts
    with pytest.raises(ValueError, match="bapo_ratio_upper_step"):
        PolicyLossConfig(loss_mode="bapo", bapo_ratio_upper_max=100.0, bapo_ratio_upper_step=1e-4)
    with pytest.raises(ValueError, match="lower ratio bounds"):
        PolicyLossConfig(loss_mode="bapo", bapo_ratio_lower_start=0.9, bapo_ratio_lower_max=1.5)


# --------------------------------------------------------------------------------------------------
# RL-PLUS
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("variant", ["script", "clipped", "behaviour", "gamma"])
def test_rl_plus_matches_transcription(variant, agg_mode):
    d = make(seed=20 + LOSS_AGG_MODES.index(agg_mode), scale=0.4)
    kw, tkw, side = {}, {}, {"external_mask": d["ext"]}
    if variant == "clipped":
        kw, tkw = dict(rl_plus_clip_on_policy=True), dict(loss_remove_clip=False)
    elif variant == "behaviour":
        side["behaviour_logp"] = d["beh"]
        tkw = dict(target_probs=torch.exp(d["beh"]))
    elif variant == "gamma":
        kw, tkw = dict(rl_plus_gamma=1.5), dict(gamma=1.5)
    cfg = PolicyLossConfig(loss_mode="rl_plus", loss_agg_mode=agg_mode, **kw)
    want = theirs(lambda lp, ent: rl_plus_loss(d["old"], lp, d["adv"], d["mask"], d["ext"], mode=agg_mode, **tkw), d)
    assert_parity(ours(d, cfg, **side), want)


def test_rl_plus_huge_log_ratio_and_one_sided_batches():
    d = make(seed=30, huge=True)
    cfg = PolicyLossConfig(loss_mode="rl_plus")
    want = theirs(lambda lp, ent: rl_plus_loss(d["old"], lp, d["adv"], d["mask"], d["ext"], log_ratio_clamp=20.0), d)
    got = ours(d, cfg, external_mask=d["ext"])
    assert_parity(got, want)
    assert torch.isfinite(got[0]) and torch.isfinite(got[2]).all()
    for ext in (torch.zeros_like(d["ext"]), torch.ones_like(d["ext"])):  # no external / only external tokens
        want = theirs(lambda lp, ent, e=ext: rl_plus_loss(d["old"], lp, d["adv"], d["mask"], e, log_ratio_clamp=20.0),
                      d)  # fmt: skip
        assert_parity(ours(d, cfg, external_mask=ext.to(torch.uint8)), want)


# --------------------------------------------------------------------------------------------------
# SSPO: segment-level ratio
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vanilla", "luspo", "sapo", "cispo"])
def test_segment_ratio_matches_transcription(mode):
    d = make(seed=40, scale=0.5)
    cfg = PolicyLossConfig(loss_mode=mode, importance_sampling_level="segment", clip_ratio_c=None,
                           loss_agg_mode="seq-mean-token-mean", clip_ratio_low=0.2, clip_ratio_high=0.3)  # fmt: skip

    def transcription(lp, ent):
        r = segment_ratio(d["old"], lp, d["mask"], d["seg"])
        if mode in ("vanilla", "luspo"):
            pg = clipped_with_ratio(r, d["adv"], 0.2, 0.3)
        elif mode == "sapo":
            tau = torch.where(d["adv"] > 0, torch.tensor(1.0, dtype=F64), torch.tensor(1.05, dtype=F64))
            pg = -torch.sigmoid(tau * (r - 1.0)) * (4.0 / tau) * d["adv"]
        else:
            pg = -r.detach().clamp(0.8, 1.3) * d["adv"] * lp
        return agg(pg, d["mask"], "seq-mean-token-mean"), {}

    assert_parity(ours(d, cfg, segment_ids=d["seg"]), theirs(transcription, d))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("huge", [False, True])
def test_segment_level_reduces_to_sequence_and_token_levels(huge, layout):
    d = make(seed=50, per_seq_adv=True, huge=huge)
    B, T = d["mask"].shape
    per_seq = torch.arange(B)[:, None].expand(B, T) * 7 + 3  # one segment per sequence (any ids)
    per_tok = torch.arange(T)[None].expand(B, T)  # one segment per token
    for agg_mode in LOSS_AGG_MODES:
        for mode in ("vanilla", "sapo", "luspo", "cispo"):
            base = dict(loss_mode=mode, loss_agg_mode=agg_mode, clip_ratio_c=None, kl_loss_coef=0.0)
            seg = PolicyLossConfig(importance_sampling_level="segment", **base)
            one_seq = _run_layout(d, seg, layout, segment_ids=per_seq)
            seq = _run_layout(d, PolicyLossConfig(importance_sampling_level="sequence", **base), layout)
            assert_parity(one_seq, seq)
            one_tok = _run_layout(d, seg, layout, segment_ids=per_tok)
            tok = _run_layout(d, PolicyLossConfig(importance_sampling_level="token", **base), layout)
            assert_parity(one_tok, tok)


def _run_layout(d, cfg, layout, **side):
    if layout == "padded":
        return ours(d, cfg, **side)
    m = d["mask"]
    lengths = m.shape[1] * torch.ones(m.shape[0], dtype=torch.long)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])

    def flat(x):
        return x.reshape(-1)

    logp = with_garbage(d["logp"], m).reshape(-1).requires_grad_()
    ent = with_garbage(d["ent"], m, float("inf")).reshape(-1).requires_grad_()
    kw = {k: flat(v) for k, v in side.items()}
    loss, metrics = policy_loss(logp, flat(with_garbage(d["old"], m)), flat(with_garbage(d["adv"], m)), flat(m),
                                entropy=ent, cu_seqlens=cu, config=cfg, norm_len=m.shape[1], **kw)  # fmt: skip
    gl, ge = torch.autograd.grad(loss, [logp, ent], allow_unused=True)
    ge = torch.zeros_like(ent) if ge is None else ge
    return loss, metrics, gl.reshape(m.shape), ge.reshape(m.shape)


def test_segment_ids_from_tokens():
    ids = torch.tensor([[5, 1, 9, 9, 2, 7, 2], [2, 2, 4, 1, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    seg = fusedrl.segment_ids_from_tokens(ids, mask, [2, 1])
    assert seg.tolist() == [[0, 0, 1, 1, 1, 2, -1], [0, 1, 2, 2, -1, -1, -1]]
    packed = fusedrl.segment_ids_from_tokens(
        ids[mask], torch.ones(int(mask.sum()), dtype=torch.bool), torch.tensor([2])
    )
    assert packed.tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 3, 3]
    with pytest.raises(TypeError, match="token_ids"):
        fusedrl.segment_ids_from_tokens(ids.float(), mask, [2])
    with pytest.raises(ValueError, match="mask"):
        fusedrl.segment_ids_from_tokens(ids, mask[:, :3], [2])


def test_segment_ids_need_not_be_contiguous_or_increasing():
    d = make(seed=55)
    seg = d["seg"]
    perm = torch.tensor([7, 2, 9, 4, 11, 0, 5, 3, 8, 1, 6, 10])  # relabel ids, same partition
    cfg = PolicyLossConfig(importance_sampling_level="segment")
    assert_parity(ours(d, cfg, segment_ids=perm[seg] - 5), ours(d, cfg, segment_ids=seg))


# --------------------------------------------------------------------------------------------------
# EPO: entropy corridor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg_mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("corridor", [(0.8, 1.2), (0.0, 2.0), (1.0, 1.0)])
def test_entropy_corridor_matches_transcription(corridor, agg_mode):
    d = make(seed=60 + LOSS_AGG_MODES.index(agg_mode))
    cfg = PolicyLossConfig(entropy_corridor=corridor, entropy_corridor_coeff=0.3, loss_agg_mode=agg_mode)
    want = theirs(lambda lp, ent: corridor_loss(d["old"], lp, d["adv"], d["mask"], ent, d["href"], *corridor, 0.3,
                                                mode=agg_mode), d)  # fmt: skip
    got = ours(d, cfg, entropy_reference=d["href"])
    assert_parity(got, want)
    assert (got[3][d["mask"]] != 0).any()  # the corridor has a gradient (EPO's constant term has none)


def test_entropy_corridor_with_other_modes_and_bonus():
    d = make(seed=70)
    for mode, side in (
        ("gspo", {}),
        ("steer", {"old_entropy": d["old_ent"]}),
        ("rl_plus", {"external_mask": d["ext"]}),
    ):
        cfg = PolicyLossConfig(loss_mode=mode, entropy_corridor=(0.5, 1.5), entropy_coeff=0.01)
        plain = ours(d, cfg.replace(entropy_corridor=None), **side)
        with_c = ours(d, cfg, entropy_reference=d["href"], **side)
        pen = torch.relu(0.5 * d["href"] - d["ent"]) + torch.relu(d["ent"] - 1.5 * d["href"])
        extra = 0.001 * agg(pen, d["mask"], "token-mean")
        torch.testing.assert_close(with_c[0] - plain[0], extra, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------------
# edge cases, classification, errors
# --------------------------------------------------------------------------------------------------

EC_CASES = {
    "steer": (dict(loss_mode="steer"), ("old_entropy",)),
    "steer_current_exp": (dict(loss_mode="steer", steer_entropy="current", steer_weighting="exp"), ()),
    "steer_exact": (dict(loss_mode="steer", steer_exact=True), ("entropy_change",)),
    "bapo": (dict(loss_mode="bapo", **BAPO_GRIDS["yaml"]), ()),
    "rl_plus": (dict(loss_mode="rl_plus"), ("external_mask",)),
    "rl_plus_behaviour": (dict(loss_mode="rl_plus", rl_plus_clip_on_policy=True), ("external_mask", "behaviour_logp")),
    "segment": (dict(importance_sampling_level="segment"), ("segment_ids",)),
    "corridor": (dict(entropy_corridor=(0.8, 1.2)), ("entropy_reference",)),
}
SIDE_OF = {"old_entropy": "old_ent", "entropy_change": "dh", "external_mask": "ext", "behaviour_logp": "beh",
           "segment_ids": "seg", "entropy_reference": "href"}  # fmt: skip


def side_for(d, names):
    return {n: d[SIDE_OF[n]] for n in names}


@pytest.mark.parametrize("name", sorted(EC_CASES))
def test_garbage_empty_rows_all_masked_and_huge_ratios(name):
    kw, names = EC_CASES[name]
    for agg_mode in LOSS_AGG_MODES:
        cfg = PolicyLossConfig(loss_agg_mode=agg_mode, **kw)
        d = make(seed=80)
        clean = ours(d, cfg, garbage=False, **side_for(d, names))
        dirty = ours(d, cfg, garbage=True, **side_for(d, names))
        assert_parity(dirty, clean)
        assert (dirty[2][~d["mask"]] == 0).all()
        huge = make(seed=81, huge=True)
        loss, m, gl, ge = ours(huge, cfg, **side_for(huge, names))
        assert torch.isfinite(loss) and torch.isfinite(gl).all() and torch.isfinite(ge).all()
        empty = make(seed=82)
        empty["mask"] = torch.zeros_like(empty["mask"])
        loss, m, gl, ge = ours(empty, cfg, **side_for(empty, names))
        assert loss.item() == 0.0 and (gl == 0).all() and (ge == 0).all()
        bounds = ("bapo/clip_low", "bapo/clip_high", "bapo/pos_neg_ratio")  # start bounds; P/N = inf (N = 0)
        assert all(v.item() == 0 for k, v in m.items() if k not in bounds), m
        assert list(m) == list(metric_names(cfg, True, False))


@pytest.mark.parametrize("name", sorted(EC_CASES))
def test_padded_equals_packed(name):
    kw, names = EC_CASES[name]
    d = make(seed=85, empty_row=False)
    d["mask"][:, :2] = True
    cfg = PolicyLossConfig(loss_agg_mode="seq-mean-token-mean", **kw)
    assert_parity(_run_layout(d, cfg, "packed", **side_for(d, names)), ours(d, cfg, **side_for(d, names)))


def test_classification_and_kernel_heads():
    assert set(ENTROPY_CONTROL_MODES) == {"steer", "bapo", "rl_plus"}
    assert set(ENTROPY_CONTROL_MODES) <= set(ALL_LOSS_MODES)
    kinds = {name: head_kind(PolicyLossConfig(**kw)) for name, (kw, _) in EC_CASES.items()}
    assert kinds == {"steer": "batch", "steer_current_exp": "batch", "steer_exact": "batch", "bapo": "speculative",
                     "rl_plus": "token", "rl_plus_behaviour": "token", "segment": "sequence",
                     "corridor": "token"}  # fmt: skip
    for kw, _ in EC_CASES.values():
        assert kernel_head_codes(PolicyLossConfig(**kw)) is None


MISSING = [
    (dict(loss_mode="steer"), {}, "old_entropy"),
    (dict(loss_mode="steer", steer_exact=True), {}, "entropy_change"),
    (dict(loss_mode="rl_plus"), {}, "external_mask"),
    (dict(importance_sampling_level="segment"), {}, "segment_ids"),
    (dict(entropy_corridor=(0.5, 2.0)), {}, "entropy_reference"),
    (dict(), {"old_entropy": "old_ent"}, "old_entropy is given but nothing reads it"),
    (dict(loss_mode="steer", steer_exact=True), {"old_entropy": "old_ent", "entropy_change": "dh"}, "old_entropy"),
    (dict(loss_mode="steer"), {"old_entropy": "old_ent", "entropy_change": "dh"}, "entropy_change"),
    (dict(), {"external_mask": "ext"}, "external_mask is given"),
    (dict(), {"behaviour_logp": "beh"}, "behaviour_logp is given"),
    (dict(), {"segment_ids": "seg"}, "segment_ids is given"),
    (dict(), {"entropy_reference": "href"}, "entropy_reference is given"),
]


@pytest.mark.parametrize("kw,side,match", MISSING)
def test_missing_and_unread_inputs_raise(kw, side, match):
    d = make(seed=90)
    cfg = PolicyLossConfig(**kw)
    given = {k: d[v] for k, v in side.items()}
    with pytest.raises(ValueError, match=match):
        policy_loss(d["logp"], d["old"], d["adv"], d["mask"], entropy=d["ent"], config=cfg, **given)


def test_entropy_needed_and_input_kinds():
    d = make(seed=91)
    for kw in (dict(loss_mode="steer", steer_entropy="current"), dict(entropy_corridor=(0.5, 2.0))):
        side = {"entropy_reference": d["href"]} if "entropy_corridor" in kw else {}
        with pytest.raises(ValueError, match="entropy"):
            policy_loss(d["logp"], d["old"], d["adv"], d["mask"], config=PolicyLossConfig(**kw), **side)
    cfg = PolicyLossConfig(importance_sampling_level="segment")
    with pytest.raises(TypeError, match="segment_ids must be an integer"):
        policy_loss(d["logp"], d["old"], d["adv"], d["mask"], config=cfg, segment_ids=d["seg"].double())
    with pytest.raises(ValueError, match="segment_ids must have the shape"):
        policy_loss(d["logp"], d["old"], d["adv"], d["mask"], config=cfg, segment_ids=d["seg"][:, :3])
    with pytest.raises(TypeError, match="old_entropy must be a floating"):
        policy_loss(d["logp"], d["old"], d["adv"], d["mask"], config=PolicyLossConfig(loss_mode="steer"),
                    old_entropy=d["seg"])  # fmt: skip


BAD = [
    (dict(loss_mode="steerx"), "loss_mode"),
    (dict(steer_weighting="log"), "steer_weighting"),
    (dict(steer_entropy="new"), "steer_entropy"),
    (dict(steer_exact=1), "steer_exact"),
    (dict(steer_lambda_min=1.3), "steer_lambda_min"),
    (dict(steer_weighting="exp", steer_lambda_min=0.0), "steer_lambda_min"),
    (dict(bapo_ratio_lower_step=-0.1), "bapo_ratio_lower_step"),
    (dict(bapo_adv_ratio_target=float("nan")), "bapo_adv_ratio_target"),
    (dict(bapo_ratio_upper_max=float("inf")), "bapo_ratio_upper_max"),
    (dict(rl_plus_gamma=-1.0), "rl_plus_gamma"),
    (dict(rl_plus_clip_on_policy="yes"), "rl_plus_clip_on_policy"),
    (dict(entropy_corridor=(1.2, 0.8)), "entropy_corridor"),
    (dict(entropy_corridor=0.8), "entropy_corridor"),
    (dict(entropy_corridor_coeff=-1.0), "entropy_corridor_coeff"),
    (dict(loss_mode="steer", importance_sampling_level="segment"), "importance_sampling_level"),
    (dict(importance_sampling_level="segments"), "importance_sampling_level"),
]


@pytest.mark.parametrize("kw,field", BAD)
def test_config_validation(kw, field):
    with pytest.raises(ValueError, match=field):
        PolicyLossConfig(**kw)


def test_config_normalises_the_corridor():
    cfg = PolicyLossConfig(entropy_corridor=[torch.tensor(0.5), 2])
    assert cfg.entropy_corridor == (0.5, 2.0)
    assert cfg.replace(entropy_corridor=None).entropy_corridor is None
