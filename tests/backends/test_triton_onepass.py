"""Triton one-pass row epilogue (``fusedrl.backends.triton.onepass_epilogue``) against plain torch autograd.

The oracle is written here from docs/one-pass.md: fp64 logits ``z = softcap(u + b) / T``, log-softmax,
entropy, the per-token head (clipped surrogate with clip-higher and dual clip, gpg, cispo, unclipped),
the KL estimators (k1 / abs / k2 / k3 and straight-through) and the entropy bonus, aggregated with the
token weights; ``g_lp``, ``g_H`` and ``du = dL/du`` come from ``torch.autograd``. Without CUDA the
kernel runs in the triton interpreter on CPU tensors (tiny odd shapes, a small BLOCK_V so rows span
several blocks with a ragged tail). fp32 kernel vs fp64 oracle: ~1e-5 relative.
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from fusedrl import loss as loss_mod  # noqa: E402
from fusedrl.backends import triton as tb  # noqa: E402
from fusedrl.backends.base import EpilogueOut, OnePassHead  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not tb.is_available(torch.device(DEV))[0],
    reason=f"triton backend unavailable: {tb.is_available(torch.device(DEV))[1]}",
)

# Interpreter: rows of 1003 columns span 4 blocks (the last one ragged), 507 -> 2; 8 rows per program
# (37 rows: a ragged last program) keeps the interpreter quick. The GPU config (one row per program)
# runs in test_modes' "rows1" cases.
OPTS = dict(triton_config=dict(epilogue=(8, 256, 4, 1))) if DEV == "cpu" else {}
ROW_OPTS = dict(triton_config=dict(epilogue=(1, 256, 4, 1))) if DEV == "cpu" else {}
KL_NAMES = ("k1", "abs", "k2", "k3")


# ------------------------------------------------------------------------------------------------
# The oracle (docs/one-pass.md), fp64 autograd
# ------------------------------------------------------------------------------------------------


def _kl(lp, ref, kl_type, st):
    diff = lp - ref
    if kl_type == 0:
        kl = diff
    elif kl_type == 1:
        kl = diff.abs()
    elif kl_type == 2:
        kl = 0.5 * diff.square()
    else:
        x = (-diff).clamp(-20.0, 20.0)
        kl = (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)
    if st:
        k2 = 0.5 * diff.square()
        kl = k2 - k2.detach() + kl.detach()
    return kl


def _token_loss(lp, old, adv, mode, lo, hi, c, dual):
    r = torch.exp((lp - old).clamp(-20.0, 20.0))
    if mode == 0:
        l1, l2 = -adv * r, -adv * r.clamp(lo, hi)
        lc = torch.maximum(l1, l2)
        return torch.where(adv < 0, torch.minimum(-adv * c, lc), lc) if dual else lc
    if mode == 1:
        return -adv * lp
    if mode == 2:
        return -r.detach().clamp(lo, hi) * adv * lp
    return -adv * r


def _head_grads(lp, ent, head, dtype):
    """(g_lp, g_H) = d total / d (logp, H) by autograd, in `dtype`, masked tokens never read."""
    lp = lp.detach().to(dtype).requires_grad_()
    ent = ent.detach().to(dtype).requires_grad_()
    w = head.weight.to(dtype)
    valid = w != 0
    clean = lambda t: torch.where(valid, t.to(dtype), torch.zeros_like(w))  # noqa: E731
    old, adv = clean(head.old), clean(head.adv)
    lpc = torch.where(valid, lp, torch.zeros_like(lp))
    per_tok = _token_loss(lpc, old, adv, head.mode, head.clip_lo, head.clip_hi, head.clip_c, head.dual)
    if head.kl_coef:
        per_tok = per_tok + head.kl_coef * _kl(lpc, clean(head.ref), head.kl_type, head.kl_st)
    total = (w * per_tok).sum() - head.ent_coef * (w * torch.where(valid, ent, torch.zeros_like(ent))).sum()
    g_lp, g_h = torch.autograd.grad(total, [lp, ent], allow_unused=True)
    return (torch.zeros_like(lp) if g_lp is None else g_lp), (torch.zeros_like(ent) if g_h is None else g_h)


def _oracle(u, targets, bias, T, c, head):
    """fp64 (logp, ent, lse, g_lp, g_H, du) of the docs/one-pass.md contract."""
    u64 = u.detach().double().requires_grad_()
    uu = u64 if bias is None else u64 + bias.double()
    if c is not None:
        uu = c * torch.tanh(uu / c)
    z = uu / (T.double()[:, None] if isinstance(T, torch.Tensor) else T)  # per-token T: one per row
    lse = torch.logsumexp(z, -1)
    lsm = z - lse[:, None]
    p = lsm.exp()
    ent = -(p * torch.where(torch.isfinite(lsm), lsm, torch.zeros_like(lsm))).sum(-1)  # p log p = 0 at p = 0
    logp = lsm.gather(1, targets[:, None])[:, 0]
    g_lp, g_h = _head_grads(logp, ent, head, torch.float64)
    (du,) = torch.autograd.grad((logp * g_lp).sum() + (ent * g_h).sum(), [u64])
    return logp.detach(), ent.detach(), lse.detach(), g_lp, g_h, du


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def _make(n, v, seed=0, bias=True, ninf_cols=(), extreme=False, masked=True, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, v, generator=g) * scale
    b = (torch.randn(v, generator=g) * 0.5) if bias or ninf_cols else None
    for j in ninf_cols:
        b[j] = -math.inf
    if extreme and n >= 3:
        u[0] *= 300.0  # |z| ~ 1e3: peaked row, exact LSE
        u[1] = 0.0  # flat row: H = log V
        u[2, 7] = 80.0  # one dominant logit
    t = torch.randint(0, v, (n,), generator=g)
    for i in range(n):  # tokens never target a masked column (a live one's logp would be -inf)
        while int(t[i]) in ninf_cols:
            t[i] = (t[i] + 1) % v
    # old log-probs near the current ones (ratios near the clip bounds), a few |d| > 20 tokens
    with torch.no_grad():
        z = u.double() + (0 if b is None else b.double())
        lp = torch.log_softmax(z, -1).gather(1, t[:, None])[:, 0].float()
    old = lp + torch.randn(n, generator=g) * 0.3
    if n >= 6:
        old[4] = lp[4] - 30.0
        old[5] = lp[5] + 30.0
    adv = torch.randn(n, generator=g) * 2
    if n >= 8:
        adv[6] = 0.0
    ref = lp + torch.randn(n, generator=g) * 0.5
    if n >= 9:
        ref[8] = lp[8] + 40.0  # k3 out of its clamp ranges
    w = torch.rand(n, generator=g) + 0.1
    if masked and n >= 12:
        for i in (3, 10, 11):
            w[i] = 0.0
            old[i], adv[i], ref[i] = math.nan, math.nan, math.inf  # never read
    return u, t, b, old, adv, ref, w


def _head(
    old,
    adv,
    ref,
    w,
    mode=0,
    dual=True,
    ent_coef=0.01,
    kl_coef=0.1,
    kl_type=3,
    kl_st=False,
    need_ent=True,
    low=0.2,
    high=0.28,
    c=3.0,
):
    return OnePassHead(
        mode=mode,
        clip_lo=1.0 - low,
        clip_hi=1.0 + high,
        clip_c=c if dual else None,
        dual=dual,
        ent_coef=ent_coef,
        kl_coef=kl_coef,
        kl_type=kl_type,
        kl_st=kl_st,
        old=old,
        adv=adv,
        weight=w,
        ref=ref if kl_coef else None,
        need_ent=need_ent,
    )


def _close(name, got, want, rtol=1e-5):
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, name
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    tol = rtol * (1.0 + want.abs())
    bad = (got - want).abs() > tol
    assert not bad.any(), (
        f"{name}: max err {(got - want).abs().max().item():.3e}, first bad {bad.nonzero()[:3].tolist()}"
    )


def _check(u, t, b, T, c, head, du16_dtype=None, rtol=1e-5, opts=None):
    ws = u.clone().to(DEV)
    du16 = torch.full(ws.shape, 7.0, dtype=du16_dtype, device=DEV) if du16_dtype else None
    dev_head = head._replace(
        **{k: getattr(head, k).to(DEV) for k in ("old", "adv", "weight", "ref") if getattr(head, k) is not None}
    )
    temp = T.to(DEV) if isinstance(T, torch.Tensor) else T
    res = tb.onepass_epilogue(
        ws,
        t.to(DEV),
        None if b is None else b.to(DEV),
        temp,
        c,
        dev_head,
        du16=du16,
        **(OPTS if opts is None else opts),
    )
    assert isinstance(res, EpilogueOut) and res.du is ws  # du is written over the workspace u
    logp, ent, lse, g_lp, g_h, _ = res
    r_lp, r_ent, r_lse, r_glp, r_gh, r_du = _oracle(u, t, b, T, c, head)
    for out in (logp, lse, g_lp):
        assert out.dtype == torch.float32 and out.shape == (u.shape[0],)
    _close("lse", lse, r_lse, rtol)
    _close("logp", logp, r_lp, rtol)
    _close("g_lp", g_lp, r_glp, rtol)
    if head.need_ent or head.ent_coef:
        _close("ent", ent, r_ent, rtol)
        _close("g_H", g_h, r_gh, rtol)
    else:
        assert ent is None and g_h is None
    scale = r_du.abs().max().item() + 1e-30
    err = (ws.cpu().double() - r_du).abs().max().item()
    assert torch.isfinite(ws).all() and err <= rtol * scale, f"du: err {err:.3e} vs scale {scale:.3e}"
    masked = head.weight == 0
    assert (ws.cpu()[masked] == 0).all() and (g_lp.cpu()[masked] == 0).all()
    if du16 is not None:
        if DEV == "cuda":
            assert torch.equal(du16, ws.to(du16_dtype))
        else:  # the interpreter's fp32 -> bf16 conversion truncates instead of rounding: 1 ulp apart
            bf16 = du16_dtype == torch.bfloat16
            torch.testing.assert_close(
                du16.float(), ws, rtol=2.0**-7 if bf16 else 2.0**-10, atol=0.0 if bf16 else 2.0**-24
            )  # fp16 subnormal step
    return ws, (logp, ent, lse, g_lp, g_h)


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,dual",
    [(0, True), (0, False), (1, False), (2, False), (3, False)],
    ids=["clipped-dual", "clipped", "gpg", "cispo", "unclipped"],
)
@pytest.mark.parametrize("shape", [(37, 1003), (1, 507)], ids=["N37-V1003", "N1-V507"])
def test_modes(mode, dual, shape):
    """Every mode, with bias, temperature, softcap, entropy bonus and a k3 KL term."""
    n, v = shape
    u, t, b, old, adv, ref, w = _make(n, v, seed=mode, masked=n > 1)
    _check(u, t, b, 0.7, 30.0, _head(old, adv, ref, w, mode=mode, dual=dual))


@pytest.mark.parametrize("mode", [0, 3], ids=["clipped-dual", "unclipped"])
def test_modes_rows1(mode):
    """The GPU block config (one row per program) in the interpreter."""
    u, t, b, old, adv, ref, w = _make(13, 1003, seed=90 + mode)
    _check(u, t, b, 0.7, 30.0, _head(old, adv, ref, w, mode=mode, dual=mode == 0), opts=ROW_OPTS)


@pytest.mark.parametrize("kl_st", [False, True], ids=["", "st"])
@pytest.mark.parametrize("kl_type", range(4), ids=KL_NAMES)
def test_kl_types(kl_type, kl_st):
    if kl_st and kl_type == 2:
        pytest.skip("k2+ is not a kl type (k2 is its own straight-through)")
    u, t, b, old, adv, ref, w = _make(37, 507, seed=10 + kl_type, bias=False)
    _check(
        u,
        t,
        None,
        1.0,
        None,
        _head(old, adv, ref, w, mode=1, kl_coef=0.3, kl_type=kl_type, kl_st=kl_st, ent_coef=0.0, need_ent=False),
    )


def test_kl_grad_matches_loss_py():
    """The test's KL oracle is loss.py's kl_penalty (each formula once in torch): same gradients."""
    g = torch.Generator().manual_seed(3)
    lp = (torch.randn(64, generator=g, dtype=torch.float64) * 15).requires_grad_()
    ref = torch.randn(64, generator=g, dtype=torch.float64) * 15
    ref[0] = lp[0].detach()
    for name in loss_mod.KL_LOSS_TYPES:
        canon = loss_mod.canonical_kl_type(name)
        mine = _kl(lp, ref, KL_NAMES.index(canon.rstrip("+")), canon.endswith("+"))
        theirs = loss_mod.kl_penalty(lp, ref, name)
        torch.testing.assert_close(mine, theirs)
        torch.testing.assert_close(torch.autograd.grad(mine.sum(), lp)[0], torch.autograd.grad(theirs.sum(), lp)[0])


@pytest.mark.parametrize(
    "ent_coef,need_ent", [(0.0, False), (0.0, True), (0.05, False)], ids=["no-ent", "ent-metric", "ent-bonus"]
)
def test_entropy_options(ent_coef, need_ent):
    u, t, b, old, adv, ref, w = _make(37, 1003, seed=20)
    _check(u, t, b, 1.3, None, _head(old, adv, ref, w, ent_coef=ent_coef, need_ent=need_ent, kl_coef=0.0))


@pytest.mark.parametrize("cap", [None, 5.0], ids=["nocap", "cap5"])
def test_masked_vocab_column_with_entropy_gradient(cap):
    """-inf bias columns (masked vocabulary) with g_H != 0: p = 0 and du = 0 there, never NaN."""
    cols = (0, 5, 700, 1002)
    u, t, b, old, adv, ref, w = _make(37, 1003, seed=30, ninf_cols=cols)
    head = _head(old, adv, ref, w, ent_coef=0.5)
    ws, (_, _, _, _, g_h) = _check(u, t, b, 0.7, cap, head)
    assert (g_h.cpu()[w != 0] != 0).all()
    if cap is None:
        assert (ws.cpu()[:, list(cols)] == 0).all()


def test_extreme_logits_and_masked_nan():
    """|z| ~ 1e3, a flat row, a dominant logit, |d| > 20, A = 0, and masked tokens holding
    NaN / inf in old, adv and ref (never read: their g and du are exactly 0)."""
    u, t, b, old, adv, ref, w = _make(37, 1003, seed=40, extreme=True)
    _check(u, t, b, 1.0, None, _head(old, adv, ref, w, ent_coef=0.1, kl_coef=0.2, kl_type=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_du16_copy_and_row_stride(dtype):
    """du is also written to a 16-bit buffer (equal to the fp32 du rounded); the workspace may be a
    column-sliced view (row stride > V) of a wider buffer, whose other columns stay untouched."""
    u, t, b, old, adv, ref, w = _make(37, 507, seed=50)
    head = _head(old, adv, ref, w)
    _check(u, t, b, 0.7, 30.0, head, du16_dtype=dtype)
    wide = torch.full((37, 520), 3.0, device=DEV)
    wide[:, :507] = u.to(DEV)
    dev_head = head._replace(old=old.to(DEV), adv=adv.to(DEV), weight=w.to(DEV), ref=ref.to(DEV))
    out = tb.onepass_epilogue(wide[:, :507], t.to(DEV), b.to(DEV), 0.7, 30.0, dev_head, **OPTS)
    ws = u.clone().to(DEV)
    want = tb.onepass_epilogue(ws, t.to(DEV), b.to(DEV), 0.7, 30.0, dev_head, **OPTS)
    assert torch.equal(wide[:, :507], ws) and (wide[:, 507:] == 3.0).all()
    for a, e in zip(out, want):
        assert torch.equal(a, e)


def test_head_names_all_masked_and_empty():
    u, t, b, old, adv, ref, w = _make(12, 507, seed=60)
    head = _head(old, adv, ref, w, mode="cispo", dual=False, kl_type="k2")
    coded = _head(old, adv, ref, w, mode=2, dual=False, kl_type=2)
    a = tb.onepass_epilogue(
        u.clone().to(DEV),
        t.to(DEV),
        b.to(DEV),
        1.0,
        None,
        head._replace(old=old.to(DEV), adv=adv.to(DEV), weight=w.to(DEV), ref=ref.to(DEV)),
        **OPTS,
    )
    e = tb.onepass_epilogue(
        u.clone().to(DEV),
        t.to(DEV),
        b.to(DEV),
        1.0,
        None,
        coded._replace(old=old.to(DEV), adv=adv.to(DEV), weight=w.to(DEV), ref=ref.to(DEV)),
        **OPTS,
    )
    for x, y in zip(a, e):
        assert torch.equal(x, y)
    # all-masked chunk: zero gradients everywhere, finite statistics
    zero = torch.zeros_like(w)
    ws = u.clone().to(DEV)
    logp, ent, lse, g_lp, g_h, du = tb.onepass_epilogue(
        ws,
        t.to(DEV),
        b.to(DEV),
        1.0,
        None,
        head._replace(old=old.to(DEV), adv=adv.to(DEV), weight=zero.to(DEV), ref=ref.to(DEV)),
        **OPTS,
    )
    assert du is ws and not ws.any() and not g_lp.any() and not g_h.any() and torch.isfinite(logp).all()
    # zero rows
    e0 = torch.empty(0, device=DEV)
    u0 = torch.empty(0, 507, device=DEV)
    out = tb.onepass_epilogue(
        u0,
        torch.empty(0, dtype=torch.long, device=DEV),
        None,
        1.0,
        None,
        _head(e0, e0, e0, e0),
    )
    assert all(o is None or o.shape == (0,) for o in out[:5]) and out.du is u0


def test_bad_inputs_raise():
    u, t, b, old, adv, ref, w = _make(4, 507, seed=70, masked=False)
    u, t, b = u.to(DEV), t.to(DEV), b.to(DEV)
    head = _head(old.to(DEV), adv.to(DEV), ref.to(DEV), w.to(DEV))
    with pytest.raises(TypeError, match="u must be"):
        tb.onepass_epilogue(u.double(), t, b, 1.0, None, head)
    with pytest.raises(ValueError, match="head.mode"):
        tb.onepass_epilogue(u, t, b, 1.0, None, head._replace(mode="ppo"))
    with pytest.raises(ValueError, match="head.kl_type"):
        tb.onepass_epilogue(u, t, b, 1.0, None, head._replace(kl_type=7))
    with pytest.raises(ValueError, match="head.ref"):
        tb.onepass_epilogue(u, t, b, 1.0, None, head._replace(ref=None))
    with pytest.raises(ValueError, match="head.weight"):
        tb.onepass_epilogue(u, t, b, 1.0, None, head._replace(weight=w[:3].to(DEV)))
    with pytest.raises(ValueError, match="clip_c"):
        tb.onepass_epilogue(u, t, b, 1.0, None, head._replace(clip_c=None))
    with pytest.raises(TypeError, match="du16"):
        tb.onepass_epilogue(u, t, b, 1.0, None, head, du16=torch.empty(4, 507, device=DEV))
    with pytest.raises(ValueError, match="du16"):
        tb.onepass_epilogue(u, t, b, 1.0, None, head, du16=torch.empty(4, 500, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="bias"):
        tb.onepass_epilogue(u, t, b[:5], 1.0, None, head)
    with pytest.raises(TypeError, match="OnePassHead"):
        tb.onepass_epilogue(u, t, b, 1.0, None, tuple(head))
    with pytest.raises(TypeError, match="targets"):
        tb.onepass_epilogue(u, t.float(), b, 1.0, None, head)
    with pytest.raises(ValueError, match="softcap"):
        tb.onepass_epilogue(u, t, b, 1.0, 0.0, head)
    for T in (
        0.0,
        -1.0,
        None,
        torch.ones(5, device=DEV),
        torch.ones(4, 1, device=DEV),
        torch.ones(4, dtype=torch.bool, device=DEV),
        torch.ones(4, device="meta"),
    ):
        with pytest.raises(ValueError, match="temperature"):
            tb.onepass_epilogue(u.clone(), t, b, T, None, head)


def test_head_is_shared_with_the_cuda_backend():
    """One definition of the head and its code tables (fusedrl/backends/base.py), used by both kernel
    backends; a head of the other backend's (or any object with the fields) is accepted."""
    from fusedrl.backends import base
    from fusedrl.backends.cuda import onepass as cuda_onepass
    from fusedrl.backends.triton import onepass as triton_onepass
    from fusedrl.backends.triton import row_math

    assert triton_onepass.OnePassHead is cuda_onepass.OnePassHead is base.OnePassHead
    assert row_math.HEAD_MODES is base.HEAD_MODES and row_math.KL_TYPES is base.KL_TYPES
    u, t, b, old, adv, ref, w = _make(12, 507, seed=71)
    head = _head(old, adv, ref, w)
    import collections

    duck = collections.namedtuple("DuckHead", head._fields)(**head._asdict())  # any object with the fields
    a = tb.onepass_epilogue(u.clone().to(DEV), t.to(DEV), b.to(DEV), 0.7, None, _to_dev(head), **OPTS)
    e = tb.onepass_epilogue(u.clone().to(DEV), t.to(DEV), b.to(DEV), 0.7, None, _to_dev(duck), **OPTS)
    for x, y in zip(a, e):
        assert torch.equal(x, y)


