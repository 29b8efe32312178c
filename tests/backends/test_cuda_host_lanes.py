"""Host lanes of the CUDA row kernels (csrc/row_math.h, csrc/head_math.h, csrc/host_lanes.cpp).

The row kernels' element-wise and per-row math lives in ``__host__ __device__`` functions that the
kernels and these host loops share; the loops run them with the kernels' thread striding and block
reduction order over CPU memory. So on a machine without a GPU this file checks the arithmetic the GPU
runs, against fp64 torch:

* the recompute path: ``row_stats`` (online M/S/B merge across vocab chunks, target pickup) and
  ``dz`` (du = dz * dz/du, with the ``-inf`` guard), driven through the CUDA backend's chunk loops
  with torch GEMMs;
* the one-pass row epilogue (docs/one-pass.md): every mode, every KL type, +/- entropy, temperature,
  softcap, bias with a ``-inf`` column, masked tokens with NaN in their inputs, odd shapes;
* with a GPU (``@pytest.mark.gpu``): the kernels against these host loops.
"""

import math

import pytest
import torch
from _factory import make_case

from fusedrl import reference
from fusedrl.backends import cuda as cb
from fusedrl.backends.base import EpilogueOut, OnePassHead

C = cb.extension()
pytestmark = pytest.mark.skipif(C is None, reason="CUDA extension not built (test_cuda_backend.py reports why)")


def _cap(softcap):
    return 0.0 if softcap is None else float(softcap)


def _temp_args(T, n0=0):
    """(temperature, temperatures pointer) of the _C entry points for rows [n0, ...): a float, or a
    per-token fp32 [N] tensor offset by the chunk's first row (what driver.cpp's row::rows_from does)."""
    if isinstance(T, torch.Tensor):
        return 1.0, T[n0:].data_ptr()
    return float(T), 0


# =====================================================================================
# Recompute path: the row_stats / dz kernels' code through the backend's chunk loops
# =====================================================================================


def host_forward(x, w, t, b, T, c, nc, vc, vocab_start=0):
    """cb.forward's chunk loop (driver.cpp linear_forward) with torch GEMMs and the row_stats host lane.
    T: a float or per-token fp32 [N] temperatures (indexed by each token chunk's row offset)."""
    n, v = x.shape[0], w.shape[0]
    lse, zt, ent = (torch.empty(n) for _ in range(3))
    run = torch.empty(3 * nc)
    b32 = None if b is None else b.float().contiguous()
    for n0 in range(0, n, nc):
        m = min(nc, n - n0)
        tg = t[n0 : n0 + m].contiguous()
        for v0 in range(0, v, vc):
            k = min(vc, v - v0)
            L = (x[n0 : n0 + m].float() @ w[v0 : v0 + k].float().t()).contiguous()
            C.row_stats_host(
                L.data_ptr(),
                k,
                m,
                k,
                0 if b32 is None else b32[v0:].data_ptr(),
                tg.data_ptr(),
                vocab_start + v0,
                vocab_start,
                v,
                *_temp_args(T, n0),
                _cap(c),
                run.data_ptr(),
                nc,
                v0 == 0,
                v0 + k >= v,
                lse[n0:].data_ptr(),
                zt[n0:].data_ptr(),
                ent[n0:].data_ptr(),
            )
    return lse, zt, ent


def host_backward(x, w, t, b, T, c, lse, ent, g_lp, g_H, nc, vc):
    """cb.backward's chunk loop (fp32 accumulation) with torch GEMMs and the dz host lane (in place)."""
    n, h, v = x.shape[0], x.shape[1], w.shape[0]
    dx, dw, db = torch.zeros(n, h), torch.zeros(v, h), torch.zeros(v)
    b32 = None if b is None else b.float().contiguous()
    for n0 in range(0, n, nc):
        m = min(nc, n - n0)
        tg = t[n0 : n0 + m].contiguous()
        xc = x[n0 : n0 + m].float()
        for v0 in range(0, v, vc):
            k = min(vc, v - v0)
            L = (xc @ w[v0 : v0 + k].float().t()).contiguous()
            C.dz_host(
                L.data_ptr(),
                k,
                L.data_ptr(),
                k,
                m,
                k,
                0 if b32 is None else b32[v0:].data_ptr(),
                tg.data_ptr(),
                v0,
                *_temp_args(T, n0),
                _cap(c),
                lse[n0:].data_ptr(),
                0 if ent is None else ent[n0:].data_ptr(),
                g_lp[n0:].data_ptr(),
                0 if g_H is None else g_H[n0:].data_ptr(),
            )
            dx[n0 : n0 + m] += L @ w[v0 : v0 + k].float()
            dw[v0 : v0 + k] += L.t() @ xc
            db[v0 : v0 + k] += L.sum(0)
    return dx, dw, db


def _ref_grads64(x, w, t, b, T, c, g_lp, g_H):
    leaves = [p.detach().double().requires_grad_() for p in (x, w, b) if p is not None]
    lp, ent = reference.linear_logprob_entropy(leaves[0], leaves[1], t, leaves[2] if b is not None else None, T, c)
    loss = (lp * g_lp.double()).sum() + (ent * g_H.double()).sum()
    gs = torch.autograd.grad(loss, leaves)
    return lp, ent, list(gs) + [None] * (3 - len(gs))


def _masked_bias(v, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(v, generator=g) * 0.5
    b[cols] = -math.inf
    return b


def _check_recompute_lanes(x, w, t, b, T, c, nc, vc, ref_fn, stat_tol):
    """row_stats + dz host lanes vs an fp64 reference: finite everywhere (g_H != 0 on every token, so a
    -inf column would show the 0*inf NaN), logp/entropy within stat_tol, grads within 2e-5 of their scale,
    and masked columns' dW/db exactly zero when no softcap makes them finite. Returns the host LSE."""
    g = torch.Generator().manual_seed(1)
    g_lp, g_H = torch.randn(x.shape[0], generator=g), torch.randn(x.shape[0], generator=g)
    lse, zt, ent = host_forward(x, w, t, b, T, c, nc, vc)
    dx, dw, db = host_backward(x, w, t, b, T, c, lse, ent, g_lp, g_H, nc, vc)
    r_lp, r_ent, (r_dx, r_dw, r_db) = ref_fn(x, w, t, b, T, c, g_lp, g_H)
    for name, got in (("lse", lse), ("ent", ent), ("dx", dx), ("dw", dw), ("db", db)):
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
    assert ((zt - lse).double() - r_lp).abs().max().item() <= stat_tol
    assert (ent.double() - r_ent).abs().max().item() <= stat_tol
    for name, got, want in (("dx", dx, r_dx), ("dW", dw, r_dw), ("db", db, r_db)):
        if want is None:
            continue
        tol = 2e-5 * (want.abs().max().item() + 1.0)
        err = (got.double() - want).abs().max().item()
        assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e}"
    if b is not None and c is None:
        masked = torch.isinf(b)
        assert torch.all(dw[masked] == 0) and torch.all(db[masked] == 0)
    return lse


