"""The one-pass schedule of fused_policy_loss (docs/one-pass.md) equals the two-pass result.

``schedule="one_pass"`` must give ``policy_loss(linear_logprob_entropy(...))``'s value, metrics and
gradients of hidden, weight and bias: every loss mode and aggregation, entropy bonus, KL to a
reference, packed and padded inputs, masked rows, an all-masked batch, temperature, softcap, bias;
on the torch epilogue (CPU), the Triton epilogue (interpreter) and the CUDA epilogue's host lane.
"""

from __future__ import annotations

import logging

import pytest
import torch
from _factory import GRAD_ATOL

import fusedrl
from fusedrl import onepass
from fusedrl.backends import cuda as cuda_backend
from fusedrl.backends import torch_backend
from fusedrl.backends.base import EpilogueHead
from fusedrl.fused import FusedPolicyLoss, fused_policy_loss
from fusedrl.loss import KL_LOSS_TYPES, LOSS_AGG_MODES, LOSS_MODES, PolicyLossConfig
from fusedrl.onepass import gemm as op_gemm
from fusedrl.onepass import op as op_mod
from fusedrl.onepass import run as op_run

# a budget of a few KiB forces several token chunks at these shapes
TINY_BUDGET_MB = 0.05


def make_case(B=3, T=7, H=24, V=507, dtype=torch.float64, packed=False, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g) / H**0.25).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.25).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([T, 3, 5, 6, 2][:B])
    mask = (torch.arange(T)[None] < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.15)
    targets = targets.masked_fill(~mask, -100)
    with torch.no_grad():
        lp, _ = fusedrl.reference.linear_logprob_entropy(
            hidden.double(), weight.double(), targets.clamp_min(0), None if b is None else b.double()
        )
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.randn(B, generator=g) * 2
    case = dict(
        hidden=hidden, weight=weight, targets=targets, old_logp=old, advantages=adv, mask=mask, ref_logp=ref, bias=b
    )
    if packed:
        idx = torch.cat([torch.arange(i * T, i * T + int(n)) for i, n in enumerate(lengths)])
        flat = lambda x: x.reshape(B * T, *x.shape[2:])[idx]  # noqa: E731
        case.update(
            hidden=flat(hidden),
            targets=flat(targets),
            old_logp=flat(old),
            mask=flat(mask),
            ref_logp=flat(ref),
            cu_seqlens=torch.tensor([0] + lengths.cumsum(0).tolist(), dtype=torch.int32),
        )
    return case


def run(case, cfg, schedule, backend="torch", **kw):
    """(loss, metrics, grads of hidden/weight/bias) of one fused_policy_loss call on fresh leaves."""
    c = dict(case)
    leaves = []
    for k in ("hidden", "weight", "bias"):
        if c.get(k) is not None:
            c[k] = c[k].detach().clone().requires_grad_()
            leaves.append(c[k])
    if cfg.generator is not None:
        cfg = cfg.replace(generator=torch.Generator().manual_seed(cfg.generator.initial_seed()))
    loss, metrics = fused_policy_loss(**c, config=cfg, schedule=schedule, backend=backend, **kw)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads


def assert_same(a, b, atol, rtol=1e-5):
    la, ma, ga = a
    lb, mb, gb = b
    torch.testing.assert_close(la, lb, atol=atol, rtol=rtol)
    assert list(ma) == list(mb)
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], atol=atol, rtol=rtol, msg=k)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


def config(mode, agg="token-mean", **kw):
    base = dict(
        loss_mode=mode,
        loss_agg_mode=agg,
        entropy_coeff=0.01,
        kl_loss_coef=0.1,
        clip_cov_ratio=0.2,
        kl_cov_ratio=0.2,
        clip_cov_lb=-5.0,
        clip_cov_ub=5.0,
        generator=torch.Generator().manual_seed(7),
    )
    base.update(kw)
    return PolicyLossConfig(**base)


