"""Core op (linear_logprob_entropy / logprob_entropy) on the torch backend vs the reference.

Every registry backend available here is compared too (the triton interpreter has its own, smaller
shape list in test_triton_backend.py, so it is excluded from the large shapes here).
"""

import pytest
import torch
from _factory import DTYPES, GRAD_ATOL, assert_cce, eager_lowprec, err, make_case, ref64

import fusedrl
from fusedrl import reference
from fusedrl.backends import BackendUnavailable

SHAPES = [(1, 24, 507), (37, 123, 1003), (300, 24, 1003), (37, 24, 32000), (300, 123, 507)]
OPTIONS = [
    dict(bias=False, temperature=1.0, softcap=None),
    dict(bias=True, temperature=0.7, softcap=None),
    dict(bias=True, temperature=0.7, softcap=30.0),
]


def _grads(lp, ent, inputs, g_lp, g_H):
    loss = (lp.double() * g_lp).sum() + ((ent.double() * g_H).sum() if ent is not None else 0.0)
    return torch.autograd.grad(loss, [t for t in inputs if t is not None])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-H{s[1]}-V{s[2]}")
@pytest.mark.parametrize("opt", OPTIONS, ids=["plain", "bias-T0.7", "bias-T0.7-softcap30"])
def test_torch_backend_matches_reference(dtype, shape, opt):
    n, h, v = shape
    x, w, b, t = make_case(n, h, v, dtype, bias=opt["bias"], scale=4.0)
    T, c = opt["temperature"], opt["softcap"]
    leaves = [p.requires_grad_() for p in (x, w, b) if p is not None]
    lp, ent = fusedrl.linear_logprob_entropy(x, w, t, b, temperature=T, softcap=c, backend="torch")
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32 and lp.shape == (n,)
    r_lp, r_ent = ref64(x.detach(), w.detach(), t, None if b is None else b.detach(), T, c)
    lo_lp, lo_ent = eager_lowprec(x.detach(), w.detach(), t, None if b is None else b.detach(), T, c)
    assert_cce("logp", lp, r_lp, lo_lp, dtype)
    assert_cce("entropy", ent, r_ent, lo_ent, dtype)

    g_lp, g_H = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    got = _grads(lp, ent, leaves, g_lp, g_H)
    leaves64 = [p.detach().double().requires_grad_() for p in leaves]
    xb = leaves64[2] if b is not None else None
    r_lp, r_ent = reference.linear_logprob_entropy(leaves64[0], leaves64[1], t, xb, T, c)
    want = _grads(r_lp, r_ent, leaves64, g_lp, g_H)
    lows = [p.detach().clone().requires_grad_() for p in leaves]
    lo_lp, lo_ent = eager_lowprec(lows[0], lows[1], t, lows[2] if b is not None else None, T, c)
    low = _grads(lo_lp.float(), lo_ent.float(), lows, g_lp, g_H)
    for name, g, r, lo in zip(("dx", "dW", "db"), got, want, low):
        assert g.dtype == dtype
        scale = r.abs().max().item() + 1e-6
        assert_cce(name, g, r, lo, dtype, atol=GRAD_ATOL[dtype] * scale)


def test_reference_fp32_vs_fp64_large_vocab():
    """The oracle itself: fp32 logp within 1e-5 of fp64 at a 152k vocabulary."""
    x, w, _, t = make_case(4, 64, 151936, torch.float32, scale=2.0)
    lp, ent = reference.linear_logprob_entropy(x, w, t)
    r_lp, r_ent = ref64(x, w, t, None, 1.0, None)
    assert err(lp, r_lp) < 1e-5 and err(ent, r_ent) < 1e-4


def test_torch_backend_large_vocab_fp32_precision():
    x, w, _, t = make_case(8, 64, 151936, torch.float32, scale=2.0)
    lp, ent = fusedrl.linear_logprob_entropy(x, w, t, backend="torch")
    r_lp, r_ent = ref64(x, w, t, None, 1.0, None)
    assert err(lp, r_lp) < 1e-5 and err(ent, r_ent) < 1e-4


