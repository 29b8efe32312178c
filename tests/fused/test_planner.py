"""The one-pass planner (fusedrl/onepass/plan.py, cost.py; docs/one-pass.md "The planner"): the cost model's
choices under mocked device facts at LM shapes (N = 8k / 32k / 64k, H = 4096 / 8192, V = 151936, 16-bit
and fp32), the memory bound, the GEMM 3 ring in the run (same values as one GEMM 3 per chunk), the
padded 16-bit du rows, the stage-timing hook, and the 16-bit GEMM paths of each torch version (mocked
probes)."""

from __future__ import annotations

import importlib
import random
import time

import pytest
import torch

import fusedrl
from fusedrl.backends import torch_backend
from fusedrl.backends.device import ARCH_FACTS, DeviceFacts
from fusedrl.fused import fused_policy_loss
from fusedrl.loss import PolicyLossConfig

P = importlib.import_module("fusedrl.onepass.plan")  # the module (fusedrl.onepass.plan is also a function)
C = importlib.import_module("fusedrl.onepass.cost")
G = importlib.import_module("fusedrl.onepass.gemm")
OP = importlib.import_module("fusedrl.onepass.op")
RUN = importlib.import_module("fusedrl.onepass.run")
ONEPASS = importlib.import_module("fusedrl.onepass")

H100 = ARCH_FACTS["sm_90"]
V = 151936
GIB = 2**30
CFG = PolicyLossConfig()


def setting(epilogue="triton", **kw):
    kw.setdefault("core", epilogue if epilogue != "torch" else "cuda")
    kw.setdefault("facts", H100)
    return C.Setting(epilogue=epilogue, **kw)


def covers(pln, n):
    starts = [a for a, _, _ in pln.chunks]
    assert starts == sorted(starts) and pln.chunks[0][0] == 0 and pln.chunks[-1][1] == n
    assert all(b == a2 for (_, b, _), (a2, _, _) in zip(pln.chunks, pln.chunks[1:]))


# ------------------------------------------------------------------------------------------------
# Choices at LM shapes (mocked device facts: no GPU needed)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h", [4096, 8192])
@pytest.mark.parametrize("n", [8192, 32768, 65536])
@pytest.mark.parametrize("epilogue", ["triton", "cuda", "torch"])
def test_lm_shapes_fit_the_budget(epilogue, n, h, dtype):
    """Every one-pass plan's buffers fit the budget; chunks cover the batch, balanced; the ring is whole
    chunks; auto takes recompute exactly when nothing fits or the model says recompute is faster."""
    s = setting(epilogue)
    for budget in (4 * GIB, 16 * GIB):
        pln = P.plan(n, h, V, dtype, CFG, "auto", budget, setting=s)
        if pln.schedule == "recompute":
            explicit = P.plan(n, h, V, dtype, CFG, "one_pass", budget, setting=s)
            assert explicit.schedule == "one_pass"  # an explicit one_pass always runs
            fixed = C.memory_parts(n, h, V, dtype, 64, 64, s, deferred=explicit.deferred)
            slower = explicit.fits and explicit.model.total_ms > explicit.model.recompute_ms
            assert sum(b for _, b in fixed) > budget or slower, pln.reason
            continue
        covers(pln, n)
        rows = max(b - a for a, b, _ in pln.chunks)
        assert min(b - a for a, b, _ in pln.chunks) >= rows - len(pln.chunks)  # balanced: no small tail
        if pln.deferred:  # GEMM 3 in the backward over every token (bf16, du no larger than dW32)
            assert pln.ring_rows == n and dict(pln.model.memory)["dw32"] == 0
        else:
            assert pln.ring_rows % rows == 0 and pln.ring_rows >= rows
        assert pln.model.memory_bytes <= budget
        assert pln.model.total_ms <= pln.model.recompute_ms
        assert pln.model.floor_ms < pln.model.total_ms