@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize(
    "n,h,v,nc,vc", [(4, 16, 1003, 4, 1003), (4, 16, 1003, 2, 136)], ids=["one-vocab-chunk", "vocab-chunks"]
)
def test_recompute_host_lanes_non_finite_column_poisons_rows(n, h, v, nc, vc, bad):
    """A NaN (or +inf) weight row makes every token's LSE and entropy NaN, as in torch: the partial that holds
    it must not be dropped by the merge (it was, with ``s > 0``: NaN > 0 is false, so ~V/256 columns went
    missing and the statistics came out finite and wrong)."""
    x, w, _, t = make_case(n, h, v, torch.float32)
    w[5] = float(bad)
    t = torch.where(t == 5, torch.zeros_like(t), t)
    lse, zt, ent = host_forward(x, w, t, None, 1.0, None, nc, vc)
    r_lse = torch.logsumexp(x.double() @ w.double().t(), -1)
    assert torch.isnan(r_lse).all() or torch.isinf(r_lse).all()
    assert not torch.isfinite(lse).any(), lse
    assert torch.isnan(ent).all(), ent


RECOMPUTE_OPTS = [
    dict(bias=None, T=1.0, c=None),
    dict(bias="rand", T=0.7, c=None),
    dict(bias="rand", T=1.3, c=30.0),
    dict(bias="-inf", T=1.0, c=None),  # masked vocabulary columns, entropy gradient on: the NaN bug
    dict(bias="-inf", T=0.7, c=None),
    dict(bias="-inf", T=1.3, c=5.0),  # softcap maps -inf to -c/T: finite, dz/du = 0
]
RECOMPUTE_IDS = ["plain", "bias-T0.7", "bias-T1.3-cap30", "neginf", "neginf-T0.7", "neginf-T1.3-cap5"]


@pytest.mark.parametrize("opt", RECOMPUTE_OPTS, ids=RECOMPUTE_IDS)
@pytest.mark.parametrize(
    "n,h,v,nc,vc",
    [(37, 24, 1003, 16, 136), (5, 24, 507, 8, 512), (1, 16, 507, 4, 64)],
    ids=["N37-V1003-chunked", "N5-V507-one-chunk", "N1-V507"],
)
def test_recompute_host_lanes_match_fp64(n, h, v, nc, vc, opt):
    x, w, _, t = make_case(n, h, v, torch.float32, scale=4.0)
    b = None
    if opt["bias"] == "rand":
        b = make_case(n, h, v, torch.float32, bias=True)[2]
    elif opt["bias"] == "-inf":
        masked = [3, 136, 137, v - 1]  # one at a vocab-chunk boundary, the last column
        b = _masked_bias(v, masked)
        t = torch.where(torch.isin(t, torch.tensor(masked)), torch.zeros_like(t), t)  # targets stay finite
    _check_recompute_lanes(x, w, t, b, opt["T"], opt["c"], nc, vc, _ref_grads64, stat_tol=2e-5)


def test_dz_minus_inf_logit_with_entropy_gradient():
    """The minimal case: a -inf logit with g_H != 0 must give du = 0 there, not NaN.

    The dz kernel once formed ``g_H * p * (z + shift)`` = 0 * (-inf) = NaN for such a column, which the
    GEMMs then spread into all of dx and into dW's masked rows. This test failed on that formula."""
    n, v = 3, 507
    g = torch.Generator().manual_seed(0)
    u = torch.randn(n, v, generator=g) * 3
    u[:, [0, 5, v - 1]] = -math.inf
    t = torch.tensor([1, 2, 3])
    lse, zt, ent = torch.empty(n), torch.empty(n), torch.empty(n)
    C.row_stats_host(
        u.data_ptr(),
        v,
        n,
        v,
        0,
        t.data_ptr(),
        0,
        0,
        v,
        1.0,
        0,
        0.0,
        0,
        0,
        True,
        True,
        lse.data_ptr(),
        zt.data_ptr(),
        ent.data_ptr(),
    )
    g_lp, g_H = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([0.7, -0.3, 0.0])  # row 2: g_H = 0, still given
    du = torch.empty_like(u)
    C.dz_host(
        u.data_ptr(),
        v,
        du.data_ptr(),
        v,
        n,
        v,
        0,
        t.data_ptr(),
        0,
        1.0,
        0,
        0.0,
        lse.data_ptr(),
        ent.data_ptr(),
        g_lp.data_ptr(),
        g_H.data_ptr(),
    )
    assert torch.isfinite(du).all(), "du has NaN at -inf logits"
    assert torch.all(du[:, [0, 5, v - 1]] == 0)
    u64 = u.double().requires_grad_()
    lp, e = reference.logprob_entropy(u64, t)
    (want,) = torch.autograd.grad((lp * g_lp.double()).sum() + (e * g_H.double()).sum(), [u64])
    assert (du.double() - want).abs().max().item() <= 1e-6


def test_row_stats_merge_is_chunking_invariant():
    """Online merge across vocab chunks (incl. a chunk of only -inf logits) gives the one-chunk stats."""
    n, v = 9, 1003
    g = torch.Generator().manual_seed(2)
    u = torch.randn(n, v, generator=g) * 5
    u[:, 128:256] = -math.inf  # a whole vocab chunk masked
    t = torch.randint(0, 128, (n,), generator=g)
    out = {}
    for vc in (v, 128, 77):
        lse, zt, ent = torch.empty(n), torch.empty(n), torch.empty(n)
        run = torch.empty(3 * n)
        for v0 in range(0, v, vc):
            k = min(vc, v - v0)
            chunk = u[:, v0 : v0 + k].contiguous()
            C.row_stats_host(
                chunk.data_ptr(),
                k,
                n,
                k,
                0,
                t.data_ptr(),
                v0,
                0,
                v,
                1.0,
                0,
                0.0,
                run.data_ptr(),
                n,
                v0 == 0,
                v0 + k >= v,
                lse.data_ptr(),
                zt.data_ptr(),
                ent.data_ptr(),
            )
        out[vc] = (lse, zt, ent)
    r_lp, r_ent = reference.logprob_entropy(u.double(), t)
    for lse, zt, ent in out.values():
        assert ((zt - lse).double() - r_lp).abs().max().item() <= 1e-5
        assert (ent.double() - r_ent).abs().max().item() <= 1e-5
    # a strided row (ld > cols) reads only its own columns
    wide = torch.full((n, v + 5), float("nan"))
    wide[:, :v] = u
    lse, zt, ent = torch.empty(n), torch.empty(n), torch.empty(n)
    C.row_stats_host(
        wide.data_ptr(),
        v + 5,
        n,
        v,
        0,
        t.data_ptr(),
        0,
        0,
        v,
        1.0,
        0,
        0.0,
        0,
        0,
        True,
        True,
        lse.data_ptr(),
        zt.data_ptr(),
        ent.data_ptr(),
    )
    assert torch.equal(lse, out[v][0]) and torch.equal(ent, out[v][2])