@pytest.mark.parametrize("budget_mb", [0.002, 0.05])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_torch_backend_multi_tile_merge(budget_mb, softcap):
    """Tiny workspace budgets force many token and vocab tiles (online max rescaling, merges)."""
    x, w, b, t = make_case(53, 24, 1003, torch.float64, bias=True, scale=6.0)
    leaves = [p.requires_grad_() for p in (x, w, b)]
    lp, ent = fusedrl.linear_logprob_entropy(
        x, w, t, b, temperature=0.7, softcap=softcap, backend="torch", workspace_mb=budget_mb
    )
    r_lp, r_ent = reference.linear_logprob_entropy(x, w, t, b, 0.7, softcap)
    assert err(lp, r_lp) < 1e-10 and err(ent, r_ent) < 1e-10
    g_lp, g_H = torch.randn(53, dtype=torch.float64), torch.randn(53, dtype=torch.float64)
    for g, r in zip(_grads(lp, ent, leaves, g_lp, g_H), _grads(r_lp, r_ent, leaves, g_lp, g_H)):
        assert err(g, r) < 1e-10


def test_leading_shape_and_no_entropy():
    x, w, b, t = make_case(2 * 9, 24, 507, torch.float32, bias=True)
    x3, t3 = x.reshape(2, 9, 24).requires_grad_(), t.reshape(2, 9)
    lp, ent = fusedrl.linear_logprob_entropy(x3, w, t3, b, backend="torch", return_entropy=False)
    assert ent is None and lp.shape == (2, 9)
    r_lp, _ = reference.linear_logprob_entropy(x3, w, t3, b)
    assert err(lp, r_lp) < 1e-5
    g = torch.randn(2, 9)
    (gx,) = torch.autograd.grad((lp * g).sum(), x3)
    (rx,) = torch.autograd.grad((r_lp * g).sum(), x3)
    assert err(gx, rx) < 1e-5


