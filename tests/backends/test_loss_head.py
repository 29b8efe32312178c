"""Per-token policy-loss head kernels against fusedrl.loss's torch path: the Triton head
(fusedrl/backends/triton/head.py) and the CUDA head (csrc/head.cu via fusedrl/backends/cuda/head.py).

Oracle: fusedrl.loss.modes' own ``loss_vanilla`` on ``Tokens`` built the way ``policy_loss`` builds them
(clean -> fp32 -> log-ratio), with torch autograd for the gradient; per-token flags against the
same formulas. Every test runs once per head (the ``H`` fixture). Without CUDA the triton kernel runs
in the triton interpreter (tiny shapes; BLOCK_N = 32 so N = 70 covers 3 blocks and a ragged tail) and
the CUDA head's per-token C++ code runs as a host loop over CPU tensors (the kernels themselves need
a GPU: on one, DEV is cuda and the same tests launch them). ``exp`` differs by at most 1 ulp between
numpy / libm and torch's CPU exp, hence rtol ~1e-6 on values; flags are compared exactly.
"""

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fusedrl  # noqa: E402
from fusedrl import loss as loss_mod  # noqa: E402
from fusedrl.backends import head_module  # noqa: E402
from fusedrl.loss import heads as loss_heads  # noqa: E402
from fusedrl.loss import inputs as loss_inputs  # noqa: E402
from fusedrl.loss import modes as loss_modes  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HEADS = ("triton", "cuda")


def _head_module(kind):
    if kind == "triton":
        pytest.importorskip("triton")
    mod = head_module(kind)
    ok, why = mod.is_available(torch.device(DEV))
    if not ok:
        pytest.skip(f"{kind} head unavailable on {DEV}: {why}")
    return mod


@pytest.fixture(params=HEADS)
def H(request):
    """The head module under test (skipped where it is not available)."""
    return _head_module(request.param)


def _kind(H):
    """The backend name of a head module."""
    return "triton" if H.__name__ == "fusedrl.backends.triton.head" else "cuda"


RTOL, ATOL = 1e-6, 1e-6


def _case(n, seed=0, dtype=torch.float32, big_d=True, zero_a=True, bad_masked=True, shape=None):
    """Random inputs with |d| = 30 tokens, A = 0 tokens, ratios near the clip bounds and NaN/inf padding."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    d = torch.randn(n, generator=g, dtype=torch.float64) * 0.3
    if big_d and n >= 4:
        d[1], d[2] = 30.0, -30.0
    logp = old + d
    adv = torch.randn(n, generator=g, dtype=torch.float64) * 2
    if zero_a and n >= 6:
        adv[5] = 0.0
    mask = torch.rand(n, generator=g) > 0.25
    if bad_masked and n >= 8:
        mask[3] = mask[7] = False
        logp[3], old[3], adv[3] = float("nan"), float("inf"), float("nan")
        logp[7], old[7] = -float("inf"), float("-inf")
    if shape is not None:
        logp, old, adv, mask = (t.reshape(shape) for t in (logp, old, adv, mask))
    return [t.to(dtype).to(DEV) for t in (logp, old, adv)] + [mask.to(DEV)]


def _torch_path(logp, old, adv, mask, low, high, c):
    """fusedrl.loss's per-token vanilla computation (``policy_loss`` cleaning + ``modes.loss_vanilla``)."""
    valid = mask.reshape(-1) != 0
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    zeros = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    clean = lambda x: torch.where(valid, x.reshape(-1).to(dtype), zeros)  # noqa: E731
    lp, o = clean(logp), clean(old.detach())
    tok = loss_inputs.Tokens(
        valid=valid, n_valid=valid.sum(), logp=lp, old_logp=o, adv=clean(adv.detach()), log_ratio=lp - o, seg=None
    )
    # no config validation; vanilla PPO at token level without TRL's delta cap (what the kernels compute)
    cfg = SimpleNamespace(
        clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=c, delta=None, importance_sampling_level="token"
    )
    return tok, loss_modes.loss_vanilla(tok, cfg)