def test_row_stats_target_outside_shard_reads_zero():
    n, v = 4, 64
    u = torch.randn(n, v)
    t = torch.tensor([0, 63, 64, 200])  # last two: another vocab shard's ids
    lse, zt, ent = torch.empty(n), torch.full((n,), 7.0), torch.empty(n)
    C.row_stats_host(
        u.data_ptr(),
        v,
        n,
        v,
        0,
        t.data_ptr(),
        0,
        0,
        v,
        1.0,
        0,
        0.0,
        0,
        0,
        True,
        True,
        lse.data_ptr(),
        zt.data_ptr(),
        ent.data_ptr(),
    )
    assert zt[2] == 0 and zt[3] == 0
    assert zt[0] == u[0, 0] and zt[1] == u[1, 63]


# =====================================================================================
# One-pass row epilogue: plain torch autograd reference from docs/one-pass.md
# =====================================================================================

MODES = {"clipped": 0, "gpg": 1, "cispo": 2, "unclipped": 3}
KLS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
LO, HI, CLIP_C = 0.8, 1.28, 3.0

# log-ratios d = logp - old and KL deltas logp - ref, chosen away from every branch boundary
# (clip bounds, the +-20 log-ratio clamp, the dual clip, k3's clamps), so fp32 and fp64 agree on
# every branch and the comparison is tight
D_VALUES = [-25.0, -0.5, -0.1, 0.05, 0.3, 1.0, 1.5, 25.0]
DELTA_VALUES = [-30.0, -3.0, -2.5, -0.4, 0.7, 2.0, 25.0]


def _head_losses(lp, old, adv, ref, mode, dual, kl_type, kl_st):
    """Per-token L + KL (the docs/one-pass.md table and fusedrl.loss.kl_penalty), torch, valid tokens only."""
    d = lp - old
    r = torch.exp(d.clamp(-20.0, 20.0))
    if mode == "clipped":
        l1 = -adv * r
        l2 = -adv * r.clamp(LO, HI)
        loss = torch.maximum(l1, l2)
        if dual:
            loss = torch.where(adv < 0, torch.minimum(loss, -adv * CLIP_C), loss)
    elif mode == "gpg":
        loss = -adv * lp
    elif mode == "cispo":
        loss = -r.detach().clamp(LO, HI) * adv * lp
    else:
        loss = -adv * r
    if kl_type is None:
        return loss, None
    delta = lp - ref
    if kl_type == "k1":
        kl = delta
    elif kl_type == "abs":
        kl = delta.abs()
    elif kl_type == "k2":
        kl = 0.5 * delta.square()
    else:
        x = (-delta).clamp(-20.0, 20.0)
        kl = (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)
    if kl_st:
        k2 = 0.5 * delta.square()
        kl = k2 - k2.detach() + kl.detach()
    return loss, kl


def onepass_reference(u, t, bias, T, c, head, mode_name, kl_name):
    """fp64 autograd: (logp, ent, lse, g_lp, g_H, du) of sum_t w_t (L_t + kl_coef KL_t - ent_coef H_t).
    T: a float or per-token [N] temperatures."""
    u64 = u.double().requires_grad_()
    z = _z64(u64, bias, T, c)
    lse = torch.logsumexp(z, -1)
    lsm = z - lse[:, None]
    p = lsm.exp()
    ent = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)  # 0 * -inf := 0
    logp = lsm.gather(-1, t[:, None])[:, 0]
    lp_leaf = logp.detach().requires_grad_()
    ent_leaf = ent.detach().requires_grad_()
    valid = head.weight != 0
    idx = valid.nonzero()[:, 0]
    w = head.weight.double()[idx]
    ref = head.ref.double()[idx] if head.ref is not None else None
    loss, kl = _head_losses(
        lp_leaf[idx], head.old.double()[idx], head.adv.double()[idx], ref, mode_name, head.dual, kl_name, head.kl_st
    )
    total = (w * loss).sum() - head.ent_coef * (w * ent_leaf[idx]).sum()
    if kl is not None:
        total = total + head.kl_coef * (w * kl).sum()
    g_lp, g_H = torch.autograd.grad(total, [lp_leaf, ent_leaf], allow_unused=True)
    g_lp = torch.zeros_like(lp_leaf) if g_lp is None else g_lp
    g_H = torch.zeros_like(ent_leaf) if g_H is None else g_H
    (du,) = torch.autograd.grad((logp * g_lp).sum() + (ent * g_H).sum(), [u64])
    return logp.detach(), ent.detach(), lse.detach(), g_lp, g_H, du