# ------------------------------------------------------------------------------------------------
# Equality with the two-pass result (fp64: the schedules differ only in summation order)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("agg", LOSS_AGG_MODES)
@pytest.mark.parametrize("mode", LOSS_MODES)
def test_one_pass_equals_two_pass(mode, agg, layout):
    case = make_case(packed=layout == "packed", seed=LOSS_MODES.index(mode))
    cfg = config(mode, agg)
    kw = dict(temperature=0.7, memory_budget_mb=TINY_BUDGET_MB, return_entropy=True)
    assert_same(run(case, cfg, "one_pass", **kw), run(case, cfg, "recompute", **kw), atol=1e-10)


@pytest.mark.parametrize("kl", KL_LOSS_TYPES)
def test_one_pass_kl_types(kl):
    case = make_case(seed=3)
    cfg = config("vanilla", kl_loss_type=kl, kl_loss_coef=0.5)
    kw = dict(memory_budget_mb=TINY_BUDGET_MB)
    assert_same(run(case, cfg, "one_pass", **kw), run(case, cfg, "recompute", **kw), atol=1e-10)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_one_pass_transforms(softcap, temperature, bias):
    case = make_case(seed=5, bias=bias)
    cfg = config("vanilla", clip_ratio_high=0.28)
    kw = dict(temperature=temperature, softcap=softcap, memory_budget_mb=TINY_BUDGET_MB)
    assert_same(run(case, cfg, "one_pass", **kw), run(case, cfg, "recompute", **kw), atol=1e-10)


def test_one_pass_masked_vocabulary_bias():
    """A -inf bias entry masks a vocabulary column: p = 0 there, du = 0, no 0 * inf, with an entropy
    gradient flowing."""
    case = make_case(seed=9)
    case["bias"][[0, 17, 506]] = -torch.inf
    case["targets"] = torch.where(case["targets"] == 17, 18, case["targets"])
    cfg = config("vanilla", entropy_coeff=0.3)
    out = run(case, cfg, "one_pass", memory_budget_mb=TINY_BUDGET_MB)
    for t in (out[0], *out[2][:2]):
        assert torch.isfinite(t).all()
    assert_same(out, run(case, cfg, "recompute"), atol=1e-10)


def test_one_pass_single_chunk_and_many_chunks_agree():
    case = make_case(seed=2)
    cfg = config("vanilla")
    big = run(case, cfg, "one_pass", memory_budget_mb=64)
    small = run(case, cfg, "one_pass", memory_budget_mb=TINY_BUDGET_MB)
    assert_same(big, small, atol=1e-10)


@pytest.mark.parametrize("mode", LOSS_MODES)
def test_one_pass_all_masked_batch(mode):
    case = make_case(seed=4)
    case["mask"] = torch.zeros_like(case["mask"])
    loss, metrics, grads = run(case, config(mode), "one_pass")
    assert loss.item() == 0.0
    assert all(torch.isfinite(v) for v in metrics.values())
    for g in grads:
        assert (g == 0).all()


def test_one_pass_empty_batch():
    w = torch.randn(11, 8, requires_grad=True)
    hidden = torch.zeros(0, 5, 8, requires_grad=True)
    z = torch.zeros(0, 5)
    loss, _ = fused_policy_loss(
        hidden,
        w,
        torch.zeros(0, 5, dtype=torch.long),
        z,
        torch.zeros(0),
        z.bool(),
        config=PolicyLossConfig(entropy_coeff=0.1),
        schedule="one_pass",
    )
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == hidden.shape and (w.grad == 0).all()


# ------------------------------------------------------------------------------------------------
# Low precision and backends: within the numerical contract's tolerances of the reference
# ------------------------------------------------------------------------------------------------


def _epilogues():
    out = ["torch"]
    if "triton" in fusedrl.available_backends("cpu"):
        out.append("triton")
    if cuda_backend.extension() is not None:
        out.append("cuda")
    return out


