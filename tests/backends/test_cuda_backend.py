"""The `cuda` backend (fusedrl._C, csrc/).

Without a GPU: the extension must have been built by `pip install -e .` (nvcc present) and import,
list its ops and archs, and answer its CPU-side planning functions; the backend must report itself
unavailable with a reason. With a GPU (@pytest.mark.gpu): forward / backward / logits_* against the
fp64 reference in the CCE idiom of tests/_factory.py.
"""

import math
import os

import pytest
import torch
from _factory import ATOL, DTYPES, GRAD_ATOL, assert_cce, eager_lowprec, make_case, ref64

import fusedrl
from fusedrl import reference
from fusedrl.backends import BackendUnavailable, availability, resolve
from fusedrl.backends import cuda as cb
from fusedrl.backends import device as _device
from fusedrl.backends.cuda import core as cuda_core
from fusedrl.backends.cuda.extension import NOT_BUILT

F32, F16, BF16 = 0, 1, 2


def _ext_or_skip():
    """The compiled module; skip only when the build was deliberately skipped or had no nvcc."""
    if cb.extension() is not None:
        return cb.extension()
    info = cb.build_info()
    if info.get("skipped") or os.environ.get("FUSEDRL_SKIP_CUDA_BUILD", "").strip() not in ("", "0"):
        pytest.skip("CUDA extension build skipped (FUSEDRL_SKIP_CUDA_BUILD=1)")
    if info.get("no_nvcc"):
        pytest.skip(f"CUDA extension not built: {info.get('reason')}")
    pytest.fail(f"fusedrl._C is missing although its build was not skipped: {NOT_BUILT} (build info: {info})")


# --------------------------------------------------------------------------------------------
# CPU-side: the extension itself
# --------------------------------------------------------------------------------------------
def test_extension_lists_ops_and_archs():
    C = _ext_or_skip()
    assert set(C.ops()) == {
        "linear_forward",
        "linear_backward",
        "logits_forward",
        "logits_backward",
        "head_vanilla",
        "head_cov",
        "onepass_epilogue",
    }
    assert set(C.host_lanes()) == {
        "row_stats_host",
        "dz_host",
        "onepass_epilogue_host",
        "head_vanilla_host",
        "head_cov_host",
    }
    for name in C.host_lanes():  # the kernels' CPU lanes (tests/backends/test_cuda_host_lanes.py)
        assert callable(getattr(C, name))
    for name in C.ops():
        assert callable(getattr(C, name))
    archs = C.compiled_archs()
    assert archs and all(isinstance(a, str) for a in archs)
    want = cb.build_info().get("archs") or os.environ.get("FUSEDRL_CUDA_ARCHS") or "80;90a"
    assert archs == [a for a in want.replace(",", ";").split(";") if a]
    assert C.cuda_runtime_version() >= 12000
    assert isinstance(C.kernels(), list) and C.kernels()


def test_extension_imports_as_package_module():
    _ext_or_skip()
    import fusedrl._C as C  # noqa: N814

    assert C.DTYPE_F32 == F32 and C.DTYPE_F16 == F16 and C.DTYPE_BF16 == BF16


def test_device_check_and_cublas_report_reasons_without_gpu():
    C = _ext_or_skip()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    ok, why = C.device_check(0)
    assert ok is False and why
    assert isinstance(C.load_cublas([]), str)  # '' where some libcublas exists, else the reason


def test_workspace_layouts():
    C = _ext_or_skip()
    mb = 2**20
    # forward: cuBLAS workspace + fp32 logits chunk + 3 running stats per token, 256-byte aligned
    assert C.fwd_workspace_bytes(4096, 4096, 32 * mb, False) == 32 * mb + 4096 * 4096 * 4 + 4096 * 12
    assert C.fwd_workspace_bytes(4096, 4096, 32 * mb, True) == 32 * mb + 2 * 4096 * 4096 * 4 + 4096 * 12
    n, h, v, nc, vc = 8192, 4096, 151936, 4096, 2048
    chunk = nc * vc * 4
    # fp32: accumulate straight into dx / dw -> only the logits chunk
    assert C.bwd_workspace_bytes(n, h, v, nc, vc, F32, 0, False, True, True, 0, False) == chunk
    # bf16 vocab-outer: + 16-bit du + [Vc, H] dw chunk acc + full [N, H] dx acc
    assert (
        C.bwd_workspace_bytes(n, h, v, nc, vc, BF16, 0, False, True, True, 0, False)
        == chunk + nc * vc * 2 + vc * h * 4 + n * h * 4
    )
    # lean: the [N, H] dx accumulator disappears (dx accumulates in bf16)
    assert (
        C.bwd_workspace_bytes(n, h, v, nc, vc, BF16, 0, True, True, True, 0, False) == chunk + nc * vc * 2 + vc * h * 4
    )
    # token-outer: [Nc, H] dx chunk acc + full [V, H] dw acc
    assert (
        C.bwd_workspace_bytes(n, h, v, nc, vc, F16, 1, False, True, True, 0, False)
        == chunk + nc * vc * 2 + nc * h * 4 + v * h * 4
    )
    # nothing but dx
    assert (
        C.bwd_workspace_bytes(n, h, v, nc, vc, BF16, 0, False, True, False, 0, False) == chunk + nc * vc * 2 + n * h * 4
    )
    # overlap double-buffers the logits and du chunks
    assert (
        C.bwd_workspace_bytes(n, h, v, nc, vc, BF16, 0, False, True, True, 0, True)
        == 2 * (chunk + nc * vc * 2) + vc * h * 4 + n * h * 4
    )
    assert C.bwd_workspace_bytes(n, h, v, nc, vc, F32, 0, False, True, True, 0, True) == 2 * chunk
    with pytest.raises(ValueError):
        C.bwd_workspace_bytes(n, h, v, nc, vc, BF16, 2, False, True, True, 0, False)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize(
    "n,h,v,es",
    [(8192, 4096, 151936, 2), (37, 123, 1003, 4), (65537, 24, 507, 2), (1, 8192, 262144, 2), (100000, 16384, 32000, 4)],
)
def test_plan_respects_budget(n, h, v, es, backward, overlap):
    nc, vc = cuda_core.plan(n, h, v, es, backward=backward, order=0, overlap=overlap)
    assert 1 <= nc <= n and vc % 8 == 0 and vc >= min(v, 8)
    assert vc < v + 8
    used = cuda_core._chunk_bytes(nc, vc, h, es, backward, 0, True, True, False, overlap)
    assert used <= cuda_core._budget() or (vc <= 256 or nc <= 64)
    nc2, vc2 = cuda_core.plan(n, h, v, es, backward=backward, opts=dict(chunk_tokens=100, chunk_vocab=300))
    assert (nc2, vc2) == (min(100, n), 304)