def _to_dev(head):
    return head._replace(
        **{k: getattr(head, k).to(DEV) for k in ("old", "adv", "weight", "ref") if getattr(head, k) is not None}
    )


def _temps(n, seed):
    return 0.3 + 1.7 * torch.rand(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cap", [None, 5.0], ids=["nocap", "cap5"])
@pytest.mark.parametrize("rows", ["rows8", "rows1"])
def test_per_token_temperature(rows, cap):
    """One T per row (z = softcap(u + b) / T_n, du = dz softcap'(u + b) / T_n) with -inf bias columns,
    an entropy bonus, a KL term and masked rows, against the fp64 oracle; both block configs."""
    u, t, b, old, adv, ref, w = _make(37, 1003, seed=72, ninf_cols=(0, 5, 1002))
    T = _temps(37, 73)
    ws, _ = _check(
        u,
        t,
        b,
        T,
        cap,
        _head(old, adv, ref, w, ent_coef=0.05),
        du16_dtype=torch.bfloat16,
        opts=OPTS if rows == "rows8" else ROW_OPTS,
    )
    if cap is None:
        assert (ws.cpu()[:, [0, 5, 1002]] == 0).all()


@pytest.mark.parametrize("cap", [None, 5.0], ids=["nocap", "cap5"])
def test_per_token_temperature_equal_vector_is_scalar_bitwise(cap):
    """An all-equal vector of an fp32-exact T gives the scalar path's outputs bit for bit (du, its
    16-bit copy, logp, entropy, LSE, g_lp, g_H)."""
    u, t, b, old, adv, ref, w = _make(37, 1003, seed=74, ninf_cols=(3,))
    head = _to_dev(_head(old, adv, ref, w, ent_coef=0.05))
    outs = []
    for temp in (0.75, torch.full((37,), 0.75, device=DEV)):
        ws, d16 = u.clone().to(DEV), torch.empty(u.shape, dtype=torch.float16, device=DEV)
        outs.append(list(tb.onepass_epilogue(ws, t.to(DEV), b.to(DEV), temp, cap, head, du16=d16, **OPTS)) + [ws, d16])
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_tie_rules_match_torch_fp32():
    """Head coefficients against fp32 autograd on the kernel's own logp: ratios inside the clip range
    (L1 == L2 ties), A = 0, an exact dual-clip tie (-A r == -A c) give torch's split gradients, and
    the abs KL has gradient 0 at delta = 0."""
    u, t, b, old, adv, ref, w = _make(37, 507, seed=80, masked=True)
    head = _head(old, adv, ref, w, kl_coef=0.3, kl_type=1, ent_coef=0.0, need_ent=False)
    run = lambda h: tb.onepass_epilogue(  # noqa: E731
        u.clone().to(DEV),
        t.to(DEV),
        b.to(DEV),
        1.0,
        None,
        h._replace(old=h.old.to(DEV), adv=h.adv.to(DEV), weight=h.weight.to(DEV), ref=h.ref.to(DEV)),
        **OPTS,
    )
    lp = run(head)[0].cpu()
    ref2 = ref.clone()
    ref2[1] = lp[1]  # delta = 0 exactly
    old2, adv2 = old.clone(), adv.clone()
    old2[0], adv2[0] = lp[0] - 0.1, -1.5  # r = e^0.1 inside [lo, hi], A < 0
    c = float(torch.exp((lp[0] - old2[0]).clamp(-20, 20)))  # fp32 r: -A r == -A c exactly
    assert c > 1.0
    head = head._replace(old=old2, adv=adv2, ref=ref2, clip_c=c)
    logp, _, _, g_lp, _, _ = run(head)
    assert torch.equal(logp.cpu(), lp)
    want, _ = _head_grads(lp, torch.zeros_like(lp), head, torch.float32)
    torch.testing.assert_close(g_lp.cpu(), want, rtol=1e-6, atol=1e-7)
    # the tie really is a tie: half the gradient of the untied token
    r0 = math.exp(0.1)
    kl0 = 0.3 * float(torch.sign(lp[0] - ref2[0]))
    assert abs(g_lp[0].item() - w[0].item() * (0.5 * 1.5 * c + kl0)) < 1e-5 * r0
    assert g_lp[1].item() == want[1].item()


# ------------------------------------------------------------------------------------------------
# The lean epilogue (store_du32=False) and the padded workspace rows of fusedrl.onepass.run
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("v,bias", [(507, True), (1003, False)], ids=["V507-bias", "V1003"])
def test_lean_du16_only_is_bitwise(v, bias, dtype):
    """store_du32=False: du16 alone receives du (the same bits as with the fp32 store), every per-row
    output is bitwise the same, U keeps the logits, and EpilogueOut.du is du16. Rows padded to 16
    elements (the one-pass workspace; the kernel's loads may read the padding, here NaN, never use it)
    give the contiguous rows' bits."""
    n = 37
    u, t, b, old, adv, ref, w = _make(n, v, seed=100 + v, bias=bias)
    b = b if bias else None
    head = _to_dev(_head(old, adv, ref, w, ent_coef=0.05))
    bd = None if b is None else b.to(DEV)
    outs = []
    for lean, padded in ((False, False), (True, False), (True, True)):
        ld = -(-v // 16) * 16 if padded else v
        buf = torch.full((n, ld), math.nan, device=DEV)
        ws = buf[:, :v]
        ws.copy_(u.to(DEV))
        d16 = torch.full((n, v), 7.0, dtype=dtype, device=DEV)
        res = tb.onepass_epilogue(ws, t.to(DEV), bd, 0.7, 30.0, head, du16=d16, store_du32=not lean, **OPTS)
        if lean:
            assert res.du is d16 and torch.equal(ws.cpu(), u)  # U untouched: the logits
        else:
            assert res.du is ws
        if padded:
            assert tb.onepass.readable_cols(ws) == ld and buf[:, v:].isnan().all()  # padding read, not written
        outs.append([x for x in res[:5] if x is not None] + [d16])
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x, y)


def test_lean_needs_du16():
    u, t, b, old, adv, ref, w = _make(4, 507, seed=101, masked=False)
    head = _to_dev(_head(old, adv, ref, w))
    with pytest.raises(ValueError, match="store_du32"):
        tb.onepass_epilogue(u.to(DEV), t.to(DEV), b.to(DEV), 1.0, None, head, store_du32=False, **OPTS)


def test_readable_cols():
    """The loads may read V rounded up to 16 only where the row stride and the allocation hold it."""
    from fusedrl.backends.triton.onepass import readable_cols

    assert readable_cols(torch.empty(4, 1003)) == 1003
    assert readable_cols(torch.empty(4, 1008)[:, :1003]) == 1008
    assert readable_cols(torch.empty(4, 1024)) == 1024
    assert readable_cols(torch.empty(3 * 1008 + 1003).as_strided((4, 1003), (1008, 1))) == 1003  # last row: no room
    assert readable_cols(torch.empty(4, 1005)[:, :1003]) == 1003
    assert readable_cols(torch.empty(0, 1003)) == 1003