EPILOGUES = _epilogues()
# the triton interpreter is slow: a subset of modes there
_KERNEL_MODES = ["vanilla", "gpg", "cispo", "clip_cov", "kl_cov"]


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("mode", _KERNEL_MODES)
def test_one_pass_epilogues_fp32(monkeypatch, epilogue, mode):
    """Each backend's epilogue (torch ops; Triton in the interpreter; the CUDA epilogue's host lane) in
    the one-pass schedule vs the fp64 two-pass result."""
    if epilogue == "cuda":  # the CUDA epilogue's host lane on CPU tensors (the cuda backend needs a GPU)
        monkeypatch.setattr(op_run, "epilogue_for", lambda *a: cuda_backend)
    case = make_case(B=2, T=5, H=16, V=203, dtype=torch.float32, seed=11)
    cfg = config(mode, clip_ratio_high=0.28)
    backend = "triton" if epilogue == "triton" else "torch"
    got = run(case, cfg, "one_pass", backend=backend, temperature=0.8, memory_budget_mb=0.01)
    case64 = {
        k: (
            v.double()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and k in ("hidden", "weight", "bias")
            else v
        )
        for k, v in case.items()
    }
    want = run(case64, cfg, "recompute", backend="reference", temperature=0.8)
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=1e-5)
    for k in want[1]:
        torch.testing.assert_close(got[1][k].double(), want[1][k].double(), atol=1e-5, rtol=1e-5, msg=k)
    for g, r in zip(got[2], want[2]):
        torch.testing.assert_close(g.double(), r, atol=GRAD_ATOL[torch.float32], rtol=1e-4)


@pytest.mark.filterwarnings("ignore:fusedrl. schedule='one_pass' with fp16")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_pass_low_precision(dtype):
    """16-bit inputs: the one-pass gradients are no further from fp64 than the recompute schedule's,
    plus the contract's tolerance (a small batch: fp16's range is not yet the limit, see the next test)."""
    case = make_case(B=2, T=6, H=32, V=301, dtype=dtype, seed=12)
    cfg = config("vanilla")
    one = run(case, cfg, "one_pass", memory_budget_mb=0.02)
    rec = run(case, cfg, "recompute")
    case64 = {k: (v.double() if k in ("hidden", "weight", "bias") and v is not None else v) for k, v in case.items()}
    ref = run(case64, cfg, "recompute", backend="reference")
    assert abs(one[0].double() - ref[0]).item() <= abs(rec[0].double() - ref[0]).item() + 1e-5
    for g1, g2, g0 in zip(one[2], rec[2], ref[2]):
        e1 = (g1.double() - g0).abs().max().item()
        e2 = (g2.double() - g0).abs().max().item()
        assert e1 <= e2 + GRAD_ATOL[dtype], (e1, e2)


