"""The deferred GEMM 3 of the one-pass schedule (fusedrl/onepass/plan.py ``defers_dw``, docs/one-pass.md):
bf16 inputs whose du of every token is no larger than the fp32 dW accumulator keep that du, and the op's
backward forms ``dW = du^T @ (g·x)`` in one GEMM. Checked against fp64 gradients with a bound from the
accumulating plan's own error (the same inputs with deferral turned off), for random upstream gradients,
masks, unaligned V, the selection modes' rank-k correction, empty and all-masked batches, a GradScaler's
2^16, and ``torch.compile(fullgraph=True)``."""

from __future__ import annotations

import importlib

import pytest
import torch

from fusedrl.fused import fused_policy_loss
from fusedrl.loss import PolicyLossConfig

P = importlib.import_module("fusedrl.onepass.plan")
C = importlib.import_module("fusedrl.onepass.cost")
OP = importlib.import_module("fusedrl.onepass.op")
RUN = importlib.import_module("fusedrl.onepass.run")

N, H, V = 96, 64, 507  # du of 96 rows x 512 (padded) x 2 bytes <= dW32's 507 x 64 x 4: deferred

MODES = {
    "vanilla": dict(kl_loss_coef=0.1),
    "entropy": dict(entropy_coeff=0.02),
    "clip_cov": dict(loss_mode="clip_cov", clip_cov_ratio=0.1, clip_cov_lb=-5.0, clip_cov_ub=5.0),
    "kl_cov": dict(loss_mode="kl_cov", kl_cov_ratio=0.1),
}


def _config(mode: str) -> PolicyLossConfig:
    kw = dict(MODES[mode])
    if mode == "clip_cov":
        kw["generator"] = torch.Generator().manual_seed(7)
    return PolicyLossConfig(**kw)


def _case(n=N, h=H, v=V, seed=0, mask_p=0.2):
    g = torch.Generator().manual_seed(seed)
    return dict(
        # bf16 values: the fp64 reference sees the same inputs
        hidden=(torch.randn(n, h, generator=g) / h**0.25).bfloat16().double(),
        weight=(torch.randn(v, h, generator=g) / h**0.25 * 2).bfloat16().double(),
        targets=torch.randint(0, v, (n,), generator=g),
        mask=torch.rand(n, generator=g) > mask_p,
        old_logp=-torch.rand(n, generator=g) * 5 - 3,
        advantages=torch.randn(n, generator=g),
        ref_logp=-torch.rand(n, generator=g) * 5 - 3,
    )


def _grads(case, mode, dtype, schedule, g_out, **kw):
    """loss and (d hidden, d weight) of ``g_out * loss`` with the weights in ``dtype``."""
    c = dict(case)
    leaves = [c[k].to(dtype).clone().requires_grad_() for k in ("hidden", "weight")]
    c["hidden"], c["weight"] = leaves
    loss, _ = fused_policy_loss(**c, config=_config(mode), schedule=schedule, **kw)
    grads = torch.autograd.grad(loss, leaves, torch.tensor(g_out, dtype=loss.dtype, device=loss.device))
    return loss.detach().double(), [t.double() for t in grads]


def _no_defer(monkeypatch):
    """The accumulating plan on the same inputs (deferral off everywhere: the plan, the op's fake)."""
    monkeypatch.setattr(P, "defers_dw", lambda *a: False)
    monkeypatch.setattr(OP, "defers_dw", lambda *a: False)


def test_the_rule():
    assert P.defers_dw(8192, 4096, 151936, torch.bfloat16, "token", True)  # headline: exactly dW32's bytes
    assert not P.defers_dw(8193, 4096, 151936, torch.bfloat16, "token", True)
    assert not P.defers_dw(32768, 4096, 151936, torch.bfloat16, "selection", True)
    assert P.defers_dw(N, H, V, torch.bfloat16, "selection", True)
    for dtype in (torch.float16, torch.float32, torch.float64):  # fp16: g·x overflows under a GradScaler
        assert not P.defers_dw(N, H, V, dtype, "token", True)
    for kind in ("sequence", "batch", "speculative"):  # heads that may take the two-pass form
        assert not P.defers_dw(N, H, V, torch.bfloat16, kind, True)
    assert not P.defers_dw(N, H, V, torch.bfloat16, "token", False)
    # a budget below the deferred run's least memory (du, dx32, g·x) keeps the accumulator's smaller buffers
    gib = 2**30
    assert P.defers_dw(8192, 4096, 151936, torch.bfloat16, "token", True, 4 * gib)
    assert not P.defers_dw(8192, 4096, 151936, torch.bfloat16, "token", True, 2.6 * gib)
    assert P.defers_dw(8192, 4096, 151936, torch.bfloat16, "token", True, 2.6 * gib, need_dx=False)