def test_gradcheck_fp64_torch_backend():
    x, w, b, t = make_case(5, 7, 11, torch.float64, bias=True)
    x, w, b = (p.requires_grad_() for p in (x, w, b))
    for c in (None, 3.0):
        assert torch.autograd.gradcheck(
            lambda x, w, b: fusedrl.linear_logprob_entropy(x, w, t, b, temperature=0.7, softcap=c, backend="torch"),  # noqa: B023
            (x, w, b),
        )
    logits = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    tt = torch.randint(0, 13, (6,))
    assert torch.autograd.gradcheck(
        lambda z: fusedrl.logprob_entropy(z, tt, temperature=0.7, softcap=3.0, backend="torch"), (logits,)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inplace", [False, True])
def test_logprob_entropy_from_logits(dtype, inplace):
    logits = (torch.randn(3, 11, 1003) * 5).to(dtype)
    t = torch.randint(0, 1003, (3, 11))
    z = logits.clone().requires_grad_()
    r_lp, r_ent = reference.logprob_entropy(logits.double(), t, 0.7, 30.0)
    g_lp, g_H = torch.randn(3, 11, dtype=torch.float64), torch.randn(3, 11, dtype=torch.float64)
    if inplace:
        buf = logits.clone().requires_grad_()
        leaf = buf
        lp, ent = fusedrl.logprob_entropy(buf * 1, t, 0.7, 30.0, backend="torch", inplace_backward=True)
    else:
        leaf = z
        lp, ent = fusedrl.logprob_entropy(z, t, 0.7, 30.0, backend="torch")
    assert err(lp, r_lp) < 1e-5 and err(ent, r_ent) < 1e-4
    (g,) = torch.autograd.grad((lp.double() * g_lp + ent.double() * g_H).sum(), leaf)
    z64 = logits.double().requires_grad_()
    a, b = reference.logprob_entropy(z64, t, 0.7, 30.0)
    (r,) = torch.autograd.grad((a * g_lp + b * g_H).sum(), z64)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert g.dtype == dtype and err(g, r) <= tol * (r.abs().max().item() + 1)


def test_empty_batch():
    x = torch.zeros(0, 24, requires_grad=True)
    w = torch.randn(507, 24, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    lp, ent = fusedrl.linear_logprob_entropy(x, w, t, backend="torch")
    assert lp.shape == (0,) and ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert x.grad.shape == (0, 24) and torch.count_nonzero(w.grad) == 0


def test_no_grad_scoring_matches():
    x, w, b, t = make_case(37, 24, 1003, torch.float32, bias=True)
    with torch.no_grad():
        lp, ent = fusedrl.linear_logprob_entropy(x.requires_grad_(), w, t, b, backend="torch")
    assert not lp.requires_grad
    r_lp, r_ent = reference.linear_logprob_entropy(x.detach(), w, t, b)
    assert err(lp, r_lp) < 1e-5 and err(ent, r_ent) < 1e-5


# --------------------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------------------
def test_backend_registry(monkeypatch):
    x, w, _, t = make_case(4, 24, 507, torch.float32)
    assert "torch" in fusedrl.available_backends("cpu")
    if not torch.cuda.is_available():  # nothing runs on a CUDA device torch cannot use
        assert fusedrl.available_backends("cuda") == []
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedrl.linear_logprob_entropy(x, w, t, backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="cuda"):
            fusedrl.linear_logprob_entropy(x, w, t, backend="cuda")
    monkeypatch.setenv("FUSEDRL_BACKEND", "reference")
    lp, _ = fusedrl.linear_logprob_entropy(x, w, t)
    assert lp.grad_fn is None or "Custom" not in type(lp.grad_fn).__name__
    monkeypatch.setenv("FUSEDRL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable FUSEDRL_BACKEND='bogus': must be one of"):
        fusedrl.linear_logprob_entropy(x, w, t)


# --------------------------------------------------------------------------------------------------
# bad input: a clear exception naming the argument
# --------------------------------------------------------------------------------------------------
def _base():
    x, w, b, t = make_case(6, 24, 50, torch.float32, bias=True)
    return dict(hidden=x, weight=w, targets=t, bias=b)


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (lambda a: a.update(hidden=torch.randn(6, 23)), ValueError, "hidden size mismatch"),
        (lambda a: a.update(targets=a["targets"].float()), TypeError, "targets"),
        (lambda a: a.update(targets=a["targets"].clone().fill_(50)), ValueError, "targets must lie"),
        (lambda a: a.update(targets=a["targets"].clone().fill_(-1)), ValueError, "targets must lie"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
        (lambda a: a.update(temperature=-1.0), ValueError, "temperature"),
        (lambda a: a.update(softcap=0.0), ValueError, "softcap"),
        (lambda a: a.update(weight=torch.randn(2, 50, 24)), ValueError, "weight must be 2-D"),
        (lambda a: a.update(weight=torch.randn(50, 24, device="meta")), ValueError, "device"),
        (lambda a: a.update(targets=a["targets"][:5]), ValueError, "targets shape"),
        (lambda a: a.update(hidden=a["hidden"].double()), TypeError, "same dtype"),
        (lambda a: a.update(bias=torch.randn(49)), ValueError, "bias"),
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden"),
    ],
)
def test_bad_inputs(change, exc, match):
    args = _base()
    change(args)
    with pytest.raises(exc, match=match):
        fusedrl.linear_logprob_entropy(**args, backend="torch")


def test_bad_logits_inputs():
    z = torch.randn(4, 10)
    with pytest.raises(ValueError, match="targets must lie"):
        fusedrl.logprob_entropy(z, torch.full((4,), 10))
    with pytest.raises(TypeError, match="targets"):
        fusedrl.logprob_entropy(z, torch.zeros(4))
    with pytest.raises(ValueError, match="temperature"):
        fusedrl.logprob_entropy(z, torch.zeros(4, dtype=torch.long), temperature=float("nan"))