def test_headline_choices():
    """N=8192 H=4096 V=151936 bf16, 4 GiB: the kernel epilogues are charged their own 6 bytes per element
    (fp32 workspace + 16-bit du), not the torch epilogue's scratch: fewer, larger chunks. GEMM 3 is
    deferred (the du of every token takes exactly dW32's bytes): no accumulator, no finish over dW; the
    modeled one-pass time is within 10% of the three-GEMM floor, the accumulating plan's is not."""
    kernel = P.plan(8192, 4096, V, torch.bfloat16, CFG, "auto", 4 * GIB, setting=setting("triton", du32=False))
    torch_ep = P.plan(8192, 4096, V, torch.bfloat16, CFG, "auto", 4 * GIB, setting=setting("torch"))
    assert kernel.schedule == torch_ep.schedule == "one_pass"
    assert kernel.deferred and torch_ep.deferred
    assert len(kernel.chunks) < len(torch_ep.chunks)
    m = kernel.model
    assert m.total_ms / m.floor_ms <= 1.10
    mem = dict(m.memory)
    assert mem["dw32"] == 0 and mem["dx32"] == 8192 * 4096 * 4 and "scratch" not in mem
    assert mem["du_ring"] == 8192 * C.du_row_stride(V) * 2 == V * 4096 * 4  # the bytes dW32 would take
    assert m.memory_bytes <= 4 * GIB
    assert dict(torch_ep.model.memory)["scratch"] > 0
    acc = P.plan(8192, 4096, V, torch.bfloat16, CFG, "auto", 4 * GIB, setting=setting("triton"), defer=False)
    terms, acc_terms = dict(m.terms), dict(acc.model.terms)
    assert not acc.deferred and acc.model.total_ms / acc.model.floor_ms > 1.10
    assert terms["finish"] < acc_terms["finish"] / 10  # dx alone
    # GEMM 3 compute-bound either way: the saving is the finish over dW (dW32 read, 16-bit written: 1.1 ms)
    # less the backward's g·x (0.1 ms)
    saved = acc_terms["gemm3"] + acc_terms["finish"] - terms["gemm3"] - terms["finish"]
    assert saved > V * 4096 * 6 / (H100.hbm * 1e9) * 0.8


def test_ring_cuts_accumulator_traffic_at_64k():
    """N = 64k at 4 GiB: small chunks; the dW32 read-modify-write per GEMM 3 call would dominate GEMM 3,
    so the planner takes a ring of several chunks (fewer GEMM 3 calls) and the model prices it lower."""
    s = setting("triton", du32=False)
    pln = P.plan(65536, 4096, V, torch.bfloat16, CFG, "auto", 4 * GIB, setting=s)
    assert pln.schedule == "one_pass"
    rows = max(b - a for a, b, _ in pln.chunks)
    assert pln.ring_rows >= 2 * rows
    chunk_rows = ((rows, len(pln.chunks)),)
    grouped = C.model(65536, 4096, V, torch.bfloat16, chunk_rows, pln.ring_rows, s)
    single = C.model(65536, 4096, V, torch.bfloat16, chunk_rows, rows, s)
    assert dict(grouped.terms)["gemm3"] < dict(single.terms)["gemm3"]


def test_auto_takes_recompute_where_the_model_says_so():
    """The torch epilogue with an entropy gradient (82 bytes per element) against the cuda backend's
    recompute: the model prices one-pass higher, so auto recomputes; an explicit one_pass still runs."""
    s = setting("torch", core="cuda", ent=True, ent_grad=True)
    auto = P.plan(8192, 4096, V, torch.bfloat16, CFG, "auto", 4 * GIB, setting=s)
    assert auto.schedule == "recompute" and "modeled" in auto.reason
    assert P.plan(8192, 4096, V, torch.bfloat16, CFG, "one_pass", 4 * GIB, setting=s).schedule == "one_pass"
    fast = P.plan(8192, 4096, V, torch.bfloat16, CFG, "auto", 4 * GIB, setting=setting("triton"))
    assert fast.schedule == "one_pass"


def test_h8192_needs_more_than_the_default_cap():
    """H = 8192: at N = 8192 the du of every token (2.5 GB) takes half of dW32's bytes: deferred, it fits
    4 GiB. At N = 32768 du would take 10 GB: not deferred, and the fp32 dW accumulator alone (5 GB)
    exceeds the 4 GiB default cap: auto recomputes; a budget that holds it runs one pass."""
    s = setting("triton")
    small = P.plan(8192, 8192, V, torch.bfloat16, CFG, "auto", 4 * GIB, setting=s)
    assert small.schedule == "one_pass" and small.deferred
    assert P.plan(8192, 8192, V, torch.bfloat16, CFG, "auto", 4 * GIB, setting=s, defer=False).schedule == "recompute"
    assert P.plan(32768, 8192, V, torch.bfloat16, CFG, "auto", 4 * GIB, setting=s).schedule == "recompute"
    big = P.plan(32768, 8192, V, torch.bfloat16, CFG, "auto", 12 * GIB, setting=s)
    assert big.schedule == "one_pass" and not big.deferred