def _mock_free_memory(monkeypatch, free, reserved=0, allocated=0):
    monkeypatch.setattr(_device, "_memory", {})  # a fresh per-process reading, restored after the test
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda idx=None: (free, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda idx=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda idx=None: allocated)


def test_default_budget_from_free_memory(monkeypatch):
    mib, gib = 2**20, 2**30
    assert cuda_core.default_budget(None) == cuda_core.BUDGET_UNKNOWN_MB * mib
    assert cuda_core.default_budget(70 * gib) == cuda_core.BUDGET_MAX_MB * mib  # big GPU, idle: capped
    assert cuda_core.default_budget(1 * gib) == 128 * mib  # 1/8 of what is free
    assert cuda_core.default_budget(10 * mib) == cuda_core.BUDGET_MIN_MB * mib  # nearly full: floor
    _mock_free_memory(monkeypatch, 512 * mib, reserved=1536 * mib, allocated=512 * mib)
    assert cuda_core._budget(0) == (512 + 1024) * mib // 8  # torch's cached, unused bytes count
    assert cuda_core._budget(0, dict(workspace_mb=40)) == 40 * mib  # the workspace_mb option wins
    assert cuda_core._budget(0, dict(workspace_mb=8)) == 8 * mib
    # read once per process: the allocator's cache growing later does not change the plan (same bits)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda idx=None: 0)
    assert cuda_core._budget(0) == (512 + 1024) * mib // 8

    def boom(idx=None):
        raise RuntimeError("no driver")

    _device.forget_memory_readings()
    monkeypatch.setattr(torch.cuda, "mem_get_info", boom)
    assert cuda_core._budget(0) == cuda_core.BUDGET_UNKNOWN_MB * mib


def _logits_gemm_waves(nc, vc, sms=132):
    return math.ceil(nc / 128) * math.ceil(vc / 256) / sms


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("es", [2, 4])
def test_plan_headline_shape_with_free_memory(monkeypatch, es, overlap):
    """On an idle 80 GB GPU the default budget keeps 4096 x 4096 chunks (about 4 waves of 132 SMs),
    where the old fixed 96 MiB halved them to one wave; the plan is flat in V."""
    _mock_free_memory(monkeypatch, 70 * 2**30)
    n, h = 8192, 4096
    budget = cuda_core._budget(0)
    for backward in (False, True):
        nc, vc = cuda_core.plan(n, h, 151936, es, backward=backward, order=0, overlap=overlap, budget=budget)
        assert (nc, vc) == (4096, 4096)
        assert _logits_gemm_waves(nc, vc) >= 2
        assert cuda_core._chunk_bytes(nc, vc, h, es, backward, 0, True, True, False, overlap) <= budget
        # flat in V: the same chunks and bytes for any vocabulary at least as large as the chunk
        for v in (32000, 262144, 1 << 20):
            assert cuda_core.plan(n, h, v, es, backward=backward, order=0, overlap=overlap, budget=budget) == (nc, vc)
    old = cuda_core.plan(n, h, 151936, 2, backward=True, order=0, overlap=True, budget=96 * 2**20)
    assert _logits_gemm_waves(*old) < 1  # what the fixed 96 MiB gave (bf16 backward, overlap)


def test_plan_shrinks_with_little_free_memory(monkeypatch):
    _mock_free_memory(monkeypatch, 100 * 2**20)
    budget = cuda_core._budget(0)
    assert budget == cuda_core.BUDGET_MIN_MB * 2**20
    nc, vc = cuda_core.plan(8192, 4096, 151936, 2, backward=True, order=0, overlap=True, budget=budget)
    assert cuda_core._chunk_bytes(nc, vc, 4096, 2, True, 0, True, True, False, True) <= budget
    assert nc >= 64 and vc >= 256


def test_order_choice():
    assert cuda_core._order(8192, 151936, {}) == 0
    assert cuda_core._order(65537, 507, {}) == 1
    assert cuda_core._order(10, 10, dict(order="token")) == 1
    with pytest.raises(ValueError):
        cuda_core._order(1, 1, dict(order="diagonal"))