def make_onepass_case(
    n,
    v,
    mode="clipped",
    kl=None,
    ent_coef=0.01,
    bias="rand",
    T=1.0,
    c=None,
    masked=(),
    dual=True,
    kl_st=False,
    seed=0,
    need_ent=True,
):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, v, generator=g) * 3
    t = torch.randint(0, v, (n,), generator=g)
    b = None
    if bias in ("rand", "-inf"):
        b = torch.randn(v, generator=g) * 0.5
    if bias == "-inf":
        cols = torch.tensor([2, v // 2, v - 1])
        b[cols] = -math.inf
        t = torch.where(torch.isin(t, cols), torch.full_like(t, 1), t)
    # reference logp decides the log-ratios and KL deltas (away from branch boundaries)
    lp64 = _logp64(u, t, b, T, c)
    d = torch.tensor(D_VALUES, dtype=torch.float64)[torch.randint(0, len(D_VALUES), (n,), generator=g)]
    delta = torch.tensor(DELTA_VALUES, dtype=torch.float64)[torch.randint(0, len(DELTA_VALUES), (n,), generator=g)]
    old = (lp64 - d).float()
    ref = (lp64 - delta).float() if kl is not None else None
    adv = torch.randn(n, generator=g)
    weight = torch.rand(n, generator=g) + 0.1
    m = torch.zeros(n, dtype=torch.bool)
    m[list(masked)] = True
    weight[m] = 0.0
    old[m] = float("nan")  # masked tokens are never read
    adv[m] = float("nan")
    if ref is not None:
        ref[m] = float("nan")
    head = OnePassHead(
        mode=MODES[mode],
        clip_lo=LO,
        clip_hi=HI,
        clip_c=CLIP_C,
        dual=dual,
        ent_coef=ent_coef,
        kl_coef=0.0 if kl is None else 0.3,
        kl_type=KLS[kl or "k1"],
        kl_st=kl_st,
        old=old,
        adv=adv,
        weight=weight,
        ref=ref,
        need_ent=need_ent,
    )
    return u, t, b, head


def _z64(u, b, T, c):
    """z = softcap(u + b) / T in fp64 (u may require grad); T a float or per-token [N] temperatures."""
    v = u.double() + b.double() if b is not None else u.double()
    if c is not None:
        v = c * torch.tanh(v / c)
    return v / (T.double()[:, None] if isinstance(T, torch.Tensor) else T)


def _logp64(u, t, b, T, c):
    return torch.log_softmax(_z64(u, b, T, c), -1).gather(-1, t[:, None])[:, 0]


def _check_onepass(u, t, b, T, c, head, mode, kl, du16_dtype=None, rtol=1e-5):
    want = onepass_reference(u, t, b, T, c, head, mode, kl)
    work = u.clone()
    du16 = torch.empty(u.shape, dtype=du16_dtype) if du16_dtype is not None else None
    res = cb.onepass_epilogue(work, t, b, T, c, head, du16=du16)
    assert isinstance(res, EpilogueOut) and res.du is work  # du is written over the workspace u
    logp, ent, lse, g_lp, g_H, _ = res
    assert all(o.dtype == torch.float32 and o.shape == (u.shape[0],) for o in (logp, lse, g_lp, g_H))
    got = dict(logp=logp, ent=ent, lse=lse, g_lp=g_lp, g_H=g_H, du=work)
    for name, w in zip(("logp", "ent", "lse", "g_lp", "g_H", "du"), want):
        x = got[name]
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        tol = rtol * (w.abs().max().item() + 1.0)
        err = (x.double() - w).abs().max().item()
        assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e}"
    masked = head.weight == 0
    assert torch.all(g_lp[masked] == 0) and torch.all(g_H[masked] == 0) and torch.all(work[masked] == 0)
    if b is not None and c is None:
        cols = torch.isinf(b)
        assert torch.all(work[:, cols] == 0)
    if du16 is not None:
        assert torch.equal(du16, work.to(du16_dtype))  # the 16-bit copy is the fp32 du, rounded once
    return got


@pytest.mark.parametrize("kl", [None, "k1", "abs", "k2", "k3", "k3+", "k1+"])
@pytest.mark.parametrize(
    "mode,dual",
    [("clipped", True), ("clipped", False), ("gpg", False), ("cispo", False), ("unclipped", False)],
    ids=["clipped-dual", "clipped", "gpg", "cispo", "unclipped"],
)
def test_onepass_modes_and_kl(mode, dual, kl):
    st = kl is not None and kl.endswith("+")
    kl_base = kl.rstrip("+") if kl else None
    u, t, b, head = make_onepass_case(
        37, 1003, mode=mode, kl=kl_base, dual=dual, kl_st=st, masked=(0, 5, 36), bias="-inf", T=0.7
    )
    _check_onepass(u, t, b, 0.7, None, head, mode, kl_base)


@pytest.mark.parametrize("ent_coef", [0.0, 0.05], ids=["no-entropy", "entropy"])
@pytest.mark.parametrize(
    "opt",
    [
        dict(bias=None, T=1.0, c=None),
        dict(bias="rand", T=1.3, c=None),
        dict(bias="rand", T=0.7, c=30.0),
        dict(bias="-inf", T=1.0, c=None),
        dict(bias="-inf", T=1.3, c=5.0),
    ],
    ids=["plain", "bias-T1.3", "bias-T0.7-cap30", "neginf", "neginf-T1.3-cap5"],
)
@pytest.mark.parametrize("n,v", [(37, 1003), (5, 507), (1, 507)])
def test_onepass_options_and_shapes(n, v, opt, ent_coef):
    u, t, b, head = make_onepass_case(
        n,
        v,
        mode="clipped",
        kl="k3",
        ent_coef=ent_coef,
        bias=opt["bias"],
        T=opt["T"],
        c=opt["c"],
        masked=(1,) if n > 1 else (),
    )
    _check_onepass(u, t, b, opt["T"], opt["c"], head, "clipped", "k3")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_onepass_du16_copy(dtype):
    u, t, b, head = make_onepass_case(37, 507, mode="cispo", kl="k2", bias="-inf", masked=(3,))
    _check_onepass(u, t, b, 1.0, None, head, "cispo", "k2", du16_dtype=dtype)


def test_onepass_all_masked_and_empty():
    u, t, b, head = make_onepass_case(6, 507, masked=range(6))
    work = u.clone()
    logp, ent, lse, g_lp, g_H, du = cb.onepass_epilogue(work, t, b, 1.0, None, head)
    assert du is work and torch.all(work == 0) and torch.all(g_lp == 0) and torch.all(g_H == 0)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    e = torch.empty(0)
    head0 = head._replace(old=e, adv=e, weight=e)
    u0 = torch.empty(0, 507)
    out = cb.onepass_epilogue(u0, torch.empty(0, dtype=torch.long), b, 1.0, None, head0)
    assert all(o.shape == (0,) for o in out[:5] if o is not None) and out.du is u0


def test_onepass_entropy_output_only_when_needed():
    u, t, b, head = make_onepass_case(5, 507, ent_coef=0.0, need_ent=False)
    logp, ent, lse, g_lp, g_H, _ = cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head)
    assert ent is None and torch.all(g_H == 0)
    # an entropy bonus needs H in du: computed (and returned) whatever need_ent says
    _, ent2, _, _, g_H2, _ = cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head._replace(ent_coef=0.1))
    assert ent2 is not None and torch.all(g_H2 != 0)


def test_onepass_strided_rows():
    """A workspace row stride larger than V (ld > cols): only the row's own columns are touched."""
    u, t, b, head = make_onepass_case(7, 507, kl="abs", masked=(2,))
    want = onepass_reference(u, t, b, 1.0, None, head, "clipped", "abs")
    wide = torch.full((7, 520), 123.0)
    wide[:, :507] = u
    view = wide[:, :507]
    cb.onepass_epilogue(view, t, b, 1.0, None, head)
    assert torch.all(wide[:, 507:] == 123.0)
    assert (view.double() - want[5]).abs().max().item() <= 1e-5 * (want[5].abs().max().item() + 1)


def test_onepass_head_codes_by_name():
    u, t, b, head = make_onepass_case(5, 507, mode="cispo", kl="abs")
    a = cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head)
    n = cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head._replace(mode="cispo", kl_type="abs"))
    for x, y in zip(a, n):
        assert torch.equal(x, y)


def test_onepass_bad_arguments():
    u, t, b, head = make_onepass_case(5, 507, kl="k1")
    with pytest.raises(ValueError, match="mode"):
        cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head._replace(mode=7))
    with pytest.raises(ValueError, match="kl_type"):
        cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head._replace(kl_type=4))
    with pytest.raises(ValueError, match="ref"):
        cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head._replace(ref=None))
    with pytest.raises(TypeError, match="u"):
        cb.onepass_epilogue(u.double(), t, b, 1.0, None, head)
    with pytest.raises(ValueError, match="temperature"):
        cb.onepass_epilogue(u.clone(), t, b, 0.0, None, head)
    with pytest.raises(ValueError, match="weight"):
        cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head._replace(weight=head.weight[:3]))
    with pytest.raises(ValueError, match="bias"):
        cb.onepass_epilogue(u.clone(), t, b[:5], 1.0, None, head)
    with pytest.raises(TypeError, match="du16"):
        cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head, du16=torch.empty(5, 507))
    with pytest.raises(ValueError, match="dual"):
        cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head._replace(clip_c=None, dual=True))


