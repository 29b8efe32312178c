"""The entropy-control methods through fused_policy_loss: both schedules (one pass, in its chunked, sequence-
chunked and two-pass forms, and recompute) give the same value, metrics and gradients of hidden / weight /
bias in float64, equal to policy_loss on the reference log-probs; FusedPolicyLoss takes the same inputs; the
side inputs are checked the same way. A GPU test runs every mode under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch
from test_onepass import TINY_BUDGET_MB, assert_same, make_case, run

from fusedrl import reference
from fusedrl.fused import FusedPolicyLoss, fused_policy_loss
from fusedrl.loss import PolicyLossConfig, head_kind, policy_loss
from fusedrl.loss.entropy_control import reads_entropy
from fusedrl.onepass import op as op_mod

F64 = torch.float64

CASES = {
    "steer": (dict(loss_mode="steer", entropy_coeff=0.01), ("old_entropy",)),
    "steer_exp_current": (dict(loss_mode="steer", steer_weighting="exp", steer_entropy="current"), ()),
    "steer_exact": (dict(loss_mode="steer", steer_exact=True, kl_loss_coef=0.1), ("entropy_change",)),
    "bapo": (dict(loss_mode="bapo", bapo_ratio_lower_start=0.6, bapo_ratio_lower_max=0.8, bapo_ratio_upper_max=2.0,
                  bapo_adv_ratio_target=1.2, kl_loss_coef=0.1), ()),
    "rl_plus": (dict(loss_mode="rl_plus", entropy_coeff=0.01), ("external_mask",)),
    "rl_plus_clip_behaviour": (dict(loss_mode="rl_plus", rl_plus_clip_on_policy=True),
                               ("external_mask", "behaviour_logp")),
    "segment": (dict(importance_sampling_level="segment", kl_loss_coef=0.1, use_bias_correction_kl=True),
                ("segment_ids",)),
    "segment_sapo": (dict(loss_mode="sapo", importance_sampling_level="segment"), ("segment_ids",)),
    "segment_cispo": (dict(loss_mode="cispo", importance_sampling_level="segment"), ("segment_ids",)),
    "corridor": (dict(entropy_corridor=(0.8, 1.2), entropy_corridor_coeff=0.3, entropy_coeff=0.01),
                 ("entropy_reference",)),
    "corridor_gspo": (dict(loss_mode="gspo", entropy_corridor=(0.5, 1.5)), ("entropy_reference",)),
    "steer_corridor": (dict(loss_mode="steer", entropy_corridor=(0.5, 1.5), entropy_corridor_coeff=0.1),
                       ("old_entropy", "entropy_reference")),
}  # fmt: skip


def side_inputs(case, names, seed=0):
    """The side inputs ``names`` for a fused case (shape of ``old_logp``)."""
    shape = case["old_logp"].shape
    g = torch.Generator().manual_seed(seed)
    old = case["old_logp"]
    pool = {
        "old_entropy": lambda: torch.rand(shape, generator=g, dtype=F64) * 3,
        "entropy_change": lambda: torch.randn(shape, generator=g, dtype=F64) * 0.3,
        "external_mask": lambda: torch.rand(shape, generator=g) > 0.5,
        "behaviour_logp": lambda: (old + 0.2 * torch.randn(shape, generator=g)).clamp(max=-1e-3),
        "segment_ids": lambda: torch.randint(0, 3, shape, generator=g).cumsum(-1) // 2,
        "entropy_reference": lambda: torch.rand(shape, generator=g, dtype=F64) * 3 + 0.5,
    }
    return {n: pool[n]() for n in names}


def unfused(case, cfg, side, temperature=1.0):
    """policy_loss on the reference core op's log-probs and entropy (fp64): loss, metrics, grads."""
    leaves = {k: case[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    tgt = torch.where(case["mask"], case["targets"], torch.zeros_like(case["targets"]))
    lp, ent = reference.linear_logprob_entropy(leaves["hidden"], leaves["weight"], tgt, leaves["bias"], temperature)
    ent = ent if reads_entropy(cfg) else None  # what the fused loss computes
    loss, metrics = policy_loss(lp, case["old_logp"], case["advantages"], case["mask"], entropy=ent,
                                ref_logp=case["ref_logp"], cu_seqlens=case.get("cu_seqlens"), config=cfg,
                                **side)  # fmt: skip
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_both_schedules_agree(monkeypatch, name, agg, layout):
    plans = []
    real = op_mod.plan
    monkeypatch.setattr(op_mod, "plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    kw, names = CASES[name]
    case = make_case(B=4, T=6, packed=layout == "packed", seed=sorted(CASES).index(name))
    cfg = PolicyLossConfig(loss_agg_mode=agg, **kw)
    side = side_inputs(case, names)
    budget = (2 * 6 * 507 * 8 * 2 + 507 * 4 + 100) / 2**20  # two sequences per chunk
    one = run(case, cfg, "one_pass", memory_budget_mb=budget, temperature=0.9, **side)
    rec = run(case, cfg, "recompute", temperature=0.9, **side)
    assert_same(one, rec, atol=1e-10)
    kind = head_kind(cfg)
    assert plans[-1].schedule == ("two_pass" if kind == "batch" else "one_pass"), (kind, plans[-1])
    if kind == "sequence":
        assert len(plans[-1].chunks) > 1 and all(seqs is not None for _, _, seqs in plans[-1].chunks)
    want = unfused(case, cfg, side, temperature=0.9)
    assert_same(rec, want, atol=1e-10)


@pytest.mark.parametrize("name", ["rl_plus", "corridor", "steer"])
def test_token_chunks_and_auto_schedule(name):
    kw, names = CASES[name]
    case = make_case(seed=7)
    cfg = PolicyLossConfig(**kw)
    side = side_inputs(case, names, seed=1)
    tiny = run(case, cfg, "one_pass", memory_budget_mb=TINY_BUDGET_MB, **side)
    auto = run(case, cfg, "auto", **side)
    assert_same(tiny, run(case, cfg, "recompute", **side), atol=1e-10)
    assert_same(auto, tiny, atol=1e-10)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_steer_exact_computes_the_entropy_change_in_the_pass(backend, layout):
    """``steer_exact`` without ``entropy_change``: the fused loss takes ``dH`` of the current policy from its own
    pass (both schedules), equal to policy_loss with the reference core op's ``dH``."""
    case = make_case(B=4, T=6, packed=layout == "packed", seed=31)
    cfg = PolicyLossConfig(loss_mode="steer", steer_exact=True, entropy_coeff=0.01, loss_agg_mode="seq-mean-token-mean")
    rec = run(case, cfg, "recompute", backend=backend, temperature=0.8)
    schedules = [rec] if backend == "reference" else [rec, run(case, cfg, "one_pass", backend=backend, temperature=0.8)]
    tgt = torch.where(case["mask"], case["targets"], torch.zeros_like(case["targets"]))
    with torch.no_grad():
        _, _, dh = reference.linear_logprob_entropy(case["hidden"], case["weight"], tgt, case["bias"], 0.8,
                                                    return_entropy_change=True)  # fmt: skip
    want = unfused(case, cfg, {"entropy_change": dh}, temperature=0.8)
    for got in schedules:
        assert_same(got, want, atol=1e-10)
    given = run(case, cfg, "recompute", backend=backend, temperature=0.8, entropy_change=torch.zeros_like(dh))
    assert not torch.allclose(given[0], rec[0])  # a given entropy_change is used instead


def test_module_takes_the_side_inputs():
    kw, names = CASES["steer_corridor"]
    case = make_case(seed=9, packed=True)
    cfg = PolicyLossConfig(**kw)
    side = side_inputs(case, names)
    mod = FusedPolicyLoss(cfg, temperature=0.8, backend="torch")
    lm, mm = mod(**case, **side)
    lf, mf = fused_policy_loss(**case, config=cfg, temperature=0.8, backend="torch", **side)
    torch.testing.assert_close(lm, lf)
    assert list(mm) == list(mf) and "entropy_corridor/penalty" in mm and "steer/weight_mean" in mm


@pytest.mark.parametrize("schedule", ["one_pass", "recompute"])
def test_side_input_errors_on_both_schedules(schedule):
    case = make_case(seed=2)
    side = side_inputs(case, ("old_entropy", "segment_ids", "external_mask"))
    for cfg, given, match in (
        (PolicyLossConfig(loss_mode="steer"), {}, "old_entropy"),
        (PolicyLossConfig(loss_mode="rl_plus"), {}, "external_mask"),
        (PolicyLossConfig(importance_sampling_level="segment"), {}, "segment_ids"),
        (PolicyLossConfig(entropy_corridor=(0.5, 2.0)), {}, "entropy_reference"),
        (PolicyLossConfig(), {"old_entropy": side["old_entropy"]}, "nothing reads it"),
        (PolicyLossConfig(importance_sampling_level="segment"), {"segment_ids": side["segment_ids"][:, :2]},
         "segment_ids must have the shape of targets"),
        (PolicyLossConfig(loss_mode="rl_plus"), {"external_mask": side["external_mask"].to(torch.complex64)},
         "external_mask"),
    ):  # fmt: skip
        with pytest.raises((ValueError, TypeError), match=match):
            fused_policy_loss(**case, config=cfg, schedule=schedule, backend="torch", **given)


def test_entropy_is_computed_when_the_config_reads_it():
    case = make_case(seed=4)
    for name in ("corridor_gspo", "steer_exp_current"):
        kw, names = CASES[name]
        _, m = fused_policy_loss(**case, config=PolicyLossConfig(**kw), backend="torch", **side_inputs(case, names))
        assert "entropy" in m


def test_config_crosses_the_one_pass_op():
    """The entropy-control fields reach the op (two lists) and come back equal, the corridor pair included."""
    from fusedrl.loss.config import entropy_control_args, entropy_control_fields

    for cfg in (
        PolicyLossConfig(),
        PolicyLossConfig(loss_mode="bapo", bapo_ratio_upper_max=2.5, bapo_adv_ratio_target=float("inf"),
                         entropy_corridor=(0.25, 4.0), steer_weighting="exp", steer_exact=True,
                         rl_plus_clip_on_policy=True),
    ):  # fmt: skip
        assert cfg.replace(**entropy_control_fields(*entropy_control_args(cfg))) == cfg


@pytest.mark.parametrize("name", ["bapo", "rl_plus", "segment", "corridor"])
def test_compiles_fullgraph(name):
    kw, names = CASES[name]
    case = make_case(seed=15, dtype=torch.float32)
    cfg = PolicyLossConfig(**kw)
    side = side_inputs(case, names)
    side = {k: (v.float() if v.is_floating_point() else v) for k, v in side.items()}

    def f(hidden, weight, bias):
        loss, metrics = fused_policy_loss(hidden, weight, case["targets"], case["old_logp"], case["advantages"],
                                          case["mask"], ref_logp=case["ref_logp"], bias=bias, config=cfg,
                                          schedule="one_pass", backend="torch", **side)  # fmt: skip
        return loss, metrics["pg_clipfrac"]

    leaves = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    torch._dynamo.reset()
    loss, frac = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss_e, frac_e = f(*eager)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(frac, frac_e)
    for a, b in zip(grads, torch.autograd.grad(loss_e, eager)):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_no_host_sync(name):
    """Every entropy-control config on CUDA, policy_loss and both fused schedules, with host syncs as errors
    (the fused loss's argument checks are off: ``check_inputs=False``), fp32 agreement with the CPU."""
    from fusedrl.backends import available_backends

    kw, names = CASES[name]
    cfg = PolicyLossConfig(**kw)
    case = make_case(B=3, T=40, H=64, V=1003, seed=1, dtype=torch.float32)
    side = side_inputs(case, names)
    cpu = run(case, cfg, "recompute", backend="torch", **side)
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    side_dev = {k: v.cuda() for k, v in side.items()}
    for backend in available_backends("cuda"):
        for schedule in ("one_pass", "recompute"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = run(dev, cfg, schedule, backend=backend, check_inputs=False, **side_dev)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            la, ma, ga = out
            torch.testing.assert_close(la.cpu(), cpu[0], atol=1e-4, rtol=1e-4)
            for k in ma:
                torch.testing.assert_close(ma[k].cpu(), cpu[1][k], atol=1e-4, rtol=1e-4, msg=k)
            for x, y in zip(ga, cpu[2]):
                torch.testing.assert_close(x.cpu(), y, atol=1e-4, rtol=1e-3)
    lp = -torch.rand(4, 50, device="cuda", requires_grad=True)
    old = lp.detach() + 0.1 * torch.randn(4, 50, device="cuda")
    small = {k: torch.as_tensor(v) for k, v in side_inputs(dict(old_logp=old.cpu()), names).items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = policy_loss(lp, old, torch.randn(4, device="cuda"), torch.ones(4, 50, device="cuda"),
                              entropy=torch.rand(4, 50, device="cuda"), config=cfg, check_inputs=False,
                              ref_logp=old if cfg.kl_loss_coef else None,
                              **{k: v.cuda() for k, v in small.items()})  # fmt: skip
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


#: BAPO one pass: per-sequence advantages, and the (target, order) pairs whose chunk-by-chunk bounds must differ
#: from the whole batch's (several rows to correct) or must not (none)
BAPO_ORDERS = {
    "random": None,
    "positive_first": [2.0, 1.5, -1.0, -2.5],
    "negative_first": [-2.0, -1.5, 1.0, 2.5],
    "all_positive": [2.0, 1.5, 1.0, 2.5],
}
BAPO_ROWS = {(20.0, "positive_first"): "many", (0.05, "negative_first"): "many", (20.0, "all_positive"): "none",
             (0.05, "all_positive"): "none"}  # fmt: skip


@pytest.mark.parametrize("order", list(BAPO_ORDERS))
@pytest.mark.parametrize("target", [0.05, 20.0])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("entropy_coeff", [0.0, 0.01])
def test_bapo_one_pass_corrects_the_clipped_tokens(monkeypatch, agg, entropy_coeff, target, order):
    """BAPO on the one-pass schedule (CPU): each chunk takes the bounds the search picks on the tokens seen so
    far, then the rows whose branch the whole batch's bounds change are corrected; equal to recompute (fp64),
    in chunks of three rows. Positive advantages first with a high target: the first chunks stop at
    the search's first state (``N = 0``), the batch runs it to the end; negative first with a low target: the
    reverse; all positive: every prefix and the batch stop at the first state (nothing to correct)."""
    from fusedrl.onepass import run as run_mod

    rows = []
    real = run_mod.correct_rows
    monkeypatch.setattr(run_mod, "correct_rows", lambda idx, *a: rows.append(idx.numel()) or real(idx, *a))
    case = make_case(B=4, T=12, seed=21)
    g = torch.Generator().manual_seed(3)
    case["old_logp"] = case["old_logp"] + 0.8 * torch.randn(case["old_logp"].shape, generator=g, dtype=F64)
    if BAPO_ORDERS[order] is not None:
        case["advantages"] = torch.tensor(BAPO_ORDERS[order])
    cfg = PolicyLossConfig(loss_mode="bapo", loss_agg_mode=agg, entropy_coeff=entropy_coeff, kl_loss_coef=0.1,
                           bapo_ratio_lower_start=0.3, bapo_ratio_lower_max=0.95, bapo_ratio_upper_start=1.05,
                           bapo_ratio_upper_max=3.0, bapo_adv_ratio_target=target)  # fmt: skip
    assert head_kind(cfg) == "speculative"
    one = run(case, cfg, "one_pass", memory_budget_mb=TINY_BUDGET_MB)
    rec = run(case, cfg, "recompute")
    assert_same(one, rec, atol=1e-10)
    expect = BAPO_ROWS.get((target, order))
    if expect == "many":
        assert rows and rows[-1] >= 3, rows  # the chunks' bounds and the batch's differ: several rows change branch
    elif expect == "none":
        assert not rows, rows
    assert_same(rec, unfused(case, cfg, {}), atol=1e-10)


def _bapo_head(cfg, old, adv, dtype=torch.float32):
    from fusedrl.loss import TokenHead
    from fusedrl.loss.inputs import flatten_batch

    mask = torch.ones(old.shape, dtype=torch.bool)
    batch = flatten_batch("old_logp", tuple(old.shape), old.device, old, adv, mask, None, {}, check_inputs=False)
    return TokenHead(batch, cfg, False, dtype)


def _bapo_one_pass_grads(head, logp, chunks):
    """The one-pass schedule's log-prob gradient as run_one_pass forms it: the pass chunk by chunk, the
    evaluation, then the correction of the picked tokens."""
    from fusedrl.onepass.run import speculation_rows

    g = torch.cat([head.grads(a, b, logp[a:b], None, speculative=True)[0] for a, b in chunks])
    _, metrics, _ = head.evaluate(logp, None)
    fix = speculation_rows(head, logp, metrics)
    if fix is not None:
        g = g.index_add(0, fix[0], fix[1])
    return g


def test_bapo_one_pass_marks_a_rounding_tie():
    """fp32: a token one ulp above a bound whose clamped value ``-A c`` rounds to ``-A r`` is a tie of the
    surrogate's max (torch halves its gradient) without being clipped (``l2 > l1`` is false). Its chunk took
    bounds under which it is inside, the batch's bounds put it on that tie: the correction must find it."""
    import math

    f32 = torch.float32
    b = torch.tensor(1.28, dtype=f32)
    r = torch.nextafter(b, torch.tensor(2.0, dtype=f32))
    lp = torch.tensor(math.log(r.item()), dtype=f32)
    for _ in range(50):  # the fp32 log-prob whose exp is exactly r
        if torch.exp(lp) == r:
            break
        lp = torch.nextafter(lp, torch.tensor(9.0 if torch.exp(lp) < r else -9.0, dtype=f32))
    assert torch.exp(lp) == r
    a = next(a for a in torch.linspace(0.5, 2.0, 2000, dtype=f32) if (-a * r) == (-a * b))
    adv = torch.tensor([[a.item(), -5.0, 5.0, 5.0]], dtype=f32)
    old = torch.zeros(1, 4, dtype=f32)
    logp = torch.tensor([lp.item(), 0.0, 0.0, 0.0], dtype=f32)
    cfg = PolicyLossConfig(loss_mode="bapo", bapo_ratio_lower_start=0.8, bapo_ratio_upper_start=1.28,
                           bapo_ratio_upper_max=1.5, bapo_ratio_upper_step=0.22, bapo_adv_ratio_target=1.0)  # fmt: skip
    head = _bapo_head(cfg, old, adv)
    got = _bapo_one_pass_grads(head, logp, [(0, 2), (2, 4)])
    assert [c[2] for c in head._spec_chunks] == [(0.8, 1.5), (0.8, 1.28)]  # the first chunk's guess differs
    want = head.grads(0, 4, logp, None)[0]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_bapo_one_pass_takes_the_grid_floats():
    """Bounds beyond fp32's range (a config the exact path takes) stay the grid's host floats in the pass."""
    cfg = PolicyLossConfig(loss_mode="bapo", bapo_ratio_upper_start=1.2, bapo_ratio_upper_max=1e39,
                           bapo_ratio_upper_step=1e38, bapo_adv_ratio_target=1e30)  # fmt: skip
    old, adv = torch.zeros(1, 4), torch.tensor([[1.0, -1.0, 0.5, -2.0]])
    logp = torch.tensor([0.3, -0.2, 0.1, 0.4])
    head = _bapo_head(cfg, old, adv)
    torch.testing.assert_close(_bapo_one_pass_grads(head, logp, [(0, 2), (2, 4)]), head.grads(0, 4, logp, None)[0])
