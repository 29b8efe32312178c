"""Triton backend (fusedrl/backends/triton/) against the fp64 reference.

Without CUDA the kernels run in the triton interpreter on CPU tensors (TRITON_INTERPRET=1, set
before triton is imported). The interpreter is 50-250x slower than torch, so shapes are tiny and
unaligned (N <= 40, H in {24, 123}, V in {507, 1003}); a small-block config forces many token /
vocab / H blocks, vocab splits and workspace chunks on the same tiny shapes. Tolerances follow the
CCE idiom (tests/_factory.py): the kernel's error against fp64 must not exceed eager PyTorch's error
in the input dtype plus a small atol. CUDA-only large shapes are marked @pytest.mark.gpu.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from _factory import ATOL, GRAD_ATOL, assert_cce, eager_lowprec, err, make_case, ref64  # noqa: E402

from fusedrl import reference  # noqa: E402
from fusedrl.backends import triton as tb  # noqa: E402
from fusedrl.backends.triton import config as tconf  # noqa: E402
from fusedrl.backends.triton import core as tcore  # noqa: E402
from fusedrl.backends.triton import runtime as trt  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.skipif(
    not tb.is_available(torch.device(DEV))[0],
    reason=f"triton backend unavailable: {tb.is_available(torch.device(DEV))[1]}",
)

# Many small blocks: 3 token blocks at N=40, 16 vocab blocks at V=1003, 4 uneven H steps at H=123.
SMALL = dict(
    fwd=(16, 64, 32, 4, 2), du=(16, 64, 32, 4, 2), gemm=(16, 16, 64, 4, 2), atomic=(16, 64, 32, 32, 4, 2), group=2
)

CASES = {
    # name: (N, H, V, bias, temperature, softcap, return_entropy, extra opts)
    "N37-H123-V1003-bias-T0.7-cap30": (37, 123, 1003, True, 0.7, 30.0, True, {}),
    "N1-H24-V507-plain": (1, 24, 507, False, 1.0, None, True, {}),
    "N37-H24-V507-bias-T0.7-noent": (37, 24, 507, True, 0.7, None, False, {}),
    "N40-H123-V1003-smallblocks-chunks": (
        40,
        123,
        1003,
        True,
        1.0,
        30.0,
        True,
        dict(triton_config=SMALL, vocab_splits=3, workspace_mb=0.07),
    ),
}


def _to(*ts):
    return [None if t is None else t.to(DEV) for t in ts]


def _fwd(x, w, t, b, T, c, ent=True, vocab_start=0, **opts):
    lse, zt, H = tb.forward(x, w, t, b, T, c, ent, vocab_start=vocab_start, **opts)
    assert lse.dtype == zt.dtype == torch.float32 and lse.shape == zt.shape == (x.shape[0],)
    return zt - lse, H, lse


def _grads(lp, ent, leaves, g_lp, g_H):
    loss = (lp.double() * g_lp.double()).sum()
    if ent is not None and g_H is not None:
        loss = loss + (ent.double() * g_H.double()).sum()
    return torch.autograd.grad(loss, leaves)


def _ref_and_low_grads(x, w, b, t, T, c, g_lp, g_H):
    """fp64 reference grads and eager-in-input-dtype grads, both as lists [dx, dw, (db)]."""
    ent_on = g_H is not None
    l64 = [p.detach().double().requires_grad_() for p in (x, w, b) if p is not None]
    lp, ent = reference.linear_logprob_entropy(l64[0], l64[1], t, l64[2] if b is not None else None, T, c, ent_on)
    want = _grads(lp, ent, l64, g_lp, g_H)
    lows = [p.detach().clone().requires_grad_() for p in (x, w, b) if p is not None]
    lo_lp, lo_ent = eager_lowprec(lows[0], lows[1], t, lows[2] if b is not None else None, T, c, ent_on)
    low = _grads(lo_lp.float(), None if lo_ent is None else lo_ent.float(), lows, g_lp, g_H)
    return want, low


def _check_grads(got, want, low, dtype, names=("dx", "dW", "db")):
    for name, g, r, lo in zip(names, got, want, low):
        assert g is not None and g.shape == r.shape
        scale = r.abs().max().item() + 1e-6
        assert_cce(name, g.cpu(), r.cpu(), lo.cpu(), dtype, atol=GRAD_ATOL[dtype] * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_matches_reference(dtype, case):
    n, h, v, has_b, T, c, ent_on, opts = CASES[case]
    if opts and dtype == torch.float16:
        pytest.skip("small-block schedule covered in fp32/bf16 (interpreter time)")
    x, w, b, t = _to(*make_case(n, h, v, dtype, bias=has_b, scale=4.0, seed=1))
    lp, H, lse = _fwd(x, w, t, b, T, c, ent_on, **opts)
    r_lp, r_ent = ref64(x.cpu(), w.cpu(), t.cpu(), None if b is None else b.cpu(), T, c, ent_on)
    lo_lp, lo_ent = eager_lowprec(x, w, t, b, T, c, ent_on)
    assert_cce("logp", lp.cpu(), r_lp, lo_lp.cpu(), dtype)
    if ent_on:
        assert H.dtype == torch.float32
        assert_cce("entropy", H.cpu(), r_ent, lo_ent.cpu(), dtype)
    else:
        assert H is None

    g = torch.Generator().manual_seed(2)
    g_lp = torch.randn(n, generator=g).to(DEV)
    g_H = torch.randn(n, generator=g).to(DEV) if ent_on else None
    got = tb.backward(x, w, t, b, T, c, lse, H, g_lp, g_H, **opts)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    if b is None:
        assert got[2] is None
    else:
        assert got[2].dtype == dtype
    want, low = _ref_and_low_grads(
        x.cpu(), w.cpu(), None if b is None else b.cpu(), t.cpu(), T, c, g_lp.cpu(), None if g_H is None else g_H.cpu()
    )
    _check_grads([p for p in got if p is not None], want, low, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_schedules_agree_and_are_deterministic(dtype):
    """Every schedule (one vocab chunk; several chunks with dx accumulated across them - fp32 in
    place or bf16 hi + bf16 residual; the lean two-pass) matches the reference, repeated runs of a
    schedule are bitwise equal (fixed reduction order, no atomics), and the atomic
    (deterministic=False) path matches too."""
    n, h, v = 40, 123, 1003
    x, w, b, t = _to(*make_case(n, h, v, dtype, bias=True, scale=4.0, seed=3))
    lse, _, ent = tb.forward(x, w, t, b, 0.7, 30.0, True)
    g_lp, g_H = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    run = lambda **o: tb.backward(x, w, t, b, 0.7, 30.0, lse, ent, g_lp, g_H, **o)  # noqa: E731
    want, low = _ref_and_low_grads(x.cpu(), w.cpu(), b.cpu(), t.cpu(), 0.7, 30.0, g_lp.cpu(), g_H.cpu())
    base = run()
    _check_grads(base, want, low, dtype)
    plans = set()
    for opts in (dict(workspace_mb=0.05), dict(workspace_mb=0.05, memory_budget_mb=0)):
        plans.add(tcore._plan(n, h, v, dtype, True, True, tconf.block_config(x.device, opts), opts, x.device))
        got = run(**opts)
        _check_grads(got, want, low, dtype)
        for a, o in zip(got, run(**opts)):
            assert torch.equal(a, o), opts
    assert len({p[1] for p in plans}) == 2 and all(p[0] < v for p in plans), plans  # both schedules ran
    _check_grads(run(deterministic=False), want, low, dtype)
    # partial needs: only dx / only dW / only db
    dx, dw, db = run(need_dw=False, need_db=False)
    assert dw is None and db is None and torch.equal(dx, base[0])
    dx, dw, db = run(need_dx=False, need_db=False)
    assert dx is None and db is None and torch.equal(dw, base[1])
    dx, dw, db = run(need_dx=False, need_dw=False, deterministic=False)
    assert dx is None and dw is None and torch.allclose(db.float(), base[2].float(), rtol=1e-2, atol=1e-3)


def test_plan_respects_memory_budget():
    """The deterministic schedule stays within 128 MiB + 1 KiB/token above inputs+grads (headline
    shapes, computed by the planner without running anything)."""
    cfg = tconf.CONFIGS["hopper"]
    opts = dict(min_vocab_chunk=1024)
    for n, dtype in [(8192, torch.bfloat16), (65537, torch.bfloat16), (8192, torch.float32), (1, torch.bfloat16)]:
        h, v = 4096, 151936
        vc, single, nc = tcore._plan(n, h, v, dtype, True, True, cfg, opts, torch.device("cpu"))
        esz = 2 if dtype == torch.bfloat16 else 4
        bn = cfg["du"][0]
        pad_n = -(-n // bn) * bn
        lo = 2 * n * h if (single and vc < v and dtype != torch.float32) else 0
        peak = max(pad_n * vc * esz + lo, (nc or 0) * (-(-v // 128) * 128) * esz)
        assert peak <= 128 * 2**20 + 1024 * n + 2**20, (n, dtype, vc, single, nc, peak / 2**20)
    # the headline bf16 shape keeps the 4-GEMM single pass with wide vocab chunks
    vc, single, _ = tcore._plan(8192, 4096, 151936, torch.bfloat16, True, True, cfg, opts, torch.device("cpu"))
    assert single and vc >= 2048


def _h100(monkeypatch, free_gb=75.0, total_gb=80.0, sms=132):
    """Mock the planner's view of the device: an 80 GB Hopper GPU with `free_gb` free."""
    monkeypatch.setattr(tconf, "device_facts", lambda device: (sms, int(free_gb * 2**30), int(total_gb * 2**30)))
    return tconf.CONFIGS["hopper"]