def _flags(tok, low, high, c):
    """Per-token metric flags from the formulas of fusedrl.loss."""
    lr = tok.log_ratio.detach().clamp(-20, 20)
    r = torch.exp(lr)
    a = tok.adv
    l1, l2 = -a * r, -a * r.clamp(1 - low, 1 + high)
    lc = torch.maximum(l1, l2)
    clipped = (l2 > l1) & tok.valid
    lower = torch.zeros_like(clipped) if c is None else (lc > -a * c) & (a < 0) & tok.valid
    return clipped, lower, torch.where(tok.valid, -lr, torch.zeros_like(lr))


def _check(H, logp, old, adv, mask, low=0.2, high=0.2, c=3.0, seed=1):
    leaf = logp.detach().clone().requires_grad_(True)
    L, clipped, lower, neg_d = H.vanilla_token_terms(leaf, old, adv, mask, low, high, c)
    assert L.shape == clipped.shape == lower.shape == neg_d.shape == logp.shape
    assert clipped.dtype == lower.dtype == torch.bool
    cdt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    assert L.dtype == neg_d.dtype == cdt
    assert torch.isfinite(L).all() and torch.isfinite(neg_d).all()

    leaf_ref = logp.detach().clone().requires_grad_(True)
    tok, pg = _torch_path(leaf_ref, old, adv, mask, low, high, c)
    valid = tok.valid
    L_flat = L.reshape(-1)
    # values: same per-token loss on valid tokens, exact 0 on masked ones
    torch.testing.assert_close(
        torch.where(valid, L_flat, 0.0), torch.where(valid, pg.loss.detach(), 0.0), rtol=RTOL, atol=ATOL
    )
    assert (L_flat[~valid] == 0).all()
    fc, fl, fn = _flags(tok, low, high, c)
    assert torch.equal(clipped.reshape(-1), fc)
    assert torch.equal(lower.reshape(-1), fl)
    torch.testing.assert_close(neg_d.reshape(-1), fn, rtol=RTOL, atol=ATOL)
    # metrics as fusedrl.loss aggregates them
    torch.testing.assert_close(tok.masked_mean(clipped.reshape(-1)), pg.clipfrac)
    torch.testing.assert_close(tok.masked_mean(lower.reshape(-1)), pg.clipfrac_lower)
    torch.testing.assert_close(tok.masked_mean(neg_d.reshape(-1)), pg.ppo_kl, rtol=RTOL, atol=ATOL)

    # gradient: dlogp = grad_L * coef, against autograd through fusedrl.loss (upstream as the aggregator:
    # zero at masked tokens)
    g = torch.randn(valid.shape, generator=torch.Generator().manual_seed(seed), dtype=cdt).to(DEV)
    g = torch.where(valid, g, torch.zeros_like(g))
    (gk,) = torch.autograd.grad(L, leaf, g.reshape(L.shape))
    (gt,) = torch.autograd.grad(pg.loss, leaf_ref, g)
    assert gk.dtype == logp.dtype and gk.shape == logp.shape
    assert torch.isfinite(gk).all()
    torch.testing.assert_close(gk.reshape(-1), gt.reshape(-1), rtol=RTOL * 4, atol=ATOL)
    assert (gk.reshape(-1)[~valid] == 0).all()
    return L, clipped, lower, neg_d, gk


@pytest.mark.parametrize("c", [3.0, None], ids=["dualclip", "nodual"])
@pytest.mark.parametrize("low,high", [(0.2, 0.2), (0.2, 0.28)], ids=["sym", "cliphigher"])
def test_values_and_grads_random(H, low, high, c):
    logp, old, adv, mask = _case(70)  # 3 blocks of 32 in the interpreter, ragged tail
    L, clipped, lower, neg_d, gk = _check(H, logp, old, adv, mask, low, high, c)
    # |d| = 30 is clamped: neg_d = -+20, zero gradient; A = 0 gives 0 loss and 0 gradient
    v = mask.reshape(-1)
    if v[1]:
        assert neg_d[1].item() == -20.0 and gk[1].item() == 0.0
    if v[2]:
        assert neg_d[2].item() == 20.0 and gk[2].item() == 0.0
    if v[5]:
        assert L[5].item() == 0.0 and gk[5].item() == 0.0
    assert clipped.any() and (lower.any() if c is not None else not lower.any())