# --------------------------------------------------------------------------------------------
# CPU-side: availability
# --------------------------------------------------------------------------------------------
def test_tf32_flag_reads_both_torch_apis():
    """The cuda backend asks torch whether fp32 GEMMs may use TF32. torch >= 2.9 raises on the legacy
    ``allow_tf32`` read once a user set the new ``fp32_precision``: the backend must still answer (it used to
    fail every call, bf16 included). 16-bit inputs never ask."""
    m = torch.backends.cuda.matmul
    orig = m.fp32_precision
    try:
        for setting, want in (("tf32", True), ("ieee", False)):
            m.fp32_precision = setting
            assert cuda_core._tf32(torch.float32) is want, setting
            assert cuda_core._tf32(torch.bfloat16) is False
    finally:
        m.fp32_precision = orig


def test_unavailable_on_cpu_with_reason():
    ok, why = cb.is_available(torch.device("cpu"))
    assert ok is False and why
    ok2, why2 = availability("cuda", torch.device("cpu"))
    assert ok2 is False and why2 == why
    with pytest.raises(BackendUnavailable, match="cuda"):
        resolve("cuda", torch.device("cpu"))
    x, w, _, t = make_case(3, 8, 11, torch.float32)
    with pytest.raises((RuntimeError, BackendUnavailable)):
        fusedrl.linear_logprob_entropy(x, w, t, backend="cuda")
    with pytest.raises(RuntimeError, match="cuda backend"):
        cb.forward(x, w, t, None, 1.0, None, True)


def test_not_built_reason_mentions_cuda_backend():
    if cb.extension() is not None:
        pytest.skip("extension is built")
    ok, why = cb.is_available(torch.device("cuda"))
    assert not ok and why.startswith("cuda backend not built:")


# --------------------------------------------------------------------------------------------
# GPU: numerics against the reference
# --------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
DEV = "cuda"

SHAPES = [(37, 123, 1003), (37, 123, 507), (5, 64, 151936), (300, 24, 1003)]
OPTIONS = [
    dict(bias=False, temperature=1.0, softcap=None),
    dict(bias=True, temperature=0.7, softcap=None),
    dict(bias=True, temperature=1.3, softcap=30.0),
]
OPT_IDS = ["plain", "bias-T0.7", "bias-T1.3-softcap30"]
CHUNKS = [
    dict(),
    dict(chunk_tokens=16, chunk_vocab=136),
    dict(chunk_tokens=7, chunk_vocab=64, order="token"),
    dict(chunk_tokens=16, chunk_vocab=136, overlap=False),
]
CHUNK_IDS = ["default", "small", "small-token-outer", "small-no-overlap"]


def _skip_unless_cuda_backend():
    _ext_or_skip()
    ok, why = cb.is_available(torch.device(DEV))
    if not ok:
        pytest.fail(f"GPU present but the cuda backend is unavailable: {why}")