def test_fp32_ring_is_the_workspace():
    """fp32 inputs: no 16-bit copy; a ring of chunks is the fp32 workspace itself."""
    s = setting("torch", facts=ARCH_FACTS["cpu"], core="torch")
    mem = dict(C.memory_parts(4096, 1024, 32000, torch.float32, 512, 2048, s))
    assert mem["workspace"] == 2048 * 32000 * 4 and mem["du_ring"] == 0 and mem["dw32"] == 0


def test_upcast_path_counts_its_copies():
    """Where 16-bit GEMMs upcast (CPU, torch < 2.8), the fp32 copies of W and of the du operand count."""
    up = dict(C.memory_parts(1024, 512, 5000, torch.bfloat16, 100, 300, setting("torch", gemm="upcast")))
    fast = dict(C.memory_parts(1024, 512, 5000, torch.bfloat16, 100, 300, setting("torch", gemm="fast")))
    assert up["gemm_upcast"] == 5000 * 512 * 4 + 300 * (5000 + 512) * 4 and "gemm_upcast" not in fast


def test_infinite_budget_and_cache():
    s = setting("triton")
    pln = P.plan(8192, 4096, V, torch.bfloat16, CFG, "auto", float("inf"), setting=s)
    assert pln.schedule == "one_pass" and pln.ring_rows >= 8192  # one GEMM 3 over the whole batch
    # the same inputs give the same plan object (cached): a pinned budget pins the chunks step to step
    a = P.plan(32768, 4096, V, torch.bfloat16, CFG, "auto", 3 * GIB, setting=s)
    b = P.plan(32768, 4096, V, torch.bfloat16, CFG, "auto", 3 * GIB, setting=s)
    assert a == b and a.model is b.model


def test_planner_is_fast():
    s = setting("torch", facts=DeviceFacts("x", 123.0, 12.0, 60.0, 6.0, 1.5, 3.0))  # uncached facts
    t0 = time.perf_counter()
    P.plan(65536, 8192, V, torch.bfloat16, CFG, "auto", 20 * GIB, setting=s)
    assert time.perf_counter() - t0 < 0.5


def test_sequence_kind_plans_whole_sequences():
    gspo = PolicyLossConfig(loss_mode="gspo")
    s = setting("torch", facts=ARCH_FACTS["cpu"], core="torch")
    pln = P.plan(4096, 1024, 32000, torch.float32, gspo, "auto", 256 * 2**20, seq_len=512, setting=s)
    assert pln.schedule == "one_pass" and all(seqs is not None for _, _, seqs in pln.chunks)
    assert all((b - a) % 512 == 0 for a, b, _ in pln.chunks) and pln.model.memory_bytes <= 256 * 2**20


def test_groups_follow_the_run_rule():
    """The model's GEMM 3 calls (runs of chunk sizes) are the run's: flush when the next chunk does not fit."""

    def brute(chunks, ring):
        out, fill = [], 0
        for r in chunks:
            if r and fill + r > max(ring, r):
                out.append(fill)
                fill = 0
            fill += r
        return out + ([fill] if fill else [])

    rng = random.Random(0)
    for _ in range(2000):
        chunks = [rng.choice([0, 1, 2, 3, 5, 7]) for _ in range(rng.randint(0, 12))]
        ring = rng.randint(1, 20)
        got = [k for k, times in C._groups(C._runs(chunks), ring) for _ in range(times)]
        assert got == brute(chunks, ring)


def test_du_rows_are_16_byte_aligned():
    assert C.du_row_stride(151936) == 151936 and C.du_row_stride(32003) == 32008 and C.du_row_stride(1) == 8