def test_onepass_matches_loss_module_formulas():
    """g_lp / g_H of the host lane equal autograd over fusedrl.loss's own per-token formulas."""
    from fusedrl.loss import kl_penalty

    u, t, b, head = make_onepass_case(37, 507, mode="clipped", kl="k3", masked=(4,))
    logp, ent, lse, g_lp, g_H, _ = cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head)
    valid = head.weight != 0
    lp = logp.double().requires_grad_()
    d = (lp - head.old.double()).clamp(-20, 20)
    r = d.exp()
    adv = head.adv.double()
    l1, l2 = -adv * r, -adv * r.clamp(LO, HI)
    lc = torch.maximum(l1, l2)
    loss = torch.where(adv < 0, torch.minimum(-adv * CLIP_C, lc), lc)
    kl = kl_penalty(lp, head.ref.double(), "low_var_kl")
    w = head.weight.double()
    total = torch.where(valid, w * (loss + head.kl_coef * kl), torch.zeros_like(w)).sum()
    (want,) = torch.autograd.grad(total, [lp])
    assert (g_lp[valid].double() - want[valid]).abs().max().item() <= 1e-5
    assert torch.allclose(g_H.double(), -w * head.ent_coef)


# =====================================================================================
# Per-token temperature: z = softcap(u + b) / T_n (one temperature per token row)
# =====================================================================================


def _rand_temps(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) * 1.7 + 0.3  # in [0.3, 2.0]


def _ref_grads64_pt(x, w, t, b, T, c, g_lp, g_H):
    """fp64 (logp, ent, [dx, dW, db]) of sum(g_lp logp + g_H H), written here for per-token T."""
    leaves = [p.detach().double().requires_grad_() for p in (x, w, b) if p is not None]
    u = leaves[0] @ leaves[1].t()
    z = _z64(u, leaves[2] if b is not None else None, T, c)
    lsm = z - torch.logsumexp(z, -1, keepdim=True)
    p = lsm.exp()
    ent = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)  # 0 * -inf := 0
    lp = lsm.gather(-1, t[:, None])[:, 0]
    gs = torch.autograd.grad((lp * g_lp.double()).sum() + (ent * g_H.double()).sum(), leaves)
    return lp.detach(), ent.detach(), list(gs) + [None] * (3 - len(gs))


def _pt_case(n, h, v, bias, seed=0):
    x, w, _, t = make_case(n, h, v, torch.float32, scale=4.0, seed=seed)
    b = None
    if bias == "rand":
        b = make_case(n, h, v, torch.float32, bias=True, seed=seed)[2]
    elif bias == "-inf":
        masked = [3, 136, v - 1]
        b = _masked_bias(v, masked)
        t = torch.where(torch.isin(t, torch.tensor(masked)), torch.zeros_like(t), t)
    return x, w, b, t


PT_OPTS = [dict(bias=None, c=None), dict(bias="rand", c=30.0), dict(bias="-inf", c=None), dict(bias="-inf", c=5.0)]
PT_IDS = ["plain", "bias-cap30", "neginf", "neginf-cap5"]
PT_SHAPES = [(37, 24, 1003, 16, 136), (5, 24, 507, 8, 512), (1, 16, 507, 4, 64), (33, 16, 257, 7, 64)]
PT_SHAPE_IDS = ["N37-V1003-chunked", "N5-V507-one-chunk", "N1-V507", "N33-V257-odd-chunks"]


@pytest.mark.parametrize("opt", PT_OPTS, ids=PT_IDS)
@pytest.mark.parametrize("n,h,v,nc,vc", PT_SHAPES, ids=PT_SHAPE_IDS)
def test_recompute_host_lanes_per_token_temperature(n, h, v, nc, vc, opt):
    """row_stats and dz with T_n in [0.3, 2]: each token chunk reads its own rows' temperatures."""
    x, w, b, t = _pt_case(n, h, v, opt["bias"])
    # fp32 error grows like |z| ~ |u| / T: 2e-5 at T = 1 (the scalar test's bound), 3e-5 for T >= 0.3
    T, c = _rand_temps(n), opt["c"]
    lse = _check_recompute_lanes(x, w, t, b, T, c, nc, vc, _ref_grads64_pt, stat_tol=3e-5)
    # the temperatures really are per row: the same rows under the scalar T_0 differ elsewhere
    lse0, _, _ = host_forward(x, w, t, b, float(T[0]), c, nc, vc)
    assert lse0[0] == lse[0]
    if n > 1:
        assert not torch.equal(lse0[1:], lse[1:])