@pytest.mark.parametrize("n", [0, 1, 32, 33, 257])
def test_sizes(H, n):
    _check(H, *_case(n, seed=n))


def test_padded_2d_bf16_and_no_mask(H):
    _check(H, *_case(40, seed=3, shape=(4, 10)))
    logp, old, adv, mask = _case(37, seed=4, dtype=torch.bfloat16, bad_masked=False)
    _check(H, logp, old, adv, mask, 0.2, 0.28, 3.0)
    # mask=None: every token valid
    logp, old, adv, _ = _case(37, seed=5, bad_masked=False)
    L, *_ = H.vanilla_token_terms(logp, old, adv, None, 0.2, 0.2, 3.0)
    L2, *_ = H.vanilla_token_terms(logp, old, adv, torch.ones_like(logp, dtype=torch.bool), 0.2, 0.2, 3.0)
    assert torch.equal(L, L2)


def test_float64_falls_back_to_torch(H):
    _check(H, *_case(37, seed=6, dtype=torch.float64))


def test_ties_split_gradient_like_torch(H):
    """d = 0 (r = 1, L1 == L2) and dual-clip ties Lc == -A c get torch's half/half gradient."""
    n = 8
    logp = torch.full((n,), -1.0, device=DEV)
    old = logp.clone()
    adv = torch.tensor([-1.0, -2.0, 1.0, 0.0, -0.5, 3.0, -1.0, 2.0], device=DEV)
    mask = torch.ones(n, dtype=torch.bool, device=DEV)
    _, _, lower, _, _ = _check(H, logp, old, adv, mask, 0.2, 0.2, 1.0)  # c = 1: Lc == -A c where A < 0
    assert not lower.any()
    leaf = logp.clone().requires_grad_(True)
    L, *_ = H.vanilla_token_terms(leaf, old, adv, mask, 0.2, 0.2, 1.0)
    L.sum().backward()
    assert torch.equal(leaf.grad, torch.where(adv < 0, -adv / 2, -adv))
    # low = high = 0: r = 1 sits on both clamp bounds, still tied
    _check(H, logp, old, adv, mask, 0.0, 0.0, None)


def test_masked_nan_inf_never_leak(H):
    logp, old, adv, mask = _case(70, seed=7)
    mask = mask.clone()
    mask[::3] = False
    logp, old, adv = logp.clone(), old.clone(), adv.clone()
    logp[~mask] = float("nan")
    old[~mask] = float("inf")
    adv[~mask] = float("-inf")
    L, clipped, lower, neg_d, gk = _check(H, logp, old, adv, mask)
    assert not clipped[~mask].any() and not lower[~mask].any() and (neg_d[~mask] == 0).all()
    # all masked
    none = torch.zeros_like(mask)
    _check(H, logp, old, adv, none)


def test_nan_at_valid_tokens_propagates_like_torch(H):
    """Garbage in at a *valid* token: NaN loss there, as the torch path (never hidden)."""
    logp, old, adv, mask = _case(37, seed=13, bad_masked=False)
    mask = torch.ones_like(mask)
    logp = logp.clone()
    logp[4] = float("nan")
    L, clipped, lower, neg_d = H.vanilla_token_terms(logp, old, adv, mask, 0.2, 0.2, 3.0)
    _, pg = _torch_path(logp, old, adv, mask, 0.2, 0.2, 3.0)
    assert torch.isnan(L[4]) and torch.isnan(pg.loss[4]) and torch.isnan(neg_d[4])
    assert not clipped[4] and not lower[4]
    keep = torch.arange(37, device=DEV) != 4
    torch.testing.assert_close(L[keep], pg.loss[keep].detach(), rtol=RTOL, atol=ATOL)