def test_default_budget_follows_free_memory(monkeypatch):
    """GPU default: min(4 GiB, usable / 4), read per call (mocked), rounded down to a quarter octave so a
    small move of free memory keeps the plan; an explicit budget ignores free memory."""
    dev = torch.device("cuda", 0)
    usable = {"v": 10 * GIB}
    monkeypatch.setattr(P, "memory_now", lambda d: fusedrl.backends.device.MemoryNow(usable["v"], 80 * GIB, 0, 0))
    monkeypatch.setattr(P._config, "get", lambda key: None)
    f = P.default_budget_bytes.__wrapped__ if hasattr(P.default_budget_bytes, "__wrapped__") else P.default_budget_bytes
    assert f(dev) == 2.5 * GIB
    usable["v"] = 11 * GIB - 5 * 2**20  # a GiB more, a few MiB less: the same quarter octave
    assert f(dev) == 2.5 * GIB
    usable["v"] = 100 * GIB
    assert f(dev) == 4 * GIB
    usable["v"] = 1 * GIB
    assert f(dev) == 0.25 * GIB
    assert P.budget_bytes(300.0, dev) == 300 * 2**20


# ------------------------------------------------------------------------------------------------
# The ring in the run (CPU): same values as one GEMM 3 per chunk
# ------------------------------------------------------------------------------------------------


def _case(n=23, h=16, v=507, dtype=torch.float64, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) / h**0.25).to(dtype)
    w = (torch.randn(v, h, generator=g) / h**0.25).to(dtype)
    b = (torch.randn(v, generator=g) * 0.3).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.2
    old = -torch.rand(n, generator=g) * 6 - 3
    adv = torch.randn(n, generator=g)
    ref = old + 0.1 * torch.randn(n, generator=g)
    return dict(hidden=x, weight=w, bias=b, targets=t, mask=mask, old_logp=old, advantages=adv, ref_logp=ref)


def _run(case, cfg, monkeypatch=None, ring=None, rows=None, backend="torch", **kw):
    c = dict(case)
    leaves = [c[k].clone().requires_grad_() for k in ("hidden", "weight", "bias") if c.get(k) is not None]
    c["hidden"], c["weight"] = leaves[0], leaves[1]
    if c.get("bias") is not None:
        c["bias"] = leaves[2]
    if monkeypatch is not None:
        real = OP.plan

        def forced(n, h, v, dtype, cfg_, schedule, budget, seq_len=None, cu_host=None, setting=None, defer=True):
            p = real(n, h, v, dtype, cfg_, schedule, budget, seq_len, cu_host, setting, defer)
            assert not p.deferred  # the ring tests run the accumulating plan
            r = rows or max(b - a for a, b, _ in p.chunks)
            chunks = tuple((a, min(n, a + r), None) for a in range(0, n, r))
            return p._replace(chunks=chunks, ring_rows=ring * r)

        monkeypatch.setattr(OP, "plan", forced)
    loss, metrics = fused_policy_loss(**c, config=cfg, schedule="one_pass", backend=backend, **kw)
    grads = torch.autograd.grad(loss, leaves)
    if monkeypatch is not None:
        monkeypatch.undo()
    return loss.detach(), grads


