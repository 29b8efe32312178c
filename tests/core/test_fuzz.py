"""Property-based fuzzing (hypothesis): every available backend agrees with the reference.

* core op (hidden + weight) and the logits op: random shapes (incl. N = 0, V = 1, unaligned H/V),
  dtypes, temperature, softcap, bias, leading shapes; forward and gradients against an fp64
  reference in the CCE idiom of tests/_factory.py (error <= eager-in-input-dtype error + atol);
* policy_loss against fusedrl.loss.reference over modes x aggregations x layouts x masks x KL types;
* fused_policy_loss against policy_loss(reference core).

CI-bounded: derandomize=True (the same examples on every run), database=None, deadline=None and a
fixed max_examples per test; the triton interpreter gets few, tiny examples.
"""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from _factory import ATOL, GRAD_ATOL, assert_cce, eager_lowprec, err  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl import fused_policy_loss, reference  # noqa: E402
from fusedrl.loss import KL_LOSS_TYPES, LOSS_AGG_MODES, LOSS_MODES, PolicyLossConfig, policy_loss  # noqa: E402
from fusedrl.loss.reference import reference_policy_loss  # noqa: E402

CPU_BACKENDS = [b for b in fusedrl.available_backends("cpu") if b in ("torch", "triton")]
HAS_TRITON = "triton" in CPU_BACKENDS