@pytest.mark.parametrize(
    "major, smem_kib, family",
    [(8, 163, "ampere"), (8, 99, "ampere"), (9, 227, "hopper"), (10, 227, "hopper"), (12, 99, "ampere")],
    ids=["sm80", "sm86", "sm90", "sm100", "sm120"],
)
def test_block_family_follows_shared_memory(monkeypatch, major, smem_kib, family):
    """The hopper blocks need ~200 KiB of shared memory per block: consumer Blackwell (sm_120, 99 KiB) gets
    the ampere ones (they fit in 96 KiB), not the ones its major version suggests."""
    props = type("P", (), dict(major=major, minor=0, shared_memory_per_block_optin=smem_kib * 1024))()
    monkeypatch.setattr(tconf, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    assert tconf.family(torch.device("cuda")) == family


@pytest.mark.parametrize("h", [4096, 8192])
def test_plan_default_budget_keeps_four_gemms_on_80gb(monkeypatch, h):
    """Default budget from free device memory (mocked facts, no GPU): up to N = 65536 at H = 4096 and
    8192 the 4-GEMM schedule holds (no lean 5-GEMM pass), the dW GEMM fills >= 2 waves of 132 SMs,
    the planned memory stays within the budget (<= 4 GiB), and the dx hi/lo accumulation traffic
    (8 bytes per dx element per vocab chunk) is small: at N = 12288, H = 4096 it was ~34 GB."""
    cfg = _h100(monkeypatch)
    v = 151936
    bm, bd = cfg["gemm"][0], cfg["gemm"][2]
    for n in (1, 4096, 8192, 12288, 16384, 32768, 65536):
        for dtype in (torch.bfloat16, torch.float32):
            esz = 2 if dtype == torch.bfloat16 else 4
            vc, single, nc = tcore._plan(n, h, v, dtype, True, True, cfg, {}, torch.device("cuda"))
            assert single and nc is None, (n, h, dtype, vc, nc)
            budget = tconf.default_budget(n, int(75 * 2**30))
            assert budget <= 4 * 2**30 + 1024 * n
            pad_n = -(-n // cfg["du"][0]) * cfg["du"][0]
            nchunks = -(-v // vc)
            lo = 2 * n * h if (nchunks > 1 and esz == 2) else 0
            assert pad_n * vc * esz + lo <= budget, (n, h, dtype, vc)
            if nchunks > 1:
                assert -(-vc // bm) * -(-h // bd) >= 2 * 132, (n, h, vc)  # dW GEMM grid
            if n == 12288 and h == 4096 and esz == 2:
                assert nchunks * 8 * n * h <= 4e9, nchunks


def test_plan_budget_tracks_free_memory(monkeypatch):
    """Little free memory: the default budget shrinks (never below the lean floor) and the plan
    respects it; the lean dx pass keeps >= 2 waves when the budget allows; an explicit budget and
    the budget_cap_mb option win."""
    cfg = _h100(monkeypatch, free_gb=1.6)
    n, h, v = 65536, 4096, 151936
    budget = tconf.default_budget(n, int(1.6 * 2**30))
    assert budget == max(128 * 2**20 + 1024 * n, 0.25 * int(1.6 * 2**30))
    vc, single, nc = tcore._plan(n, h, v, torch.bfloat16, True, True, cfg, {}, torch.device("cuda"))
    assert not single and nc is not None  # 512 MiB of dx residual alone does not fit 410 MiB
    assert nc * (-(-v // 128) * 128) * 2 <= budget
    assert -(-nc // cfg["gemm"][0]) * -(-h // cfg["gemm"][2]) >= 2 * 132  # lean dx GEMM: >= 2 waves
    assert tconf.default_budget(8192, 75 * 2**30, cap_mb=512) == 512 * 2**20
    _h100(monkeypatch)
    vc, single, nc = tcore._plan(
        n, h, v, torch.bfloat16, True, True, cfg, dict(memory_budget_mb=128 + n / 1024), torch.device("cuda")
    )
    assert not single  # the lean budget of docs/design.md, asked for explicitly
    # no device facts (CPU / interpreter): the lean floor, as before
    assert tconf.default_budget(n, None) == 128 * 2**20 + 1024 * n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_shard(dtype):
    """vocab_start != 0: a shard sees global targets (some outside it); with the global LSE/entropy,
    shard grads sum (dx) / concatenate (dW, db) to the full-vocabulary grads."""
    n, h, v = 37, 24, 1003
    x, w, b, t = _to(*make_case(n, h, v, dtype, bias=True, scale=3.0, seed=4))
    t[0] = -100  # an ignore-style target: in no shard
    T, c = 0.7, 30.0
    cut = 400
    shards = [(0, w[:cut], b[:cut]), (cut, w[cut:], b[cut:])]
    z_full = reference.linear_logits(x.cpu().double(), w.cpu().double(), b.cpu().double(), T, c)
    lse_parts, zt_sum = [], torch.zeros(n, dtype=torch.float64)
    for vs, ws, bs in shards:
        lse_s, zt_s, ent_s = tb.forward(x, ws, t, bs, T, c, True, vocab_start=vs)
        z = z_full[:, vs : vs + ws.shape[0]]
        assert err(lse_s.cpu(), torch.logsumexp(z, -1)) < 10 * ATOL[dtype] + 1e-5
        loc = t.cpu() - vs
        inside = (loc >= 0) & (loc < ws.shape[0])
        want_zt = torch.where(inside, z.gather(1, loc.clamp(0, ws.shape[0] - 1)[:, None])[:, 0], 0.0)
        assert err(zt_s.cpu(), want_zt) < 1e-4 * (1 + want_zt.abs().max().item())
        p = torch.softmax(z, -1)
        assert err(ent_s.cpu(), -(p * torch.log_softmax(z, -1)).sum(-1)) < 1e-4
        lse_parts.append(lse_s.cpu().double())
        zt_sum += zt_s.cpu().double()
    lse_g = torch.logsumexp(torch.stack(lse_parts), 0)
    valid = t.cpu() >= 0
    want_lp = torch.log_softmax(z_full, -1).gather(1, t.cpu().clamp(min=0)[:, None])[:, 0]
    assert err((zt_sum - lse_g)[valid], want_lp[valid]) < 1e-4

    # backward with global stats from the reference
    p_full = torch.softmax(z_full, -1)
    lse_ref = torch.logsumexp(z_full, -1).float().to(DEV)
    ent_ref = (-(p_full * torch.log_softmax(z_full, -1)).sum(-1)).float().to(DEV)
    g_lp, g_H = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    g_lp[0] = 0.0  # ignored token: no logp gradient
    dx = torch.zeros(n, h, dtype=torch.float64)
    dws, dbs = [], []
    for vs, ws, bs in shards:
        dxs, dws_, dbs_ = tb.backward(x, ws, t, bs, T, c, lse_ref, ent_ref, g_lp, g_H, vocab_start=vs)
        dx += dxs.cpu().double()
        dws.append(dws_.cpu())
        dbs.append(dbs_.cpu())
    tt = t.cpu().clamp(min=0)
    want, low = _ref_and_low_grads(x.cpu(), w.cpu(), b.cpu(), tt, T, c, g_lp.cpu(), g_H.cpu())
    # summing two rounded shard dx's adds one rounding of the input dtype
    _check_grads([dx, torch.cat(dws), torch.cat(dbs)], want, low, dtype)


def _peaked_case(dtype, n=40, h=123, v=1003):
    """LM-like peaked softmax: a block of frequent tokens (large bias) holds most of the mass,
    targets are mostly the argmax (a few random, rare ones)."""
    x, w, _, t = make_case(n, h, v, dtype, scale=6.0, seed=5)
    b = torch.zeros(v)
    b[:64] = 25.0
    b = b.to(dtype)
    z = x.double() @ w.double().t() + b.double()
    t = torch.where(torch.arange(n) % 8 == 0, t, z.argmax(-1))
    return _to(x, w, b, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_filter(dtype):
    x, w, b, t = _peaked_case(dtype)
    n, h = x.shape
    v = w.shape[0]
    lse, _, ent = tb.forward(x, w, t, b, 1.0, None, True)
    assert ent.mean().item() < 1.0  # peaked
    g_lp, g_H = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    # token blocks of 16 so that filtering is per few tokens (the interpreter default is 64)
    opts = dict(triton_config=dict(du=(16, 128, 128, 4, 2), gemm=(16, 16, 128, 4, 2), atomic=(16, 128, 128, 128, 4, 2)))
    exact = tb.backward(x, w, t, b, 1.0, None, lse, ent, g_lp, g_H, **opts)
    eps = 2.0**-12
    # the filter flags: most tiles are skipped on this peaked softmax
    cfg = tconf.block_config(x.device, opts)
    bn, bv = cfg["du"][:2]
    ws = torch.empty(n, v, dtype=dtype, device=DEV)
    flags = torch.empty(-(-n // bn), -(-v // bv), dtype=torch.int8, device=DEV)
    tcore._launch_du(x, w, b, t, lse, ent, g_lp, g_H, ws, flags, None, 0, n, 0, v, h, 0, 1.0, None, eps, False, cfg)
    live = flags.float().mean().item()
    assert 0.0 < live < 0.5, live
    want, low = _ref_and_low_grads(x.cpu(), w.cpu(), b.cpu(), t.cpu(), 1.0, None, g_lp.cpu(), g_H.cpu())
    for det in (True, False):
        got = tb.backward(x, w, t, b, 1.0, None, lse, ent, g_lp, g_H, grad_filter_eps=eps, deterministic=det, **opts)
        _check_grads(got, want, low, dtype)
        for g, e in zip(got, exact):  # filtered - exact: bounded by what was skipped
            assert err(g.cpu(), e.cpu()) <= 0.01 * e.abs().max().item()
        assert torch.equal(got[2], exact[2]) or not det  # db is never filtered
    # a huge eps skips every dx/dW update; db stays exact
    x2, w2, b2, t2 = _to(*make_case(8, 24, 507, dtype, bias=True, seed=6))
    lse2, _, ent2 = tb.forward(x2, w2, t2, b2, 1.0, None, True)
    g2 = torch.randn(8, device=DEV)
    dx, dw, db = tb.backward(x2, w2, t2, b2, 1.0, None, lse2, ent2, g2, g2, grad_filter_eps=1e9)
    _, _, db_exact = tb.backward(x2, w2, t2, b2, 1.0, None, lse2, ent2, g2, g2)
    assert not dx.any() and not dw.any() and torch.equal(db, db_exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_filtered_gemm_is_dense_gemm_on_zeroed_tiles(dtype):
    """The gradient-filtered GEMM iterates compacted live-tile lists (no branch in the K loop): it must
    give bitwise the result of the dense GEMM over du with the dead tiles zeroed, in both operand
    orientations (dx: A = du; dW: A = du^T), with ragged edges, an all-dead flag row and stale flag
    columns past the chunk (as the vocab-chunk pass leaves them)."""
    g = torch.Generator().manual_seed(12)
    n, v, h = 40, 300, 24
    bn, bv = 16, 64
    cfg = tconf.block_config(torch.device(DEV), dict(triton_config=dict(gemm=(16, 16, 32, 4, 2))))
    du = torch.randn(n, v, generator=g).to(dtype).to(DEV)
    ntb, nvb = -(-n // bn), -(-v // bv)
    flags = (torch.rand(ntb, nvb + 2, generator=g) < 0.5).to(torch.int8).to(DEV)  # 2 stale columns
    flags[1] = 0
    f = flags[:, :nvb]
    dead = (f == 0).repeat_interleave(bn, 0)[:n].repeat_interleave(bv, 1)[:, :v]
    du0 = torch.where(dead, torch.zeros_like(du), du)
    w = torch.randn(v, h, generator=g).to(dtype).to(DEV)
    x = torch.randn(n, h, generator=g).to(dtype).to(DEV)
    for a, b_, live, blocks, m, k, out_shape in (
        ((du, (du.stride(0), 1)), w, tcore._live_lists(f), (bn, bv), n, v, (n, h)),  # dx
        ((du, (1, du.stride(0))), x, tcore._live_lists(f.t()), (bv, bn), v, n, (v, h)),
    ):  # dW
        got = torch.empty(out_shape, dtype=dtype, device=DEV)
        want = torch.empty_like(got)
        tcore._launch_gemm(a[0], a[1], b_, got, live, blocks, m, k, h, cfg)
        tcore._launch_gemm(du0, a[1], b_, want, None, blocks, m, k, h, cfg)
        assert torch.equal(got, want)
    assert tcore._live_lists(f)[1].tolist() == f.sum(1).tolist()


def test_zero_tokens():
    x, w, b, t = _to(*make_case(0, 24, 507, torch.float32, bias=True))
    lse, zt, ent = tb.forward(x, w, t, b, 1.0, None, True)
    assert lse.shape == zt.shape == ent.shape == (0,)
    e = torch.empty(0, device=DEV)
    for det in (True, False):
        dx, dw, db = tb.backward(x, w, t, b, 1.0, None, e, e, e, e, deterministic=det)
        assert dx.shape == (0, 24) and dw.shape == (507, 24) and db.shape == (507,)
        assert not dw.any() and not db.any()
    lg = torch.empty(0, 507, device=DEV)
    lse, zt, ent = tb.logits_forward(lg, t, 1.0, None, True)
    assert lse.shape == (0,)
    assert tb.logits_backward(lg, t, 1.0, None, e, e, e, e).shape == (0, 507)


def test_softcap_saturation_and_large_logits():
    """|u| >> softcap: tanh must saturate to +-1 without inf/nan (no libdevice in the interpreter)."""
    x, w, b, t = _to(*make_case(16, 24, 507, torch.float32, scale=200.0, seed=7))
    for c in (5.0, 30.0):
        lp, H, _ = _fwd(x, w, t, None, 0.7, c, True)
        r_lp, r_ent = ref64(x.cpu(), w.cpu(), t.cpu(), None, 0.7, c)
        assert torch.isfinite(lp).all() and torch.isfinite(H).all()
        assert err(lp.cpu(), r_lp) < 1e-4 and err(H.cpu(), r_ent) < 1e-4
    lp, H, _ = _fwd(x, w, t, None, 1.0, None, True)  # no softcap: logits ~ 1e3, still exact LSE
    r_lp, r_ent = ref64(x.cpu(), w.cpu(), t.cpu(), None, 1.0, None)
    assert err(lp.cpu(), r_lp) < 1e-3 * r_lp.abs().max().item() and torch.isfinite(H).all()


def test_fp32_large_vocab_precision():
    """The numerical contract: fp32 logp within 1e-5 of fp64 at V = 151936 (many splits merged)."""
    x, w, _, t = _to(*make_case(4, 32, 151936, torch.float32, scale=2.0, seed=8))
    lp, H, _ = _fwd(
        x, w, t, None, 1.0, None, True, vocab_splits=5, triton_config=dict(fwd=(16, 4096, 32, 8, 2))
    )  # few, wide tiles (interpreter time)
    r_lp, r_ent = ref64(x.cpu(), w.cpu(), t.cpu(), None, 1.0, None)
    assert err(lp.cpu(), r_lp) < 1e-5 and err(H.cpu(), r_ent) < 1e-4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "opt", [(1.0, None, True), (0.7, 30.0, True), (0.7, None, False)], ids=["plain", "T0.7-cap30", "T0.7-noent"]
)
def test_logits_forward_backward(dtype, opt):
    T, c, ent_on = opt
    n, v = 37, 1003
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype).to(DEV)
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    lse, zt, H = tb.logits_forward(logits, t, T, c, ent_on)
    r_lp, r_ent = reference.logprob_entropy(logits.cpu().double(), t.cpu(), T, c, ent_on)
    lo_lp, lo_ent = reference.logprob_entropy(logits.cpu(), t.cpu(), T, c, ent_on)  # fp32 math
    assert_cce("logp", (zt - lse).cpu(), r_lp, lo_lp, torch.float32)
    if ent_on:
        assert_cce("entropy", H.cpu(), r_ent, lo_ent, torch.float32)
    else:
        assert H is None

    g_lp = torch.randn(n, generator=g).to(DEV)
    g_H = torch.randn(n, generator=g).to(DEV) if ent_on else None
    leaf = logits.cpu().double().requires_grad_()
    r_lp, r_ent = reference.logprob_entropy(leaf, t.cpu(), T, c, ent_on)
    (want,) = _grads(r_lp, r_ent, [leaf], g_lp.cpu(), None if g_H is None else g_H.cpu())
    out = tb.logits_backward(logits, t, T, c, lse, H, g_lp, g_H, inplace=False)
    assert out.dtype == dtype and out.data_ptr() != logits.data_ptr()
    tol = GRAD_ATOL[dtype] * want.abs().max().item() + (
        0.0 if dtype == torch.float32 else 2.0**-7 * want.abs().max().item()
    )
    assert err(out.cpu(), want) <= tol
    buf = logits.clone()
    out2 = tb.logits_backward(buf, t, T, c, lse, H, g_lp, g_H, inplace=True)
    assert out2.data_ptr() == buf.data_ptr() and torch.equal(out2, out)


def test_fp32_precision_option_and_configs(monkeypatch):
    """fp32 inputs: tf32x3 on GPUs by default, "ieee" on request; the interpreter always computes exact
    fp32 (it has no tf32). fp32 inputs get their own pinned tiles (shared memory per stage doubles)."""
    x32 = torch.empty(2, 2)
    cfg = tconf.block_config(torch.device(DEV), {})
    assert cfg["fp32_precision"] == "tf32x3"
    assert tconf.block_config(torch.device(DEV), dict(fp32_precision="ieee"))["fp32_precision"] == "ieee"
    with pytest.raises(ValueError, match="fp32_precision"):
        tconf.block_config(torch.device(DEV), dict(fp32_precision="tf32"))
    assert tconf.is_ieee(x32, cfg) == trt.INTERPRET and not tconf.is_ieee(x32.half(), cfg)
    monkeypatch.setattr(tconf, "family", lambda device: "hopper")
    h16 = tconf.block_config(torch.device(DEV), {}, torch.bfloat16)
    h32 = tconf.block_config(torch.device(DEV), {}, torch.float32)
    assert h16["gemm"] == tconf.CONFIGS["hopper"]["gemm"] and h32["gemm"] == tconf.CONFIGS["hopper_fp32"]["gemm"]
    for fam in ("hopper", "ampere"):
        for fp32 in (False, True):
            full = dict(tconf.CONFIGS[fam], **(tconf.CONFIGS.get(fam + "_fp32", {}) if fp32 else {}))
            bn, bv = full["du"][:2]
            bm, bk = full["gemm"][:2]
            assert bn % bm == 0 and bv % bm == 0 and bn % bk == 0 and bv % bk == 0, (fam, fp32)
            assert set(tconf.TUNE_CONFIGS["fwd"][(fam, fp32)]) and set(tconf.TUNE_CONFIGS["gemm"][(fam, fp32)])


def test_is_available_and_dtypes():
    ok, why = tb.is_available(torch.device(DEV))
    assert ok, why
    ok, why = tb.is_available(torch.device("meta"))
    assert not ok and why
    x, w, b, t = make_case(4, 24, 507, torch.float64)
    with pytest.raises(TypeError):
        tb.forward(x.to(DEV), w.to(DEV), t.to(DEV), None, 1.0, None, True)


# ----------------------------------------------------------------------------------------------
# Per-token temperature: T_n per row, in every kernel and schedule
# ----------------------------------------------------------------------------------------------


def _temps(n, seed=0):
    return 0.3 + 1.7 * torch.rand(n, generator=torch.Generator().manual_seed(seed))


def _ninf_case(n, h, v, dtype, seed):
    """make_case with bias, two -inf bias columns (masked vocabulary; no target there)."""
    x, w, b, t = make_case(n, h, v, dtype, bias=True, scale=4.0, seed=seed)
    b[5] = b[v - 2] = -float("inf")
    t = torch.where((t == 5) | (t == v - 2), torch.full_like(t, 6), t)
    return x, w, b, t


def _eager_masked(x, w, t, b, temperature, cap):
    """eager_lowprec (logits in the input dtype) with p log p = 0 at p = 0 (-inf columns)."""
    u = x @ w.t() + b
    if cap is not None:
        u = cap * torch.tanh(u / cap)
    lsm = torch.log_softmax(u / temperature, -1)
    p = lsm.exp()
    return lsm.gather(-1, t[:, None])[:, 0], -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)


# name: (N, H, V, backward opts); the small-block schedules run many token / vocab / H blocks, 3 vocab
# splits, several vocab chunks (dx accumulated across them) or the lean token-chunk pass (rows n0 > 0)
PT_SCHEDULES = {
    "default": (37, 24, 507, {}),
    "splits-chunks": (40, 123, 1003, dict(triton_config=SMALL, vocab_splits=3, workspace_mb=0.07)),
    "lean-token-chunks": (40, 123, 1003, dict(triton_config=SMALL, workspace_mb=0.05, memory_budget_mb=0)),
    "atomic": (37, 24, 507, dict(deterministic=False)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cap", [None, 30.0], ids=["nocap", "cap30"])
@pytest.mark.parametrize("sched", list(PT_SCHEDULES))
def test_per_token_temperature_matches_reference(sched, cap, dtype):
    """z = softcap(x W^T + b) / T_n with one T per row, bias with -inf columns: logp, entropy and
    dx / dW / db against the fp64 reference (CCE bound: eager in the input dtype with the same T_n)."""
    n, h, v, opts = PT_SCHEDULES[sched]
    x, w, b, t = _to(*_ninf_case(n, h, v, dtype, seed=21))
    temp = _temps(n, 22).to(DEV)
    fwd_opts = {k: o for k, o in opts.items() if k in ("triton_config", "vocab_splits")}
    lp, H, lse = _fwd(x, w, t, b, temp, cap, True, **fwd_opts)
    col = temp.cpu()[:, None]  # one temperature per row, broadcast over the vocabulary
    r_lp, r_ent = ref64(x.cpu(), w.cpu(), t.cpu(), b.cpu(), col, cap)
    lows = [q.cpu().clone().requires_grad_() for q in (x, w, b)]
    lo_lp, lo_ent = _eager_masked(lows[0], lows[1], t.cpu(), lows[2], col.to(dtype), cap)
    assert_cce("logp", lp.cpu(), r_lp, lo_lp.detach(), dtype)
    assert_cce("entropy", H.cpu(), r_ent, lo_ent.detach(), dtype)
    g = torch.Generator().manual_seed(23)
    g_lp, g_H = torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    if "memory_budget_mb" in opts:  # the lean schedule really runs token chunks (rows n0 > 0)
        _, single, nc = tcore._plan(n, h, v, dtype, True, True, tconf.block_config(x.device, opts), opts, x.device)
        assert not single and nc < n
    got = tb.backward(x, w, t, b, temp, cap, lse, H, g_lp, g_H, **opts)
    assert all(torch.isfinite(q).all() for q in got)
    l64 = [q.detach().cpu().double().requires_grad_() for q in (x, w, b)]
    r_lp, r_ent = reference.linear_logprob_entropy(l64[0], l64[1], t.cpu(), l64[2], col.double(), cap)
    want = _grads(r_lp, r_ent, l64, g_lp.cpu(), g_H.cpu())
    low = _grads(lo_lp.float(), lo_ent.float(), lows, g_lp.cpu(), g_H.cpu())
    _check_grads(got, want, low, dtype)
    if cap is None:  # masked columns: no gradient
        assert not got[1][[5, v - 2]].any() and not got[2][[5, v - 2]].any()


@pytest.mark.parametrize("cap", [None, 30.0], ids=["nocap", "cap30"])
def test_per_token_temperature_equal_vector_is_scalar_bitwise(cap):
    """An all-equal vector of an fp32-exact T runs the scalar path's arithmetic: forward, both
    backwards (deterministic, lean, atomic) and the logits path, bit for bit."""
    n, h, v = 40, 123, 1003
    x, w, b, t = _to(*_ninf_case(n, h, v, torch.bfloat16, seed=24))
    T, vec = 0.75, torch.full((n,), 0.75, device=DEV)
    fs, fv = (
        tb.forward(x, w, t, b, T, cap, True, vocab_splits=3),
        tb.forward(x, w, t, b, vec, cap, True, vocab_splits=3),
    )
    for a, e in zip(fs, fv):
        assert torch.equal(a, e)
    lse, _, ent = fs
    g_lp, g_H = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    for opts in (dict(), dict(triton_config=SMALL, workspace_mb=0.05, memory_budget_mb=0), dict(deterministic=False)):
        for a, e in zip(
            tb.backward(x, w, t, b, T, cap, lse, ent, g_lp, g_H, **opts),
            tb.backward(x, w, t, b, vec, cap, lse, ent, g_lp, g_H, **opts),
        ):
            assert torch.equal(a, e), opts
    logits = (torch.randn(n, v) * 4).to(DEV)
    ls, lv = tb.logits_forward(logits, t, T, cap, True), tb.logits_forward(logits, t, vec, cap, True)
    for a, e in zip(ls, lv):
        assert torch.equal(a, e)
    assert torch.equal(
        tb.logits_backward(logits, t, T, cap, ls[0], ls[2], g_lp, g_H),
        tb.logits_backward(logits, t, vec, cap, ls[0], ls[2], g_lp, g_H),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cap", [None, 30.0], ids=["nocap", "cap30"])
def test_logits_per_token_temperature(cap, dtype):
    """The logits path with one T per row (forward, backward, in place) against fp64 autograd."""
    n, v = 37, 1003
    g = torch.Generator().manual_seed(25)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype).to(DEV)
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    temp = _temps(n, 26).to(DEV)
    lse, zt, H = tb.logits_forward(logits, t, temp, cap, True)
    col = temp.cpu().double()[:, None]
    leaf = logits.cpu().double().requires_grad_()
    r_lp, r_ent = reference.logprob_entropy(leaf, t.cpu(), col, cap)
    assert err((zt - lse).cpu(), r_lp) < 2e-5 * (1 + r_lp.abs().max().item())
    assert err(H.cpu(), r_ent) < 2e-5 * (1 + r_ent.abs().max().item())
    g_lp, g_H = torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)
    (want,) = _grads(r_lp, r_ent, [leaf], g_lp.cpu(), g_H.cpu())
    out = tb.logits_backward(logits, t, temp, cap, lse, H, g_lp, g_H)
    tol = (1e-5 if dtype == torch.float32 else 2.0**-7) * want.abs().max().item()
    assert out.dtype == dtype and err(out.cpu(), want) <= tol
    buf = logits.clone()
    assert torch.equal(tb.logits_backward(buf, t, temp, cap, lse, H, g_lp, g_H, inplace=True), out)


def test_temperature_argument_validation():
    """Every launcher checks ``temperature``: a float > 0 or a real [N] tensor on the rows' device."""
    n = 5
    x, w, b, t = _to(*make_case(n, 24, 507, torch.float32, bias=True))
    e = torch.zeros(n, device=DEV)
    logits = torch.randn(n, 507, device=DEV)
    bad = [
        torch.ones(n + 1),
        torch.ones(n, 1),
        torch.ones(()),
        torch.ones(n, dtype=torch.bool),
        torch.ones(n, device="meta"),
        "hot",
        None,
        0.0,
        -1.0,
        float("nan"),
    ]
    for T in bad:
        T = T.to(DEV) if isinstance(T, torch.Tensor) and T.device.type != "meta" else T
        calls = (
            lambda T=T: tb.forward(x, w, t, b, T, None, True),
            lambda T=T: tb.backward(x, w, t, b, T, None, e, e, e, e),
            lambda T=T: tb.backward(x, w, t, b, T, None, e, e, e, e, deterministic=False),
            lambda T=T: tb.logits_forward(logits, t, T, None, True),
            lambda T=T: tb.logits_backward(logits, t, T, None, e, e, e, e),
        )
        for call in calls:
            with pytest.raises(ValueError, match="temperature"):
                call()
    # other real dtypes and strides are accepted (a contiguous fp32 copy)
    temp = torch.tensor([0.5, 1.0, 1.5, 0.25, 2.0], device=DEV)
    want = tb.forward(x, w, t, b, temp, None, True)
    for form in (temp.double(), temp.half(), torch.stack([temp, temp], 1)[:, 0]):
        for a, o in zip(want, tb.forward(x, w, t, b, form, None, True)):
            assert torch.equal(a, o)


# ----------------------------------------------------------------------------------------------
# CUDA only: production shapes (skipped without a GPU)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_large_forward_many_tokens():
    """N = 65537 > 65535 tokens (grid limits), V = 151936, H = 4096, bf16; rows checked in slices."""
    n, h, v = 65537, 4096, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, h, device="cuda", generator=g) / h**0.25).bfloat16()
    w = (torch.randn(v, h, device="cuda", generator=g) / h**0.25).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    lse, zt, ent = tb.forward(x, w, t, None, 1.0, None, True)
    for sl in (slice(0, 256), slice(n - 257, n)):
        r_lp, r_ent = reference.linear_logprob_entropy(x[sl], w, t[sl])
        assert err(zt[sl] - lse[sl], r_lp) < 2e-3 and err(ent[sl], r_ent) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_large_backward(deterministic):
    n, h, v = 1024, 4096, 151936
    x, w, b, t = _to(*make_case(n, h, v, torch.bfloat16, scale=4.0, seed=10))
    lse, zt, ent = tb.forward(x, w, t, None, 1.0, 30.0, True)
    g_lp, g_H = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    dx, dw, _ = tb.backward(x, w, t, None, 1.0, 30.0, lse, ent, g_lp, g_H, deterministic=deterministic)
    xr, wr = x.float().requires_grad_(), w.float().requires_grad_()
    r_lp, r_ent = reference.linear_logprob_entropy(xr, wr, t, None, 1.0, 30.0)
    rdx, rdw = torch.autograd.grad((r_lp * g_lp).sum() + (r_ent * g_H).sum(), [xr, wr])
    for g_, r_ in ((dx, rdx), (dw, rdw)):
        assert err(g_, r_) <= 2e-2 * r_.abs().max().item()
    if deterministic:
        dx2, dw2, _ = tb.backward(x, w, t, None, 1.0, 30.0, lse, ent, g_lp, g_H)
        assert torch.equal(dx, dx2) and torch.equal(dw, dw2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_memory_flat_in_vocab():
    """At the lean budget (memory_budget_mb = 128 + N/1024, the memory target of docs/design.md), the peak above
    inputs + grads stays <= 128 MiB + 1 KiB/token (deterministic backward, bf16)."""
    n, h = 8192, 4096
    for v in (32768, 151936):
        x, w, _, t = _to(*make_case(n, h, v, torch.bfloat16, seed=11))
        lse, zt, ent = tb.forward(x, w, t, None, 1.0, None, True)
        g = torch.randn(n, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        dx, dw, _ = tb.backward(x, w, t, None, 1.0, None, lse, ent, g, g, memory_budget_mb=128 + n / 1024)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base - dx.nbytes - dw.nbytes
        assert extra <= 128 * 2**20 + 1024 * n + 4 * 2**20, (v, extra / 2**20)
        del x, w, dx, dw