def test_custom_op_registration(H):
    """torch.library.opcheck: schema, fake (meta) impl and autograd registration are consistent."""
    logp, old, adv, mask = _case(37, seed=8)
    logp = logp.detach().requires_grad_(True)
    for c in (3.0, None):
        torch.library.opcheck(
            H._vanilla_op,
            (logp, old, adv, mask, 0.2, 0.28, c),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


def test_compile_fullgraph(H):
    logp, old, adv, mask = _case(37, seed=9)

    def f(lp):
        L, clipped, lower, neg_d = H.vanilla_token_terms(lp, old, adv, mask, 0.2, 0.28, 3.0)
        return L.sum() + clipped.sum() + neg_d.sum()

    leaf_e = logp.detach().clone().requires_grad_(True)
    leaf_c = logp.detach().clone().requires_grad_(True)
    torch._dynamo.reset()
    fc = torch.compile(f, fullgraph=True, backend="aot_eager")
    (f(leaf_e)).backward()
    (fc(leaf_c)).backward()
    assert torch.equal(leaf_e.grad, leaf_c.grad)


def test_is_available_reasons(H):
    ok, why = H.is_available(torch.device(DEV))
    assert ok and why == ""
    ok, why = H.is_available(torch.device("meta"))
    assert not ok and "meta" in why


# --------------------------------------------------------------------------------------------------
# The covariance kernel (cuda head): Clip-Cov / KL-Cov statistic and candidates
# --------------------------------------------------------------------------------------------------


def _cov_reference(logp, old, adv, mask, low, high, lb, ub):
    """fusedrl.loss.selection's ``covariance`` and Clip-Cov candidate formulas on the cleaned tokens."""
    tok, _ = _torch_path(logp, old, adv, mask, low, high, None)
    denom = tok.count()
    mean_a, mean_lp = tok.adv.sum() / denom, tok.logp.sum() / denom
    cov = (tok.adv - mean_a) * (tok.logp - mean_lp)
    r = torch.exp(tok.log_ratio.clamp(-20, 20))
    l1, l2 = -tok.adv * r, -tok.adv * r.clamp(1 - low, 1 + high)
    cand = tok.valid & ~(l2 > l1) & (cov > lb) & (cov < ub)
    return tok, mean_a, mean_lp, cov, cand


@pytest.mark.parametrize("n", [0, 1, 70, 1000])
def test_cuda_cov_terms_bitwise(n):
    ch = _head_module("cuda")
    logp, old, adv, mask = _case(n, seed=20 + n)
    low, high, lb, ub = 0.2, 0.28, -0.5, 2.0
    tok, mean_a, mean_lp, cov_ref, cand_ref = _cov_reference(logp, old, adv, mask, low, high, lb, ub)
    cov, cand = ch.cov_terms(tok.logp, tok.old_logp, tok.adv, tok.valid, mean_a, mean_lp, (low, high, lb, ub))
    assert cov.dtype == torch.float32 and cand.dtype == torch.bool
    assert torch.equal(cov, cov_ref)  # same fp32 operations in the same order: bitwise
    assert torch.equal(cand, cand_ref)
    if n >= 70:
        assert cand.any() and not cand.all()
    cov2, none = ch.cov_terms(tok.logp, tok.old_logp, tok.adv, None, mean_a, mean_lp)  # KL-Cov: no candidates
    assert none is None and cov2.shape == cov.shape
    # padded [B, T] inputs and raw (uncleaned) inputs: masked tokens are read as 0 like fusedrl.loss's
    if n == 1000:
        lp2, o2, a2, m2 = (t.reshape(10, 100) for t in (logp, old, adv, mask))
        cov3, cand3 = ch.cov_terms(lp2, o2, a2, m2, mean_a, mean_lp, (low, high, lb, ub))
        assert torch.equal(cov3.reshape(-1), cov_ref) and torch.equal(cand3.reshape(-1), cand_ref)


def test_cuda_cov_op_registration_and_errors():
    ch = _head_module("cuda")
    logp, old, adv, mask = _case(37, seed=21)
    means = torch.tensor([0.1, -1.5], device=DEV)
    torch.library.opcheck(
        ch._cov_op, (logp, old, adv, mask, means, [0.2, 0.28, -1.0, 5.0]), test_utils=("test_schema", "test_faketensor")
    )
    torch.library.opcheck(
        ch._cov_op, (logp, old, adv, None, means, None), test_utils=("test_schema", "test_faketensor")
    )
    with pytest.raises(ValueError, match="mask"):
        ch.cov_terms(logp, old, adv, mask[:-1], means[0], means[1])


# --------------------------------------------------------------------------------------------------
# Wiring: policy_loss(backend="triton"|"cuda") equals backend="torch" (dispatch: fusedrl.loss.heads.kernels_for)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", HEADS)
def test_kernels_for_modes(monkeypatch, kind):
    _head_module(kind)
    dev = torch.device(DEV)
    monkeypatch.delenv("FUSEDRL_BACKEND", raising=False)  # `auto` must not be overridden from outside
    assert loss_heads.kernels_for("torch", dev, torch.float32).name == "torch"
    k = loss_heads.kernels_for(kind, dev, torch.float32)
    assert k.name == kind and k.vanilla is not None
    assert loss_heads.kernels_for(kind, dev, torch.float64) == loss_heads.TORCH
    assert (loss_heads.kernels_for("auto", dev, torch.float32).name == "torch") == (dev.type != "cuda")
    with pytest.raises(ValueError, match="backend"):
        loss_heads.kernels_for("bogus", dev, torch.float32)


@pytest.mark.parametrize("kind", HEADS)
def test_kernels_for_meta_takes_torch(kind):
    """Meta tensors (shape tracing) always take the torch formulas, whatever the backend."""
    _head_module(kind)
    assert loss_heads.kernels_for(kind, torch.device("meta"), torch.float32) == loss_heads.TORCH


def test_invalid_backend_is_an_error():
    logp, old, adv, mask = _case(30, seed=14, shape=(2, 15))
    with pytest.raises(ValueError, match="backend"):
        fusedrl.policy_loss(logp, old, adv, mask, backend="bogus")


def test_head_unavailable_is_an_error(monkeypatch):
    ch = head_module("cuda")
    monkeypatch.setattr(ch, "is_available", lambda device: (False, "not built: test"))
    with pytest.raises(RuntimeError, match="cuda.*not built: test"):
        loss_heads.kernels_for("cuda", torch.device(DEV), torch.float32)
    logp, old, adv, mask = _case(30, seed=15, shape=(2, 15))
    with pytest.raises(fusedrl.BackendUnavailable, match="cuda.*not built: test"):
        fusedrl.policy_loss(logp, old, adv, mask, backend="cuda")


def _policy(head, logp, *args, **kw):
    leaf = logp.detach().clone().requires_grad_(True)
    loss, metrics = fusedrl.policy_loss(leaf, *args, backend=head, **kw)
    loss.backward()
    return loss.detach(), metrics, leaf.grad


def _count_calls(monkeypatch, mod, name):
    calls = []
    real = getattr(mod, name)
    monkeypatch.setattr(mod, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _assert_same(a, b):
    (lt, mt, gt), (lk, mk, gk) = a, b
    torch.testing.assert_close(lk, lt, rtol=RTOL, atol=ATOL)
    assert mk.keys() == mt.keys()
    for k in mt:
        torch.testing.assert_close(mk[k], mt[k], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gk, gt, rtol=4 * RTOL, atol=ATOL)


@pytest.mark.parametrize("agg", loss_mod.LOSS_AGG_MODES)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_policy_loss_head_equals_torch(monkeypatch, H, agg, layout):
    kind = _kind(H)
    calls = _count_calls(monkeypatch, H, "vanilla_token_terms")
    logp, old, adv, mask = _case(60, seed=10, shape=(4, 15))
    ent = torch.rand(4, 15, device=DEV)
    ref = (logp.detach() - 0.1).nan_to_num(0.0, 0.0, 0.0)
    cu = None
    if layout == "packed":
        logp, old, adv, mask, ent, ref = (t.reshape(-1) for t in (logp, old, adv, mask, ent, ref))
        cu = torch.tensor([0, 7, 7, 30, 52], device=DEV)  # an empty sequence and an unowned tail
    cfg = fusedrl.PolicyLossConfig(loss_agg_mode=agg, clip_ratio_high=0.28, entropy_coeff=0.01, kl_loss_coef=0.1)
    ref_run = _policy("torch", logp, old, adv, mask, ent, ref, cu, cfg)
    assert not calls
    run = _policy(kind, logp, old, adv, mask, ent, ref, cu, cfg)
    assert calls, f"backend={kind!r} did not reach {H.__name__}.vanilla_token_terms"
    _assert_same(ref_run, run)


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_loss_cuda_head_covariance_modes(monkeypatch, mode, agg):
    """Clip-Cov / KL-Cov through the cuda covariance kernel: same selection, loss, metrics, grads."""
    ch = _head_module("cuda")
    calls = _count_calls(monkeypatch, ch, "cov_terms")
    logp, old, adv, mask = _case(400, seed=30, shape=(8, 50))

    def cfg():  # a fresh generator per run: Clip-Cov's random pick must be the same draw
        return fusedrl.PolicyLossConfig(
            loss_mode=mode,
            loss_agg_mode=agg,
            clip_cov_ratio=0.05,
            clip_cov_lb=-0.5,
            clip_cov_ub=3.0,
            kl_cov_ratio=0.05,
            generator=torch.Generator(device=DEV).manual_seed(7),
        )

    ref_run = _policy("torch", logp, old, adv, mask, config=cfg())
    assert not calls
    run = _policy("cuda", logp, old, adv, mask, config=cfg())
    assert calls, "backend='cuda' did not reach fusedrl.backends.cuda.head.cov_terms"
    assert run[1]["cov_selected_frac"] > 0
    _assert_same(ref_run, run)


def test_policy_loss_head_other_modes_and_fp64_untouched(H):
    """Only vanilla (and, for the cuda head, the covariance statistic) in fp32 is routed; fp64 and the
    other modes give identical results either way."""
    kind = _kind(H)
    logp, old, adv, mask = _case(30, seed=11, shape=(2, 15))
    for mode in ("gspo", "cispo", "gpg"):
        cfg = fusedrl.PolicyLossConfig(loss_mode=mode)
        lt, _, gt = _policy("torch", logp, old, adv, mask, config=cfg)
        lk, _, gk = _policy(kind, logp, old, adv, mask, config=cfg)
        assert torch.equal(lt, lk) and torch.equal(gt, gk)
    d64 = [t.double() if t.is_floating_point() else t for t in (logp, old, adv, mask)]
    lt, _, gt = _policy("torch", *d64)
    lk, _, gk = _policy(kind, *d64)
    assert torch.equal(lt, lk) and torch.equal(gt, gk)


@pytest.mark.parametrize("mode", ["vanilla", "kl_cov"])
def test_policy_loss_head_compile(H, mode):
    kind = _kind(H)
    logp, old, adv, mask = _case(30, seed=12, shape=(2, 15))
    cfg = fusedrl.PolicyLossConfig(loss_mode=mode, kl_cov_ratio=0.1)

    def f(lp):
        loss, m = fusedrl.policy_loss(lp, old, adv, mask, config=cfg, backend=kind)
        return loss + 0 * m["pg_clipfrac"]

    leaf_e = logp.detach().clone().requires_grad_(True)
    leaf_c = logp.detach().clone().requires_grad_(True)
    torch._dynamo.reset()
    le = f(leaf_e)
    le.backward()
    lc = torch.compile(f, fullgraph=True, backend="aot_eager")(leaf_c)
    lc.backward()
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(leaf_c.grad, leaf_e.grad)