def fuzz_settings(n):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def core_cases(draw, max_n=40, max_h=48, max_v=300):
    lead = draw(st.sampled_from([(), (1,), (2,)]))
    n = draw(st.integers(0, max_n))
    if lead:
        n = max(1, n // 2)
    h = draw(st.integers(1, max_h))
    v = draw(st.integers(1, max_v))
    dtype = draw(st.sampled_from(DTYPES))
    temperature = draw(st.sampled_from([1.0, 0.7]) | st.floats(0.1, 10.0))
    softcap = draw(st.none() | st.sampled_from([30.0]) | st.floats(1.0, 50.0))
    bias = draw(st.booleans())
    scale = draw(st.floats(0.25, 4.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(
        lead=lead,
        n=n,
        h=h,
        v=v,
        dtype=dtype,
        temperature=temperature,
        softcap=softcap,
        bias=bias,
        scale=scale,
        seed=seed,
    )


def materialise(c):
    g = torch.Generator().manual_seed(c["seed"])
    shape = (*c["lead"], c["n"])
    h, v, dt = c["h"], c["v"], c["dtype"]
    x = (torch.randn(*shape, h, generator=g) * c["scale"] / h**0.25).to(dt)
    w = (torch.randn(v, h, generator=g) / h**0.25).to(dt)
    b = (torch.randn(v, generator=g) * 0.5).to(dt) if c["bias"] else None
    t = torch.randint(0, v, shape, generator=g)
    return x, w, b, t


def _grads(lp, ent, leaves, g_lp, g_H):
    loss = (lp.double() * g_lp).sum() + (ent.double() * g_H).sum()
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def check_core(c, backend):
    x, w, b, t = materialise(c)
    T, cap, dt = c["temperature"], c["softcap"], c["dtype"]
    leaves = [p.clone().requires_grad_() for p in (x, w, b) if p is not None]
    xb = leaves[2] if b is not None else None
    lp, ent = fusedrl.linear_logprob_entropy(leaves[0], leaves[1], t, xb, temperature=T, softcap=cap, backend=backend)
    assert lp.shape == t.shape and ent.shape == t.shape and lp.dtype == torch.float32
    g = torch.Generator().manual_seed(c["seed"] + 1)
    g_lp = torch.randn(t.shape, generator=g, dtype=torch.float64)
    g_H = torch.randn(t.shape, generator=g, dtype=torch.float64)
    got = _grads(lp, ent, leaves, g_lp, g_H)

    l64 = [p.detach().double().requires_grad_() for p in leaves]
    r_lp, r_ent = reference.linear_logprob_entropy(l64[0], l64[1], t, l64[2] if b is not None else None, T, cap)
    want = _grads(r_lp, r_ent, l64, g_lp, g_H)
    low_leaves = [p.detach().clone().requires_grad_() for p in leaves]
    lo_lp, lo_ent = eager_lowprec(low_leaves[0], low_leaves[1], t, low_leaves[2] if b is not None else None, T, cap)
    low = _grads(lo_lp.float(), lo_ent.float(), low_leaves, g_lp, g_H)
    # at V = 1 eager's 0 * log 0 style terms are exact; the bound below is the CCE idiom
    assert_cce("logp", lp, r_lp, lo_lp, dt)
    assert_cce("entropy", ent, r_ent, lo_ent, dt)
    for name, a, r, lo in zip(("dx", "dW", "db"), got, want, low):
        assert a.dtype == dt and a.shape == r.shape
        scale = r.abs().max().item() + 1e-6 if r.numel() else 1.0
        assert_cce(name, a, r, lo, dt, atol=GRAD_ATOL[dt] * scale)


@fuzz_settings(150)
@given(c=core_cases())
def test_fuzz_core_torch(c):
    check_core(c, "torch")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available on CPU (needs TRITON_INTERPRET=1)")
@fuzz_settings(15)
@given(c=core_cases(max_n=9, max_h=20, max_v=140))
def test_fuzz_core_triton_interpreter(c):
    check_core(c, "triton")


@st.composite
def logits_cases(draw, max_n=30, max_v=400):
    n = draw(st.integers(0, max_n))
    v = draw(st.integers(1, max_v))
    return dict(
        n=n,
        v=v,
        dtype=draw(st.sampled_from(DTYPES)),
        temperature=draw(st.sampled_from([1.0]) | st.floats(0.1, 10.0)),
        softcap=draw(st.none() | st.floats(1.0, 50.0)),
        scale=draw(st.floats(0.5, 20.0)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_logits(c, backend):
    g = torch.Generator().manual_seed(c["seed"])
    dt, T, cap = c["dtype"], c["temperature"], c["softcap"]
    z = (torch.randn(c["n"], c["v"], generator=g) * c["scale"]).to(dt)
    t = torch.randint(0, c["v"], (c["n"],), generator=g)
    leaf = z.clone().requires_grad_()
    lp, ent = fusedrl.logprob_entropy(leaf, t, T, cap, backend=backend)
    g_lp = torch.randn(c["n"], generator=g, dtype=torch.float64)
    g_H = torch.randn(c["n"], generator=g, dtype=torch.float64)
    (gz,) = _grads(lp, ent, [leaf], g_lp, g_H)
    z64 = z.double().requires_grad_()
    r_lp, r_ent = reference.logprob_entropy(z64, t, T, cap)
    (rz,) = _grads(r_lp, r_ent, [z64], g_lp, g_H)
    assert err(lp, r_lp) <= ATOL[torch.float32] * max(1.0, c["scale"] / T)
    assert err(ent, r_ent) <= 1e-4 * max(1.0, c["scale"] / T)
    assert gz.dtype == dt
    # the output gradient is rounded to the logits' dtype: its own rounding is the tolerance
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dt]
    assert err(gz, rz) <= tol * ((rz.abs().max().item() if rz.numel() else 0.0) + 1e-3) + 1e-7


@fuzz_settings(100)
@given(c=logits_cases())
def test_fuzz_logits_torch(c):
    check_logits(c, "torch")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available on CPU (needs TRITON_INTERPRET=1)")
@fuzz_settings(10)
@given(c=logits_cases(max_n=8, max_v=200))
def test_fuzz_logits_triton_interpreter(c):
    check_logits(c, "triton")


# --------------------------------------------------------------------------------------------------
# policy_loss vs the eager oracle
# --------------------------------------------------------------------------------------------------
@st.composite
def loss_cases(draw):
    mode = draw(st.sampled_from(LOSS_MODES))
    agg = draw(st.sampled_from(LOSS_AGG_MODES))
    packed = draw(st.booleans())
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 9))
    density = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    per_seq_adv = draw(st.booleans())
    cfg = dict(
        loss_mode=mode,
        loss_agg_mode=agg,
        clip_ratio_low=draw(st.sampled_from([0.2, 0.1])),
        clip_ratio_high=draw(st.sampled_from([0.2, 0.28])),
        clip_ratio_c=draw(st.sampled_from([3.0, None, 1.5])),
        entropy_coeff=draw(st.sampled_from([0.0, 0.01])),
        kl_loss_coef=draw(st.sampled_from([0.0, 0.1])),
        kl_loss_type=draw(st.sampled_from(KL_LOSS_TYPES)),
        # covariance modes: ratio 1 makes the selection independent of near-ties in the key
        clip_cov_ratio=draw(st.sampled_from([1.0, 0.3])),
        clip_cov_lb=draw(st.sampled_from([-1.0, 0.0])),
        clip_cov_ub=draw(st.sampled_from([5.0, 0.5])),
        kl_cov_ratio=draw(st.sampled_from([1.0, 0.2, 2e-4])),
        ppo_kl_coef=draw(st.sampled_from([1.0, 0.5])),
        global_num_tokens=draw(st.none() | st.sampled_from([7, 100.0])),
        global_num_seqs=draw(st.none() | st.sampled_from([3, 8.0])),
        norm_len=draw(st.none() | st.sampled_from([16])),
    )
    return dict(
        B=B,
        T=T,
        packed=packed,
        density=density,
        per_seq_adv=per_seq_adv,
        cfg=cfg,
        log_ratio_scale=draw(st.sampled_from([0.05, 0.3, 1.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def loss_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, T = c["B"], c["T"]
    f64 = torch.float64
    mask = torch.rand(B, T, generator=g) < c["density"]
    logp = -torch.rand(B, T, generator=g, dtype=f64) * 3
    old = logp + c["log_ratio_scale"] * torch.randn(B, T, generator=g, dtype=f64)
    adv = torch.randn(B, generator=g, dtype=f64) if c["per_seq_adv"] else torch.randn(B, T, generator=g, dtype=f64)
    ent = torch.rand(B, T, generator=g, dtype=f64) * 2
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=f64)
    out = dict(logp=logp, old_logp=old, advantages=adv, mask=mask, entropy=ent, ref_logp=ref)
    if c["packed"]:
        lens = torch.randint(0, T + 1, (B,), generator=g)
        idx = torch.cat([torch.arange(i * T, i * T + int(n)) for i, n in enumerate(lens)]).long()
        flat = {k: v.reshape(-1)[idx] for k, v in out.items() if k != "advantages"}
        flat["advantages"] = adv if c["per_seq_adv"] else adv.reshape(-1)[idx]
        flat["cu_seqlens"] = torch.tensor([0] + lens.cumsum(0).tolist(), dtype=torch.int64)
        out = flat
    out["logp"] = out["logp"].clone().requires_grad_()
    out["entropy"] = out["entropy"].clone().requires_grad_()
    return out


@fuzz_settings(300)
@given(c=loss_cases())
def test_fuzz_policy_loss_vs_reference(c):
    cfg_kw = dict(c["cfg"])
    results = []
    for fn in (policy_loss, reference_policy_loss):
        inputs = loss_inputs(c)
        cfg = PolicyLossConfig(**cfg_kw, generator=torch.Generator().manual_seed(c["seed"] % 1000))
        loss, metrics = fn(**inputs, config=cfg)
        wrt = [inputs["logp"], inputs["entropy"]]
        # the oracle returns a constant 0 (no graph) for an all-masked batch
        grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None, None]
        grads = [torch.zeros_like(w) if gr is None else gr for gr, w in zip(grads, wrt)]
        results.append((loss, metrics, grads))
    (l1, m1, g1), (l2, m2, g2) = results
    assert torch.isfinite(l1) and all(torch.isfinite(gr).all() for gr in g1)
    torch.testing.assert_close(l1.detach().double(), l2.detach().double(), atol=1e-10, rtol=1e-9)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-10, rtol=1e-9)
    assert set(m1) == set(m2)
    for k in m1:
        torch.testing.assert_close(m1[k].double(), m2[k].double(), atol=1e-6, rtol=1e-5, msg=k)
    if not c["density"]:
        assert l1.item() == 0.0 and all((gr == 0).all() for gr in g1)


# --------------------------------------------------------------------------------------------------
# fused_policy_loss vs policy_loss(reference core) on every backend
# --------------------------------------------------------------------------------------------------
@st.composite
def fused_cases(draw, backends):
    return dict(
        backend=draw(st.sampled_from(backends)),
        mode=draw(st.sampled_from(LOSS_MODES)),
        agg=draw(st.sampled_from(LOSS_AGG_MODES)),
        packed=draw(st.booleans()),
        B=draw(st.integers(1, 3)),
        T=draw(st.integers(1, 6)),
        H=draw(st.integers(1, 20)),
        V=draw(st.integers(1, 90)),
        temperature=draw(st.sampled_from([1.0, 0.6])),
        softcap=draw(st.sampled_from([None, 10.0])),
        bias=draw(st.booleans()),
        entropy_coeff=draw(st.sampled_from([0.0, 0.02])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_fused(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, T, H, V = c["B"], c["T"], c["H"], c["V"]
    hidden = torch.randn(B, T, H, generator=g) / H**0.25
    weight = torch.randn(V, H, generator=g) / H**0.25
    bias = torch.randn(V, generator=g) * 0.3 if c["bias"] else None
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    targets = targets.masked_fill(~mask, -100)
    old = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, generator=g)
    cu = None
    if c["packed"]:
        hidden, targets, old, mask = (q.reshape(B * T, *q.shape[2:]) for q in (hidden, targets, old, mask))
        cu = torch.tensor([0] + [T * (i + 1) for i in range(B)])
    cfg = PolicyLossConfig(
        loss_mode=c["mode"],
        loss_agg_mode=c["agg"],
        entropy_coeff=c["entropy_coeff"],
        clip_cov_ratio=1.0,
        kl_cov_ratio=1.0,
    )
    kw = dict(temperature=c["temperature"], softcap=c["softcap"])
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    loss, metrics = fused_policy_loss(
        leaves[0], leaves[1], targets, old, adv, mask, bias=bias, cu_seqlens=cu, config=cfg, backend=c["backend"], **kw
    )
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    r_leaves = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    lp, ent = reference.linear_logprob_entropy(
        r_leaves[0], r_leaves[1], targets.masked_fill(~mask, 0), None if bias is None else bias.double(), **kw
    )
    want, r_metrics = policy_loss(lp, old.double(), adv.double(), mask, entropy=ent, cu_seqlens=cu, config=cfg)
    ref_grads = torch.autograd.grad(want, r_leaves, allow_unused=True)
    assert abs(loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    for a, r in zip(got, ref_grads):
        a = torch.zeros_like(r) if a is None else a
        r = torch.zeros_like(a) if r is None else r
        assert err(a, r) <= 1e-5 * (r.abs().max().item() + 1)
    for k in ("pg_loss", "ppo_kl"):
        assert abs(metrics[k].item() - r_metrics[k].item()) <= 1e-5 * (1 + abs(r_metrics[k].item()))


@fuzz_settings(60)
@given(c=fused_cases(["torch", "reference"]))
def test_fuzz_fused_policy_loss(c):
    check_fused(c)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not available on CPU (needs TRITON_INTERPRET=1)")
@fuzz_settings(8)
@given(c=fused_cases(["triton"]))
def test_fuzz_fused_policy_loss_triton_interpreter(c):
    check_fused(c)


# --------------------------------------------------------------------------------------------------
# GPU: the same properties on CUDA for every backend there (fp32 accumulation on real hardware)
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@fuzz_settings(25)
@given(c=core_cases(max_n=300, max_h=160, max_v=5000), backend=st.sampled_from(["torch", "triton", "cuda"]))
def test_fuzz_core_cuda(c, backend):
    if backend not in fusedrl.available_backends("cuda"):
        return
    x, w, b, t = materialise(c)
    x, w, t = x.cuda(), w.cuda(), t.cuda()
    b = None if b is None else b.cuda()
    lp, ent = fusedrl.linear_logprob_entropy(
        x, w, t, b, temperature=c["temperature"], softcap=c["softcap"], backend=backend
    )
    r_lp, r_ent = reference.linear_logprob_entropy(
        x.double(), w.double(), t, None if b is None else b.double(), c["temperature"], c["softcap"]
    )
    lo_lp, lo_ent = eager_lowprec(x, w, t, b, c["temperature"], c["softcap"])
    assert_cce("logp", lp, r_lp, lo_lp, c["dtype"])
    assert_cce("entropy", ent, r_ent, lo_ent, c["dtype"])
    assert math.isfinite(float(lp.sum())) or lp.numel() == 0