@pytest.mark.parametrize("ent", [0.0, 0.05])  # the torch epilogue's du in the scratch (0) or in U (0.05)
@pytest.mark.parametrize("ring", [2, 3])
def test_ring_equals_per_chunk_gemm3_fp64(monkeypatch, ring, ent):
    case = _case()
    cfg = PolicyLossConfig(entropy_coeff=ent, kl_loss_coef=0.1)
    want = _run(case, cfg, monkeypatch, ring=1, rows=4)
    got = _run(case, cfg, monkeypatch, ring=ring, rows=4)
    rec = fused_policy_loss  # the recompute schedule, the contract's other side
    c = {k: (v.clone().requires_grad_() if k in ("hidden", "weight", "bias") else v) for k, v in case.items()}
    loss_r, _ = rec(**c, config=cfg, schedule="recompute")
    grads_r = torch.autograd.grad(loss_r, [c["hidden"], c["weight"], c["bias"]])
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=0)
    for a, b, r in zip(got[1], want[1], grads_r):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ring_low_precision_and_unaligned_v(monkeypatch, dtype):
    """16-bit inputs: the du16 ring's rows are padded to 16 bytes (V = 507) and the run agrees with one
    GEMM 3 per chunk; fp32: the ring is the workspace."""
    strides = []
    real_epi = torch_backend.onepass_epilogue

    def spy(u, targets, bias, temperature, softcap, head, du16=None, **opts):
        if du16 is not None:
            strides.append((du16.stride(0), du16.data_ptr() % 16))
        return real_epi(u, targets, bias, temperature, softcap, head, du16, **opts)

    monkeypatch.setattr(torch_backend, "onepass_epilogue", spy)
    case = _case(n=40, dtype=dtype, bias=False)  # 40 rows of du outweigh dW32: GEMM 3 not deferred
    cfg = PolicyLossConfig(entropy_coeff=0.01)
    one = _run(case, cfg, None)
    monkeypatch.setattr(torch_backend, "onepass_epilogue", spy)
    got = _run(case, cfg, monkeypatch, ring=3, rows=5)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(got[0], one[0], **tol)
    for a, b in zip(got[1], one[1]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    if dtype == torch.bfloat16:
        assert strides and all(s == C.du_row_stride(507) and s % 8 == 0 for s, _ in strides)


@pytest.mark.parametrize("epilogue", ["triton", "cuda"])
def test_ring_on_kernel_epilogues(monkeypatch, epilogue):
    """The ring with a kernel epilogue: Triton (interpreter, where it runs on CPU) and the CUDA epilogue's
    host lane (the same C++ row functions on CPU tensors) write du over U, the ring's slots."""
    from fusedrl.backends import cuda as cuda_backend

    if epilogue == "triton" and "triton" not in fusedrl.available_backends("cpu"):
        pytest.skip("triton does not run on CPU here")
    if epilogue == "cuda" and cuda_backend.extension() is None:
        pytest.skip("the CUDA extension is not built")
    case = _case(n=12, h=8, v=67, dtype=torch.float32, bias=False)
    cfg = PolicyLossConfig(kl_loss_coef=0.1)
    base = _run(case, cfg, monkeypatch, ring=1, rows=3)
    seen = []
    if epilogue == "cuda":
        monkeypatch.setattr(RUN, "epilogue_for", lambda *a: seen.append(1) or cuda_backend)
    got = _run(case, cfg, monkeypatch, ring=2, rows=3, backend="triton" if epilogue == "triton" else "torch")
    assert epilogue == "triton" or seen
    torch.testing.assert_close(got[0], base[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[1], base[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_stage_timer_hook():
    """``run_one_pass(timer=...)`` reports each stage as it begins; GEMM 3 once per filled ring."""
    from fusedrl.loss import TokenHead
    from fusedrl.loss.inputs import flatten_batch

    case = _case(n=20, bias=False)
    x, w = case["hidden"], case["weight"]
    batch = flatten_batch("targets", (20,), x.device, case["old_logp"], case["advantages"], case["mask"], None, {},
                          check_inputs=False)  # fmt: skip
    head = TokenHead(batch, CFG, False, torch.float64)
    chunks = tuple((a, min(20, a + 4), None) for a in range(0, 20, 4))
    pln = P.Plan("one_pass", chunks, "test", 12)
    names = []
    out = RUN.run_one_pass(x, w, case["targets"], None, head, pln, 1.0, None, "torch", None, True, True, False,
                           False, timer=names.append)  # fmt: skip
    assert names.count("gemm1") == names.count("epilogue") == names.count("gemm2") == 5
    assert names.count("gemm3") == 2 and names[-1] == "end"  # rings of 3 chunks, then 2
    quiet = RUN.run_one_pass(x, w, case["targets"], None, head, pln, 1.0, None, "torch", None, True, True, False,
                             False)  # fmt: skip
    torch.testing.assert_close(out.dw, quiet.dw, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Settings and the 16-bit GEMM paths (mocked probes: torch versions)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "probes, want",
    [({"mm": True, "addmm": True}, "fast"), ({"mm": True, "addmm": False}, "mm"), ({"mm": False, "addmm": False},
                                                                                     "upcast")],
)  # fmt: skip
def test_gemm_path_by_torch_version(monkeypatch, probes, want):
    """torch >= 2.10: both fast kinds; 2.8-2.9: addmm refuses an fp32 accumulator with 16-bit operands
    (mm + add); < 2.8: no out_dtype (upcast). CPU always upcasts; fp32 inputs need no out_dtype."""
    monkeypatch.setattr(G, "_OUT_DTYPE_OK", dict(probes))
    assert G.path(torch.device("cuda", 0), torch.bfloat16) == want
    assert G.path(torch.device("cpu"), torch.bfloat16) == "upcast"
    assert G.path(torch.device("cuda", 0), torch.float32) == "fast"


def test_probe_runs_once_and_warns_once(monkeypatch):
    """An unprobed kind runs its 16 x 16 probe once (here on CPU, where torch has no out_dtype kernel: it
    fails) and warns once; later calls use the stored answer."""
    monkeypatch.setattr(G, "_OUT_DTYPE_OK", {"mm": None, "addmm": None})
    calls = []
    real = G._try
    monkeypatch.setattr(G, "_try", lambda kind, dev: calls.append(kind) or real(kind, dev))
    with pytest.warns(UserWarning, match="torch.mm .* unavailable"):
        assert G.probe("mm", torch.device("cpu")) is False
    assert G.probe("mm", torch.device("cpu")) is False
    assert calls == ["mm"]


def test_addmm_by_mm_fallback_slices(monkeypatch):
    """addmm's fallback (torch 2.8 / 2.9): fp32-output mm into a scratch slice by slice, then add."""
    monkeypatch.setattr(G, "_OUT_DTYPE_OK", {"mm": True, "addmm": False})
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(10, 7, generator=g)
    a = torch.randn(10, 5, generator=g).to(torch.bfloat16)
    b = torch.randn(5, 7, generator=g).to(torch.bfloat16)
    want = acc + a.float() @ b.float()
    for tmp in (torch.empty(20), torch.empty(3, 4), None):  # 2-row slices, a 1-row slice, self-allocated
        got = acc.clone()
        G._addmm_by_mm(got, a, b, tmp)
        torch.testing.assert_close(got, want)


def test_run_setting_names_the_epilogue():
    from fusedrl.loss import TokenHead
    from fusedrl.loss.inputs import flatten_batch

    case = _case(n=6, h=8, v=50, dtype=torch.float32)
    batch = flatten_batch("targets", (6,), torch.device("cpu"), case["old_logp"], case["advantages"], case["mask"],
                          None, {}, check_inputs=False)  # fmt: skip
    head = TokenHead(batch, PolicyLossConfig(entropy_coeff=0.1), False, torch.float32)
    s = OP.run_setting(case["hidden"], case["weight"], case["bias"], head, "torch", 0.7, None, True, True, True, False)
    assert s.epilogue == "torch" and s.db and s.bias and s.ent and s.ent_grad and s.facts == ARCH_FACTS["cpu"]
    if "triton" in fusedrl.available_backends("cpu"):
        s = OP.run_setting(case["hidden"], case["weight"], None, head, "triton", 1.0, 30.0, True, True, False, False)
        assert s.epilogue == "triton" and s.transform == 3 and not s.db
    a = ONEPASS.auto_setting(torch.device("cpu"), torch.float32, "torch", CFG, False, (True, True, False), False, 1.0,
                             None)  # fmt: skip
    assert a.epilogue == "torch" and a.core == "torch"


# ------------------------------------------------------------------------------------------------
# Lean kernel epilogues (no fp32 du store unless read) and the padded workspace rows, in the run
# ------------------------------------------------------------------------------------------------


class _EpilogueSpy:
    """A kernel epilogue module as ``run.epilogue_for`` returns it, recording each call's ``store_du32``
    and workspace layout; ``force`` overrides ``store_du32`` (True: the fp32 store of the earlier kernels)."""

    def __init__(self, mod, force=None):
        self.mod, self.force, self.calls = mod, force, []

    def onepass_supports(self, *a):
        return self.mod.onepass_supports(*a)

    def onepass_epilogue(self, u, *a, store_du32=True, **kw):
        self.calls.append((store_du32, u.stride(0), u.data_ptr() % 16))
        return self.mod.onepass_epilogue(u, *a, store_du32=store_du32 if self.force is None else self.force, **kw)


def _kernel_epilogue(name):
    from fusedrl.backends import cuda as cuda_backend
    from fusedrl.backends import triton as triton_backend

    if name == "triton":
        if "triton" not in fusedrl.available_backends("cpu"):
            pytest.skip("triton does not run on CPU here")
        return triton_backend
    if cuda_backend.extension() is None:
        pytest.skip("the CUDA extension is not built")
    return cuda_backend  # its host lane on CPU tensors: the kernel's C++ row functions


@pytest.mark.parametrize("v", [507, 1003])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("epilogue", ["triton", "cuda"])
def test_lean_epilogue_run_is_bitwise(monkeypatch, epilogue, dtype, bias, v):
    """The run asks a kernel epilogue for the fp32 du only where it reads it (fp32 inputs, a bias gradient):
    16-bit inputs without bias store du16 alone. Loss, dx, dW, db bitwise those of the fp32-storing
    epilogue; the workspace rows padded to 16 elements (16-byte aligned) for every V."""
    from fusedrl.loss import TokenHead
    from fusedrl.loss.inputs import flatten_batch

    mod = _kernel_epilogue(epilogue)
    n, h = 20, 16
    case = _case(n=n, h=h, v=v, dtype=dtype, seed=v, bias=bias)
    x, w, b, t = case["hidden"], case["weight"], case["bias"], case["targets"]
    batch = flatten_batch("targets", (n,), x.device, case["old_logp"], case["advantages"], case["mask"], None, {},
                          check_inputs=False)  # fmt: skip
    cfg = PolicyLossConfig(entropy_coeff=0.01)
    pln = P.Plan("one_pass", tuple((a, min(n, a + 8), None) for a in range(0, n, 8)), "test", 16)  # ring of 2
    outs = []
    for force in (True, None):  # the earlier kernels' fp32 store, then what the run asks for
        spy = _EpilogueSpy(mod, force)
        monkeypatch.setattr(RUN, "epilogue_for", lambda *a, s=spy: s)
        head = TokenHead(batch, cfg, False, torch.float32)
        g = RUN.run_one_pass(x, w, t, b, head, pln, 0.9, None, epilogue, None, True, True, bias, False)
        outs.append((g.loss, g.dx, g.dw, g.db))
        low = dtype != torch.float32
        assert spy.calls and all(c == (not (low and not bias), C.ws_row_stride(v), 0) for c in spy.calls)
    for a, e in zip(*outs):
        assert (a is None) == (e is None) and (a is None or torch.equal(a, e))
    assert outs[1][3] is not None if bias else outs[1][3] is None


def test_lean_epilogue_lowers_modeled_bytes():
    """stores_du32=False (the kernel epilogues now): 10 bytes per workspace element for 16-bit inputs
    without a bias gradient instead of 14, so a lower modeled epilogue and total; fp32 inputs and a bias
    gradient still pay for the fp32 du their GEMMs / column sum read."""
    assert not C.EPILOGUES["triton"].stores_du32 and not C.EPILOGUES["cuda"].stores_du32
    for ep in ("triton", "cuda"):
        lean, full = setting(ep), setting(ep, du32=True)
        assert C.epilogue_bytes_per_element(lean, 4, True, False) == 10
        assert C.epilogue_bytes_per_element(full, 4, True, False) == 14
        assert C.epilogue_bytes_per_element(setting(ep, db=True, bias=True), 4, True, False) == 14
        assert C.epilogue_bytes_per_element(lean, 4, False, False) == 12  # fp32: du over U, no 16-bit copy
        chunk_rows = ((1171, 7),)
        m_lean = C.model(8192, 4096, V, torch.bfloat16, chunk_rows, 4 * 1171, lean)
        m_full = C.model(8192, 4096, V, torch.bfloat16, chunk_rows, 4 * 1171, full)
        e_lean, e_full = dict(m_lean.terms)["epilogue"], dict(m_full.terms)["epilogue"]
        assert e_lean < e_full and m_lean.total_ms < m_full.total_ms
        assert e_full - e_lean == pytest.approx(7 * 1171 * V * 4 / (H100.hbm * 1e9), rel=1e-9)
        pln = P.plan(8192, 4096, V, torch.bfloat16, CFG, "one_pass", 4 * GIB, setting=lean)
        assert pln.model.total_ms / pln.model.floor_ms < 1.12


def test_workspace_rows_padded_to_16_elements():
    assert C.ws_row_stride(151936) == 151936 and C.ws_row_stride(32003) == 32016 and C.ws_row_stride(1) == 16
    s = setting("triton")
    mem = dict(C.memory_parts(1024, 512, 1003, torch.bfloat16, 100, 300, s))
    assert mem["workspace"] == 100 * 1008 * 4