@pytest.mark.parametrize("g_out", [1.0, 0.37])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_matches_fp64_within_the_accumulating_plans_error(monkeypatch, mode, g_out):
    case = _case(seed=hash(mode) % 1000)
    want = _grads(case, mode, torch.float64, "recompute", g_out)
    calls = []
    real = OP.dw_from_du
    monkeypatch.setattr(OP, "dw_from_du", lambda *a: calls.append(1) or real(*a))
    got = _grads(case, mode, torch.bfloat16, "one_pass", g_out)
    assert calls == [1]  # GEMM 3 once, in the backward
    _no_defer(monkeypatch)
    acc = _grads(case, mode, torch.bfloat16, "one_pass", g_out)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    for i, (a, b, r) in enumerate(zip(got[1], acc[1], want[1])):
        err, acc_err = (a - r).abs().max().item(), (b - r).abs().max().item()
        # both round du to bf16 and the result once; deferred with g != 1 also rounds g·x (2^-9 relative per
        # element of x): at most about one bf16 ulp (2^-8) of the gradient's scale more
        ulp = 2.0**-8 * r.abs().max().item() if g_out != 1.0 else 1e-6 * r.abs().max().item()
        assert err <= 2.0 * acc_err + ulp, (i, err, acc_err)
        if i == 0:  # d hidden: GEMM 2 is the same in both
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_unit_gradient_is_the_accumulating_plans_value(monkeypatch):
    """g = 1: both plans multiply the same bf16 du by the same x in fp32; only the summation order differs."""
    case = _case(seed=3)
    got = _grads(case, "vanilla", torch.bfloat16, "one_pass", 1.0)
    _no_defer(monkeypatch)
    acc = _grads(case, "vanilla", torch.bfloat16, "one_pass", 1.0)
    torch.testing.assert_close(got[1][1], acc[1][1], atol=0, rtol=2**-7)


def test_grad_scaler_scale_stays_finite():
    case = _case(seed=4)
    loss, (dx, dw) = _grads(case, "vanilla", torch.bfloat16, "one_pass", 2.0**16)
    _, (_, ref) = _grads(case, "vanilla", torch.float64, "recompute", 2.0**16)
    assert torch.isfinite(dw).all()
    torch.testing.assert_close(dw, ref, atol=2e-2 * ref.abs().max().item(), rtol=0)


def test_all_masked_and_empty():
    case = _case(seed=5, mask_p=1.1)  # every token masked
    loss, (dx, dw) = _grads(case, "vanilla", torch.bfloat16, "one_pass", 1.0)
    assert loss.item() == 0 and not dx.any() and not dw.any()
    empty = _case(n=0, seed=6)
    loss, (dx, dw) = _grads(empty, "vanilla", torch.bfloat16, "one_pass", 1.0)
    assert loss.item() == 0 and dx.shape == (0, H) and dw.shape == (V, H) and not dw.any()


def test_forward_runs_no_gemm3_and_returns_padded_du():
    """run_one_pass under a deferred plan: no GEMM 3 stage; its dW output is the du of every token, rows
    padded to 16 bytes."""
    from fusedrl.loss import TokenHead
    from fusedrl.loss.inputs import flatten_batch

    case = _case(seed=8)
    x, w = case["hidden"].bfloat16(), case["weight"].bfloat16()
    batch = flatten_batch("targets", (N,), x.device, case["old_logp"], case["advantages"], case["mask"], None, {},
                          check_inputs=False)  # fmt: skip
    head = TokenHead(batch, PolicyLossConfig(), False, torch.float32)
    pln = P.plan(N, H, V, x.dtype, PolicyLossConfig(), "one_pass", 2**19)  # room for chunks of 64 rows
    assert pln.deferred and len(pln.chunks) > 1
    names = []
    out = RUN.run_one_pass(x, w, case["targets"], None, head, pln, 1.0, None, "torch", None, True, True, False,
                           False, timer=names.append)  # fmt: skip
    assert "gemm3" not in names and "gemm1" in names
    assert out.dw.shape == (N, C.du_row_stride(V)) and out.dw.dtype == torch.bfloat16


def test_compiles_fullgraph():
    case = _case(seed=9)

    def f(hidden, weight):
        loss, metrics = fused_policy_loss(hidden, weight, case["targets"], case["old_logp"], case["advantages"],
                                          case["mask"], ref_logp=case["ref_logp"], config=_config("vanilla"),
                                          schedule="one_pass", backend="torch")  # fmt: skip
        return loss, metrics["pg_clipfrac"]

    leaves = [case[k].bfloat16().requires_grad_() for k in ("hidden", "weight")]
    torch._dynamo.reset()
    loss, frac = torch.compile(f, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(3.0 * loss, leaves)
    eager = [case[k].bfloat16().requires_grad_() for k in ("hidden", "weight")]
    loss_e, frac_e = f(*eager)
    grads_e = torch.autograd.grad(3.0 * loss_e, eager)
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["vanilla", "kl_cov"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_gpu_matches_fp64_within_the_accumulating_plans_error(monkeypatch, backend, mode):
    """On a GPU (cuBLAS's bf16 GEMM for dW, the backend's epilogue), unaligned V."""
    import fusedrl

    if backend not in fusedrl.available_backends("cuda"):
        pytest.skip(f"{backend} unavailable on cuda")
    n, h, v = 1000, 512, 32003
    assert P.defers_dw(n, h, v, torch.bfloat16, "token", True)
    gpu = {k: t.cuda() for k, t in _case(n=n, h=h, v=v, seed=11).items()}
    want = _grads(gpu, mode, torch.float64, "recompute", 0.37, backend="torch")  # fp64 on the GPU: quick
    got = _grads(gpu, mode, torch.bfloat16, "one_pass", 0.37, backend=backend)
    _no_defer(monkeypatch)
    acc = _grads(gpu, mode, torch.bfloat16, "one_pass", 0.37, backend=backend)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    for a, b, r in zip(got[1], acc[1], want[1]):
        err, acc_err = (a - r).abs().max().item(), (b - r).abs().max().item()
        assert err <= 2.0 * acc_err + 2.0**-8 * r.abs().max().item(), (err, acc_err)  # g·x rounded (above)