def test_dz_per_token_temperature_minus_inf_logit():
    """Per-token T with -inf logits and g_H != 0: du = 0 there, finite elsewhere, equal to fp64."""
    n, v = 4, 507
    g = torch.Generator().manual_seed(0)
    u = torch.randn(n, v, generator=g) * 3
    u[:, [0, 5, v - 1]] = -math.inf
    t = torch.tensor([1, 2, 3, 4])
    T = torch.tensor([0.3, 2.0, 1.0, 0.77])
    lse, zt, ent = torch.empty(n), torch.empty(n), torch.empty(n)
    C.row_stats_host(
        u.data_ptr(),
        v,
        n,
        v,
        0,
        t.data_ptr(),
        0,
        0,
        v,
        1.0,
        T.data_ptr(),
        0.0,
        0,
        0,
        True,
        True,
        lse.data_ptr(),
        zt.data_ptr(),
        ent.data_ptr(),
    )
    g_lp, g_H = torch.tensor([0.5, -1.0, 0.0, 2.0]), torch.tensor([0.7, -0.3, 0.0, 1.1])
    du = torch.empty_like(u)
    C.dz_host(
        u.data_ptr(),
        v,
        du.data_ptr(),
        v,
        n,
        v,
        0,
        t.data_ptr(),
        0,
        1.0,
        T.data_ptr(),
        0.0,
        lse.data_ptr(),
        ent.data_ptr(),
        g_lp.data_ptr(),
        g_H.data_ptr(),
    )
    assert torch.isfinite(du).all() and torch.all(du[:, [0, 5, v - 1]] == 0)
    u64 = u.double().requires_grad_()
    z = _z64(u64, None, T, None)
    lsm = z - torch.logsumexp(z, -1, keepdim=True)
    p = lsm.exp()
    e = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)
    lp = lsm.gather(-1, t[:, None])[:, 0]
    assert ((zt - lse).double() - lp.detach()).abs().max().item() <= 1e-5
    assert (ent.double() - e.detach()).abs().max().item() <= 1e-5
    (want,) = torch.autograd.grad((lp * g_lp.double()).sum() + (e * g_H.double()).sum(), [u64])
    assert (du.double() - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("ent_coef", [0.0, 0.05], ids=["no-entropy", "entropy"])
@pytest.mark.parametrize(
    "opt",
    [dict(bias=None, c=None), dict(bias="rand", c=30.0), dict(bias="-inf", c=None), dict(bias="-inf", c=5.0)],
    ids=PT_IDS,
)
@pytest.mark.parametrize("mode,kl", [("clipped", "k3"), ("cispo", "abs"), ("gpg", None), ("unclipped", "k2")])
@pytest.mark.parametrize("n,v", [(37, 1003), (5, 507), (1, 257)])
def test_onepass_per_token_temperature(n, v, mode, kl, opt, ent_coef):
    T = _rand_temps(n, seed=n)
    u, t, b, head = make_onepass_case(
        n,
        v,
        mode=mode,
        kl=kl,
        ent_coef=ent_coef,
        bias=opt["bias"],
        T=T,
        c=opt["c"],
        dual=mode == "clipped",
        masked=(1,) if n > 1 else (),
    )
    _check_onepass(u, t, b, T, opt["c"], head, mode, kl)


def test_onepass_per_token_temperature_du16_and_strided_rows():
    n, v = 7, 507
    T = _rand_temps(n)
    u, t, b, head = make_onepass_case(n, v, kl="abs", bias="-inf", T=T, masked=(2,))
    _check_onepass(u, t, b, T, None, head, "clipped", "abs", du16_dtype=torch.bfloat16)
    want = onepass_reference(u, t, b, T, None, head, "clipped", "abs")
    wide = torch.full((n, 520), 123.0)
    wide[:, :v] = u
    view = wide[:, :v]
    cb.onepass_epilogue(view, t, b, T, None, head)
    assert torch.all(wide[:, v:] == 123.0)
    assert (view.double() - want[5]).abs().max().item() <= 1e-5 * (want[5].abs().max().item() + 1)


@pytest.mark.parametrize("c", [None, 5.0], ids=["no-cap", "cap5"])
@pytest.mark.parametrize("T", [0.7, 1.0, 1.3])
def test_per_token_temperature_all_equal_is_scalar_bitwise(T, c):
    """A constant per-token vector runs the scalar path's arithmetic: every output bit for bit."""
    n, h, v, nc, vc = 37, 24, 1003, 16, 136
    x, w, b, t = _pt_case(n, h, v, "-inf")
    vec = torch.full((n,), T)  # float(T) rounded to fp32, as the scalar argument is
    fs, fv = host_forward(x, w, t, b, T, c, nc, vc), host_forward(x, w, t, b, vec, c, nc, vc)
    for a, bb in zip(fs, fv):
        assert torch.equal(a, bb)
    g = torch.Generator().manual_seed(1)
    g_lp, g_H = torch.randn(n, generator=g), torch.randn(n, generator=g)
    lse, _, ent = fs
    for a, bb in zip(
        host_backward(x, w, t, b, T, c, lse, ent, g_lp, g_H, nc, vc),
        host_backward(x, w, t, b, vec, c, lse, ent, g_lp, g_H, nc, vc),
    ):
        assert torch.equal(a, bb)
    u, tt, bo, head = make_onepass_case(n, v, kl="k3", bias="-inf", T=T, c=c, masked=(0, 9))
    outs = []
    for temp in (T, vec):
        work, d16 = u.clone(), torch.empty(u.shape, dtype=torch.float16)
        outs.append(list(cb.onepass_epilogue(work, tt, bo, temp, c, head, du16=d16)) + [work, d16])
    for a, bb in zip(*outs):
        assert torch.equal(a, bb)


def test_per_token_temperature_tensor_forms():
    """Any real dtype and any stride are accepted (cast to a contiguous fp32 copy)."""
    n, v = 5, 507
    u, t, b, head = make_onepass_case(n, v, bias="rand")
    T = torch.tensor([0.5, 1.0, 1.5, 0.25, 2.0])  # exact in fp16 / fp64
    want = cb.onepass_epilogue(u.clone(), t, b, T, None, head)
    strided = torch.stack([T, torch.zeros(n)], 1)[:, 0]
    for form in (T.double(), T.half(), strided, T.clone().requires_grad_()):
        got = cb.onepass_epilogue(u.clone(), t, b, form, None, head)
        for a, bb in zip(want, got):
            assert torch.equal(a, bb)


def test_per_token_temperature_bad_arguments():
    n, v = 5, 507
    u, t, b, head = make_onepass_case(n, v)
    bad = [
        torch.ones(n + 1),
        torch.ones(n, 1),
        torch.ones(1, n),
        torch.ones(()),
        torch.ones(n, dtype=torch.bool),
        torch.ones(n, device="meta"),
        "hot",
        None,
        -1.0,
        0.0,
        float("nan"),
    ]
    for T in bad:
        with pytest.raises(ValueError, match="temperature"):
            cb.onepass_epilogue(u.clone(), t, b, T, None, head)
    x, w, _, tg = make_case(3, 8, 11, torch.float32)
    logits = torch.randn(3, 11)
    e3 = torch.zeros(3)
    for T in (torch.ones(4), torch.ones(3, 1), -0.5):
        with pytest.raises(ValueError, match="temperature"):
            cb.forward(x, w, tg, None, T, None, True)
        with pytest.raises(ValueError, match="temperature"):
            cb.backward(x, w, tg, None, T, None, e3, e3, e3, e3)
        with pytest.raises(ValueError, match="temperature"):
            cb.logits_forward(logits, tg, T, None, True)
        with pytest.raises(ValueError, match="temperature"):
            cb.logits_backward(logits, tg, T, None, e3, e3, e3, e3)


# =====================================================================================
# One-pass epilogue: the 16-byte path (16-byte aligned rows) and the lean store (store_du32=False)
# =====================================================================================


def _padded(u, ld, offset=0, fill=123.0):
    """u [N, V] copied into a wider buffer: a [N, V] view of row stride ld starting `offset` elements in."""
    n, v = u.shape
    buf = torch.full((n * ld + offset + ld,), fill)
    view = buf[offset : offset + n * ld].view(n, ld)[:, :v]
    view.copy_(u)
    return buf, view


@pytest.mark.parametrize("du16_dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", ["rand", "-inf", None])
@pytest.mark.parametrize("v", [507, 1003, 1024, 5])
def test_onepass_vector_path_matches_fp64(v, bias, du16_dtype):
    """Rows 16-byte aligned with a row stride divisible by 4 (the one-pass workspace pads them to 16
    elements) take the kernel's 16-byte path: F4 groups per thread, kUnroll loads at a time, the V % 4
    tail column by column. Against fp64; the same statistics as the scalar path to fp32 rounding;
    independent of the padding (bitwise); the padding columns untouched. A misaligned start takes the
    scalar path: bitwise the contiguous (odd-stride) rows' result."""
    n = 37
    u, t, b, head = make_onepass_case(n, v, mode="clipped", kl="k3", bias=bias, T=0.7, c=None, masked=(1, 20))
    want = onepass_reference(u, t, b, 0.7, None, head, "clipped", "k3")
    runs = {}
    for tag, ld, off in (("pad16", -(-v // 16) * 16, 0), ("pad64", -(-v // 64) * 64 + 64, 0), ("misaligned", v + 3, 1)):
        buf, view = _padded(u, ld, off)
        d16 = torch.empty(n, v, dtype=du16_dtype) if du16_dtype is not None else None
        res = cb.onepass_epilogue(view, t, b, 0.7, None, head, du16=d16)
        assert res.du is view
        rest = buf.clone()
        rest[off : off + n * ld].view(n, ld)[:, :v] = 123.0
        assert torch.all(rest == 123.0), tag  # only the rows' own columns are written
        runs[tag] = [x for x in res[:5]] + [view.clone()] + ([d16] if d16 is not None else [])
        got = dict(zip(("logp", "ent", "lse", "g_lp", "g_H", "du"), runs[tag]))
        for name, w in zip(("logp", "ent", "lse", "g_lp", "g_H", "du"), want):
            tol = 1e-5 * (w.abs().max().item() + 1.0)
            assert (got[name].double() - w).abs().max().item() <= tol, (tag, name)
        if d16 is not None:
            assert torch.equal(d16, view.to(du16_dtype)), tag
    for a, c in zip(runs["pad16"], runs["pad64"]):
        assert torch.equal(a, c)
    work = u.clone()
    contiguous = cb.onepass_epilogue(work, t, b, 0.7, None, head)
    for a, c in zip(runs["misaligned"][:6], list(contiguous[:5]) + [work]):
        assert torch.equal(a, c) if v % 4 else torch.allclose(a, c, rtol=1e-5, atol=1e-6)
    for a, c in zip(runs["pad16"][:6], runs["misaligned"][:6]):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)  # another summation order: fp32 rounding apart


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bias", ["rand", None])
@pytest.mark.parametrize("v,ld", [(1003, 1008), (507, 507), (1024, 1024)], ids=["V1003-pad16", "V507", "V1024"])
def test_onepass_lean_store_is_bitwise(v, ld, bias, dtype):
    """store_du32=False: the 16-bit du alone, the same bits as with the fp32 store; every per-row output
    bitwise the same; U keeps its logits; EpilogueOut.du is du16 (vector and scalar paths)."""
    n = 33
    u, t, b, head = make_onepass_case(n, v, mode="cispo", kl="abs", bias=bias, T=1.3, c=5.0, masked=(0, 4))
    outs = []
    for lean in (False, True):
        buf, view = _padded(u, ld)
        d16 = torch.full((n, v), 9.0, dtype=dtype)
        res = cb.onepass_epilogue(view, t, b, 1.3, 5.0, head, du16=d16, store_du32=not lean)
        if lean:
            assert res.du is d16 and torch.equal(view, u)
        else:
            assert res.du is view and torch.equal(d16, view.to(dtype))
        outs.append(list(res[:5]) + [d16])
    for a, c in zip(*outs):
        assert torch.equal(a, c)


def test_onepass_lean_store_needs_du16():
    u, t, b, head = make_onepass_case(5, 507, kl="k1")
    with pytest.raises(ValueError, match="store_du32"):
        cb.onepass_epilogue(u.clone(), t, b, 1.0, None, head, store_du32=False)
    # the extension's own check (a caller of _C that bypasses the Python launcher)
    out = [torch.empty(5) for _ in range(4)]
    with pytest.raises(ValueError, match="du32 = false needs du16"):
        C.onepass_epilogue_host(u.data_ptr(), 507, 5, 507, t.data_ptr(), 0, 1.0, 0, 0.0, head.old.data_ptr(),
                                head.adv.data_ptr(), head.weight.data_ptr(), head.ref.data_ptr(), 0, LO, HI, CLIP_C,
                                True, 0.0, 0.3, 0, False, out[0].data_ptr(), 0, out[1].data_ptr(), out[2].data_ptr(),
                                out[3].data_ptr(), 0, 0, -1, du32=False)  # fmt: skip


# =====================================================================================
# GPU: the kernels against their host lanes
# =====================================================================================
gpu = pytest.mark.gpu


def _gpu_or_skip():
    ok, why = cb.is_available(torch.device("cuda"))
    if not ok:
        pytest.fail(f"GPU present but the cuda backend is unavailable: {why}")


def _head_to(head, dev):
    return head._replace(
        **{k: getattr(head, k).to(dev) for k in ("old", "adv", "weight", "ref") if getattr(head, k) is not None}
    )


@gpu
@pytest.mark.parametrize("du16", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "mode,kl,c", [("clipped", "k3", None), ("cispo", "abs", 30.0), ("unclipped", "k2", None), ("gpg", None, 5.0)]
)
def test_gpu_onepass_kernel_matches_host_lane(mode, kl, c, du16):
    _gpu_or_skip()
    u, t, b, head = make_onepass_case(300, 1003, mode=mode, kl=kl, bias="-inf", T=0.9, c=c, masked=(0, 17, 299))
    outs = {}
    for dev in ("cpu", "cuda"):
        work = u.clone().to(dev)
        d16 = torch.empty(u.shape, dtype=du16, device=dev) if du16 is not None else None
        res = cb.onepass_epilogue(work, t.to(dev), b.to(dev), 0.9, c, _head_to(head, dev), du16=d16)
        outs[dev] = [x.cpu() for x in res] + [work.cpu()] + ([d16.cpu()] if d16 is not None else [])
    for a, g in zip(outs["cpu"], outs["cuda"]):
        assert torch.isfinite(g.float()).all()
        # same code; only libm (expf/logf/tanhf) and FMA contraction differ: a few fp32 ulp, which
        # may move a 16-bit copy by one of its own ulp
        rtol = 1e-5 if g.dtype == torch.float32 else 8e-3
        assert torch.allclose(g.float(), a.float(), rtol=rtol, atol=1e-6)


@gpu
def test_gpu_onepass_many_rows():
    _gpu_or_skip()
    n, v = 70000, 64  # N > 65535 rows (int64 row offsets, grid sizing)
    u, t, b, head = make_onepass_case(n, v, kl="k1", bias="rand", masked=(0, n - 1))
    work = u.cuda()
    res = cb.onepass_epilogue(work, t.cuda(), b.cuda(), 1.0, None, _head_to(head, "cuda"))
    host = u.clone()
    ref = cb.onepass_epilogue(host, t, b, 1.0, None, head)
    for a, g in zip(ref, res):
        assert torch.allclose(g.cpu(), a, rtol=1e-5, atol=1e-6)
    assert torch.allclose(work.cpu(), host, rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_recompute_backend_minus_inf_bias(dtype):
    """The fixed dz kernel: cb.backward with a -inf bias column and g_H != 0 is finite and matches fp64."""
    _gpu_or_skip()
    n, h, v = 37, 24, 1003
    x, w, _, t = make_case(n, h, v, dtype, device="cuda", scale=4.0)
    masked = [3, 136, v - 1]
    b = _masked_bias(v, masked).to(dtype).cuda()
    t = torch.where(torch.isin(t, torch.tensor(masked, device="cuda")), torch.zeros_like(t), t)
    lse, zt, ent = cb.forward(x, w, t, b, 1.0, None, True, chunk_tokens=16, chunk_vocab=136)
    g_lp, g_H = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    dx, dw, db = cb.backward(x, w, t, b, 1.0, None, lse, ent, g_lp, g_H, chunk_tokens=16, chunk_vocab=136)
    assert torch.isfinite(dx.float()).all() and torch.isfinite(dw.float()).all() and torch.isfinite(db.float()).all()
    assert torch.all(dw[masked] == 0) and torch.all(db[masked] == 0)
    # the row_stats kernel against its host lane (GEMMs differ: cuBLAS vs torch CPU, hence the tolerance)
    hl = host_forward(x.cpu().float(), w.cpu().float(), t.cpu(), b.cpu().float(), 1.0, None, 16, 136)
    for got, want in zip((lse, zt, ent), hl):
        assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-4)


@gpu
@pytest.mark.parametrize("overlap", [True, False])
def test_gpu_failed_gemm_joins_side_stream(overlap):
    """A cuBLAS failure mid-loop raises, leaves the stream usable, and the next call is exact."""
    _gpu_or_skip()
    n, h, v = 300, 123, 1003
    x, w, b, t = make_case(n, h, v, torch.bfloat16, device="cuda", bias=True)
    kw = dict(chunk_tokens=64, chunk_vocab=256, overlap=overlap)
    lse, zt, ent = cb.forward(x, w, t, b, 1.0, None, True, **kw)
    g_lp, g_H = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    want = cb.backward(x, w, t, b, 1.0, None, lse, ent, g_lp, g_H, **kw)
    for k in (0, 3, 7):
        C._debug_fail_gemm_after(k)
        try:
            with pytest.raises(RuntimeError, match="injected"):
                cb.backward(x, w, t, b, 1.0, None, lse, ent, g_lp, g_H, **kw)
            C._debug_fail_gemm_after(k)
            with pytest.raises(RuntimeError, match="injected"):
                cb.forward(x, w, t, b, 1.0, None, True, **kw)
        finally:
            C._debug_fail_gemm_after(-1)
        # churn the caching allocator: freed workspaces are reused at once
        junk = [torch.full((1 << 20,), float("nan"), device="cuda") for _ in range(8)]
        del junk
        got = cb.backward(x, w, t, b, 1.0, None, lse, ent, g_lp, g_H, **kw)
        torch.cuda.synchronize()
        for p, q in zip(want, got):
            assert torch.equal(p, q)


@gpu
@pytest.mark.parametrize("du16", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode,kl,c", [("clipped", "k3", None), ("cispo", "abs", 30.0), ("gpg", None, 5.0)])
def test_gpu_onepass_per_token_temperature_matches_host_lane(mode, kl, c, du16):
    _gpu_or_skip()
    n, v = 300, 1003
    T = _rand_temps(n)
    u, t, b, head = make_onepass_case(n, v, mode=mode, kl=kl, bias="-inf", T=T, c=c, masked=(0, 17, 299))
    outs = {}
    for dev in ("cpu", "cuda"):
        work = u.clone().to(dev)
        d16 = torch.empty(u.shape, dtype=du16, device=dev) if du16 is not None else None
        res = cb.onepass_epilogue(work, t.to(dev), b.to(dev), T.to(dev), c, _head_to(head, dev), du16=d16)
        outs[dev] = [x.cpu() for x in res] + [work.cpu()] + ([d16.cpu()] if d16 is not None else [])
    for a, g in zip(outs["cpu"], outs["cuda"]):
        assert torch.isfinite(g.float()).all()
        rtol = 1e-5 if g.dtype == torch.float32 else 8e-3
        assert torch.allclose(g.float(), a.float(), rtol=rtol, atol=1e-6)
    want = onepass_reference(u, t, b, T, c, head, mode, kl)
    for got, w in zip(outs["cuda"], want):
        assert (got.double() - w).abs().max().item() <= 1e-5 * (w.abs().max().item() + 1.0)


@gpu
def test_gpu_onepass_per_token_temperature_all_equal_is_scalar_bitwise():
    _gpu_or_skip()
    n, v = 300, 1003
    u, t, b, head = make_onepass_case(n, v, kl="k3", bias="-inf", T=0.7, c=5.0, masked=(0, 17))
    u, t, b, head = u.cuda(), t.cuda(), b.cuda(), _head_to(head, "cuda")
    outs = []
    for temp in (0.7, torch.full((n,), 0.7, device="cuda")):
        work, d16 = u.clone(), torch.empty(u.shape, dtype=torch.bfloat16, device="cuda")
        outs.append(list(cb.onepass_epilogue(work, t, b, temp, 5.0, head, du16=d16)) + [work, d16])
    for a, g in zip(*outs):
        assert torch.equal(a, g)


@gpu
def test_gpu_recompute_per_token_temperature_matches_host_lane():
    """The row_stats / dz kernels with per-token T through the chunk loops (token chunks of 16: the
    per-row pointer is offset per chunk) against the host lanes and fp64."""
    _gpu_or_skip()
    n, h, v = 37, 24, 1003
    x, w, b, t = _pt_case(n, h, v, "-inf")
    T = _rand_temps(n)
    kw = dict(chunk_tokens=16, chunk_vocab=136)
    xc, wc, bc, tc, Tc = x.cuda(), w.cuda(), b.cuda(), t.cuda(), T.cuda()
    lse, zt, ent = cb.forward(xc, wc, tc, bc, Tc, 5.0, True, **kw)
    hl = host_forward(x, w, t, b, T, 5.0, 16, 136)
    for got, want in zip((lse, zt, ent), hl):
        assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-4)
    g = torch.Generator().manual_seed(1)
    g_lp, g_H = torch.randn(n, generator=g), torch.randn(n, generator=g)
    got = cb.backward(xc, wc, tc, bc, Tc, 5.0, lse, ent, g_lp.cuda(), g_H.cuda(), **kw)
    r_lp, r_ent, want = _ref_grads64_pt(x, w, t, b, T, 5.0, g_lp, g_H)
    assert ((zt - lse).cpu().double() - r_lp).abs().max().item() <= 3e-5
    for name, gg, ww in zip(("dx", "dW", "db"), got, want):
        tol = 1e-4 * (ww.abs().max().item() + 1.0)  # cuBLAS (TF32 off by default) vs fp64
        assert (gg.cpu().double() - ww).abs().max().item() <= tol, name


@gpu
@pytest.mark.parametrize("lean", [False, True], ids=["du32", "lean"])
@pytest.mark.parametrize("du16", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("v", [1003, 151936 // 64])
def test_gpu_onepass_vector_path_matches_host_lane(v, du16, lean):
    """The kernel's 16-byte path (rows padded to 16 elements, as fusedrl.onepass.run allocates them) and its
    lean store against the host lane (the same functions, the same per-thread order) and fp64; a grid of
    one full wave over more rows than it holds."""
    _gpu_or_skip()
    if lean and du16 is None:
        pytest.skip("the lean store needs du16")
    n = 2000
    ld = -(-v // 16) * 16
    u, t, b, head = make_onepass_case(n, v, kl="k3", bias="-inf", T=0.9, c=None, masked=(0, 17, n - 1))
    outs = {}
    for dev in ("cpu", "cuda"):
        buf = torch.zeros(n, ld, device=dev)
        work = buf[:, :v]
        work.copy_(u)
        d16 = torch.empty(n, v, dtype=du16, device=dev) if du16 is not None else None
        res = cb.onepass_epilogue(work, t.to(dev), b.to(dev), 0.9, None, _head_to(head, dev), du16=d16,
                                  store_du32=not lean)  # fmt: skip
        outs[dev] = [x.cpu() for x in res[:5]] + [work.cpu()] + ([d16.cpu()] if d16 is not None else [])
        assert torch.all(buf[:, v:] == 0)
    for a, g in zip(outs["cpu"], outs["cuda"]):
        rtol = 1e-5 if g.dtype == torch.float32 else 8e-3
        assert torch.allclose(g.float(), a.float(), rtol=rtol, atol=1e-6)
    if lean:
        assert torch.equal(outs["cuda"][5], u)