@pytest.mark.filterwarnings("ignore:fusedrl. schedule='one_pass' with fp16")
@pytest.mark.parametrize(
    "dtype, upstream",
    [(torch.bfloat16, 1 / 3), (torch.float16, 2.0**16)],
    ids=["bf16-one-third", "fp16-gradscaler-2^16"],
)
def test_backward_scales_in_fp32_and_rounds_once(dtype, upstream):
    """The backward multiplies the stored (fp32) gradients by the upstream gradient in fp32 and rounds once:
    rounding the upstream gradient to the input dtype first made 2^16 (GradScaler's initial scale) inf in fp16
    and biased every bf16 gradient by 0.2% at 1/3 (a loss divided by 3 accumulation steps)."""
    case = make_case(B=2, T=64, H=32, V=301, dtype=dtype, seed=14)
    cfg = config("vanilla")

    def grads(scale):
        leaves = [case[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        loss, _ = fused_policy_loss(
            **dict(case, hidden=leaves[0], weight=leaves[1], bias=leaves[2]),
            config=cfg,
            schedule="one_pass",
            backend="torch",
            memory_budget_mb=0.05,
        )
        (loss * scale).backward()
        return [t.grad for t in leaves]

    for g1, gs in zip(grads(1.0), grads(upstream)):
        assert gs.dtype == dtype and torch.isfinite(gs).all()
        nz = g1 != 0
        ratio = (gs.double()[nz] / g1.double()[nz]).mean().item() / upstream
        assert abs(ratio - 1) < 3e-4, ratio  # rounding the scale to bf16 first: 1.95e-3


def test_fp16_auto_takes_recompute_where_one_pass_underflows():
    """fp16: a token mean over 1024 tokens of a 32k vocabulary puts du = (onehot - p) / N near 3e-8, below
    even fp16's subnormals (6e-8), when the one-pass schedule rounds it in the forward; a GradScaler's scale
    (2^16 here) reaches only the stored, already rounded gradients. ``auto`` therefore takes recompute for fp16
    (du formed from the scaled upstream gradient) and an explicit ``one_pass`` warns."""
    case = make_case(B=4, T=256, H=32, V=32003, dtype=torch.float16, seed=13, bias=False)
    case["mask"] = torch.ones_like(case["mask"])
    case["targets"] = case["targets"].clamp_min(0)
    cfg = config("vanilla", entropy_coeff=0.0, kl_loss_coef=0.0)
    assert onepass.plan(1024, 32, 32003, torch.float16, cfg, "auto", 2**30).schedule == "recompute"

    def scaled_grads(schedule, backend="torch", c=case):
        leaves = [c["hidden"].detach().clone().requires_grad_(), c["weight"].detach().clone().requires_grad_()]
        loss, _ = fused_policy_loss(
            **dict(c, hidden=leaves[0], weight=leaves[1]), config=cfg, schedule=schedule, backend=backend
        )
        (loss * 2.0**16).backward()  # what GradScaler does
        return [t.grad.double() / 2.0**16 for t in leaves]

    auto, rec = scaled_grads("auto"), scaled_grads("recompute")
    for a, r in zip(auto, rec):
        assert torch.equal(a, r)
    with pytest.warns(UserWarning, match="fp16"):
        one = scaled_grads("one_pass")
    case64 = dict(case, hidden=case["hidden"].double(), weight=case["weight"].double())
    ref = scaled_grads("recompute", "reference", case64)
    rel = lambda g, r: ((g - r).norm() / r.norm()).item()  # noqa: E731
    for a, o, r in zip(auto, one, ref):
        assert rel(a, r) < 1e-2, rel(a, r)
        assert rel(o, r) > 10 * rel(a, r), (rel(o, r), rel(a, r))  # the underflow auto avoids


# ------------------------------------------------------------------------------------------------
# Clip-Cov / KL-Cov: the same selection as the two-pass path
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_one_pass_selects_the_same_tokens(monkeypatch, mode):
    from fusedrl.fused import evaluate as real
    from fusedrl.loss import token_head

    picks = []

    def spy(*a, **k):
        out = real(*a, **k)
        picks.append(out[2].clone())
        return out

    monkeypatch.setattr(token_head, "evaluate", spy)  # the one-pass schedule's evaluation
    monkeypatch.setattr(fusedrl.fused, "evaluate", spy)  # the recompute schedule's
    case = make_case(B=4, T=9, seed=21)
    cfg = config(mode, clip_cov_ratio=0.1, kl_cov_ratio=0.1)
    one = run(case, cfg, "one_pass", memory_budget_mb=TINY_BUDGET_MB)
    rec = run(case, cfg, "recompute")
    assert len(picks) == 2 and picks[0].any()
    assert torch.equal(picks[0], picks[1])
    assert_same(one, rec, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Sequence-level losses: sequence-aligned chunks, or the documented two-pass fallback
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gspo_chunks_whole_sequences(monkeypatch, layout):
    seen = []
    real = op_mod.run_one_pass

    def spy(x, w, targets, bias, head, pln, *a):
        seen.append(pln)
        return real(x, w, targets, bias, head, pln, *a)

    monkeypatch.setattr(op_mod, "run_one_pass", spy)
    case = make_case(B=5, T=6, packed=layout == "packed", seed=8)
    cfg = config("gspo", "seq-mean-token-mean")
    # room for two sequences per chunk: several chunks, each of whole sequences
    budget = (2 * 6 * 507 * 8 * 2 + 507 * 4 + 100) / 2**20
    one = run(case, cfg, "one_pass", memory_budget_mb=budget)
    assert seen and seen[0].schedule == "one_pass" and len(seen[0].chunks) > 1
    for _, _, seqs in seen[0].chunks:
        assert seqs is not None
    assert_same(one, run(case, cfg, "recompute"), atol=1e-10)


def test_gspo_two_pass_fallback(monkeypatch):
    calls = []
    real = op_mod.run_two_pass
    monkeypatch.setattr(op_mod, "run_two_pass", lambda *a: calls.append(1) or real(*a))
    case = make_case(B=2, T=7, seed=6)
    cfg = config("gspo")
    one = run(case, cfg, "one_pass", memory_budget_mb=0.02)  # a sequence does not fit
    assert calls
    assert_same(one, run(case, cfg, "recompute"), atol=1e-10)


# ------------------------------------------------------------------------------------------------
# Rules: no gradients without need, grad accumulation, torch.compile, auto, validation
# ------------------------------------------------------------------------------------------------


def test_nothing_formed_without_grad(monkeypatch):
    flags = []
    real = op_mod.run_one_pass

    def spy(x, w, targets, bias, head, pln, temperature, softcap, backend, keys, need_dx, need_dw, need_db, we):
        flags.append((need_dx, need_dw, need_db))
        return real(x, w, targets, bias, head, pln, temperature, softcap, backend, keys, need_dx, need_dw, need_db, we)

    monkeypatch.setattr(op_mod, "run_one_pass", spy)
    case = make_case(seed=1)
    cfg = config("vanilla")
    with torch.no_grad():
        c = {k: (v.requires_grad_() if k in ("hidden", "weight") else v) for k, v in make_case(seed=1).items()}
        loss, _ = fused_policy_loss(**c, config=cfg, schedule="one_pass")
    assert flags == [(False, False, False)] and not loss.requires_grad
    flags.clear()
    loss2, _ = fused_policy_loss(**case, config=cfg, schedule="one_pass")  # no input requires grad
    assert flags == [(False, False, False)]
    torch.testing.assert_close(loss, loss2)


def test_grad_accumulation_over_micro_batches():
    """Two micro-batches with the global normalisers give the one big batch's gradients."""
    case = make_case(B=4, T=7, seed=13, bias=False)
    n_tok = case["mask"].sum()
    cfg = config("vanilla", entropy_coeff=0.0, kl_loss_coef=0.0, generator=None)
    w = case["weight"].clone().requires_grad_()
    for half in (slice(0, 2), slice(2, 4)):
        part = {k: (v[half] if isinstance(v, torch.Tensor) and k not in ("weight",) else v) for k, v in case.items()}
        part["weight"] = w
        loss, _ = fused_policy_loss(
            **part, config=cfg, schedule="one_pass", global_num_tokens=n_tok, memory_budget_mb=TINY_BUDGET_MB
        )
        loss.backward()
    whole = run(case, cfg, "recompute")
    torch.testing.assert_close(w.grad, whole[2][1], atol=1e-12, rtol=1e-9)


def test_backward_scales_by_upstream_gradient():
    case = make_case(seed=14)
    cfg = config("vanilla")
    c = {k: (v.clone().requires_grad_() if k in ("hidden", "weight", "bias") else v) for k, v in case.items()}
    loss, _ = fused_policy_loss(**c, config=cfg, schedule="one_pass")
    (3.5 * loss).backward()
    _, _, g = run(case, cfg, "recompute")
    for leaf, ref in zip((c["hidden"], c["weight"], c["bias"]), g):
        torch.testing.assert_close(leaf.grad, 3.5 * ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("mode", ["vanilla", "kl_cov", "gspo"])
def test_one_pass_compiles_fullgraph(mode):
    case = make_case(seed=15, dtype=torch.float32)
    cfg = config(mode, generator=None)

    def f(hidden, weight, bias):
        loss, metrics = fused_policy_loss(
            hidden,
            weight,
            case["targets"],
            case["old_logp"],
            case["advantages"],
            case["mask"],
            ref_logp=case["ref_logp"],
            bias=bias,
            config=cfg,
            schedule="one_pass",
            backend="torch",
            memory_budget_mb=TINY_BUDGET_MB,
        )
        return loss, metrics["pg_clipfrac"]

    leaves = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    torch._dynamo.reset()
    loss, frac = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    eager = [case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    loss_e, frac_e = f(*eager)
    grads_e = torch.autograd.grad(loss_e, eager)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(frac, frac_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_auto_schedule_choice(caplog):
    case = make_case(seed=16)
    cfg = config("vanilla")
    with caplog.at_level(logging.DEBUG, logger="fusedrl"):
        run(case, cfg, "auto")
    assert any("schedule one_pass" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="fusedrl"):
        run(case, cfg, "auto", memory_budget_mb=0.001)  # not even the accumulators fit
    assert any("schedule recompute" in r.message for r in caplog.records)


def test_plan_rules():
    cfg = PolicyLossConfig()
    p = onepass.plan(4096, 1024, 32000, torch.float32, cfg, "auto", 512 * 2**20)
    assert p.schedule == "one_pass" and len(p.chunks) >= 2
    assert sum(b - a for a, b, _ in p.chunks) == 4096
    assert onepass.plan(4096, 1024, 32000, torch.float32, cfg, "auto", 2**20).schedule == "recompute"
    assert onepass.plan(4096, 1024, 32000, torch.float32, cfg, "one_pass", 2**20).schedule == "one_pass"
    # 16-bit inputs: the du of every token (deferred GEMM 3) counts against the budget (headline shape)
    head = onepass.plan(8192, 4096, 151936, torch.bfloat16, cfg, "auto", 4096 * 2**20)
    assert head.schedule == "one_pass" and head.deferred
    assert onepass.plan(8192, 4096, 151936, torch.bfloat16, cfg, "auto", 2048 * 2**20).schedule == "recompute"
    gspo = PolicyLossConfig(loss_mode="gspo")
    assert onepass.plan(64, 8, 100, torch.float32, gspo, "auto", 100 * 800, seq_len=128).schedule == "recompute"
    assert onepass.plan(64, 8, 100, torch.float32, gspo, "one_pass", 100 * 800, seq_len=128).schedule == "two_pass"
    packed = onepass.plan(10, 8, 100, torch.float32, gspo, "one_pass", 10**6, cu_host=[0, 3, 3, 9])
    assert [c[:2] for c in packed.chunks] == [(0, 9), (9, 10)]


def test_schedule_validation():
    case = make_case(seed=17)
    with pytest.raises(ValueError, match="schedule"):
        fused_policy_loss(**case, schedule="fast")
    with pytest.raises(ValueError, match="memory_budget_mb"):
        fused_policy_loss(**case, memory_budget_mb=-1)
    with pytest.raises(ValueError, match="one_pass"):
        fused_policy_loss(
            **{k: (v.requires_grad_() if k == "hidden" else v) for k, v in make_case().items()},
            schedule="one_pass",
            backend="reference",
        )
    with pytest.raises(ValueError, match="schedule"):
        FusedPolicyLoss(schedule="x")
    with pytest.raises(ValueError, match="memory_budget_mb"):
        FusedPolicyLoss(memory_budget_mb=0)


def test_module_schedule():
    case = make_case(seed=18)
    cfg = config("vanilla", generator=None)
    mod = FusedPolicyLoss(cfg, schedule="one_pass", memory_budget_mb=TINY_BUDGET_MB)
    c = {k: (v.clone().requires_grad_() if k in ("hidden", "weight", "bias") else v) for k, v in case.items()}
    loss, _ = mod(
        c["hidden"],
        c["weight"],
        c["targets"],
        c["old_logp"],
        c["advantages"],
        c["mask"],
        ref_logp=c["ref_logp"],
        bias=c["bias"],
    )
    loss.backward()
    want = run(case, cfg, "recompute")
    torch.testing.assert_close(c["weight"].grad, want[2][1], atol=1e-10, rtol=1e-9)
    assert "schedule='one_pass'" in repr(mod)


# ------------------------------------------------------------------------------------------------
# GPU (skipped without one): every epilogue in bf16 at an unaligned LM-sized shape, 16-bit GEMMs
# with fp32 output, and the memory bound of the default budget
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("mode", ["vanilla", "kl_cov", "gspo"])
def test_gpu_one_pass_bf16(backend, mode):
    if backend not in fusedrl.available_backends("cuda"):
        pytest.skip(f"{backend} unavailable on cuda")
    case = make_case(B=6, T=333, H=256, V=32003, dtype=torch.bfloat16, seed=31)
    case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    cfg = config(mode, generator=None)
    one = run(case, cfg, "one_pass", backend=backend, memory_budget_mb=64)
    assert all(op_gemm._OUT_DTYPE_OK.values()), f"16-bit GEMMs with fp32 output unavailable: {op_gemm._OUT_DTYPE_OK}"
    rec = run(case, cfg, "recompute", backend=backend)
    case64 = {k: (v.double() if k in ("hidden", "weight", "bias") and v is not None else v) for k, v in case.items()}
    ref = run(case64, cfg, "recompute", backend="reference")
    assert abs(one[0].double() - ref[0]).item() <= abs(rec[0].double() - ref[0]).item() + 1e-4
    for g1, g2, g0 in zip(one[2], rec[2], ref[2]):
        e1 = (g1.double() - g0).abs().max().item()
        e2 = (g2.double() - g0).abs().max().item()
        assert e1 <= e2 + GRAD_ATOL[torch.bfloat16], (e1, e2)


@pytest.mark.gpu
def test_gpu_one_pass_memory_within_budget():
    case = make_case(B=8, T=512, H=1024, V=65536, dtype=torch.bfloat16, seed=32, bias=False)
    case = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    leaves = {k: case[k].clone().requires_grad_() for k in ("hidden", "weight")}
    args = dict(case, **leaves)
    budget_mb = 512
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = fused_policy_loss(
        **args, config=config("vanilla", generator=None), schedule="one_pass", memory_budget_mb=budget_mb
    )
    loss.backward()
    torch.cuda.synchronize()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in leaves.values())
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra <= budget_mb * 2**20 * 1.25 + 64 * 2**20, extra / 2**20


# ------------------------------------------------------------------------------------------------
# The 2026 loss menu through the one-pass schedule: rollout correction, entropy masking, OPSM, delta,
# sequence-level ratios (token-local configs chunk freely; sequence ones chunk by sequence; batch
# statistics take two passes)
# ------------------------------------------------------------------------------------------------

_MENU = {
    "tis": dict(rollout_correction=fusedrl.RolloutCorrection(rollout_is="token", rollout_is_threshold=2.0)),
    "mis-seq": dict(
        rollout_correction=fusedrl.RolloutCorrection(
            rollout_is="sequence", rollout_is_mode="mask", rollout_is_threshold=3.0
        )
    ),
    "rs-chain": dict(
        rollout_correction=fusedrl.RolloutCorrection(
            rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.5_2.0,0.1"
        )
    ),
    "icepop": dict(
        rollout_correction=fusedrl.RolloutCorrection(
            rollout_is="token", rollout_is_mode="mask", rollout_is_threshold_lower=0.5, rollout_is_threshold=5.0
        )
    ),
    "bypass-reinforce": dict(
        loss_mode="bypass_mode", rollout_correction=fusedrl.RolloutCorrection(rollout_is="token", loss_type="reinforce")
    ),
    "entropy-80-20": dict(top_entropy_quantile=0.2),
    "opsm": dict(off_policy_mask_threshold=0.05),
    "delta": dict(delta=1.5),
    "seq-is": dict(importance_sampling_level="sequence"),
    "sapo": dict(loss_mode="sapo"),
    "geo_mean": dict(loss_mode="geo_mean"),
    "vespo": dict(loss_mode="vespo"),
    "dppo_tv": dict(loss_mode="dppo_tv", clip_ratio_c=20.0),
    "dro": dict(loss_mode="dro", dro_beta=0.1),
    "bias-corrected-kl": dict(use_bias_correction_kl=True),
    "kl_cov+tis": dict(loss_mode="kl_cov", rollout_correction=fusedrl.RolloutCorrection(rollout_is="token")),
}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", sorted(_MENU))
def test_one_pass_loss_menu(monkeypatch, name, layout):
    plans = []
    real = op_mod.plan
    monkeypatch.setattr(op_mod, "plan", lambda *a, **k: plans.append(real(*a, **k)) or plans[-1])
    case = make_case(B=4, T=6, packed=layout == "packed", seed=40 + sorted(_MENU).index(name))
    cfg = config("vanilla", **_MENU[name])
    if (cfg.rollout_correction is not None and cfg.loss_mode != "bypass_mode") or cfg.off_policy_mask_threshold:
        g = torch.Generator().manual_seed(41)
        case["rollout_logp"] = case["old_logp"] + 0.2 * torch.randn(case["old_logp"].shape, generator=g)
    budget = (2 * 6 * 507 * 8 * 2 + 507 * 4 + 100) / 2**20  # two sequences per chunk
    one = run(case, cfg, "one_pass", memory_budget_mb=budget, return_entropy=True)
    rec = run(case, cfg, "recompute", return_entropy=True)
    assert_same(one, rec, atol=1e-10)
    kind = fusedrl.loss.head_kind(cfg)
    want = {"batch": "two_pass"}.get(kind, "one_pass")
    assert plans[-1].schedule == want, (kind, plans[-1])
    if kind == "sequence":
        assert all(seqs is not None for _, _, seqs in plans[-1].chunks)


@pytest.mark.parametrize("name", ["tis", "delta", "opsm", "bias-corrected-kl"])
def test_kernel_epilogue_not_used_for_menu_options(monkeypatch, name):
    """Options the kernel heads do not know run the torch epilogue even when a kernel backend is asked for."""
    from fusedrl.loss.token_head import kernel_head_codes

    cfg = config("vanilla", **_MENU[name])
    assert kernel_head_codes(cfg) is None
    head = EpilogueHead(None, None, False)
    for backend in ("torch",) + (("triton",) if "triton" in fusedrl.available_backends("cpu") else ()):
        assert op_run.epilogue_for(backend, torch.device("cpu"), torch.float32, head) is torch_backend
    if cuda_backend.extension() is not None:  # a kernel epilogue called without a formula set says so
        assert not cuda_backend.onepass_supports(head, torch.device("cpu"), torch.float32)[0]
        u = torch.zeros(2, 5)
        with pytest.raises(ValueError, match="head.codes"):
            cuda_backend.onepass_epilogue(u, torch.zeros(2, dtype=torch.long), None, 1.0, None, head)


def test_auto_takes_two_pass_for_entropy_quantile(caplog):
    case = make_case(seed=50)
    cfg = config("vanilla", top_entropy_quantile=0.2)
    with caplog.at_level(logging.DEBUG, logger="fusedrl"):
        out = run(case, cfg, "auto")
    assert any("schedule two_pass" in r.message for r in caplog.records)
    assert "entropy" in out[1]


def test_fp32_output_gemm_fallback_is_per_kind_and_not_on_oom(monkeypatch):
    """A GEMM torch cannot run with 16-bit operands and fp32 output falls back to upcast operands, for that
    GEMM kind only; running out of memory is raised and leaves the fast path on (it used to switch it off
    for the whole process, upcasting W per chunk from then on)."""
    monkeypatch.setattr(op_gemm, "_OUT_DTYPE_OK", {"mm": True, "addmm": True})

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        op_gemm._fp32_gemm_16bit("mm", oom, lambda: "fallback")
    assert op_gemm._OUT_DTYPE_OK == {"mm": True, "addmm": True}

    def unsupported():
        raise RuntimeError("out_dtype not supported")

    assert op_gemm._fp32_gemm_16bit("addmm", unsupported, lambda: "fallback") == "fallback"
    assert op_gemm._OUT_DTYPE_OK == {"mm": True, "addmm": False}
    assert op_gemm._fp32_gemm_16bit("mm", lambda: "fast", lambda: "fallback") == "fast"
    assert op_gemm._fp32_gemm_16bit("addmm", lambda: "fast", lambda: "fallback") == "fallback"