def _upstream(n, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(n, generator=g).to(DEV), torch.randn(n, generator=g).to(DEV)


def _ref_grads(x, w, t, b, T, c, g_lp, g_H, dtype64=True):
    """(dx, dw, db) of sum(g_lp logp + g_H H) via autograd: fp64 reference, or eager in the input dtype."""
    leaves = [
        p.detach().clone().double().requires_grad_() if dtype64 else p.detach().clone().requires_grad_()
        for p in (x, w, b)
        if p is not None
    ]
    bb = leaves[2] if b is not None else None
    if dtype64:
        lp, ent = reference.linear_logprob_entropy(leaves[0], leaves[1], t, bb, T, c)
    else:
        lp, ent = eager_lowprec(leaves[0], leaves[1], t, bb, T, c)
    loss = (lp.double() * g_lp.double()).sum() + (ent.double() * g_H.double()).sum()
    gs = torch.autograd.grad(loss, leaves)
    return list(gs) + [None] * (3 - len(gs))


def _check_forward(lse, zt, ent, x, w, t, b, T, c, dtype):
    lp = zt - lse
    r_lp, r_ent = ref64(x, w, t, b, T, c)
    lo_lp, lo_ent = eager_lowprec(x, w, t, b, T, c)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert_cce("logp", lp, r_lp, lo_lp, dtype)
    assert_cce("entropy", ent, r_ent, lo_ent, dtype)


def _check_grads(got, x, w, t, b, T, c, g_lp, g_H, dtype):
    want = _ref_grads(x, w, t, b, T, c, g_lp, g_H, dtype64=True)
    low = _ref_grads(x, w, t, b, T, c, g_lp, g_H, dtype64=False)
    for name, g, r, lo, src in zip(("dx", "dW", "db"), got, want, low, (x, w, b)):
        if src is None:
            assert g is None
            continue
        assert g.dtype == src.dtype and g.shape == src.shape
        scale = r.abs().max().item() + 1e-6
        assert_cce(name, g, r, lo, dtype, atol=GRAD_ATOL[dtype] * scale)


@gpu
@pytest.mark.parametrize("chunks", CHUNKS, ids=CHUNK_IDS)
@pytest.mark.parametrize("opt", OPTIONS, ids=OPT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_reference(dtype, shape, opt, chunks):
    _skip_unless_cuda_backend()
    n, h, v = shape
    if v > 100000 and chunks.get("chunk_vocab", 4096) < 1000:
        pytest.skip("tiny vocab chunks over a 152k vocabulary: slow, covered by the other shapes")
    x, w, b, t = make_case(n, h, v, dtype, device=DEV, bias=opt["bias"], scale=4.0)
    T, c = opt["temperature"], opt["softcap"]
    lse, zt, ent = cb.forward(x, w, t, b, T, c, True, **chunks)
    _check_forward(lse, zt, ent, x, w, t, b, T, c, dtype)
    g_lp, g_H = _upstream(n)
    got = cb.backward(x, w, t, b, T, c, lse, ent, g_lp, g_H, **chunks)
    _check_grads(got, x, w, t, b, T, c, g_lp, g_H, dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_lean_accumulation(dtype):
    _skip_unless_cuda_backend()
    n, h, v = 300, 123, 1003
    x, w, b, t = make_case(n, h, v, dtype, device=DEV, bias=True, scale=4.0)
    lse, zt, ent = cb.forward(x, w, t, b, 1.0, None, True)
    g_lp, g_H = _upstream(n)
    for order in ("vocab", "token"):
        got = cb.backward(
            x,
            w,
            t,
            b,
            1.0,
            None,
            lse,
            ent,
            g_lp,
            g_H,
            chunk_tokens=128,
            chunk_vocab=512,
            order=order,
            lean_accumulation=True,
        )
        _check_grads(got, x, w, t, b, 1.0, None, g_lp, g_H, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp32_large_vocab_precision(dtype):
    """The numerical contract: fp32 logp within 1e-5 of fp64 at V = 151936."""
    _skip_unless_cuda_backend()
    x, w, _, t = make_case(8, 64, 151936, dtype, device=DEV, scale=2.0)
    lse, zt, ent = cb.forward(x, w, t, None, 1.0, None, True)
    r_lp, r_ent = ref64(x, w, t, None, 1.0, None)
    if dtype == torch.float32:
        assert ((zt - lse).double() - r_lp).abs().max().item() <= 1e-5
        assert (ent.double() - r_ent).abs().max().item() <= 1e-5
    else:
        _check_forward(lse, zt, ent, x, w, t, None, 1.0, None, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_entropy_false_and_partial_grads(dtype):
    _skip_unless_cuda_backend()
    n, h, v = 37, 123, 1003
    x, w, b, t = make_case(n, h, v, dtype, device=DEV, bias=True)
    lse, zt, ent = cb.forward(x, w, t, b, 1.0, None, False)
    assert ent is None
    r_lp, _ = ref64(x, w, t, b, 1.0, None)
    lo_lp, _ = eager_lowprec(x, w, t, b, 1.0, None)
    assert_cce("logp", zt - lse, r_lp, lo_lp, dtype)
    g_lp, _ = _upstream(n)
    dx, dw, db = cb.backward(x, w, t, b, 1.0, None, lse, None, g_lp, None, need_dw=False, need_db=False)
    assert dw is None and db is None and dx is not None
    zeros = torch.zeros(n, device=DEV)
    want = _ref_grads(x, w, t, b, 1.0, None, g_lp, zeros)
    low = _ref_grads(x, w, t, b, 1.0, None, g_lp, zeros, dtype64=False)
    assert_cce("dx", dx, want[0], low[0], dtype, atol=GRAD_ATOL[dtype] * (want[0].abs().max().item() + 1e-6))
    _, dw2, db2 = cb.backward(x, w, t, b, 1.0, None, lse, None, g_lp, None, need_dx=False)
    assert_cce("dW", dw2, want[1], low[1], dtype, atol=GRAD_ATOL[dtype] * (want[1].abs().max().item() + 1e-6))
    assert_cce("db", db2, want[2], low[2], dtype, atol=GRAD_ATOL[dtype] * (want[2].abs().max().item() + 1e-6))


def _combine_shards(parts):
    """Global (lse, logp, entropy) from per-shard (lse_k, zt_k, ent_k)."""
    lses = torch.stack([p[0] for p in parts])
    lse = torch.logsumexp(lses, 0)
    zt = sum(p[1] for p in parts)
    # sum_{j in shard k} p_j z_j = e^(lse_k - LSE) (lse_k - ent_k)
    pz = sum(torch.exp(p[0] - lse) * (p[0] - p[2]) for p in parts)
    return lse, zt - lse, lse - pz


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", OPTIONS, ids=OPT_IDS)
def test_vocab_parallel_shards(dtype, opt):
    _skip_unless_cuda_backend()
    n, h, v, cut = 37, 123, 1003, 421
    x, w, b, t = make_case(n, h, v, dtype, device=DEV, bias=opt["bias"], scale=4.0)
    T, c = opt["temperature"], opt["softcap"]
    shards = [(0, slice(0, cut)), (cut, slice(cut, v))]
    parts = [
        cb.forward(
            x,
            w[s].contiguous(),
            t,
            None if b is None else b[s].contiguous(),
            T,
            c,
            True,
            vocab_start=v0,
            chunk_vocab=128,
        )
        for v0, s in shards
    ]
    for (v0, s), (_, zt_k, _) in zip(shards, parts):
        outside = ~((t >= v0) & (t < v0 + (s.stop - s.start)))
        assert torch.all(zt_k[outside] == 0)
    lse, lp, ent = _combine_shards(parts)
    r_lp, r_ent = ref64(x, w, t, b, T, c)
    lo_lp, lo_ent = eager_lowprec(x, w, t, b, T, c)
    assert_cce("logp", lp, r_lp, lo_lp, dtype)
    assert_cce("entropy", ent, r_ent, lo_ent, dtype)
    g_lp, g_H = _upstream(n)
    outs = [
        cb.backward(
            x,
            w[s].contiguous(),
            t,
            None if b is None else b[s].contiguous(),
            T,
            c,
            lse,
            ent,
            g_lp,
            g_H,
            vocab_start=v0,
            chunk_vocab=128,
        )
        for v0, s in shards
    ]
    dx = sum(o[0].float() for o in outs).to(dtype)
    dw = torch.cat([o[1] for o in outs])
    db = torch.cat([o[2] for o in outs]) if b is not None else None
    _check_grads((dx, dw, db), x, w, t, b, T, c, g_lp, g_H, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_tokens(dtype):
    _skip_unless_cuda_backend()
    x, w, b, t = make_case(0, 24, 507, dtype, device=DEV, bias=True)
    lse, zt, ent = cb.forward(x, w, t, b, 1.0, None, True)
    assert lse.shape == zt.shape == ent.shape == (0,)
    e = torch.empty(0, device=DEV)
    dx, dw, db = cb.backward(x, w, t, b, 1.0, None, lse, ent, e, e)
    assert dx.shape == (0, 24) and torch.all(dw == 0) and torch.all(db == 0) and db.dtype == dtype
    lg = torch.empty(0, 507, dtype=dtype, device=DEV)
    lse, zt, ent = cb.logits_forward(lg, t, 1.0, None, True)
    assert lse.shape == (0,)
    assert cb.logits_backward(lg, t, 1.0, None, lse, ent, e, e).shape == (0, 507)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [507, 1003, 151936])
@pytest.mark.parametrize("opt", OPTIONS, ids=OPT_IDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_logits_forward_backward(dtype, v, opt, inplace):
    _skip_unless_cuda_backend()
    n = 37
    g = torch.Generator(device="cpu").manual_seed(3)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype).to(DEV)
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    T, c = opt["temperature"], opt["softcap"]
    lse, zt, ent = cb.logits_forward(logits, t, T, c, True)
    r_lp, r_ent = reference.logprob_entropy(logits.double(), t, T, c)
    lo = logits.detach()
    lo = (c * torch.tanh(lo / c) if c else lo) / T
    lsm = torch.log_softmax(lo, -1)
    lo_lp, lo_ent = lsm.gather(-1, t[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)
    assert_cce("logp", zt - lse, r_lp, lo_lp, dtype)
    assert_cce("entropy", ent, r_ent, lo_ent, dtype)

    g_lp, g_H = _upstream(n)
    src = logits.clone()
    dl = cb.logits_backward(src, t, T, c, lse, ent, g_lp, g_H, inplace=inplace)
    assert dl.dtype == dtype and dl.shape == logits.shape
    if inplace:
        assert dl.data_ptr() == src.data_ptr()
    else:
        assert torch.equal(src, logits)
    l64 = logits.double().requires_grad_()
    a, e = reference.logprob_entropy(l64, t, T, c)
    (want,) = torch.autograd.grad((a * g_lp.double()).sum() + (e * g_H.double()).sum(), [l64])
    ll = logits.clone().requires_grad_()
    z = ((c * torch.tanh(ll / c)) if c else ll) / T
    ls = torch.log_softmax(z, -1)
    la, le = ls.gather(-1, t[:, None])[:, 0], -(ls.exp() * ls).sum(-1)
    (low,) = torch.autograd.grad((la.double() * g_lp.double()).sum() + (le.double() * g_H.double()).sum(), [ll])
    assert_cce("dlogits", dl, want, low, dtype, atol=GRAD_ATOL[dtype] * (want.abs().max().item() + 1e-6))


@gpu
def test_many_rows_logits_path():
    """N > 65535 rows (grid limits) on the logits path and through the linear path."""
    _skip_unless_cuda_backend()
    n, v = 65537, 507
    g = torch.Generator(device="cpu").manual_seed(4)
    logits = torch.randn(n, v, generator=g).to(DEV)
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    lse, zt, ent = cb.logits_forward(logits, t, 1.0, None, True)
    r_lp, r_ent = reference.logprob_entropy(logits.double(), t)
    assert ((zt - lse).double() - r_lp).abs().max().item() <= 1e-5
    assert (ent.double() - r_ent).abs().max().item() <= 1e-5
    x, w, _, t = make_case(n, 24, v, torch.bfloat16, device=DEV)
    lse, zt, ent = cb.forward(x, w, t, None, 1.0, None, True)
    _check_forward(lse, zt, ent, x, w, t, None, 1.0, None, torch.bfloat16)
    g_lp, g_H = _upstream(n)
    got = cb.backward(x, w, t, None, 1.0, None, lse, ent, g_lp, g_H)  # auto order: token-outer here
    _check_grads(got, x, w, t, None, 1.0, None, g_lp, g_H, torch.bfloat16)


@gpu
def test_deterministic_and_side_stream():
    _skip_unless_cuda_backend()
    n, h, v = 300, 123, 1003
    x, w, b, t = make_case(n, h, v, torch.bfloat16, device=DEV, bias=True)
    g_lp, g_H = _upstream(n)

    def run(**kw):
        lse, zt, ent = cb.forward(x, w, t, b, 1.0, None, True, chunk_tokens=64, chunk_vocab=256, **kw)
        return (lse, zt, ent) + tuple(
            cb.backward(x, w, t, b, 1.0, None, lse, ent, g_lp, g_H, chunk_tokens=64, chunk_vocab=256, **kw)
        )

    a = run()
    c = run(overlap=False)
    for p, q in zip(a, c):
        assert torch.equal(p, q)  # overlap changes scheduling, never arithmetic
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        bb = run()
    torch.cuda.current_stream().wait_stream(s)
    for p, q in zip(a, bb):
        assert torch.equal(p, q)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_public_api_autograd(dtype):
    _skip_unless_cuda_backend()
    n, h, v = 37, 123, 1003
    x, w, b, t = make_case(n, h, v, dtype, device=DEV, bias=True, scale=4.0)
    leaves = [p.clone().requires_grad_() for p in (x, w, b)]
    lp, ent = fusedrl.linear_logprob_entropy(
        leaves[0], leaves[1], t, leaves[2], temperature=0.9, softcap=20.0, backend="cuda"
    )
    r_lp, r_ent = ref64(x, w, t, b, 0.9, 20.0)
    lo_lp, lo_ent = eager_lowprec(x, w, t, b, 0.9, 20.0)
    assert_cce("logp", lp, r_lp, lo_lp, dtype)
    assert_cce("entropy", ent, r_ent, lo_ent, dtype)
    g_lp, g_H = _upstream(n)
    got = torch.autograd.grad((lp * g_lp).sum() + (ent * g_H).sum(), leaves)
    _check_grads(got, x, w, t, b, 0.9, 20.0, g_lp, g_H, dtype)
    with torch.no_grad():
        lp2, ent2 = fusedrl.linear_logprob_entropy(x, w, t, b, temperature=0.9, softcap=20.0, backend="cuda")
    assert torch.equal(lp2, lp.detach()) and torch.equal(ent2, ent.detach())


@gpu
def test_fp64_falls_back_to_exact_path():
    _skip_unless_cuda_backend()
    x, w, b, t = make_case(5, 24, 507, torch.float64, device=DEV, bias=True)
    lse, zt, ent = cb.forward(x, w, t, b, 1.0, None, True)
    r_lp, r_ent = ref64(x, w, t, b, 1.0, None)
    assert ((zt - lse) - r_lp).abs().max().item() < ATOL[torch.float64] * 1e4


# --------------------------------------------------------------------------------------------
# Per-token temperature: z = softcap(u + b) / T_n, T a fp32 [N] tensor (one per token row)
# --------------------------------------------------------------------------------------------
def test_temperature_argument_forms():
    """CPU-side: what the launchers accept as `temperature` and what they hand the kernels."""
    assert cuda_core.check_temperature(0.7, 5, torch.device("cpu"), "f") == (0.7, None)
    assert cuda_core.check_temperature(2, 5, torch.device("cpu"), "f") == (2.0, None)
    T = torch.tensor([0.5, 1.0, 1.5, 0.25, 2.0], dtype=torch.float64)
    s, rows = cuda_core.check_temperature(T[None, :][0], 5, torch.device("cpu"), "f")
    assert s == 1.0 and rows.dtype == torch.float32 and rows.is_contiguous() and torch.equal(rows, T.float())
    for bad in (
        torch.ones(4),
        torch.ones(5, 1),
        torch.ones(()),
        torch.ones(5, dtype=torch.bool),
        torch.ones(5, device="meta"),
        "x",
        None,
        0.0,
        -2.0,
        float("nan"),
    ):
        with pytest.raises(ValueError, match="temperature"):
            cuda_core.check_temperature(bad, 5, torch.device("cpu"), "f")


def _temps(n, seed=5, device=DEV):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.rand(n, generator=g) * 1.7 + 0.3).to(device)  # in [0.3, 2.0]


def _pt_z(u, b, T, c, dtype64):
    """z = softcap(u + b) / T_n: fp64, or eager with the logits in the input dtype."""
    if dtype64:
        u = u.double()
    if b is not None:
        u = u + (b.double() if dtype64 else b)
    if c is not None:
        u = c * torch.tanh(u / c)
    if dtype64:
        return u / T.double()[:, None]
    return (u.float() / T[:, None]).to(u.dtype)


def _pt_lp_ent(z, t):
    lsm = torch.log_softmax(z, -1)
    p = lsm.exp()
    ent = -(p * torch.where(p > 0, lsm, torch.zeros_like(lsm))).sum(-1)  # 0 * -inf := 0
    return lsm.gather(-1, t[:, None])[:, 0], ent


def _pt_linear(x, w, t, b, T, c, dtype64):
    u = (x.double() @ w.double().t()) if dtype64 else x @ w.t()
    return _pt_lp_ent(_pt_z(u, b, T, c, dtype64), t)


def _pt_grads(x, w, t, b, T, c, g_lp, g_H, dtype64):
    leaves = [p.detach().clone().requires_grad_() for p in (x, w, b) if p is not None]
    lp, ent = _pt_linear(leaves[0], leaves[1], t, leaves[2] if b is not None else None, T, c, dtype64)
    loss = (lp.double() * g_lp.double()).sum() + (ent.double() * g_H.double()).sum()
    return list(torch.autograd.grad(loss, leaves)) + [None] * (3 - len(leaves))


def _pt_check_forward(lse, zt, ent, x, w, t, b, T, c, dtype):
    r_lp, r_ent = _pt_linear(x, w, t, b, T, c, True)
    lo_lp, lo_ent = _pt_linear(x, w, t, b, T, c, False)
    assert_cce("logp", zt - lse, r_lp, lo_lp, dtype)
    assert_cce("entropy", ent, r_ent, lo_ent, dtype)


def _pt_check_grads(got, x, w, t, b, T, c, g_lp, g_H, dtype):
    want = _pt_grads(x, w, t, b, T, c, g_lp, g_H, True)
    low = _pt_grads(x, w, t, b, T, c, g_lp, g_H, False)
    for name, g, r, lo, src in zip(("dx", "dW", "db"), got, want, low, (x, w, b)):
        if src is None:
            assert g is None
            continue
        assert g.dtype == src.dtype and g.shape == src.shape and torch.isfinite(g.float()).all()
        assert_cce(name, g, r, lo, dtype, atol=GRAD_ATOL[dtype] * (r.abs().max().item() + 1e-6))


def _neginf_bias(v, dtype, masked=(3, 136, 137)):
    g = torch.Generator(device="cpu").manual_seed(9)
    b = torch.randn(v, generator=g) * 0.5
    b[list(masked) + [v - 1]] = -math.inf
    return b.to(dtype).to(DEV)


PT_OPTIONS = [
    dict(bias=None, softcap=None),
    dict(bias="rand", softcap=30.0),
    dict(bias="-inf", softcap=None),
    dict(bias="-inf", softcap=5.0),
]
PT_OPT_IDS = ["plain", "bias-softcap30", "neginf", "neginf-softcap5"]


def _pt_case(n, h, v, dtype, bias):
    x, w, b, t = make_case(n, h, v, dtype, device=DEV, bias=bias == "rand", scale=4.0)
    if bias == "-inf":
        b = _neginf_bias(v, dtype)
        t = torch.where(torch.isinf(b)[t], torch.zeros_like(t), t)  # targets stay finite
    return x, w, b, t


@gpu
@pytest.mark.parametrize("chunks", CHUNKS, ids=CHUNK_IDS)
@pytest.mark.parametrize("opt", PT_OPTIONS, ids=PT_OPT_IDS)
@pytest.mark.parametrize(
    "shape", [(37, 123, 1003), (300, 24, 1003), (5, 64, 151936)], ids=lambda s: "N{}-H{}-V{}".format(*s)
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_temperature_forward_backward(dtype, shape, opt, chunks):
    _skip_unless_cuda_backend()
    n, h, v = shape
    if v > 100000 and chunks.get("chunk_vocab", 4096) < 1000:
        pytest.skip("tiny vocab chunks over a 152k vocabulary: slow, covered by the other shapes")
    x, w, b, t = _pt_case(n, h, v, dtype, opt["bias"])
    T, c = _temps(n), opt["softcap"]
    lse, zt, ent = cb.forward(x, w, t, b, T, c, True, **chunks)
    _pt_check_forward(lse, zt, ent, x, w, t, b, T, c, dtype)
    g_lp, g_H = _upstream(n)
    got = cb.backward(x, w, t, b, T, c, lse, ent, g_lp, g_H, **chunks)
    _pt_check_grads(got, x, w, t, b, T, c, g_lp, g_H, dtype)
    if opt["bias"] == "-inf" and c is None:
        masked = torch.isinf(b)
        assert torch.all(got[1][masked] == 0) and torch.all(got[2][masked] == 0)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_temperature_all_equal_is_scalar_bitwise(dtype):
    """A constant per-token vector runs the scalar path's arithmetic on every entry point."""
    _skip_unless_cuda_backend()
    n, h, v = 300, 123, 1003
    x, w, b, t = _pt_case(n, h, v, dtype, "-inf")
    vec = torch.full((n,), 0.7, device=DEV)
    g_lp, g_H = _upstream(n)
    for kw in (dict(), dict(chunk_tokens=64, chunk_vocab=256), dict(chunk_tokens=7, chunk_vocab=64, order="token")):
        fs, fv = cb.forward(x, w, t, b, 0.7, 5.0, True, **kw), cb.forward(x, w, t, b, vec, 5.0, True, **kw)
        for p, q in zip(fs, fv):
            assert torch.equal(p, q)
        lse, _, ent = fs
        for p, q in zip(
            cb.backward(x, w, t, b, 0.7, 5.0, lse, ent, g_lp, g_H, **kw),
            cb.backward(x, w, t, b, vec, 5.0, lse, ent, g_lp, g_H, **kw),
        ):
            assert torch.equal(p, q)
    logits = (x @ w.t()).contiguous()
    fs, fv = cb.logits_forward(logits, t, 0.7, 5.0, True), cb.logits_forward(logits, t, vec, 5.0, True)
    for p, q in zip(fs, fv):
        assert torch.equal(p, q)
    lse, _, ent = fs
    assert torch.equal(
        cb.logits_backward(logits, t, 0.7, 5.0, lse, ent, g_lp, g_H),
        cb.logits_backward(logits, t, vec, 5.0, lse, ent, g_lp, g_H),
    )


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [507, 151936])
@pytest.mark.parametrize("opt", PT_OPTIONS, ids=PT_OPT_IDS)
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_per_token_temperature_logits(dtype, v, opt, inplace):
    _skip_unless_cuda_backend()
    n = 37
    g = torch.Generator(device="cpu").manual_seed(3)
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype).to(DEV)
    if opt["bias"] is not None:  # the logits path has no bias: fold it (and its -inf columns) in
        b = _neginf_bias(v, dtype) if opt["bias"] == "-inf" else (torch.randn(v, generator=g) * 0.5).to(dtype).to(DEV)
        logits = logits + b
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    t = torch.where(torch.isinf(logits.float()).gather(-1, t[:, None])[:, 0], torch.zeros_like(t), t)
    T, c = _temps(n), opt["softcap"]
    lse, zt, ent = cb.logits_forward(logits, t, T, c, True)
    r_lp, r_ent = _pt_lp_ent(_pt_z(logits, None, T, c, True), t)
    lo_lp, lo_ent = _pt_lp_ent(_pt_z(logits, None, T, c, False), t)
    assert_cce("logp", zt - lse, r_lp, lo_lp, dtype)
    assert_cce("entropy", ent, r_ent, lo_ent, dtype)
    g_lp, g_H = _upstream(n)
    src = logits.clone()
    dl = cb.logits_backward(src, t, T, c, lse, ent, g_lp, g_H, inplace=inplace)
    assert dl.dtype == dtype and dl.shape == logits.shape and torch.isfinite(dl.float()).all()
    if not inplace:
        assert torch.equal(src, logits)
    grads = []
    for dtype64 in (True, False):
        leaf = logits.detach().clone().requires_grad_()
        a, e = _pt_lp_ent(_pt_z(leaf, None, T, c, dtype64), t)
        grads.append(
            torch.autograd.grad((a.double() * g_lp.double()).sum() + (e.double() * g_H.double()).sum(), [leaf])[0]
        )
    want, low = grads
    assert_cce("dlogits", dl, want, low, dtype, atol=GRAD_ATOL[dtype] * (want.abs().max().item() + 1e-6))


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_token_temperature_vocab_parallel_shards(dtype):
    _skip_unless_cuda_backend()
    n, h, v, cut = 37, 123, 1003, 421
    x, w, b, t = _pt_case(n, h, v, dtype, "rand")
    T, c = _temps(n), 30.0
    shards = [(0, slice(0, cut)), (cut, slice(cut, v))]
    kw = dict(chunk_tokens=16, chunk_vocab=128)
    parts = [
        cb.forward(x, w[s].contiguous(), t, b[s].contiguous(), T, c, True, vocab_start=v0, **kw) for v0, s in shards
    ]
    # combined in fp64: at T = 0.3 the fp32 combination's own cancellation (lse - sum p z) exceeds the bound
    lse, lp, ent = _combine_shards([tuple(p.double() for p in part) for part in parts])
    r_lp, r_ent = _pt_linear(x, w, t, b, T, c, True)
    lo_lp, lo_ent = _pt_linear(x, w, t, b, T, c, False)
    assert_cce("logp", lp, r_lp, lo_lp, dtype)
    assert_cce("entropy", ent, r_ent, lo_ent, dtype)
    g_lp, g_H = _upstream(n)
    outs = [
        cb.backward(x, w[s].contiguous(), t, b[s].contiguous(), T, c, lse, ent, g_lp, g_H, vocab_start=v0, **kw)
        for v0, s in shards
    ]
    dx = sum(o[0].float() for o in outs).to(dtype)
    _pt_check_grads(
        (dx, torch.cat([o[1] for o in outs]), torch.cat([o[2] for o in outs])), x, w, t, b, T, c, g_lp, g_H, dtype
    )


@gpu
def test_per_token_temperature_many_rows():
    """N > 65535 rows: the per-row temperature pointer with int64 row offsets, both paths."""
    _skip_unless_cuda_backend()
    n, v = 65537, 507
    g = torch.Generator(device="cpu").manual_seed(4)
    logits = torch.randn(n, v, generator=g).to(DEV)
    t = torch.randint(0, v, (n,), generator=g).to(DEV)
    T = _temps(n)
    lse, zt, ent = cb.logits_forward(logits, t, T, None, True)
    r_lp, r_ent = _pt_lp_ent(_pt_z(logits, None, T, None, True), t)
    assert ((zt - lse).double() - r_lp).abs().max().item() <= 3e-5
    assert (ent.double() - r_ent).abs().max().item() <= 3e-5
    x, w, _, t = make_case(n, 24, v, torch.bfloat16, device=DEV)
    lse, zt, ent = cb.forward(x, w, t, None, T, None, True, chunk_tokens=4096)
    _pt_check_forward(lse, zt, ent, x, w, t, None, T, None, torch.bfloat16)
    g_lp, g_H = _upstream(n)
    got = cb.backward(x, w, t, None, T, None, lse, ent, g_lp, g_H, chunk_tokens=4096)
    _pt_check_grads(got, x, w, t, None, T, None, g_lp, g_H, torch.bfloat16)


@gpu
def test_per_token_temperature_fp64_falls_back_to_exact_path():
    _skip_unless_cuda_backend()
    x, w, b, t = make_case(5, 24, 507, torch.float64, device=DEV, bias=True)
    T = _temps(5).double()
    lse, zt, ent = cb.forward(x, w, t, b, T, None, True)
    r_lp, r_ent = _pt_linear(x, w, t, b, T, None, True)
    assert ((zt - lse) - r_lp).abs().max().item() < ATOL[torch.float64] * 1e4
